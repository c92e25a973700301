//! virtio-blk through the kit's own driver: writes sectors 1..=8 (sector `s` filled with byte
//! `s ^ 0x5a`, the first 16 bytes of sector 1 are `kit-virtio-blk!!`), flushes, reads them back
//! and compares, reads the serial (GET_ID), and checks that a read past the end fails with IOERR.
//! The host test then checks the image file.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32, w32, w64};

kit::entry!(main);

const QMEM: u64 = 0x40_0000;
const HDR: u64 = 0x50_0000;
const STATUS: u64 = 0x50_0100;
const ID: u64 = 0x50_0200;
const DATA: u64 = 0x51_0000;
const BACK: u64 = 0x52_0000;
const SPINS: u64 = 5_000_000;
const FLUSH: u64 = 1 << 9;

fn header(ty: u32, sector: u64) {
    w32(HDR, ty);
    w32(HDR + 4, 0);
    w64(HDR + 8, sector);
    kit::virtio::zero(STATUS, 8);
}

fn status() -> u8 {
    r32(STATUS) as u8
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let name = "virtio-blk";
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 2) else {
        kit::fail(
            name,
            format_args!("no virtio-blk device on PCI ({access:?})"),
        );
    };
    let Some(features) = dev.negotiate(FLUSH) else {
        kit::fail(name, format_args!("device refused the features"));
    };
    if features & FLUSH == 0 {
        kit::fail(name, format_args!("no VIRTIO_BLK_F_FLUSH"));
    }
    virtio::zero(QMEM, 0x3000);
    let mut q = dev.setup_queue(0, 0, QMEM);
    dev.driver_ok();
    let capacity = r32(dev.config) as u64 | ((r32(dev.config + 4) as u64) << 32);
    println!(
        "kit: virtio-blk at 00:{:02x}.0 common={:#x} capacity={capacity} queue={}",
        dev.func.dev, dev.common, q.size
    );

    for s in 1..=8u64 {
        let fill = 0x0101_0101_0101_0101u64 * ((s as u8 ^ 0x5a) as u64);
        let mut a = DATA + (s - 1) * 512;
        while a < DATA + s * 512 {
            w64(a, fill);
            a += 8;
        }
    }
    w64(DATA, u64::from_le_bytes(*b"kit-virt"));
    w64(DATA + 8, u64::from_le_bytes(*b"io-blk!!"));
    header(1, 1);
    match q.submit(
        &[(HDR, 16, false), (DATA, 4096, false), (STATUS, 1, true)],
        SPINS,
    ) {
        Some((_, 1)) if status() == 0 => {}
        r => kit::fail(name, format_args!("write: {r:?} status {}", status())),
    }
    header(4, 0);
    match q.submit(&[(HDR, 16, false), (STATUS, 1, true)], SPINS) {
        Some(_) if status() == 0 => {}
        r => kit::fail(name, format_args!("flush: {r:?} status {}", status())),
    }
    virtio::zero(BACK, 4096);
    header(0, 1);
    match q.submit(
        &[(HDR, 16, false), (BACK, 4096, true), (STATUS, 1, true)],
        SPINS,
    ) {
        Some((_, 4097)) if status() == 0 => {}
        r => kit::fail(name, format_args!("read: {r:?} status {}", status())),
    }
    let mut a = 0;
    while a < 4096 {
        if virtio::r32(DATA + a) != virtio::r32(BACK + a) {
            kit::fail(name, format_args!("read back differs at byte {a}"));
        }
        a += 4;
    }
    header(8, 0);
    virtio::zero(ID, 24);
    let id_len = match q.submit(
        &[(HDR, 16, false), (ID, 20, true), (STATUS, 1, true)],
        SPINS,
    ) {
        Some((_, n)) if status() == 0 => n - 1,
        r => kit::fail(name, format_args!("get-id: {r:?} status {}", status())),
    };
    // SAFETY: ID is identity-mapped guest RAM the device just filled.
    let id = unsafe { core::slice::from_raw_parts(ID as *const u8, id_len as usize) };
    header(0, capacity);
    match q.submit(
        &[(HDR, 16, false), (BACK, 512, true), (STATUS, 1, true)],
        SPINS,
    ) {
        Some(_) if status() == 1 => {}
        r => kit::fail(
            name,
            format_args!("read past the end: {r:?} status {}", status()),
        ),
    }
    println!(
        "kit: virtio-blk wrote, flushed and read back sectors 1-8; id={}; read past the end: IOERR",
        kit::arch::text(id)
    );
    kit::pass(name);
    kit::poweroff()
}
