//! The demo guest: describes the machine and exercises the platform in a few seconds.
#![no_std]
#![no_main]

use core::sync::atomic::Ordering;
use kit::{arch, lapic, println};

kit::entry!(main);

const USER_LOOPS: u64 = 100_000_000;
const KERNEL_LOOPS: u64 = 20_000;

fn main(boot: &'static kit::BootInfo) -> ! {
    let t0 = arch::rdtsc();
    println!("kit: exitless demo guest (PVH, x86_64, no_std Rust)");
    println!(
        "kit: cpu {} \"{}\"",
        arch::text(&arch::vendor()),
        arch::text(&arch::brand())
    );
    let x2apic = arch::cpuid(1, 0).2 >> 21 & 1;
    let kvm_features = if arch::cpuid(0x4000_0000, 0).0 >= 0x4000_0001 {
        arch::cpuid(0x4000_0001, 0).0
    } else {
        0
    };
    println!(
        "kit: cpuid x2apic {} pv-eoi {} kvm-features {:#x}",
        x2apic,
        kvm_features >> 6 & 1,
        kvm_features
    );
    println!(
        "kit: ram {} MiB in {} memory map entries",
        boot.ram_bytes >> 20,
        boot.memmap_entries
    );
    let rsdp = kit::acpi::rsdp(boot.rsdp_hint);
    match rsdp.and_then(kit::acpi::madt_cpus) {
        Some(c) => println!("kit: cpus {} (MADT), bsp apic id {}", c.count, lapic::id()),
        None => println!("kit: no MADT (rsdp {:?})", rsdp),
    }
    println!("kit: rtc {}", kit::rtc::read());
    let hz = lapic::tsc_hz();
    println!(
        "kit: tsc {} MHz (calibrated on the LAPIC timer)",
        hz / 1_000_000
    );
    let boot_ms = lapic::tsc_to_ns(t0 - kit::boot_tsc()) / 1_000_000;
    println!("kit: kit start-up (PVH entry to main) took {boot_ms} ms");

    for i in 0..4 {
        kit::probe_pio_write(i);
        kit::probe_mmio_write(i);
    }
    let (p, m) = (kit::probe_pio_read(), kit::probe_mmio_read());
    println!(
        "kit: probe: 4 pio writes, 4 mmio writes, 1+1 reads ({:#x}, {:#x})",
        p, m
    );

    let t = arch::rdtsc();
    let hlts = lapic::sleep_hlt(1_000_000);
    println!(
        "kit: hlt woken by the LAPIC timer after {} us ({} hlt)",
        lapic::tsc_to_ns(arch::rdtsc() - t) / 1000,
        hlts
    );

    let before = lapic::IPI_COUNT.load(Ordering::Relaxed);
    lapic::self_ipi(lapic::IPI_VECTOR);
    for _ in 0..100 {
        if lapic::IPI_COUNT.load(Ordering::Relaxed) != before {
            break;
        }
        arch::sti_hlt_cli();
    }
    let ok = lapic::IPI_COUNT.load(Ordering::Relaxed) != before;
    println!("kit: self-IPI {}", if ok { "delivered" } else { "LOST" });

    let user = kit::run_user(arch::spin, USER_LOOPS, false);
    let kernel = arch::spin(KERNEL_LOOPS);
    let (u, k) = (user * 1000 / USER_LOOPS, kernel * 1000 / KERNEL_LOOPS);
    println!(
        "kit: loop at CPL3: {} iterations in {} ms ({}.{:03} cycles/iter)",
        USER_LOOPS,
        lapic::tsc_to_ns(user) / 1_000_000,
        u / 1000,
        u % 1000
    );
    println!(
        "kit: loop at CPL0: {} iterations in {} ms ({}.{:03} cycles/iter)",
        KERNEL_LOOPS,
        lapic::tsc_to_ns(kernel) / 1_000_000,
        k / 1000,
        k % 1000
    );
    let r = (kernel as u128 * USER_LOOPS as u128 * 100
        / (user as u128 * KERNEL_LOOPS as u128).max(1)) as u64;
    println!(
        "kit: CPL0/CPL3 cost per iteration: {}.{:02}x",
        r / 100,
        r % 100
    );
    println!(
        "kit: demo main took {} ms",
        lapic::tsc_to_ns(arch::rdtsc() - t0) / 1_000_000
    );
    if !ok {
        kit::fail("demo", format_args!("self-IPI not delivered"));
    }
    kit::pass("demo");
    kit::poweroff()
}
