//! The vCPU: its set-up, its thread and its exit path.
//!
//! Owns one `VcpuFd` and its counters. It may touch the device buses (read-only maps of shared
//! devices) and send a [`VmEnd`]; nothing else. Its life is a small state machine driven by the
//! VMM through messages in its mailbox ([`crate::lifecycle`]: pause, resume, stop), a flag that
//! says there is mail, and a kick (a signal that makes `KVM_RUN` return):
//!
//! ```text
//!   Created --start--> Running --(guest ends VM | fatal exit | Stop)--> Exited
//!                       |  ^  |  ^
//!                 kick  v  |  |  | Resume
//!              Interrupted |  v  |
//!              (no mail:   | Parked (Pause: answered, blocked on the mailbox)
//!               re-enter) -+
//! ```
//!
//! The exit path, step by step (this is the product; keep it short):
//! 1. `KVM_RUN` returns; one `rdtsc` closes the time inside it (added to the thread's
//!    `guest_tsc`) and opens the dispatch time (no clock system call, no vDSO; the TSC is
//!    converted to nanoseconds once, when the thread ends);
//! 2. `kvm-ioctls` decodes the exit from the shared `kvm_run` page (no copy: PIO/MMIO data is a
//!    slice of that page);
//! 3. the exit is counted by reason in a plain array owned by this thread, PIO by port (an
//!    array indexed by port), MMIO by page (a one-entry run cache in front of a map);
//! 4. PIO/MMIO goes to the bus: a binary search over a sorted `Vec`, then the device's mutex
//!    (uncontended: devices are per-function) — no allocation, no system call, except what the
//!    device itself does (the UART writes to stdout and the console log; the probe only bumps
//!    an atomic counter);
//! 5. the mailbox flag is read (one atomic load), a second `rdtsc` closes the dispatch time
//!    (`in_vmm`, kept per exit reason: `exitless bench exits` reports it), and `KVM_RUN` is
//!    re-entered.
//!
//! Anything rarer (emulation failures, system events, errors) leaves this path through
//! [`Vcpu::slow_exit`].
//!
//! The VMM runs each vCPU with its panics caught: a panic ends the VM with an error, is named in
//! the report (`panics`) and makes the status non-zero; at the stop, a thread that does not leave
//! `KVM_RUN` after a bounded number of kicks is given up on, the same way.

pub mod emulate;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::{Bus, VmEnd, VmEndSender};
use crate::lifecycle::{Next, VcpuMailbox};
use crate::stats::{tsc, ExitReason, TscClock, VcpuStats};

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub end: VmEndSender,
    /// Unclaimed addresses already reported (each is logged once).
    pub unclaimed: Arc<Mutex<std::collections::HashSet<(bool, u64)>>>,
    /// Complete instructions KVM's emulator fails on (on by default).
    pub complete_failed_emulation: bool,
    /// Record the guest RIP at every kick (`--sample-rips`: the VMM kicks periodically).
    pub sample_rips: bool,
    /// At every kick, complete a kernel-mode `vmcall`/`vmmcall` the vCPU is stuck on (PVM hosts,
    /// where KVM's emulator re-executes it forever; the VMM kicks periodically there).
    pub complete_stuck_hypercalls: bool,
    /// Stamped once, by the first vCPU to enter the guest (the end of the start-up).
    pub first_run: Arc<std::sync::OnceLock<std::time::Instant>>,
    /// KVM's MSR index list (what a snapshot saves).
    pub msr_index: Arc<Vec<u32>>,
    /// The guest has SVM or VMX (a snapshot saves its nested state).
    pub nested: bool,
}

/// `-KVM_ENOSYS`, what KVM itself answers to a hypercall it does not know.
const KVM_ENOSYS: i64 = 1000;

/// If the vCPU stopped at a CPL0 `vmcall`/`vmmcall`, completes it as KVM does an unknown
/// hypercall: RAX = -KVM_ENOSYS and RIP past the instruction. Every Linux caller handles ENOSYS
/// (e.g. `ptp_kvm`'s clock-pairing probe, which otherwise hangs the boot of a kernel that has it
/// built in). Returns whether it completed one.
fn complete_stuck_hypercall(fd: &VcpuFd, mem: &GuestMemoryMmap) -> bool {
    let (Ok(mut regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
        return false;
    };
    if sregs.cs.selector & 3 != 0 {
        return false;
    }
    let mut insn = [0u8; 3];
    let mut access = VcpuMemory { fd, mem };
    if emulate::GuestAccess::read(&mut access, regs.rip, &mut insn).is_err() {
        return false;
    }
    if insn != [0x0f, 0x01, 0xc1] && insn != [0x0f, 0x01, 0xd9] {
        return false;
    }
    regs.rax = (-KVM_ENOSYS) as u64;
    regs.rip = regs.rip.wrapping_add(3);
    fd.set_regs(&regs).is_ok()
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    shared: VcpuShared,
    stats: VcpuStats,
    /// Where the VMM's pause, resume and stop arrive.
    mailbox: VcpuMailbox,
}

/// Signal used to kick a vCPU out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs the (empty) kick handler; its only job is to interrupt `KVM_RUN` with EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd, shared: VcpuShared, mailbox: VcpuMailbox) -> Self {
        Vcpu {
            id,
            fd,
            shared,
            stats: VcpuStats::default(),
            mailbox,
        }
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Also counts this vCPU's exits into `live`, which others may read while it runs.
    pub fn share_exit_counts(&mut self, live: std::sync::Arc<crate::stats::LiveExits>) {
        self.stats.live = Some(live);
    }

    /// Runs until the VM ends or the VMM stops this vCPU; returns the counters.
    pub fn run(mut self) -> VcpuStats {
        let clock = TscClock::start();
        let mut left_guest: Option<u64> = None;
        self.shared.first_run.get_or_init(std::time::Instant::now);
        loop {
            if self.mailbox.has_mail() {
                let Vcpu {
                    mailbox,
                    fd,
                    shared,
                    id,
                    ..
                } = &mut self;
                if mailbox.handle(&mut || save_state(fd, shared, *id)) == Next::Stop {
                    break;
                }
                // Time parked is not time spent handling the exit.
                left_guest = None;
            }
            let Vcpu {
                fd, shared, stats, ..
            } = &mut self;
            let t0 = tsc();
            if let Some(t) = left_guest {
                // Userspace dispatch: from KVM_RUN returning to re-entering it.
                stats.add_vmm_tsc(t0.wrapping_sub(t));
            }
            let exit = fd.run();
            let t1 = tsc();
            stats.guest_tsc += t1.wrapping_sub(t0);
            if let Some(l) = &stats.live {
                l.1.fetch_add(t1.wrapping_sub(t0), Ordering::Relaxed);
            }
            left_guest = Some(t1);
            let slow = match exit {
                Ok(VcpuExit::IoOut(port, data)) => {
                    stats.count(ExitReason::IoOut);
                    stats.count_pio(port);
                    if !shared.pio.write(port as u64, data) {
                        unclaimed(shared, false, port as u64, "write");
                    }
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    stats.count(ExitReason::IoIn);
                    stats.count_pio(port);
                    if !shared.pio.read(port as u64, data) {
                        data.fill(0xff);
                        unclaimed(shared, false, port as u64, "read");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    stats.count(ExitReason::MmioWrite);
                    stats.count_mmio(addr);
                    if !shared.mmio.write(addr, data) {
                        unclaimed(shared, true, addr, "write");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    stats.count(ExitReason::MmioRead);
                    stats.count_mmio(addr);
                    if !shared.mmio.read(addr, data) {
                        data.fill(0xff);
                        unclaimed(shared, true, addr, "read");
                    }
                    continue;
                }
                Ok(VcpuExit::Intr) => {
                    stats.count(ExitReason::Interrupted);
                    continue;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    stats.count(ExitReason::Interrupted);
                    if shared.sample_rips {
                        if let Ok(r) = fd.get_regs() {
                            stats.sample_rip(r.rip);
                        }
                    }
                    if shared.complete_stuck_hypercalls && complete_stuck_hypercall(fd, &shared.mem)
                    {
                        *stats.emulated.entry("hypercall (ENOSYS)").or_default() += 1;
                    }
                    continue;
                }
                other => SlowExit::from(other),
            };
            if let Some(end) = self.slow_exit(slow) {
                let _ = self.shared.end.send(end);
                break;
            }
        }
        // Where the guest was when it stopped: the first clue when a guest hangs.
        if let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) {
            self.stats.last_rip = Some(regs.rip);
            self.stats.last_cpl = Some(sregs.cs.selector & 3);
        }
        self.stats.finish(&clock);
        self.stats
    }

    /// The vCPU's instruction pointer, stack and paging state, in a line.
    fn where_now(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            // AMD's KVM reinitialises the vCPU on a shutdown intercept before it exits.
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => {
                "its registers already reset by KVM (as on AMD hosts): where it was is lost".into()
            }
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
                 efer {:#x}",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (Err(e), _) | (_, Err(e)) => format!("its registers unreadable ({e})"),
        }
    }

    /// Exits that are not on the I/O path. Returns `Some` when the VM must end.
    fn slow_exit(&mut self, exit: SlowExit) -> Option<VmEnd> {
        let id = self.id;
        let (reason, end) = match exit {
            SlowExit::Hlt => (ExitReason::Hlt, None),
            SlowExit::Shutdown => {
                // Said whatever --reboot-status makes of it: where a guest crashed is the clue.
                eprintln!(
                    "exitless: vCPU {id} triple-faulted (KVM_EXIT_SHUTDOWN): {}",
                    self.where_now()
                );
                (ExitReason::Shutdown, Some(VmEnd::TripleFault))
            }
            SlowExit::SystemEvent(kind, data) => {
                let end = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEnd::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmEnd::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VmEnd::GuestPanic("KVM reported a guest crash".into()),
                    k => VmEnd::Error(format!("vCPU {id}: unknown system event {k} {data:?}")),
                };
                (ExitReason::SystemEvent, Some(end))
            }
            SlowExit::Hypercall => (ExitReason::Hypercall, None),
            SlowExit::IrqWindowOpen => (ExitReason::IrqWindowOpen, None),
            SlowExit::Debug => (ExitReason::Debug, None),
            SlowExit::FailEntry(reason, cpu) => (
                ExitReason::FailEntry,
                Some(VmEnd::Error(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                ))),
            ),
            SlowExit::InternalError => {
                self.stats.count(ExitReason::InternalError);
                return self.internal_error().err();
            }
            SlowExit::Exception => (
                ExitReason::Exception,
                Some(VmEnd::Error(format!("vCPU {id}: unhandled exception exit"))),
            ),
            SlowExit::Unknown => (
                ExitReason::Unknown,
                Some(VmEnd::Error(format!("vCPU {id}: KVM returned an unknown exit"))),
            ),
            SlowExit::Other(what) => {
                crate::warn_limited!("vcpu-unexpected-exit", "vCPU {id}: unexpected exit {what}");
                (ExitReason::Other, None)
            }
            SlowExit::Failed(errno) => (
                ExitReason::Other,
                Some(VmEnd::Error(format!(
                    "vCPU {id}: KVM_RUN failed: {}",
                    std::io::Error::from_raw_os_error(errno)
                ))),
            ),
        };
        self.stats.count(reason);
        end
    }

    /// `KVM_EXIT_INTERNAL_ERROR`: complete a failed emulation if we can, else end the VM with the
    /// instruction's bytes in the message.
    fn internal_error(&mut self) -> Result<(), VmEnd> {
        let id = self.id;
        let (suberror, insn) = {
            let run: &kvm_run = self.fd.get_kvm_run();
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member;
            // `emulation_failure` overlays it with the layout KVM uses for suberror EMULATION.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let insn = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
                // SAFETY: as above; the union member for emulation failures.
                let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
                let has_bytes = ef.flags
                    & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                    != 0;
                // SAFETY: the instruction-bytes view of the union, valid when the flag says so.
                let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                has_bytes.then(|| {
                    let n = (bytes.insn_size as usize).min(bytes.insn_bytes.len());
                    bytes.insn_bytes[..n].to_vec()
                })
            } else {
                None
            };
            (internal.suberror, insn)
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(VmEnd::Error(format!(
                "vCPU {id}: KVM internal error (suberror {suberror})"
            )));
        }
        let Some(insn) = insn else {
            return Err(VmEnd::Error(format!(
                "vCPU {id}: KVM's instruction emulator failed (no instruction bytes reported)"
            )));
        };
        let described = emulate::describe(&insn);
        // VEX instructions come from a guest that saw AVX/BMI in CPUID, which a PVM host shows
        // whatever the VMM sets (src/host.rs): say so, and what avoids them.
        let vex_hint = if described.ends_with(&format!("({})", emulate::VEX)) {
            "; KVM's emulator has no VEX-encoded (AVX/BMI) instructions, and this host shows its \
             own AVX/BMI CPUID bits to the guest whatever exitless sets. A bzImage's own \
             decompressor meets them (zstd's BMI2 paths) with --guest-decompress: let exitless \
             unpack the kernel (the default, every format), or add clearcpuid=bmi1,bmi2,avx,avx2 \
             to the kernel command line"
        } else {
            ""
        };
        let fail = |why: &str| {
            VmEnd::Error(format!(
                "vCPU {id}: KVM's instruction emulator failed on {described} and exitless could not complete it{why}{vex_hint}"
            ))
        };
        if !self.shared.complete_failed_emulation {
            return Err(fail(" (completion is off)"));
        }
        let mut regs = self.fd.get_regs().map_err(|e| fail(&format!(": {e}")))?;
        let sregs = self.fd.get_sregs().map_err(|e| fail(&format!(": {e}")))?;
        let mut access = VcpuMemory {
            fd: &self.fd,
            mem: &self.shared.mem,
        };
        match emulate::complete(&insn, &mut regs, &sregs, &mut access) {
            emulate::Completion::Done { len, what } => {
                regs.rip = regs.rip.wrapping_add(len as u64);
                self.fd
                    .set_regs(&regs)
                    .map_err(|e| fail(&format!(": {e}")))?;
                *self.stats.emulated.entry(what).or_default() += 1;
                Ok(())
            }
            emulate::Completion::Exception {
                vector,
                error_code,
                advance,
                what,
            } => {
                regs.rip = regs.rip.wrapping_add(advance as u64);
                self.fd
                    .set_regs(&regs)
                    .map_err(|e| fail(&format!(": {e}")))?;
                let mut ev = self
                    .fd
                    .get_vcpu_events()
                    .map_err(|e| fail(&format!(": {e}")))?;
                ev.exception.injected = 1;
                ev.exception.nr = vector;
                ev.exception.has_error_code = error_code.is_some() as u8;
                ev.exception.error_code = error_code.unwrap_or(0);
                self.fd
                    .set_vcpu_events(&ev)
                    .map_err(|e| fail(&format!(": {e}")))?;
                *self.stats.emulated.entry(what).or_default() += 1;
                Ok(())
            }
            emulate::Completion::Unhandled => Err(fail("")),
        }
    }
}

/// A parked vCPU's state for a snapshot: its pending I/O completed first, then read.
fn save_state(fd: &mut VcpuFd, shared: &VcpuShared, id: u8) -> crate::lifecycle::SavedVcpu {
    complete_pending_io(fd, shared)?;
    let spec = crate::snapshot::vcpu::CaptureSpec {
        id,
        msr_index: &shared.msr_index,
        nested: shared.nested,
    };
    let state = crate::snapshot::vcpu::capture(fd, &spec)?;
    Ok(Box::new(state))
}

/// A port or MMIO read the vCPU exited for gets its data into the guest's register only at the
/// next `KVM_RUN`: one with `immediate_exit` set completes it (and any string I/O left, whose
/// further exits are served here) without entering the guest, as KVM's documentation asks
/// before the state is read.
fn complete_pending_io(fd: &mut VcpuFd, shared: &VcpuShared) -> Result<(), String> {
    fd.set_kvm_immediate_exit(1);
    let r = complete_with_immediate_exit(fd, shared);
    fd.set_kvm_immediate_exit(0);
    r
}

fn complete_with_immediate_exit(fd: &mut VcpuFd, shared: &VcpuShared) -> Result<(), String> {
    // String I/O leaves at most a few more exits; more means something else is wrong.
    for _ in 0..4096 {
        match fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(()),
            Ok(VcpuExit::Intr) => return Ok(()),
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(port.into(), data);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !shared.pio.read(port.into(), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Ok(other) => return Err(format!("unexpected exit {other:?} completing its I/O")),
            Err(e) => return Err(format!("KVM_RUN completing its I/O: {e}")),
        }
    }
    Err("its I/O did not complete".into())
}

/// An exit off the I/O path, detached from the `kvm_run` borrow so the handler may use the vCPU.
#[derive(Debug)]
enum SlowExit {
    Hlt,
    Shutdown,
    SystemEvent(u32, Vec<u64>),
    Hypercall,
    IrqWindowOpen,
    Debug,
    FailEntry(u64, u32),
    InternalError,
    Exception,
    Unknown,
    Other(String),
    Failed(i32),
}

impl From<Result<VcpuExit<'_>, kvm_ioctls::Error>> for SlowExit {
    fn from(r: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Self {
        match r {
            Ok(VcpuExit::Hlt) => SlowExit::Hlt,
            Ok(VcpuExit::Shutdown) => SlowExit::Shutdown,
            Ok(VcpuExit::SystemEvent(k, d)) => SlowExit::SystemEvent(k, d.to_vec()),
            Ok(VcpuExit::Hypercall(_)) => SlowExit::Hypercall,
            Ok(VcpuExit::IrqWindowOpen) => SlowExit::IrqWindowOpen,
            Ok(VcpuExit::Debug(_)) => SlowExit::Debug,
            Ok(VcpuExit::FailEntry(r, c)) => SlowExit::FailEntry(r, c),
            Ok(VcpuExit::InternalError) => SlowExit::InternalError,
            Ok(VcpuExit::Exception) => SlowExit::Exception,
            Ok(VcpuExit::Unknown) => SlowExit::Unknown,
            Ok(other) => SlowExit::Other(format!("{other:?}")),
            Err(e) => SlowExit::Failed(e.errno()),
        }
    }
}

/// Logs an access nobody claims, once per address. The guest is not stopped for it.
#[cold]
fn unclaimed(shared: &VcpuShared, mmio: bool, addr: u64, what: &str) {
    let mut seen = shared.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
    if seen.len() < 4096 && seen.insert((mmio, addr)) {
        let space = if mmio { "MMIO address" } else { "I/O port" };
        log::info!("guest {what} to unclaimed {space} {addr:#x} ignored (reported once)");
    }
}

/// Guest virtual memory through this vCPU's page tables (`KVM_TRANSLATE`).
struct VcpuMemory<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
}

impl VcpuMemory<'_> {
    fn gpa(&self, gva: u64) -> Result<u64, emulate::AccessError> {
        match self.fd.translate_gva(gva) {
            Ok(t) if t.valid != 0 => Ok(t.physical_address),
            _ => Err(emulate::AccessError::Fault { gva }),
        }
    }
}

impl VcpuMemory<'_> {
    /// Splits `gva..gva+len` at page boundaries and calls `f(offset, len, gpa)` for each piece,
    /// translating each page separately (contiguous virtual pages need not be contiguous).
    fn per_page(
        &self,
        gva: u64,
        len: usize,
        mut f: impl FnMut(usize, usize, GuestAddress) -> bool,
    ) -> Result<(), emulate::AccessError> {
        let mut done = 0;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let n = ((0x1000 - (va & 0xfff)) as usize).min(len - done);
            let pa = self.gpa(va)?;
            if !f(done, n, GuestAddress(pa)) {
                return Err(emulate::AccessError::Fault { gva: va });
            }
            done += n;
        }
        Ok(())
    }
}

impl emulate::GuestAccess for VcpuMemory<'_> {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), emulate::AccessError> {
        let mem = self.mem;
        self.per_page(gva, buf.len(), |at, n, pa| {
            mem.read_slice(&mut buf[at..at + n], pa).is_ok()
        })
    }

    fn write(&mut self, gva: u64, data: &[u8]) -> Result<(), emulate::AccessError> {
        let mem = self.mem;
        self.per_page(gva, data.len(), |at, n, pa| {
            mem.write_slice(&data[at..at + n], pa).is_ok()
        })
    }
}
