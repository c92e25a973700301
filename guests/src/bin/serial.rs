//! Prints a line and powers off (ACPI S5).
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_boot: &'static kit::BootInfo) -> ! {
    kit::println!("kit: poweroff guest: powering off");
    kit::poweroff()
}
