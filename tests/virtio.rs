//! The kit's own virtio drivers against exitless's virtio-pci devices, under KVM: block I/O that
//! the host then checks in the image file, entropy, and a hostile driver that must not harm the
//! VMM. Skipped (a recorded skip, with the reason) where /dev/kvm cannot be opened.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kvm_usable() -> bool {
    common::kvm_available("virtio (kit drivers)")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("exitless-virtio-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(guest: &str, args: &[&str], json: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_exitless"))
        .args(["run", "--guest", guest, "--timeout", "120", "--stats-json"])
        .arg(json)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "--- {guest} stdout:\n{}\n--- stderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The device's facts from the run report.
fn facts(json: &Path, device: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let devices = v["devices"].as_array().cloned().unwrap_or_default();
    devices
        .into_iter()
        .find(|d| d["device"] == device)
        .map(|d| d["facts"].clone())
        .unwrap_or_else(|| panic!("no facts for {device} in {v}"))
}

#[test]
fn kit_virtio_blk_writes_what_the_host_reads() {
    if !kvm_usable() {
        return;
    }
    let d = scratch("blk");
    let img = d.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let json = d.join("stats.json");
    let out = run(
        "virtio-blk",
        &["--disk", &format!("path={},id=kitdisk", img.display())],
        &json,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(stdout.contains("kit: PASS virtio-blk"));
    assert!(stdout.contains("id=kitdisk"));
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[512..528], b"kit-virtio-blk!!");
    for s in 1..=8usize {
        let from = if s == 1 { 512 + 16 } else { 512 * s };
        assert!(
            bytes[from..512 * (s + 1)]
                .iter()
                .all(|&b| b == s as u8 ^ 0x5a),
            "sector {s}"
        );
    }
    assert!(bytes[..512].iter().all(|&b| b == 0));
    assert!(bytes[9 * 512..].iter().all(|&b| b == 0));
    let f = facts(&json, "virtio-blk0");
    assert_eq!(f["driver_ok"], 1);
    assert_eq!(f["writes"], 1);
    assert_eq!(f["flushes"], 1);
    assert_eq!(f["bytes_from_guest"], 4096);
    // Every notification went through the ioeventfd: no exit on the notify page.
    assert_eq!(f["notifications"], 5);
    let report = std::fs::read_to_string(&json).unwrap();
    assert!(
        !report.contains("0xc0003000"),
        "notify writes exited: {report}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn kit_virtio_rng_reads_entropy() {
    if !kvm_usable() {
        return;
    }
    let d = scratch("rng");
    let json = d.join("stats.json");
    let out = run("virtio-rng", &["--rng"], &json);
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kit: PASS virtio-rng"));
    let f = facts(&json, "virtio-rng");
    assert_eq!(f["driver_ok"], 1);
    assert_eq!(f["requests"], 2);
    assert_eq!(f["bytes_to_guest"], 128);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn kit_hostile_driver_does_not_harm_the_vmm() {
    if !kvm_usable() {
        return;
    }
    let d = scratch("hostile");
    let img = d.join("disk.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let json = d.join("stats.json");
    let out = run(
        "virtio-hostile",
        &["--disk", &format!("path={}", img.display()), "--rng"],
        &json,
    );
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kit: PASS virtio-hostile"));
    let f = facts(&json, "virtio-blk0");
    assert_eq!(f["needs_reset"], 1, "{f}");
    assert!(f["bad_chains"].as_u64().unwrap() >= 3, "{f}");
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 7));
    // 500 BAR moves and 500 S1 requests: a burst of warnings each, then a count.
    let err = String::from_utf8_lossy(&out.stderr);
    for what in ["tried to move BAR", "ACPI sleep type"] {
        let n = err.lines().filter(|l| l.contains(what)).count();
        assert!((1..=12).contains(&n), "{n} lines with {what:?} on stderr");
    }
    assert!(err.contains("were suppressed (rate limit)"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_missing_image_is_a_clear_start_up_error() {
    if !kvm_usable() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_exitless"))
        .args([
            "run",
            "--guest",
            "virtio-blk",
            "--disk",
            "path=/nonexistent/exitless.img",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open disk image /nonexistent/exitless.img"),
        "{err}"
    );
}
