//! The interrupt path a stock Linux guest takes: with the defaults it finds x2APIC and every KVM
//! paravirtual feature of the interrupt and idle paths a hardware-style host offers (PV IPIs, PV
//! sched-yield, PV TLB flush, PV spinlocks with PV unhalt); with `--x2apic off --pv-eoi off` it
//! finds neither x2APIC nor PV EOI and still boots and runs.
//!
//! Needs /dev/kvm where guest userspace runs and the Debian guest; on a PVM host `tools/test.sh`
//! runs these tests inside the emulated SVM host (`tools/svm-host.sh`).

mod common;

use common::debian::{self, Vm};
use common::*;

const NEEDS: &[Need] = &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest];

/// How many lines of the guest's kernel log contain `pat`.
fn dmesg_count(vm: &mut Vm, key: &str, pat: &str) -> u64 {
    vm.number(&format!("r {key} $(dmesg | grep -c '{pat}')"), key)
}

#[test]
fn debian_guest_gets_x2apic_and_the_kvm_pv_features_by_default_and_not_when_off() {
    const TEST: &str =
        "debian_guest_gets_x2apic_and_the_kvm_pv_features_by_default_and_not_when_off";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-irq-path");
    let mut vm = Vm::boot_shell(None, &debian::args(2, "512M"), &dir.path("on.json"));
    assert_eq!(
        vm.number("r x2apic $(grep -cw x2apic /proc/cpuinfo)", "x2apic"),
        2
    );
    assert_eq!(dmesg_count(&mut vm, "x2apicon", "x2apic enabled"), 1);
    for (key, pat) in [
        ("pvipi", "setup PV IPIs"),
        ("pvyield", "setup PV sched yield"),
        ("pvtlb", "KVM setup pv remote TLB flush"),
        ("pvspin", "PV spinlocks enabled"),
    ] {
        assert_eq!(dmesg_count(&mut vm, key, pat), 1, "{pat}");
    }
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let report = r.report.as_ref().unwrap();
    assert_eq!(report["irq_path"]["x2apic"], true);
    assert_eq!(report["irq_path"]["pv_eoi"], true);

    let mut args = debian::args(2, "512M");
    args.extend(["--x2apic", "off", "--pv-eoi", "off"].map(String::from));
    let mut vm = Vm::boot_shell(None, &args, &dir.path("off.json"));
    assert_eq!(
        vm.number("r x2apic $(grep -cw x2apic /proc/cpuinfo)", "x2apic"),
        0
    );
    assert_eq!(dmesg_count(&mut vm, "x2apicon", "x2apic enabled"), 0);
    // The rest of the PV features stay.
    assert_eq!(dmesg_count(&mut vm, "pvipi", "setup PV IPIs"), 1);
    assert_eq!(vm.number("r sum $((6*7))", "sum"), 42);
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let report = r.report.as_ref().unwrap();
    assert_eq!(report["irq_path"]["x2apic"], false);
    assert_eq!(report["irq_path"]["pv_eoi"], false);
}
