//! Links every guest at 1 MiB with `link.ld` as a static, freestanding ELF64.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    for arg in [
        format!("-T{dir}/link.ld"),
        "-nostartfiles".into(),
        "-nostdlib".into(),
        "-static".into(),
        "-no-pie".into(),
        "-Wl,--build-id=none".into(),
        "-Wl,-z,norelro".into(),
        "-Wl,-z,max-page-size=4096".into(),
    ] {
        println!("cargo:rustc-link-arg={arg}");
    }
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
