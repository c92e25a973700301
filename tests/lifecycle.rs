//! The VM's lifecycle through its REST API (`--api-socket`, `exitless ctl`) with the kit's clock
//! guest (a tick every 200 ms, each printing its TSC and kvmclock time): every allowed and
//! refused transition, a pause that stops the guest (no tick, no exit, kvmclock not counting the
//! pause), and clients that send garbage, huge requests or hold every connection without
//! stalling the guest. Skipped (with the reason printed) where /dev/kvm cannot be opened.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{exitless_cmd, kvm_available, start_with_api, Run, TempDir};

/// How long the guest may take to show progress (a loaded, emulated host is slow).
const PROGRESS: Duration = Duration::from_secs(180);

fn start_clock(dir: &TempDir) -> Child {
    start_guest(dir, &["--guest", "clock", "--cpus", "2"])
}

/// `exitless run ARGS` with the directory's API socket, console log and report.
fn start_guest(dir: &TempDir, args: &[&str]) -> Child {
    start_with_api(dir, &[args, &["--timeout", "600"]].concat())
}

/// One `kit: tick N tsc_ms T kvmclock_ms K` line (K is None without kvmclock).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tick {
    n: u64,
    tsc_ms: u64,
    kvmclock_ms: Option<u64>,
}

fn ticks(dir: &TempDir) -> Vec<Tick> {
    let text = std::fs::read_to_string(dir.path("console.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.strip_prefix("kit: tick ")?.split(' ').collect();
            Some(Tick {
                n: w.first()?.parse().ok()?,
                tsc_ms: w.get(2)?.parse().ok()?,
                kvmclock_ms: w.get(4).and_then(|k| k.parse().ok()),
            })
        })
        .collect()
}

/// Waits until the guest has printed tick `n` (panics if the VM ends or it takes too long).
fn wait_for_tick(dir: &TempDir, child: &mut Child, n: u64) -> Vec<Tick> {
    let t = Instant::now();
    loop {
        let seen = ticks(dir);
        if seen.last().is_some_and(|k| k.n >= n) {
            return seen;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the VM ended before tick {n}"
        );
        assert!(t.elapsed() < PROGRESS, "no tick {n} after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ctl(dir: &TempDir, args: &[&str]) -> (Run, serde_json::Value) {
    let sock = dir.path("api.sock");
    let mut v = vec!["ctl", "--socket", sock.to_str().unwrap()];
    v.extend_from_slice(args);
    let r = exitless_cmd(&v);
    let json = serde_json::from_str(&r.stdout).unwrap_or(serde_json::Value::Null);
    (r, json)
}

/// Sends raw bytes on a new connection; what the server answered before closing it.
fn raw(dir: &TempDir, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(dir.path("api.sock")).unwrap();
    s.set_read_timeout(Some(PROGRESS)).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn finish(dir: &TempDir, child: Child) -> Run {
    let out = child.wait_with_output().expect("wait for exitless");
    let report = std::fs::read_to_string(dir.path("report.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Run {
        status: out.status.code(),
        stdout: std::fs::read_to_string(dir.path("console.log")).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

/// Ends the VM through the API and checks it ended cleanly for that reason.
fn quit_and_check(dir: &TempDir, child: Child) {
    let (r, q) = ctl(dir, &["quit"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(q["ok"], true, "{q}");
    let run = finish(dir, child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("stopped through the control API"),
        "{}",
        run.describe()
    );
}

fn exits_total(stats: &serde_json::Value) -> u64 {
    stats["exits"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0)
}

#[test]
fn pause_stops_the_guest_and_its_clock_and_wrong_states_are_refused() {
    if !kvm_available("pause_stops_the_guest_and_its_clock_and_wrong_states_are_refused") {
        return;
    }
    let dir = TempDir::new("lifecycle");
    let mut child = start_clock(&dir);
    wait_for_tick(&dir, &mut child, 2);
    let (_, info) = ctl(&dir, &["state"]);
    assert_eq!(
        (
            info["ok"].clone(),
            info["state"].clone(),
            info["vcpus"].clone()
        ),
        (true.into(), "running".into(), 2.into()),
        "{info}"
    );
    // Resume a running VM: refused, a 400 with the reason, nothing changes.
    let (r, e) = ctl(&dir, &["resume"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert_eq!(e["error"], "cannot resume a VM that is running", "{e}");
    let http = raw(
        &dir,
        b"PUT /api/v1/vm/resume HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
    );
    assert!(http.starts_with("HTTP/1.1 400"), "{http}");
    // Pause: both vCPUs parked (the second waits for its SIPI, blocked in KVM_RUN).
    let (r, p) = ctl(&dir, &["pause"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(p["state"], "paused", "{p}");
    let (r, e) = ctl(&dir, &["pause"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert_eq!(e["error"], "cannot pause a VM that is paused", "{e}");
    // While paused the guest does nothing: no tick, no exit (the API still answers).
    let before = ticks(&dir);
    let (_, s1) = ctl(&dir, &["stats"]);
    assert_eq!(s1["state"], "paused", "{s1}");
    let paused_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let (_, s2) = ctl(&dir, &["stats"]);
    assert_eq!(ticks(&dir), before, "the guest ticked while paused");
    assert_eq!(exits_total(&s1), exits_total(&s2), "{s1}\n{s2}");
    let (_, info) = ctl(&dir, &["state"]);
    assert!(info["paused_s"].as_f64().unwrap() >= 3.0, "{info}");
    // Resume: the guest goes on from where it was.
    let (r, p) = ctl(&dir, &["resume"]);
    let paused_for = paused_at.elapsed();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(p["state"], "running", "{p}");
    let last = *before.last().unwrap();
    let after = wait_for_tick(&dir, &mut child, last.n + 1);
    let next = after[after.iter().position(|t| t.n == last.n).unwrap() + 1];
    assert_eq!(next.n, last.n + 1, "{after:?}");
    // Its TSC counted the pause; kvmclock (frozen at the pause, set back at the resume) did not.
    let tsc_gap = next.tsc_ms - last.tsc_ms;
    match (last.kvmclock_ms, next.kvmclock_ms) {
        (Some(a), Some(b)) => assert!(
            b - a + 1000 <= tsc_gap,
            "kvmclock advanced {} ms across a pause of {paused_for:?} (TSC {tsc_gap} ms)",
            b - a
        ),
        _ => eprintln!("no kvmclock on this host: the guest's clock across the pause unchecked"),
    }
    quit_and_check(&dir, child);
}

#[test]
fn garbage_huge_requests_and_idle_clients_do_not_stall_the_guest() {
    if !kvm_available("garbage_huge_requests_and_idle_clients_do_not_stall_the_guest") {
        return;
    }
    let dir = TempDir::new("api-abuse");
    let mut child = start_clock(&dir);
    wait_for_tick(&dir, &mut child, 1);
    // Every connection slot held by a client that never speaks: the guest ticks on, one more
    // client is told 503.
    let idle: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(dir.path("api.sock")).unwrap())
        .collect();
    let now = ticks(&dir).last().unwrap().n;
    wait_for_tick(&dir, &mut child, now + 2);
    let busy = raw(&dir, b"GET /api/v1/vm HTTP/1.1\r\n\r\n");
    assert!(busy.starts_with("HTTP/1.1 503"), "{busy}");
    drop(idle);
    // Served again once the idle clients are gone (the server sees their hang-ups).
    let t = Instant::now();
    while ctl(&dir, &["state"]).1["ok"] != true {
        assert!(t.elapsed() < PROGRESS, "the API never served again");
        std::thread::sleep(Duration::from_millis(50));
    }
    let garbage = raw(
        &dir,
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n",
    );
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    let head = format!(
        "GET /api/v1/vm HTTP/1.1\r\nx: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let r = raw(&dir, head.as_bytes());
    assert!(
        r.starts_with("HTTP/1.1 431") || r.starts_with("HTTP/1.1 400"),
        "{r:?}"
    );
    let body = "9".repeat(1 << 20);
    let huge = format!(
        "PUT /api/v1/vm/balloon HTTP/1.1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw(&dir, huge.as_bytes());
    assert!(r.starts_with("HTTP/1.1 413"), "{r:?}");
    let r = raw(&dir, b"GET /api/v1/nothing HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404"), "{r:?}");
    let r = raw(
        &dir,
        b"POST /api/v1/vm/pause HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 405"), "{r:?}");
    // The guest went on through all of it, still running.
    let now = ticks(&dir).last().unwrap().n;
    wait_for_tick(&dir, &mut child, now + 2);
    assert_eq!(ctl(&dir, &["state"]).1["state"], "running");
    quit_and_check(&dir, child);
}

/// Waits until the console log holds `line`.
fn wait_for_line(dir: &TempDir, child: &mut Child, line: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(dir.path("console.log"))
        .unwrap_or_default()
        .contains(line)
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the VM ended before {line:?}"
        );
        assert!(t.elapsed() < PROGRESS, "no {line:?} after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The report's facts of the ACPI PM block.
fn power_facts(run: &Run) -> serde_json::Value {
    let report = run.report.as_ref().expect("a report");
    report["devices"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device"] == "acpi-pm"))
        .map(|d| d["facts"].clone())
        .unwrap_or_else(|| panic!("no acpi-pm facts in {report}"))
}

#[test]
fn the_power_button_powers_off_a_guest_that_listens_and_the_grace_stops_one_that_does_not() {
    if !kvm_available(
        "the_power_button_powers_off_a_guest_that_listens_and_the_grace_stops_one_that_does_not",
    ) {
        return;
    }
    // A guest that listens (the kit's power-button guest enables the button's event and polls
    // its status): it powers off itself, long before the grace.
    let dir = TempDir::new("power-button");
    let mut child = start_guest(&dir, &["--guest", "power-button"]);
    wait_for_line(&dir, &mut child, "kit: power-button waiting");
    let (r, reply) = ctl(&dir, &["shutdown", "--grace", "300"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(
        (&reply["acpi"], &reply["guest_listens"], &reply["grace_s"]),
        (&true.into(), &true.into(), &300.0.into()),
        "{reply}"
    );
    let run = finish(&dir, child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stdout.contains("kit: power-button pressed") && run.stdout.contains("kit: PASS"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stderr.contains("did not power off"),
        "{}",
        run.describe()
    );
    let report = run.report.as_ref().expect("a report");
    assert_eq!(report["end"], "guest powered off", "{report}");
    let facts = power_facts(&run);
    assert_eq!(
        (
            &facts["power_button_presses"],
            &facts["power_button_scis"],
            &facts["power_button_enabled"]
        ),
        (&1.into(), &1.into(), &1.into()),
        "one press, one SCI, the event enabled by the guest: {facts}"
    );

    // A guest that does not (the clock guest): refused while paused, then stopped when the
    // grace runs out.
    let dir = TempDir::new("power-button-ignored");
    let mut child = start_clock(&dir);
    wait_for_tick(&dir, &mut child, 1);
    ctl(&dir, &["pause"]);
    let (r, reply) = ctl(&dir, &["shutdown", "--grace", "1"]);
    assert_ne!(r.status, Some(0), "{}", r.describe());
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("paused")),
        "{reply}"
    );
    ctl(&dir, &["resume"]);
    let (_, bad) = ctl(&dir, &["shutdown", "--grace", "-3"]);
    assert_ne!(bad["ok"], true, "a negative grace is refused: {bad}");
    let pressed = Instant::now();
    let (r, reply) = ctl(&dir, &["shutdown", "--grace", "1"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(reply["guest_listens"], false, "{reply}");
    let run = finish(&dir, child);
    let took = pressed.elapsed();
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr
            .contains("did not power off after the ACPI power button"),
        "{}",
        run.describe()
    );
    assert!(
        took >= Duration::from_millis(900),
        "stopped {took:?} after a 1 s grace"
    );
    let facts = power_facts(&run);
    assert_eq!(
        (&facts["power_button_presses"], &facts["power_button_scis"]),
        (&1.into(), &0.into()),
        "{facts}"
    );
}
