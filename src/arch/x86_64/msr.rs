//! Model-specific registers a vCPU starts with.
//!
//! Only architectural MSRs Linux expects firmware to have initialised: SYSCALL/SYSENTER set-up at
//! zero, fast strings on, MTRRs enabled with write-back as the default type (without it a guest
//! maps all RAM uncached and runs many times slower).

use kvm_bindings::{kvm_msr_entry, Msrs};

pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The boot MSR values, as (index, value).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Only the MSRs among `boot_msrs()` that the host lets us set (`supported`, from
/// `KVM_GET_MSR_INDEX_LIST`), as a KVM `Msrs` list.
pub fn boot_msr_entries(supported: &[u32]) -> Msrs {
    let entries: Vec<kvm_msr_entry> = boot_msrs()
        .into_iter()
        .filter(|(i, _)| supported.contains(i))
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).expect("boot MSR list is far below the KVM limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrrs_default_to_write_back() {
        let m = boot_msrs();
        let def = m.iter().find(|(i, _)| *i == MSR_MTRR_DEF_TYPE).unwrap().1;
        assert_eq!(def & 0xff, MTRR_MEM_TYPE_WB);
        assert_ne!(def & MTRR_ENABLE, 0);
    }

    #[test]
    fn unsupported_msrs_are_left_out() {
        let e = boot_msr_entries(&[MSR_STAR, MSR_MTRR_DEF_TYPE]);
        let idx: Vec<u32> = e.as_slice().iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![MSR_STAR, MSR_MTRR_DEF_TYPE]);
    }
}
