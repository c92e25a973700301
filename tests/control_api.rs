//! The control API (`--api-socket`, `exitless ctl`) against a running VM: live statistics, the
//! balloon's target changed at run time (the kit's balloon driver follows it and the VMM's RSS
//! falls), clear errors for bad requests, and `quit`. Skipped (with the reason printed) where
//! /dev/kvm cannot be opened.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{exitless, exitless_cmd, kvm_available, Run, TempDir};

/// The kit balloon guest in its `follow` phase: it waits for a new target after its own checks.
fn start_follower(dir: &TempDir) -> Child {
    Command::new(exitless())
        .arg("run")
        .args([
            "--guest",
            "virtio-balloon",
            "--timeout",
            "150",
            "--mem",
            "256M",
            "--balloon",
            "size=48M,stats=1",
            "--cmdline",
            "follow",
        ])
        .arg("--api-socket")
        .arg(dir.path("api.sock"))
        .arg("--console-log")
        .arg(dir.path("console.log"))
        .arg("--stats-json")
        .arg(dir.path("report.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exitless")
}

/// Waits until the guest console shows `line` (or the VM ended, or 120 s passed).
fn wait_for_console(dir: &TempDir, child: &mut Child, line: &str) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        let text = std::fs::read_to_string(dir.path("console.log")).unwrap_or_default();
        if text.contains(line) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn ctl(dir: &TempDir, args: &[&str]) -> (Run, serde_json::Value) {
    let sock = dir.path("api.sock");
    let mut v = vec!["ctl", "--socket", sock.to_str().unwrap()];
    v.extend_from_slice(args);
    let r = exitless_cmd(&v);
    let json = serde_json::from_str(&r.stdout).unwrap_or(serde_json::Value::Null);
    (r, json)
}

/// Waits for the VM process; its status, stderr and report.
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

#[test]
fn the_balloon_follows_a_target_set_through_the_api_and_the_rss_falls() {
    if !kvm_available("the_balloon_follows_a_target_set_through_the_api_and_the_rss_falls") {
        return;
    }
    let dir = TempDir::new("api-balloon");
    let mut child = start_follower(&dir);
    let waiting = wait_for_console(&dir, &mut child, "kit: balloon waiting for a new target");
    if !waiting {
        let _ = child.kill();
        panic!("the guest never waited: {}", finish(&dir, child).describe());
    }
    // Live statistics while the guest runs: the balloon as the first phase left it.
    let (r, live) = ctl(&dir, &["stats"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(live["ok"], true, "{live}");
    let balloon = &live["devices"]["virtio-balloon"];
    assert_eq!(balloon["driver_ok"], 1, "{live}");
    assert_eq!(balloon["target_pages"], 12288, "{live}");
    assert_eq!(balloon["actual_pages"], 12288 - 256, "{live}");
    assert!(live["uptime_s"].as_f64().unwrap() > 0.0, "{live}");
    // Exits by reason as they happen: the guest's console lines are port writes, and its
    // balloon set-up read the device's registers (MMIO).
    let console_exits = live["exits"]["io_out"].as_u64().unwrap_or(0);
    assert!(console_exits > 100, "{live}");
    assert!(
        live["exits"]["mmio_read"].as_u64().unwrap_or(0) > 0,
        "{live}"
    );
    let rss_before = balloon["rss_after_inflate_kib"].as_u64().unwrap();
    // A bad request changes nothing and says why.
    let (r, bad) = ctl(&dir, &["balloon", "1G"]);
    assert_eq!(r.status, Some(1), "{}", r.describe());
    assert!(
        bad["error"]
            .as_str()
            .is_some_and(|e| e.contains("larger than guest memory")),
        "{bad}"
    );
    // The new target: 60 MiB.
    let (r, ok) = ctl(&dir, &["balloon", "60M"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(ok["target_pages"], 15360, "{ok}");
    let run = finish(&dir, child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.exits("io_out") > console_exits,
        "the final count goes on from the live one"
    );
    assert!(
        run.stdout
            .contains("kit: balloon followed target=15360 actual=15360"),
        "{}",
        run.describe()
    );
    assert!(run.stdout.contains("kit: PASS virtio-balloon"));
    let f = |k: &str| run.device_fact("virtio-balloon", k).unwrap();
    assert_eq!(f("target_pages"), 15360);
    assert_eq!(f("actual_pages"), 15360);
    assert_eq!(f("bad_pfns"), 0);
    assert_eq!(f("errors"), 0);
    // The guest gave 15360 - 12032 more pages back: the VMM's RSS fell by most of that.
    let given_kib = (15360 - 12032) * 4;
    let rss_after = f("rss_after_inflate_kib");
    assert!(
        rss_before >= rss_after + given_kib * 8 / 10,
        "RSS {rss_before} KiB -> {rss_after} KiB after {given_kib} KiB more were inflated"
    );
}

#[test]
fn quit_stops_the_vm_with_its_report_and_requests_need_a_listening_vm() {
    if !kvm_available("quit_stops_the_vm_with_its_report_and_requests_need_a_listening_vm") {
        return;
    }
    let dir = TempDir::new("api-quit");
    let mut child = start_follower(&dir);
    assert!(wait_for_console(
        &dir,
        &mut child,
        "kit: balloon waiting for a new target"
    ));
    let (r, ok) = ctl(&dir, &["quit"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(ok["ok"], true);
    let run = finish(&dir, child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("stopped through the control API"),
        "{}",
        run.describe()
    );
    assert!(run.report.is_some(), "the report is written");
    assert!(!dir.path("api.sock").exists(), "the socket is removed");
    let (r, _) = ctl(&dir, &["stats"]);
    assert_eq!(r.status, Some(1));
    assert!(r.stderr.contains("cannot reach a VM"), "{}", r.describe());
}

/// `exitless top --json` against a running VM (the kit's bench guest, which makes exits and
/// takes interrupts): one object per interval with the Table 3.1 rows, per vCPU and in all; and
/// clear errors for a socket with no VM and for a bad interval.
#[test]
fn top_json_reports_rates_of_a_running_vm() {
    if !kvm_available("top --json") {
        return;
    }
    let dir = TempDir::new("top-json");
    let sock = dir.path("api.sock");
    let child = Command::new(exitless())
        // The full bench (not `quick`): it runs for seconds even on a fast host.
        .args(["run", "--guest", "bench", "--cpus", "2"])
        .args(["--timeout", "120", "--no-summary", "--api-socket"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exitless");
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let top = exitless_cmd(&[
        "top",
        "--socket",
        sock.to_str().unwrap(),
        "--json",
        "--interval",
        "0.3",
        "--count",
        "3",
    ]);
    let _ = exitless_cmd(&["ctl", "--socket", sock.to_str().unwrap(), "quit"]);
    let vm = child.wait_with_output().expect("exitless ends");
    let vm_err = format!(
        "{:?} {} {}",
        vm.status,
        String::from_utf8_lossy(&vm.stderr),
        String::from_utf8_lossy(&vm.stdout)
    );
    assert_eq!(top.status, Some(0), "{}\nVM: {vm_err}", top.describe());
    let lines: Vec<serde_json::Value> = top
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 3, "{}\nVM: {vm_err}", top.describe());
    let mut exits = 0.0;
    for l in &lines {
        for key in [
            "exits_per_s",
            "interrupts_per_s",
            "irq_window_exits_per_s",
            "halt_exits_per_s",
            "time_in_guest",
        ] {
            let v = l[key].as_f64().unwrap_or(-1.0);
            assert!(v >= 0.0, "{key} in {l}");
        }
        assert!(l["time_in_guest"].as_f64().unwrap() <= 1.0, "{l}");
        assert_eq!(l["vcpus"].as_array().unwrap().len(), 2, "{l}");
        exits += l["exits_per_s"].as_f64().unwrap() + l["userspace_exits_per_s"].as_f64().unwrap();
        // All vCPUs together are the sum of each.
        let sum: f64 = l["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["exits_per_s"].as_f64().unwrap())
            .sum();
        assert!(
            (sum - l["exits_per_s"].as_f64().unwrap()).abs() < 1e-6,
            "{l}"
        );
    }
    assert!(exits > 0.0, "a running guest makes exits: {}", top.stdout);

    let none = exitless_cmd(&[
        "top",
        "--socket",
        dir.path("nothing.sock").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(none.status, Some(1), "{}", none.describe());
    assert!(
        none.stderr.contains("cannot reach a VM"),
        "{}",
        none.describe()
    );
    let bad = exitless_cmd(&["top", "--socket", "x", "--interval", "0"]);
    assert_ne!(bad.status, Some(0));
    assert!(
        bad.stderr.contains("between 0.1 and 3600"),
        "{}",
        bad.describe()
    );
}
