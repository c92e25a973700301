//! Floods the console: `bytes=N` (default 65536) of text lines written to COM1 at CPL3, then
//! `kit: PASS console-flood` and power-off. The VMM must not make the guest wait for a stdout
//! that does not read (tests/console.rs gives it a pipe nobody reads).
#![no_std]
#![no_main]

kit::entry!(main);

extern "C" fn flood(bytes: u64) -> u64 {
    for i in 0..bytes {
        kit::console::putb(if i % 64 == 63 {
            b'\n'
        } else {
            b'a' + (i % 26) as u8
        });
    }
    bytes
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let bytes = boot
        .cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("bytes=")?.parse().ok())
        .unwrap_or(65536u64);
    kit::println!("kit: flooding the console with {bytes} bytes");
    kit::run_user(flood, bytes, false);
    kit::println!();
    kit::pass("console-flood");
    kit::poweroff()
}
