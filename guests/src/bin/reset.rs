//! Prints a line and resets through the i8042 controller.
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_boot: &'static kit::BootInfo) -> ! {
    kit::println!("kit: reset guest: resetting");
    kit::reset()
}
