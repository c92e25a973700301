//! TSS, IDT, the generic trap handler, and CPL3 excursions (`run_user`).

use crate::boot::{TSS_SEL, USER_EXIT_MAGIC};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Register state saved by the trap stubs (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// A handler for one vector.
pub type Handler = fn(&mut TrapFrame);

/// An exception that ended a `try_run_user` excursion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub rip: u64,
    pub error: u64,
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    lo: u64,
    hi: u64,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static mut IDT: Idt = Idt([Gate { lo: 0, hi: 0 }; 256]);
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
static CATCH: AtomicU64 = AtomicU64::new(0);
static FAULT: AtomicU64 = AtomicU64::new(0);
static FAULT_RIP: AtomicU64 = AtomicU64::new(0);
static FAULT_ERR: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static kit_trap_stubs: [u8; 4096];
    static mut kit_gdt: [u64; 8];
    static kit_tss: [u8; 104 + 8193];
    static kit_user_stack_top: u8;
    fn kit_run_user_asm(f: u64, arg: u64, rsp: u64, rflags: u64) -> u64;
    fn kit_user_return(v: u64) -> !;
}

const NAMES: [&str; 32] = [
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
    "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
    "#26", "#27", "#HV", "#VC", "#SX", "#31",
];

/// Name of an exception vector (`#UD`, `#GP`, ...).
pub fn exception_name(v: u8) -> &'static str {
    NAMES.get(v as usize).copied().unwrap_or("irq")
}

/// Installs the TSS and the IDT (all 256 vectors; 0x80 is reachable from CPL3). BSP only.
pub(crate) fn init_bsp() {
    // SAFETY: single-threaded early boot; `kit_tss` lives in the image below 4 GiB.
    unsafe {
        let base = core::ptr::addr_of!(kit_tss) as u64;
        let lo = (104 + 8192) | (base & 0xff_ffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56;
        let gdt = core::ptr::addr_of_mut!(kit_gdt) as *mut u64;
        gdt.add(6).write_volatile(lo);
        gdt.add(7).write_volatile(base >> 32);
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack));
    }
    let stubs = core::ptr::addr_of!(kit_trap_stubs) as u64;
    for v in 0..256u64 {
        let dpl3 = if v == 0x80 { 0x60 } else { 0 };
        let a = stubs + 16 * v;
        let lo = (a & 0xffff) | 0x08 << 16 | (0x8e | dpl3) << 40 | (a >> 16 & 0xffff) << 48;
        // SAFETY: the IDT is not yet loaded and only the BSP writes it, once.
        unsafe { (*core::ptr::addr_of_mut!(IDT)).0[v as usize] = Gate { lo, hi: a >> 32 } };
    }
    load_idt();
}

/// Loads the kit IDT on the current CPU.
pub(crate) fn load_idt() {
    let p = Pointer {
        limit: 4095,
        base: core::ptr::addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is fully initialised by `init_bsp` before any CPU loads it.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack)) }
}

/// Routes `vector` to `h` (runs at CPL0 with interrupts off; IRQ handlers must EOI themselves).
pub fn set_handler(vector: u8, h: Handler) {
    HANDLERS[vector as usize].store(h as usize, Ordering::Release);
}

#[no_mangle]
extern "C" fn kit_trap(f: &mut TrapFrame) {
    let from_user = f.cs & 3 == 3;
    if f.vector == 6 && f.rax == USER_EXIT_MAGIC {
        // SAFETY: a `run_user` excursion (or `kit_syscall_entry`) is in progress: its context is
        // saved and this frame is abandoned.
        unsafe { kit_user_return(f.rdi) }
    }
    let h = HANDLERS[f.vector as usize].load(Ordering::Acquire);
    if h != 0 {
        // SAFETY: only `set_handler` stores non-zero values, and those are `Handler`s.
        let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
        return h(f);
    }
    if f.vector < 32 {
        if from_user && CATCH.load(Ordering::Relaxed) != 0 {
            FAULT.store(f.vector + 1, Ordering::Relaxed);
            FAULT_RIP.store(f.rip, Ordering::Relaxed);
            FAULT_ERR.store(f.error, Ordering::Relaxed);
            // SAFETY: as above; `try_run_user` reads the recorded fault.
            unsafe { kit_user_return(0) }
        }
        crate::console::force_unlock();
        crate::println!(
            "kit: FAIL exception {} ({}) at rip={:#x} cs={:#x} err={:#x} cr2={:#x} rsp={:#x} guest={}",
            f.vector,
            exception_name(f.vector as u8),
            f.rip,
            f.cs,
            f.error,
            crate::arch::cr2(),
            f.rsp,
            crate::guest_name()
        );
        crate::exit(1);
    }
    if f.vector != 0xff {
        // Unclaimed interrupt: acknowledge it so the LAPIC is not stuck.
        crate::lapic::eoi();
    }
}

/// Runs `f(arg)` at CPL3 on the kit user stack, in the same address space, with RFLAGS.IOPL=3
/// (port I/O allowed) and IF as requested; returns what `f` returns. Exceptions in `f` are fatal.
pub fn run_user(f: extern "C" fn(u64) -> u64, arg: u64, interrupts: bool) -> u64 {
    let rsp = core::ptr::addr_of!(kit_user_stack_top) as u64;
    let rflags = 0x3002 | if interrupts { 0x200 } else { 0 };
    // SAFETY: the stub switches to CPL3 with a valid iretq frame and comes back through
    // `kit_user_return`, restoring the callee-saved registers and stack saved on entry.
    unsafe { kit_run_user_asm(f as usize as u64, arg, rsp, rflags) }
}

/// Like `run_user`, but an exception raised at CPL3 ends the excursion and is returned.
pub fn try_run_user(
    f: extern "C" fn(u64) -> u64,
    arg: u64,
    interrupts: bool,
) -> Result<u64, Fault> {
    FAULT.store(0, Ordering::Relaxed);
    CATCH.store(1, Ordering::Relaxed);
    let r = run_user(f, arg, interrupts);
    CATCH.store(0, Ordering::Relaxed);
    match FAULT.load(Ordering::Relaxed) {
        0 => Ok(r),
        v => Err(Fault {
            vector: (v - 1) as u8,
            rip: FAULT_RIP.load(Ordering::Relaxed),
            error: FAULT_ERR.load(Ordering::Relaxed),
        }),
    }
}
