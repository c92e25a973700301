//! `exitless bench boot`: the Debian guest booted to its first userspace line under exitless and,
//! side by side, QEMU microvm and q35; the JSON has every VMM with a time, KVM's exits by reason
//! and the VMM's memory overhead, measured (not defaulted). Bad input gets a clear error on any
//! host.
//!
//! The boot test needs /dev/kvm where guest userspace runs, QEMU and the Debian guest; on a PVM
//! host `tools/test.sh` runs it inside the emulated SVM host. It checks function, never speed:
//! the emulated host's timings only compare with each other.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn debian_bench_boot_measures_exitless_and_both_qemu_machines() {
    const TEST: &str = "debian_bench_boot_measures_exitless_and_both_qemu_machines";
    let all = [
        Need::Kvm,
        Need::GuestUserspace,
        Need::Qemu,
        Need::DebianGuest,
    ];
    if !needs(TEST, &all) {
        return;
    }
    let r = exitless_cmd(&["bench", "boot", "--vs", "qemu", "--rounds", "1", "--json"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    let rows = v.as_array().expect("a JSON array");
    let names: Vec<&str> = rows.iter().filter_map(|x| x["vmm"].as_str()).collect();
    assert_eq!(names, ["exitless", "qemu-microvm", "qemu-q35"], "{v:#}");
    for x in rows {
        let t = x["to_userspace_s"].as_f64().unwrap_or(0.0);
        let up = x["guest_uptime_s"].as_f64().unwrap_or(0.0);
        // The guest's own clock runs only for part of the wall time the bench measured.
        assert!(t > 0.0 && up > 0.0 && up < t, "{x:#}");
        // A Linux boot to userspace takes thousands of exits (port I/O, timers, ...) under any VMM.
        assert!(x["exits"].as_u64().unwrap_or(0) > 500, "{x:#}");
        assert!(
            x["exits_by_reason"]["io_exits"].as_u64().unwrap_or(0) > 0,
            "{x:#}"
        );
        // Every VMM has some memory of its own, far less than the guest's 512 MiB.
        let mib = x["vmm_overhead_mib"].as_f64().unwrap_or(-1.0);
        assert!(mib > 0.0 && mib < 256.0, "{x:#}");
    }
    let ours = &rows[0];
    // exitless's own exits to userspace are part of KVM's count.
    let userspace: u64 = ours["userspace_exits"]
        .as_object()
        .expect("exitless's exits to userspace")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert!(
        userspace > 0 && userspace < ours["exits"].as_u64().unwrap(),
        "{ours:#}"
    );
    // Guest RAM is 2 MiB-aligned: the host backs what the guest touched with huge pages (where
    // transparent huge pages are on; the emulated host's are).
    if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
    {
        assert!(
            ours["guest_ram_huge_mib"].as_f64().unwrap_or(0.0) > 0.0,
            "{ours:#}"
        );
    }
}

#[test]
fn bench_boot_refuses_missing_files_and_too_little_memory_with_a_clear_error() {
    let dir = TempDir::new("bench-boot-input");
    let kernel = dir.path("vmlinuz");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let k = kernel.to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--kernel", "/nonexistent/vmlinuz"],
            "--kernel /nonexistent/vmlinuz",
        ),
        (
            &["--kernel", k, "--initrd", "/nonexistent/initrd"],
            "--initrd /nonexistent/initrd",
        ),
        (
            &["--kernel", k, "--initrd", k, "--mem", "128M"],
            "at least 256 MiB",
        ),
        (
            &["--kernel", k, "--initrd", k, "--timeout", "0"],
            "--timeout 0",
        ),
    ];
    for (args, says) in cases {
        let mut all = vec!["bench", "boot"];
        all.extend_from_slice(args);
        let r = exitless_cmd(&all);
        assert_eq!(r.status, Some(1), "{args:?}: {}", r.describe());
        assert!(r.stderr.contains(says), "{args:?}: {}", r.describe());
    }
}
