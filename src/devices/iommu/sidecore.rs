//! Sidecore emulation (thesis §2.5): the first register page is guest RAM, shared with a VMM
//! thread that polls it, so the guest's register writes take no exit.
//!
//! The guest maps the page as it maps any MMIO; its reads and writes go to memory. The poller
//! finds what changed since it last published the page and applies it through the same register
//! model as samecore (`Iommu::write_register`), then publishes what the guest must read:
//! - GCMD is write-only: after each command the poller leaves a sentinel (reserved bit 0) in its
//!   slot, so any guest write, even of 0 (translation and queued invalidation both off), shows.
//! - Write-1-to-clear registers (FSTS, ICS) carry a sentinel in a reserved bit (31) while a bit
//!   is set: a guest write of the bits it read (the usual way to clear them) changes the word, so
//!   the poller sees it. A clear register reads 0 (a write of 0 clears nothing).
//!   Linux tests only the bits it knows.
//! - Read-only fields the guest scribbles over (VER, CAP, ECAP, GSTS, IQH) are restored.
//! - IQT: a new value is processed at once (the invalidation queue, then the wait descriptor's
//!   status write Linux polls).
//!
//! Status is published before any interrupt the guest would act on (the fault event publishes
//! FSTS from the thread that recorded the fault), so the synchronous VT-d protocol holds: the
//! guest writes a command, then polls a status the poller sets when done. Page 1 (IOTLB
//! registers, fault records) still traps: Linux uses neither on its fast path.
//!
//! Idle: after a spin window without a guest write the poller sleeps, 20 µs first, doubling up to
//! 1 ms, and spins again as soon as a poll finds work. The window adapts like the device workers'
//! queue polling (50 µs to 2 ms: it doubles when the guest came back soon after the poller went to
//! sleep, halves after a longer idle). A guest that writes after a long idle waits up to 1 ms for
//! its first command.
//!
//! Cost on a 2-core host: while the guest does DMA the poller spins for its window after each
//! register write, i.e. a strict guest (one IQT write per map and unmap) keeps one host core busy. With two vCPUs on
//! two cores, that core is taken from the vCPUs (or the vCPUs from it): sidecore pays only when a
//! core is free for it (the thesis used a dedicated core on the same die). `cpu=N` pins it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{MmapRegion, VolatileMemory};

use super::regs::*;
use super::Iommu;

/// How long the poller spins after the last guest write before it sleeps: adaptive, between
/// these bounds (see [`run`]).
pub const MIN_SPIN: Duration = Duration::from_micros(50);
pub const MAX_SPIN: Duration = Duration::from_millis(2);
const MIN_SLEEP: Duration = Duration::from_micros(20);
const MAX_SLEEP: Duration = Duration::from_millis(1);
/// The KVM memory slot of the register page (guest RAM uses the first few).
pub const SLOT: u32 = 64;
/// Sentinels (see the module doc).
const GCMD_IDLE: u32 = 1;
const RW1C_MARK: u32 = 1 << 31;

/// A write-1-to-clear register as published: its value, with the sentinel only while a bit is set
/// (a guest write of 0 clears nothing, so a clear register needs none; and Linux logs "DRHD:
/// handling fault status reg" for any FSTS bit it reads at start-up, the sentinel included).
fn rw1c(v: u32) -> u32 {
    if v == 0 {
        0
    } else {
        v | RW1C_MARK
    }
}

/// Registers the poller applies when the guest's value changes. It compares with the value it
/// last took from the page, not with the model's (which drops reserved bits: a guest that sets
/// them would otherwise look like a new write at every poll, and the poller would never sleep).
const TRACKED: [u64; 9] = [
    FEDATA, FEADDR, FEUADDR, IEDATA, IEADDR, IEUADDR, RTADDR, IQA, IQT,
];

/// The shared register page, and what the poller last took from it.
pub struct Page(MmapRegion, [AtomicU64; TRACKED.len()]);

impl Page {
    pub fn new() -> Result<Self, String> {
        MmapRegion::new(0x1000)
            .map(|m| Page(m, Default::default()))
            .map_err(|e| format!("iommu register page: {e}"))
    }

    /// Whether the guest's value `v` of tracked register `off` is new (and remembers it).
    fn changed(&self, off: u64, v: u64) -> bool {
        let i = TRACKED.iter().position(|&o| o == off).expect("tracked");
        self.1[i].swap(v, Ordering::Relaxed) != v
    }

    fn rd32(&self, off: u64) -> u32 {
        self.0.get_ref::<u32>(off as usize).map_or(0, |r| r.load())
    }
    fn rd64(&self, off: u64) -> u64 {
        self.0.get_ref::<u64>(off as usize).map_or(0, |r| r.load())
    }
    fn wr32(&self, off: u64, v: u32) {
        if let Ok(r) = self.0.get_ref::<u32>(off as usize) {
            r.store(v)
        }
    }
    fn wr64(&self, off: u64, v: u64) {
        if let Ok(r) = self.0.get_ref::<u64>(off as usize) {
            r.store(v)
        }
    }

    /// The invalidation queue tail the guest last wrote.
    pub fn guest_iqt(&self) -> u64 {
        self.rd64(IQT)
    }

    pub fn host_address(&self) -> u64 {
        self.0.as_ptr() as u64
    }
}

impl Iommu {
    /// Publishes the registers the guest reads but does not own (restoring any it scribbled
    /// over). Called with the state locked, so nothing changes under it.
    pub(super) fn publish(&self, inner: &super::Inner, page: &Page) {
        let r = &inner.regs;
        page.wr32(VER, VERSION);
        page.wr64(CAP, self.cap);
        page.wr64(ECAP, ecap());
        page.wr32(GSTS, r.gsts);
        page.wr64(IQH, r.iqh);
        if page.rd64(CCMD) >> 63 == 0 {
            page.wr64(CCMD, r.ccmd);
        }
        page.wr32(FSTS, rw1c(r.fsts_value(inner.fri)));
        page.wr32(ICS, rw1c(r.ics));
        // IM is the guest's (applied by the poll before this), IP the IOMMU's.
        for (off, v) in [(FECTL, r.fectl), (IECTL, r.iectl)] {
            if page.rd32(off) != v {
                page.wr32(off, v);
            }
        }
    }

    /// One poll: applies what the guest wrote, publishes; true when the guest wrote anything.
    fn poll(&self, page: &Page) -> bool {
        let mut inner = self.lock();
        let mut work = false;
        // The commands are read first: the guest writes a command's data before the command
        // (stores are ordered on x86), so data read after a new command is that command's.
        let (g, ccmd, iqt) = (page.rd32(GCMD), page.rd64(CCMD), page.rd64(IQT));
        let mut apply = |inner: &mut super::Inner, base: u64, v: u64| {
            work = true;
            self.stats.register_writes.fetch_add(1, Ordering::Relaxed);
            self.write_register(inner, base, v, v);
        };
        // Data registers first: interrupt messages and masks.
        for off in [FEDATA, FEADDR, FEUADDR, IEDATA, IEADDR, IEUADDR] {
            let v = u64::from(page.rd32(off));
            if page.changed(off, v) {
                apply(&mut inner, off, v);
            }
        }
        for (off, cur) in [(FECTL, inner.regs.fectl), (IECTL, inner.regs.iectl)] {
            let v = page.rd32(off);
            if v & IM != cur & IM {
                apply(&mut inner, off, u64::from(v));
            }
        }
        // Then the commands, which use the data (Linux writes RTADDR, then GCMD.SRTP; IQA,
        // then GCMD.QIE; descriptors, then IQT).
        for off in [RTADDR, IQA] {
            let v = page.rd64(off);
            if page.changed(off, v) {
                apply(&mut inner, off, v);
            }
        }
        if g != GCMD_IDLE {
            page.wr32(GCMD, GCMD_IDLE);
            apply(&mut inner, GCMD, u64::from(g));
        }
        if ccmd >> 63 != 0 {
            apply(&mut inner, CCMD, ccmd);
            page.wr64(CCMD, inner.regs.ccmd);
        }
        if page.changed(IQT, iqt) {
            apply(&mut inner, IQT, iqt);
        }
        for off in [FSTS, ICS] {
            // A 0 clears nothing: it is what the page holds while no bit is set.
            let v = page.rd32(off);
            if v & RW1C_MARK == 0 && v != 0 {
                apply(&mut inner, off, u64::from(v));
            }
        }
        self.publish(&inner, page);
        work
    }
}

/// Maps the page at the register base as guest RAM (KVM memory slot [`SLOT`]) and starts the
/// poller. The page is never unmapped: KVM may reach it for as long as the VM exists, which is
/// the process's life.
pub fn start(iommu: &Arc<Iommu>, vm: &kvm_ioctls::VmFd) -> Result<(), String> {
    let page = Arc::new(Page::new()?);
    page.wr32(GCMD, GCMD_IDLE);
    iommu.publish(&iommu.lock(), &page);
    let region = kvm_userspace_memory_region {
        slot: SLOT,
        guest_phys_addr: super::register_base(),
        memory_size: 0x1000,
        userspace_addr: page.host_address(),
        flags: 0,
    };
    // SAFETY: the page is a private anonymous mapping that is never unmapped (a clone of the Arc
    // is leaked below), so the host address stays valid for the VM's life.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("iommu register page as guest memory: {e}"))?;
    std::mem::forget(page.clone());
    let _ = iommu.page.set(page.clone());
    let iommu = iommu.clone();
    let cpu = iommu.config.cpu;
    std::thread::Builder::new()
        .name("iommu-sidecore".into())
        .spawn(move || {
            if let Some(cpu) = cpu {
                pin(cpu);
            }
            crate::seccomp::apply(crate::seccomp::Kind::Sidecore);
            run(&iommu, &page, &iommu.stop);
        })
        .map_err(|e| format!("iommu sidecore thread: {e}"))?;
    Ok(())
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in bounds for cpu < 1024
    // (checked), and sched_setaffinity reads the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 1024 {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!(
                "exitless: iommu sidecore: cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The poll loop: spin while the guest is busy, sleep (longer and longer) while it is idle. The
/// spin window adapts (as the device workers' queue polling): a guest write that came less than
/// `MAX_SPIN` after the poller went to sleep doubles it, a longer idle halves it.
fn run(iommu: &Iommu, page: &Page, stop: &AtomicBool) {
    let mut last_work = Instant::now();
    let mut spin = MIN_SPIN;
    let mut sleep = MIN_SLEEP;
    let mut asleep_since: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        if iommu.poll(page) {
            iommu
                .stats
                .sidecore_busy_polls
                .fetch_add(1, Ordering::Relaxed);
            if let Some(t) = asleep_since.take() {
                spin = if t.elapsed() < MAX_SPIN {
                    (spin * 2).min(MAX_SPIN)
                } else {
                    (spin / 2).max(MIN_SPIN)
                };
            }
            last_work = Instant::now();
            sleep = MIN_SLEEP;
        } else if last_work.elapsed() < spin {
            std::hint::spin_loop();
        } else {
            asleep_since.get_or_insert_with(Instant::now);
            iommu.stats.sidecore_sleeps.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(MAX_SLEEP);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::iommu::walk::tests::{memory, Tables};
    use crate::devices::iommu::{IommuConfig, Mode};
    use crate::devices::virtio::irq::NoRoutes;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_poller_applies_guest_writes_and_publishes_status() {
        let mem = memory();
        let cfg = IommuConfig {
            mode: Mode::Sidecore,
            ..Default::default()
        };
        let m = Iommu::new(mem.clone(), cfg, Arc::new(NoRoutes::default())).unwrap();
        let page = Page::new().unwrap();
        page.wr32(GCMD, GCMD_IDLE);
        m.publish(&m.lock(), &page);
        assert_eq!(page.rd64(CAP), m.cap);
        // No fault, no completion: the write-1-to-clear registers read 0, sentinel and all.
        assert_eq!((page.rd32(FSTS), page.rd32(ICS)), (0, 0));
        // Nothing written: no work.
        assert!(!m.poll(&page));
        // Linux's sequence, as plain memory writes.
        let t = Tables::new(&mem, 8, 1);
        page.wr64(IQA, 0x50000);
        page.wr32(GCMD, QIE);
        assert!(m.poll(&page));
        assert_ne!(page.rd32(GSTS) & QIE, 0);
        page.wr64(RTADDR, t.rta);
        page.wr32(GCMD, QIE | SRTP);
        m.poll(&page);
        assert_ne!(page.rd32(GSTS) & SRTP, 0);
        // A wait descriptor, then the tail.
        mem.write_obj(5u64 | 1 << 5 | 9 << 32, GuestAddress(0x50000))
            .unwrap();
        mem.write_obj(0x60000u64, GuestAddress(0x50008)).unwrap();
        page.wr64(IQT, 1 << 4);
        m.poll(&page);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x60000)).unwrap(), 9);
        assert_eq!(page.rd64(IQH), 1 << 4);
        // A zero GCMD (everything off) is seen thanks to the sentinel.
        page.wr32(GCMD, 0);
        assert!(m.poll(&page));
        assert_eq!(page.rd32(GSTS) & (QIE | TE), 0);
        // Scribbled read-only registers are restored.
        page.wr64(CAP, 0);
        page.wr32(GSTS, u32::MAX);
        m.poll(&page);
        assert_eq!((page.rd64(CAP), page.rd32(GSTS) & TE), (m.cap, 0));
        // IQE and its clearing by writing back the bit read (FSTS's sentinel makes it visible).
        page.wr64(IQT, 0);
        page.wr32(GCMD, QIE);
        m.poll(&page);
        mem.write_obj(0xfu64, GuestAddress(0x50000)).unwrap();
        page.wr64(IQT, 1 << 4);
        m.poll(&page);
        let fsts = page.rd32(FSTS);
        assert_ne!(fsts & FSTS_IQE, 0);
        // Linux replaces the bad descriptor, then clears IQE; the queue goes on.
        mem.write_obj(5u64 | 1 << 5 | 10 << 32, GuestAddress(0x50000))
            .unwrap();
        page.wr32(FSTS, FSTS_IQE);
        m.poll(&page);
        assert_eq!(page.rd32(FSTS) & FSTS_IQE, 0);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x60000)).unwrap(), 10);
    }

    /// Reserved bits the model drops (IQT's low bits, IQA's, an MSI address's) are applied once,
    /// not at every poll: the hostile-guest suite found the poller busy forever (300 000 register
    /// "writes" in a second) after such writes.
    #[test]
    fn a_write_with_reserved_bits_is_applied_once() {
        let m = Iommu::new(
            memory(),
            IommuConfig {
                mode: Mode::Sidecore,
                ..Default::default()
            },
            Arc::new(NoRoutes::default()),
        )
        .unwrap();
        let page = Page::new().unwrap();
        page.wr32(GCMD, GCMD_IDLE);
        m.publish(&m.lock(), &page);
        page.wr64(IQA, 0x50000 | 0x7f8);
        page.wr64(IQT, 0x3 | 1 << 20);
        page.wr32(FEADDR, 0xfee0_0003);
        page.wr32(IEADDR, 0xfee0_0001);
        assert!(m.poll(&page));
        assert!(!m.poll(&page), "the same values again count as new writes");
    }
}
