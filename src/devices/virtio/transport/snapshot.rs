//! A virtio-pci device's part in a snapshot: the transport's state (status, features and their
//! selectors, configuration generation, every queue's set-up and ring positions), its PCI
//! configuration space, its MSI-X table and PBA, and the device model's own state
//! ([`VirtioDevice::save_state`]).
//!
//! Owns nothing: it reads and sets the [`VirtioPci`]'s state. A device is saved quiesced: its
//! worker stopped between batches with its handler parked (see `worker`), so every chain the
//! device took is completed in the used ring and `next_avail`/`next_used` describe everything;
//! an interrupt moderation was holding is recorded and sent when the restored device resumes.
//! A restore checks the whole state against the device before it sets any of it (queue sizes
//! powers of two within the maximum, rings inside guest RAM, features the device offers, vectors
//! that exist, known status bits), and an activated device gets its handler back on the saved
//! queues, parked until the VM's state is all set (then its worker starts: `resume`).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::QueueT;

use super::{MsixSaved, QueueHandler, QueueSetup, VirtioPci, NO_VECTOR};
use crate::devices::{state_from, state_json};

/// A queue's set-up and, on an activated device, its ring positions.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSaved {
    pub size: u16,
    pub ready: bool,
    pub vector: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
    /// Moderation held an interrupt the driver wants.
    pub interrupt_held: bool,
}

/// A device's whole saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Saved {
    pci: Vec<u32>,
    msix: MsixSaved,
    status: u8,
    /// NEEDS_RESET, when the device set it.
    device_status: u8,
    config_vector: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    queues: Vec<QueueSaved>,
    /// The device was activated and serving (its handler parked).
    active: bool,
    /// The parked handler's own state.
    handler: serde_json::Value,
    device: serde_json::Value,
}

const KNOWN_STATUS: u8 = (VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_NEEDS_RESET
    | VIRTIO_CONFIG_S_FAILED) as u8;

impl VirtioPci {
    /// Stops the worker with its handler parked (see `worker`).
    pub(super) fn quiesce_worker(&mut self) {
        self.stop_worker();
    }

    /// Starts a worker on the parked handler, if any, and sends the interrupts a restored device
    /// owes.
    pub(super) fn resume_worker(&mut self) {
        let Some(handler) = self.parked_handler().take() else {
            return;
        };
        if let Err(e) = self.start_worker(handler) {
            self.needs_reset(&e);
        }
        for v in std::mem::take(&mut self.owed) {
            self.msix.trigger(v, 1);
        }
    }

    pub(super) fn save(&self) -> Result<serde_json::Value, String> {
        if self.worker.is_some() {
            return Err("its worker is running (the device was not quiesced)".into());
        }
        let device = self.dev.save_state()?;
        let parked = self.parked_handler();
        let mut queues: Vec<QueueSaved> = self.queues.iter().map(QueueSetup::saved).collect();
        let handler = match parked.as_deref() {
            Some(h) => {
                positions(h, &mut queues);
                h.save()?
            }
            None => serde_json::Value::Null,
        };
        state_json(&Saved {
            pci: self.pci.save(),
            msix: self.msix.save(),
            status: self.status,
            device_status: self.shared.device_status.load(Ordering::SeqCst),
            config_vector: self.shared.config_vector.load(Ordering::SeqCst),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            queues,
            active: parked.is_some(),
            handler,
            device,
        })
    }

    /// Sets a saved state into this (new, never started) device; refuses it, setting nothing
    /// that would run, if it does not fit the device.
    pub(super) fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: Saved = state_from(state)?;
        self.check(&s)?;
        self.pci.restore(&s.pci)?;
        self.msix.restore(&s.msix)?;
        self.dev.restore_state(&s.device)?;
        self.status = s.status;
        self.shared
            .device_status
            .store(s.device_status, Ordering::SeqCst);
        self.shared
            .config_vector
            .store(s.config_vector, Ordering::SeqCst);
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            q.set_from(saved);
        }
        if s.active {
            let vqs = self.vqs(Some(&s.queues))?;
            let mut handler = self.activate_device(vqs)?;
            handler.restore(&s.handler)?;
            *self.parked_handler() = Some(handler);
            self.owed = s
                .queues
                .iter()
                .filter(|q| q.ready && q.interrupt_held)
                .map(|q| q.vector)
                .collect();
        }
        Ok(())
    }

    /// Whether `s` fits this device (what the queues' rings need is checked when they are made).
    fn check(&self, s: &Saved) -> Result<(), String> {
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.status & !KNOWN_STATUS != 0 || s.device_status & !KNOWN_STATUS != 0 {
            return Err(format!(
                "device status {:#x}/{:#x} has unknown bits",
                s.status, s.device_status
            ));
        }
        let unknown = s.driver_features & !self.offered_features();
        if unknown != 0 {
            return Err(format!(
                "driver features {:#x} include {unknown:#x}, which the device does not offer",
                s.driver_features
            ));
        }
        let driver_ok = (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FEATURES_OK) as u8;
        if s.active && s.status & driver_ok != driver_ok {
            return Err(format!(
                "an active device with status {:#x} (no DRIVER_OK)",
                s.status
            ));
        }
        let nvec = self.msix.vectors();
        let vector_ok = |v: u16| v < nvec || v == NO_VECTOR;
        if !vector_ok(s.config_vector) {
            return Err(format!(
                "configuration vector {} does not exist",
                s.config_vector
            ));
        }
        for (i, (q, mine)) in s.queues.iter().zip(&self.queues).enumerate() {
            if !vector_ok(q.vector) {
                return Err(format!("queue {i}: vector {} does not exist", q.vector));
            }
            if q.ready && !(q.size.is_power_of_two() && q.size <= mine.max) {
                return Err(format!(
                    "queue {i}: size {} (a power of two up to {} is needed)",
                    q.size, mine.max
                ));
            }
        }
        Ok(())
    }
}

/// Each ready queue's ring positions, from the parked handler's queues. A ready queue the
/// handler does not serve (one for a feature the driver declined) was never touched: it stays
/// at 0.
fn positions(h: &dyn QueueHandler, queues: &mut [QueueSaved]) {
    let vqs = h.queues();
    for (i, q) in queues.iter_mut().enumerate().filter(|(_, q)| q.ready) {
        let Some(vq) = vqs.iter().find(|v| usize::from(v.index) == i) else {
            continue;
        };
        q.next_avail = vq.queue.next_avail();
        q.next_used = vq.queue.next_used();
        q.interrupt_held = vq.moderator.deadline().is_some();
    }
}

impl QueueSetup {
    fn saved(&self) -> QueueSaved {
        QueueSaved {
            size: self.size,
            ready: self.ready,
            vector: self.vector,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            ..Default::default()
        }
    }

    fn set_from(&mut self, s: &QueueSaved) {
        self.size = s.size;
        self.ready = s.ready;
        self.vector = s.vector;
        self.desc = s.desc;
        self.avail = s.avail;
        self.used = s.used;
    }
}
