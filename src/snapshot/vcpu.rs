//! One vCPU's state: read on its own thread while it is parked ([`capture`], called from the
//! lifecycle's `Save` message), written back before its thread first runs ([`apply`]).
//!
//! What is saved: CPUID (restored as it was, not recomputed), the MP state, general and segment
//! registers, XSAVE (the FPU and vector state), XCRs, debug registers, the LAPIC, every MSR KVM
//! lists (`KVM_GET_MSR_INDEX_LIST`) that it can read, the pending events, the TSC frequency and,
//! with nested virtualization, the nested state (`KVM_GET_NESTED_STATE`).
//!
//! The orders follow KVM's documentation and what Firecracker and QEMU do: `KVM_GET_MP_STATE`
//! first (it may take pending INIT/SIPI into the LAPIC and registers), the events last (after
//! the LAPIC); on restore CPUID first (it decides which MSRs and CR4 bits are valid), the LAPIC
//! before the MSRs (the TSC deadline needs it), the nested state after the MSRs and registers it
//! depends on, the events last. A port or MMIO read the vCPU exited for may still wait for its
//! data to reach the guest's register: [`crate::vcpu`] completes it (`KVM_RUN` with
//! `immediate_exit`) before calling [`capture`].
//!
//! Owns nothing; it touches only the vCPU descriptor it is given.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, nested::KvmNestedStateBuffer, CpuId, Msrs,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Everything KVM holds of one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency (kHz), where KVM tells it.
    pub tsc_khz: Option<u32>,
    /// `KVM_GET_NESTED_STATE`, for a guest given SVM or VMX.
    pub nested: Option<KvmNestedStateBuffer>,
}

/// What a vCPU needs to read its state.
pub struct CaptureSpec<'a> {
    pub id: u8,
    /// KVM's MSR index list.
    pub msr_index: &'a [u32],
    /// The guest has SVM or VMX: save its nested state.
    pub nested: bool,
}

fn e(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |err| format!("{what}: {err}")
}

/// Reads the parked vCPU's state (any pending I/O already completed).
pub fn capture(fd: &VcpuFd, spec: &CaptureSpec) -> Result<VcpuState, String> {
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, spec.msr_index)?;
    let nested = if spec.nested {
        Some(read_nested(fd)?)
    } else {
        None
    };
    let events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        id: spec.id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
        tsc_khz: fd.get_tsc_khz().ok(),
        nested,
    })
}

/// Every listed MSR KVM can read. `KVM_GET_MSRS` stops at the first it cannot (some the list
/// names need a CPU feature this guest lacks): that one is skipped and the rest read on.
fn read_msrs(fd: &VcpuFd, index: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(index.len());
    let mut rest = index;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        let consumed = if n < chunk.len() {
            log::debug!("MSR {:#x} is not readable: not saved", chunk[n]);
            n + 1
        } else {
            n
        };
        rest = &rest[consumed..];
    }
    Ok(out)
}

fn read_nested(fd: &VcpuFd) -> Result<KvmNestedStateBuffer, String> {
    let mut buf = KvmNestedStateBuffer::empty();
    fd.nested_state(&mut buf)
        .map_err(e("KVM_GET_NESTED_STATE"))?;
    Ok(buf)
}

/// Writes a saved state into a new vCPU (before its first `KVM_RUN`).
pub fn apply(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| format!("CPUID: {e:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        set_tsc_khz(fd, khz)?;
    }
    fd.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` read back from KVM_GET_XSAVE of the same
    // layout (the host check refused a snapshot from another CPU model).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    write_msrs(fd, &s.msrs)?;
    if let Some(n) = &s.nested {
        fd.set_nested_state(n).map_err(e("KVM_SET_NESTED_STATE"))?;
    }
    fd.set_vcpu_events(&s.events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The guest's TSC runs at the frequency it had: where this host's differs and KVM cannot
/// scale it, the restore is refused (the guest's clocks would run wrong).
fn set_tsc_khz(fd: &VcpuFd, khz: u32) -> Result<(), String> {
    if fd.get_tsc_khz().ok() == Some(khz) {
        return Ok(());
    }
    fd.set_tsc_khz(khz).map_err(|err| {
        format!("the guest's TSC ran at {khz} kHz and this host cannot run it at that rate: {err}")
    })
}

/// Writes every saved MSR; one KVM refuses fails the restore (naming it).
fn write_msrs(fd: &VcpuFd, saved: &[kvm_msr_entry]) -> Result<(), String> {
    for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(format!(
                "KVM_SET_MSRS refused MSR {:#x} (value {:#x})",
                chunk[n].index, chunk[n].data
            ));
        }
    }
    Ok(())
}
