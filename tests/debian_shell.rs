//! The stock Debian guest's shell (`tools/debian-guest.sh`: Debian's cloud kernel, a busybox
//! initramfs), driven through the serial console: commands run and print what the VM was given,
//! and every way the guest can end maps to exitless's documented exit status (poweroff and reboot
//! from userspace, a kernel panic with its message). One more test boots the guest many times in a
//! row, each ending with a reboot, and checks the host got everything back.
//!
//! Needs /dev/kvm where guest userspace runs and the Debian guest; on a PVM host `tools/test.sh`
//! runs these tests inside the emulated SVM host (`tools/svm-host.sh`).

mod common;

use std::time::Instant;

use common::debian::{self, Vm, STEP_WAIT};
use common::*;

const NEEDS: &[Need] = &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest];

#[test]
fn debian_shell_runs_commands_and_poweroff_ends_the_vm_with_status_0() {
    const TEST: &str = "debian_shell_runs_commands_and_poweroff_ends_the_vm_with_status_0";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-shell");
    let started = Instant::now();
    let mut vm = Vm::boot_shell(None, &debian::args(2, "1G"), &dir.path("report.json"));
    eprintln!(
        "{TEST}: shell after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(vm.number("r sum $((6*7))", "sum"), 42);
    assert_eq!(vm.number("r nproc $(nproc)", "nproc"), 2);
    let mem_kib = vm.number("r mem $(sed -n 's/^MemTotal: *//p' /proc/meminfo)", "mem");
    assert!(
        (900_000..=1 << 20).contains(&mem_kib),
        "MemTotal {mem_kib} KiB for --mem 1G"
    );
    // The kernel that runs is the one whose modules the initramfs carries (they loaded).
    let release = vm.value("r uname $(uname -r)", "uname");
    let modules = vm.value("r modules $(ls /lib/modules)", "modules");
    assert_eq!(release, modules);
    assert!(release.ends_with("-cloud-amd64"), "{release}");
    assert_eq!(vm.value("r machine $(uname -m)", "machine"), "x86_64");
    // Userspace really runs programs: a pipeline of several processes.
    assert_eq!(
        vm.number("r lines $(seq 1 1000 | grep 7 | wc -l)", "lines"),
        (1..=1000)
            .filter(|n: &u32| n.to_string().contains('7'))
            .count() as u64
    );
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(r.stderr.contains("guest powered off"), "{}", r.describe());
    assert!(
        !r.stdout.contains("exitless-guest: insmod"),
        "{}",
        r.describe()
    );
}

#[test]
fn debian_guest_with_four_cpus_sees_four() {
    const TEST: &str = "debian_guest_with_four_cpus_sees_four";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-4cpus");
    let mut vm = Vm::boot_shell(None, &debian::args(4, "512M"), &dir.path("report.json"));
    assert_eq!(vm.number("r nproc $(nproc)", "nproc"), 4);
    assert_eq!(
        vm.value("r online $(cat /sys/devices/system/cpu/online)", "online"),
        "0-3"
    );
    assert_eq!(
        vm.number("r stat $(grep -c '^cpu[0-9]' /proc/stat)", "stat"),
        4
    );
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let report = r.report.as_ref().expect("report");
    assert_eq!(report["cpus"].as_u64(), Some(4), "{report}");
}

#[test]
fn debian_reboot_from_userspace_ends_the_vm_with_the_reboot_status() {
    const TEST: &str = "debian_reboot_from_userspace_ends_the_vm_with_the_reboot_status";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-reboot");
    let mut args = debian::args(1, "512M");
    args.extend(["--reboot-status", "7"].map(String::from));
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    vm.send("reboot -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(7), "{}", r.describe());
    assert!(r.stderr.contains("guest rebooted"), "{}", r.describe());
}

#[test]
fn debian_kernel_panic_ends_the_vm_with_status_2_and_the_message() {
    const TEST: &str = "debian_kernel_panic_ends_the_vm_with_status_2_and_the_message";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-panic");
    let mut vm = Vm::boot_shell(None, &debian::args(1, "512M"), &dir.path("report.json"));
    // sysrq-c: the kernel dereferences NULL on purpose and panics ("sysrq triggered crash").
    vm.send("echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger");
    let r = vm.finish();
    assert_eq!(r.status, Some(2), "{}", r.describe());
    assert!(r.stdout.contains("Kernel panic"), "{}", r.describe());
    assert!(
        r.stderr.contains("guest kernel panicked") && r.stderr.contains("sysrq triggered crash"),
        "exitless did not name the panic: {}",
        r.describe()
    );
}

/// The host's available memory, in KiB.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemAvailable in /proc/meminfo")
}

/// Entries in the temporary directory and network namespaces: what a leaking VMM leaves behind.
fn leftovers() -> (usize, usize) {
    let count = |d: &str| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (
        count(&std::env::temp_dir().to_string_lossy()),
        count("/run/netns"),
    )
}

#[test]
fn debian_guest_booted_and_rebooted_many_times_in_a_row_leaves_nothing_behind() {
    const TEST: &str = "debian_guest_booted_and_rebooted_many_times_in_a_row_leaves_nothing_behind";
    if !needs(TEST, NEEDS) {
        return;
    }
    // Bookworm's QEMU 7.2, as the emulated SVM host, froze after 3–6 nested boots: ten boots in a
    // row show such a regression.
    const BOOTS: usize = 10;
    let dir = TempDir::new("debian-boots");
    let sock = dir.path("vsock.sock");
    let mut args = debian::args(2, "512M");
    args.extend(["--rng", "--balloon", "size=16M"].map(String::from));
    args.push("--vsock".into());
    args.push(format!("cid=3,socket={}", sock.display()));
    let mut first_avail = 0;
    let before = leftovers();
    for boot in 1..=BOOTS {
        let started = Instant::now();
        let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
        assert_eq!(vm.number("r nproc $(nproc)", "nproc"), 2, "boot {boot}");
        vm.step("sync", STEP_WAIT);
        vm.send("reboot -f");
        let r = vm.finish();
        assert_eq!(r.status, Some(0), "boot {boot}: {}", r.describe());
        assert!(!sock.exists(), "boot {boot}: the vsock socket stayed");
        let avail = mem_available_kib();
        eprintln!(
            "{TEST}: boot {boot} took {:.1} s; host MemAvailable {} MiB",
            started.elapsed().as_secs_f64(),
            avail >> 10
        );
        if boot == 1 {
            first_avail = avail;
        }
    }
    // Everything a VM took (guest RAM, the VMM's own memory, files) is back once it ended: the
    // last boot left the host with about what the first left it (within 64 MiB: page cache).
    let last_avail = mem_available_kib();
    assert!(
        last_avail + (64 << 10) >= first_avail,
        "host MemAvailable fell from {} MiB after the first boot to {} MiB after {BOOTS}",
        first_avail >> 10,
        last_avail >> 10
    );
    assert_eq!(leftovers(), before, "files or namespaces left behind");
}

/// On a hardware-style KVM the guest gets every KVM paravirtual feature it can use and none of
/// the PVM-host workarounds (src/host.rs): kvmclock, PV TLB flush, PV sched-yield, PV spinlocks
/// (PV unhalt), PV IPIs, x2APIC, XSAVE; a command line without `noxsave`/`clearcpuid`.
#[test]
fn debian_guest_on_a_hardware_style_host_gets_the_kvm_pv_features_and_no_pvm_workarounds() {
    const TEST: &str =
        "debian_guest_on_a_hardware_style_host_gets_the_kvm_pv_features_and_no_pvm_workarounds";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-pv");
    let mut args = debian::args(2, "512M");
    args.push("--verbose-boot".into());
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    let cmdline = vm.value("r cmdline $(cat /proc/cmdline)", "cmdline");
    for workaround in ["noxsave", "clearcpuid", "lapic=notscdeadline", "nofsgsbase"] {
        assert!(!cmdline.contains(workaround), "{workaround} in {cmdline}");
    }
    let flags = vm.value("r flags $(grep -m1 '^flags' /proc/cpuinfo)", "flags");
    for f in ["x2apic", "hypervisor", "xsave"] {
        assert!(flags.split_whitespace().any(|x| x == f), "no {f}: {flags}");
    }
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    // The kernel's own boot messages (--verbose-boot keeps them on the console).
    for line in [
        "Hypervisor detected: KVM",
        "clocksource: Switched to clocksource kvm-clock",
        "kvm-guest: KVM setup pv remote TLB flush",
        "kvm-guest: setup PV sched yield",
        "kvm-guest: PV spinlocks enabled",
        "kvm-guest: setup PV IPIs",
        "x2apic enabled",
    ] {
        assert!(r.stdout.contains(line), "no {line:?}: {}", r.describe());
    }
    assert!(!r.stderr.contains("PVM"), "{}", r.describe());
}

/// `exitless ctl shutdown` presses the ACPI power button: the Debian guest's button driver turns
/// it into a key press, busybox acpid into a clean power-off, and the VM ends with the guest's
/// own power-off long before the grace (the forced stop would say so on stderr).
#[test]
fn debian_guest_powers_off_on_the_acpi_power_button() {
    const TEST: &str = "debian_guest_powers_off_on_the_acpi_power_button";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-power-button");
    let sock = dir.path("api.sock");
    let mut args = debian::args(1, "512M");
    args.extend(["--api-socket".to_string(), sock.display().to_string()]);
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    // The kernel enabled the button's event once its driver loaded.
    assert!(
        vm.step("ls /sys/bus/acpi/drivers/button/", STEP_WAIT)
            .contains("LNXPWRBN"),
        "no power button device bound to the button driver"
    );
    assert!(
        vm.step("r acpid $(pidof acpid || echo none)", STEP_WAIT)
            .contains("=R= acpid ")
            && !vm.console().contains("=R= acpid none"),
        "busybox acpid is not running (see /var/log/acpid.log)"
    );
    let r = exitless_cmd(&[
        "ctl",
        "--socket",
        sock.to_str().unwrap(),
        "shutdown",
        "--grace",
        "600",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let reply: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(reply["guest_listens"], true, "{reply}");
    let run = vm.finish();
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("guest powered off"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stderr.contains("did not power off"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout
            .contains("exitless-guest: power button: powering off"),
        "{}",
        run.describe()
    );
}

/// The harness's retry: a guest that triple-faults before its shell answers is booted again, at
/// most `BOOT_ATTEMPTS` times, and then the test fails with exitless's own words. The kit's
/// `triplefault` guest faults at once (needs only /dev/kvm, so this runs on any KVM host).
#[test]
fn boot_shell_boots_a_triple_faulting_guest_again_then_fails_with_the_reason() {
    if !kvm_available("boot_shell retry") {
        return;
    }
    let dir = TempDir::new("boot-shell-retry");
    let args: Vec<String> = ["--guest", "triplefault", "--timeout", "60"]
        .map(String::from)
        .to_vec();
    let report = dir.path("report.json");
    let started = Instant::now();
    let retries = || debian::BOOT_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let before = retries();
    let err = std::panic::catch_unwind(|| Vm::boot_shell(None, &args, &report))
        .err()
        .expect("a guest that never reaches a shell fails the test");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("boot: exitless ended"), "{msg}");
    assert!(msg.contains("guest triple-faulted"), "{msg}");
    // Booted again until the last attempt (other tests' retries can only add to the count).
    assert!(retries() - before >= debian::BOOT_ATTEMPTS - 1, "{msg}");
    eprintln!(
        "boot_shell gave up after {} boots in {:.1} s",
        debian::BOOT_ATTEMPTS,
        started.elapsed().as_secs_f64()
    );
}
