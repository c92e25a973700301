//! An emulated Intel VT-d IOMMU (`--iommu`): the seeds' vIOMMU (thesis chapter 2) for unmodified
//! guests, in front of exitless's virtio devices.
//!
//! Owns the register file (`regs`), the guest's root/context/page tables as the hardware reads
//! them and the VMM's IOTLB (`walk`), queued invalidation (`qi`), fault recording and the two
//! interrupts VT-d raises (fault event, invalidation completion). Devices reach it only through
//! [`DeviceTranslate`], the `Translate` hook of their queues; the guest reaches it through its
//! register pages, either trapped (*samecore*: MMIO exits on the vCPU thread, [`Iommu`] as a bus
//! device) or polled (*sidecore*: see `sidecore`). Written here rather than taken from a crate:
//! rust-vmm has no VT-d model (vm-memory's `iommu` feature is an IOTLB wrapper for vhost-user's
//! IOMMU protocol, not a device), and the model must be shared between the two emulation modes.
//!
//! # What the guest sees
//! - An ACPI DMAR with one DRHD, INCLUDE_PCI_ALL on segment 0 (every device on the bus is behind
//!   it), register base [`layout::IOMMU_MMIO_START`], two pages.
//! - Legacy (not scalable-mode) translation: root table, context tables, 4-level second-level page
//!   tables (48-bit, 2 MiB and 1 GiB superpages), pass-through contexts; queued invalidation with
//!   128-bit descriptors (context-cache, IOTLB, wait with status write and interrupt; device-TLB
//!   and interrupt-entry-cache descriptors are accepted as no-ops since neither is offered);
//!   register-based context and IOTLB invalidation too; four fault recording registers and the
//!   fault event MSI.
//! - CAP.CM (caching mode) as asked (`caching-mode=on`, the default, as QEMU's): Linux then
//!   invalidates after every map and unmap synchronously ("strict", the thesis's worst column);
//!   with `caching-mode=off` it may batch unmaps in its flush queue ("lazy"). For emulated devices
//!   the VMM needs no shadow of the guest's tables: on an IOTLB miss it walks them, so CM=0 is
//!   correct here; CM=1 only matters for assigned devices (host IOMMU shadowing).
//!
//! # Interrupt remapping: absent
//! ECAP.IR is clear and the DMAR's INTR_REMAP flag too. Linux then keeps its interrupt controller
//! as it is: with `x2apic` in CPUID and a KVM hypervisor signature it still enables x2APIC (in
//! physical mode, APIC IDs up to 255, which is all exitless creates), so neither x2APIC nor the
//! IOMMU is refused. MSIs of the virtio devices are not translated (the guest programs them
//! compatibility-format, as without an IOMMU).
//!
//! # What the VMM can do on its own side (`exitless bench iommu`)
//! The guest decides when a mapping dies; an emulated IOMMU must have finished an invalidation
//! before it writes the wait descriptor's status, so the VMM cannot defer the guest's teardown
//! work without weakening the protection the guest asked for. What it can do, measured:
//! - **Offer caching mode off** for emulated devices (it walks the guest's tables on a miss and
//!   needs no shadow). Linux then uses its lazy flush queue: in the Linux part of the bench (emulated
//!   SVM host, 4 096 reads of 4 KiB, O_DIRECT) invalidation waits fall from 6.75 to 0.37 per read
//!   in samecore (0.30 in sidecore), register exits from 6.76 to 0.38 per read, and throughput from
//!   85% to 102% of no IOMMU in samecore, 24% to 134% in sidecore (QEMU's intel-iommu in the same
//!   run: 43% strict, 65% lazy of its own no-IOMMU run). This is the biggest lever the VMM has,
//!   and it costs the guest a window of stale mappings (up to 10 ms, Linux's choice).
//! - **Make each remaining invalidation cheap**: sidecore takes no register exit (0.00 per read
//!   against 6.76 in samecore); in the kit bench (strict, 65 536 requests on the PVM host, where an
//!   exit costs ~18 µs) it cuts a map+unmap from 123k to 7.5k cycles and does 4x samecore's
//!   throughput. It needs a core for the poller: on the 2-core emulated host, with two vCPUs and
//!   the device worker, Linux strict under sidecore fell to 24% of no IOMMU.
//! - **Its IOTLB** saves a walk only when the guest reuses a mapping: Linux, strict or lazy, maps
//!   each request at a fresh I/O address and the hit rate is 0.01%; the kit guest's identity-mapped
//!   rings give 2/3 hits with strict teardown, and optimistic teardown (a guest-driver strategy)
//!   99%, with 97-98% of mappings reused and 17-40 waits for 65 536 requests.
//! - **For device assignment** (not done): with caching mode on the VMM shadows guest mappings into
//!   the host IOMMU, and could batch the host unmaps behind the guest's invalidation waits (the
//!   thesis's deferred host-side work); emulated devices need none of it.
//!
//! # Bad input
//! A guest that points the root table outside RAM, sets reserved bits, loops its page tables,
//! floods the invalidation queue or enables translation with garbage gets VT-d faults
//! (recorded, fault event), an invalidation queue error (FSTS.IQE, the queue stops at the bad
//! descriptor until the guest clears it) or an ignored write; every table read is bounds-checked
//! (`walk`), one IQT write processes at most one queue's worth of descriptors, and the IOTLB is
//! bounded. A device whose DMA faults completes that request as failed and goes on.

pub mod qi;
pub mod regs;
pub mod sidecore;
pub mod walk;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout;
use crate::devices::virtio::irq::MsiRoutes;
use crate::devices::virtio::queue::{Seg, Translate};
use crate::devices::BusDevice;
use regs::*;
use walk::{Caches, FaultReason, PAGE};

/// How register accesses reach the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every register access is an MMIO exit handled on the vCPU thread.
    Samecore,
    /// The first register page is guest RAM polled by a VMM thread (see `sidecore`).
    Sidecore,
}

/// `--iommu [mode=samecore|sidecore][,caching-mode=on|off][,cpu=N]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    pub mode: Mode,
    pub caching_mode: bool,
    /// The host CPU the sidecore thread is pinned to.
    pub cpu: Option<usize>,
}

impl Default for IommuConfig {
    fn default() -> Self {
        IommuConfig {
            mode: Mode::Samecore,
            caching_mode: true,
            cpu: None,
        }
    }
}

/// Parses the `--iommu` value (empty: the defaults).
pub fn parse(s: &str) -> Result<IommuConfig, String> {
    let mut c = IommuConfig::default();
    for p in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("--iommu: {p:?} is not key=value"))?;
        match (k, v) {
            ("mode", "samecore") => c.mode = Mode::Samecore,
            ("mode", "sidecore") => c.mode = Mode::Sidecore,
            ("caching-mode", "on") => c.caching_mode = true,
            ("caching-mode", "off") => c.caching_mode = false,
            ("cpu", n) => {
                c.cpu = Some(
                    n.parse()
                        .map_err(|_| format!("--iommu: cpu={n:?} is not a CPU number"))?,
                )
            }
            _ => {
                return Err(format!(
                    "--iommu: unknown {p:?} (mode=samecore|sidecore, caching-mode=on|off, cpu=N)"
                ))
            }
        }
    }
    Ok(c)
}

/// Counters, reported as the `iommu` device's facts.
#[derive(Default)]
pub struct IommuStats {
    /// Register accesses that exited (the trapped pages: both in samecore, page 1 in sidecore).
    pub register_exits: AtomicU64,
    pub register_reads: AtomicU64,
    pub register_writes: AtomicU64,
    pub translations: AtomicU64,
    pub faults: AtomicU64,
    pub faults_dropped: AtomicU64,
    pub context_invalidations: AtomicU64,
    pub iotlb_invalidations: AtomicU64,
    pub qi_descriptors: AtomicU64,
    pub qi_waits: AtomicU64,
    pub qi_errors: AtomicU64,
    pub fault_events: AtomicU64,
    pub invalidation_events: AtomicU64,
    /// Sidecore: polls that found work, and times the thread went to sleep.
    pub sidecore_busy_polls: AtomicU64,
    pub sidecore_sleeps: AtomicU64,
}

/// The fault event (0) and invalidation completion event (1) MSIs: a GSI with an irqfd each,
/// routed to what the guest wrote in FEADDR/FEDATA and IEADDR/IEDATA.
struct Irqs {
    routes: Arc<dyn MsiRoutes>,
    gsis: [u32; 2],
    evts: [EventFd; 2],
}

impl Irqs {
    fn new(routes: Arc<dyn MsiRoutes>) -> Result<Self, String> {
        let mk = || -> Result<(u32, EventFd), String> {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?;
            let gsi = routes.alloc_gsi().ok_or("out of GSIs")?;
            routes.bind_irqfd(&evt, gsi)?;
            Ok((gsi, evt))
        };
        let (g0, e0) = mk()?;
        let (g1, e1) = mk()?;
        Ok(Irqs {
            routes,
            gsis: [g0, g1],
            evts: [e0, e1],
        })
    }

    /// Routes `which` to the message; an address outside the interrupt range removes the route.
    fn route(&self, which: usize, addr: u64, data: u32) {
        let msg = (addr >> 20 == 0xfee).then_some((addr, data));
        if let Err(e) = self.routes.set_route(self.gsis[which], msg) {
            crate::warn_limited!("iommu", "iommu: interrupt route: {e}");
        }
    }

    fn fire(&self, which: usize) {
        let _ = self.evts[which].write(1);
    }
}

/// Mutable state: registers, caches, the next fault record.
struct Inner {
    regs: Regs,
    caches: Caches,
    fri: usize,
}

/// The IOMMU, shared by the vCPU threads (samecore register accesses), the sidecore thread and
/// the device workers (translations).
pub struct Iommu {
    mem: GuestMemoryMmap,
    cap: u64,
    inner: Mutex<Inner>,
    irqs: Irqs,
    pub stats: IommuStats,
    pub config: IommuConfig,
    /// Sidecore: the shared register page (status is published there before an interrupt).
    page: std::sync::OnceLock<Arc<sidecore::Page>>,
    /// Ends the sidecore poller.
    stop: AtomicBool,
}

/// A DMA the IOMMU refused (the fault is recorded, unless the context disabled it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaFault {
    pub iova: u64,
    pub reason: FaultReason,
}

impl Iommu {
    pub fn new(
        mem: GuestMemoryMmap,
        config: IommuConfig,
        routes: Arc<dyn MsiRoutes>,
    ) -> Result<Self, String> {
        Ok(Iommu {
            mem,
            cap: cap(config.caching_mode),
            inner: Mutex::new(Inner {
                regs: Regs::new(),
                caches: Caches::default(),
                fri: 0,
            }),
            irqs: Irqs::new(routes)?,
            stats: IommuStats::default(),
            config,
            page: std::sync::OnceLock::new(),
            stop: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of the register containing byte `off`: (its offset, width, value).
    fn register(&self, inner: &Inner, off: u64) -> Option<(u64, u64, u64)> {
        let r = &inner.regs;
        let (base, width, v) = match off {
            0x00..0x04 => (VER, 4, u64::from(VERSION)),
            0x08..0x10 => (CAP, 8, self.cap),
            0x10..0x18 => (ECAP, 8, ecap()),
            0x18..0x1c => (GCMD, 4, 0),
            0x1c..0x20 => (GSTS, 4, u64::from(r.gsts)),
            0x20..0x28 => (RTADDR, 8, r.rtaddr),
            0x28..0x30 => (CCMD, 8, r.ccmd),
            0x34..0x38 => (FSTS, 4, u64::from(r.fsts_value(inner.fri))),
            0x38..0x3c => (FECTL, 4, u64::from(r.fectl)),
            0x3c..0x40 => (FEDATA, 4, u64::from(r.fedata)),
            0x40..0x44 => (FEADDR, 4, u64::from(r.feaddr)),
            0x44..0x48 => (FEUADDR, 4, u64::from(r.feuaddr)),
            0x80..0x88 => (IQH, 8, r.iqh),
            0x88..0x90 => (IQT, 8, r.iqt),
            0x90..0x98 => (IQA, 8, r.iqa),
            0x9c..0xa0 => (ICS, 4, u64::from(r.ics)),
            0xa0..0xa4 => (IECTL, 4, u64::from(r.iectl)),
            0xa4..0xa8 => (IEDATA, 4, u64::from(r.iedata)),
            0xa8..0xac => (IEADDR, 4, u64::from(r.ieaddr)),
            0xac..0xb0 => (IEUADDR, 4, u64::from(r.ieuaddr)),
            0x1000..0x1008 => (IVA, 8, r.iva),
            0x1008..0x1010 => (IOTLB, 8, r.iotlb),
            o if (FRCD..FRCD + 16 * NUM_FRCD as u64).contains(&o) => {
                let i = ((o - FRCD) / 16) as usize;
                let hi = (o - FRCD) % 16 >= 8;
                let base = FRCD + 16 * i as u64 + if hi { 8 } else { 0 };
                let rec = r.frcd[i];
                (base, 8, if hi { rec.1 } else { rec.0 })
            }
            _ => return None,
        };
        Some((base, width, v))
    }

    /// A guest read of `data.len()` bytes at `off` in the register file.
    pub fn read_reg(&self, off: u64, data: &mut [u8]) {
        self.stats.register_reads.fetch_add(1, Ordering::Relaxed);
        let inner = self.lock();
        let v = match self.register(&inner, off) {
            Some((base, _, v)) => v >> (8 * (off - base)),
            None => 0,
        };
        crate::devices::u64_to_data(v, data);
    }

    /// A guest write of `data` at `off` in the register file.
    pub fn write_reg(&self, off: u64, data: &[u8]) {
        self.stats.register_writes.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let Some((base, width, old)) = self.register(&inner, off) else {
            return;
        };
        let at = off - base;
        let v = merge(old, width, at, data);
        // For write-1-to-clear fields: only the bits this access carried.
        let written = merge(0, width, at, data);
        self.write_register(&mut inner, base, v, written);
    }

    /// The effects of a write of `v` (merged with the old value; `written`: the bits the access
    /// carried) to the register at `base`.
    fn write_register(&self, inner: &mut Inner, base: u64, v: u64, written: u64) {
        let r = &mut inner.regs;
        match base {
            GCMD => self.gcmd(inner, v as u32),
            RTADDR => r.rtaddr = v,
            CCMD => {
                r.ccmd = v;
                if v >> 63 != 0 {
                    // Done at once: ICC clears, CAIG (60:59) says what was invalidated (CIRG).
                    inner.caches.flush_contexts();
                    self.stats
                        .context_invalidations
                        .fetch_add(1, Ordering::Relaxed);
                    let cirg = (v >> 61) & 3;
                    r.ccmd = (v & !(1 << 63) & !(3 << 59)) | (cirg << 59);
                }
            }
            FSTS => {
                let iqe_cleared = r.fsts & FSTS_IQE != 0 && written as u32 & FSTS_IQE != 0;
                r.fsts &= !(written as u32 & FSTS_RW1C);
                if iqe_cleared {
                    // The queue goes on from IQH, where it stopped.
                    self.run_queue(inner);
                }
            }
            FECTL => {
                r.fectl = (r.fectl & IP) | (v as u32 & IM);
                if r.fectl & (IM | IP) == IP {
                    r.fectl &= !IP;
                    self.irqs.fire(0);
                }
            }
            FEDATA | FEADDR | FEUADDR => {
                match base {
                    FEDATA => r.fedata = v as u32,
                    FEADDR => r.feaddr = v as u32 & !3,
                    _ => r.feuaddr = v as u32,
                }
                let addr = u64::from(r.feuaddr) << 32 | u64::from(r.feaddr);
                self.irqs.route(0, addr, r.fedata);
            }
            IQT => {
                r.iqt = v & 0x7fff0;
                self.run_queue(inner);
            }
            IQA => r.iqa = v & !0x7f8,
            ICS => r.ics &= !(written as u32 & 1),
            IECTL => {
                r.iectl = (r.iectl & IP) | (v as u32 & IM);
                if r.iectl & (IM | IP) == IP {
                    r.iectl &= !IP;
                    self.irqs.fire(1);
                }
            }
            IEDATA | IEADDR | IEUADDR => {
                match base {
                    IEDATA => r.iedata = v as u32,
                    IEADDR => r.ieaddr = v as u32 & !3,
                    _ => r.ieuaddr = v as u32,
                }
                let addr = u64::from(r.ieuaddr) << 32 | u64::from(r.ieaddr);
                self.irqs.route(1, addr, r.iedata);
            }
            IVA => r.iva = v,
            IOTLB => {
                r.iotlb = v;
                if v >> 63 != 0 {
                    let did = ((v >> 32) & 0xffff) as u16;
                    let iirg = (v >> 60) & 3;
                    let iva = r.iva;
                    self.invalidate_iotlb(&mut inner.caches, iirg, did, iva);
                    inner.regs.iotlb = (v & !(1 << 63) & !(3 << 57)) | (iirg << 57);
                }
            }
            // F (bit 63 of a record's high qword) is write-1-to-clear; the rest is read-only.
            b if (FRCD..FRCD + 16 * NUM_FRCD as u64).contains(&b)
                && (b - FRCD) % 16 == 8
                && written >> 63 != 0 =>
            {
                r.frcd[((b - FRCD) / 16) as usize].1 &= !(1 << 63);
            }
            _ => {} // VER, CAP, ECAP, GSTS, IQH, FRCD low: read-only.
        }
    }

    /// GCMD: TE and QIE are persistent (Linux writes its saved bits with each command), SRTP is
    /// one-shot. Status is published at once: the VT-d protocol is synchronous (software polls
    /// GSTS after each command).
    fn gcmd(&self, inner: &mut Inner, v: u32) {
        let r = &mut inner.regs;
        r.gsts = (r.gsts & !TE) | (v & TE);
        if v & SRTP != 0 {
            // Bits 11:10 (TTM) select scalable mode, which is not offered: no root table then.
            r.root = (r.rtaddr & 0xc00 == 0).then_some(r.rtaddr & !0xfff);
            r.gsts |= SRTP;
            inner.caches.flush_contexts();
            inner.caches.flush_all();
        }
        if v & QIE != 0 && r.gsts & QIE == 0 {
            r.iqh = 0;
            r.gsts |= QIE;
        } else if v & QIE == 0 && r.gsts & QIE != 0 {
            r.gsts &= !QIE;
        }
    }

    fn invalidate_iotlb(&self, caches: &mut Caches, granularity: u64, did: u16, addr: u64) {
        self.stats
            .iotlb_invalidations
            .fetch_add(1, Ordering::Relaxed);
        match granularity {
            2 => caches.flush_domain(did),
            3 => caches.flush_pages(did, addr & !0xfff, (addr & 0x3f) as u32),
            _ => caches.flush_all(),
        }
    }

    /// A fault event: the MSI, or IP while masked (one pending event at a time).
    fn fault_event(&self, inner: &mut Inner) {
        let r = &mut inner.regs;
        if r.fectl & IP != 0 {
            return;
        }
        if r.fectl & IM != 0 {
            r.fectl |= IP;
        } else {
            if let Some(page) = self.page.get() {
                // Sidecore: the handler reads FSTS and the records right away.
                self.publish(inner, page);
            }
            self.stats.fault_events.fetch_add(1, Ordering::Relaxed);
            self.irqs.fire(0);
        }
    }

    /// The invalidation completion event (a wait descriptor with IF).
    fn invalidation_event(&self, inner: &mut Inner) {
        let r = &mut inner.regs;
        if r.ics & 1 != 0 {
            return;
        }
        r.ics |= 1;
        if r.iectl & IM != 0 {
            r.iectl |= IP;
        } else {
            if let Some(page) = self.page.get() {
                self.publish(inner, page);
            }
            self.stats
                .invalidation_events
                .fetch_add(1, Ordering::Relaxed);
            self.irqs.fire(1);
        }
    }

    /// Records a primary fault in the next fault recording register.
    fn record_fault(
        &self,
        inner: &mut Inner,
        sid: u16,
        iova: u64,
        reason: FaultReason,
        write: bool,
    ) {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let i = inner.fri;
        if inner.regs.fsts & FSTS_PFO != 0 || inner.regs.frcd[i].1 >> 63 != 0 {
            inner.regs.fsts |= FSTS_PFO;
            self.stats.faults_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // High qword: SID 15:0, FR 39:32, T 62 (1: read), F 63.
        let read = u64::from(!write) << 62;
        inner.regs.frcd[i] = (
            iova & !(PAGE - 1),
            u64::from(sid) | (reason as u64) << 32 | read | 1 << 63,
        );
        inner.fri = (i + 1) % NUM_FRCD;
        self.fault_event(inner);
    }

    /// Translates a DMA of `len` bytes at `iova` by requester `sid`; the guest-physical pieces
    /// (merged where contiguous) are appended to `out`. A refused DMA is recorded as a fault.
    pub fn translate(
        &self,
        sid: u16,
        iova: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Seg>,
    ) -> Result<(), DmaFault> {
        self.stats.translations.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let root = match (inner.regs.gsts & TE != 0, inner.regs.root) {
            (false, _) => None,
            (true, Some(root)) => Some(root),
            (true, None) => {
                let f = DmaFault {
                    iova,
                    reason: FaultReason::RootTableUnreadable,
                };
                self.record_fault(&mut inner, sid, iova, f.reason, write);
                return Err(f);
            }
        };
        let ctx = match root {
            None => None,
            Some(root) => match inner.caches.context(sid) {
                Some(c) => Some(c),
                None => match walk::context(&self.mem, root, sid) {
                    Ok(c) => {
                        inner.caches.put_context(sid, c);
                        Some(c)
                    }
                    Err(e) => {
                        if e.record {
                            self.record_fault(&mut inner, sid, iova, e.reason, write);
                        }
                        return Err(DmaFault {
                            iova,
                            reason: e.reason,
                        });
                    }
                },
            },
        };
        let Some((did, fpd, pml4)) = ctx.and_then(|c| Some((c.did, c.fpd, c.slptptr?))) else {
            // Translation off, or a pass-through context.
            out.push(Seg { addr: iova, len });
            return Ok(());
        };
        let end = iova.checked_add(len).filter(|e| e >> walk::MGAW == 0);
        let Some(end) = end else {
            if !fpd {
                self.record_fault(&mut inner, sid, iova, FaultReason::BeyondMgaw, write);
            }
            return Err(DmaFault {
                iova,
                reason: FaultReason::BeyondMgaw,
            });
        };
        let mut at = iova;
        while at < end || (len == 0 && at == iova) {
            let (leaf, cached) = match inner.caches.lookup(did, at) {
                Some(l) => (Ok(Some(l)), true),
                None => (walk::walk(&self.mem, pml4, at), false),
            };
            let reason = match leaf {
                Ok(Some(l)) if (write && l.write) || (!write && l.read) => {
                    if !cached {
                        inner.caches.insert(did, at, l);
                    }
                    let off = at & (PAGE - 1);
                    let n = (PAGE - off).min(end - at);
                    let gpa = l.gpa | off;
                    match out.last_mut() {
                        Some(s) if s.addr + s.len == gpa && at != iova => s.len += n,
                        _ => out.push(Seg { addr: gpa, len: n }),
                    }
                    at += n.max(1);
                    continue;
                }
                Ok(_) if write => FaultReason::WriteDenied,
                Ok(_) => FaultReason::ReadDenied,
                Err(r) => r,
            };
            if !fpd {
                self.record_fault(&mut inner, sid, at, reason, write);
            }
            return Err(DmaFault { iova: at, reason });
        }
        Ok(())
    }

    /// IOTLB hits and misses so far.
    pub fn iotlb_counts(&self) -> (u64, u64) {
        let inner = self.lock();
        (inner.caches.hits, inner.caches.misses)
    }

    /// The facts of the exit summary.
    pub fn facts(&self) -> std::collections::BTreeMap<String, u64> {
        let s = &self.stats;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (hits, misses) = self.iotlb_counts();
        let (gsts, iqh, iqt, statuses) = {
            let inner = self.lock();
            let r = &inner.regs;
            (r.gsts, r.iqh, r.iqt, self.wait_statuses(&inner))
        };
        let mut m = std::collections::BTreeMap::new();
        // Where the invalidation queue stands: the head and tail the model processed, and (in
        // sidecore) the tail the guest last wrote to the shared page.
        m.insert("qi_head".to_string(), iqh >> 4);
        m.insert("qi_tail".to_string(), iqt >> 4);
        for (k, v) in ["free", "in_use", "done", "abort", "other"]
            .iter()
            .zip(statuses)
        {
            m.insert(format!("qi_wait_status_{k}"), v);
        }
        if let Some(p) = self.page.get() {
            m.insert("qi_tail_guest".to_string(), p.guest_iqt() >> 4);
        }
        for (k, v) in [
            ("translation_enabled", u64::from(gsts & TE != 0)),
            ("queued_invalidation", u64::from(gsts & QIE != 0)),
            ("caching_mode", u64::from(self.config.caching_mode)),
            ("register_exits", ld(&s.register_exits)),
            ("register_reads", ld(&s.register_reads)),
            ("register_writes", ld(&s.register_writes)),
            ("translations", ld(&s.translations)),
            ("iotlb_hits", hits),
            ("iotlb_misses", misses),
            ("faults", ld(&s.faults)),
            ("faults_dropped", ld(&s.faults_dropped)),
            ("context_invalidations", ld(&s.context_invalidations)),
            ("iotlb_invalidations", ld(&s.iotlb_invalidations)),
            ("qi_descriptors", ld(&s.qi_descriptors)),
            ("qi_waits", ld(&s.qi_waits)),
            ("qi_errors", ld(&s.qi_errors)),
            ("fault_events", ld(&s.fault_events)),
            ("invalidation_events", ld(&s.invalidation_events)),
            ("sidecore_busy_polls", ld(&s.sidecore_busy_polls)),
            ("sidecore_sleeps", ld(&s.sidecore_sleeps)),
        ] {
            m.insert(k.to_string(), v);
        }
        m
    }
}

/// The trapped register pages as an MMIO device (each access an exit on the vCPU thread): both
/// pages in samecore, page 1 in sidecore (`first` is where the device's range starts).
pub struct IommuMmio {
    pub iommu: Arc<Iommu>,
    pub first: u64,
}

impl BusDevice for IommuMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.iommu
            .stats
            .register_exits
            .fetch_add(1, Ordering::Relaxed);
        self.iommu.read_reg(self.first + offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.iommu
            .stats
            .register_exits
            .fetch_add(1, Ordering::Relaxed);
        self.iommu.write_reg(self.first + offset, data)
    }
    /// Refused, saying why: the registers, the invalidation queue's position and the devices'
    /// view through the translation tables are not saved, so a restore would translate wrong.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Err("the emulated VT-d's registers and invalidation queue cannot be saved yet".into())
    }
}

/// One device's view of the IOMMU: its requester ID (bus 0, its slot) is the translation's source.
pub struct DeviceTranslate {
    pub iommu: Arc<Iommu>,
    pub sid: u16,
}

impl Translate for DeviceTranslate {
    fn translate(&self, iova: u64, len: u64) -> Option<u64> {
        let mut v = Vec::new();
        self.iommu
            .translate(self.sid, iova, len, false, &mut v)
            .ok()?;
        match v.as_slice() {
            [s] => Some(s.addr),
            _ => None,
        }
    }

    fn map(&self, iova: u64, len: u64, write: bool, out: &mut Vec<Seg>) -> bool {
        self.iommu
            .translate(self.sid, iova, len, write, out)
            .is_ok()
    }

    fn platform(&self) -> bool {
        true
    }
}

/// Guest-physical address of the register file.
pub fn register_base() -> u64 {
    layout::IOMMU_MMIO_START
}

/// Reads a 16-byte invalidation descriptor (None outside RAM).
fn read_desc(mem: &GuestMemoryMmap, addr: u64) -> Option<(u64, u64)> {
    let lo = mem.read_obj::<u64>(GuestAddress(addr)).ok()?;
    let hi = mem
        .read_obj::<u64>(GuestAddress(addr.checked_add(8)?))
        .ok()?;
    Some((lo, hi))
}

#[cfg(test)]
mod tests;

/// Puts the register file where the guest finds it: samecore traps both pages on the MMIO bus;
/// sidecore makes page 0 guest RAM polled by its thread (see `sidecore`) and traps page 1.
pub fn attach(
    iommu: &Arc<Iommu>,
    vm: &kvm_ioctls::VmFd,
    mmio: &mut crate::devices::Bus,
) -> Result<(), String> {
    let first = match iommu.config.mode {
        Mode::Samecore => 0,
        Mode::Sidecore => {
            sidecore::start(iommu, vm)?;
            PAGE
        }
    };
    let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(IommuMmio {
        iommu: iommu.clone(),
        first,
    }));
    mmio.insert("iommu", register_base() + first, SIZE - first, dev)
        .map_err(|e| e.to_string())
}

impl Iommu {
    /// Stops the sidecore poller (at the VM's end).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
