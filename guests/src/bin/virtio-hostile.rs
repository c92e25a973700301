//! A hostile virtio-blk driver: a queue size that is not a power of two (the device must report
//! DEVICE_NEEDS_RESET), a notification before DRIVER_OK (served once the device starts), a
//! descriptor loop, a buffer outside guest memory, an absurd length, a header in a device-writable
//! buffer, a head index out of range, and writes to read-only configuration. After each, a valid
//! read must still work: the device (and the VMM) survive. Last, a flood of what the VMM warns
//! about (BAR moves, ACPI sleep requests), which must not flood the host's stderr.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32, w32, w64, Queue, DESC_F_NEXT, DESC_F_WRITE, STATUS_NEEDS_RESET};

kit::entry!(main);

const QMEM: u64 = 0x40_0000;
const HDR: u64 = 0x50_0000;
const STATUS: u64 = 0x50_0100;
const DATA: u64 = 0x51_0000;
const SPINS: u64 = 5_000_000;
const NAME: &str = "virtio-hostile";
const FLOOD: u32 = 500;

fn read_header(sector: u64) {
    w32(HDR, 0);
    w32(HDR + 4, 0);
    w64(HDR + 8, sector);
    w32(STATUS, 0xff);
}

/// A valid one-sector read must complete with status OK.
fn good_read(q: &mut Queue, after: &str) {
    read_header(0);
    match q.submit(
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        SPINS,
    ) {
        Some((_, 513)) if r32(STATUS) as u8 == 0 => {}
        r => kit::fail(
            NAME,
            format_args!("valid read after {after}: {r:?} status {:#x}", r32(STATUS)),
        ),
    }
}

/// A hostile chain published at head 0 must complete (any length) without a good status.
fn hostile(q: &mut Queue, what: &str) {
    q.publish(0);
    match q.wait(SPINS) {
        Some((0, len)) => println!("kit: {what}: completed with len {len}"),
        r => kit::fail(NAME, format_args!("{what}: {r:?}")),
    }
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 2) else {
        kit::fail(NAME, format_args!("no virtio-blk device"));
    };

    // 1. Queue size 3.
    dev.negotiate(0)
        .unwrap_or_else(|| kit::fail(NAME, format_args!("features refused")));
    virtio::zero(QMEM, 0x3000);
    dev.setup_queue(0, 3, QMEM);
    dev.driver_ok();
    if dev.status() & STATUS_NEEDS_RESET == 0 {
        kit::fail(
            NAME,
            format_args!("queue size 3 accepted (status {:#x})", dev.status()),
        );
    }
    println!(
        "kit: queue size 3: DEVICE_NEEDS_RESET (status {:#x})",
        dev.status()
    );

    // 2. Notification before DRIVER_OK.
    dev.negotiate(0)
        .unwrap_or_else(|| kit::fail(NAME, format_args!("features refused")));
    virtio::zero(QMEM, 0x3000);
    let mut q = dev.setup_queue(0, 8, QMEM);
    read_header(0);
    q.write_desc(0, HDR, 16, DESC_F_NEXT, 1);
    q.write_desc(1, DATA, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    q.write_desc(2, STATUS, 1, DESC_F_WRITE, 0);
    q.publish(0);
    if let Some(r) = q.wait(1000) {
        kit::fail(NAME, format_args!("served before DRIVER_OK: {r:?}"));
    }
    dev.driver_ok();
    match q.wait(SPINS) {
        Some((0, 513)) => println!("kit: notify before DRIVER_OK: served after DRIVER_OK"),
        r => kit::fail(NAME, format_args!("early request: {r:?}")),
    }

    // 3. A loop: 0 -> 1 -> 0.
    q.write_desc(0, HDR, 16, DESC_F_NEXT, 1);
    q.write_desc(1, DATA, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
    hostile(&mut q, "descriptor loop");
    good_read(&mut q, "a descriptor loop");

    // 4. Outside guest memory.
    q.write_desc(0, 0x7fff_0000_0000, 16, DESC_F_NEXT, 1);
    q.write_desc(1, STATUS, 1, DESC_F_WRITE, 0);
    hostile(&mut q, "buffer outside memory");
    good_read(&mut q, "a buffer outside memory");

    // 5. An absurd length.
    q.write_desc(0, HDR, 0xffff_ff00, DESC_F_NEXT, 1);
    q.write_desc(1, STATUS, 1, DESC_F_WRITE, 0);
    hostile(&mut q, "absurd length");
    good_read(&mut q, "an absurd length");

    // 6. The header in a device-writable buffer.
    read_header(0);
    q.write_desc(0, HDR, 16, DESC_F_NEXT | DESC_F_WRITE, 1);
    q.write_desc(1, STATUS, 1, DESC_F_WRITE, 0);
    hostile(&mut q, "wrong direction");
    good_read(&mut q, "a wrong-direction header");

    // 7. A head index out of range: the device cannot return it; the queue must go on.
    q.publish(200);
    let _ = q.wait(2000);
    q.last_used = virtio::r16(q.used + 2);
    good_read(&mut q, "a head index out of range");

    // 8. Writes to read-only configuration (capacity).
    let cap = r32(dev.config);
    w32(dev.config, 0xdead_beef);
    if r32(dev.config) != cap {
        kit::fail(NAME, format_args!("capacity changed by a guest write"));
    }
    println!("kit: write to read-only config ignored");

    // 9. A flood of refused BAR moves and ACPI sleep requests (S1): warned about, rate-limited.
    let bar0 = dev.func.read32(0x10);
    for _ in 0..FLOOD {
        dev.func.write32(0x10, bar0 ^ 0x1000_0000);
        kit::arch::outw(0x604, (1 << 10) | (1 << 13));
    }
    if dev.func.read32(0x10) != bar0 {
        kit::fail(NAME, format_args!("BAR 0 moved"));
    }
    good_read(&mut q, "a flood of BAR moves");
    println!("kit: {FLOOD} BAR moves and S1 requests refused");
    kit::pass(NAME);
    kit::poweroff()
}
