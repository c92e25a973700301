//! A stock distribution kernel under exitless: Debian's `linux-image-cloud-amd64` (bzImage) with
//! the busybox initramfs from `tools/debian-guest.sh`, two vCPUs found through the ACPI MADT.
//!
//! On every host it must reach "Run /init as init process" with 2 CPUs, the memory asked for and
//! the ACPI tables parsed. Where guest userspace can run (VMX/SVM hosts) it then powers off from
//! the shell; on hosts where it cannot (PVM without hardware virtualization: a user-mode `syscall`
//! never reaches guest kernel mode) it checks that exitless recognises and explains init's death.
//!
//! Opt-in (`#[ignore]`): on a PVM host the boot takes 20–25 minutes, and the same kernel boots to
//! its shell in the `debian_*` tests, which `tools/test.sh` runs inside the emulated SVM host.
//! `EXITLESS_PVM_STOCK_BOOT=1 tools/test.sh` runs it, or
//! `cargo test --release --test linux_boot -- --ignored --nocapture`.

mod common;
use common::*;

use common::debian::{INITRD, KERNEL};
/// Generous: 13–25 minutes measured to "Run /init" on a PVM host (high variance: the guest's
/// emulated timer tick competes with its own boot), seconds on hardware. CI's limit is 90 minutes.
const BOOT_TIMEOUT: &str = "3000";

#[test]
#[ignore = "opt-in: 20-25 minutes on a PVM host (EXITLESS_PVM_STOCK_BOOT=1 tools/test.sh)"]
fn linux_stock_debian_kernel_reaches_init_with_two_cpus() {
    const TEST: &str = "linux_stock_debian_kernel_reaches_init_with_two_cpus";
    if !needs(TEST, &[Need::Kvm, Need::DebianGuest]) {
        return;
    }
    let blocked = lacks(Need::GuestUserspace);
    // On a host that runs userspace the shell gets this and ends the VM.
    let input: &[u8] = if blocked.is_some() {
        b""
    } else {
        b"\npoweroff -f\n"
    };
    // Known defect (see issue 2's notes): on a PVM host the boot sometimes stalls for good after
    // "vgaarb: loaded" (an RCU stall follows). A stalled boot prints nothing more, so a boot
    // silent for SILENCE is ended and tried again, at most ATTEMPTS times; every attempt is
    // reported, so the flakiness stays visible.
    let silence = std::time::Duration::from_secs(
        std::env::var("EXITLESS_BOOT_SILENCE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(420),
    );
    const ATTEMPTS: usize = 3;
    let mut attempt = 0;
    let r = loop {
        attempt += 1;
        let started = std::time::Instant::now();
        let (r, cut) = run_watched(
            &[
                "--kernel",
                KERNEL,
                "--initrd",
                INITRD,
                "--cpus",
                "2",
                "--mem",
                "512M",
                "--verbose-boot",
                "--timeout",
                BOOT_TIMEOUT,
            ],
            input,
            silence,
        );
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "stock kernel attempt {attempt}: {secs:.0} s, status {:?}{}",
            r.status,
            if cut {
                ", ended after a silent console"
            } else {
                ""
            }
        );
        if !cut || r.stdout.contains("Run /init as init process") || attempt == ATTEMPTS {
            if cut {
                let tail: Vec<&str> = r.stdout.lines().rev().take(5).collect();
                eprintln!("last console lines: {tail:?}");
            }
            break r;
        }
        let tail: Vec<&str> = r.stdout.lines().rev().take(3).collect();
        eprintln!("stalled (last console lines, newest first: {tail:?}); trying again");
    };
    // The guest's own timestamp of the hand-over, and exitless's summary: the numbers behind the
    // README's boot time and the closing notes.
    if let Some(line) = r.stdout.lines().find(|l| l.contains("as init process")) {
        eprintln!("stock kernel: {}", line.trim());
    }
    for l in r.stderr.lines().filter(|l| {
        l.starts_with("exitless: ")
            || l.starts_with("  io_")
            || l.starts_with("  completed")
            || l.starts_with("  in-kernel")
    }) {
        eprintln!("stock kernel summary: {l}");
    }
    let out = &r.stdout;
    let find = |s: &str| out.contains(s);
    assert!(
        find("Run /init as init process"),
        "never reached init: {}",
        r.describe()
    );
    assert!(find("smp: Brought up 1 node, 2 CPUs"), "{}", r.describe());
    assert!(find("ACPI: RSDP") && find("ACPI: APIC"), "{}", r.describe());
    assert!(
        find("ACPI: Using ACPI (MADT) for SMP configuration"),
        "{}",
        r.describe()
    );
    // "Memory: 480000K/523896K available": the total is the RAM we gave, less the BIOS holes.
    let total_k = out
        .lines()
        .find_map(|l| {
            let rest = l.split("Memory: ").nth(1)?;
            let total = rest.split('/').nth(1)?;
            total.split('K').next()?.parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("no Memory: line: {}", r.describe()));
    assert!(
        (500_000..=524_288).contains(&total_k),
        "guest saw {total_k} KiB of RAM for --mem 512M"
    );
    match blocked {
        Some(why) => {
            // Init dies on its first system call; exitless must say why, and not exit 0.
            assert_ne!(r.status, Some(0), "{}", r.describe());
            assert!(
                r.stderr.contains("system call") || r.stderr.contains("syscall"),
                "no explanation of init's death on this host ({why}): {}",
                r.describe()
            );
        }
        None => {
            assert!(find("exitless-guest: nproc=2"), "{}", r.describe());
            assert_eq!(r.status, Some(0), "{}", r.describe());
        }
    }
}
