//! `exitless bench irq`: the Debian guest streams to and exchanges requests with the host over
//! virtio-net under the baseline, delivery-only and full configurations and under QEMU; the JSON
//! has every configuration and workload with measured (not defaulted) rates. Bad input gets a
//! clear error on any host.
//!
//! The bench test needs /dev/kvm where guest userspace runs, root (a network namespace), QEMU
//! and the Debian guest; on a PVM host `tools/test.sh` runs it inside the emulated SVM host. It
//! checks function, never speed.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn debian_bench_irq_measures_every_configuration_and_qemu() {
    const TEST: &str = "debian_bench_irq_measures_every_configuration_and_qemu";
    let all = [
        Need::Kvm,
        Need::GuestUserspace,
        Need::Qemu,
        Need::DebianGuest,
        Need::Root,
    ];
    if !needs(TEST, &all) {
        return;
    }
    let r = exitless_cmd(&[
        "bench",
        "irq",
        "--vs",
        "qemu",
        "--seconds",
        "3",
        "--sweep",
        "64",
        "--json",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let v: Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    eprintln!("{TEST}: {}", r.stdout);
    let rows = v.as_array().expect("a JSON array");
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|x| {
            (
                x["config"].as_str().unwrap_or("?"),
                x["workload"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let mut want = vec![];
    for c in ["baseline", "delivery-only", "full", "qemu"] {
        want.push((c, "stream"));
        want.push((c, "rr"));
    }
    want.push(("full T=64", "stream"));
    assert_eq!(got, want, "{v:#}");
    for x in rows {
        let f = |k: &str| x[k].as_f64().unwrap_or(-1.0);
        assert!(f("throughput") > 0.0, "{x:#}");
        // A guest that moves data takes interrupts and exits under any VMM.
        assert!(f("exits_per_s") > 0.0, "{x:#}");
        assert!(f("interrupts_per_s") > 0.0, "{x:#}");
        assert!(f("exits_per_interrupt") > 0.0, "{x:#}");
        let t = f("time_in_guest");
        assert!(t > 0.0 && t <= 1.0, "{x:#}");
        if x["workload"] == "rr" {
            assert!(f("latency_us") > 0.0, "{x:#}");
        }
    }
}

#[test]
fn bench_irq_refuses_bad_input_with_a_clear_error() {
    let cases: [(&[&str], &str); 3] = [
        (&["--kernel", "/nonexistent/vmlinuz"], "--kernel"),
        (&["--sweep", "0"], "--sweep"),
        (&["--sweep", "16,lots"], "--sweep"),
    ];
    for (extra, want) in cases {
        let mut a = vec!["bench", "irq"];
        a.extend_from_slice(extra);
        let r = exitless_cmd(&a);
        assert_eq!(r.status, Some(1), "{extra:?}: {}", r.describe());
        assert!(r.stderr.contains(want), "{extra:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
}
