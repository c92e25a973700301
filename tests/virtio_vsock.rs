//! virtio-vsock with its hybrid Unix-socket host side, under KVM with the kit's own driver
//! (`virtio-vsock` guest): a host client reaches guest port 1234 through `CONNECT 1234\n` on the
//! VMM's socket, and the guest reaches a host listener at `PATH_5678`. Plus the start-up errors of
//! a bad `--vsock`. Tests needing KVM skip with the reason printed where /dev/kvm is unusable.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

/// Connects to the VMM's socket, retrying until it listens.
fn connect(sock: &PathBuf) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// First a client with a bad line, which must get `ERROR ...` and EOF; then the real client, which
/// asks for guest port 1234, sends a line and returns (the `OK ...` line, the guest's reply, bytes
/// after it until EOF).
fn host_client(sock: PathBuf) -> Result<(String, String, usize), String> {
    let mut bad = connect(&sock)?;
    bad.set_read_timeout(Some(Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    bad.write_all(b"CONNECT to-the-moon\n")
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    bad.read_to_string(&mut answer)
        .map_err(|e| format!("bad client: {e}"))?;
    if !answer.starts_with("ERROR") {
        return Err(format!("bad CONNECT line answered {answer:?}"));
    }
    let mut s = connect(&sock)?;
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 1234\n").map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut ok = String::new();
    r.read_line(&mut ok).map_err(|e| format!("OK line: {e}"))?;
    s.write_all(b"hello vsock\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    r.read_line(&mut reply).map_err(|e| format!("reply: {e}"))?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).map_err(|e| format!("EOF: {e}"))?;
    Ok((ok, reply, rest.len()))
}

/// The host listener at `PATH_5678`: answers one line with `host saw: <line>`.
fn host_listener(l: UnixListener) -> Result<String, String> {
    let (s, _) = l.accept().map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
    (&s).write_all(format!("host saw: {line}").as_bytes())
        .map_err(|e| e.to_string())?;
    // The guest closes after reading the answer: EOF here.
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    Ok(line)
}

#[test]
fn kit_virtio_vsock_both_directions() {
    if !kvm_available("kit_virtio_vsock_both_directions") {
        return;
    }
    let dir = TempDir::new("vsock");
    let sock = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_5678")).unwrap();
    let server = std::thread::spawn(move || host_listener(listener));
    let client = {
        let sock = sock.clone();
        std::thread::spawn(move || host_client(sock))
    };
    let vsock = format!("cid=3,socket={}", sock.display());
    let run = run_guest("virtio-vsock", &["--vsock", &vsock]);
    let d = run.describe();
    assert_eq!(run.status, Some(0), "{d}");
    assert!(run.stdout.contains("kit: PASS virtio-vsock"), "{d}");
    assert!(run.stdout.contains("kit: virtio-vsock cid=3"), "{d}");
    assert!(
        run.stdout
            .contains("got \"hello vsock\" replied \"HELLO VSOCK\""),
        "{d}"
    );
    let (ok, reply, after) = client
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{d}"));
    assert!(ok.starts_with("OK "), "{ok:?}");
    let port: u32 = ok.trim()[3..].parse().unwrap_or_else(|_| panic!("{ok:?}"));
    assert!(
        run.stdout.contains(&format!("from host port {port}")),
        "{d}"
    );
    assert_eq!(reply, "HELLO VSOCK\n");
    assert_eq!(after, 0, "bytes after the reply");
    let line = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{d}"));
    assert_eq!(line, "hello from the guest\n");

    let f = |k: &str| {
        run.device_fact("virtio-vsock", k)
            .unwrap_or_else(|| panic!("no fact {k}\n{d}"))
    };
    assert_eq!(f("driver_ok"), 1, "{d}");
    assert_eq!(f("conns_host"), 1, "{d}");
    assert_eq!(f("conns_guest"), 1, "{d}");
    // "hello vsock\n" and "host saw: hello from the guest\n" went to the guest; "HELLO VSOCK\n"
    // and "hello from the guest\n" came from it.
    assert_eq!(f("bytes_to_guest"), 12 + 31, "{d}");
    assert_eq!(f("bytes_from_guest"), 12 + 21, "{d}");
    assert_eq!(f("needs_reset"), 0, "{d}");
    assert!(
        run.stdout
            .contains("kit: vsock hostile packets: 2 RST, spoofed CID dropped"),
        "{d}"
    );
    // One RST answering each of the guest's two SHUTDOWNs, and one for each of its two bad
    // packets (an unknown op, data for no connection); the spoofed packet dropped.
    assert_eq!(f("rst_sent"), 4, "{d}");
    assert_eq!(f("dropped"), 1, "{d}");
    assert_eq!(f("bad_packets"), 2, "{d}");
    assert_eq!(f("credit_violations"), 0, "{d}");
    assert_eq!(f("host_bad_connect"), 1, "{d}");
    // The socket is removed when the VMM ends.
    assert!(!sock.exists());
}

/// Lines of stderr about vsock (other start-up notes, such as the PVM one, may precede them).
fn vsock_lines(err: &str) -> usize {
    err.lines().filter(|l| l.contains("vsock")).count()
}

fn start_up_error(vsock: &str) -> Run {
    exitless_cmd(&[
        "run",
        "--guest",
        "virtio-vsock",
        "--timeout",
        "30",
        "--vsock",
        vsock,
    ])
}

#[test]
fn a_bad_vsock_option_is_a_clear_start_up_error() {
    // Both are refused before any VM exists (cid 2 by the parser, a missing directory when the
    // device binds its socket), but the latter needs /dev/kvm to get that far.
    let run = start_up_error("cid=2,socket=/tmp/exitless-never.sock");
    assert_ne!(run.status, Some(0), "{}", run.describe());
    let err = run.stderr.trim();
    assert!(
        err.contains("vsock cid 2 is reserved"),
        "{}",
        run.describe()
    );
    assert_eq!(vsock_lines(err), 1, "{}", run.describe());

    if !kvm_available("a_bad_vsock_option_is_a_clear_start_up_error (missing directory)") {
        return;
    }
    let run = start_up_error("cid=3,socket=/nonexistent/exitless/v.sock");
    assert_ne!(run.status, Some(0), "{}", run.describe());
    let err = run.stderr.trim();
    assert!(
        err.contains("cannot listen on vsock socket /nonexistent/exitless/v.sock"),
        "{}",
        run.describe()
    );
    assert_eq!(vsock_lines(err), 1, "{}", run.describe());
}
