//! virtio-balloon through the kit's own driver: reads the target (`num_pages`), writes a 64 MiB
//! region of RAM at CPL3 (so the host commits it), inflates the balloon by the target with PFNs
//! from that region, sets `actual`, answers a statistics request (the device returns the stats
//! buffer; the guest refills and resends it), reports a free 4 MiB range of the region through
//! the reporting queue, then deflates 256 pages and checks that a deflated page and the reported
//! range read back as zeros (the host dropped them). The host test checks the device facts and
//! the VMM's RSS before and after inflation.
//!
//! With the command-line word `follow`, one more phase runs before the PASS line: the guest
//! prints `kit: balloon waiting for a new target pages=<num_pages>`, polls `num_pages` (every
//! 2 ms, for up to 60 s; then `kit: FAIL virtio-balloon: no new target`) until it differs from
//! the target read at start, acknowledges the configuration-change interrupt (reads the ISR),
//! inflates (touching each page first, so the host has it committed) or deflates the difference
//! between the new target and the pages in the balloon, sets `actual` and prints
//! `kit: balloon followed target=<num_pages> actual=<actual>`. The balloon follows within the
//! region less the reported range: at most 60 MiB (15360 pages); a larger target fails.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r32, w32};

kit::entry!(main);

/// Queues 0..4 (inflate, deflate, stats, reporting), 16 KiB each.
const QMEM: u64 = 0x40_0000;
/// PFN arrays.
const PFNS: u64 = 0x60_0000;
/// The statistics buffer.
const STATS: u64 = 0x70_0000;
/// The region the guest writes and then gives back.
const REGION: u64 = 0x400_0000;
const REGION_LEN: u64 = 64 << 20;
/// The reported free range (inside the region, after the balloon's part of it).
const REPORT: u64 = REGION + (56 << 20);
const REPORT_LEN: u64 = 4 << 20;
const DEFLATE_PAGES: u32 = 256;
const PFNS_PER_REQUEST: u32 = 1024;
const SPINS: u64 = 5_000_000;
/// A statistics request comes with the host's polling timer (1 s in the test).
const STATS_SPINS: u64 = 40_000_000;
const STATS_VQ: u64 = 1 << 1;
const REPORTING: u64 = 1 << 5;
const PATTERN: u64 = 0x5a5a_0000_c3c3_0000;
/// The follow phase: region pages the balloon may hold (all but the reported range), the wait
/// for a new target and the pause between two reads of `num_pages`.
const FOLLOW_CAP: u32 = ((REGION_LEN - REPORT_LEN) >> 12) as u32;
const FOLLOW_WAIT_S: u64 = 60;
const FOLLOW_POLL_NS: u64 = 2_000_000;

extern "C" fn fill(_arg: u64) -> u64 {
    let mut a = REGION;
    while a < REGION + REGION_LEN {
        // SAFETY: the region is identity-mapped RAM that nothing else uses.
        unsafe { core::ptr::write_volatile(a as *mut u64, PATTERN ^ a) };
        a += 8;
    }
    0
}

/// Writes statistics entries (le16 tag, le64 value, packed) at STATS; returns the length.
fn write_stats(entries: &[(u16, u64)]) -> u32 {
    for (i, &(tag, v)) in entries.iter().enumerate() {
        let at = STATS + 10 * i as u64;
        // SAFETY: STATS is identity-mapped RAM owned by this guest; the entries are packed, so
        // the stores are unaligned.
        unsafe {
            core::ptr::write_unaligned(at as *mut u16, tag);
            core::ptr::write_unaligned((at + 2) as *mut u64, v);
        }
    }
    10 * entries.len() as u32
}

fn read64(a: u64) -> u64 {
    // SAFETY: identity-mapped guest RAM.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

/// The PFN of the follow phase's page `i` (0..FOLLOW_CAP): region pages in order, skipping the
/// reported range.
fn follow_pfn(i: u32) -> u32 {
    let skip = if u64::from(i) >= (REPORT - REGION) >> 12 {
        (REPORT_LEN >> 12) as u32
    } else {
        0
    };
    (REGION >> 12) as u32 + i + skip
}

/// Sends the PFNs of follow pages `from..from + n` on `q` (inflate or deflate), 1024 a request.
fn send_pfns(name: &str, q: &mut virtio::Queue, what: &str, from: u32, n: u32) {
    let mut done = 0u32;
    while done < n {
        let k = (n - done).min(PFNS_PER_REQUEST);
        for i in 0..k {
            w32(PFNS + 4 * u64::from(i), follow_pfn(from + done + i));
        }
        if q.submit(&[(PFNS, 4 * k, false)], SPINS).is_none() {
            kit::fail(
                name,
                format_args!("{what} request at follow page {} timed out", from + done),
            );
        }
        done += k;
    }
}

/// The follow phase (see the module comment). The balloon holds follow pages `lo..hi`.
fn follow(
    name: &str,
    dev: &virtio::Device,
    inflate: &mut virtio::Queue,
    deflate: &mut virtio::Queue,
    start_target: u32,
    (mut lo, mut hi): (u32, u32),
) {
    println!(
        "kit: balloon waiting for a new target pages={}",
        r32(dev.config)
    );
    let hz = kit::lapic::tsc_hz();
    let t0 = kit::arch::rdtsc();
    let target = loop {
        let t = r32(dev.config);
        if t != start_target {
            break t;
        }
        if kit::arch::rdtsc() - t0 > FOLLOW_WAIT_S * hz {
            kit::fail(name, format_args!("no new target"));
        }
        kit::lapic::delay_ns(FOLLOW_POLL_NS);
    };
    // Acknowledge the configuration-change interrupt (no MSI-X here: only the ISR records it).
    // SAFETY: the ISR status byte of the device's BAR, identity-mapped MMIO; reading clears it.
    let _isr = unsafe { core::ptr::read_volatile(dev.isr as *const u8) };
    if target > FOLLOW_CAP {
        kit::fail(
            name,
            format_args!(
                "new target {target} pages is more than the {FOLLOW_CAP} pages ({} MiB) the region \
                 can give",
                FOLLOW_CAP >> 8
            ),
        );
    }
    let have = hi - lo;
    if target > have {
        // Grow upwards first, then downwards; touch each page so the host has it committed.
        let up = (target - have).min(FOLLOW_CAP - hi);
        let down = target - have - up;
        for i in (hi..hi + up).chain(lo - down..lo) {
            let a = u64::from(follow_pfn(i)) << 12;
            virtio::w64(a, PATTERN ^ a);
        }
        send_pfns(name, inflate, "inflate", hi, up);
        send_pfns(name, inflate, "inflate", lo - down, down);
        hi += up;
        lo -= down;
    } else if target < have {
        send_pfns(
            name,
            deflate,
            "deflate",
            hi - (have - target),
            have - target,
        );
        hi -= have - target;
    }
    w32(dev.config + 4, hi - lo);
    println!(
        "kit: balloon followed target={target} actual={}",
        r32(dev.config + 4)
    );
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let name = "virtio-balloon";
    let follow_on = boot.cmdline.split_ascii_whitespace().any(|w| w == "follow");
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 5) else {
        kit::fail(
            name,
            format_args!("no virtio-balloon device on PCI ({access:?})"),
        );
    };
    let Some(features) = dev.negotiate(STATS_VQ | REPORTING) else {
        kit::fail(name, format_args!("device refused the features"));
    };
    if features & (STATS_VQ | REPORTING) != STATS_VQ | REPORTING {
        kit::fail(
            name,
            format_args!("statistics or reporting not offered ({features:#x})"),
        );
    }
    if boot.ram_bytes < REGION + REGION_LEN {
        kit::fail(name, format_args!("needs at least 128 MiB of RAM"));
    }
    virtio::zero(QMEM, 0x10000);
    let mut inflate = dev.setup_queue(0, 0, QMEM);
    let mut deflate = dev.setup_queue(1, 0, QMEM + 0x4000);
    let mut stats = dev.setup_queue(2, 0, QMEM + 0x8000);
    let mut report = dev.setup_queue(3, 0, QMEM + 0xc000);
    dev.driver_ok();
    let target = r32(dev.config);
    println!(
        "kit: virtio-balloon target {target} pages ({} MiB), {} MiB of RAM",
        target >> 8,
        boot.ram_bytes >> 20
    );
    if target < DEFLATE_PAGES || u64::from(target) * 4096 >= REPORT - REGION {
        kit::fail(
            name,
            format_args!("target {target} pages is not 1 MiB to below 56 MiB"),
        );
    }

    // The first statistics: the device keeps this buffer until it wants fresh values.
    let ram = boot.ram_bytes;
    let len = write_stats(&[
        (0, 0),
        (1, 0),
        (4, ram - REGION_LEN),
        (5, ram),
        (6, ram - REGION_LEN),
        (7, 0),
    ]);
    stats.write_desc(0, STATS, len, 0, 0);
    stats.publish(0);

    let t0 = kit::arch::rdtsc();
    kit::run_user(fill, 0, false);
    println!(
        "kit: virtio-balloon wrote {} MiB at CPL3 in {} Mcycles",
        REGION_LEN >> 20,
        (kit::arch::rdtsc() - t0) / 1_000_000
    );

    let first = (REGION >> 12) as u32;
    let mut done = 0u32;
    while done < target {
        let n = (target - done).min(PFNS_PER_REQUEST);
        for i in 0..n {
            w32(PFNS + 4 * u64::from(i), first + done + i);
        }
        match inflate.submit(&[(PFNS, 4 * n, false)], SPINS) {
            Some(_) => {}
            None => kit::fail(
                name,
                format_args!("inflate request at page {done} timed out"),
            ),
        }
        done += n;
    }
    w32(dev.config + 4, target);
    println!(
        "kit: virtio-balloon inflated {target} pages, actual={}",
        r32(dev.config + 4)
    );

    // The statistics request: the buffer comes back; refill it and give it again.
    let t1 = kit::arch::rdtsc();
    if stats.wait(STATS_SPINS).is_none() {
        kit::fail(name, format_args!("no statistics request from the device"));
    }
    let waited = (kit::arch::rdtsc() - t1) / 1_000_000;
    let free = ram - REGION_LEN + u64::from(target) * 4096;
    let len = write_stats(&[(0, 0), (1, 0), (4, free), (5, ram), (6, free), (7, 4096)]);
    stats.write_desc(0, STATS, len, 0, 0);
    stats.publish(0);
    println!(
        "kit: virtio-balloon answered a statistics request after {waited} Mcycles (free {} MiB)",
        free >> 20
    );

    // Free-page reporting: two 2 MiB blocks.
    let half = (REPORT_LEN / 2) as u32;
    match report.submit(
        &[(REPORT, half, true), (REPORT + u64::from(half), half, true)],
        SPINS,
    ) {
        Some((_, 0)) => {}
        r => kit::fail(name, format_args!("free-page report: {r:?}")),
    }
    if read64(REPORT) != 0 || read64(REPORT + REPORT_LEN - 8) != 0 {
        kit::fail(name, format_args!("the reported range still holds data"));
    }
    println!(
        "kit: virtio-balloon reported {} MiB free; it reads as zeros",
        REPORT_LEN >> 20
    );

    // Deflate the first pages of the balloon: they fault back in as zeros.
    for i in 0..DEFLATE_PAGES {
        w32(PFNS + 4 * u64::from(i), first + i);
    }
    if deflate
        .submit(&[(PFNS, 4 * DEFLATE_PAGES, false)], SPINS)
        .is_none()
    {
        kit::fail(name, format_args!("deflate request timed out"));
    }
    w32(dev.config + 4, target - DEFLATE_PAGES);
    let back = read64(REGION) | read64(REGION + u64::from(DEFLATE_PAGES) * 4096 - 8);
    if back != 0 {
        kit::fail(
            name,
            format_args!("a deflated page kept its data ({back:#x})"),
        );
    }
    let untouched = REGION + u64::from(target) * 4096;
    if read64(untouched) != PATTERN ^ untouched {
        kit::fail(
            name,
            format_args!("a page outside the balloon lost its data"),
        );
    }
    println!(
        "kit: virtio-balloon deflated {DEFLATE_PAGES} pages, actual={}; they read as zeros",
        r32(dev.config + 4)
    );
    if follow_on {
        follow(
            name,
            &dev,
            &mut inflate,
            &mut deflate,
            target,
            (DEFLATE_PAGES, target),
        );
    }
    kit::pass(name);
    kit::poweroff()
}
