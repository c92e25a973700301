//! The guest's interrupt-completion path: x2APIC and KVM's paravirtual EOI.
//!
//! Owns the run options `--x2apic on|off` and `--pv-eoi on|off` and their effect on each vCPU's
//! CPUID. Both are about the end of an interrupt (ELI's "completion" exits):
//!
//! - **x2APIC** (CPUID 1 ECX bit 21): the guest's LAPIC is programmed with MSRs instead of MMIO.
//!   Without APICv/AVIC an EOI still exits, but as a short in-kernel MSR write rather than an
//!   APIC-access fault that KVM has to decode; with APICv the x2APIC EOI is virtualized and does
//!   not exit at all. KVM emulates x2APIC on every host (it is in its supported CPUID whatever
//!   the CPU has), so it is on by default;
//! - **PV EOI** (`KVM_FEATURE_PV_EOI`, CPUID 0x4000_0001 EAX bit 6): the guest registers a
//!   shared word (MSR_KVM_PV_EOI_EN); when KVM injects an edge interrupt that needs no EOI
//!   broadcast it sets a bit there, and the guest acknowledges by clearing it instead of writing
//!   the EOI register: no exit. On by default where KVM offers it.
//!
//! `off` hides the CPUID bit (the guest then uses the xAPIC MMIO page, or writes the EOI
//! register); `on` is refused where KVM does not offer the feature. Neither needs anything from
//! the VMM at run time: both are handled inside KVM. The other KVM paravirtual features (PV
//! unhalt, PV send-IPI, PV TLB flush, PV sched-yield, poll control) are passed through as KVM
//! reports them by `cpuid`, except where the host cannot run them (`CpuidQuirks`).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::cpuid::bits;

/// What was asked for, for one feature.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Toggle {
    /// On where the host offers it.
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Toggle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Toggle::On),
            "off" => Ok(Toggle::Off),
            "auto" => Ok(Toggle::Auto),
            _ => Err(format!("{s:?} is not on, off or auto")),
        }
    }
}

/// The options, as asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqPathRequest {
    pub x2apic: Toggle,
    pub pv_eoi: Toggle,
}

/// What the guest gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IrqPath {
    pub x2apic: bool,
    pub pv_eoi: bool,
}

/// What the host KVM offers, from its supported CPUID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offered {
    pub x2apic: bool,
    pub pv_eoi: bool,
}

fn leaf(entries: &[kvm_cpuid_entry2], function: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == 0)
}

/// Reads what KVM can give from `KVM_GET_SUPPORTED_CPUID`. PV EOI also needs KVM's signature
/// leaf: a guest looks for the feature leaf only behind "KVMKVMKVM".
pub fn offered(supported: &[kvm_cpuid_entry2]) -> Offered {
    let kvm_leaves = leaf(supported, 0x4000_0000).is_some_and(|e| e.eax >= 0x4000_0001);
    Offered {
        x2apic: leaf(supported, 1).is_some_and(|e| e.ecx & (1 << bits::ECX_X2APIC) != 0),
        pv_eoi: kvm_leaves
            && leaf(supported, 0x4000_0001)
                .is_some_and(|e| e.eax & (1 << bits::KVM_FEATURE_PV_EOI) != 0),
    }
}

fn resolve_one(option: &str, what: Toggle, offered: bool, why_not: &str) -> Result<bool, String> {
    match what {
        Toggle::Off => Ok(false),
        Toggle::Auto => Ok(offered),
        Toggle::On if offered => Ok(true),
        Toggle::On => Err(format!("{option} on: {why_not}")),
    }
}

/// Turns the request into what the guest gets; `on` for what the host lacks is an error.
/// `prefer_xapic`: the host's APIC virtualization works only for xAPIC guests (AMD AVIC without
/// x2AVIC, see `apicv`), so the default leaves x2APIC off; `on` is still honoured.
pub fn resolve(
    req: IrqPathRequest,
    offered: Offered,
    prefer_xapic: bool,
) -> Result<IrqPath, String> {
    Ok(IrqPath {
        x2apic: resolve_one(
            "--x2apic",
            req.x2apic,
            offered.x2apic && !(prefer_xapic && req.x2apic == Toggle::Auto),
            "the host KVM does not offer x2APIC to guests (not in KVM_GET_SUPPORTED_CPUID)",
        )?,
        pv_eoi: resolve_one(
            "--pv-eoi",
            req.pv_eoi,
            offered.pv_eoi,
            "the host KVM does not offer KVM_FEATURE_PV_EOI to guests (not in its supported \
             CPUID leaf 0x40000001)",
        )?,
    })
}

/// Clears what is off from a vCPU's CPUID (after `cpuid::filter_cpuid`).
pub fn apply(cpuid: &mut CpuId, path: IrqPath) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 if !path.x2apic => e.ecx &= !(1 << bits::ECX_X2APIC),
            0x4000_0001 if !path.pv_eoi => e.eax &= !(1 << bits::KVM_FEATURE_PV_EOI),
            _ => {}
        }
    }
}

impl IrqPath {
    /// One phrase for the host line and the summary, e.g. "x2APIC on, PV EOI on".
    pub fn describe(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        format!("x2APIC {}, PV EOI {}", on(self.x2apic), on(self.pv_eoi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, eax: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ecx,
            ..Default::default()
        }
    }

    /// What KVM 6.x reports on a hardware host: x2APIC, and the KVM leaves with PV EOI among
    /// clocksource, nopiodelay, mmu_op, clocksource2, async PF, steal time, PV EOI, PV unhalt,
    /// PV TLB flush, async PF VM exit, PV send-IPI, poll control, PV sched-yield, async PF int.
    fn hw() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0x000906ea, 0x7ffa_fbff),
            entry(0x4000_0000, 0x4000_0001, 0),
            entry(0x4000_0001, 0x0100_7efb, 0),
        ]
    }

    fn req(x2apic: Toggle, pv_eoi: Toggle) -> IrqPathRequest {
        IrqPathRequest { x2apic, pv_eoi }
    }

    #[test]
    fn offered_reads_the_supported_cpuid() {
        assert_eq!(
            offered(&hw()),
            Offered {
                x2apic: true,
                pv_eoi: true
            }
        );
        let mut no_eoi = hw();
        no_eoi[2].eax &= !(1 << 6);
        no_eoi[0].ecx &= !(1 << 21);
        assert_eq!(
            offered(&no_eoi),
            Offered {
                x2apic: false,
                pv_eoi: false
            }
        );
        // No KVM signature leaf: the feature leaf is not looked at.
        let mut unsigned = hw();
        unsigned.remove(1);
        assert!(!offered(&unsigned).pv_eoi);
    }

    #[test]
    fn defaults_follow_the_host_and_off_always_works() {
        let all = offered(&hw());
        let none = Offered {
            x2apic: false,
            pv_eoi: false,
        };
        let auto = IrqPathRequest::default();
        assert_eq!(
            resolve(auto, all, false).unwrap(),
            IrqPath {
                x2apic: true,
                pv_eoi: true
            }
        );
        assert_eq!(
            resolve(auto, none, false).unwrap(),
            IrqPath {
                x2apic: false,
                pv_eoi: false
            }
        );
        for host in [all, none] {
            assert_eq!(
                resolve(req(Toggle::Off, Toggle::Off), host, false).unwrap(),
                IrqPath {
                    x2apic: false,
                    pv_eoi: false
                }
            );
        }
        assert_eq!(
            resolve(req(Toggle::On, Toggle::Off), all, false).unwrap(),
            IrqPath {
                x2apic: true,
                pv_eoi: false
            }
        );
    }

    #[test]
    fn avic_without_x2avic_makes_the_default_xapic_but_on_still_works() {
        let all = offered(&hw());
        let auto = resolve(IrqPathRequest::default(), all, true).unwrap();
        assert_eq!((auto.x2apic, auto.pv_eoi), (false, true));
        let on = resolve(req(Toggle::On, Toggle::Auto), all, true).unwrap();
        assert!(on.x2apic);
    }

    #[test]
    fn on_is_refused_where_the_host_lacks_it() {
        let only_x2apic = Offered {
            x2apic: true,
            pv_eoi: false,
        };
        let e = resolve(req(Toggle::Auto, Toggle::On), only_x2apic, false).unwrap_err();
        assert!(e.starts_with("--pv-eoi on:"), "{e}");
        let only_eoi = Offered {
            x2apic: false,
            pv_eoi: true,
        };
        let e = resolve(req(Toggle::On, Toggle::Auto), only_eoi, false).unwrap_err();
        assert!(e.starts_with("--x2apic on:"), "{e}");
    }

    #[test]
    fn apply_clears_only_what_is_off() {
        let host = CpuId::from_entries(&hw()).unwrap();
        for (x2apic, pv_eoi) in [(true, true), (false, true), (true, false), (false, false)] {
            let mut c = host.clone();
            apply(&mut c, IrqPath { x2apic, pv_eoi });
            let l1 = c.as_slice()[0];
            let kvm = c.as_slice()[2];
            assert_eq!(l1.ecx & (1 << 21) != 0, x2apic);
            assert_eq!(kvm.eax & (1 << 6) != 0, pv_eoi);
            // Nothing else moves.
            assert_eq!(l1.ecx | (1 << 21), host.as_slice()[0].ecx);
            assert_eq!(kvm.eax | (1 << 6), host.as_slice()[2].eax);
            assert_eq!(c.as_slice()[1], host.as_slice()[1]);
        }
    }

    #[test]
    fn option_values() {
        assert_eq!("on".parse::<Toggle>().unwrap(), Toggle::On);
        assert_eq!("off".parse::<Toggle>().unwrap(), Toggle::Off);
        assert_eq!("auto".parse::<Toggle>().unwrap(), Toggle::Auto);
        assert!("yes"
            .parse::<Toggle>()
            .unwrap_err()
            .contains("on, off or auto"));
    }
}
