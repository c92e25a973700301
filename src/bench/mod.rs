//! Benchmarks of exitless on the host it runs on: `exitless bench ...`.
//!
//! Owns the `bench` subcommands and what they share: a temporary directory that cleans up after
//! itself, and child processes with a time limit (every VM a benchmark boots, exitless's own and a
//! peer VMM's, runs as a child process that is killed when its time is up, so a misbehaving
//! benchmark guest can never hang the benchmark). The benchmarks themselves:
//! - [`exits`]: what one VM exit costs, by kind, side by side with QEMU (`bench exits`).
//! - [`boot`]: a real Linux guest's time to userspace, exits during boot and the VMM's memory
//!   overhead, side by side with QEMU microvm and q35 (`bench boot`).
//! - [`io`]: virtio block (and later network) throughput and exits per request, side by side
//!   with QEMU (`bench io`).
//! - [`irq`]: interrupts and the exits they cost with a real Linux guest over virtio-net, per
//!   configuration (baseline, delivery-only, full, QEMU) and over coalescing caps: the ELI
//!   thesis's Table 3.1, 3.2 and Fig 3.6 (`bench irq`).
//! - [`nested`]: the exit bench at L2 and at L3 (exitless inside exitless's guest), with L1's
//!   exits per L3 exit (`bench nested`).
//! - [`iommu`]: the emulated VT-d's cost per DMA under the thesis's teardown strategies, samecore
//!   vs sidecore (`bench iommu`, Table 2.1).
//! - [`soak`]: many kit-guest boots in a row and many VMs at once, boots/s/core, and a check
//!   that VMs leave nothing on the host (`bench soak`).
//! - [`vswap`]: uncooperative overcommit, baseline swapping vs balloon vs swap mapper (`bench
//!   vswap`).
//! - [`snapshot`]: snapshot time and size, restore-to-running and the first guest response
//!   after a restore, for a kit guest or the Debian guest, side by side with QEMU's `migrate` to
//!   a file and `-incoming` (`bench snapshot`).

pub mod boot;
pub mod exits;
pub mod io;
pub mod iommu;
pub mod irq;
pub mod nested;
pub mod snapshot;
pub mod soak;
pub mod vswap;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};

/// `exitless bench <command>`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time each kind of VM exit with the kit's `bench` guest: CPUID, hypercall, PIO and MMIO
    /// handled in userspace or by an ioeventfd, LAPIC EOI/TPR, self-IPI, HLT + LAPIC timer, and
    /// the PIO/MMIO operations from CPL3.
    Exits(ExitsArgs),
    /// virtio-blk throughput (sequential 64 KiB writes and reads, 32 in flight) and virtio-net
    /// transmit throughput (to a tap in a network namespace) in the kit's `bench-io` guest, with
    /// the exits per request they cost.
    Io(IoArgs),
    /// A real Linux guest (the Debian cloud kernel and tools/debian-guest.sh's initramfs by
    /// default) from process start to its first userspace line: time, KVM exits by reason and the
    /// VMM's private memory outside guest RAM, side by side with QEMU microvm and q35 (`--vs
    /// qemu`). Needs hardware-style KVM (e.g. tools/svm-host.sh on a host without it).
    Boot(boot::BootArgs),
    /// The exit bench's operations at L2 (the bench guest under exitless here) and at L3 (under
    /// exitless inside the Debian guest, itself under exitless here with --nested on), with L1's
    /// KVM exits per L3 exit (Turtles' exit multiplication). Needs a host whose KVM gives guests
    /// SVM or VMX (e.g. tools/svm-host.sh exitless bench nested on a host without it).
    Nested(nested::NestedArgs),
    /// VSWAPPER's Fig 4.3/4.9 at small scale: a Linux guest limited by --mem-limit reads its disk
    /// sequentially, baseline swapping vs balloon vs swap mapper; time per pass, host swap traffic,
    /// image reads, major faults. Needs root, host swap and hardware-style KVM (e.g. inside
    /// tools/svm-host.sh with --drive disks for the image and the swap).
    #[command(alias = "overcommit")]
    Vswap(vswap::VswapArgs),
    /// Interrupts and the exits they cost, a real Linux guest over virtio-net on a tap: a TCP
    /// stream of 256-byte writes and UDP request-response, under baseline, delivery-only and
    /// full configurations (and QEMU with `--vs qemu`), plus a sweep of the coalescing cap T:
    /// exits/s, exits per interrupt, interrupts/s, injections/s, IRQ-window exits/s, time in
    /// guest (the ELI thesis's Table 3.1, 3.2, Fig 3.6). Needs root and hardware-style KVM
    /// (e.g. tools/svm-host.sh exitless bench irq --vs qemu).
    Irq(irq::IrqArgs),
    /// The emulated VT-d's cost per DMA (the vIOMMU thesis's Table 2.1): the kit's bench-iommu
    /// guest maps and unmaps each 4 KiB virtio-blk read buffer with its own VT-d driver, under
    /// strict, deferred, optimistic-256 and optimistic-4096 teardown, with no IOMMU, samecore and
    /// sidecore emulation: throughput as % of no IOMMU, map+unmap cycles, IOTLB hit rate.
    Iommu(iommu::IommuArgs),
    /// Many boots of a kit guest (the demo by default), one after the other and then many VMs at
    /// once, each its own exitless process: boots per second per core, per-boot time and peak
    /// RSS, and a leak check of the host (processes, sockets, network interfaces, /dev/shm) before
    /// and after. Fails on a failed boot or a leak.
    Soak(soak::SoakArgs),
    /// Snapshot and restore of the kit's compute guest (256 MiB) or, with `--guest debian`, the
    /// Debian guest at its shell prompt: snapshot time and size on disk, restore-to-running, and
    /// the time from starting the restore to the guest's first answer on its console; side by
    /// side with QEMU (`migrate` to a file, `-incoming`) with `--vs qemu`. The Debian guest and
    /// QEMU need hardware-style KVM (e.g. tools/svm-host.sh on a host without it).
    Snapshot(snapshot::SnapshotArgs),
    /// The load generator `bench irq` runs inside its guest.
    #[command(hide = true)]
    IrqLoad(irq::LoadArgs),
}

/// Arguments of `exitless bench io`.
#[derive(Args, Debug, Clone)]
pub struct IoArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also run the very same guest over the same image under this VMM and compare (needs
    /// qemu-system-x86_64).
    #[arg(long, value_enum)]
    pub vs: Option<Peer>,
    /// Time limit of each VM run, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// 32 MiB each way instead of 256 (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// MiB written and read back per run (overrides --quick's and the default size).
    #[arg(long)]
    pub mib: Option<u64>,
    /// Skip the network workload (it needs root for a network namespace with a tap).
    #[arg(long)]
    pub no_net: bool,
    /// Boot the guest this many times per VMM (alternating) and keep, per workload and VMM, the
    /// fastest round (the median is shown too).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
}

/// Arguments of `exitless bench exits`.
#[derive(Args, Debug, Clone)]
pub struct ExitsArgs {
    /// Print one JSON array on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also run the very same guest under this VMM and compare (needs qemu-system-x86_64).
    #[arg(long, value_enum)]
    pub vs: Option<Peer>,
    /// Time limit of each VM run, in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// Small sample counts (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Boot the guest this many times (alternating with the peer) and keep, per operation and
    /// VMM, the round with the lowest median: other load on the host only ever adds time.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// The kit guest to boot (tests use others to check the bench's error handling).
    #[arg(long, default_value = "bench", hide = true)]
    pub guest: String,
    /// Also write the exit counts of exitless's runs (all rounds added up) to this file as JSON:
    /// `rounds`, `kvm_exits` (KVM's `exits` statistic of the bench VMs: every exit, in-kernel
    /// ones included) and `exits_to_userspace` (`bench nested` reads it inside its guest).
    #[arg(long, hide = true)]
    pub counts: Option<PathBuf>,
}

/// A VMM to compare with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    Qemu,
}

/// Runs a `bench` subcommand; errors become one line on stderr and status 1.
pub fn main(cmd: BenchCommand) -> ExitCode {
    let r = match cmd {
        BenchCommand::Exits(args) => exits::run(&args),
        BenchCommand::Io(args) => io::run(&args),
        BenchCommand::Boot(args) => boot::run(&args),
        BenchCommand::Nested(args) => nested::run(&args),
        BenchCommand::Vswap(args) => vswap::run(&args),
        BenchCommand::Irq(args) => irq::run(&args),
        BenchCommand::Iommu(args) => iommu::run(&args),
        BenchCommand::Snapshot(args) => snapshot::run(&args),
        BenchCommand::IrqLoad(args) => irq::load(&args),
        BenchCommand::Soak(args) => soak::run(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exitless: bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// A private temporary directory, removed (with its contents) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for i in 0..100u32 {
            let p = base.join(format!("{prefix}-{}-{nanos:x}-{i}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(TempDir(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("cannot create a temporary directory"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How a child process ended.
#[derive(Debug)]
pub enum Finished {
    Exited(ExitStatus),
    /// Still running at the time limit: it was killed.
    TimedOut,
}

/// Waits for `child` at most `limit`, then kills it (and reaps it).
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> std::io::Result<Finished> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Finished::Exited(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Finished::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The full path of `program` on `PATH`, if it is there.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

// Helpers both benchmarks use: console text, rounding, and the host TSC rate.

pub fn clip(s: &str) -> String {
    const MAX: usize = 160;
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > MAX {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    } else {
        s
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// For rates per request, where a few exits over 100k requests must not round to 0.
pub fn round5(x: f64) -> f64 {
    (x * 100_000.0).round() / 100_000.0
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("  | {}", clip(l)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `=R= KEY VALUE` lines a guest's shell printed, as KEY → VALUE (the last one wins); a
/// result may follow the shell's prompt on the same line. The real-guest tests read them too.
pub fn results(console: &str) -> std::collections::BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| Some(&l[l.find("=R= ")? + 4..]))
        .map(|rest| match rest.trim().split_once(' ') {
            Some((k, v)) => (k.to_string(), v.trim().to_string()),
            None => (rest.trim().to_string(), String::new()),
        })
        .collect()
}

pub fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// KVM's TSC frequency on this host, if it tells.
pub fn host_tsc_hz(kvm: &kvm_ioctls::Kvm, host: &crate::host::HostInfo) -> Option<u64> {
    if let Some(khz) = host.pvm.as_ref().and_then(|p| p.tsc_khz) {
        return Some(khz * 1000);
    }
    let vm = kvm.create_vm().ok()?;
    let vcpu = vm.create_vcpu(0).ok()?;
    vcpu.get_tsc_khz().ok().map(|k| k as u64 * 1000)
}

/// How long a benchmark VM may take to stop after its own time limit before it is killed.
pub const KILL_GRACE: Duration = Duration::from_secs(15);

/// Boots the kit guest `guest` under exitless (this binary's `run`) with `args` (devices), in a
/// process `command` makes from a program's path (a network namespace may wrap it), and returns
/// its console and its run report. `check` is the benchmark's console parser: a guest that
/// failed explains itself better through its own lines than through exitless's status.
pub fn run_under_exitless(
    dir: &Path,
    guest: &str,
    cmdline: &str,
    args: &[String],
    command: impl Fn(&Path) -> Command,
    timeout: Duration,
    check: impl Fn(&str) -> Result<(), String>,
) -> Result<(String, serde_json::Value), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let (console, stats, errors) = (
        dir.join("exitless-console.log"),
        dir.join("exitless-stats.json"),
        dir.join("exitless-stderr.log"),
    );
    let _ = std::fs::remove_file(&stats);
    let err_file = std::fs::File::create(&errors).map_err(|e| e.to_string())?;
    let mut child = command(&exe)
        .args([
            "run",
            "--guest",
            guest,
            "--no-summary",
            "--cmdline",
            cmdline,
        ])
        .args(args)
        .arg("--stats-json")
        .arg(&stats)
        .arg("--console-log")
        .arg(&console)
        .arg("--timeout")
        .arg(format!("{}", timeout.as_secs_f64()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let finished = wait_with_limit(&mut child, timeout + KILL_GRACE)
        .map_err(|e| format!("waiting for exitless: {e}"))?;
    let text = read_lossy(&console);
    let context = || {
        format!(
            "\n  last console lines:\n{}\n  exitless said:\n{}",
            tail(&text, 8),
            tail(&read_lossy(&errors), 6)
        )
    };
    match finished {
        Finished::TimedOut => {
            return Err(format!(
                "exitless's VM did not stop within {} s; killed{}",
                (timeout + KILL_GRACE).as_secs_f64(),
                context()
            ))
        }
        Finished::Exited(s) if s.code() == Some(124) => {
            return Err(format!(
                "the {guest} guest under exitless did not finish within --timeout {} s (hung?){}",
                timeout.as_secs_f64(),
                context()
            ))
        }
        Finished::Exited(s) if !s.success() => {
            if let Err(e) = check(&text) {
                return Err(format!("under exitless: {e} (exitless {s}){}", context()));
            }
            return Err(format!("exitless run failed ({s}){}", context()));
        }
        Finished::Exited(_) => {}
    }
    check(&text).map_err(|e| format!("under exitless: {e}{}", context()))?;
    let report = serde_json::from_str(&read_lossy(&stats))
        .map_err(|e| format!("cannot read exitless's run report: {e}"))?;
    Ok((text, report))
}

/// The QEMU command line for the kit guest ELF `kernel` with the devices `devices`: the same
/// machine for every benchmark (q35, KVM, 64 MiB, one vCPU, the debug-exit port the kit uses).
pub fn qemu_args(kernel: &Path, devices: &[String], cmdline: &str) -> Vec<String> {
    qemu_args_mem(kernel, devices, cmdline, 64 << 20)
}

/// [`qemu_args`] with `mem` bytes of guest RAM instead of 64 MiB.
pub fn qemu_args_mem(kernel: &Path, devices: &[String], cmdline: &str, mem: u64) -> Vec<String> {
    let mem_mib = (mem >> 20).to_string();
    let mut v: Vec<String> = [
        "-M",
        "q35",
        "-accel",
        "kvm",
        "-m",
        &mem_mib,
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-net",
        "none",
        "-vga",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(devices.iter().cloned());
    v.push("-kernel".into());
    v.push(kernel.display().to_string());
    if !cmdline.is_empty() {
        v.extend(["-append".to_string(), cmdline.to_string()]);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_clean_up_and_children_are_killed() {
        let kept;
        {
            let d = TempDir::new("exitless-test").unwrap();
            std::fs::write(d.path().join("x"), b"1").unwrap();
            kept = d.path().to_path_buf();
            assert!(kept.is_dir());
        }
        assert!(!kept.exists());
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let t = Instant::now();
        assert!(matches!(
            wait_with_limit(&mut c, Duration::from_millis(100)).unwrap(),
            Finished::TimedOut
        ));
        assert!(t.elapsed() < Duration::from_secs(3));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        assert!(matches!(
            wait_with_limit(&mut c, Duration::from_secs(5)).unwrap(),
            Finished::Exited(s) if s.success()
        ));
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-exitless").is_none());
    }
}
