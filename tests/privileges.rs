//! What exitless needs from the operator, and that it needs no more: it runs as an unprivileged
//! user with no capabilities in the jail of `tools/jail.sh` (new mount, PID and network
//! namespaces, a chroot holding only its files, /dev/kvm owned by that user), every device on;
//! Landlock refuses a path outside the files it still needs once it runs; and descriptors it
//! inherits are closed before the VM starts.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{exitless, kvm_available, TempDir};

const NOBODY: u32 = 65534;
const TAP: &str = "exitless-jail0";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Why the jail cannot be made here, if it cannot.
fn jail_lacks() -> Option<String> {
    if !is_root() {
        return Some(
            "not root: making the jail (namespaces, device nodes, chroot) needs root".into(),
        );
    }
    for tool in ["unshare", "setpriv", "chroot", "ldd"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A directory the jail's user owns, reachable from / by anyone.
fn user_dir(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// The jailed run: `exitless run` as nobody, with every device the hostile guest attacks.
#[test]
fn exitless_runs_as_an_unprivileged_user_in_the_jail_with_every_device() {
    if !kvm_available("exitless_runs_as_an_unprivileged_user_in_the_jail_with_every_device") {
        return;
    }
    if let Some(why) = jail_lacks() {
        return common::skip(
            "exitless_runs_as_an_unprivileged_user_in_the_jail_with_every_device",
            &why,
        );
    }
    // The tap exists before exitless starts, owned by the jail's user (it cannot create one).
    let ns = common::netns::Netns::with_tap("jail", TAP, "192.168.133.1");
    let ns = match ns {
        Ok(ns) => {
            ns.ip(&["tuntap", "del", "dev", TAP, "mode", "tap"])
                .unwrap();
            ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "user", "65534"])
                .unwrap();
            Some(ns)
        }
        Err(why) => {
            common::skip(
                "exitless_runs_as_an_unprivileged_user (virtio-net part)",
                &why,
            );
            None
        }
    };
    let dir = user_dir("jail");
    let ro = TempDir::new("jail-ro");
    std::fs::set_permissions(&ro.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(ro.path("ro.img"), vec![0x5au8; 1 << 20]).unwrap();
    std::fs::write(dir.path("rw.img"), vec![7u8; 1 << 20]).unwrap();
    std::os::unix::fs::chown(dir.path("rw.img"), Some(NOBODY), Some(NOBODY)).unwrap();
    let d = |n: &str| dir.path(n).display().to_string();
    let mut cmd = Command::new(repo().join("tools/jail.sh"));
    cmd.args(["--exitless", exitless(), "--rw"])
        .arg(&dir.0)
        .arg("--ro")
        .arg(ro.path("ro.img"));
    if let Some(ns) = &ns {
        cmd.args(["--netns", &ns.0, "--tun"]);
    }
    cmd.args([
        "--",
        "--guest",
        "hostile",
        "--mem",
        "64M",
        "--timeout",
        "600",
    ])
    .args(["--cmdline", "seed=1"])
    .args(["--disk", &format!("path={}", d("rw.img"))])
    .args([
        "--disk",
        &format!("path={},readonly=on", ro.path("ro.img").display()),
    ])
    .args(["--rng", "--balloon"])
    .args(["--vsock", &format!("cid=3,socket={}", d("v.sock"))])
    .args(["--api-socket", &d("api.sock")])
    .args(["--console-log", &d("console.log")])
    .args(["--stats-json", &d("report.json")])
    .args(["--landlock", "require"]);
    if ns.is_some() {
        cmd.args(["--net", &format!("tap={TAP}")]);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let describe = format!("--- stdout:\n{stdout}\n--- stderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{describe}");
    assert!(stdout.contains("kit: PASS hostile"), "{describe}");
    assert!(stderr.contains("jail: root "), "{describe}");
    // Written by the jailed process: its owner is the user it ran as.
    for f in ["report.json", "console.log"] {
        let m = std::fs::metadata(dir.path(f)).unwrap_or_else(|e| panic!("{f}: {e} {describe}"));
        assert_eq!(m.uid(), NOBODY, "{f} was not written by nobody");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path("report.json")).unwrap()).unwrap();
    assert_eq!(report["end"], "guest powered off", "{describe}");
    let devs = report["devices"].as_array().expect("devices");
    let mut want = vec![
        "virtio-blk0",
        "virtio-blk1",
        "virtio-rng",
        "virtio-balloon",
        "virtio-vsock",
    ];
    if ns.is_some() {
        want.push("virtio-net0");
    }
    for w in want {
        let d = devs.iter().find(|d| d["device"] == w);
        let ok = d
            .and_then(|d| d["facts"]["driver_ok"].as_u64())
            .unwrap_or(0);
        assert!(ok >= 1, "{w} never started ({describe})");
    }
    // The sockets were removed at the end, under Landlock, by nobody.
    assert!(!dir.path("api.sock").exists(), "{describe}");
    assert!(!dir.path("v.sock").exists(), "{describe}");
}

/// Landlock: once running, the main thread cannot open a file outside what it still needs
/// (a file next to the report, readable by the user), and can with `--landlock off`.
#[test]
fn landlock_refuses_a_path_outside_the_allowed_files_once_running() {
    if !kvm_available("landlock_refuses_a_path_outside_the_allowed_files_once_running") {
        return;
    }
    if let Err(why) = exitless::sandbox::kernel_abi() {
        return common::skip(
            "landlock_refuses_a_path_outside_the_allowed_files_once_running",
            &why,
        );
    }
    let dir = TempDir::new("landlock");
    let secret = dir.path("secret");
    std::fs::write(&secret, "x").unwrap();
    let run = |mode: &str| {
        let out = Command::new(exitless())
            .args(["run", "--guest", "poweroff", "--landlock", mode])
            .arg("--landlock-selftest")
            .arg(&secret)
            .arg("--stats-json")
            .arg(dir.path("report.json"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "--landlock {mode}: {stderr}");
        stderr
    };
    let on = run("on");
    assert!(
        on.contains(&format!("landlock selftest: {} refused", secret.display())),
        "{on}"
    );
    // The report, written at the end by the restricted main thread, is there.
    let report = std::fs::read_to_string(dir.path("report.json")).unwrap();
    assert!(report.contains("guest powered off"), "{report}");
    // The report into a pipe (`/dev/stdout`), which is no file Landlock can name.
    let out = Command::new(exitless())
        .args([
            "run",
            "--guest",
            "poweroff",
            "--no-summary",
            "--stats-json",
            "/dev/stdout",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"end\": \"guest powered off\""),
        "{stdout}"
    );
    let off = run("off");
    assert!(
        off.contains(&format!("landlock selftest: {} opened", secret.display())),
        "{off}"
    );
}

/// A descriptor inherited from the parent (the write end of a pipe, not close-on-exec) is closed
/// before the VM runs: the test's read end sees end-of-file while exitless still runs.
#[test]
fn inherited_descriptors_are_closed_at_start() {
    if !kvm_available("inherited_descriptors_are_closed_at_start") {
        return;
    }
    let dir = TempDir::new("fds");
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (rd, wr) = (fds[0], fds[1]);
    let api = dir.path("api.sock");
    let mut cmd = Command::new(exitless());
    cmd.args([
        "run",
        "--guest",
        "clock",
        "--timeout",
        "600",
        "--api-socket",
    ])
    .arg(&api)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 is async-signal-safe; it gives the child fd 7 without close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(wr, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    // SAFETY: our copy of the write end; the child holds its own.
    unsafe { libc::close(wr) };
    // Once the API answers, set-up is done.
    let start = std::time::Instant::now();
    while exitless::api::request(&api, &exitless::api::Call::State).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!("exitless ended early ({s})");
        }
        assert!(start.elapsed().as_secs() < 300, "the API never answered");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: a non-blocking read of our read end into a local buffer.
    let n = unsafe {
        libc::fcntl(rd, libc::F_SETFL, libc::O_NONBLOCK);
        let mut b = [0u8; 1];
        libc::read(rd, b.as_mut_ptr().cast(), 1)
    };
    let err = std::io::Error::last_os_error();
    let _ = exitless::api::request(&api, &exitless::api::Call::Quit);
    let _ = child.wait();
    // SAFETY: ours.
    unsafe { libc::close(rd) };
    assert_eq!(
        n, 0,
        "the pipe's write end is still open in exitless ({err})"
    );
}
