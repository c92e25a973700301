//! `bench iommu`'s Linux part: Debian's stock kernel (`intel_iommu=on`) with no IOMMU, samecore and
//! sidecore, each strict (caching mode on: Linux then invalidates after every map and unmap, and
//! `iommu.strict=1`) and lazy (caching mode off and `iommu.strict=0`: Linux's flush queue batches
//! the unmaps), and QEMU's `intel-iommu` (off, strict, lazy) in the same run. One boot per
//! configuration runs two workloads from the guest's userspace: **disk**, 4 KiB O_DIRECT reads of
//! its virtio-blk disk (one DMA map and unmap each, the IOMMU's worst case), and **net**, a TCP
//! stream over virtio-net on a tap to the host (`bench irq`'s namespace, peers and guest-side
//! `bench irq-load stream`; `--net-seconds 0` leaves it out). exitless's counts (register exits,
//! invalidation waits, IOTLB hits) are read live around each workload through its API socket.
//! Owns the configurations, the workloads' commands, the rows, their table and JSON. Needs
//! hardware-style KVM (guest userspace), the Debian guest (tools/debian-guest.sh;
//! `$EXITLESS_DEBIAN_GUEST`) and, for the network, root; in the emulated SVM host absolute times
//! are TCG's, only the same-run ratios and the counts mean something.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::super::io::Netns;
use super::super::irq;
use super::super::nested::{initrd_with_exitless, Guest};
use super::super::{find_program, results, round1, round3, TempDir};
use super::IommuArgs;

/// One configuration: the VMM, the IOMMU it emulates and Linux's flush policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub vmm: &'static str,
    pub emulation: &'static str,
    pub strategy: &'static str,
}

impl Config {
    pub fn name(&self) -> String {
        format!("{} {} {}", self.vmm, self.emulation, self.strategy)
    }

    fn strict(&self) -> bool {
        self.strategy == "strict"
    }

    /// The kernel command line's IOMMU words.
    fn cmdline(&self) -> &'static str {
        match (self.emulation, self.strict()) {
            ("none", _) => "",
            (_, true) => "intel_iommu=on iommu.strict=1",
            (_, false) => "intel_iommu=on iommu.strict=0",
        }
    }
}

/// The configurations in table order (QEMU's when it runs).
pub fn configs(qemu: bool) -> Vec<Config> {
    let c = |vmm, emulation, strategy| Config {
        vmm,
        emulation,
        strategy,
    };
    let mut v = vec![c("exitless", "none", "none")];
    for e in ["samecore", "sidecore"] {
        v.push(c("exitless", e, "strict"));
        v.push(c("exitless", e, "lazy"));
    }
    if qemu {
        v.push(c("qemu", "none", "none"));
        v.push(c("qemu", "qemu", "strict"));
        v.push(c("qemu", "qemu", "lazy"));
    }
    v
}

/// What one workload measured in one configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub config: Config,
    /// "disk" or "net".
    pub workload: &'static str,
    pub bytes: u64,
    /// Units of work: 4 KiB reads (disk) or transmitted packets (net).
    pub ops: u64,
    pub seconds: f64,
    /// exitless only: the IOMMU's counts during the workload.
    pub counts: Option<Counts>,
}

impl Row {
    pub fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(1e-3) / 1e6
    }

    /// What one unit of work is.
    pub fn op(&self) -> &'static str {
        match self.workload {
            "disk" => "read",
            _ => "packet",
        }
    }

    fn per_op(&self, n: Option<u64>) -> Option<f64> {
        n.map(|n| n as f64 / self.ops.max(1) as f64)
    }

    pub fn hit_rate(&self) -> Option<f64> {
        let c = self.counts?;
        let n = c.iotlb_hits + c.iotlb_misses;
        (n > 0).then(|| c.iotlb_hits as f64 / n as f64)
    }
}

/// exitless's IOMMU counters (the `iommu` device's live facts).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub register_exits: u64,
    pub qi_waits: u64,
    pub iotlb_hits: u64,
    pub iotlb_misses: u64,
}

impl Counts {
    /// From the API's `stats` reply (`devices` by name).
    pub fn from_stats(reply: &Value) -> Result<Counts, String> {
        let facts = reply["devices"]
            .as_object()
            .and_then(|d| d.iter().find(|(k, _)| k.starts_with("iommu")))
            .map(|(_, f)| f)
            .ok_or_else(|| format!("no iommu device in exitless's stats: {reply}"))?;
        let f = |k: &str| facts[k].as_u64().unwrap_or(0);
        Ok(Counts {
            register_exits: f("register_exits"),
            qi_waits: f("qi_waits"),
            iotlb_hits: f("iotlb_hits"),
            iotlb_misses: f("iotlb_misses"),
        })
    }

    /// What happened between `self` and the later `after`.
    pub fn until(&self, after: &Counts) -> Counts {
        Counts {
            register_exits: after.register_exits.saturating_sub(self.register_exits),
            qi_waits: after.qi_waits.saturating_sub(self.qi_waits),
            iotlb_hits: after.iotlb_hits.saturating_sub(self.iotlb_hits),
            iotlb_misses: after.iotlb_misses.saturating_sub(self.iotlb_misses),
        }
    }
}

/// The same VMM's no-IOMMU row's throughput in the same workload.
fn baseline(rows: &[Row], vmm: &str, workload: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.config.vmm == vmm && r.workload == workload && r.config.emulation == "none")
        .map(Row::mb_s)
}

fn pct(rows: &[Row], r: &Row) -> Option<f64> {
    baseline(rows, r.config.vmm, r.workload).map(|b| 100.0 * r.mb_s() / b)
}

pub fn to_json(rows: &[Row]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            json!({
                "guest": "linux",
                "vmm": r.config.vmm,
                "emulation": r.config.emulation,
                "strategy": r.config.strategy,
                "workload": r.workload,
                "throughput": round3(r.mb_s()),
                "throughput_unit": "MB/s",
                "op": r.op(),
                "ops": r.ops,
                "ops_per_s": round1(r.ops as f64 / r.seconds.max(1e-3)),
                "seconds": round3(r.seconds),
                "pct_of_no_iommu": pct(rows, r).map(round1),
                "map_unmap_cycles": Value::Null,
                "iotlb_hit_rate": r.hit_rate().map(round3),
                "register_exits_per_op": r.per_op(r.counts.map(|c| c.register_exits)).map(round3),
                "invalidation_waits_per_op": r.per_op(r.counts.map(|c| c.qi_waits)).map(round3),
            })
        })
        .collect()
}

pub fn table(rows: &[Row], reads: u64) -> String {
    let mut out = format!(
        "\nLinux guest (Debian, intel_iommu=on), 2 vCPUs; disk: {reads} reads of 4 KiB, O_DIRECT \
         (op = a read); net: a TCP stream of 256-byte writes to the host (op = a transmitted \
         packet); strict = caching mode on + iommu.strict=1, lazy = caching mode off + \
         iommu.strict=0\n\n\
         {:<9} {:<9} {:<7} {:<5} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7}\n",
        "vmm",
        "emulation",
        "policy",
        "work",
        "seconds",
        "MB/s",
        "ops/s",
        "% of off",
        "exits/op",
        "waits/op",
        "IOTLB%"
    );
    let opt = |v: Option<f64>, scale: f64| v.map_or("-".into(), |v| format!("{:.2}", v * scale));
    for r in rows {
        out += &format!(
            "{:<9} {:<9} {:<7} {:<5} {:>8.2} {:>8.2} {:>9.0} {:>9} {:>8} {:>8} {:>7}\n",
            r.config.vmm,
            r.config.emulation,
            r.config.strategy,
            r.workload,
            r.seconds,
            r.mb_s(),
            r.ops as f64 / r.seconds.max(1e-3),
            pct(rows, r).map_or("-".into(), |p| format!("{p:.0}")),
            opt(r.per_op(r.counts.map(|c| c.register_exits)), 1.0),
            opt(r.per_op(r.counts.map(|c| c.qi_waits)), 1.0),
            opt(r.hit_rate(), 100.0),
        );
    }
    out
}

/// The untimed reads before the measurement (not counted either).
pub const WARM_UP: &str = "dd if=/dev/vda of=/dev/null bs=4k count=512 iflag=direct 2>/dev/null";

/// The shell command of one measurement: `reads` timed reads.
pub fn workload(reads: u64) -> String {
    format!(
        "a=$(cut -d' ' -f1 /proc/uptime); \
         dd if=/dev/vda of=/dev/null bs=4k count={reads} iflag=direct 2>/dev/null; \
         b=$(cut -d' ' -f1 /proc/uptime); r t $a $b"
    )
}

/// Seconds between the two uptimes of the `=R= t A B` line.
pub fn seconds(out: &str) -> Option<f64> {
    let v = results(out).remove("t")?;
    let mut it = v.split_whitespace().map(|x| x.parse::<f64>().ok());
    let (a, b) = (it.next()??, it.next()??);
    (b > a).then_some(b - a)
}

/// The shell command of the network measurement: `bench irq`'s TCP stream for `seconds`, with
/// the interface's transmitted packets counted around it (`$d`: the interface that
/// [`irq::net_up_command`] brought up).
pub fn net_workload(seconds: u32) -> String {
    let tx = "$(cat /sys/class/net/$d/statistics/tx_packets)";
    format!(
        "p={tx}; {}; r packets $(({tx} - p))",
        irq::load_command("stream", seconds)
    )
}

/// The network row's bytes, packets and seconds from the stream's `=R=` lines.
pub fn net_result(out: &str) -> Option<(u64, u64, f64)> {
    let r = results(out);
    let n = |k: &str| r.get(k)?.parse::<f64>().ok();
    let (bytes, packets, secs) = (n("work")?, n("packets")?, n("seconds")?);
    (bytes > 0.0 && packets > 0.0 && secs > 0.0).then_some((bytes as u64, packets as u64, secs))
}

fn debian_guest() -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::var("EXITLESS_DEBIAN_GUEST").unwrap_or_else(|_| "images/debian".into());
    let g = Path::new(&dir);
    let (kernel, initrd) = (g.join("vmlinuz"), g.join("initrd-tools.img"));
    for f in [&kernel, &initrd] {
        if !f.exists() {
            return Err(format!(
                "{} is missing (tools/debian-guest.sh; $EXITLESS_DEBIAN_GUEST names the directory)",
                f.display()
            ));
        }
    }
    Ok((kernel, initrd))
}

fn check_host() -> Result<(), String> {
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    if crate::host::HostInfo::detect(&kvm).pvm.is_some() {
        return Err(
            "this host's KVM is PVM, where a Linux guest's userspace does not run: run \
                    it where KVM is hardware-style, e.g. tools/svm-host.sh exitless bench iommu"
                .into(),
        );
    }
    Ok(())
}

/// The network side of the run: a namespace whose tap has the host's address, the host's peers
/// (`bench irq`'s TCP sink), and the guest's initramfs with this binary in it (the load generator).
pub struct Net {
    ns: Netns,
    initrd: PathBuf,
    seconds: u32,
}

impl Net {
    fn new(base_initrd: &Path, dir: &Path, seconds: u32) -> Result<Net, String> {
        let why = |e: String| format!("the network workload: {e} (--net-seconds 0 leaves it out)");
        let ns = irq::host_side().map_err(why)?;
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
        let initrd = dir.join("initrd-net.img");
        initrd_with_exitless(base_initrd, &exe, &initrd)?;
        Ok(Net {
            ns,
            initrd,
            seconds,
        })
    }
}

/// exitless running the configuration: the disk, the tap (with `net`), its API socket.
fn exitless_command(
    c: Config,
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    socket: &Path,
    tap: Option<&str>,
    limit: Duration,
) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| "exitless".into());
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    cmd.args(["--cpus", "2", "--mem", "512M", "--no-summary"]);
    cmd.arg("--disk").arg(format!("path={}", disk.display()));
    cmd.arg("--api-socket").arg(socket);
    cmd.arg("--timeout")
        .arg(format!("{}", 4.0 * limit.as_secs_f64()));
    if let Some(tap) = tap {
        cmd.arg("--net").arg(format!("tap={tap}"));
    }
    if c.emulation != "none" {
        let cm = if c.strict() { "on" } else { "off" };
        cmd.arg("--iommu")
            .arg(format!("mode={},caching-mode={cm}", c.emulation));
        cmd.arg("--cmdline").arg(c.cmdline());
    }
    cmd
}

/// exitless's IOMMU counts now (None: no exitless IOMMU in this configuration).
fn counts(live: bool, socket: &Path) -> Result<Option<Counts>, String> {
    if !live {
        return Ok(None);
    }
    let reply = crate::api::request(socket, &crate::api::Call::Stats)?;
    Counts::from_stats(&reply).map(Some)
}

/// Runs `cmd` in the guest with exitless's counts read around it.
fn counted(
    g: &mut Guest,
    cmd: &str,
    live: bool,
    socket: &Path,
    limit: Duration,
) -> Result<(String, Option<Counts>), String> {
    let before = counts(live, socket)?;
    let out = g.step(cmd, limit)?;
    let after = counts(live, socket)?;
    Ok((out, before.zip(after).map(|(b, a)| b.until(&a))))
}

/// Boots the configuration, runs the workloads, stops the guest.
fn measure(
    c: Config,
    args: &IommuArgs,
    dir: &Path,
    disk: &Path,
    net: Option<&Net>,
    limit: Duration,
) -> Result<Vec<Row>, String> {
    let (kernel, initrd) = debian_guest()?;
    let initrd = net.map_or(initrd, |n| n.initrd.clone());
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let tap = net.map(|n| n.ns.tap.as_str());
    let mut cmd = match c.vmm {
        "exitless" => exitless_command(c, &kernel, &initrd, disk, &socket, tap, limit),
        _ => qemu_command(c, &kernel, &initrd, disk, tap),
    };
    let _ns = net
        .map(|n| irq::in_netns(&mut cmd, &n.ns.name))
        .transpose()?;
    let mut g = Guest::start_command(cmd, &dir.join("stderr.log"))?;
    let live = c.vmm == "exitless" && c.emulation != "none";
    let at = g.wait_for("exitless-guest: nproc=", 0, limit, "boot")?;
    g.wait_for("exitless# ", at, limit, "shell prompt")?;
    g.step("stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }", limit)?;
    g.step(WARM_UP, limit)?;
    let (out, n) = counted(&mut g, &workload(args.reads), live, &socket, limit)?;
    let secs = seconds(&out).ok_or_else(|| format!("{}: no times in {out:?}", c.name()))?;
    let mut rows = vec![Row {
        config: c,
        workload: "disk",
        bytes: args.reads * 4096,
        ops: args.reads,
        seconds: secs,
        counts: n,
    }];
    if let Some(net) = net {
        let net = net_row(&mut g, c, net, live, &socket).map(|r| vec![r]);
        rows.extend(unless_the_peer_failed(c, "net", net)?);
    }
    g.stop();
    for r in &rows {
        // Linux translates every request at a fresh I/O address: walks show translation was on.
        if r.counts.is_some_and(|n| n.iotlb_misses == 0) {
            return Err(format!(
                "{} {}: Linux did not translate through the IOMMU: {:?}",
                c.name(),
                r.workload,
                r.counts
            ));
        }
        eprintln!(
            "exitless: bench iommu: linux {} {}: {:.2} s, {:.2} MB/s",
            c.name(),
            r.workload,
            r.seconds,
            r.mb_s()
        );
    }
    Ok(rows)
}

/// Boots of a configuration whose guest triple-faults before its rows are measured.
const BOOTS: u32 = 3;

/// `measure`, booted again (at most [`BOOTS`] boots, each said on stderr) when exitless reported
/// that the guest triple-faulted: the emulated SVM host's TCG wrecks a nested guest now and then,
/// at random points (the README's "Real KVM on any machine"), and one such boot should not cost
/// the bench its other cells. Any other failure, or a third triple fault, is the result.
fn again_after_triple_faults(
    c: Config,
    mut measure: impl FnMut() -> Result<Vec<Row>, String>,
) -> Result<Vec<Row>, String> {
    let mut boot = 1;
    loop {
        match measure() {
            Err(why) if why.contains("triple-faulted") && boot < BOOTS => {
                eprintln!(
                    "exitless: bench iommu: linux {}: the guest triple-faulted (boot {boot} of at \
                     most {BOOTS}); booting it again:\n{}",
                    c.name(),
                    crate::bench::tail(&why, 6)
                );
                boot += 1;
            }
            other => return other,
        }
    }
}

/// `measured`'s rows, or none when the peer (QEMU) failed them, saying why: the peer's failure
/// is its own, its cells stay empty and the bench goes on. exitless's own failures end the bench.
fn unless_the_peer_failed(
    c: Config,
    workload: &str,
    measured: Result<Vec<Row>, String>,
) -> Result<Vec<Row>, String> {
    match measured {
        Err(why) if c.vmm != "exitless" => {
            eprintln!(
                "exitless: bench iommu: linux {} {workload}: no row, the peer failed:\n{}",
                c.name(),
                crate::bench::tail(&why, 20)
            );
            Ok(Vec::new())
        }
        other => other,
    }
}

/// Brings the guest's network up and runs the stream.
fn net_row(g: &mut Guest, c: Config, net: &Net, live: bool, socket: &Path) -> Result<Row, String> {
    // `bench irq`'s limits: a guest whose stream stalls (QEMU's soft-locked once) ends the step.
    let limit = Duration::from_secs(u64::from(net.seconds) * 20 + 120);
    let out = g.step(&irq::net_up_command(), limit)?;
    if !out.contains("=R= net 0") {
        return Err(format!(
            "{}: the guest's network did not come up: {out}",
            c.name()
        ));
    }
    let (out, n) = counted(g, &net_workload(net.seconds), live, socket, limit)?;
    let (bytes, ops, seconds) = net_result(&out)
        .ok_or_else(|| format!("{}: the stream did not report: {out}", c.name()))?;
    Ok(Row {
        config: c,
        workload: "net",
        bytes,
        ops,
        seconds,
        counts: n,
    })
}

/// QEMU with the same guest, disk and IOMMU policy (`intel-iommu`, caching mode as the policy).
fn qemu_command(
    c: Config,
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    tap: Option<&str>,
) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-smp",
        "2",
        "-m",
        "512M",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
        "-net",
        "none",
        "-vga",
        "none",
    ]);
    cmd.arg("-kernel").arg(kernel).arg("-initrd").arg(initrd);
    cmd.arg("-append").arg(format!(
        "console=ttyS0 reboot=k panic=-1 quiet {}",
        c.cmdline()
    ));
    let iommu = c.emulation == "qemu";
    if iommu {
        let cm = if c.strict() { "on" } else { "off" };
        cmd.args(["-device", &format!("intel-iommu,caching-mode={cm}")]);
    }
    let platform = if iommu { ",iommu_platform=on" } else { "" };
    cmd.arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
        .arg("-device")
        .arg(format!(
            "virtio-blk-pci,drive=d0,disable-legacy=on{platform}"
        ));
    if let Some(tap) = tap {
        cmd.arg("-netdev")
            .arg(format!("tap,id=n0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,romfile=,disable-legacy=on{platform}"
            ));
    }
    cmd
}

/// The Linux part: every configuration once, in one run; the disk rows, then the net rows.
pub fn rows(args: &IommuArgs, limit: Duration) -> Result<Vec<Row>, String> {
    check_host()?;
    let (_, initrd) = debian_guest()?;
    let qemu = !args.no_qemu && find_program("qemu-system-x86_64").is_some();
    if !args.no_qemu && !qemu {
        eprintln!("exitless: bench iommu: no qemu-system-x86_64 on PATH: no QEMU rows");
    }
    let dir = TempDir::new("exitless-bench-iommu-linux").map_err(|e| e.to_string())?;
    let net = match args.net_seconds {
        0 => None,
        s => Some(Net::new(&initrd, dir.path(), s)?),
    };
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| format!("cannot make {}: {e}", disk.display()))?;
    // Boot and the shell's steps in the emulated host take minutes, not the kit's seconds.
    let limit = limit.max(Duration::from_secs(600));
    let mut rows = Vec::new();
    for c in configs(qemu) {
        let measured = again_after_triple_faults(c, || {
            measure(c, args, dir.path(), &disk, net.as_ref(), limit)
        });
        rows.extend(unless_the_peer_failed(c, "disk and net", measured)?);
    }
    rows.sort_by_key(|r| r.workload != "disk");
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vmm: &'static str, emulation: &'static str, workload: &'static str, s: f64) -> Row {
        let exitless = vmm == "exitless" && emulation != "none";
        Row {
            config: Config {
                vmm,
                emulation,
                strategy: if emulation == "none" {
                    "none"
                } else {
                    "strict"
                },
            },
            workload,
            bytes: 4_096_000,
            ops: 1000,
            seconds: s,
            counts: exitless.then_some(Counts {
                register_exits: 2000,
                qi_waits: 3000,
                iotlb_hits: 1,
                iotlb_misses: 3,
            }),
        }
    }

    #[test]
    fn configurations_pair_caching_mode_with_linux_s_flush_policy() {
        let c = configs(true);
        assert_eq!(c.len(), 8);
        assert_eq!(configs(false).len(), 5);
        let strict = c
            .iter()
            .find(|c| c.emulation == "sidecore" && c.strict())
            .unwrap();
        assert_eq!(strict.cmdline(), "intel_iommu=on iommu.strict=1");
        let lazy = c
            .iter()
            .find(|c| c.emulation == "qemu" && !c.strict())
            .unwrap();
        assert_eq!(lazy.cmdline(), "intel_iommu=on iommu.strict=0");
        let (k, i, d) = (Path::new("k"), Path::new("i"), Path::new("d"));
        let q = format!("{:?}", qemu_command(*lazy, k, i, d, Some("tap9")));
        assert!(q.contains("intel-iommu,caching-mode=off"), "{q}");
        assert!(
            q.contains("virtio-blk-pci,drive=d0,disable-legacy=on,iommu_platform=on"),
            "{q}"
        );
        assert!(q.contains("ifname=tap9"), "{q}");
        assert!(
            q.contains("virtio-net-pci,netdev=n0,romfile=,disable-legacy=on,iommu_platform=on"),
            "{q}"
        );
        let off = format!("{:?}", qemu_command(c[5], k, i, d, None));
        assert!(
            !off.contains("intel-iommu") && !off.contains("netdev"),
            "{off}"
        );
        let s = Path::new("s");
        let x = format!(
            "{:?}",
            exitless_command(*strict, k, i, d, s, Some("tap9"), Duration::from_secs(1))
        );
        assert!(
            x.contains("\"mode=sidecore,caching-mode=on\"") && x.contains("\"tap=tap9\""),
            "{x}"
        );
        let x = format!(
            "{:?}",
            exitless_command(c[0], k, i, d, s, None, Duration::from_secs(1))
        );
        assert!(!x.contains("--iommu") && !x.contains("--net"), "{x}");
    }

    #[test]
    fn percentages_are_of_the_same_vmm_s_run_without_iommu_in_the_same_workload() {
        let rows = vec![
            row("exitless", "none", "disk", 1.0),
            row("exitless", "samecore", "disk", 4.0),
            row("exitless", "none", "net", 2.0),
            row("exitless", "samecore", "net", 8.0),
            row("qemu", "none", "disk", 2.0),
            row("qemu", "qemu", "disk", 4.0),
        ];
        let v = to_json(&rows);
        assert_eq!(v[1]["pct_of_no_iommu"], 25.0);
        assert_eq!(v[3]["pct_of_no_iommu"], 25.0);
        assert_eq!(v[5]["pct_of_no_iommu"], 50.0);
        assert_eq!(v[1]["guest"], "linux");
        assert_eq!(v[1]["workload"], "disk");
        assert_eq!(
            (&v[3]["workload"], &v[3]["op"]),
            (&json!("net"), &json!("packet"))
        );
        assert_eq!(v[1]["iotlb_hit_rate"], 0.25);
        assert_eq!(v[1]["register_exits_per_op"], 2.0);
        assert_eq!(v[3]["invalidation_waits_per_op"], 3.0);
        assert_eq!(v[1]["throughput"], 1.024);
        assert!(v[5]["register_exits_per_op"].is_null());
        let t = table(&rows, 1000);
        assert!(t.contains("samecore") && t.contains(" net "), "{t}");
    }

    #[test]
    fn counts_are_the_iommu_s_live_facts_between_two_reads() {
        let at = |w: u64, e: u64| {
            json!({"devices": {"virtio-net": {"requests": 9}, "iommu@0xfed90000": {
                "qi_waits": w, "register_exits": e, "iotlb_hits": 1, "iotlb_misses": w}}})
        };
        let a = Counts::from_stats(&at(10, 4)).unwrap();
        let b = Counts::from_stats(&at(25, 20)).unwrap();
        let d = a.until(&b);
        assert_eq!(
            (d.qi_waits, d.register_exits, d.iotlb_hits, d.iotlb_misses),
            (15, 16, 0, 15)
        );
        assert!(Counts::from_stats(&json!({"devices": {}})).is_err());
    }

    #[test]
    fn a_triple_faulting_guest_is_booted_again_at_most_twice() {
        let c = row("exitless", "samecore", "disk", 1.0).config;
        let tf =
            || Err("the L2 guest's exitless ended\nexitless: vCPU 0 triple-faulted".to_string());
        // Two triple faults, then rows.
        let mut n = 0;
        let r = again_after_triple_faults(c, || {
            n += 1;
            if n < 3 {
                tf()
            } else {
                Ok(vec![row("exitless", "samecore", "disk", 1.0)])
            }
        });
        assert_eq!((r.map(|r| r.len()), n), (Ok(1), 3));
        // Three: the third is the result.
        let mut n = 0;
        let r = again_after_triple_faults(c, || {
            n += 1;
            tf()
        });
        assert!(r.unwrap_err().contains("triple-faulted"));
        assert_eq!(n, 3);
        // Any other failure: no second boot.
        let mut n = 0;
        let r = again_after_triple_faults(c, || {
            n += 1;
            Err("soft lockup".to_string())
        });
        assert_eq!((r, n), (Err("soft lockup".to_string()), 1));
    }

    #[test]
    fn a_failing_peer_leaves_its_cells_empty_and_exitless_s_failure_ends_the_bench() {
        let qemu = row("qemu", "intel-iommu", "disk", 1.0).config;
        let ours = row("exitless", "samecore", "disk", 1.0).config;
        let failed = || Err("soft lockup".to_string());
        assert_eq!(
            unless_the_peer_failed(qemu, "net", failed()).map(|r| r.len()),
            Ok(0)
        );
        assert_eq!(
            unless_the_peer_failed(ours, "net", failed()).map(|r| r.len()),
            Err("soft lockup".to_string())
        );
        let measured = Ok(vec![row("qemu", "intel-iommu", "disk", 1.0)]);
        assert_eq!(
            unless_the_peer_failed(qemu, "disk", measured).map(|r| r.len()),
            Ok(1)
        );
    }

    #[test]
    fn times_come_from_the_uptime_and_stream_lines() {
        assert_eq!(seconds("x\n=R= t 10.50 12.75\n"), Some(2.25));
        assert_eq!(seconds("=R= t 12 10\n"), None);
        assert_eq!(seconds("=R= t 12\n"), None);
        assert!(workload(7).contains("count=7 iflag=direct"));
        let out = "=R= lost 0\n=R= work 25600\n=R= seconds 2.0000\n=R= packets 40\n";
        assert_eq!(net_result(out), Some((25600, 40, 2.0)));
        assert_eq!(
            net_result("=R= work 25600\n=R= seconds 2.0\n=R= packets 0\n"),
            None
        );
        let w = net_workload(3);
        assert!(
            w.contains("irq-load stream") && w.contains("--seconds 3") && w.contains("r packets"),
            "{w}"
        );
    }
}
