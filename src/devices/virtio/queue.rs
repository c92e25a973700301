//! A device's view of one virtqueue: taking descriptor chains, validating them, moving bytes, and
//! returning them with an interrupt only when the driver wants one.
//!
//! Owns the rules every device relies on for hostile input. `virtio-queue` walks the descriptor
//! table (bounded by the queue size, so a looping chain ends) and this module then checks each
//! buffer: its address goes through the [`Translate`] hook (identity without an IOMMU; with
//! `--iommu` and `VIRTIO_F_ACCESS_PLATFORM` the emulated VT-d in `devices::iommu`, which may split
//! a buffer into guest-physical pieces or refuse it with a recorded fault), every piece must lie
//! in guest RAM, and a chain's total length is capped. A chain that fails is [`ChainError`]: the device completes it as failed (or with
//! length 0) and goes on; the VMM never trusts a guest address or length.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::irq::Msix;
use super::moderation::Moderator;

/// Address translation from what a driver puts in a descriptor (an I/O virtual address when
/// `VIRTIO_F_ACCESS_PLATFORM` is negotiated behind an IOMMU) to a guest-physical address.
pub trait Translate: Send + Sync {
    /// The guest-physical address of `len` bytes at `iova`, or None when unmapped.
    fn translate(&self, iova: u64, len: u64) -> Option<u64>;

    /// The guest-physical pieces of `len` bytes at `iova` for a DMA that reads guest memory
    /// (`write` false) or writes it, appended to `out`; false when refused (an IOMMU records the
    /// fault). The default is [`Self::translate`] in one piece.
    fn map(&self, iova: u64, len: u64, write: bool, out: &mut Vec<Seg>) -> bool {
        let _ = write;
        match self.translate(iova, len) {
            Some(addr) => {
                out.push(Seg { addr, len });
                true
            }
            None => false,
        }
    }

    /// Whether devices sit behind a platform IOMMU (they offer `VIRTIO_F_ACCESS_PLATFORM`).
    fn platform(&self) -> bool {
        false
    }
}

/// No IOMMU: addresses are guest-physical.
pub struct Identity;

impl Translate for Identity {
    fn translate(&self, iova: u64, _len: u64) -> Option<u64> {
        Some(iova)
    }
}

/// Longest chain a device accepts (bytes). Larger chains are refused as absurd.
pub const MAX_CHAIN_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("buffer {0:#x}+{1:#x} is outside guest memory")]
    OutOfMemory(u64, u64),
    #[error("DMA to I/O virtual address {0:#x}+{1:#x} refused by the IOMMU")]
    IommuFault(u64, u64),
    #[error("chain longer than {MAX_CHAIN_BYTES} bytes")]
    TooLong,
    #[error("readable buffer after a writable one")]
    Order,
    #[error("request malformed: {0}")]
    Malformed(&'static str),
}

/// One validated buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u64,
}

/// The device-readable and device-writable halves of a chain.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.len).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.len).sum()
    }
}

/// A cursor over a list of segments in guest memory.
pub struct Cursor<'a> {
    mem: &'a GuestMemoryMmap,
    segs: &'a [Seg],
    idx: usize,
    off: u64,
    /// Bytes moved so far.
    pub done: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, segs: &'a [Seg]) -> Self {
        Cursor {
            mem,
            segs,
            idx: 0,
            off: 0,
            done: 0,
        }
    }

    pub fn remaining(&self) -> u64 {
        self.segs[self.idx.min(self.segs.len())..]
            .iter()
            .map(|s| s.len)
            .sum::<u64>()
            - self.off
    }

    /// Calls `f(guest address, length)` for the next `n` bytes (fewer if the segments end).
    fn walk(&mut self, mut n: u64, mut f: impl FnMut(u64, u64) -> bool) -> bool {
        while n > 0 && self.idx < self.segs.len() {
            let s = self.segs[self.idx];
            let k = (s.len - self.off).min(n);
            if k > 0 && !f(s.addr + self.off, k) {
                return false;
            }
            self.off += k;
            self.done += k;
            n -= k;
            if self.off == s.len {
                self.idx += 1;
                self.off = 0;
            }
        }
        n == 0
    }

    /// Reads exactly `buf.len()` bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> bool {
        let mem = self.mem;
        let mut at = 0usize;
        self.walk(buf.len() as u64, |a, k| {
            let r = mem
                .read_slice(&mut buf[at..at + k as usize], GuestAddress(a))
                .is_ok();
            at += k as usize;
            r
        })
    }

    /// Writes all of `buf`.
    pub fn write(&mut self, buf: &[u8]) -> bool {
        let mem = self.mem;
        let mut at = 0usize;
        self.walk(buf.len() as u64, |a, k| {
            let r = mem
                .write_slice(&buf[at..at + k as usize], GuestAddress(a))
                .is_ok();
            at += k as usize;
            r
        })
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: u64) -> bool {
        self.walk(n, |_, _| true)
    }
}

/// A queue being served by a worker.
pub struct Vq {
    pub queue: Queue,
    pub index: u16,
    pub mem: GuestMemoryMmap,
    pub translate: Arc<dyn Translate>,
    pub msix: Arc<Msix>,
    /// MSI-X vector of this queue.
    pub vector: u16,
    /// Chains refused as invalid.
    pub bad_chains: u64,
    /// The worker is polling this queue (see `worker`): [`Self::enable_notification`] only says
    /// whether chains are waiting and leaves the driver's notifications off, so a driver that
    /// keeps the queue fed never has to notify.
    pub polling: bool,
    /// When the interrupts the driver wants are sent (`moderation`).
    pub moderator: Moderator,
    /// The used index when the last interrupt was sent (what a held one is checked against).
    pub signalled: u16,
}

impl Vq {
    /// The next chain, validated. `Some(Err(..))` is a chain the device must complete as failed
    /// (its head index is in the error's tuple).
    pub fn pop(&mut self) -> Option<(u16, Result<Chain, ChainError>)> {
        if !self.queue.ready() {
            return None;
        }
        let chain = self.queue.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        let mut c = Chain {
            head,
            ..Default::default()
        };
        let mut total = 0u64;
        let mut res = Ok(());
        let mut truncated = false;
        for d in chain {
            // The walk stops early (without an error) on a loop, a `next` out of range or an
            // unreadable descriptor: then the last descriptor seen still says NEXT.
            truncated = d.has_next();
            let len = u64::from(d.len());
            total += len;
            if total > MAX_CHAIN_BYTES {
                res = Err(ChainError::TooLong);
                break;
            }
            let write = d.is_write_only();
            if !write && !c.writable.is_empty() {
                res = Err(ChainError::Order);
                break;
            }
            let out = if write {
                &mut c.writable
            } else {
                &mut c.readable
            };
            let first = out.len();
            if !self.translate.map(d.addr().0, len, write, out) {
                res = Err(ChainError::IommuFault(d.addr().0, len));
                break;
            }
            let perm = if write {
                Permissions::Write
            } else {
                Permissions::Read
            };
            let outside = out[first..].iter().find(|s| {
                s.len > 0
                    && !self
                        .mem
                        .check_range(GuestAddress(s.addr), s.len as usize, perm)
            });
            if let Some(s) = outside {
                res = Err(ChainError::OutOfMemory(s.addr, s.len));
                break;
            }
        }
        if res.is_ok() && truncated {
            res = Err(ChainError::Malformed("descriptor loop or bad next index"));
        }
        if res.is_err() {
            self.bad_chains += 1;
        }
        Some((head, res.map(|_| c)))
    }

    /// Returns chain `head` with `len` bytes written; interrupts if the driver asked for one.
    pub fn complete(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&self.mem, head, len) {
            crate::warn_limited!("virtio-queue", "virtqueue {}: add_used: {e:?}", self.index);
            return;
        }
        self.signal_used(1);
    }

    /// `n` buffers were just put in the used ring: interrupts if the driver asked for one among
    /// them (EVENT_IDX's `used_event`, else the avail flags), now or when moderation says.
    pub fn signal_used(&mut self, n: u32) {
        let wanted = match self.queue.needs_notification(&self.mem) {
            Ok(w) => w,
            Err(e) => {
                crate::warn_limited!("virtio-queue", "virtqueue {}: {e:?}", self.index);
                true
            }
        };
        self.interrupt(n, wanted);
    }

    /// The moderation step of an interrupt decision already taken (`wanted`) for `n` buffers.
    pub fn interrupt(&mut self, n: u32, wanted: bool) {
        if !wanted && self.moderator.deadline().is_none() {
            return;
        }
        if self.moderator.used(std::time::Instant::now(), n, wanted) {
            self.msix.trigger(self.vector, 1);
            self.signalled = self.queue.next_used();
        }
    }

    /// Sends this queue's held interrupt if it is due at `now` and the driver still wants it:
    /// a driver that meanwhile took the used buffers on its own (NAPI polling) and turned its
    /// interrupts off gets none (virtio 1.3 §5.1.6.5.9: coalescing never overrides suppression).
    pub fn send_due(&mut self, now: std::time::Instant) {
        if self.moderator.deadline().is_some_and(|d| d <= now) {
            if self.still_wanted() {
                self.moderator.due(now);
                self.msix.trigger(self.vector, 1);
                self.signalled = self.queue.next_used();
            } else {
                self.moderator.cancel(now);
            }
        }
    }

    /// Whether the driver wants an interrupt for the buffers used since the last one sent:
    /// `used_event` among them (EVENT_IDX), else no `VRING_AVAIL_F_NO_INTERRUPT`. Unreadable
    /// rings count as wanting it.
    fn still_wanted(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        let q = &self.queue;
        let new = q.next_used();
        if q.event_idx_enabled() {
            let at = GuestAddress(q.avail_ring() + 4 + 2 * u64::from(q.size()));
            match self.mem.load::<u16>(at, Acquire) {
                Ok(e) => {
                    let e = u16::from_le(e);
                    new.wrapping_sub(e).wrapping_sub(1) < new.wrapping_sub(self.signalled)
                }
                Err(_) => true,
            }
        } else {
            match self.mem.load::<u16>(GuestAddress(q.avail_ring()), Acquire) {
                Ok(f) => u16::from_le(f) & 1 == 0,
                Err(_) => true,
            }
        }
    }

    /// With `VIRTIO_RING_F_EVENT_IDX`: re-enables notifications; true if more chains arrived
    /// meanwhile (the caller loops).
    /// An avail index more than the queue's size ahead of the device (a broken ring, which `pop`
    /// refuses) is no work: true there would make the caller spin forever.
    pub fn enable_notification(&mut self) -> bool {
        if self.polling {
            return self.has_avail();
        }
        self.queue.enable_notification(&self.mem).unwrap_or(false) && self.has_avail()
    }

    /// Whether the driver has made chains available that the device has not taken yet (one read
    /// of the avail index: cheap enough to spin on). Not when the index is more than the queue's
    /// size ahead: `pop` refuses such a ring (virtio-queue's `InvalidAvailRingIndex`), so there
    /// is nothing to take until the driver fixes it or resets the device.
    pub fn has_avail(&self) -> bool {
        self.queue.ready()
            && self
                .queue
                .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|i| {
                    let ahead = i.0.wrapping_sub(self.queue.next_avail());
                    ahead != 0 && ahead <= self.queue.size()
                })
    }

    /// Gives chains back to the ring: `heads`, the last chains taken, in the order they were
    /// taken, become available again by moving the next avail index back over them (a parked
    /// handler's, see `worker`). Refused, changing nothing, if the avail ring no longer shows
    /// them there.
    pub fn give_back(&mut self, heads: &[u16]) -> Result<(), String> {
        let n = heads.len() as u16;
        let q = &mut self.queue;
        let (size, ring, next) = (q.size(), q.avail_ring(), q.next_avail());
        for (i, &h) in heads.iter().enumerate() {
            let idx = next.wrapping_sub(n).wrapping_add(i as u16);
            let at = GuestAddress(ring + 4 + 2 * u64::from(idx % size.max(1)));
            let shown = self.mem.read_obj::<u16>(at).map(u16::from_le);
            if shown.ok() != Some(h) {
                return Err(format!(
                    "virtqueue {}: buffer {h} it holds is not where the avail ring had it",
                    self.index
                ));
            }
        }
        q.set_next_avail(next.wrapping_sub(n));
        Ok(())
    }

    pub fn disable_notification(&mut self) {
        let _ = self.queue.disable_notification(&self.mem);
    }

    /// Iterates over available chains (for devices that only count).
    pub fn drain_count(&mut self) -> usize {
        self.queue.iter(&self.mem).map(|i| i.count()).unwrap_or(0)
    }
}

#[cfg(test)]
pub mod testing {
    //! A driver's side of a split virtqueue in a plain `GuestMemoryMmap`, for unit tests.
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    pub const DESC: u64 = 0x1000;
    pub const AVAIL: u64 = 0x2000;
    pub const USED: u64 = 0x3000;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// The device's side of `dq`: queue `index` (its MSI-X vector too), interrupts going nowhere.
    pub fn vq(mem: &GuestMemoryMmap, dq: &DriverQueue, index: u16, event_idx: bool) -> Vq {
        use crate::devices::virtio::irq::{Msix, NoRoutes};
        Vq {
            queue: dq.device_queue(mem, event_idx),
            index,
            mem: mem.clone(),
            translate: Arc::new(Identity),
            msix: Arc::new(Msix::new(4, Arc::new(NoRoutes::default())).unwrap()),
            vector: index,
            moderator: Default::default(),
            signalled: 0,
            bad_chains: 0,
            polling: false,
        }
    }

    /// A queue of `size` entries set up like a driver would.
    pub struct DriverQueue {
        pub size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl DriverQueue {
        pub fn new(size: u16) -> Self {
            DriverQueue {
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        pub fn device_queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_event_idx(event_idx);
            q.set_ready(true);
            assert!(q.is_valid(mem));
            q
        }

        /// Writes descriptor `i` raw.
        pub fn write_desc(
            &self,
            mem: &GuestMemoryMmap,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let a = DESC + 16 * u64::from(i);
            mem.write_obj(addr, GuestAddress(a)).unwrap();
            mem.write_obj(len, GuestAddress(a + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a + 14)).unwrap();
        }

        /// Publishes head `i` in the available ring.
        pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// Adds a chain of (addr, len, device-writable) buffers; returns its head.
        pub fn add(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = self.next_desc;
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if k + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.write_desc(mem, i, addr, len, flags, (i + 1) % self.size);
                self.next_desc = (self.next_desc + 1) % self.size;
            }
            self.publish(mem, head);
            head
        }

        /// The used ring's index and its element `n` (id, len).
        pub fn used(&self, mem: &GuestMemoryMmap, n: u16) -> (u16, u32, u32) {
            let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            let e = USED + 4 + 8 * u64::from(n % self.size);
            (
                idx,
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    /// Found by fuzzing (`fuzz/`, virtio_rng, block and balloon timed out): an avail index more
    /// than the queue's size ahead of the device makes `pop` refuse the ring (virtio-queue's
    /// `InvalidAvailRingIndex`), but `enable_notification` said chains were waiting, so every
    /// device's `while pop ..; if !enable_notification() return` loop spun forever on the
    /// worker thread. Such a ring has nothing to serve until the driver fixes it or resets.
    #[test]
    fn an_avail_index_past_the_ring_is_not_work_to_spin_on() {
        for event_idx in [false, true] {
            let mem = memory();
            let dq = DriverQueue::new(8);
            let mut q = vq(&mem, &dq, 0, event_idx);
            mem.write_obj(9u16, GuestAddress(AVAIL + 2)).unwrap();
            assert!(q.pop().is_none());
            assert!(!q.has_avail());
            assert!(!q.enable_notification(), "event_idx {event_idx}");
            q.polling = true;
            assert!(!q.enable_notification());
            // A ring exactly full is work.
            mem.write_obj(8u16, GuestAddress(AVAIL + 2)).unwrap();
            assert!(q.has_avail());
            assert!(q.pop().is_some());
        }
    }

    #[test]
    fn hostile_chains_are_refused_and_the_queue_goes_on() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let mut q = vq(&mem, &dq, 0, false);
        // A loop: 0 -> 1 -> 0.
        let next = VRING_DESC_F_NEXT as u16;
        dq.write_desc(&mem, 0, 0x8000, 16, next, 1);
        dq.write_desc(&mem, 1, 0x8010, 16, next, 0);
        dq.publish(&mem, 0);
        let (head, r) = q.pop().unwrap();
        assert_eq!(head, 0);
        // The walk ends after at most queue-size descriptors; nothing hangs.
        assert!(matches!(r, Err(ChainError::Malformed(_))), "{r:?}");
        // Outside memory.
        dq.write_desc(&mem, 2, 0xffff_0000_0000, 16, 0, 0);
        dq.publish(&mem, 2);
        assert!(matches!(
            q.pop().unwrap().1,
            Err(ChainError::OutOfMemory(..))
        ));
        // Absurd length.
        dq.write_desc(&mem, 3, 0x8000, u32::MAX, 0, 0);
        dq.publish(&mem, 3);
        assert!(q.pop().unwrap().1.is_err());
        // Readable after writable.
        dq.write_desc(&mem, 4, 0x8000, 16, next | VRING_DESC_F_WRITE as u16, 5);
        dq.write_desc(&mem, 5, 0x9000, 16, 0, 0);
        dq.publish(&mem, 4);
        assert_eq!(q.pop().unwrap().1.unwrap_err(), ChainError::Order);
        // Head index out of range.
        dq.publish(&mem, 200);
        assert!(q.pop().is_none() || q.pop().is_none());
        assert!(q.bad_chains >= 3);
    }

    #[test]
    fn cursor_moves_bytes_across_segments() {
        let mem = memory();
        let segs = [
            Seg {
                addr: 0x8000,
                len: 3,
            },
            Seg {
                addr: 0x9000,
                len: 5,
            },
        ];
        let mut w = Cursor::new(&mem, &segs);
        assert!(w.write(b"abcdefg"));
        assert_eq!(w.remaining(), 1);
        assert!(!w.write(b"xy"), "short buffer");
        let mut r = Cursor::new(&mem, &segs);
        let mut b = [0u8; 7];
        assert!(r.read(&mut b));
        assert_eq!(&b, b"abcdefg");
        let mut v = [0u8; 4];
        mem.read_slice(&mut v, GuestAddress(0x9000)).unwrap();
        assert_eq!(&v, b"defg");
    }
}
