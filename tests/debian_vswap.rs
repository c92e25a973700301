//! The swap mapper (`--disk ...,swap-mapper=on`) under a stock Linux guest: whatever the guest reads
//! and writes, it sees exactly the bytes it would without the mapper, and the image ends up
//! holding exactly what the guest wrote.
//!
//! The host fills a 32 MiB image with pseudo-random bytes. The guest (the Debian guest, busybox)
//! reads the whole device through its page cache (the pages become mappings of the image inside
//! guest RAM, which KVM must follow: the test checks the SHA-256 the guest computes), reads part
//! again with `O_DIRECT` into a process's buffer, then overwrites 4 MiB through the page cache
//! (the guest's stores break the mapped pages by copy-on-write) and 1 MiB with `O_DIRECT` from
//! another buffer (the device breaks the mapped pages first), drops its caches and reads it all
//! back. Every checksum is compared with the host's own computation of what the disk must hold,
//! and the image with the guest's last checksum after the VM ended. The run's facts must show
//! pages mapped.
//!
//! Needs /dev/kvm where guest userspace runs and the Debian guest; on a PVM host `tools/test.sh`
//! runs it inside the emulated SVM host.

mod common;

use common::debian::{self, Vm, STEP_WAIT};
use common::*;

const MIB: usize = 1 << 20;

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Deterministic bytes (xorshift), different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn debian_guest_sees_the_right_bytes_through_the_swap_mapper() {
    const TEST: &str = "debian_guest_sees_the_right_bytes_through_the_swap_mapper";
    if !needs(TEST, &[Need::Kvm, Need::GuestUserspace, Need::DebianGuest]) {
        return;
    }
    let dir = TempDir::new("debian-vswap");
    let img = dir.path("disk.img");
    let disk = noise(32 * MIB, 7);
    std::fs::write(&img, &disk).unwrap();
    let before_all = sha256(&disk);
    let before_head = sha256(&disk[..8 * MIB]);

    let mut args = debian::args(1, "256M");
    args.push("--disk".into());
    args.push(format!("path={},swap-mapper=on", img.display()));
    let mut vm = Vm::boot_shell(None, &args, &dir.path("report.json"));
    let sum = |vm: &mut Vm, cmd: &str| {
        vm.value(
            &format!("r sum $({cmd} | sha256sum | cut -d' ' -f1)"),
            "sum",
        )
    };
    assert_eq!(
        vm.number("r bs $(cat /sys/block/vda/queue/logical_block_size)", "bs"),
        4096
    );
    // Whole device through the page cache, then the head again with O_DIRECT.
    assert_eq!(sum(&mut vm, "dd if=/dev/vda bs=1M 2>/dev/null"), before_all);
    assert_eq!(
        sum(
            &mut vm,
            "dd if=/dev/vda bs=64k count=128 iflag=direct 2>/dev/null"
        ),
        before_head
    );
    // Overwrite through the page cache (pages that map the image: the guest's stores COW them),
    // and with O_DIRECT from a process buffer (pages still mapped: the device breaks them).
    vm.step(
        "dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null; \
         dd if=/dev/urandom of=/tmp/d bs=1M count=1 2>/dev/null",
        STEP_WAIT,
    );
    let b_sum = vm.value("r sum $(sha256sum /tmp/b | cut -d' ' -f1)", "sum");
    let d_sum = vm.value("r sum $(sha256sum /tmp/d | cut -d' ' -f1)", "sum");
    assert_eq!(
        vm.number(
            "dd if=/tmp/b of=/dev/vda bs=1M seek=2 conv=notrunc,fsync 2>/dev/null; r w $?",
            "w"
        ),
        0
    );
    assert_eq!(
        vm.number(
            "dd if=/tmp/d of=/dev/vda bs=1M seek=20 oflag=direct conv=notrunc,fsync 2>/dev/null; r w $?",
            "w"
        ),
        0
    );
    // Before the caches go: the page cache holds the new bytes, the rest is untouched.
    assert_eq!(
        sum(&mut vm, "dd if=/dev/vda bs=1M skip=2 count=4 2>/dev/null"),
        b_sum
    );
    assert_eq!(
        sum(&mut vm, "dd if=/dev/vda bs=1M skip=20 count=1 2>/dev/null"),
        d_sum
    );
    assert_eq!(
        sum(&mut vm, "dd if=/dev/vda bs=1M count=2 2>/dev/null"),
        sha256(&disk[..2 * MIB])
    );
    // After: everything read again from the device.
    vm.step("sync; echo 3 > /proc/sys/vm/drop_caches", STEP_WAIT);
    let guest_all = sum(&mut vm, "dd if=/dev/vda bs=1M 2>/dev/null");
    assert_eq!(
        sum(
            &mut vm,
            "dd if=/dev/vda bs=1M skip=20 count=1 iflag=direct 2>/dev/null"
        ),
        d_sum
    );
    vm.send("poweroff -f");
    let r = vm.finish();
    assert_eq!(r.status, Some(0), "{}", r.describe());

    // The image holds the guest's writes and nothing else.
    let image = std::fs::read(&img).unwrap();
    assert_eq!(sha256(&image[2 * MIB..6 * MIB]), b_sum);
    assert_eq!(sha256(&image[20 * MIB..21 * MIB]), d_sum);
    let mut expect = disk;
    expect[2 * MIB..6 * MIB].copy_from_slice(&image[2 * MIB..6 * MIB]);
    expect[20 * MIB..21 * MIB].copy_from_slice(&image[20 * MIB..21 * MIB]);
    assert_eq!(
        sha256(&image),
        sha256(&expect),
        "bytes outside the writes changed"
    );
    assert_eq!(
        guest_all,
        sha256(&image),
        "the guest's last read differs from the image"
    );

    let report = r.report.as_ref().expect("report");
    let fact = |k: &str| r.device_fact("virtio-blk0", k).unwrap_or(0);
    assert!(fact("mapper_pages") >= (32 * MIB / 4096) as u64, "{report}");
    assert!(fact("mapper_breaks") > 0, "{report}");
}
