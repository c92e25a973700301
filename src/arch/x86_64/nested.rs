//! Nested virtualization: whether a guest may be a hypervisor itself, and what tells it so.
//!
//! Owns the decision (`--nested on|off`; by default on wherever the host KVM offers it) and its
//! effect on each vCPU:
//!
//! - what the host offers is read from `KVM_GET_SUPPORTED_CPUID`: AMD SVM is CPUID 0x8000_0001
//!   ECX bit 2 with its leaf 0x8000_000A (revision, ASIDs, nested features), Intel VMX is CPUID 1
//!   ECX bit 5. KVM sets them only when its vendor module runs with `nested=1`; a PVM host has
//!   no hardware virtualization at all, so it never offers either, and `on` is refused there;
//! - with nested on, the CPUID bits stay as KVM reports them (the CPUID filter passes them
//!   through), and on Intel the VMX capability MSRs (0x480–0x491, what a guest hypervisor reads
//!   to learn which VMX controls it may use) are copied from KVM's feature MSRs
//!   (`KVM_GET_MSR_FEATURE_INDEX_LIST`, `KVM_GET_MSRS` on the system fd) to every vCPU;
//! - with nested off, the bits and leaf 0x8000_000A are cleared: the guest sees no SVM/VMX (no
//!   `svm`/`vmx` in /proc/cpuinfo, its kvm module refuses to load) and KVM refuses EFER.SVME and
//!   CR4.VMXE to it.
//!
//! Saving nested state (`KVM_GET/SET_NESTED_STATE`) belongs to whoever saves vCPU state; exitless
//! saves none today.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs};

/// CPUID 1 ECX: VMX.
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID 0x8000_0001 ECX: SVM.
const LEAF_8000_0001_ECX_SVM: u32 = 1 << 2;
/// The SVM feature leaf.
const LEAF_SVM: u32 = 0x8000_000a;
/// The VMX capability MSRs: IA32_VMX_BASIC (0x480) to IA32_VMX_VMFUNC (0x491).
const VMX_MSRS: std::ops::RangeInclusive<u32> = 0x480..=0x491;

/// What was asked for (`--nested`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NestedMode {
    /// On where the host KVM offers SVM or VMX, off elsewhere.
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for NestedMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(NestedMode::On),
            "off" => Ok(NestedMode::Off),
            "auto" => Ok(NestedMode::Auto),
            _ => Err(format!("{s:?} is not on, off or auto")),
        }
    }
}

/// The hardware virtualization a guest can be given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwVirt {
    /// AMD SVM (AMD-V).
    Svm,
    /// Intel VMX (VT-x).
    Vmx,
}

impl HwVirt {
    pub fn name(self) -> &'static str {
        match self {
            HwVirt::Svm => "SVM",
            HwVirt::Vmx => "VMX",
        }
    }
}

fn leaf(entries: &[kvm_cpuid_entry2], function: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == 0)
}

/// What the host KVM can give a guest, from its supported CPUID.
pub fn offered(supported: &[kvm_cpuid_entry2]) -> Option<HwVirt> {
    if leaf(supported, 0x8000_0001).is_some_and(|e| e.ecx & LEAF_8000_0001_ECX_SVM != 0) {
        Some(HwVirt::Svm)
    } else if leaf(supported, 1).is_some_and(|e| e.ecx & LEAF1_ECX_VMX != 0) {
        Some(HwVirt::Vmx)
    } else {
        None
    }
}

/// Turns the request into what the guest gets: `None` for no nested virtualization. `pvm` says
/// the host is PVM (see `host`); `offered` is [`offered`]'s answer.
pub fn resolve(
    mode: NestedMode,
    offered: Option<HwVirt>,
    pvm: bool,
) -> Result<Option<HwVirt>, String> {
    match mode {
        NestedMode::Off => Ok(None),
        NestedMode::Auto if pvm => Ok(None),
        NestedMode::Auto => Ok(offered),
        NestedMode::On if pvm => Err("--nested on: this host's KVM is PVM, which runs guests \
             without hardware virtualization (no VMX or SVM), so it has none to give a guest"
            .into()),
        NestedMode::On => offered.map(Some).ok_or_else(|| {
            "--nested on: the host KVM offers neither SVM nor VMX to guests (not in \
             KVM_GET_SUPPORTED_CPUID): load kvm_amd or kvm_intel with nested=1 on a host with \
             AMD-V or VT-x"
                .into()
        }),
    }
}

/// Clears SVM and VMX from a vCPU's CPUID, and leaf 0x8000_000A.
pub fn hide(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ecx &= !LEAF1_ECX_VMX,
            0x8000_0001 => e.ecx &= !LEAF_8000_0001_ECX_SVM,
            LEAF_SVM => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
}

/// The VMX capability MSRs with the values KVM reports for them (empty where it reports none:
/// AMD, or a KVM without `KVM_GET_MSR_FEATURE_INDEX_LIST`).
pub fn vmx_capability_msrs(kvm: &kvm_ioctls::Kvm) -> Result<Vec<kvm_msr_entry>, String> {
    let list = kvm
        .get_msr_feature_index_list()
        .map_err(|e| format!("reading KVM's feature MSR list: {e}"))?;
    let entries: Vec<kvm_msr_entry> = list
        .as_slice()
        .iter()
        .filter(|i| VMX_MSRS.contains(i))
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    if entries.is_empty() {
        return Ok(entries);
    }
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("VMX MSR list: {e:?}"))?;
    let n = kvm
        .get_msrs(&mut msrs)
        .map_err(|e| format!("reading KVM's VMX capability MSRs: {e}"))?;
    Ok(msrs.as_slice()[..n].to_vec())
}

/// Sets the VMX capability MSRs on a vCPU; a value KVM refuses is an error naming it.
pub fn set_vmx_capability_msrs(
    fd: &kvm_ioctls::VcpuFd,
    entries: &[kvm_msr_entry],
) -> Result<(), String> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|e| format!("VMX MSR list: {e:?}"))?;
    let n = fd
        .set_msrs(&msrs)
        .map_err(|e| format!("setting the VMX capability MSRs: {e}"))?;
    match entries.get(n) {
        None => Ok(()),
        Some(e) => Err(format!(
            "KVM refused VMX capability MSR {:#x} = {:#x} (the value it reported itself)",
            e.index, e.data
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ecx,
            eax: 1,
            ebx: 8,
            edx: 0xff,
            ..Default::default()
        }
    }

    fn amd_with_svm() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0x8000_0000),
            entry(0x8000_0001, 0x0041_0b97),
            entry(LEAF_SVM, 0),
        ]
    }

    #[test]
    fn svm_and_vmx_are_found_in_the_supported_cpuid() {
        assert_eq!(offered(&amd_with_svm()), Some(HwVirt::Svm));
        let intel = vec![entry(1, 0x7ffa_fbff), entry(0x8000_0001, 0x121)];
        assert_eq!(offered(&intel), Some(HwVirt::Vmx));
        // This project's PVM host: 0x8000_0001 ECX without SVM, leaf 1 without VMX.
        let pvm = vec![entry(1, 0x8120_2000), entry(0x8000_0001, 0x0040_0393)];
        assert_eq!(offered(&pvm), None);
    }

    #[test]
    fn auto_follows_the_host_and_on_is_refused_where_it_cannot_be() {
        use NestedMode::*;
        let svm = Some(HwVirt::Svm);
        assert_eq!(resolve(Auto, svm, false), Ok(svm));
        assert_eq!(resolve(Auto, None, false), Ok(None));
        assert_eq!(resolve(Auto, svm, true), Ok(None));
        assert_eq!(resolve(Off, svm, false), Ok(None));
        assert_eq!(resolve(On, svm, false), Ok(svm));
        let pvm = resolve(On, None, true).unwrap_err();
        assert!(
            pvm.contains("PVM") && pvm.contains("no VMX or SVM"),
            "{pvm}"
        );
        let none = resolve(On, None, false).unwrap_err();
        assert!(none.contains("nested=1"), "{none}");
    }

    #[test]
    fn hiding_clears_svm_vmx_and_the_svm_leaf_only() {
        let mut c = CpuId::from_entries(&[
            entry(1, 0x7ffa_fbff),
            entry(0x8000_0001, 0x0041_0b97),
            entry(LEAF_SVM, 0),
            entry(0x8000_0008, 0x1234),
        ])
        .unwrap();
        hide(&mut c);
        let s = c.as_slice();
        assert_eq!(s[0].ecx, 0x7ffa_fbff & !LEAF1_ECX_VMX);
        assert_eq!(s[1].ecx, 0x0041_0b93);
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx, s[2].edx), (0, 0, 0, 0));
        assert_eq!((s[3].eax, s[3].ecx, s[3].edx), (1, 0x1234, 0xff));
        assert_eq!(offered(s), None);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(NestedMode::On));
        assert_eq!("off".parse(), Ok(NestedMode::Off));
        assert_eq!("auto".parse(), Ok(NestedMode::Auto));
        assert!("yes".parse::<NestedMode>().is_err());
    }
}
