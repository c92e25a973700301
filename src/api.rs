//! The control API: a Unix socket (`exitless run --api-socket PATH`) through which a user or a
//! program talks to a running VM, and its client (`exitless ctl`).
//!
//! One JSON object per line in, one JSON object per line back:
//! ```text
//! {"op":"stats"}                       {"ok":true,"uptime_s":12.5,"exits":{"io_out":...},"devices":{...},"kvm":{...}}
//! {"op":"balloon","size":"256M"}       {"ok":true,"target_pages":65536}
//! {"op":"quit"}                        {"ok":true}   (the VM stops as if interrupted, with its summary)
//! anything else                        {"ok":false,"error":"..."}
//! ```
//! `stats` is live: exitless's exits to userspace by reason (every vCPU's, summed), every device's
//! facts (requests, interrupts, balloon pages, ...) and KVM's own per-vCPU counters summed (all
//! exits, in-kernel ones included), read while the guest runs.
//! `balloon` takes a size (`512M`, `1G`, bytes) or `"bytes": N`, sets the balloon's target and
//! tells the driver with a configuration-change interrupt; the driver inflates or deflates.
//!
//! Owns the socket and one thread per connection (at most [`MAX_CLIENTS`] at once: a client that
//! connects and never speaks holds only its own thread). It may touch the VM only through
//! [`Control`]. A request is at most [`MAX_LINE`] bytes; a bad request gets an error reply and
//! changes nothing.
//!
//! Why not HTTP, as Firecracker and Cloud Hypervisor have: a line of JSON over a Unix socket is
//! scriptable with `socat` or `exitless ctl`, needs no HTTP stack in the VMM, and the socket's file
//! permissions are its access control, as theirs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

/// Longest request line.
pub const MAX_LINE: u64 = 4096;
/// Connections served at once.
pub const MAX_CLIENTS: usize = 8;

/// What the API may do to a running VM.
pub trait Control: Send + Sync {
    /// Live facts: uptime, devices, KVM's counters.
    fn stats(&self) -> Value;
    /// A new balloon target in bytes: the target in 4 KiB pages, or why not.
    fn set_balloon(&self, bytes: u64) -> Result<u32, String>;
    /// Stop the VM.
    fn quit(&self);
}

/// Answers one request line.
pub fn handle_line(line: &str, vm: &dyn Control) -> Value {
    match answer(line, vm) {
        Ok(v) => v,
        Err(e) => json!({"ok": false, "error": e}),
    }
}

fn answer(line: &str, vm: &dyn Control) -> Result<Value, String> {
    let req: Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("not a JSON object: {e}"))?;
    let op = req
        .get("op")
        .and_then(Value::as_str)
        .ok_or("no \"op\" (one of stats, balloon, quit)")?;
    match op {
        "stats" => {
            let mut v = vm.stats();
            v["ok"] = json!(true);
            Ok(v)
        }
        "balloon" => {
            let bytes = match (req.get("size"), req.get("bytes")) {
                (Some(s), None) => {
                    crate::config::parse_size(s.as_str().ok_or("\"size\" must be a string")?)?
                }
                (None, Some(b)) => b.as_u64().ok_or("\"bytes\" must be a whole number")?,
                _ => return Err("balloon needs one of \"size\" (\"256M\") or \"bytes\"".into()),
            };
            let pages = vm.set_balloon(bytes)?;
            Ok(json!({"ok": true, "target_pages": pages}))
        }
        "quit" => {
            vm.quit();
            Ok(json!({"ok": true}))
        }
        other => Err(format!(
            "unknown op {other:?} (one of stats, balloon, quit)"
        )),
    }
}

/// The listening socket; closing it (drop) stops the accept thread and removes the file.
pub struct ApiServer {
    path: PathBuf,
    closed: Arc<AtomicBool>,
}

impl ApiServer {
    /// Listens on `path`. A stale socket file (nobody listening) is replaced; a live one, or any
    /// other file there, is an error.
    pub fn start(path: &Path, vm: Arc<dyn Control>) -> Result<Self, String> {
        if path.exists() {
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            });
            if !is_socket {
                return Err(format!(
                    "--api-socket {}: a file that is not a socket is in the way",
                    path.display()
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "--api-socket {}: another VM is listening there",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("--api-socket {}: {e}", path.display()))?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let clients = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Its client threads inherit the filter.
                crate::seccomp::apply(crate::seccomp::Kind::Api);
                for stream in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                        clients.fetch_sub(1, Ordering::SeqCst);
                        let _ = (&stream).write_all(
                            b"{\"ok\":false,\"error\":\"too many control connections\"}\n",
                        );
                        continue;
                    }
                    let (vm, clients) = (vm.clone(), clients.clone());
                    let spawned =
                        std::thread::Builder::new()
                            .name("api-client".into())
                            .spawn(move || {
                                serve(stream, &*vm);
                                clients.fetch_sub(1, Ordering::SeqCst);
                            });
                    if spawned.is_err() {
                        log::warn!("api: cannot start a thread for a client");
                    }
                }
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            closed,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers a client's lines until it hangs up (or sends a line longer than `MAX_LINE`).
fn serve(stream: UnixStream, vm: &dyn Control) {
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match (&mut input).take(MAX_LINE + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n as u64 > MAX_LINE => {
                let _ = writeln!(
                    out,
                    "{}",
                    json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
                );
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_line(&line, vm);
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// `exitless ctl`: sends one request to the VM at `socket` and returns its reply.
pub fn request(socket: &Path, req: &Value) -> Result<Value, String> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach a VM at {}: {e} (is it running with --api-socket?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    writeln!(&stream, "{req}").map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .take(16 << 20)
        .read_line(&mut line)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    serde_json::from_str(&line).map_err(|e| format!("the VM's reply is not JSON ({e}): {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        balloon: Mutex<Option<u64>>,
        quit: AtomicBool,
    }

    impl Control for Fake {
        fn stats(&self) -> Value {
            json!({"uptime_s": 1.5, "devices": {"virtio-rng": {"requests": 3}}})
        }
        fn set_balloon(&self, bytes: u64) -> Result<u32, String> {
            if bytes > 1 << 30 {
                return Err("larger than guest memory".into());
            }
            *self.balloon.lock().unwrap() = Some(bytes);
            Ok((bytes / 4096) as u32)
        }
        fn quit(&self) {
            self.quit.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn requests_are_answered_and_bad_ones_change_nothing() {
        let vm = Fake::default();
        let r = handle_line(r#"{"op":"stats"}"#, &vm);
        assert_eq!(r["ok"], true);
        assert_eq!(r["devices"]["virtio-rng"]["requests"], 3);
        let r = handle_line(r#"{"op":"balloon","size":"48M"}"#, &vm);
        assert_eq!(r, json!({"ok": true, "target_pages": 12288}));
        let r = handle_line(r#"{"op":"balloon","bytes":8192}"#, &vm);
        assert_eq!(r["target_pages"], 2);
        assert_eq!(*vm.balloon.lock().unwrap(), Some(8192));
        for bad in [
            "",
            "stats",
            "{}",
            r#"{"op":"reboot"}"#,
            r#"{"op":"balloon"}"#,
            r#"{"op":"balloon","size":"lots"}"#,
            r#"{"op":"balloon","size":"48M","bytes":4096}"#,
            r#"{"op":"balloon","bytes":-1}"#,
            r#"{"op":"balloon","size":"2G"}"#,
            r#"{"op":7}"#,
        ] {
            let r = handle_line(bad, &vm);
            assert_eq!(r["ok"], false, "{bad:?}: {r}");
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
        }
        assert_eq!(*vm.balloon.lock().unwrap(), Some(8192), "untouched");
        assert!(!vm.quit.load(Ordering::SeqCst));
        assert_eq!(handle_line(r#"{"op":"quit"}"#, &vm)["ok"], true);
        assert!(vm.quit.load(Ordering::SeqCst));
    }

    #[test]
    fn the_socket_serves_clients_and_refuses_a_second_vm_and_overlong_lines() {
        let dir = std::env::temp_dir().join(format!("exitless-api-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let vm = Arc::new(Fake::default());
        let server = ApiServer::start(&path, vm.clone()).unwrap();
        let r = request(&path, &json!({"op": "balloon", "size": "4M"})).unwrap();
        assert_eq!(r["target_pages"], 1024);
        // Two requests on one connection.
        let s = UnixStream::connect(&path).unwrap();
        writeln!(&s, "{{\"op\":\"stats\"}}\n{{\"op\":\"nope\"}}").unwrap();
        let mut lines = BufReader::new(&s).lines();
        assert_eq!(
            serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap()["ok"],
            true
        );
        assert_eq!(
            serde_json::from_str::<Value>(&lines.next().unwrap().unwrap()).unwrap()["ok"],
            false
        );
        // A line that never ends within MAX_LINE bytes ends its connection with an error.
        let s = UnixStream::connect(&path).unwrap();
        (&s).write_all(&vec![b'x'; MAX_LINE as usize + 10]).unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        assert!(reply.contains("longer than"), "{reply}");
        // A second VM on the same path is refused while this one listens.
        let e = ApiServer::start(&path, vm.clone()).err().unwrap();
        assert!(e.contains("another VM"), "{e}");
        drop(server);
        assert!(!path.exists(), "the socket file is removed at the end");
        // Nobody listens: the client says so.
        let e = request(&path, &json!({"op": "stats"})).unwrap_err();
        assert!(e.contains("--api-socket"), "{e}");
        // A regular file in the way is not replaced.
        std::fs::write(&path, "data").unwrap();
        let e = ApiServer::start(&path, vm).err().unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
