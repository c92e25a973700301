//! Device models, by tier, and the buses that route guest accesses to them.
//!
//! Tiers (the seeds' three): `legacy` = emulated platform devices (every access is an exit);
//! `virtio` = paravirtual devices on the `pci` bus (queue notifications and interrupts bypass
//! userspace through ioeventfd and irqfd); assigned (VFIO) devices come later. A device sees only offsets inside
//! its own range; the [`Bus`] owns the address map. Devices may end the VM only through a
//! [`VmEndSender`], never by touching the VM or vCPUs.

pub mod iommu;
pub mod legacy;
pub mod pci;
pub mod virtio;

use std::sync::{mpsc, Arc, Mutex};

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// ACPI S5 (or an equivalent): exit 0.
    PowerOff,
    /// The guest asked for a reset (i8042, 0xcf9, ACPI reset register).
    Reset,
    /// A triple fault (`KVM_EXIT_SHUTDOWN`): a reset on real hardware.
    TripleFault,
    /// isa-debug-exit: the process ends with `(code << 1) | 1`, as with QEMU.
    DebugExit(u8),
    /// The guest kernel panicked (seen on its console).
    GuestPanic(String),
    /// The VM cannot go on (KVM error, emulation failure nobody could complete, ...).
    Error(String),
    /// The user's time limit ran out.
    Timeout,
    /// The user interrupted (console escape or signal).
    Interrupted,
    /// Stopped through the control API (`quit`): exit 0.
    Stopped,
}

/// The channel devices and vCPUs use to end the VM. The first reason sent wins.
pub type VmEndSender = mpsc::Sender<VmEnd>;

/// A device on a bus. Reads fill `data` (its length is the access size); writes carry it.
///
/// For snapshots (see `snapshot`), a device describes its own state: [`BusDevice::save_state`]
/// gives it as JSON (`null` for a device with nothing the guest could see change), and
/// [`BusDevice::restore_state`] takes it back in a new device of the same kind. The default is
/// "cannot be saved": a device that has not said what its state is blocks the snapshot, naming
/// itself, rather than restoring wrong.
///
/// A device with work of its own (a virtio device's worker thread) is [`BusDevice::quiesce`]d
/// before its state is read and [`BusDevice::resume`]d once the snapshot is written; a restored
/// one is resumed once the whole VM's state is set, so that nothing it does (an interrupt) lands
/// before the irqchip's saved state.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Err("its state cannot be saved yet".into())
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("its state cannot be restored yet".into())
    }
    /// Stops the device's own work, with nothing half-done (the VM is paused).
    fn quiesce(&mut self) {}
    /// Goes on after [`BusDevice::quiesce`] or a restore.
    fn resume(&mut self) {}
}

/// A device state as JSON (devices' `save_state`).
pub fn state_json<T: serde::Serialize>(s: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(s).map_err(|e| e.to_string())
}

/// A device state from JSON (devices' `restore_state`).
pub fn state_from<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> Result<T, String> {
    T::deserialize(v).map_err(|e| e.to_string())
}

/// One device's slot.
#[derive(Clone)]
struct Slot {
    base: u64,
    len: u64,
    name: &'static str,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (I/O ports or MMIO): sorted, non-overlapping ranges.
#[derive(Clone, Default)]
pub struct Bus {
    slots: Vec<Slot>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device {new} at {base:#x}+{len:#x} overlaps {old}")]
    Overlap {
        new: &'static str,
        old: &'static str,
        base: u64,
        len: u64,
    },
    #[error("device {0} has an empty range")]
    Empty(&'static str),
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `base..base+len`.
    pub fn insert(
        &mut self,
        name: &'static str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(name));
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| base < s.base + s.len && s.base < base + len)
        {
            return Err(BusError::Overlap {
                new: name,
                old: s.name,
                base,
                len,
            });
        }
        let at = self.slots.partition_point(|s| s.base < base);
        self.slots.insert(
            at,
            Slot {
                base,
                len,
                name,
                dev,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Slot> {
        let i = self.slots.partition_point(|s| s.base <= addr);
        let s = self.slots.get(i.checked_sub(1)?)?;
        (addr - s.base < s.len).then_some(s)
    }

    /// Routes a read. Returns false when nothing claims `addr` (the caller fills all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(s) => {
                s.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(addr - s.base, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write. Returns false when nothing claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(s) => {
                s.dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(addr - s.base, data);
                true
            }
            None => false,
        }
    }

    /// Every device's state, keyed `NAME@BASE` (a snapshot's `devices` section); every device
    /// that cannot be saved is named in the error.
    pub fn save_states(
        &self,
    ) -> Result<std::collections::BTreeMap<String, serde_json::Value>, Vec<String>> {
        let mut states = std::collections::BTreeMap::new();
        let mut refused = Vec::new();
        for s in &self.slots {
            match s.dev.lock().unwrap_or_else(|p| p.into_inner()).save_state() {
                Ok(v) => {
                    states.insert(format!("{}@{:#x}", s.name, s.base), v);
                }
                Err(e) => refused.push(format!("{} at {:#x}: {e}", s.name, s.base)),
            }
        }
        if refused.is_empty() {
            Ok(states)
        } else {
            Err(refused)
        }
    }

    /// Sets every device's saved state: the saved devices and this bus's must be the same.
    pub fn restore_states(
        &self,
        saved: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<(), String> {
        let keys: Vec<String> = self
            .slots
            .iter()
            .map(|s| format!("{}@{:#x}", s.name, s.base))
            .collect();
        if keys.len() != saved.len() || keys.iter().any(|k| !saved.contains_key(k)) {
            return Err(format!(
                "the snapshot's devices {:?} are not this VM's {keys:?}",
                saved.keys().collect::<Vec<_>>()
            ));
        }
        for (s, k) in self.slots.iter().zip(&keys) {
            s.dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(&saved[k])
                .map_err(|e| format!("device {k}: {e}"))?;
        }
        Ok(())
    }

    /// Quiesces every device (see [`BusDevice::quiesce`]).
    pub fn quiesce(&self) {
        for s in &self.slots {
            s.dev.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    /// Resumes every device (see [`BusDevice::resume`]).
    pub fn resume(&self) {
        for s in &self.slots {
            s.dev.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }

    /// The devices, for diagnostics: (name, base, len).
    pub fn ranges(&self) -> Vec<(&'static str, u64, u64)> {
        self.slots.iter().map(|s| (s.name, s.base, s.len)).collect()
    }
}

/// Little-endian value of an access of 1, 2, 4 or 8 bytes.
pub fn data_to_u64(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// Fills an access of `data.len()` bytes with the low bytes of `v`.
pub fn u64_to_data(v: u64, data: &mut [u8]) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, u64)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            u64_to_data(offset + 0x40, data);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data_to_u64(data)));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let a = Arc::new(Mutex::new(Recorder(vec![])));
        let b = Arc::new(Mutex::new(Recorder(vec![])));
        let mut bus = Bus::new();
        bus.insert("b", 0x100, 0x10, b.clone()).unwrap();
        bus.insert("a", 0x10, 8, a.clone()).unwrap();
        assert!(matches!(
            bus.insert("c", 0x108, 0x10, a.clone()),
            Err(BusError::Overlap { old: "b", .. })
        ));
        assert_eq!(bus.insert("d", 0, 0, a.clone()), Err(BusError::Empty("d")));
        assert!(bus.write(0x17, &[5]));
        assert!(bus.write(0x10f, &[1, 2]));
        assert!(!bus.write(0x18, &[1]));
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.write(0x0, &[1]));
        let mut d = [0u8; 2];
        assert!(bus.read(0x101, &mut d));
        assert_eq!(d, [0x41, 0]);
        assert_eq!(a.lock().unwrap().0, vec![(7, 5)]);
        assert_eq!(b.lock().unwrap().0, vec![(0xf, 0x201)]);
        assert_eq!(bus.ranges()[0].0, "a");
    }
}
