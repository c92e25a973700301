//! `exitless bench soak`: many kit-guest boots in a row, then many VMs at once, with the boot rate
//! per core and a check that nothing leaks into the host.
//!
//! Every VM is its own `exitless run --guest NAME` child process (with a control socket, so that
//! socket clean-up is part of what is checked); a boot counts when the child exits 0 and the
//! guest printed no `kit: FAIL` (the demo ends with `kit: PASS demo`; a kit guest that fails
//! exits through isa-debug-exit, status 3, anyway). Two phases:
//! 1. `--boots` boots one after the other;
//! 2. `--load-boots` boots with `--parallel` VMs running at all times (a new one starts as soon as
//!    one ends).
//!
//! **Rates.** boots/s is boots over the phase's wall time; boots/s/core divides it by this host's
//! CPUs (`available_parallelism`): Firecracker's figure ("5 microVMs per core per second") is
//! per host core, whether or not the phases keep every core busy. Per boot: wall time (median,
//! p99) and the child's peak RSS (`wait4`'s `ru_maxrss`: guest RAM it touched included).
//!
//! **Leaks.** A long-running parent's own fds, threads and memory say little about VMs that each
//! live in their own process; what a soak must show is that VMs leave nothing on the host. So,
//! before the first phase and after the second: processes still running from this run (any whose
//! command line names its directory: an exitless that outlived its end, orphaned or not), socket
//! files and bound Unix sockets under its directory (`/proc/net/unix`), network interfaces (a
//! tap left behind), entries in `/dev/shm`; and this process's own fds and threads, which must be
//! back where they were. Any difference is a leak: listed, and the bench fails.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::{read_lossy, round1, round3, tail, TempDir};

/// Arguments of `exitless bench soak`.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// Boots one after the other (phase 1).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub boots: u32,
    /// VMs running at once in phase 2.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub parallel: u32,
    /// Boots in phase 2 (default: 5 waves of --parallel).
    #[arg(long)]
    pub load_boots: Option<u32>,
    /// The embedded kit guest to boot.
    #[arg(long, default_value = "demo")]
    pub guest: String,
    /// Time limit of each VM, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One finished boot.
#[derive(Clone, Copy, Debug)]
struct Boot {
    ok: bool,
    wall: Duration,
    maxrss_kib: u64,
}

/// What one phase measured.
#[derive(Clone, Debug, Default)]
pub struct Phase {
    pub name: &'static str,
    pub parallel: u32,
    pub boots: u32,
    pub failed: u32,
    pub wall: Duration,
    pub boot_ms: Vec<f64>,
    pub maxrss_kib: Vec<u64>,
    /// The first failures: what their VMs said.
    pub failures: Vec<String>,
}

impl Phase {
    pub fn boots_per_s(&self) -> f64 {
        (self.boots - self.failed) as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn to_json(&self, cores: usize) -> Value {
        let mut ms = self.boot_ms.clone();
        ms.sort_by(f64::total_cmp);
        json!({
            "phase": self.name,
            "parallel": self.parallel,
            "boots": self.boots,
            "failed": self.failed,
            "wall_s": round3(self.wall.as_secs_f64()),
            "boots_per_s": round3(self.boots_per_s()),
            "boots_per_s_per_core": round3(self.boots_per_s() / cores as f64),
            "boot_ms_median": percentile(&ms, 0.5).map(round1),
            "boot_ms_p99": percentile(&ms, 0.99).map(round1),
            "maxrss_mib_first": self.maxrss_kib.first().map(|k| round1(*k as f64 / 1024.0)),
            "maxrss_mib_last": self.maxrss_kib.last().map(|k| round1(*k as f64 / 1024.0)),
            "maxrss_mib_max": self.maxrss_kib.iter().max().map(|k| round1(*k as f64 / 1024.0)),
        })
    }
}

/// The value at quantile `q` of sorted `v`.
pub fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

// --- the host, before and after ----------------------------------------------------------------

/// What the leak check compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostState {
    /// Processes whose command line names the run directory: pid and command.
    pub processes: BTreeMap<u32, String>,
    /// Files under the run directory other than the consoles (`*.log`).
    pub files: BTreeSet<String>,
    /// Bound Unix sockets under the run directory.
    pub unix_sockets: BTreeSet<String>,
    pub interfaces: BTreeSet<String>,
    pub shm: BTreeSet<String>,
    pub own_fds: usize,
    pub own_threads: usize,
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl HostState {
    pub fn read(run_dir: &Path) -> HostState {
        let needle = run_dir.display().to_string();
        let me = std::process::id();
        let processes = names(Path::new("/proc"))
            .into_iter()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                cmd.contains(&needle).then(|| (pid, cmd.trim().to_string()))
            })
            .collect();
        let unix_sockets = std::fs::read_to_string("/proc/net/unix")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(7))
            .filter(|p| p.starts_with(&needle))
            .map(str::to_string)
            .collect();
        HostState {
            processes,
            files: names(run_dir)
                .into_iter()
                .filter(|n| !n.ends_with(".log"))
                .collect(),
            unix_sockets,
            interfaces: names(Path::new("/sys/class/net")),
            shm: names(Path::new("/dev/shm")),
            own_fds: names(Path::new("/proc/self/fd")).len(),
            own_threads: names(Path::new("/proc/self/task")).len(),
        }
    }

    /// What `after` has that `self` had not (or more of it), one line each.
    pub fn leaks(&self, after: &HostState) -> Vec<String> {
        let mut v = Vec::new();
        for (pid, cmd) in &after.processes {
            if !self.processes.contains_key(pid) {
                v.push(format!("process {pid} still running: {cmd}"));
            }
        }
        let new = |what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>, v: &mut Vec<String>| {
            for n in b.difference(a) {
                v.push(format!("{what} left behind: {n}"));
            }
        };
        new("file", &self.files, &after.files, &mut v);
        new(
            "Unix socket",
            &self.unix_sockets,
            &after.unix_sockets,
            &mut v,
        );
        new(
            "network interface",
            &self.interfaces,
            &after.interfaces,
            &mut v,
        );
        new("/dev/shm entry", &self.shm, &after.shm, &mut v);
        if after.own_fds > self.own_fds {
            v.push(format!(
                "this process's fds: {} before, {} after",
                self.own_fds, after.own_fds
            ));
        }
        if after.own_threads > self.own_threads {
            v.push(format!(
                "this process's threads: {} before, {} after",
                self.own_threads, after.own_threads
            ));
        }
        v
    }
}

// --- the boots ---------------------------------------------------------------------------------

/// A running VM: its pid, console file and start.
struct Running {
    pid: libc::pid_t,
    console: PathBuf,
    errors: PathBuf,
    started: Instant,
}

fn spawn(args: &SoakArgs, dir: &Path, exe: &Path, slot: u32) -> Result<Running, String> {
    let console = dir.join(format!("vm{slot}.log"));
    let errors = dir.join(format!("vm{slot}-stderr.log"));
    let file = |p: &Path| std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let child = Command::new(exe)
        .args(["run", "--guest", &args.guest, "--no-summary", "--timeout"])
        .arg(format!("{}", args.timeout))
        .arg("--api-socket")
        .arg(dir.join(format!("vm{slot}.sock")))
        .stdin(Stdio::null())
        .stdout(file(&console)?)
        .stderr(file(&errors)?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    // The child is reaped with wait4 (for its rusage), not through `Child`, whose drop neither
    // waits nor kills.
    Ok(Running {
        pid: child.id() as libc::pid_t,
        console,
        errors,
        started: Instant::now(),
    })
}

/// Reaps `r` if it has ended: its status and peak RSS (KiB).
fn reap(r: &Running, block: bool) -> Option<(i32, u64)> {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `status` and `usage` are valid for writes; `r.pid` is our own unreaped child.
    let pid = unsafe {
        libc::wait4(
            r.pid,
            &mut status,
            if block { 0 } else { libc::WNOHANG },
            &mut usage,
        )
    };
    (pid == r.pid).then_some((status, usage.ru_maxrss.max(0) as u64))
}

/// Runs `boots` boots with `parallel` at a time; returns the phase.
fn phase(
    args: &SoakArgs,
    dir: &Path,
    name: &'static str,
    boots: u32,
    parallel: u32,
) -> Result<Phase, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let limit = Duration::from_secs_f64(args.timeout) + super::KILL_GRACE;
    let mut p = Phase {
        name,
        parallel,
        boots,
        ..Default::default()
    };
    let started = Instant::now();
    let mut running: HashMap<u32, Running> = HashMap::new();
    let (mut next, mut done) = (0u32, 0u32);
    while done < boots {
        while next < boots && (running.len() as u32) < parallel {
            let slot = (0..parallel)
                .find(|s| !running.contains_key(s))
                .unwrap_or(0);
            running.insert(slot, spawn(args, dir, &exe, slot)?);
            next += 1;
        }
        let ended: Vec<(u32, Boot, String)> = running
            .iter()
            .filter_map(|(&slot, r)| {
                let timed_out = r.started.elapsed() > limit;
                if timed_out {
                    // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
                    unsafe { libc::kill(r.pid, libc::SIGKILL) };
                }
                let (status, rss) = reap(r, timed_out || parallel == 1)?;
                let console = read_lossy(&r.console);
                let ok = libc::WIFEXITED(status)
                    && libc::WEXITSTATUS(status) == 0
                    && !console.contains("kit: FAIL");
                let why = if ok {
                    String::new()
                } else {
                    format!(
                        "status {status:#x}{}; console: {}; stderr: {}",
                        if timed_out {
                            " (killed at its time limit)"
                        } else {
                            ""
                        },
                        tail(&console, 3),
                        tail(&read_lossy(&r.errors), 3)
                    )
                };
                let b = Boot {
                    ok,
                    wall: r.started.elapsed(),
                    maxrss_kib: rss,
                };
                Some((slot, b, why))
            })
            .collect();
        if ended.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
        for (slot, b, why) in ended {
            running.remove(&slot);
            done += 1;
            p.boot_ms.push(b.wall.as_secs_f64() * 1e3);
            p.maxrss_kib.push(b.maxrss_kib);
            if !b.ok {
                p.failed += 1;
                if p.failures.len() < 3 {
                    p.failures.push(why);
                }
            }
        }
    }
    p.wall = started.elapsed();
    Ok(p)
}

// --- the report --------------------------------------------------------------------------------

pub fn to_json(phases: &[Phase], cores: usize, guest: &str, leaks: &[String]) -> Value {
    json!({
        "guest": guest,
        "cores": cores,
        "phases": phases.iter().map(|p| p.to_json(cores)).collect::<Vec<_>>(),
        "failures": phases.iter().flat_map(|p| p.failures.clone()).collect::<Vec<_>>(),
        "leaks": leaks,
    })
}

pub fn table(phases: &[Phase], cores: usize, guest: &str, leaks: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "exitless bench soak: the kit's {guest} guest, one exitless process per VM, {cores} \
         host CPU{}",
        if cores == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        s,
        "{:<12} {:>8} {:>6} {:>6} {:>9} {:>9} {:>13} {:>10} {:>10} {:>12}",
        "phase",
        "at once",
        "boots",
        "failed",
        "wall s",
        "boots/s",
        "boots/s/core",
        "median ms",
        "p99 ms",
        "max RSS MiB"
    );
    for p in phases {
        let j = p.to_json(cores);
        let f = |k: &str| j[k].as_f64().map_or("-".into(), |x| format!("{x:.1}"));
        let _ = writeln!(
            s,
            "{:<12} {:>8} {:>6} {:>6} {:>9.1} {:>9.2} {:>13.3} {:>10} {:>10} {:>12}",
            p.name,
            p.parallel,
            p.boots,
            p.failed,
            p.wall.as_secs_f64(),
            p.boots_per_s(),
            p.boots_per_s() / cores as f64,
            f("boot_ms_median"),
            f("boot_ms_p99"),
            f("maxrss_mib_max"),
        );
    }
    for f in phases.iter().flat_map(|p| &p.failures) {
        let _ = writeln!(s, "failed boot: {f}");
    }
    if leaks.is_empty() {
        let _ = writeln!(
            s,
            "leaks: none (no process, socket file, bound Unix socket, network interface or \
             /dev/shm entry left; this process's fds and threads as before)"
        );
    }
    for l in leaks {
        let _ = writeln!(s, "leak: {l}");
    }
    s
}

/// `exitless bench soak`.
pub fn run(args: &SoakArgs) -> Result<(), String> {
    if crate::kit::get(&args.guest).is_none() {
        return Err(format!(
            "--guest {}: no such embedded guest (exitless kit list)",
            args.guest
        ));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!("--timeout {}: not a positive number", args.timeout));
    }
    crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir =
        TempDir::new("exitless-bench-soak").map_err(|e| format!("temporary directory: {e}"))?;
    let before = HostState::read(dir.path());
    let progress = |m: &str| eprintln!("exitless: bench soak: {m}");
    progress(&format!(
        "{} boots of {}, one at a time",
        args.boots, args.guest
    ));
    let seq = phase(args, dir.path(), "sequential", args.boots, 1)?;
    let load_boots = args.load_boots.unwrap_or(args.parallel * 5);
    progress(&format!("{load_boots} boots, {} at a time", args.parallel));
    let load = phase(args, dir.path(), "parallel", load_boots, args.parallel)?;
    let leaks = before.leaks(&HostState::read(dir.path()));
    let phases = [seq, load];
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&phases, cores, &args.guest, &leaks))
                .expect("JSON")
        );
    } else {
        print!("{}", table(&phases, cores, &args.guest, &leaks));
    }
    let failed: u32 = phases.iter().map(|p| p.failed).sum();
    match (failed, leaks.len()) {
        (0, 0) => Ok(()),
        (f, l) => Err(format!(
            "{f} boot(s) failed, {l} leak(s) found (listed above)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaks_are_what_appeared_and_not_what_went() {
        let mut a = HostState {
            own_fds: 5,
            own_threads: 1,
            ..Default::default()
        };
        a.interfaces.insert("lo".into());
        a.processes.insert(1, "init".into());
        let mut b = a.clone();
        assert!(a.leaks(&b).is_empty());
        b.interfaces.insert("exl0".into());
        b.files.insert("vm3.sock".into());
        b.processes
            .insert(42, "exitless run --api-socket /tmp/x/vm3.sock".into());
        b.own_fds = 6;
        a.shm.insert("gone".into());
        let l = a.leaks(&b);
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l.iter().any(|s| s.contains("exl0")));
        assert!(l.iter().any(|s| s.contains("process 42")));
        assert!(l.iter().any(|s| s.contains("5 before, 6 after")));
    }

    #[test]
    fn the_report_has_rates_per_core() {
        let p = Phase {
            name: "sequential",
            parallel: 1,
            boots: 10,
            failed: 0,
            wall: Duration::from_secs(5),
            boot_ms: vec![400.0, 500.0, 600.0],
            maxrss_kib: vec![20480, 30720],
            failures: vec![],
        };
        let j = to_json(std::slice::from_ref(&p), 2, "demo", &[]);
        assert_eq!(j["phases"][0]["boots_per_s"], 2.0);
        assert_eq!(j["phases"][0]["boots_per_s_per_core"], 1.0);
        assert_eq!(j["phases"][0]["boot_ms_median"], 500.0);
        assert_eq!(j["phases"][0]["maxrss_mib_max"], 30.0);
        let t = table(&[p], 2, "demo", &["file left behind: x".into()]);
        assert!(t.contains("leak: file left behind: x"), "{t}");
        assert_eq!(percentile(&[], 0.5), None);
    }
}
