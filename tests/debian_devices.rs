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
//!   facts show the pages inflated, and the control API the guest's `actual` at the target.
//! - virtio-net: in a network namespace the test creates (with a tap holding the host address),
//!   `ip link set … up; ip addr add …; ping -c 3 HOST_IP` succeeds.
//! - virtio-vsock (`cid=3`): the transport driver is bound, and a host client's `CONNECT 1234` to
//!   the VMM's socket reaches the guest kernel, which answers with RST (nothing listens there): the
//!   host stream closes without `OK`, and the device served that packet (data both ways:
//!   `debian_vsock.rs`).
//!
//! Then `poweroff -f`: exitless exits 0 and its `--stats-json` device facts show DRIVER_OK, no
//! reset and requests served for every device.
//!
//! Needs /dev/kvm where guest userspace runs, root (the network namespace) and the Debian guest;
//! on a PVM host `tools/test.sh` runs it inside the emulated SVM host (`tools/svm-host.sh`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::debian::{self, marker, read_at, results, write_at, Vm, STEP_WAIT};
use common::netns::Netns;
use common::*;

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

#[test]
fn debian_shell_drives_every_virtio_device() {
    const TEST: &str = "debian_shell_drives_every_virtio_device";
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
    let ns = Netns::with_tap("shell", TAP, HOST_IP).unwrap_or_else(|e| panic!("{e}"));

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

    let mut args = debian::args(2, "1G");
    args.extend(["--rng", "--balloon", "size=64M"].map(String::from));
    args.push("--disk".into());
    args.push(format!(
        "path={},readonly=on,id={VDA_SERIAL}",
        vda.display()
    ));
    args.push("--disk".into());
    args.push(format!("path={},id={VDB_SERIAL}", vdb.display()));
    let api = dir.path("api.sock");
    args.push("--api-socket".into());
    args.push(api.display().to_string());
    args.push("--vsock".into());
    args.push(format!("cid=3,socket={}", sock.display()));
    args.push("--net".into());
    args.push(format!("tap={TAP}"));

    let started = Instant::now();
    let mut vm = Vm::boot_shell(Some(&ns.0), &args, &report);
    eprintln!(
        "{TEST}: shell up after {:.1} s",
        started.elapsed().as_secs_f64()
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
    let first = vm.step(
        "r balloon-first $(grep balloon_inflate /proc/vmstat)",
        STEP_WAIT,
    );
    eprintln!("{first}");
    vm.step(
        &format!(
            "i=0; while [ \"$(sed -n 's/^balloon_inflate //p' /proc/vmstat)\" -lt \
             {BALLOON_PAGES} ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; \
             r balloon-inflate $(sed -n 's/^balloon_inflate //p' /proc/vmstat); \
             r memtotal $(sed -n 's/^MemTotal: *//p' /proc/meminfo)"
        ),
        STEP_WAIT,
    );

    // The driver's `actual` at the target, live through the control API (Linux resets its
    // devices at power-off, which clears it).
    let live = exitless_cmd(&["ctl", "--socket", api.to_str().unwrap(), "stats"]);
    assert_eq!(live.status, Some(0), "{}", live.describe());
    let live: serde_json::Value = serde_json::from_str(&live.stdout).expect("ctl stats JSON");
    assert_eq!(
        live["devices"]["virtio-balloon"]["actual_pages"].as_u64(),
        Some(BALLOON_PAGES),
        "{live:#}"
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
    let ping_out = vm.step(
        &format!(
            "dev=$(ls /sys/class/net | grep -v '^lo$' | head -n 1); r net-dev $dev; \
                 ip link set $dev up; ip addr add {GUEST_IP}/24 dev $dev; \
                 ping -c 3 -W 10 {HOST_IP}; r ping $?"
        ),
        STEP_WAIT,
    );

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
    assert!(!get("net-dev").is_empty(), "{d}");
    assert_eq!(num("ping"), 0, "ping failed: {ping_out}\n{d}");
    assert!(
        ping_out.contains("3 packets transmitted, 3 packets received"),
        "{ping_out}\n{d}"
    );

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
        "virtio-net0",
        "virtio-rng",
        "virtio-vsock",
    ];
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
    assert!(fact("virtio-balloon", "pages_inflated") >= BALLOON_PAGES);
    assert_eq!(fact("virtio-balloon", "bad_pfns"), 0);
    assert_eq!(fact("virtio-vsock", "conns_host"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "dropped"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "bad_packets"), 0, "{report}");
    assert_eq!(fact("virtio-vsock", "host_bad_connect"), 0, "{report}");
    // Three echo requests and three replies at least (plus ARP, IPv6 chatter).
    assert!(fact("virtio-net0", "tx_frames") >= 3, "{report}");
    assert!(fact("virtio-net0", "rx_frames") >= 3, "{report}");
    assert_eq!(fact("virtio-net0", "rx_dropped"), 0, "{report}");
    assert_eq!(fact("virtio-net0", "tx_dropped"), 0, "{report}");
    // The VMM removes its vsock socket when it ends.
    assert!(!sock.exists());
    drop(ns);
}
