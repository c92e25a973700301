//! A stock distribution kernel under exitless: Debian's `linux-image-cloud-amd64` (bzImage) with
//! the busybox initramfs from `tools/debian-guest.sh`, two vCPUs found through the ACPI MADT.
//!
//! On every host it must reach "Run /init as init process" with 2 CPUs, the memory asked for and
//! the ACPI tables parsed. Where guest userspace can run (VMX/SVM hosts) it then checks the shell;
//! on hosts where it cannot (PVM without hardware virtualization: a user-mode `syscall` never
//! reaches guest kernel mode) the shell test reports a skip with that reason, and the boot test
//! checks that exitless recognises and explains init's death.
//!
//! The image is built by `tools/test.sh` (CI sets EXITLESS_REQUIRE_LINUX=1 so a missing image
//! fails instead of skipping). Test names start with `linux_`: `tools/test.sh` runs them one at a
//! time, after the rest.

mod common;
use common::*;

const KERNEL: &str = "images/debian/vmlinuz";
const INITRD: &str = "images/debian/initrd.img";
/// Generous: 13–25 minutes measured to "Run /init" on a PVM host (high variance: the guest's
/// emulated timer tick competes with its own boot), seconds on hardware. CI's limit is 90 minutes.
const BOOT_TIMEOUT: &str = "3000";

fn image_present(test: &str) -> bool {
    let ok = std::path::Path::new(KERNEL).exists() && std::path::Path::new(INITRD).exists();
    if !ok {
        assert!(
            std::env::var("EXITLESS_REQUIRE_LINUX").as_deref() != Ok("1"),
            "{KERNEL} missing: tools/debian-guest.sh should have built it"
        );
        eprintln!("skipped {test}: {KERNEL} not built (run tools/debian-guest.sh)");
    }
    ok
}

fn guest_userspace_blocked() -> Option<String> {
    let r = exitless_cmd(&["host"]);
    let text = r.stdout.trim().to_string();
    text.contains("PVM").then_some(text)
}

#[test]
fn linux_stock_debian_kernel_reaches_init_with_two_cpus() {
    if !kvm_available("stock kernel boot") || !image_present("stock kernel boot") {
        return;
    }
    let blocked = guest_userspace_blocked();
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

#[test]
fn linux_debian_shell_answers_on_the_serial_console() {
    if let Some(why) = guest_userspace_blocked() {
        eprintln!(
            "skipped debian shell test: no guest userspace can run on this host ({why}); \
             a guest's syscall from user mode does not enter guest kernel mode here"
        );
        return;
    }
    if !kvm_available("debian shell") || !image_present("debian shell") {
        return;
    }
    let r = run_with_input(
        &[
            "--kernel",
            KERNEL,
            "--initrd",
            INITRD,
            "--cpus",
            "2",
            "--mem",
            "1G",
            "--timeout",
            "600",
        ],
        b"\necho shell-$((6*7))\nnproc\ngrep MemTotal /proc/meminfo\npoweroff -f\n",
    );
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(r.stdout.contains("shell-42"), "{}", r.describe());
    let mem_kib: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {}", r.describe()));
    assert!(
        (900_000..=1_048_576).contains(&mem_kib),
        "MemTotal {mem_kib} KiB"
    );
    assert!(
        r.stdout.lines().any(|l| l.trim() == "2"),
        "nproc: {}",
        r.describe()
    );
}
