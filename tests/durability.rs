//! Durability (issue 14): a crash of the VMM loses no data the guest flushed, and leaves nothing
//! behind that stops the next VM.
//!
//! The kit's `blk-flush` guest writes its disk's 4 KiB blocks in order and prints `kit: flushed N`
//! after each FLUSH has completed (blocks 0..N are durable as far as it was told). A first run
//! goes to the end (every block whole on the image) and times the guest's writing; then, round
//! after round, exitless is killed with SIGKILL at a random moment of that span (seeded: the seed
//! is printed, `EXITLESS_DURABILITY_SEED` replays it), half the rounds with `direct=on`
//! (O_DIRECT), and every block of the last `flushed` line seen on the console must be on the
//! image, whole and in its place. A lost completion (a request acknowledged before its
//! `pwritev`, a flush completed before its `fdatasync`) fails here.
//!
//! What a kill leaves: the control and vsock sockets stay as files (nothing can remove them after
//! SIGKILL), and the next exitless on the same paths must take them over (every round reuses
//! them); a run that ends normally removes them. As root, every run also has a virtio-net device
//! on a tap exitless creates inside a network namespace of the test, which must be gone once the
//! killed exitless is.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const BLOCK: usize = 4096;
/// 2 MiB: 512 blocks, about 4 s of writing on a PVM host.
const DISK_BYTES: u64 = 2 << 20;
const KILL_ROUNDS: u32 = 8;
const TAP: &str = "exlkill0";

/// Qword `i` (2..512) of block `b`, as the guest writes it (guests/src/bin/blk-flush.rs).
fn record(b: u64, i: u64) -> u64 {
    (b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i).rotate_left((i % 64) as u32)
}

/// Why block `b` of `img` is not what the guest wrote there, if it is not.
fn check_block(img: &[u8], b: u64) -> Option<String> {
    let at = b as usize * BLOCK;
    let Some(block) = img.get(at..at + BLOCK) else {
        return Some(format!(
            "block {b} is past the image's end ({} bytes)",
            img.len()
        ));
    };
    let q = |i: usize| u64::from_le_bytes(block[8 * i..8 * i + 8].try_into().unwrap());
    if &block[..8] != b"kitflush" || q(1) != b {
        return Some(format!(
            "block {b} has no record of its own: {:02x?}",
            &block[..16]
        ));
    }
    (2..BLOCK / 8)
        .find(|&i| q(i) != record(b, i as u64))
        .map(|i| format!("block {b} is torn at qword {i}"))
}

/// A tiny xorshift generator: the kill moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The network namespace the runs' taps live in (root only), deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
            return None;
        }
        let name = format!("exitless-kill-{}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name]).then_some(Netns(name))
    }

    /// Whether `dev` exists in the namespace.
    fn has(&self, dev: &str) -> bool {
        ip(&["netns", "exec", &self.0, "ip", "link", "show", dev])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One exitless run of the `blk-flush` guest, its console read as it comes.
struct Guest {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    err: Arc<Mutex<Vec<u8>>>,
}

impl Guest {
    fn start(dir: &TempDir, img: &Path, direct: bool, netns: Option<&Netns>) -> Guest {
        let mut cmd = match netns {
            Some(ns) => {
                // `ip netns exec` execs exitless: the child is exitless itself.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0]).arg(exitless());
                c
            }
            None => Command::new(exitless()),
        };
        let disk = format!(
            "path={}{}",
            img.display(),
            if direct { ",direct=on" } else { "" }
        );
        cmd.args([
            "run",
            "--guest",
            "blk-flush",
            "--timeout",
            "300",
            "--disk",
            &disk,
        ])
        .arg("--api-socket")
        .arg(dir.path("api.sock"))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.path("vsock.sock").display()));
        if netns.is_some() {
            cmd.args(["--net", &format!("tap={TAP}")]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start exitless");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let pipe = |mut r: Box<dyn Read + Send>, buf: Arc<Mutex<Vec<u8>>>| {
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        };
        let reader = pipe(Box::new(child.stdout.take().unwrap()), out.clone());
        pipe(Box::new(child.stderr.take().unwrap()), err.clone());
        Guest {
            child,
            out,
            reader: Some(reader),
            err,
        }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits for `pat` on the console (or the end of exitless).
    fn wait_for(&mut self, pat: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.console().contains(pat) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.console().contains(pat);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// SIGKILL, then reaped; the console as it was read.
    fn kill(mut self) -> (bool, String) {
        let ended_first = matches!(self.child.try_wait(), Ok(Some(_)));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (ended_first, self.console())
    }

    fn finish(mut self) -> (Option<i32>, String, String) {
        let status = self.child.wait().expect("wait for exitless").code();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let err = String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned();
        (status, self.console(), err)
    }
}

/// The highest `kit: flushed N` among the console's complete lines.
fn flushed(console: &str) -> u64 {
    let complete = &console[..console.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter_map(|l| l.trim().strip_prefix("kit: flushed ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn new_image(path: &Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
}

/// Every block below `n` of `img` is the guest's.
fn assert_blocks(img: &Path, n: u64, what: &str) {
    let data = std::fs::read(img).unwrap();
    if let Some(why) = (0..n).find_map(|b| check_block(&data, b)) {
        panic!("{what}: the guest saw blocks 0..{n} flushed, but {why}");
    }
}

#[test]
fn sigkill_loses_no_block_the_guest_saw_flushed_and_leaves_nothing_in_the_way() {
    const TEST: &str = "sigkill_loses_no_block_the_guest_saw_flushed_and_leaves_nothing_in_the_way";
    if !needs(TEST, &[Need::Kvm]) {
        return;
    }
    let dir = TempDir::new("durability");
    let netns = Netns::new();
    if netns.is_none() {
        skip(
            &format!("{TEST} (the tap part)"),
            "not root or no /dev/net/tun: no tap is created, so none is checked",
        );
    }
    let seed = std::env::var("EXITLESS_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{TEST}: seed {seed} (EXITLESS_DURABILITY_SEED={seed} replays the kill moments)");
    let mut rng = Rng(seed);

    // The whole run: every block whole, and how long the guest writes.
    let img = dir.path("full.img");
    new_image(&img);
    let mut g = Guest::start(&dir, &img, false, netns.as_ref());
    assert!(
        g.wait_for("kit: flushed ", Duration::from_secs(120)),
        "no flush: {}",
        g.console()
    );
    let first = Instant::now();
    let (status, console, err) = g.finish();
    let span = first.elapsed();
    assert_eq!(status, Some(0), "{console}\n{err}");
    assert!(console.contains("kit: PASS blk-flush"), "{console}\n{err}");
    let blocks = DISK_BYTES / BLOCK as u64;
    assert_eq!(flushed(&console), blocks, "{console}");
    assert_blocks(&img, blocks, "the whole run");
    for f in ["api.sock", "vsock.sock"] {
        assert!(!dir.path(f).exists(), "a normal end removes {f}");
    }
    eprintln!(
        "{TEST}: the whole run wrote and flushed {blocks} blocks in {:.2} s",
        span.as_secs_f64()
    );

    let mut lines = Vec::new();
    for round in 0..KILL_ROUNDS {
        let direct = round % 2 == 1;
        let img = dir.path(&format!("round{round}.img"));
        new_image(&img);
        let delay = span.mul_f64(rng.next() * 0.95);
        let mut g = Guest::start(&dir, &img, direct, netns.as_ref());
        assert!(
            g.wait_for("kit: flushed ", Duration::from_secs(120)),
            "round {round}: no flush: {}",
            g.console()
        );
        std::thread::sleep(delay);
        let (ended_first, console) = g.kill();
        let n = flushed(&console);
        assert!(
            !console.contains("exitless: error"),
            "round {round}: {console}"
        );
        assert_blocks(&img, n, &format!("round {round} (seed {seed})"));
        if let Some(ns) = &netns {
            assert!(
                !ns.has(TAP),
                "round {round}: the tap outlived the killed exitless"
            );
        }
        lines.push(format!(
            "round {round}: killed {:.3} s after the first flush{}{}: {n} of {blocks} blocks \
             reported flushed, all whole on the image",
            delay.as_secs_f64(),
            if direct { " (direct=on)" } else { "" },
            if ended_first {
                " (the guest had finished)"
            } else {
                ""
            },
        ));
    }
    for l in &lines {
        eprintln!("{TEST}: {l}");
    }
    // The stale sockets the last kill left are taken over, and removed by a normal end.
    let r = run(&[
        "--guest",
        "poweroff",
        "--timeout",
        "120",
        "--api-socket",
        dir.path("api.sock").to_str().unwrap(),
        "--vsock",
        &format!("cid=3,socket={}", dir.path("vsock.sock").display()),
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    let left: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".img"))
        .collect();
    assert!(left.is_empty(), "left in the run directory: {left:?}");
}

#[test]
fn the_checker_finds_a_missing_a_torn_and_a_misplaced_block() {
    let mut img = vec![0u8; 3 * BLOCK];
    for b in 0..3u64 {
        let at = b as usize * BLOCK;
        img[at..at + 8].copy_from_slice(b"kitflush");
        img[at + 8..at + 16].copy_from_slice(&b.to_le_bytes());
        for i in 2..BLOCK / 8 {
            img[at + 8 * i..at + 8 * i + 8].copy_from_slice(&record(b, i as u64).to_le_bytes());
        }
    }
    assert!((0..3).all(|b| check_block(&img, b).is_none()));
    let mut torn = img.clone();
    torn[BLOCK + 2048..2 * BLOCK].fill(0);
    assert!(check_block(&torn, 1).unwrap().contains("torn"));
    let mut moved = img.clone();
    moved.copy_within(0..BLOCK, 2 * BLOCK);
    assert!(check_block(&moved, 2).unwrap().contains("no record"));
    assert!(check_block(&img, 3).unwrap().contains("past"));
    assert_eq!(
        flushed("kit: flushed 4\r\nkit: flushed 9\r\nkit: flushed 1"),
        9
    );
}
