//! Nested virtualization (`--nested`): the Debian guest as a hypervisor itself. With nested on
//! (the default where the host KVM offers SVM or VMX) the guest sees SVM, loads its own `kvm-amd`
//! (`nested=1`), gets /dev/kvm, and the exitless binary under test, run inside the guest, boots its
//! embedded demo guest to `PASS` (three levels: the host KVM, exitless's guest, the demo). With
//! `--nested off` the guest's CPU has no `svm` flag and `kvm-amd` refuses to load. And everywhere:
//! `--nested on` is refused, with the reason, on a host that cannot give it (PVM).
//!
//! QEMU inside the guest is the same check's peer: `qemu-system-x86_64 -M q35 -accel kvm` (as
//! `bench exits --vs qemu` runs it) boots the very demo ELF that exitless embeds (written out with
//! `exitless kit extract`) as L3 to the same `PASS`, in the same guest as an exitless L3 run, and
//! both times are printed side by side.
//!
//! The guest's initramfs is `initrd-nested.img` (`tools/debian-guest.sh`: the tools initramfs
//! plus KVM's modules and `load-kvm`) followed by one more archive written here: the exitless
//! binary under test and the shared libraries its loader lists (and for the QEMU test, QEMU with
//! its libraries and firmware, taken from the machine the test runs on: the emulated SVM host
//! has them at their Debian paths). Needs a KVM that runs guest
//! userspace and offers nesting; on a PVM host `tools/test.sh` runs these tests inside the
//! emulated SVM host (`tools/svm-host.sh`, whose kvm-amd runs with nested=1).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::debian::{self, results, Vm};
use common::*;
use exitless::bench::nested::QemuFiles;

const NEEDS: &[Need] = &[
    Need::Kvm,
    Need::GuestUserspace,
    Need::DebianGuest,
    Need::NestedGuest,
];

/// The inner demo run: seconds under TCG in the emulated host, far less on hardware.
const L3_WAIT: Duration = Duration::from_secs(600);

/// `initrd-nested.img` followed by an archive with the exitless binary under test at
/// /bin/exitless and its shared libraries at their paths.
/// With `qemu`, QEMU and its firmware too.
fn nested_initrd(dir: &TempDir, qemu: Option<&QemuFiles>) -> PathBuf {
    let out = dir.path("initrd-nested-exitless.img");
    exitless::bench::nested::initrd_with(
        Path::new(debian::INITRD_NESTED),
        Path::new(exitless()),
        qemu,
        &out,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    out
}

/// The Debian guest's arguments with the nested initramfs (and `extra`).
fn nested_args(dir: &TempDir, cpus: u32, mem: &str, extra: &[&str]) -> Vec<String> {
    nested_args_with(dir, None, cpus, mem, extra)
}

fn nested_args_with(
    dir: &TempDir,
    qemu: Option<&QemuFiles>,
    cpus: u32,
    mem: &str,
    extra: &[&str],
) -> Vec<String> {
    let initrd = nested_initrd(dir, qemu);
    let mut args = debian::args(cpus, mem);
    let at = args.iter().position(|a| a == "--initrd").unwrap() + 1;
    args[at] = initrd.display().to_string();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Counts the guest's CPUs with hardware virtualization flags.
fn hw_virt_cpus(vm: &mut Vm) -> u64 {
    vm.number(
        "r hwvirt $(grep -E '^flags' /proc/cpuinfo | grep -cwE 'svm|vmx')",
        "hwvirt",
    )
}

/// `load-kvm nested=1` in the guest: its status, and whether /dev/kvm appeared.
fn load_kvm(vm: &mut Vm) -> (u64, String) {
    let status = vm.number("load-kvm nested=1; r loadkvm $?", "loadkvm");
    let dev = vm.value(
        "r devkvm $([ -c /dev/kvm ] && echo present || echo absent)",
        "devkvm",
    );
    (status, dev)
}

/// The outer exitless's live counters (`exitless ctl stats`): exits to userspace, KVM's exits
/// and its nested VMRUNs (the guest entering its own guest).
#[derive(Debug, Default)]
struct OuterCounters {
    userspace: u64,
    kvm_exits: u64,
    nested_run: u64,
}

impl OuterCounters {
    fn read(sock: &Path) -> OuterCounters {
        let r = exitless_cmd(&["ctl", "--socket", sock.to_str().unwrap(), "stats"]);
        let v: serde_json::Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("exitless ctl stats: {e}\n{}", r.describe()));
        let exits = v["exits"].as_object().expect("exits by reason");
        OuterCounters {
            userspace: exits.values().filter_map(|n| n.as_u64()).sum(),
            kvm_exits: v["kvm"]["exits"].as_u64().unwrap_or(0),
            nested_run: v["kvm"]["nested_run"].as_u64().unwrap_or(0),
        }
    }

    fn since(&self, earlier: &OuterCounters) -> OuterCounters {
        OuterCounters {
            userspace: self.userspace - earlier.userspace,
            kvm_exits: self.kvm_exits - earlier.kvm_exits,
            nested_run: self.nested_run - earlier.nested_run,
        }
    }
}

#[test]
fn debian_guest_loads_kvm_and_runs_exitless_demo_as_l3() {
    const TEST: &str = "debian_guest_loads_kvm_and_runs_exitless_demo_as_l3";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-nested");
    let started = Instant::now();
    let sock = dir.path("api.sock");
    let args = nested_args(&dir, 2, "1G", &["--api-socket", sock.to_str().unwrap()]);
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    eprintln!(
        "{TEST}: shell after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(hw_virt_cpus(&mut vm), 2, "both vCPUs show svm or vmx");
    let (status, dev) = load_kvm(&mut vm);
    assert_eq!((status, dev.as_str()), (0, "present"), "kvm loads");
    let host = vm.value("r l2host $(exitless host 2>&1 | head -n 1)", "l2host");
    assert_eq!(host, "hardware-assisted KVM");

    let before = OuterCounters::read(&sock);
    // The demo as L3, its console and summary into a file (stdin from /dev/null: the guest's
    // console stays the test's). The outer counters bracket the inner run alone; its output is
    // read afterwards.
    let run = vm.step(
        "a=$(cut -d' ' -f1 /proc/uptime); exitless run --timeout 300 </dev/null >/tmp/l3 2>&1; \
         s=$?; b=$(cut -d' ' -f1 /proc/uptime); r l3status $s; r l3uptime $a $b",
        L3_WAIT,
    );
    let during = OuterCounters::read(&sock).since(&before);
    let out = run
        + &vm.step(
            "cat /tmp/l3; r l3pass $(grep -c '^kit: PASS demo' /tmp/l3); \
             r l3end $(grep -o 'guest powered off after [0-9.]* s' /tmp/l3); \
             r l3exits $(sed -n 's/^exitless: \\([0-9]*\\) exits to userspace.*/\\1/p' /tmp/l3); \
             r l3kvmexits $(grep -o ' exits=[0-9]*' /tmp/l3 | cut -d= -f2)",
            debian::STEP_WAIT,
        );
    let res = results(&out);
    let get = |k: &str| res.get(k).cloned().unwrap_or_default();
    eprintln!("{TEST}: the L3 run inside the guest:\n{out}");
    if get("l3status") != "0" || get("l3pass") != "1" {
        vm.fail(&format!(
            "exitless inside the guest: status {:?}, PASS lines {:?}",
            get("l3status"),
            get("l3pass")
        ));
    }
    assert!(get("l3end").starts_with("guest powered off after"), "{out}");
    let l3_exits: u64 = get("l3exits").parse().unwrap_or(0);
    assert!(l3_exits > 0, "the L3 run counted its exits: {out}");
    let (a, b) = get("l3uptime")
        .split_once(' ')
        .map(|(a, b)| (a.parse().unwrap_or(0.0), b.parse().unwrap_or(0.0)))
        .unwrap_or((0.0, 0.0));
    eprintln!(
        "{TEST}: L3 demo inside L2: {} exits to userspace, {} in-kernel exits (L2's KVM), \
         {:.2} s of L2 uptime for the whole inner exitless run, {}",
        l3_exits,
        get("l3kvmexits"),
        b - a,
        get("l3end")
    );

    let l3_kvm_exits: u64 = get("l3kvmexits").parse().unwrap_or(0);
    eprintln!(
        "{TEST}: meanwhile the outer exitless (L1's KVM running the guest): {} exits to \
         userspace, {} KVM exits, {} nested VMRUNs: {:.1} KVM exits per L3 exit (L2's own work in \
         that window included)",
        during.userspace,
        during.kvm_exits,
        during.nested_run,
        during.kvm_exits as f64 / l3_kvm_exits.max(1) as f64
    );
    assert!(
        during.nested_run >= l3_kvm_exits,
        "every L3 exit L2's KVM handled was one nested VMRUN on L1's KVM: {} < {l3_kvm_exits}",
        during.nested_run
    );

    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(
        r.stderr
            .contains("nested virtualization: SVM given to the guest")
            || r.stderr
                .contains("nested virtualization: VMX given to the guest"),
        "{}",
        r.describe()
    );
    let report = r.report.as_ref().expect("the outer report");
    assert!(report["nested"] == "SVM" || report["nested"] == "VMX");
    eprintln!(
        "{TEST}: the outer exitless (L1's KVM running the guest): {} exits to userspace, KVM: \
         exits {}, nested_run {}",
        report["total_exits"], report["kvm"]["exits"], report["kvm"]["nested_run"]
    );
}

/// One L3 run inside the guest, timed by the guest's uptime: `cmd` with its console in `log`;
/// returns (status, PASS lines, seconds).
fn l3_run(vm: &mut Vm, key: &str, cmd: &str, log: &str) -> (String, String, f64) {
    let out = vm.step(
        &format!(
            "a=$(cut -d' ' -f1 /proc/uptime); {cmd} </dev/null >{log} 2>&1; s=$?; \
             b=$(cut -d' ' -f1 /proc/uptime); r {key}status $s; r {key}uptime $a $b; \
             r {key}pass $(grep -c 'kit: PASS demo' {log})"
        ),
        L3_WAIT,
    );
    let res = results(&out);
    let get = |k: &str| res.get(&format!("{key}{k}")).cloned().unwrap_or_default();
    let seconds = get("uptime")
        .split_once(' ')
        .and_then(|(a, b)| Some(b.parse::<f64>().ok()? - a.parse::<f64>().ok()?))
        .unwrap_or(f64::NAN);
    (get("status"), get("pass"), seconds)
}

#[test]
fn qemu_in_the_debian_guest_runs_the_same_demo_as_l3() {
    const TEST: &str = "qemu_in_the_debian_guest_runs_the_same_demo_as_l3";
    if !needs(TEST, NEEDS) || !needs(TEST, &[Need::Qemu]) {
        return;
    }
    let qemu = match QemuFiles::find() {
        Ok(q) => q,
        Err(why) => return skip(TEST, &why),
    };
    let dir = TempDir::new("debian-nested-qemu");
    let started = Instant::now();
    let args = nested_args_with(&dir, Some(&qemu), 2, "1G", &[]);
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    eprintln!(
        "{TEST}: shell after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let (status, dev) = load_kvm(&mut vm);
    assert_eq!((status, dev.as_str()), (0, "present"), "kvm loads");
    // The demo ELF exitless embeds, as a file for QEMU's -kernel.
    let demo = "/tmp/kit/demo";
    let n = vm.number(
        &format!("exitless kit extract /tmp/kit >/dev/null; r demo $(wc -c <{demo})"),
        "demo",
    );
    assert!(n > 0, "exitless kit extract wrote {demo}");

    let exitless = l3_run(&mut vm, "x", "exitless run --timeout 300", "/tmp/l3x");
    let qemu_cmd = format!(
        "timeout 300 {} {}",
        qemu.binary.display(),
        exitless::bench::qemu_args(Path::new(demo), &[], "").join(" ")
    );
    let peer = l3_run(&mut vm, "q", &qemu_cmd, "/tmp/l3q");
    let shown = vm.step(
        "echo ---exitless; tail -n 5 /tmp/l3x; echo ---qemu; tail -n 8 /tmp/l3q",
        debian::STEP_WAIT,
    );
    eprintln!("{TEST}: the L3 runs' last lines:\n{shown}");
    if exitless.0 != "0" || exitless.1 != "1" {
        vm.fail(&format!(
            "exitless inside the guest: status {:?}, PASS lines {:?}",
            exitless.0, exitless.1
        ));
    }
    if peer.0 != "0" || peer.1 != "1" {
        vm.fail(&format!(
            "QEMU inside the guest ({qemu_cmd}): status {:?}, PASS lines {:?}",
            peer.0, peer.1
        ));
    }
    eprintln!(
        "{TEST}: the demo as L3 (L2 uptime for the whole VMM run, start to exit): exitless \
         {:.2} s, QEMU {:.2} s (QEMU/exitless {:.2})",
        exitless.2,
        peer.2,
        peer.2 / exitless.2
    );
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
}

#[test]
fn debian_guest_with_nested_off_has_no_svm_and_kvm_refuses_to_load() {
    const TEST: &str = "debian_guest_with_nested_off_has_no_svm_and_kvm_refuses_to_load";
    if !needs(TEST, NEEDS) {
        return;
    }
    let dir = TempDir::new("debian-nested-off");
    let args = nested_args(&dir, 2, "512M", &["--nested", "off"]);
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    assert_eq!(hw_virt_cpus(&mut vm), 0, "no vCPU shows svm or vmx");
    let (status, dev) = load_kvm(&mut vm);
    let why = vm.value(
        "r why $(dmesg | grep -iE 'kvm|svm|vmx' | tail -n 3 | tr '\\n' ' ')",
        "why",
    );
    eprintln!("{TEST}: load-kvm status {status}, /dev/kvm {dev}, kernel: {why}");
    assert_ne!(status, 0, "kvm's vendor module must not load: {why}");
    assert_eq!(dev, "absent");
    assert!(why.contains("support"), "the kernel says why: {why}");
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(
        !r.stderr.contains("nested virtualization:"),
        "{}",
        r.describe()
    );
    assert!(r.report.as_ref().is_some_and(|j| j["nested"].is_null()));
}

/// `--nested on` runs where the host gives nesting and is refused, with the reason, elsewhere;
/// `--nested off` runs everywhere. Runs on any host with KVM (the demo guest needs no userspace).
#[test]
fn nested_on_is_refused_where_the_host_cannot_give_it() {
    const TEST: &str = "nested_on_is_refused_where_the_host_cannot_give_it";
    if !needs(TEST, &[Need::Kvm]) {
        return;
    }
    let host = exitless_cmd(&["host"]).stdout;
    let on = run(&["--nested", "on", "--timeout", "120"]);
    if host.contains("given to guests") {
        assert_eq!(on.status, Some(0), "{}", on.describe());
        assert!(
            on.stderr.contains("nested virtualization: "),
            "{}",
            on.describe()
        );
    } else {
        assert_eq!(on.status, Some(1), "{}", on.describe());
        let want = if host.contains("PVM") {
            "this host's KVM is PVM"
        } else {
            "offers neither SVM nor VMX"
        };
        assert!(
            on.stderr.contains("exitless: error: --nested on: ") && on.stderr.contains(want),
            "{}",
            on.describe()
        );
    }
    let off = run(&["--nested", "off", "--timeout", "120"]);
    assert_eq!(off.status, Some(0), "{}", off.describe());
    assert!(off.stdout.contains("kit: PASS demo"), "{}", off.describe());
    assert!(
        !off.stderr.contains("nested virtualization:"),
        "{}",
        off.describe()
    );
    let bad = exitless_cmd(&["run", "--nested", "maybe"]);
    assert_eq!(bad.status, Some(2), "{}", bad.describe());
    assert!(
        bad.stderr.contains("is not on, off or auto"),
        "{}",
        bad.describe()
    );
}
