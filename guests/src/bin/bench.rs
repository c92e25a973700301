//! The exit-cost benchmark guest of `exitless bench exits`: times, with `rdtsc`, one operation
//! after another and prints one `kit: bench op=...` line per operation with the 10th, 50th and
//! 90th percentile in TSC cycles per operation.
//!
//! Protocol (COM1, parsed by exitless's `bench` module):
//! ```text
//! kit: bench start version=1 tsc_hz=<Hz> vendor=<CPUID vendor> hypercall=<vmcall|vmmcall> mode=<full|quick>
//! kit: bench op=<name> cpl=<0|3> batch=<k> samples=<n> ops=<total executed> p10=<c> p50=<c> p90=<c>
//! kit: bench op=<name> unsupported=<why>
//! kit: bench done ops=<number of op lines>
//! ```
//! `ops` counts every execution of the operation, warm-up included, so that the VMM's exit
//! counters can be checked against it exactly. CPL0 code is emulated instruction by instruction on
//! hosts whose KVM has no VMX/SVM (about 0.5 us each), so CPL0 operations are timed in unrolled
//! batches of `batch` (the few instructions around the batch cost a fraction of one operation);
//! CPL3 code runs natively and is timed one operation per sample. Percentiles and sorting run at
//! CPL3 for the same reason.
//!
//! The command line: `quick` selects small sample counts (smoke tests); `hypercall=cpl0` (the
//! default), `hypercall=cpl3`, `hypercall=cpl0-once` (issued once, not timed) or `hypercall=off`
//! where and whether the hypercall is issued (on PVM hosts without VMX/SVM KVM's emulator loops
//! on a CPL0 `vmcall`/`vmmcall`; exitless completes it with -KVM_ENOSYS at its next periodic kick,
//! ~50 ms later, so timing it there is meaningless and exitless asks for `cpl3`).
#![no_std]
#![no_main]

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use kit::{arch, lapic, println};

kit::entry!(main);

const PROBE_PORT: u16 = 0x510;
const PROBE_EVENTFD_PORT: u16 = 0x514;
const PROBE_MMIO: u64 = 0xf000_0000;
const PROBE_MMIO_EVENTFD: u64 = 0xf000_0100;
const LAPIC_TPR: u64 = lapic::BASE + 0x80;
const LAPIC_EOI: u64 = lapic::BASE + 0xb0;
const LAPIC_ICR_LO: u64 = lapic::BASE + 0x300;
const LAPIC_LVT_TIMER: u64 = lapic::BASE + 0x320;
const LAPIC_TIMER_INIT: u64 = lapic::BASE + 0x380;
/// Vectors of the benchmark's own interrupt handlers (they record the TSC on entry).
const IPI_VECTOR: u8 = 0x42;
const TIMER_VECTOR: u8 = 0x43;
/// The one-shot delay of `hlt_timer`; its samples are the wake-up latency beyond it.
const HLT_DELAY_NS: u64 = 20_000;
/// Batch size of CPL0 operations (must match the `.rept` count in `batch_op!`).
const BATCH: u64 = 10;
/// Unknown hypercall number: KVM answers -KVM_ENOSYS in the kernel.
const HYPERCALL_NR: u64 = 0x0bad_c0de;

const MAX_SAMPLES: usize = 16_384;

/// Sample buffer, written at CPL0 or CPL3 by one CPU at a time.
struct Samples(UnsafeCell<[u64; MAX_SAMPLES]>);
// SAFETY: the guest runs on one CPU and never touches the buffer from an interrupt handler.
unsafe impl Sync for Samples {}
static SAMPLES: Samples = Samples(UnsafeCell::new([0; MAX_SAMPLES]));

fn samples() -> &'static mut [u64; MAX_SAMPLES] {
    // SAFETY: single CPU; callers never hold two references at once (each use is a statement or
    // a function that returns before the next one).
    unsafe { &mut *SAMPLES.0.get() }
}

/// TSC at the entry of the benchmark's IPI and timer handlers.
static IPI_TSC: AtomicU64 = AtomicU64::new(0);
static TIMER_TSC: AtomicU64 = AtomicU64::new(0);
/// Set by the #UD/#GP handler when the hypercall instruction faults (vector + 1).
static HYPERCALL_FAULT: AtomicU64 = AtomicU64::new(0);

/// Sizes: (CPL0 batches, CPL3 samples, single-event samples), each after a tenth as warm-up.
struct Sizes {
    cpl0: u64,
    cpl3: u64,
    events: u64,
}

const FULL: Sizes = Sizes {
    cpl0: 1000,
    cpl3: 8000,
    events: 500,
};
const QUICK: Sizes = Sizes {
    cpl0: 40,
    cpl3: 200,
    events: 20,
};

/// One timed batch of `BATCH` operations at CPL0: the TSC delta around an unrolled run of `$op`
/// (`$setup` runs inside the window, after the first `rdtsc`, because `rdtsc` clobbers
/// `eax`/`edx`). Inputs: `rsi` = address, `r8` = port, `ecx` = data.
macro_rules! batch_op {
    ($name:ident, $addr:expr, $port:expr, $setup:literal, $op:literal) => {
        #[inline(never)]
        fn $name() -> u64 {
            let (lo0, hi0, lo1, hi1): (u64, u64, u64, u64);
            // SAFETY: the operation touches only the probe device, the LAPIC or nothing (see the
            // caller); no guest memory Rust knows about is written.
            unsafe {
                asm!(
                    "rdtsc",
                    "mov {lo0:e}, eax",
                    "mov {hi0:e}, edx",
                    $setup,
                    ".rept 10",
                    $op,
                    ".endr",
                    "rdtsc",
                    lo0 = out(reg) lo0,
                    hi0 = out(reg) hi0,
                    in("rsi") $addr,
                    in("r8") $port as u64,
                    in("ecx") 0u32,
                    out("rax") lo1,
                    out("rdx") hi1,
                    options(nostack),
                )
            }
            ((hi1 << 32) | lo1).wrapping_sub((hi0 << 32) | lo0)
        }
    };
}

batch_op!(b_pio_out, 0u64, PROBE_PORT, "mov edx, r8d", "out dx, eax");
batch_op!(b_pio_in, 0u64, PROBE_PORT, "mov edx, r8d", "in eax, dx");
batch_op!(
    b_pio_out_ioeventfd,
    0u64,
    PROBE_EVENTFD_PORT,
    "mov edx, r8d",
    "out dx, eax"
);
batch_op!(
    b_mmio_read,
    PROBE_MMIO,
    0u16,
    "",
    "mov eax, dword ptr [rsi]"
);
batch_op!(
    b_mmio_write,
    PROBE_MMIO,
    0u16,
    "",
    "mov dword ptr [rsi], ecx"
);
batch_op!(
    b_mmio_write_ioeventfd,
    PROBE_MMIO_EVENTFD,
    0u16,
    "",
    "mov dword ptr [rsi], ecx"
);
batch_op!(b_eoi, LAPIC_EOI, 0u16, "", "mov dword ptr [rsi], ecx");
batch_op!(b_tpr, LAPIC_TPR, 0u16, "", "mov dword ptr [rsi], ecx");

/// CPUID leaf 0, `BATCH` times (`rbx` is reserved by LLVM, so it is saved around the batch; the
/// leaf is reloaded before each CPUID: one extra register instruction per operation).
#[inline(never)]
fn b_cpuid() -> u64 {
    let (lo0, hi0, lo1, hi1): (u64, u64, u64, u64);
    // SAFETY: CPUID has no side effects; rbx is restored before the block ends.
    unsafe {
        asm!(
            "mov {save}, rbx",
            "rdtsc",
            "mov {lo0:e}, eax",
            "mov {hi0:e}, edx",
            ".rept 10",
            "xor eax, eax",
            "cpuid",
            ".endr",
            "rdtsc",
            "mov rbx, {save}",
            save = out(reg) _,
            lo0 = out(reg) lo0,
            hi0 = out(reg) hi0,
            out("rax") lo1,
            out("rdx") hi1,
            out("rcx") _,
            options(nostack, nomem),
        )
    }
    ((hi1 << 32) | lo1).wrapping_sub((hi0 << 32) | lo0)
}

macro_rules! hypercall_op {
    ($name:ident, $insn:literal) => {
        /// An unknown hypercall, `BATCH` times (the number is reloaded before each).
        #[inline(never)]
        fn $name() -> u64 {
            let (lo0, hi0, lo1, hi1): (u64, u64, u64, u64);
            // SAFETY: KVM answers an unknown hypercall number with -KVM_ENOSYS in rax and
            // touches nothing else; a fault is caught by `hypercall_trap`.
            unsafe {
                asm!(
                    "rdtsc",
                    "mov {lo0:e}, eax",
                    "mov {hi0:e}, edx",
                    ".rept 10",
                    "mov rax, {nr}",
                    $insn,
                    ".endr",
                    "rdtsc",
                    nr = in(reg) HYPERCALL_NR,
                    lo0 = out(reg) lo0,
                    hi0 = out(reg) hi0,
                    out("rax") lo1,
                    out("rdx") hi1,
                    options(nostack, nomem),
                )
            }
            ((hi1 << 32) | lo1).wrapping_sub((hi0 << 32) | lo0)
        }
    };
}

hypercall_op!(b_vmcall, "vmcall");
hypercall_op!(b_vmmcall, "vmmcall");

/// One hypercall; returns rax. A fault is recorded in `HYPERCALL_FAULT` and skipped.
fn hypercall_once(amd: bool) -> u64 {
    let mut rax = HYPERCALL_NR;
    // SAFETY: as for `b_vmcall`; rbx, rcx, rdx, rsi are hypercall arguments KVM may read only.
    unsafe {
        if amd {
            asm!("vmmcall", inout("rax") rax, options(nostack, nomem));
        } else {
            asm!("vmcall", inout("rax") rax, options(nostack, nomem));
        }
    }
    rax
}

/// #UD/#GP while probing the hypercall instruction: skip it (3 bytes) and remember the fault.
fn hypercall_trap(f: &mut kit::TrapFrame) {
    // SAFETY: rip points at the faulting instruction in the kit image (identity-mapped).
    let insn: [u8; 3] = unsafe { core::ptr::read_unaligned(f.rip as *const [u8; 3]) };
    if insn == [0x0f, 0x01, 0xc1] || insn == [0x0f, 0x01, 0xd9] {
        HYPERCALL_FAULT.store(f.vector + 1, Ordering::Relaxed);
        f.rip += 3;
        return;
    }
    kit::fail(
        "bench",
        format_args!(
            "exception {} ({}) at rip={:#x} err={:#x}",
            f.vector,
            kit::trap::exception_name(f.vector as u8),
            f.rip,
            f.error
        ),
    );
}

/// Self-IPI: from the ICR write to the handler's first instruction.
#[inline(never)]
fn e_ipi_self() -> u64 {
    let before = IPI_TSC.load(Ordering::Relaxed);
    let t0 = arch::rdtsc();
    arch::mmio_write32(LAPIC_ICR_LO, 0x4_4000 | IPI_VECTOR as u32);
    // SAFETY: the handler is installed; the STI shadow covers the `nop`, so the pending IPI is
    // taken right after it (or by the HLT loop below if the host delivers it later).
    unsafe { asm!("sti", "nop", "nop", "cli", options(nomem, nostack)) };
    while IPI_TSC.load(Ordering::Relaxed) == before {
        arch::sti_hlt_cli();
    }
    IPI_TSC.load(Ordering::Relaxed).wrapping_sub(t0)
}

/// HLT woken by a LAPIC one-shot timer of `HLT_DELAY_NS`: from the timer write to the handler,
/// minus the programmed delay.
#[inline(never)]
fn e_hlt_timer(delay_cycles: u64) -> u64 {
    let before = TIMER_TSC.load(Ordering::Relaxed);
    let t0 = arch::rdtsc();
    arch::mmio_write32(LAPIC_TIMER_INIT, HLT_DELAY_NS as u32);
    while TIMER_TSC.load(Ordering::Relaxed) == before {
        arch::sti_hlt_cli();
    }
    TIMER_TSC
        .load(Ordering::Relaxed)
        .wrapping_sub(t0)
        .saturating_sub(delay_cycles)
}

/// Times one sample (a batch at CPL0, one operation at CPL3); returns TSC cycles.
type Sampler = fn() -> u64;

/// One timed operation at CPL3 (native): `rdtsc`, the operation, `rdtsc`.
macro_rules! user_op {
    ($name:ident, $addr:expr, $port:expr, $setup:literal, $op:literal) => {
        #[inline(never)]
        fn $name() -> u64 {
            let (lo0, hi0, lo1, hi1): (u64, u64, u64, u64);
            // SAFETY: as for `batch_op!`; runs at CPL3 with IOPL=3 and the TSS I/O bitmap open.
            unsafe {
                asm!(
                    "lfence",
                    "rdtsc",
                    "mov {lo0:e}, eax",
                    "mov {hi0:e}, edx",
                    $setup,
                    $op,
                    "rdtsc",
                    lo0 = out(reg) lo0,
                    hi0 = out(reg) hi0,
                    in("rsi") $addr,
                    in("r8") $port as u64,
                    in("ecx") 0u32,
                    out("rax") lo1,
                    out("rdx") hi1,
                    options(nostack),
                )
            }
            ((hi1 << 32) | lo1).wrapping_sub((hi0 << 32) | lo0)
        }
    };
}

user_op!(u_pio_out, 0u64, PROBE_PORT, "mov edx, r8d", "out dx, eax");
user_op!(u_pio_in, 0u64, PROBE_PORT, "mov edx, r8d", "in eax, dx");
user_op!(
    u_pio_out_ioeventfd,
    0u64,
    PROBE_EVENTFD_PORT,
    "mov edx, r8d",
    "out dx, eax"
);
user_op!(
    u_mmio_read,
    PROBE_MMIO,
    0u16,
    "",
    "mov eax, dword ptr [rsi]"
);
user_op!(
    u_mmio_write,
    PROBE_MMIO,
    0u16,
    "",
    "mov dword ptr [rsi], ecx"
);
user_op!(
    u_mmio_write_ioeventfd,
    PROBE_MMIO_EVENTFD,
    0u16,
    "",
    "mov dword ptr [rsi], ecx"
);

user_op!(u_vmcall, 0u64, HYPERCALL_NR, "mov rax, r8", "vmcall");
user_op!(u_vmmcall, 0u64, HYPERCALL_NR, "mov rax, r8", "vmmcall");

/// The CPL3 operations, indexed by `user_run`'s argument: the six I/O ones, then the two
/// hypercall instructions (used only with `hypercall=cpl3`).
const USER_OPS: [(&str, Sampler); 8] = [
    ("pio_out_user", u_pio_out),
    ("pio_in_user", u_pio_in),
    ("pio_out_ioeventfd_user", u_pio_out_ioeventfd),
    ("mmio_read_user", u_mmio_read),
    ("mmio_write_user", u_mmio_write),
    ("mmio_write_ioeventfd_user", u_mmio_write_ioeventfd),
    ("hypercall", u_vmcall),
    ("hypercall", u_vmmcall),
];
/// How many of `USER_OPS` are the I/O operations benchmarked at CPL3.
const USER_IO_OPS: usize = 6;

/// At CPL3: one hypercall (`arg` != 0: `vmmcall`); returns rax.
extern "C" fn user_hypercall_once(amd: u64) -> u64 {
    hypercall_once(amd != 0)
}

/// Prints that `name` faulted with `vector` at `cpl`.
fn unsupported(name: &str, vector: u8, cpl: u8) {
    println!(
        "kit: bench op={} unsupported={}@cpl{}",
        name,
        kit::trap::exception_name(vector),
        cpl
    );
}

/// At CPL3: `arg` = op index | warm-up << 16 | samples << 40. Fills the sample buffer.
extern "C" fn user_run(arg: u64) -> u64 {
    let op = USER_OPS[(arg & 0xffff) as usize].1;
    let warm = (arg >> 16) & 0xff_ffff;
    let n = (arg >> 40) as usize;
    for _ in 0..warm {
        op();
    }
    let s = samples();
    for slot in s.iter_mut().take(n) {
        *slot = op();
    }
    n as u64
}

/// At CPL3 (native, fast): sorts the first `n` samples.
extern "C" fn user_sort(n: u64) -> u64 {
    samples()[..n as usize].sort_unstable();
    n
}

/// Sorts the first `n` samples and prints the op line (values per operation: sample / `batch`).
fn report(name: &str, cpl: u8, batch: u64, n: u64, ops: u64) {
    let n = n.clamp(1, MAX_SAMPLES as u64);
    kit::run_user(user_sort, n, false);
    let s = samples();
    let pick = |pct: u64| s[((n - 1) * pct / 100) as usize] / batch;
    println!(
        "kit: bench op={} cpl={} batch={} samples={} ops={} p10={} p50={} p90={}",
        name,
        cpl,
        batch,
        n,
        ops,
        pick(10),
        pick(50),
        pick(90)
    );
}

/// Runs a CPL0 sampler `warm + n` times and reports it.
fn cpl0(name: &str, f: &dyn Fn() -> u64, batch: u64, warm: u64, n: u64) {
    for _ in 0..warm {
        f();
    }
    for i in 0..n as usize {
        samples()[i] = f();
    }
    report(name, 0, batch, n, (warm + n) * batch);
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let quick = boot.cmdline.split_ascii_whitespace().any(|w| w == "quick");
    let sz = if quick { QUICK } else { FULL };
    let vendor = arch::vendor();
    let amd = &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine";
    let hz = lapic::tsc_hz();
    println!(
        "kit: bench start version=1 tsc_hz={} vendor={} hypercall={} mode={}",
        hz,
        arch::text(&vendor),
        if amd { "vmmcall" } else { "vmcall" },
        if quick { "quick" } else { "full" }
    );

    kit::set_handler(IPI_VECTOR, |_| {
        IPI_TSC.store(arch::rdtsc(), Ordering::Relaxed);
        lapic::eoi();
    });
    kit::set_handler(TIMER_VECTOR, |_| {
        TIMER_TSC.store(arch::rdtsc(), Ordering::Relaxed);
        lapic::eoi();
    });

    let (w0, w3, we) = (sz.cpl0 / 10, sz.cpl3 / 10, sz.events / 10);
    let batched = |name: &str, f: Sampler| cpl0(name, &f, BATCH, w0, sz.cpl0);
    batched("cpuid", b_cpuid);

    // The hypercall: probe once with #UD/#GP caught, then time it if it did not fault.
    kit::set_handler(6, hypercall_trap);
    kit::set_handler(13, hypercall_trap);
    let hypercall = boot
        .cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("hypercall="))
        .unwrap_or("cpl0");
    match hypercall {
        "cpl0" => {
            let ret = hypercall_once(amd);
            match HYPERCALL_FAULT.load(Ordering::Relaxed) {
                0 => {
                    println!("kit: bench note hypercall returned {:#x} at cpl0", ret);
                    batched("hypercall", if amd { b_vmmcall } else { b_vmcall });
                }
                v => unsupported("hypercall", (v - 1) as u8, 0),
            }
        }
        "cpl3" => {
            let ret = kit::run_user(user_hypercall_once, amd as u64, false);
            match HYPERCALL_FAULT.load(Ordering::Relaxed) {
                0 => {
                    println!("kit: bench note hypercall returned {:#x} at cpl3", ret);
                    let i = USER_OPS.len() - 2 + amd as usize;
                    kit::run_user(user_run, i as u64 | w3 << 16 | sz.cpl3 << 40, false);
                    report("hypercall", 3, 1, sz.cpl3, w3 + sz.cpl3);
                }
                v => unsupported("hypercall", (v - 1) as u8, 3),
            }
        }
        // One CPL0 hypercall, not timed (where it is slow to complete, as on PVM hosts).
        "cpl0-once" => {
            let ret = hypercall_once(amd);
            match HYPERCALL_FAULT.load(Ordering::Relaxed) {
                0 => println!("kit: bench note hypercall returned {:#x} at cpl0", ret),
                v => unsupported("hypercall", (v - 1) as u8, 0),
            }
        }
        _ => println!("kit: bench op=hypercall unsupported=skipped"),
    }

    batched("pio_out", b_pio_out);
    batched("pio_in", b_pio_in);
    batched("pio_out_ioeventfd", b_pio_out_ioeventfd);
    batched("mmio_read", b_mmio_read);
    batched("mmio_write", b_mmio_write);
    batched("mmio_write_ioeventfd", b_mmio_write_ioeventfd);
    batched("eoi", b_eoi);
    batched("tpr", b_tpr);

    cpl0("ipi_self", &e_ipi_self, 1, we, sz.events);
    arch::mmio_write32(LAPIC_LVT_TIMER, TIMER_VECTOR as u32);
    let delay_cycles = HLT_DELAY_NS * hz / 1_000_000_000;
    cpl0("hlt_timer", &|| e_hlt_timer(delay_cycles), 1, we, sz.events);
    lapic::timer_stop();

    for (i, (name, _)) in USER_OPS.iter().enumerate().take(USER_IO_OPS) {
        let arg = i as u64 | w3 << 16 | sz.cpl3 << 40;
        kit::run_user(user_run, arg, false);
        report(name, 3, 1, sz.cpl3, w3 + sz.cpl3);
    }
    // cpuid, hypercall, 8 batched, ipi_self, hlt_timer, the CPL3 ones.
    println!("kit: bench done ops={}", 12 + USER_IO_OPS);
    kit::pass("bench");
    kit::poweroff()
}
