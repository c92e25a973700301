//! `exitless bench exits`: what one VM exit costs on this host, by kind, side by side with QEMU.
//!
//! Owns the benchmark end to end:
//! 1. the guest: the kit's `bench` guest (`guests/src/bin/bench.rs`) times each operation with
//!    `rdtsc` and prints `kit: bench ...` lines on COM1; [`parse`] turns them into [`GuestRun`]
//!    and refuses anything malformed, incomplete or failed with a message that says what;
//! 2. exitless's run: `exitless run --guest bench` in a child process (the same VMM path as any
//!    run; stdout stays clean for `--json`, the terminal is left alone, and a hang is killed), with
//!    the console and the exit counters (`--stats-json`) written to a temporary directory;
//! 3. QEMU's run (`--vs qemu`): the very same ELF under `qemu-system-x86_64 -accel kvm`;
//! 4. attribution: which exit each operation produced, from exitless's own counters (the probe
//!    device's facts, exits by reason, port and MMIO page) checked against the operation counts
//!    the guest reports;
//! 5. output: a table, or one JSON array (`--json`), plus exitless's own dispatch cost (the time
//!    from `KVM_RUN` returning to re-entering it, per exit).
//!
//! Cycles are converted to nanoseconds with one TSC frequency for both VMMs (KVM's, else the
//! exitless guest's calibration), so the ratio is a ratio of TSC cycles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::{
    clip, find_program, host_tsc_hz, qemu_args, read_lossy, round1, round3, run_under_exitless,
    tail, wait_with_limit, ExitsArgs, Finished, Peer, TempDir,
};

/// The guest protocol version this parser understands (`kit: bench start version=...`).
pub const PROTOCOL_VERSION: u64 = 1;
/// The one-shot delay of `hlt_timer` in the guest (its samples are the latency beyond it).
const HLT_DELAY_US: u64 = 20;

/// How an operation's exit shows in exitless's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// An exit to userspace with `reason`, counted by the probe device's `fact`.
    User {
        reason: &'static str,
        fact: &'static str,
    },
    /// Completed by an ioeventfd inside KVM: counted by the probe's `fact`; `port` (if any) must
    /// see no userspace exit.
    Eventfd {
        fact: &'static str,
        port: Option<&'static str>,
    },
    /// Handled inside KVM; `leak` is how it would show if it reached userspace.
    Kernel { leak: Leak },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leak {
    Reason(&'static str),
    MmioPage(&'static str),
    Nothing,
}

/// One benchmarked operation.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec {
    pub name: &'static str,
    expect: Expect,
    note: &'static str,
}

const LAPIC_PAGE: &str = "0xfee00000";

const fn user(name: &'static str, reason: &'static str, fact: &'static str) -> OpSpec {
    OpSpec {
        name,
        expect: Expect::User { reason, fact },
        note: "",
    }
}

/// Every operation the guest must report, in table order.
pub const OPS: &[OpSpec] = &[
    OpSpec {
        name: "cpuid",
        expect: Expect::Kernel {
            leak: Leak::Nothing,
        },
        note: "leaf 0; one register load per CPUID",
    },
    OpSpec {
        name: "hypercall",
        expect: Expect::Kernel {
            leak: Leak::Reason("hypercall"),
        },
        note: "unknown number: KVM answers in the kernel",
    },
    user("pio_out", "io_out", "pio_writes"),
    user("pio_in", "io_in", "pio_reads"),
    OpSpec {
        name: "pio_out_ioeventfd",
        expect: Expect::Eventfd {
            fact: "pio_ioeventfd",
            port: Some("0x514"),
        },
        note: "",
    },
    user("mmio_read", "mmio_read", "mmio_reads"),
    user("mmio_write", "mmio_write", "mmio_writes"),
    OpSpec {
        name: "mmio_write_ioeventfd",
        expect: Expect::Eventfd {
            fact: "mmio_ioeventfd",
            port: None,
        },
        note: "",
    },
    OpSpec {
        name: "eoi",
        expect: Expect::Kernel {
            leak: Leak::MmioPage(LAPIC_PAGE),
        },
        note: "LAPIC EOI write (nothing in service)",
    },
    OpSpec {
        name: "tpr",
        expect: Expect::Kernel {
            leak: Leak::MmioPage(LAPIC_PAGE),
        },
        note: "LAPIC TPR write",
    },
    OpSpec {
        name: "ipi_self",
        expect: Expect::Kernel {
            leak: Leak::MmioPage(LAPIC_PAGE),
        },
        note: "ICR write to the handler's first instruction",
    },
    OpSpec {
        name: "hlt_timer",
        expect: Expect::Kernel {
            leak: Leak::Reason("hlt"),
        },
        note: "wake-up beyond a 20 us LAPIC one-shot",
    },
    user("pio_out_user", "io_out", "pio_writes"),
    user("pio_in_user", "io_in", "pio_reads"),
    OpSpec {
        name: "pio_out_ioeventfd_user",
        expect: Expect::Eventfd {
            fact: "pio_ioeventfd",
            port: Some("0x514"),
        },
        note: "",
    },
    user("mmio_read_user", "mmio_read", "mmio_reads"),
    user("mmio_write_user", "mmio_write", "mmio_writes"),
    OpSpec {
        name: "mmio_write_ioeventfd_user",
        expect: Expect::Eventfd {
            fact: "mmio_ioeventfd",
            port: None,
        },
        note: "",
    },
];

/// The userspace PIO/MMIO round trips: the acceptance set (exitless no slower than the peer).
pub const USERSPACE_ROUND_TRIPS: &[&str] = &[
    "pio_out",
    "pio_in",
    "mmio_read",
    "mmio_write",
    "pio_out_user",
    "pio_in_user",
    "mmio_read_user",
    "mmio_write_user",
];

fn spec(name: &str) -> Option<&'static OpSpec> {
    OPS.iter().find(|o| o.name == name)
}

/// One operation's timing, in TSC cycles per operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measure {
    pub cpl: u8,
    /// Operations per timed sample (CPL0 operations are timed in unrolled batches).
    pub batch: u64,
    pub samples: u64,
    /// Every execution, warm-up included (what the exit counters must show).
    pub ops: u64,
    pub p10: u64,
    pub p50: u64,
    pub p90: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Measured(Measure),
    /// The guest could not run it (e.g. `#UD@cpl0`, `skipped`).
    Unsupported(String),
}

/// What a bench guest reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestRun {
    pub tsc_hz: u64,
    pub vendor: String,
    pub mode: String,
    pub ops: BTreeMap<String, Outcome>,
    /// `kit: bench note ...` lines.
    pub notes: Vec<String>,
}

impl GuestRun {
    pub fn measure(&self, op: &str) -> Option<&Measure> {
        match self.ops.get(op) {
            Some(Outcome::Measured(m)) => Some(m),
            _ => None,
        }
    }
}

/// `k=v` pairs of a protocol line (after the keyword); a token without `=` is an error.
fn fields(rest: &str) -> Result<BTreeMap<&str, &str>, String> {
    rest.split_ascii_whitespace()
        .map(|t| {
            t.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{t:?} is not key=value"))
        })
        .collect()
}

fn num(f: &BTreeMap<&str, &str>, key: &str) -> Result<u64, String> {
    let v = f.get(key).ok_or_else(|| format!("no {key}="))?;
    v.parse::<u64>()
        .map_err(|_| format!("{key}={v:?} is not a number"))
}

fn parse_measure(f: &BTreeMap<&str, &str>) -> Result<Measure, String> {
    let m = Measure {
        cpl: match num(f, "cpl")? {
            0 => 0,
            3 => 3,
            c => return Err(format!("cpl={c} is not 0 or 3")),
        },
        batch: num(f, "batch")?,
        samples: num(f, "samples")?,
        ops: num(f, "ops")?,
        p10: num(f, "p10")?,
        p50: num(f, "p50")?,
        p90: num(f, "p90")?,
    };
    if m.batch == 0 || m.samples == 0 {
        return Err("batch and samples must be positive".into());
    }
    if m.ops < m.samples * m.batch {
        return Err(format!(
            "ops={} is fewer than samples x batch = {}",
            m.ops,
            m.samples * m.batch
        ));
    }
    if !(m.p10 <= m.p50 && m.p50 <= m.p90) {
        return Err("percentiles are not ordered (p10 <= p50 <= p90)".into());
    }
    Ok(m)
}

/// Parses a bench guest's console. Lines that are not `kit: ` lines (firmware noise, garbage)
/// are ignored; a malformed `kit: bench` line, a `kit: FAIL`, an unknown or repeated operation,
/// a missing operation or a missing `done` line is an error that says which.
pub fn parse(console: &str) -> Result<GuestRun, String> {
    let mut start: Option<(u64, String, String)> = None;
    let mut ops: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut notes = vec![];
    let mut done: Option<u64> = None;
    for raw in console.lines() {
        // Firmware output may precede a kit line on the same line (no newline before it).
        let Some(at) = raw.find("kit: ") else {
            continue;
        };
        let line = raw[at..].trim_end();
        let bad = |why: String| {
            format!(
                "bad line from the bench guest: {}: {}",
                clip(&why),
                clip(line)
            )
        };
        if line.starts_with("kit: FAIL") {
            return Err(format!("the bench guest failed: {}", clip(line)));
        }
        let Some(rest) = line.strip_prefix("kit: bench ") else {
            continue;
        };
        let (word, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        if done.is_some() && word != "note" {
            return Err(bad("output after the done line".into()));
        }
        match word {
            "start" => {
                if start.is_some() {
                    return Err(bad("a second start line".into()));
                }
                let f = fields(rest).map_err(bad)?;
                let version = num(&f, "version").map_err(bad)?;
                if version != PROTOCOL_VERSION {
                    return Err(bad(format!(
                        "protocol version {version}, this exitless reads {PROTOCOL_VERSION}"
                    )));
                }
                let hz = num(&f, "tsc_hz").map_err(bad)?;
                if !(1_000_000..=100_000_000_000).contains(&hz) {
                    return Err(bad(format!("implausible tsc_hz={hz}")));
                }
                let text = |k: &str| f.get(k).map(|s| s.to_string()).unwrap_or_default();
                start = Some((hz, text("vendor"), text("mode")));
            }
            "note" => notes.push(clip(rest)),
            "done" => {
                let f = fields(rest).map_err(bad)?;
                done = Some(num(&f, "ops").map_err(bad)?);
            }
            w if w.starts_with("op=") => {
                if start.is_none() {
                    return Err(bad("an op line before the start line".into()));
                }
                let f = fields(line.trim_start_matches("kit: bench ")).map_err(bad)?;
                let name = f["op"];
                if spec(name).is_none() {
                    return Err(bad(format!("unknown operation {name:?}")));
                }
                if ops.contains_key(name) {
                    return Err(bad(format!("operation {name} reported twice")));
                }
                let outcome = match f.get("unsupported") {
                    Some(why) => Outcome::Unsupported(clip(why)),
                    None => Outcome::Measured(parse_measure(&f).map_err(bad)?),
                };
                ops.insert(name.to_string(), outcome);
            }
            _ => return Err(bad("unknown keyword".into())),
        }
    }
    let Some((tsc_hz, vendor, mode)) = start else {
        return Err(
            "the guest printed no `kit: bench start` line (not the bench guest, or it died early)"
                .into(),
        );
    };
    let missing: Vec<&str> = OPS
        .iter()
        .map(|o| o.name)
        .filter(|n| !ops.contains_key(*n))
        .collect();
    let Some(n) = done else {
        return Err(format!(
            "the bench guest stopped before its done line; missing: {}",
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        ));
    };
    if !missing.is_empty() {
        return Err(format!(
            "the bench guest did not report: {}",
            missing.join(", ")
        ));
    }
    if n != ops.len() as u64 {
        return Err(format!(
            "the bench guest says it reported {n} operations, exitless read {}",
            ops.len()
        ));
    }
    Ok(GuestRun {
        tsc_hz,
        vendor,
        mode,
        ops,
        notes,
    })
}

/// Per operation, the measurement with the lowest median over `runs` (rounds of the same guest
/// under the same VMM); an operation unsupported in every round stays unsupported. The other
/// fields come from the first run.
pub fn best_of(runs: &[GuestRun]) -> Option<GuestRun> {
    let mut best = runs.first()?.clone();
    for r in &runs[1..] {
        for (name, o) in &r.ops {
            let better = match (best.ops.get(name), o) {
                (Some(Outcome::Measured(b)), Outcome::Measured(m)) => m.p50 < b.p50,
                (_, Outcome::Measured(_)) => true,
                _ => false,
            };
            if better {
                best.ops.insert(name.clone(), o.clone());
            }
        }
    }
    Some(best)
}

/// exitless's exit counters of the bench run (the `--stats-json` report).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub total_exits: u64,
    pub vmm_ns: u64,
    pub exits: BTreeMap<String, u64>,
    pub pio_ports: BTreeMap<String, u64>,
    pub mmio_pages: BTreeMap<String, u64>,
    pub probe: BTreeMap<String, u64>,
    /// Dispatch time by exit reason, when the report has it.
    pub vmm_ns_by_exit: BTreeMap<String, u64>,
    /// KVM's `exits` statistic of the VM (every exit, in-kernel ones included), when the report
    /// has it.
    pub kvm_exits: Option<u64>,
}

impl Counters {
    /// The counters of several runs added up.
    pub fn sum(all: &[Counters]) -> Counters {
        let add = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
            for (k, n) in from {
                *into.entry(k.clone()).or_default() += n;
            }
        };
        let mut t = Counters::default();
        for c in all {
            t.total_exits += c.total_exits;
            t.vmm_ns += c.vmm_ns;
            add(&mut t.exits, &c.exits);
            add(&mut t.pio_ports, &c.pio_ports);
            add(&mut t.mmio_pages, &c.mmio_pages);
            add(&mut t.probe, &c.probe);
            add(&mut t.vmm_ns_by_exit, &c.vmm_ns_by_exit);
        }
        // Known only when every run's report had it.
        t.kvm_exits = all.iter().map(|c| c.kvm_exits).sum();
        t
    }

    pub fn from_report(v: &Value) -> Result<Counters, String> {
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
        let probe = v
            .get("devices")
            .and_then(Value::as_array)
            .and_then(|d| d.iter().find(|d| d["device"] == "probe"))
            .and_then(|d| d.get("facts"))
            .and_then(Value::as_object)
            .ok_or("exitless's report has no probe device facts")?
            .iter()
            .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
            .collect();
        Ok(Counters {
            total_exits: v["total_exits"]
                .as_u64()
                .ok_or("exitless's report has no total_exits")?,
            vmm_ns: v["vmm_ns"].as_u64().unwrap_or(0),
            exits: map("exits"),
            pio_ports: map("pio_ports"),
            mmio_pages: map("mmio_pages"),
            probe,
            vmm_ns_by_exit: map("vmm_ns_by_exit"),
            kvm_exits: v["kvm"]["exits"].as_u64(),
        })
    }
}

/// The exit an operation produced, as exitless's counters show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitSeen {
    /// Completed inside KVM (in-kernel device, ioeventfd): no exit to userspace.
    InKernel,
    /// An exit to userspace with this reason.
    User(String),
    /// The counters do not match what the guest reports (the string says how).
    Unverified(String),
}

/// Checks every operation against the counters; returns the exit of each and warnings.
pub fn attribute(run: &GuestRun, c: &Counters) -> (BTreeMap<String, ExitSeen>, Vec<String>) {
    let mut warnings = vec![];
    let expected = |fact: &str| -> u64 {
        OPS.iter()
            .filter(|o| match o.expect {
                Expect::User { fact: f, .. } | Expect::Eventfd { fact: f, .. } => f == fact,
                Expect::Kernel { .. } => false,
            })
            .filter_map(|o| run.measure(o.name))
            .map(|m| m.ops)
            .sum()
    };
    let fact = |f: &str| c.probe.get(f).copied().unwrap_or(0);
    let mut seen = BTreeMap::new();
    for o in OPS {
        if run.measure(o.name).is_none() {
            continue;
        }
        let s = match o.expect {
            Expect::User { reason, fact: f } => {
                let (want, got) = (expected(f), fact(f));
                if want == got {
                    ExitSeen::User(reason.into())
                } else {
                    ExitSeen::Unverified(format!(
                        "probe {f}={got}, the guest did {want} such operations"
                    ))
                }
            }
            Expect::Eventfd { fact: f, port } => {
                let (want, got) = (expected(f), fact(f));
                let leaked = port.and_then(|p| c.pio_ports.get(p)).copied().unwrap_or(0);
                if leaked > 0 {
                    ExitSeen::Unverified(format!("{leaked} userspace exits on the ioeventfd port"))
                } else if want != got {
                    ExitSeen::Unverified(format!(
                        "ioeventfd {f}={got}, the guest did {want} such operations"
                    ))
                } else {
                    ExitSeen::InKernel
                }
            }
            Expect::Kernel { leak } => match leak {
                Leak::Reason(r) if c.exits.get(r).copied().unwrap_or(0) > 0 => {
                    ExitSeen::User(r.into())
                }
                Leak::MmioPage(p) if c.mmio_pages.get(p).copied().unwrap_or(0) > 0 => {
                    ExitSeen::User("mmio_write".into())
                }
                _ => ExitSeen::InKernel,
            },
        };
        if let ExitSeen::Unverified(why) = &s {
            warnings.push(format!("{}: exit not verified: {why}", o.name));
        }
        seen.insert(o.name.to_string(), s);
    }
    // Every userspace exit should be the probe's, the console's or the power-off's.
    let known_ports: u64 = c
        .pio_ports
        .iter()
        .filter(|(p, _)| {
            u16::from_str_radix(p.trim_start_matches("0x"), 16)
                .map(|p| (0x510..=0x51f).contains(&p) || (0x3f8..=0x3ff).contains(&p) || p == 0x604)
                .unwrap_or(false)
        })
        .map(|(_, n)| n)
        .sum();
    let known = known_ports
        + c.mmio_pages.get("0xf0000000").copied().unwrap_or(0)
        + c.exits.get("interrupted").copied().unwrap_or(0)
        + c.exits.get("system_event").copied().unwrap_or(0);
    if c.total_exits > known {
        warnings.push(format!(
            "{} exits to userspace are neither the probe's nor the console's: {:?}",
            c.total_exits - known,
            c.exits
        ));
    }
    (seen, warnings)
}

/// The exits of several rounds: an operation's exit where every round agrees, else unverified.
pub fn merge_exits(rounds: &[BTreeMap<String, ExitSeen>]) -> BTreeMap<String, ExitSeen> {
    let mut out: BTreeMap<String, ExitSeen> = BTreeMap::new();
    for r in rounds {
        for (op, e) in r {
            match out.get(op) {
                None => {
                    out.insert(op.clone(), e.clone());
                }
                Some(prev) if prev == e => {}
                Some(ExitSeen::Unverified(_)) => {}
                Some(_) => {
                    let why = match e {
                        ExitSeen::Unverified(w) => w.clone(),
                        _ => "rounds disagree".into(),
                    };
                    out.insert(op.clone(), ExitSeen::Unverified(why));
                }
            }
        }
    }
    out
}

/// One row of the result.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub op: String,
    pub ns: Option<f64>,
    pub cycles: Option<u64>,
    pub spread_ns: Option<[f64; 2]>,
    pub exit: Option<ExitSeen>,
    pub peer_ns: Option<f64>,
    pub ratio: Option<f64>,
    pub note: String,
}

impl Row {
    pub fn to_json(&self) -> Value {
        let exit = match &self.exit {
            None | Some(ExitSeen::InKernel) => Value::Null,
            Some(ExitSeen::User(r)) => json!(r),
            Some(ExitSeen::Unverified(_)) => json!("unverified"),
        };
        json!({
            "op": self.op,
            "ns": self.ns,
            "cycles": self.cycles,
            "spread_ns": self.spread_ns,
            "exit": exit,
            "peer_ns": self.peer_ns,
            "ratio": self.ratio,
        })
    }
}

/// Builds the rows: exitless's numbers, the exit seen, and the peer's median where there is one.
pub fn rows(
    ours: &GuestRun,
    exits: &BTreeMap<String, ExitSeen>,
    peer: Option<&GuestRun>,
    tsc_hz: u64,
) -> Vec<Row> {
    let ns = |c: u64| round1(c as f64 * 1e9 / tsc_hz as f64);
    OPS.iter()
        .map(|o| {
            let m = ours.measure(o.name);
            let pm = peer.and_then(|p| p.measure(o.name));
            let mut note = o.note.to_string();
            let mut add = |s: &str| {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str(s);
            };
            if let Some(m) = m {
                if m.batch > 1 {
                    add(&format!("CPL0, mean of batches of {}", m.batch));
                } else if m.cpl == 0 {
                    add("CPL0");
                } else if !o.name.ends_with("_user") {
                    add("issued at CPL3");
                }
            }
            if let Some(Outcome::Unsupported(why)) = ours.ops.get(o.name) {
                add(&format!("not run: {why}"));
            }
            if pm.is_some() && matches!(o.expect, Expect::Eventfd { .. }) {
                add("QEMU has no ioeventfd here: a userspace exit there");
            }
            Row {
                op: o.name.to_string(),
                ns: m.map(|m| ns(m.p50)),
                cycles: m.map(|m| m.p50),
                spread_ns: m.map(|m| [ns(m.p10), ns(m.p90)]),
                exit: m.and_then(|_| exits.get(o.name).cloned()),
                peer_ns: pm.map(|p| ns(p.p50)),
                ratio: m
                    .zip(pm)
                    .filter(|(_, p)| p.p50 > 0)
                    .map(|(m, p)| round3(m.p50 as f64 / p.p50 as f64)),
                note,
            }
        })
        .collect()
}

/// exitless's own dispatch cost (mean ns per exit) overall and for the I/O reasons.
pub fn dispatch(c: &Counters) -> Vec<(String, f64, u64)> {
    let mut v = vec![];
    if c.total_exits > 0 {
        v.push((
            "all".to_string(),
            c.vmm_ns as f64 / c.total_exits as f64,
            c.total_exits,
        ));
    }
    for r in ["io_out", "io_in", "mmio_read", "mmio_write"] {
        if let (Some(ns), Some(n)) = (c.vmm_ns_by_exit.get(r), c.exits.get(r)) {
            if *n > 0 {
                v.push((r.to_string(), *ns as f64 / *n as f64, *n));
            }
        }
    }
    v
}

/// The JSON array: one object per operation, then `vmm_dispatch` (all exits) and
/// `vmm_dispatch_<reason>` for the I/O reasons.
pub fn to_json(rows: &[Row], dispatch: &[(String, f64, u64)], tsc_hz: u64) -> Value {
    let mut a: Vec<Value> = rows.iter().map(Row::to_json).collect();
    for (what, ns, _) in dispatch {
        let op = if what == "all" {
            "vmm_dispatch".to_string()
        } else {
            format!("vmm_dispatch_{what}")
        };
        a.push(json!({
            "op": op,
            "ns": round1(*ns),
            "cycles": (*ns * tsc_hz as f64 / 1e9).round() as u64,
            "spread_ns": null,
            "exit": null,
            "peer_ns": null,
            "ratio": null,
        }));
    }
    Value::Array(a)
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
}

/// The human-readable table (with its header and footer).
pub fn table(
    rows: &[Row],
    dispatch: &[(String, f64, u64)],
    header: &str,
    peer: Option<&str>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{header}");
    let peer_col = peer.map(|p| format!("{p} ns")).unwrap_or_default();
    let _ = writeln!(
        s,
        "{:<26} {:>9} {:>8} {:>17}  {:<10} {:>9} {:>6}  note",
        "op",
        "ns (p50)",
        "cycles",
        "p10-p90 ns",
        "exit",
        if peer.is_some() { &peer_col } else { "peer ns" },
        "ratio"
    );
    for r in rows {
        let spread = r
            .spread_ns
            .map(|[a, b]| format!("{a:.1}-{b:.1}"))
            .unwrap_or_else(|| "-".into());
        let exit = match &r.exit {
            None => "-".to_string(),
            Some(ExitSeen::InKernel) => "in-kernel".into(),
            Some(ExitSeen::User(x)) => x.clone(),
            Some(ExitSeen::Unverified(_)) => "unverified".into(),
        };
        let _ = writeln!(
            s,
            "{:<26} {:>9} {:>8} {:>17}  {:<10} {:>9} {:>6}  {}",
            r.op,
            opt(r.ns),
            r.cycles
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            spread,
            exit,
            opt(r.peer_ns),
            r.ratio
                .map(|x| format!("{x:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.note
        );
    }
    if let Some((_, ns, n)) = dispatch.iter().find(|d| d.0 == "all") {
        let by: Vec<String> = dispatch
            .iter()
            .filter(|d| d.0 != "all")
            .map(|(r, ns, n)| {
                let console = if r == "io_out" {
                    ", console output included"
                } else {
                    ""
                };
                format!("{r} {ns:.0} ns ({n} exits{console})")
            })
            .collect();
        let _ = writeln!(
            s,
            "exitless dispatch (KVM_RUN return to re-entry): {ns:.0} ns per exit, mean of {n} exits{}",
            if by.is_empty() {
                String::new()
            } else {
                format!("; by reason: {}", by.join(", "))
            }
        );
    }
    if let Some(p) = peer {
        let worst = rows
            .iter()
            .filter(|r| USERSPACE_ROUND_TRIPS.contains(&r.op.as_str()))
            .filter_map(|r| r.ratio.map(|x| (x, r.op.as_str())))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((x, op)) = worst {
            let _ = writeln!(
                s,
                "userspace PIO/MMIO round trips: highest exitless/{p} ratio {x:.3} ({op}): {}",
                if x <= 1.0 {
                    format!("exitless is no slower than {p}")
                } else {
                    format!("exitless is slower than {p}")
                }
            );
        }
    }
    s
}

/// What the guest is asked for on its command line.
fn guest_cmdline(quick: bool, cpl3_hypercall: bool) -> String {
    let mut v = vec![];
    if quick {
        v.push("quick");
    }
    if cpl3_hypercall {
        v.push("hypercall=cpl3");
    }
    v.join(" ")
}

/// Boots the bench guest with exitless (this binary, `run`) and returns its console and report.
fn run_exitless(
    dir: &Path,
    guest: &str,
    cmdline: &str,
    timeout: Duration,
) -> Result<(String, Counters), String> {
    let (text, report) = run_under_exitless(
        dir,
        guest,
        cmdline,
        &[],
        |p| Command::new(p),
        timeout,
        |t| parse(t).map(drop),
    )?;
    Ok((text, Counters::from_report(&report)?))
}

/// Boots the same guest under QEMU; returns its console.
fn run_qemu(dir: &Path, guest: &str, cmdline: &str, timeout: Duration) -> Result<String, String> {
    let qemu = find_program("qemu-system-x86_64").ok_or(
        "--vs qemu needs qemu-system-x86_64, which is not installed: \
         apt-get install qemu-system-x86 (the bench installs nothing itself)",
    )?;
    let (_, elf) =
        crate::kit::get(guest).ok_or_else(|| format!("no embedded guest named {guest:?}"))?;
    let kernel = dir.join("bench.elf");
    std::fs::write(&kernel, elf).map_err(|e| format!("cannot write the guest: {e}"))?;
    let (out, errors) = (dir.join("qemu-console.log"), dir.join("qemu-stderr.log"));
    let out_file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&qemu);
    cmd.args(qemu_args(&kernel, &[], cmdline));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let finished =
        wait_with_limit(&mut child, timeout).map_err(|e| format!("waiting for QEMU: {e}"))?;
    let text = read_lossy(&out);
    let context = || {
        format!(
            "\n  last console lines:\n{}\n  QEMU said:\n{}",
            tail(&text, 8),
            tail(&read_lossy(&errors), 6)
        )
    };
    match finished {
        Finished::TimedOut => Err(format!(
            "the bench guest under QEMU did not finish within --timeout {} s (hung?); killed{}",
            timeout.as_secs_f64(),
            context()
        )),
        Finished::Exited(s) if !s.success() => match parse(&text) {
            Err(e) => Err(format!("under QEMU: {e} (QEMU {s}){}", context())),
            Ok(_) => Err(format!("QEMU failed ({s}){}", context())),
        },
        Finished::Exited(_) => {
            parse(&text).map_err(|e| format!("under QEMU: {e}{}", context()))?;
            Ok(text)
        }
    }
}

/// `exitless bench exits`.
pub fn run(args: &ExitsArgs) -> Result<(), String> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!(
            "--timeout must be a positive number of seconds, not {}",
            args.timeout
        ));
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    if crate::kit::get(&args.guest).is_none() {
        return Err(format!("no embedded guest named {:?}", args.guest));
    }
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    let host = crate::host::HostInfo::detect(&kvm);
    // On hosts whose KVM emulates CPL0 code (PVM without VMX/SVM), a CPL0 vmcall/vmmcall never
    // completes (the emulator re-executes it forever), so the guest issues it from CPL3 there.
    let cmdline = guest_cmdline(args.quick, host.is_pvm());
    let kvm_hz = host_tsc_hz(&kvm, &host);
    drop(kvm);
    if args.vs == Some(Peer::Qemu) && find_program("qemu-system-x86_64").is_none() {
        return Err(
            "--vs qemu needs qemu-system-x86_64, which is not installed: \
                    apt-get install qemu-system-x86 (the bench installs nothing itself)"
                .into(),
        );
    }
    let dir = TempDir::new("exitless-bench").map_err(|e| format!("temporary directory: {e}"))?;
    let progress = |m: &str| eprintln!("exitless: bench: {m}");
    let rounds = args.rounds.max(1);
    let (mut ours_all, mut counters_all, mut exits_all, mut peer_all) =
        (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        let of = if rounds > 1 {
            format!(" (round {round} of {rounds})")
        } else {
            String::new()
        };
        progress(&format!("running the bench guest under exitless{of}"));
        let (console, counters) = run_exitless(dir.path(), &args.guest, &cmdline, timeout)?;
        let run = parse(&console)?;
        let (exits, warnings) = attribute(&run, &counters);
        for w in &warnings {
            eprintln!("exitless: bench: warning: {w}");
        }
        ours_all.push(run);
        counters_all.push(counters);
        exits_all.push(exits);
        if args.vs == Some(Peer::Qemu) {
            progress(&format!(
                "running the same guest under QEMU{of} (its firmware takes a few seconds)"
            ));
            peer_all.push(parse(&run_qemu(
                dir.path(),
                &args.guest,
                &cmdline,
                timeout,
            )?)?);
        }
    }
    let ours = best_of(&ours_all).ok_or("no run")?;
    let peer = best_of(&peer_all);
    let counters = Counters::sum(&counters_all);
    let exits = merge_exits(&exits_all);
    let (hz, hz_source) = match kvm_hz {
        Some(h) => (h, "KVM"),
        None => (ours.tsc_hz, "guest calibration"),
    };
    if kvm_hz.is_some() && (ours.tsc_hz as f64 / hz as f64 - 1.0).abs() > 0.05 {
        eprintln!(
            "exitless: bench: warning: the guest calibrated its TSC at {} MHz, KVM says {} MHz",
            ours.tsc_hz / 1_000_000,
            hz / 1_000_000
        );
    }
    let rows = rows(&ours, &exits, peer.as_ref(), hz);
    let disp = dispatch(&counters);
    if let Some(path) = &args.counts {
        let counts = json!({
            "rounds": rounds,
            "kvm_exits": counters.kvm_exits,
            "exits_to_userspace": counters.total_exits,
        });
        std::fs::write(path, format!("{counts}\n"))
            .map_err(|e| format!("--counts {}: {e}", path.display()))?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&rows, &disp, hz)).expect("JSON")
        );
        return Ok(());
    }
    let sizes = |r: &GuestRun| -> String {
        let cpl0 = r.measure("pio_out").map(|m| m.samples).unwrap_or(0);
        let cpl3 = r.measure("pio_out_user").map(|m| m.samples).unwrap_or(0);
        format!("{cpl0} samples per CPL0 op, {cpl3} per CPL3 op")
    };
    let header = format!(
        "exitless bench exits: {} guest on {}, 1 vCPU; TSC {:.1} MHz ({hz_source}); {}; \
         medians and p10-p90 per operation, best of {rounds} round{}{}",
        ours.mode,
        if host.is_pvm() {
            "PVM KVM (CPL0 emulated, CPL3 native)"
        } else {
            "KVM"
        },
        hz as f64 / 1e6,
        sizes(&ours),
        if rounds == 1 { "" } else { "s" },
        if peer.is_some() {
            "; peer: qemu-system-x86_64 -M q35 -accel kvm, same guest ELF"
        } else {
            ""
        }
    );
    print!(
        "{}",
        table(&rows, &disp, &header, peer.as_ref().map(|_| "qemu"))
    );
    println!(
        "notes: CPL0 code is timed in unrolled batches (mean per op); hlt_timer is the wake-up \
         beyond its {HLT_DELAY_US} us one-shot; under QEMU the probe ports are fw_cfg/unassigned \
         and the probe page unassigned MMIO (both userspace exits there)."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_console() -> String {
        let mut s = String::from(
            "SeaBIOS (version x)\nBooting from ROM..kit: bench start version=1 tsc_hz=2000000000 vendor=AuthenticAMD hypercall=vmmcall mode=quick\n",
        );
        for o in OPS {
            let (cpl, batch) = if o.name.ends_with("_user") {
                (3, 1)
            } else {
                (0, 10)
            };
            s.push_str(&format!(
                "kit: bench op={} cpl={cpl} batch={batch} samples=40 ops={} p10=100 p50=200 p90=300\r\n",
                o.name,
                44 * batch
            ));
        }
        s.push_str(&format!(
            "kit: bench note hypercall returned 0x1\nkit: bench done ops={}\nkit: PASS bench\n",
            OPS.len()
        ));
        s
    }

    #[test]
    fn parses_a_complete_run_among_noise() {
        let r = parse(&good_console()).unwrap();
        assert_eq!(r.tsc_hz, 2_000_000_000);
        assert_eq!(r.vendor, "AuthenticAMD");
        assert_eq!(r.ops.len(), OPS.len());
        let m = r.measure("pio_out").unwrap();
        assert_eq!((m.cpl, m.batch, m.ops, m.p50), (0, 10, 440, 200));
        assert_eq!(r.notes, vec!["hypercall returned 0x1".to_string()]);
    }

    #[test]
    fn refuses_garbage_with_a_reason() {
        let good = good_console();
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "no `kit: bench start`"),
            ("\u{0}\u{1b}[2J random bytes \u{fffd}\n".repeat(50), "no `kit: bench start`"),
            (good.replace("p50=200", "p50=2x0"), "is not a number"),
            (good.replace("p50=200", "p50=400"), "not ordered"),
            (good.replace(" p90=300", ""), "no p90="),
            (good.replace("op=cpuid", "op=cpuidx"), "unknown operation"),
            (good.replace("version=1", "version=9"), "protocol version 9"),
            (good.replace("tsc_hz=2000000000", "tsc_hz=0"), "implausible"),
            (good.replace("kit: bench done", "kit: bench dnoe"), "unknown keyword"),
            (
                good.replace("kit: bench done ops=18\n", ""),
                "stopped before its done line",
            ),
            (
                good.replace("kit: bench op=tpr", "kit: bench nope=1 op=tpr"),
                "unknown keyword",
            ),
            (
                good.replace("kit: bench op=eoi", "xx\nkit: bench op=tpr cpl=0 batch=1 samples=1 ops=1 p10=1 p50=1 p90=1\nkit: bench op=eoi"),
                "reported twice",
            ),
            (
                good.replace("kit: PASS bench", "kit: bench op=eoi garbage"),
                "output after the done line",
            ),
            (good.replace("kit: PASS bench", "kit: FAIL bench: exception 13"), "guest failed"),
            (good.replace("ops=440", "ops=4"), "fewer than samples"),
            (good.replace("samples=40", "samples=0"), "must be positive"),
            (good.replace("cpl=0", "cpl=2"), "not 0 or 3"),
            (good.replace("op=cpuid cpl", "op=cpuid junk cpl"), "not key=value"),
            (good.replace("done ops=18", "done ops=17"), "says it reported 17"),
        ];
        for (text, want) in cases {
            let e = parse(&text).expect_err(want);
            assert!(e.contains(want), "want {want:?}, got {e:?}");
        }
        // A missing op (and the done count adjusted) is named.
        let mut no_tpr: String = good
            .lines()
            .filter(|l| !l.contains("op=tpr "))
            .map(|l| format!("{l}\n"))
            .collect();
        no_tpr = no_tpr.replace("done ops=18", "done ops=17");
        let e = parse(&no_tpr).unwrap_err();
        assert!(e.contains("did not report: tpr"), "{e}");
        // A truncated run (a hang) names what is missing.
        let cut = &good[..good.find("kit: bench op=eoi").unwrap()];
        let e = parse(cut).unwrap_err();
        assert!(e.contains("missing: eoi, tpr"), "{e}");
        // Unsupported operations are accepted.
        let un = good.replace(
            "op=hypercall cpl=0 batch=10 samples=40 ops=440 p10=100 p50=200 p90=300",
            "op=hypercall unsupported=#UD@cpl0",
        );
        let r = parse(&un).unwrap();
        assert_eq!(r.ops["hypercall"], Outcome::Unsupported("#UD@cpl0".into()));
        // Huge garbage lines are clipped in messages.
        let long = good.replace("op=cpuid", &format!("op=cpuid{}", "z".repeat(10_000)));
        assert!(parse(&long).unwrap_err().len() < 400);
    }

    fn counters_for(run: &GuestRun) -> Counters {
        let sum = |names: &[&str]| -> u64 {
            names
                .iter()
                .map(|n| run.measure(n).map(|m| m.ops).unwrap_or(0))
                .sum()
        };
        let probe = BTreeMap::from([
            ("pio_writes".into(), sum(&["pio_out", "pio_out_user"])),
            ("pio_reads".into(), sum(&["pio_in", "pio_in_user"])),
            ("mmio_reads".into(), sum(&["mmio_read", "mmio_read_user"])),
            (
                "mmio_writes".into(),
                sum(&["mmio_write", "mmio_write_user"]),
            ),
            (
                "pio_ioeventfd".into(),
                sum(&["pio_out_ioeventfd", "pio_out_ioeventfd_user"]),
            ),
            (
                "mmio_ioeventfd".into(),
                sum(&["mmio_write_ioeventfd", "mmio_write_ioeventfd_user"]),
            ),
        ]);
        let pio = probe["pio_writes"] + probe["pio_reads"];
        let mmio = probe["mmio_writes"] + probe["mmio_reads"];
        Counters {
            total_exits: pio + mmio + 10,
            vmm_ns: 1000 * (pio + mmio + 10),
            exits: BTreeMap::from([
                ("io_out".into(), probe["pio_writes"] + 5),
                ("io_in".into(), probe["pio_reads"] + 5),
                ("mmio_read".into(), probe["mmio_reads"]),
                ("mmio_write".into(), probe["mmio_writes"]),
            ]),
            pio_ports: BTreeMap::from([
                ("0x510".into(), pio),
                ("0x3f8".into(), 5),
                ("0x3fd".into(), 5),
            ]),
            mmio_pages: BTreeMap::from([("0xf0000000".into(), mmio)]),
            probe,
            vmm_ns_by_exit: BTreeMap::from([("mmio_read".into(), 500 * probe_mmio_reads(run))]),
            kvm_exits: Some(pio + mmio + 500),
        }
    }

    #[test]
    fn kvm_exits_add_up_only_when_every_run_has_them() {
        let a = Counters {
            kvm_exits: Some(7),
            ..Counters::default()
        };
        let b = Counters {
            kvm_exits: Some(5),
            ..Counters::default()
        };
        assert_eq!(Counters::sum(&[a.clone(), b]).kvm_exits, Some(12));
        assert_eq!(Counters::sum(&[a, Counters::default()]).kvm_exits, None);
        let report = json!({"total_exits": 3, "kvm": {"exits": 42},
            "devices": [{"device": "probe", "facts": {}}]});
        assert_eq!(Counters::from_report(&report).unwrap().kvm_exits, Some(42));
    }

    fn probe_mmio_reads(run: &GuestRun) -> u64 {
        ["mmio_read", "mmio_read_user"]
            .iter()
            .map(|n| run.measure(n).unwrap().ops)
            .sum()
    }

    #[test]
    fn attributes_exits_from_the_counters() {
        let run = parse(&good_console()).unwrap();
        let c = counters_for(&run);
        let (seen, warnings) = attribute(&run, &c);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(seen["pio_out"], ExitSeen::User("io_out".into()));
        assert_eq!(seen["mmio_read_user"], ExitSeen::User("mmio_read".into()));
        assert_eq!(seen["pio_out_ioeventfd"], ExitSeen::InKernel);
        assert_eq!(seen["cpuid"], ExitSeen::InKernel);
        assert_eq!(seen["hlt_timer"], ExitSeen::InKernel);

        let mut leaky = c.clone();
        leaky.pio_ports.insert("0x514".into(), 3);
        leaky.total_exits += 3;
        *leaky.probe.get_mut("pio_writes").unwrap() += 1;
        leaky.exits.insert("hlt".into(), 2);
        leaky.total_exits += 2;
        let (seen, warnings) = attribute(&run, &leaky);
        assert!(matches!(seen["pio_out_ioeventfd"], ExitSeen::Unverified(_)));
        assert!(matches!(seen["pio_out"], ExitSeen::Unverified(_)));
        assert_eq!(seen["hlt_timer"], ExitSeen::User("hlt".into()));
        assert!(warnings.iter().any(|w| w.contains("neither the probe")));

        let rows = rows(&run, &attribute(&run, &c).0, Some(&run), 2_000_000_000);
        assert_eq!(rows.len(), OPS.len());
        let r = &rows[2];
        assert_eq!(r.op, "pio_out");
        assert_eq!(
            (r.ns, r.cycles, r.ratio),
            (Some(100.0), Some(200), Some(1.0))
        );
        assert_eq!(r.spread_ns, Some([50.0, 150.0]));
        let d = dispatch(&c);
        assert_eq!(d[0].0, "all");
        assert!((d[0].1 - 1000.0).abs() < 1e-9);
        assert_eq!(d[1].0, "mmio_read");
        let j = to_json(&rows, &d, 2_000_000_000);
        let a = j.as_array().unwrap();
        assert_eq!(a.len(), OPS.len() + 2);
        for o in a {
            for k in [
                "op",
                "ns",
                "cycles",
                "spread_ns",
                "exit",
                "peer_ns",
                "ratio",
            ] {
                assert!(o.get(k).is_some(), "{k} missing in {o}");
            }
        }
        assert_eq!(a[2]["exit"], "io_out");
        assert_eq!(a[0]["exit"], Value::Null);
        assert_eq!(a[OPS.len()]["op"], "vmm_dispatch");
        assert_eq!(a[OPS.len()]["cycles"], 2000);
        let t = table(&rows, &d, "header", Some("qemu"));
        assert!(t.contains("pio_out_ioeventfd"), "{t}");
        assert!(t.contains("QEMU has no ioeventfd"), "{t}");
        assert!(t.contains("exitless is no slower than qemu"), "{t}");
        assert!(t.contains("exitless dispatch"), "{t}");
    }

    #[test]
    fn guest_command_lines() {
        assert_eq!(guest_cmdline(false, false), "");
        assert_eq!(guest_cmdline(true, true), "quick hypercall=cpl3");
        assert!(OPS
            .iter()
            .all(|o| o.name.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        for n in USERSPACE_ROUND_TRIPS {
            assert!(spec(n).is_some());
        }
    }
}
