//! virtio-vsock between the stock Debian guest's userspace (socat, AF_VSOCK) and the host side of
//! exitless's device, a Unix socket (`--vsock cid=3,socket=PATH`, Firecracker's scheme): 8 MiB
//! from a host client (`CONNECT 1234` on PATH) to a guest listener, and the same bytes back from
//! a guest client to host port 5000 (the Unix socket `PATH_5000` the test listens on), each
//! checked by SHA-256 at the receiving end.
//!
//! Needs /dev/kvm where guest userspace runs and the Debian guest (initrd-tools.img carries
//! socat); on a PVM host `tools/test.sh` runs it inside the emulated SVM host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use common::debian::{self, Vm};
use common::*;

const BYTES: usize = 8 << 20;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5000;
const TRANSFER_WAIT: Duration = Duration::from_secs(600);

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects to guest port `port` through the device's Unix socket, retrying until a guest
/// listener answers `OK` (before that the guest kernel refuses with RST and the stream closes).
fn connect_to_guest(sock: &Path, port: u32) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = (|| -> std::io::Result<Option<UnixStream>> {
            let mut s = UnixStream::connect(sock)?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = String::new();
            BufReader::new(s.try_clone()?).read_line(&mut line)?;
            Ok(line.starts_with("OK ").then_some(s))
        })();
        match attempt {
            Ok(Some(s)) => return Ok(s),
            Ok(None) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(300))
            }
            Ok(None) => return Err("the guest never accepted".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn debian_guest_and_host_exchange_8_mib_over_vsock_both_ways() {
    const TEST: &str = "debian_guest_and_host_exchange_8_mib_over_vsock_both_ways";
    if !needs(TEST, &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest]) {
        return;
    }
    let dir = TempDir::new("debian-vsock");
    let sock = dir.path("vsock.sock");
    let mut args = debian::args(2, "1G");
    args.push("--vsock".into());
    args.push(format!("cid=3,socket={}", sock.display()));
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    assert_eq!(
        vm.number(
            "r bound $(ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -c '^virtio')",
            "bound"
        ),
        1
    );

    // Host -> guest.
    let data: Vec<u8> = (0..BYTES as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let want = hex(Sha256::digest(&data));
    vm.step(
        &format!("socat -u VSOCK-LISTEN:{GUEST_PORT} CREATE:/tmp/vin & r listening $!"),
        debian::STEP_WAIT,
    );
    let started = Instant::now();
    let mut s = connect_to_guest(&sock, GUEST_PORT).unwrap_or_else(|e| vm.fail(&e));
    s.write_all(&data)
        .unwrap_or_else(|e| vm.fail(&format!("send: {e}")));
    drop(s); // the guest's socat ends on EOF
    let out = vm.step(
        "wait; r in-bytes $(wc -c < /tmp/vin); r in-sha $(sha256sum /tmp/vin | cut -d' ' -f1)",
        TRANSFER_WAIT,
    );
    eprintln!(
        "{TEST}: host -> guest {} MiB in {:.1} s",
        BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    let res = debian::results(&out);
    assert_eq!(res.get("in-bytes"), Some(&BYTES.to_string()), "{out}");
    assert_eq!(res.get("in-sha"), Some(&want), "{out}");

    // Guest -> host: a guest connection to host port P reaches the Unix socket PATH_P.
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", sock.display())).unwrap();
    let receiver = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        let (mut s, _) = listener.accept()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    let started = Instant::now();
    let out = vm.step(
        &format!("socat -u FILE:/tmp/vin VSOCK-CONNECT:2:{HOST_PORT}; r out $?"),
        TRANSFER_WAIT,
    );
    assert_eq!(
        debian::results(&out).get("out").map(String::as_str),
        Some("0"),
        "{out}"
    );
    let got = receiver.join().expect("receiver").expect("receive");
    eprintln!(
        "{TEST}: guest -> host {} MiB in {:.1} s",
        BYTES >> 20,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(got.len(), BYTES);
    assert_eq!(hex(Sha256::digest(&got)), want);

    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let report = r.report.as_ref().expect("report");
    let fact = |k: &str| r.device_fact("virtio-vsock", k).unwrap_or(0);
    assert!(fact("conns_host") >= 1, "{report}");
    assert!(fact("conns_guest") >= 1, "{report}");
    assert!(fact("bytes_to_guest") >= BYTES as u64, "{report}");
    assert!(fact("bytes_from_guest") >= BYTES as u64, "{report}");
    assert_eq!(fact("bad_packets"), 0, "{report}");
    assert_eq!(fact("dropped"), 0, "{report}");
    assert!(!sock.exists(), "the VMM removes its socket");
}
