//! Exact exit counts for exitless's exit-counter tests (probe device, HLT, CPL3 PIO).
#![no_std]
#![no_main]

use kit::{lapic, println, probe};

kit::entry!(main);

extern "C" fn user_pio(n: u64) -> u64 {
    for i in 0..n {
        probe::pio_write_port(0x514, i as u32);
    }
    n
}

fn main(_boot: &'static kit::BootInfo) -> ! {
    let (mut pio_out, mut pio_in, mut mmio_write, mut mmio_read, mut hlt) = (0, 0, 0, 0, 0);
    for i in 0..1000 {
        kit::probe_pio_write(i);
        pio_out += 1;
    }
    for _ in 0..500 {
        core::hint::black_box(kit::probe_pio_read());
        pio_in += 1;
    }
    for i in 0..300 {
        kit::probe_mmio_write(i);
        mmio_write += 1;
    }
    for _ in 0..200 {
        core::hint::black_box(kit::probe_mmio_read());
        mmio_read += 1;
    }
    while hlt < 5 {
        lapic::timer_start(100_000, false);
        kit::arch::sti_hlt_cli();
        hlt += 1;
    }
    lapic::timer_stop();
    println!("kit: did pio_out={pio_out} pio_in={pio_in} mmio_write={mmio_write} mmio_read={mmio_read} hlt={hlt}");
    let user = kit::run_user(user_pio, 100, false);
    println!("kit: did user_pio_out={user}");
    kit::pass("exits");
    kit::poweroff()
}
