//! virtio across a snapshot: `rounds=N` rounds (default 400), each pulling 64 bytes from
//! virtio-rng (which must be filled) and, with a virtio-blk disk, writing one 512-byte sector
//! (sector `1 + r % 64`, a pattern of the round), reading it back and comparing, with a flush
//! every 8 rounds; `delay_us=D` (default 1000) of busy waiting between rounds. It prints
//! `kit: virtio-snap round R` every `every=N` rounds (default 20) and, at the end, after reading
//! every sector back once more, `kit: virtio-snap result X` (X depends only on the rounds). A
//! request the device never completes fails the guest: a restored device that lost its queues'
//! state shows here.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32, w32, w64, Queue};

kit::entry!(main);

const RNG_QMEM: u64 = 0x40_0000;
const BLK_QMEM: u64 = 0x40_4000;
const RNG_BUF: u64 = 0x50_0000;
const HDR: u64 = 0x50_1000;
const STATUS: u64 = 0x50_1100;
const DATA: u64 = 0x51_0000;
const BACK: u64 = 0x52_0000;
const SPINS: u64 = 50_000_000;
const FLUSH: u64 = 1 << 9;
const SECTORS: u64 = 64;
const NAME: &str = "virtio-snap";

fn parse_arg(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        v.parse().ok()
    })
}

/// The sector round `r` writes.
fn sector_of(r: u64) -> u64 {
    1 + r % SECTORS
}

/// Word `i` of what round `r` writes.
fn pattern(r: u64, i: u64) -> u64 {
    r.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 32) ^ i
}

fn blk(q: &mut Queue, ty: u32, sector: u64, data: Option<(u64, bool)>) {
    w32(HDR, ty);
    w32(HDR + 4, 0);
    w64(HDR + 8, sector);
    w32(STATUS, 0xff);
    let r = match data {
        Some((addr, write)) => q.submit(
            &[(HDR, 16, false), (addr, 512, write), (STATUS, 1, true)],
            SPINS,
        ),
        None => q.submit(&[(HDR, 16, false), (STATUS, 1, true)], SPINS),
    };
    if r.is_none() || r32(STATUS) as u8 != 0 {
        kit::fail(
            NAME,
            format_args!(
                "block request {ty} at sector {sector}: {r:?} status {}",
                r32(STATUS) as u8
            ),
        );
    }
}

/// Reads `sector` back and checks it holds round `r`'s pattern; returns its checksum.
fn check_sector(q: &mut Queue, sector: u64, r: u64) -> u64 {
    virtio::zero(BACK, 512);
    blk(q, 0, sector, Some((BACK, true)));
    let mut sum = 0u64;
    for i in 0..64 {
        let v = r32(BACK + 8 * i) as u64 | ((r32(BACK + 8 * i + 4) as u64) << 32);
        if v != pattern(r, i) {
            kit::fail(
                NAME,
                format_args!("sector {sector} (round {r}) word {i}: {v:#x}"),
            );
        }
        // Not linear in XOR: a rotate-and-XOR fold of this pattern cancels out.
        sum = (sum ^ v).wrapping_mul(0x0100_0000_01b3);
    }
    sum
}

fn round(r: u64, rng: &mut Queue, disk: &mut Option<Queue>) -> u64 {
    virtio::zero(RNG_BUF, 64);
    match rng.submit(&[(RNG_BUF, 64, true)], SPINS) {
        Some((_, 64)) => {}
        x => kit::fail(NAME, format_args!("round {r}: rng request: {x:?}")),
    }
    if (0..16).all(|w| r32(RNG_BUF + 4 * w) == 0) {
        kit::fail(NAME, format_args!("round {r}: no entropy"));
    }
    let Some(q) = disk else { return r };
    for i in 0..64 {
        w64(DATA + 8 * i, pattern(r, i));
    }
    blk(q, 1, sector_of(r), Some((DATA, false)));
    if r % 8 == 0 {
        blk(q, 4, 0, None);
    }
    check_sector(q, sector_of(r), r)
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let rounds = parse_arg(boot.cmdline, "rounds").unwrap_or(400);
    let every = parse_arg(boot.cmdline, "every").unwrap_or(20).max(1);
    let delay = parse_arg(boot.cmdline, "delay_us").unwrap_or(1000);
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(rng_dev) = virtio::find(access, 4) else {
        kit::fail(NAME, format_args!("no virtio-rng device on PCI"));
    };
    if rng_dev.negotiate(0).is_none() {
        kit::fail(NAME, format_args!("virtio-rng refused the features"));
    }
    virtio::zero(RNG_QMEM, 0x4000);
    let mut rng = rng_dev.setup_queue(0, 0, RNG_QMEM);
    rng_dev.driver_ok();
    let mut disk = virtio::find(access, 2).map(|d| {
        if d.negotiate(FLUSH).is_none_or(|f| f & FLUSH == 0) {
            kit::fail(NAME, format_args!("virtio-blk refused FLUSH"));
        }
        virtio::zero(BLK_QMEM, 0x4000);
        let q = d.setup_queue(0, 0, BLK_QMEM);
        d.driver_ok();
        q
    });
    println!(
        "kit: virtio-snap rounds={rounds} disk={}",
        if disk.is_some() { "yes" } else { "no" }
    );
    let mut acc = 0u64;
    for r in 1..=rounds {
        acc = acc
            .rotate_left(7)
            .wrapping_add(round(r, &mut rng, &mut disk));
        if r % every == 0 {
            println!("kit: virtio-snap round {r}");
        }
        kit::lapic::delay_ns(delay * 1000);
    }
    if let Some(q) = &mut disk {
        // Every sector once more, as its last round left it.
        for r in rounds.saturating_sub(SECTORS - 1).max(1)..=rounds {
            acc = acc
                .rotate_left(1)
                .wrapping_add(check_sector(q, sector_of(r), r));
        }
    }
    println!("kit: virtio-snap result {acc:#018x}");
    kit::pass(NAME);
    kit::poweroff()
}
