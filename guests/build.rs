//! Links every guest at 1 MiB with `link.ld` as a static, freestanding ELF64.
fn main() {
    // The codegen flags come from guests/.cargo/config.toml. An inherited RUSTFLAGS or
    // CARGO_ENCODED_RUSTFLAGS (set by cargo for every build script, so also when this workspace is
    // built from another crate's build.rs) would silently replace them: SSE code at CPL0 breaks on
    // hosts whose KVM emulates CPL0 code, and a red zone breaks interrupt handling.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags.contains("no-redzone") || !flags.contains("-sse") {
        panic!(
            "guests need the rustflags of guests/.cargo/config.toml, got {flags:?}: build from \
             guests/ with RUSTFLAGS and CARGO_ENCODED_RUSTFLAGS unset"
        );
    }
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
