//! The rows of ELI's Table 3.1 as rates: exits/s (all, and by reason: exitless's own exits to
//! userspace, and KVM's in-kernel ones), interrupts injected/s, IRQ-window exits/s, halt
//! exits/s and time in guest, per vCPU and in all, between two samples of the counters.
//!
//! Owns the arithmetic only (pure functions over [`VcpuSample`]s), shared by `exitless top` (two
//! live samples of the control API's `stats`) and the end-of-run summary (zero and the final
//! counters). Where the numbers come from:
//! - all exits, interrupts injected, IRQ-window and halt exits: KVM's binary statistics
//!   (`kvm_stats`: `exits`, `irq_injections`, `irq_window_exits`, `halt_exits`), which count the
//!   exits KVM handles in the kernel as well as those it passes to exitless;
//! - exits by reason: exitless's own counters (exits to userspace), and KVM's in-kernel exits by
//!   reason where `kvm_trace` could count them (keys `kvm_exit.<reason>`), else the stats-fd's
//!   aggregate kinds (`io_exits`, `mmio_exits`, `irq_exits`, ...);
//! - time in guest: the time inside `KVM_RUN`, less the time KVM spent halted or halt-polling
//!   (`halt_wait_ns`, `halt_poll_success_ns`, `halt_poll_fail_ns`). It still includes KVM's own
//!   handling of in-kernel exits, which no counter separates.

use std::collections::BTreeMap;

use serde::Serialize;

/// One vCPU's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VcpuSample {
    /// exitless's exits to userspace by reason.
    pub user_exits: BTreeMap<String, u64>,
    /// KVM's statistics (and `kvm_exit.<reason>` counts where traced).
    pub kvm: BTreeMap<String, u64>,
    /// Time inside `KVM_RUN`.
    pub run_ns: u64,
}

/// The rates of one vCPU, or of all (sums of rates; `time_in_guest` their mean).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    pub exits_per_s: f64,
    pub userspace_exits_per_s: f64,
    pub interrupts_per_s: f64,
    pub irq_window_exits_per_s: f64,
    pub halt_exits_per_s: f64,
    /// 0–1.
    pub time_in_guest: f64,
    /// exitless's own exits by reason.
    pub userspace_by_reason: BTreeMap<String, f64>,
    /// KVM's in-kernel exits by reason (traced) or by aggregate kind (stats-fd).
    pub kernel_by_reason: BTreeMap<String, f64>,
}

/// The stats-fd counters that count one kind of exit each, for when nothing better is there.
const KVM_EXIT_KINDS: [&str; 8] = [
    "halt_exits",
    "io_exits",
    "mmio_exits",
    "irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "request_irq_exits",
    "signal_exits",
];
/// Prefix of the traced in-kernel exit reasons in a sample's `kvm` map.
pub const TRACED_PREFIX: &str = "kvm_exit.";
/// Where KVM's sleeping and polling time in `KVM_RUN` is counted.
const HALT_NS: [&str; 3] = ["halt_wait_ns", "halt_poll_success_ns", "halt_poll_fail_ns"];

fn delta(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, key: &str) -> u64 {
    b.get(key)
        .copied()
        .unwrap_or(0)
        .saturating_sub(a.get(key).copied().unwrap_or(0))
}

/// The rates of one vCPU between `prev` and `cur`, `dt_s` seconds apart (a counter that went
/// backwards counts as 0; `dt_s <= 0` gives all zeros).
pub fn vcpu_rates(prev: &VcpuSample, cur: &VcpuSample, dt_s: f64) -> Rates {
    if dt_s <= 0.0 || !dt_s.is_finite() {
        return Rates::default();
    }
    let per_s = |n: u64| n as f64 / dt_s;
    let userspace_by_reason: BTreeMap<String, f64> = cur
        .user_exits
        .keys()
        .map(|k| {
            (
                k.clone(),
                per_s(delta(&prev.user_exits, &cur.user_exits, k)),
            )
        })
        .collect();
    let traced = cur.kvm.keys().any(|k| k.starts_with(TRACED_PREFIX));
    let kernel_by_reason = cur
        .kvm
        .keys()
        .filter(|k| {
            if traced {
                k.starts_with(TRACED_PREFIX)
            } else {
                KVM_EXIT_KINDS.contains(&k.as_str())
            }
        })
        .map(|k| {
            let name = k.strip_prefix(TRACED_PREFIX).unwrap_or(k);
            (name.to_string(), per_s(delta(&prev.kvm, &cur.kvm, k)))
        })
        .collect();
    let halted: u64 = HALT_NS.iter().map(|k| delta(&prev.kvm, &cur.kvm, k)).sum();
    let in_guest = cur
        .run_ns
        .saturating_sub(prev.run_ns)
        .saturating_sub(halted);
    let user_total: u64 = cur
        .user_exits
        .keys()
        .map(|k| delta(&prev.user_exits, &cur.user_exits, k))
        .sum();
    Rates {
        exits_per_s: per_s(delta(&prev.kvm, &cur.kvm, "exits")),
        userspace_exits_per_s: per_s(user_total),
        interrupts_per_s: per_s(delta(&prev.kvm, &cur.kvm, "irq_injections")),
        irq_window_exits_per_s: per_s(delta(&prev.kvm, &cur.kvm, "irq_window_exits")),
        halt_exits_per_s: per_s(delta(&prev.kvm, &cur.kvm, "halt_exits")),
        time_in_guest: (in_guest as f64 / 1e9 / dt_s).clamp(0.0, 1.0),
        userspace_by_reason,
        kernel_by_reason,
    }
}

/// All vCPUs together: rates add up, time in guest is the mean.
pub fn total(per_vcpu: &[Rates]) -> Rates {
    let mut t = Rates::default();
    for r in per_vcpu {
        t.exits_per_s += r.exits_per_s;
        t.userspace_exits_per_s += r.userspace_exits_per_s;
        t.interrupts_per_s += r.interrupts_per_s;
        t.irq_window_exits_per_s += r.irq_window_exits_per_s;
        t.halt_exits_per_s += r.halt_exits_per_s;
        t.time_in_guest += r.time_in_guest;
        for (k, v) in &r.userspace_by_reason {
            *t.userspace_by_reason.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.kernel_by_reason {
            *t.kernel_by_reason.entry(k.clone()).or_default() += v;
        }
    }
    if !per_vcpu.is_empty() {
        t.time_in_guest /= per_vcpu.len() as f64;
    }
    t
}

/// Exits per interrupt injected (0 when none were injected).
pub fn exits_per_interrupt(r: &Rates) -> f64 {
    if r.interrupts_per_s > 0.0 {
        r.exits_per_s / r.interrupts_per_s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, u64)]) -> BTreeMap<String, u64> {
        kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn sample(user: &[(&str, u64)], kvm: &[(&str, u64)], run_ns: u64) -> VcpuSample {
        VcpuSample {
            user_exits: map(user),
            kvm: map(kvm),
            run_ns,
        }
    }

    #[test]
    fn rates_between_two_samples() {
        let a = sample(
            &[("io_out", 100)],
            &[
                ("exits", 1000),
                ("irq_injections", 10),
                ("irq_window_exits", 5),
                ("halt_exits", 2),
                ("halt_wait_ns", 0),
                ("io_exits", 100),
            ],
            1_000_000_000,
        );
        let b = sample(
            &[("io_out", 300), ("mmio_write", 50)],
            &[
                ("exits", 5000),
                ("irq_injections", 2010),
                ("irq_window_exits", 5),
                ("halt_exits", 402),
                ("halt_wait_ns", 500_000_000),
                ("io_exits", 300),
            ],
            3_000_000_000,
        );
        let r = vcpu_rates(&a, &b, 2.0);
        assert_eq!(r.exits_per_s, 2000.0);
        assert_eq!(r.userspace_exits_per_s, 125.0);
        assert_eq!(r.interrupts_per_s, 1000.0);
        assert_eq!(r.irq_window_exits_per_s, 0.0);
        assert_eq!(r.halt_exits_per_s, 200.0);
        // 2 s in KVM_RUN, 0.5 s of it halted, over 2 s.
        assert_eq!(r.time_in_guest, 0.75);
        assert_eq!(r.userspace_by_reason["io_out"], 100.0);
        assert_eq!(r.userspace_by_reason["mmio_write"], 25.0);
        assert_eq!(r.kernel_by_reason["io_exits"], 100.0);
        assert_eq!(r.kernel_by_reason["halt_exits"], 200.0);
        assert!(!r.kernel_by_reason.contains_key("exits"));
        assert_eq!(exits_per_interrupt(&r), 2.0);
    }

    #[test]
    fn traced_reasons_replace_the_aggregate_kinds() {
        let a = sample(&[], &[("kvm_exit.hlt", 1), ("io_exits", 0)], 0);
        let b = sample(
            &[],
            &[("kvm_exit.hlt", 11), ("kvm_exit.msr", 4), ("io_exits", 9)],
            0,
        );
        let r = vcpu_rates(&a, &b, 1.0);
        assert_eq!(r.kernel_by_reason.len(), 2, "{r:?}");
        assert_eq!(r.kernel_by_reason["hlt"], 10.0);
        assert_eq!(r.kernel_by_reason["msr"], 4.0);
    }

    #[test]
    fn odd_inputs_give_sane_rates() {
        let a = sample(&[("io_out", 10)], &[("exits", 100)], 5_000_000_000);
        let b = sample(&[("io_out", 5)], &[("exits", 50)], 1);
        let r = vcpu_rates(&a, &b, 1.0);
        assert_eq!((r.exits_per_s, r.userspace_exits_per_s), (0.0, 0.0));
        assert_eq!(r.time_in_guest, 0.0);
        assert_eq!(vcpu_rates(&a, &a, 0.0), Rates::default());
        assert_eq!(vcpu_rates(&a, &a, f64::NAN), Rates::default());
        // More time in KVM_RUN than wall time (clock skew): capped at 1.
        let c = sample(&[], &[], 5_000_000_000 + 3_000_000_000);
        assert_eq!(vcpu_rates(&a, &c, 1.0).time_in_guest, 1.0);
        assert_eq!(exits_per_interrupt(&Rates::default()), 0.0);
    }

    #[test]
    fn totals_add_rates_and_average_time_in_guest() {
        let one = Rates {
            exits_per_s: 10.0,
            interrupts_per_s: 4.0,
            time_in_guest: 1.0,
            userspace_by_reason: [("io_out".to_string(), 2.0)].into(),
            ..Default::default()
        };
        let two = Rates {
            exits_per_s: 30.0,
            halt_exits_per_s: 1.0,
            time_in_guest: 0.5,
            userspace_by_reason: [("io_out".to_string(), 3.0)].into(),
            ..Default::default()
        };
        let t = total(&[one, two]);
        assert_eq!(t.exits_per_s, 40.0);
        assert_eq!(t.interrupts_per_s, 4.0);
        assert_eq!(t.halt_exits_per_s, 1.0);
        assert_eq!(t.time_in_guest, 0.75);
        assert_eq!(t.userspace_by_reason["io_out"], 5.0);
        assert_eq!(total(&[]), Rates::default());
    }
}
