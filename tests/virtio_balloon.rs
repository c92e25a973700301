//! virtio-balloon under KVM with the kit's own driver: inflated and reported pages go back to the
//! host (the VMM's RSS, which it records itself before the first inflate and after each madvise,
//! falls by the inflated amount), statistics reach the device facts, and bad `--balloon` options
//! are clear start-up errors. Skipped (with the reason printed) where /dev/kvm cannot be opened.

mod common;

use common::{kvm_available, run};

const MIB: u64 = 1 << 20;

#[test]
fn kit_virtio_balloon_gives_pages_back_to_the_host() {
    if !kvm_available("kit_virtio_balloon_gives_pages_back_to_the_host") {
        return;
    }
    let r = run(&[
        "--guest",
        "virtio-balloon",
        "--timeout",
        "120",
        "--mem",
        "256M",
        "--balloon",
        "size=48M,stats=1",
    ]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert!(
        r.stdout.contains("kit: PASS virtio-balloon"),
        "{}",
        r.describe()
    );
    let f = |k: &str| {
        r.device_fact("virtio-balloon", k)
            .unwrap_or_else(|| panic!("no fact {k}: {}", r.describe()))
    };
    let target = 48 * MIB / 4096;
    assert_eq!(f("driver_ok"), 1);
    assert_eq!(f("target_pages"), target);
    assert_eq!(f("pages_inflated"), target);
    assert_eq!(f("pages_deflated"), 256);
    assert_eq!(f("actual_pages"), target - 256);
    assert_eq!(f("bytes_reported"), 4 * MIB);
    assert_eq!(f("bad_pfns"), 0);
    assert_eq!(f("errors"), 0);
    assert_eq!(f("bad_chains"), 0);
    // 12 inflate requests of contiguous PFNs and a report of two blocks: one madvise each.
    assert_eq!(f("madvise_calls"), 14);
    // The RSS evidence: the guest wrote 64 MiB, then 48 MiB of it went back to the host.
    let (before, after) = (f("rss_before_inflate_kib"), f("rss_after_inflate_kib"));
    let inflated_kib = target * 4;
    assert!(
        before >= after + inflated_kib * 9 / 10,
        "RSS {before} KiB -> {after} KiB after inflating {inflated_kib} KiB"
    );
    assert!(f("rss_after_report_kib") + 3 * 1024 <= after);
    // The statistics the driver sent after the device asked for them.
    assert_eq!(f("stats_updates"), 2);
    assert!(f("stats_requests") >= 1);
    let total = f("stat_total_memory");
    assert!(total > 200 * MIB, "{total}");
    assert_eq!(f("stat_free_memory"), total - 64 * MIB + 48 * MIB);
    assert_eq!(f("stat_disk_caches"), 4096);
    // Queue notifications never left the kernel (ioeventfd).
    assert_eq!(f("notifications"), 16);
}

#[test]
fn a_bare_balloon_flag_still_works() {
    if !kvm_available("a_bare_balloon_flag_still_works") {
        return;
    }
    // `--balloon` with no value, followed by another option.
    let r = run(&["--guest", "poweroff", "--balloon", "--timeout", "60"]);
    assert_eq!(r.status, Some(0), "{}", r.describe());
    assert_eq!(r.device_fact("virtio-balloon", "target_pages"), Some(0));
}

#[test]
fn bad_balloon_options_are_clear_start_up_errors() {
    if !kvm_available("bad_balloon_options_are_clear_start_up_errors") {
        return;
    }
    for (opt, want) in [
        ("size=48M,bogus=1", "unknown --balloon option \"bogus\""),
        ("size=4097B", "not a multiple of 4 KiB"),
        ("stats=often", "balloon stats interval \"often\""),
        ("reporting=maybe", "\"maybe\" is not on or off"),
        ("size=1G", "larger than guest memory"),
    ] {
        let r = run(&[
            "--guest",
            "poweroff",
            "--mem",
            "64M",
            "--balloon",
            opt,
            "--timeout",
            "60",
        ]);
        assert_ne!(r.status, Some(0), "{opt}: {}", r.describe());
        assert!(
            r.stderr.contains(want) && r.stderr.contains("--balloon"),
            "{opt}: wanted {want:?}: {}",
            r.describe()
        );
    }
}
