//! The hostile-guest suite: the kit's `hostile` guest attacks every device (random port I/O and
//! MMIO over all BARs and configuration space, MSI-X abuse, malformed and cyclic descriptor
//! chains, DMA at MMIO and outside RAM, resets mid-flight, an interrupt storm, a console flood)
//! with a fixed seed, then checks that virtio-rng and a read-only virtio-blk disk still work.
//! The VMM must stay up, end with the guest's power-off, keep the read-only image intact, count
//! what happened in its report and keep stderr short (rate-limited warnings).
//!
//! The same seeds run again behind the emulated VT-d (`--iommu`, samecore and sidecore), where the
//! guest also attacks the IOMMU (garbage registers, tables and invalidation queue) and then checks
//! that a faulting DMA is recorded and that a device works through a pass-through context.
//!
//! Replay a seed by hand: `exitless run --guest hostile --cmdline seed=N [rounds=N]` with the
//! devices of `devices()` below (and `--iommu mode=M`). `EXITLESS_HOSTILE_SEEDS=1,2,3` overrides
//! the seeds.

mod common;

use common::netns::Netns;
use std::path::Path;
use std::process::{Command, Stdio};

/// Seeds that ran here (each covers every phase); CI runs the same ones.
const SEEDS: &[u64] = &[1, 7, 42];
const TAP: &str = "exitless-hos0";

fn seeds() -> Vec<u64> {
    match std::env::var("EXITLESS_HOSTILE_SEEDS") {
        Ok(s) => s
            .split(',')
            .map(|x| x.trim().parse().expect("EXITLESS_HOSTILE_SEEDS: numbers"))
            .collect(),
        Err(_) => SEEDS.to_vec(),
    }
}

fn devices(dir: &Path, net: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--disk".into(),
        format!("path={}", dir.join("rw.img").display()),
        "--disk".into(),
        format!("path={},readonly=on", dir.join("ro.img").display()),
        "--rng".into(),
        "--balloon".into(),
        "--vsock".into(),
        format!("cid=3,socket={}", dir.join("vsock").display()),
    ];
    if net {
        a.push("--net".into());
        a.push(format!("tap={TAP}"));
    }
    a
}

/// The guest's `kit: hostile counts k=v ...` line.
fn guest_count(stdout: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("kit: hostile counts "))
        .unwrap_or_else(|| panic!("no counts line in {stdout}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn the_hostile_guest_does_not_harm_the_vmm_and_other_devices_keep_working() {
    suite(
        "the_hostile_guest_does_not_harm_the_vmm_and_other_devices_keep_working",
        None,
    );
}

#[test]
fn the_hostile_guest_behind_the_iommu_does_not_harm_the_vmm() {
    for mode in ["samecore", "sidecore"] {
        suite(
            "the_hostile_guest_behind_the_iommu_does_not_harm_the_vmm",
            Some(mode),
        );
    }
}

/// Every seed with every device; `iommu`: the emulated VT-d's mode, and its attack.
fn suite(test: &str, iommu: Option<&str>) {
    if !common::kvm_available(test) {
        return;
    }
    let tag = if iommu.is_some() {
        "hostile-iommu"
    } else {
        "hostile"
    };
    let ns = match Netns::with_tap(tag, TAP, "192.168.131.1") {
        Ok(ns) => Some(ns),
        Err(why) => {
            common::skip(&format!("{test} (virtio-net part)"), &why);
            None
        }
    };
    let dir = common::TempDir::new(tag);
    let ro_pattern = vec![0x5au8; 1 << 20];
    std::fs::write(dir.path("ro.img"), &ro_pattern).unwrap();
    let mut table = Vec::new();
    for seed in seeds() {
        std::fs::write(dir.path("rw.img"), vec![7u8; 1 << 20]).unwrap();
        let json = dir.path(&format!("report-{seed}.json"));
        let mut cmd = match &ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0, common::exitless()]);
                c
            }
            None => Command::new(common::exitless()),
        };
        let out = cmd
            .args([
                "run",
                "--guest",
                "hostile",
                "--mem",
                "64M",
                "--timeout",
                "600",
            ])
            .args(["--cmdline", &format!("seed={seed}")])
            .args(devices(&dir.0, ns.is_some()))
            .args(
                iommu
                    .map(|m| ["--iommu".to_string(), format!("mode={m}")])
                    .into_iter()
                    .flatten(),
            )
            .arg("--stats-json")
            .arg(&json)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let guest_lines: String = stdout
            .lines()
            .filter(|l| l.starts_with("kit:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let describe =
            format!("seed {seed} iommu {iommu:?}\n--- guest:\n{guest_lines}--- stderr:\n{stderr}");
        assert_eq!(out.status.code(), Some(0), "{describe}");
        assert!(
            stdout.contains(&format!("kit: hostile seed={seed} ")),
            "{describe}"
        );
        assert!(stdout.contains("kit: PASS hostile"), "{describe}");
        assert_eq!(
            std::fs::read(dir.path("ro.img")).unwrap(),
            ro_pattern,
            "the read-only image changed ({describe})"
        );
        // Guest-triggered warnings are rate-limited: the attack leaves a short stderr.
        assert!(stderr.lines().count() < 150, "{describe}");

        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(report["end"], "guest powered off", "{describe}");
        let devs = report["devices"].as_array().expect("devices in the report");
        let fact = |dev: &str, f: &str| -> u64 {
            devs.iter()
                .find(|d| d["device"] == dev)
                .and_then(|d| d["facts"][f].as_u64())
                .unwrap_or(0)
        };
        let sum = |f: &str| -> u64 {
            devs.iter()
                .filter_map(|d| d["facts"][f].as_u64())
                .sum::<u64>()
        };
        let mut virtio = vec![
            "virtio-blk0",
            "virtio-blk1",
            "virtio-rng",
            "virtio-balloon",
            "virtio-vsock",
        ];
        if ns.is_some() {
            virtio.push("virtio-net0");
        }
        for d in &virtio {
            assert!(
                devs.iter().any(|x| x["device"] == *d),
                "{d} missing from the report ({describe})"
            );
            assert!(fact(d, "driver_ok") >= 1, "{d} never started ({describe})");
        }
        assert_eq!(sum("worker_panics"), 0, "{describe}");
        // The page sweep went past the pages counted one by one: the rest are `other`.
        let other_pages = report["mmio_pages"]["other"].as_u64().unwrap_or(0);
        assert!(other_pages > 0, "no `other` MMIO pages ({describe})");
        let (bad, resets) = (sum("bad_chains"), sum("needs_reset"));
        assert!(
            bad > 0 && resets > 0,
            "bad_chains {bad}, needs_reset {resets}"
        );
        // Every storm request the guest saw complete was counted by the device; the check's
        // request came after.
        let storm = guest_count(&stdout, "storm_requests");
        assert!(storm > 0, "{describe}");
        assert!(fact("virtio-rng", "requests") > storm, "{describe}");
        if let Some(mode) = iommu {
            table.push(iommu_row(seed, mode, &stdout, &report, &describe).to_vec());
            continue;
        }
        let row = [
            seed,
            guest_count(&stdout, "pio"),
            guest_count(&stdout, "mmio"),
            guest_count(&stdout, "config"),
            guest_count(&stdout, "chains"),
            guest_count(&stdout, "resets"),
            storm,
            guest_count(&stdout, "interrupts"),
            bad,
            resets,
            sum("errors"),
            report["total_exits"].as_u64().unwrap_or(0),
        ];
        table.push(row.to_vec());
    }
    if let Some(mode) = iommu {
        eprintln!("hostile suite, IOMMU {mode}: seed iommu_regs iommu_tables iommu_descs iommu_dma | VMM: register_writes faults faults_dropped qi_descriptors qi_waits qi_errors fault_events exits");
        for r in &table {
            eprintln!("hostile suite, IOMMU {mode}: {r:?}");
        }
        return;
    }
    eprintln!(
        "hostile suite: seed pio mmio config chains resets storm_requests interrupts | VMM: bad_chains needs_reset errors exits"
    );
    for r in &table {
        eprintln!("hostile suite: {r:?}");
    }
}

/// The IOMMU's part of a run: the guest saw the fault recorded and the rng work through a
/// pass-through context; the model counted faults and queue errors and ended with translation
/// off. Returns the row for the table.
fn iommu_row(
    seed: u64,
    mode: &str,
    stdout: &str,
    report: &serde_json::Value,
    describe: &str,
) -> [u64; 13] {
    assert!(
        stdout.contains("kit: hostile: the IOMMU records the fault"),
        "{describe}"
    );
    assert!(
        stdout.contains("kit: hostile: virtio-rng works through the IOMMU after its attack"),
        "{describe}"
    );
    assert!(
        stdout.contains("kit: hostile: queued invalidation works after its attack"),
        "{describe}"
    );
    let devs = report["devices"].as_array().expect("devices in the report");
    let facts = devs
        .iter()
        .find(|d| d["facts"]["qi_errors"].is_u64())
        .map(|d| &d["facts"])
        .unwrap_or_else(|| panic!("no IOMMU in the report ({describe})"));
    let f = |k: &str| facts[k].as_u64().unwrap_or(0);
    for k in ["faults", "qi_errors", "qi_descriptors", "register_writes"] {
        assert!(f(k) > 0, "IOMMU {mode}: {k} = 0 ({describe})");
    }
    assert_eq!(f("translation_enabled"), 0, "{describe}");
    // Every write the model applies is one the guest made: sidecore's poller once applied
    // writes with reserved bits again at every poll (300 000 "writes" for 600, never sleeping).
    let guest_writes = guest_count(stdout, "iommu_regs");
    assert!(
        f("register_writes") < 10 * guest_writes + 1000,
        "IOMMU {mode}: {} register writes applied for {guest_writes} ({describe})",
        f("register_writes")
    );
    [
        seed,
        guest_count(stdout, "iommu_regs"),
        guest_count(stdout, "iommu_tables"),
        guest_count(stdout, "iommu_descs"),
        guest_count(stdout, "iommu_dma"),
        f("register_writes"),
        f("faults"),
        f("faults_dropped"),
        f("qi_descriptors"),
        f("qi_waits"),
        f("qi_errors"),
        f("fault_events"),
        report["total_exits"].as_u64().unwrap_or(0),
    ]
}
