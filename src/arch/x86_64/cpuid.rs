//! Guest CPUID: built from `KVM_GET_SUPPORTED_CPUID`, with topology filled in and what the host
//! cannot run masked out.
//!
//! (Stub: being written.)

use kvm_bindings::CpuId;

/// Features to hide from the guest because the host cannot run them (see `host`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidQuirks {
    /// Hide CMPXCHG16B (KVM's emulator fails on it on PVM hosts).
    pub hide_cx16: bool,
    /// Hide XSAVE and all XSAVE-managed state (a Linux guest stalls in XSAVE set-up on PVM hosts).
    pub hide_xsave: bool,
    /// Hide KVM steal time and the kvmclock "stable" bit (their static-key flips leave `int3`s the
    /// emulator cannot run on PVM hosts).
    pub hide_kvm_steal_and_stable: bool,
}

/// Turns the host's supported CPUID into vCPU `vcpu_id`'s CPUID for a VM of `num_cpus` vCPUs.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_cpus: u8, quirks: &CpuidQuirks) {
    let _ = (cpuid, vcpu_id, num_cpus, quirks);
    todo!()
}
