//! `exitless bench iommu`: the vIOMMU's cost per DMA, the thesis's Table 2.1 (chapter 2) at small
//! scale, with the kit's `bench-iommu` guest and its own VT-d driver.
//!
//! The guest reads a virtio-blk disk in 4 KiB requests and maps each buffer through the emulated
//! VT-d before the request and unmaps it after, with the thesis's teardown strategies (strict,
//! deferred, optimistic-256, optimistic-4096; see the guest's module doc), under {no IOMMU,
//! samecore, sidecore}. Per cell: throughput (MB/s, and as % of the no-IOMMU run), the guest's
//! map+unmap cycles per request, the guest's reuse rate (optimistic teardown's cache), the VMM's
//! IOTLB hit rate, the invalidation descriptors and waits the guest queued, and the IOMMU register
//! exits per request. The disk is a scratch image whose every 4 KiB block starts with a tag the
//! guest checks, so a wrong translation fails the run instead of measuring it.
//!
//! The kit runs use `caching-mode=off`: the guest's driver then needs no invalidation after a map
//! (a not-present entry is never cached), and the strategies differ only in how they unmap, as in
//! the thesis. Owns: the guest's console protocol, the rows, the table and the JSON; VMs are run
//! through `bench::run_under_exitless`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::{round1, round3, run_under_exitless, TempDir};

pub const GUEST: &str = "bench-iommu";
pub const PROTOCOL_VERSION: u64 = 1;
/// Requests per run: full and `--quick`.
pub const FULL_REQUESTS: u64 = 65_536;
pub const QUICK_REQUESTS: u64 = 4_096;
/// Buffers the guest cycles through (between the two optimistic quotas: 256 cannot keep them all
/// mapped, 4096 can).
pub const BUFS: u64 = 512;
/// 4 KiB blocks of the scratch disk (8 MiB: it stays in the host's page cache).
pub const BLOCKS: u64 = 2048;
const BLOCK: u64 = 4096;
/// The tag of block `n` is `TAG ^ n` in its first 8 bytes (the guest's `TAG`).
pub const TAG: u64 = 0x696f_6d6d_7500_0000;
/// The IOMMU's register pages (both: in sidecore mode page 0 does not trap).
const REGISTER_PAGES: [&str; 2] = ["0xfed90000", "0xfed91000"];

/// Arguments of `exitless bench iommu`.
#[derive(Args, Debug, Clone)]
pub struct IommuArgs {
    /// Print one JSON array (one object per row) on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
    /// The kit guest only, 4096 requests per run (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Requests per kit run (overrides --quick's and the default count).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Time limit of each VM run, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Linux part: 4 KiB O_DIRECT reads per configuration (after 512 untimed ones).
    #[arg(long, default_value_t = LINUX_READS)]
    pub reads: u64,
    /// Linux part: seconds of the network workload (a TCP stream from the guest to the host over
    /// virtio-net on a tap) per configuration, in the same boot as the reads; 0 leaves it out.
    /// Needs root (a network namespace and a tap).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=600))]
    pub net_seconds: u32,
    /// Only the Linux part (no kit guest).
    #[arg(long, conflicts_with = "quick")]
    pub linux_only: bool,
    /// Leave QEMU's intel-iommu out of the Linux part.
    #[arg(long)]
    pub no_qemu: bool,
    /// Boot every cell this many times (cells alternating) and keep each cell's fastest round:
    /// other load on the host only ever slows a run (--quick: 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: Option<u32>,
}

/// The emulation modes and strategies of the kit runs, in table order.
pub const STRATEGIES: [&str; 4] = ["strict", "deferred", "optimistic-256", "optimistic-4096"];

/// The guest's command-line word for a strategy.
fn guest_word(strategy: &str) -> &'static str {
    match strategy {
        "strict" => "strict",
        "deferred" => "deferred",
        "optimistic-256" => "opt256",
        "optimistic-4096" => "opt4096",
        _ => "none",
    }
}

/// What the guest printed for one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KitRun {
    pub tsc_hz: u64,
    pub dmar: bool,
    pub caching_mode: bool,
    /// The `kit: iommu result` fields (requests, bytes, cycles, map_cycles, ...).
    pub result: BTreeMap<String, u64>,
}

impl KitRun {
    pub fn get(&self, k: &str) -> u64 {
        self.result.get(k).copied().unwrap_or(0)
    }

    pub fn mb_s(&self) -> f64 {
        let (bytes, cycles) = (self.get("bytes"), self.get("cycles").max(1));
        bytes as f64 / (cycles as f64 / self.tsc_hz as f64) / 1e6
    }

    pub fn map_unmap_cycles(&self) -> f64 {
        (self.get("map_cycles") + self.get("unmap_cycles")) as f64 / self.get("maps").max(1) as f64
    }
}

fn fields(rest: &str) -> BTreeMap<&str, &str> {
    rest.split_ascii_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

const RESULT_KEYS: [&str; 12] = [
    "requests",
    "bytes",
    "cycles",
    "map_cycles",
    "unmap_cycles",
    "maps",
    "reuses",
    "teardowns",
    "inv_descs",
    "waits",
    "kicks",
    "tsc_hz",
];

/// Parses the guest's console: its start line, its result line, PASS; a failed or incomplete run
/// is an error that says why.
pub fn parse(console: &str) -> Result<KitRun, String> {
    if let Some(l) = console.lines().find(|l| l.contains("kit: FAIL")) {
        return Err(format!("the guest failed: {}", super::clip(l.trim())));
    }
    let line = |tag: &str| {
        console
            .lines()
            .find_map(|l| Some(&l[l.find(tag)? + tag.len()..]))
    };
    let start = line("kit: iommu start ").ok_or("the guest never started its workload")?;
    let s = fields(start);
    if s.get("version").and_then(|v| v.parse().ok()) != Some(PROTOCOL_VERSION) {
        return Err(format!("the guest speaks another protocol: {start:?}"));
    }
    let tsc_hz = s
        .get("tsc_hz")
        .and_then(|v| v.parse().ok())
        .filter(|&h: &u64| h > 0)
        .ok_or("the guest reported no TSC frequency")?;
    let rest = line("kit: iommu result ").ok_or("the guest printed no result")?;
    let f = fields(rest);
    let mut result = BTreeMap::new();
    for k in RESULT_KEYS.iter().filter(|k| **k != "tsc_hz") {
        let v = f
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("the result line lacks {k}: {rest:?}"))?;
        result.insert(k.to_string(), v);
    }
    if !console.contains("kit: PASS bench-iommu") {
        return Err("the guest did not pass".into());
    }
    let run = KitRun {
        tsc_hz,
        dmar: s.get("dmar") == Some(&"1"),
        caching_mode: s.get("caching_mode") == Some(&"1"),
        result,
    };
    if run.get("maps") != run.get("requests") || run.get("cycles") == 0 {
        return Err(format!("inconsistent result: {rest:?}"));
    }
    Ok(run)
}

/// The VMM's side of a run: the IOMMU's facts and the register exits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmmSide {
    pub iommu: BTreeMap<String, u64>,
    pub blk_requests: u64,
    pub register_exits: u64,
}

impl VmmSide {
    pub fn from_report(v: &Value) -> VmmSide {
        let facts = |prefix: &str| -> BTreeMap<String, u64> {
            v["devices"]
                .as_array()
                .and_then(|d| {
                    d.iter()
                        .find(|d| d["device"].as_str().is_some_and(|n| n.starts_with(prefix)))
                })
                .and_then(|d| d["facts"].as_object())
                .map(|o| {
                    o.iter()
                        .filter_map(|(k, n)| Some((k.clone(), n.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        VmmSide {
            iommu: facts("iommu"),
            blk_requests: facts("virtio-blk").get("requests").copied().unwrap_or(0),
            register_exits: REGISTER_PAGES
                .iter()
                .filter_map(|p| v["mmio_pages"][p].as_u64())
                .sum(),
        }
    }

    pub fn fact(&self, k: &str) -> u64 {
        self.iommu.get(k).copied().unwrap_or(0)
    }

    pub fn iotlb_hit_rate(&self) -> Option<f64> {
        let (h, m) = (self.fact("iotlb_hits"), self.fact("iotlb_misses"));
        (h + m > 0).then(|| h as f64 / (h + m) as f64)
    }
}

/// One cell of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub emulation: String,
    pub strategy: String,
    pub run: KitRun,
    pub vmm: VmmSide,
}

impl Row {
    /// Checks that the run did what it says: every request reached the device, through the
    /// IOMMU where there is one, without a fault, each guest wait processed by the VMM.
    pub fn check(&self) -> Result<(), String> {
        let (run, vmm) = (&self.run, &self.vmm);
        let what = format!("{} {}", self.emulation, self.strategy);
        if vmm.blk_requests != run.get("requests") {
            return Err(format!(
                "{what}: the device served {} requests, the guest made {}",
                vmm.blk_requests,
                run.get("requests")
            ));
        }
        if self.emulation == "none" {
            return match run.dmar {
                false => Ok(()),
                true => Err(format!("{what}: the guest found a DMAR")),
            };
        }
        if vmm.fact("translation_enabled") != 1 || vmm.fact("faults") != 0 {
            return Err(format!(
                "{what}: translation off or faults: {:?}",
                vmm.iommu
            ));
        }
        // The set-up's one wait comes on top of the workload's.
        if vmm.fact("qi_waits") != run.get("waits") + 1 {
            return Err(format!(
                "{what}: the guest queued {} waits, the IOMMU processed {}",
                run.get("waits") + 1,
                vmm.fact("qi_waits")
            ));
        }
        Ok(())
    }

    fn per_request(&self, n: u64) -> f64 {
        n as f64 / self.run.get("requests").max(1) as f64
    }

    pub fn reuse_rate(&self) -> f64 {
        self.per_request(self.run.get("reuses"))
    }

    pub fn to_json(&self, baseline_mb_s: Option<f64>) -> Value {
        let mb_s = self.run.mb_s();
        let iommu = self.emulation != "none";
        json!({
            "guest": "kit",
            "emulation": self.emulation,
            "strategy": self.strategy,
            "throughput": round1(mb_s),
            "throughput_unit": "MB/s",
            "pct_of_no_iommu": baseline_mb_s.map(|b| round1(100.0 * mb_s / b)),
            "map_unmap_cycles": round1(self.run.map_unmap_cycles()),
            "iotlb_hit_rate": self.vmm.iotlb_hit_rate().map(round3),
            "reuse_rate": iommu.then(|| round3(self.reuse_rate())),
            "requests": self.run.get("requests"),
            "request_bytes": BLOCK,
            "invalidation_descriptors": self.run.get("inv_descs"),
            "invalidation_waits": self.run.get("waits"),
            "teardowns": self.run.get("teardowns"),
            "vmm_iotlb_invalidations": self.vmm.fact("iotlb_invalidations"),
            "register_exits_per_request": round3(self.per_request(self.vmm.register_exits)),
            "caching_mode": self.run.caching_mode,
        })
    }
}

/// The no-IOMMU run's throughput, the baseline of the percentages.
pub fn baseline(rows: &[Row]) -> Option<f64> {
    rows.iter()
        .find(|r| r.emulation == "none")
        .map(|r| r.run.mb_s())
}

pub fn to_json(rows: &[Row]) -> Value {
    let b = baseline(rows);
    Value::Array(rows.iter().map(|r| r.to_json(b)).collect())
}

/// The full table and the Table 2.1 matrix (% of no IOMMU).
pub fn table(rows: &[Row]) -> String {
    let b = baseline(rows);
    let pct = |r: &Row| b.map_or("-".into(), |b| format!("{:.1}", 100.0 * r.run.mb_s() / b));
    let mut out = String::new();
    if let Some(r) = rows.first() {
        out += &format!(
            "exitless bench iommu: kit guest {GUEST}, virtio-blk reads of 4 KiB, {} requests, \
             {BUFS} buffers in FIFO order, caching-mode=off\n\n",
            r.run.get("requests")
        );
    }
    out += &format!(
        "{:<9} {:<16} {:>8} {:>7} {:>11} {:>7} {:>7} {:>9} {:>7} {:>8}\n",
        "emulation",
        "strategy",
        "MB/s",
        "% none",
        "(un)map cyc",
        "reuse%",
        "IOTLB%",
        "inv descs",
        "waits",
        "exits/rq"
    );
    for r in rows {
        let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v));
        out += &format!(
            "{:<9} {:<16} {:>8.1} {:>7} {:>11.0} {:>7} {:>7} {:>9} {:>7} {:>8.2}\n",
            r.emulation,
            r.strategy,
            r.run.mb_s(),
            pct(r),
            r.run.map_unmap_cycles(),
            opt((r.emulation != "none").then(|| r.reuse_rate())),
            opt(r.vmm.iotlb_hit_rate()),
            r.run.get("inv_descs"),
            r.run.get("waits"),
            r.per_request(r.vmm.register_exits)
        );
    }
    out += "\nTable 2.1 (throughput, % of no IOMMU):\n";
    out += &format!("{:<9}", "");
    for s in STRATEGIES {
        out += &format!(" {s:>16}");
    }
    out += "\n";
    for e in ["samecore", "sidecore"] {
        out += &format!("{e:<9}");
        for s in STRATEGIES {
            let cell = rows
                .iter()
                .find(|r| r.emulation == e && r.strategy == s)
                .map_or("-".into(), pct);
            out += &format!(" {cell:>16}");
        }
        out += "\n";
    }
    out
}

/// Writes the scratch disk: `BLOCKS` blocks of 4 KiB, each starting with its tag.
pub fn write_image(path: &Path) -> Result<(), String> {
    let mut data = vec![0u8; (BLOCKS * BLOCK) as usize];
    for (n, block) in data.chunks_mut(BLOCK as usize).enumerate() {
        block[..8].copy_from_slice(&(TAG ^ n as u64).to_le_bytes());
    }
    std::fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Boots the guest once under `emulation` with `strategy`.
fn run_cell(
    dir: &Path,
    image: &Path,
    emulation: &str,
    strategy: &str,
    requests: u64,
    timeout: Duration,
) -> Result<Row, String> {
    let mut args = vec!["--disk".to_string(), format!("path={}", image.display())];
    if emulation != "none" {
        args.push("--iommu".into());
        args.push(format!("mode={emulation},caching-mode=off"));
    }
    let cmdline = format!(
        "strategy={} requests={requests} bufs={BUFS}",
        guest_word(strategy)
    );
    let (text, report) = run_under_exitless(
        dir,
        GUEST,
        &cmdline,
        &args,
        |p: &Path| Command::new(p),
        timeout,
        |t| parse(t).map(drop),
    )
    .map_err(|e| format!("{emulation} {strategy}: {e}"))?;
    let row = Row {
        emulation: emulation.into(),
        strategy: strategy.into(),
        run: parse(&text)?,
        vmm: VmmSide::from_report(&report),
    };
    row.check()?;
    Ok(row)
}

/// The cells in table order: no IOMMU, then samecore and sidecore with each strategy.
pub fn cells() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("none", "none")];
    for e in ["samecore", "sidecore"] {
        v.extend(STRATEGIES.iter().map(|s| (e, *s)));
    }
    v
}

/// The kit part: every cell `rounds` times, the fastest round of each kept.
pub fn kit_rows(requests: u64, rounds: u32, timeout: Duration) -> Result<Vec<Row>, String> {
    let dir = TempDir::new("exitless-bench-iommu").map_err(|e| e.to_string())?;
    let image = dir.path().join("disk.img");
    write_image(&image)?;
    let mut best: Vec<Option<Row>> = vec![None; cells().len()];
    for _ in 0..rounds {
        for (i, (e, s)) in cells().into_iter().enumerate() {
            let row = run_cell(dir.path(), &image, e, s, requests, timeout)?;
            if best[i]
                .as_ref()
                .is_none_or(|b| row.run.mb_s() > b.run.mb_s())
            {
                best[i] = Some(row);
            }
        }
    }
    Ok(best.into_iter().flatten().collect())
}

pub fn run(args: &IommuArgs) -> Result<(), String> {
    let requests = args.requests.unwrap_or(if args.quick {
        QUICK_REQUESTS
    } else {
        FULL_REQUESTS
    });
    if requests == 0 || args.reads == 0 {
        return Err("--requests and --reads must be at least 1".into());
    }
    let timeout = Duration::from_secs_f64(args.timeout.max(1.0));
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    let rows = match args.linux_only {
        true => Vec::new(),
        false => kit_rows(requests, rounds, timeout)?,
    };
    let linux = match args.quick {
        true => Ok(Vec::new()),
        false => linux::rows(args, timeout),
    };
    if let Err(e) = &linux {
        if args.linux_only {
            return Err(format!("linux: {e}"));
        }
        eprintln!("exitless: bench iommu: the Linux part did not run: {e}");
    }
    let linux = linux.unwrap_or_default();
    if args.json {
        let mut v = match to_json(&rows) {
            Value::Array(v) => v,
            _ => Vec::new(),
        };
        v.extend(linux::to_json(&linux));
        println!("{}", Value::Array(v));
    } else {
        if !rows.is_empty() {
            print!("{}", table(&rows));
        }
        if !linux.is_empty() {
            print!("{}", linux::table(&linux, args.reads));
        }
    }
    Ok(())
}

/// Linux part: 4 KiB O_DIRECT reads per configuration.
pub const LINUX_READS: u64 = 4096;

pub mod linux;

#[cfg(test)]
mod tests {
    use super::*;

    fn console(strategy: &str, waits: u64, reuses: u64, cycles: u64) -> String {
        format!(
            "boot\nkit: iommu start version=1 tsc_hz=1000000000 strategy={strategy} \
             requests=100 qd=32 bufs=512 blocks=2048 dmar=1 caching_mode=0\n\
             kit: iommu result strategy={strategy} requests=100 bytes=409600 cycles={cycles} \
             map_cycles=1000 unmap_cycles=9000 maps=100 reuses={reuses} teardowns=100 \
             inv_descs={waits} waits={waits} kicks=5\nkit: PASS bench-iommu\n"
        )
    }

    fn vmm(waits: u64, hits: u64, misses: u64) -> VmmSide {
        let mut iommu = BTreeMap::new();
        for (k, v) in [
            ("translation_enabled", 1),
            ("faults", 0),
            ("qi_waits", waits),
            ("iotlb_hits", hits),
            ("iotlb_misses", misses),
        ] {
            iommu.insert(k.to_string(), v);
        }
        VmmSide {
            iommu,
            blk_requests: 100,
            register_exits: 200,
        }
    }

    #[test]
    fn parses_a_run_and_derives_throughput_and_cycles() {
        let r = parse(&console("strict", 100, 0, 4_096_000)).unwrap();
        assert_eq!(r.tsc_hz, 1_000_000_000);
        assert!(r.dmar && !r.caching_mode);
        assert_eq!(r.get("waits"), 100);
        // 409600 bytes in 4.096 ms.
        assert!((r.mb_s() - 100.0).abs() < 1e-9);
        assert!((r.map_unmap_cycles() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn refuses_failed_incomplete_and_inconsistent_runs() {
        let good = console("strict", 100, 0, 4_096_000);
        assert!(parse(&format!("{good}kit: FAIL bench-iommu: x\n"))
            .unwrap_err()
            .contains("failed"));
        assert!(parse(&good.replace("kit: PASS bench-iommu", "")).is_err());
        assert!(parse(&good.replace("maps=100", "maps=99")).is_err());
        assert!(parse(&good.replace(" waits=100", "")).is_err());
        assert!(parse(&good.replace("version=1", "version=2")).is_err());
        assert!(parse(&good.replace("tsc_hz=1000000000", "tsc_hz=0")).is_err());
        assert!(parse("kit: iommu start version=1 tsc_hz=5\n").is_err());
    }

    #[test]
    fn a_row_must_match_the_vmm_s_counts() {
        let run = parse(&console("strict", 100, 0, 4_096_000)).unwrap();
        let row = |vmm: VmmSide| Row {
            emulation: "samecore".into(),
            strategy: "strict".into(),
            run: run.clone(),
            vmm,
        };
        row(vmm(101, 1, 1)).check().unwrap();
        assert!(row(vmm(100, 1, 1)).check().is_err(), "a lost wait");
        let mut v = vmm(101, 1, 1);
        v.blk_requests = 99;
        assert!(row(v).check().is_err(), "a lost request");
        let mut v = vmm(101, 1, 1);
        v.iommu.insert("faults".into(), 1);
        assert!(row(v).check().is_err(), "a fault");
        let mut none = row(vmm(0, 0, 0));
        none.emulation = "none".into();
        assert!(none.check().is_err(), "a DMAR without an IOMMU");
        none.run.dmar = false;
        none.check().unwrap();
    }

    #[test]
    fn json_rows_carry_the_issue_s_fields_and_percentages_of_the_baseline() {
        let mut none = Row {
            emulation: "none".into(),
            strategy: "none".into(),
            run: parse(&console("none", 0, 0, 4_096_000)).unwrap(),
            vmm: vmm(0, 0, 0),
        };
        none.run.dmar = false;
        let slow = Row {
            emulation: "samecore".into(),
            strategy: "optimistic-4096".into(),
            run: parse(&console("opt4096", 3, 90, 8_192_000)).unwrap(),
            vmm: vmm(4, 300, 100),
        };
        let v = to_json(&[none, slow.clone()]);
        let r = &v[1];
        for k in [
            "guest",
            "emulation",
            "strategy",
            "throughput",
            "pct_of_no_iommu",
            "map_unmap_cycles",
            "iotlb_hit_rate",
        ] {
            assert!(!r[k].is_null(), "{k} missing in {r}");
        }
        assert_eq!(r["guest"], "kit");
        assert_eq!(r["pct_of_no_iommu"], 50.0);
        assert_eq!(r["iotlb_hit_rate"], 0.75);
        assert_eq!(r["reuse_rate"], 0.9);
        assert_eq!(r["register_exits_per_request"], 2.0);
        assert!(v[0]["reuse_rate"].is_null());
        let t = table(&[slow]);
        assert!(t.contains("optimistic-4096"), "{t}");
    }

    #[test]
    fn the_image_tags_every_block() {
        let d = TempDir::new("exitless-iommu-test").unwrap();
        let p = d.path().join("i");
        write_image(&p).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len() as u64, BLOCKS * BLOCK);
        let at = |n: usize| u64::from_le_bytes(b[n * 4096..n * 4096 + 8].try_into().unwrap());
        assert_eq!(at(0), TAG);
        assert_eq!(at(2047), TAG ^ 2047);
    }
}
