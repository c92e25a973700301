//! Shared helpers for the integration tests: run the built `exitless` binary and read its report.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn exitless() -> &'static str {
    env!("CARGO_BIN_EXE_exitless")
}

/// True when this host can run VMs. Tests that need KVM print why they skip.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("skipped {test}: /dev/kvm is not usable on this host");
    }
    ok
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "exitless-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Result of one `exitless run`.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<serde_json::Value>,
}

impl Run {
    pub fn exits(&self, reason: &str) -> u64 {
        self.report
            .as_ref()
            .and_then(|r| r["exits"][reason].as_u64())
            .unwrap_or(0)
    }

    pub fn port_exits(&self, port: u16) -> u64 {
        self.report
            .as_ref()
            .and_then(|r| r["pio_ports"][format!("{port:#x}")].as_u64())
            .unwrap_or(0)
    }

    pub fn device_fact(&self, device: &str, fact: &str) -> Option<u64> {
        self.report.as_ref()?["devices"]
            .as_array()?
            .iter()
            .find(|d| d["device"] == device)?["facts"][fact]
            .as_u64()
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn finish(out: Output, report: &Path) -> Run {
    let report = std::fs::read_to_string(report)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

/// Runs `exitless run ARGS` with `stdin` fed in, collecting the JSON report.
pub fn run_with_input(args: &[&str], stdin: &[u8]) -> Run {
    let dir = TempDir::new("run");
    let report = dir.path("report.json");
    let mut cmd = Command::new(exitless());
    cmd.arg("run")
        .args(args)
        .arg("--stats-json")
        .arg(&report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start exitless");
    {
        let mut input = child.stdin.take().unwrap();
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait for exitless");
    finish(out, &report)
}

pub fn run(args: &[&str]) -> Run {
    run_with_input(args, b"")
}

/// Runs an embedded kit guest with a time limit.
pub fn run_guest(guest: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--guest", guest, "--timeout", "120"];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs `exitless ARGS` (any subcommand) without a report.
pub fn exitless_cmd(args: &[&str]) -> Run {
    let out = Command::new(exitless())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start exitless");
    finish(out, Path::new("/nonexistent"))
}
