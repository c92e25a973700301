//! Second-level translation in legacy mode (VT-d 3.4 §3.4–3.6, §9.1–9.3): the root table (one
//! entry per bus), the context tables (one entry per device and function) and 4-level page
//! tables with 48-bit input addresses, 2 MiB and 1 GiB superpages. Plus the IOTLB and context
//! cache the VMM keeps in front of them.
//!
//! Every read of a guest table goes through `GuestMemoryMmap::read_obj` (an address outside RAM is
//! an error, not a crash) and a walk reads at most 2 + 4 entries, so a guest that loops its page
//! tables or points them anywhere gets a fault reason, never a hang.

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE: u64 = 1 << PAGE_SHIFT;
/// Maximum guest address width: 48 bits (4-level tables, SAGAW bit 2).
pub const MGAW: u32 = 48;
/// Address bits of a table pointer or PTE (51:12).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// IOTLB entries kept before the cache is emptied (a real IOTLB is smaller still).
pub const IOTLB_CAPACITY: usize = 4096;

/// Fault reasons (VT-d 3.4 §7.1.3, table 26), as recorded in a fault recording register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FaultReason {
    RootNotPresent = 0x1,
    ContextNotPresent = 0x2,
    ContextInvalid = 0x3,
    BeyondMgaw = 0x4,
    WriteDenied = 0x5,
    ReadDenied = 0x6,
    TableUnreadable = 0x7,
    RootTableUnreadable = 0x8,
    ContextTableUnreadable = 0x9,
    RootReserved = 0xa,
    ContextReserved = 0xb,
    PteReserved = 0xc,
}

/// What a present context entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub did: u16,
    /// Fault processing disabled for this device (FPD).
    pub fpd: bool,
    /// None: pass-through (translation type 2).
    pub slptptr: Option<u64>,
}

/// Why a context lookup failed, and whether the fault is to be recorded (FPD clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextFault {
    pub reason: FaultReason,
    pub record: bool,
}

fn read_u64(mem: &GuestMemoryMmap, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr)).ok()
}

/// The context entry of requester `sid` (bus << 8 | devfn) under the root table at `rta`.
pub fn context(mem: &GuestMemoryMmap, rta: u64, sid: u16) -> Result<Context, ContextFault> {
    let fault = |reason, record| ContextFault { reason, record };
    let root = rta + 16 * u64::from(sid >> 8);
    let (Some(rlo), Some(rhi)) = (read_u64(mem, root), read_u64(mem, root + 8)) else {
        return Err(fault(FaultReason::RootTableUnreadable, true));
    };
    if rlo & 1 == 0 {
        return Err(fault(FaultReason::RootNotPresent, true));
    }
    if rlo & 0xffe != 0 || rhi != 0 {
        return Err(fault(FaultReason::RootReserved, true));
    }
    let ce = (rlo & ADDR_MASK) + 16 * u64::from(sid & 0xff);
    let (Some(lo), Some(hi)) = (read_u64(mem, ce), read_u64(mem, ce + 8)) else {
        return Err(fault(FaultReason::ContextTableUnreadable, true));
    };
    let fpd = lo & 2 != 0;
    if lo & 1 == 0 {
        return Err(fault(FaultReason::ContextNotPresent, !fpd));
    }
    if lo & 0xff0 != 0 || hi & !0x00ff_ffff != 0 || hi & 0x80 != 0 {
        return Err(fault(FaultReason::ContextReserved, !fpd));
    }
    let did = ((hi >> 8) & 0xffff) as u16;
    match (lo >> 2) & 3 {
        // Untranslated requests only (0), or also device-TLB ones (1, we offer no device TLB).
        0 | 1 if hi & 7 == 2 => Ok(Context {
            did,
            fpd,
            slptptr: Some(lo & ADDR_MASK),
        }),
        2 => Ok(Context {
            did,
            fpd,
            slptptr: None,
        }),
        _ => Err(fault(FaultReason::ContextInvalid, !fpd)),
    }
}

/// A 4 KiB piece of a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Guest-physical address of the 4 KiB page.
    pub gpa: u64,
    pub read: bool,
    pub write: bool,
}

/// Walks the 4-level second-level tables at `slptptr` for `iova`. `Ok(None)`: not present (R and
/// W clear at some level). Permissions are the AND of every level's.
pub fn walk(mem: &GuestMemoryMmap, slptptr: u64, iova: u64) -> Result<Option<Leaf>, FaultReason> {
    if iova >> MGAW != 0 {
        return Err(FaultReason::BeyondMgaw);
    }
    let (mut table, mut read, mut write) = (slptptr, true, true);
    for level in (1..=4u32).rev() {
        let shift = PAGE_SHIFT + 9 * (level - 1);
        let idx = (iova >> shift) & 0x1ff;
        let pte = read_u64(mem, table + 8 * idx).ok_or(FaultReason::TableUnreadable)?;
        read &= pte & 1 != 0;
        write &= pte & 2 != 0;
        if pte & 3 == 0 {
            return Ok(None);
        }
        let superpage = pte & 0x80 != 0;
        if level == 4 && superpage {
            return Err(FaultReason::PteReserved);
        }
        if level == 1 || superpage {
            let size_mask = (1u64 << shift) - 1;
            let base = pte & ADDR_MASK;
            if base & size_mask != 0 {
                // A superpage's address must be aligned to its size.
                return Err(FaultReason::PteReserved);
            }
            let gpa = base | (iova & size_mask & !(PAGE - 1));
            return Ok(Some(Leaf { gpa, read, write }));
        }
        table = pte & ADDR_MASK;
    }
    unreachable!("level 1 always returns")
}

/// The caches' hasher: a device worker looks up every DMA page, and SipHash was a third of the
/// lookup's cost (perf, kit bench); foldhash is seeded per process, and the IOTLB's size is
/// bounded anyway, so a guest choosing colliding IOVAs gains nothing.
type FastHash = foldhash::fast::RandomState;

/// The VMM's translation caches: contexts by requester, 4 KiB translations by (domain, page).
/// Only present translations are cached, which is what both caching modes allow: with CM=1 the
/// guest also invalidates after making an entry present, with CM=0 it need not, and a miss walks.
#[derive(Default)]
pub struct Caches {
    contexts: HashMap<u16, Context, FastHash>,
    iotlb: HashMap<(u16, u64), Leaf, FastHash>,
    pub hits: u64,
    pub misses: u64,
}

impl Caches {
    pub fn context(&self, sid: u16) -> Option<Context> {
        self.contexts.get(&sid).copied()
    }

    pub fn put_context(&mut self, sid: u16, c: Context) {
        self.contexts.insert(sid, c);
    }

    pub fn lookup(&mut self, did: u16, iova: u64) -> Option<Leaf> {
        let r = self.iotlb.get(&(did, iova >> PAGE_SHIFT)).copied();
        if r.is_some() {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        r
    }

    pub fn insert(&mut self, did: u16, iova: u64, leaf: Leaf) {
        if self.iotlb.len() >= IOTLB_CAPACITY {
            self.iotlb.clear();
        }
        self.iotlb.insert((did, iova >> PAGE_SHIFT), leaf);
    }

    pub fn iotlb_len(&self) -> usize {
        self.iotlb.len()
    }

    /// Context-cache invalidation (any granularity empties it: over-invalidating is allowed).
    pub fn flush_contexts(&mut self) {
        self.contexts.clear();
    }

    pub fn flush_all(&mut self) {
        self.iotlb.clear();
    }

    pub fn flush_domain(&mut self, did: u16) {
        self.iotlb.retain(|&(d, _), _| d != did);
    }

    /// Page-selective invalidation of `2^am` pages at `addr` (aligned down to that size).
    pub fn flush_pages(&mut self, did: u16, addr: u64, am: u32) {
        let am = am.min(MGAW - PAGE_SHIFT);
        let first = (addr >> PAGE_SHIFT) & !((1u64 << am) - 1);
        let n = 1u64 << am;
        if n as usize > self.iotlb.len() {
            self.iotlb
                .retain(|&(d, p), _| d != did || p < first || p >= first + n);
        } else {
            for p in first..first + n {
                self.iotlb.remove(&(did, p));
            }
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    /// A guest's tables in `mem`: root table at 0x10000, context table at 0x11000, page tables
    /// allocated from 0x20000. Returns the root table address.
    pub struct Tables {
        pub rta: u64,
        next: u64,
        pub pml4: u64,
    }

    impl Tables {
        pub fn new(mem: &GuestMemoryMmap, sid: u16, did: u16) -> Self {
            let rta = 0x10000;
            let ctx = 0x11000;
            let pml4 = 0x20000;
            mem.write_obj(ctx | 1, GuestAddress(rta + 16 * u64::from(sid >> 8)))
                .unwrap();
            let ce = ctx + 16 * u64::from(sid & 0xff);
            mem.write_obj(pml4 | 1, GuestAddress(ce)).unwrap();
            mem.write_obj(2u64 | u64::from(did) << 8, GuestAddress(ce + 8))
                .unwrap();
            Tables {
                rta,
                next: pml4 + PAGE,
                pml4,
            }
        }

        /// Maps `iova` to `gpa` with a leaf at `level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
        pub fn map(&mut self, mem: &GuestMemoryMmap, iova: u64, gpa: u64, level: u32, perm: u64) {
            let mut table = self.pml4;
            for l in (level + 1..=4).rev() {
                let at = table + 8 * ((iova >> (PAGE_SHIFT + 9 * (l - 1))) & 0x1ff);
                let pte: u64 = mem.read_obj(GuestAddress(at)).unwrap();
                table = if pte & 3 != 0 {
                    pte & ADDR_MASK
                } else {
                    let t = self.next;
                    self.next += PAGE;
                    mem.write_obj(t | 3, GuestAddress(at)).unwrap();
                    t
                };
            }
            let at = table + 8 * ((iova >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1ff);
            let ps = if level > 1 { 0x80 } else { 0 };
            mem.write_obj(gpa | perm | ps, GuestAddress(at)).unwrap();
        }
    }

    #[test]
    fn walks_4k_2m_and_1g_pages_with_permissions() {
        let mem = memory();
        let mut t = Tables::new(&mem, 0x0018, 5);
        t.map(&mem, 0x1234_5000, 0x80_0000, 1, 3);
        t.map(&mem, 0x4000_0000, 0x60_0000, 2, 1);
        t.map(&mem, 0x80_0000_0000, 0x4000_0000, 3, 3);
        let c = context(&mem, t.rta, 0x0018).unwrap();
        assert_eq!((c.did, c.slptptr), (5, Some(t.pml4)));
        let w = |iova| walk(&mem, t.pml4, iova).unwrap();
        assert_eq!(
            w(0x1234_5678),
            Some(Leaf {
                gpa: 0x80_0000,
                read: true,
                write: true
            })
        );
        let l = w(0x4003_4567).unwrap();
        assert_eq!((l.gpa, l.read, l.write), (0x63_4000, true, false));
        assert_eq!(w(0x80_1234_5000).unwrap().gpa, 0x5234_5000);
        assert_eq!(w(0x1234_6000), None, "neighbour unmapped");
        assert_eq!(walk(&mem, t.pml4, 1 << 48), Err(FaultReason::BeyondMgaw));
    }

    #[test]
    fn bad_tables_are_fault_reasons() {
        let mem = memory();
        let t = Tables::new(&mem, 0x0008, 1);
        assert_eq!(
            context(&mem, t.rta, 0x0100).unwrap_err().reason,
            FaultReason::RootNotPresent
        );
        assert_eq!(
            context(&mem, t.rta, 0x0010).unwrap_err().reason,
            FaultReason::ContextNotPresent
        );
        assert_eq!(
            context(&mem, 0xffff_ffff_f000, 8).unwrap_err().reason,
            FaultReason::RootTableUnreadable
        );
        // Context table pointer outside RAM.
        mem.write_obj(0x7_0000_0000u64 | 1, GuestAddress(t.rta + 16))
            .unwrap();
        assert_eq!(
            context(&mem, t.rta, 0x0100).unwrap_err().reason,
            FaultReason::ContextTableUnreadable
        );
        // Page tables pointing outside RAM, and a table pointing at itself (a loop ends after
        // four levels: the self-pointer is read as a 4 KiB leaf at level 1).
        assert_eq!(
            walk(&mem, 0x9_0000_0000, 0),
            Err(FaultReason::TableUnreadable)
        );
        mem.write_obj(0x30000u64 | 3, GuestAddress(0x30000))
            .unwrap();
        assert_eq!(walk(&mem, 0x30000, 0).unwrap().unwrap().gpa, 0x30000);
        // A superpage at level 4 is reserved; a misaligned 2 MiB page too.
        mem.write_obj(0x80u64 | 3, GuestAddress(0x40000)).unwrap();
        assert_eq!(walk(&mem, 0x40000, 0), Err(FaultReason::PteReserved));
    }

    #[test]
    fn iotlb_invalidation_granularities() {
        let mut c = Caches::default();
        let leaf = Leaf {
            gpa: 0x1000,
            read: true,
            write: true,
        };
        for p in 0..16u64 {
            c.insert(1, p << 12, leaf);
            c.insert(2, p << 12, leaf);
        }
        c.flush_pages(1, 0x4000, 2);
        assert!(c.lookup(1, 0x4000).is_none() && c.lookup(1, 0x7000).is_none());
        assert!(c.lookup(1, 0x8000).is_some() && c.lookup(1, 0x3000).is_some());
        assert!(c.lookup(2, 0x4000).is_some());
        c.flush_domain(2);
        assert!(c.lookup(2, 0x0).is_none());
        assert!(c.lookup(1, 0x0).is_some());
        c.flush_all();
        assert_eq!(c.iotlb_len(), 0);
        assert_eq!((c.hits, c.misses), (4, 3));
    }
}
