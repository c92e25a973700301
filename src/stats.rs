//! Exit accounting: every exit a vCPU takes to userspace is counted by reason (and I/O exits by
//! port and MMIO page), with the time spent inside `KVM_RUN`; at the end the counts are merged
//! into a [`RunReport`], printed as a one-screen summary and optionally written as JSON.
//!
//! The counters are owned by their vCPU thread (plain integers, no atomics, no locks, no
//! allocation on the exit path except the first exit on a new MMIO page) and handed over when
//! the thread ends. Time on the exit path is read from the TSC ([`tsc`]: one instruction, no
//! memory touched, no vDSO) and converted to nanoseconds once, when the thread ends
//! ([`VcpuStats::finish`], against the monotonic clock).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Why `KVM_RUN` returned to userspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Hlt,
    Shutdown,
    SystemEvent,
    Hypercall,
    /// `KVM_EXIT_INTERNAL_ERROR`: emulation failures (completed by exitless or fatal) and others.
    InternalError,
    FailEntry,
    /// `KVM_RUN` interrupted by a signal (a kick) or `immediate_exit`.
    Interrupted,
    IrqWindowOpen,
    Debug,
    Exception,
    Unknown,
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 16] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::SystemEvent,
        ExitReason::Hypercall,
        ExitReason::InternalError,
        ExitReason::FailEntry,
        ExitReason::Interrupted,
        ExitReason::IrqWindowOpen,
        ExitReason::Debug,
        ExitReason::Exception,
        ExitReason::Unknown,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Hypercall => "hypercall",
            ExitReason::InternalError => "internal_error",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::Interrupted => "interrupted",
            ExitReason::IrqWindowOpen => "irq_window_open",
            ExitReason::Debug => "debug",
            ExitReason::Exception => "exception",
            ExitReason::Unknown => "unknown",
            ExitReason::Other => "other",
        }
    }
}

/// One vCPU's counters.
/// One vCPU's exit counts by reason, and the TSC cycles it spent inside `KVM_RUN`, readable while
/// it runs (the control API's `stats`, `exitless top`). Its own cache line per vCPU: uncontended
/// atomic adds per exit, nothing beside an exit's µs.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LiveExits(
    pub [std::sync::atomic::AtomicU64; ExitReason::ALL.len()],
    pub std::sync::atomic::AtomicU64,
);

impl LiveExits {
    /// The counts of several vCPUs summed, by reason name (reasons never seen left out).
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a LiveExits>) -> BTreeMap<&'static str, u64> {
        let mut m = BTreeMap::new();
        for l in all {
            for (r, c) in ExitReason::ALL.iter().zip(&l.0) {
                let n = c.load(std::sync::atomic::Ordering::Relaxed);
                if n > 0 {
                    *m.entry(r.name()).or_default() += n;
                }
            }
        }
        m
    }
}

pub struct VcpuStats {
    pub counts: [u64; ExitReason::ALL.len()],
    /// The same counts, shared with the control API (None: nobody reads them live).
    pub live: Option<std::sync::Arc<LiveExits>>,
    /// Port I/O exits per port.
    pub pio: Box<[u32]>,
    /// MMIO exits per 4 KiB page: at most [`MMIO_PAGES_MAX`] pages, the rest under
    /// [`MMIO_OTHER_PAGES`]. Reserved at creation, so the exit path never grows it: a guest
    /// touching millions of pages can neither grow the VMM's memory nor make a vCPU thread
    /// reallocate (a free there once read /proc, which its seccomp filter forbids).
    pub mmio_pages: HashMap<u64, u64>,
    /// Time inside `KVM_RUN`.
    pub in_guest: Duration,
    /// Time from `KVM_RUN` returning to the next `KVM_RUN` (exitless's own exit handling).
    pub in_vmm: Duration,
    /// `in_vmm` by the reason of the exit being handled.
    pub in_vmm_by_reason: [Duration; ExitReason::ALL.len()],
    /// TSC cycles behind `in_guest` and `in_vmm_by_reason`, converted by [`VcpuStats::finish`].
    pub guest_tsc: u64,
    pub vmm_tsc: [u64; ExitReason::ALL.len()],
    /// The reason of the last exit counted (the one being handled).
    last: ExitReason,
    /// Run-length cache in front of `mmio_pages`: (page, exits on it not yet in the map).
    mmio_run: (u64, u64),
    /// Failed emulations that exitless completed itself, by instruction.
    pub emulated: BTreeMap<&'static str, u64>,
    /// Guest RIP and CPL when the vCPU stopped.
    pub last_rip: Option<u64>,
    pub last_cpl: Option<u16>,
    /// Guest RIPs seen by the sampler (`--sample-rips`), with their counts: at most
    /// [`RIPS_MAX`] RIPs, the samples of further ones under [`RIP_OTHER`]. Bounded because the
    /// guest chooses its RIPs: a guest that never runs at the same address twice would otherwise
    /// grow the VMM's memory by one entry per sample for as long as it runs.
    pub rip_samples: HashMap<u64, u64>,
    /// The same for the current and the previous [`RECENT_WINDOW`] (a hung guest's loop shows
    /// there undiluted by the boot before it); same bound.
    pub rip_recent: [HashMap<u64, u64>; 2],
    rip_window_start: Option<std::time::Instant>,
}

/// How many MMIO pages a vCPU counts one by one.
pub const MMIO_PAGES_MAX: usize = 1024;
/// The key (not a page address: those are 4 KiB-aligned) under which exits on pages past
/// [`MMIO_PAGES_MAX`] are counted; the report calls it `other`.
pub const MMIO_OTHER_PAGES: u64 = u64::MAX;

/// How many distinct guest RIPs each map of `--sample-rips` holds (~100 samples per second per
/// vCPU: a bit over 40 s of samples that all differ; a real profile has far fewer hot RIPs).
pub const RIPS_MAX: usize = 4096;
/// The key (not a canonical kernel or user address) under which samples of RIPs past
/// [`RIPS_MAX`] are counted; the report calls it `other`.
pub const RIP_OTHER: u64 = u64::MAX;

/// Length of each window of recent RIP samples.
pub const RECENT_WINDOW: Duration = Duration::from_secs(30);

impl Default for VcpuStats {
    fn default() -> Self {
        VcpuStats {
            counts: [0; ExitReason::ALL.len()],
            live: None,
            pio: vec![0u32; 1 << 16].into_boxed_slice(),
            mmio_pages: HashMap::with_capacity(MMIO_PAGES_MAX),
            in_guest: Duration::ZERO,
            in_vmm: Duration::ZERO,
            in_vmm_by_reason: [Duration::ZERO; ExitReason::ALL.len()],
            guest_tsc: 0,
            vmm_tsc: [0; ExitReason::ALL.len()],
            last: ExitReason::Other,
            mmio_run: (0, 0),
            emulated: BTreeMap::new(),
            last_rip: None,
            last_cpl: None,
            rip_samples: HashMap::new(),
            rip_recent: [HashMap::new(), HashMap::new()],
            rip_window_start: None,
        }
    }
}

/// One sample of `rip` in `map`, within [`RIPS_MAX`] (one slot stays free for [`RIP_OTHER`]).
fn count_rip(map: &mut HashMap<u64, u64>, rip: u64) {
    let key = if map.contains_key(&rip) || map.len() < RIPS_MAX - 1 {
        rip
    } else {
        RIP_OTHER
    };
    *map.entry(key).or_default() += 1;
}

impl VcpuStats {
    /// Records one sampled guest RIP.
    pub fn sample_rip(&mut self, rip: u64) {
        let now = std::time::Instant::now();
        let start = *self.rip_window_start.get_or_insert(now);
        if now.duration_since(start) >= RECENT_WINDOW {
            // Swapped and cleared, not replaced: the maps keep their room.
            self.rip_recent.swap(0, 1);
            self.rip_recent[0].clear();
            self.rip_window_start = Some(now);
        }
        count_rip(&mut self.rip_samples, rip);
        count_rip(&mut self.rip_recent[0], rip);
    }

    #[inline]
    pub fn count(&mut self, r: ExitReason) {
        self.counts[r as usize] += 1;
        if let Some(l) = &self.live {
            l.0[r as usize].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.last = r;
    }

    /// Adds TSC cycles of exit handling to the reason of the last exit counted.
    #[inline]
    pub fn add_vmm_tsc(&mut self, cycles: u64) {
        self.vmm_tsc[self.last as usize] += cycles;
    }

    /// Converts the TSC counts to time (`in_guest`, `in_vmm`, `in_vmm_by_reason`) with the rate
    /// `clock` measured, and folds the MMIO cache into `mmio_pages`. Call once, at the end.
    pub fn finish(&mut self, clock: &TscClock) {
        let hz = clock.hz();
        let to_time = |c: u64| Duration::from_nanos((c as f64 * 1e9 / hz) as u64);
        self.in_guest += to_time(self.guest_tsc);
        for (t, c) in self.in_vmm_by_reason.iter_mut().zip(self.vmm_tsc) {
            *t = to_time(c);
        }
        self.in_vmm += to_time(self.vmm_tsc.iter().sum());
        self.fold_mmio_run();
        self.mmio_run = (0, 0);
    }

    #[inline]
    pub fn count_pio(&mut self, port: u16) {
        self.pio[port as usize] = self.pio[port as usize].saturating_add(1);
    }

    /// Counts an MMIO exit on its page: repeated exits on one page (the common case) only bump
    /// a counter; the hash map is touched when the page changes.
    #[inline]
    pub fn count_mmio(&mut self, addr: u64) {
        let page = addr & !0xfff;
        if self.mmio_run.0 != page {
            self.fold_mmio_run();
            self.mmio_run = (page, 0);
        }
        self.mmio_run.1 += 1;
    }

    /// Moves the run-length cache into `mmio_pages`, within its bound.
    fn fold_mmio_run(&mut self) {
        let (page, n) = self.mmio_run;
        if n == 0 {
            return;
        }
        // One slot stays free for the overflow key.
        let key =
            if self.mmio_pages.contains_key(&page) || self.mmio_pages.len() < MMIO_PAGES_MAX - 1 {
                page
            } else {
                MMIO_OTHER_PAGES
            };
        *self.mmio_pages.entry(key).or_insert(0) += n;
        self.mmio_run.1 = 0;
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The time-stamp counter: the exit path's clock (a register read; `Instant::now` would run the
/// vDSO and touch its pages on every exit).
#[inline(always)]
pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no preconditions and no side effects on x86_64 (exitless's only target).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Calibrates [`tsc`] against the monotonic clock over a vCPU thread's life.
pub struct TscClock {
    instant: Instant,
    tsc: u64,
}

impl TscClock {
    pub fn start() -> TscClock {
        TscClock {
            instant: Instant::now(),
            tsc: tsc(),
        }
    }

    /// TSC ticks per second since `start` (waits until 2 ms have passed, for precision; a
    /// nominal 1 GHz if the TSC did not advance).
    pub fn hz(&self) -> f64 {
        const MIN: Duration = Duration::from_millis(2);
        if let Some(rest) = MIN.checked_sub(self.instant.elapsed()) {
            std::thread::sleep(rest);
        }
        let (secs, ticks) = (
            self.instant.elapsed().as_secs_f64(),
            tsc().wrapping_sub(self.tsc),
        );
        if ticks == 0 || ticks > 1 << 62 {
            1e9
        } else {
            ticks as f64 / secs
        }
    }
}

/// A named extra fact shown in the summary (device activity such as probe counts).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DeviceFact {
    pub device: String,
    pub facts: BTreeMap<String, u64>,
}

/// The whole run, merged over vCPUs.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// Why the VM ended, in words.
    pub end: String,
    /// The process exit status.
    pub status: i32,
    pub cpus: usize,
    pub wall_ns: u128,
    /// Time all vCPUs spent inside `KVM_RUN`.
    pub guest_ns: u128,
    /// Time all vCPUs spent handling exits in exitless (`KVM_RUN` return to re-entry).
    pub vmm_ns: u128,
    /// `vmm_ns` by the reason of the exit handled (only reasons that happened).
    pub vmm_ns_by_exit: BTreeMap<String, u128>,
    pub total_exits: u64,
    /// Exits to userspace by reason (only those that happened).
    pub exits: BTreeMap<String, u64>,
    /// Port I/O exits by port ("0x3f8").
    pub pio_ports: BTreeMap<String, u64>,
    /// MMIO exits by page ("0xf0000000").
    pub mmio_pages: BTreeMap<String, u64>,
    /// Failed emulations completed by exitless, by instruction.
    pub emulated: BTreeMap<String, u64>,
    pub devices: Vec<DeviceFact>,
    /// Where each vCPU was when it stopped ("0xffffffff81000000 cpl0").
    pub last_rip: Vec<String>,
    /// The hottest guest RIPs of `--sample-rips` ("0xffffffff81000000" → samples), at most
    /// [`PROFILE_TOP`], with the number of samples taken in all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rip_profile: Vec<(String, u64)>,
    #[serde(skip_serializing_if = "is_zero")]
    pub rip_samples: u64,
    /// The same over the last 30–60 s of the run only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rip_profile_recent: Vec<(String, u64)>,
    /// KVM's own per-vCPU counters summed over vCPUs (exits handled inside the kernel too), when
    /// the host exposes binary statistics.
    pub kvm: BTreeMap<String, u64>,
    /// Where the time from the process start to the first `KVM_RUN` went.
    pub startup: crate::startup::Startup,
    /// Threads that panicked or were given up on (bugs in exitless, or a vCPU stuck in
    /// `KVM_RUN`): "virtio-rng0: worker panicked: ...", "vcpu1 panicked: ...".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub panics: Vec<String>,
    /// The hardware virtualization the guest was given ("SVM", "VMX"; `--nested`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nested: Option<String>,
    /// x2APIC and PV EOI as the guest got them (`--x2apic`, `--pv-eoi`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub irq_path: Option<crate::arch::x86_64::irq_path::IrqPath>,
    /// The host's APIC virtualization for this VM: active or not, and why (see `apicv`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apic_virt: Option<crate::apicv::ApicVirt>,
    /// `--dedicated-cores`: where the threads ran and which exits stayed in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedicated: Option<crate::dedicated::Dedicated>,
    /// `--halt-poll-ns`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt_poll_ns: Option<u64>,
    /// Where the in-kernel exits by reason (`kvm` keys `kvm_exit.*`) came from, or why there are
    /// none (`--kernel-exit-reasons`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_exit_reasons: Option<String>,
    /// ELI's Table 3.1 rows over the whole run (see `rates`), once the counters are final.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<crate::rates::Rates>,
}

/// How many of the hottest sampled RIPs the report keeps.
pub const PROFILE_TOP: usize = 20;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The sampled RIPs of all vCPUs merged, hottest first (ties by address).
fn rip_profile<'a>(maps: impl Iterator<Item = &'a HashMap<u64, u64>>) -> Vec<(String, u64)> {
    let mut all: HashMap<u64, u64> = HashMap::new();
    for m in maps {
        for (rip, n) in m {
            *all.entry(*rip).or_default() += n;
        }
    }
    let mut v: Vec<(u64, u64)> = all.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(PROFILE_TOP)
        .map(|(rip, n)| match rip {
            RIP_OTHER => ("other".to_string(), n),
            rip => (format!("{rip:#x}"), n),
        })
        .collect()
}

impl RunReport {
    pub fn new(
        end: String,
        status: i32,
        wall: Duration,
        vcpus: &[VcpuStats],
        devices: Vec<DeviceFact>,
    ) -> Self {
        let mut exits = BTreeMap::new();
        for r in ExitReason::ALL {
            let n: u64 = vcpus.iter().map(|v| v.counts[r as usize]).sum();
            if n > 0 {
                exits.insert(r.name().to_string(), n);
            }
        }
        let mut pio_ports = BTreeMap::new();
        for port in 0..=u16::MAX {
            let n: u64 = vcpus.iter().map(|v| v.pio[port as usize] as u64).sum();
            if n > 0 {
                pio_ports.insert(format!("{port:#x}"), n);
            }
        }
        let mut mmio: BTreeMap<u64, u64> = BTreeMap::new();
        let mut emulated = BTreeMap::new();
        for v in vcpus {
            for (p, n) in &v.mmio_pages {
                *mmio.entry(*p).or_default() += n;
            }
            if v.mmio_run.1 > 0 {
                *mmio.entry(v.mmio_run.0).or_default() += v.mmio_run.1;
            }
            for (k, n) in &v.emulated {
                *emulated.entry(k.to_string()).or_default() += n;
            }
        }
        RunReport {
            end,
            status,
            cpus: vcpus.len(),
            wall_ns: wall.as_nanos(),
            guest_ns: vcpus.iter().map(|v| v.in_guest.as_nanos()).sum(),
            vmm_ns: vcpus.iter().map(|v| v.in_vmm.as_nanos()).sum(),
            vmm_ns_by_exit: ExitReason::ALL
                .iter()
                .filter(|r| exits.contains_key(r.name()))
                .map(|r| {
                    let ns = vcpus
                        .iter()
                        .map(|v| v.in_vmm_by_reason[*r as usize].as_nanos())
                        .sum();
                    (r.name().to_string(), ns)
                })
                .collect(),
            total_exits: vcpus.iter().map(|v| v.total()).sum(),
            exits,
            pio_ports,
            mmio_pages: mmio
                .into_iter()
                .map(|(p, n)| match p {
                    MMIO_OTHER_PAGES => ("other".to_string(), n),
                    p => (format!("{p:#x}"), n),
                })
                .collect(),
            emulated,
            devices,
            last_rip: vcpus
                .iter()
                .map(|v| match (v.last_rip, v.last_cpl) {
                    (Some(r), Some(c)) => format!("{r:#x} cpl{c}"),
                    _ => "unknown".into(),
                })
                .collect(),
            rip_profile: rip_profile(vcpus.iter().map(|v| &v.rip_samples)),
            rip_profile_recent: rip_profile(vcpus.iter().flat_map(|v| v.rip_recent.iter())),
            rip_samples: vcpus
                .iter()
                .map(|v| v.rip_samples.values().sum::<u64>())
                .sum(),
            kvm: BTreeMap::new(),
            startup: Default::default(),
            panics: Vec::new(),
            nested: None,
            irq_path: None,
            apic_virt: None,
            dedicated: None,
            halt_poll_ns: None,
            rates: None,
            kernel_exit_reasons: None,
        }
    }

    /// Share of vCPU time spent in the guest (0..=1).
    pub fn guest_share(&self) -> f64 {
        let cpu_time = self.wall_ns as f64 * self.cpus.max(1) as f64;
        if cpu_time == 0.0 {
            0.0
        } else {
            (self.guest_ns as f64 / cpu_time).min(1.0)
        }
    }

    /// The run's rates from its final counters (`exits`, `kvm`, `guest_ns`, `wall_ns`): totals
    /// over vCPUs, time in guest as the share of all vCPUs' time.
    pub fn compute_rates(&self) -> crate::rates::Rates {
        let cur = crate::rates::VcpuSample {
            user_exits: self.exits.clone(),
            kvm: self.kvm.clone(),
            run_ns: u64::try_from(self.guest_ns).unwrap_or(u64::MAX),
        };
        let zero = crate::rates::VcpuSample::default();
        let wall = self.wall_ns as f64 / 1e9;
        let mut r = crate::rates::vcpu_rates(&zero, &cur, wall);
        r.time_in_guest =
            crate::rates::vcpu_rates(&zero, &cur, wall * self.cpus.max(1) as f64).time_in_guest;
        r
    }

    /// The one-screen summary for stderr. `names` maps a port to a device name.
    pub fn summary(&self, names: &dyn Fn(u16) -> Option<&'static str>) -> String {
        let mut s = String::new();
        let wall = self.wall_ns as f64 / 1e9;
        let _ = writeln!(
            s,
            "exitless: {} after {:.2} s; {} vCPU{}, {:.1}% of vCPU time in the guest",
            self.end,
            wall,
            self.cpus,
            if self.cpus == 1 { "" } else { "s" },
            100.0 * self.guest_share()
        );
        let _ = writeln!(
            s,
            "exitless: {} exits to userspace ({:.0}/s)",
            self.total_exits,
            if wall > 0.0 {
                self.total_exits as f64 / wall
            } else {
                0.0
            }
        );
        if let Some(line) = self.startup.summary_line() {
            let _ = writeln!(s, "{line}");
        }
        if let Some(hw) = &self.nested {
            let _ = writeln!(
                s,
                "exitless: nested virtualization: {hw} given to the guest"
            );
        }
        if let Some(r) = &self.rates {
            if self.kvm.contains_key("exits") {
                let _ = writeln!(
                    s,
                    "exitless: rates: {:.0} exits/s (all, KVM), {:.0} interrupts injected/s, {:.0} \
                     IRQ-window exits/s, {:.0} halt exits/s, {:.2} exits per interrupt, {:.1}% \
                     time in guest (less halted)",
                    r.exits_per_s,
                    r.interrupts_per_s,
                    r.irq_window_exits_per_s,
                    r.halt_exits_per_s,
                    crate::rates::exits_per_interrupt(r),
                    100.0 * r.time_in_guest
                );
            }
        }
        if let Some(p) = &self.irq_path {
            let _ = writeln!(s, "exitless: interrupt completion: {}", p.describe());
        }
        if let Some(a) = &self.apic_virt {
            let _ = writeln!(s, "exitless: interrupt delivery: {}", a.describe());
        }
        if let Some(d) = &self.dedicated {
            let cpus = |c: &[usize]| {
                c.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let _ = writeln!(
                s,
                "exitless: dedicated cores: vCPUs on CPU {}, exitless's other threads on {}; \
                 kept in the guest: {}",
                cpus(&d.placement.vcpu_cpus),
                if d.placement.vmm_cpus.is_empty() {
                    "the same CPUs".to_string()
                } else {
                    format!("CPU {}", cpus(&d.placement.vmm_cpus))
                },
                d.exits_disabled.join(" ")
            );
        }
        if self.total_exits > 0 {
            let _ = writeln!(
                s,
                "exitless: {:.2} us per exit in exitless's own handling (KVM_RUN return to re-entry)",
                self.vmm_ns as f64 / 1e3 / self.total_exits as f64
            );
        }
        let mut by_count: Vec<(&String, &u64)> = self.exits.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (name, n) in by_count {
            let _ = writeln!(
                s,
                "  {:<16} {:>10}  {:>5.1}%",
                name,
                n,
                100.0 * *n as f64 / self.total_exits.max(1) as f64
            );
        }
        let mut ports: Vec<(u16, u64)> = self
            .pio_ports
            .iter()
            .filter_map(|(p, n)| {
                Some((
                    u16::from_str_radix(p.trim_start_matches("0x"), 16).ok()?,
                    *n,
                ))
            })
            .collect();
        ports.sort_by_key(|p| std::cmp::Reverse(p.1));
        if !ports.is_empty() {
            let list: Vec<String> = ports
                .iter()
                .take(6)
                .map(|(p, n)| match names(*p) {
                    Some(d) => format!("{p:#x} {d} {n}"),
                    None => format!("{p:#x} {n}"),
                })
                .collect();
            let _ = writeln!(s, "  ports: {}", list.join(", "));
        }
        if !self.mmio_pages.is_empty() {
            let mut pages: Vec<(&String, &u64)> = self.mmio_pages.iter().collect();
            pages.sort_by(|a, b| b.1.cmp(a.1));
            let list: Vec<String> = pages
                .iter()
                .take(6)
                .map(|(p, n)| format!("{p} {n}"))
                .collect();
            let _ = writeln!(s, "  mmio pages: {}", list.join(", "));
        }
        if !self.emulated.is_empty() {
            let list: Vec<String> = self
                .emulated
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  completed by exitless after KVM's emulator failed: {}",
                list.join(", ")
            );
        }
        for d in &self.devices {
            let list: Vec<String> = d.facts.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(s, "  {}: {}", d.device, list.join(" "));
        }
        for p in &self.panics {
            let _ = writeln!(s, "  thread failure: {p}");
        }
        if self.status != 0 && !self.last_rip.is_empty() {
            let _ = writeln!(s, "  vCPUs stopped at: {}", self.last_rip.join(", "));
        }
        if self.rip_samples > 0 {
            let _ = writeln!(
                s,
                "  guest RIP samples: {} (hottest first)",
                self.rip_samples
            );
            for (rip, n) in &self.rip_profile {
                let pct = 100.0 * *n as f64 / self.rip_samples as f64;
                let _ = writeln!(s, "    {rip:<20} {n:>8} {pct:5.1}%");
            }
            let recent: u64 = self.rip_profile_recent.iter().map(|(_, n)| n).sum();
            if self.wall_ns > RECENT_WINDOW.as_nanos() && recent > 0 {
                let _ = writeln!(s, "  the same, last 30-60 s only (top {PROFILE_TOP}):");
                for (rip, n) in &self.rip_profile_recent {
                    let pct = 100.0 * *n as f64 / recent as f64;
                    let _ = writeln!(s, "    {rip:<20} {n:>8} {pct:5.1}%");
                }
            }
        }
        if !self.kvm.is_empty() {
            let list: Vec<String> = self.kvm.iter().map(|(k, n)| format!("{k}={n}")).collect();
            let _ = writeln!(s, "  in-kernel (KVM): {}", list.join(" "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest touching more pages than are counted one by one gets the rest under `other`,
    /// and the map never grows past its reservation (no allocation on the exit path).
    #[test]
    fn mmio_pages_are_bounded() {
        let mut s = VcpuStats::default();
        let cap = s.mmio_pages.capacity();
        for page in 0..(MMIO_PAGES_MAX as u64 * 3) {
            s.count_mmio(page << 12);
            s.count_mmio((page << 12) + 8);
        }
        s.count_mmio(0);
        s.fold_mmio_run();
        assert_eq!(s.mmio_pages.len(), MMIO_PAGES_MAX);
        assert_eq!(s.mmio_pages.capacity(), cap, "the map was reallocated");
        assert_eq!(s.mmio_pages[&0], 3, "a counted page keeps counting");
        let other = s.mmio_pages[&MMIO_OTHER_PAGES];
        assert_eq!(other, 2 * (MMIO_PAGES_MAX as u64 * 2 + 1));
        let total: u64 = s.mmio_pages.values().sum();
        assert_eq!(total, 2 * MMIO_PAGES_MAX as u64 * 3 + 1);
    }

    /// A guest that never runs at the same RIP twice cannot grow the sampler's maps past
    /// [`RIPS_MAX`]: the rest is counted under `other`, and no sample is lost.
    #[test]
    fn sampled_rips_are_bounded() {
        let mut s = VcpuStats::default();
        let n = RIPS_MAX as u64 * 3;
        for rip in 0..n {
            s.sample_rip(0xffff_ffff_8100_0000 + rip);
        }
        s.sample_rip(0xffff_ffff_8100_0000);
        for m in [&s.rip_samples, &s.rip_recent[0]] {
            assert_eq!(m.len(), RIPS_MAX);
            assert_eq!(m.values().sum::<u64>(), n + 1);
            assert_eq!(m[&0xffff_ffff_8100_0000], 2, "a counted RIP keeps counting");
            assert_eq!(m[&RIP_OTHER], n - (RIPS_MAX as u64 - 1));
        }
        let profile = rip_profile([&s.rip_samples].into_iter());
        assert_eq!(profile[0].0, "other");
    }

    #[test]
    fn live_exit_counts_follow_count_and_sum_over_vcpus() {
        let (a, b) = (
            std::sync::Arc::new(LiveExits::default()),
            std::sync::Arc::new(LiveExits::default()),
        );
        let mut s = VcpuStats::default();
        s.count(ExitReason::IoOut);
        assert!(LiveExits::sum([&*a]).is_empty(), "not shared yet");
        s.live = Some(a.clone());
        s.count(ExitReason::IoOut);
        s.count(ExitReason::Hlt);
        let mut t = VcpuStats {
            live: Some(b.clone()),
            ..Default::default()
        };
        t.count(ExitReason::IoOut);
        let m = LiveExits::sum([&*a, &*b]);
        assert_eq!(m.get("io_out"), Some(&2));
        assert_eq!(m.get("hlt"), Some(&1));
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(s.counts[ExitReason::IoOut as usize], 2);
    }

    #[test]
    fn merges_vcpus_and_formats() {
        let mut a = VcpuStats::default();
        let mut b = VcpuStats::default();
        for _ in 0..3 {
            a.count(ExitReason::IoOut);
            a.count_pio(0x3f8);
        }
        b.count(ExitReason::IoOut);
        b.count_pio(0x3f8);
        b.count(ExitReason::MmioWrite);
        b.count_mmio(0xf000_0004);
        b.in_guest = Duration::from_millis(500);
        *b.emulated.entry("int3").or_default() += 2;
        let r = RunReport::new(
            "powered off".into(),
            0,
            Duration::from_secs(1),
            &[a, b],
            vec![],
        );
        assert_eq!(r.total_exits, 5);
        assert_eq!(r.exits["io_out"], 4);
        assert_eq!(r.exits["mmio_write"], 1);
        assert!(!r.exits.contains_key("hlt"));
        assert_eq!(r.pio_ports["0x3f8"], 4);
        assert_eq!(r.mmio_pages["0xf0000000"], 1);
        assert!((r.guest_share() - 0.25).abs() < 1e-9);
        let text = r.summary(&|p| (p == 0x3f8).then_some("serial"));
        assert!(text.contains("5 exits to userspace"), "{text}");
        assert!(text.contains("0x3f8 serial 4"), "{text}");
        assert!(text.contains("int3 2"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["exits"]["io_out"], 4);
        assert_eq!(ExitReason::ALL.len(), ExitReason::Other as usize + 1);
    }

    #[test]
    fn mmio_run_cache_and_tsc_time_by_reason() {
        let clock = TscClock::start();
        let mut v = VcpuStats::default();
        for a in [
            0xf000_0000u64,
            0xf000_0100,
            0xf000_0ffc,
            0xfee0_00b0,
            0xf000_0004,
        ] {
            v.count(ExitReason::MmioWrite);
            v.count_mmio(a);
            v.add_vmm_tsc(1000);
        }
        v.count(ExitReason::IoIn);
        v.add_vmm_tsc(500);
        v.guest_tsc = 1_000_000;
        // Pages are right before `finish` (the report adds the cached run) and after it.
        let r = RunReport::new("x".into(), 0, Duration::from_secs(1), &[v], vec![]);
        assert_eq!(r.mmio_pages["0xf0000000"], 4);
        assert_eq!(r.mmio_pages["0xfee00000"], 1);
        let mut v = VcpuStats::default();
        v.count(ExitReason::MmioRead);
        v.count_mmio(0xf000_0000);
        v.add_vmm_tsc(3000);
        v.count(ExitReason::IoIn);
        v.add_vmm_tsc(1000);
        v.guest_tsc = 1_000_000;
        v.finish(&clock);
        assert!(v.mmio_pages[&0xf000_0000] == 1 && v.mmio_run.1 == 0);
        let hz = clock.hz();
        assert!((1e8..1e11).contains(&hz), "{hz}");
        let ratio = v.in_vmm_by_reason[ExitReason::MmioRead as usize].as_secs_f64()
            / v.in_vmm_by_reason[ExitReason::IoIn as usize].as_secs_f64();
        assert!((ratio - 3.0).abs() < 0.01, "{ratio}");
        assert!(v.in_guest > v.in_vmm);
        let r = RunReport::new("x".into(), 0, Duration::from_secs(1), &[v], vec![]);
        assert_eq!(r.mmio_pages["0xf0000000"], 1);
        assert_eq!(r.vmm_ns_by_exit.len(), 2);
        assert!(r.vmm_ns_by_exit["mmio_read"] > r.vmm_ns_by_exit["io_in"]);
    }
}
