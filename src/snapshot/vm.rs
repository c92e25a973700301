//! The VM-wide state KVM holds: the in-kernel irqchip (both PICs and the IOAPIC), the PIT and
//! kvmclock.
//!
//! kvmclock is saved as the value the lifecycle froze at the pause (what the guest's clock
//! said when its vCPUs stopped), so a restored guest's clock continues from there, as a resumed
//! one's does. Owns nothing; it touches only the VM descriptor it is given.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// The irqchip, PIT and clock of a paused VM.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// kvmclock (ns) when the VM was paused.
    pub clock_ns: u64,
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, String> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| format!("KVM_GET_IRQCHIP {id}: {e}"))?;
    Ok(c)
}

/// Reads the VM's state; `clock_ns` is the kvmclock the pause froze.
pub fn capture(vm: &VmFd, clock_ns: u64) -> Result<VmState, String> {
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|e| format!("KVM_GET_PIT2: {e}"))?,
        clock_ns,
    })
}

/// Writes the saved state into a new VM (irqchip and PIT created, vCPUs not yet run).
pub fn apply(vm: &VmFd, s: &VmState) -> Result<(), String> {
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(c)
            .map_err(|e| format!("KVM_SET_IRQCHIP {}: {e}", c.chip_id))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| format!("KVM_SET_PIT2: {e}"))?;
    set_clock(vm, s.clock_ns)
}

/// Sets kvmclock (done last, just before the vCPUs run).
pub fn set_clock(vm: &VmFd, ns: u64) -> Result<(), String> {
    let data = kvm_clock_data {
        clock: ns,
        ..Default::default()
    };
    vm.set_clock(&data)
        .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
}
