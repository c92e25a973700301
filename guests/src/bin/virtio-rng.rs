//! virtio-rng through the kit's own driver: two 64-byte requests, which must be filled and differ.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32};

kit::entry!(main);

const QMEM: u64 = 0x40_0000;
const BUF: u64 = 0x50_0000;
const SPINS: u64 = 5_000_000;

fn main(boot: &'static kit::BootInfo) -> ! {
    let name = "virtio-rng";
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 4) else {
        kit::fail(
            name,
            format_args!("no virtio-rng device on PCI ({access:?})"),
        );
    };
    if dev.negotiate(0).is_none() {
        kit::fail(name, format_args!("device refused the features"));
    }
    virtio::zero(QMEM, 0x3000);
    let mut q = dev.setup_queue(0, 0, QMEM);
    dev.driver_ok();
    virtio::zero(BUF, 128);
    for i in 0..2u64 {
        match q.submit(&[(BUF + 64 * i, 64, true)], SPINS) {
            Some((_, 64)) => {}
            r => kit::fail(name, format_args!("request {i}: {r:?}")),
        }
    }
    let (mut zero_words, mut same) = (0, 0);
    for w in 0..16 {
        let a = r32(BUF + 4 * w);
        let b = r32(BUF + 64 + 4 * w);
        zero_words += (a == 0) as u32;
        same += (a == b) as u32;
    }
    if zero_words > 2 || same > 2 {
        kit::fail(
            name,
            format_args!("entropy looks wrong ({zero_words} zero words, {same} equal)"),
        );
    }
    println!(
        "kit: virtio-rng read 128 bytes: {:#010x} {:#010x} ...",
        r32(BUF),
        r32(BUF + 4)
    );
    kit::pass(name);
    kit::poweroff()
}
