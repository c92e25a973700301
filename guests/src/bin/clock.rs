//! The clock guest: counts ticks of its LAPIC timer (one every 200 ms, sleeping in HLT) and
//! prints, at each, the tick number, the time its TSC says and the time its kvmclock says (KVM's
//! paravirtual clock, when CPUID offers it). It never ends by itself: the tests of the VM's
//! lifecycle pause it (no tick may appear while paused; kvmclock does not count the pause) and
//! stop it through the API.
#![no_std]
#![no_main]

use kit::{arch, lapic, println};

kit::entry!(main);

const TICK_NS: u32 = 200_000_000;
/// `MSR_KVM_SYSTEM_TIME_NEW`: the guest-physical address of its time structure, bit 0 = enable.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// CPUID 0x4000_0001 EAX bit 3: `KVM_FEATURE_CLOCKSOURCE2`.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// `struct pvclock_vcpu_time_info`, which KVM updates.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

fn kvmclock_offered() -> bool {
    arch::cpuid(0x4000_0000, 0).0 >= 0x4000_0001
        && arch::cpuid(0x4000_0001, 0).0 & KVM_FEATURE_CLOCKSOURCE2 != 0
}

/// kvmclock's time in ns (the pvclock algorithm: retry while KVM updates the structure).
fn kvmclock_ns() -> u64 {
    let p = core::ptr::addr_of!(PVCLOCK);
    loop {
        // SAFETY: PVCLOCK is a static KVM writes to; every read is volatile.
        let (v1, ts, st, mul, shift) = unsafe {
            (
                core::ptr::addr_of!((*p).version).read_volatile(),
                core::ptr::addr_of!((*p).tsc_timestamp).read_volatile(),
                core::ptr::addr_of!((*p).system_time).read_volatile(),
                core::ptr::addr_of!((*p).tsc_to_system_mul).read_volatile(),
                core::ptr::addr_of!((*p).tsc_shift).read_volatile(),
            )
        };
        let mut delta = arch::rdtsc().wrapping_sub(ts);
        // SAFETY: as above.
        let v2 = unsafe { core::ptr::addr_of!((*p).version).read_volatile() };
        if v1 & 1 != 0 || v1 != v2 {
            continue;
        }
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= -shift;
        }
        return st.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
    }
}

fn main(_boot: &'static kit::BootInfo) -> ! {
    let kvmclock = kvmclock_offered();
    if kvmclock {
        let pa = core::ptr::addr_of!(PVCLOCK) as u64; // identity-mapped
        arch::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, pa | 1);
    }
    println!(
        "kit: clock guest (kvmclock {})",
        if kvmclock { "on" } else { "off" }
    );
    let hz = lapic::tsc_hz();
    let (t0, k0) = (arch::rdtsc(), if kvmclock { kvmclock_ns() } else { 0 });
    let mut tick: u64 = 0;
    loop {
        lapic::sleep_hlt(TICK_NS);
        tick += 1;
        let tsc_ms = (arch::rdtsc() - t0) as u128 * 1000 / hz as u128;
        if kvmclock {
            let kvm_ms = (kvmclock_ns() - k0) / 1_000_000;
            println!("kit: tick {tick} tsc_ms {tsc_ms} kvmclock_ms {kvm_ms}");
        } else {
            println!("kit: tick {tick} tsc_ms {tsc_ms} kvmclock_ms none");
        }
    }
}
