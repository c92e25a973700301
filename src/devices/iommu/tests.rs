//! Register file, queued invalidation, translation and faults, driven as Linux's intel-iommu
//! driver drives them (register writes, then the status it polls).

use super::walk::tests::{memory, Tables};
use super::*;
use crate::devices::virtio::irq::NoRoutes;

const SID: u16 = 0x0008; // 00:01.0
const DID: u16 = 3;
const IQ_BASE: u64 = 0x50000;
const STATUS: u64 = 0x60000;

fn iommu(mem: &GuestMemoryMmap, cm: bool) -> Iommu {
    let cfg = IommuConfig {
        caching_mode: cm,
        ..Default::default()
    };
    Iommu::new(mem.clone(), cfg, Arc::new(NoRoutes::default())).unwrap()
}

fn w32(m: &Iommu, off: u64, v: u32) {
    m.write_reg(off, &v.to_le_bytes());
}
fn w64(m: &Iommu, off: u64, v: u64) {
    m.write_reg(off, &v.to_le_bytes());
}
fn r32(m: &Iommu, off: u64) -> u32 {
    let mut b = [0u8; 4];
    m.read_reg(off, &mut b);
    u32::from_le_bytes(b)
}
fn r64(m: &Iommu, off: u64) -> u64 {
    let mut b = [0u8; 8];
    m.read_reg(off, &mut b);
    u64::from_le_bytes(b)
}

/// What Linux's init_dmars does: queued invalidation on, root table set, translation on.
fn enable(m: &Iommu, rta: u64) {
    w64(m, IQT, 0);
    w64(m, IQA, IQ_BASE);
    let mut gcmd = QIE;
    w32(m, GCMD, gcmd);
    assert_ne!(r32(m, GSTS) & QIE, 0, "QIES");
    w64(m, RTADDR, rta);
    w32(m, GCMD, gcmd | SRTP);
    assert_ne!(r32(m, GSTS) & SRTP, 0, "RTPS");
    gcmd |= TE;
    w32(m, GCMD, gcmd);
    assert_ne!(r32(m, GSTS) & TE, 0, "TES");
}

/// Queues descriptors at the tail and moves IQT past them.
fn submit(m: &Iommu, mem: &GuestMemoryMmap, descs: &[(u64, u64)]) {
    let mut t = r64(m, IQT) >> 4;
    for &(lo, hi) in descs {
        mem.write_obj(lo, GuestAddress(IQ_BASE + 16 * t)).unwrap();
        mem.write_obj(hi, GuestAddress(IQ_BASE + 16 * t + 8))
            .unwrap();
        t = (t + 1) % 256;
    }
    w64(m, IQT, t << 4);
}

fn wait_desc(data: u32) -> (u64, u64) {
    (qi::WAIT | qi::WAIT_SW | u64::from(data) << 32, STATUS)
}

fn dma(m: &Iommu, iova: u64, len: u64, write: bool) -> Result<Vec<Seg>, DmaFault> {
    let mut v = Vec::new();
    m.translate(SID, iova, len, write, &mut v).map(|_| v)
}

#[test]
fn registers_read_back_and_read_only_ones_ignore_writes() {
    let mem = memory();
    let m = iommu(&mem, true);
    assert_eq!(r32(&m, VER), VERSION);
    assert_eq!(r64(&m, CAP), cap(true));
    // A 32-bit read of CAP's upper half, as a 32-bit driver does.
    assert_eq!(u64::from(r32(&m, CAP + 4)), cap(true) >> 32);
    assert_eq!(r64(&m, ECAP), ecap());
    for off in [VER, CAP, ECAP, GSTS, IQH] {
        w64(&m, off, u64::MAX);
    }
    assert_eq!(r64(&m, CAP), cap(true));
    assert_eq!(r32(&m, GSTS), 0, "GSTS is read-only");
    assert_eq!(r64(&m, IQH), 0);
    assert_eq!(r32(&m, GCMD), 0, "GCMD reads as 0");
    // Garbage everywhere in both pages: nothing panics, unknown offsets read 0.
    for off in (0..SIZE).step_by(4) {
        w32(&m, off, 0xdead_beef);
        let _ = r32(&m, off);
    }
    assert_eq!(r32(&m, 0x200), 0);
    assert_eq!(r64(&m, CAP), cap(true));
}

#[test]
fn linux_enable_sequence_and_translation() {
    let mem = memory();
    let m = iommu(&mem, true);
    let mut t = Tables::new(&mem, SID, DID);
    t.map(&mem, 0xffff_f000, 0x80_3000, 1, 3);
    t.map(&mem, 0xffff_e000, 0x80_1000, 1, 1);
    // Before translation is on, DMA is untranslated.
    assert_eq!(
        dma(&m, 0x1234, 8, true).unwrap(),
        vec![Seg {
            addr: 0x1234,
            len: 8
        }]
    );
    enable(&m, t.rta);
    // A buffer crossing two IOVA pages that are not contiguous in guest memory: two pieces.
    let segs = dma(&m, 0xffff_eff0, 0x20, false).unwrap();
    assert_eq!(
        segs,
        vec![
            Seg {
                addr: 0x80_1ff0,
                len: 0x10
            },
            Seg {
                addr: 0x80_3000,
                len: 0x10
            }
        ]
    );
    // Read-only page: a device write faults.
    assert_eq!(
        dma(&m, 0xffff_e000, 4, true).unwrap_err().reason,
        FaultReason::WriteDenied
    );
    // The second DMA of the same pages hits the IOTLB.
    let (h0, _) = m.iotlb_counts();
    dma(&m, 0xffff_f000, 8, true).unwrap();
    assert!(m.iotlb_counts().0 > h0);
}

#[test]
fn queued_invalidation_wait_status_and_iotlb_flush() {
    let mem = memory();
    let m = iommu(&mem, true);
    let mut t = Tables::new(&mem, SID, DID);
    t.map(&mem, 0x10_0000, 0x80_0000, 1, 3);
    enable(&m, t.rta);
    dma(&m, 0x10_0000, 8, true).unwrap();
    // The guest unmaps the page and invalidates it (page-selective), then waits.
    t.map(&mem, 0x10_0000, 0, 1, 0);
    let page = (qi::IOTLB | 3 << 4 | u64::from(DID) << 16, 0x10_0000);
    submit(&m, &mem, &[page, wait_desc(1)]);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 1);
    assert_eq!(r64(&m, IQH), r64(&m, IQT), "queue drained");
    assert_eq!(
        dma(&m, 0x10_0000, 8, true).unwrap_err().reason,
        FaultReason::WriteDenied
    );
    // A context-cache flush, a global IOTLB flush and ignored kinds, then another wait.
    submit(
        &m,
        &mem,
        &[
            (qi::CONTEXT_CACHE | 1 << 4, 0),
            (qi::IOTLB | 1 << 4, 0),
            (qi::DEVICE_TLB, 0),
            wait_desc(2),
        ],
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 2);
    assert_eq!(m.stats.qi_waits.load(Ordering::Relaxed), 2);
    // Wait with an interrupt: ICS.IWC set (the event is masked: IECTL.IP).
    submit(&m, &mem, &[(qi::WAIT | qi::WAIT_IF, 0)]);
    assert_eq!(r32(&m, ICS) & 1, 1);
    assert_ne!(r32(&m, IECTL) & IP, 0);
    w32(&m, ICS, 1);
    assert_eq!(r32(&m, ICS), 0);
}

#[test]
fn a_bad_descriptor_stops_the_queue_until_iqe_is_cleared() {
    let mem = memory();
    let m = iommu(&mem, false);
    let t = Tables::new(&mem, SID, DID);
    enable(&m, t.rta);
    submit(&m, &mem, &[wait_desc(7), (0xf, 0), wait_desc(8)]);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 7);
    assert_ne!(r32(&m, FSTS) & FSTS_IQE, 0);
    assert_eq!(r64(&m, IQH) >> 4, 1, "IQH at the bad descriptor");
    // Linux replaces it and clears IQE: processing resumes.
    mem.write_obj(qi::CONTEXT_CACHE | 1 << 4, GuestAddress(IQ_BASE + 16))
        .unwrap();
    w32(&m, FSTS, FSTS_IQE);
    assert_eq!(r32(&m, FSTS) & FSTS_IQE, 0);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 8);
    // A tail past the queue, a queue outside RAM, a status write outside RAM: errors, no panic.
    w32(&m, FSTS, FSTS_IQE);
    w64(&m, IQT, 300 << 4);
    assert_ne!(r32(&m, FSTS) & FSTS_IQE, 0);
    w32(&m, FSTS, FSTS_IQE);
    w64(&m, IQA, 0x7_0000_0000);
    w64(&m, IQT, 1 << 4);
    assert_ne!(r32(&m, FSTS) & FSTS_IQE, 0);
    assert!(m.stats.qi_errors.load(Ordering::Relaxed) >= 3);
}

#[test]
fn faults_are_recorded_then_overflow_and_clear() {
    let mem = memory();
    let m = iommu(&mem, true);
    let t = Tables::new(&mem, SID, DID);
    enable(&m, t.rta);
    w32(&m, FECTL, 0); // unmask the fault event
    assert_eq!(
        dma(&m, 0x4000_0000, 8, false).unwrap_err().reason,
        FaultReason::ReadDenied
    );
    let fsts = r32(&m, FSTS);
    assert_ne!(fsts & FSTS_PPF, 0);
    assert_eq!((fsts >> 8) & 0xff, 0, "FRI: the oldest pending record");
    let hi = r64(&m, FRCD + 8);
    assert_eq!(r64(&m, FRCD), 0x4000_0000);
    assert_eq!(hi & 0xffff, u64::from(SID));
    assert_eq!((hi >> 32) & 0xff, FaultReason::ReadDenied as u64);
    assert_ne!(hi & (1 << 62), 0, "a read");
    assert_ne!(hi >> 63, 0, "F");
    assert_eq!(m.stats.fault_events.load(Ordering::Relaxed), 1);
    // Fill the other records, then one more overflows.
    for i in 1..=NUM_FRCD as u64 {
        let _ = dma(&m, 0x5000_0000 + (i << 12), 8, true);
    }
    assert_ne!(r32(&m, FSTS) & FSTS_PFO, 0);
    assert_eq!(m.stats.faults_dropped.load(Ordering::Relaxed), 1);
    // Record 0 cleared: the oldest pending is record 1.
    w32(&m, FRCD + 12, 1 << 31);
    assert_eq!((r32(&m, FSTS) >> 8) & 0xff, 1);
    // Linux clears F in each record (a 32-bit write of bit 31 at +12), then PFO.
    for i in 0..NUM_FRCD as u64 {
        w32(&m, FRCD + 16 * i + 12, 1 << 31);
    }
    w32(&m, FSTS, FSTS_PFO | FSTS_PPF);
    assert_eq!(r32(&m, FSTS) & 0xff, 0);
    // A requester with no context entry: recorded as context-not-present.
    let mut v = Vec::new();
    let e = m.translate(0x0010, 0, 8, false, &mut v).unwrap_err();
    assert_eq!(e.reason, FaultReason::ContextNotPresent);
}

#[test]
fn garbage_root_table_and_register_invalidation() {
    let mem = memory();
    let m = iommu(&mem, true);
    // Translation on with a root table outside RAM: faults, no panic.
    w64(&m, RTADDR, 0xffff_ffff_f000);
    w32(&m, GCMD, SRTP);
    w32(&m, GCMD, TE);
    assert_eq!(
        dma(&m, 0, 8, false).unwrap_err().reason,
        FaultReason::RootTableUnreadable
    );
    // Register-based invalidation: ICC / IVT clear when done, CAIG / IAIG report it.
    w64(&m, CCMD, 1 << 63 | 1 << 61);
    assert_eq!(r64(&m, CCMD) >> 63, 0);
    assert_eq!((r64(&m, CCMD) >> 59) & 3, 1);
    w64(&m, IVA, 0x1000);
    w64(&m, IOTLB, 1 << 63 | 3 << 60 | 5 << 32);
    assert_eq!(r64(&m, IOTLB) >> 63, 0);
    assert_eq!((r64(&m, IOTLB) >> 57) & 3, 3);
    assert_eq!(m.stats.iotlb_invalidations.load(Ordering::Relaxed), 1);
}

#[test]
fn options_parse() {
    assert_eq!(parse("").unwrap(), IommuConfig::default());
    let c = parse("mode=sidecore,caching-mode=off,cpu=1").unwrap();
    assert_eq!(
        (c.mode, c.caching_mode, c.cpu),
        (Mode::Sidecore, false, Some(1))
    );
    assert!(parse("mode=fast").is_err());
    assert!(parse("caching-mode").is_err());
    assert!(parse("cpu=x").is_err());
}

/// The fuzz target over its seed (Linux's enable sequence, a DMA, a wait) and over garbage.
#[test]
fn fuzz_target_runs_its_seed_and_garbage() {
    let seed = std::fs::read("fuzz/corpus/iommu/enable_dma_wait").unwrap();
    crate::fuzzing::iommu(&seed);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..0x8000 + 12 * 4000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    crate::fuzzing::iommu(&garbage);
}
