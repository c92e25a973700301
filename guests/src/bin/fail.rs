//! Fails on purpose: `kit: FAIL fail: on purpose`, exit(1).
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_boot: &'static kit::BootInfo) -> ! {
    kit::fail("fail", format_args!("on purpose"))
}
