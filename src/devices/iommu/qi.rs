//! Queued invalidation (VT-d 3.4 §6.5.2): the guest writes 128-bit descriptors into a ring in its
//! memory (IQA: base and size) and moves the tail (IQT); the IOMMU processes them from the head
//! (IQH) in order. Linux ends each batch with a wait descriptor whose status write it polls.
//!
//! A descriptor that cannot be read or decoded stops the queue with FSTS.IQE (IQH left pointing
//! at it) until the guest clears IQE; one IQT write processes at most the queue's size, so a
//! guest flooding the queue costs only the descriptors it wrote.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::regs::{FSTS_IQE, QIE};
use super::{read_desc, Inner, Iommu};

/// Descriptor types (bits 3:0; bits 11:9 extend the type and must be 0 here).
pub const CONTEXT_CACHE: u64 = 1;
pub const IOTLB: u64 = 2;
pub const DEVICE_TLB: u64 = 3;
pub const INTERRUPT_ENTRY_CACHE: u64 = 4;
pub const WAIT: u64 = 5;

/// Wait descriptor flags: interrupt (IF), status write (SW), fence (FN).
pub const WAIT_IF: u64 = 1 << 4;
pub const WAIT_SW: u64 = 1 << 5;

/// What a descriptor asks, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    ContextCache,
    /// Granularity 1 global, 2 domain, 3 pages (address, address mask).
    Iotlb {
        granularity: u64,
        did: u16,
        addr: u64,
    },
    /// Accepted, nothing to do (no device TLB, no interrupt remapping).
    Ignored,
    Wait {
        status: Option<(u64, u32)>,
        interrupt: bool,
    },
}

/// Decodes descriptor `(lo, hi)`; None: invalid (an invalidation queue error).
pub fn decode(lo: u64, hi: u64) -> Option<Descriptor> {
    if (lo >> 9) & 7 != 0 {
        return None;
    }
    Some(match lo & 0xf {
        CONTEXT_CACHE if (lo >> 4) & 3 != 0 => Descriptor::ContextCache,
        IOTLB if (lo >> 4) & 3 != 0 => Descriptor::Iotlb {
            granularity: (lo >> 4) & 3,
            did: ((lo >> 16) & 0xffff) as u16,
            addr: hi,
        },
        DEVICE_TLB | INTERRUPT_ENTRY_CACHE => Descriptor::Ignored,
        WAIT => Descriptor::Wait {
            status: (lo & WAIT_SW != 0).then_some((hi & !3, (lo >> 32) as u32)),
            interrupt: lo & WAIT_IF != 0,
        },
        _ => return None,
    })
}

impl Iommu {
    /// How many wait descriptors in the queue have each status value at their status address
    /// (Linux's `desc_status`: 0 free, 1 in use, 2 done, 3 abort; 4 for anything else): for a
    /// guest that hung waiting, this tells a completion the model never wrote from one the guest
    /// overwrote.
    pub(super) fn wait_statuses(&self, inner: &Inner) -> [u64; 5] {
        let mut counts = [0u64; 5];
        let Some((base, n)) = inner.regs.queue() else {
            return counts;
        };
        for i in 0..n {
            let d = read_desc(&self.mem, base + 16 * i).and_then(|(lo, hi)| decode(lo, hi));
            if let Some(Descriptor::Wait {
                status: Some((addr, _)),
                ..
            }) = d
            {
                if let Ok(v) = self.mem.read_obj::<u32>(GuestAddress(addr)) {
                    counts[(v as usize).min(4)] += 1;
                }
            }
        }
        counts
    }

    /// Processes the queue from IQH to IQT (when queued invalidation is on and no error stops it).
    pub(super) fn run_queue(&self, inner: &mut Inner) {
        let r = &inner.regs;
        if r.gsts & QIE == 0 || r.fsts & FSTS_IQE != 0 || r.iqh == r.iqt {
            return;
        }
        let Some((base, n)) = r.queue() else {
            return self.queue_error(inner);
        };
        let tail = r.iqt >> 4;
        if tail >= n {
            return self.queue_error(inner);
        }
        let mut head = (r.iqh >> 4) % n;
        let mut steps = 0;
        while head != tail && steps < n {
            let d = read_desc(&self.mem, base + 16 * head).and_then(|(lo, hi)| decode(lo, hi));
            let Some(d) = d else {
                inner.regs.iqh = head << 4;
                return self.queue_error(inner);
            };
            self.stats.qi_descriptors.fetch_add(1, Ordering::Relaxed);
            if !self.execute(inner, d) {
                inner.regs.iqh = head << 4;
                return self.queue_error(inner);
            }
            head = (head + 1) % n;
            steps += 1;
        }
        inner.regs.iqh = head << 4;
    }

    fn queue_error(&self, inner: &mut Inner) {
        self.stats.qi_errors.fetch_add(1, Ordering::Relaxed);
        inner.regs.fsts |= FSTS_IQE;
        self.fault_event(inner);
    }

    /// Executes one descriptor; false when its status write cannot be done.
    fn execute(&self, inner: &mut Inner, d: Descriptor) -> bool {
        match d {
            Descriptor::ContextCache => {
                self.stats
                    .context_invalidations
                    .fetch_add(1, Ordering::Relaxed);
                inner.caches.flush_contexts();
            }
            Descriptor::Iotlb {
                granularity,
                did,
                addr,
            } => self.invalidate_iotlb(&mut inner.caches, granularity, did, addr),
            Descriptor::Ignored => {}
            Descriptor::Wait { status, interrupt } => {
                self.stats.qi_waits.fetch_add(1, Ordering::Relaxed);
                if let Some((addr, data)) = status {
                    if self.mem.write_obj(data, GuestAddress(addr)).is_err() {
                        return false;
                    }
                }
                if interrupt {
                    self.invalidation_event(inner);
                }
            }
        }
        true
    }
}
