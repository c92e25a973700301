//! Snapshot and restore with the kit's compute guest (a deterministic computation over 4 MiB of
//! RAM at CPL3 under a 100 Hz LAPIC timer): snapshotted mid-computation through the API, its
//! restored copies — two side by side from one snapshot — finish with the result the original
//! reaches, their timer still ticking; a restore held paused runs only when resumed, and a
//! snapshot of it restores too; bad snapshots (cut, corrupted, another
//! format version, another host, a cut or changed memory file) are refused before anything runs;
//! a snapshot of a running VM, into a used directory, or of a VM with a device that cannot be
//! saved (the IOMMU) is refused and writes nothing. The virtio-snap guest, pulling virtio-rng and
//! writing and reading its virtio-blk disk, is snapshotted mid-way and its restored clone (on a
//! copy of the disk) finishes with the original's result; damaged virtio states are refused. Skipped (with the reason printed) where /dev/kvm cannot
//! be opened.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{exitless, exitless_cmd, kvm_available, Run, TempDir};

/// How long the guest may take to show progress (a loaded, emulated host is slow).
const PROGRESS: Duration = Duration::from_secs(180);
/// Rounds of the computation (about 4 ms each on the PVM host).
const ROUNDS: &str = "rounds=500 every=25";

/// Every VM here may write snapshots beneath the test's directory (Landlock allows no other).
fn spawn(args: &[&str], dir: &TempDir, tag: &str) -> Child {
    spawn_in(None, args, dir, tag)
}

/// [`spawn`] inside network namespace `ns`, if any.
fn spawn_in(ns: Option<&str>, args: &[&str], dir: &TempDir, tag: &str) -> Child {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, exitless()]);
            c
        }
        None => Command::new(exitless()),
    };
    cmd.args(args)
        .args(["--timeout", "600", "--no-summary", "--reboot-status", "3"])
        // A guest that crashes (a triple fault resets it) fails, it does not pass as a poweroff.
        .arg("--snapshot-dir")
        .arg(&dir.0)
        .arg("--console-log")
        .arg(dir.path(&format!("{tag}.log")))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exitless")
}

fn console(dir: &TempDir, tag: &str) -> String {
    std::fs::read_to_string(dir.path(&format!("{tag}.log"))).unwrap_or_default()
}

/// The last `kit: compute round R` the guest printed.
fn last_round(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.strip_prefix("kit: compute round ")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// The timer interrupts counted at the last `kit: compute round` line, and at the result.
fn ticks(text: &str, prefix: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.strip_prefix(prefix)?
            .split(" ticks ")
            .nth(1)?
            .parse()
            .ok()
    })
}

/// `kit: compute result X`.
fn result(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("kit: compute result ")?.split(' ').next())
        .map(str::to_string)
}

fn wait_for_round(dir: &TempDir, tag: &str, child: &mut Child, r: u64) {
    let t = Instant::now();
    while last_round(&console(dir, tag)).is_none_or(|n| n < r) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the VM ended before round {r}"
        );
        assert!(t.elapsed() < PROGRESS, "no round {r} after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let mut v = vec!["ctl", "--socket", sock.to_str().unwrap()];
    v.extend_from_slice(args);
    let r = exitless_cmd(&v);
    serde_json::from_str(&r.stdout).unwrap_or_else(|_| panic!("{}", r.describe()))
}

fn finish(dir: &TempDir, tag: &str, child: Child) -> Run {
    let out = child.wait_with_output().expect("wait for exitless");
    Run {
        status: out.status.code(),
        stdout: console(dir, tag),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report: None,
    }
}

/// Where the original was when it was snapshotted.
#[derive(Clone, Copy, Debug)]
struct At {
    round: u64,
    /// Timer interrupts by then (at least).
    ticks: u64,
}

/// Runs the compute guest, snapshots it (paused) once it has done some rounds, lets it finish.
/// Returns the original's result and where it was at the snapshot.
fn original_with_snapshot(dir: &TempDir, snap: &Path) -> (String, At) {
    let sock = dir.path("orig.sock");
    let args = [
        "run",
        "--guest",
        "compute",
        "--cmdline",
        ROUNDS,
        "--api-socket",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.push(sock.to_str().unwrap());
    let mut child = spawn(&args, dir, "orig");
    wait_for_round(dir, "orig", &mut child, 50);
    // A snapshot of a running VM is refused.
    let e = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(e["ok"], false, "{e}");
    assert!(e["error"].as_str().unwrap().contains("running"), "{e}");
    assert!(!snap.join("state.json").exists());
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    // Outside --snapshot-dir: refused, nothing written.
    let elsewhere = std::env::temp_dir().join(format!("exitless-elsewhere-{}", std::process::id()));
    let e = ctl(&sock, &["snapshot", elsewhere.to_str().unwrap()]);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("not beneath --snapshot-dir"),
        "{e}"
    );
    assert!(!elsewhere.exists());
    let text = console(dir, "orig");
    let at = At {
        round: last_round(&text).unwrap(),
        ticks: ticks(&text, "kit: compute round ").unwrap(),
    };
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    assert!(s["memory_data_bytes"].as_u64().unwrap() >= 4 << 20, "{s}");
    assert!(
        s["memory_data_bytes"].as_u64().unwrap() < 16 << 20,
        "sparse: {s}"
    );
    check_nested_state(snap);
    // The same directory twice: refused, the first snapshot untouched.
    let again = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert!(
        again["error"]
            .as_str()
            .unwrap()
            .contains("already holds a snapshot"),
        "{again}"
    );
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    let run = finish(dir, "orig", child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    (result(&run.stdout).expect("a result"), at)
}

/// A guest given SVM or VMX (the default where the host offers it: the emulated SVM host) has
/// its nested state saved with every vCPU; one without has none.
fn check_nested_state(snap: &Path) {
    let text = std::fs::read_to_string(snap.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let s = &state["sections"];
    let nested = !s["machine"]["body"]["nested"].is_null();
    for v in s["vcpus"]["body"].as_array().unwrap() {
        assert_eq!(
            !v["nested"].is_null(),
            nested,
            "vCPU {}: {}",
            v["id"],
            s["machine"]
        );
    }
    if !nested {
        eprintln!("the guest has no SVM/VMX here: no nested state to save");
    }
}

fn restore(dir: &TempDir, snap: &Path, tag: &str, extra: &[&str]) -> Child {
    let mut args = vec!["restore", "--snapshot", snap.to_str().unwrap()];
    args.extend_from_slice(extra);
    spawn(&args, dir, tag)
}

/// A restored copy went on from the snapshot (no boot, no round before it) to `want`, its LAPIC
/// timer still ticking (the rest of the run takes several hundred ms at 100 Hz).
fn check_restored(run: &Run, want: &str, at: At) {
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("exitless: restored from"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stdout.contains("kit: compute rounds="),
        "booted again: {}",
        run.describe()
    );
    let first = run.stdout.lines().find_map(|l| {
        l.strip_prefix("kit: compute round ")?
            .split(' ')
            .next()?
            .parse::<u64>()
            .ok()
    });
    assert!(
        first.is_some_and(|r| r > at.round),
        "first round {first:?}, snapshot at {at:?}: {}",
        run.describe()
    );
    assert_eq!(
        result(&run.stdout).as_deref(),
        Some(want),
        "{}",
        run.describe()
    );
    let end = ticks(&run.stdout, "kit: compute result ").unwrap();
    assert!(
        end > at.ticks + 5,
        "the timer stopped: {end} ticks at the end, {at:?}: {}",
        run.describe()
    );
    assert!(
        run.stdout.contains("kit: PASS compute"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_restored_guest_and_two_clones_finish_the_computation_with_the_original_s_result() {
    if !kvm_available(
        "a_restored_guest_and_two_clones_finish_the_computation_with_the_original_s_result",
    ) {
        return;
    }
    let dir = TempDir::new("snapshot");
    let snap = dir.path("snap");
    let (want, at) = original_with_snapshot(&dir, &snap);
    // Two clones side by side from the one snapshot (its memory file mapped privately by both).
    let a = restore(&dir, &snap, "a", &[]);
    let b = restore(&dir, &snap, "b", &[]);
    check_restored(&finish(&dir, "a", a), &want, at);
    check_restored(&finish(&dir, "b", b), &want, at);
    // Held paused: nothing runs until the resume; the memory checked first on request.
    let sock = dir.path("held.sock");
    let mut held = restore(
        &dir,
        &snap,
        "held",
        &[
            "--paused",
            "--verify-memory",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    let t = Instant::now();
    while !sock.exists() {
        assert!(held.try_wait().unwrap().is_none(), "the restore ended");
        assert!(t.elapsed() < PROGRESS);
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = ctl(&sock, &["state"]);
    assert_eq!(
        (info["state"].as_str(), info["restored_from"].as_str()),
        (Some("paused"), snap.to_str()),
        "{info}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        last_round(&console(&dir, "held")).is_none(),
        "ran while held"
    );
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    // A snapshot of the restored VM (its RAM a private mapping of the first snapshot's file)
    // restores too.
    let later = at.round + 50;
    wait_for_round(&dir, "held", &mut held, later);
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let snap2 = dir.path("snap2");
    let s = ctl(&sock, &["snapshot", snap2.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    let text = console(&dir, "held");
    let at2 = At {
        round: last_round(&text).unwrap(),
        ticks: ticks(&text, "kit: compute round ").unwrap(),
    };
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    check_restored(&finish(&dir, "held", held), &want, at);
    let again = restore(&dir, &snap2, "again", &[]);
    check_restored(&finish(&dir, "again", again), &want, at2);
}

/// `exitless restore` of `snap` is refused: status 1, an error containing `want`, and the guest
/// never ran.
fn refused(dir: &TempDir, snap: &Path, extra: &[&str], want: &str) {
    let child = restore(dir, snap, "bad", extra);
    let run = finish(dir, "bad", child);
    assert_eq!(run.status, Some(1), "{}", run.describe());
    assert!(
        run.stderr.contains(want),
        "wanted {want:?}: {}",
        run.describe()
    );
    assert!(
        !run.stdout.contains("kit:"),
        "the guest ran: {}",
        run.describe()
    );
    let _ = std::fs::remove_file(dir.path("bad.log"));
}

/// A way to damage a snapshot: its name, the damage, restore's extra arguments, the error.
type Case<'a> = (&'a str, Box<dyn Fn(&Path) + 'a>, &'a [&'a str], &'a str);

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state.json", "memory"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn bad_snapshots_are_refused_before_anything_runs() {
    if !kvm_available("bad_snapshots_are_refused_before_anything_runs") {
        return;
    }
    let dir = TempDir::new("snapshot-bad");
    let snap = dir.path("snap");
    original_with_snapshot(&dir, &snap);
    let bad = dir.path("bad");
    let state = std::fs::read_to_string(snap.join("state.json")).unwrap();
    let cases: Vec<Case> = vec![
        (
            "cut state",
            Box::new(|d| std::fs::write(d.join("state.json"), &state[..state.len() / 2]).unwrap()),
            &[],
            "truncated",
        ),
        (
            "corrupted vcpus",
            Box::new(|d| {
                // One digit changed inside the vcpus section's body.
                let at = state.find("\"vcpus\":{").unwrap() + 200;
                let at = at + state[at..].find(|c: char| c.is_ascii_digit()).unwrap();
                let mut b = state.clone().into_bytes();
                b[at] = if b[at] == b'7' { b'8' } else { b'7' };
                std::fs::write(d.join("state.json"), b).unwrap();
            }),
            &[],
            "the vcpus section is corrupted",
        ),
        (
            "version",
            Box::new(|d| {
                std::fs::write(
                    d.join("state.json"),
                    state.replacen("\"version\":1", "\"version\":99", 1),
                )
                .unwrap()
            }),
            &[],
            "snapshot format version 99",
        ),
        (
            "not a snapshot",
            Box::new(|d| std::fs::write(d.join("state.json"), "{\"hello\":1}").unwrap()),
            &[],
            "not an exitless snapshot",
        ),
        (
            "another host",
            Box::new(|d| {
                let mut host: exitless::snapshot::HostIdentity = serde_json::from_value(
                    serde_json::from_str::<serde_json::Value>(&state).unwrap()["sections"]["host"]
                        ["body"]
                        .clone(),
                )
                .unwrap();
                host.cpu_signature ^= 0x10;
                host.cpu_brand = "Another CPU".into();
                exitless::snapshot::rewrite_host_for_tests(d, &host).unwrap();
            }),
            &[],
            "taken on another host",
        ),
        (
            "cut memory",
            Box::new(|d| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                f.set_len(f.metadata().unwrap().len() / 2).unwrap();
            }),
            &[],
            "truncated",
        ),
        (
            "changed memory",
            Box::new(|d| {
                // One byte inverted: a constant written there could be what it held (CI once
                // wrote 0x5a over a 0x5a, 1 chance in 256, and the restore rightly went ahead).
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                let at = 0x80_0000 + 12345;
                let mut b = [0u8];
                f.read_exact_at(&mut b, at).unwrap();
                f.write_all_at(&[!b[0]], at).unwrap();
            }),
            &["--verify-memory"],
            "the memory file is corrupted",
        ),
        (
            "no memory",
            Box::new(|d| std::fs::remove_file(d.join("memory")).unwrap()),
            &[],
            "memory",
        ),
    ];
    for (what, damage, extra, want) in cases {
        let _ = std::fs::remove_dir_all(&bad);
        copy_snapshot(&snap, &bad);
        damage(&bad);
        eprintln!("case: {what}");
        refused(&dir, &bad, extra, want);
    }
    // The undamaged snapshot still restores (the cases failed for their damage alone).
    let ok = restore(&dir, &snap, "ok", &[]);
    let run = finish(&dir, "ok", ok);
    assert_eq!(run.status, Some(0), "{}", run.describe());
}

/// The last `kit: virtio-snap round R` the guest printed.
fn virtio_round(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| {
        l.strip_prefix("kit: virtio-snap round ")?
            .trim()
            .parse()
            .ok()
    })
}

/// `kit: virtio-snap result X`.
fn virtio_result(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("kit: virtio-snap result "))
        .map(|s| s.trim().to_string())
}

/// Runs the virtio-snap guest (virtio-rng and a virtio-blk disk, `img`) and snapshots it mid-way;
/// the disk is copied to `copy` while the VM is paused (a clone's own image). Returns the
/// original's result and the round it had printed when it was snapshotted.
fn virtio_original(dir: &TempDir, snap: &Path, img: &Path, copy: &Path) -> (String, u64) {
    let sock = dir.path("vorig.sock");
    let disk = format!("path={}", img.display());
    let args = [
        "run",
        "--guest",
        "virtio-snap",
        "--rng",
        "--disk",
        &disk,
        "--cmdline",
        "rounds=400 every=10 delay_us=2000",
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    let mut child = spawn(&args, dir, "vorig");
    let t = Instant::now();
    while virtio_round(&console(dir, "vorig")).is_none_or(|r| r < 100) {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended early");
        assert!(t.elapsed() < PROGRESS, "no round 100 after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let at = virtio_round(&console(dir, "vorig")).unwrap();
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    std::fs::copy(img, copy).unwrap();
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    let run = finish(dir, "vorig", child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    (virtio_result(&run.stdout).expect("a result"), at)
}

/// A change to a device's saved state.
type Damage = dyn Fn(&mut serde_json::Value);

/// The `devices` section of the snapshot in `dir`, with `f` applied to the virtio-blk's state.
fn damage_blk(dir: &Path, f: &Damage) {
    let text = std::fs::read_to_string(dir.join("state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut devices = state["sections"]["devices"]["body"].clone();
    let (_, blk) = devices["mmio"]
        .as_object_mut()
        .unwrap()
        .iter_mut()
        .find(|(k, _)| k.starts_with("virtio-blk@"))
        .expect("the disk's state");
    f(blk);
    exitless::snapshot::rewrite_devices_for_tests(dir, &devices).unwrap();
}

#[test]
fn a_guest_using_virtio_blk_and_rng_goes_on_after_a_restore() {
    if !kvm_available("a_guest_using_virtio_blk_and_rng_goes_on_after_a_restore") {
        return;
    }
    let dir = TempDir::new("snapshot-virtio");
    let (snap, img, copy) = (
        dir.path("snap"),
        dir.path("disk.img"),
        dir.path("clone.img"),
    );
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let (want, at) = virtio_original(&dir, &snap, &img, &copy);
    // The clone on its own copy of the disk, taken while the original was paused.
    let clone = restore(
        &dir,
        &snap,
        "vclone",
        &["--disk-image", copy.to_str().unwrap()],
    );
    let run = finish(&dir, "vclone", clone);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stderr.contains("exitless: restored from"),
        "{}",
        run.describe()
    );
    assert!(
        !run.stdout.contains("kit: virtio-snap rounds="),
        "booted again: {}",
        run.describe()
    );
    let first = run.stdout.lines().find_map(|l| {
        l.strip_prefix("kit: virtio-snap round ")?
            .trim()
            .parse::<u64>()
            .ok()
    });
    assert!(
        first.is_some_and(|r| r > at),
        "first round {first:?}, snapshot at {at}"
    );
    assert_eq!(
        virtio_result(&run.stdout).as_ref(),
        Some(&want),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("kit: PASS virtio-snap"),
        "{}",
        run.describe()
    );
    // Damaged device states are refused before the guest runs.
    let bad = dir.path("bad");
    let cases: [(&str, &Damage, &str); 4] = [
        (
            "size",
            &|b| b["queues"][0]["size"] = 3.into(),
            "queue 0: size 3",
        ),
        (
            "ring",
            &|b| b["queues"][0]["desc"] = (1u64 << 40).into(),
            "queue 0 is invalid",
        ),
        (
            "features",
            &|b| b["driver_features"] = (1u64 << 60).into(),
            "does not offer",
        ),
        (
            "not a state",
            &|b| *b = serde_json::json!({"x": 1}),
            "virtio-blk",
        ),
    ];
    for (what, f, want) in cases {
        eprintln!("case: {what}");
        let _ = std::fs::remove_dir_all(&bad);
        copy_snapshot(&snap, &bad);
        damage_blk(&bad, f);
        refused(&dir, &bad, &["--disk-image", copy.to_str().unwrap()], want);
    }
    // A disk of another size is not the guest's disk.
    std::fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    refused(
        &dir,
        &snap,
        &["--disk-image", copy.to_str().unwrap()],
        "the disk image was",
    );
}

/// A network namespace with tap `tap` (the host side 192.168.127.1, MAC 02:00:00:00:01:01 in
/// every namespace, so that a clone's cached host MAC is right on its new tap), or why not.
fn tap_netns(tag: &str, tap: &str) -> Result<Netns, String> {
    let ns = Netns::with_tap(tag, tap, "192.168.127.1")?;
    ns.ip(&["link", "set", "dev", tap, "address", "02:00:00:00:01:01"])?;
    Ok(ns)
}

/// The last `kit: virtio-net ping P` the guest printed.
fn last_ping(text: &str) -> Option<u64> {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("kit: virtio-net ping ")?.trim().parse().ok())
}

#[test]
fn a_guest_pinging_through_virtio_net_goes_on_after_a_restore_on_another_tap() {
    let test = "a_guest_pinging_through_virtio_net_goes_on_after_a_restore_on_another_tap";
    if !kvm_available(test) {
        return;
    }
    let ns = match tap_netns("snap-a", "exitless-snap0") {
        Ok(ns) => ns,
        Err(why) => return common::skip(test, &why),
    };
    let dir = TempDir::new("snapshot-net");
    let (snap, sock) = (dir.path("snap"), dir.path("net.sock"));
    let args = [
        "run",
        "--guest",
        "virtio-net",
        "--net",
        "tap=exitless-snap0,mac=02:00:00:00:00:2a",
        "--cmdline",
        "pings=200 delay_us=5000",
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    let mut child = spawn_in(Some(&ns.0), &args, &dir, "norig");
    let t = Instant::now();
    while last_ping(&console(&dir, "norig")).is_none_or(|p| p < 50) {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended early");
        assert!(t.elapsed() < PROGRESS, "no ping 50 after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let at = last_ping(&console(&dir, "norig")).unwrap();
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    let run = finish(&dir, "norig", child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        run.stdout.contains("kit: PASS virtio-net"),
        "{}",
        run.describe()
    );
    // The clone, in another namespace, on its own tap.
    let ns2 = tap_netns("snap-b", "exitless-snap1").unwrap();
    let restore_in = |extra: &[&str], tag: &str| {
        let mut a = vec!["restore", "--snapshot", snap.to_str().unwrap()];
        a.extend_from_slice(extra);
        finish(&dir, tag, spawn_in(Some(&ns2.0), &a, &dir, tag))
    };
    // Without the override the clone opens a tap of the snapshot's name, made afresh (down,
    // unconfigured) in its namespace: its pings go nowhere.
    let run = restore_in(&[], "nbad");
    assert_eq!(run.status, Some(3), "{}", run.describe());
    assert!(run.stdout.contains("no echo reply"), "{}", run.describe());
    let run = restore_in(&["--net-tap", "exitless-snap1"], "nclone");
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        !run.stdout.contains("kit: virtio-net at"),
        "booted again: {}",
        run.describe()
    );
    let first = run.stdout.lines().find_map(|l| {
        l.strip_prefix("kit: virtio-net ping ")?
            .trim()
            .parse::<u64>()
            .ok()
    });
    assert!(
        first.is_some_and(|p| p > at),
        "first ping {first:?}, snapshot at {at}"
    );
    assert!(
        run.stdout.contains("kit: PASS virtio-net"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_restored_vsock_guest_is_told_its_connections_are_gone_and_reads_the_clone_s_cid() {
    if !kvm_available("a_restored_vsock_guest_is_told_its_connections_are_gone") {
        return;
    }
    let dir = TempDir::new("snapshot-vsock");
    let (snap, sock) = (dir.path("snap"), dir.path("vs.sock"));
    let vsock = format!("cid=3,socket={}", dir.path("v.sock").display());
    let args = [
        "run",
        "--guest",
        "virtio-vsock",
        "--vsock",
        &vsock,
        "--cmdline",
        "wait-reset",
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    let mut child = spawn(&args, &dir, "vsorig");
    let t = Instant::now();
    while !console(&dir, "vsorig").contains("kit: virtio-vsock waiting 2") {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended early");
        assert!(t.elapsed() < PROGRESS, "not waiting after {PROGRESS:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let s = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(s["ok"], true, "{s}");
    // The original keeps its connections: it gets no reset.
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ctl(&sock, &["quit"])["ok"], true);
    let run = finish(&dir, "vsorig", child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        !run.stdout.contains("transport reset"),
        "{}",
        run.describe()
    );
    // The clone, with its own CID and socket.
    let w = dir.path("w.sock");
    let clone = restore(
        &dir,
        &snap,
        "vsclone",
        &["--vsock-cid", "7", "--vsock-socket", w.to_str().unwrap()],
    );
    let run = finish(&dir, "vsclone", clone);
    assert_eq!(run.status, Some(0), "{}", run.describe());
    assert!(
        !run.stdout.contains("rx queue="),
        "booted again: {}",
        run.describe()
    );
    assert!(
        run.stdout
            .contains("kit: virtio-vsock transport reset cid=7"),
        "{}",
        run.describe()
    );
    assert!(
        run.stdout.contains("kit: PASS virtio-vsock"),
        "{}",
        run.describe()
    );
}

#[test]
fn a_vm_with_a_device_that_cannot_be_saved_is_refused_naming_it() {
    if !kvm_available("a_vm_with_a_device_that_cannot_be_saved_is_refused_naming_it") {
        return;
    }
    let dir = TempDir::new("snapshot-dev");
    let sock = dir.path("api.sock");
    let vsock = format!("cid=3,socket={}", dir.path("v.sock").display());
    let mut child = spawn(
        &[
            "run",
            "--guest",
            "clock",
            "--rng",
            "--vsock",
            &vsock,
            "--iommu",
            "mode=samecore",
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        &dir,
        "rng",
    );
    let t = Instant::now();
    while !console(&dir, "rng").contains("kit: tick 1") {
        assert!(child.try_wait().unwrap().is_none(), "the VM ended");
        assert!(t.elapsed() < PROGRESS);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ctl(&sock, &["pause"])["state"], "paused");
    let snap = dir.path("snap");
    let e = ctl(&sock, &["snapshot", snap.to_str().unwrap()]);
    assert_eq!(e["ok"], false, "{e}");
    let msg = e["error"].as_str().unwrap();
    // The IOMMU is named with its reason; virtio-rng and vsock, which can be saved, are not.
    assert!(
        msg.contains("cannot snapshot this VM")
            && msg.contains("iommu at")
            && msg.contains("VT-d")
            && !msg.contains("virtio-rng")
            && !msg.contains("virtio-vsock"),
        "{e}"
    );
    assert!(!snap.join("state.json").exists() && !snap.join("memory").exists());
    // The VM is unharmed: it resumes and is stopped as usual.
    assert_eq!(ctl(&sock, &["resume"])["state"], "running");
    assert_eq!(ctl(&sock, &["quit"])["ok"], true);
    let run = finish(&dir, "rng", child);
    assert_eq!(run.status, Some(0), "{}", run.describe());
}
