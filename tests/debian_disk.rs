//! virtio-blk under a real file system, from the stock Debian guest's userspace: the guest makes
//! ext4 on a blank disk, writes a tree of files (one of 8 MiB of random data, whose SHA-256 it
//! prints), syncs, unmounts and powers off; the host then checks the image with `e2fsck -fn`
//! (clean), and reads the files back with `debugfs` (same text, same SHA-256). A second disk given
//! `readonly=on` carries an ext4 the host made: the guest mounts it (read-only, as the device says),
//! reads the host's file, and its writes to the device fail; the image is unchanged afterwards.
//!
//! Needs /dev/kvm where guest userspace runs, the Debian guest (initrd-tools.img carries
//! mkfs.ext4), and e2fsprogs on the host; on a PVM host `tools/test.sh` runs it inside the emulated
//! SVM host.

mod common;

use std::path::Path;
use std::process::Command;

use common::debian::{self, Vm, STEP_WAIT};
use common::*;

const MIB: u64 = 1 << 20;

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    format!("{:x}", sha2::Sha256::digest(&data))
}

/// Runs a host tool; returns (success, stdout + stderr).
fn tool(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn lacks_e2fsprogs() -> Option<String> {
    ["mkfs.ext4", "e2fsck", "debugfs"]
        .iter()
        .find(|t| Command::new(t).arg("-V").output().is_err())
        .map(|t| format!("{t} is not installed on the host (e2fsprogs)"))
}

#[test]
fn debian_guest_makes_ext4_on_virtio_blk_and_the_host_reads_its_files() {
    const TEST: &str = "debian_guest_makes_ext4_on_virtio_blk_and_the_host_reads_its_files";
    if !needs(TEST, &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest]) {
        return;
    }
    if let Some(why) = lacks_e2fsprogs() {
        return skip(TEST, &why);
    }
    let dir = TempDir::new("debian-disk");
    // vda: blank, writable. vdb: an ext4 the host made, holding one file, read-only.
    let rw = dir.path("rw.img");
    std::fs::File::create(&rw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let ro = dir.path("ro.img");
    let seed = dir.path("seed");
    std::fs::create_dir_all(&seed).unwrap();
    let host_text = debian::marker("host-file");
    std::fs::write(seed.join("from-host.txt"), &host_text).unwrap();
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let (ok, out) = tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            &seed.to_string_lossy(),
            &ro.to_string_lossy(),
        ],
    );
    assert!(ok, "mkfs.ext4 -d on the host: {out}");
    let ro_before = sha256_file(&ro);

    let mut args = debian::args(2, "512M");
    args.push("--disk".into());
    args.push(format!("path={},id=scratch", rw.display()));
    args.push("--disk".into());
    args.push(format!("path={},readonly=on,id=seeded", ro.display()));
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));

    // The guest's own file system on vda.
    let guest_text = debian::marker("guest-file");
    assert_eq!(
        vm.number("mkfs.ext4 -q -F /dev/vda; r mkfs $?", "mkfs"),
        0,
        "mkfs.ext4 in the guest"
    );
    assert_eq!(
        vm.number(
            "mkdir -p /mnt/rw && mount -t ext4 /dev/vda /mnt/rw; r mount $?",
            "mount"
        ),
        0
    );
    vm.step(
        &format!(
            "mkdir -p /mnt/rw/dir/sub && echo {guest_text} > /mnt/rw/dir/sub/hello.txt && \
             head -c {} /dev/urandom > /mnt/rw/random.bin && \
             for i in $(seq 1 50); do echo file-$i > /mnt/rw/dir/f$i; done; r write $?",
            8 * MIB
        ),
        STEP_WAIT,
    );
    let guest_sha = vm.value(
        "r sha $(sha256sum /mnt/rw/random.bin | cut -d' ' -f1)",
        "sha",
    );
    assert_eq!(vm.number("sync; umount /mnt/rw; r umount $?", "umount"), 0);

    // The read-only disk: the host's file is there; writes to the device fail.
    assert_eq!(vm.number("r ro $(cat /sys/block/vdb/ro)", "ro"), 1);
    assert_eq!(
        vm.number(
            "mkdir -p /mnt/ro && mount -t ext4 -o ro /dev/vdb /mnt/ro; r mount-ro $?",
            "mount-ro"
        ),
        0
    );
    assert_eq!(
        vm.value("r host-text $(cat /mnt/ro/from-host.txt)", "host-text"),
        host_text
    );
    assert_ne!(
        vm.number(
            "dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync 2>/dev/null; r dd-ro $?",
            "dd-ro"
        ),
        0,
        "a write to the read-only disk succeeded"
    );
    assert_ne!(
        vm.number(
            "mount -o remount,rw /mnt/ro 2>/dev/null; r remount $?",
            "remount"
        ),
        0,
        "the read-only disk was remounted read-write"
    );
    vm.send("umount /mnt/ro; poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());

    // The host's view of what the guest wrote.
    let (ok, out) = tool("e2fsck", &["-fn", &rw.to_string_lossy()]);
    assert!(ok, "e2fsck -fn on the guest's file system: {out}");
    let (ok, out) = tool(
        "debugfs",
        &["-R", "cat /dir/sub/hello.txt", &rw.to_string_lossy()],
    );
    assert!(ok, "{out}");
    assert!(out.contains(&guest_text), "hello.txt holds {out:?}");
    let (ok, out) = tool("debugfs", &["-R", "cat /dir/f37", &rw.to_string_lossy()]);
    assert!(ok && out.contains("file-37"), "{out}");
    let dumped = dir.path("random.bin");
    let (ok, out) = tool(
        "debugfs",
        &[
            "-R",
            &format!("dump /random.bin {}", dumped.display()),
            &rw.to_string_lossy(),
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(std::fs::metadata(&dumped).unwrap().len(), 8 * MIB);
    assert_eq!(sha256_file(&dumped), guest_sha);
    // Not one byte of the read-only image changed.
    assert_eq!(sha256_file(&ro), ro_before);

    let report = r.report.as_ref().expect("report");
    let fact = |dev: &str, k: &str| r.device_fact(dev, k).unwrap_or(0);
    assert!(fact("virtio-blk0", "writes") > 0, "{report}");
    assert!(fact("virtio-blk0", "flushes") > 0, "{report}");
    assert!(
        fact("virtio-blk0", "bytes_from_guest") >= 8 * MIB,
        "{report}"
    );
    // The guest's block layer refuses writes to a device that says it is read-only before they
    // reach it: nothing came from the guest on vdb.
    assert_eq!(fact("virtio-blk1", "bytes_from_guest"), 0, "{report}");
    assert!(fact("virtio-blk1", "reads") > 0, "{report}");
}
