//! Snapshot and restore of the stock Debian guest at its shell, with a file system on virtio-blk
//! and the network up: the original makes an ext4 on its disk, writes a file, syncs, brings its
//! interface up and pings the host; it is paused and snapshotted, and two clones are restored
//! from that one snapshot and run side by side, each on its own copy of the disk and its own tap
//! (clone A on the original's tap name in the original's namespace, clone B on another tap in
//! another namespace through `--net-tap`). In each clone the shell answers at once, the file is
//! there (read again from the clone's disk after the page cache is dropped), the host and the
//! clone ping each other, and what the clone writes lands in its own image and not the other's.
//!
//! The taps of both namespaces have the same MAC (what a clone's guest cached for the host's
//! address stays true, as it would behind a bridge whose address does not move).
//!
//! Needs /dev/kvm where guest userspace runs, root (namespaces) and the Debian guest; on a PVM
//! host `tools/test.sh` runs it inside the emulated SVM host.

mod common;

use std::path::Path;

use common::debian::{self, Vm, STEP_WAIT};
use common::netns::Netns;
use common::*;

const HOST_IP: &str = "192.168.130.1";
const GUEST_IP: &str = "192.168.130.2";
const TAP: &str = "exl-snap-tap";
const CLONE_TAP: &str = "exl-clone-tap";
const HOST_MAC: &str = "02:e1:00:00:00:01";
const DISK_BYTES: u64 = 64 << 20;

fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut v = vec!["ctl", "--socket", sock.to_str().unwrap()];
    v.extend_from_slice(args);
    let r = exitless_cmd(&v);
    serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}", r.describe()))
}

fn namespace(tag: &str, tap: &str) -> Netns {
    let ns = Netns::with_tap(tag, tap, HOST_IP).unwrap_or_else(|e| panic!("{e}"));
    ns.ip(&["link", "set", tap, "address", HOST_MAC])
        .unwrap_or_else(|e| panic!("{e}"));
    ns
}

fn host_pings_guest(ns: &Netns) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "ping", "-c", "2", "-W", "10", GUEST_IP,
        ])
        .output()
        .map_err(|e| format!("ping: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "host -> guest ping in {}: {}{}",
            ns.0,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn guest_pings_host(vm: &mut Vm, who: &str) {
    let out = vm.step(&format!("ping -c 2 -W 10 {HOST_IP}; r ping $?"), STEP_WAIT);
    if !out.contains("=R= ping 0") {
        vm.fail(&format!("{who}: guest -> host ping: {out}"));
    }
}

/// The original: an ext4 with `file` holding `marker`, synced; its network up.
fn prepare(vm: &mut Vm, marker: &str) {
    assert_eq!(
        vm.number(
            "mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d; r fs $?",
            "fs"
        ),
        0
    );
    assert_eq!(
        vm.number(
            &format!("echo {marker} > /mnt/d/file && sync; r write $?"),
            "write"
        ),
        0
    );
    vm.net_up(GUEST_IP);
    guest_pings_host(vm, "original");
}

/// A clone answers, has the original's file (from its own disk), pings and is pinged, and
/// writes `own` to its disk.
fn check_clone(vm: &mut Vm, ns: &Netns, who: &str, marker: &str, own: &str) {
    let t = std::time::Instant::now();
    assert_eq!(vm.number("r sum $((6*7))", "sum"), 42, "{who}");
    eprintln!(
        "{who}: the shell answered {:.0} ms after the check began",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(
        vm.value("r file $(cat /mnt/d/file)", "file"),
        marker,
        "{who}"
    );
    assert_eq!(
        vm.value(
            "sync; echo 3 > /proc/sys/vm/drop_caches; r reread $(cat /mnt/d/file)",
            "reread"
        ),
        marker,
        "{who}: the file read again from the clone's disk"
    );
    guest_pings_host(vm, who);
    if let Err(e) = host_pings_guest(ns) {
        vm.fail(&format!("{who}: {e}"));
    }
    assert_eq!(
        vm.number(&format!("echo {own} > /mnt/d/who && sync; r own $?"), "own"),
        0,
        "{who}"
    );
}

fn image_holds(img: &Path, text: &str) -> bool {
    let data = std::fs::read(img).unwrap();
    data.windows(text.len()).any(|w| w == text.as_bytes())
}

#[test]
fn debian_guest_snapshotted_at_its_shell_goes_on_in_two_clones_side_by_side() {
    const TEST: &str = "debian_guest_snapshotted_at_its_shell_goes_on_in_two_clones_side_by_side";
    let all = [
        Need::Kvm,
        Need::GuestUserspace,
        Need::DebianGuest,
        Need::Root,
    ];
    if !needs(TEST, &all) {
        return;
    }
    let dir = TempDir::new("debian-snapshot");
    let img = dir.path("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(DISK_BYTES))
        .unwrap();
    let (sock, snaps) = (dir.path("api.sock"), dir.path("snaps"));
    let snap = snaps.join("shell");
    let ns_a = namespace("snap-a", TAP);
    let marker = debian::marker("snapfile");
    let mut args = debian::args(1, "512M");
    args.extend(
        [
            "--disk",
            &format!("path={}", img.display()),
            "--net",
            &format!("tap={TAP}"),
            "--api-socket",
            sock.to_str().unwrap(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let mut orig = Vm::boot_shell(Some(&ns_a.0), &args, &dir.path("orig.json"));
    prepare(&mut orig, &marker);
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    eprintln!("snapshot of the Debian guest at its shell: {s}");
    // The disk as the snapshot saw it, once per clone; then the original goes.
    let (img_a, img_b) = (dir.path("a.img"), dir.path("b.img"));
    std::fs::copy(&img, &img_a).unwrap();
    std::fs::copy(&img, &img_b).unwrap();
    assert_eq!(ctl(&sock, &["quit"])["ok"], true);
    let run = orig.finish();
    assert!(run.status.is_some(), "{}", run.describe());

    let ns_b = namespace("snap-b", CLONE_TAP);
    let restore_args = |img: &Path, tap: Option<&str>| {
        let mut a = vec![
            "--snapshot".to_string(),
            snap.display().to_string(),
            "--disk-image".into(),
            img.display().to_string(),
            "--timeout".into(),
            "1200".into(),
        ];
        if let Some(t) = tap {
            a.extend(["--net-tap".into(), t.into()]);
        }
        a
    };
    let mut a = Vm::restore(
        Some(&ns_a.0),
        &restore_args(&img_a, None),
        &dir.path("a.json"),
    );
    let mut b = Vm::restore(
        Some(&ns_b.0),
        &restore_args(&img_b, Some(CLONE_TAP)),
        &dir.path("b.json"),
    );
    let (own_a, own_b) = (debian::marker("clone-a"), debian::marker("clone-b"));
    check_clone(&mut a, &ns_a, "clone A", &marker, &own_a);
    check_clone(&mut b, &ns_b, "clone B", &marker, &own_b);
    for (vm, who) in [(a, "clone A"), (b, "clone B")] {
        let mut vm = vm;
        vm.send("umount /mnt/d; poweroff -f");
        let r = vm.finish();
        assert_eq!(r.status, Some(0), "{who}: {}", r.describe());
        assert!(
            r.stderr.contains("exitless: restored from"),
            "{who}: {}",
            r.describe()
        );
        assert!(
            !r.stdout.contains("exitless-guest: nproc="),
            "{who} booted again"
        );
    }
    assert!(image_holds(&img_a, &own_a) && !image_holds(&img_a, &own_b));
    assert!(image_holds(&img_b, &own_b) && !image_holds(&img_b, &own_a));
    assert!(!image_holds(&img, &own_a) && !image_holds(&img, &own_b));
}
