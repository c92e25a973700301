//! Interrupt delivery for PCI devices: the MSI-X table each device exposes, and KVM GSI routing.
//!
//! Owns the VM's GSI routing table. `KVM_SET_GSI_ROUTING` replaces the whole table, so the
//! [`GsiRouter`] keeps KVM's default irqchip routes (IOAPIC pins 0–23, PIC pins 0–15) and adds one
//! MSI route per MSI-X vector. Each vector has an irqfd bound to its GSI: a device worker signals
//! an interrupt by writing that eventfd and KVM injects it without the VMM entering any vCPU —
//! no exit per interrupt. Masking is done here, in the VMM: a masked vector (or a masked function)
//! sets its pending bit in the PBA instead, and unmasking delivers what is pending.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// "No vector" in the virtio common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// Where MSI routes go. The KVM implementation is [`GsiRouter`]; unit tests use a no-op.
pub trait MsiRoutes: Send + Sync {
    /// A fresh GSI.
    fn alloc_gsi(&self) -> Option<u32>;
    /// Sets (`Some((address, data))`) or removes the MSI route of `gsi`.
    fn set_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String>;
    /// Binds `evt` to `gsi` (irqfd).
    fn bind_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), String>;
}

type MsiTable = BTreeMap<u32, (u64, u32)>;

/// The VM's routing table (see the module doc).
pub struct GsiRouter {
    vm: VmFd,
    /// The next free GSI and the MSI routes (GSI -> address, data).
    state: Mutex<(u32, MsiTable)>,
}

/// First GSI past the IOAPIC's 24 pins.
const FIRST_MSI_GSI: u32 = 24;

impl GsiRouter {
    /// `vm` is this router's own handle on the VM (a dup of the VMM's).
    pub fn new(vm: VmFd) -> Self {
        GsiRouter {
            vm,
            state: Mutex::new((FIRST_MSI_GSI, BTreeMap::new())),
        }
    }

    fn default_entries() -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for gsi in 0..24u32 {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = gsi;
            v.push(e);
            if gsi < 16 {
                let mut p = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                p.u.irqchip.irqchip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                p.u.irqchip.pin = gsi % 8;
                v.push(p);
            }
        }
        v
    }
}

impl MsiRoutes for GsiRouter {
    fn alloc_gsi(&self) -> Option<u32> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let g = s.0;
        (g < 4096).then(|| {
            s.0 += 1;
            g
        })
    }

    fn set_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match msi {
            Some(m) => s.1.insert(gsi, m),
            None => s.1.remove(&gsi),
        };
        let mut entries = Self::default_entries();
        for (&gsi, &(addr, data)) in &s.1 {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }

    fn bind_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), String> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(|e| format!("irqfd for GSI {gsi}: {e}"))
    }
}

/// Routes that go nowhere (unit tests).
#[derive(Default)]
pub struct NoRoutes(std::sync::atomic::AtomicU32);

impl MsiRoutes for NoRoutes {
    fn alloc_gsi(&self) -> Option<u32> {
        Some(self.0.fetch_add(1, Ordering::Relaxed) + FIRST_MSI_GSI)
    }
    fn set_route(&self, _: u32, _: Option<(u64, u32)>) -> Result<(), String> {
        Ok(())
    }
    fn bind_irqfd(&self, _: &EventFd, _: u32) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Entry {
    addr: u64,
    data: u32,
    masked: bool,
    pending: bool,
}

struct MsixState {
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
}

/// What a snapshot keeps of a device's MSI-X: the table and PBA as the guest left them, the
/// capability's enable and function-mask bits, and the ISR status.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSaved {
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
    isr: u8,
}

/// One device's MSI-X vectors: the table and PBA the guest programs (through the device's BAR),
/// the irqfds, and the ISR status byte (read by drivers that do not use MSI-X).
pub struct Msix {
    state: Mutex<MsixState>,
    irqfds: Vec<EventFd>,
    gsis: Vec<u32>,
    routes: Arc<dyn MsiRoutes>,
    /// Interrupts delivered through an irqfd, and interrupts held back (masked / MSI-X off).
    pub delivered: AtomicU64,
    pub held: AtomicU64,
    /// ISR status: bit 0 queue interrupt, bit 1 configuration change.
    pub isr: std::sync::atomic::AtomicU8,
}

pub const MSIX_ENTRY_SIZE: u64 = 16;

impl Msix {
    pub fn new(vectors: u16, routes: Arc<dyn MsiRoutes>) -> Result<Self, String> {
        let mut irqfds = Vec::new();
        let mut gsis = Vec::new();
        for _ in 0..vectors {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            let gsi = routes.alloc_gsi().ok_or("out of GSIs")?;
            routes.bind_irqfd(&evt, gsi)?;
            irqfds.push(evt);
            gsis.push(gsi);
        }
        Ok(Msix {
            state: Mutex::new(MsixState {
                entries: vec![
                    Entry {
                        masked: true,
                        ..Default::default()
                    };
                    vectors as usize
                ],
                enabled: false,
                function_masked: false,
            }),
            irqfds,
            gsis,
            routes,
            delivered: AtomicU64::new(0),
            held: AtomicU64::new(0),
            isr: std::sync::atomic::AtomicU8::new(0),
        })
    }

    pub fn vectors(&self) -> u16 {
        self.irqfds.len() as u16
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MsixState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Signals `vector` (or holds it as pending); `isr_bit` goes into the ISR status either way.
    pub fn trigger(&self, vector: u16, isr_bit: u8) {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        let mut s = self.lock();
        let usable = s.enabled;
        let fmask = s.function_masked;
        let Some(e) = s.entries.get_mut(vector as usize) else {
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !usable || fmask || e.masked {
            e.pending = true;
            self.held.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _ = self.irqfds[vector as usize].write(1);
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Message control bits from the capability (bit 15 enable, bit 14 function mask).
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & 0x8000 != 0;
        s.function_masked = control & 0x4000 != 0;
        self.flush_pending(&mut s);
    }

    fn flush_pending(&self, s: &mut MsixState) {
        if !s.enabled || s.function_masked {
            return;
        }
        for (i, e) in s.entries.iter_mut().enumerate() {
            if e.pending && !e.masked {
                e.pending = false;
                let _ = self.irqfds[i].write(1);
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A read of the table (offsets relative to the table start).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let v: u64 = match s.entries.get(i) {
            None => 0,
            Some(e) => match (field, data.len()) {
                (0, 8) => e.addr,
                (0, _) => e.addr & 0xffff_ffff,
                (4, _) => e.addr >> 32,
                (8, 8) => u64::from(e.data) | (u64::from(e.masked) << 32),
                (8, _) => u64::from(e.data),
                (12, _) => u64::from(e.masked),
                _ => 0,
            },
        };
        crate::devices::u64_to_data(v, data);
    }

    /// A write of the table; re-routes the vector's GSI when its message changes.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let mut s = self.lock();
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let v = crate::devices::data_to_u64(data);
        let Some(e) = s.entries.get_mut(i) else {
            return;
        };
        let before = *e;
        match (field, data.len()) {
            (0, 8) => e.addr = v,
            (0, _) => e.addr = (e.addr & !0xffff_ffff) | (v & 0xffff_ffff),
            (4, _) => e.addr = (e.addr & 0xffff_ffff) | (v << 32),
            (8, 8) => {
                e.data = v as u32;
                e.masked = (v >> 32) & 1 != 0;
            }
            (8, _) => e.data = v as u32,
            (12, _) => e.masked = v & 1 != 0,
            _ => {}
        }
        let after = *e;
        if (before.addr, before.data) != (after.addr, after.data) {
            if let Err(err) = self
                .routes
                .set_route(self.gsis[i], Some((after.addr, after.data)))
            {
                crate::warn_limited!("msix-route", "MSI-X vector {i}: {err}");
            }
        }
        if before.masked && !after.masked {
            self.flush_pending(&mut s);
        }
    }

    /// A read of the pending-bit array at byte `offset` (byte `n` holds vectors `8n..8n+8`).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.lock();
        let mut bits = 0u64;
        for (i, e) in s
            .entries
            .iter()
            .enumerate()
            .skip(offset as usize * 8)
            .take(64)
        {
            if e.pending {
                bits |= 1 << (i - offset as usize * 8);
            }
        }
        crate::devices::u64_to_data(bits, data);
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> MsixSaved {
        let s = self.lock();
        MsixSaved {
            entries: s.entries.clone(),
            enabled: s.enabled,
            function_masked: s.function_masked,
            isr: self.isr.load(Ordering::SeqCst),
        }
    }

    /// Takes back a saved state: the table, and each vector's GSI routed to its message as the
    /// guest's writes had routed it. Pending vectors stay pending (a vector the guest can take
    /// was delivered, not left pending, so there is nothing to send here).
    pub fn restore(&self, saved: &MsixSaved) -> Result<(), String> {
        if saved.entries.len() != self.irqfds.len() {
            return Err(format!(
                "{} MSI-X vectors saved, the device has {}",
                saved.entries.len(),
                self.irqfds.len()
            ));
        }
        if saved.isr > 3 {
            return Err(format!("ISR status {:#x} has unknown bits", saved.isr));
        }
        let mut s = self.lock();
        for (i, e) in saved.entries.iter().enumerate() {
            if (e.addr, e.data) != (0, 0) {
                self.routes
                    .set_route(self.gsis[i], Some((e.addr, e.data)))?;
            }
        }
        s.entries.clone_from(&saved.entries);
        s.enabled = saved.enabled;
        s.function_masked = saved.function_masked;
        self.isr.store(saved.isr, Ordering::SeqCst);
        Ok(())
    }

    /// Back to power-on state (every vector masked, nothing pending). Routes stay.
    pub fn reset(&self) {
        let mut s = self.lock();
        for e in &mut s.entries {
            e.pending = false;
        }
        self.isr.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_vectors_are_held_then_delivered() {
        let m = Msix::new(2, Arc::new(NoRoutes::default())).unwrap();
        m.trigger(0, 1);
        assert_eq!(m.held.load(Ordering::Relaxed), 1);
        m.set_control(0x8000);
        m.table_write(0, &0xfee0_0000u32.to_le_bytes());
        m.table_write(8, &0x41u32.to_le_bytes());
        let mut d = [0u8; 8];
        m.pba_read(0, &mut d);
        assert_eq!(d[0], 1);
        m.table_write(12, &0u32.to_le_bytes());
        assert_eq!(m.delivered.load(Ordering::Relaxed), 1);
        assert_eq!(m.irqfds[0].read().unwrap(), 1);
        m.trigger(0, 1);
        assert_eq!(m.delivered.load(Ordering::Relaxed), 2);
        let mut r = [0u8; 4];
        m.table_read(8, &mut r);
        assert_eq!(u32::from_le_bytes(r), 0x41);
        // Out-of-range vectors are dropped.
        m.trigger(7, 1);
        m.set_control(0xc000);
        m.trigger(0, 1);
        assert_eq!(m.delivered.load(Ordering::Relaxed), 2);
    }

    /// A route set: the GSI and its message.
    type Route = (u32, Option<(u64, u32)>);

    /// Routes as a list of the ones set.
    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<Route>>, NoRoutes);

    impl MsiRoutes for Recorded {
        fn alloc_gsi(&self) -> Option<u32> {
            self.1.alloc_gsi()
        }
        fn set_route(&self, gsi: u32, msi: Option<(u64, u32)>) -> Result<(), String> {
            self.0.lock().unwrap().push((gsi, msi));
            Ok(())
        }
        fn bind_irqfd(&self, _: &EventFd, _: u32) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_saved_table_comes_back_with_its_routes_and_pending_bits() {
        let m = Msix::new(3, Arc::new(NoRoutes::default())).unwrap();
        m.set_control(0x8000);
        m.table_write(16, &0xfee0_1000u32.to_le_bytes());
        m.table_write(16 + 8, &0x51u32.to_le_bytes());
        m.table_write(16 + 12, &0u32.to_le_bytes());
        m.trigger(2, 1);
        let saved = m.save();
        let routes = Arc::new(Recorded::default());
        let n = Msix::new(3, routes.clone()).unwrap();
        n.restore(&saved).unwrap();
        let gsi1 = n.gsis[1];
        assert_eq!(
            *routes.0.lock().unwrap(),
            vec![(gsi1, Some((0xfee0_1000, 0x51)))],
            "vector 1 routed as the guest had it; the unprogrammed ones not"
        );
        let mut pba = [0u8; 1];
        n.pba_read(0, &mut pba);
        assert_eq!(pba[0], 4, "vector 2 still pending (masked)");
        assert_eq!(n.isr.load(Ordering::SeqCst), 1);
        n.trigger(1, 1);
        assert_eq!(
            n.delivered.load(Ordering::Relaxed),
            1,
            "enabled and unmasked"
        );
        assert_eq!(n.irqfds[1].read().unwrap(), 1);
        let mut bad = saved.clone();
        bad.entries.pop();
        assert!(Msix::new(3, Arc::new(NoRoutes::default()))
            .unwrap()
            .restore(&bad)
            .is_err());
    }

    #[test]
    fn pba_reads_take_a_byte_offset_into_the_bit_array() {
        let m = Msix::new(40, Arc::new(NoRoutes::default())).unwrap();
        m.trigger(1, 1);
        m.trigger(33, 1);
        let dword = |off: u64| {
            let mut d = [0u8; 4];
            m.pba_read(off, &mut d);
            u32::from_le_bytes(d)
        };
        assert_eq!(dword(0), 1 << 1, "vectors 0-31");
        assert_eq!(dword(4), 1 << 1, "vectors 32-63: vector 33");
        let mut q = [0u8; 8];
        m.pba_read(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), (1 << 33) | (1 << 1));
        let mut b = [0u8; 1];
        m.pba_read(4, &mut b);
        assert_eq!(b[0], 2, "a byte read at PBA+4 is bits 32-39");
        m.pba_read(1, &mut b);
        assert_eq!(b[0], 0, "bits 8-15");
        m.pba_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0, "past the last vector");
    }
}
