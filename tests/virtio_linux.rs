//! The real Linux test kernel (`../shared/guest/test-kernel/bzImage`: virtio, ext4, IPv4 built in)
//! driving exitless's virtio-pci devices without any userspace: it must mount an ext4 root from
//! virtio-blk (the host sees the superblock's mount count change) and bind virtio-rng (DRIVER_OK
//! and requests served, from the run report). Init then dies (no userspace runs on PVM hosts) and
//! `panic=1` ends the VM.
//!
//! Skipped, with the reason printed, without /dev/kvm, the kernel or `mkfs.ext4`. The kernel's own
//! code is emulated on hosts without VMX/SVM: expect several minutes.
//! `EXITLESS_LINUX_TIMEOUT` (seconds, default 1500) bounds the run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn kernel() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/guest/test-kernel/bzImage")
}

fn skip_reason() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("cannot open /dev/kvm: {e}"));
    }
    if !kernel().exists() {
        return Some(format!("no test kernel at {}", kernel().display()));
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        return Some("mkfs.ext4 is not installed (e2fsprogs)".into());
    }
    None
}

/// The ext4 superblock's mount count (offset 1024 + 0x34).
fn mount_count(img: &Path) -> u16 {
    let b = std::fs::read(img).unwrap();
    u16::from_le_bytes([b[1024 + 0x34], b[1024 + 0x35]])
}

fn facts(report: &serde_json::Value, device: &str) -> serde_json::Value {
    report["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["device"] == device)
        .map(|d| d["facts"].clone())
        .unwrap_or_else(|| panic!("no facts for {device}"))
}

#[test]
// Not yet passing on the PVM development host: the kernel binds both devices (DRIVER_OK, MSI-X
// interrupts, requests served) but stalls in the scheduler after `rtc_cmos` before the root mount
// (see issue 4's notes). Run with `cargo test --test virtio_linux -- --ignored`.
#[ignore = "kernel stalls before the root mount on PVM hosts; run with --ignored"]
fn linux_mounts_its_root_from_virtio_blk_and_binds_virtio_rng() {
    if let Some(why) = skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("exitless-virtio-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("root.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
    assert_eq!(mount_count(&img), 0);

    let timeout = std::env::var("EXITLESS_LINUX_TIMEOUT").unwrap_or_else(|_| "1500".into());
    let json = dir.join("stats.json");
    let console = dir.join("console.log");
    let out = Command::new(env!("CARGO_BIN_EXE_exitless"))
        .args(["run", "--kernel"])
        .arg(kernel())
        .arg("--disk")
        .arg(format!("path={},id=root", img.display()))
        .args([
            "--rng",
            "--cpus",
            "1",
            "--mem",
            "256M",
            "--verbose-boot",
            "--cmdline",
            "root=/dev/vda rw rootdelay=1 panic=1",
            "--timeout",
            &timeout,
            "--stats-json",
        ])
        .arg(&json)
        .arg("--console-log")
        .arg(&console)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    eprintln!(
        "--- console (tail):\n{}\n--- stderr:\n{}",
        log.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("virtio_blk virtio0: [vda]") || log.contains("[vda]"));
    assert!(log.contains("VFS: Mounted root (ext4"), "root not mounted");
    assert_eq!(mount_count(&img), 1, "the host sees the mount");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let blk = facts(&report, "virtio-blk0");
    assert!(blk["driver_ok"].as_u64().unwrap() >= 1, "{blk}");
    assert!(blk["reads"].as_u64().unwrap_or(0) > 0, "{blk}");
    assert!(blk["writes"].as_u64().unwrap_or(0) > 0, "{blk}");
    assert_eq!(blk["bad_chains"], 0, "{blk}");
    let rng = facts(&report, "virtio-rng");
    assert!(rng["driver_ok"].as_u64().unwrap() >= 1, "{rng}");
    assert!(rng["requests"].as_u64().unwrap() >= 1, "{rng}");
    let _ = std::fs::remove_dir_all(&dir);
}
