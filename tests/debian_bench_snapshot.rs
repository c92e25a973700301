//! `exitless bench snapshot --guest debian --vs qemu`: the Debian guest snapshotted at its shell
//! prompt and restored twice under exitless and, in the same run, under QEMU (`migrate` to a
//! file, `-incoming`); the JSON has one object per VMM with every figure present and sane (a
//! snapshot smaller than a few times the guest's RAM and larger than the kernel, a first answer
//! after the restore, ratios beside QEMU's figures). The kit guest's case under both VMMs too.
//! Bad input gets a clear error on any host.
//!
//! The bench tests need /dev/kvm where guest userspace runs, QEMU and the Debian guest; on a PVM
//! host `tools/test.sh` runs them inside the emulated SVM host. They check function, never
//! speed: the emulated host's timings only compare with each other.

mod common;

use common::*;
use serde_json::Value;

const ALL: [Need; 4] = [
    Need::Kvm,
    Need::GuestUserspace,
    Need::Qemu,
    Need::DebianGuest,
];

/// Runs `bench snapshot --vs qemu --restores 2 --json` with `extra`; returns the exitless and QEMU
/// objects after checking what both must have.
fn both_cases(extra: &[&str], guest: &str, mem: u64) -> (Value, Value) {
    let mut argv = vec!["bench", "snapshot", "--vs", "qemu", "--restores", "2"];
    argv.extend_from_slice(&["--json", "--timeout", "400"]);
    argv.extend_from_slice(extra);
    let r = exitless_cmd(&argv);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    let rows = v.as_array().expect("a JSON array");
    let names: Vec<&str> = rows.iter().filter_map(|x| x["vmm"].as_str()).collect();
    assert_eq!(names, ["exitless", "qemu"], "{v:#}");
    for c in rows {
        check_case(c, guest, mem);
    }
    (rows[0].clone(), rows[1].clone())
}

fn check_case(c: &Value, guest: &str, mem: u64) {
    assert_eq!(c["guest"], guest, "{c:#}");
    assert_eq!(c["memory_bytes"], mem, "{c:#}");
    assert_eq!(c["restores"], 2, "{c:#}");
    let num = |k: &str| {
        c[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number: {c:#}"))
    };
    for k in ["snapshot_ms", "restore_ms_min", "first_response_ms_min"] {
        assert!(num(k) > 0.0, "{k}: {c:#}");
    }
    assert!(num("restore_ms_min") <= num("restore_ms"), "{c:#}");
    assert!(
        num("first_response_ms_min") <= num("first_response_ms"),
        "{c:#}"
    );
    // Both VMMs' restore_ms end at (or before) the guest running again; the answer comes later.
    assert!(
        num("first_response_ms_min") > num("restore_ms_min"),
        "the guest answered before it was restored: {c:#}"
    );
    // More than a guest's kernel image, less than a few times its RAM.
    let bytes = num("snapshot_bytes");
    assert!(bytes > 1048576.0 && bytes < 3.0 * mem as f64, "{c:#}");
}

fn check_ratios(ours: &Value, qemu: &Value) {
    assert!(ours.get("exitless_vs_this").is_none(), "{ours:#}");
    let r = &qemu["exitless_vs_this"];
    for k in [
        "snapshot_ms",
        "snapshot_bytes",
        "restore_ms",
        "first_response_ms",
    ] {
        let want = ours[k].as_f64().unwrap() / qemu[k].as_f64().unwrap();
        let got = r[k]
            .as_f64()
            .unwrap_or_else(|| panic!("no ratio {k}: {qemu:#}"));
        assert!(
            (got - want).abs() < 0.01 + want * 0.01,
            "{k}: {got} vs {want}"
        );
    }
}

#[test]
fn debian_bench_snapshot_measures_exitless_and_qemu_with_the_debian_guest() {
    const TEST: &str = "debian_bench_snapshot_measures_exitless_and_qemu_with_the_debian_guest";
    if !needs(TEST, &ALL) {
        return;
    }
    let (ours, qemu) = both_cases(&["--guest", "debian"], "debian", 256 << 20);
    check_ratios(&ours, &qemu);
}

#[test]
fn debian_bench_snapshot_measures_exitless_and_qemu_with_the_kit_guest() {
    const TEST: &str = "debian_bench_snapshot_measures_exitless_and_qemu_with_the_kit_guest";
    if !needs(TEST, &ALL[..3]) {
        return;
    }
    let (ours, qemu) = both_cases(&["--guest", "kit", "--mem", "64M"], "kit:compute", 64 << 20);
    check_ratios(&ours, &qemu);
    // exitless writes the guest's working set (4 MiB) and image, not its 64 MiB.
    let bytes = ours["snapshot_bytes"].as_f64().unwrap();
    assert!(bytes < 16.0 * 1048576.0, "{ours:#}");
}

#[test]
fn bench_snapshot_refuses_missing_debian_images_with_a_clear_error() {
    let r = exitless_cmd(&[
        "bench",
        "snapshot",
        "--guest",
        "debian",
        "--kernel",
        "/nonexistent/vmlinuz",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("--kernel /nonexistent/vmlinuz") && r.stderr.contains("debian-guest.sh"),
        "{}",
        r.describe()
    );
    let r = exitless_cmd(&["bench", "snapshot", "--timeout", "0"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(r.stderr.contains("--timeout 0"), "{}", r.describe());
}
