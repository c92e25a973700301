//! Integration tests of `exitless bench exits` and its guest: every benchmarked operation produces
//! the exit (reason and count) the table claims, the JSON output has every field, and a guest
//! that fails or hangs gets a clear error within the time limit. They need /dev/kvm (skipped with
//! a reason without); the QEMU comparison also needs qemu-system-x86_64 (skipped without).

mod common;
use common::*;

use exitless::bench::exits::{parse, GuestRun, OPS};
use serde_json::Value;

/// `exitless run --guest bench` in quick mode (the hypercall from CPL3: a CPL0 hypercall never
/// completes on PVM hosts, and CPL3 works everywhere).
fn bench_guest_run() -> (Run, GuestRun) {
    let r = run_guest("bench", &["--cmdline", "quick hypercall=cpl3"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let g = parse(&r.stdout).unwrap_or_else(|e| panic!("{e}\n{}", r.describe()));
    (r, g)
}

fn ops(g: &GuestRun, names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| {
            g.measure(n)
                .unwrap_or_else(|| panic!("{n} not measured"))
                .ops
        })
        .sum()
}

#[test]
fn each_benchmarked_operation_produces_its_exit_and_count() {
    if !kvm_available("bench guest exit counts") {
        return;
    }
    let (r, g) = bench_guest_run();
    let fact = |f: &str| r.device_fact("probe", f).unwrap_or(0);
    let report = r.report.as_ref().unwrap();
    let d = r.describe();

    // Userspace PIO: every `out`/`in` on 0x510 is one io_out/io_in exit counted by the probe.
    let (pio_w, pio_r) = (
        ops(&g, &["pio_out", "pio_out_user"]),
        ops(&g, &["pio_in", "pio_in_user"]),
    );
    assert!(pio_w > 0 && pio_r > 0);
    assert_eq!(fact("pio_writes"), pio_w, "{d}");
    assert_eq!(fact("pio_reads"), pio_r, "{d}");
    assert_eq!(r.port_exits(0x510), pio_w + pio_r, "{d}");
    // Besides the probe, io_out exits are the console's THR writes and the power-off write;
    // io_in exits the console's LSR polls.
    assert_eq!(
        r.exits("io_out"),
        pio_w + r.port_exits(0x3f8) + r.port_exits(0x604),
        "{d}"
    );
    assert_eq!(r.exits("io_in"), pio_r + r.port_exits(0x3fd), "{d}");

    // Userspace MMIO: every access to the probe page is one mmio_read/mmio_write exit.
    let (mmio_r, mmio_w) = (
        ops(&g, &["mmio_read", "mmio_read_user"]),
        ops(&g, &["mmio_write", "mmio_write_user"]),
    );
    assert_eq!(fact("mmio_reads"), mmio_r, "{d}");
    assert_eq!(fact("mmio_writes"), mmio_w, "{d}");
    assert_eq!(r.exits("mmio_read"), mmio_r, "{d}");
    assert_eq!(r.exits("mmio_write"), mmio_w, "{d}");
    assert_eq!(
        report["mmio_pages"]["0xf0000000"].as_u64(),
        Some(mmio_r + mmio_w),
        "{d}"
    );

    // ioeventfd: completed inside KVM, counted on the eventfd, no userspace exit on 0x514.
    assert_eq!(
        fact("pio_ioeventfd"),
        ops(&g, &["pio_out_ioeventfd", "pio_out_ioeventfd_user"]),
        "{d}"
    );
    assert_eq!(
        fact("mmio_ioeventfd"),
        ops(&g, &["mmio_write_ioeventfd", "mmio_write_ioeventfd_user"]),
        "{d}"
    );
    assert_eq!(r.port_exits(0x514), 0, "{d}");

    // In-kernel: CPUID, the hypercall, LAPIC EOI/TPR/ICR, HLT never reach userspace.
    for op in ["cpuid", "hypercall", "eoi", "tpr", "ipi_self", "hlt_timer"] {
        assert!(g.measure(op).is_some(), "{op} not measured\n{d}");
    }
    assert_eq!(r.exits("hlt"), 0, "{d}");
    assert_eq!(r.exits("hypercall"), 0, "{d}");
    assert!(report["mmio_pages"].get("0xfee00000").is_none(), "{d}");
    // Nothing else left the kernel: the probe, the console, the power-off (and kicks).
    let known = r.exits("io_out") + r.exits("io_in") + r.exits("mmio_read") + r.exits("mmio_write");
    let total = report["total_exits"].as_u64().unwrap();
    assert_eq!(
        total - known - r.exits("interrupted") - r.exits("system_event"),
        0,
        "{d}"
    );

    // The dispatch time is kept per exit reason.
    for reason in ["io_out", "io_in", "mmio_read", "mmio_write"] {
        assert!(
            report["vmm_ns_by_exit"][reason].as_u64().unwrap_or(0) > 0,
            "{reason}\n{d}"
        );
    }
    // Every op measured with sane numbers (cycles per operation).
    for o in OPS {
        let m = g.measure(o.name).unwrap();
        assert!(m.p50 > 0 && m.p10 <= m.p50 && m.p50 <= m.p90, "{}", o.name);
    }
}

fn json_rows(r: &Run) -> Vec<Value> {
    let v: Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value: {e}\n{}", r.describe()));
    v.as_array().expect("a JSON array").clone()
}

fn check_fields(rows: &[Value]) {
    for o in rows {
        let obj = o.as_object().expect("objects");
        let mut keys: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cycles",
                "exit",
                "ns",
                "op",
                "peer_ns",
                "ratio",
                "spread_ns"
            ],
            "{o}"
        );
        let op = o["op"].as_str().unwrap();
        assert!(
            op.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{op}"
        );
        assert!(o["exit"].is_null() || o["exit"].is_string(), "{o}");
    }
}

#[test]
fn bench_exits_json_has_every_field() {
    if !kvm_available("bench exits --json") {
        return;
    }
    let r = exitless_cmd(&["bench", "exits", "--json", "--quick", "--rounds", "1"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let rows = json_rows(&r);
    check_fields(&rows);
    let by = |op: &str| {
        rows.iter()
            .find(|o| o["op"] == op)
            .unwrap_or_else(|| panic!("no {op}"))
    };
    for o in OPS {
        let row = by(o.name);
        assert!(row["ns"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["cycles"].as_u64().unwrap() > 0, "{row}");
        let s = row["spread_ns"].as_array().unwrap();
        assert!(s[0].as_f64().unwrap() <= s[1].as_f64().unwrap(), "{row}");
        assert!(row["peer_ns"].is_null() && row["ratio"].is_null(), "{row}");
    }
    assert_eq!(by("pio_out")["exit"], "io_out");
    assert_eq!(by("pio_in_user")["exit"], "io_in");
    assert_eq!(by("mmio_read")["exit"], "mmio_read");
    assert_eq!(by("mmio_write_user")["exit"], "mmio_write");
    for op in [
        "pio_out_ioeventfd",
        "mmio_write_ioeventfd",
        "cpuid",
        "eoi",
        "hlt_timer",
    ] {
        assert!(by(op)["exit"].is_null(), "{op}");
    }
    let d = by("vmm_dispatch");
    assert!(d["ns"].as_f64().unwrap() > 0.0, "{d}");
    assert!(d["spread_ns"].is_null());
    // ioeventfd completions cost less than the userspace round trip of the same instruction.
    assert!(
        by("pio_out_ioeventfd_user")["cycles"].as_u64() < by("pio_out_user")["cycles"].as_u64()
    );
}

#[test]
fn bench_exits_side_by_side_with_qemu() {
    if !needs(
        "bench_exits_side_by_side_with_qemu",
        &[Need::Kvm, Need::Qemu],
    ) {
        return;
    }
    let r = exitless_cmd(&[
        "bench", "exits", "--json", "--quick", "--rounds", "1", "--vs", "qemu",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let rows = json_rows(&r);
    check_fields(&rows);
    for o in OPS {
        let row = rows.iter().find(|x| x["op"] == o.name).unwrap();
        assert!(row["peer_ns"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn missing_qemu_is_named_with_its_package() {
    if !kvm_available("bench exits without qemu") {
        return;
    }
    let out = std::process::Command::new(exitless())
        .args(["bench", "exits", "--vs", "qemu", "--quick", "--rounds", "1"])
        .env("PATH", "/nonexistent")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("apt-get install qemu-system-x86"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_misbehaving_bench_guest_gets_a_clear_error_and_a_time_limit() {
    if !kvm_available("misbehaving bench guest") {
        return;
    }
    let t = std::time::Instant::now();
    // A guest that fails.
    let r = exitless_cmd(&["bench", "exits", "--guest", "fail", "--rounds", "1"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("the bench guest failed: kit: FAIL fail"),
        "{}",
        r.describe()
    );
    // A guest that prints other things (no protocol at all).
    let r = exitless_cmd(&["bench", "exits", "--guest", "poweroff", "--rounds", "1"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("no `kit: bench start` line"),
        "{}",
        r.describe()
    );
    // A guest that hangs (the serial guest waits for input that never comes).
    let r = exitless_cmd(&[
        "bench",
        "exits",
        "--guest",
        "serial",
        "--rounds",
        "1",
        "--timeout",
        "2",
    ]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(
        r.stderr.contains("did not finish within --timeout 2 s"),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("kit: ready"), "{}", r.describe());
    // The bench guest itself, cut short by the time limit: the error shows how far it got.
    let r = exitless_cmd(&["bench", "exits", "--rounds", "1", "--timeout", "0.3"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(r.stderr.contains("--timeout 0.3 s"), "{}", r.describe());
    assert!(r.stdout.is_empty(), "{}", r.describe());
    assert!(t.elapsed().as_secs() < 60);
}
