//! The VMM's entry points and the facts around a run: opening KVM, the `exitless host` lines,
//! how a run ends (its status and description), and [`run`], which is build -> start -> wait of a
//! [`crate::vm::Vm`].
//!
//! Owns nothing of a VM (see [`crate::vm`]); it may open /dev/kvm to describe the host.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::Kvm;

use crate::arch::x86_64::nested;
use crate::arch::x86_64::{acpi, boot, cpuid, irq_path, layout};
use crate::config::VmConfig;
use crate::devices::VmEnd;
use crate::host::HostInfo;
use crate::stats::RunReport;

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
        VmEnd::DebugExit(v) => crate::devices::legacy::debug_exit::status(*v),
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

/// Builds, starts and waits for the VM; returns when it has ended and every vCPU thread has been
/// joined.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmmError> {
    let mut vm = crate::vm::VmBuilder::new(cfg).build()?;
    vm.start()?;
    vm.wait()
}

/// Reads and checks the snapshot in `dir` (see `snapshot::load`; the host is checked by the
/// build).
pub fn load_snapshot(
    dir: &std::path::Path,
    verify_memory: bool,
) -> Result<crate::snapshot::Loaded, VmmError> {
    crate::snapshot::load(dir, verify_memory).map_err(|e| VmmError::Config(e.to_string()))
}

/// Builds the VM from a loaded snapshot, starts it (held paused if asked) and waits for it;
/// says on stderr how long the restore took from `t0` (the command's start) to running.
pub fn restore(
    cfg: &VmConfig,
    snapshot: crate::snapshot::Loaded,
    paused: bool,
    t0: std::time::Instant,
) -> Result<RunOutcome, VmmError> {
    let dir = snapshot.dir.clone();
    let mut vm = crate::vm::VmBuilder::restore(cfg, snapshot).build()?;
    if paused {
        vm.start_paused()?;
    } else {
        vm.start()?;
    }
    eprintln!(
        "exitless: restored from {} in {:.3} ms ({}; {} vCPU(s), {} MiB mapped lazily)",
        dir.display(),
        t0.elapsed().as_secs_f64() * 1e3,
        vm.state().name(),
        cfg.cpus,
        cfg.mem_bytes >> 20
    );
    vm.wait()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KernelSource;

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
            landlock: Default::default(),
            landlock_selftest: None,
            snapshot_dir: None,
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
}
