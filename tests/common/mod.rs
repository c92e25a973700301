//! Shared helpers for the integration tests: run the built `exitless` binary and read its report.

#![allow(dead_code)]

pub mod debian;
pub mod netns;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub fn exitless() -> &'static str {
    env!("CARGO_BIN_EXE_exitless")
}

/// Records that `test` (or a named part of it) did not run, and why: one line on stderr, written
/// past libtest's output capture so it shows for passing tests too. `tools/test.sh` counts these
/// lines as skips, not passes, lists their reasons, and fails in CI when there is any.
pub fn skip(test: &str, why: &str) {
    let bin = std::env::args()
        .next()
        .and_then(|a| {
            let stem = Path::new(&a).file_name()?.to_str()?.to_string();
            Some(
                stem.rsplit_once('-')
                    .map_or(stem.clone(), |(b, _)| b.to_string()),
            )
        })
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr().lock(),
        "\nexitless-skip: {bin}::{test}: {why}"
    );
}

/// What a test needs from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A usable /dev/kvm.
    Kvm,
    /// Root (network namespaces, taps).
    Root,
    /// A KVM where guest userspace runs (not PVM without VMX/SVM: a guest's `syscall` from user
    /// mode never reaches guest kernel mode there).
    GuestUserspace,
    /// `qemu-system-x86_64`, the peer VMM.
    Qemu,
    /// The Debian guest of `tools/debian-guest.sh` (images/debian).
    DebianGuest,
    /// A KVM that gives guests hardware virtualization (SVM or VMX: `--nested` on by default)
    /// and the Debian guest's initramfs with KVM's modules (`initrd-nested.img`).
    NestedGuest,
}

/// Why this host cannot give `need`, if it cannot.
pub fn lacks(need: Need) -> Option<String> {
    match need {
        Need::Kvm => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .err()
            .map(|e| format!("/dev/kvm is not usable here: {e}")),
        // SAFETY: geteuid has no preconditions.
        Need::Root => (unsafe { libc::geteuid() } != 0)
            .then(|| "not root: network namespaces and taps need CAP_NET_ADMIN".to_string()),
        Need::GuestUserspace => {
            let out = exitless_cmd(&["host"]).stdout;
            let text = out.lines().next().unwrap_or_default().trim().to_string();
            text.contains("PVM").then(|| {
                format!(
                    "no guest userspace runs on this host ({text}); tools/test.sh runs this \
                     test inside the emulated SVM host (tools/svm-host.sh)"
                )
            })
        }
        Need::Qemu => Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .err()
            .map(|e| {
                format!("qemu-system-x86_64 is not runnable ({e}): apt-get install qemu-system-x86")
            }),
        Need::DebianGuest => debian::missing(),
        Need::NestedGuest => {
            let text = exitless_cmd(&["host"]).stdout;
            let line = text
                .lines()
                .find(|l| l.starts_with("nested virtualization:"))
                .unwrap_or("no nested virtualization line from `exitless host`");
            if !line.contains(" given to guests") {
                Some(format!(
                    "guests get no hardware virtualization here ({line})"
                ))
            } else if !Path::new(debian::INITRD_NESTED).exists() {
                Some(format!(
                    "{} is not built (tools/debian-guest.sh images/debian)",
                    debian::INITRD_NESTED
                ))
            } else {
                None
            }
        }
    }
}

/// True when the host gives everything `test` needs; otherwise records the skip (the first
/// missing need) and returns false.
pub fn needs(test: &str, needs: &[Need]) -> bool {
    match needs.iter().find_map(|&n| lacks(n)) {
        Some(why) => {
            skip(test, &why);
            false
        }
        None => true,
    }
}

/// True when this host can run VMs; records the skip otherwise.
pub fn kvm_available(test: &str) -> bool {
    needs(test, &[Need::Kvm])
}

/// A scratch directory removed at drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "exitless-test-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `exitless run ARGS` in the background with `dir`'s API socket (`api.sock`), console log
/// (`console.log`) and report (`report.json`); stdin and stdout closed, stderr piped.
#[allow(dead_code)]
pub fn start_with_api(dir: &TempDir, args: &[&str]) -> std::process::Child {
    Command::new(exitless())
        .arg("run")
        .args(args)
        .arg("--api-socket")
        .arg(dir.path("api.sock"))
        .arg("--console-log")
        .arg(dir.path("console.log"))
        .arg("--stats-json")
        .arg(dir.path("report.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exitless")
}

/// Result of one `exitless run`.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<serde_json::Value>,
}

impl Run {
    pub fn exits(&self, reason: &str) -> u64 {
        self.report
            .as_ref()
            .and_then(|r| r["exits"][reason].as_u64())
            .unwrap_or(0)
    }

    pub fn port_exits(&self, port: u16) -> u64 {
        self.report
            .as_ref()
            .and_then(|r| r["pio_ports"][format!("{port:#x}")].as_u64())
            .unwrap_or(0)
    }

    pub fn device_fact(&self, device: &str, fact: &str) -> Option<u64> {
        self.report.as_ref()?["devices"]
            .as_array()?
            .iter()
            .find(|d| d["device"] == device)?["facts"][fact]
            .as_u64()
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

fn finish(out: Output, report: &Path) -> Run {
    let report = std::fs::read_to_string(report)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Run {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

/// Runs `exitless run ARGS` with `stdin` fed in, collecting the JSON report.
pub fn run_with_input(args: &[&str], stdin: &[u8]) -> Run {
    let dir = TempDir::new("run");
    let report = dir.path("report.json");
    let mut cmd = Command::new(exitless());
    cmd.arg("run")
        .args(args)
        .arg("--stats-json")
        .arg(&report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start exitless");
    {
        let mut input = child.stdin.take().unwrap();
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output().expect("wait for exitless");
    finish(out, &report)
}

pub fn run(args: &[&str]) -> Run {
    run_with_input(args, b"")
}

/// Runs an embedded kit guest with a time limit.
pub fn run_guest(guest: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--guest", guest, "--timeout", "120"];
    args.extend_from_slice(extra);
    run(&args)
}

/// Runs `exitless ARGS` (any subcommand) without a report.
pub fn exitless_cmd(args: &[&str]) -> Run {
    let out = Command::new(exitless())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start exitless");
    finish(out, Path::new("/nonexistent"))
}

/// Runs `exitless run ARGS` like [`run_with_input`], but ends the VM (SIGINT: exitless still
/// writes its report) when the guest console has been silent for `silence`. Returns the run and
/// whether it was cut for silence.
pub fn run_watched(args: &[&str], stdin: &[u8], silence: std::time::Duration) -> (Run, bool) {
    use std::io::Read;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let dir = TempDir::new("watched");
    let report = dir.path("report.json");
    let mut child = Command::new(exitless())
        .arg("run")
        .args(args)
        .arg("--stats-json")
        .arg(&report)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start exitless");
    {
        let mut input = child.stdin.take().unwrap();
        let _ = input.write_all(stdin);
    }
    let last_output = Arc::new(Mutex::new(Instant::now()));
    let stdout_buf = Arc::new(Mutex::new(Vec::new()));
    let mut out = child.stdout.take().unwrap();
    let reader = {
        let (last, buf) = (last_output.clone(), stdout_buf.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                *last.lock().unwrap() = Instant::now();
            }
        })
    };
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let cut = Arc::new(AtomicBool::new(false));
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for exitless") {
            break st;
        }
        if last_output.lock().unwrap().elapsed() > silence && !cut.swap(true, Ordering::SeqCst) {
            // A signal to our own child: exitless stops the VM and still writes its report.
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let stdout = std::mem::take(&mut *stdout_buf.lock().unwrap());
    let run = Run {
        status: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        report: std::fs::read_to_string(&report)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok()),
    };
    (run, cut.load(Ordering::SeqCst))
}
