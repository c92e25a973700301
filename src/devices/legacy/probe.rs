//! The test kit's probe device: claimed I/O ports and an MMIO page whose every access exits to
//! the VMM and is counted, plus one port and one MMIO register completed by an ioeventfd inside
//! KVM (no userspace exit). Tests and `bench exits` use it to check exit counts exactly. Present
//! only when asked (`--probe`, on for kit guests).
//!
//! Map (offsets inside the PIO range at 0x510 and the MMIO page at 0xf000_0000):
//! - 0x0: null register: reads 0, writes ignored, counted;
//! - 0x4 (PIO) / 0x100 (MMIO): 4-byte writes go to an ioeventfd and never reach userspace; the
//!   VMM reads how many arrived from the eventfd at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::devices::BusDevice;

pub const PIO_EVENTFD_OFFSET: u64 = 4;
pub const MMIO_EVENTFD_OFFSET: u64 = 0x100;

#[derive(Default, Debug)]
pub struct ProbeCounters {
    pub pio_reads: AtomicU64,
    pub pio_writes: AtomicU64,
    pub mmio_reads: AtomicU64,
    pub mmio_writes: AtomicU64,
}

/// One face (PIO or MMIO) of the probe.
pub struct Probe {
    mmio: bool,
    counters: Arc<ProbeCounters>,
}

impl Probe {
    pub fn pio(counters: Arc<ProbeCounters>) -> Self {
        Probe {
            mmio: false,
            counters,
        }
    }

    pub fn mmio(counters: Arc<ProbeCounters>) -> Self {
        Probe {
            mmio: true,
            counters,
        }
    }
}

impl BusDevice for Probe {
    /// Nothing the guest can see changes: its snapshot state is empty.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }

    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let c = if self.mmio {
            &self.counters.mmio_reads
        } else {
            &self.counters.pio_reads
        };
        c.fetch_add(1, Ordering::Relaxed);
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        let c = if self.mmio {
            &self.counters.mmio_writes
        } else {
            &self.counters.pio_writes
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_access_on_its_face() {
        let c = Arc::new(ProbeCounters::default());
        let mut p = Probe::pio(c.clone());
        let mut m = Probe::mmio(c.clone());
        let mut d = [0xffu8; 4];
        p.write(0, &[1, 2, 3, 4]);
        p.read(0, &mut d);
        m.write(0, &[1]);
        m.write(8, &[1]);
        m.read(0, &mut d);
        assert_eq!(d, [0; 4]);
        assert_eq!(c.pio_writes.load(Ordering::Relaxed), 1);
        assert_eq!(c.pio_reads.load(Ordering::Relaxed), 1);
        assert_eq!(c.mmio_writes.load(Ordering::Relaxed), 2);
        assert_eq!(c.mmio_reads.load(Ordering::Relaxed), 1);
    }
}
