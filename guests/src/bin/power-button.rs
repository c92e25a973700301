//! Answers the ACPI power button as an ACPI driver does, by polling instead of taking the SCI:
//! enables PM1_EN.PWRBTN_EN, prints that it waits, waits for PM1_STS.PWRBTN_STS, clears it
//! (write one to clear), checks that it is clear, and powers off (S5). `exitless ctl shutdown`
//! against this guest ends the VM with its power-off, not the forced stop.
#![no_std]
#![no_main]

use kit::arch::{inl, outw, pause};

kit::entry!(main);

/// PM1a event block: PM1_STS at +0, PM1_EN at +2 (the FADT's, at exitless's ICH9 layout).
const PM1_STS: u16 = 0x600;
const PM1_EN: u16 = 0x602;
const PWRBTN: u16 = 1 << 8;

fn status() -> u16 {
    inl(PM1_STS) as u16
}

fn main(_boot: &'static kit::BootInfo) -> ! {
    outw(PM1_EN, PWRBTN);
    kit::println!("kit: power-button waiting");
    while status() & PWRBTN == 0 {
        // One port read per ~10k pauses: a slow poll, like a driver's idle loop.
        for _ in 0..10_000 {
            pause();
        }
    }
    outw(PM1_STS, PWRBTN);
    if status() & PWRBTN != 0 {
        kit::fail(
            "power-button",
            format_args!("PWRBTN_STS still set after writing one to clear it"),
        );
    }
    kit::println!("kit: power-button pressed");
    kit::pass("power-button");
    kit::poweroff()
}
