//! Memory given back by the stock Debian guest's own balloon driver, with exitless's RSS on the
//! host following:
//! - the balloon target set at run time through the control socket (`exitless ctl balloon`):
//!   the guest touches 400 MiB and frees it (free-page reporting off, so the host keeps it), then
//!   a 700 MiB target makes the guest inflate (its MemTotal falls by the target) and the VMM's
//!   RSS falls with it; a 0 target deflates again;
//! - free-page reporting: memory the guest frees comes back to the host without any target.
//!
//! Needs /dev/kvm where guest userspace runs and the Debian guest; on a PVM host `tools/test.sh`
//! runs it inside the emulated SVM host.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::debian::{self, Vm, STEP_WAIT};
use common::*;

const MIB: u64 = 1 << 20;
const FILL_MIB: u64 = 400;

/// exitless's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// `exitless ctl --socket SOCK ARGS`, as JSON.
fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["ctl", "--socket", sock.to_str().unwrap()];
    a.extend_from_slice(args);
    let r = exitless_cmd(&a);
    assert_eq!(r.status, Some(0), "ctl {args:?}: {}", r.describe());
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {}", r.stdout))
}

/// Polls `f` every half second until it holds or `limit` passes; returns whether it held.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    f()
}

/// Boots the guest with `--balloon OPTS` and a control socket; the guest then touches
/// FILL_MIB of its memory and frees it. Returns the VM, the socket and the RSS at its peak.
fn boot_fill_and_free(dir: &TempDir, balloon: &str) -> (Vm, std::path::PathBuf, u64) {
    let sock = dir.path("api.sock");
    let mut args = debian::args(2, "1G");
    args.extend(["--balloon".into(), balloon.into()]);
    args.extend(["--api-socket".into(), sock.display().to_string()]);
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    let before = rss(vm.pid());
    vm.step(
        &format!("dd if=/dev/zero of=/tmp/fill bs=1M count={FILL_MIB} 2>/dev/null; r dd $?"),
        STEP_WAIT,
    );
    let peak = rss(vm.pid());
    assert!(
        peak >= before + (FILL_MIB - 100) * MIB,
        "RSS {} MiB -> {} MiB after the guest touched {FILL_MIB} MiB",
        before / MIB,
        peak / MIB
    );
    vm.step("rm /tmp/fill; sync", STEP_WAIT);
    (vm, sock, peak)
}

fn mem_total_kib(vm: &mut Vm) -> u64 {
    vm.number("r mem $(sed -n 's/^MemTotal: *//p' /proc/meminfo)", "mem")
}

#[test]
fn debian_balloon_target_from_the_control_socket_moves_guest_memory_and_vmm_rss() {
    const TEST: &str =
        "debian_balloon_target_from_the_control_socket_moves_guest_memory_and_vmm_rss";
    if !needs(TEST, &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest]) {
        return;
    }
    let dir = TempDir::new("debian-balloon");
    let (mut vm, sock, peak) = boot_fill_and_free(&dir, "reporting=off,stats=1");
    let total_before = mem_total_kib(&mut vm);
    // The balloon driver backs off when the guest runs short, so the target leaves the guest
    // 160 MiB of what it has free (a run reached 630 of a fixed 700 MiB in a 1 GiB guest and
    // stopped there); it must still take more than the freed FILL_MIB.
    let free_mib = vm.number("r free $(sed -n 's/^MemFree: *//p' /proc/meminfo)", "free") / 1024;
    let target_mib = free_mib.saturating_sub(160).min(700);
    assert!(
        target_mib >= FILL_MIB + 50,
        "the guest has only {free_mib} MiB free after freeing {FILL_MIB} MiB"
    );
    ctl(&sock, &["balloon", &format!("{target_mib}M")]);
    let actual = || ctl(&sock, &["stats"])["devices"]["virtio-balloon"]["actual_pages"].as_u64();
    let inflated = wait_until(Duration::from_secs(120), || {
        actual() == Some(target_mib * MIB / 4096)
    });
    assert!(
        inflated,
        "actual {:?} pages, target {}",
        actual(),
        target_mib * MIB / 4096
    );
    let low = rss(vm.pid());
    eprintln!(
        "{TEST}: RSS at the peak {} MiB, with a {target_mib} MiB balloon {} MiB",
        peak / MIB,
        low / MIB
    );
    // The balloon takes the freed 400 MiB (and more) from the guest: at least that much of the
    // VMM's resident memory goes back.
    assert!(
        low + (FILL_MIB - 100) * MIB <= peak,
        "RSS {} MiB -> {} MiB with a {target_mib} MiB balloon",
        peak / MIB,
        low / MIB
    );
    let total_inflated = mem_total_kib(&mut vm);
    assert!(
        total_inflated + target_mib * 1024 <= total_before + 1024,
        "MemTotal {total_before} KiB -> {total_inflated} KiB with a {target_mib} MiB balloon"
    );

    // Deflate: the guest gets its memory back.
    ctl(&sock, &["balloon", "0"]);
    assert!(
        wait_until(Duration::from_secs(120), || actual() == Some(0)),
        "actual {:?} pages after a 0 target",
        actual()
    );
    let total_after = mem_total_kib(&mut vm);
    assert!(
        total_after + 1024 >= total_before,
        "MemTotal {total_after} KiB after deflating, {total_before} KiB before"
    );
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let f = |k: &str| r.device_fact("virtio-balloon", k).unwrap_or(0);
    assert!(f("pages_inflated") >= target_mib * MIB / 4096);
    assert!(f("pages_deflated") >= target_mib * MIB / 4096);
    assert_eq!(f("bad_pfns"), 0);
    assert_eq!(f("bytes_reported"), 0, "reporting was off");
}

#[test]
fn debian_free_page_reporting_gives_freed_guest_memory_back_to_the_host() {
    const TEST: &str = "debian_free_page_reporting_gives_freed_guest_memory_back_to_the_host";
    if !needs(TEST, &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest]) {
        return;
    }
    let dir = TempDir::new("debian-reporting");
    let (vm, _sock, peak) = boot_fill_and_free(&dir, "reporting=on");
    // Linux reports free 2 MiB blocks about two seconds after they were freed.
    let pid = vm.pid();
    let back = wait_until(Duration::from_secs(120), || {
        rss(pid) + (FILL_MIB - 100) * MIB <= peak
    });
    let low = rss(pid);
    eprintln!(
        "{TEST}: RSS at the peak {} MiB, after reporting {} MiB",
        peak / MIB,
        low / MIB
    );
    assert!(back, "RSS {} MiB -> {} MiB", peak / MIB, low / MIB);
    let mut vm = vm;
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(
        r.device_fact("virtio-balloon", "bytes_reported")
            .unwrap_or(0)
            >= (FILL_MIB - 100) * MIB,
        "{}",
        r.describe()
    );
}
