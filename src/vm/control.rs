//! What the outside sees of a running VM: the devices' counters for the report and the control
//! API's view ([`VmControl`], the VM's side of [`crate::api::Control`]).
//!
//! Owns nothing of the VM: it holds shared handles (counters, the lifecycle, KVM's statistics
//! descriptors, what a snapshot reads) and may change the VM only through the lifecycle, the
//! balloon's target and the quit flag; a snapshot only reads the paused VM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::api::ApiError;
use crate::devices::legacy::{probe, serial};
use crate::lifecycle::Lifecycle;
use crate::stats::DeviceFact;

/// How the VM is asked to stop: at once (`quit`), or at a deadline unless the guest powers off
/// before it (the grace after the ACPI power button). The main thread looks every 50 ms.
#[derive(Default)]
pub(crate) struct QuitRequest {
    now: AtomicBool,
    at: Mutex<Option<Instant>>,
}

/// Why [`QuitRequest::due`] says stop.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum QuitDue {
    Now,
    /// The grace after the power button ran out.
    GraceOver,
}

impl QuitRequest {
    pub fn now(&self) {
        self.now.store(true, Ordering::SeqCst);
    }

    /// Stop at `t` unless the VM has ended before (an earlier deadline is kept).
    pub fn at(&self, t: Instant) {
        let mut at = self.at.lock().unwrap_or_else(|p| p.into_inner());
        *at = Some(at.map_or(t, |a| a.min(t)));
    }

    pub fn due(&self) -> Option<QuitDue> {
        if self.now.load(Ordering::SeqCst) {
            return Some(QuitDue::Now);
        }
        let at = *self.at.lock().unwrap_or_else(|p| p.into_inner());
        at.is_some_and(|t| Instant::now() >= t)
            .then_some(QuitDue::GraceOver)
    }
}

/// Devices whose counters end up in the report.
pub(crate) struct DeviceCounters {
    pub probe: Option<(Arc<probe::ProbeCounters>, EventFd, EventFd)>,
    pub console: Arc<Mutex<serial::ConsoleWatch>>,
    pub console_queue: Arc<serial::ConsoleQueue>,
    /// What the console writer left behind (set once it is finished).
    pub console_totals: std::sync::OnceLock<serial::ConsoleTotals>,
    /// The PCI/virtio devices (their workers stop when this is dropped).
    pub virtio: Option<Arc<crate::devices::virtio::VirtioSet>>,
    /// The ACPI PM block: its power button.
    pub power: Arc<Mutex<crate::devices::legacy::pm::Pm>>,
}

impl DeviceCounters {
    /// The console's and the PCI devices' facts: what can be read while the VM runs (the
    /// probe's ioeventfd counters are drained by reading them, so only the final report has them).
    fn live_facts(&self) -> Vec<DeviceFact> {
        let mut v = vec![];
        let console = self.console.lock().unwrap_or_else(|p| p.into_inner());
        let mut facts = BTreeMap::from([
            ("bytes_out".into(), console.bytes()),
            ("bytes_dropped".into(), self.console_queue.dropped()),
        ]);
        if let Some(t) = self.console_totals.get() {
            facts.insert("bytes_dropped".into(), t.dropped);
            facts.insert("bytes_unwritten".into(), t.unwritten);
            facts.insert("bytes_lost".into(), t.lost);
        }
        v.push(DeviceFact {
            device: "serial".into(),
            facts,
        });
        drop(console);
        let (presses, scis, enabled) = self
            .power
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .power_button_facts();
        v.push(DeviceFact {
            device: "acpi-pm".into(),
            facts: BTreeMap::from([
                ("power_button_presses".into(), presses),
                ("power_button_scis".into(), scis),
                ("power_button_enabled".into(), u64::from(enabled)),
            ]),
        });
        if let Some(set) = &self.virtio {
            v.extend(set.facts());
        }
        v
    }

    /// Device workers that panicked.
    pub fn panics(&self) -> Vec<String> {
        self.virtio.as_ref().map(|s| s.panics()).unwrap_or_default()
    }

    /// Every device's facts, for the final report: the live ones with the probe's after the
    /// console's.
    pub fn facts(&self) -> Vec<DeviceFact> {
        let mut v = self.live_facts();
        if let Some((c, pio_evt, mmio_evt)) = &self.probe {
            let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            // The eventfd counters hold how many ioeventfd writes KVM completed in-kernel.
            let drain = |e: &EventFd| e.read().unwrap_or(0);
            v.insert(
                1,
                DeviceFact {
                    device: "probe".into(),
                    facts: BTreeMap::from([
                        ("pio_reads".into(), ld(&c.pio_reads)),
                        ("pio_writes".into(), ld(&c.pio_writes)),
                        ("mmio_reads".into(), ld(&c.mmio_reads)),
                        ("mmio_writes".into(), ld(&c.mmio_writes)),
                        ("pio_ioeventfd".into(), drain(pio_evt)),
                        ("mmio_ioeventfd".into(), drain(mmio_evt)),
                    ]),
                },
            );
        }
        v
    }
}

/// What the control API (`--api-socket`) may do to this VM.
pub(crate) struct VmControl {
    pub started: Instant,
    pub counters: Arc<DeviceCounters>,
    pub kvm_stats: Arc<Vec<crate::kvm_stats::VcpuStatsFd>>,
    /// Each vCPU's exits to userspace by reason, as they happen.
    pub exits: Vec<Arc<crate::stats::LiveExits>>,
    /// Converts the vCPUs' TSC cycles in `KVM_RUN` to time.
    pub tsc: crate::stats::TscClock,
    /// In-kernel exits by reason (`--kernel-exit-reasons`), and where they come from.
    pub traces: crate::kvm_trace::Shared,
    pub kernel_reasons: String,
    pub quit: Arc<QuitRequest>,
    pub lifecycle: Arc<Lifecycle>,
    pub cpus: u8,
    pub mem_bytes: u64,
    /// What a snapshot reads.
    pub snapshot: crate::snapshot::Source,
    /// The snapshot this VM was restored from.
    pub restored_from: Option<std::path::PathBuf>,
    /// `--snapshot-dir`: where snapshots may go.
    pub snapshot_dir: Option<std::path::PathBuf>,
}

/// Why a snapshot may not be written into `dir`, if so: a `..` in it (`DIR/../elsewhere` is
/// beneath `DIR` component by component, and would escape it without Landlock), outside
/// `--snapshot-dir`, or anywhere when Landlock restricts the VM and it has none (the error would
/// otherwise be a bare EACCES).
fn snapshot_place_refused(
    dir: &std::path::Path,
    allowed: Option<&std::path::Path>,
    landlock: bool,
) -> Option<String> {
    if dir
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Some(format!("{} has a \"..\" component", dir.display()));
    }
    match allowed {
        Some(a) if !dir.starts_with(a) => Some(format!(
            "{} is not beneath --snapshot-dir {}",
            dir.display(),
            a.display()
        )),
        None if landlock => Some(
            "this VM was started without --snapshot-dir, and Landlock lets it write nowhere else"
                .into(),
        ),
        _ => None,
    }
}

impl VmControl {
    /// Each vCPU's counters: exits to userspace by reason, time in `KVM_RUN`, and KVM's own
    /// statistics where every vCPU has them (`exitless top`).
    fn vcpus(&self) -> Vec<Value> {
        let hz = self.tsc.hz();
        let kvm_per_vcpu = self.kvm_stats.len() == self.exits.len();
        self.exits
            .iter()
            .enumerate()
            .map(|(id, live)| {
                let cycles = live.1.load(Ordering::Relaxed);
                let mut kvm = if kvm_per_vcpu {
                    self.kvm_stats[id].read()
                } else {
                    BTreeMap::new()
                };
                if let Some(t) = self.traces.get(id).and_then(|t| t.get()) {
                    kvm.extend(t.read());
                }
                json!({
                    "id": id,
                    "exits": crate::stats::LiveExits::sum(std::iter::once(&**live)),
                    "run_ns": (cycles as f64 * 1e9 / hz) as u64,
                    "kvm": kvm,
                })
            })
            .collect()
    }
}

impl crate::api::Control for VmControl {
    fn info(&self) -> Value {
        json!({
            "state": self.lifecycle.state(),
            "vcpus": self.cpus,
            "memory_bytes": self.mem_bytes,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "paused_s": self.lifecycle.paused_for().as_secs_f64(),
            "restored_from": self.restored_from,
        })
    }

    fn snapshot(&self, dir: &std::path::Path) -> Result<Value, ApiError> {
        use crate::snapshot::SnapshotError;
        let place =
            snapshot_place_refused(dir, self.snapshot_dir.as_deref(), crate::sandbox::active());
        if let Some(why) = place {
            return Err(ApiError::forbidden(format!("cannot snapshot there: {why}")));
        }
        match crate::snapshot::create(&self.snapshot, &self.lifecycle, dir) {
            Ok(s) => Ok(json!(s)),
            Err(e @ SnapshotError::Unsupported(_)) => Err(ApiError::bad_request(e.to_string())),
            Err(e @ SnapshotError::Place(_)) => Err(ApiError::conflict(e.to_string())),
            Err(e) => Err(ApiError {
                status: 500,
                message: e.to_string(),
            }),
        }
    }

    fn pause(&self) -> Result<(), ApiError> {
        Ok(self.lifecycle.pause()?)
    }

    fn resume(&self) -> Result<(), ApiError> {
        Ok(self.lifecycle.resume()?)
    }

    fn stats(&self) -> Value {
        let devices: serde_json::Map<String, Value> = self
            .counters
            .live_facts()
            .into_iter()
            .map(|f| (f.device, json!(f.facts)))
            .collect();
        json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "exits": crate::stats::LiveExits::sum(self.exits.iter().map(|e| &**e)),
            "devices": devices,
            "kvm": crate::kvm_stats::sum(self.kvm_stats.iter()),
            "vcpus": self.vcpus(),
            "kernel_exit_reasons": self.kernel_reasons,
            "state": self.lifecycle.state(),
        })
    }

    fn set_balloon(&self, bytes: u64) -> Result<u32, String> {
        match &self.counters.virtio {
            Some(set) => set.set_balloon_target(bytes),
            None => Err("this VM has no balloon (start it with --balloon)".into()),
        }
    }

    fn quit(&self) {
        self.quit.now();
    }

    fn power_button(&self, grace: std::time::Duration) -> Result<Value, ApiError> {
        let state = self.lifecycle.state();
        if state != crate::lifecycle::VmState::Running {
            return Err(ApiError::bad_request(format!(
                "the power button needs a running VM; this one is {}",
                state.name()
            )));
        }
        let mut pm = self
            .counters
            .power
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pm.press_power_button();
        let (_, _, enabled) = pm.power_button_facts();
        drop(pm);
        self.quit.at(Instant::now() + grace);
        Ok(json!({
            "acpi": true,
            "grace_s": grace.as_secs_f64(),
            "guest_listens": enabled,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::snapshot_place_refused;
    use std::path::Path;

    #[test]
    fn a_snapshot_goes_only_beneath_the_snapshot_dir_and_never_through_dot_dot() {
        let snaps = Some(Path::new("/srv/snaps"));
        assert_eq!(
            snapshot_place_refused(Path::new("/srv/snaps/a"), snaps, true),
            None
        );
        let outside = snapshot_place_refused(Path::new("/srv/other"), snaps, true).unwrap();
        assert!(outside.contains("not beneath --snapshot-dir"), "{outside}");
        // Beneath it by its components, outside it on disk: refused, with or without Landlock.
        for landlock in [true, false] {
            let up = Path::new("/srv/snaps/../../etc/x");
            let e = snapshot_place_refused(up, snaps, landlock).unwrap();
            assert!(e.contains("\"..\""), "{e}");
            assert!(snapshot_place_refused(up, None, landlock).is_some());
        }
        assert!(snapshot_place_refused(Path::new("/a"), None, true).is_some());
        assert_eq!(snapshot_place_refused(Path::new("/a"), None, false), None);
    }
}
