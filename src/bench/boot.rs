//! `exitless bench boot`: how fast and how cheaply a real Linux guest boots to its userspace,
//! exitless against QEMU (`-M microvm` and `-M q35`) with the very same kernel, initramfs and
//! command line.
//!
//! One round boots the guest once under every VMM (the order rotates from round to round, so
//! neither VMM always runs on a host its predecessor just warmed or dirtied). One boot measures:
//! - **time to userspace**: from spawning the VMM's process to the guest init's first line on the
//!   serial console (`exitless-guest: init started at <uptime> s`, which `tools/debian-guest.sh`'s
//!   init prints before anything else; the uptime in it is the guest's own clock, reported too).
//!   Both VMMs write the console to a file the bench reads every few milliseconds.
//! - **exits during boot**: KVM's own per-vCPU counters, summed, read right after that line
//!   (exitless: its control socket's `stats`; QEMU: QMP `query-stats`). The same counters from the
//!   same kernel for both VMMs, so they compare; `exits` counts every exit, the ones KVM handles
//!   in the kernel included, and the `*_exits` counters split them by reason. The command line
//!   carries `exitless.bench=boot`, on which the guest's init idles right after its first line,
//!   so the counters read a moment later are the boot's and nothing else's.
//! - **VMM overhead**: the process's private resident memory outside guest RAM, from
//!   `/proc/PID/smaps` (`Private_Clean + Private_Dirty` of every mapping but guest RAM), as
//!   Firecracker measures its own. Guest RAM is the anonymous mappings of at least
//!   [`GUEST_RAM_MIN`]: both VMMs map guest RAM in one piece of the guest's size (or two around
//!   the PCI hole), and nothing else in either is that large; the excluded sizes must add up to
//!   the guest's memory or the measurement is refused.
//!
//! Per VMM the best round is kept for each measure (load on the host only ever adds), the median
//! time shown beside it. The timings mean something only next to each other: run it where KVM is
//! hardware-style; on this project's PVM host no Linux userspace runs, so the bench refuses and
//! points at the emulated SVM host (`tools/svm-host.sh exitless bench boot --vs qemu`).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::{find_program, read_lossy, round1, round3, tail, wait_with_limit, Peer, TempDir};

/// The guest init's first line (see `tools/debian-guest.sh`).
pub const MARKER: &str = "exitless-guest: init started at ";
/// On the command line: the guest's init idles after its first line.
pub const BENCH_FLAG: &str = "exitless.bench=boot";
/// Mappings at least this large are guest RAM (see the module doc); so is the guest's memory.
pub const GUEST_RAM_MIN: u64 = 256 << 20;
/// How often the console files are read while a guest boots.
const POLL: Duration = Duration::from_millis(5);

/// Arguments of `exitless bench boot`.
#[derive(Args, Debug, Clone)]
pub struct BootArgs {
    /// Print one JSON array on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also boot the same guest under QEMU (`-M microvm` and `-M q35`, `-accel kvm`).
    #[arg(long, value_enum)]
    pub vs: Option<Peer>,
    /// Boot the guest this many times per VMM (rotating the order).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// The guest kernel (a bzImage or ELF; the Debian cloud kernel by default).
    #[arg(long, default_value = "images/debian/vmlinuz")]
    pub kernel: PathBuf,
    /// The initramfs; its init must print `exitless-guest: init started at ...` first.
    #[arg(long, default_value = "images/debian/initrd.img")]
    pub initrd: PathBuf,
    /// Guest memory, at least 256M (e.g. 512M, 1G).
    #[arg(long, default_value = "512M", value_parser = crate::config::parse_size)]
    pub mem: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub cpus: u8,
    /// Time limit of one boot to userspace, in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

/// A VMM the bench boots the guest under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Exitless,
    QemuMicrovm,
    QemuQ35,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Exitless => "exitless",
            Vmm::QemuMicrovm => "qemu-microvm",
            Vmm::QemuQ35 => "qemu-q35",
        }
    }
}

/// What one boot measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Boot {
    pub to_userspace_s: f64,
    /// The guest's uptime in its init's first line.
    pub guest_uptime_s: Option<f64>,
    /// KVM's `exits`, summed over vCPUs.
    pub exits: u64,
    /// KVM's `*_exits` counters (and `insn_emulation`, `hypercalls`), summed over vCPUs.
    pub exits_by_reason: BTreeMap<String, u64>,
    /// exitless's own exits to userspace by reason (empty for QEMU).
    pub userspace_exits: BTreeMap<String, u64>,
    pub vmm_overhead_mib: f64,
    /// Guest RAM backed by transparent huge pages at that moment.
    pub guest_ram_huge_mib: f64,
}

/// Runs `exitless bench boot`.
pub fn run(args: &BootArgs) -> Result<(), String> {
    check_inputs(args)?;
    check_host("exitless bench boot --vs qemu")?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let qemu = match args.vs {
        Some(Peer::Qemu) => Some(find_program("qemu-system-x86_64").ok_or(
            "--vs qemu: qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86)",
        )?),
        None => None,
    };
    let cmdline = full_cmdline(&exe, args)?;
    let mut vmms = vec![Vmm::Exitless];
    if qemu.is_some() {
        vmms.extend([Vmm::QemuMicrovm, Vmm::QemuQ35]);
    }
    let dir = TempDir::new("exitless-bench-boot").map_err(|e| format!("temporary dir: {e}"))?;
    let mut boots: BTreeMap<&str, Vec<Boot>> = BTreeMap::new();
    for round in 0..args.rounds as usize {
        for i in 0..vmms.len() {
            let vmm = vmms[(i + round) % vmms.len()];
            let program = match vmm {
                Vmm::Exitless => &exe,
                _ => qemu.as_ref().expect("QEMU VMMs only with --vs qemu"),
            };
            let b = boot_once(vmm, program, args, &cmdline, dir.path())
                .map_err(|e| format!("{} (round {}): {e}", vmm.name(), round + 1))?;
            if !args.json {
                eprintln!(
                    "round {}: {:<12} {:>7.2} s to userspace, {:>7} exits, {:>6.1} MiB overhead",
                    round + 1,
                    vmm.name(),
                    b.to_userspace_s,
                    b.exits,
                    b.vmm_overhead_mib
                );
            }
            boots.entry(vmm.name()).or_default().push(b);
        }
    }
    let summaries: Vec<Summary> = vmms
        .iter()
        .map(|v| Summary::of(v.name(), &boots[v.name()]))
        .collect();
    if args.json {
        let v: Vec<Value> = summaries.iter().map(|s| s.to_json(&summaries[0])).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON serialises")
        );
    } else {
        print!("{}", table(&summaries, args, &cmdline));
    }
    Ok(())
}

/// Refuses a PVM host, where neither a Linux guest's userspace nor QEMU's guests run; `command`
/// is the bench's command line for the emulated SVM host the error points at.
pub(crate) fn check_host(command: &str) -> Result<(), String> {
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    if crate::host::HostInfo::detect(&kvm).pvm.is_some() {
        return Err(format!(
            "this host's KVM is PVM, where a Linux guest's userspace does not run \
             (its syscalls never reach the guest kernel) and QEMU runs no guest well: run the \
             bench where KVM is hardware-style, e.g. in the emulated SVM host: \
             tools/svm-host.sh {command}"
        ));
    }
    Ok(())
}

fn check_inputs(args: &BootArgs) -> Result<(), String> {
    for (what, p) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        let m = std::fs::metadata(p).map_err(|e| {
            format!(
                "{what} {}: {e} (the Debian guest is built by tools/debian-guest.sh images/debian)",
                p.display()
            )
        })?;
        if !m.is_file() {
            return Err(format!("{what} {}: not a file", p.display()));
        }
    }
    if args.mem < GUEST_RAM_MIN {
        return Err(format!(
            "--mem {} MiB: the bench needs at least {} MiB (it tells guest RAM from the VMM's own \
             memory by size)",
            args.mem >> 20,
            GUEST_RAM_MIN >> 20
        ));
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!("--timeout {}: not a positive number", args.timeout));
    }
    Ok(())
}

/// exitless's whole command line for this kernel (its defaults, this host's extras and the bench
/// flag), as `exitless run --print-cmdline` tells it: every VMM gets exactly this one.
fn full_cmdline(exe: &Path, args: &BootArgs) -> Result<String, String> {
    let line = linux_cmdline(exe, &args.kernel, BENCH_FLAG)?;
    if !line.contains(BENCH_FLAG) {
        return Err(format!(
            "exitless run --print-cmdline left out {BENCH_FLAG}: {line}"
        ));
    }
    Ok(line)
}

/// exitless's whole command line for a Linux `kernel` with `extra` appended (its defaults and
/// this host's extras), as `exitless run --print-cmdline` tells it, for a peer VMM to boot the
/// same kernel with the very same line (`bench snapshot` uses it too).
pub(crate) fn linux_cmdline(exe: &Path, kernel: &Path, extra: &str) -> Result<String, String> {
    let mut cmd = Command::new(exe);
    cmd.arg("run").arg("--kernel").arg(kernel);
    if !extra.is_empty() {
        cmd.args(["--cmdline", extra]);
    }
    let out = cmd
        .arg("--print-cmdline")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || line.is_empty() {
        return Err(format!(
            "exitless run --print-cmdline failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(line)
}

/// The files of one boot.
struct Files {
    console: PathBuf,
    errors: PathBuf,
    socket: PathBuf,
}

impl Files {
    fn new(dir: &Path, vmm: Vmm) -> Files {
        let f = |what: &str| dir.join(format!("{}-{what}", vmm.name()));
        let files = Files {
            console: f("console.log"),
            errors: f("stderr.log"),
            socket: f("control.sock"),
        };
        for p in [&files.console, &files.errors, &files.socket] {
            let _ = std::fs::remove_file(p);
        }
        files
    }
}

/// A Linux guest as QEMU boots it directly (no firmware disk: `-kernel`, `-initrd`, `-append`).
pub(crate) struct Linux<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub mem: u64,
    pub cpus: u8,
    pub cmdline: &'a str,
}

/// QEMU's arguments for `linux` under `-M microvm` (`microvm`) or `-M q35`, with KVM, the host's
/// CPU and no default devices; the caller adds the serial console and QMP.
pub(crate) fn qemu_linux_args(microvm: bool, linux: &Linux) -> Vec<String> {
    let machine = if microvm {
        "microvm,acpi=on,rtc=on"
    } else {
        "q35"
    };
    let s = |p: &Path| p.display().to_string();
    [
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        &(linux.mem >> 20).to_string(),
        "-smp",
        &linux.cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        &s(linux.kernel),
        "-initrd",
        &s(linux.initrd),
        "-append",
        linux.cmdline,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// The arguments that boot the guest under `vmm`.
fn vmm_args(vmm: Vmm, args: &BootArgs, cmdline: &str, files: &Files) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mem_mib = (args.mem >> 20).to_string();
    let mut v: Vec<String> = match vmm {
        Vmm::Exitless => vec![
            "run".into(),
            "--kernel".into(),
            s(&args.kernel),
            "--initrd".into(),
            s(&args.initrd),
            "--mem".into(),
            format!("{mem_mib}M"),
            "--cpus".into(),
            args.cpus.to_string(),
            "--no-default-cmdline".into(),
            "--cmdline".into(),
            cmdline.into(),
            "--no-summary".into(),
            "--console-log".into(),
            s(&files.console),
            "--api-socket".into(),
            s(&files.socket),
            "--timeout".into(),
            format!("{}", args.timeout + 60.0),
        ],
        Vmm::QemuMicrovm | Vmm::QemuQ35 => {
            let linux = Linux {
                kernel: &args.kernel,
                initrd: &args.initrd,
                mem: args.mem,
                cpus: args.cpus,
                cmdline,
            };
            qemu_linux_args(vmm == Vmm::QemuMicrovm, &linux)
        }
    };
    if vmm != Vmm::Exitless {
        v.extend([
            "-serial".into(),
            format!("file:{}", s(&files.console)),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", s(&files.socket)),
        ]);
    }
    v
}

/// Boots the guest once under `vmm` and measures it (see the module doc).
fn boot_once(
    vmm: Vmm,
    program: &Path,
    args: &BootArgs,
    cmdline: &str,
    dir: &Path,
) -> Result<Boot, String> {
    let files = Files::new(dir, vmm);
    let err_file = std::fs::File::create(&files.errors).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(vmm_args(vmm, args, cmdline, &files))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    let result = measure(vmm, &mut child, start, args, &files);
    // The VMM goes: asked to (QEMU already was, over QMP), killed when it failed or does not listen.
    if result.is_ok() && vmm == Vmm::Exitless {
        let _ = crate::api::request(&files.socket, &crate::api::Call::Quit);
    }
    let grace = if result.is_ok() { 20 } else { 0 };
    let _ = wait_with_limit(&mut child, Duration::from_secs(grace));
    result.map_err(|e| {
        format!(
            "{e}\n  last console lines:\n{}\n  {} said:\n{}",
            tail(&read_lossy(&files.console), 8),
            vmm.name(),
            tail(&read_lossy(&files.errors), 6)
        )
    })
}

/// Waits for the guest's first userspace line, then reads the VMM's memory and KVM counters.
fn measure(
    vmm: Vmm,
    child: &mut Child,
    start: Instant,
    args: &BootArgs,
    files: &Files,
) -> Result<Boot, String> {
    let line = wait_for_marker(child, &files.console, start, args.timeout)?;
    let to_userspace_s = start.elapsed().as_secs_f64();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()))
        .map_err(|e| format!("cannot read the VMM's smaps: {e}"))?;
    let memory = memory_of(&smaps, args.mem)?;
    let (kvm, userspace_exits) = match vmm {
        Vmm::Exitless => exitless_stats(&files.socket)?,
        _ => (
            super::io::qmp_stats_and_quit(&files.socket)?,
            BTreeMap::new(),
        ),
    };
    let (exits, exits_by_reason) = exits_of(&kvm)?;
    Ok(Boot {
        to_userspace_s,
        guest_uptime_s: guest_uptime(&line),
        exits,
        exits_by_reason,
        userspace_exits,
        vmm_overhead_mib: memory.overhead_mib,
        guest_ram_huge_mib: memory.guest_ram_huge_mib,
    })
}

/// Reads the console file as it grows until a line holds [`MARKER`]; returns that line.
fn wait_for_marker(
    child: &mut Child,
    console: &Path,
    start: Instant,
    timeout: f64,
) -> Result<String, String> {
    let limit = Duration::from_secs_f64(timeout);
    let mut seen = Vec::new();
    let mut file = None;
    loop {
        if file.is_none() {
            file = std::fs::File::open(console).ok();
        }
        if let Some(f) = file.as_mut() {
            let _ = f.seek(SeekFrom::Start(seen.len() as u64));
            let _ = f.read_to_end(&mut seen);
            if let Some(line) = marker_line(&seen) {
                return Ok(line);
            }
        }
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "the VMM ended ({status}) before the guest's userspace"
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "no userspace within --timeout {timeout} s (no {MARKER:?} on the console)"
            ));
        }
        std::thread::sleep(POLL);
    }
}

/// The complete console line that holds [`MARKER`], if one does.
pub fn marker_line(console: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(console);
    let at = text.find(MARKER)?;
    let end = text[at..].find('\n')? + at;
    Some(text[at..end].trim_end().to_string())
}

/// The guest's uptime in the marker line ("... init started at 1.23 s").
pub fn guest_uptime(line: &str) -> Option<f64> {
    line.strip_prefix(MARKER)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

type Counters = BTreeMap<String, u64>;

/// exitless's KVM counters and its own exits to userspace, through its control socket.
fn exitless_stats(socket: &Path) -> Result<(Counters, Counters), String> {
    let reply = crate::api::request(socket, &crate::api::Call::Stats)?;
    let counters = |key: &str| -> Result<Counters, String> {
        let m = reply[key]
            .as_object()
            .ok_or_else(|| format!("the control socket's stats have no {key:?}: {reply}"))?;
        Ok(m.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect())
    };
    Ok((counters("kvm")?, counters("exits")?))
}

/// KVM's `exits` and the counters that split them by reason.
pub fn exits_of(kvm: &BTreeMap<String, u64>) -> Result<(u64, BTreeMap<String, u64>), String> {
    let exits = *kvm
        .get("exits")
        .ok_or("KVM's statistics have no `exits` counter (a host without KVM_GET_STATS_FD?)")?;
    let by_reason = kvm
        .iter()
        .filter(|(k, _)| k.ends_with("_exits") || *k == "insn_emulation" || *k == "hypercalls")
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    Ok((exits, by_reason))
}

/// What `smaps` says of a VMM's memory, in MiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    /// Private resident memory outside guest RAM (see the module doc).
    pub overhead_mib: f64,
    /// Guest RAM backed by transparent huge pages (`AnonHugePages`).
    pub guest_ram_huge_mib: f64,
}

/// Reads a VMM's `smaps`; refused when the mappings taken for guest RAM do not add up to
/// `guest_mem` bytes.
pub fn memory_of(smaps: &str, guest_mem: u64) -> Result<Memory, String> {
    let (mut private_kib, mut huge_kib) = (0u64, 0u64);
    let mut guest_ram = 0u64;
    let mut in_guest_ram = false;
    for line in smaps.lines() {
        if let Some(size) = mapping_size(line) {
            in_guest_ram = size >= GUEST_RAM_MIN && is_anonymous(line);
            if in_guest_ram {
                guest_ram += size;
            }
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(key), Some(kib)) = (f.next(), f.next()) else {
            continue;
        };
        let field = matches!(key, "Private_Clean:" | "Private_Dirty:" | "AnonHugePages:");
        if !field {
            continue;
        }
        let kib = kib
            .parse::<u64>()
            .map_err(|e| format!("smaps: {line}: {e}"))?;
        match (key, in_guest_ram) {
            ("AnonHugePages:", true) => huge_kib += kib,
            ("AnonHugePages:", false) => {}
            (_, false) => private_kib += kib,
            (_, true) => {}
        }
    }
    // QEMU may round guest RAM up (alignment); never below it.
    if guest_ram < guest_mem || guest_ram > guest_mem + guest_mem / 4 + (64 << 20) {
        return Err(format!(
            "smaps: the mappings of at least {} MiB add up to {} MiB, not the guest's {} MiB: \
             cannot tell guest RAM from the VMM's own memory",
            GUEST_RAM_MIN >> 20,
            guest_ram >> 20,
            guest_mem >> 20
        ));
    }
    Ok(Memory {
        overhead_mib: private_kib as f64 / 1024.0,
        guest_ram_huge_mib: huge_kib as f64 / 1024.0,
    })
}

/// A mapping's size if `line` starts one (`start-end perms offset dev inode [path]`).
fn mapping_size(line: &str) -> Option<u64> {
    let range = line.split_whitespace().next()?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    );
    b.checked_sub(a)
}

/// A mapping line without a file (guest RAM is anonymous memory, or a memfd).
fn is_anonymous(line: &str) -> bool {
    match line.split_whitespace().nth(5) {
        None => true,
        Some(p) => p.starts_with("/memfd:") || p == "[anon]",
    }
}

/// One VMM's rounds, reduced.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub vmm: &'static str,
    pub rounds: Vec<Boot>,
    /// The best round's values, each measure on its own.
    pub best_s: f64,
    pub median_s: f64,
    pub exits: u64,
    pub overhead_mib: f64,
    /// The guest uptime and exit reasons of the fastest round.
    pub fastest: Boot,
}

impl Summary {
    pub fn of(vmm: &'static str, rounds: &[Boot]) -> Summary {
        let mut times: Vec<f64> = rounds.iter().map(|b| b.to_userspace_s).collect();
        times.sort_by(f64::total_cmp);
        let fastest = rounds
            .iter()
            .min_by(|a, b| a.to_userspace_s.total_cmp(&b.to_userspace_s))
            .expect("at least one round")
            .clone();
        Summary {
            vmm,
            rounds: rounds.to_vec(),
            best_s: times[0],
            median_s: times[times.len() / 2],
            exits: rounds.iter().map(|b| b.exits).min().unwrap_or(0),
            overhead_mib: rounds
                .iter()
                .map(|b| b.vmm_overhead_mib)
                .fold(f64::INFINITY, f64::min),
            fastest,
        }
    }

    pub fn to_json(&self, ours: &Summary) -> Value {
        let ratio = |a: f64, b: f64| (b > 0.0).then(|| round3(a / b));
        json!({
            "vmm": self.vmm,
            "to_userspace_s": round3(self.best_s),
            "to_userspace_median_s": round3(self.median_s),
            "guest_uptime_s": self.fastest.guest_uptime_s,
            "exits": self.exits,
            "exits_by_reason": self.fastest.exits_by_reason,
            "userspace_exits": self.fastest.userspace_exits,
            "vmm_overhead_mib": round1(self.overhead_mib),
            "guest_ram_huge_mib": round1(self.fastest.guest_ram_huge_mib),
            "exitless_vs_this": {
                "to_userspace": ratio(ours.best_s, self.best_s),
                "exits": ratio(ours.exits as f64, self.exits as f64),
                "vmm_overhead": ratio(ours.overhead_mib, self.overhead_mib),
            },
            "rounds": self.rounds.iter().map(|b| json!({
                "to_userspace_s": round3(b.to_userspace_s),
                "guest_uptime_s": b.guest_uptime_s,
                "exits": b.exits,
                "vmm_overhead_mib": round1(b.vmm_overhead_mib),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The human-readable result: one row per VMM, ratios of exitless to each.
pub fn table(s: &[Summary], args: &BootArgs, cmdline: &str) -> String {
    let mut out = format!(
        "bench boot: {} + {}, {} MiB, {} vCPU(s), best of {} round(s) per measure\n  command \
         line: {cmdline}\n\n{:<14}{:>10}{:>10}{:>12}{:>12}{:>14}\n",
        args.kernel.display(),
        args.initrd.display(),
        args.mem >> 20,
        args.cpus,
        args.rounds,
        "vmm",
        "to user s",
        "median s",
        "guest up s",
        "KVM exits",
        "overhead MiB"
    );
    for x in s {
        let up = x
            .fastest
            .guest_uptime_s
            .map_or("?".to_string(), |u| format!("{u:.2}"));
        out += &format!(
            "{:<14}{:>10.2}{:>10.2}{:>12}{:>12}{:>14.1}\n",
            x.vmm, x.best_s, x.median_s, up, x.exits, x.overhead_mib
        );
    }
    let ours = &s[0];
    for x in &s[1..] {
        out += &format!(
            "exitless / {}: time to userspace {:.2}x, exits {:.2}x, VMM overhead {:.2}x\n",
            x.vmm,
            ours.best_s / x.best_s,
            ours.exits as f64 / x.exits.max(1) as f64,
            ours.overhead_mib / x.overhead_mib.max(0.001),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_line_is_found_only_when_complete_and_gives_the_guest_uptime() {
        assert_eq!(
            marker_line(b"boot...\nexitless-guest: init started at 1.5"),
            None
        );
        let line =
            marker_line(b"[ 1.0] x\r\nexitless-guest: init started at 1.52 s\r\nnext").unwrap();
        assert_eq!(line, "exitless-guest: init started at 1.52 s");
        assert_eq!(guest_uptime(&line), Some(1.52));
        assert_eq!(
            guest_uptime("exitless-guest: init started at garbage s"),
            None
        );
        assert_eq!(marker_line(b"nothing here\n"), None);
    }

    fn smaps(ram_mib: u64, ram_private_kib: u64, own_private_kib: u64) -> String {
        let ram_end = 0x7f00_0000_0000u64 + (ram_mib << 20);
        format!(
            "55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/exitless\n\
             Private_Clean:       {own_private_kib} kB\nPrivate_Dirty:         0 kB\n\
             7f0000000000-{ram_end:x} rw-p 00000000 00:00 0 \n\
             Private_Clean:         0 kB\nPrivate_Dirty:   {ram_private_kib} kB\n\
             AnonHugePages:   {ram_private_kib} kB\n\
             7fff00000000-7fff04000000 rw-p 00000000 00:00 0 \n\
             Private_Clean:         0 kB\nPrivate_Dirty:      1024 kB\n"
        )
    }

    #[test]
    fn overhead_leaves_out_guest_ram_and_counts_everything_else() {
        // 2048 KiB of the binary + 1024 KiB of a 64 MiB arena; guest RAM's 400 MiB not counted.
        let m = memory_of(&smaps(512, 400 << 10, 2048), 512 << 20).unwrap();
        assert_eq!(m.overhead_mib, 3.0);
        assert_eq!(m.guest_ram_huge_mib, 400.0);
        // QEMU's RAM rounded up by 2 MiB still counts as guest RAM.
        let m = memory_of(&smaps(514, 1024, 0), 512 << 20).unwrap();
        assert_eq!((m.overhead_mib, m.guest_ram_huge_mib), (1.0, 1.0));
    }

    #[test]
    fn overhead_is_refused_when_guest_ram_cannot_be_found() {
        let e = memory_of(&smaps(512, 0, 0), 1 << 30).unwrap_err();
        assert!(e.contains("512 MiB") && e.contains("1024 MiB"), "{e}");
        assert!(memory_of("", 512 << 20).is_err());
        let bad = "7f0000000000-7f0020000000 rw-p 0 00:00 0\nPrivate_Dirty: lots kB\n";
        assert!(memory_of(bad, 512 << 20).is_err());
    }

    #[test]
    fn exits_come_from_kvm_s_counters_and_their_absence_is_an_error() {
        let kvm: BTreeMap<String, u64> = [
            ("exits", 900),
            ("io_exits", 300),
            ("halt_exits", 50),
            ("insn_emulation", 7),
            ("fpu_reload", 1000),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
        let (exits, by) = exits_of(&kvm).unwrap();
        assert_eq!(exits, 900);
        assert_eq!(by.len(), 3);
        assert_eq!(by["io_exits"], 300);
        assert!(!by.contains_key("fpu_reload"));
        assert!(exits_of(&BTreeMap::new()).is_err());
    }

    fn boot(t: f64, exits: u64, mib: f64) -> Boot {
        Boot {
            to_userspace_s: t,
            guest_uptime_s: Some(t / 2.0),
            exits,
            exits_by_reason: BTreeMap::new(),
            userspace_exits: BTreeMap::new(),
            vmm_overhead_mib: mib,
            guest_ram_huge_mib: 0.0,
        }
    }

    #[test]
    fn summaries_keep_the_best_of_each_measure_and_ratios_are_exitless_over_the_peer() {
        let ours = Summary::of("exitless", &[boot(3.0, 500, 2.0), boot(2.0, 600, 2.5)]);
        assert_eq!(
            (ours.best_s, ours.exits, ours.overhead_mib),
            (2.0, 500, 2.0)
        );
        assert_eq!(ours.fastest.exits, 600);
        let peer = Summary::of("qemu-microvm", &[boot(4.0, 1000, 8.0)]);
        let j = peer.to_json(&ours);
        assert_eq!(j["vmm"], "qemu-microvm");
        assert_eq!(j["to_userspace_s"], 4.0);
        assert_eq!(j["exitless_vs_this"]["to_userspace"], 0.5);
        assert_eq!(j["exitless_vs_this"]["exits"], 0.5);
        assert_eq!(j["exitless_vs_this"]["vmm_overhead"], 0.25);
        assert_eq!(j["rounds"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn qemu_gets_the_same_kernel_initrd_command_line_and_memory() {
        let args = BootArgs {
            json: false,
            vs: Some(Peer::Qemu),
            rounds: 1,
            kernel: "k".into(),
            initrd: "i".into(),
            mem: 512 << 20,
            cpus: 2,
            timeout: 10.0,
        };
        let files = Files::new(Path::new("/nonexistent-dir"), Vmm::QemuMicrovm);
        let q = vmm_args(Vmm::QemuMicrovm, &args, "console=ttyS0 x", &files).join(" ");
        assert!(q.contains("-M microvm,acpi=on,rtc=on -accel kvm"), "{q}");
        assert!(
            q.contains("-m 512 -smp 2") && q.contains("-kernel k -initrd i"),
            "{q}"
        );
        assert!(q.contains("-append console=ttyS0 x"), "{q}");
        let e = vmm_args(Vmm::Exitless, &args, "console=ttyS0 x", &files).join(" ");
        assert!(e.contains("--mem 512M --cpus 2 --no-default-cmdline --cmdline console=ttyS0 x"));
    }
}
