//! The VM as an object with a lifecycle: built from a [`VmConfig`] by [`VmBuilder`], started,
//! paused and resumed (through [`Lifecycle`], by the control API), and waited for:
//! `exitless run` is `VmBuilder::new(cfg).build()?`, [`Vm::start`], [`Vm::wait`].
//!
//! ```text
//!   build() -> Created --start()--> Running <--pause/resume--> Paused
//!                                      \                        /
//!                                       +--> wait() -> Stopped +  (the report)
//! ```
//!
//! Owns the KVM VM descriptor, guest memory, the device buses (through the vCPUs' shared
//! state), the vCPU threads and the threads that serve the VM (API, console input, device
//! launcher). Its modules: [`builder`] (the build steps), [`threads`] (vCPU threads, their stop,
//! console input, signals), [`control`] (what the API and the report read). It may touch
//! everything of its VM; nothing outside it holds the VM except through [`Lifecycle`] and
//! [`crate::api::Control`].
//!
//! Snapshots: from `Paused`, the API's snapshot request reaches [`crate::snapshot::create`]
//! with what this VM hands over ([`SnapshotParts`]: the VM descriptor, guest memory, the
//! buses); each vCPU's state comes from its own thread through the lifecycle. A VM restored
//! from a snapshot is built by [`VmBuilder::restore`] and started like any other (or held
//! paused: [`Vm::start_paused`]).

mod builder;
mod control;
mod threads;

pub use builder::VmBuilder;

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};

use crate::config::VmConfig;
use crate::devices::legacy::serial;
use crate::devices::VmEnd;
use crate::host::{GuestFailureHint, GuestFailureKind};
use crate::lifecycle::{Lifecycle, VmState};
use crate::startup::StartupClock;
use crate::stats::{RunReport, VcpuStats};
use crate::vcpu::Vcpu;
use crate::vmm::{describe_end, exit_status, RunOutcome, VmmError};
use builder::Platform;
use control::{DeviceCounters, VmControl};
use threads::VcpuThread;

/// How long the end of a run waits for the console writer to write a byte before it leaves the
/// rest unwritten (a stdout nobody reads).
const CONSOLE_PATIENCE: Duration = Duration::from_secs(2);

/// What a snapshot of this VM reads (besides the vCPUs, which answer through the lifecycle).
struct SnapshotParts {
    vm: Arc<VmFd>,
    mem: vm_memory::GuestMemoryMmap,
    pio: Arc<crate::devices::Bus>,
    mmio: Arc<crate::devices::Bus>,
    /// The snapshot this VM was restored from (its RAM is then that snapshot's file).
    restored_from: Option<std::path::PathBuf>,
}

/// What the builder hands over.
struct Parts {
    snapshot: SnapshotParts,
    cfg: VmConfig,
    platform: Platform,
    _kvm: Kvm,
    /// The VM (kept open for as long as the VM object lives; the lifecycle's clock holds it too).
    _vm_fd: Arc<VmFd>,
    mem_cgroup: Option<crate::memlimit::MemCgroup>,
    clock: StartupClock,
    devices: Arc<DeviceCounters>,
    serial: Arc<Mutex<serial::Serial>>,
    console_watch: Arc<Mutex<serial::ConsoleWatch>>,
    /// Writes the guest's console output (taken at the end, to finish it).
    console_writer: Option<serial::ConsoleWriter>,
    end_tx: mpsc::Sender<VmEnd>,
    end_rx: mpsc::Receiver<VmEnd>,
    vcpus: Vec<Vcpu>,
    lifecycle: Arc<Lifecycle>,
    dedicated: Option<crate::dedicated::Dedicated>,
}

/// What exists only while the VM runs (dropped in this order at the stop).
struct Running {
    threads: Vec<VcpuThread>,
    started: Instant,
    raw: Option<crate::terminal::RawModeGuard>,
    launcher: Option<crate::seccomp::LauncherGuard>,
    /// Serves until dropped (after the report).
    _api: Option<crate::api::ApiServer>,
    kvm_stats: Arc<Vec<crate::kvm_stats::VcpuStatsFd>>,
    traces: crate::kvm_trace::Shared,
    kernel_reasons: String,
}

/// A VM: built, then started, then waited for.
pub struct Vm {
    parts: Parts,
    quit: Arc<control::QuitRequest>,
    running: Option<Running>,
}

impl Vm {
    fn new(parts: Parts) -> Self {
        Vm {
            parts,
            quit: Arc::default(),
            running: None,
        }
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        self.parts.lifecycle.state()
    }

    /// The lifecycle (pause, resume), for a controller other than the API.
    pub fn lifecycle(&self) -> Arc<Lifecycle> {
        self.parts.lifecycle.clone()
    }

    /// Created -> Running: the control API, the console and device-launcher threads, then the
    /// vCPU threads. The calling thread then runs under the main thread's filter.
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.start_as(false)
    }

    /// Created -> Paused: as [`Vm::start`], but every vCPU parks before it first enters the
    /// guest (a restored VM held for `resume`).
    pub fn start_paused(&mut self) -> Result<(), VmmError> {
        self.start_as(true)
    }

    /// The snapshot's side of the VM, for the control API.
    fn snapshot_source(&self) -> crate::snapshot::Source {
        let p = &self.parts;
        let s = &p.snapshot;
        crate::snapshot::Source {
            vm: s.vm.clone(),
            mem: s.mem.clone(),
            anonymous_ram: s.restored_from.is_none(),
            pio: s.pio.clone(),
            mmio: s.mmio.clone(),
            machine: machine(&p.cfg, p.platform.hw_virt),
            host: crate::snapshot::HostIdentity::current(&p.platform.host),
        }
    }

    fn start_as(&mut self, paused: bool) -> Result<(), VmmError> {
        if self.running.is_some() {
            return Err(VmmError::Config("the VM has already been started".into()));
        }
        let p = &mut self.parts;
        let kvm_stats = Arc::new(
            p.vcpus
                .iter()
                .filter_map(|v| crate::kvm_stats::VcpuStatsFd::open(v.fd()))
                .collect::<Vec<_>>(),
        );
        let live_exits = self.share_exit_counts();
        let started = Instant::now();
        let p = &self.parts;
        // With dedicated cores, the threads started from here on (control API, device launcher
        // and workers, console) inherit the main thread's CPUs, away from the vCPUs'.
        if let Some(d) = &p.dedicated {
            if !d.placement.vmm_cpus.is_empty() {
                crate::dedicated::set_thread_affinity(&d.placement.vmm_cpus)
                    .map_err(|e| VmmError::Config(format!("--dedicated-cores: {e}")))?;
            }
        }
        let (trace, kernel_reasons) = builder::kernel_exit_reasons(&p.cfg, &p.platform.host);
        let traces: crate::kvm_trace::Shared = Arc::new(
            (0..p.cfg.cpus)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
        );
        // Bound now (a bad path fails before anything runs), answering once the state is settled.
        let api = match &p.cfg.api_socket {
            Some(path) => Some((
                crate::api::ApiServer::bind(path).map_err(VmmError::Config)?,
                Arc::new(VmControl {
                    started,
                    counters: p.devices.clone(),
                    kvm_stats: kvm_stats.clone(),
                    exits: live_exits,
                    tsc: crate::stats::TscClock::start(),
                    traces: traces.clone(),
                    kernel_reasons: kernel_reasons.clone(),
                    quit: self.quit.clone(),
                    lifecycle: p.lifecycle.clone(),
                    cpus: p.cfg.cpus,
                    mem_bytes: p.cfg.mem_bytes,
                    snapshot: self.snapshot_source(),
                    restored_from: p.snapshot.restored_from.clone(),
                    snapshot_dir: p.cfg.snapshot_dir.clone(),
                }),
            )),
            None => None,
        };
        crate::vcpu::install_kick_handler()
            .map_err(|e| VmmError::Kvm(format!("signal handler: {e}")))?;
        threads::catch_stop_signals();
        // Device workers start (at DRIVER_OK, on a vCPU thread) through the launcher, under
        // their own filters (see `seccomp`).
        let launcher = crate::seccomp::start_launcher().map_err(VmmError::Kvm)?;
        let raw = crate::terminal::RawModeGuard::new();
        threads::spawn_console_input(p.serial.clone(), p.end_tx.clone());
        if paused {
            p.lifecycle
                .hold_at_start()
                .map_err(|e| VmmError::Config(e.to_string()))?;
        }
        let vcpu_threads = self.spawn_vcpus(trace, &traces)?;
        let p = &self.parts;
        let pthreads: Vec<libc::pthread_t> = {
            use std::os::unix::thread::JoinHandleExt;
            vcpu_threads.iter().map(|h| h.as_pthread_t()).collect()
        };
        let kick: crate::lifecycle::Kick = Box::new(move |id| threads::kick_thread(pthreads[id]));
        if paused {
            p.lifecycle.started_held(kick)
        } else {
            p.lifecycle.started(kick)
        }
        .map_err(|e| VmmError::Config(e.to_string()))?;
        // The socket answers only now, so its first answer is already "running" or "paused".
        let api = match api {
            Some((bound, control)) => Some(bound.serve(control).map_err(VmmError::Config)?),
            None => None,
        };
        self.running = Some(Running {
            threads: vcpu_threads,
            started,
            raw: Some(raw),
            launcher: Some(launcher),
            _api: api,
            kvm_stats,
            traces,
            kernel_reasons,
        });
        // From here on the main thread only waits, stops the VM and reports.
        crate::seccomp::apply(crate::seccomp::Kind::Main);
        Ok(())
    }

    /// With a control API, each vCPU also counts its exits where the API can read them.
    fn share_exit_counts(&mut self) -> Vec<Arc<crate::stats::LiveExits>> {
        if self.parts.cfg.api_socket.is_none() {
            return Vec::new();
        }
        let mut live = Vec::new();
        for v in &mut self.parts.vcpus {
            let l = Arc::new(crate::stats::LiveExits::default());
            v.share_exit_counts(l.clone());
            live.push(l);
        }
        live
    }

    /// One thread per vCPU (pinned with dedicated cores, with its exit-reason counters).
    fn spawn_vcpus(
        &mut self,
        trace: Option<threads::KernelTrace>,
        traces: &crate::kvm_trace::Shared,
    ) -> Result<Vec<VcpuThread>, VmmError> {
        let p = &mut self.parts;
        let mut handles = Vec::new();
        for v in std::mem::take(&mut p.vcpus) {
            let end = p.end_tx.clone();
            let pin = p
                .dedicated
                .as_ref()
                .map(|d| d.placement.vcpu_cpus[usize::from(v.id)]);
            let trace = trace.map(|t| (t, traces.clone()));
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || threads::vcpu_thread(v, pin, trace, end))
                .map_err(|e| VmmError::Kvm(format!("cannot start a vCPU thread: {e}")))?;
            handles.push(h);
        }
        Ok(handles)
    }

    /// Waits for the end (the guest's, a signal, the time limit, a quit through the API), stops
    /// the VM and reports. The VM must have been started.
    pub fn wait(mut self) -> Result<RunOutcome, VmmError> {
        let Some(running) = self.running.take() else {
            return Err(VmmError::Config("the VM was never started".into()));
        };
        let end = self.wait_for_end(&running);
        Ok(self.finish(running, end))
    }

    fn wait_for_end(&mut self, running: &Running) -> VmEnd {
        let cfg = &self.parts.cfg;
        // The vCPUs send the end; the main thread's own sender would keep the channel open.
        let (unused_tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.parts.end_tx, unused_tx));
        // Periodic kicks: RIP samples, and on PVM hosts the chance to complete a stuck
        // hypercall (every 10 ms with --sample-rips, else every 50 ms where they are kicked).
        let sampled: Vec<libc::pthread_t> = if cfg.sample_rips || self.parts.platform.host.is_pvm()
        {
            use std::os::unix::thread::JoinHandleExt;
            running.threads.iter().map(|h| h.as_pthread_t()).collect()
        } else {
            Vec::new()
        };
        let deadline = cfg.timeout.map(|t| running.started + t);
        let tick = Duration::from_millis(if cfg.sample_rips { 10 } else { 50 });
        loop {
            sampled.iter().for_each(|&p| threads::kick_thread(p));
            match self.parts.end_rx.recv_timeout(tick) {
                Ok(e) => return e,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return VmEnd::Error("every vCPU stopped".into())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if threads::signalled() {
                return VmEnd::Interrupted;
            }
            match self.quit.due() {
                Some(control::QuitDue::Now) => return VmEnd::Stopped,
                Some(control::QuitDue::GraceOver) => {
                    eprintln!(
                        "exitless: the guest did not power off after the ACPI power button \
                         within its grace: stopped"
                    );
                    return VmEnd::Stopped;
                }
                None => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return VmEnd::Timeout;
            }
        }
    }

    /// Running or Paused -> Stopped: every vCPU told to stop and joined, the devices stopped,
    /// the report written.
    fn finish(mut self, mut running: Running, end: VmEnd) -> RunOutcome {
        let wall = running.started.elapsed();
        self.parts.lifecycle.stop();
        let kick = |h: &VcpuThread| {
            use std::os::unix::thread::JoinHandleExt;
            threads::kick_thread(h.as_pthread_t());
        };
        let vcpu_threads = std::mem::take(&mut running.threads);
        let (stats, problems) = threads::stop_vcpus(vcpu_threads, &kick, Duration::from_millis(2));
        for p in &problems {
            eprintln!("exitless: {p}");
        }
        drop(running.raw.take());
        if let Some(set) = &self.parts.devices.virtio {
            set.shutdown();
        }
        drop(running.launcher.take());
        crate::ratelimit::flush();
        // The guest's last output reaches stdout before the summary (unless stdout is stalled).
        if let Some(w) = self.parts.console_writer.take() {
            let totals = w.finish(CONSOLE_PATIENCE);
            if let Some(why) = totals.incomplete() {
                // Said whatever the summary setting: a log missing its end must not pass unseen.
                eprintln!("exitless: {why}");
            }
            let _ = self.parts.devices.console_totals.set(totals);
        }
        let outcome = self.report(&running, end, wall, &stats, problems);
        drop(running);
        outcome
    }

    /// The run's report, and an explanation of a guest failure this host causes.
    fn report(
        &self,
        running: &Running,
        end: VmEnd,
        wall: Duration,
        stats: &[VcpuStats],
        problems: Vec<String>,
    ) -> RunOutcome {
        let p = &self.parts;
        let mut status = exit_status(&end, &p.cfg);
        if !problems.is_empty() && status == 0 {
            // A vCPU lost or panicked: whatever the guest did, this run is not a success.
            status = 1;
        }
        let mut report = RunReport::new(describe_end(&end), status, wall, stats, p.devices.facts());
        // Read after every vCPU thread has been joined: the counters are final.
        report.kvm = crate::kvm_stats::sum(running.kvm_stats.iter());
        report.startup = p.clock.finish();
        report.panics.extend(problems);
        report.panics.extend(p.devices.panics());
        report.nested = p.platform.hw_virt.map(|h| h.name().to_string());
        if let Some(cg) = &p.mem_cgroup {
            report.devices.push(crate::stats::DeviceFact {
                device: "memory-cgroup".into(),
                facts: cg.facts().into_iter().map(|(k, v)| (k.into(), v)).collect(),
            });
        }
        report.irq_path = Some(p.platform.irq_path);
        report.apic_virt = Some(p.platform.apic_virt.clone());
        report.dedicated = p.dedicated.clone();
        report.halt_poll_ns = p.cfg.halt_poll_ns;
        report.kvm.extend(crate::kvm_trace::sum(&running.traces));
        report.kernel_exit_reasons = Some(running.kernel_reasons.clone());
        report.rates = Some(report.compute_rates());
        let console_tail = p
            .console_watch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines();
        let explanation = failure_kind(&end).and_then(|kind| {
            p.platform.host.explain_guest_failure(&GuestFailureHint {
                console_tail: &console_tail.join("\n"),
                kind,
            })
        });
        RunOutcome {
            report,
            console_tail,
            explanation,
        }
    }
}

/// What the VM is made of, as a snapshot records it.
fn machine(
    cfg: &VmConfig,
    hw_virt: Option<crate::arch::x86_64::nested::HwVirt>,
) -> crate::snapshot::Machine {
    use crate::config::KernelSource;
    let guest = match &cfg.kernel {
        KernelSource::File(p) => p.display().to_string(),
        KernelSource::Embedded(n) => format!("kit:{n}"),
        KernelSource::Snapshot { guest, .. } => guest.clone(),
    };
    crate::snapshot::Machine {
        guest,
        mem_bytes: cfg.mem_bytes,
        cpus: cfg.cpus,
        nested: hw_virt.map(|h| h.name().to_string()),
        debug_exit: cfg.debug_exit,
        probe: cfg.probe,
        cmdline: cfg.cmdline.clone(),
        virtio: cfg.virtio.clone(),
    }
}

/// What kind of guest failure an end is, if any.
fn failure_kind(end: &VmEnd) -> Option<GuestFailureKind> {
    match end {
        VmEnd::PowerOff | VmEnd::DebugExit(_) | VmEnd::Interrupted | VmEnd::Stopped => None,
        VmEnd::Timeout => Some(GuestFailureKind::Hung),
        VmEnd::Reset | VmEnd::TripleFault | VmEnd::GuestPanic(_) => {
            Some(GuestFailureKind::Shutdown)
        }
        VmEnd::Error(_) => Some(GuestFailureKind::Internal),
    }
}
