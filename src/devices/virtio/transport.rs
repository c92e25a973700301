//! The virtio-pci modern transport (virtio 1.x, §4.1): a PCI function whose BAR 0 holds the
//! common configuration, ISR status, device configuration, queue notification and MSI-X regions,
//! each described by a vendor capability.
//!
//! Owns a device's transport state (feature negotiation, device status, queue set-up), its PCI
//! configuration space and its worker thread. vCPU threads reach it through the MMIO bus (BAR 0)
//! and the PCI root (configuration space); queue notifications normally never reach it: KVM
//! completes writes to the notify region through one ioeventfd per queue, which the worker waits on.
//! A notify write that does reach the VMM (no ioeventfd) is forwarded to the same eventfd.
//! Its state in a snapshot, and how a restored device is re-activated, are the `snapshot`
//! submodule's.
//!
//! BAR 0 (32 KiB, 32-bit memory):
//!
//! | offset | region |
//! |---|---|
//! | 0x0000 | common configuration |
//! | 0x1000 | ISR status |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications: queue `n` at `0x3000 + 4n` (`notify_off_multiplier` 4) |
//! | 0x4000 | MSI-X table (vectors: one per queue plus one for configuration changes) |
//! | 0x5000 | MSI-X pending-bit array |

mod snapshot;

pub use snapshot::QueueSaved;

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::irq::MsixSaved;
use super::irq::{Msix, NO_VECTOR};
use super::queue::{Translate, Vq};
use super::{worker, Activation, QueueHandler, VirtioDevice};
use crate::devices::pci::{PciConfig, PciDevice, PciIds, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR};
use crate::devices::{data_to_u64, u64_to_data, BusDevice};

pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x100;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_OFFSET: u64 = 0x2000;
pub const DEVICE_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// A queue as the driver sets it up through the common configuration.
#[derive(Clone, Copy, Debug)]
struct QueueSetup {
    max: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueSetup {
    fn new(max: u16) -> Self {
        QueueSetup {
            max,
            size: max,
            ready: false,
            vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// What the transport shares with its worker.
pub struct Shared {
    /// Status bits the device sets on its own (NEEDS_RESET).
    pub device_status: AtomicU8,
    pub config_vector: AtomicU16,
}

impl Shared {
    /// Puts the device in DEVICE_NEEDS_RESET and tells the driver (a configuration interrupt).
    pub fn needs_reset(&self, stats: &super::DeviceStats, msix: &Msix) {
        stats.needs_reset.fetch_add(1, Ordering::Relaxed);
        self.device_status
            .fetch_or(VIRTIO_CONFIG_S_NEEDS_RESET as u8, Ordering::SeqCst);
        msix.trigger(self.config_vector.load(Ordering::SeqCst), 2);
    }
}

/// A virtio device on PCI.
pub struct VirtioPci {
    pci: PciConfig,
    msix_cap: usize,
    pci_cfg_cap: usize,
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    translate: Arc<dyn Translate>,
    msix: Arc<Msix>,
    shared: Arc<Shared>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    status: u8,
    config_generation: u8,
    queues: Vec<QueueSetup>,
    notify_evts: Vec<EventFd>,
    worker: Option<(EventFd, JoinHandle<()>)>,
    /// The handler of a stopped worker, kept for the next (quiesced for a snapshot, or
    /// restored): see `worker`.
    parked: worker::Parked,
    /// Queue vectors whose interrupt a restored device still owes the driver (held by
    /// moderation when the snapshot was taken), sent when it resumes.
    owed: Vec<u16>,
    /// The longest window the worker polls its queues for (see `worker`); zero: never.
    queue_poll: std::time::Duration,
}

impl VirtioPci {
    /// A device with BAR 0 at `bar0` (32 KiB aligned, below 4 GiB).
    pub fn new(
        dev: Box<dyn VirtioDevice>,
        bar0: u64,
        mem: GuestMemoryMmap,
        translate: Arc<dyn Translate>,
        routes: Arc<dyn super::irq::MsiRoutes>,
    ) -> Result<Self, String> {
        let nq = dev.queue_max_sizes().len();
        let vectors = nq as u16 + 1;
        let msix = Arc::new(Msix::new(vectors, routes)?);
        let ty = dev.device_type() as u16;
        let mut pci = PciConfig::new(PciIds {
            vendor: 0x1af4,
            device: 0x1040 + ty,
            revision: 1,
            class: dev.pci_class(),
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        pci.set_bar(0, bar0, BAR_SIZE);
        let ctrl = vectors - 1;
        let mut msix_body = vec![PCI_CAP_ID_MSIX, 0];
        msix_body.extend_from_slice(&ctrl.to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32).to_le_bytes());
        let msix_cap = pci.add_capability(&msix_body, &[0, 0, 0, 0xc0]);
        let vcap = |ty: u8, off: u64, len: u64, extra: &[u8]| {
            let mut b = vec![PCI_CAP_ID_VNDR, 0, 16 + extra.len() as u8, ty, 0, 0, 0, 0];
            b.extend_from_slice(&(off as u32).to_le_bytes());
            b.extend_from_slice(&(len as u32).to_le_bytes());
            b.extend_from_slice(extra);
            b
        };
        pci.add_capability(&vcap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, &[]), &[]);
        pci.add_capability(
            &vcap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        pci.add_capability(&vcap(CAP_ISR, ISR_OFFSET, 1, &[]), &[]);
        pci.add_capability(&vcap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN, &[]), &[]);
        // The PCI configuration access capability: bar, offset, length and data are writable.
        let mut w = vec![0u8; 20];
        w[4] = 0xff;
        w[8..20].fill(0xff);
        let pci_cfg_cap = pci.add_capability(&vcap(CAP_PCI_CFG, 0, 0, &[0; 4]), &w);
        let notify_evts = (0..nq)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioPci {
            pci,
            msix_cap,
            pci_cfg_cap,
            queues: dev
                .queue_max_sizes()
                .into_iter()
                .map(QueueSetup::new)
                .collect(),
            dev,
            mem,
            translate,
            msix,
            shared: Arc::new(Shared {
                device_status: AtomicU8::new(0),
                config_vector: AtomicU16::new(NO_VECTOR),
            }),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            status: 0,
            config_generation: 0,
            notify_evts,
            worker: None,
            parked: worker::Parked::default(),
            owed: Vec::new(),
            queue_poll: std::time::Duration::ZERO,
        })
    }

    pub fn bar0(&self) -> u64 {
        self.pci.bar_addr(0)
    }

    pub fn name(&self) -> String {
        self.dev.name()
    }

    pub fn stats(&self) -> Arc<super::DeviceStats> {
        self.dev.stats()
    }

    pub fn msix(&self) -> &Arc<Msix> {
        &self.msix
    }

    /// (guest-physical address, eventfd) of each queue's notification register, for
    /// `KVM_IOEVENTFD`.
    /// A balloon's new target (see [`VirtioDevice::balloon_target`]); on success the configuration
    /// generation moves and the driver gets a configuration-change interrupt.
    pub fn set_balloon_target(&mut self, bytes: u64) -> Option<Result<u32, String>> {
        let r = self.dev.balloon_target(bytes)?;
        if r.is_ok() {
            self.config_changed();
        }
        Some(r)
    }

    /// The device configuration changed under the driver: a new generation (§4.1.4.3) and the
    /// configuration vector (ISR bit 1).
    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.msix
            .trigger(self.shared.config_vector.load(Ordering::SeqCst), 2);
    }

    /// Lets the worker poll its request queues for up to `max` between bursts (see `worker`).
    pub fn set_queue_poll(&mut self, max: std::time::Duration) {
        self.queue_poll = max;
    }

    pub fn notify_events(&self) -> Vec<(u64, &EventFd)> {
        self.notify_evts
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    self.bar0() + NOTIFY_OFFSET + u64::from(NOTIFY_MULTIPLIER) * i as u64,
                    e,
                )
            })
            .collect()
    }

    /// The device's features, plus ACCESS_PLATFORM when it sits behind the IOMMU.
    fn offered_features(&self) -> u64 {
        let platform = u64::from(self.translate.platform()) << VIRTIO_F_ACCESS_PLATFORM;
        self.dev.features() | platform
    }

    fn status(&self) -> u8 {
        self.status | self.shared.device_status.load(Ordering::SeqCst)
    }

    /// Whether the device is started: its worker runs, or is parked (see `worker`).
    fn live(&self) -> bool {
        self.worker.is_some() || self.parked_handler().is_some()
    }

    fn parked_handler(&self) -> std::sync::MutexGuard<'_, Option<Box<dyn QueueHandler>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the handler a stopped worker parked (the VM has ended).
    pub fn discard_parked(&mut self) {
        *self.parked_handler() = None;
    }

    /// Stops the worker and returns the device to its initial state.
    pub fn reset(&mut self) {
        self.stop_worker();
        *self.parked_handler() = None;
        self.owed.clear();
        self.dev.reset();
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.status = 0;
        self.shared.device_status.store(0, Ordering::SeqCst);
        self.shared.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max);
        }
        self.msix.reset();
    }

    /// The VM has ended: the device gives back what other processes see.
    pub fn release(&mut self) {
        self.dev.release();
    }

    pub fn stop_worker(&mut self) {
        if let Some((kill, h)) = self.worker.take() {
            let _ = kill.write(1);
            if h.join().is_err() {
                // The worker catches its handler's panics; this is a panic outside them.
                let stats = self.dev.stats();
                if stats.note_panic("the worker thread itself panicked") {
                    eprintln!(
                        "exitless: {}: device worker thread panicked",
                        self.dev.name()
                    );
                }
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        crate::warn_limited!(
            "virtio-needs-reset",
            "{}: {why}: device needs reset",
            self.dev.name()
        );
        self.shared.needs_reset(&self.dev.stats(), &self.msix);
    }

    /// Validates the queues and starts the worker (on DRIVER_OK).
    fn activate(&mut self) {
        let handler = match self.vqs(None).and_then(|vqs| self.activate_device(vqs)) {
            Ok(h) => h,
            Err(e) => return self.needs_reset(&e),
        };
        self.dev.stats().driver_ok.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.start_worker(handler) {
            self.needs_reset(&e);
        }
    }

    /// The translation the queues go through: behind the IOMMU only if the driver accepted
    /// ACCESS_PLATFORM; otherwise addresses are guest-physical (a legacy driver bypasses it, as
    /// on QEMU).
    fn queue_translate(&self) -> Arc<dyn Translate> {
        if self.driver_features & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0 {
            self.translate.clone()
        } else {
            Arc::new(super::queue::Identity)
        }
    }

    /// Every queue as set up, validated (an error says why the device cannot start), its ring
    /// positions taken from `saved` on a restore.
    fn vqs(&self, saved: Option<&[QueueSaved]>) -> Result<Vec<Vq>, String> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let translate = self.queue_translate();
        let mut vqs = Vec::new();
        for (i, s) in self.queues.iter().enumerate() {
            let mut q = Queue::new(s.max).expect("max sizes are powers of two");
            if s.ready {
                self.ready_queue(i, s, &translate, &mut q)?;
                q.set_event_idx(event_idx);
            }
            let signalled = match saved.and_then(|p| p.get(i)) {
                Some(p) => {
                    q.set_next_avail(p.next_avail);
                    q.set_next_used(p.next_used);
                    p.next_used
                }
                None => 0,
            };
            vqs.push(Vq {
                queue: q,
                index: i as u16,
                mem: self.mem.clone(),
                translate: translate.clone(),
                msix: self.msix.clone(),
                vector: s.vector,
                bad_chains: 0,
                polling: false,
                moderator: Default::default(),
                signalled,
            });
        }
        Ok(vqs)
    }

    /// Sets queue `i`'s size and rings into `q`, or says why they are unusable.
    fn ready_queue(
        &self,
        i: usize,
        s: &QueueSetup,
        translate: &Arc<dyn Translate>,
        q: &mut Queue,
    ) -> Result<(), String> {
        // The rings go through the translation hook like every buffer, once, here: virtio-queue
        // reads them by guest-physical address, so each must be one contiguous piece (Linux
        // maps them with dma_alloc_coherent for the device's life).
        let ring = |iova: u64, len: u64, write: bool| {
            let mut v = Vec::new();
            match translate.map(iova, len, write, &mut v) {
                true if v.len() == 1 => Some(v[0].addr),
                _ => None,
            }
        };
        // In order, stopping at the first that faults (as a device's first access would).
        let rings = ring(s.desc, 16 * u64::from(s.size), false).and_then(|d| {
            let a = ring(s.avail, 6 + 2 * u64::from(s.size), false)?;
            Some((d, a, ring(s.used, 6 + 8 * u64::from(s.size), true)?))
        });
        let Some((desc, avail, used)) = rings else {
            return Err(format!(
                "queue {i}: rings {:#x}/{:#x}/{:#x} are not mapped by the IOMMU",
                s.desc, s.avail, s.used
            ));
        };
        let ok = q.try_set_size(s.size).is_ok()
            && q.try_set_desc_table_address(GuestAddress(desc)).is_ok()
            && q.try_set_avail_ring_address(GuestAddress(avail)).is_ok()
            && q.try_set_used_ring_address(GuestAddress(used)).is_ok();
        q.set_ready(true);
        if !ok || !q.is_valid(&self.mem) {
            return Err(format!(
                "queue {i} is invalid (size {}, rings {:#x}/{:#x}/{:#x})",
                s.size, s.desc, s.avail, s.used
            ));
        }
        Ok(())
    }

    /// The device's handler for `vqs`.
    fn activate_device(&mut self, vqs: Vec<Vq>) -> Result<Box<dyn QueueHandler>, String> {
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues: vqs,
                features: self.driver_features,
                stats: self.dev.stats(),
            })
            .map_err(|e| format!("activation failed: {e}"))
    }

    /// A worker serving `handler`.
    fn start_worker(&mut self, handler: Box<dyn QueueHandler>) -> Result<(), String> {
        let eventfd = |e: std::io::Error| format!("eventfd: {e}");
        let evts = self
            .notify_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(eventfd)?;
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(eventfd)?;
        let kill2 = kill.try_clone().map_err(eventfd)?;
        let h = worker::spawn(
            self.dev.name(),
            self.dev.kind(),
            handler,
            evts,
            kill2,
            self.dev.stats(),
            self.shared.clone(),
            self.msix.clone(),
            self.queue_poll,
            self.parked.clone(),
        )
        .map_err(|e| format!("cannot start the worker: {e}"))?;
        self.worker = Some((kill, h));
        Ok(())
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v;
        let features_ok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        if new & features_ok != 0
            && old & features_ok == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // Modern-only device: a driver that did not accept VERSION_1 cannot use it.
            new &= !features_ok;
        }
        self.status = new;
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        if new & driver_ok != 0
            && old & driver_ok == 0
            && new & features_ok != 0
            && !self.live()
            && new & VIRTIO_CONFIG_S_FAILED as u8 == 0
        {
            self.activate();
        }
        let _ = (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER);
    }

    fn common_read(&self, off: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize);
        let features = self.offered_features();
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.shared.config_vector.load(Ordering::SeqCst)),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status()),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.ready)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc & 0xffff_ffff),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.avail & 0xffff_ffff),
            0x2c => q.map_or(0, |q| q.avail >> 32),
            0x30 => q.map_or(0, |q| q.used & 0xffff_ffff),
            0x34 => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        u64_to_data(v, data);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let v = data_to_u64(data);
        let live = self.live();
        let nvec = self.msix.vectors();
        let vector = |v: u64| {
            let v = v as u16;
            if v < nvec {
                v
            } else {
                NO_VECTOR
            }
        };
        let set_lo = |x: &mut u64, v: u64| *x = (*x & !0xffff_ffff) | (v & 0xffff_ffff);
        let set_hi = |x: &mut u64, v: u64| *x = (*x & 0xffff_ffff) | (v << 32);
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c => {
                // Only before FEATURES_OK, and only bits the device offered.
                if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 {
                    let offered = self.offered_features();
                    match self.driver_feature_select {
                        0 => set_lo(&mut self.driver_features, v & offered),
                        1 => set_hi(&mut self.driver_features, (v << 32 & offered) >> 32),
                        _ => {}
                    }
                }
            }
            0x10 => self.shared.config_vector.store(vector(v), Ordering::SeqCst),
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            _ if live => log::debug!(
                "{}: queue register {off:#x} written after DRIVER_OK: ignored",
                self.dev.name()
            ),
            _ => {
                let Some(q) = self.queues.get_mut(self.queue_select as usize) else {
                    return;
                };
                match off {
                    // Validated (power of two, <= max) at DRIVER_OK.
                    0x18 => q.size = v as u16,
                    0x1a => q.vector = vector(v),
                    0x1c => q.ready = v & 1 != 0,
                    0x20 => set_lo(&mut q.desc, v),
                    0x24 => set_hi(&mut q.desc, v),
                    0x28 => set_lo(&mut q.avail, v),
                    0x2c => set_hi(&mut q.avail, v),
                    0x30 => set_lo(&mut q.used, v),
                    0x34 => set_hi(&mut q.used, v),
                    _ => {}
                }
            }
        }
    }

    fn bar_read(&mut self, off: u64, data: &mut [u8]) {
        match off {
            COMMON_OFFSET..0x100 => self.common_read(off - COMMON_OFFSET, data),
            ISR_OFFSET => {
                // Reading clears it.
                let v = self.msix.isr.swap(0, Ordering::SeqCst);
                u64_to_data(u64::from(v), data);
            }
            DEVICE_OFFSET..0x3000 => self.dev.read_config(off - DEVICE_OFFSET, data),
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.table_read(off - MSIX_TABLE_OFFSET, data)
            }
            MSIX_PBA_OFFSET..BAR_SIZE => self.msix.pba_read(off - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, off: u64, data: &[u8]) {
        match off {
            COMMON_OFFSET..0x100 => self.common_write(off - COMMON_OFFSET, data),
            DEVICE_OFFSET..0x3000 => {
                self.dev.write_config(off - DEVICE_OFFSET, data);
            }
            NOTIFY_OFFSET..MSIX_TABLE_OFFSET => {
                // Reaches the VMM only without an ioeventfd.
                let q = ((off - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(e) = self.notify_evts.get(q) {
                    let _ = e.write(1);
                }
            }
            MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET => {
                self.msix.table_write(off - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.bar_write(offset, data)
    }
    fn save_state(&self) -> Result<serde_json::Value, String> {
        self.save()
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(state)
    }
    fn quiesce(&mut self) {
        self.quiesce_worker()
    }
    fn resume(&mut self) {
        self.resume_worker()
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        let c = self.pci_cfg_cap;
        if offset >= c + 16 && offset < c + 20 {
            // pci_cfg_data: an access to BAR 0 at the capability's offset.
            let off = u64::from(u32::from_le_bytes([
                self.pci.byte(c + 8),
                self.pci.byte(c + 9),
                self.pci.byte(c + 10),
                self.pci.byte(c + 11),
            ]));
            let len = self.pci.byte(c + 12) as usize;
            if self.pci.byte(c + 4) == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                let mut b = [0u8; 4];
                self.bar_read(off, &mut b[..len]);
                data.fill(0);
                data[..len].copy_from_slice(&b[..len]);
                return;
            }
        }
        self.pci.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        let c = self.pci_cfg_cap;
        if offset >= c + 16 && offset < c + 20 {
            let off = u64::from(u32::from_le_bytes([
                self.pci.byte(c + 8),
                self.pci.byte(c + 9),
                self.pci.byte(c + 10),
                self.pci.byte(c + 11),
            ]));
            let len = self.pci.byte(c + 12) as usize;
            if self.pci.byte(c + 4) == 0 && matches!(len, 1 | 2 | 4) && len <= data.len() {
                self.bar_write(off, &data[..len]);
            }
            return;
        }
        self.pci.write(offset, data);
        let m = self.msix_cap;
        if offset <= m + 3 && offset + data.len() > m + 2 {
            let ctrl = u16::from_le_bytes([self.pci.byte(m + 2), self.pci.byte(m + 3)]);
            self.msix.set_control(ctrl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::irq::NoRoutes;
    use crate::devices::virtio::queue::testing::*;
    use crate::devices::virtio::queue::Identity;
    use crate::devices::virtio::rng::Rng;
    use std::time::{Duration, Instant};

    fn rng_device(mem: &GuestMemoryMmap) -> VirtioPci {
        VirtioPci::new(
            Box::new(Rng::new()),
            0xc000_0000,
            mem.clone(),
            Arc::new(Identity),
            Arc::new(NoRoutes::default()),
        )
        .unwrap()
    }

    fn w(d: &mut VirtioPci, off: u64, v: u64, len: usize) {
        d.write(off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut VirtioPci, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read(off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn set_up_queue(d: &mut VirtioPci, size: u16) {
        w(d, 0x16, 0, 2);
        w(d, 0x18, u64::from(size), 2);
        w(d, 0x20, DESC, 4);
        w(d, 0x24, 0, 4);
        w(d, 0x28, AVAIL, 4);
        w(d, 0x30, USED, 4);
        w(d, 0x1a, 1, 2);
        w(d, 0x1c, 1, 2);
    }

    fn negotiate(d: &mut VirtioPci, version_1: bool) -> u8 {
        w(d, 0x14, 1, 1);
        w(d, 0x14, 3, 1);
        w(d, 0x00, 1, 4);
        assert_eq!(r(d, 0x04, 4) & 1, 1, "VERSION_1 offered");
        w(d, 0x08, 1, 4);
        w(d, 0x0c, u64::from(version_1) | 0xfffe, 4);
        w(d, 0x14, 0xb, 1);
        r(d, 0x14, 1) as u8
    }

    #[test]
    fn pci_header_and_capabilities() {
        let mem = memory();
        let mut d = rng_device(&mem);
        let mut b = [0u8; 4];
        d.config_read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1044_1af4);
        d.config_read(0x10, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xc000_0000);
        // Walk the capabilities: MSI-X then five virtio ones.
        let mut p = {
            let mut c = [0u8; 1];
            d.config_read(0x34, &mut c);
            c[0] as usize
        };
        let mut kinds = vec![];
        while p != 0 {
            let mut c = [0u8; 4];
            d.config_read(p, &mut c);
            kinds.push(if c[0] == PCI_CAP_ID_MSIX { 0 } else { c[3] });
            p = c[1] as usize;
        }
        assert_eq!(kinds, vec![0, 1, 2, 3, 4, 5]);
        // Enable MSI-X through the capability's control word.
        d.config_write(0x40 + 2, &0x8000u16.to_le_bytes());
        // The PCI configuration access capability reads the common configuration.
        let c = d.pci_cfg_cap;
        d.config_write(c + 4, &[0]);
        d.config_write(c + 8, &0x12u32.to_le_bytes());
        d.config_write(c + 12, &2u32.to_le_bytes());
        let mut n = [0u8; 4];
        d.config_read(c + 16, &mut n);
        assert_eq!(u16::from_le_bytes([n[0], n[1]]), 1, "num_queues");
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mem = memory();
        let mut d = rng_device(&mem);
        assert_eq!(negotiate(&mut d, false) & 8, 0, "FEATURES_OK refused");
        w(&mut d, 0x14, 0, 1);
        assert_eq!(r(&mut d, 0x14, 1), 0, "reset");
        assert_eq!(negotiate(&mut d, true) & 8, 8);
        // Only offered features stick.
        w(&mut d, 0x08, 1, 4);
        assert_eq!(r(&mut d, 0x0c, 4), 1);
    }

    #[test]
    fn bad_queue_size_needs_reset_then_the_device_works() {
        let mem = memory();
        let mut d = rng_device(&mem);
        negotiate(&mut d, true);
        set_up_queue(&mut d, 3);
        w(&mut d, 0x14, 0xf, 1);
        assert_ne!(r(&mut d, 0x14, 1) as u8 & 0x40, 0, "DEVICE_NEEDS_RESET");
        assert!(d.worker.is_none());
        // Reset and do it right; notify before DRIVER_OK (served once the device starts).
        w(&mut d, 0x14, 0, 1);
        assert_eq!(r(&mut d, 0x14, 1), 0);
        negotiate(&mut d, true);
        set_up_queue(&mut d, 8);
        // Vector 7 does not exist: reads back NO_VECTOR.
        w(&mut d, 0x1a, 7, 2);
        assert_eq!(r(&mut d, 0x1a, 2), u64::from(NO_VECTOR));
        let mut dq = DriverQueue::new(8);
        dq.add(&mem, &[(0x8000, 32, true)]);
        w(&mut d, NOTIFY_OFFSET, 0, 2);
        w(&mut d, 0x14, 0xf, 1);
        assert_eq!(r(&mut d, 0x14, 1), 0xf);
        // Queue set-up is frozen after DRIVER_OK.
        w(&mut d, 0x18, 2, 2);
        assert_eq!(r(&mut d, 0x18, 2), 8);
        let t = Instant::now();
        while dq.used(&mem, 0).0 != 1 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dq.used(&mem, 0), (1, 0, 32));
        // A second request through the notify register.
        dq.add(&mem, &[(0x9000, 16, true)]);
        w(&mut d, NOTIFY_OFFSET, 0, 2);
        while dq.used(&mem, 1).0 != 2 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dq.used(&mem, 1), (2, 1, 16));
        let s = d.stats();
        assert_eq!(s.driver_ok.load(Ordering::Relaxed), 1);
        assert_eq!(s.requests.load(Ordering::Relaxed), 2);
        assert_eq!(s.needs_reset.load(Ordering::Relaxed), 1);
        // Reset stops the worker.
        w(&mut d, 0x14, 0, 1);
        assert!(d.worker.is_none());
    }

    fn wait_used(dq: &DriverQueue, mem: &GuestMemoryMmap, n: u16) {
        let t = Instant::now();
        while dq.used(mem, 0).0 != n && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(dq.used(mem, 0).0, n, "used index");
    }

    /// One request served by `d`, through its notify register.
    fn serve_one(d: &mut VirtioPci, dq: &mut DriverQueue, mem: &GuestMemoryMmap, n: u16) {
        dq.add(mem, &[(0x8000 + 0x100 * u64::from(n), 16, true)]);
        w(d, NOTIFY_OFFSET, 0, 2);
        wait_used(dq, mem, n);
        assert_eq!(dq.used(mem, n - 1).2, 16);
    }

    #[test]
    fn a_quiesced_device_s_state_restores_into_a_new_one_that_goes_on_serving() {
        let mem = memory();
        let mut d = rng_device(&mem);
        negotiate(&mut d, true);
        set_up_queue(&mut d, 8);
        w(&mut d, 0x14, 0xf, 1);
        d.config_write(0x40 + 2, &0x8000u16.to_le_bytes());
        let mut dq = DriverQueue::new(8);
        serve_one(&mut d, &mut dq, &mem, 1);
        // Quiesced, saved, and the original goes on.
        d.quiesce();
        assert!(d.worker.is_none() && d.parked_handler().is_some());
        let first = d.save_state().unwrap();
        assert_eq!(first["queues"][0]["next_used"], 1, "{first}");
        d.resume();
        serve_one(&mut d, &mut dq, &mem, 2);
        d.quiesce();
        let saved = d.save_state().unwrap();
        drop(d);
        assert_eq!(saved["queues"][0]["next_avail"], 2, "{saved}");
        // A new device takes it back and serves the next request from where the first stopped.
        let mut e = rng_device(&mem);
        e.restore_state(&saved).unwrap();
        assert!(e.worker.is_none(), "parked until resumed");
        assert_eq!(r(&mut e, 0x14, 1), 0xf);
        assert_eq!(r(&mut e, 0x18, 2), 8);
        assert_eq!(r(&mut e, 0x1a, 2), 1, "queue vector");
        let mut c = [0u8; 2];
        e.config_read(0x40 + 2, &mut c);
        assert_eq!(u16::from_le_bytes(c) & 0x8000, 0x8000, "MSI-X enabled");
        e.resume();
        serve_one(&mut e, &mut dq, &mem, 3);
        assert_eq!(dq.used(&mem, 2).1, 2, "descriptor 2: the ring went on");
    }

    #[test]
    fn garbage_device_states_are_refused() {
        let mem = memory();
        let mut d = rng_device(&mem);
        negotiate(&mut d, true);
        set_up_queue(&mut d, 8);
        w(&mut d, 0x14, 0xf, 1);
        d.quiesce();
        let saved = d.save_state().unwrap();
        rng_device(&mem).restore_state(&saved).unwrap();
        let cases: [(&str, serde_json::Value, &str); 8] = [
            ("/queues/0/size", 3.into(), "size 3"),
            ("/queues/0/size", 256.into(), "size 256"),
            ("/queues/0/desc", (1u64 << 40).into(), "queue 0 is invalid"),
            ("/queues/0/vector", 9.into(), "vector 9 does not exist"),
            ("/driver_features", (1u64 << 60).into(), "does not offer"),
            ("/status", 0x30.into(), "unknown bits"),
            ("/msix/entries", serde_json::json!([]), "MSI-X vectors"),
            ("/pci", serde_json::json!([1, 2]), "configuration dwords"),
        ];
        for (at, v, want) in cases {
            let mut bad = saved.clone();
            *bad.pointer_mut(at).unwrap() = v;
            let e = rng_device(&mem).restore_state(&bad).unwrap_err();
            assert!(e.contains(want), "{at}: {e}");
        }
        assert!(rng_device(&mem)
            .restore_state(&serde_json::json!({"x": 1}))
            .is_err());
        // A running (not quiesced) device is not saved.
        let mut f = rng_device(&mem);
        f.restore_state(&saved).unwrap();
        f.resume();
        assert!(f.save_state().unwrap_err().contains("not quiesced"));
    }

    #[test]
    fn pba_reads_through_the_bar_see_each_dword() {
        let mem = memory();
        let mut d = rng_device(&mem);
        // Two vectors, both masked: a trigger of vector 1 is held as pending.
        d.msix().trigger(1, 1);
        assert_eq!(r(&mut d, MSIX_PBA_OFFSET, 4), 2);
        assert_eq!(r(&mut d, MSIX_PBA_OFFSET, 8), 2);
        assert_eq!(r(&mut d, MSIX_PBA_OFFSET + 4, 4), 0, "vectors 32-63");
        assert_eq!(r(&mut d, MSIX_PBA_OFFSET + 8, 4), 0, "vectors 64-95");
    }
}
