//! The console never makes the guest wait: a guest flooding COM1 while exitless's stdout is a
//! pipe nobody reads runs to its power-off; what did not fit in `--console-buffer` is dropped and
//! counted in the report, and the run ends although the writer is stuck. Skipped (with the
//! reason) where /dev/kvm cannot be opened.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FLOOD: u64 = 32 << 10;

/// A pipe whose write end becomes the child's stdout; the read end is held and never read.
/// Its capacity is cut to one page, so it fills after 4 KiB.
fn stalled_pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned here alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own; a failure only leaves the default 64 KiB.
    unsafe { libc::fcntl(fds[0], libc::F_SETPIPE_SZ, 4096) };
    (r, w)
}

#[test]
fn a_console_flood_against_a_stdout_nobody_reads_does_not_stop_the_guest() {
    if !common::kvm_available("console flood") {
        return;
    }
    let dir = common::TempDir::new("console-flood");
    let json = dir.path("report.json");
    let err_path = dir.path("stderr");
    let (_unread, w) = stalled_pipe();
    let mut child = Command::new(common::exitless())
        .args(["run", "--guest", "console-flood", "--timeout", "600"])
        .args(["--cmdline", &format!("bytes={FLOOD}")])
        .args(["--console-buffer", "4K", "--stats-json"])
        .arg(&json)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // The VMM's own --timeout ends a guest that waits on the console; this is only the test's
    // guard against a VMM that cannot even stop (a vCPU stuck in write).
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(900) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "exitless did not end: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["end"], "guest powered off", "{stderr}");
    let serial = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "serial")
        .map(|d| d["facts"].clone())
        .expect("serial facts");
    let fact = |f: &str| {
        serial[f]
            .as_u64()
            .unwrap_or_else(|| panic!("{f}: {serial}"))
    };
    // The guest wrote the whole flood (the panic watch sees every byte) ...
    assert!(fact("bytes_out") > FLOOD, "{serial}");
    // ... while stdout took at most the pipe (4 KiB) and its own buffer; unwritten at the end
    // are the queue (4 KiB) and the chunk the stuck writer had taken from it (at most a queue's
    // worth): the rest was dropped.
    assert!(fact("bytes_dropped") >= FLOOD - (16 << 10), "{serial}");
    assert!(fact("bytes_unwritten") <= 2 * 4096, "{serial}");
}
