//! PCI: one segment, bus 0, a host bridge at 00:00.0 and the devices behind it.
//!
//! Owns the PCI configuration space of every device (type-0 headers, BARs, capability lists), the
//! two ways a guest reaches it — configuration mechanism #1 (ports 0xcf8/0xcfc) and ECAM (MMIO at
//! `layout::PCI_ECAM_START`, described to the guest by the MCFG table) — and the allocation of BARs
//! from the 32-bit MMIO window (`vm-allocator`). Devices own what lies behind their BARs: each BAR
//! is registered on the MMIO bus by whoever builds the device (see `devices::virtio`).
//!
//! BARs are assigned by exitless (there is no firmware) and stay where they were put: a guest may
//! size a BAR (write all-ones, read the mask, write the address back), but an attempt to move it is
//! refused (the register keeps its assigned address) because the MMIO bus and the KVM ioeventfds are
//! fixed at start-up. Linux keeps firmware assignments that lie inside the host bridge's `_CRS`
//! window, which ours do.
//!
//! Config space accesses are rare (enumeration, MSI-X set-up), so the root serialises them simply:
//! the [`PciRoot`] is immutable after start-up and each device sits behind its own mutex.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::{data_to_u64, u64_to_data, BusDevice};

/// Size of a function's configuration space through ECAM (PCIe); mechanism #1 sees the first 256.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const LEGACY_CONFIG_SIZE: usize = 256;

pub const PCI_COMMAND: usize = 0x04;
pub const PCI_STATUS_CAP_LIST: u32 = 1 << 20;
pub const PCI_BAR0: usize = 0x10;
pub const PCI_CAPABILITY_LIST: usize = 0x34;
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

/// A type-0 configuration header with its capability list: the registers and which bits of each
/// the guest may change.
#[derive(Clone)]
pub struct PciConfig {
    regs: Vec<u32>,
    writable: Vec<u32>,
    /// Size of each 32-bit memory BAR (0 = not implemented).
    bar_sizes: [u64; 6],
    bar_addrs: [u64; 6],
    /// Where the next capability goes and the `next` byte of the last one.
    next_cap: usize,
    last_cap_next: Option<usize>,
}

/// Identification of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

impl PciConfig {
    pub fn new(ids: PciIds) -> Self {
        let mut c = PciConfig {
            regs: vec![0; CONFIG_SPACE_SIZE / 4],
            writable: vec![0; CONFIG_SPACE_SIZE / 4],
            bar_sizes: [0; 6],
            bar_addrs: [0; 6],
            next_cap: 0x40,
            last_cap_next: None,
        };
        c.regs[0] = u32::from(ids.vendor) | (u32::from(ids.device) << 16);
        c.regs[2] = u32::from(ids.revision) | (ids.class << 8);
        c.regs[0x2c / 4] = u32::from(ids.subsystem_vendor) | (u32::from(ids.subsystem) << 16);
        // Command: I/O, memory, bus master, INTx disable are writable. Status is read-only here.
        c.writable[PCI_COMMAND / 4] = 0x0000_0407;
        // Cache line size and latency timer are plain storage.
        c.writable[0x0c / 4] = 0x0000_ffff;
        // Interrupt line: storage for the OS; pin 0 (no INTx).
        c.writable[0x3c / 4] = 0x0000_00ff;
        c
    }

    /// Implements BAR `n` as a 32-bit non-prefetchable memory BAR of `size` bytes at `addr`.
    pub fn set_bar(&mut self, n: usize, addr: u64, size: u64) {
        assert!(n < 6 && size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size));
        assert!(addr + size <= 1 << 32, "32-bit BARs only");
        self.bar_sizes[n] = size;
        self.bar_addrs[n] = addr;
        self.regs[PCI_BAR0 / 4 + n] = addr as u32;
        self.writable[PCI_BAR0 / 4 + n] = !(size as u32 - 1);
    }

    pub fn bar_addr(&self, n: usize) -> u64 {
        self.bar_addrs[n]
    }

    /// Appends a capability (`body` starts with the ID byte; its second byte, `next`, is filled
    /// in). `writable` masks, by byte, which bits of the body the guest may change. Returns the
    /// capability's offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap;
        let len = body.len().next_multiple_of(4);
        assert!(off + len <= LEGACY_CONFIG_SIZE, "capability list overflows");
        for (i, b) in body.iter().enumerate() {
            self.set_byte(off + i, *b);
            let w = writable.get(i).copied().unwrap_or(0);
            let word = &mut self.writable[(off + i) / 4];
            *word = (*word & !(0xff << (8 * ((off + i) % 4))))
                | (u32::from(w) << (8 * ((off + i) % 4)));
        }
        self.set_byte(off + 1, 0);
        match self.last_cap_next {
            Some(n) => self.set_byte(n, off as u8),
            None => {
                self.set_byte(PCI_CAPABILITY_LIST, off as u8);
                self.regs[1] |= PCI_STATUS_CAP_LIST;
            }
        }
        self.last_cap_next = Some(off + 1);
        self.next_cap = off + len;
        off
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let sh = 8 * (off % 4);
        let r = &mut self.regs[off / 4];
        *r = (*r & !(0xff << sh)) | (u32::from(v) << sh);
    }

    /// Byte `off` of the configuration space.
    pub fn byte(&self, off: usize) -> u8 {
        (self.regs[off / 4] >> (8 * (off % 4))) as u8
    }

    /// Stores raw bytes (for device-owned fields such as MSI-X control), ignoring the masks.
    pub fn store(&mut self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            self.set_byte(off + i, *b);
        }
    }

    /// A read of `data.len()` bytes at `off`.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if off + i < CONFIG_SPACE_SIZE {
                self.byte(off + i)
            } else {
                0xff
            };
        }
    }

    /// The registers a snapshot keeps: the first 256 bytes (the header and the capabilities,
    /// where every guest-writable bit lies) as dwords.
    pub fn save(&self) -> Vec<u32> {
        self.regs[..LEGACY_CONFIG_SIZE / 4].to_vec()
    }

    /// Takes back saved registers: only the bits the guest may write are taken (the rest is the
    /// device's, as built), and a BAR must hold its assigned address or its sizing pattern (BARs
    /// never move).
    pub fn restore(&mut self, saved: &[u32]) -> Result<(), String> {
        if saved.len() != LEGACY_CONFIG_SIZE / 4 {
            return Err(format!(
                "{} configuration dwords saved, not {}",
                saved.len(),
                LEGACY_CONFIG_SIZE / 4
            ));
        }
        for (n, &size) in self.bar_sizes.iter().enumerate() {
            let v = saved[PCI_BAR0 / 4 + n];
            if size != 0 && u64::from(v) != self.bar_addrs[n] && v != !(size as u32 - 1) {
                return Err(format!(
                    "BAR{n} saved as {v:#x}; the device's is at {:#x}",
                    self.bar_addrs[n]
                ));
            }
        }
        for (i, &v) in saved.iter().enumerate() {
            let w = self.writable[i];
            self.regs[i] = (self.regs[i] & !w) | (v & w);
        }
        Ok(())
    }

    /// A guest write of `data` at `off`, through the writable masks. BARs may be sized but not moved.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        if off + data.len() > CONFIG_SPACE_SIZE || data.is_empty() {
            return;
        }
        let reg = off / 4;
        let sh = 8 * (off % 4);
        let span = if data.len() >= 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * data.len())) - 1) << sh
        };
        let val = (data_to_u64(data) as u32) << sh;
        let mask = self.writable[reg] & span;
        let new = (self.regs[reg] & !mask) | (val & mask);
        if (PCI_BAR0 / 4..PCI_BAR0 / 4 + 6).contains(&reg) {
            let n = reg - PCI_BAR0 / 4;
            if self.bar_sizes[n] == 0 {
                return;
            }
            let sizing = !(self.bar_sizes[n] as u32 - 1);
            if new == sizing || u64::from(new) == self.bar_addrs[n] {
                self.regs[reg] = new;
            } else {
                crate::warn_limited!(
                    "pci-bar-move",
                    "guest tried to move BAR{n} from {:#x} to {new:#x}: refused (BARs are fixed)",
                    self.bar_addrs[n]
                );
                self.regs[reg] = self.bar_addrs[n] as u32;
            }
            return;
        }
        self.regs[reg] = new;
    }
}

/// A function on bus 0. Offsets are into its 4 KiB configuration space; an access never crosses
/// a dword.
pub trait PciDevice: Send {
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// 00:00.0.
pub struct HostBridge(PciConfig);

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge(PciConfig::new(PciIds {
            // Red Hat's PCIe host bridge IDs, which every OS knows to need no driver.
            vendor: 0x1b36,
            device: 0x0008,
            revision: 0,
            class: 0x06_00_00,
            subsystem_vendor: 0x1b36,
            subsystem: 0,
        }))
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data)
    }
}

/// Bus 0: up to 32 single-function devices.
pub struct PciRoot {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; 32];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        PciRoot { slots }
    }
}

impl PciRoot {
    /// Puts `dev` in the first free slot; returns its device number.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let n = self.slots.iter().position(Option::is_none)?;
        self.slots[n] = Some(dev);
        Some(n as u8)
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// A configuration read; all-ones where no function answers.
    pub fn read(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &mut [u8]) {
        match self.device(bus, dev, func) {
            Some(d) if offset + data.len() <= CONFIG_SPACE_SIZE => d
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    pub fn write(&self, bus: u8, dev: u8, func: u8, offset: usize, data: &[u8]) {
        if let Some(d) = self.device(bus, dev, func) {
            if offset + data.len() <= CONFIG_SPACE_SIZE {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .config_write(offset, data)
            }
        }
    }
}

/// Port 0xcf8 (CONFIG_ADDRESS), a dword register. Registered with length 1 so that 0xcf9 (the
/// reset control register) stays a separate device: a 4-byte access at 0xcf8 reaches this one.
pub struct ConfigAddress(pub Arc<AtomicU32>);

impl BusDevice for ConfigAddress {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            u64_to_data(u64::from(self.0.load(Ordering::Relaxed)), data);
        } else {
            data.fill(0xff);
        }
    }
    fn save_state(&self) -> Result<serde_json::Value, String> {
        super::state_json(&self.0.load(Ordering::Relaxed))
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let a: u32 = super::state_from(state)?;
        self.0.store(a & 0x80ff_fffc, Ordering::Relaxed);
        Ok(())
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only dword accesses address configuration space (byte writes to 0xcf8/0xcfb are other,
        // legacy, uses that we ignore).
        if offset == 0 && data.len() == 4 {
            self.0
                .store(data_to_u64(data) as u32 & 0x80ff_fffc, Ordering::Relaxed);
        }
    }
}

/// Ports 0xcfc..0xcff (CONFIG_DATA).
pub struct ConfigData {
    pub address: Arc<AtomicU32>,
    pub root: Arc<PciRoot>,
}

impl ConfigData {
    fn target(&self, offset: u64) -> Option<(u8, u8, u8, usize)> {
        let a = self.address.load(Ordering::Relaxed);
        (a & 0x8000_0000 != 0).then(|| {
            (
                (a >> 16) as u8,
                ((a >> 11) & 0x1f) as u8,
                ((a >> 8) & 7) as u8,
                (a & 0xfc) as usize + offset as usize,
            )
        })
    }
}

/// The data port and ECAM hold no state (the address is `ConfigAddress`'s; each function's
/// registers are saved by its device). The host bridge's few writable registers (command, cache
/// line, interrupt line) are not saved: no driver binds to it.
impl BusDevice for ConfigData {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.target(offset) {
            Some((b, d, f, off)) if off % 4 + data.len() <= 4 => self.root.read(b, d, f, off, data),
            _ => data.fill(0xff),
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((b, d, f, off)) = self.target(offset) {
            if off % 4 + data.len() <= 4 {
                self.root.write(b, d, f, off, data)
            }
        }
    }
}

/// ECAM: bus << 20 | device << 15 | function << 12 | register.
pub struct Ecam(pub Arc<PciRoot>);

fn ecam_decode(offset: u64) -> (u8, u8, u8, usize) {
    (
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as usize,
    )
}

impl BusDevice for Ecam {
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (b, d, f, off) = ecam_decode(offset);
        if off % 4 + data.len() <= 4 {
            self.0.read(b, d, f, off, data)
        } else {
            data.fill(0xff)
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (b, d, f, off) = ecam_decode(offset);
        if off % 4 + data.len() <= 4 {
            self.0.write(b, d, f, off, data)
        }
    }
}

/// Hands out naturally aligned BAR ranges from the 32-bit PCI MMIO window.
pub struct BarAllocator(AddressAllocator);

impl BarAllocator {
    pub fn new(base: u64, size: u64) -> Self {
        BarAllocator(AddressAllocator::new(base, size).expect("valid PCI window"))
    }

    pub fn alloc(&mut self, size: u64) -> Option<u64> {
        self.0
            .allocate(size, size, AllocPolicy::FirstMatch)
            .ok()
            .map(|r| r.start())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x018000,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        })
    }

    fn rd32(c: &PciConfig, off: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn header_bars_and_capabilities() {
        let mut c = cfg();
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        assert_eq!(rd32(&c, 8) >> 8, 0x018000);
        c.set_bar(0, 0xc000_0000, 0x8000);
        // Sizing: all-ones, read the mask, restore.
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xffff_8000);
        c.write(0x10, &0xc000_0000u32.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xc000_0000);
        // Moving is refused.
        c.write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(rd32(&c, 0x10), 0xc000_0000);
        // Unimplemented BARs read 0 and ignore writes.
        c.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(rd32(&c, 0x14), 0);
        // Read-only IDs.
        c.write(0, &0u32.to_le_bytes());
        assert_eq!(rd32(&c, 0), 0x1042_1af4);
        let a = c.add_capability(&[PCI_CAP_ID_MSIX, 0, 1, 0], &[0, 0, 0, 0xc0]);
        let b = c.add_capability(&[PCI_CAP_ID_VNDR, 0, 4, 9], &[]);
        assert_eq!(c.byte(PCI_CAPABILITY_LIST) as usize, a);
        assert_eq!(c.byte(a + 1) as usize, b);
        assert_eq!(c.byte(b + 1), 0);
        assert!(rd32(&c, 4) & PCI_STATUS_CAP_LIST != 0);
        c.write(a + 3, &[0xff]);
        assert_eq!(c.byte(a + 3), 0xc0);
        c.write(b + 2, &[0xff]);
        assert_eq!(c.byte(b + 2), 4);
    }

    #[test]
    fn saved_registers_come_back_through_the_writable_masks_and_bars_stay() {
        let mut c = cfg();
        c.set_bar(0, 0xc000_0000, 0x8000);
        c.write(PCI_COMMAND, &0x0406u16.to_le_bytes());
        c.write(0x3c, &[11]);
        let saved = c.save();
        let mut d = cfg();
        d.set_bar(0, 0xc000_0000, 0x8000);
        let mut garbage = saved.clone();
        garbage[0] = 0xdead_beef;
        d.restore(&garbage).unwrap();
        assert_eq!(rd32(&d, 0), 0x1042_1af4, "read-only: the device's own");
        assert_eq!(rd32(&d, PCI_COMMAND) & 0xffff, 0x0406);
        assert_eq!(d.byte(0x3c), 11);
        let mut moved = saved.clone();
        moved[PCI_BAR0 / 4] = 0xd000_0000;
        assert!(d.restore(&moved).unwrap_err().contains("BAR0"));
        assert!(d.restore(&saved[..10]).is_err());
    }

    #[test]
    fn mechanism_1_and_ecam_reach_the_same_functions() {
        let root = Arc::new(PciRoot::default());
        let addr = Arc::new(AtomicU32::new(0));
        let mut a = ConfigAddress(addr.clone());
        let mut d = ConfigData {
            address: addr,
            root: root.clone(),
        };
        a.write(0, &0x8000_0000u32.to_le_bytes());
        let mut v = [0u8; 4];
        a.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x8000_0000);
        d.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0008_1b36);
        let mut w = [0u8; 2];
        d.read(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0008);
        // Device 1 is absent.
        a.write(0, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
        d.read(0, &mut v);
        assert_eq!(v, [0xff; 4]);
        // Disabled address: all-ones.
        a.write(0, &0u32.to_le_bytes());
        d.read(0, &mut v);
        assert_eq!(v, [0xff; 4]);
        let mut e = Ecam(root);
        e.read(0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x0008_1b36);
        e.read(1 << 20, &mut v);
        assert_eq!(v, [0xff; 4], "bus 1 does not exist");
    }

    #[test]
    fn bar_allocation_is_aligned() {
        let mut b = BarAllocator::new(0xc000_0000, 0x2000_0000);
        let x = b.alloc(0x1000).unwrap();
        let y = b.alloc(0x8000).unwrap();
        assert_eq!(x % 0x1000, 0);
        assert_eq!(y % 0x8000, 0);
        assert_ne!(x, y);
    }
}
