//! `exitless bench vswap`: VSWAPPER's Fig 4.3 and 4.9 at small scale. A Linux guest that
//! believes it has `--guest-mib` of RAM while the host gives the whole VMM `--limit-mib`
//! (`--mem-limit`, a memory cgroup with the host's swap behind it) reads its whole disk
//! sequentially (`dd if=/dev/vda of=/dev/null bs=1M`, the page cache keeping what it can) for
//! `--passes` passes, in three configurations, one after the other in the same run:
//! - `baseline`: the image opened `direct=on` (no host caching, as the thesis's baseline): the
//!   guest's page cache is anonymous memory to the host, swapped out and in;
//! - `balloon`: the same, with the balloon inflated at boot so that the guest itself has only
//!   what the host gives (`--balloon size=`, guest RAM minus the limit's share for the guest),
//!   waiting until the guest's `MemTotal` shows it; the cooperative best case;
//! - `mapper`: `swap-mapper=on` (see `devices::virtio::swap_mapper`): the page cache's pages are
//!   mappings of the image, dropped by reclaim and read back from the image;
//! - `vswapper`: the mapper plus a balloon that never inflates (`--balloon size=0`) but reports
//!   free pages: what the guest frees is dropped, and the reported pages the host had swapped out
//!   are counted as false reads prevented (see `devices::virtio::balloon`).
//!
//! Per configuration: seconds per pass (the guest's `/proc/uptime` around each `dd`), the host's
//! swap reads and writes (`pswpin`/`pswpout` of /proc/vmstat over the passes, in 4 KiB pages:
//! host-wide, so the bench must be the only thing swapping), the image bytes the VMM read from
//! storage (`read_bytes` of /proc/PID/io, which counts swap-ins too, less the swap reads' bytes),
//! the cgroup's major faults (`pgmajfault`) and the
//! mapper's and stale-read facts from the run's report. Ratios within the run: baseline over
//! mapper and mapper over balloon per pass.
//!
//! The host must have swap (e.g. `fallocate -l 1G /swapfile; mkswap /swapfile; swapon
//! /swapfile`, or in the emulated SVM host a `--drive` made swap), cgroup v2 or v1 with the
//! memory controller and root (for `--mem-limit`), and `--dir` on a real disk (on tmpfs the
//! image's page cache is itself swap-backed memory). In the emulated SVM host (absolute times
//! are TCG's, only the ratios mean something):
//! `tools/svm-host.sh --drive data.img --drive swap.img -- sh -c 'mkfs.ext4 -q /dev/vda &&
//! mount /dev/vda /mnt && mkswap /dev/vdb && swapon /dev/vdb && exitless bench vswap --dir /mnt'`.
//!
//! After the passes, in the same guest, a second workload (`fresh-memory`, Fig 4.10's case): a
//! tmpfs file of zeros as large as the disk, i.e. pages written whole. The guest takes them from
//! its page cache; where the host swapped those out, each is swapped in only to be overwritten
//! (*false reads*, the swap-ins of this row), and with the mapper a reclaimed named page is read
//! back from the image before the store copies it. Then `reused-memory`: the file is removed, the
//! guest waits 5 s (Linux reports free blocks ~2 s after they were freed), and writes it again:
//! the pages it takes now are ones it freed, which free-page reporting (`balloon`, `vswapper`)
//! has dropped on the host, so a swapped-out one costs no swap read. Both rows show the
//! balloon's `false_reads_prevented` over the workload (from the control API's live facts).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::nested::Guest;
use super::{results, round1, round3, TempDir};

/// Arguments of `exitless bench vswap`.
#[derive(Args, Debug, Clone)]
pub struct VswapArgs {
    /// Print one JSON array on stdout (an object per configuration) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the guest's disk image (on a real disk, not tmpfs).
    #[arg(long)]
    pub dir: PathBuf,
    /// MiB of RAM the guest believes it has.
    #[arg(long, default_value_t = 512)]
    pub guest_mib: u64,
    /// MiB the host lets the whole VMM use (`--mem-limit`).
    #[arg(long, default_value_t = 160)]
    pub limit_mib: u64,
    /// MiB of the disk the guest reads per pass.
    #[arg(long, default_value_t = 192)]
    pub disk_mib: u64,
    /// Sequential reads of the whole disk per configuration.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub passes: u32,
    /// The configurations, in order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "baseline,balloon,mapper,vswapper"
    )]
    pub configs: Vec<Config>,
    /// Time limit of each guest run, in seconds.
    #[arg(long, default_value_t = 3000.0)]
    pub timeout: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Config {
    Baseline,
    Balloon,
    Mapper,
    Vswapper,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::Balloon => "balloon",
            Config::Mapper => "mapper",
            Config::Vswapper => "vswapper",
        }
    }
}

/// What the guest RAM the limit leaves the guest is (the rest goes to the VMM itself and the
/// guest's kernel image, ~32 MiB measured), for the balloon's size.
const VMM_SHARE_MIB: u64 = 32;

/// One configuration's results.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    pub config: String,
    /// `sequential-read` or `fresh-memory`.
    pub workload: String,
    pub seconds_per_pass: Vec<f64>,
    pub swap_reads: u64,
    pub swap_writes: u64,
    /// Everything the VMM read from storage (`read_bytes`: image reads and swap-ins alike).
    pub storage_bytes_read: Option<u64>,
    /// `storage_bytes_read` less the swap-ins' bytes: what came from the image.
    pub image_bytes_read: Option<u64>,
    pub major_faults: Option<u64>,
    pub mapper_pages: u64,
    pub stale_dropped: u64,
    /// Reported free pages the host had swapped out (None: no balloon).
    pub false_reads_prevented: Option<u64>,
    /// Why the workload did not complete (no times then).
    pub failed: Option<String>,
}

fn check_host(args: &VswapArgs) -> Result<(), String> {
    if !crate::memlimit::host_has_swap() {
        return Err(
            "the host has no swap: the limit would end the guest, not swap it (make one: \
             fallocate -l 1G /swapfile; mkswap /swapfile; swapon /swapfile)"
                .into(),
        );
    }
    let c = std::ffi::CString::new(args.dir.as_os_str().as_encoded_bytes())
        .map_err(|_| "--dir has a NUL byte".to_string())?;
    // SAFETY: statfs writes into the zeroed struct we pass; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "--dir {}: {}",
            args.dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    if matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC) {
        return Err(format!(
            "--dir {} is in memory (tmpfs/ramfs): the image must be on a disk",
            args.dir.display()
        ));
    }
    if args.limit_mib >= args.guest_mib {
        return Err("--limit-mib must be below --guest-mib (that is the point)".into());
    }
    Ok(())
}

/// Writes `mib` MiB of pseudo-random bytes (incompressible, not zero pages) to `path`.
fn make_image(path: &Path, mib: u64) -> Result<(), String> {
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn vmstat(key: &str) -> u64 {
    crate::memlimit::field_of(
        &std::fs::read_to_string("/proc/vmstat").unwrap_or_default(),
        key,
    )
    .unwrap_or(0)
}

fn read_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes: "))
        .and_then(|v| v.trim().parse().ok())
}

/// The `pgmajfault` of exitless's own cgroup (`exitless-PID` under the v2 or v1 root).
fn major_faults(pid: u32) -> Option<u64> {
    let m = crate::memlimit::Mounts::detect();
    let root = m.v2.map(|(r, _)| r).or(m.v1_memory.map(|(r, _)| r))?;
    let stat = std::fs::read_to_string(root.join(format!("exitless-{pid}/memory.stat"))).ok()?;
    crate::memlimit::field_of(&stat, "pgmajfault")
        .or_else(|| crate::memlimit::field_of(&stat, "total_pgmajfault"))
}

fn drop_host_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn guest_args(
    args: &VswapArgs,
    cfg: Config,
    image: &Path,
    report: &Path,
    socket: &Path,
) -> Result<Vec<String>, String> {
    let guest = std::env::var("EXITLESS_DEBIAN_GUEST").unwrap_or_else(|_| "images/debian".into());
    let g = Path::new(&guest);
    for f in ["vmlinuz", "initrd.img"] {
        if !g.join(f).exists() {
            return Err(format!(
                "{} is missing (tools/debian-guest.sh; $EXITLESS_DEBIAN_GUEST names the directory)",
                g.join(f).display()
            ));
        }
    }
    let mut a: Vec<String> = [
        "--kernel",
        &g.join("vmlinuz").to_string_lossy(),
        "--initrd",
        &g.join("initrd.img").to_string_lossy(),
        "--mem",
        &format!("{}M", args.guest_mib),
        "--mem-limit",
        &format!("{}M", args.limit_mib),
        "--timeout",
        &args.timeout.to_string(),
        "--no-summary",
        "--stats-json",
        &report.to_string_lossy(),
        "--api-socket",
        &socket.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let disk = match cfg {
        Config::Baseline | Config::Balloon => format!("path={},direct=on", image.display()),
        Config::Mapper | Config::Vswapper => {
            format!("path={},swap-mapper=on", image.display())
        }
    };
    a.extend(["--disk".to_string(), disk]);
    if cfg == Config::Balloon {
        let guest_share = args.limit_mib.saturating_sub(VMM_SHARE_MIB).max(32);
        a.extend([
            "--balloon".to_string(),
            format!("size={}M", args.guest_mib.saturating_sub(guest_share)),
        ]);
    }
    if cfg == Config::Vswapper {
        a.extend(["--balloon".to_string(), "size=0,reporting=on".to_string()]);
    }
    Ok(a)
}

/// The guest's command that runs `cmd` between two `/proc/uptime` readings and prints them as
/// `=R= pass-N A B` (read back by [`pass_seconds`]).
fn timed_command(cmd: &str, n: u32) -> String {
    format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {cmd}; b=$(cut -d' ' -f1 /proc/uptime); r pass-{n} $a $b"
    )
}

/// Seconds between the two `/proc/uptime` readings of a `=R= pass-N A B` line.
pub fn pass_seconds(console: &str, n: u32) -> Option<f64> {
    let v = results(console).remove(&format!("pass-{n}"))?;
    let mut it = v.split_whitespace().map(|x| x.parse::<f64>().ok());
    let (a, b) = (it.next()??, it.next()??);
    (b >= a).then_some(b - a)
}

fn run_config(
    args: &VswapArgs,
    cfg: Config,
    image: &Path,
    dir: &Path,
) -> Result<Vec<Outcome>, String> {
    let step_limit = Duration::from_secs_f64(args.timeout);
    let report = dir.join(format!("{}.json", cfg.name()));
    let socket = dir.join(format!("{}.sock", cfg.name()));
    drop_host_caches();
    // The shell keeps the device open between passes (`exec 3<`): Linux drops a block device's
    // page cache when its last user closes it, and the point is a guest that caches its disk.
    let mut g = Guest::start(
        &guest_args(args, cfg, image, &report, &socket)?,
        &dir.join(format!("{}.err", cfg.name())),
    )?;
    let at = g.wait_for("exitless-guest: nproc=", 0, step_limit, "boot")?;
    g.wait_for("exitless# ", at, step_limit, "shell prompt")?;
    g.step(
        "stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }; exec 3</dev/vda",
        step_limit,
    )?;
    if cfg == Config::Balloon {
        // The driver inflates after boot: wait until the guest has given the pages back.
        let target_kib = (args.limit_mib.saturating_sub(VMM_SHARE_MIB).max(32) + 64) << 10;
        g.step(
            &format!(
                "for i in $(seq 1 600); do t=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2); \
                 [ \"$t\" -le {target_kib} ] && break; sleep 1; done; r memtotal $t"
            ),
            step_limit,
        )?;
    }
    let pid = g.pid();
    let before = Snapshot::now(pid, &socket);
    let mut seconds = Vec::new();
    for n in 1..=args.passes {
        let out = g.step(
            &timed_command("dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null", n),
            step_limit,
        )?;
        let s = pass_seconds(&out, n)
            .ok_or_else(|| format!("{}: pass {n} printed no times: {out}", cfg.name()))?;
        eprintln!("exitless: bench vswap: {} pass {n}: {s:.2} s", cfg.name());
        seconds.push(s);
    }
    let mut read = Snapshot::now(pid, &socket).since(&before, cfg, "sequential-read", seconds);
    // Fig 4.10's case: fresh memory, written whole (a tmpfs file of zeros), on top of the cached
    // disk: the guest reuses pages the host may have swapped out (false reads: swapped in only to
    // be overwritten) or, with the mapper, reclaimed from the image (read back from it).
    let zeros = timed_command(
        &format!(
            "dd if=/dev/zero of=/fresh/f bs=1M count={} 2>/dev/null",
            args.disk_mib
        ),
        1,
    );
    let before = Snapshot::now(pid, &socket);
    let out = g.step(
        &format!(
            "mkdir -p /fresh && mount -t tmpfs -o size={}m tmpfs /fresh; {zeros}; rm /fresh/f",
            args.disk_mib + 16
        ),
        step_limit,
    );
    let mut fresh = Snapshot::now(pid, &socket).since(&before, cfg, "fresh-memory", Vec::new());
    timed(&mut g, &mut fresh, out);
    // The same again into pages the guest freed 5 s before (reported by then, where a balloon
    // reports): the false reads a preventer saves.
    let mut reused = None;
    if fresh.failed.is_none() {
        let before = Snapshot::now(pid, &socket);
        let out = g.step(&format!("sleep 5; {zeros}; rm /fresh/f"), step_limit);
        let mut o = Snapshot::now(pid, &socket).since(&before, cfg, "reused-memory", Vec::new());
        timed(&mut g, &mut o, out);
        reused = Some(o);
    }
    g.stop();
    if let Ok(text) = std::fs::read_to_string(&report) {
        if let Ok(r) = serde_json::from_str::<Value>(&text) {
            let fact = |k: &str| {
                r["devices"]
                    .as_array()
                    .and_then(|d| d.iter().find(|d| d["device"] == "virtio-blk0"))
                    .and_then(|d| d["facts"][k].as_u64())
                    .unwrap_or(0)
            };
            read.mapper_pages = fact("mapper_pages");
            read.stale_dropped = fact("stale_dropped");
        }
    }
    Ok([read, fresh].into_iter().chain(reused).collect())
}

/// Puts a one-pass workload's time (or why it has none) into its row.
fn timed(g: &mut Guest, o: &mut Outcome, out: Result<String, String>) {
    match out.map(|text| pass_seconds(&text, 1)) {
        Ok(Some(s)) => {
            eprintln!(
                "exitless: bench vswap: {} {}: {s:.2} s",
                o.config, o.workload
            );
            o.seconds_per_pass.push(s);
        }
        // The balloon's guest has too little memory for it (the thesis's balloon crashed on this
        // workload too): a row that says so, not the end of the bench.
        Ok(None) | Err(_) => {
            let console = String::from_utf8_lossy(&g.console()).into_owned();
            let why =
                if console.contains("deadlocked on memory") || console.contains("Out of memory") {
                    "the guest ran out of memory".to_string()
                } else {
                    "the guest did not finish it".to_string()
                };
            eprintln!("exitless: bench vswap: {} {}: {why}", o.config, o.workload);
            o.failed = Some(why);
        }
    }
}

/// The host's counters of one VMM at one moment.
struct Snapshot {
    swap_in: u64,
    swap_out: u64,
    read_bytes: Option<u64>,
    major_faults: Option<u64>,
    false_reads_prevented: Option<u64>,
}

impl Snapshot {
    fn now(pid: u32, socket: &Path) -> Snapshot {
        let stats = crate::api::request(socket, &crate::api::Call::Stats).ok();
        Snapshot {
            swap_in: vmstat("pswpin"),
            swap_out: vmstat("pswpout"),
            read_bytes: read_bytes(pid),
            major_faults: major_faults(pid),
            false_reads_prevented: stats
                .and_then(|s| s["devices"]["virtio-balloon"]["false_reads_prevented"].as_u64()),
        }
    }

    fn since(&self, before: &Snapshot, cfg: Config, workload: &str, seconds: Vec<f64>) -> Outcome {
        let swap_reads = self.swap_in.saturating_sub(before.swap_in);
        let storage = self
            .read_bytes
            .zip(before.read_bytes)
            .map(|(b, a)| b.saturating_sub(a));
        Outcome {
            config: cfg.name().into(),
            workload: workload.into(),
            seconds_per_pass: seconds,
            swap_reads,
            swap_writes: self.swap_out.saturating_sub(before.swap_out),
            storage_bytes_read: storage,
            image_bytes_read: storage.map(|b| b.saturating_sub(swap_reads * 4096)),
            major_faults: self
                .major_faults
                .zip(before.major_faults)
                .map(|(b, a)| b.saturating_sub(a)),
            false_reads_prevented: self
                .false_reads_prevented
                .zip(before.false_reads_prevented)
                .map(|(b, a)| b.saturating_sub(a)),
            ..Outcome::default()
        }
    }
}

pub fn to_json(outcomes: &[Outcome]) -> Value {
    Value::Array(
        outcomes
            .iter()
            .map(|o| {
                json!({
                    "guest": "linux",
                    "workload": o.workload,
                    "config": o.config,
                    "seconds_per_pass": o.seconds_per_pass.iter().map(|&s| round3(s)).collect::<Vec<_>>(),
                    "swap_reads": o.swap_reads,
                    "swap_writes": o.swap_writes,
                    "image_bytes_read": o.image_bytes_read,
                    "storage_bytes_read": o.storage_bytes_read,
                    "major_faults": o.major_faults,
                    "mapper_pages": o.mapper_pages,
                    "stale_dropped": o.stale_dropped,
                    "false_reads_prevented": o.false_reads_prevented,
                    "failed": o.failed,
                })
            })
            .collect(),
    )
}

pub fn table(args: &VswapArgs, outcomes: &[Outcome]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "exitless bench vswap: a {} MiB guest limited to {} MiB reads {} MiB sequentially, {} passes",
        args.guest_mib, args.limit_mib, args.disk_mib, args.passes
    );
    let _ = writeln!(
        t,
        "{:<9} {:<15} {:>20} {:>9} {:>9} {:>10} {:>8} {:>7} {:>8}",
        "config",
        "workload",
        "seconds per pass",
        "swap in",
        "swap out",
        "image MiB",
        "majflt",
        "mapped",
        "fr-prev"
    );
    for o in outcomes {
        let secs: Vec<String> = o
            .seconds_per_pass
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect();
        let secs = if o.failed.is_some() {
            "failed".to_string()
        } else {
            secs.join(" ")
        };
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let _ = writeln!(
            t,
            "{:<9} {:<15} {:>20} {:>9} {:>9} {:>10} {:>8} {:>7} {:>8}",
            o.config,
            o.workload,
            secs,
            o.swap_reads,
            o.swap_writes,
            o.image_bytes_read
                .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
            opt(o.major_faults),
            o.mapper_pages,
            opt(o.false_reads_prevented)
        );
    }
    let by = |n: &str| {
        outcomes
            .iter()
            .find(|o| o.config == n && o.workload == "sequential-read")
    };
    let ratio = |a: &Outcome, b: &Outcome| -> Vec<String> {
        a.seconds_per_pass
            .iter()
            .zip(&b.seconds_per_pass)
            .map(|(x, y)| {
                if *y > 0.0 {
                    format!("{:.2}x", x / y)
                } else {
                    "-".into()
                }
            })
            .collect()
    };
    if let (Some(b), Some(m)) = (by("baseline"), by("mapper")) {
        let _ = writeln!(t, "baseline / mapper per pass: {}", ratio(b, m).join(" "));
    }
    if let (Some(m), Some(b)) = (by("mapper"), by("balloon")) {
        let _ = writeln!(t, "mapper / balloon per pass:  {}", ratio(m, b).join(" "));
    }
    if let (Some(b), Some(v)) = (by("baseline"), by("vswapper")) {
        let _ = writeln!(t, "baseline / vswapper per pass: {}", ratio(b, v).join(" "));
    }
    if let (Some(v), Some(b)) = (by("vswapper"), by("balloon")) {
        let _ = writeln!(t, "vswapper / balloon per pass:  {}", ratio(v, b).join(" "));
    }
    for o in outcomes.iter().filter(|o| o.failed.is_some()) {
        let _ = writeln!(
            t,
            "{} {}: {}",
            o.config,
            o.workload,
            o.failed.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        t,
        "(swap in/out: host pages of 4 KiB; fr-prev: reported free pages the host had swapped \
         out, false reads prevented; times from the guest's clock)"
    );
    let _ = round1;
    t
}

pub fn run(args: &VswapArgs) -> Result<(), String> {
    check_host(args)?;
    let dir =
        TempDir::new("exitless-bench-vswap").map_err(|e| format!("temporary directory: {e}"))?;
    let image = args
        .dir
        .join(format!("exitless-vswap-{}.img", std::process::id()));
    make_image(&image, args.disk_mib)?;
    let mut outcomes = Vec::new();
    let mut err = None;
    for &cfg in &args.configs {
        eprintln!("exitless: bench vswap: {}", cfg.name());
        match run_config(args, cfg, &image, dir.path()) {
            Ok(o) => outcomes.extend(o),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&image);
    if let Some(e) = err {
        return Err(e);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&outcomes)).expect("JSON")
        );
    } else {
        print!("{}", table(args, &outcomes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_timed_from_the_guest_s_uptime() {
        assert_eq!(
            timed_command("dd x", 3),
            "a=$(cut -d' ' -f1 /proc/uptime); dd x; b=$(cut -d' ' -f1 /proc/uptime); \
             r pass-3 $a $b"
        );
        let c = "exitless# \r\n=R= pass-2 100.25 112.75\r\n=R= step-9 done\r\n";
        assert_eq!(pass_seconds(c, 2), Some(12.5));
        assert_eq!(pass_seconds(c, 1), None);
        assert_eq!(pass_seconds("=R= pass-1 5 4\n", 1), None);
    }

    #[test]
    fn json_and_table_carry_every_configuration_and_the_ratios() {
        let o = |c: &str, s: f64| Outcome {
            config: c.into(),
            workload: "sequential-read".into(),
            seconds_per_pass: vec![s, s / 2.0],
            swap_reads: 10,
            swap_writes: 20,
            storage_bytes_read: Some(2 << 20),
            image_bytes_read: Some(1 << 20),
            major_faults: None,
            mapper_pages: 5,
            stale_dropped: 0,
            false_reads_prevented: None,
            failed: None,
        };
        let mut fresh = o("mapper", 1.0);
        fresh.workload = "fresh-memory".into();
        let mut reused = o("vswapper", 1.0);
        reused.workload = "reused-memory".into();
        reused.false_reads_prevented = Some(1234);
        let all = [
            o("baseline", 40.0),
            o("balloon", 4.0),
            fresh,
            o("mapper", 8.0),
            o("vswapper", 10.0),
            reused,
        ];
        let j = to_json(&all);
        assert_eq!(j[0]["guest"], "linux");
        assert_eq!(j[2]["config"], "mapper");
        assert_eq!(j[2]["workload"], "fresh-memory");
        assert_eq!(j[3]["workload"], "sequential-read");
        assert_eq!(j[1]["seconds_per_pass"][1], 2.0);
        assert_eq!(j[0]["major_faults"], Value::Null);
        assert_eq!(j[5]["workload"], "reused-memory");
        assert_eq!(j[5]["false_reads_prevented"], 1234);
        assert_eq!(j[4]["false_reads_prevented"], Value::Null);
        let args = VswapArgs {
            json: false,
            dir: "/x".into(),
            guest_mib: 512,
            limit_mib: 160,
            disk_mib: 192,
            passes: 2,
            configs: vec![],
            timeout: 1.0,
        };
        let t = table(&args, &all);
        assert!(t.contains("baseline / mapper per pass: 5.00x 5.00x"), "{t}");
        assert!(t.contains("mapper / balloon per pass:  2.00x 2.00x"), "{t}");
        assert!(
            t.contains("baseline / vswapper per pass: 4.00x 4.00x"),
            "{t}"
        );
        assert!(
            t.contains("vswapper / balloon per pass:  2.50x 2.50x"),
            "{t}"
        );
        assert!(t.contains("    1234"), "{t}");
    }
}
