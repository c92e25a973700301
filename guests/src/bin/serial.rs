//! Serial input: prints `kit: ready`, reads a line from COM1, echoes it upper-cased.
#![no_std]
#![no_main]

kit::entry!(main);

fn main(_boot: &'static kit::BootInfo) -> ! {
    kit::println!("kit: ready");
    let mut buf = [0u8; 256];
    let n = kit::console::read_line(&mut buf);
    buf[..n].make_ascii_uppercase();
    kit::println!(
        "kit: echo {}",
        core::str::from_utf8(&buf[..n]).unwrap_or("<not utf-8>")
    );
    kit::pass("serial");
    kit::poweroff()
}
