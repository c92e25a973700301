//! Integration test of `exitless bench iommu --quick` and its `bench-iommu` guest: every cell
//! runs, the JSON has the fields, and the teardown strategies differ as they must in what
//! they ask of the IOMMU: strict invalidates and waits once per request, deferred batches, the
//! optimistic-256 cache cannot keep the guest's 512 buffers (no reuse) while every teardown is one
//! invalidation, and sidecore takes the invalidation queue's tail writes without an exit. The
//! VMM's counts must match the guest's. No timing thresholds (the machine is shared and noisy,
//! and the optimistic-4096 reuse rate depends on the host's speed against the 10 ms limit).
//! Needs /dev/kvm (skipped with a reason without).

mod common;
use common::*;

use serde_json::Value;

const REQUESTS: u64 = 4096;

fn bench_json() -> Vec<Value> {
    let args = ["bench", "iommu", "--quick", "--json"];
    let out = std::process::Command::new(exitless())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exitless {args:?} failed:\n{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{err}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    v.as_array().expect("a JSON array").clone()
}

fn row<'a>(rows: &'a [Value], emulation: &str, strategy: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["emulation"] == emulation && r["strategy"] == strategy)
        .unwrap_or_else(|| panic!("no {emulation} {strategy} row in {rows:#?}"))
}

fn n(r: &Value, k: &str) -> u64 {
    r[k].as_u64()
        .unwrap_or_else(|| panic!("no count {k} in {r}"))
}

#[test]
fn quick_kit_bench_strategies_differ_in_invalidations_as_they_must() {
    if !kvm_available("bench iommu") {
        return;
    }
    let rows = bench_json();
    assert_eq!(rows.len(), 9, "{rows:#?}");
    for r in &rows {
        assert_eq!(r["guest"], "kit");
        assert_eq!(n(r, "requests"), REQUESTS, "{r}");
        assert!(r["throughput"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["pct_of_no_iommu"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["map_unmap_cycles"].as_f64().is_some(), "{r}");
        if r["emulation"] == "none" {
            assert_eq!(r["strategy"], "none");
            assert_eq!(r["pct_of_no_iommu"], 100.0);
            assert!(r["iotlb_hit_rate"].is_null(), "{r}");
            assert_eq!(n(r, "invalidation_waits"), 0, "{r}");
            continue;
        }
        let hit = r["iotlb_hit_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&hit), "{r}");
        // The VMM counted every invalidation the guest queued, plus the set-up's global one.
        assert_eq!(
            n(r, "vmm_iotlb_invalidations"),
            n(r, "invalidation_descriptors") + 1,
            "{r}"
        );
        let (waits, descs, teardowns) = (
            n(r, "invalidation_waits"),
            n(r, "invalidation_descriptors"),
            n(r, "teardowns"),
        );
        let reuses = (r["reuse_rate"].as_f64().unwrap() * REQUESTS as f64).round() as u64;
        match r["strategy"].as_str().unwrap() {
            "strict" => {
                assert_eq!(waits, REQUESTS, "{r}");
                assert_eq!(descs, REQUESTS, "{r}");
                assert_eq!(teardowns, REQUESTS, "{r}");
            }
            "deferred" => {
                // Every buffer unmapped at once, the invalidations batched.
                assert_eq!(teardowns, REQUESTS, "{r}");
                assert_eq!(waits, descs, "{r}");
                assert!(waits < REQUESTS / 2, "deferred did not batch: {r}");
            }
            "optimistic-256" => {
                assert_eq!(reuses, 0, "256 entries cannot hold 512 buffers: {r}");
                assert_eq!(descs, teardowns, "{r}");
                assert!(teardowns >= REQUESTS - 256 - 32, "{r}");
            }
            "optimistic-4096" => {
                assert_eq!(descs, teardowns, "{r}");
                assert!(reuses + teardowns <= REQUESTS, "{r}");
                assert!(waits <= teardowns, "{r}");
            }
            s => panic!("unknown strategy {s}"),
        }
    }
    // Samecore: each strict unmap's tail write is an exit; sidecore: none (page 0 is polled).
    let same = &row(&rows, "samecore", "strict")["register_exits_per_request"];
    let side = &row(&rows, "sidecore", "strict")["register_exits_per_request"];
    assert!(same.as_f64().unwrap() >= 1.0, "{same}");
    assert!(side.as_f64().unwrap() < 0.1, "{side}");
}

#[test]
fn bench_iommu_refuses_zero_requests() {
    let out = std::process::Command::new(exitless())
        .args(["bench", "iommu", "--requests", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--requests"));
}
