//! Where exitless's start-up goes: the phases from the process start (as `main` sees it) to the
//! first `KVM_RUN`, for the run report (`startup` in `--stats-json`) and the summary.
//!
//! Owns the process-start instant and the phase clock; `vmm` marks the phases, the first vCPU
//! thread stamps its first entry into the guest.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::Serialize;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records the process start; `main` calls it first. Later calls change nothing.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// The process start as recorded, or now when `main` did not record it (tests, library use).
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}

/// One phase of the start-up and how long it took.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Phase {
    pub phase: &'static str,
    pub ms: f64,
}

/// The start-up as the report shows it.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Startup {
    /// From the process start to the first vCPU's first `KVM_RUN`.
    pub total_ms: f64,
    /// In order; together they cover the total (the last one ends at the first `KVM_RUN`).
    pub phases: Vec<Phase>,
}

/// Marks phases as they end.
pub struct StartupClock {
    origin: Instant,
    last: Instant,
    phases: Vec<Phase>,
    /// Stamped by the first vCPU thread right before it enters the guest.
    pub first_run: Arc<OnceLock<Instant>>,
}

impl Default for StartupClock {
    fn default() -> Self {
        Self::new()
    }
}

impl StartupClock {
    /// A clock whose first phase began at the process start.
    pub fn new() -> Self {
        Self::starting_at(process_start())
    }

    /// A clock whose first phase began at `origin`.
    pub fn starting_at(origin: Instant) -> Self {
        StartupClock {
            origin,
            last: origin,
            phases: Vec::new(),
            first_run: Arc::new(OnceLock::new()),
        }
    }

    /// Ends the current phase, named `phase`, now.
    pub fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push(Phase {
            phase,
            ms: ms(now - self.last),
        });
        self.last = now;
    }

    /// The start-up, its last phase (`vcpu_threads`) ending at the first `KVM_RUN`; empty when
    /// no vCPU ever ran.
    pub fn finish(&self) -> Startup {
        let Some(&first) = self.first_run.get() else {
            return Startup::default();
        };
        let mut phases = self.phases.clone();
        phases.push(Phase {
            phase: "vcpu_threads",
            ms: ms(first.saturating_duration_since(self.last)),
        });
        Startup {
            total_ms: round3(ms(first.saturating_duration_since(self.origin))),
            phases: phases
                .into_iter()
                .map(|p| Phase {
                    ms: round3(p.ms),
                    ..p
                })
                .collect(),
        }
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Startup {
    /// One summary line: the total and the phases that took at least a tenth of it.
    pub fn summary_line(&self) -> Option<String> {
        if self.phases.is_empty() {
            return None;
        }
        let big: Vec<String> = self
            .phases
            .iter()
            .filter(|p| p.ms >= self.total_ms / 10.0)
            .map(|p| format!("{} {:.1}", p.phase, p.ms))
            .collect();
        Some(format!(
            "exitless: start-up {:.1} ms to the first KVM_RUN ({} ms)",
            self.total_ms,
            big.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_cover_the_start_up_up_to_the_first_run() {
        let mut c = StartupClock::starting_at(Instant::now());
        assert_eq!(c.finish(), Startup::default(), "no vCPU ran yet");
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.mark("kernel_load");
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.first_run.get_or_init(Instant::now);
        let s = c.finish();
        let names: Vec<&str> = s.phases.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["kernel_load", "vcpu_threads"]);
        assert!(s.phases.iter().all(|p| p.ms >= 4.0), "{s:?}");
        let sum: f64 = s.phases.iter().map(|p| p.ms).sum();
        assert!((sum - s.total_ms).abs() < 0.01, "{sum} vs {s:?}");
        let line = s.summary_line().unwrap();
        assert!(
            line.contains("kernel_load") && line.contains("vcpu_threads"),
            "{line}"
        );
    }
}
