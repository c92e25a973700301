//! virtio-rng (virtio 1.x §5.4): fills the driver's writable buffers from the host's
//! `getrandom(2)`. One request queue, no configuration.
//!
//! Owns nothing but its counters; requests are bounded by the chain checks of `queue` and by a
//! per-request cap, so a hostile driver cannot make the worker allocate without limit.

use std::sync::Arc;

use super::queue::{Cursor, Vq};
use super::{common_features, Activation, DeviceStats, QueueHandler, VirtioDevice};

/// Most entropy handed out per request (a larger buffer is filled up to this).
const MAX_REQUEST: u64 = 64 << 10;

#[derive(Default)]
pub struct Rng {
    stats: Arc<DeviceStats>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn name(&self) -> String {
        "virtio-rng".into()
    }
    fn kind(&self) -> &'static str {
        "virtio-rng"
    }
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![64]
    }
    fn features(&self) -> u64 {
        common_features()
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// Nothing but its queue, which the transport saves.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String> {
        let vq = a.queues.into_iter().next().ok_or("no request queue")?;
        Ok(Box::new(RngHandler { vq, stats: a.stats }))
    }
    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }
}

pub struct RngHandler {
    vq: Vq,
    stats: Arc<DeviceStats>,
}

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into the live buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += n as usize;
    }
    true
}

impl RngHandler {
    fn serve_one(&mut self) -> bool {
        let Some((head, res)) = self.vq.pop() else {
            return false;
        };
        self.stats.add(&self.stats.requests, 1);
        let mut len = 0;
        match res {
            Ok(chain) => {
                let n = chain.writable_len().min(MAX_REQUEST) as usize;
                let mut buf = vec![0u8; n];
                let mut w = Cursor::new(&self.vq.mem, &chain.writable);
                if getrandom(&mut buf) && w.write(&buf) {
                    len = n as u32;
                    self.stats.add(&self.stats.bytes_to_guest, n as u64);
                } else {
                    self.stats.add(&self.stats.errors, 1);
                }
            }
            Err(_) => {
                self.stats.add(&self.stats.bad_chains, 1);
                self.stats.add(&self.stats.errors, 1);
            }
        }
        self.vq.complete(head, len);
        true
    }
}

impl QueueHandler for RngHandler {
    fn queues(&self) -> Vec<&Vq> {
        vec![&self.vq]
    }
    fn process(&mut self, _q: usize) -> Result<(), String> {
        loop {
            self.vq.disable_notification();
            while self.serve_one() {}
            if !self.vq.enable_notification() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_writable_buffers_and_survives_bad_chains() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let mut rng = Rng::new();
        let vq = vq(&mem, &dq, 0, false);
        let mut h = rng
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![vq],
                features: 0,
                stats: rng.stats(),
            })
            .unwrap();
        dq.add(&mem, &[(0x8000, 64, true)]);
        dq.add(&mem, &[(0x7fff_0000_0000, 64, true)]);
        dq.add(&mem, &[(0x9000, 32, true), (0x9100, 32, true)]);
        h.process(0).unwrap();
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert_ne!(b, [0u8; 64]);
        assert_eq!(dq.used(&mem, 0), (3, 0, 64));
        assert_eq!(dq.used(&mem, 1).2, 0);
        assert_eq!(dq.used(&mem, 2).2, 64);
        let s = rng.stats();
        assert_eq!(s.requests.load(Ordering::Relaxed), 3);
        assert_eq!(s.bad_chains.load(Ordering::Relaxed), 1);
        assert_eq!(s.bytes_to_guest.load(Ordering::Relaxed), 128);
    }
}
