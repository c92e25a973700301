//! Integration tests of `exitless bench io` and its `bench-io` guest: the block workloads (and the
//! network workload, where a network namespace can be made: root) run the number of requests they
//! were asked for, the device serves exactly those, and they cost no exit to userspace per
//! request (a per-request exit, e.g. a notification that misses its
//! ioeventfd or an interrupt path through userspace, gives at least 1 per request; the bound is
//! 0.5). No timing thresholds: the machine is shared and noisy. They need /dev/kvm (skipped with a
//! reason without); the QEMU comparison also needs qemu-system-x86_64 (skipped without).

mod common;
use common::*;

use serde_json::Value;

/// `--quick`: 32 MiB each way in 64 KiB requests, and 16384 frames.
const QUICK_REQUESTS: u64 = 32 * 1024 / 64;
const QUICK_FRAMES: u64 = 16384;

/// Checks the network row if the network workload ran (it needs root), else its reason.
fn check_net(v: &Value, with_qemu: bool) {
    if v["exitless_net"].is_null() {
        let why = v["unsupported"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["workload"] == "net-tx")
            .unwrap_or_else(|| panic!("no net-tx row and no reason in {v:#}"));
        skip("bench io: the net-tx workload", &why["why"].to_string());
        return;
    }
    let r = row(v, "net-tx");
    assert_eq!(r["requests"].as_u64(), Some(QUICK_FRAMES), "{r:#}");
    assert_eq!(r["bytes_per_request"], 1514, "{r:#}");
    assert!(f(&r["exitless"], "mb_s") > 0.0, "{r:#}");
    assert!(f(&r["exitless"], "exits_per_request") < 0.5, "{v:#}");
    let n = &v["exitless_net"];
    // Every frame reached the device (tx_frames counted as requests), beyond the baseline.
    assert_eq!(n["device_requests"].as_u64(), Some(QUICK_FRAMES), "{n:#}");
    assert!(n["interrupts"].as_i64().unwrap() < 4, "{n:#}");
    if with_qemu {
        assert!(f(&r["qemu"], "mb_s") > 0.0, "{r:#}");
    } else {
        assert!(r["qemu"].is_null(), "{r:#}");
    }
}

fn bench_json(extra: &[&str]) -> Value {
    let mut args = vec!["bench", "io", "--quick", "--json", "--rounds", "1"];
    args.extend_from_slice(extra);
    let out = std::process::Command::new(exitless())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exitless {args:?} failed:\n{err}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{err}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn row<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .find(|w| w["workload"] == name)
        .unwrap_or_else(|| panic!("no {name} row in {v:#}"))
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

#[test]
fn block_workloads_run_every_request_without_a_userspace_exit_per_request() {
    if !kvm_available("bench io") {
        return;
    }
    let v = bench_json(&[]);
    assert_eq!(v["bench"], "io");
    assert_eq!(v["mib"], 32, "{v:#}");
    assert_eq!(v["event_idx"], true, "{v:#}");
    for name in ["blk-write", "blk-read"] {
        let r = row(&v, name);
        assert_eq!(r["requests"].as_u64(), Some(QUICK_REQUESTS), "{r:#}");
        assert_eq!(r["bytes_per_request"], 65536, "{r:#}");
        let o = &r["exitless"];
        assert!(f(o, "mb_s") > 0.0, "{r:#}");
        assert!(f(o, "exits_per_request") < 0.5, "{v:#}");
        assert!(f(o, "mmio_exits_per_request") < 0.5, "{v:#}");
        // Batched submissions with EVENT_IDX: far fewer notifications than requests.
        let k = f(o, "kicks_per_request");
        assert!(k > 0.0 && k < 0.5, "{r:#}");
        assert!(r["qemu"].is_null() && r["ratio"].is_null(), "{r:#}");
    }
    let b = &v["exitless_block"];
    // The device served exactly the workloads' requests beyond the set-up-only baseline.
    assert_eq!(
        b["device_requests"].as_u64(),
        Some(2 * QUICK_REQUESTS),
        "{b:#}"
    );
    assert!(
        b["exits_to_userspace"].as_i64().unwrap() < QUICK_REQUESTS as i64,
        "{b:#}"
    );
    // Notifications reached the device through its ioeventfd; completions are polled, so the
    // guest suppressed (almost) every interrupt.
    let n = b["notifications"].as_i64().unwrap();
    assert!(n > 0 && n < QUICK_REQUESTS as i64, "{b:#}");
    assert!(b["interrupts"].as_i64().unwrap() < 4, "{b:#}");
    assert!(v["qemu_block"].is_null(), "{v:#}");
    check_net(&v, false);
}

#[test]
fn qemu_runs_the_same_guest_over_the_same_kind_of_disk() {
    if !needs(
        "qemu_runs_the_same_guest_over_the_same_kind_of_disk",
        &[Need::Kvm, Need::Qemu],
    ) {
        return;
    }
    let v = bench_json(&["--vs", "qemu"]);
    for name in ["blk-write", "blk-read"] {
        let r = row(&v, name);
        assert_eq!(r["requests"].as_u64(), Some(QUICK_REQUESTS), "{r:#}");
        let q = &r["qemu"];
        assert!(f(q, "mb_s") > 0.0, "{r:#}");
        assert!(f(q, "kicks_per_request") > 0.0, "{r:#}");
        assert!(f(r, "ratio") > 0.0, "{r:#}");
    }
    // QEMU's exits come from KVM's statistics over QMP, or the reason they could not be read.
    let q = &v["qemu_block"];
    assert!(
        q["unavailable"].is_string() || q["requests"].as_u64() == Some(2 * QUICK_REQUESTS),
        "{q:#}"
    );
    check_net(&v, true);
}

#[test]
fn the_guest_without_a_disk_fails_with_a_reason() {
    if !kvm_available("bench-io guest without a disk") {
        return;
    }
    let r = run_guest("bench-io", &["--cmdline", "mib=1"]);
    assert_ne!(r.status, Some(0), "{}", r.describe());
    assert!(
        r.stdout
            .contains("kit: FAIL bench-io: no virtio-blk device on PCI"),
        "{}",
        r.describe()
    );
}
