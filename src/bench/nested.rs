//! `exitless bench nested`: what an exit costs one level further down (Turtles), and how many
//! exits of the level below each one takes.
//!
//! Levels, counted from the machine this command runs on (which must give its guests hardware
//! virtualization, e.g. the emulated SVM host of `tools/svm-host.sh`, "L1"):
//! - **L2**: the kit's `bench` guest under exitless in L1, i.e. `exitless bench exits` run here;
//! - **L3**: the same `bench` guest under exitless inside the Debian guest, which itself runs
//!   under exitless in L1 with `--nested on`, has loaded its own `kvm-amd`/`kvm-intel`, and runs
//!   `exitless bench exits` (this very binary, added to its initramfs).
//!
//! One run:
//! 1. `exitless bench exits --json` here (the L2 figures), as a child process;
//! 2. the Debian guest boots (`--nested on --api-socket`) from `initrd-nested.img` followed by an
//!    archive with this binary and its shared libraries; the bench types commands on its console
//!    (busybox's shell, echo off) and reads `=R= KEY VALUE` lines back: `load-kvm nested=1`, then
//!    the inner `exitless bench exits --json` with its output in a file, printed afterwards
//!    between two marker lines;
//! 3. right before and right after the inner bench, L1's KVM statistics of the Debian guest's VM
//!    are read through the outer exitless's control socket (`{"op":"stats"}` → `kvm`: `exits`,
//!    `nested_run`);
//! 4. with `--vs qemu`, the same bench ELF under `qemu-system-x86_64 -M q35 -accel kvm` at both
//!    levels, in the same run (columns `l2_qemu_ns`, `l3_qemu_ns`): the L2 bench is a `--vs qemu`
//!    run; at L3 a second inner `bench exits --vs qemu` follows the counted one (so that L1's
//!    counters see exitless's L3 exits alone), with QEMU, its libraries and its firmware added to
//!    the L2 guest's initramfs;
//! 5. a CPU-bound workload at both levels: the demo guest's loops (100 M iterations at CPL3, 20 k
//!    at CPL0, no exits), run here and then inside the L2 guest after the counters' second read,
//!    as the rows `loop_cpl3` and `loop_cpl0` (ns per iteration).
//!
//! **What is counted.** "L3 exits" are KVM's `exits` statistic of the L3 bench VMs, as L2's KVM
//! counts them (every exit of the bench guest, the ones L2's KVM handled in its kernel and the
//! ones it passed to the inner exitless; the guest's boot and power-off included; all rounds
//! added up), which the inner bench writes through its hidden `--counts FILE`. "L1 exits" are the
//! growth of L1's KVM `exits` statistic of the Debian guest's VM (all its vCPUs) between the two
//! reads: every exit of L2, the nested ones that carry an L3 exit and everything L2 did itself in
//! that window (starting the inner exitless, its console output, timer ticks). Their quotient,
//! `l1_exits_per_l3_exit`, is therefore an upper bound of Turtles' exit multiplication, and one
//! figure for the whole inner run: counters read before and after cannot tell operations apart,
//! so every row repeats it (its `note` says so). `nested_run` (L2's VMRUNs that L1's KVM
//! emulated, one per entry into L3) is reported beside it.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};

use super::{read_lossy, results, round1, round3, tail, wait_with_limit, TempDir};

/// Arguments of `exitless bench nested`.
#[derive(Args, Debug, Clone)]
pub struct NestedArgs {
    /// Print one JSON array on stdout (an object per operation) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Rounds of the bench guest at each level (the best median per operation is kept).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Small sample counts (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Time limit of each stage (the L2 bench, the guest's boot, the L3 bench) and of each of
    /// their VM runs, in seconds.
    #[arg(long, default_value_t = 1800.0)]
    pub timeout: f64,
    /// The L2 guest's kernel (the Debian guest of tools/debian-guest.sh).
    #[arg(long, default_value = "images/debian/vmlinuz")]
    pub kernel: PathBuf,
    /// The L2 guest's initramfs: one with KVM's modules and `load-kvm` (tools/debian-guest.sh's
    /// initrd-nested.img); this binary and its libraries are appended to it.
    #[arg(long, default_value = "images/debian/initrd-nested.img")]
    pub initrd: PathBuf,
    /// The L2 guest's memory.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// The L2 guest's vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Also run the bench guest under QEMU (`-M q35 -accel kvm`) at both levels: here, and
    /// inside the L2 guest (QEMU, its libraries and firmware are added to its initramfs).
    #[arg(long, value_enum)]
    pub vs: Option<super::Peer>,
}

/// The command that runs this bench where it can run.
const WHERE: &str = "tools/svm-host.sh exitless bench nested";

/// Refuses hosts whose KVM gives guests no hardware virtualization, with the reason; returns
/// KVM's TSC rate where it tells.
fn check_host() -> Result<Option<u64>, String> {
    let kvm = crate::vmm::open_kvm().map_err(|e| e.to_string())?;
    let host = crate::host::HostInfo::detect(&kvm);
    if host.is_pvm() {
        return Err(format!(
            "this host's KVM is PVM, which runs guests without hardware virtualization (no VMX \
             or SVM), so no guest of it can run KVM itself: run the bench in a host whose KVM \
             gives guests SVM or VMX, e.g. the emulated SVM host: {WHERE}"
        ));
    }
    let offered = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| crate::arch::x86_64::nested::offered(c.as_slice()));
    if offered.is_none() {
        return Err(format!(
            "the host KVM gives guests no hardware virtualization (no SVM or VMX in \
             KVM_GET_SUPPORTED_CPUID; kvm_amd/kvm_intel with nested=1 on a host with AMD-V or \
             VT-x), so no guest of it can run KVM itself: run the bench where it does, e.g. the \
             emulated SVM host: {WHERE}"
        ));
    }
    Ok(super::host_tsc_hz(&kvm, &host))
}

fn check_inputs(args: &NestedArgs) -> Result<(), String> {
    for (what, p) in [("--kernel", &args.kernel), ("--initrd", &args.initrd)] {
        if !p.is_file() {
            return Err(format!(
                "{what} {}: not found (the Debian guest and its initrd-nested.img are built by \
                 tools/debian-guest.sh images/debian)",
                p.display()
            ));
        }
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!("--timeout {}: not a positive number", args.timeout));
    }
    if args.cpus == 0 {
        return Err("--cpus 0: the guest needs a vCPU".into());
    }
    Ok(())
}

// --- the guest's initramfs: initrd-nested.img + this binary -----------------------------------

/// One newc archive entry (the format the kernel unpacks an initramfs from).
pub fn newc_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let name = name.trim_start_matches('/');
    let fields = [
        0,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// The ELF interpreter (PT_INTERP) of `elf`, e.g. /lib64/ld-linux-x86-64.so.2.
pub fn interpreter(elf: &[u8]) -> Option<String> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let (phoff, phentsize, phnum) = (u64_at(0x20)? as usize, u16_at(0x36)?, u16_at(0x38)?);
    (0..phnum as usize).find_map(|i| {
        let ph = phoff + i * phentsize as usize;
        if u32::from_le_bytes(elf.get(ph..ph + 4)?.try_into().ok()?) != 3 {
            return None;
        }
        let (off, size) = (u64_at(ph + 8)? as usize, u64_at(ph + 32)? as usize);
        let s = elf.get(off..off.checked_add(size)?)?;
        Some(
            String::from_utf8_lossy(s)
                .trim_end_matches('\0')
                .to_string(),
        )
    })
}

/// The shared libraries `binary` loads, as its dynamic loader lists them (`ld.so --list`, what
/// `ldd` runs), the loader included; none for a static binary.
fn shared_libraries(binary: &Path, elf: &[u8]) -> Result<Vec<String>, String> {
    let Some(interp) = interpreter(elf) else {
        return Ok(Vec::new());
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{interp} --list {}: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "{interp} --list {} failed: {}",
            binary.display(),
            text.trim()
        ));
    }
    let mut libs: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let path = l.split("=> ").last()?.split(" (").next()?.trim();
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    if !libs.contains(&interp) {
        libs.push(interp);
    }
    Ok(libs)
}

/// `base` followed by an archive with `binary` at /bin/exitless and its shared libraries at their
/// paths, written to `out` (an initramfs that runs exitless inside the guest; the nested test
/// builds its own with the binary under test).
pub fn initrd_with_exitless(base: &Path, binary: &Path, out: &Path) -> Result<(), String> {
    initrd_with(base, binary, None, out)
}

/// QEMU as the guest's peer VMM: `qemu-system-x86_64` (from PATH) and the firmware files of
/// [`QEMU_FIRMWARE`] this host has.
#[derive(Clone, Debug)]
pub struct QemuFiles {
    pub binary: PathBuf,
    pub firmware: Vec<PathBuf>,
}

/// What `qemu-system-x86_64 -M q35 -accel kvm -kernel ELF` may load (SeaBIOS, the option ROMs
/// of its direct kernel boot: PVH, Linux, multiboot; kvmvapic), where Debian's packages put them
/// (QEMU searches /usr/share/qemu, then /usr/share/seabios); the same list as
/// tools/svm-host.sh's.
pub const QEMU_FIRMWARE: &[&str] = &[
    "/usr/share/qemu/bios-256k.bin",
    "/usr/share/qemu/bios.bin",
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/multiboot_dma.bin",
    "/usr/share/qemu/efi-virtio.rom",
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/seabios/bios.bin",
    "/usr/share/seabios/bios-microvm.bin",
];

impl QemuFiles {
    /// QEMU on PATH and its firmware, or why not.
    pub fn find() -> Result<QemuFiles, String> {
        let found = super::find_program("qemu-system-x86_64").ok_or(
            "qemu-system-x86_64 is not on PATH (apt-get install qemu-system-x86; the emulated \
             SVM host of tools/svm-host.sh has it)",
        )?;
        // Its real path (e.g. /usr/bin, not a symlink in a directory only this host has on
        // PATH): the guest gets it there, on the guest's PATH.
        let binary =
            std::fs::canonicalize(&found).map_err(|e| format!("{}: {e}", found.display()))?;
        let firmware: Vec<PathBuf> = QEMU_FIRMWARE
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_file())
            .collect();
        if !firmware.iter().any(|p| p.ends_with("bios-256k.bin")) {
            return Err(format!(
                "QEMU's BIOS (bios-256k.bin) is in none of {:?}: apt-get install seabios",
                QEMU_FIRMWARE
            ));
        }
        Ok(QemuFiles { binary, firmware })
    }
}

/// `base` followed by one more archive: `exitless` at /bin/exitless and, with `qemu`, QEMU at its
/// own path and its firmware; every program with the shared libraries its loader lists, at their
/// paths (each file once). Written to `out`.
pub fn initrd_with(
    base: &Path,
    exitless: &Path,
    qemu: Option<&QemuFiles>,
    out: &Path,
) -> Result<(), String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut img = read(base)?;
    let mut files: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut programs = vec![("/bin/exitless".to_string(), exitless.to_path_buf())];
    if let Some(q) = qemu {
        programs.push((q.binary.display().to_string(), q.binary.clone()));
        for f in &q.firmware {
            // Read through symlinks: the guest gets the file at the path QEMU looks at.
            files.insert(f.display().to_string(), read(f)?);
        }
    }
    for (at, host) in &programs {
        let elf = read(host)?;
        for lib in shared_libraries(host, &elf)? {
            if let std::collections::btree_map::Entry::Vacant(e) = files.entry(lib) {
                let data = read(Path::new(e.key()))?;
                e.insert(data);
            }
        }
        files.insert(at.clone(), elf);
    }
    let mut dirs = std::collections::BTreeSet::new();
    for (path, data) in &files {
        let parents: Vec<_> = Path::new(path).ancestors().skip(1).collect();
        for parent in parents.into_iter().rev() {
            let d = parent.display().to_string();
            if d.len() > 1 && dirs.insert(d.clone()) {
                newc_entry(&mut img, &d, 0o040755, &[]);
            }
        }
        newc_entry(&mut img, path, 0o100755, data);
    }
    newc_entry(&mut img, "TRAILER!!!", 0, &[]);
    std::fs::write(out, img).map_err(|e| format!("cannot write {}: {e}", out.display()))
}

// --- the L2 guest's console ------------------------------------------------------------------

/// The Debian guest under exitless: its console read as it arrives, commands typed into it.
pub(crate) struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    errors: PathBuf,
    steps: u32,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Guest {
    pub(crate) fn start(args: &[String], errors: &Path) -> Result<Guest, String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("run").args(args);
        Guest::start_command(cmd, errors)
    }

    /// A guest whose VMM (exitless or a peer) `cmd` starts, its console on stdout.
    pub(crate) fn start_command(mut cmd: Command, errors: &Path) -> Result<Guest, String> {
        let err_file = std::fs::File::create(errors).map_err(|e| e.to_string())?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err_file)
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let reader = {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    out.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&chunk[..n]);
                }
            })
        };
        Ok(Guest {
            stdin: child.stdin.take(),
            child,
            out,
            reader: Some(reader),
            errors: errors.to_path_buf(),
            steps: 0,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn console(&self) -> Vec<u8> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// What went wrong, with the last console lines and what the outer exitless said.
    fn context(&self, why: &str) -> String {
        format!(
            "{why}\n  last console lines of the L2 guest:\n{}\n  the outer exitless said:\n{}",
            tail(&String::from_utf8_lossy(&self.console()), 12),
            tail(&read_lossy(&self.errors), 6)
        )
    }

    /// Waits until `pat` shows after byte `from`; returns the offset just past it.
    pub(crate) fn wait_for(
        &mut self,
        pat: &str,
        from: usize,
        limit: Duration,
        what: &str,
    ) -> Result<usize, String> {
        let deadline = Instant::now() + limit;
        loop {
            let seen = |g: &Guest| {
                let out = g.out.lock().unwrap_or_else(|p| p.into_inner());
                find(&out[from.min(out.len())..], pat.as_bytes()).map(|i| from + i + pat.len())
            };
            if let Some(at) = seen(self) {
                return Ok(at);
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                if let Some(at) = seen(self) {
                    return Ok(at);
                }
                return Err(self.context(&format!("{what}: the L2 guest's exitless ended ({st})")));
            }
            if Instant::now() > deadline {
                return Err(
                    self.context(&format!("{what}: nothing within {} s", limit.as_secs_f64()))
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn send(&mut self, line: &str) -> Result<(), String> {
        if type_line(self.stdin.as_mut(), line) {
            Ok(())
        } else {
            Err(self.context("the L2 guest's console is closed"))
        }
    }

    /// Types one command line and waits for its end marker; returns the console from then on.
    pub(crate) fn step(&mut self, cmd: &str, limit: Duration) -> Result<String, String> {
        self.steps += 1;
        let n = self.steps;
        let from = self.len();
        self.send(&format!("{cmd}; r step-{n} done"))?;
        let end = self.wait_for(&format!("=R= step-{n} done"), from, limit, cmd)?;
        Ok(String::from_utf8_lossy(&self.console()[from..end]).into_owned())
    }

    /// Ends the guest: `poweroff -f`, then a kill when it does not go.
    pub(crate) fn stop(mut self) {
        let _ = self.send("poweroff -f");
        drop(self.stdin.take());
        let _ = wait_with_limit(&mut self.child, Duration::from_secs(60));
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Types `line` and a newline on a guest's console (its VMM's stdin; `None` once closed);
/// false when it is closed. The Debian tests' console driver types through it too.
pub fn type_line(stdin: Option<&mut ChildStdin>, line: &str) -> bool {
    stdin.is_some_and(|s| {
        s.write_all(line.as_bytes())
            .and_then(|_| s.write_all(b"\n"))
            .and_then(|_| s.flush())
            .is_ok()
    })
}

/// The lines between the `=R= BEGIN` and `=R= END` lines of `text` (a file the guest printed).
pub fn between(text: &str, begin: &str, end: &str) -> Option<String> {
    let b = format!("=R= {begin}");
    let e = format!("=R= {end}");
    let start = text.find(&b)? + b.len();
    let start = start + text[start..].find('\n')? + 1;
    let stop = start + text[start..].find(&e)?;
    // The marker may follow the shell's prompt on its line: drop that line's start too.
    let stop = text[..stop]
        .rfind('\n')
        .map_or(start, |i| (i + 1).max(start));
    Some(text[start..stop].replace('\r', ""))
}

// --- counters ----------------------------------------------------------------------------------

/// L1's KVM statistics of the L2 guest's VM (all its vCPUs), through the outer control socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L1Counters {
    pub kvm_exits: u64,
    pub nested_run: Option<u64>,
    pub userspace_exits: u64,
}

impl L1Counters {
    pub fn of(reply: &Value) -> Result<L1Counters, String> {
        let kvm_exits = reply["kvm"]["exits"].as_u64().ok_or_else(|| {
            format!(
                "the outer exitless's stats have no KVM `exits` counter (a host without \
                 KVM_GET_STATS_FD?): {}",
                super::clip(&reply.to_string())
            )
        })?;
        Ok(L1Counters {
            kvm_exits,
            nested_run: reply["kvm"]["nested_run"].as_u64(),
            userspace_exits: reply["exits"]
                .as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0),
        })
    }

    fn read(socket: &Path) -> Result<L1Counters, String> {
        L1Counters::of(&crate::api::request(socket, &crate::api::Call::Stats)?)
    }

    pub fn since(&self, earlier: &L1Counters) -> L1Counters {
        L1Counters {
            kvm_exits: self.kvm_exits.saturating_sub(earlier.kvm_exits),
            nested_run: self
                .nested_run
                .zip(earlier.nested_run)
                .map(|(a, b)| a.saturating_sub(b)),
            userspace_exits: self.userspace_exits.saturating_sub(earlier.userspace_exits),
        }
    }
}

/// What one `exitless bench exits --json --counts FILE` gave.
#[derive(Clone, Debug)]
pub struct Level {
    /// Its JSON array.
    pub rows: Vec<Value>,
    /// KVM's exits of its bench VMs, all rounds.
    pub kvm_exits: Option<u64>,
    pub userspace_exits: Option<u64>,
    /// The rows of a separate `--vs qemu` run whose `peer_ns` are QEMU's (at L3, where QEMU
    /// runs apart from the counted run); `None`: QEMU's figures, if any, are in `rows`.
    pub peer: Option<Vec<Value>>,
}

impl Level {
    pub fn of(json_text: &str, counts_text: &str) -> Result<Level, String> {
        let rows = match serde_json::from_str::<Value>(json_text.trim()) {
            Ok(Value::Array(a)) => a,
            Ok(_) => return Err("its JSON is not an array".into()),
            Err(e) => {
                return Err(format!(
                    "its JSON does not parse ({e}): {}",
                    super::clip(json_text)
                ))
            }
        };
        let counts: Value = serde_json::from_str(counts_text.trim()).map_err(|e| {
            format!(
                "its counts do not parse ({e}): {}",
                super::clip(counts_text)
            )
        })?;
        Ok(Level {
            rows,
            kvm_exits: counts["kvm_exits"].as_u64(),
            userspace_exits: counts["exits_to_userspace"].as_u64(),
            peer: None,
        })
    }

    fn row(&self, op: &str) -> Option<&Value> {
        self.rows.iter().find(|r| r["op"] == op)
    }

    /// QEMU's time for `op` at this level (`--vs qemu`).
    fn qemu_ns(&self, op: &str) -> Option<f64> {
        let rows = self.peer.as_ref().unwrap_or(&self.rows);
        rows.iter().find(|r| r["op"] == op)?["peer_ns"].as_f64()
    }
}

/// The `bench exits` arguments both levels run with.
fn exits_args(args: &NestedArgs, counts: &str, vs_qemu: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "bench",
        "exits",
        "--json",
        "--rounds",
        &args.rounds.to_string(),
        "--counts",
        counts,
        "--timeout",
        &format!("{}", args.timeout),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if args.quick {
        v.push("--quick".into());
    }
    if vs_qemu {
        v.extend(["--vs".into(), "qemu".into()]);
    }
    v
}

/// How long one `bench exits` stage may take: each round's VM has `--timeout`.
fn bench_limit(args: &NestedArgs) -> Duration {
    (Duration::from_secs_f64(args.timeout) + super::KILL_GRACE) * args.rounds
}

/// L2: `exitless bench exits` here, as a child process.
fn run_l2(args: &NestedArgs, dir: &Path) -> Result<Level, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let (out, errors, counts) = (
        dir.join("l2.json"),
        dir.join("l2-stderr.log"),
        dir.join("l2-counts.json"),
    );
    let mut child = Command::new(&exe)
        .args(exits_args(
            args,
            &counts.display().to_string(),
            args.vs == Some(super::Peer::Qemu),
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(&errors).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let limit = bench_limit(args);
    let fin = wait_with_limit(&mut child, limit).map_err(|e| e.to_string())?;
    let said = || tail(&read_lossy(&errors), 8);
    match fin {
        super::Finished::TimedOut => Err(format!(
            "L2: exitless bench exits did not end within {} s; killed\n{}",
            limit.as_secs_f64(),
            said()
        )),
        super::Finished::Exited(s) if !s.success() => Err(format!(
            "L2: exitless bench exits failed ({s}):\n{}",
            said()
        )),
        super::Finished::Exited(_) => Level::of(&read_lossy(&out), &read_lossy(&counts))
            .map_err(|e| format!("L2: exitless bench exits: {e}")),
    }
}

/// How long the L2 guest may take to print a JSON file: every byte is an exit of its serial port,
/// and in the emulated SVM host a few kilobytes once took over the 120 s of an ordinary step.
const JSON_STEP: Duration = Duration::from_secs(600);

/// The L2 guest's shell command that prints JSON file `path` without its indentation (a third
/// of the bytes): a pretty-printed JSON's line starts are never inside a string.
fn show_json(path: &str) -> String {
    format!("sed 's/^ *//' {path}; echo")
}

/// `exitless bench exits --vs qemu` inside the L2 guest: its rows, whose `peer_ns` are QEMU's
/// at L3.
fn l3_qemu(g: &mut Guest, args: &NestedArgs, step: Duration) -> Result<Vec<Value>, String> {
    let inner = exits_args(args, "/tmp/l3q-counts.json", true).join(" ");
    let out = g.step(
        &format!("exitless {inner} </dev/null >/tmp/l3q.json 2>/tmp/l3q.err; r l3qstatus $?"),
        bench_limit(args) * 2,
    )?;
    let status = results(&out).remove("l3qstatus").unwrap_or_default();
    let shown = if status == "0" {
        g.step(
            &format!("r json-begin; {}; r json-end", show_json("/tmp/l3q.json")),
            JSON_STEP,
        )?
    } else {
        let err = g.step("cat /tmp/l3q.err", step)?;
        return Err(g.context(&format!(
            "L3: exitless bench exits --vs qemu inside the L2 guest failed (status {status:?}):\n{}",
            tail(&err.replace('\r', ""), 10)
        )));
    };
    let text = between(&shown, "json-begin", "json-end")
        .ok_or_else(|| g.context("L3: the QEMU bench's JSON did not come back whole"))?;
    match serde_json::from_str::<Value>(text.trim()) {
        Ok(Value::Array(rows)) => Ok(rows),
        _ => Err(g.context(&format!(
            "L3: the QEMU bench's JSON is not an array: {}",
            super::clip(&text)
        ))),
    }
}

/// What the L3 stage measured.
struct Inner {
    level: Level,
    l1: L1Counters,
    seconds: f64,
    /// The demo guest's loops at L3 (cycles per iteration at CPL3 and CPL0).
    loops: Option<(f64, f64)>,
}

/// The demo guest here (at L2): its loops' cycles per iteration, at CPL3 and CPL0.
fn demo_l2(args: &NestedArgs, dir: &Path) -> Result<(f64, f64), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let (out, errors) = (dir.join("demo.log"), dir.join("demo-stderr.log"));
    let mut child = Command::new(&exe)
        .args(["run", "--no-summary", "--timeout"])
        .arg(format!("{}", args.timeout))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(std::fs::File::create(&errors).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let limit = Duration::from_secs_f64(args.timeout) + super::KILL_GRACE;
    let fin = wait_with_limit(&mut child, limit).map_err(|e| e.to_string())?;
    let text = read_lossy(&out);
    match (fin, loops(&text)) {
        (super::Finished::Exited(s), Some(l)) if s.success() => Ok(l),
        (fin, _) => Err(format!(
            "L2: the demo guest ({fin:?}) printed no loop timings:\n{}\n{}",
            tail(&text, 6),
            tail(&read_lossy(&errors), 6)
        )),
    }
}

/// L3: the Debian guest with nesting, its KVM, and `exitless bench exits` inside it.
fn run_l3(args: &NestedArgs, dir: &Path, progress: &dyn Fn(&str)) -> Result<Inner, String> {
    let initrd = dir.join("initrd-nested-exitless.img");
    let exe = std::env::current_exe().map_err(|e| format!("cannot find exitless itself: {e}"))?;
    let qemu = match args.vs {
        Some(super::Peer::Qemu) => Some(QemuFiles::find().map_err(|e| format!("--vs qemu: {e}"))?),
        None => None,
    };
    initrd_with(&args.initrd, &exe, qemu.as_ref(), &initrd)?;
    let socket = dir.join("l2.sock");
    let limit = Duration::from_secs_f64(args.timeout);
    let s = |p: &Path| p.display().to_string();
    let vm_args: Vec<String> = vec![
        "--kernel".into(),
        s(&args.kernel),
        "--initrd".into(),
        s(&initrd),
        "--cpus".into(),
        args.cpus.to_string(),
        "--mem".into(),
        args.mem.clone(),
        "--nested".into(),
        "on".into(),
        "--api-socket".into(),
        s(&socket),
        "--no-summary".into(),
        "--timeout".into(),
        // Its boot, the bench's rounds and the demo, each with its own limit, fit in this.
        format!(
            "{}",
            (3.0 + args.rounds as f64) * (args.timeout + super::KILL_GRACE.as_secs_f64())
        ),
    ];
    progress("booting the Debian guest (L2) with --nested on");
    let mut g = Guest::start(&vm_args, &dir.join("l2-guest-stderr.log"))?;
    let at = g.wait_for("exitless-guest: nproc=", 0, limit, "the L2 guest's boot")?;
    g.wait_for("exitless# ", at, limit, "the L2 guest's shell prompt")?;
    let step = Duration::from_secs(120);
    g.step("stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }", step)?;
    let out = g.step("load-kvm nested=1; r loadkvm $?", step)?;
    if results(&out).get("loadkvm").map(String::as_str) != Some("0") {
        let why = g.step(
            "r why $(dmesg | grep -iE 'kvm|svm|vmx' | tail -n 3 | tr '\\n' ' ')",
            step,
        )?;
        return Err(g.context(&format!(
            "the L2 guest could not load KVM (load-kvm nested=1): {}",
            results(&why).remove("why").unwrap_or_default()
        )));
    }
    progress("running exitless bench exits inside the L2 guest (the bench guest at L3)");
    // QEMU's L3 run is a second inner bench, after the counted one: L1's counters must see
    // exitless's L3 exits alone.
    let inner = exits_args(args, "/tmp/l3-counts.json", false).join(" ");
    let before = L1Counters::read(&socket)?;
    let started = Instant::now();
    let out = g.step(
        &format!("exitless {inner} </dev/null >/tmp/l3.json 2>/tmp/l3.err; r l3status $?"),
        bench_limit(args),
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let after = L1Counters::read(&socket)?;
    let status = results(&out).remove("l3status").unwrap_or_default();
    if status != "0" {
        let err = g.step("cat /tmp/l3.err", step)?;
        return Err(g.context(&format!(
            "L3: exitless bench exits inside the L2 guest failed (status {status:?}):\n{}",
            tail(&err.replace('\r', ""), 10)
        )));
    }
    let shown = g.step(
        &format!(
            "r json-begin; {}; r json-end; r counts-begin; {}; r counts-end",
            show_json("/tmp/l3.json"),
            show_json("/tmp/l3-counts.json")
        ),
        JSON_STEP,
    )?;
    let json_text = between(&shown, "json-begin", "json-end")
        .ok_or_else(|| g.context("L3: the inner bench's JSON did not come back whole"))?;
    let counts_text = between(&shown, "counts-begin", "counts-end")
        .ok_or_else(|| g.context("L3: the inner bench's counts did not come back whole"))?;
    let mut level = Level::of(&json_text, &counts_text)
        .map_err(|e| g.context(&format!("L3: exitless bench exits: {e}")))?;
    if qemu.is_some() {
        progress("running exitless bench exits --vs qemu inside the L2 guest (QEMU at L3)");
        level.peer = Some(l3_qemu(&mut g, args, step)?);
    }
    // The CPU-bound loops, after the counters' second read (they are no part of the figure).
    progress("running the demo guest inside the L2 guest (its CPU-bound loops at L3)");
    let demo = g.step(
        &format!(
            "exitless run --no-summary --timeout {} </dev/null >/tmp/demo 2>&1; \
             r demostatus $?; grep 'kit: loop at' /tmp/demo",
            args.timeout
        ),
        limit + super::KILL_GRACE,
    )?;
    let loops = loops(&demo.replace('\r', ""));
    if loops.is_none() {
        return Err(g.context(&format!(
            "L3: the demo guest printed no loop timings (status {:?})",
            results(&demo).remove("demostatus").unwrap_or_default()
        )));
    }
    g.stop();
    Ok(Inner {
        level,
        l1: after.since(&before),
        seconds,
        loops,
    })
}

// --- the result --------------------------------------------------------------------------------

/// One operation at both levels.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub op: String,
    pub l2_ns: Option<f64>,
    pub l3_ns: Option<f64>,
    pub ratio: Option<f64>,
    pub l2_exit: Value,
    pub l3_exit: Value,
    /// The same operation under QEMU at each level (`--vs qemu`).
    pub l2_qemu_ns: Option<f64>,
    pub l3_qemu_ns: Option<f64>,
    /// Set on the CPU-bound rows (which make no exits): what they are.
    pub loop_note: Option<&'static str>,
}

/// The overall exit figures of the L3 run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Turtles {
    pub l3_exits: Option<u64>,
    pub l1: L1Counters,
    pub rounds: u32,
}

impl Turtles {
    pub fn l1_exits_per_l3_exit(&self) -> Option<f64> {
        self.l3_exits
            .filter(|&n| n > 0)
            .map(|n| round3(self.l1.kvm_exits as f64 / n as f64))
    }

    pub fn nested_runs_per_l3_exit(&self) -> Option<f64> {
        self.l3_exits
            .filter(|&n| n > 0)
            .zip(self.l1.nested_run)
            .map(|(n, r)| round3(r as f64 / n as f64))
    }
}

pub const LOOP_NOTE: &str = "a CPU-bound loop of the demo guest (no exits), ns per iteration \
     from its cycles per iteration and this host's TSC rate (both levels count the same TSC); \
     CPL3: 100 M iterations, CPL0: 20 k";

/// The demo guest's CPU-bound loops in `console`: cycles per iteration at CPL3 and at CPL0
/// (`kit: loop at CPL3: N iterations in T ms (C cycles/iter)`).
pub fn loops(console: &str) -> Option<(f64, f64)> {
    let cycles = |cpl: &str| -> Option<f64> {
        let line = console
            .lines()
            .find_map(|l| Some(&l[l.find(&format!("kit: loop at {cpl}: "))?..]))?;
        let (_, rest) = line.split_once(" (")?;
        rest.split_whitespace().next()?.parse().ok()
    };
    Some((cycles("CPL3")?, cycles("CPL0")?))
}

/// The CPU-bound rows from both levels' loops (cycles per iteration) and the TSC rate.
pub fn loop_rows(l2: (f64, f64), l3: (f64, f64), tsc_hz: u64) -> Vec<Row> {
    let ns = |c: f64| round3(c * 1e9 / tsc_hz as f64);
    [("loop_cpl3", l2.0, l3.0), ("loop_cpl0", l2.1, l3.1)]
        .into_iter()
        .map(|(op, a, b)| Row {
            op: op.to_string(),
            l2_ns: Some(ns(a)),
            l3_ns: Some(ns(b)),
            ratio: (a > 0.0).then(|| round3(b / a)),
            l2_exit: Value::Null,
            l3_exit: Value::Null,
            l2_qemu_ns: None,
            l3_qemu_ns: None,
            loop_note: Some(LOOP_NOTE),
        })
        .collect()
}

pub const NOTE: &str = "l1_exits_per_l3_exit is one figure for the whole L3 run, repeated per \
     operation: L1 KVM exits of the L2 VM while the inner bench ran (L2's own work included) / \
     KVM exits of the L3 bench VMs (every operation, boot and power-off, all rounds); counters \
     read before and after cannot attribute exits to operations";

/// Pairs the two levels' rows by operation (the L2 order; rows without a time at either level
/// are kept with nulls).
pub fn rows(l2: &Level, l3: &Level) -> Vec<Row> {
    l2.rows
        .iter()
        .filter_map(|r| r["op"].as_str())
        .map(|op| {
            let (a, b) = (l2.row(op), l3.row(op));
            let ns = |r: Option<&Value>| r.and_then(|r| r["ns"].as_f64());
            let (l2_ns, l3_ns) = (ns(a), ns(b));
            Row {
                op: op.to_string(),
                l2_ns,
                l3_ns,
                ratio: l2_ns
                    .zip(l3_ns)
                    .filter(|(x, _)| *x > 0.0)
                    .map(|(x, y)| round3(y / x)),
                l2_exit: a.map(|r| r["exit"].clone()).unwrap_or(Value::Null),
                l3_exit: b.map(|r| r["exit"].clone()).unwrap_or(Value::Null),
                l2_qemu_ns: l2.qemu_ns(op),
                l3_qemu_ns: l3.qemu_ns(op),
                loop_note: None,
            }
        })
        .collect()
}

pub fn to_json(rows: &[Row], t: &Turtles) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                let exits = r.loop_note.is_none();
                json!({
                    "op": r.op,
                    "l2_ns": r.l2_ns,
                    "l3_ns": r.l3_ns,
                    "ratio": r.ratio,
                    "l2_exit": r.l2_exit,
                    "l3_exit": r.l3_exit,
                    "l2_qemu_ns": r.l2_qemu_ns,
                    "l3_qemu_ns": r.l3_qemu_ns,
                    "l3_qemu_over_exitless": r.l3_qemu_ns.zip(r.l3_ns)
                        .filter(|(_, x)| *x > 0.0)
                        .map(|(q, x)| round3(q / x)),
                    "l1_exits_per_l3_exit": t.l1_exits_per_l3_exit().filter(|_| exits),
                    "l1_nested_runs_per_l3_exit": t.nested_runs_per_l3_exit().filter(|_| exits),
                    "l3_exits": t.l3_exits.filter(|_| exits),
                    "l1_exits": Some(t.l1.kvm_exits).filter(|_| exits),
                    "note": r.loop_note.unwrap_or(NOTE),
                })
            })
            .collect(),
    )
}

fn exit_text(v: &Value) -> String {
    match v {
        Value::Null => "in-kernel".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

pub fn table(rows: &[Row], t: &Turtles, l3_seconds: Option<f64>) -> String {
    let f = |v: Option<f64>| {
        v.map_or("-".to_string(), |x| {
            if x < 10.0 {
                format!("{x:.3}")
            } else {
                format!("{x:.1}")
            }
        })
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "exitless bench nested: the kit's bench guest at L2 (under exitless here) and at L3 \
         (under exitless inside the Debian guest, which runs under exitless here with --nested \
         on); best median of {} round{} per level",
        t.rounds,
        if t.rounds == 1 { "" } else { "s" }
    );
    let qemu = rows
        .iter()
        .any(|r| r.l2_qemu_ns.is_some() || r.l3_qemu_ns.is_some());
    let _ = write!(
        s,
        "{:<26} {:>10} {:>10} {:>8}  {:<10} {:<10}",
        "op", "L2 ns", "L3 ns", "L3/L2", "L2 exit", "L3 exit"
    );
    let _ = writeln!(
        s,
        "{}",
        if qemu {
            format!(
                " {:>12} {:>12} {:>16}",
                "L2 qemu ns", "L3 qemu ns", "L3 qemu/exitless"
            )
        } else {
            String::new()
        }
    );
    for r in rows {
        // exitless's dispatch cost and the CPU-bound loops are no exits of their own.
        let no_exit = r.loop_note.is_some() || r.op.starts_with("vmm_dispatch");
        let exit = |ns: Option<f64>, e: &Value| {
            if ns.is_some() && !no_exit {
                exit_text(e)
            } else {
                "-".into()
            }
        };
        let _ = write!(
            s,
            "{:<26} {:>10} {:>10} {:>8}  {:<10} {:<10}",
            r.op,
            f(r.l2_ns),
            f(r.l3_ns),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            exit(r.l2_ns, &r.l2_exit),
            exit(r.l3_ns, &r.l3_exit),
        );
        if qemu {
            let vs = r
                .l3_qemu_ns
                .zip(r.l3_ns)
                .filter(|(_, x)| *x > 0.0)
                .map_or("-".into(), |(q, x)| format!("{:.2}", q / x));
            let _ = write!(
                s,
                " {:>12} {:>12} {:>16}",
                f(r.l2_qemu_ns),
                f(r.l3_qemu_ns),
                vs
            );
        }
        let _ = writeln!(s);
    }
    if qemu {
        let _ = writeln!(
            s,
            "qemu: the same bench guest under qemu-system-x86_64 -M q35 -accel kvm at each level \
             (at L3 in a second inner bench, after the counted one)"
        );
    }
    let per = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.1}"));
    let _ = writeln!(
        s,
        "L3 exits (KVM's exits of the L3 bench VMs as L2's KVM counts them, {} round{}): {}{}",
        t.rounds,
        if t.rounds == 1 { "" } else { "s" },
        t.l3_exits.map_or("unknown".into(), |n| n.to_string()),
        l3_seconds.map_or(String::new(), |x| format!(
            "; the inner bench took {:.1} s",
            round1(x)
        )),
    );
    let _ = writeln!(
        s,
        "meanwhile L1's KVM, for the L2 VM: {} exits ({} per L3 exit), {} nested VMRUNs ({} per \
         L3 exit), {} exits to the outer exitless",
        t.l1.kvm_exits,
        per(t.l1_exits_per_l3_exit()),
        t.l1.nested_run.map_or("?".into(), |n| n.to_string()),
        per(t.nested_runs_per_l3_exit()),
        t.l1.userspace_exits
    );
    let _ = writeln!(
        s,
        "note: L1's exits include everything L2 did while the inner bench ran (an upper bound of \
         the exits per L3 exit); one figure for the whole run, not per operation. loop_cpl3 and \
         loop_cpl0: {LOOP_NOTE}."
    );
    s
}

/// `exitless bench nested`.
pub fn run(args: &NestedArgs) -> Result<(), String> {
    let tsc_hz = check_host()?;
    check_inputs(args)?;
    let dir =
        TempDir::new("exitless-bench-nested").map_err(|e| format!("temporary directory: {e}"))?;
    let progress = |m: &str| eprintln!("exitless: bench nested: {m}");
    progress("running exitless bench exits here (the bench guest at L2)");
    let l2 = run_l2(args, dir.path())?;
    progress("running the demo guest here (its CPU-bound loops at L2)");
    let l2_loops = demo_l2(args, dir.path())?;
    let inner = run_l3(args, dir.path(), &progress)?;
    let mut rows = rows(&l2, &inner.level);
    if let (Some(l3_loops), Some(hz)) = (inner.loops, tsc_hz) {
        rows.extend(loop_rows(l2_loops, l3_loops, hz));
    }
    let t = Turtles {
        l3_exits: inner.level.kvm_exits,
        l1: inner.l1,
        rounds: args.rounds,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&rows, &t)).expect("JSON")
        );
    } else {
        print!("{}", table(&rows, &t, Some(inner.seconds)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_comes_back_without_its_indentation_and_unchanged() {
        let v = serde_json::json!([
            {"op": "cpuid", "spread_ns": [1.5, 2.0], "note": "  two  spaces  ", "peer": null},
            {"op": "pio_out", "nested": {"a": [1, {"b": "x"}]}}
        ]);
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        let dir = TempDir::new("exitless-show-json").unwrap();
        let path = dir.path().join("l3.json");
        std::fs::write(&path, &pretty).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(show_json(path.to_str().unwrap()))
            .output()
            .unwrap();
        let shown = String::from_utf8(out.stdout).unwrap();
        assert!(shown.len() < pretty.len() * 3 / 4, "{shown}");
        assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), v);
    }

    #[test]
    fn marked_files_come_back_from_the_console() {
        let text = "exitless# \r\n=R= json-begin\r\n[\r\n  {\"op\": \"cpuid\"}\r\n]\r\n\
                    exitless# =R= json-end\r\n=R= step-4 done\r\n";
        assert_eq!(
            between(text, "json-begin", "json-end").unwrap(),
            "[\n  {\"op\": \"cpuid\"}\n]\n"
        );
        assert!(between(text, "json-begin", "nothing").is_none());
        let r = results(text);
        assert_eq!(r["step-4"], "done");
    }

    fn level(ns: &[(&str, Option<f64>)], kvm: u64) -> Level {
        let rows = ns
            .iter()
            .map(|(op, ns)| json!({"op": op, "ns": ns, "exit": null}))
            .collect::<Vec<_>>();
        Level::of(
            &Value::Array(rows).to_string(),
            &json!({"rounds": 1, "kvm_exits": kvm, "exits_to_userspace": 5}).to_string(),
        )
        .unwrap()
    }

    #[test]
    fn levels_pair_by_operation_and_the_turtles_figure_is_l1_over_l3() {
        let l2 = level(&[("cpuid", Some(100.0)), ("pio_out", Some(400.0))], 500);
        let l3 = level(&[("cpuid", Some(2500.0)), ("pio_out", None)], 1000);
        let r = rows(&l2, &l3);
        assert_eq!(r[0].ratio, Some(25.0));
        assert_eq!(r[1].ratio, None);
        let before =
            L1Counters::of(&json!({"kvm": {"exits": 10, "nested_run": 3}, "exits": {"io_out": 2}}))
                .unwrap();
        let after = L1Counters::of(
            &json!({"kvm": {"exits": 8010, "nested_run": 1003}, "exits": {"io_out": 7}}),
        )
        .unwrap();
        let t = Turtles {
            l3_exits: l3.kvm_exits,
            l1: after.since(&before),
            rounds: 1,
        };
        assert_eq!(t.l1_exits_per_l3_exit(), Some(8.0));
        assert_eq!(t.nested_runs_per_l3_exit(), Some(1.0));
        let j = to_json(&r, &t);
        assert_eq!(j[0]["op"], "cpuid");
        assert_eq!(j[0]["l1_exits_per_l3_exit"], 8.0);
        assert_eq!(j[1]["l3_ns"], Value::Null);
        assert!(j[0]["note"].as_str().unwrap().contains("whole L3 run"));
        assert!(table(&r, &t, None).contains("8.0 per L3 exit"));
        assert!(L1Counters::of(&json!({"kvm": {}})).is_err());
    }

    /// `--vs qemu`: QEMU's times come from the L2 rows' `peer_ns` and, at L3, from the separate
    /// QEMU run's rows (never from the counted run's).
    #[test]
    fn qemu_columns_come_from_the_peer_figures_of_each_level() {
        let mut l2 = level(&[("cpuid", Some(100.0))], 500);
        l2.rows[0]["peer_ns"] = json!(120.0);
        let mut l3 = level(&[("cpuid", Some(2000.0))], 1000);
        l3.rows[0]["peer_ns"] = json!(1.0);
        l3.peer = Some(vec![
            json!({"op": "cpuid", "ns": 1900.0, "peer_ns": 3000.0}),
        ]);
        let r = rows(&l2, &l3);
        assert_eq!(
            (r[0].l2_qemu_ns, r[0].l3_qemu_ns),
            (Some(120.0), Some(3000.0))
        );
        let t = Turtles {
            l3_exits: Some(1000),
            l1: L1Counters::default(),
            rounds: 1,
        };
        let j = to_json(&r, &t);
        assert_eq!(j[0]["l3_qemu_over_exitless"], 1.5);
        let text = table(&r, &t, None);
        assert!(
            text.contains("L3 qemu/exitless") && text.contains("1.50"),
            "{text}"
        );
        let plain = rows(
            &level(&[("cpuid", Some(1.0))], 1),
            &level(&[("cpuid", Some(2.0))], 1),
        );
        assert!(!table(&plain, &t, None).contains("qemu"));
    }

    #[test]
    fn the_demo_loops_are_read_from_its_console() {
        let c = "kit: hlt woken\r\nkit: loop at CPL3: 100000000 iterations in 52 ms (1.354 \
                 cycles/iter)\r\nkit: loop at CPL0: 20000 iterations in 61 ms (7964.508 cycles/iter)\n";
        assert_eq!(loops(c), Some((1.354, 7964.508)));
        assert_eq!(
            loops("kit: loop at CPL3: 1 iterations in 1 ms (2.0 cycles/iter)"),
            None
        );
        let r = loop_rows((2.0, 100.0), (3.0, 150.0), 1_000_000_000);
        assert_eq!(
            (r[0].op.as_str(), r[0].l2_ns, r[0].ratio),
            ("loop_cpl3", Some(2.0), Some(1.5))
        );
        let t = Turtles {
            l3_exits: Some(10),
            l1: L1Counters {
                kvm_exits: 50,
                nested_run: Some(10),
                userspace_exits: 0,
            },
            rounds: 1,
        };
        let j = to_json(&r, &t);
        assert_eq!(j[1]["l1_exits_per_l3_exit"], Value::Null);
        assert_eq!(j[1]["note"], LOOP_NOTE);
        assert!(table(&r, &t, Some(2.0)).contains("loop_cpl0"));
    }

    #[test]
    fn the_interpreter_of_a_bad_elf_is_none() {
        assert_eq!(interpreter(b"\x7fELF"), None);
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(interpreter(&me).is_none_or(|i| i.starts_with('/')));
    }
}
