//! Interrupt moderation driven by the guest: the stock Debian kernel's virtio-net driver
//! negotiates `VIRTIO_NET_F_NOTF_COAL` over the control queue, `ethtool -C` in its userspace sets
//! the device's coalescing, and the device's own counters (read live through the control API)
//! show fewer interrupts per frame for the same paced datagrams than before. The device's adaptive mode
//! is off (`coalesce=off`), so the difference is the driver's doing.
//!
//! Needs /dev/kvm where guest userspace runs, root (the namespace) and the Debian guest with
//! ethtool (tools/debian-guest.sh); on a PVM host `tools/test.sh` runs it inside the emulated SVM
//! host.

mod common;

use std::net::UdpSocket;
use std::time::Duration;

use common::debian::{self, Vm};
use common::netns::Netns;
use common::*;

const HOST_IP: &str = "192.168.129.1";
const GUEST_IP: &str = "192.168.129.2";
const TAP: &str = "exl-coal-tap";
const DATAGRAMS: u32 = 400;
const GAP: Duration = Duration::from_millis(2);
/// Nothing listens there: the guest's kernel drops the datagrams, its driver still takes each.
const PORT: u16 = 5101;

/// The device's live facts (`{"op":"stats"}` on the API socket).
fn net_facts(dir: &TempDir) -> serde_json::Value {
    let sock = dir.path("api.sock");
    let r = exitless_cmd(&["ctl", "--socket", sock.to_str().unwrap(), "stats"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("ctl stats: {e}: {}", r.describe()));
    v["devices"]["virtio-net0"].clone()
}

fn fact(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Sends DATAGRAMS small UDP datagrams from the host to the guest, one every GAP (the guest has
/// long finished with each before the next comes, so without coalescing each one costs an
/// interrupt); returns (interrupts, frames received) the device counted meanwhile.
fn paced_datagrams(ns: &Netns, dir: &TempDir) -> (u64, u64) {
    let before = net_facts(dir);
    let sender = ns.spawn(move || -> Result<(), String> {
        let s = UdpSocket::bind((HOST_IP, 0)).map_err(|e| format!("bind: {e}"))?;
        for i in 0..DATAGRAMS {
            s.send_to(&[i as u8; 64], (GUEST_IP, PORT))
                .map_err(|e| format!("send: {e}"))?;
            std::thread::sleep(GAP);
        }
        Ok(())
    });
    assert_eq!(sender.join().expect("sender thread"), Ok(()));
    // The last held interrupt is sent within the clamped bound (10 ms).
    std::thread::sleep(Duration::from_millis(200));
    let after = net_facts(dir);
    let d = |k| fact(&after, k) - fact(&before, k);
    (d("interrupts"), d("rx_frames"))
}

#[test]
fn debian_guest_ethtool_sets_coalescing_and_the_device_sends_fewer_interrupts() {
    const TEST: &str = "debian_guest_ethtool_sets_coalescing_and_the_device_sends_fewer_interrupts";
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
    let dev = vm.net_up(GUEST_IP);
    let out = vm.step(
        &format!("ping -c 1 -W 10 {HOST_IP}; r ping $?"),
        debian::STEP_WAIT,
    );
    assert!(out.contains("=R= ping 0"), "{out}");

    let (irq_off, frames_off) = paced_datagrams(&ns, &dir);

    // tx-frames stays non-zero: Linux refuses to change the transmit NAPI weight of a running
    // interface (a zero would ask it to).
    let out = vm.step(
        &format!(
            "ethtool -C {dev} rx-usecs 10000 rx-frames 8 tx-usecs 0 tx-frames 1; r set $?; \
             ethtool -c {dev} | grep -E '^(rx|tx)-(usecs|frames):'"
        ),
        debian::STEP_WAIT,
    );
    assert!(out.contains("=R= set 0"), "ethtool -C failed: {out}");
    assert!(
        out.contains("rx-frames:\t8") || out.contains("rx-frames: 8"),
        "{out}"
    );

    let (irq_on, frames_on) = paced_datagrams(&ns, &dir);
    let per = |i: u64, f: u64| i as f64 / f.max(1) as f64;
    eprintln!(
        "{TEST}: driver coalescing off: {irq_off} interrupts for {frames_off} frames ({:.3}/frame); \
         rx 10 ms/8 frames: {irq_on} for {frames_on} ({:.3}/frame)",
        per(irq_off, frames_off),
        per(irq_on, frames_on)
    );
    assert!(frames_off >= u64::from(DATAGRAMS) && frames_on >= u64::from(DATAGRAMS));
    // Eight datagrams (16 ms) or 10 ms per interrupt at most: about one in five.
    assert!(
        per(irq_on, frames_on) < 0.5 * per(irq_off, frames_off),
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
