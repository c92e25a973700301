//! The compute guest: a long deterministic computation whose result shows whether anything on
//! the way (a pause, a snapshot and restore) lost or changed guest state. Each round rewrites a
//! 4 MiB buffer at 8 MiB at CPL3 (user mode runs natively even on PVM hosts) with a xorshift
//! stream mixed with what the buffer held, and folds a checksum into an accumulator; a periodic
//! LAPIC timer (100 Hz) interrupts it throughout. It prints `kit: compute round R acc X ticks T`
//! (T: timer interrupts so far) every `every=N` rounds (default 100), answers each byte on its console with
//! `kit: compute pong R` (a restored copy's first response), and at the end prints
//! `kit: compute result X rounds N ticks T` and powers off. `rounds=N` (default 2000) sets
//! the length; the result depends on nothing else.
#![no_std]
#![no_main]

use core::sync::atomic::Ordering;
use kit::{console, lapic, println};

kit::entry!(main);

/// The buffer: above the guest's image, inside the smallest guest (16 MiB).
const BUF: u64 = 0x80_0000;
const WORDS: usize = (4 << 20) / 8;
/// The LAPIC timer's period.
const TICK_NS: u32 = 10_000_000;

/// One round at CPL3: the buffer rewritten, its checksum returned.
extern "C" fn round(r: u64) -> u64 {
    let buf = BUF as *mut u64;
    let mut x = r.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut sum = 0u64;
    for i in 0..WORDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: BUF..BUF+4 MiB is identity-mapped, user-accessible RAM nothing else uses.
        let v = unsafe { buf.add(i).read() };
        let n = v.rotate_left(5) ^ x ^ i as u64;
        // SAFETY: as above.
        unsafe { buf.add(i).write(n) };
        sum = sum.wrapping_add(n).rotate_left(1);
    }
    sum
}

fn parse_arg(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        v.parse().ok()
    })
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let rounds = parse_arg(boot.cmdline, "rounds").unwrap_or(2000);
    let every = parse_arg(boot.cmdline, "every").unwrap_or(100).max(1);
    println!("kit: compute rounds={rounds}");
    lapic::timer_start(TICK_NS, true);
    let mut acc = 0u64;
    for r in 1..=rounds {
        let sum = kit::run_user(round, r, true);
        acc = acc.rotate_left(7) ^ sum;
        while console::try_getb().is_some() {
            println!("kit: compute pong {r}");
        }
        if r % every == 0 {
            let ticks = lapic::TIMER_TICKS.load(Ordering::Relaxed);
            println!("kit: compute round {r} acc {acc:#018x} ticks {ticks}");
        }
    }
    lapic::timer_stop();
    let ticks = lapic::TIMER_TICKS.load(Ordering::Relaxed);
    println!("kit: compute result {acc:#018x} rounds {rounds} ticks {ticks}");
    kit::pass("compute");
    kit::poweroff()
}
