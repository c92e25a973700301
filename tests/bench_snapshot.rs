//! `exitless bench snapshot`, briefly (a 64 MiB guest, two restores): its JSON has every field
//! with sane values — a snapshot of the guest's working set (4 MiB) rather than of its RAM,
//! times that add up (the first response comes after the restore). No timing is asserted.
//! Needs /dev/kvm (skipped with a reason without).

mod common;
use common::*;

#[test]
fn the_bench_s_json_has_every_field_with_consistent_values() {
    if !kvm_available("bench snapshot json") {
        return;
    }
    let r = exitless_cmd(&[
        "bench",
        "snapshot",
        "--json",
        "--mem",
        "64M",
        "--restores",
        "2",
        "--timeout",
        "120",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let v: serde_json::Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.describe()));
    let cases = v.as_array().expect("an array of cases");
    let c = cases
        .iter()
        .find(|c| c["vmm"] == "exitless")
        .unwrap_or_else(|| panic!("no exitless case: {v}"));
    assert_eq!(c["guest"], "kit:compute", "{c}");
    assert_eq!(c["memory_bytes"], 64u64 << 20, "{c}");
    assert_eq!(c["restores"], 2, "{c}");
    let num = |k: &str| {
        c[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing or not a number: {c}"))
    };
    for k in ["snapshot_ms", "restore_ms", "first_response_ms"] {
        assert!(num(k) > 0.0, "{k}: {c}");
    }
    assert!(num("restore_ms_min") <= num("restore_ms"), "{c}");
    assert!(
        num("first_response_ms_min") <= num("first_response_ms"),
        "{c}"
    );
    assert!(
        num("first_response_ms_min") > num("restore_ms_min"),
        "the guest answered before it was restored: {c}"
    );
    // The working set and the guest's image, not 64 MiB of RAM.
    let bytes = num("snapshot_bytes");
    assert!((4.0 * 1048576.0..16.0 * 1048576.0).contains(&bytes), "{c}");
}
