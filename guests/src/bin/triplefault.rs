//! Loads an empty IDT and raises #UD: no handler, no #DF handler -> triple fault (shutdown).
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_boot: &'static kit::BootInfo) -> ! {
    kit::println!("kit: triplefault guest: loading an empty IDT and executing ud2");
    let empty = [0u16; 5];
    // SAFETY: deliberately breaks exception delivery; the CPU shuts down and nothing runs after.
    unsafe { core::arch::asm!("lidt [{}]", "ud2", in(reg) &empty, options(noreturn)) }
}
