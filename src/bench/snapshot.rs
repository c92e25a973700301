//! `exitless bench snapshot`: what a snapshot and a restore cost, for the kit's compute guest
//! (`--guest kit`, the default: 256 MiB of RAM, a 4 MiB working set it rewrites every ~4 ms, a
//! 100 Hz timer) or the Debian guest (`--guest debian`: tools/debian-guest.sh's kernel and tools
//! initramfs at its shell prompt), under exitless and, with `--vs qemu`, under QEMU in the same
//! run (`-accel kvm`, the same guest, kernel, initramfs, command line and memory).
//!
//! One case (a VMM and a guest): the guest boots to the point where it is snapshotted (the
//! compute guest: its second round done, so the working set is in RAM; the Debian guest: its
//! shell prompt), is paused and snapshotted, then stopped. Then `--restores` times (default 5) a
//! new process restores that snapshot and the guest is asked something on its console (the
//! compute guest: a byte, answered `kit: compute pong`; the Debian guest's shell: an `echo` of
//! arithmetic, whose answer differs from the echoed command line). Medians are reported, with the
//! minimum. What each figure covers:
//! - `snapshot_ms`: exitless: its own time for the API's `snapshot` (the VM already paused, the
//!   files synced). QEMU: from QMP `stop` to `query-migrate` saying `completed` for a `migrate`
//!   to `file:PATH`, plus an fsync of that file (so both are on disk; the migration's bandwidth
//!   limit is lifted first).
//! - `snapshot_bytes`: what the snapshot takes on disk (`st_blocks`: exitless's memory file's
//!   holes excluded; QEMU's one migration file).
//! - `restore_ms`: exitless: what the restored VMM reports, from its `main` to every vCPU
//!   running (snapshot read and checked, VM built, state set). QEMU: from spawning
//!   `qemu-system-x86_64 ... -incoming file:PATH` to QMP `query-status` saying `running` (polled
//!   every millisecond: the process's start and QMP's round trips are in it, so QEMU's figure
//!   covers more than exitless's). The migration stream carries the source's run state, here
//!   paused, so QEMU loads the guest paused; the bench sends `cont` the moment it says so.
//! - `first_response_ms`: both: from spawning the restoring process to the guest's answer on
//!   the console (process start, restore, the guest's way back to its console, page faults on
//!   lazily mapped memory). exitless gets the input before the guest runs; QEMU gets it as soon
//!   as it reports `running` (its UART's state comes with the migration stream, so input read
//!   before that would be lost).
//!
//! The timings compare only within one run on one host. On this project's PVM host the kit case
//! runs under exitless; the Debian guest and QEMU need the emulated SVM host
//! (`tools/svm-host.sh exitless bench snapshot --guest debian --vs qemu`).
//!
//! Owns its temporary directory and the VMs it starts (children killed at their time limit).

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::{json, Value};

use super::boot::{linux_cmdline, qemu_linux_args, Linux};
use super::{find_program, read_lossy, round3, tail, wait_with_limit, Peer, TempDir, KILL_GRACE};

/// Arguments of `exitless bench snapshot`.
#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    /// Print a JSON array (one object per VMM and guest) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// The guest: the kit's compute guest or the Debian guest (at its shell prompt).
    #[arg(long, value_enum, default_value = "kit")]
    pub guest: Guest,
    /// Also snapshot and restore the same guest under this VMM (`migrate` to a file, `-incoming`).
    #[arg(long, value_enum)]
    pub vs: Option<Peer>,
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = crate::config::parse_size)]
    pub mem: u64,
    /// Restores of the one snapshot (each a new process); medians are reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub restores: u32,
    /// Time limit of each VM's boot and of each restore, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// The Debian guest's kernel.
    #[arg(long, default_value = "images/debian/vmlinuz")]
    pub kernel: PathBuf,
    /// The Debian guest's initramfs (its init gives a shell prompt `exitless# ` on the console).
    #[arg(long, default_value = "images/debian/initrd-tools.img")]
    pub initrd: PathBuf,
}

/// The guest of `bench snapshot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Guest {
    Kit,
    Debian,
}

/// What the bench does with a guest, under either VMM.
#[derive(Debug, PartialEq)]
pub struct Workload {
    pub name: &'static str,
    /// On the console once the guest is where it is snapshotted.
    pub ready: &'static str,
    /// Typed on the restored guest's console.
    pub input: &'static str,
    /// In the guest's answer to `input`, and not in `input` (the console may echo it).
    pub answer: &'static str,
}

/// The compute guest after two whole rounds (its working set in RAM), asked with one byte.
pub const KIT: Workload = Workload {
    name: "kit:compute",
    ready: "kit: compute round 2 ",
    input: "x",
    answer: "kit: compute pong",
};
const KIT_CMDLINE: &str = "rounds=100000000 every=1";

/// The Debian guest at its shell prompt, asked for arithmetic.
pub const DEBIAN: Workload = Workload {
    name: "debian",
    ready: "exitless# ",
    input: "echo =R= snap-$((40+2))\n",
    answer: "=R= snap-42",
};

/// The VMM of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Exitless,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Exitless => "exitless",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One case's figures (see the module doc for what each covers).
#[derive(Debug, Serialize)]
pub struct Case {
    pub vmm: &'static str,
    pub guest: String,
    pub memory_bytes: u64,
    pub snapshot_ms: f64,
    /// On disk: exitless's state.json plus its memory file's data; QEMU's migration file.
    pub snapshot_bytes: u64,
    /// Median over the restores.
    pub restore_ms: f64,
    pub restore_ms_min: f64,
    /// Median over the restores.
    pub first_response_ms: f64,
    pub first_response_ms_min: f64,
    pub restores: u32,
    /// exitless's figures over this case's (on the peer's case only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exitless_vs_this: Option<Ratios>,
}

/// exitless / peer, per figure (medians).
#[derive(Debug, Serialize, PartialEq)]
pub struct Ratios {
    pub snapshot_ms: Option<f64>,
    pub snapshot_bytes: Option<f64>,
    pub restore_ms: Option<f64>,
    pub first_response_ms: Option<f64>,
}

impl Ratios {
    pub fn of(ours: &Case, peer: &Case) -> Ratios {
        let r = |a: f64, b: f64| (b > 0.0).then(|| round3(a / b));
        Ratios {
            snapshot_ms: r(ours.snapshot_ms, peer.snapshot_ms),
            snapshot_bytes: r(ours.snapshot_bytes as f64, peer.snapshot_bytes as f64),
            restore_ms: r(ours.restore_ms, peer.restore_ms),
            first_response_ms: r(ours.first_response_ms, peer.first_response_ms),
        }
    }
}

/// Everything a run needs: the workload and how each VMM boots the guest.
struct Setup {
    work: &'static Workload,
    exe: PathBuf,
    qemu: Option<PathBuf>,
    /// `exitless run`'s arguments that boot the guest (the API's and console's come on top).
    exitless_boot: Vec<String>,
    /// QEMU's arguments that boot the same guest, serial console on stdio (QMP on top).
    qemu_boot: Vec<String>,
}

impl Setup {
    fn new(args: &SnapshotArgs, dir: &Path) -> Result<Setup, String> {
        if !(args.timeout.is_finite() && args.timeout > 0.0) {
            return Err(format!("--timeout {}: not a positive number", args.timeout));
        }
        if args.guest == Guest::Debian {
            check_debian(args)?;
        }
        if args.guest == Guest::Debian || args.vs.is_some() {
            super::boot::check_host("exitless bench snapshot --guest debian --vs qemu")?;
        }
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
        let qemu = match args.vs {
            Some(Peer::Qemu) => Some(find_program("qemu-system-x86_64").ok_or(
                "--vs qemu: qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)",
            )?),
            None => None,
        };
        let (work, exitless_boot, qemu_boot) = match args.guest {
            Guest::Kit => (&KIT, kit_exitless(args), kit_qemu(args, dir)?),
            Guest::Debian => {
                let cmdline = linux_cmdline(&exe, &args.kernel, "")?;
                (
                    &DEBIAN,
                    debian_exitless(args, &cmdline),
                    debian_qemu(args, &cmdline),
                )
            }
        };
        Ok(Setup {
            work,
            exe,
            qemu,
            exitless_boot,
            qemu_boot,
        })
    }
}

fn kit_exitless(args: &SnapshotArgs) -> Vec<String> {
    vec![
        "--guest".into(),
        "compute".into(),
        "--cmdline".into(),
        KIT_CMDLINE.into(),
        format!("--mem={}K", args.mem >> 10),
    ]
}

/// The compute guest's ELF, written out for QEMU's `-kernel`, and QEMU's arguments for it (the
/// kit's machine for QEMU, `-nographic`: the serial console on stdio).
fn kit_qemu(args: &SnapshotArgs, dir: &Path) -> Result<Vec<String>, String> {
    if args.vs.is_none() {
        return Ok(Vec::new());
    }
    let (_, elf) = crate::kit::get("compute").ok_or("no embedded guest named \"compute\"")?;
    let kernel = dir.join("compute.elf");
    std::fs::write(&kernel, elf).map_err(|e| format!("cannot write the guest: {e}"))?;
    Ok(super::qemu_args_mem(&kernel, &[], KIT_CMDLINE, args.mem))
}

fn check_debian(args: &SnapshotArgs) -> Result<(), String> {
    for (what, p) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if !p.is_file() {
            return Err(format!(
                "--guest debian: {what} {} is missing (the Debian guest is built by \
                 tools/debian-guest.sh images/debian)",
                p.display()
            ));
        }
    }
    Ok(())
}

fn debian_exitless(args: &SnapshotArgs, cmdline: &str) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    vec![
        "--kernel".into(),
        s(&args.kernel),
        "--initrd".into(),
        s(&args.initrd),
        format!("--mem={}K", args.mem >> 10),
        "--cpus=1".into(),
        "--no-default-cmdline".into(),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

/// QEMU q35 with the very same kernel, initramfs, command line and memory (as `bench boot`).
fn debian_qemu(args: &SnapshotArgs, cmdline: &str) -> Vec<String> {
    let linux = Linux {
        kernel: &args.kernel,
        initrd: &args.initrd,
        mem: args.mem,
        cpus: 1,
        cmdline,
    };
    let mut v = qemu_linux_args(false, &linux);
    v.extend(["-serial".into(), "stdio".into()]);
    v
}

pub fn run(args: &SnapshotArgs) -> Result<(), String> {
    let dir = TempDir::new("exitless-bench-snapshot").map_err(|e| e.to_string())?;
    let setup = Setup::new(args, dir.path())?;
    let mut cases = vec![measure(&setup, args, Vmm::Exitless, dir.path())?];
    if setup.qemu.is_some() {
        let mut peer = measure(&setup, args, Vmm::Qemu, dir.path())?;
        peer.exitless_vs_this = Some(Ratios::of(&cases[0], &peer));
        cases.push(peer);
    }
    if args.json {
        let out = serde_json::to_string_pretty(&cases).map_err(|e| e.to_string())?;
        println!("{out}");
    } else {
        print!("{}", table(&cases));
    }
    Ok(())
}

/// One case: a snapshot under `vmm`, then the restores.
fn measure(setup: &Setup, args: &SnapshotArgs, vmm: Vmm, dir: &Path) -> Result<Case, String> {
    let snap = dir.join(format!("{}-snap", vmm.name()));
    let (snapshot_ms, snapshot_bytes) = match vmm {
        Vmm::Exitless => exitless_snapshot(setup, args, dir, &snap),
        Vmm::Qemu => qemu_snapshot(setup, args, dir, &snap),
    }
    .map_err(|e| format!("{} {}: snapshot: {e}", vmm.name(), setup.work.name))?;
    let mut restore = Vec::new();
    let mut response = Vec::new();
    for i in 0..args.restores {
        let (r, f) = restore_once(setup, args, vmm, &snap, dir)
            .map_err(|e| format!("{} {}: restore {}: {e}", vmm.name(), setup.work.name, i + 1))?;
        restore.push(r);
        response.push(f);
    }
    Ok(Case {
        vmm: vmm.name(),
        guest: setup.work.name.into(),
        memory_bytes: args.mem,
        snapshot_ms: round3(snapshot_ms),
        snapshot_bytes,
        restore_ms: round3(median(&mut restore)),
        restore_ms_min: round3(restore[0]),
        first_response_ms: round3(median(&mut response)),
        first_response_ms_min: round3(response[0]),
        restores: args.restores,
        exitless_vs_this: None,
    })
}

/// Sorts `v` and returns its median.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The human-readable result: one row per figure, one column per VMM, and exitless / QEMU.
pub fn table(cases: &[Case]) -> String {
    let c = &cases[0];
    let mut out = format!(
        "exitless bench snapshot: {} guest, {} MiB of RAM, {} restores (medians; min in \
         parentheses)\n\n{:<26}",
        c.guest,
        c.memory_bytes >> 20,
        c.restores,
        "figure"
    );
    for x in cases {
        out += &format!("{:>22}", x.vmm);
    }
    if cases.len() > 1 {
        out += &format!("{:>16}", format!("exitless/{}", cases[1].vmm));
    }
    out += "\n";
    type Figure = (&'static str, fn(&Case) -> (f64, Option<f64>));
    let figures: [Figure; 4] = [
        ("snapshot ms", |c| (c.snapshot_ms, None)),
        ("snapshot MiB on disk", |c| {
            (c.snapshot_bytes as f64 / 1048576.0, None)
        }),
        ("restore-to-running ms", |c| {
            (c.restore_ms, Some(c.restore_ms_min))
        }),
        ("first response ms", |c| {
            (c.first_response_ms, Some(c.first_response_ms_min))
        }),
    ];
    for (name, get) in figures {
        out += &format!("{name:<26}");
        for x in cases {
            let (v, min) = get(x);
            let cell = match min {
                Some(m) => format!("{v:.3} ({m:.3})"),
                None => format!("{v:.3}"),
            };
            out += &format!("{cell:>22}");
        }
        if cases.len() > 1 {
            let (a, b) = (get(&cases[0]).0, get(&cases[1]).0);
            let ratio = if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            };
            out += &format!("{ratio:>16}");
        }
        out += "\n";
    }
    out += "restore-to-running: exitless's own figure (main to vCPUs running)";
    if cases.len() > 1 {
        out += "; QEMU's from its spawn to QMP saying running";
    }
    out += "\nfirst response: from spawning the restoring process to the guest's answer\n";
    out
}

/// Bytes the files of `snap` (a directory or one file) take on disk (holes excluded).
fn on_disk(snap: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let files = match std::fs::read_dir(snap) {
        Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(_) => vec![snap.to_path_buf()],
    };
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Waits until the console file `log` holds `want` (the child still running, before `deadline`).
fn wait_console(
    log: &Path,
    want: &str,
    child: &mut Child,
    deadline: Instant,
) -> Result<(), String> {
    while !read_lossy(log).contains(want) {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the VMM ended ({st}) before {want:?} on the console"
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("no {want:?} on the console within --timeout"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What went wrong, with the console's and the VMM's last lines.
fn context(e: String, console: &Path, errors: &Path) -> String {
    format!(
        "{e}\n  last console lines:\n{}\n  the VMM said:\n{}",
        tail(&read_lossy(console), 8),
        tail(&read_lossy(errors), 6)
    )
}

/// Boots the guest under exitless, snapshots it when ready, stops it: (ms, bytes on disk).
fn exitless_snapshot(
    setup: &Setup,
    args: &SnapshotArgs,
    dir: &Path,
    snap: &Path,
) -> Result<(f64, u64), String> {
    let sock = dir.join("api.sock");
    let log = dir.join("exitless-console.log");
    let errors = dir.join("exitless-stderr.log");
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut child = Command::new(&setup.exe)
        .arg("run")
        .args(&setup.exitless_boot)
        .arg("--no-summary")
        .arg(format!("--timeout={}", args.timeout + 60.0))
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
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let r = wait_console(&log, setup.work.ready, &mut child, deadline)
        .and_then(|()| pause_and_snapshot(&sock, snap));
    let _ = crate::api::request(&sock, &crate::api::Call::Quit);
    let _ = wait_with_limit(&mut child, KILL_GRACE);
    r.map_err(|e| context(e, &log, &errors))
}

fn pause_and_snapshot(sock: &Path, snap: &Path) -> Result<(f64, u64), String> {
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

/// QEMU's QMP socket argument.
fn qmp_arg(sock: &Path) -> [String; 2] {
    [
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ]
}

/// A QMP connection, capabilities negotiated.
struct Qmp {
    w: UnixStream,
    r: std::io::BufReader<UnixStream>,
}

impl Qmp {
    /// Connects as soon as QEMU listens (retried every millisecond).
    fn connect(sock: &Path, child: &mut Child, deadline: Instant) -> Result<Qmp, String> {
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    if child.try_wait().map_err(|e| e.to_string())?.is_some() {
                        return Err("QEMU ended before its QMP socket listened".into());
                    }
                    if Instant::now() > deadline {
                        return Err(format!("QMP at {}: {e}", sock.display()));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            w,
            r: std::io::BufReader::new(stream),
        };
        q.call(json!({"execute": "qmp_capabilities"}))?;
        Ok(q)
    }

    fn call(&mut self, cmd: Value) -> Result<Value, String> {
        super::io::qmp_command(&mut self.w, &mut self.r, &cmd)
    }
}

/// Boots the guest under QEMU, migrates it to the file `snap` when ready, quits QEMU.
fn qemu_snapshot(
    setup: &Setup,
    args: &SnapshotArgs,
    dir: &Path,
    snap: &Path,
) -> Result<(f64, u64), String> {
    let qemu = setup.qemu.as_ref().ok_or("no QEMU")?;
    let sock = dir.join("qmp.sock");
    let log = dir.join("qemu-console.log");
    let errors = dir.join("qemu-stderr.log");
    let _ = std::fs::remove_file(&sock);
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut child = Command::new(qemu)
        .args(&setup.qemu_boot)
        .args(qmp_arg(&sock))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    let r = wait_console(&log, setup.work.ready, &mut child, deadline).and_then(|()| {
        let mut q = Qmp::connect(&sock, &mut child, deadline)?;
        let ms = migrate_to_file(&mut q, snap, deadline)?;
        let _ = q.call(json!({"execute": "quit"}));
        Ok((ms, on_disk(snap)))
    });
    let grace = if r.is_ok() {
        KILL_GRACE
    } else {
        Duration::ZERO
    };
    let _ = wait_with_limit(&mut child, grace);
    r.map_err(|e| context(e, &log, &errors))
}

/// No bandwidth limit on the migration (QEMU's default is for live migration over a network).
const MIGRATE_BANDWIDTH: u64 = 1 << 40;

/// QMP `stop`, `migrate` to `file:PATH`, `query-migrate` until completed, the file synced: ms.
fn migrate_to_file(q: &mut Qmp, file: &Path, deadline: Instant) -> Result<f64, String> {
    q.call(json!({"execute": "migrate-set-parameters",
                  "arguments": {"max-bandwidth": MIGRATE_BANDWIDTH}}))?;
    let t0 = Instant::now();
    q.call(json!({"execute": "stop"}))?;
    let uri = format!("file:{}", file.display());
    q.call(json!({"execute": "migrate", "arguments": {"uri": uri}}))?;
    loop {
        let r = q.call(json!({"execute": "query-migrate"}))?;
        match r["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => return Err(format!("QEMU's migration to {uri}: {r}")),
            _ if Instant::now() > deadline => {
                return Err(format!("QEMU's migration to {uri} did not complete: {r}"))
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", file.display()))?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// The command that restores `snap` under `vmm`.
fn restore_command(
    setup: &Setup,
    args: &SnapshotArgs,
    vmm: Vmm,
    snap: &Path,
    sock: &Path,
) -> Result<Command, String> {
    Ok(match vmm {
        Vmm::Exitless => {
            let mut c = Command::new(&setup.exe);
            c.args(["restore", "--no-summary", "--snapshot"])
                .arg(snap)
                .arg(format!("--timeout={}", args.timeout));
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new(setup.qemu.as_ref().ok_or("no QEMU")?);
            c.args(&setup.qemu_boot)
                .args(qmp_arg(sock))
                .arg("-incoming")
                .arg(format!("file:{}", snap.display()));
            c
        }
    })
}

/// One restore: (restore_ms, first_response_ms), as the module doc says for each VMM.
fn restore_once(
    setup: &Setup,
    args: &SnapshotArgs,
    vmm: Vmm,
    snap: &Path,
    dir: &Path,
) -> Result<(f64, f64), String> {
    let sock = dir.join("qmp-restore.sock");
    let _ = std::fs::remove_file(&sock);
    let errors = dir.join(format!("{}-restore-stderr.log", vmm.name()));
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut cmd = restore_command(setup, args, vmm, snap, &sock)?;
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start the restore: {e}"))?;
    let r = answered(setup.work, vmm, &mut child, t0, &sock, args.timeout);
    let _ = child.kill();
    let _ = child.wait();
    let stderr = read_lossy(&errors);
    let (running, first) = r.map_err(|e| format!("{e}\n{}", tail(&stderr, 6)))?;
    match running {
        Some(ms) => Ok((ms, first)),
        None => Ok((restore_ms(&stderr)?, first)),
    }
}

/// Types the workload's input into the restoring `child` (exitless: at once; QEMU: once QMP says
/// it runs) and waits for the answer: (QEMU's spawn-to-running ms, spawn-to-answer ms).
fn answered(
    work: &Workload,
    vmm: Vmm,
    child: &mut Child,
    t0: Instant,
    sock: &Path,
    timeout: f64,
) -> Result<(Option<f64>, f64), String> {
    let deadline = t0 + Duration::from_secs_f64(timeout);
    let answer = watch_console(child, work.answer)?;
    // The pipe stays open until the answer, as an operator's terminal would.
    let mut input = child.stdin.take().ok_or("no stdin")?;
    let running = match vmm {
        Vmm::Exitless => None,
        Vmm::Qemu => {
            let mut q = Qmp::connect(sock, child, deadline)?;
            Some(wait_running(&mut q, t0, deadline)?)
        }
    };
    input
        .write_all(work.input.as_bytes())
        .and_then(|()| input.flush())
        .map_err(|e| format!("cannot type into the console: {e}"))?;
    answer
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .map_err(|_| {
            format!(
                "the restored guest did not answer {:?} on its console",
                work.input
            )
        })?;
    let first = t0.elapsed().as_secs_f64() * 1e3;
    drop(input);
    Ok((running, first))
}

/// Polls QMP `query-status` until the restored guest runs: ms since `t0`. The migration stream
/// carries the source's run state, paused here (the snapshot was taken after `stop`), so QEMU
/// keeps the loaded guest paused: it gets `cont` as soon as it says `paused`.
fn wait_running(q: &mut Qmp, t0: Instant, deadline: Instant) -> Result<f64, String> {
    loop {
        let r = q.call(json!({"execute": "query-status"}))?;
        if r["status"] == "running" {
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }
        if r["status"] == "paused" {
            q.call(json!({"execute": "cont"}))?;
            continue;
        }
        if Instant::now() > deadline {
            return Err(format!("QEMU's restored guest does not run: {r}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads the child's stdout on a thread; the receiver gets `()` at the first line holding `want`.
fn watch_console(child: &mut Child, want: &str) -> Result<mpsc::Receiver<()>, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let want = want.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            match line {
                Ok(l) if String::from_utf8_lossy(&l).contains(&want) => {
                    let _ = tx.send(());
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    Ok(rx)
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

    #[test]
    fn no_answer_is_in_its_own_input_so_an_echo_is_never_taken_for_it() {
        for w in [&KIT, &DEBIAN] {
            assert!(!w.input.contains(w.answer), "{w:?}");
            assert!(!w.ready.contains(w.answer), "{w:?}");
        }
    }

    fn case(vmm: &'static str, ms: f64, bytes: u64) -> Case {
        Case {
            vmm,
            guest: "debian".into(),
            memory_bytes: 256 << 20,
            snapshot_ms: ms,
            snapshot_bytes: bytes,
            restore_ms: ms / 2.0,
            restore_ms_min: ms / 4.0,
            first_response_ms: ms,
            first_response_ms_min: ms / 2.0,
            restores: 3,
            exitless_vs_this: None,
        }
    }

    #[test]
    fn ratios_are_exitless_over_the_peer_and_the_table_shows_them() {
        let ours = case("exitless", 10.0, 1 << 20);
        let mut peer = case("qemu", 40.0, 4 << 20);
        let r = Ratios::of(&ours, &peer);
        assert_eq!(r.snapshot_ms, Some(0.25));
        assert_eq!(r.snapshot_bytes, Some(0.25));
        assert_eq!(r.first_response_ms, Some(0.25));
        peer.exitless_vs_this = Some(r);
        let j = serde_json::to_value([&ours, &peer]).unwrap();
        assert!(j[0].get("exitless_vs_this").is_none(), "{j}");
        assert_eq!(j[1]["exitless_vs_this"]["restore_ms"], 0.25);
        let t = table(&[ours, peer]);
        assert!(t.contains("exitless/qemu"), "{t}");
        let row = t.lines().find(|l| l.starts_with("snapshot ms")).unwrap();
        assert!(row.contains("10.000") && row.contains("40.000"), "{row}");
        assert!(row.trim_end().ends_with("0.25x"), "{row}");
        let alone = table(&[case("exitless", 1.0, 1)]);
        assert!(!alone.contains("exitless/"), "{alone}");
    }

    #[test]
    fn qemu_boots_the_debian_guest_as_exitless_does() {
        let args = SnapshotArgs {
            json: false,
            guest: Guest::Debian,
            vs: Some(Peer::Qemu),
            mem: 256 << 20,
            restores: 1,
            timeout: 10.0,
            kernel: "k".into(),
            initrd: "i".into(),
        };
        let q = debian_qemu(&args, "console=ttyS0 x").join(" ");
        assert!(
            q.contains("-accel kvm") && q.contains("-m 256 -smp 1"),
            "{q}"
        );
        assert!(
            q.contains("-kernel k -initrd i -append console=ttyS0 x"),
            "{q}"
        );
        assert!(q.ends_with("-serial stdio"), "{q}");
        let e = debian_exitless(&args, "console=ttyS0 x").join(" ");
        assert!(
            e.contains("--kernel k --initrd i --mem=262144K --cpus=1"),
            "{e}"
        );
        assert!(
            e.ends_with("--no-default-cmdline --cmdline console=ttyS0 x"),
            "{e}"
        );
    }

    #[test]
    fn missing_debian_images_are_named() {
        let args = SnapshotArgs {
            json: false,
            guest: Guest::Debian,
            vs: None,
            mem: 256 << 20,
            restores: 1,
            timeout: 10.0,
            kernel: "/nonexistent/vmlinuz".into(),
            initrd: "i".into(),
        };
        let e = check_debian(&args).unwrap_err();
        assert!(
            e.contains("/nonexistent/vmlinuz") && e.contains("debian-guest.sh"),
            "{e}"
        );
    }

    #[test]
    fn sizes_on_disk_count_a_directory_s_files_or_one_file() {
        let dir = TempDir::new("snapshot-on-disk").unwrap();
        let f = dir.path().join("memory");
        std::fs::write(&f, vec![1u8; 64 << 10]).unwrap();
        std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
        assert!(on_disk(&f) >= 64 << 10);
        assert!(on_disk(dir.path()) > on_disk(&f));
        assert_eq!(on_disk(Path::new("/nonexistent/snap")), 0);
    }
}
