//! `exitless bench snapshot`: what a snapshot and a restore cost with the kit's compute guest
//! (256 MiB of RAM by default, a 4 MiB working set it rewrites every ~4 ms, a 100 Hz timer).
//!
//! One run: the guest boots and computes; through its API it is paused and snapshotted
//! (`snapshot_ms`: the VMM's own time for the snapshot, files synced; `snapshot_bytes`: what the
//! snapshot takes on disk, the memory file's holes excluded), then stopped. Then `--restores`
//! times (default 5): `exitless restore` of that snapshot is started with a byte already
//! waiting on its console, and the bench measures `restore_ms` (what the restored VMM reports:
//! from its `main` to every vCPU running, snapshot read and checked, VM built, state set) and
//! `first_response_ms` (from the process's spawn to the guest's answer to that byte on the
//! console: the process's start, the restore, and the guest's way back to its console poll,
//! page faults on the lazily mapped memory included). Medians are reported, with the minimum.
//!
//! QEMU is not measured here yet: on this project's PVM host it cannot run guests well, and its
//! side (`migrate` to a file, `-incoming`) belongs in the emulated SVM host's run.
//!
//! Owns its temporary directory and the VMs it starts (children killed at their time limit).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::{round3, TempDir};

/// Arguments of `exitless bench snapshot`.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Print a JSON array (one object per case) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = crate::config::parse_size)]
    pub mem: u64,
    /// Restores of the one snapshot (each a new process); medians are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub restores: u32,
    /// Time limit of each VM, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
}

/// One case's figures.
#[derive(Debug, Serialize)]
pub struct Case {
    pub vmm: &'static str,
    pub guest: String,
    pub memory_bytes: u64,
    pub snapshot_ms: f64,
    /// On disk: state.json plus the memory file's data.
    pub snapshot_bytes: u64,
    /// Median over the restores.
    pub restore_ms: f64,
    pub restore_ms_min: f64,
    /// Median over the restores.
    pub first_response_ms: f64,
    pub first_response_ms_min: f64,
    pub restores: u32,
}

pub fn run(args: &SnapshotArgs) -> Result<(), String> {
    let dir = TempDir::new("exitless-bench-snapshot").map_err(|e| e.to_string())?;
    let snap = dir.path().join("snap");
    let (snapshot_ms, snapshot_bytes) = take_snapshot(args, dir.path(), &snap)?;
    let mut restore = Vec::new();
    let mut response = Vec::new();
    for _ in 0..args.restores {
        let (r, f) = restore_once(args, &snap)?;
        restore.push(r);
        response.push(f);
    }
    let case = Case {
        vmm: "exitless",
        guest: "kit:compute".into(),
        memory_bytes: args.mem,
        snapshot_ms: round3(snapshot_ms),
        snapshot_bytes,
        restore_ms: round3(median(&mut restore)),
        restore_ms_min: round3(restore[0]),
        first_response_ms: round3(median(&mut response)),
        first_response_ms_min: round3(response[0]),
        restores: args.restores,
    };
    if args.json {
        let out = serde_json::to_string_pretty(&[&case]).map_err(|e| e.to_string())?;
        println!("{out}");
    } else {
        print_table(&case);
    }
    Ok(())
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(c: &Case) {
    println!(
        "exitless bench snapshot: kit compute guest, {} MiB of RAM, {} restores (medians, min)",
        c.memory_bytes >> 20,
        c.restores
    );
    println!("  snapshot           {:>9.3} ms", c.snapshot_ms);
    println!(
        "  snapshot size      {:>9.1} MiB on disk ({} MiB of RAM)",
        c.snapshot_bytes as f64 / (1 << 20) as f64,
        c.memory_bytes >> 20
    );
    println!(
        "  restore-to-running {:>9.3} ms (min {:.3})",
        c.restore_ms, c.restore_ms_min
    );
    println!(
        "  first response     {:>9.3} ms (min {:.3}, from the process's spawn)",
        c.first_response_ms, c.first_response_ms_min
    );
}

fn exe() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))
}

/// Boots the compute guest, snapshots it once it computes, stops it: (ms, bytes on disk).
fn take_snapshot(args: &SnapshotArgs, dir: &Path, snap: &Path) -> Result<(f64, u64), String> {
    let sock = dir.join("api.sock");
    let log = dir.join("console.log");
    let errors = dir.join("stderr.log");
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut child = Command::new(exe()?)
        .args(["run", "--guest", "compute", "--no-summary"])
        .args(["--cmdline", "rounds=100000000 every=1"])
        .arg(format!("--mem={}K", args.mem >> 10))
        .arg(format!("--timeout={}", args.timeout))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--snapshot-dir")
        .arg(dir)
        .arg("--console-log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start exitless: {e}"))?;
    let r = snapshot_running(args, &sock, &log, snap, &mut child);
    let _ = crate::api::request(&sock, &crate::api::Call::Quit);
    let _ = super::wait_with_limit(&mut child, super::KILL_GRACE);
    r.map_err(|e| {
        format!(
            "{e}\n  exitless said:\n{}",
            super::tail(&super::read_lossy(&errors), 6)
        )
    })
}

fn snapshot_running(
    args: &SnapshotArgs,
    sock: &Path,
    log: &Path,
    snap: &Path,
    child: &mut Child,
) -> Result<(f64, u64), String> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    // Two whole rounds: the working set is in RAM.
    while !super::read_lossy(log).contains("kit: compute round 2 ") {
        if child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
            return Err("the compute guest did not start computing".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let call = |c: crate::api::Call| -> Result<serde_json::Value, String> {
        let r = crate::api::request(sock, &c)?;
        match r["ok"].as_bool() {
            Some(true) => Ok(r),
            _ => Err(format!("{c:?}: {r}")),
        }
    };
    call(crate::api::Call::Pause)?;
    let s = call(crate::api::Call::Snapshot(snap.to_path_buf()))?;
    let ms = s["ms"].as_f64().ok_or("the snapshot's reply has no ms")?;
    Ok((ms, on_disk(snap)))
}

/// Bytes the snapshot's files take on disk (holes excluded).
fn on_disk(snap: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    ["state.json", "memory"]
        .iter()
        .filter_map(|f| std::fs::metadata(snap.join(f)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// One restore: (restore_ms as the VMM reports it, first response from the spawn).
fn restore_once(args: &SnapshotArgs, snap: &Path) -> Result<(f64, f64), String> {
    let t0 = Instant::now();
    let mut child = Command::new(exe()?)
        .args(["restore", "--no-summary", "--snapshot"])
        .arg(snap)
        .arg(format!("--timeout={}", args.timeout))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start exitless restore: {e}"))?;
    // The byte is waiting before the guest runs: the answer measures the way to it. The pipe
    // stays open until the end, as an operator's terminal would.
    let mut input = child.stdin.take();
    if let Some(i) = input.as_mut() {
        let _ = i.write_all(b"x");
    }
    let answered = wait_for_line(&mut child, "kit: compute pong", args.timeout);
    let first = t0.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    drop(input);
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    answered.map_err(|e| format!("{e}\n{}", super::tail(&stderr, 6)))?;
    Ok((restore_ms(&stderr)?, first))
}

/// Reads the child's stdout until a line containing `want` (or the time limit).
fn wait_for_line(child: &mut Child, want: &str, timeout: f64) -> Result<(), String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let want = want.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            match line {
                Ok(l) if l.contains(&want) => {
                    let _ = tx.send(());
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    rx.recv_timeout(Duration::from_secs_f64(timeout))
        .map_err(|_| "the restored guest did not answer on its console".to_string())
}

/// `restored from DIR in X ms` from the restored VMM's stderr.
pub fn restore_ms(stderr: &str) -> Result<f64, String> {
    stderr
        .lines()
        .find_map(|l| {
            let rest = l.split(" in ").nth(1)?;
            l.contains("exitless: restored from")
                .then(|| rest.split(' ').next()?.parse().ok())?
        })
        .ok_or_else(|| format!("the restore did not say how long it took: {stderr:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restore_time_is_read_from_the_vmm_s_line() {
        let s = "exitless: host: PVM\nexitless: restored from /t/s in 4.250 ms (running; 1 vCPU(s), 256 MiB mapped lazily)\n";
        assert_eq!(restore_ms(s), Ok(4.25));
        assert!(restore_ms("exitless: error: not a usable snapshot").is_err());
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
