//! Whether the host virtualizes the guest's local APIC, and why not: which interrupt path a VM
//! is on.
//!
//! With Intel APICv (posted interrupts, virtual EOI/TPR/self-IPI, and with IPI virtualization
//! also IPIs) or AMD AVIC (x2AVIC for x2APIC guests), an interrupt KVM sends to a running vCPU —
//! an irqfd from a device worker, a timer, an IPI — is posted to it without a VM exit, and EOIs
//! do not exit: ELI's goal in hardware. Without it each interrupt to a running vCPU costs one exit
//! (the kick), and completion costs one more unless the guest uses PV EOI (`arch::x86_64::irq_path`).
//!
//! Owns the detection, from what the host publishes: the vendor module's parameters in
//! `/sys/module/kvm_intel/parameters` (`enable_apicv`, `enable_ipiv`) or
//! `/sys/module/kvm_amd/parameters` (`avic`, `force_avic`) — both modules turn their parameter off
//! at load time when the CPU lacks the feature, so `Y` means "in use" — and, on AMD, the host's
//! CPUID 0x8000_000A EDX (AVIC bit 13, x2AVIC bit 18) to explain an `N` and to know whether an
//! x2APIC guest inhibits AVIC. Also what exitless does about the per-VM inhibits it controls:
//! AVIC is inhibited while KVM reinjects missed PIT ticks, so exitless turns reinjection off on
//! AVIC hosts ([`ApicVirt::pit_reinject_off`]). KVM reports no per-VM inhibit state to userspace;
//! the reasons exitless cannot see (a guest in nested mode, a guest that rewrites its APIC ID) are
//! named in the README. Cheap, advisory, never fails.

use std::path::Path;

use serde::Serialize;

/// What the host publishes about APIC virtualization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostApic {
    /// `kvm_intel`, `kvm_amd`, `kvm_pvm` or none.
    pub module: Option<&'static str>,
    /// kvm_intel `enable_apicv`.
    pub enable_apicv: Option<bool>,
    /// kvm_intel `enable_ipiv` (Linux 5.19+).
    pub enable_ipiv: Option<bool>,
    /// kvm_amd `avic`.
    pub avic: Option<bool>,
    /// kvm_amd `force_avic`.
    pub force_avic: Option<bool>,
    /// Host CPUID 0x8000_000A EDX bit 13 (AMD).
    pub cpu_avic: bool,
    /// Host CPUID 0x8000_000A EDX bit 18 (AMD).
    pub cpu_x2avic: bool,
}

/// The interrupt path of one VM, for the host line, the summary and the stats JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApicVirt {
    /// "APICv", "AVIC" or "none".
    pub kind: &'static str,
    /// Interrupts to running vCPUs are posted without an exit, EOIs do not exit.
    pub active: bool,
    /// IPIs between running vCPUs without exits (Intel IPI virtualization, AVIC).
    pub ipi_virtualization: bool,
    /// Why it is (not) active, in one sentence.
    pub why: String,
    /// Turn PIT tick reinjection off (`KVM_REINJECT_CONTROL`): it inhibits AVIC.
    #[serde(skip)]
    pub pit_reinject_off: bool,
}

fn yes(s: &str) -> bool {
    matches!(s.trim(), "Y" | "y" | "1")
}

impl HostApic {
    /// Reads the module parameters and host CPUID.
    pub fn detect(module: Option<&'static str>) -> HostApic {
        let param = |m: &str, p: &str| {
            std::fs::read_to_string(Path::new("/sys/module").join(m).join("parameters").join(p))
                .ok()
                .map(|s| yes(&s))
        };
        let svm_leaf = {
            let max = core::arch::x86_64::__cpuid(0x8000_0000).eax;
            (max >= 0x8000_000a).then(|| core::arch::x86_64::__cpuid(0x8000_000a).edx)
        };
        HostApic {
            module,
            enable_apicv: param("kvm_intel", "enable_apicv"),
            enable_ipiv: param("kvm_intel", "enable_ipiv"),
            avic: param("kvm_amd", "avic"),
            force_avic: param("kvm_amd", "force_avic"),
            cpu_avic: svm_leaf.is_some_and(|d| d & (1 << 13) != 0),
            cpu_x2avic: svm_leaf.is_some_and(|d| d & (1 << 18) != 0),
        }
    }

    /// True where AVIC runs but an x2APIC guest would inhibit it (no x2AVIC): the default then
    /// leaves x2APIC off (see `irq_path`).
    pub fn x2apic_inhibits(&self) -> bool {
        self.module == Some("kvm_amd") && self.avic == Some(true) && !self.cpu_x2avic
    }

    /// The path a VM whose guest gets x2APIC or not (`guest_x2apic`) is on.
    pub fn assess(&self, guest_x2apic: bool) -> ApicVirt {
        let none = |why: String| ApicVirt {
            kind: "none",
            active: false,
            ipi_virtualization: false,
            why,
            pit_reinject_off: false,
        };
        match self.module {
            Some("kvm_pvm") => none(
                "PVM has no APIC virtualization: an interrupt to a running vCPU costs an exit, \
                 completion is exitless only with PV EOI"
                    .into(),
            ),
            Some("kvm_intel") => match self.enable_apicv {
                Some(true) => {
                    let ipiv = self.enable_ipiv == Some(true);
                    ApicVirt {
                        kind: "APICv",
                        active: true,
                        ipi_virtualization: ipiv,
                        why: format!(
                            "kvm_intel enable_apicv=Y: posted interrupts, virtual EOI{}",
                            if ipiv {
                                ", IPI virtualization (enable_ipiv=Y)"
                            } else {
                                "; IPIs exit (no IPI virtualization: enable_ipiv=N or absent)"
                            }
                        ),
                        pit_reinject_off: false,
                    }
                }
                Some(false) => none(
                    "kvm_intel enable_apicv=N (the CPU lacks APICv or the module was loaded \
                     with enable_apicv=0): every interrupt to a running vCPU costs an exit"
                        .into(),
                ),
                None => none("kvm_intel's enable_apicv is not readable in sysfs".into()),
            },
            Some("kvm_amd") => self.assess_avic(guest_x2apic, none),
            _ => none("no kvm_intel or kvm_amd module visible in /sys/module".into()),
        }
    }

    fn assess_avic(&self, guest_x2apic: bool, none: impl Fn(String) -> ApicVirt) -> ApicVirt {
        match self.avic {
            Some(true) if guest_x2apic && !self.cpu_x2avic => none(
                "kvm_amd avic=Y, but inhibited: the guest uses x2APIC and the CPU has no x2AVIC \
                 (run with --x2apic off)"
                    .into(),
            ),
            Some(true) => ApicVirt {
                kind: "AVIC",
                active: true,
                ipi_virtualization: true,
                why: format!(
                    "kvm_amd avic=Y{}{}; PIT reinjection off (it would inhibit AVIC)",
                    if self.force_avic == Some(true) {
                        " (force_avic=Y: the CPU does not advertise AVIC)"
                    } else {
                        ""
                    },
                    if guest_x2apic { " with x2AVIC" } else { "" }
                ),
                pit_reinject_off: true,
            },
            Some(false) if self.cpu_avic => {
                none("kvm_amd avic=N although the CPU has AVIC: load kvm_amd with avic=1".into())
            }
            Some(false) => none(
                "kvm_amd avic=N: the CPU has no AVIC (an emulated or older CPU): every \
                 interrupt to a running vCPU costs an exit"
                    .into(),
            ),
            None => none("kvm_amd's avic is not readable in sysfs".into()),
        }
    }
}

impl ApicVirt {
    /// One phrase, e.g. "APIC virtualization: AVIC active (kvm_amd avic=Y ...)".
    pub fn describe(&self) -> String {
        if self.active {
            format!("APIC virtualization: {} active ({})", self.kind, self.why)
        } else {
            format!("APIC virtualization: none ({})", self.why)
        }
    }
}

/// `KVM_REINJECT_CONTROL`: whether KVM reinjects PIT ticks the guest missed.
pub fn set_pit_reinject(vm: &kvm_ioctls::VmFd, on: bool) -> std::io::Result<()> {
    #[repr(C)]
    struct KvmReinjectControl {
        pit_reinject: u8,
        reserved: [u8; 31],
    }
    vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);
    let arg = KvmReinjectControl {
        pit_reinject: on.into(),
        reserved: [0; 31],
    };
    // SAFETY: the ioctl reads a `struct kvm_reinject_control` (32 bytes, laid out as above) that
    // lives across the call; `vm` is a valid VM descriptor with an in-kernel PIT.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_REINJECT_CONTROL(), &arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intel(apicv: bool, ipiv: Option<bool>) -> HostApic {
        HostApic {
            module: Some("kvm_intel"),
            enable_apicv: Some(apicv),
            enable_ipiv: ipiv,
            ..Default::default()
        }
    }

    fn amd(avic: bool, cpu_avic: bool, cpu_x2avic: bool) -> HostApic {
        HostApic {
            module: Some("kvm_amd"),
            avic: Some(avic),
            force_avic: Some(false),
            cpu_avic,
            cpu_x2avic,
            ..Default::default()
        }
    }

    #[test]
    fn intel_apicv_and_ipiv() {
        let a = intel(true, Some(true)).assess(true);
        assert!(
            a.active && a.ipi_virtualization && a.kind == "APICv",
            "{a:?}"
        );
        assert!(!a.pit_reinject_off);
        let a = intel(true, Some(false)).assess(true);
        assert!(a.active && !a.ipi_virtualization);
        assert!(a.why.contains("IPIs exit"), "{}", a.why);
        let a = intel(false, None).assess(true);
        assert!(!a.active && a.why.contains("enable_apicv=N"), "{}", a.why);
    }

    #[test]
    fn amd_avic_inhibited_by_x2apic_without_x2avic() {
        let host = amd(true, true, false);
        assert!(host.x2apic_inhibits());
        let a = host.assess(true);
        assert!(!a.active && a.why.contains("--x2apic off"), "{}", a.why);
        let a = host.assess(false);
        assert!(a.active && a.kind == "AVIC" && a.pit_reinject_off, "{a:?}");
        let x2 = amd(true, true, true);
        assert!(!x2.x2apic_inhibits());
        let a = x2.assess(true);
        assert!(a.active && a.why.contains("x2AVIC"), "{}", a.why);
    }

    #[test]
    fn amd_avic_off_says_why() {
        // The emulated SVM host: QEMU's TCG CPU has no AVIC, kvm_amd sets avic=N.
        let a = amd(false, false, false).assess(true);
        assert!(!a.active && a.why.contains("no AVIC"), "{}", a.why);
        assert!(!amd(false, false, false).x2apic_inhibits());
        let a = amd(false, true, false).assess(false);
        assert!(a.why.contains("avic=1"), "{}", a.why);
        let unreadable = HostApic {
            module: Some("kvm_amd"),
            ..Default::default()
        };
        assert!(!unreadable.assess(false).active);
    }

    #[test]
    fn pvm_and_unknown_hosts_have_none() {
        let pvm = HostApic {
            module: Some("kvm_pvm"),
            ..Default::default()
        };
        let a = pvm.assess(true);
        assert!(!a.active && a.why.contains("PVM"), "{}", a.why);
        assert!(!HostApic::default().assess(true).active);
        assert!(a.describe().starts_with("APIC virtualization: none ("));
    }
}
