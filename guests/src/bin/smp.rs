//! SMP bring-up: starts every MADT CPU with INIT-SIPI-SIPI; each AP prints `kit: cpu <id> up`.
#![no_std]
#![no_main]

use kit::{acpi, lapic, println, smp};

kit::entry!(main);

fn ap_main(apic_id: u32) {
    println!("kit: cpu {apic_id} up");
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let Some(cpus) = acpi::rsdp(boot.rsdp_hint).and_then(acpi::madt_cpus) else {
        kit::fail("smp", format_args!("no MADT"));
    };
    let n = cpus.count.min(acpi::MAX_CPUS);
    println!("kit: madt cpus={} bsp={}", cpus.count, lapic::id());
    let t = kit::arch::rdtsc();
    let started = smp::start_aps(&cpus.apic_ids[..n], ap_main, 2000, |id| {
        println!("kit: FAIL smp: AP {id} did not start");
    });
    let ms = lapic::tsc_to_ns(kit::arch::rdtsc() - t) / 1_000_000;
    println!("kit: cpus={}", started + 1);
    println!("kit: APs started in {ms} ms");
    if started + 1 != cpus.count {
        kit::fail(
            "smp",
            format_args!("{} of {} CPUs started", started + 1, cpus.count),
        );
    }
    kit::pass("smp");
    kit::poweroff()
}
