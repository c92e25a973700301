//! Soak (issue 14), the short version CI runs: `exitless bench soak` boots the demo guest 20 times
//! in a row and then 10 times with 5 VMs at once, and must report every boot passed and nothing
//! left on the host (no process, socket, network interface or /dev/shm entry; the bench's own fds
//! and threads as before). The full run (1,000 boots, 20 at once) is the bench itself.

mod common;

use common::*;

#[test]
fn twenty_boots_in_a_row_and_five_at_once_leave_nothing_behind() {
    const TEST: &str = "twenty_boots_in_a_row_and_five_at_once_leave_nothing_behind";
    if !needs(TEST, &[Need::Kvm]) {
        return;
    }
    let r = exitless_cmd(&[
        "bench",
        "soak",
        "--boots",
        "20",
        "--parallel",
        "5",
        "--load-boots",
        "10",
        "--json",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let j: serde_json::Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.describe()));
    assert_eq!(j["leaks"], serde_json::json!([]), "{}", r.describe());
    let phases = j["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 2);
    for (p, boots) in phases.iter().zip([20, 10]) {
        assert_eq!(p["boots"], boots, "{p}");
        assert_eq!(p["failed"], 0, "{p}");
        assert!(p["boots_per_s_per_core"].as_f64().unwrap() > 0.0, "{p}");
    }
    eprintln!("{TEST}: {}", serde_json::to_string(&j["phases"]).unwrap());
}

/// The leak check can fail: a process that outlives the bench's VMs and names the run directory
/// is found. (The bench's own check is unit-tested; this is the host side: `HostState::read`.)
#[test]
fn a_process_left_in_the_run_directory_is_a_leak() {
    let dir = TempDir::new("soak-leak");
    let before = exitless::bench::soak::HostState::read(&dir.0);
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("sleep 30 # {}", dir.0.display()))
        .spawn()
        .unwrap();
    // Until the child has exec'd its shell it is a copy of this test (CI once scanned too early).
    let named = || {
        std::fs::read(format!("/proc/{}/cmdline", child.id()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*dir.0.to_string_lossy()))
    };
    let t = std::time::Instant::now();
    while !named() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(named(), "the child never named the run directory");
    std::fs::write(dir.path("vm0.sock"), b"").unwrap();
    let leaks = before.leaks(&exitless::bench::soak::HostState::read(&dir.0));
    let _ = child.kill();
    let _ = child.wait();
    assert!(leaks.iter().any(|l| l.starts_with("process ")), "{leaks:?}");
    assert!(leaks.iter().any(|l| l.contains("vm0.sock")), "{leaks:?}");
}
