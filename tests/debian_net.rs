//! virtio-net from the stock Debian guest's userspace, against a tap in a network namespace the
//! test creates: the guest configures its address with `ip`, pings the host and is pinged by it,
//! then 32 MiB go each way over TCP (busybox `nc` in the guest, sockets the test opens inside the
//! namespace on the host), each checked by SHA-256 at the receiving end.
//!
//! Needs /dev/kvm where guest userspace runs, root (the namespace) and the Debian guest; on a PVM
//! host `tools/test.sh` runs it inside the emulated SVM host.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::debian::{self, Vm};
use common::netns::Netns;
use common::*;

const HOST_IP: &str = "192.168.128.1";
const GUEST_IP: &str = "192.168.128.2";
const TAP: &str = "exl-net-tap";
const BYTES: usize = 32 << 20;
const TO_GUEST_PORT: u16 = 5001;
const TO_HOST_PORT: u16 = 5002;
/// A transfer step: 32 MiB through an emulated host can take a while.
const TRANSFER_WAIT: Duration = Duration::from_secs(600);

/// Deterministic, incompressible-looking bytes (xorshift), so nothing in the path can make a
/// short cut and a corrupted byte shows in the hash.
fn payload() -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..BYTES / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// Waits until the guest has acknowledged everything sent on `s` (`SIOCOUTQ` is 0).
fn wait_until_acknowledged(s: &TcpStream, deadline: Instant) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int for a TCP socket we own.
        let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if rc != 0 {
            return Err(format!("SIOCOUTQ: {}", std::io::Error::last_os_error()));
        }
        if queued == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{queued} bytes still unacknowledged by the guest"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The namespace's non-zero `TCPAbort*` counters (`/proc/thread-self/net/netstat` of a thread
/// inside it): a connection reset by the host shows here.
fn tcp_aborts(ns: &Netns) -> String {
    let text = ns
        .spawn(|| std::fs::read_to_string("/proc/thread-self/net/netstat").unwrap_or_default())
        .join()
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values] = lines[..] else {
        return "unknown".into();
    };
    let found: Vec<String> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, v)| n.starts_with("TCPAbort") && *v != "0")
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    if found.is_empty() {
        "none".into()
    } else {
        found.join(" ")
    }
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn debian_guest_pings_both_ways_and_moves_32_mib_each_way_over_tcp() {
    const TEST: &str = "debian_guest_pings_both_ways_and_moves_32_mib_each_way_over_tcp";
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
    let ns = Netns::with_tap("net", TAP, HOST_IP).unwrap_or_else(|e| panic!("{e}"));
    let dir = TempDir::new("debian-net");
    let mut args = debian::args(2, "1G");
    args.push("--net".into());
    args.push(format!("tap={TAP}"));
    let mut vm = Vm::boot_shell(Some(&ns.0), &args, &dir.path("report.json"));

    // Address, then ping the host.
    vm.net_up(GUEST_IP);
    let out = vm.step(
        &format!("ping -c 3 -W 10 {HOST_IP}; r ping $?"),
        debian::STEP_WAIT,
    );
    assert!(
        out.contains("3 packets transmitted, 3 packets received"),
        "guest -> host ping: {out}"
    );
    // The host pings the guest.
    let ping = std::process::Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "ping", "-c", "3", "-W", "10", GUEST_IP,
        ])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "host -> guest ping: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );

    // Host -> guest: the guest listens, the host connects and sends, the guest hashes.
    let data = payload();
    let want = hex(Sha256::digest(&data));
    vm.step(
        // stdin from /dev/null: a background nc also reads the serial console, so the next
        // step typed there went to it (or stopped it) instead of the shell, and the file was
        // measured before nc had written it all (29-31 of 32 MiB) or the step never answered.
        &format!("nc -l -p {TO_GUEST_PORT} < /dev/null > /tmp/in & r listening $!"),
        debian::STEP_WAIT,
    );
    let sender = {
        let data = data.clone();
        ns.spawn(move || -> Result<(), String> {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut s = loop {
                match TcpStream::connect((GUEST_IP, TO_GUEST_PORT)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            s.write_all(&data).map_err(|e| format!("send: {e}"))?;
            // Close only once the guest has acknowledged every byte: closing at once would
            // orphan the socket with up to its send buffer (4 MiB) unsent, which the host
            // kernel may reset under pressure; the guest would then see a short stream.
            wait_until_acknowledged(&s, Instant::now() + TRANSFER_WAIT)?;
            Ok(())
        })
    };
    let started = Instant::now();
    let sent = sender.join().expect("sender thread");
    assert_eq!(sent, Ok(()));
    let out = vm.step(
        "wait; r jobs $(jobs); r in-bytes $(wc -c < /tmp/in); \
         r in-sha $(sha256sum /tmp/in | cut -d' ' -f1)",
        TRANSFER_WAIT,
    );
    let res = debian::results(&out);
    eprintln!(
        "{TEST}: host -> guest 32 MiB in {:.1} s; the namespace's TCP aborts: {}",
        started.elapsed().as_secs_f64(),
        tcp_aborts(&ns)
    );
    assert_eq!(
        res.get("in-bytes").map(String::as_str),
        Some("33554432"),
        "{out}"
    );
    assert_eq!(res.get("in-sha"), Some(&want), "{out}");

    // Guest -> host: the host listens, the guest sends the same bytes back.
    let listener = ns
        .spawn(|| TcpListener::bind((HOST_IP, TO_HOST_PORT)))
        .join()
        .expect("bind thread")
        .expect("bind");
    let receiver = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let (s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let mut got = Vec::with_capacity(BYTES);
        s.take(BYTES as u64)
            .read_to_end(&mut got)
            .map_err(|e| format!("receive: {e}"))?;
        Ok(got) // dropping the stream closes it: the guest's nc ends.
    });
    let started = Instant::now();
    let out = vm.step(
        &format!("nc {HOST_IP} {TO_HOST_PORT} < /tmp/in; r nc-out $?"),
        TRANSFER_WAIT,
    );
    let got = receiver.join().expect("receiver thread");
    eprintln!(
        "{TEST}: guest -> host 32 MiB in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let got = got.unwrap_or_else(|e| panic!("{e}; guest: {out}"));
    assert_eq!(got.len(), BYTES);
    assert_eq!(hex(Sha256::digest(&got)), want);

    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let report = r.report.as_ref().expect("report");
    let fact = |k: &str| r.device_fact("virtio-net0", k).unwrap_or(0);
    assert!(fact("rx_bytes") >= BYTES as u64, "{report}");
    assert!(fact("tx_bytes") >= BYTES as u64, "{report}");
    assert_eq!(fact("rx_dropped"), 0, "{report}");
    assert_eq!(fact("tx_dropped"), 0, "{report}");
    assert_eq!(fact("errors"), 0, "{report}");
    drop(ns);
}
