//! Seccomp filters (`--seccomp`, see `src/seccomp/mod.rs`): a forbidden system call made by a
//! thread of each kind is caught, named with its thread kind on stderr, and ends exitless with
//! status 159 (`on`, the default); `log` and `off` let the VM run to its end. The hidden
//! `--seccomp-selftest KIND` makes a thread of that kind call `getpgid` (no list allows it) once
//! its filter is on. Every other test runs with the filters on, since `on` is the default.
//! Skipped (with the reason printed) where /dev/kvm cannot be opened.

mod common;

use common::{exitless_cmd, kvm_available, Run, TempDir};

fn selftest(kind: &str, mode: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "--timeout",
        "60",
        "--seccomp",
        mode,
        "--seccomp-selftest",
        kind,
    ];
    args.extend_from_slice(extra);
    exitless_cmd(&args)
}

fn assert_caught(kind: &str, shown: &str, extra: &[&str]) {
    let r = selftest(kind, "on", extra);
    assert_eq!(r.status, Some(159), "{kind}: {}", r.stderr);
    let want = format!(
        "exitless: seccomp: the {shown} thread made a forbidden system call: getpgid (121) with 0x0,"
    );
    assert!(
        r.stderr.contains(&want),
        "{kind}: want {want:?} in {}",
        r.stderr
    );
}

#[test]
fn a_forbidden_call_is_caught_in_every_thread_kind() {
    if !kvm_available("a_forbidden_call_is_caught_in_every_thread_kind") {
        return;
    }
    let dir = TempDir::new("seccomp");
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    assert_caught("main", "main", &[]);
    assert_caught("vcpu", "vcpu", &[]);
    assert_caught("console", "console-in", &[]);
    assert_caught("console-out", "console-out", &[]);
    assert_caught("api", "api", &["--api-socket", sock]);
    assert_caught(
        "worker",
        "virtio-rng worker",
        &["--guest", "virtio-rng", "--rng"],
    );
}

#[test]
fn log_and_off_let_the_vm_run_to_its_end() {
    if !kvm_available("log_and_off_let_the_vm_run_to_its_end") {
        return;
    }
    for mode in ["log", "off"] {
        for kind in ["vcpu", "main"] {
            let r = selftest(kind, mode, &[]);
            assert_eq!(r.status, Some(0), "{mode} {kind}: {}", r.stderr);
            assert!(
                !r.stderr.contains("forbidden"),
                "{mode} {kind}: {}",
                r.stderr
            );
        }
    }
    let r = selftest("worker", "log", &["--guest", "virtio-rng", "--rng"]);
    assert_eq!(r.status, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("kit: PASS virtio-rng"), "{}", r.stdout);
}
