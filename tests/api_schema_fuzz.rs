//! The control API fuzzed against its OpenAPI document: runs `tools/api-fuzz.sh` (schemathesis,
//! every check, a fixed seed, a bounded number of examples per operation) on a live VM (the kit's
//! clock guest) and asserts that it passed: every answer as documented, no 5xx, bad data
//! refused, and the VM alive, answering and ticking to the end, then stopped by `quit`.
//! Skipped (with the reason) where /dev/kvm cannot be opened, where schemathesis cannot be
//! installed (no network: `tools/test.sh` prepares its venv first and, in CI, fails loudly when
//! it cannot) or socat is missing.

mod common;

use std::process::Command;
use std::time::Instant;

use common::{exitless, needs, skip, Need};

const TEST: &str = "the_api_answers_schemathesis_as_documented_and_the_vm_survives";

/// Runs `tools/api-fuzz.sh ARGS` from the repository; its status and output.
fn api_fuzz(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("timeout")
        .arg("600")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/api-fuzz.sh"))
        .args(args)
        .env("EXITLESS_BIN", exitless())
        .output()
        .expect("run tools/api-fuzz.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Why the fuzzer cannot run here, if it cannot (KVM checked by the caller).
fn fuzzer_missing() -> Option<String> {
    if Command::new("socat").arg("-V").output().is_err() {
        return Some("socat is missing (apt-get install socat)".into());
    }
    match api_fuzz(&["--install-only"]) {
        (Some(0), _) => None,
        (Some(3), out) => Some(format!(
            "schemathesis cannot be installed (no network?): {}",
            out.lines().last().unwrap_or_default()
        )),
        (st, out) => panic!("tools/api-fuzz.sh --install-only: status {st:?}\n{out}"),
    }
}

#[test]
fn the_api_answers_schemathesis_as_documented_and_the_vm_survives() {
    if !needs(TEST, &[Need::Kvm]) {
        return;
    }
    if let Some(why) = fuzzer_missing() {
        skip(TEST, &why);
        return;
    }
    let t = Instant::now();
    let (status, out) = api_fuzz(&["--examples", "300"]);
    eprintln!("tools/api-fuzz.sh took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(status, Some(0), "tools/api-fuzz.sh failed:\n{out}");
    for phase in ["random", "snapshot", "shutdown-negative"] {
        assert!(
            out.contains(&format!("api-fuzz: phase {phase}\n")),
            "phase {phase} did not run:\n{out}"
        );
    }
    // Each phase generated cases and every one passed.
    let summaries: Vec<&str> = out.lines().filter(|l| l.contains(" generated")).collect();
    assert_eq!(summaries.len(), 3, "{out}");
    for s in summaries {
        assert!(s.contains(" passed") && !s.contains("fail"), "{s}\n{out}");
    }
    assert!(out.contains("api-fuzz: passed"), "{out}");
}
