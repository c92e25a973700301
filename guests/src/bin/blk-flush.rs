//! virtio-blk durability: writes the disk's 4 KiB blocks 0, 1, 2, ... in order, one request
//! each, and after every few blocks (1 to 8, varying) a FLUSH; when the flush has completed it
//! prints `kit: flushed N` (blocks 0..N, N excluded, are on stable storage as far as the device
//! says). At the end of the disk: `kit: PASS blk-flush` and power-off. The host test kills the VMM
//! at random moments and checks that every block the console reported flushed is on the image,
//! whole (`tests/durability.rs`).
//!
//! Block `b` holds 512 qwords: `kitflush`, then `b`, then `record(b, i)` for i = 2..512, so a
//! block that is missing, torn or misplaced is told apart from a good one.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32, w32, w64};

kit::entry!(main);

const QMEM: u64 = 0x40_0000;
const HDR: u64 = 0x50_0000;
const STATUS: u64 = 0x50_0100;
const DATA: u64 = 0x51_0000;
const SPINS: u64 = 50_000_000;
const FLUSH: u64 = 1 << 9;
const BLOCK: u64 = 4096;

/// Qword `i` (2..512) of block `b`; the host test computes the same.
fn record(b: u64, i: u64) -> u64 {
    (b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i).rotate_left((i % 64) as u32)
}

fn header(ty: u32, sector: u64) {
    w32(HDR, ty);
    w32(HDR + 4, 0);
    w64(HDR + 8, sector);
    virtio::zero(STATUS, 8);
}

fn status() -> u8 {
    r32(STATUS) as u8
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let name = "blk-flush";
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 2) else {
        kit::fail(
            name,
            format_args!("no virtio-blk device on PCI ({access:?})"),
        );
    };
    match dev.negotiate(FLUSH) {
        Some(f) if f & FLUSH != 0 => {}
        _ => kit::fail(name, format_args!("no VIRTIO_BLK_F_FLUSH")),
    }
    virtio::zero(QMEM, 0x3000);
    let mut q = dev.setup_queue(0, 0, QMEM);
    dev.driver_ok();
    let sectors = r32(dev.config) as u64 | ((r32(dev.config + 4) as u64) << 32);
    let blocks = sectors * 512 / BLOCK;
    println!("kit: blk-flush: {blocks} blocks of 4 KiB");
    let mut b = 0;
    while b < blocks {
        // 1..=8 blocks between flushes, varying so that flushes fall at many points.
        let batch = 1 + (b.wrapping_mul(7) ^ (b >> 3)) % 8;
        let end = (b + batch).min(blocks);
        while b < end {
            w64(DATA, u64::from_le_bytes(*b"kitflush"));
            w64(DATA + 8, b);
            for i in 2..BLOCK / 8 {
                w64(DATA + 8 * i, record(b, i));
            }
            header(1, b * BLOCK / 512);
            match q.submit(
                &[
                    (HDR, 16, false),
                    (DATA, BLOCK as u32, false),
                    (STATUS, 1, true),
                ],
                SPINS,
            ) {
                Some(_) if status() == 0 => {}
                r => kit::fail(name, format_args!("write {b}: {r:?} status {}", status())),
            }
            b += 1;
        }
        header(4, 0);
        match q.submit(&[(HDR, 16, false), (STATUS, 1, true)], SPINS) {
            Some(_) if status() == 0 => {}
            r => kit::fail(name, format_args!("flush: {r:?} status {}", status())),
        }
        println!("kit: flushed {b}");
    }
    kit::pass(name);
    kit::poweroff()
}
