//! Interrupt moderation driven by the guest: the stock Debian kernel's virtio-net driver
//! negotiates `VIRTIO_NET_F_NOTF_COAL` over the control queue, `ethtool -C` in its userspace sets
//! the device's coalescing, and the device's own counters (read live through the control API)
//! show fewer interrupts per frame for the same transfer than before. The device's adaptive mode
//! is off (`coalesce=off`), so the difference is the driver's doing.
//!
//! Needs /dev/kvm where guest userspace runs, root (the namespace) and the Debian guest with
//! ethtool (tools/debian-guest.sh); on a PVM host `tools/test.sh` runs it inside the emulated SVM
//! host.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::debian::{self, Vm};
use common::netns::Netns;
use common::*;

const HOST_IP: &str = "192.168.129.1";
const GUEST_IP: &str = "192.168.129.2";
const TAP: &str = "exl-coal-tap";
const BYTES: usize = 8 << 20;
const TRANSFER_WAIT: Duration = Duration::from_secs(600);

/// The device's live facts (`{"op":"stats"}` on the API socket).
fn net_facts(dir: &TempDir) -> serde_json::Value {
    let sock = dir.path("api.sock");
    let r = exitless_cmd(&["ctl", "--socket", sock.to_str().unwrap(), "stats"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("ctl stats: {e}: {}", r.describe()));
    v["devices"]["virtio-net0"].clone()
}

fn fact(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Sends BYTES from the host to the guest's `nc` on `port`; returns (interrupts, frames
/// received) the device counted meanwhile.
fn transfer(vm: &mut Vm, ns: &Netns, dir: &TempDir, port: u16) -> (u64, u64) {
    vm.step(
        &format!("nc -l -p {port} > /dev/null & r listening $!"),
        debian::STEP_WAIT,
    );
    let before = net_facts(dir);
    let sender = ns.spawn(move || -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match TcpStream::connect((GUEST_IP, port)) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        s.write_all(&vec![0x5a; BYTES])
            .map_err(|e| format!("send: {e}"))
    });
    assert_eq!(sender.join().expect("sender thread"), Ok(()));
    let out = vm.step("wait; r done $?", TRANSFER_WAIT);
    assert!(out.contains("=R= done 0"), "{out}");
    let after = net_facts(dir);
    let d = |k| fact(&after, k) - fact(&before, k);
    (d("interrupts"), d("rx_frames"))
}

#[test]
fn ethtool_in_the_guest_sets_coalescing_and_the_device_sends_fewer_interrupts() {
    const TEST: &str = "ethtool_in_the_guest_sets_coalescing_and_the_device_sends_fewer_interrupts";
    if !needs(
        TEST,
        &[
            Need::Kvm,
            Need::GuestUserspace,
            Need::DebianGuest,
            Need::Root,
        ],
    ) {
        return;
    }
    let ns = Netns::with_tap("coal", TAP, HOST_IP).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("debian-coalesce");
    let mut args = debian::args(1, "512M");
    args.extend([
        "--net".into(),
        format!("tap={TAP},coalesce=off"),
        "--api-socket".into(),
        dir.path("api.sock").to_str().unwrap().into(),
    ]);
    let mut vm = Vm::boot_shell(Some(&ns.0), &args, &dir.path("report.json"));
    let dev = vm.value(
        "r dev $(ls /sys/class/net | grep -v '^lo$' | head -n 1)",
        "dev",
    );
    assert_eq!(
        vm.number(
            &format!("ip link set {dev} up && ip addr add {GUEST_IP}/24 dev {dev}; r ip $?"),
            "ip"
        ),
        0
    );
    let out = vm.step(
        &format!("ping -c 1 -W 10 {HOST_IP}; r ping $?"),
        debian::STEP_WAIT,
    );
    assert!(out.contains("=R= ping 0"), "{out}");

    let (irq_off, frames_off) = transfer(&mut vm, &ns, &dir, 5101);

    // tx-frames stays non-zero: Linux refuses to change the transmit NAPI weight of a running
    // interface (a zero would ask it to).
    let out = vm.step(
        &format!(
            "ethtool -C {dev} rx-usecs 400 rx-frames 64 tx-usecs 400 tx-frames 64; r set $?; \
             ethtool -c {dev} | grep -E '^(rx|tx)-(usecs|frames):'"
        ),
        debian::STEP_WAIT,
    );
    assert!(out.contains("=R= set 0"), "ethtool -C failed: {out}");
    assert!(out.contains("rx-usecs:\t400") || out.contains("rx-usecs: 400"), "{out}");

    let (irq_on, frames_on) = transfer(&mut vm, &ns, &dir, 5102);
    let per = |i: u64, f: u64| i as f64 / f.max(1) as f64;
    eprintln!(
        "{TEST}: driver coalescing off: {irq_off} interrupts for {frames_off} frames ({:.3}/frame); \
         rx 400 µs/64 frames: {irq_on} for {frames_on} ({:.3}/frame)",
        per(irq_off, frames_off),
        per(irq_on, frames_on)
    );
    assert!(frames_off > 0 && frames_on > 0);
    assert!(
        per(irq_on, frames_on) < 0.8 * per(irq_off, frames_off),
        "coalescing did not cut interrupts per frame: {irq_off}/{frames_off} -> {irq_on}/{frames_on}"
    );

    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let f = |k: &str| r.device_fact("virtio-net0", k).unwrap_or(0);
    let report = r.report.as_ref().expect("report");
    assert!(f("ctrl_commands") >= 2, "{report}");
    assert_eq!(f("ctrl_errors"), 0, "{report}");
    assert!(f("interrupts_held") > 0, "{report}");
    assert_eq!(f("rx_dropped"), 0, "{report}");
    drop(ns);
}
