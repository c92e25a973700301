//! The stock Debian guest (`images/debian`: Debian's cloud kernel + the busybox initramfs of
//! `tools/debian-guest.sh`, whose init loads the virtio modules) driving every virtio device of
//! exitless from its shell, on hosts where guest userspace runs (VMX/SVM). The test types into
//! the shell over the serial console, one command line at a time, and waits for each command's
//! end marker before it sends the next one:
//!
//! - virtio-blk: `/dev/vda` (read-only, serial `exitless-ro`) reads back the markers the test wrote
//!   into its image at sector 2048 and in the last sector; a sector written to `/dev/vdb` with
//!   `dd conv=fsync` followed by `sync` is in the host's image file while the VM still runs (and
//!   the neighbouring sector is untouched).
//! - virtio-rng: `rng_current` names virtio, and `head -c 64 /dev/hwrng | wc -c` gives 64.
//! - virtio-balloon (`size=64M`): the driver is bound, the guest counted 16384 pages inflated
//!   (`balloon_inflate` in /proc/vmstat) and MemTotal is at least 64 MiB below 1 GiB; the device
//!   facts show the pages inflated and the guest's `actual` at the target.
//! - virtio-net: in a network namespace the test creates (with a tap holding the host address),
//!   `ip link set … up; ip addr add …; ping -c 3 HOST_IP` succeeds. Needs root (CAP_NET_ADMIN);
//!   otherwise this part is left out with the reason printed and the rest still runs.
//! - virtio-vsock (`cid=3`): busybox has no AF_VSOCK client or server (its `nc` speaks only
//!   TCP/UDP), so the guest cannot open a vsock connection itself; the test checks that the
//!   transport driver is bound, and a host client's `CONNECT 1234` to the VMM's socket reaches the
//!   guest kernel, which answers with RST (nothing listens there): the host stream closes without
//!   `OK`, and the device served that packet.
//!
//! Then `poweroff -f`: exitless exits 0 and its `--stats-json` device facts show DRIVER_OK, no
//! reset and requests served for every device.
//!
//! Skipped, with the reason printed, on PVM hosts (no guest userspace runs there: a guest's
//! `syscall` from user mode does not reach guest kernel mode), without /dev/kvm, and without the
//! image (unless EXITLESS_REQUIRE_LINUX=1, where a missing image fails, as in linux_boot.rs).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::*;

const KERNEL: &str = "images/debian/vmlinuz";
const INITRD: &str = "images/debian/initrd.img";

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// Both disks: 16 MiB raw images.
const DISK_BYTES: u64 = 16 * MIB;
const DISK_SECTORS: u64 = DISK_BYTES / SECTOR;
/// Where the vda marker is (the other one is in the last sector).
const VDA_MARK_SECTOR: u64 = 2048;
/// Where the guest writes on vdb.
const VDB_WRITE_SECTOR: u64 = 4096;
/// What vdb holds before the guest writes.
const VDB_FILL: u8 = 0x5a;
const VDA_SERIAL: &str = "exitless-ro";
const VDB_SERIAL: &str = "exitless-rw";

const BALLOON_BYTES: u64 = 64 * MIB;
const BALLOON_PAGES: u64 = BALLOON_BYTES / 4096;

const HOST_IP: &str = "192.168.127.1";
const GUEST_IP: &str = "192.168.127.2";
const TAP: &str = "exl-shell-tap";

/// exitless's own limit; the test's waits below end it sooner when the guest stops answering.
const VM_TIMEOUT: &str = "1200";
/// Boot to the init's first line (seconds on hardware; generous for slow CI hosts).
const BOOT_WAIT: Duration = Duration::from_secs(600);
const STEP_WAIT: Duration = Duration::from_secs(120);
const EXIT_WAIT: Duration = Duration::from_secs(120);

// ---- skip logic (as in linux_boot.rs) --------------------------------------------------------

fn image_present(test: &str) -> bool {
    let ok = Path::new(KERNEL).exists() && Path::new(INITRD).exists();
    if !ok {
        assert!(
            std::env::var("EXITLESS_REQUIRE_LINUX").as_deref() != Ok("1"),
            "{KERNEL} missing: tools/debian-guest.sh should have built it"
        );
        eprintln!("skipped {test}: {KERNEL} not built (run tools/debian-guest.sh)");
    }
    ok
}

fn guest_userspace_blocked() -> Option<String> {
    let r = exitless_cmd(&["host"]);
    let text = r.stdout.trim().to_string();
    text.contains("PVM").then_some(text)
}

// ---- the network namespace (as in virtio_net.rs) ---------------------------------------------

// ---- the guest's shell over the serial console -----------------------------------------------

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A running exitless whose console the test reads as it arrives and types into.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    out_thread: Option<JoinHandle<()>>,
    err_thread: Option<JoinHandle<Vec<u8>>>,
    report: PathBuf,
    steps: u32,
}

impl Vm {
    /// `exitless run ARGS --stats-json REPORT`, inside `netns` when given.
    fn start(netns: Option<&str>, args: &[String], report: &Path) -> Vm {
        let mut cmd = match netns {
            Some(ns) => {
                // `ip netns exec` enters the namespace and execs exitless: the child is exitless.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exitless());
                c
            }
            None => Command::new(exitless()),
        };
        let mut child = cmd
            .arg("run")
            .args(args)
            .arg("--stats-json")
            .arg(report)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start exitless");
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let out_thread = {
            let out = out.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    out.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            })
        };
        let mut stderr = child.stderr.take().unwrap();
        let err_thread = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        Vm {
            stdin: child.stdin.take(),
            child,
            out,
            out_thread: Some(out_thread),
            err_thread: Some(err_thread),
            report: report.to_path_buf(),
            steps: 0,
        }
    }

    fn console_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Waits until `pat` appears in the console output after byte `from`; returns the offset
    /// just past it. Ends the VM and fails the test (with the console) on timeout or exit.
    fn wait_for(&mut self, pat: &str, from: usize, timeout: Duration, what: &str) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = find(&out[from.min(out.len())..], pat.as_bytes()) {
                    return from + i + pat.len();
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader take the last bytes, then look once more.
                std::thread::sleep(Duration::from_millis(200));
                let out = self.out.lock().unwrap();
                if let Some(i) = find(&out[from.min(out.len())..], pat.as_bytes()) {
                    return from + i + pat.len();
                }
                drop(out);
                self.fail(&format!("{what}: exitless ended ({st}) before {pat:?}"));
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "{what}: no {pat:?} on the console within {} s",
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, line: &str) {
        let ok = self
            .stdin
            .as_mut()
            .map(|s| {
                s.write_all(line.as_bytes())
                    .and_then(|_| s.write_all(b"\n"))
                    .and_then(|_| s.flush())
                    .is_ok()
            })
            .unwrap_or(false);
        if !ok {
            self.fail(&format!(
                "could not type {line:?}: exitless's stdin is closed"
            ));
        }
    }

    /// Types one shell command line and waits for its end marker (`r` is defined by the first
    /// step); returns the console output from the moment it was typed.
    fn step(&mut self, cmd: &str, timeout: Duration) -> String {
        self.steps += 1;
        let n = self.steps;
        let from = self.console_len();
        self.send(&format!("{cmd}; r step-{n} done"));
        let end = self.wait_for(&format!("=R= step-{n} done"), from, timeout, cmd);
        String::from_utf8_lossy(&self.out.lock().unwrap()[from..end]).into_owned()
    }

    /// Ends the VM and fails the test with what the console and stderr showed.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self
            .err_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if let Some(t) = self.out_thread.take() {
            let _ = t.join();
        }
        let out = self.out.lock().unwrap();
        panic!(
            "{why}\n--- console\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&stderr)
        );
    }

    /// After `poweroff -f`: waits for exitless to end and collects the run.
    fn finish(mut self) -> Run {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_WAIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > deadline => {
                    self.fail("exitless did not end after poweroff -f")
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => self.fail(&format!("wait for exitless: {e}")),
            }
        };
        if let Some(t) = self.out_thread.take() {
            let _ = t.join();
        }
        let stderr = self
            .err_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let stdout = std::mem::take(&mut *self.out.lock().unwrap());
        Run {
            status: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            report: std::fs::read_to_string(&self.report)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A panic between start and finish must not leave the VM running (or the namespace busy).
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `=R= KEY VALUE` lines the guest printed, as KEY → VALUE (the last one wins).
fn results(console: &str) -> std::collections::BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("=R= "))
        .map(|rest| match rest.split_once(' ') {
            Some((k, v)) => (k.to_string(), v.trim().to_string()),
            None => (rest.to_string(), String::new()),
        })
        .collect()
}

/// A host client asks for guest port 1234, where nothing listens: the guest kernel answers the
/// REQUEST with RST and the device closes the stream. Returns what the client read before EOF.
fn vsock_connect_refused(sock: &Path) -> Result<Vec<u8>, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"CONNECT 1234\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .map_err(|e| format!("no EOF within 30 s (read {got:?}): {e}"))?;
    Ok(got)
}

/// A marker of fixed length (prefix + 8 hex digits) unique to this run.
fn marker(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:08x}", t ^ std::process::id().rotate_left(16))
}

fn write_at(img: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn read_at(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

#[test]
fn linux_debian_shell_drives_every_virtio_device() {
    const TEST: &str = "debian virtio shell";
    if let Some(why) = guest_userspace_blocked() {
        eprintln!(
            "skipped {TEST} test: no guest userspace can run on this host ({why}); \
             a guest's syscall from user mode does not enter guest kernel mode here"
        );
        return;
    }
    if !kvm_available(TEST) || !image_present(TEST) {
        return;
    }
    let ns = match Netns::with_tap("shell", TAP, HOST_IP) {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!("{TEST}: the virtio-net part is left out: {why}");
            None
        }
    };

    // The disks: vda read-only with two markers, vdb writable and filled with a pattern.
    let dir = TempDir::new("virtio-shell");
    let vda = dir.path("vda.img");
    let vdb = dir.path("vdb.img");
    let vda_mark = marker("exitless-vda");
    let vda_end = marker("exitless-end");
    let vdb_mark = marker("exitless-vdb");
    std::fs::File::create(&vda)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    write_at(&vda, VDA_MARK_SECTOR * SECTOR, vda_mark.as_bytes());
    write_at(&vda, (DISK_SECTORS - 1) * SECTOR, vda_end.as_bytes());
    std::fs::write(&vdb, vec![VDB_FILL; DISK_BYTES as usize]).unwrap();
    let sock = dir.path("vsock.sock");
    let report = dir.path("report.json");

    let mut args: Vec<String> = [
        "--kernel",
        KERNEL,
        "--initrd",
        INITRD,
        "--cpus",
        "2",
        "--mem",
        "1G",
        "--timeout",
        VM_TIMEOUT,
        "--rng",
        "--balloon",
        "size=64M",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push("--disk".into());
    args.push(format!(
        "path={},readonly=on,id={VDA_SERIAL}",
        vda.display()
    ));
    args.push("--disk".into());
    args.push(format!("path={},id={VDB_SERIAL}", vdb.display()));
    args.push("--vsock".into());
    args.push(format!("cid=3,socket={}", sock.display()));
    if ns.is_some() {
        args.push("--net".into());
        args.push(format!("tap={TAP}"));
    }

    let started = Instant::now();
    let mut vm = Vm::start(ns.as_ref().map(|n| n.0.as_str()), &args, &report);
    // The init's line after it loaded the modules, then the shell's prompt (PS1 of /etc/profile).
    let at = vm.wait_for("exitless-guest: nproc=", 0, BOOT_WAIT, "boot");
    vm.wait_for("exitless# ", at, STEP_WAIT, "shell prompt");
    eprintln!(
        "{TEST}: shell up after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // No echo of what we type (busybox's line editing then reads plain lines), no kernel
    // messages in between, and `r KEY VALUE` prints a result line no typed text starts with.
    vm.step(
        "stty -echo; dmesg -n 1; r() { echo \"=R= $*\"; }",
        STEP_WAIT,
    );

    // virtio-blk.
    vm.step(
        "r vda-serial $(cat /sys/block/vda/serial); r vdb-serial $(cat /sys/block/vdb/serial)",
        STEP_WAIT,
    );
    vm.step(
        "r vda-size $(cat /sys/block/vda/size); r vda-ro $(cat /sys/block/vda/ro)",
        STEP_WAIT,
    );
    vm.step(
        &format!(
            "r vda-mark $(dd if=/dev/vda bs=512 skip={VDA_MARK_SECTOR} count=1 2>/dev/null \
             | head -c {})",
            vda_mark.len()
        ),
        STEP_WAIT,
    );
    vm.step(
        &format!(
            "r vda-end $(dd if=/dev/vda bs=512 skip={} count=1 2>/dev/null | head -c {})",
            DISK_SECTORS - 1,
            vda_end.len()
        ),
        STEP_WAIT,
    );
    // One whole sector (conv=sync pads the marker with zeros), fsync'ed (a FLUSH), then sync.
    vm.step(
        &format!(
            "printf %s {vdb_mark} | dd of=/dev/vdb bs=512 seek={VDB_WRITE_SECTOR} \
             conv=sync,notrunc,fsync 2>/dev/null; r vdb-dd $?; sync; r vdb-sync $?"
        ),
        STEP_WAIT,
    );
    // The host sees the write now, while the VM still runs.
    let vdb_written = read_at(&vdb, VDB_WRITE_SECTOR * SECTOR, 2 * SECTOR as usize);

    // virtio-rng.
    vm.step(
        "r rng-current $(cat /sys/class/misc/hw_random/rng_current); \
         r rng-bytes $(head -c 64 /dev/hwrng | wc -c)",
        STEP_WAIT,
    );

    // virtio-balloon: bound, then wait (at most 60 s) until the guest counted the whole target
    // inflated.
    vm.step(
        "r balloon-bound $(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c '^virtio')",
        STEP_WAIT,
    );
    vm.step(
        &format!(
            "i=0; while [ \"$(sed -n 's/^balloon_inflate //p' /proc/vmstat)\" -lt \
             {BALLOON_PAGES} ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; \
             r balloon-inflate $(sed -n 's/^balloon_inflate //p' /proc/vmstat); \
             r memtotal $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"
        ),
        STEP_WAIT,
    );

    // virtio-vsock: the transport is bound; a host client's CONNECT is answered by the guest
    // kernel (RST: nothing listens on port 1234 in the guest, and busybox has no vsock tool to
    // listen with).
    vm.step(
        "r vsock-bound $(ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport \
         | grep -c '^virtio')",
        STEP_WAIT,
    );
    let vsock = vsock_connect_refused(&sock);

    // virtio-net.
    let ping_out = ns.as_ref().map(|_| {
        vm.step(
            &format!(
                "dev=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); r net-dev $dev; \
                 ip link set $dev up; ip addr add {GUEST_IP}/24 dev $dev; \
                 ping -c 3 -W 10 {HOST_IP}; r ping $?"
            ),
            STEP_WAIT,
        )
    });

    vm.send("poweroff -f");
    let r = vm.finish();
    eprintln!(
        "{TEST}: done after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let d = r.describe();
    assert_eq!(r.status, Some(0), "{d}");
    assert!(r.stdout.contains("exitless-guest: nproc=2"), "{d}");
    // The init loaded every virtio module it ships (it names any insmod that failed).
    assert!(!r.stdout.contains("exitless-guest: insmod"), "{d}");
    let res = results(&r.stdout);
    let get = |k: &str| {
        res.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("the guest printed no {k}: {d}"))
    };
    let num = |k: &str| -> u64 {
        get(k)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} is {:?}, not a number: {d}", get(k)))
    };

    // virtio-blk: the disks in command-line order, their serials, size and read-only flag.
    assert_eq!(get("vda-serial"), VDA_SERIAL, "{d}");
    assert_eq!(get("vdb-serial"), VDB_SERIAL, "{d}");
    assert_eq!(num("vda-size"), DISK_SECTORS, "{d}");
    assert_eq!(num("vda-ro"), 1, "{d}");
    assert_eq!(get("vda-mark"), vda_mark, "{d}");
    assert_eq!(get("vda-end"), vda_end, "{d}");
    assert_eq!(num("vdb-dd"), 0, "{d}");
    assert_eq!(num("vdb-sync"), 0, "{d}");
    let mut want = vdb_mark.as_bytes().to_vec();
    want.resize(SECTOR as usize, 0);
    assert!(
        vdb_written[..SECTOR as usize] == want[..],
        "vdb sector {VDB_WRITE_SECTOR} on the host after the guest's write and sync: {:?}\n{d}",
        String::from_utf8_lossy(&vdb_written[..64])
    );
    assert!(
        vdb_written[SECTOR as usize..]
            .iter()
            .all(|&b| b == VDB_FILL),
        "the sector after the guest's write changed\n{d}"
    );
    // The read-only image is as the test wrote it.
    assert_eq!(
        read_at(&vda, VDA_MARK_SECTOR * SECTOR, vda_mark.len()),
        vda_mark.as_bytes()
    );

    // virtio-rng.
    assert!(get("rng-current").contains("virtio"), "{d}");
    assert_eq!(num("rng-bytes"), 64, "{d}");

    // virtio-balloon: bound; the guest inflated the target; with deflate_on_oom off, inflated
    // pages leave MemTotal (1 GiB less the kernel's own reservations, less 64 MiB).
    assert!(num("balloon-bound") >= 1, "{d}");
    assert!(num("balloon-inflate") >= BALLOON_PAGES, "{d}");
    let mem_kib = num("memtotal");
    assert!(
        (800_000..=(1 << 20) - BALLOON_BYTES / 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB with a 64 MiB balloon in 1 GiB\n{d}"
    );

    // virtio-vsock.
    assert!(num("vsock-bound") >= 1, "{d}");
    match &vsock {
        Ok(got) => assert!(
            got.is_empty(),
            "CONNECT to a guest port nobody listens on was answered {:?}\n{d}",
            String::from_utf8_lossy(got)
        ),
        Err(e) => panic!("vsock host client: {e}\n{d}"),
    }

    // virtio-net.
    if let Some(out) = &ping_out {
        assert!(!get("net-dev").is_empty(), "{d}");
        assert_eq!(num("ping"), 0, "ping failed: {out}\n{d}");
        assert!(
            out.contains("3 packets transmitted, 3 packets received"),
            "{out}\n{d}"
        );
    }

    // The device facts: every device asked for, DRIVER_OK, requests served, interrupts
    // delivered, nothing refused.
    let report = r
        .report
        .as_ref()
        .unwrap_or_else(|| panic!("no --stats-json report: {d}"));
    let mut names: Vec<String> = report["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|dev| dev["device"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("virtio-"))
        .collect();
    names.sort();
    let mut expected = vec![
        "virtio-balloon",
        "virtio-blk0",
        "virtio-blk1",
        "virtio-rng",
        "virtio-vsock",
    ];
    if ns.is_some() {
        expected.push("virtio-net0");
    }
    expected.sort();
    assert_eq!(names, expected, "{report}");
    let fact = |dev: &str, k: &str| {
        r.device_fact(dev, k)
            .unwrap_or_else(|| panic!("no fact {k} for {dev}: {report}"))
    };
    for dev in &expected {
        assert_eq!(fact(dev, "driver_ok"), 1, "{dev}: {report}");
        assert!(fact(dev, "requests") >= 1, "{dev} served nothing: {report}");
        assert!(fact(dev, "interrupts") >= 1, "{dev}: {report}");
        assert_eq!(fact(dev, "needs_reset"), 0, "{dev}: {report}");
        assert_eq!(fact(dev, "bad_chains"), 0, "{dev}: {report}");
        assert_eq!(fact(dev, "errors"), 0, "{dev}: {report}");
    }
    assert!(fact("virtio-blk0", "reads") >= 2, "{report}");
    assert!(fact("virtio-blk1", "writes") >= 1, "{report}");
    assert!(fact("virtio-blk1", "flushes") >= 1, "{report}");
    assert!(fact("virtio-rng", "bytes_to_guest") >= 64, "{report}");
    assert_eq!(fact("virtio-balloon", "target_pages"), BALLOON_PAGES);
    assert_eq!(fact("virtio-balloon", "actual_pages"), BALLOON_PAGES);
    assert!(fact("virtio-balloon", "pages_inflated") >= BALLOON_PAGES);
    assert_eq!(fact("virtio-balloon", "bad_pfns"), 0);
    assert_eq!(fact("virtio-vsock", "conns_host"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "dropped"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "bad_packets"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "host_bad_connect"), 0, "{report}");
    if ns.is_some() {
        // Three echo requests and three replies at least (plus ARP, IPv6 chatter).
        assert!(fact("virtio-net0", "tx_frames") >= 3, "{report}");
        assert!(fact("virtio-net0", "rx_frames") >= 3, "{report}");
        assert_eq!(fact("virtio-net0", "rx_dropped"), 0, "{report}");
        assert_eq!(fact("virtio-net0", "tx_dropped"), 0, "{report}");
    }
    // The VMM removes its vsock socket when it ends.
    assert!(!sock.exists());
    drop(ns);
}
