//! Builds the test-kit guests in `guests/` (a separate no_std cargo workspace) and leaves them in
//! `$OUT_DIR/guests/` for `src/kit.rs` to embed. Set `EXITLESS_GUESTS_DIR` to a directory of
//! prebuilt guests to skip the nested build.

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &[
    "demo",
    "exits",
    "bench",
    "smp",
    "serial",
    "poweroff",
    "reset",
    "fail",
    "triplefault",
    "syscall-probe",
    "virtio-blk",
    "virtio-hostile",
    "hostile",
    "console-flood",
    "virtio-rng",
    "virtio-vsock",
    "virtio-net",
    "virtio-balloon",
    "bench-io",
    "bench-iommu",
    "clock",
    "blk-flush",
    "compute",
    "power-button",
    "virtio-snap",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let guests_src = manifest.join("guests");
    for p in ["src", "Cargo.toml", "build.rs", "link.ld", ".cargo"] {
        println!("cargo:rerun-if-changed=guests/{p}");
    }
    println!("cargo:rerun-if-env-changed=EXITLESS_GUESTS_DIR");
    let dest = out.join("guests");
    std::fs::create_dir_all(&dest).unwrap();

    let built = if let Ok(dir) = std::env::var("EXITLESS_GUESTS_DIR") {
        PathBuf::from(dir)
    } else {
        let target_dir = out.join("guests-target");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&guests_src)
            .args(["build", "--release", "--offline", "--target-dir"])
            .arg(&target_dir);
        // The outer build's flags and wrappers (clippy, coverage) must not leak into the guests.
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "CARGO_BUILD_TARGET",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_PROFILE_RELEASE_DEBUG",
        ] {
            cmd.env_remove(var);
        }
        let status = cmd
            .status()
            .expect("cannot run cargo to build the kit guests");
        assert!(
            status.success(),
            "building the kit guests in guests/ failed"
        );
        target_dir.join("x86_64-unknown-linux-gnu").join("release")
    };
    for g in GUESTS {
        let from = built.join(g);
        std::fs::copy(&from, dest.join(g))
            .unwrap_or_else(|e| panic!("kit guest {} missing: {e}", from.display()));
    }
}
