//! `exitless bench nested`: the exit bench at L2 and at L3 in one run, with L1's exits per L3
//! exit. Where guests get hardware virtualization (the emulated SVM host of `tools/svm-host.sh`),
//! a quick one-round run must give an object per operation, a nested CPUID dearer than a plain
//! one, and at least one L1 exit per L3 exit; everywhere else the bench refuses with the reason
//! and the command that runs it (`tools/svm-host.sh exitless bench nested`).

mod common;

use common::*;

#[test]
fn debian_bench_nested_measures_l2_and_l3_and_l1_exits_per_l3_exit() {
    const TEST: &str = "debian_bench_nested_measures_l2_and_l3_and_l1_exits_per_l3_exit";
    if !needs(
        TEST,
        &[
            Need::Kvm,
            Need::GuestUserspace,
            Need::DebianGuest,
            Need::NestedGuest,
        ],
    ) {
        return;
    }
    let r = exitless_cmd(&[
        "bench",
        "nested",
        "--quick",
        "--rounds",
        "1",
        "--json",
        "--timeout",
        "1200",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    eprintln!("{TEST}: {}\n{}", r.stderr, r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.describe()));
    let rows = v.as_array().expect("an array");
    assert!(rows.len() >= 18, "an object per operation: {v}");
    for row in rows {
        for key in [
            "op",
            "l2_ns",
            "l3_ns",
            "ratio",
            "l1_exits_per_l3_exit",
            "note",
        ] {
            assert!(row.get(key).is_some(), "{key} missing in {row}");
        }
    }
    let op = |name: &str| {
        rows.iter()
            .find(|r| r["op"] == name)
            .unwrap_or_else(|| panic!("no {name} row: {v}"))
    };
    let cpuid = op("cpuid");
    let (l2, l3) = (
        cpuid["l2_ns"].as_f64().expect("l2_ns"),
        cpuid["l3_ns"].as_f64().expect("l3_ns"),
    );
    assert!(l3 > l2, "a nested CPUID costs more: L2 {l2} ns, L3 {l3} ns");
    assert!(cpuid["ratio"].as_f64().unwrap() > 1.0, "{cpuid}");
    let per = cpuid["l1_exits_per_l3_exit"]
        .as_f64()
        .expect("l1_exits_per_l3_exit");
    assert!(per >= 1.0, "every L3 exit takes L1 exits: {per}");
    assert!(
        cpuid["l3_exits"].as_u64().unwrap() > 0 && cpuid["l1_exits"].as_u64().unwrap() > 0,
        "{cpuid}"
    );
    for name in ["pio_out", "mmio_read", "hypercall"] {
        assert!(op(name)["ratio"].as_f64().is_some(), "{}", op(name));
    }
}

/// Runs on any host with KVM: where guests get no hardware virtualization the bench refuses,
/// says why and names the command that runs it; where they do, it refuses a missing guest.
#[test]
fn bench_nested_is_refused_where_guests_get_no_hardware_virtualization() {
    const TEST: &str = "bench_nested_is_refused_where_guests_get_no_hardware_virtualization";
    if !needs(TEST, &[Need::Kvm]) {
        return;
    }
    let host = exitless_cmd(&["host"]).stdout;
    if host.contains("given to guests") {
        // The bench runs here (the test above): what it refuses here is a missing guest.
        let r = exitless_cmd(&["bench", "nested", "--kernel", "/nonexistent/vmlinuz"]);
        assert_eq!(r.status, Some(1), "{}", r.describe());
        assert!(
            r.stderr
                .contains("--kernel /nonexistent/vmlinuz: not found")
                && r.stderr.contains("tools/debian-guest.sh"),
            "{}",
            r.describe()
        );
        return;
    }
    let r = exitless_cmd(&["bench", "nested", "--quick", "--rounds", "1"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    let want = if host.contains("PVM") {
        "this host's KVM is PVM"
    } else {
        "gives guests no hardware virtualization"
    };
    assert!(
        r.stderr.contains("exitless: bench: ") && r.stderr.contains(want),
        "{}",
        r.describe()
    );
    assert!(
        r.stderr.contains("tools/svm-host.sh exitless bench nested"),
        "{}",
        r.describe()
    );
    assert!(r.stdout.is_empty(), "{}", r.describe());
}
