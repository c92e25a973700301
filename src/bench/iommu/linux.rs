//! `bench iommu`'s Linux part: Debian's stock kernel (`intel_iommu=on`) reads its virtio-blk disk
//! from userspace in 4 KiB O_DIRECT requests (one DMA map and unmap each, the IOMMU's worst case)
//! with no IOMMU, samecore and sidecore, each strict (caching mode on: Linux then invalidates
//! after every map and unmap, and `iommu.strict=1`) and lazy (caching mode off and
//! `iommu.strict=0`: Linux's flush queue batches the unmaps), and QEMU's `intel-iommu` (off,
//! strict, lazy) in the same run. Needs hardware-style KVM (guest userspace) and the Debian guest
//! (tools/debian-guest.sh; `$EXITLESS_DEBIAN_GUEST`); in the emulated SVM host absolute times are
//! TCG's, only the same-run ratios and the counts mean something.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::super::nested::Guest;
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

/// What one configuration measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub config: Config,
    pub reads: u64,
    pub seconds: f64,
    /// exitless only: the IOMMU's facts and its register exits.
    pub register_exits: Option<u64>,
    pub qi_waits: Option<u64>,
    pub iotlb_hits: Option<(u64, u64)>,
}

impl Row {
    pub fn mb_s(&self) -> f64 {
        (self.reads * 4096) as f64 / self.seconds.max(1e-3) / 1e6
    }

    fn per_read(&self, n: Option<u64>) -> Option<f64> {
        n.map(|n| n as f64 / self.reads.max(1) as f64)
    }

    pub fn hit_rate(&self) -> Option<f64> {
        let (h, m) = self.iotlb_hits?;
        (h + m > 0).then(|| h as f64 / (h + m) as f64)
    }
}

/// The same VMM's no-IOMMU row's throughput.
fn baseline(rows: &[Row], vmm: &str) -> Option<f64> {
    rows.iter()
        .find(|r| r.config.vmm == vmm && r.config.emulation == "none")
        .map(Row::mb_s)
}

pub fn to_json(rows: &[Row]) -> Vec<Value> {
    rows.iter()
        .map(|r| {
            let base = baseline(rows, r.config.vmm);
            json!({
                "guest": "linux",
                "vmm": r.config.vmm,
                "emulation": r.config.emulation,
                "strategy": r.config.strategy,
                "throughput": round3(r.mb_s()),
                "throughput_unit": "MB/s",
                "reads": r.reads,
                "seconds": round3(r.seconds),
                "pct_of_no_iommu": base.map(|b| round1(100.0 * r.mb_s() / b)),
                "map_unmap_cycles": Value::Null,
                "iotlb_hit_rate": r.hit_rate().map(round3),
                "register_exits_per_read": r.per_read(r.register_exits).map(round3),
                "invalidation_waits_per_read": r.per_read(r.qi_waits).map(round3),
            })
        })
        .collect()
}

pub fn table(rows: &[Row], reads: u64) -> String {
    let mut out = format!(
        "\nLinux guest (Debian, intel_iommu=on): {reads} reads of 4 KiB, O_DIRECT, 2 vCPUs; \
         strict = caching mode on + iommu.strict=1, lazy = caching mode off + iommu.strict=0\n\n\
         {:<9} {:<9} {:<7} {:>8} {:>9} {:>9} {:>10} {:>10} {:>7}\n",
        "vmm",
        "emulation",
        "policy",
        "seconds",
        "reads/s",
        "% of off",
        "exits/read",
        "waits/read",
        "IOTLB%"
    );
    let opt = |v: Option<f64>, scale: f64| v.map_or("-".into(), |v| format!("{:.2}", v * scale));
    for r in rows {
        let pct = baseline(rows, r.config.vmm).map(|b| 100.0 * r.mb_s() / b);
        out += &format!(
            "{:<9} {:<9} {:<7} {:>8.2} {:>9.0} {:>9} {:>10} {:>10} {:>7}\n",
            r.config.vmm,
            r.config.emulation,
            r.config.strategy,
            r.seconds,
            r.reads as f64 / r.seconds.max(1e-3),
            pct.map_or("-".into(), |p| format!("{p:.0}")),
            opt(r.per_read(r.register_exits), 1.0),
            opt(r.per_read(r.qi_waits), 1.0),
            opt(r.hit_rate(), 100.0),
        );
    }
    out
}

/// The shell command of one measurement: 512 untimed reads, then `reads` timed ones.
pub fn workload(reads: u64) -> String {
    format!(
        "dd if=/dev/vda of=/dev/null bs=4k count=512 iflag=direct 2>/dev/null; \
         a=$(cut -d' ' -f1 /proc/uptime); \
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

/// Boots the configuration, runs the workload, stops the guest; reads exitless's report.
fn measure(
    c: Config,
    args: &IommuArgs,
    dir: &Path,
    disk: &Path,
    limit: Duration,
) -> Result<Row, String> {
    let (kernel, initrd) = debian_guest()?;
    let report = dir.join(format!("{}.json", c.name().replace(' ', "-")));
    let _ = std::fs::remove_file(&report);
    let errors = dir.join("stderr.log");
    let mut g = match c.vmm {
        "exitless" => {
            let mut a: Vec<String> = vec![
                "--kernel".into(),
                kernel.display().to_string(),
                "--initrd".into(),
                initrd.display().to_string(),
                "--cpus".into(),
                "2".into(),
                "--mem".into(),
                "512M".into(),
                "--disk".into(),
                format!("path={}", disk.display()),
                "--timeout".into(),
                format!("{}", 4.0 * limit.as_secs_f64()),
                "--no-summary".into(),
                "--stats-json".into(),
                report.display().to_string(),
            ];
            if c.emulation != "none" {
                let cm = if c.strict() { "on" } else { "off" };
                a.push("--iommu".into());
                a.push(format!("mode={},caching-mode={cm}", c.emulation));
                a.push("--cmdline".into());
                a.push(c.cmdline().into());
            }
            Guest::start(&a, &errors)?
        }
        _ => Guest::start_command(qemu_command(c, &kernel, &initrd, disk), &errors)?,
    };
    let at = g.wait_for("exitless-guest: nproc=", 0, limit, "boot")?;
    g.wait_for("exitless# ", at, limit, "shell prompt")?;
    g.step("stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }", limit)?;
    let out = g.step(&workload(args.reads), limit)?;
    let secs = seconds(&out).ok_or_else(|| format!("{}: no times in {out:?}", c.name()))?;
    g.stop();
    let mut row = Row {
        config: c,
        reads: args.reads,
        seconds: secs,
        register_exits: None,
        qi_waits: None,
        iotlb_hits: None,
    };
    if c.vmm == "exitless" {
        let text = std::fs::read_to_string(&report)
            .map_err(|e| format!("{}: no run report: {e}", c.name()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let side = super::VmmSide::from_report(&v);
        if c.emulation != "none" {
            // Linux turns translation off at poweroff: its walks show that it was on.
            if side.fact("iotlb_misses") == 0 || side.fact("qi_waits") == 0 {
                return Err(format!(
                    "{}: Linux did not translate through the IOMMU: {:?}",
                    c.name(),
                    side.iommu
                ));
            }
            row.register_exits = Some(side.register_exits);
            row.qi_waits = Some(side.fact("qi_waits"));
            row.iotlb_hits = Some((side.fact("iotlb_hits"), side.fact("iotlb_misses")));
        }
    }
    eprintln!("exitless: bench iommu: linux {}: {secs:.2} s", c.name());
    Ok(row)
}

/// QEMU with the same guest, disk and IOMMU policy (`intel-iommu`, caching mode as the policy).
fn qemu_command(c: Config, kernel: &Path, initrd: &Path, disk: &Path) -> Command {
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
    cmd
}

/// The Linux part: every configuration once, in one run.
pub fn rows(args: &IommuArgs, limit: Duration) -> Result<Vec<Row>, String> {
    check_host()?;
    debian_guest()?;
    let qemu = !args.no_qemu && find_program("qemu-system-x86_64").is_some();
    if !args.no_qemu && !qemu {
        eprintln!("exitless: bench iommu: no qemu-system-x86_64 on PATH: no QEMU rows");
    }
    let dir = TempDir::new("exitless-bench-iommu-linux").map_err(|e| e.to_string())?;
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| format!("cannot make {}: {e}", disk.display()))?;
    // Boot and the shell's steps in the emulated host take minutes, not the kit's seconds.
    let limit = limit.max(Duration::from_secs(600));
    configs(qemu)
        .into_iter()
        .map(|c| measure(c, args, dir.path(), &disk, limit))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vmm: &'static str, emulation: &'static str, strategy: &'static str, s: f64) -> Row {
        Row {
            config: Config {
                vmm,
                emulation,
                strategy,
            },
            reads: 1000,
            seconds: s,
            register_exits: (vmm == "exitless" && emulation != "none").then_some(2000),
            qi_waits: (vmm == "exitless" && emulation != "none").then_some(3000),
            iotlb_hits: (vmm == "exitless" && emulation != "none").then_some((1, 3)),
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
        let q = format!(
            "{:?}",
            qemu_command(*lazy, Path::new("k"), Path::new("i"), Path::new("d"))
        );
        assert!(q.contains("intel-iommu,caching-mode=off"), "{q}");
        assert!(q.contains("iommu_platform=on"), "{q}");
        let off = format!(
            "{:?}",
            qemu_command(c[5], Path::new("k"), Path::new("i"), Path::new("d"))
        );
        assert!(!off.contains("intel-iommu"), "{off}");
    }

    #[test]
    fn percentages_are_of_the_same_vmm_s_run_without_iommu() {
        let rows = vec![
            row("exitless", "none", "none", 1.0),
            row("exitless", "samecore", "strict", 4.0),
            row("qemu", "none", "none", 2.0),
            row("qemu", "qemu", "strict", 4.0),
        ];
        let v = to_json(&rows);
        assert_eq!(v[1]["pct_of_no_iommu"], 25.0);
        assert_eq!(v[3]["pct_of_no_iommu"], 50.0);
        assert_eq!(v[1]["guest"], "linux");
        assert_eq!(v[1]["iotlb_hit_rate"], 0.25);
        assert_eq!(v[1]["register_exits_per_read"], 2.0);
        assert!(v[3]["register_exits_per_read"].is_null());
        assert!(table(&rows, 1000).contains("samecore"));
    }

    #[test]
    fn times_come_from_the_uptime_line() {
        assert_eq!(seconds("x\n=R= t 10.50 12.75\n"), Some(2.25));
        assert_eq!(seconds("=R= t 12 10\n"), None);
        assert_eq!(seconds("=R= t 12\n"), None);
        assert!(workload(7).contains("count=7 iflag=direct"));
    }
}
