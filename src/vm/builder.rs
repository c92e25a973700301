//! Builds a [`Vm`] from a [`VmConfig`], step by step, in the order KVM requires: the user's
//! files checked, the host's KVM opened and its features chosen ([`Platform`]), the VM with its
//! irqchip and PIT, guest memory, boot data (ACPI, kernel), devices, then vCPUs (CPUID and MSRs
//! before the first `KVM_RUN`). Each step is one function.
//!
//! A restore ([`VmBuilder::restore`]) takes the same steps from a loaded snapshot: guest memory
//! is the snapshot's memory file mapped lazily instead of fresh RAM, no boot data is loaded, and
//! once the devices and vCPUs exist their saved states are set ([`restore_state`]), kvmclock
//! last.
//!
//! Owns nothing once the build is done: everything it makes is handed to the [`Vm`]. It may touch
//! KVM (the VM and vCPU descriptors), guest memory and the device buses.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::control::DeviceCounters;
use super::threads::KernelTrace;
use super::Vm;
use crate::arch::x86_64::nested::{self, HwVirt};
use crate::arch::x86_64::{acpi, boot, cpuid, irq_path, layout, msr};
use crate::config::{KernelSource, VmConfig};
use crate::devices::legacy::{debug_exit, i8042, pm, probe, rtc, serial};
use crate::devices::{Bus, BusDevice, VmEnd};
use crate::host::HostInfo;
use crate::lifecycle::{KvmClock, Lifecycle, VcpuMailbox};
use crate::startup::StartupClock;
use crate::vcpu::{Vcpu, VcpuShared};
use crate::vmm::{open_kvm, VmmError};

fn kvm_err(what: &str) -> impl Fn(kvm_ioctls::Error) -> VmmError + '_ {
    move |e| VmmError::Kvm(format!("{what}: {e}"))
}

/// What the host's KVM offers and the configuration chose from it.
pub(crate) struct Platform {
    pub host: HostInfo,
    pub supported: CpuId,
    pub hw_virt: Option<HwVirt>,
    pub irq_path: irq_path::IrqPath,
    pub apic_virt: crate::apicv::ApicVirt,
    pub vmx_msrs: Vec<kvm_bindings::kvm_msr_entry>,
}

/// The legacy devices' buses and what the VM keeps of them.
struct LegacyDevices {
    pio: Bus,
    mmio: Bus,
    /// The ACPI PM block, whose power button the API presses.
    power: Arc<Mutex<pm::Pm>>,
    serial: Arc<Mutex<serial::Serial>>,
    console_watch: Arc<Mutex<serial::ConsoleWatch>>,
    console_writer: serial::ConsoleWriter,
    probe: Option<(Arc<probe::ProbeCounters>, EventFd, EventFd)>,
}

/// Builds a [`Vm`] from its configuration (`VmBuilder::new(cfg).build()`).
pub struct VmBuilder<'a> {
    cfg: &'a VmConfig,
    clock: StartupClock,
    restore: Option<crate::snapshot::Loaded>,
}

impl<'a> VmBuilder<'a> {
    pub fn new(cfg: &'a VmConfig) -> Self {
        let mut clock = StartupClock::new();
        clock.mark("main");
        VmBuilder {
            cfg,
            clock,
            restore: None,
        }
    }

    /// A VM restored from a loaded snapshot (its `cfg` made from the snapshot's machine).
    pub fn restore(cfg: &'a VmConfig, snapshot: crate::snapshot::Loaded) -> Self {
        let mut b = Self::new(cfg);
        b.restore = Some(snapshot);
        b
    }

    /// Every step of the build; the VM is `Created` (no vCPU has run).
    pub fn build(mut self) -> Result<Vm, VmmError> {
        let cfg = self.cfg;
        check_user_files(cfg)?;
        // Compiled now, installed by each thread once its set-up is done (see `seccomp`).
        crate::seccomp::init(cfg.seccomp, cfg.seccomp_selftest.as_deref())
            .map_err(VmmError::Config)?;
        let kvm = open_kvm()?;
        check_caps(&kvm)?;
        let platform = Platform::choose(&kvm, cfg)?;
        if let Some(s) = &self.restore {
            let here = crate::snapshot::HostIdentity::current(&platform.host);
            s.state
                .host
                .check(&here)
                .map_err(|e| VmmError::Config(e.to_string()))?;
        }
        self.clock.mark("host_detect");
        // Before guest RAM exists: pages are charged to the cgroup of the task that first
        // touches them.
        let mem_cgroup = cfg
            .mem_limit
            .as_ref()
            .map(crate::memlimit::MemCgroup::enter)
            .transpose()
            .map_err(VmmError::Config)?;
        let mem = match &self.restore {
            Some(s) => crate::memory::map_file(cfg.mem_bytes, &s.memory_file)?,
            None => crate::memory::create(cfg.mem_bytes)?,
        };
        let (vm, dedicated) = create_vm(&kvm, cfg, &platform)?;
        register_memory(&vm, &mem)?;
        self.clock.mark("vm_and_memory");
        let entry = match self.restore {
            Some(_) => None,
            None => Some(self.load_boot_data(&mem)?),
        };
        // Before the first thread starts: each builds its restriction from this ruleset.
        let cgroup_rules = mem_cgroup
            .as_ref()
            .map(crate::memlimit::MemCgroup::landlock_rules)
            .unwrap_or_default();
        crate::sandbox::init(
            cfg.landlock,
            cfg,
            &cgroup_rules,
            cfg.landlock_selftest.as_deref(),
        )
        .map_err(VmmError::Config)?;
        let (end_tx, end_rx) = mpsc::channel::<VmEnd>();
        let mut legacy = legacy_devices(&vm, cfg, &end_tx)?;
        let virtio = crate::devices::virtio::build(
            &kvm,
            &vm,
            &mem,
            &cfg.virtio,
            &mut legacy.pio,
            &mut legacy.mmio,
        )
        .map_err(VmmError::Config)?;
        let devices = Arc::new(DeviceCounters {
            virtio: virtio.map(Arc::new),
            probe: legacy.probe.take(),
            console: legacy.console_watch.clone(),
            console_queue: legacy.console_writer.queue(),
            console_totals: std::sync::OnceLock::new(),
            power: legacy.power.clone(),
        });
        enable_emulation_failure_exits(&vm);
        self.clock.mark("devices");
        let vm = Arc::new(vm);
        let (lifecycle, mailboxes) = Lifecycle::new(cfg.cpus, Some(Box::new(KvmClock(vm.clone()))));
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(kvm_err("reading the MSR list"))?
            .as_slice()
            .to_vec();
        let shared = VcpuShared {
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(legacy.mmio),
            mem: mem.clone(),
            end: end_tx.clone(),
            unclaimed: Arc::new(Mutex::new(HashSet::new())),
            complete_failed_emulation: true,
            sample_rips: cfg.sample_rips,
            complete_stuck_hypercalls: platform.host.is_pvm(),
            first_run: self.clock.first_run.clone(),
            msr_index: Arc::new(msr_index),
            nested: platform.hw_virt.is_some(),
        };
        let (pio, mmio) = (shared.pio.clone(), shared.mmio.clone());
        let vcpus = create_vcpus(
            &vm,
            cfg,
            &platform,
            dedicated.as_ref().map(|(_, m)| *m),
            entry,
            shared,
            mailboxes,
        )?;
        self.clock.mark("vcpus");
        if let Some(s) = &self.restore {
            restore_state(&vm, &vcpus, (&pio, &mmio), s)?;
            self.clock.mark("restore_state");
        }
        let snapshot = super::SnapshotParts {
            vm: vm.clone(),
            mem: mem.clone(),
            pio,
            mmio,
            restored_from: self.restore.as_ref().map(|s| s.dir.clone()),
        };
        Ok(Vm::new(super::Parts {
            snapshot,
            cfg: cfg.clone(),
            platform,
            _kvm: kvm,
            _vm_fd: vm,
            mem_cgroup,
            clock: self.clock,
            devices,
            serial: legacy.serial,
            console_watch: legacy.console_watch,
            console_writer: Some(legacy.console_writer),
            end_tx,
            end_rx,
            vcpus,
            lifecycle,
            dedicated: dedicated.map(|(d, _)| d),
        }))
    }

    /// ACPI tables and the kernel (with its initrd and command line); returns the entry point.
    fn load_boot_data(&mut self, mem: &GuestMemoryMmap) -> Result<boot::EntryProtocol, VmmError> {
        let cfg = self.cfg;
        let (low_ram, high_ram) = crate::memory::split(cfg.mem_bytes);
        let rsdp = acpi::setup_acpi_tables(
            mem,
            &acpi::AcpiConfig {
                num_cpus: cfg.cpus,
                pci_ecam: cfg.virtio.any().then(crate::devices::virtio::ecam_region),
                dmar: (cfg.virtio.any() && cfg.virtio.iommu.is_some())
                    .then(crate::devices::iommu::register_base),
            },
        )?;
        self.clock.mark("acpi");
        let (kernel_path, kernel_bytes) = match &cfg.kernel {
            KernelSource::File(p) => (p.clone(), None),
            KernelSource::Embedded(name) => {
                let (_, bytes) = crate::kit::get(name)
                    .ok_or_else(|| VmmError::Config(format!("no embedded guest named {name:?}")))?;
                (PathBuf::from(format!("<embedded {name}>")), Some(bytes))
            }
            KernelSource::Snapshot { dir, .. } => {
                return Err(VmmError::Config(format!(
                    "a VM from the snapshot {} is restored, not booted",
                    dir.display()
                )))
            }
        };
        let loaded = boot::load(
            mem,
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
            &mut self.clock,
        )?;
        log::info!(
            "kernel {:?} loaded, entry {:?}",
            loaded.format,
            loaded.entry
        );
        self.clock.mark("boot_data");
        Ok(loaded.entry)
    }
}

/// The user's files first: their errors are the likeliest and need no KVM to report.
fn check_user_files(cfg: &VmConfig) -> Result<(), VmmError> {
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
    Ok(())
}

impl Platform {
    /// The host, and what of its KVM the configuration asks for (nested virtualization, the
    /// interrupt-completion path) or refuses with a reason.
    fn choose(kvm: &Kvm, cfg: &VmConfig) -> Result<Platform, VmmError> {
        let host = HostInfo::detect(kvm);
        if let Some(b) = host.banner() {
            eprintln!("exitless: {b}");
        }
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
            Some(HwVirt::Vmx) => nested::vmx_capability_msrs(kvm).map_err(VmmError::Kvm)?,
            _ => Vec::new(),
        };
        Ok(Platform {
            host,
            supported,
            hw_virt,
            irq_path,
            apic_virt,
            vmx_msrs,
        })
    }
}

/// The VM with its irqchip and PIT, dedicated cores and halt polling as configured.
#[allow(clippy::type_complexity)]
fn create_vm(
    kvm: &Kvm,
    cfg: &VmConfig,
    platform: &Platform,
) -> Result<(VmFd, Option<(crate::dedicated::Dedicated, u32)>), VmmError> {
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
    if platform.apic_virt.pit_reinject_off {
        if let Err(e) = crate::apicv::set_pit_reinject(&vm, false) {
            log::warn!("cannot turn PIT reinjection off (it inhibits AVIC): {e}");
        }
    }
    let dedicated = set_up_dedicated_cores(&vm, cfg, platform.host.is_pvm())?;
    if let Some(ns) = cfg.halt_poll_ns {
        crate::dedicated::set_halt_poll(&vm, ns).map_err(VmmError::Config)?;
    }
    Ok((vm, dedicated))
}

/// The legacy devices (UART, RTC, i8042, ACPI PM, reset, debug-exit, probe) on their buses.
fn legacy_devices(
    vm: &VmFd,
    cfg: &VmConfig,
    end_tx: &mpsc::Sender<VmEnd>,
) -> Result<LegacyDevices, VmmError> {
    let console_watch = Arc::new(Mutex::new(serial::ConsoleWatch::default()));
    let (serial, console_writer) = console_serial(vm, cfg, &console_watch, end_tx)?;
    let serial = Arc::new(Mutex::new(serial));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let bus_err = |e: crate::devices::BusError| VmmError::Config(e.to_string());
    use layout::ports;
    pio.insert("serial", ports::COM1 as u64, 8, serial.clone())
        .map_err(bus_err)?;
    pio.insert("rtc", ports::RTC as u64, 2, dev(rtc::Rtc::new()))
        .map_err(bus_err)?;
    let i8042 = dev(i8042::I8042::new(end_tx.clone()));
    pio.insert("i8042", ports::I8042_DATA as u64, 5, i8042)
        .map_err(bus_err)?;
    let sci = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
    vm.register_irqfd(&sci, ports::SCI_IRQ)
        .map_err(kvm_err("wiring the SCI"))?;
    let pm = Arc::new(Mutex::new(pm::Pm::with_sci(end_tx.clone(), sci)));
    pio.insert(
        "acpi-pm",
        ports::PM_BASE as u64,
        ports::PM_LEN as u64,
        pm.clone(),
    )
    .map_err(bus_err)?;
    let reset = dev(pm::ResetControl::new(end_tx.clone()));
    pio.insert("reset", ports::RESET_CF9 as u64, 1, reset)
        .map_err(bus_err)?;
    if cfg.debug_exit {
        let de = dev(debug_exit::DebugExit::new(end_tx.clone()));
        pio.insert("debug-exit", ports::DEBUG_EXIT as u64, 4, de)
            .map_err(bus_err)?;
    }
    let probe = if cfg.probe {
        Some(probe_device(vm, &mut pio, &mut mmio)?)
    } else {
        None
    };
    Ok(LegacyDevices {
        pio,
        mmio,
        power: pm,
        serial,
        console_watch,
        console_writer,
        probe,
    })
}

/// A device for a bus.
fn dev<D: BusDevice + 'static>(d: D) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(d))
}

/// The UART on COM1: its interrupt, and its output queued for the console writer (stdout and
/// the console log, off the vCPU thread).
fn console_serial(
    vm: &VmFd,
    cfg: &VmConfig,
    watch: &Arc<Mutex<serial::ConsoleWatch>>,
    end_tx: &mpsc::Sender<VmEnd>,
) -> Result<(serial::Serial, serial::ConsoleWriter), VmmError> {
    let log_file = match &cfg.console_log {
        Some(p) => Some(serial::CappedLog::new(
            Box::new(std::fs::File::create(p).map_err(|e| {
                VmmError::Config(format!("cannot create console log {}: {e}", p.display()))
            })?),
            cfg.console_log_max,
        )),
        None => None,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
    vm.register_irqfd(&irq, layout::ports::COM1_IRQ)
        .map_err(kvm_err("wiring the serial interrupt"))?;
    let writer = serial::ConsoleWriter::start(
        Some(Box::new(std::io::stdout())),
        log_file,
        usize::try_from(cfg.console_buffer).unwrap_or(usize::MAX),
    )
    .map_err(|e| VmmError::Kvm(format!("cannot start the console writer: {e}")))?;
    let serial = serial::Serial::new(
        irq,
        serial::ConsoleOut::new(Some(writer.queue()), watch.clone(), end_tx.clone()),
    );
    Ok((serial, writer))
}

/// The probe device on both buses, with its PIO and MMIO ioeventfds.
fn probe_device(
    vm: &VmFd,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<(Arc<probe::ProbeCounters>, EventFd, EventFd), VmmError> {
    use layout::ports;
    let bus_err = |e: crate::devices::BusError| VmmError::Config(e.to_string());
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
    let mmio_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Kvm(e.to_string()))?;
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
    Ok((c, pio_evt, mmio_evt))
}

/// Let KVM hand us instructions its emulator cannot run (PVM hosts), so we can complete them.
fn enable_emulation_failure_exits(vm: &VmFd) {
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
}

/// Every vCPU with its CPUID, MSRs and LAPIC; the boot vCPU with the boot registers.
#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    vm: &VmFd,
    cfg: &VmConfig,
    platform: &Platform,
    dedicated_mask: Option<u32>,
    entry: Option<boot::EntryProtocol>,
    shared: VcpuShared,
    mailboxes: Vec<VcpuMailbox>,
) -> Result<Vec<Vcpu>, VmmError> {
    let quirks = platform.host.cpuid_quirks();
    let mut vcpus = Vec::new();
    for (id, mailbox) in (0..cfg.cpus).zip(mailboxes) {
        let fd = vm
            .create_vcpu(id as u64)
            .map_err(kvm_err("creating a vCPU"))?;
        let mut c = platform.supported.clone();
        cpuid::filter_cpuid(&mut c, id, cfg.cpus, &quirks);
        if platform.hw_virt.is_none() {
            nested::hide(&mut c);
        }
        irq_path::apply(&mut c, platform.irq_path);
        if let Some(mask) = dedicated_mask {
            crate::dedicated::apply_cpuid(&mut c, mask);
        }
        fd.set_cpuid2(&c).map_err(kvm_err("setting CPUID"))?;
        nested::set_vmx_capability_msrs(&fd, &platform.vmx_msrs).map_err(VmmError::Kvm)?;
        let msrs = msr::boot_msr_entries(&shared.msr_index);
        match fd.set_msrs(&msrs) {
            Ok(n) if n == msrs.as_slice().len() => {}
            Ok(n) => log::debug!("host accepted {n} of {} boot MSRs", msrs.as_slice().len()),
            Err(e) => log::warn!("setting boot MSRs: {e}"),
        }
        set_lint(&fd).map_err(kvm_err("setting up the local APIC"))?;
        if let (0, Some(entry)) = (id, entry) {
            set_boot_registers(&fd, &shared.mem, entry)?;
        }
        vcpus.push(Vcpu::new(id, fd, shared.clone(), mailbox));
    }
    Ok(vcpus)
}

/// A restore's saved state into the new VM: devices, every vCPU, then the irqchip, PIT and
/// kvmclock (last: the guest's clock goes on from its saved value as the vCPUs start).
fn restore_state(
    vm: &VmFd,
    vcpus: &[Vcpu],
    (pio, mmio): (&Bus, &Bus),
    s: &crate::snapshot::Loaded,
) -> Result<(), VmmError> {
    let s = &s.state;
    let fail = |what: &str, e: String| VmmError::Config(format!("restoring {what}: {e}"));
    pio.restore_states(&s.devices.pio)
        .map_err(|e| fail("the devices", e))?;
    mmio.restore_states(&s.devices.mmio)
        .map_err(|e| fail("the devices", e))?;
    for (v, state) in vcpus.iter().zip(&s.vcpus) {
        crate::snapshot::vcpu::apply(v.fd(), state)
            .map_err(|e| fail(&format!("vCPU {}", v.id), e))?;
    }
    crate::snapshot::vm::apply(vm, &s.vm).map_err(|e| fail("the VM", e))?;
    // Only now may restored devices run (a worker's first interrupt must land in the restored
    // irqchip, not be overwritten by it).
    pio.resume();
    mmio.resume();
    Ok(())
}

/// The boot vCPU's registers, segments and FPU for the kernel's entry.
fn set_boot_registers(
    fd: &kvm_ioctls::VcpuFd,
    mem: &GuestMemoryMmap,
    entry: boot::EntryProtocol,
) -> Result<(), VmmError> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("reading sregs"))?;
    boot::boot_sregs(mem, entry, &mut sregs)?;
    fd.set_sregs(&sregs).map_err(kvm_err("setting sregs"))?;
    fd.set_regs(&boot::boot_regs(entry))
        .map_err(kvm_err("setting registers"))?;
    fd.set_fpu(&boot::boot_fpu())
        .map_err(kvm_err("setting the FPU"))?;
    Ok(())
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
/// `--kernel-exit-reasons`: what to count, and the sentence saying where the in-kernel reasons
/// come from (or why only KVM's aggregates are there).
pub(crate) fn kernel_exit_reasons(
    cfg: &VmConfig,
    host: &HostInfo,
) -> (Option<KernelTrace>, String) {
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
