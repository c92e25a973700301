//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! Owns the KVM VM file descriptor, guest memory, the device buses and the vCPU threads. The
//! order of construction follows what KVM requires: VM, irqchip and PIT, memory, boot data (ACPI,
//! kernel), devices, then vCPUs (CPUID and MSRs before the first `KVM_RUN`). The main thread then
//! only waits for a [`VmEnd`], a signal or the time limit, stops the vCPUs and writes the report.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::nested::{self, HwVirt};
use crate::arch::x86_64::{acpi, boot, cpuid, irq_path, layout, msr};
use crate::config::{KernelSource, VmConfig};
use crate::devices::legacy::{debug_exit, i8042, pm, probe, rtc, serial};
use crate::devices::{Bus, BusDevice, VmEnd};
use crate::host::{GuestFailureHint, GuestFailureKind, HostInfo};
use crate::stats::{DeviceFact, RunReport, VcpuStats};
use crate::vcpu::{self, Vcpu, VcpuShared};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Kvm(String),
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("{0}")]
    Config(String),
}

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> VmmError + '_ {
    move |e| VmmError::Kvm(format!("{what}: {e}"))
}

/// Opens /dev/kvm with an error a user can act on.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(|e| {
        VmmError::Kvm(match e.errno() {
            libc::ENOENT => {
                "/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, \
                 or enable nested virtualization for this VM)"
                    .into()
            }
            libc::EACCES | libc::EPERM => {
                "no permission to open /dev/kvm: run as root or add your user \
                 to the 'kvm' group"
                    .into()
            }
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}

/// One line for `exitless host`: the hardware virtualization guests get by default.
pub fn nested_line(kvm: &Kvm, host: &HostInfo) -> String {
    let offered = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| nested::offered(c.as_slice()));
    match nested::resolve(nested::NestedMode::Auto, offered, host.is_pvm()) {
        Ok(Some(hw)) => format!(
            "nested virtualization: {} given to guests (--nested off hides it)",
            hw.name()
        ),
        _ if host.is_pvm() => "nested virtualization: none (PVM has no VMX or SVM to give)".into(),
        _ => "nested virtualization: none (the host KVM offers no SVM or VMX to guests; nested=1?)"
            .into(),
    }
}

/// One line for `exitless host`: the interrupt-completion path and KVM PV features guests get by
/// default.
pub fn irq_path_line(kvm: &Kvm, host: &HostInfo) -> String {
    let Ok(supported) = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) else {
        return "interrupt completion: unknown (cannot read KVM's supported CPUID)".into();
    };
    let mut guest = supported.clone();
    cpuid::filter_cpuid(&mut guest, 0, 1, &host.cpuid_quirks());
    let host_apic = crate::apicv::HostApic::detect(host.kvm_module);
    let path = irq_path::resolve(
        Default::default(),
        irq_path::offered(supported.as_slice()),
        host_apic.x2apic_inhibits(),
    )
    .unwrap_or(irq_path::IrqPath {
        x2apic: false,
        pv_eoi: false,
    });
    let pv = cpuid::kvm_pv_features(guest.as_slice());
    format!(
        "interrupt completion: {} (--x2apic/--pv-eoi off hide them); KVM PV features given: {}\n\
         interrupt delivery: {}",
        path.describe(),
        if pv.is_empty() {
            "none".to_string()
        } else {
            pv.join(" ")
        },
        host_apic.assess(path.x2apic).describe()
    )
}

/// How a run ended.
pub struct RunOutcome {
    pub report: RunReport,
    /// Lines the guest printed last (for diagnostics).
    pub console_tail: Vec<String>,
    /// A one-sentence explanation of a guest failure this host causes, if recognised.
    pub explanation: Option<String>,
}

/// Process exit status for each way a VM ends.
pub fn exit_status(end: &VmEnd, cfg: &VmConfig) -> i32 {
    match end {
        VmEnd::PowerOff => 0,
        VmEnd::Reset | VmEnd::TripleFault => cfg.reboot_status,
        VmEnd::DebugExit(v) => debug_exit::status(*v),
        VmEnd::GuestPanic(_) => 2,
        VmEnd::Error(_) => 1,
        VmEnd::Timeout => 124,
        VmEnd::Stopped => 0,
        VmEnd::Interrupted => 130,
    }
}

pub fn describe_end(end: &VmEnd) -> String {
    match end {
        VmEnd::PowerOff => "guest powered off".into(),
        VmEnd::Reset => "guest rebooted".into(),
        VmEnd::TripleFault => "guest triple-faulted (reset)".into(),
        VmEnd::DebugExit(v) => format!("guest wrote {v:#x} to the debug-exit port"),
        VmEnd::GuestPanic(line) => format!("guest kernel panicked: {}", line.trim()),
        VmEnd::Error(e) => format!("VM failed: {e}"),
        VmEnd::Timeout => "time limit reached".into(),
        VmEnd::Stopped => "stopped through the control API".into(),
        VmEnd::Interrupted => "interrupted".into(),
    }
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// The in-kernel devices and KVM capabilities exitless cannot run without.
fn check_caps(kvm: &Kvm) -> Result<(), VmmError> {
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Pit2, "in-kernel PIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::Kvm(format!(
                "this host's KVM lacks {name}, which exitless needs"
            )));
        }
    }
    Ok(())
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region stays mapped for as long as the VM exists: `mem` is kept alive in
        // the vCPU threads' shared state until they have been joined.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("registering guest memory"))?;
    }
    Ok(())
}

/// How long the end of a run waits for the console writer to write a byte before it leaves the
/// rest unwritten (a stdout nobody reads).
const CONSOLE_PATIENCE: Duration = Duration::from_secs(2);

/// Devices whose counters end up in the report.
struct DeviceCounters {
    probe: Option<(Arc<probe::ProbeCounters>, EventFd, EventFd)>,
    console: Arc<Mutex<serial::ConsoleWatch>>,
    console_queue: Arc<serial::ConsoleQueue>,
    /// What the console writer left behind (set once it is finished).
    console_totals: std::sync::OnceLock<serial::ConsoleTotals>,
    /// The PCI/virtio devices (their workers stop when this is dropped).
    virtio: Option<Arc<crate::devices::virtio::VirtioSet>>,
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
        }
        v.push(DeviceFact {
            device: "serial".into(),
            facts,
        });
        drop(console);
        if let Some(set) = &self.virtio {
            v.extend(set.facts());
        }
        v
    }

    /// Device workers that panicked.
    fn panics(&self) -> Vec<String> {
        self.virtio.as_ref().map(|s| s.panics()).unwrap_or_default()
    }

    /// Every device's facts, for the final report: the live ones with the probe's after the
    /// console's.
    fn facts(&self) -> Vec<DeviceFact> {
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
struct VmControl {
    started: Instant,
    counters: Arc<DeviceCounters>,
    kvm_stats: Arc<Vec<crate::kvm_stats::VcpuStatsFd>>,
    /// Each vCPU's exits to userspace by reason, as they happen.
    exits: Vec<Arc<crate::stats::LiveExits>>,
    /// Converts the vCPUs' TSC cycles in `KVM_RUN` to time.
    tsc: crate::stats::TscClock,
    /// In-kernel exits by reason (`--kernel-exit-reasons`), and where they come from.
    traces: crate::kvm_trace::Shared,
    kernel_reasons: String,
    quit: Arc<AtomicBool>,
}

impl VmControl {
    /// Each vCPU's counters: exits to userspace by reason, time in `KVM_RUN`, and KVM's own
    /// statistics where every vCPU has them (`exitless top`).
    fn vcpus(&self) -> Vec<serde_json::Value> {
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
                serde_json::json!({
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
    fn stats(&self) -> serde_json::Value {
        let devices: serde_json::Map<String, serde_json::Value> = self
            .counters
            .live_facts()
            .into_iter()
            .map(|f| (f.device, serde_json::json!(f.facts)))
            .collect();
        serde_json::json!({
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "exits": crate::stats::LiveExits::sum(self.exits.iter().map(|e| &**e)),
            "devices": devices,
            "kvm": crate::kvm_stats::sum(self.kvm_stats.iter()),
            "vcpus": self.vcpus(),
            "kernel_exit_reasons": self.kernel_reasons,
        })
    }

    fn set_balloon(&self, bytes: u64) -> Result<u32, String> {
        match &self.counters.virtio {
            Some(set) => set.set_balloon_target(bytes),
            None => Err("this VM has no balloon (start it with --balloon)".into()),
        }
    }

    fn quit(&self) {
        self.quit.store(true, Ordering::SeqCst);
    }
}

/// The name of the device at `port`, for the summary.
pub fn port_name(port: u16) -> Option<&'static str> {
    use layout::ports::*;
    Some(match port {
        COM1..=0x3ff => "serial",
        RTC..=0x71 => "rtc",
        I8042_DATA | I8042_CMD => "i8042",
        DEBUG_EXIT => "debug-exit",
        PM_BASE..=0x60f => "acpi-pm",
        RESET_CF9 => "reset",
        PROBE..=0x51f => "probe",
        0x40..=0x43 | 0x61 => "pit",
        0x20 | 0x21 | 0xa0 | 0xa1 => "pic",
        _ => return None,
    })
}

/// Builds and runs the VM; returns when it has ended and every vCPU thread has been joined.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmmError> {
    let mut clock = crate::startup::StartupClock::new();
    clock.mark("main");
    // The user's files first: their errors are the likeliest and need no KVM to report.
    if let KernelSource::File(p) = &cfg.kernel {
        std::fs::File::open(p).map_err(|err| boot::BootError::OpenKernel {
            path: p.display().to_string(),
            err,
        })?;
    }
    if let Some(p) = &cfg.initrd {
        std::fs::File::open(p).map_err(|err| boot::BootError::OpenInitrd {
            path: p.display().to_string(),
            err,
        })?;
    }
    // Compiled now, installed by each thread once its set-up is done (see `seccomp`).
    crate::seccomp::init(cfg.seccomp, cfg.seccomp_selftest.as_deref()).map_err(VmmError::Config)?;
    let kvm = open_kvm()?;
    check_caps(&kvm)?;
    let host = HostInfo::detect(&kvm);
    if let Some(b) = host.banner() {
        eprintln!("exitless: {b}");
    }
    clock.mark("host_detect");
    let max_cpus = kvm.get_max_vcpus().min(254);
    if cfg.cpus == 0 || cfg.cpus as usize > max_cpus {
        return Err(VmmError::Config(format!(
            "--cpus must be between 1 and {max_cpus} on this host (got {})",
            cfg.cpus
        )));
    }

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reading supported CPUID"))?;
    let hw_virt = nested::resolve(
        cfg.nested,
        nested::offered(supported.as_slice()),
        host.is_pvm(),
    )
    .map_err(VmmError::Config)?;
    let host_apic = crate::apicv::HostApic::detect(host.kvm_module);
    let irq_path = irq_path::resolve(
        cfg.irq_path,
        irq_path::offered(supported.as_slice()),
        host_apic.x2apic_inhibits(),
    )
    .map_err(VmmError::Config)?;
    let apic_virt = host_apic.assess(irq_path.x2apic);
    let vmx_msrs = match hw_virt {
        Some(HwVirt::Vmx) => nested::vmx_capability_msrs(&kvm).map_err(VmmError::Kvm)?,
        _ => Vec::new(),
    };

    // Before guest RAM exists: pages are charged to the cgroup of the task that first touches them.
    let mem_cgroup = cfg
        .mem_limit
        .as_ref()
        .map(crate::memlimit::MemCgroup::enter)
        .transpose()
        .map_err(VmmError::Config)?;
    let mem = crate::memory::create(cfg.mem_bytes)?;
    let (low_ram, high_ram) = crate::memory::split(cfg.mem_bytes);
    let vm = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("setting the TSS address"))?;
    vm.set_identity_map_address(0xfffb_c000)
        .map_err(kvm_err("setting the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("creating the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("creating the in-kernel PIT"))?;
    if apic_virt.pit_reinject_off {
        if let Err(e) = crate::apicv::set_pit_reinject(&vm, false) {
            log::warn!("cannot turn PIT reinjection off (it inhibits AVIC): {e}");
        }
    }
    let dedicated = set_up_dedicated_cores(&vm, cfg, host.is_pvm())?;
    if let Some(ns) = cfg.halt_poll_ns {
        crate::dedicated::set_halt_poll(&vm, ns).map_err(VmmError::Config)?;
    }
    register_memory(&vm, &mem)?;
    clock.mark("vm_and_memory");

    // Boot data.
    let rsdp = acpi::setup_acpi_tables(
        &mem,
        &acpi::AcpiConfig {
            num_cpus: cfg.cpus,
            pci_ecam: cfg.virtio.any().then(crate::devices::virtio::ecam_region),
            dmar: (cfg.virtio.any() && cfg.virtio.iommu.is_some())
                .then(crate::devices::iommu::register_base),
        },
    )?;
    clock.mark("acpi");
    let (kernel_path, kernel_bytes) = match &cfg.kernel {
        KernelSource::File(p) => (p.clone(), None),
        KernelSource::Embedded(name) => {
            let (_, bytes) = crate::kit::get(name)
                .ok_or_else(|| VmmError::Config(format!("no embedded guest named {name:?}")))?;
            (PathBuf::from(format!("<embedded {name}>")), Some(bytes))
        }
    };
    let loaded = boot::load(
        &mem,
        &boot::BootSpec {
            kernel: &kernel_path,
            kernel_bytes,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cfg.cmdline,
            low_ram,
            high_ram,
            rsdp,
            pci_ecam: cfg.virtio.any(),
            unpack_bzimage: cfg.unpack_bzimage,
        },
        &mut clock,
    )?;
    log::info!(
        "kernel {:?} loaded, entry {:?}",
        loaded.format,
        loaded.entry
    );

    clock.mark("boot_data");
    // Devices.
    let (end_tx, end_rx) = mpsc::channel::<VmEnd>();
    let console_watch = Arc::new(Mutex::new(serial::ConsoleWatch::default()));
    let log_file = match &cfg.console_log {
        Some(p) => Some(serial::CappedLog::new(
            Box::new(std::fs::File::create(p).map_err(|e| {
                VmmError::Config(format!("cannot create console log {}: {e}", p.display()))
            })?),
            cfg.console_log_max,
        )),
        None => None,
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
    vm.register_irqfd(&serial_irq, layout::ports::COM1_IRQ)
        .map_err(kvm_err("wiring the serial interrupt"))?;
    let console_writer = serial::ConsoleWriter::start(
        Some(Box::new(std::io::stdout())),
        log_file,
        usize::try_from(cfg.console_buffer).unwrap_or(usize::MAX),
    )
    .map_err(|e| VmmError::Kvm(format!("cannot start the console writer: {e}")))?;
    let serial = Arc::new(Mutex::new(serial::Serial::new(
        serial_irq,
        serial::ConsoleOut::new(
            Some(console_writer.queue()),
            console_watch.clone(),
            end_tx.clone(),
        ),
    )));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let bus_err = |e: crate::devices::BusError| VmmError::Config(e.to_string());
    use layout::ports;
    pio.insert("serial", ports::COM1 as u64, 8, serial.clone())
        .map_err(bus_err)?;
    pio.insert(
        "rtc",
        ports::RTC as u64,
        2,
        Arc::new(Mutex::new(rtc::Rtc::new())),
    )
    .map_err(bus_err)?;
    pio.insert(
        "i8042",
        ports::I8042_DATA as u64,
        5,
        Arc::new(Mutex::new(i8042::I8042::new(end_tx.clone()))),
    )
    .map_err(bus_err)?;
    pio.insert(
        "acpi-pm",
        ports::PM_BASE as u64,
        ports::PM_LEN as u64,
        Arc::new(Mutex::new(pm::Pm::new(end_tx.clone()))),
    )
    .map_err(bus_err)?;
    pio.insert(
        "reset",
        ports::RESET_CF9 as u64,
        1,
        Arc::new(Mutex::new(pm::ResetControl::new(end_tx.clone()))),
    )
    .map_err(bus_err)?;
    if cfg.debug_exit {
        pio.insert(
            "debug-exit",
            ports::DEBUG_EXIT as u64,
            4,
            Arc::new(Mutex::new(debug_exit::DebugExit::new(end_tx.clone()))),
        )
        .map_err(bus_err)?;
    }
    let probe_counters = if cfg.probe {
        let c = Arc::new(probe::ProbeCounters::default());
        let p: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(probe::Probe::pio(c.clone())));
        pio.insert("probe", ports::PROBE as u64, ports::PROBE_LEN as u64, p)
            .map_err(bus_err)?;
        let m: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(probe::Probe::mmio(c.clone())));
        mmio.insert(
            "probe",
            layout::PROBE_MMIO_START,
            layout::PROBE_MMIO_SIZE,
            m,
        )
        .map_err(bus_err)?;
        let pio_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
        let mmio_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
        vm.register_ioevent(
            &pio_evt,
            &IoEventAddress::Pio(ports::PROBE as u64 + probe::PIO_EVENTFD_OFFSET),
            kvm_ioctls::NoDatamatch,
        )
        .map_err(kvm_err("registering the probe's PIO ioeventfd"))?;
        vm.register_ioevent(
            &mmio_evt,
            &IoEventAddress::Mmio(layout::PROBE_MMIO_START + probe::MMIO_EVENTFD_OFFSET),
            kvm_ioctls::NoDatamatch,
        )
        .map_err(kvm_err("registering the probe's MMIO ioeventfd"))?;
        Some((c, pio_evt, mmio_evt))
    } else {
        None
    };
    let virtio = crate::devices::virtio::build(&kvm, &vm, &mem, &cfg.virtio, &mut pio, &mut mmio)
        .map_err(VmmError::Config)?;
    let counters = Arc::new(DeviceCounters {
        virtio: virtio.map(Arc::new),
        probe: probe_counters,
        console: console_watch.clone(),
        console_queue: console_writer.queue(),
        console_totals: std::sync::OnceLock::new(),
    });

    // Let KVM hand us instructions its emulator cannot run (PVM hosts), so we can complete them.
    if vm.check_extension_raw(kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE as u64) > 0 {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = vm.enable_cap(&cap) {
            log::warn!("cannot enable exit-on-emulation-failure: {e}");
        }
    }

    clock.mark("devices");

    // vCPUs.
    let msr_list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("reading the MSR list"))?;
    let quirks = host.cpuid_quirks();
    let stop = Arc::new(AtomicBool::new(false));
    let shared = VcpuShared {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        mem: mem.clone(),
        end: end_tx.clone(),
        stop: stop.clone(),
        unclaimed: Arc::new(Mutex::new(HashSet::new())),
        complete_failed_emulation: true,
        sample_rips: cfg.sample_rips,
        complete_stuck_hypercalls: host.is_pvm(),
        first_run: clock.first_run.clone(),
    };
    let mut vcpus = Vec::new();
    // KVM's own counters of each vCPU (None where the host has no binary statistics); the
    // descriptors stay open after the vCPU threads end, for the report.
    let mut kvm_stats_fds = Vec::new();
    let mut live_exits = Vec::new();
    for id in 0..cfg.cpus {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("creating a vCPU"))?;
        let mut c = supported.clone();
        cpuid::filter_cpuid(&mut c, id, cfg.cpus, &quirks);
        if hw_virt.is_none() {
            nested::hide(&mut c);
        }
        irq_path::apply(&mut c, irq_path);
        if let Some((_, mask)) = &dedicated {
            crate::dedicated::apply_cpuid(&mut c, *mask);
        }
        fd.set_cpuid2(&c).map_err(kvm_err("setting CPUID"))?;
        nested::set_vmx_capability_msrs(&fd, &vmx_msrs).map_err(VmmError::Kvm)?;
        let msrs = msr::boot_msr_entries(msr_list.as_slice());
        match fd.set_msrs(&msrs) {
            Ok(n) if n == msrs.as_slice().len() => {}
            Ok(n) => log::debug!("host accepted {n} of {} boot MSRs", msrs.as_slice().len()),
            Err(e) => log::warn!("setting boot MSRs: {e}"),
        }
        set_lint(&fd).map_err(kvm_err("setting up the local APIC"))?;
        if id == 0 {
            let mut sregs = fd.get_sregs().map_err(kvm_err("reading sregs"))?;
            boot::boot_sregs(&mem, loaded.entry, &mut sregs)?;
            fd.set_sregs(&sregs).map_err(kvm_err("setting sregs"))?;
            fd.set_regs(&boot::boot_regs(loaded.entry))
                .map_err(kvm_err("setting registers"))?;
            fd.set_fpu(&boot::boot_fpu())
                .map_err(kvm_err("setting the FPU"))?;
        }
        kvm_stats_fds.extend(crate::kvm_stats::VcpuStatsFd::open(&fd));
        let mut vcpu = Vcpu::new(id, fd, shared.clone());
        if cfg.api_socket.is_some() {
            let live = Arc::new(crate::stats::LiveExits::default());
            vcpu.share_exit_counts(live.clone());
            live_exits.push(live);
        }
        vcpus.push(vcpu);
    }

    clock.mark("vcpus");
    let kvm_stats_fds = Arc::new(kvm_stats_fds);
    let quit = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // With dedicated cores, the threads started from here on (control API, device launcher and
    // workers, console) inherit the main thread's CPUs, away from the vCPUs'.
    if let Some((d, _)) = &dedicated {
        if !d.placement.vmm_cpus.is_empty() {
            crate::dedicated::set_thread_affinity(&d.placement.vmm_cpus)
                .map_err(|e| VmmError::Config(format!("--dedicated-cores: {e}")))?;
        }
    }
    let (trace, kernel_reasons) = kernel_exit_reasons(cfg, &host);
    let traces: crate::kvm_trace::Shared =
        Arc::new((0..cfg.cpus).map(|_| std::sync::OnceLock::new()).collect());
    let _api = match &cfg.api_socket {
        Some(path) => Some(
            crate::api::ApiServer::start(
                path,
                Arc::new(VmControl {
                    started,
                    counters: counters.clone(),
                    kvm_stats: kvm_stats_fds.clone(),
                    exits: live_exits,
                    tsc: crate::stats::TscClock::start(),
                    traces: traces.clone(),
                    kernel_reasons: kernel_reasons.clone(),
                    quit: quit.clone(),
                }),
            )
            .map_err(VmmError::Config)?,
        ),
        None => None,
    };

    vcpu::install_kick_handler().map_err(|e| VmmError::Kvm(format!("signal handler: {e}")))?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }

    // Device workers start (at DRIVER_OK, on a vCPU thread) through the launcher, under their
    // own filters (see `seccomp`).
    let launcher = crate::seccomp::start_launcher().map_err(VmmError::Kvm)?;
    let raw = crate::terminal::RawModeGuard::new();
    spawn_console_input(serial.clone(), end_tx.clone());
    let mut handles = Vec::new();
    for v in vcpus {
        let name = format!("vcpu{}", v.id);
        let end = end_tx.clone();
        let pin = dedicated
            .as_ref()
            .map(|(d, _)| d.placement.vcpu_cpus[usize::from(v.id)]);
        let trace = trace.map(|t| (t, traces.clone()));
        let h = std::thread::Builder::new()
            .name(name)
            .spawn(move || vcpu_thread(v, pin, trace, end))
            .map_err(|e| VmmError::Kvm(format!("cannot start a vCPU thread: {e}")))?;
        handles.push(h);
    }
    drop(end_tx);
    // From here on the main thread only waits, stops the VM and reports.
    crate::seccomp::apply(crate::seccomp::Kind::Main);
    // Periodic kicks: RIP samples, and on PVM hosts the chance to complete a stuck hypercall.
    let sampled: Vec<libc::pthread_t> = if cfg.sample_rips || host.is_pvm() {
        use std::os::unix::thread::JoinHandleExt;
        handles.iter().map(|h| h.as_pthread_t()).collect()
    } else {
        Vec::new()
    };

    // Wait for the end (kicking the vCPUs every 10 ms with --sample-rips, else every 50 ms where
    // they are kicked at all).
    let deadline = cfg.timeout.map(|t| started + t);
    let tick = Duration::from_millis(if cfg.sample_rips { 10 } else { 50 });
    let end = loop {
        for &p in &sampled {
            // SAFETY: the vCPU threads are joined only after this loop, so each pthread_t is
            // valid; the kick handler does nothing but interrupt KVM_RUN.
            unsafe { libc::pthread_kill(p, vcpu::kick_signal()) };
        }
        match end_rx.recv_timeout(tick) {
            Ok(e) => break e,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break VmEnd::Error("every vCPU stopped".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if SIGNALLED.swap(false, Ordering::SeqCst) {
            break VmEnd::Interrupted;
        }
        if quit.load(Ordering::SeqCst) {
            break VmEnd::Stopped;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break VmEnd::Timeout;
        }
    };
    let wall = started.elapsed();

    // Stop the vCPUs: set the flag, then kick until each thread has left KVM_RUN.
    stop.store(true, Ordering::Release);
    let kick = |h: &VcpuThread| {
        use std::os::unix::thread::JoinHandleExt;
        // SAFETY: the thread has not been joined, so its pthread_t is valid.
        unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
    };
    let (stats, problems) = stop_vcpus(handles, &kick, Duration::from_millis(2));
    for p in &problems {
        eprintln!("exitless: {p}");
    }
    drop(raw);
    if let Some(set) = &counters.virtio {
        set.shutdown();
    }
    drop(launcher);
    crate::ratelimit::flush();

    let mut status = exit_status(&end, cfg);
    if !problems.is_empty() && status == 0 {
        // A vCPU lost or panicked: whatever the guest did, this run is not a success.
        status = 1;
    }
    // The guest's last output reaches stdout before the summary (unless stdout is stalled).
    let _ = counters
        .console_totals
        .set(console_writer.finish(CONSOLE_PATIENCE));
    let mut report = RunReport::new(describe_end(&end), status, wall, &stats, counters.facts());
    // Read after every vCPU thread has been joined: the counters are final.
    report.kvm = crate::kvm_stats::sum(kvm_stats_fds.iter());
    report.startup = clock.finish();
    report.panics.extend(problems);
    report.panics.extend(counters.panics());
    report.nested = hw_virt.map(|h| h.name().to_string());
    if let Some(cg) = &mem_cgroup {
        report.devices.push(crate::stats::DeviceFact {
            device: "memory-cgroup".into(),
            facts: cg.facts().into_iter().map(|(k, v)| (k.into(), v)).collect(),
        });
    }
    report.irq_path = Some(irq_path);
    report.apic_virt = Some(apic_virt);
    report.dedicated = dedicated.map(|(d, _)| d);
    report.halt_poll_ns = cfg.halt_poll_ns;
    report.kvm.extend(crate::kvm_trace::sum(&traces));
    report.kernel_exit_reasons = Some(kernel_reasons);
    report.rates = Some(report.compute_rates());
    drop(kvm_stats_fds);
    let console_tail = console_watch
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lines();
    let kind = match &end {
        VmEnd::PowerOff | VmEnd::DebugExit(_) | VmEnd::Interrupted | VmEnd::Stopped => None,
        VmEnd::Timeout => Some(GuestFailureKind::Hung),
        VmEnd::Reset | VmEnd::TripleFault | VmEnd::GuestPanic(_) => {
            Some(GuestFailureKind::Shutdown)
        }
        VmEnd::Error(_) => Some(GuestFailureKind::Internal),
    };
    let tail_text = console_tail.join("\n");
    let explanation = kind.and_then(|kind| {
        host.explain_guest_failure(&GuestFailureHint {
            console_tail: &tail_text,
            kind,
        })
    });
    Ok(RunOutcome {
        report,
        console_tail,
        explanation,
    })
}

type VcpuThread = std::thread::JoinHandle<VcpuStats>;

/// The `kvm:kvm_exit` tracepoint's id and the host's exit reasons.
type KernelTrace = (u64, crate::kvm_trace::Reasons);

/// `--kernel-exit-reasons`: what to count, and the sentence saying where the in-kernel reasons
/// come from (or why only KVM's aggregates are there).
fn kernel_exit_reasons(cfg: &VmConfig, host: &HostInfo) -> (Option<KernelTrace>, String) {
    if !cfg.kernel_exit_reasons {
        return (
            None,
            "KVM's aggregate statistics only (--kernel-exit-reasons counts them by reason)".into(),
        );
    }
    match crate::kvm_trace::prepare(host.kvm_module) {
        Ok(t) => (
            Some(t),
            "kvm:kvm_exit tracepoint, counted per vCPU thread".into(),
        ),
        Err(e) => {
            eprintln!("exitless: --kernel-exit-reasons: {e}; only KVM's aggregate counters");
            (None, format!("KVM's aggregate statistics only ({e})"))
        }
    }
}

/// `--dedicated-cores`: the placement and the exits kept in the guest (`KVM_CAP_X86_DISABLE_EXITS`,
/// which KVM takes only before the first vCPU exists), with the mask for the CPUID hints.
fn set_up_dedicated_cores(
    vm: &VmFd,
    cfg: &VmConfig,
    pvm: bool,
) -> Result<Option<(crate::dedicated::Dedicated, u32)>, VmmError> {
    use crate::dedicated as d;
    let Some(req) = &cfg.dedicated else {
        return Ok(None);
    };
    let offered = vm.check_extension_raw(kvm_bindings::KVM_CAP_X86_DISABLE_EXITS.into());
    let mask =
        d::exits_to_disable(u32::try_from(offered).unwrap_or(0), pvm).map_err(VmmError::Config)?;
    let allowed = d::allowed_cpus().map_err(VmmError::Config)?;
    let placement =
        d::place(req.cpus.as_deref(), &allowed, cfg.cpus.into()).map_err(VmmError::Config)?;
    d::disable_exits(vm, mask).map_err(VmmError::Config)?;
    Ok(Some((
        d::Dedicated {
            placement,
            exits_disabled: d::exit_names(mask),
        },
        mask,
    )))
}

/// Kicks before a vCPU thread that stays in `KVM_RUN` is given up on (5 s at 2 ms).
const STOP_KICKS: u32 = 2500;

/// Joins the vCPU threads (the stop flag is set), kicking each out of `KVM_RUN` every
/// `interval`, at most [`STOP_KICKS`] times. Returns the counters of the threads that ended and,
/// per vCPU, what went wrong (a panic, or a thread given up on: it is left running, detached,
/// and ends with the process).
fn stop_vcpus(
    handles: Vec<VcpuThread>,
    kick: &dyn Fn(&VcpuThread),
    interval: Duration,
) -> (Vec<VcpuStats>, Vec<String>) {
    let mut stats = Vec::new();
    let mut problems = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let mut kicks = 0;
        while !h.is_finished() && kicks < STOP_KICKS {
            kick(&h);
            kicks += 1;
            std::thread::sleep(interval);
        }
        if !h.is_finished() {
            problems.push(format!(
                "vcpu{i} did not leave KVM_RUN after {STOP_KICKS} kicks; its counters are missing"
            ));
            continue;
        }
        match h.join() {
            Ok(s) => stats.push(s),
            Err(p) => problems.push(format!(
                "vcpu{i} panicked: {}; its counters are missing",
                crate::panics::payload_text(&*p)
            )),
        }
    }
    (stats, problems)
}

/// Runs one vCPU on its thread. A panic (a bug in exitless) ends the VM with an error instead
/// of leaving the other vCPUs running; the panic goes on to the join, which reports it.
/// With dedicated cores it first pins itself to its CPU (`pin`), and with
/// `--kernel-exit-reasons` opens its tracepoint counters (`trace`), before its filter is on.
fn vcpu_thread(
    v: Vcpu,
    pin: Option<usize>,
    trace: Option<(KernelTrace, crate::kvm_trace::Shared)>,
    end: crate::devices::VmEndSender,
) -> VcpuStats {
    let id = v.id;
    if let Some(((tp, reasons), shared)) = trace {
        match crate::kvm_trace::ExitCounters::open_for_this_thread(tp, reasons) {
            Ok(c) => {
                let _ = shared[usize::from(id)].set(c);
            }
            Err(e) => log::warn!("vCPU {id}: no in-kernel exit reasons: {e}"),
        }
    }
    if let Some(cpu) = pin {
        if let Err(e) = crate::dedicated::set_thread_affinity(&[cpu]) {
            let _ = end.send(VmEnd::Error(format!("vCPU {id}: --dedicated-cores: {e}")));
        }
    }
    // The vCPU's descriptors and its kvm_run page were set up on the main thread.
    crate::seccomp::apply(crate::seccomp::Kind::Vcpu);
    match crate::panics::catch(|| v.run()) {
        Ok(s) => s,
        Err(msg) => {
            let _ = end.send(VmEnd::Error(format!("vCPU {id} panicked")));
            std::panic::resume_unwind(Box::new(msg))
        }
    }
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware leaves them.
fn set_lint(fd: &kvm_ioctls::VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic()?;
    let get = |regs: &[std::os::raw::c_char], off: usize| -> u32 {
        let b: [u8; 4] = std::array::from_fn(|i| regs[off + i] as u8);
        u32::from_le_bytes(b)
    };
    let set = |regs: &mut [std::os::raw::c_char], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    let lvt0 = get(&lapic.regs, APIC_LVT0);
    set(
        &mut lapic.regs,
        APIC_LVT0,
        (lvt0 & !0x700) | (MODE_EXTINT << 8),
    );
    let lvt1 = get(&lapic.regs, APIC_LVT1);
    set(
        &mut lapic.regs,
        APIC_LVT1,
        (lvt1 & !0x700) | (MODE_NMI << 8),
    );
    fd.set_lapic(&lapic)
}

/// Copies host stdin into the UART. Ctrl-A x ends the VM (as in QEMU); Ctrl-A Ctrl-A sends one
/// Ctrl-A. When stdin ends, the guest simply gets no more input.
fn spawn_console_input(serial: Arc<Mutex<serial::Serial>>, end: mpsc::Sender<VmEnd>) {
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::Kind::Console);
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut bytes = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                let _ = end.send(VmEnd::Interrupted);
                                return;
                            }
                            0x01 => bytes.push(0x01),
                            _ => {}
                        }
                    } else if b == 0x01 {
                        escape = true;
                    } else {
                        bytes.push(b);
                    }
                }
                let mut rest: &[u8] = &bytes;
                while !rest.is_empty() {
                    let k = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue(rest);
                    rest = &rest[k..];
                    if !rest.is_empty() {
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cfg = VmConfig {
            kernel: KernelSource::Embedded("demo"),
            initrd: None,
            cmdline: String::new(),
            mem_bytes: 64 << 20,
            cpus: 1,
            debug_exit: true,
            probe: true,
            stats_json: None,
            summary: true,
            reboot_status: 0,
            timeout: None,
            console_log: None,
            console_log_max: 64 << 20,
            console_buffer: 1 << 20,
            unpack_bzimage: true,
            sample_rips: false,
            virtio: Default::default(),
            api_socket: None,
            nested: Default::default(),
            irq_path: Default::default(),
            dedicated: None,
            halt_poll_ns: None,
            kernel_exit_reasons: false,
            seccomp: Default::default(),
            seccomp_selftest: None,
            mem_limit: None,
        };
        assert_eq!(exit_status(&VmEnd::PowerOff, &cfg), 0);
        assert_eq!(exit_status(&VmEnd::Reset, &cfg), 0);
        assert_eq!(exit_status(&VmEnd::DebugExit(0), &cfg), 1);
        assert_eq!(exit_status(&VmEnd::GuestPanic("x".into()), &cfg), 2);
        assert_ne!(exit_status(&VmEnd::Error("x".into()), &cfg), 0);
        assert_eq!(port_name(0x3fd), Some("serial"));
        assert_eq!(port_name(0x1234), None);
    }

    #[test]
    fn a_panicked_vcpu_is_named_not_counted_as_zero() {
        let ok = std::thread::spawn(VcpuStats::default);
        let bad = std::thread::spawn(|| -> VcpuStats { panic!("vCPU bug") });
        // Both have ended (a zero wait gives up on any thread still running, loaded host or not).
        while !bad.is_finished() || !ok.is_finished() {
            std::thread::yield_now();
        }
        let (stats, problems) = stop_vcpus(vec![ok, bad], &|_| {}, Duration::ZERO);
        assert_eq!(stats.len(), 1, "only the vCPU that ended has counters");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("vcpu1 panicked: vCPU bug"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_vcpu_that_never_leaves_kvm_run_is_given_up_on() {
        let (tx, rx) = mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            // Leaves only after far more kicks than the stop allows.
            let _ = rx.recv();
            VcpuStats::default()
        });
        let kicks = std::sync::atomic::AtomicU32::new(0);
        let kick = |_: &VcpuThread| {
            if kicks.fetch_add(1, Ordering::SeqCst) + 1 == 10 * STOP_KICKS {
                let _ = tx.send(());
            }
        };
        let (stats, problems) = stop_vcpus(vec![stuck], &kick, Duration::ZERO);
        assert_eq!(kicks.load(Ordering::SeqCst), STOP_KICKS);
        assert!(stats.is_empty());
        assert!(
            problems[0].contains("vcpu0 did not leave KVM_RUN"),
            "{problems:?}"
        );
    }
}
