//! Reports how this host's CPU handles CPL3 `syscall` and `int 0x80` (it reports, never judges).
#![no_std]
#![no_main]

use core::arch::asm;
use kit::{arch, println, trap};

kit::entry!(main);

extern "C" {
    fn kit_syscall_entry();
}

extern "C" fn user_syscall(_: u64) -> u64 {
    // SAFETY: SYSCALL enters `kit_syscall_entry`, which never returns here (it leaves via the
    // kit's ud2 exit); should the CPU return anyway, rcx/r11 are declared clobbered.
    unsafe { asm!("syscall", out("rcx") _, out("r11") _, out("rax") _, out("rdi") _) };
    0xdead
}

extern "C" fn user_int80(_: u64) -> u64 {
    let r: u64;
    // SAFETY: vector 0x80 is a DPL3 gate whose handler sets rax and returns.
    unsafe { asm!("xor eax, eax", "int 0x80", out("rax") r) };
    r
}

fn outcome(r: Result<u64, kit::Fault>) -> (&'static str, u64) {
    match r {
        Ok(v) => ("", v),
        Err(f) => (trap::exception_name(f.vector), f.rip),
    }
}

fn main(_boot: &'static kit::BootInfo) -> ! {
    arch::wrmsr(0xc000_0081, (0x18 << 48) | (0x08 << 32));
    arch::wrmsr(0xc000_0082, kit_syscall_entry as *const () as u64);
    arch::wrmsr(0xc000_0084, 0x4700);
    arch::wrmsr(0xc000_0080, arch::rdmsr(0xc000_0080) | 1);
    match outcome(kit::try_run_user(user_syscall, 0, false)) {
        ("", 0xdead) => println!("kit: syscall-cpl=none (syscall returned without reaching LSTAR)"),
        ("", cpl) => println!("kit: syscall-cpl={cpl}"),
        (e, rip) => println!("kit: syscall-cpl={e} (exception at rip={rip:#x})"),
    }
    kit::set_handler(0x80, |f| f.rax = 0x80);
    match outcome(kit::try_run_user(user_int80, 0, false)) {
        ("", 0x80) => println!("kit: int80=ok"),
        ("", v) => println!("kit: int80=returned-{v:#x}"),
        (e, rip) => println!("kit: int80={e} (at rip={rip:#x})"),
    }
    kit::poweroff()
}
