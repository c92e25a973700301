//! Phase 6: the emulated VT-d under attack (only with `--iommu`). See the binary's module doc for
//! the memory layout that keeps the guest's own memory out of reach of any translation.

use super::{
    mmio_read, mmio_write, outb_status, setup_with, state, virtio_round, Dev, State, MAX_FUNCS,
    MAX_WINDOWS, NAME, NO_VECTOR, WINDOW_BASE, WINDOW_SIZE,
};
use kit::println;
use kit::virtio::{r32, w32, w64};

/// The register file (two pages; `layout::IOMMU_MMIO_START` in the VMM).
pub const IOMMU_REGS: u64 = 0xfed9_0000;
const RTADDR: u64 = 0x20;
const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1c;
const FSTS: u64 = 0x34;
const FECTL: u64 = 0x38;
const FEDATA: u64 = 0x3c;
const FEADDR: u64 = 0x40;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const IEDATA: u64 = 0xa4;
const IEADDR: u64 = 0xa8;
const FRCD: u64 = 0x1100;
const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const ACCESS_PLATFORM: u64 = 1 << 33;
const NEEDS_RESET: u32 = 0x40;

const AREA: u64 = WINDOW_BASE + MAX_WINDOWS * WINDOW_SIZE;
const QI_AREA: u64 = AREA;
const QI_PAGES: u64 = 128;
const STATUS_AREA: u64 = AREA + 0x8_0000;
const CTX_AREA: u64 = AREA + 0x10_0000;
const CTX_PAGES: u64 = 256;
const TABLE_AREA: u64 = AREA + 0x20_0000;
const TABLE_PAGES: u64 = 512;
const PAGE_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Whether the VT-d register file answers (its version register reads 1.0).
pub fn present() -> bool {
    r32(IOMMU_REGS) == 0x10 && r32(IOMMU_REGS + 8) != 0xffff_ffff
}

fn ctx_page(s: &mut State) -> u64 {
    CTX_AREA + (s.below(CTX_PAGES) << 12)
}

fn table_page(s: &mut State) -> u64 {
    TABLE_AREA + (s.below(TABLE_PAGES) << 12)
}

/// A page where no RAM is (MMIO, past RAM, above 4 GiB, the top of the address space).
fn far(s: &mut State) -> u64 {
    s.not_ram() & PAGE_MASK
}

/// A root entry: present or not, a context table in CTX_AREA or where no RAM is, reserved bits.
/// Its high qword is never 2 in bits 2:0, so read as a context entry it cannot ask for a walk.
fn root_entry(s: &mut State) -> (u64, u64) {
    let lo = match s.below(5) {
        0 => 0,
        1 | 2 => ctx_page(s) | 1,
        3 => far(s) | 1,
        _ => {
            let p = if s.chance(2) { ctx_page(s) } else { far(s) };
            p | (s.next() & 0xfff)
        }
    };
    let hi = if s.chance(6) { s.next() | 1 } else { 0 };
    (lo, hi)
}

/// A context entry: any translation type, FPD, address width and domain, second-level tables in
/// TABLE_AREA or where no RAM is.
fn context_entry(s: &mut State) -> (u64, u64) {
    let ptr = if s.chance(4) { far(s) } else { table_page(s) };
    let lo = match s.below(6) {
        0 => 0,
        5 => ptr | (s.next() & 0xfff),
        _ => ptr | (s.below(4) << 2) | (s.below(2) << 1) | 1,
    };
    let hi = if s.chance(4) {
        s.next()
    } else {
        2 | (s.below(0x1_0000) << 8)
    };
    (lo, hi)
}

/// A second-level entry: read-only pointers into TABLE_AREA (any page: loops, a table read as
/// another level, superpages), writable ones only where no RAM is, garbage bits.
fn pte(s: &mut State, own: u64) -> u64 {
    let ps = s.below(2) << 7;
    match s.below(9) {
        0 => 0,
        1 => own | 1, // the table itself
        2..=4 => table_page(s) | 1 | ps,
        5 | 6 => far(s) | 3 | ps,
        7 => far(s) | (s.next() & 0xfff),
        _ => table_page(s) | (s.next() & 0xffd), // W (bit 1) clear
    }
}

fn fill_ctx_page(s: &mut State, page: u64) {
    let roots = s.chance(2);
    for i in 0..256 {
        let (lo, hi) = if roots {
            root_entry(s)
        } else {
            context_entry(s)
        };
        w64(page + 16 * i, lo);
        w64(page + 16 * i + 8, hi);
    }
    s.counts.iommu_tables += 1;
}

fn fill_table_page(s: &mut State, page: u64) {
    for i in 0..512 {
        let v = pte(s, page);
        w64(page + 8 * i, v);
    }
    s.counts.iommu_tables += 1;
}

/// A wait descriptor's status address: STATUS_AREA, or MMIO / past RAM (aligned or not).
fn status_addr(s: &mut State) -> u64 {
    match s.below(4) {
        0 | 1 => STATUS_AREA + (s.below(0x1_0000) & !3),
        2 => s.not_ram() & !3,
        _ => s.not_ram(),
    }
}

/// A 128-bit invalidation descriptor: every type (valid or not, extended-type bits), waits with
/// and without status write and interrupt.
fn qi_desc(s: &mut State) -> (u64, u64) {
    let ty = match s.below(8) {
        0 => s.next() & 0xf,
        1..=4 => s.below(5),
        _ => 5,
    };
    let mut lo = (s.next() & !0xf) | ty;
    if !s.chance(4) {
        lo &= !(7 << 9);
    }
    let hi = if ty == 5 { status_addr(s) } else { s.next() };
    (lo, hi)
}

fn write_qi_desc(s: &mut State, at: u64) {
    let (lo, hi) = qi_desc(s);
    w64(at, lo);
    w64(at + 8, hi);
    s.counts.iommu_descs += 1;
}

/// IQA: a queue of 1 to 128 pages inside QI_AREA, or where no RAM is, with reserved bits (and
/// sometimes the 256-bit descriptor width, which is not offered).
fn iqa_value(s: &mut State) -> u64 {
    match s.below(6) {
        0 => far(s) | s.below(8),
        1 => QI_AREA | (s.next() & 0xfff),
        _ => {
            let qs = s.below(8);
            let base = QI_AREA + (s.below(QI_PAGES - (1 << qs) + 1) << 12);
            base | qs
        }
    }
}

/// RTADDR: a root table in CTX_AREA or where no RAM is, with translation-mode and reserved bits.
fn rtaddr_value(s: &mut State) -> u64 {
    match s.below(4) {
        0 => far(s) | (s.next() & 0xfff),
        1 => ctx_page(s) | (s.next() & 0xfff),
        _ => ctx_page(s),
    }
}

/// An MSI address the guest can take (its own LAPIC's window, any destination and mode bits).
fn msi_addr(s: &mut State) -> u32 {
    0xfee0_0000 | ((s.below(0x100) as u32) << 12) | ((s.below(4) as u32) << 2)
}

fn reg_write(off: u64, size: u64, v: u64) {
    mmio_write(IOMMU_REGS + off, size, v);
}

/// A random register write (both pages, any size), rewritten where it would aim the root table,
/// the queue or an interrupt at what the guest cannot afford.
fn random_reg_write(s: &mut State) {
    let size = [1u64, 2, 4, 8][s.below(4) as usize];
    let off = if s.chance(2) {
        s.below(0xc0)
    } else {
        s.below(0x2000)
    } & !(size - 1);
    let hits = |a: u64, n: u64| off < a + n && a < off + size;
    if hits(RTADDR, 8) {
        let v = rtaddr_value(s);
        reg_write(RTADDR, 8, v);
    } else if hits(IQA, 8) {
        let v = iqa_value(s);
        reg_write(IQA, 8, v);
    } else if hits(FEDATA, 4) || hits(IEDATA, 4) {
        let at = if hits(FEDATA, 4) { FEDATA } else { IEDATA };
        let v = s.msi_data();
        reg_write(at, 4, v as u64);
    } else if hits(FEADDR, 4) || hits(IEADDR, 4) {
        let at = if hits(FEADDR, 4) { FEADDR } else { IEADDR };
        let v = msi_addr(s);
        reg_write(at, 4, v as u64);
    } else if s.chance(3) {
        mmio_read(IOMMU_REGS + off, size);
    } else {
        let v = s.next();
        reg_write(off, size, v);
    }
    s.counts.iommu_regs += 1;
}

/// Turns translation and queued invalidation on or off at random, latching a root table.
fn random_commands(s: &mut State) {
    let v = rtaddr_value(s);
    reg_write(RTADDR, 8, v);
    reg_write(GCMD, 4, SRTP as u64);
    let iqa = iqa_value(s);
    reg_write(IQT, 8, 0);
    reg_write(IQA, 8, iqa);
    // TE, QIE (bit 26) and anything else, persistent bits as Linux writes them.
    let cmd = (s.next() as u32 & !SRTP) | if s.chance(2) { TE } else { 0 };
    reg_write(GCMD, 4, cmd as u64);
    s.counts.iommu_regs += 5;
}

/// Descriptors at the queue's tail (where the guest's IQA put it), then a new tail: in range,
/// past the queue's end, unaligned.
fn push_descriptors(s: &mut State) {
    let iqa = mmio_read(IOMMU_REGS + IQA, 8);
    let base = iqa & PAGE_MASK;
    let n = 256u64 << (iqa & 7);
    let tail = mmio_read(IOMMU_REGS + IQT, 8) >> 4;
    let inside = |a: u64| (QI_AREA..QI_AREA + QI_PAGES * 4096).contains(&a);
    let count = 1 + s.below(64);
    for i in 0..count {
        let at = base + 16 * ((tail + i) % n.max(1));
        if inside(at) {
            write_qi_desc(s, at);
        }
    }
    let new_tail = match s.below(6) {
        0 => s.next(),
        1 => (n + s.below(n)) << 4,
        _ => ((tail + count) % n.max(1)) << 4,
    };
    reg_write(IQT, 8, new_tail);
    s.counts.iommu_regs += 1;
}

/// Clears the fault state as a driver would (FSTS write-1-to-clear, the records' F bits), or not.
fn clear_faults(s: &mut State) {
    reg_write(FSTS, 4, 0x7d);
    for i in 0..4 {
        reg_write(FRCD + 16 * i + 8, 8, 1 << 63);
    }
    let fectl = if s.chance(2) { 0 } else { 1 << 31 };
    reg_write(FECTL, 4, fectl);
    s.counts.iommu_regs += 6;
}

/// Device DMA through whatever the IOMMU holds now (not the balloon: it discards the pages it
/// reads, and under a hostile translation it would read them from the tables).
fn dma_round(s: &mut State, devs: &[Dev]) {
    let candidates = devs
        .iter()
        .filter(|d| d.virtio != 0 && d.virtio != 5 && d.common != 0 && d.window != 0)
        .count() as u64;
    if candidates == 0 {
        return;
    }
    let pick = s.below(candidates) as usize;
    let d = *devs
        .iter()
        .filter(|d| d.virtio != 0 && d.virtio != 5 && d.common != 0 && d.window != 0)
        .nth(pick)
        .expect("counted");
    virtio_round(s, &d);
    s.counts.iommu_dma += 1;
}

pub extern "C" fn attacks(_: u64) -> u64 {
    let s = state();
    let devs: [Dev; MAX_FUNCS] = s.devs;
    let n = s.ndevs;
    for d in &devs[..n] {
        if d.common != 0 {
            outb_status(d.common, 0);
        }
    }
    for p in 0..QI_PAGES * 256 {
        write_qi_desc(s, QI_AREA + 16 * p);
    }
    for p in 0..CTX_PAGES {
        fill_ctx_page(s, CTX_AREA + (p << 12));
    }
    for p in 0..TABLE_PAGES {
        fill_table_page(s, TABLE_AREA + (p << 12));
    }
    for _ in 0..s.rounds / 2 {
        match s.below(10) {
            0 | 1 => {
                for _ in 0..8 {
                    random_reg_write(s);
                }
            }
            2 => random_commands(s),
            3 | 4 => push_descriptors(s),
            5 => {
                let p = ctx_page(s);
                fill_ctx_page(s, p);
                let t = table_page(s);
                fill_table_page(s, t);
            }
            6 => clear_faults(s),
            _ => dma_round(s, &devs[..n]),
        }
    }
    for d in &devs[..n] {
        if d.common != 0 {
            outb_status(d.common, 0);
        }
    }
    0
}

/// Waits for GSTS to show `bit` as `on` (the VT-d protocol is synchronous; sidecore publishes
/// status at once too).
fn wait_status(bit: u32, on: bool) {
    for _ in 0..10_000_000 {
        if (r32(IOMMU_REGS + GSTS) & bit != 0) == on {
            return;
        }
        kit::arch::pause();
    }
    kit::fail(
        NAME,
        format_args!(
            "IOMMU: GSTS {:#x} never showed {bit:#x}",
            r32(IOMMU_REGS + GSTS)
        ),
    );
}

/// Translation off, queued invalidation off, faults cleared and masked, a root table latched.
fn reset(root: u64) {
    w32(IOMMU_REGS + GCMD, 0);
    wait_status(TE, false);
    w64(IOMMU_REGS + RTADDR, root);
    w32(IOMMU_REGS + GCMD, SRTP);
    wait_status(SRTP, true);
    w32(IOMMU_REGS + FSTS, 0x7d);
    for i in 0..4 {
        w64(IOMMU_REGS + FRCD + 16 * i + 8, 1 << 63);
    }
    w32(IOMMU_REGS + FECTL, 1 << 31);
}

/// After the attack: a root table with nothing present makes a device's DMA fault, recorded
/// with its requester ID; a pass-through context then gives a working virtio-rng through the
/// IOMMU; translation is left off for the final check.
pub fn check(s: &State) {
    let Some(rng) = s.devs().iter().copied().find(|d| d.virtio == 4) else {
        kit::fail(NAME, format_args!("no virtio-rng for the IOMMU check"));
    };
    let (root, ctx) = (CTX_AREA, CTX_AREA + 0x1000);
    kit::virtio::zero(root, 0x2000);
    reset(root);
    w32(IOMMU_REGS + GCMD, TE);
    wait_status(TE, true);
    let sid = (rng.func.dev as u64) << 3;
    let mem = super::CHECK_MEM;
    let _ = setup_with(&rng, mem, NO_VECTOR, ACCESS_PLATFORM);
    let status = mmio_read(rng.common + 0x14, 1) as u32;
    // Sidecore publishes FSTS from its thread: the guest's own clearing write (with the
    // model's sentinel bit) may still be what the page shows for a moment.
    let mut fsts = r32(IOMMU_REGS + FSTS);
    for _ in 0..10_000_000 {
        if fsts & 2 != 0 {
            break;
        }
        kit::arch::pause();
        fsts = r32(IOMMU_REGS + FSTS);
    }
    let record = (0..4).find_map(|i| {
        let hi = mmio_read(IOMMU_REGS + FRCD + 16 * i + 8, 8);
        (hi >> 63 != 0 && hi & 0xffff == sid).then_some(hi)
    });
    let Some(hi) = record else {
        kit::fail(
            NAME,
            format_args!(
                "IOMMU: no fault recorded for {sid:#x} (FSTS {fsts:#x}, status {status:#x})"
            ),
        );
    };
    if fsts & 2 == 0 || status & NEEDS_RESET == 0 {
        kit::fail(
            NAME,
            format_args!("IOMMU: FSTS {fsts:#x}, device status {status:#x} after a faulting DMA"),
        );
    }
    println!(
        "kit: hostile: the IOMMU records the fault: sid {sid:#x} reason {:#x}",
        (hi >> 32) & 0xff
    );
    outb_status(rng.common, 0);
    // Pass-through for the rng (address width 48 bits, domain 1).
    w64(root, ctx | 1);
    w64(ctx + 16 * sid, 1 | (2 << 2));
    w64(ctx + 16 * sid + 8, 2 | (1 << 8));
    reset(root);
    w32(IOMMU_REGS + GCMD, TE);
    wait_status(TE, true);
    let buf = mem + 0x8000;
    kit::virtio::zero(buf, 64);
    let mut q = setup_with(&rng, mem, NO_VECTOR, ACCESS_PLATFORM);
    match q.submit(&[(buf, 64, true)], 50_000_000) {
        Some((_, 64)) if (0..16).any(|i| r32(buf + 4 * i) != 0) => {}
        r => kit::fail(
            NAME,
            format_args!("virtio-rng through the IOMMU after its attack: {r:?}"),
        ),
    }
    outb_status(rng.common, 0);
    w32(IOMMU_REGS + GCMD, 0);
    wait_status(TE, false);
    println!("kit: hostile: virtio-rng works through the IOMMU after its attack");
    check_queued_invalidation();
}

/// After the attack, queued invalidation still works: a one-page queue, a wait descriptor with
/// a status write, the tail moved past it; the VMM writes the status (on the vCPU thread in
/// samecore, from its poller in sidecore) and the head follows the tail.
fn check_queued_invalidation() {
    const QIE: u32 = 1 << 26;
    const IQH: u64 = 0x80;
    const WAIT: u64 = 5 | 1 << 5;
    const DATA: u32 = 0x5eed_0b0e;
    let status = STATUS_AREA;
    w32(status, 0);
    w64(IOMMU_REGS + IQT, 0);
    w64(IOMMU_REGS + IQA, QI_AREA);
    w32(IOMMU_REGS + GCMD, QIE);
    wait_status(QIE, true);
    w64(QI_AREA, WAIT | (DATA as u64) << 32);
    w64(QI_AREA + 8, status);
    w64(IOMMU_REGS + IQT, 1 << 4);
    let mut seen = 0;
    for _ in 0..50_000_000 {
        seen = r32(status);
        if seen == DATA {
            break;
        }
        kit::arch::pause();
    }
    let head = mmio_read(IOMMU_REGS + IQH, 8);
    if seen != DATA {
        kit::fail(
            NAME,
            format_args!("IOMMU: the wait descriptor's status reads {seen:#x}, head {head:#x}"),
        );
    }
    w32(IOMMU_REGS + GCMD, 0);
    wait_status(QIE, false);
    println!("kit: hostile: queued invalidation works after its attack (head {head:#x})");
}
