//! `exitless bench io`: paravirtual I/O throughput and the exits it costs, side by side with QEMU.
//!
//! Owns the benchmark end to end:
//! 1. the guest: the kit's `bench-io` guest (`guests/src/bin/bench-io.rs`) drives virtio-blk with
//!    its own driver from CPL3 (batched submissions, EVENT_IDX notification suppression, polled
//!    completions), times each workload with the TSC and prints `kit: io ...` lines on COM1;
//!    [`parse`] turns them into a [`GuestRun`] and refuses anything malformed, incomplete or failed;
//! 2. the scratch image: one raw file in a temporary directory, recreated (sparse, same size)
//!    before every run, so both VMMs start from the same empty image ([`Setup`]);
//! 3. exitless's runs: `exitless run --guest bench-io --disk path=IMG` in a child process with the
//!    exit counters written as JSON (`--stats-json`); one extra run with `mib=0` (set-up and flush
//!    only) is the baseline whose counters are subtracted, so that the exits per request count only
//!    what the workloads caused (console output is left out of both: its exits are per byte);
//!    the report's `kvm` section (KVM's own per-vCPU counters, where the host has binary
//!    statistics) gives all exits, in-kernel ones included, as QEMU's `query-stats` does;
//! 4. QEMU's runs: the same ELF under `qemu-system-x86_64 -M q35 -accel kvm` with
//!    `virtio-blk-pci,disable-legacy=on` over the same image (writeback cache, thread pool: the
//!    host page cache on both sides, as exitless's `pwrite`/`pread`). debugfs (`/sys/kernel/debug/
//!    kvm`) is not readable here, so the guest holds at its end (`hold`) and the bench asks QEMU
//!    for its vCPUs' KVM statistics over QMP (`query-stats`, QEMU 7.1+) before ending it; a
//!    baseline run (`mib=0`) is subtracted as for exitless, and so are the console's port exits
//!    (two per byte printed: the runs print different amounts);
//! 5. rounds alternate between the VMMs; per workload and VMM the best round (highest MB/s: other
//!    load on the host only ever slows a run down) and the median are kept;
//! 6. output: a table, or one JSON object (`--json`).
//!
//! The network phase works the same way with virtio-net over a tap in a network namespace the
//! bench creates and deletes ([`Netns`]; both VMMs run inside it, QEMU with its userspace tap
//! backend since /dev/vhost-net is absent here): the guest sends `frames` frames to a MAC no host
//! interface has, so the host's stack drops them on arrival. Without root (no namespace, no tap)
//! or with `--no-net` the phase is skipped and the reason shown in the `net-tx` row.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{
    clip, find_program, host_tsc_hz, qemu_args, read_lossy, round1, round3, round5,
    run_under_exitless, tail, wait_with_limit, Finished, IoArgs, Peer, TempDir, KILL_GRACE,
};

/// The guest protocol version this parser understands (`kit: io start version=...`).
pub const PROTOCOL_VERSION: u64 = 1;
/// The guest this benchmark boots.
pub const GUEST: &str = "bench-io";
/// MiB moved per block workload (the guest's defaults; passed explicitly anyway).
pub const FULL_MIB: u64 = 256;
pub const QUICK_MIB: u64 = 32;
/// Frames sent by the network workload.
pub const FULL_FRAMES: u64 = 131_072;
pub const QUICK_FRAMES: u64 = 16_384;

/// One workload's result as the guest reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub requests: u64,
    pub bytes: u64,
    pub cycles: u64,
    /// Notifications (writes to the notify register) the guest sent.
    pub kicks: u64,
    /// Batches made available without a notification (the device had not asked for one).
    pub kicks_suppressed: u64,
    /// Used-ring polls that found completions.
    pub reaps: u64,
    pub empty_polls: u64,
    pub irqs: u64,
}

impl Workload {
    pub fn mb_s(&self, hz: u64) -> f64 {
        if self.cycles == 0 {
            return 0.0;
        }
        self.bytes as f64 / (self.cycles as f64 / hz as f64) / 1e6
    }

    pub fn kicks_per_request(&self) -> f64 {
        self.kicks as f64 / self.requests.max(1) as f64
    }
}

/// What a `bench-io` guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRun {
    pub tsc_hz: u64,
    pub mode: String,
    pub mib: u64,
    pub qd: u64,
    pub batch: u64,
    pub req_bytes: u64,
    pub queue: u64,
    pub event_idx: bool,
    /// Measured workloads, in the guest's order.
    pub workloads: Vec<Workload>,
    /// Workloads the guest could not run, with the reason.
    pub unsupported: Vec<(String, String)>,
    pub flush_cycles: Option<u64>,
}

impl GuestRun {
    pub fn workload(&self, name: &str) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.name == name)
    }

    /// Requests of every block workload plus the flush (what the device serves beyond set-up).
    pub fn requests(&self) -> u64 {
        self.workloads.iter().map(|w| w.requests).sum::<u64>()
    }
}

fn fields(rest: &str) -> Result<BTreeMap<&str, &str>, String> {
    rest.split_ascii_whitespace()
        .map(|t| {
            t.split_once('=')
                .ok_or_else(|| format!("malformed field {:?}", clip(t)))
        })
        .collect()
}

fn num(f: &BTreeMap<&str, &str>, key: &str) -> Result<u64, String> {
    let v = f.get(key).ok_or_else(|| format!("no {key}="))?;
    v.parse()
        .map_err(|_| format!("{key}={} is not a number", clip(v)))
}

/// Parses the guest's console. The protocol lines may start mid-line (QEMU's firmware prints
/// without a final newline), so each line is read from its first `kit: `.
pub fn parse(console: &str) -> Result<GuestRun, String> {
    let mut run: Option<GuestRun> = None;
    let mut done = None;
    let mut passed = false;
    for line in console.lines() {
        let Some(at) = line.find("kit: ") else {
            continue;
        };
        let line = line[at..].trim_end();
        if let Some(rest) = line.strip_prefix("kit: FAIL") {
            return Err(format!("the guest failed:{}", clip(rest)));
        }
        if line == format!("kit: PASS {GUEST}") {
            passed = true;
            continue;
        }
        let Some(rest) = line.strip_prefix("kit: io ") else {
            continue;
        };
        let (kw, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let bad = |e: String| format!("bad line {:?}: {e}", clip(line));
        if let Some(name) = kw.strip_prefix("workload=") {
            // `workload=NAME ...`: the name is the keyword's value.
            let r = run
                .as_mut()
                .ok_or_else(|| format!("{:?} before the start line", clip(line)))?;
            let f = fields(rest).map_err(bad)?;
            if let Some(why) = f.get("unsupported") {
                r.unsupported.push((name.to_string(), why.to_string()));
                continue;
            }
            let g = |k: &str| num(&f, k).map_err(bad);
            r.workloads.push(Workload {
                name: name.to_string(),
                requests: g("requests")?,
                bytes: g("bytes")?,
                cycles: g("cycles")?,
                kicks: g("kicks")?,
                kicks_suppressed: g("kicks_suppressed")?,
                reaps: g("reaps")?,
                empty_polls: g("empty_polls")?,
                irqs: g("irqs")?,
            });
            continue;
        }
        if kw == "note" {
            // `note <what> k=v ...`: only the flush's time is kept.
            if let (Some(r), Some(c)) = (run.as_mut(), rest.strip_prefix("flush cycles=")) {
                r.flush_cycles = Some(c.trim().parse().map_err(|_| bad("flush cycles".into()))?);
            }
            continue;
        }
        let f = fields(rest).map_err(bad)?;
        let g = |k: &str| num(&f, k).map_err(bad);
        match kw {
            "start" => {
                let v = g("version")?;
                if v != PROTOCOL_VERSION {
                    return Err(format!(
                        "the guest speaks protocol version {v}, this exitless {PROTOCOL_VERSION}"
                    ));
                }
                run = Some(GuestRun {
                    tsc_hz: g("tsc_hz")?,
                    mode: f.get("mode").unwrap_or(&"?").to_string(),
                    mib: g("mib")?,
                    qd: g("qd")?,
                    batch: g("batch")?,
                    req_bytes: g("req_bytes")?,
                    queue: 0,
                    event_idx: false,
                    workloads: vec![],
                    unsupported: vec![],
                    flush_cycles: None,
                });
            }
            "device=blk" => {
                let r = run.as_mut().ok_or("device line before the start line")?;
                r.queue = g("queue")?;
                r.event_idx = g("event_idx")? == 1;
            }
            "done" => done = Some(g("workloads")?),
            "hold" => {}
            _ if kw.starts_with("device=") => {}
            _ => return Err(bad(format!("unknown keyword {kw:?}"))),
        }
    }
    let run = run.ok_or("the guest printed no `kit: io start` line")?;
    let n = done.ok_or("the guest did not finish (no `kit: io done` line)")?;
    let seen = (run.workloads.len() + run.unsupported.len()) as u64;
    if n != seen {
        return Err(format!(
            "the guest announced {n} workloads and reported {seen}"
        ));
    }
    if !passed {
        return Err(format!("the guest did not print `kit: PASS {GUEST}`"));
    }
    if run.tsc_hz == 0 {
        return Err("the guest reported a TSC frequency of 0".into());
    }
    Ok(run)
}

/// What exitless's run report says about one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub total_exits: u64,
    /// Exits on the console's ports (0x3f8-0x3ff): per byte printed, not per request.
    pub console_exits: u64,
    pub mmio_exits: u64,
    pub exits: BTreeMap<String, u64>,
    /// KVM's count of every exit (in-kernel ones included), summed over vCPUs; None where the
    /// host has no binary statistics (the report's `kvm` section is empty).
    pub kvm_exits: Option<u64>,
    /// The benchmarked device's facts (`requests`, `notifications`, `interrupts`, ...).
    pub blk: BTreeMap<String, u64>,
}

impl Counters {
    /// The counters of a run report; `device` is the benchmarked device's name prefix
    /// (`virtio-blk`, `virtio-net`).
    pub fn from_report(v: &Value, device: &str) -> Result<Counters, String> {
        let map = |key: &str| -> BTreeMap<String, u64> {
            v.get(key)
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let exits = map("exits");
        let console_exits = map("pio_ports")
            .iter()
            .filter(|(p, _)| {
                u16::from_str_radix(p.trim_start_matches("0x"), 16)
                    .is_ok_and(|p| (0x3f8..=0x3ff).contains(&p))
            })
            .map(|(_, n)| n)
            .sum();
        let blk = v
            .get("devices")
            .and_then(Value::as_array)
            .and_then(|d| {
                d.iter()
                    .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with(device)))
            })
            .and_then(|d| d.get("facts"))
            .and_then(Value::as_object)
            .ok_or_else(|| format!("exitless's report has no {device} device facts"))?
            .iter()
            .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
            .collect();
        Ok(Counters {
            total_exits: v["total_exits"]
                .as_u64()
                .ok_or("exitless's report has no total_exits")?,
            console_exits,
            kvm_exits: map("kvm").get("exits").copied(),
            mmio_exits: exits.get("mmio_read").copied().unwrap_or(0)
                + exits.get("mmio_write").copied().unwrap_or(0),
            exits,
            blk,
        })
    }

    pub fn fact(&self, k: &str) -> u64 {
        self.blk.get(k).copied().unwrap_or(0)
    }
}

/// Exits the workloads caused: a run's counters minus the baseline's (console exits left out).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadExits {
    /// Requests the device served beyond the baseline (must equal what the guest asked for).
    pub device_requests: u64,
    pub exits: i64,
    pub mmio_exits: i64,
    pub notifications: i64,
    pub interrupts: i64,
    /// Every exit KVM counted beyond the baseline, in-kernel ones included, console port exits
    /// taken out; None without KVM statistics (in the run or the baseline).
    pub all: Option<i64>,
    /// Exits by reason beyond the baseline (console ports included: they are per byte).
    pub by_reason: BTreeMap<String, i64>,
}

impl WorkloadExits {
    pub fn new(run: &Counters, base: &Counters) -> WorkloadExits {
        let d = |a: u64, b: u64| a as i64 - b as i64;
        let mut by_reason = BTreeMap::new();
        for k in run.exits.keys().chain(base.exits.keys()) {
            let v = d(
                run.exits.get(k).copied().unwrap_or(0),
                base.exits.get(k).copied().unwrap_or(0),
            );
            if v != 0 {
                by_reason.insert(k.clone(), v);
            }
        }
        WorkloadExits {
            device_requests: run.fact("requests").saturating_sub(base.fact("requests")),
            exits: d(
                run.total_exits - run.console_exits,
                base.total_exits - base.console_exits,
            ),
            mmio_exits: d(run.mmio_exits, base.mmio_exits),
            notifications: d(run.fact("notifications"), base.fact("notifications")),
            interrupts: d(run.fact("interrupts"), base.fact("interrupts")),
            all: match (run.kvm_exits, base.kvm_exits) {
                (Some(r), Some(b)) => Some(d(r, b) - d(run.console_exits, base.console_exits)),
                _ => None,
            },
            by_reason,
        }
    }

    pub fn per_request(&self, n: i64) -> f64 {
        n.max(0) as f64 / self.device_requests.max(1) as f64
    }
}

/// One VMM's rounds of a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    pub best_mb_s: f64,
    pub median_mb_s: f64,
    /// From the best round.
    pub kicks_per_request: f64,
    pub requests: u64,
    pub bytes_per_request: u64,
    pub rounds: usize,
}

impl Side {
    pub fn of(runs: &[GuestRun], name: &str, hz: u64) -> Option<Side> {
        let ws: Vec<&Workload> = runs.iter().filter_map(|r| r.workload(name)).collect();
        let mut mbs: Vec<f64> = ws.iter().map(|w| w.mb_s(hz)).collect();
        mbs.sort_by(|a, b| a.total_cmp(b));
        let best = ws.iter().max_by(|a, b| a.mb_s(hz).total_cmp(&b.mb_s(hz)))?;
        Some(Side {
            best_mb_s: best.mb_s(hz),
            median_mb_s: mbs[mbs.len() / 2],
            kicks_per_request: best.kicks_per_request(),
            requests: best.requests,
            bytes_per_request: best.bytes / best.requests.max(1),
            rounds: ws.len(),
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "mb_s": round1(self.best_mb_s),
            "median_mb_s": round1(self.median_mb_s),
            "kicks_per_request": round5(self.kicks_per_request),
            "rounds": self.rounds,
        })
    }
}

/// A table row: one workload on both VMMs.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub workload: String,
    pub requests: u64,
    pub ours: Side,
    pub peer: Option<Side>,
    /// Exits to userspace per request during the run that contained this workload (exitless's
    /// counters; QEMU's KVM statistics where readable) and MMIO exits per request (exitless).
    pub exits_per_request: f64,
    pub mmio_per_request: f64,
    pub peer_exits_per_request: Option<f64>,
    /// All exits per request, in-kernel ones included (KVM's statistics, where readable).
    pub all_exits_per_request: Option<f64>,
    pub peer_all_exits_per_request: Option<f64>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        let p = self.peer.as_ref()?;
        (p.best_mb_s > 0.0).then(|| self.ours.best_mb_s / p.best_mb_s)
    }
}

pub fn rows(ours: &[GuestRun], peer: &[GuestRun], hz: u64) -> Vec<Row> {
    let Some(first) = ours.first() else {
        return vec![];
    };
    first
        .workloads
        .iter()
        .filter_map(|w| {
            let o = Side::of(ours, &w.name, hz)?;
            Some(Row {
                workload: w.name.clone(),
                requests: o.requests,
                peer: Side::of(peer, &w.name, hz),
                ours: o,
                exits_per_request: 0.0,
                mmio_per_request: 0.0,
                peer_exits_per_request: None,
                all_exits_per_request: None,
                peer_all_exits_per_request: None,
            })
        })
        .collect()
}

/// One device's part of the benchmark: its runs on both VMMs and the exits they cost.
pub struct Phase {
    pub ours: Vec<GuestRun>,
    pub peer: Vec<GuestRun>,
    pub exits: WorkloadExits,
    pub peer_exits: PeerExitsSeen,
}

impl Phase {
    /// The phase's rows (only the workloads named `prefix*`), with its exits per request.
    pub fn rows(&self, prefix: &str, hz: u64) -> Vec<Row> {
        let mut rows = rows(&self.ours, &self.peer, hz);
        rows.retain(|r| r.workload.starts_with(prefix));
        for r in &mut rows {
            r.exits_per_request = self.exits.per_request(self.exits.exits);
            r.mmio_per_request = self.exits.per_request(self.exits.mmio_exits);
            r.all_exits_per_request = self.exits.all.map(|n| self.exits.per_request(n));
            (r.peer_exits_per_request, r.peer_all_exits_per_request) = match &self.peer_exits {
                Some(Ok(e)) if r.peer.is_some() => {
                    (Some(e.per_request(e.userspace)), Some(e.per_request(e.all)))
                }
                _ => (None, None),
            };
        }
        rows
    }
}

/// QEMU's exits, or why they are missing (`None`: QEMU was not run).
pub type PeerExitsSeen = Option<Result<PeerExits, String>>;

fn peer_exits_json(p: &PeerExitsSeen) -> Value {
    match p {
        None => Value::Null,
        Some(Err(why)) => json!({ "unavailable": why }),
        Some(Ok(e)) => json!({
            "source": "KVM per-vCPU statistics through QMP query-stats, run minus baseline run, \
                       console port exits (2 per byte) taken out",
            "requests": e.requests,
            "exits_all": e.all,
            "exits_to_userspace": e.userspace,
            "mmio_exits": e.mmio,
            "io_exits": e.io,
            "io_exits_counted": e.io.is_some(),
            "exits_per_request": round5(e.per_request(e.userspace)),
            "mmio_exits_per_request": round5(e.per_request(e.mmio)),
            "all_exits_per_request": round5(e.per_request(e.all)),
        }),
    }
}

fn exits_json(e: &WorkloadExits) -> Value {
    json!({
        "source": "exitless's exit counters, run minus baseline run, console ports excluded",
        "device_requests": e.device_requests,
        "exits_to_userspace": e.exits,
        "exits_all": e.all,
        "exits_all_source": e.all.map(|_| "KVM's per-vCPU binary statistics (KVM_GET_STATS_FD), \
                                           run minus baseline run, console port exits taken out"),
        "all_exits_per_request": e.all.map(|n| round5(e.per_request(n))),
        "mmio_exits": e.mmio_exits,
        "exits_per_request": round5(e.per_request(e.exits)),
        "mmio_exits_per_request": round5(e.per_request(e.mmio_exits)),
        "notifications": e.notifications,
        "interrupts": e.interrupts,
        "exits_by_reason": e.by_reason,
    })
}

/// Everything the bench measured, as JSON. `net` is the network phase, or why it was skipped.
pub fn to_json(
    rows: &[Row],
    block: &Phase,
    net: &Result<Phase, String>,
    hz: u64,
    peer_note: Option<&str>,
) -> Value {
    let run = &block.ours[0];
    let workloads: Vec<Value> = rows
        .iter()
        .map(|r| {
            let mut o = r.ours.to_json();
            o["exits_per_request"] = json!(round5(r.exits_per_request));
            o["mmio_exits_per_request"] = json!(round5(r.mmio_per_request));
            o["all_exits_per_request"] = json!(r.all_exits_per_request.map(round5));
            json!({
                "workload": r.workload,
                "requests": r.requests,
                "bytes_per_request": r.ours.bytes_per_request,
                "exitless": o,
                "qemu": r.peer.as_ref().map(|p| {
                    let mut q = p.to_json();
                    q["exits_per_request"] = json!(r.peer_exits_per_request.map(round5));
                    q["all_exits_per_request"] = json!(r.peer_all_exits_per_request.map(round5));
                    q
                }),
                "ratio": r.ratio().map(round3),
            })
        })
        .collect();
    let mut unsupported: Vec<Value> = vec![];
    for (w, why) in &run.unsupported {
        if !(w.starts_with("net") && net.is_ok()) {
            unsupported.push(json!({"workload": w, "why": why}));
        }
    }
    if let Err(why) = net {
        unsupported.push(json!({"workload": "net-tx", "why": why}));
    }
    json!({
        "bench": "io",
        "tsc_hz": hz,
        "mode": run.mode,
        "mib": run.mib,
        "queue_depth": run.qd,
        "batch": run.batch,
        "queue_size": run.queue,
        "event_idx": run.event_idx,
        "workloads": workloads,
        "unsupported": unsupported,
        "exitless_block": exits_json(&block.exits),
        "qemu_block": peer_exits_json(&block.peer_exits),
        "exitless_net": net.as_ref().ok().map(|n| exits_json(&n.exits)),
        "qemu_net": net.as_ref().ok().map(|n| peer_exits_json(&n.peer_exits)),
        "peer": peer_note,
    })
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn exits_line(what: &str, e: &WorkloadExits) -> String {
    let reasons: Vec<String> = e
        .by_reason
        .iter()
        .map(|(k, v)| format!("{k} {v:+}"))
        .collect();
    format!(
        "exitless, {what} (exit counters, run minus a set-up-only baseline run, console ports \
         excluded): {} exits to userspace ({} MMIO) over {} requests; {}; the device took {} \
         notifications (ioeventfd) and raised {} interrupts; all changes by reason, console \
         included: {}\n",
        e.exits.max(0),
        e.mmio_exits.max(0),
        e.device_requests,
        match e.all {
            Some(n) => format!(
                "{} exits in all, in-kernel ones included ({:.3} per request; KVM's statistics)",
                n.max(0),
                e.per_request(n)
            ),
            None => "all exits unknown (this host's KVM has no binary statistics)".into(),
        },
        e.notifications,
        e.interrupts,
        if reasons.is_empty() {
            "none".to_string()
        } else {
            reasons.join(", ")
        }
    )
}

fn peer_exits_line(what: &str, p: &PeerExitsSeen) -> String {
    match p {
        None => String::new(),
        Some(Err(why)) => format!("qemu, {what}: KVM exit counts unavailable: {why}\n"),
        Some(Ok(e)) => format!(
            "qemu, {what} (KVM statistics through QMP query-stats, run minus baseline run, 2 \
             console port exits per printed byte taken out): {} exits to userspace ({} MMIO, {}) \
             over {} requests; {} exits in all, in-kernel ones included ({:.3} per request)\n",
            e.userspace.max(0),
            e.mmio,
            e.io.map(|n| format!("{n} port I/O"))
                .unwrap_or_else(|| "port I/O exits not counted by this host's KVM".into()),
            e.requests,
            e.all,
            e.per_request(e.all)
        ),
    }
}

/// The table: one row per workload, then the exits of each phase.
pub fn table(rows: &[Row], block: &Phase, net: &Result<Phase, String>, header: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "{header}");
    let _ = writeln!(
        t,
        "{:<10} {:>8} {:>14} {:>14} {:>6} {:>19} {:>19} {:>19}",
        "",
        "",
        "exitless MB/s",
        "qemu MB/s",
        "",
        "exits/req (user)",
        "exits/req (all)",
        "kicks/req"
    );
    let _ = writeln!(
        t,
        "{:<10} {:>8} {:>14} {:>14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "workload",
        "requests",
        "best (median)",
        "best (median)",
        "ratio",
        "exitless",
        "qemu",
        "exitless",
        "qemu",
        "exitless",
        "qemu"
    );
    for r in rows {
        let side = |s: &Side| format!("{:.0} ({:.0})", s.best_mb_s, s.median_mb_s);
        let _ = writeln!(
            t,
            "{:<10} {:>8} {:>14} {:>14} {:>6} {:>9.4} {:>9} {:>9} {:>9} {:>9.4} {:>9}",
            r.workload,
            r.requests,
            side(&r.ours),
            r.peer.as_ref().map(side).unwrap_or_else(|| "-".into()),
            opt(r.ratio(), 2),
            r.exits_per_request,
            opt(r.peer_exits_per_request, 4),
            opt(r.all_exits_per_request, 4),
            opt(r.peer_all_exits_per_request, 4),
            r.ours.kicks_per_request,
            opt(r.peer.as_ref().map(|p| p.kicks_per_request), 4),
        );
    }
    for (w, why) in &block.ours[0].unsupported {
        if !(w.starts_with("net") && net.is_ok()) {
            let _ = writeln!(t, "{w:<10} not run: {}", why.replace('-', " "));
        }
    }
    if let Err(why) = net {
        let _ = writeln!(t, "{:<10} not run: {why}", "net-tx");
    }
    t.push_str(&exits_line("block workloads", &block.exits));
    t.push_str(&peer_exits_line("block workloads", &block.peer_exits));
    if let Ok(n) = net {
        t.push_str(&exits_line("network workload", &n.exits));
        t.push_str(&peer_exits_line("network workload", &n.peer_exits));
    }
    t
}

/// (Re)creates the scratch image: `bytes` long, sparse, empty.
fn fresh_image(path: &Path, bytes: u64) -> Result<(), String> {
    let f = std::fs::File::create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.set_len(bytes)
        .map_err(|e| format!("cannot size {}: {e}", path.display()))
}

/// The device a phase benchmarks, as both VMMs get it.
#[derive(Clone, Debug)]
pub enum Setup {
    /// virtio-blk over a scratch image, recreated before every run.
    Block { image: PathBuf, bytes: u64 },
    /// virtio-net over a tap inside a network namespace (both VMMs run inside it).
    Net { netns: String, tap: String },
}

impl Setup {
    fn exitless_args(&self) -> Vec<String> {
        match self {
            Setup::Block { image, .. } => {
                vec!["--disk".into(), format!("path={}", image.display())]
            }
            Setup::Net { tap, .. } => vec!["--net".into(), format!("tap={tap}")],
        }
    }

    fn qemu_args(&self) -> Vec<String> {
        match self {
            Setup::Block { image, .. } => vec![
                "-drive".into(),
                format!(
                    "file={},format=raw,if=none,id=d0,cache=writeback,aio=threads",
                    image.display()
                ),
                "-device".into(),
                "virtio-blk-pci,drive=d0,disable-legacy=on".into(),
            ],
            Setup::Net { tap, .. } => vec![
                "-netdev".into(),
                format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                "-device".into(),
                "virtio-net-pci,netdev=n0,disable-legacy=on".into(),
            ],
        }
    }

    /// The device's name prefix in exitless's report.
    fn device(&self) -> &'static str {
        match self {
            Setup::Block { .. } => "virtio-blk",
            Setup::Net { .. } => "virtio-net",
        }
    }

    /// The guest's command line for a workload of `size` (0: the baseline).
    fn cmdline(&self, size: u64) -> String {
        match self {
            Setup::Block { .. } => format!("mib={size}"),
            Setup::Net { .. } => format!("net mib=0 frames={size}"),
        }
    }

    /// Before each run: a fresh, empty image.
    fn prepare(&self) -> Result<(), String> {
        match self {
            Setup::Block { image, bytes } => fresh_image(image, *bytes),
            Setup::Net { .. } => Ok(()),
        }
    }

    /// A command for `program`, inside the setup's network namespace if it has one.
    fn command(&self, program: &Path) -> Command {
        match self {
            Setup::Block { .. } => Command::new(program),
            Setup::Net { netns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(program);
                c
            }
        }
    }
}

/// Boots the guest with exitless (this binary, `run`); returns its console and counters.
fn run_exitless(
    dir: &Path,
    setup: &Setup,
    cmdline: &str,
    timeout: Duration,
) -> Result<(String, Counters), String> {
    let (text, report) = run_under_exitless(
        dir,
        GUEST,
        cmdline,
        &setup.exitless_args(),
        |p| setup.command(p),
        timeout,
        |t| parse(t).map(drop),
    )?;
    Ok((text, Counters::from_report(&report, setup.device())?))
}

/// KVM's per-vCPU statistics of a QEMU VM (QMP `query-stats`, provider `kvm`), summed over
/// vCPUs: `exits` (all, in-kernel ones included), `mmio_exits` and `io_exits` (to userspace), ...
pub type KvmStats = BTreeMap<String, u64>;

/// Sums the numeric KVM statistics of a `query-stats` answer.
pub fn kvm_stats_of(ret: &Value) -> Result<KvmStats, String> {
    let mut m = KvmStats::new();
    let list = ret.as_array().ok_or("query-stats returned no list")?;
    for target in list.iter().filter(|t| t["provider"] == "kvm") {
        for st in target["stats"].as_array().into_iter().flatten() {
            if let (Some(name), Some(v)) = (st["name"].as_str(), st["value"].as_u64()) {
                *m.entry(name.to_string()).or_default() += v;
            }
        }
    }
    if !m.contains_key("exits") {
        return Err("query-stats has no KVM `exits` counter".into());
    }
    Ok(m)
}

/// Sends one QMP command and returns its `return` value (events before it are skipped), or the
/// error QEMU answered with.
pub(crate) fn qmp_command(
    w: &mut impl std::io::Write,
    r: &mut impl std::io::BufRead,
    cmd: &Value,
) -> Result<Value, String> {
    writeln!(w, "{cmd}").map_err(|e| format!("QMP: {e}"))?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| format!("QMP: {e}"))? == 0 {
            return Err("QMP closed the connection".into());
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("QMP: {e}"))?;
        if let Some(ret) = v.get("return") {
            return Ok(ret.clone());
        }
        if let Some(e) = v.get("error") {
            return Err(format!("QMP {}: {e}", cmd["execute"]));
        }
    }
}

/// Asks QEMU's QMP socket for its vCPUs' KVM statistics, then tells QEMU to quit.
pub(crate) fn qmp_stats_and_quit(sock: &Path) -> Result<KvmStats, String> {
    use std::io::BufReader;
    let stream = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| format!("cannot connect to QMP at {}: {e}", sock.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    let mut call = |cmd: Value| qmp_command(&mut w, &mut r, &cmd);
    let result = call(json!({"execute": "qmp_capabilities"}))
        .and_then(|_| call(json!({"execute": "query-stats", "arguments": {"target": "vcpu"}})))
        .and_then(|ret| kvm_stats_of(&ret));
    let _ = call(json!({"execute": "quit"}));
    result
}

/// Boots the same guest under QEMU with the same kind of device (the guest holds at its end, for
/// the statistics); returns its console and QEMU's KVM statistics (or why they are missing).
fn run_qemu(
    qemu: &Path,
    dir: &Path,
    setup: &Setup,
    cmdline: &str,
    timeout: Duration,
) -> Result<(String, Result<KvmStats, String>), String> {
    let (_, elf) =
        crate::kit::get(GUEST).ok_or_else(|| format!("no embedded guest named {GUEST:?}"))?;
    let kernel = dir.join("bench-io.elf");
    std::fs::write(&kernel, elf).map_err(|e| format!("cannot write the guest: {e}"))?;
    let (out, errors, sock) = (
        dir.join("qemu-console.log"),
        dir.join("qemu-stderr.log"),
        dir.join("qmp.sock"),
    );
    let _ = std::fs::remove_file(&sock);
    let out_file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let cmdline = format!("{cmdline} hold");
    let mut child = setup
        .command(qemu)
        .args(qemu_args(&kernel, &setup.qemu_args(), &cmdline))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut stats = Err("the guest never held".to_string());
    let mut held = false;
    while std::time::Instant::now() < deadline {
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        let text = read_lossy(&out);
        if text.contains("kit: io hold") {
            stats = qmp_stats_and_quit(&sock);
            held = true;
            break;
        }
        if text.contains("kit: FAIL") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = if held {
        KILL_GRACE
    } else {
        Duration::from_millis(1)
    };
    let finished =
        wait_with_limit(&mut child, left).map_err(|e| format!("waiting for QEMU: {e}"))?;
    let text = read_lossy(&out);
    let context = || {
        format!(
            "\n  last console lines:\n{}\n  QEMU said:\n{}",
            tail(&text, 8),
            tail(&read_lossy(&errors), 6)
        )
    };
    if let Err(e) = parse(&text) {
        return Err(format!("under QEMU: {e}{}", context()));
    }
    match finished {
        Finished::TimedOut if !held => Err(format!(
            "the bench-io guest under QEMU did not finish within --timeout {} s; killed{}",
            timeout.as_secs_f64(),
            context()
        )),
        Finished::Exited(s) if !s.success() && !held => {
            Err(format!("QEMU failed ({s}){}", context()))
        }
        _ => Ok((text, stats)),
    }
}

/// QEMU's exits during the block workloads: a run's KVM statistics minus the baseline run's, with
/// the console's port exits taken out (two per byte the guest printed: LSR poll and THR write;
/// the runs print different amounts).
#[derive(Clone, Debug, PartialEq)]
pub struct PeerExits {
    /// Every exit KVM counted, in-kernel ones (ioeventfd, interrupts, ...) included.
    pub all: i64,
    pub mmio: i64,
    /// Port I/O exits; `None` where this host's KVM does not count them (PVM reports 0 for
    /// `io_exits` in every run).
    pub io: Option<i64>,
    /// Exits to userspace: MMIO plus port I/O (where counted).
    pub userspace: i64,
    pub requests: u64,
}

impl PeerExits {
    pub fn new(run: &KvmStats, base: &KvmStats, console_bytes: i64, requests: u64) -> PeerExits {
        let get = |m: &KvmStats, k: &str| m.get(k).copied().unwrap_or(0) as i64;
        let d = |k: &str| get(run, k) - get(base, k);
        let console = 2 * console_bytes;
        let io =
            (get(run, "io_exits") + get(base, "io_exits") > 0).then(|| d("io_exits") - console);
        let mmio = d("mmio_exits");
        PeerExits {
            all: d("exits") - console,
            mmio,
            io,
            userspace: mmio + io.unwrap_or(0),
            requests,
        }
    }

    pub fn per_request(&self, n: i64) -> f64 {
        n.max(0) as f64 / self.requests.max(1) as f64
    }
}

/// A network namespace with a tap that is up, deleted (with the tap) on drop.
pub struct Netns {
    pub name: String,
    pub tap: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip ARGS` inside network namespace `ns`.
pub fn netns_ip(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut v = vec!["netns", "exec", ns, "ip"];
    v.extend_from_slice(args);
    ip(&v)
}

impl Netns {
    /// The namespace, or why it cannot be made here.
    pub fn create() -> Result<Netns, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (a network namespace and a tap)".into());
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err("no /dev/net/tun".into());
        }
        let ns = Netns {
            name: format!("exitless-bench-{}", std::process::id()),
            tap: "xlbench0".into(),
        };
        let _ = ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        let inside = |a: &[&str]| {
            let mut v = vec!["netns", "exec", &ns.name, "ip"];
            v.extend_from_slice(a);
            ip(&v)
        };
        inside(&["tuntap", "add", "dev", &ns.tap, "mode", "tap"])?;
        inside(&["link", "set", &ns.tap, "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "exitless: bench: cannot delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// Runs one phase: a baseline run on each VMM, then `rounds` alternating rounds of workload
/// `size` (MiB or frames).
#[allow(clippy::too_many_arguments)]
fn phase(
    what: &str,
    setup: &Setup,
    size: u64,
    qemu: Option<&Path>,
    dir: &Path,
    rounds: u32,
    timeout: Duration,
    progress: &dyn Fn(&str),
) -> Result<Phase, String> {
    progress(&format!("{what}: baseline under exitless (set-up only)"));
    setup.prepare()?;
    let (_, base) = run_exitless(dir, setup, &setup.cmdline(0), timeout)?;
    let mut peer_base = None;
    if let Some(q) = qemu {
        progress(&format!(
            "{what}: baseline under QEMU (its firmware takes a few seconds)"
        ));
        setup.prepare()?;
        let (console, stats) = run_qemu(q, dir, setup, &setup.cmdline(0), timeout)?;
        peer_base = Some((console.len() as i64, stats));
    }
    let cmdline = setup.cmdline(size);
    let (mut ours, mut counters, mut peer, mut peer_exits_all) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        let of = if rounds > 1 {
            format!(" (round {round} of {rounds})")
        } else {
            String::new()
        };
        progress(&format!("{what} under exitless{of}"));
        setup.prepare()?;
        let (console, c) = run_exitless(dir, setup, &cmdline, timeout)?;
        ours.push(parse(&console)?);
        counters.push(c);
        if let (Some(q), Some((base_len, base_stats))) = (qemu, &peer_base) {
            progress(&format!("{what} under QEMU{of}"));
            setup.prepare()?;
            let (console, stats) = run_qemu(q, dir, setup, &cmdline, timeout)?;
            let g = parse(&console)?;
            peer_exits_all.push(match (stats, base_stats.as_ref()) {
                (Ok(s), Ok(b)) => Ok(PeerExits::new(
                    &s,
                    b,
                    console.len() as i64 - base_len,
                    g.requests(),
                )),
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(e.clone()),
            });
            peer.push(g);
        }
    }
    // Exits: the round with the fewest (noise only ever adds exits: timer kicks, signals).
    let peer_exits: PeerExitsSeen = qemu.map(|_| {
        let (ok, err): (Vec<_>, Vec<_>) = peer_exits_all.into_iter().partition(|e| e.is_ok());
        ok.into_iter()
            .flatten()
            .min_by_key(|e| e.userspace)
            .ok_or_else(|| {
                err.into_iter()
                    .find_map(|e| e.err())
                    .unwrap_or_else(|| "no QEMU run".into())
            })
    });
    let exits = counters
        .iter()
        .map(|c| WorkloadExits::new(c, &base))
        .min_by_key(|e| e.exits)
        .ok_or("no run")?;
    // Beyond the baseline (which does the set-up and, for the disk, the flush), the device
    // serves exactly the workloads' requests.
    let expected = ours[0].requests();
    if exits.device_requests != expected {
        eprintln!(
            "exitless: bench: warning: {what}: the device served {} requests beyond the \
             baseline, the guest reported {expected}",
            exits.device_requests
        );
    }
    Ok(Phase {
        ours,
        peer,
        exits,
        peer_exits,
    })
}

/// `exitless bench io`.
pub fn run(args: &IoArgs) -> Result<(), String> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!(
            "--timeout must be a positive number of seconds, not {}",
            args.timeout
        ));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let mib = args
        .mib
        .unwrap_or(if args.quick { QUICK_MIB } else { FULL_MIB });
    if mib == 0 {
        return Err("--mib must be at least 1".into());
    }
    let frames = if args.quick {
        QUICK_FRAMES
    } else {
        FULL_FRAMES
    };
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    let host = crate::host::HostInfo::detect(&kvm);
    let kvm_hz = host_tsc_hz(&kvm, &host);
    drop(kvm);
    let progress = |m: &str| eprintln!("exitless: bench: {m}");
    let qemu = match args.vs {
        Some(Peer::Qemu) => Some(find_program("qemu-system-x86_64").ok_or(
            "--vs qemu needs qemu-system-x86_64, which is not installed: \
             apt-get install qemu-system-x86 (the bench installs nothing itself)",
        )?),
        None => None,
    };
    let peer_note = qemu.as_ref().map(|_| {
        "qemu-system-x86_64 -M q35 -accel kvm, virtio-blk-pci (modern only, cache=writeback, \
         aio=threads) over the same image and virtio-net-pci (modern only, userspace tap \
         backend) over the same tap, same guest ELF"
            .to_string()
    });
    let dir = TempDir::new("exitless-bench-io").map_err(|e| format!("temporary directory: {e}"))?;
    let rounds = args.rounds.max(1);
    let block = Setup::Block {
        image: dir.path().join("scratch.img"),
        bytes: (mib + 1) << 20,
    };
    let block = phase(
        &format!("block, {mib} MiB each way"),
        &block,
        mib,
        qemu.as_deref(),
        dir.path(),
        rounds,
        timeout,
        &progress,
    )?;
    let net = if args.no_net {
        Err("--no-net".to_string())
    } else {
        match Netns::create() {
            Ok(ns) => {
                let setup = Setup::Net {
                    netns: ns.name.clone(),
                    tap: ns.tap.clone(),
                };
                let r = phase(
                    &format!("network, {frames} frames out"),
                    &setup,
                    frames,
                    qemu.as_deref(),
                    dir.path(),
                    rounds,
                    timeout,
                    &progress,
                );
                drop(ns);
                Ok(r?)
            }
            Err(why) => {
                progress(&format!("skipping the network workload: {why}"));
                Err(why)
            }
        }
    };
    let first = block.ours[0].clone();
    let (hz, hz_source) = match kvm_hz {
        Some(h) => (h, "KVM"),
        None => (first.tsc_hz, "guest calibration"),
    };
    let mut rows = block.rows("blk", hz);
    if let Ok(n) = &net {
        rows.extend(n.rows("net", hz));
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&rows, &block, &net, hz, peer_note.as_deref()))
                .expect("JSON")
        );
        return Ok(());
    }
    let header = format!(
        "exitless bench io: {GUEST} guest, 1 vCPU, on {}; TSC {:.1} MHz ({hz_source}); block: \
         {} KiB requests, {} MiB each way, {} in flight, refilled {} at a time, queue of {}; \
         network: {frames} frames of 1514 bytes to a tap in a network namespace, 128 in flight, \
         refilled 32 at a time; EVENT_IDX {}, completions polled at CPL3, interrupts suppressed; \
         best of {rounds} round{}{}",
        if host.is_pvm() {
            "PVM KVM (CPL0 emulated, CPL3 native)"
        } else {
            "KVM"
        },
        hz as f64 / 1e6,
        first.req_bytes >> 10,
        first.mib,
        first.qd,
        first.batch,
        first.queue,
        if first.event_idx { "on" } else { "off" },
        if rounds == 1 { "" } else { "s" },
        peer_note
            .as_ref()
            .map(|p| format!("; peer: {p}"))
            .unwrap_or_else(|| "; no peer (--vs qemu to compare)".into()),
    );
    print!("{}", table(&rows, &block, &net, &header));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(write_cycles: u64) -> String {
        format!(
            "SeaBIOS\nBooting from ROM..kit: io start version=1 tsc_hz=2000000000 mode=quick \
             mib=32 qd=32 batch=8 req_bytes=65536\n\
             kit: io device=blk queue=256 event_idx=1 capacity=67584\n\
             kit: io workload=blk-write requests=512 bytes=33554432 cycles={write_cycles} kicks=5 \
             kicks_suppressed=40 reaps=300 empty_polls=1000 irqs=0\n\
             kit: io note flush cycles=1000\n\
             kit: io workload=blk-read requests=512 bytes=33554432 cycles=100000000 kicks=4 \
             kicks_suppressed=40 reaps=300 empty_polls=1000 irqs=0\n\
             kit: io workload=net-tx unsupported=no-virtio-net-device\n\
             kit: io done workloads=3\nkit: PASS bench-io\n"
        )
    }

    #[test]
    fn parses_a_run_that_starts_mid_line() {
        let r = parse(&console(200_000_000)).unwrap();
        assert_eq!(r.tsc_hz, 2_000_000_000);
        assert_eq!((r.mib, r.qd, r.batch, r.queue), (32, 32, 8, 256));
        assert!(r.event_idx);
        assert_eq!(r.workloads.len(), 2);
        assert_eq!(r.requests(), 1024);
        assert_eq!(r.flush_cycles, Some(1000));
        let w = r.workload("blk-write").unwrap();
        // 32 MiB in 0.1 s.
        assert!((w.mb_s(r.tsc_hz) - 335.5).abs() < 0.1);
        assert_eq!(
            r.unsupported,
            vec![("net-tx".to_string(), "no-virtio-net-device".to_string())]
        );
    }

    #[test]
    fn refuses_failed_incomplete_and_garbled_runs() {
        let good = console(1);
        let e = parse(&good.replace("kit: PASS bench-io", "kit: FAIL bench-io: blk-read: x"))
            .unwrap_err();
        assert!(e.contains("failed") && e.contains("blk-read"), "{e}");
        let e = parse(&good.replace("kit: io done workloads=3\n", "")).unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        let e = parse(&good.replace("done workloads=3", "done workloads=4")).unwrap_err();
        assert!(e.contains("announced 4"), "{e}");
        let e = parse(&good.replace("kicks=5", "kicks=five")).unwrap_err();
        assert!(e.contains("kicks=five"), "{e}");
        let e = parse(&good.replace("version=1", "version=9")).unwrap_err();
        assert!(e.contains("version 9"), "{e}");
        assert!(parse("nothing here").is_err());
    }

    fn report(total: u64, console: u64, mmio: u64, requests: u64, notes: u64) -> Counters {
        Counters::from_report(
            &json!({
                "total_exits": total,
                "exits": {"io_out": console, "mmio_write": mmio},
                "pio_ports": {"0x3f8": console, "0x604": 1},
                "devices": [{"device": "serial", "facts": {}},
                            {"device": "virtio-blk0", "facts": {"requests": requests,
                             "notifications": notes, "interrupts": 0}}],
            }),
            "virtio-blk",
        )
        .unwrap()
    }

    #[test]
    fn workload_exits_are_the_difference_to_the_baseline_without_console_output() {
        let base = report(1000, 900, 99, 1, 1);
        let run = report(1300, 1100, 109, 1025, 11);
        assert_eq!(run.console_exits, 1100);
        let e = WorkloadExits::new(&run, &base);
        assert_eq!(e.device_requests, 1024);
        // 200 exits outside the console against the baseline's 100.
        assert_eq!(e.exits, 100);
        assert_eq!(e.mmio_exits, 10);
        assert_eq!(e.notifications, 10);
        assert!((e.per_request(e.mmio_exits) - 10.0 / 1024.0).abs() < 1e-9);
        assert!(Counters::from_report(&json!({"total_exits": 1}), "virtio-blk").is_err());
    }

    #[test]
    fn all_exits_come_from_the_report_s_kvm_counters_without_the_console() {
        let with_kvm = |total: u64, console: u64, kvm: u64, requests: u64| {
            Counters::from_report(
                &json!({
                    "total_exits": total,
                    "exits": {"io_out": console},
                    "pio_ports": {"0x3f8": console},
                    "kvm": {"exits": kvm, "halt_exits": 3, "io_exits": 0},
                    "devices": [{"device": "virtio-blk0", "facts": {"requests": requests}}],
                }),
                "virtio-blk",
            )
            .unwrap()
        };
        let base = with_kvm(1000, 900, 5000, 1);
        let run = with_kvm(1300, 1100, 5700, 1025);
        assert_eq!(run.kvm_exits, Some(5700));
        let e = WorkloadExits::new(&run, &base);
        // 700 more exits in all, 200 of them the console's.
        assert_eq!(e.all, Some(500));
        assert!((e.per_request(e.all.unwrap()) - 500.0 / 1024.0).abs() < 1e-9);
        // A host without statistics: unknown, not zero.
        let plain = report(1300, 1100, 0, 1025, 0);
        assert_eq!(plain.kvm_exits, None);
        assert_eq!(WorkloadExits::new(&plain, &base).all, None);
        let block = Phase {
            ours: vec![parse(&console(1)).unwrap()],
            peer: vec![],
            exits: e,
            peer_exits: None,
        };
        let rows = block.rows("blk", 1);
        assert_eq!(rows[0].all_exits_per_request, Some(500.0 / 1024.0));
        let skipped = Err("--no-net".to_string());
        let j = to_json(&rows, &block, &skipped, 1, None);
        assert_eq!(j["exitless_block"]["exits_all"], 500);
        assert_eq!(
            j["workloads"][0]["exitless"]["all_exits_per_request"],
            0.48828
        );
        let t = table(&rows, &block, &skipped, "H");
        assert!(t.contains("500 exits in all"), "{t}");
        assert!(t.contains("exits/req (all)"), "{t}");
    }

    #[test]
    fn rows_take_the_best_round_and_the_ratio() {
        let a = parse(&console(200_000_000)).unwrap();
        let b = parse(&console(100_000_000)).unwrap();
        let q = parse(&console(400_000_000)).unwrap();
        let rows = rows(&[a.clone(), b, a], &[q], 2_000_000_000);
        assert_eq!(rows.len(), 2);
        let w = &rows[0];
        assert_eq!(w.workload, "blk-write");
        // 32 MiB in 0.05 s (the best round) and in 0.1 s (the median); QEMU's in 0.2 s.
        assert!((w.ours.best_mb_s - 671.1).abs() < 0.1);
        assert!((w.ours.median_mb_s - 335.5).abs() < 0.1);
        assert!((w.ratio().unwrap() - 4.0).abs() < 1e-9);
        let e = WorkloadExits::new(&report(0, 0, 0, 1025, 0), &report(0, 0, 0, 1, 0));
        let block = Phase {
            ours: vec![parse(&console(1)).unwrap()],
            peer: vec![],
            exits: e.clone(),
            peer_exits: None,
        };
        let rows = block.rows("blk", 1);
        assert_eq!(rows.len(), 2);
        let skipped = Err("needs root".to_string());
        let t = table(&rows, &block, &skipped, "H");
        assert!(t.contains("blk-write") && t.contains("needs root"), "{t}");
        let j = to_json(&rows, &block, &skipped, 1, None);
        assert_eq!(j["workloads"][0]["requests"], 512);
        assert_eq!(j["workloads"][0]["bytes_per_request"], 65536);
        assert_eq!(j["exitless_block"]["device_requests"], 1024);
        assert_eq!(j["unsupported"][0]["workload"], "net-tx");
        assert!(j["exitless_net"].is_null());
        let block = Phase {
            peer_exits: Some(Err("no QMP".to_string())),
            ..block
        };
        assert!(table(&rows, &block, &skipped, "H").contains("unavailable: no QMP"));
        assert_eq!(
            to_json(&rows, &block, &skipped, 1, None)["qemu_block"]["unavailable"],
            "no QMP"
        );
    }

    #[test]
    fn qemu_exits_come_from_query_stats_minus_the_baseline_and_the_console() {
        let answer = |exits: u64, mmio: u64, io: u64| {
            json!([{"provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [
                {"name": "exits", "value": exits}, {"name": "mmio_exits", "value": mmio},
                {"name": "io_exits", "value": io}, {"name": "guest_mode", "value": false},
                {"name": "halt_wait_hist", "value": [0, 1]}]}])
        };
        let base = kvm_stats_of(&answer(6000, 350, 0)).unwrap();
        assert_eq!(base["exits"], 6000);
        // 100 more console bytes (200 exits) and 1024 MMIO exits: one per request.
        let run = kvm_stats_of(&answer(7300, 1374, 0)).unwrap();
        let e = PeerExits::new(&run, &base, 100, 1024);
        assert_eq!((e.all, e.mmio, e.io, e.userspace), (1100, 1024, None, 1024));
        assert!((e.per_request(e.userspace) - 1.0).abs() < 1e-9);
        let e = PeerExits::new(
            &kvm_stats_of(&answer(7300, 350, 1200)).unwrap(),
            &kvm_stats_of(&answer(6000, 350, 900)).unwrap(),
            100,
            1024,
        );
        assert_eq!((e.io, e.userspace), (Some(100), 100));
        assert!(kvm_stats_of(&json!([])).is_err());
    }

    #[test]
    fn qemu_gets_modern_virtio_devices_over_the_same_backends() {
        let blk = Setup::Block {
            image: "/i.img".into(),
            bytes: 1,
        };
        let a = qemu_args(Path::new("/k"), &blk.qemu_args(), "mib=1");
        let s = a.join(" ");
        assert!(
            s.contains("virtio-blk-pci,drive=d0,disable-legacy=on"),
            "{s}"
        );
        assert!(s.contains("file=/i.img,format=raw"), "{s}");
        assert!(s.ends_with("-kernel /k -append mib=1"), "{s}");
        let net = Setup::Net {
            netns: "ns".into(),
            tap: "t0".into(),
        };
        let s = qemu_args(Path::new("/k"), &net.qemu_args(), &net.cmdline(5)).join(" ");
        assert!(s.contains("tap,id=n0,ifname=t0,script=no"), "{s}");
        assert!(
            s.contains("virtio-net-pci,netdev=n0,disable-legacy=on"),
            "{s}"
        );
        assert!(s.ends_with("-append net mib=0 frames=5"), "{s}");
        assert_eq!(net.exitless_args(), ["--net", "tap=t0"]);
        assert_eq!(blk.exitless_args(), ["--disk", "path=/i.img"]);
    }
}
