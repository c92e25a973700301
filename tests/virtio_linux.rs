//! The real Linux test kernel (`../shared/guest/test-kernel/bzImage`: virtio, ext4, IPv4 built in)
//! driving exitless's virtio-pci devices without any userspace: it must mount an ext4 root from
//! virtio-blk (the host sees the superblock's mount count change), answer the host's pings over
//! virtio-net during `rootdelay` (a tap in a network namespace the test creates), and bind
//! virtio-rng (DRIVER_OK and requests served) and virtio-balloon (DRIVER_OK, and inflated by
//! Linux's own driver to a target the test sets through `--api-socket` while the kernel waits),
//! from the run report.
//! Init then dies (no userspace runs on PVM hosts) and `panic=1` ends the VM.
//!
//! Skipped (a recorded skip, with the reason) without /dev/kvm, the kernel or `mkfs.ext4`. The
//! network part needs root (network namespaces); without it the rest still runs and that part is
//! recorded as skipped. The kernel's own code is emulated on hosts without
//! VMX/SVM: expect several minutes, and run it alone (a loaded host starves the emulated timer
//! tick). `EXITLESS_LINUX_TIMEOUT` (seconds, default 1500) bounds the run.

mod common;

use common::netns::Netns;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TAP: &str = "exl-linux0";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";

fn kernel() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/guest/test-kernel/bzImage")
}

fn skip_reason() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("cannot open /dev/kvm: {e}"));
    }
    if !kernel().exists() {
        return Some(format!("no test kernel at {}", kernel().display()));
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        return Some("mkfs.ext4 is not installed (e2fsprogs)".into());
    }
    None
}

/// The ext4 superblock's mount count (offset 1024 + 0x34).
fn mount_count(img: &Path) -> u16 {
    let b = std::fs::read(img).unwrap();
    u16::from_le_bytes([b[1024 + 0x34], b[1024 + 0x35]])
}

fn facts(report: &serde_json::Value, device: &str) -> serde_json::Value {
    report["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["device"] == device)
        .map(|d| d["facts"].clone())
        .unwrap_or_else(|| panic!("no facts for {device}"))
}

/// Pings the guest from inside the namespace once its console says IP-Config is complete;
/// returns ping's output when 3 of 3 replies came back.
fn ping_when_configured(
    ns: String,
    console: PathBuf,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<String, String>> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            if log.contains("IP-Config: Complete") {
                // rootdelay keeps the kernel waiting (and answering) for a while.
                let mut last = String::new();
                for _ in 0..5 {
                    let out = Command::new("ip")
                        .args([
                            "netns", "exec", &ns, "ping", "-c", "3", "-W", "20", GUEST_IP,
                        ])
                        .output()
                        .map_err(|e| format!("ping: {e}"))?;
                    last = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    if out.status.success() && last.contains(" 3 received") {
                        return Ok(last);
                    }
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                }
                return Err(format!("no replies: {last}"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err("the guest never completed IP-Config".into())
    })
}

/// The balloon target the test sets through the control API while the kernel waits for its root.
const BALLOON_TARGET_PAGES: u64 = 4096;

/// Once the kernel waits for its root device, sets the balloon's target to 16 MiB through the
/// control socket (the driver inflates during `rootdelay`); returns the reply.
fn balloon_when_waiting(
    api: PathBuf,
    console: PathBuf,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<serde_json::Value, String>> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            if log.contains("before mounting root device") {
                let out = Command::new(env!("CARGO_BIN_EXE_exitless"))
                    .arg("ctl")
                    .arg("--socket")
                    .arg(&api)
                    .args(["balloon", "16M"])
                    .output()
                    .map_err(|e| format!("exitless ctl: {e}"))?;
                return serde_json::from_slice(&out.stdout).map_err(|e| {
                    format!(
                        "exitless ctl said {e}: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err("the kernel never waited for its root device".into())
    })
}

#[test]
fn linux_mounts_root_from_virtio_blk_answers_pings_and_binds_rng_and_balloon() {
    const TEST: &str = "linux_mounts_root_from_virtio_blk_answers_pings_and_binds_rng_and_balloon";
    if let Some(why) = skip_reason() {
        common::skip(TEST, &why);
        return;
    }
    let dir = std::env::temp_dir().join(format!("exitless-virtio-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("root.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4 failed");
    assert_eq!(mount_count(&img), 0);

    let ns = match Netns::with_tap("linux", TAP, HOST_IP) {
        Ok(ns) => Some(ns),
        Err(why) => {
            common::skip(&format!("{TEST}: the network part"), &why);
            None
        }
    };
    let timeout = std::env::var("EXITLESS_LINUX_TIMEOUT").unwrap_or_else(|_| "1500".into());
    let json = dir.join("stats.json");
    let console = dir.join("console.log");
    let mut cmdline = "root=/dev/vda rw panic=1".to_string();
    if ns.is_some() {
        // The kernel answers pings while it waits for its root device.
        cmdline.push_str(&format!(
            " rootdelay=40 ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
        ));
    } else {
        // Long enough for the balloon to inflate while the kernel waits.
        cmdline.push_str(" rootdelay=40");
    }
    let api = dir.join("api.sock");
    let mut cmd = match &ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.0, env!("CARGO_BIN_EXE_exitless")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_exitless")),
    };
    cmd.args(["run", "--kernel"])
        .arg(kernel())
        .arg("--disk")
        .arg(format!("path={},id=root", img.display()))
        .args(["--rng", "--balloon", "--cpus", "1", "--mem", "256M"])
        .args(["--verbose-boot", "--sample-rips", "--cmdline", &cmdline])
        .args(["--timeout", &timeout, "--stats-json"])
        .arg(&json)
        .arg("--console-log")
        .arg(&console)
        .arg("--api-socket")
        .arg(&api)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if ns.is_some() {
        cmd.args(["--net", &format!("tap={TAP}")]);
    }
    let started = Instant::now();
    let child = cmd.spawn().expect("start exitless");
    let done = Arc::new(AtomicBool::new(false));
    let pinger = ns
        .as_ref()
        .map(|ns| ping_when_configured(ns.0.clone(), console.clone(), done.clone()));
    let ballooner = balloon_when_waiting(api, console.clone(), done.clone());
    let out = child.wait_with_output().unwrap();
    done.store(true, Ordering::Relaxed);
    let ping = pinger.map(|p| p.join().unwrap());
    let resized = ballooner.join().unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    eprintln!(
        "--- {:.0} s; console (tail):\n{}\n--- stderr:\n{}",
        started.elapsed().as_secs_f64(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::io::stderr().flush();

    assert!(log.contains("[vda]"), "virtio-blk disk not probed");
    assert!(log.contains("VFS: Mounted root (ext4"), "root not mounted");
    assert_eq!(mount_count(&img), 1, "the host sees the mount");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let blk = facts(&report, "virtio-blk0");
    assert!(blk["driver_ok"].as_u64().unwrap() >= 1, "{blk}");
    assert!(blk["reads"].as_u64().unwrap_or(0) > 0, "{blk}");
    assert!(blk["writes"].as_u64().unwrap_or(0) > 0, "{blk}");
    assert_eq!(blk["bad_chains"], 0, "{blk}");
    let rng = facts(&report, "virtio-rng");
    assert!(rng["driver_ok"].as_u64().unwrap() >= 1, "{rng}");
    assert!(rng["requests"].as_u64().unwrap() >= 1, "{rng}");
    let balloon = facts(&report, "virtio-balloon");
    assert!(balloon["driver_ok"].as_u64().unwrap() >= 1, "{balloon}");
    assert_eq!(balloon["needs_reset"], 0, "{balloon}");
    // The target set through the control API while the kernel ran: Linux's driver inflated to it.
    let resized = resized.unwrap_or_else(|e| panic!("balloon target: {e}"));
    assert_eq!(resized["target_pages"], BALLOON_TARGET_PAGES, "{resized}");
    assert_eq!(balloon["target_pages"], BALLOON_TARGET_PAGES, "{balloon}");
    assert_eq!(balloon["actual_pages"], BALLOON_TARGET_PAGES, "{balloon}");
    assert!(
        balloon["pages_inflated"].as_u64().unwrap() >= BALLOON_TARGET_PAGES,
        "{balloon}"
    );
    assert_eq!(balloon["bad_pfns"], 0, "{balloon}");
    if let Some(ping) = ping {
        let ping = ping.unwrap_or_else(|e| panic!("ping: {e}"));
        eprintln!("--- ping:\n{ping}");
        let net = facts(&report, "virtio-net0");
        assert!(net["driver_ok"].as_u64().unwrap() >= 1, "{net}");
        assert!(net["rx_frames"].as_u64().unwrap() >= 3, "{net}");
        assert!(net["tx_frames"].as_u64().unwrap() >= 3, "{net}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
