//! The IOMMU benchmark guest of `exitless bench iommu` (the thesis's Table 2.1, vIOMMU chapter):
//! its own small Intel VT-d driver maps each DMA buffer of a virtio-blk read stream before the
//! request and unmaps it after, with one of the thesis's teardown strategies, and times it.
//!
//! The driver (all of it at CPL3, native on hosts whose KVM emulates CPL0): root table, one
//! context entry (the virtio-blk device's requester ID, domain 1, 4-level second-level tables),
//! queued invalidation with wait descriptors (status write, polled), then translation on. The
//! virtqueue and the request headers/status bytes are mapped once, identity (IOVA = GPA, one
//! 2 MiB superpage), as Linux maps coherent rings for the device's life; each request's 4 KiB data
//! buffer gets an IOVA from a free list of 4 KiB slots at 4 GiB and one PTE, and is unmapped when
//! the request completes:
//! - `strict`: PTE cleared, a page-selective IOTLB invalidation and a wait, the IOVA freed;
//! - `deferred`: PTE cleared, the IOVA queued; the queue is flushed (one domain-selective
//!   invalidation and a wait, then the IOVAs freed) at 250 entries or when its oldest entry is
//!   10 ms old (Linux's flush queue then, the thesis's "relaxed");
//! - `opt256`, `opt4096` (optimistic teardown): the mapping is kept, and the buffer goes to the
//!   tail of an LRU list of unused mappings; mapping the same page again within 10 ms reuses it
//!   (no PTE write, no invalidation); the list's head is torn down (PTE cleared, page-selective
//!   invalidation, wait) when the list exceeds its quota (256 or 4096) or when it is older than
//!   10 ms (checked as the workload polls);
//! - `none`: no IOMMU (the guest finds no DMAR): addresses are guest-physical.
//!
//! Workload: `requests` reads of 4 KiB (sector `8 * (n mod blocks)`), `qd` in flight, made
//! available in batches of 8, completions polled (no interrupts). The buffers are `bufs` pages used
//! in FIFO order (a freed buffer goes to the back), like a NIC's receive ring: a buffer is mapped
//! again about `bufs` requests after its unmap. Every buffer read back is checked against the tag
//! the host wrote in each 4 KiB block (`TAG ^ block`), so a wrong translation fails the run.
//!
//! Protocol (COM1, parsed by exitless's `bench::iommu`):
//! ```text
//! kit: iommu start version=1 tsc_hz=<Hz> strategy=<s> requests=<n> qd=<n> bufs=<n> blocks=<n> dmar=<0|1> caching_mode=<0|1>
//! kit: iommu result strategy=<s> requests=<n> bytes=<n> cycles=<n> map_cycles=<n> unmap_cycles=<n> maps=<n> reuses=<n> teardowns=<n> inv_descs=<n> waits=<n> kicks=<n>
//! kit: PASS bench-iommu
//! ```
//! `maps` counts map calls (one per request), `reuses` those the optimistic cache served,
//! `teardowns` the PTEs cleared, `inv_descs` the IOTLB invalidation descriptors queued and `waits`
//! the wait descriptors (each one IQT write the IOMMU must process before the guest goes on).
//! Command line: `strategy=none|strict|deferred|opt256|opt4096`, `requests=N`, `qd=N`, `bufs=N`.
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering};

use kit::virtio::{self, r16, r32, w16, w32, w64, DESC_F_NEXT, DESC_F_WRITE};
use kit::{arch, println};

kit::entry!(main);

const NAME: &str = "bench-iommu";
/// Virtqueue memory (16 KiB), request headers (16 bytes per slot), status bytes (8 apart): all
/// inside the identity-mapped 2 MiB at `COHERENT`.
const COHERENT: u64 = 0x40_0000;
const QMEM: u64 = 0x40_0000;
const HDRS: u64 = 0x50_0000;
const STATUS: u64 = 0x50_1000;
/// VT-d tables: root table, context table, PML4, PDPT, two PDs, then the PTs of the IOVA slots.
const ROOT: u64 = 0x60_0000;
const CONTEXT: u64 = 0x60_1000;
const PML4: u64 = 0x60_2000;
const PDPT: u64 = 0x60_3000;
const PD_LOW: u64 = 0x60_4000;
const PD_SLOTS: u64 = 0x60_5000;
const PTS: u64 = 0x60_6000;
/// The invalidation queue (256 descriptors) and the wait descriptors' status word.
const IQ: u64 = 0x70_0000;
const IQ_LEN: u64 = 256;
const WAIT_STATUS: u64 = 0x70_1000;
/// Data buffers: `bufs` pages.
const DATA: u64 = 0x100_0000;
const MAX_BUFS: usize = 4096;
/// IOVA slots: 4 KiB each from 4 GiB (PDPT entry 4), 16 PTs of 512.
const IOVA_BASE: u64 = 1 << 32;
const IOVA_SLOTS: usize = 8192;
const REQ_BYTES: u64 = 4096;
const MAX_QD: usize = 128;
const QUEUE: u16 = 256;
/// Linux's flush queue size then, and the thesis's residency limit.
const DEFERRED_MAX: usize = 250;
const LIMIT_MS: u64 = 10;
const DOMAIN: u64 = 1;
const TAG: u64 = 0x696f_6d6d_7500_0000;
const F_EVENT_IDX: u64 = 1 << 29;
const F_ACCESS_PLATFORM: u64 = 1 << 33;
const T_IN: u32 = 0;
const STALL_SECONDS: u64 = 30;
const NONE: u16 = u16::MAX;

// VT-d registers (VT-d 3.4 §10.4) and bits.
const CAP: u64 = 0x08;
const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1c;
const RTADDR: u64 = 0x20;
const FSTS: u64 = 0x34;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const TE: u32 = 1 << 31;
const SRTP: u32 = 1 << 30;
const QIE: u32 = 1 << 26;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    None,
    Strict,
    Deferred,
    Optimistic(usize),
}

impl Strategy {
    fn parse(s: &str) -> Option<Strategy> {
        Some(match s {
            "none" => Strategy::None,
            "strict" => Strategy::Strict,
            "deferred" => Strategy::Deferred,
            "opt256" => Strategy::Optimistic(256),
            "opt4096" => Strategy::Optimistic(4096),
            _ => return None,
        })
    }
}

/// Everything the workload touches, shared by CPL0 (set-up, report) and CPL3 (the loop).
struct State {
    strategy: Strategy,
    regs: u64,
    /// GCMD's persistent bits (TE, QIE), written with every command.
    gcmd: u32,
    iq_tail: u64,
    wait_seq: u32,
    limit_cycles: u64,
    stall_cycles: u64,
    requests: u64,
    qd: usize,
    bufs: usize,
    blocks: u64,
    // The virtqueue.
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    qindex: u16,
    qsize: u16,
    event_idx: bool,
    // IOVA slots: a free stack.
    free_iova: [u16; IOVA_SLOTS],
    nfree_iova: usize,
    // Per buffer: its IOVA slot (NONE: unmapped), LRU links and unmap time (optimistic).
    iova: [u16; MAX_BUFS],
    prev: [u16; MAX_BUFS],
    next: [u16; MAX_BUFS],
    cached: [bool; MAX_BUFS],
    unmapped_at: [u64; MAX_BUFS],
    lru_head: u16,
    lru_tail: u16,
    lru_len: usize,
    // Deferred: IOVA slots waiting for a flush, and when the first came.
    pending: [u16; DEFERRED_MAX],
    npending: usize,
    pending_since: u64,
    // Results.
    cycles: u64,
    map_cycles: u64,
    unmap_cycles: u64,
    maps: u64,
    reuses: u64,
    teardowns: u64,
    inv_descs: u64,
    waits: u64,
    kicks: u64,
}

struct Cell(UnsafeCell<State>);
// SAFETY: one CPU, no interrupts; CPL0 and CPL3 code never run at once.
unsafe impl Sync for Cell {}
static STATE: Cell = Cell(UnsafeCell::new(State {
    strategy: Strategy::None,
    regs: 0,
    gcmd: 0,
    iq_tail: 0,
    wait_seq: 0,
    limit_cycles: 0,
    stall_cycles: 0,
    requests: 0,
    qd: 0,
    bufs: 0,
    blocks: 0,
    desc: 0,
    avail: 0,
    used: 0,
    notify: 0,
    qindex: 0,
    qsize: 0,
    event_idx: false,
    free_iova: [0; IOVA_SLOTS],
    nfree_iova: 0,
    iova: [NONE; MAX_BUFS],
    prev: [NONE; MAX_BUFS],
    next: [NONE; MAX_BUFS],
    cached: [false; MAX_BUFS],
    unmapped_at: [0; MAX_BUFS],
    lru_head: NONE,
    lru_tail: NONE,
    lru_len: 0,
    pending: [0; DEFERRED_MAX],
    npending: 0,
    pending_since: 0,
    cycles: 0,
    map_cycles: 0,
    unmap_cycles: 0,
    maps: 0,
    reuses: 0,
    teardowns: 0,
    inv_descs: 0,
    waits: 0,
    kicks: 0,
}));

fn state() -> &'static mut State {
    // SAFETY: single CPU, no interrupt handlers; each caller's reference ends before the next
    // `run_user` or `state()` call that could alias it.
    unsafe { &mut *STATE.0.get() }
}

fn r64(a: u64) -> u64 {
    // SAFETY: identity-mapped guest RAM or registers this guest owns.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

/// Error codes a CPL3 step returns (top byte; the low bits say which request or what value).
const E_STALL: u64 = 1;
const E_STATUS: u64 = 2;
const E_TAG: u64 = 3;
const E_ID: u64 = 4;
const E_WAIT: u64 = 5;
const E_GSTS: u64 = 6;
const E_IOVA: u64 = 7;

type Step = Result<(), u64>;

// ---- The VT-d driver ----

/// Waits until GSTS has `bits` (the synchronous register protocol).
fn wait_gsts(s: &State, bits: u32) -> Step {
    let t0 = arch::rdtsc();
    while r32(s.regs + GSTS) & bits != bits {
        if arch::rdtsc() - t0 > s.stall_cycles {
            return Err(E_GSTS << 56 | bits as u64);
        }
        arch::pause();
    }
    Ok(())
}

fn command(s: &mut State, bit: u32) -> Step {
    w32(s.regs + GCMD, s.gcmd | bit);
    wait_gsts(s, s.gcmd | bit)
}

/// Queues one descriptor (the queue is empty between submissions: each ends with a wait).
fn queue_desc(s: &mut State, lo: u64, hi: u64) {
    let d = IQ + 16 * s.iq_tail;
    w64(d, lo);
    w64(d + 8, hi);
    s.iq_tail = (s.iq_tail + 1) % IQ_LEN;
}

/// An IOTLB invalidation: page-selective (granularity 3) for `iova`, or domain-selective (2).
fn queue_iotlb(s: &mut State, iova: Option<u64>) {
    let gran = if iova.is_some() { 3 } else { 2 };
    // Type 2, granularity 5:4, drain reads and writes (7:6), domain 31:16.
    queue_desc(s, 2 | gran << 4 | 3 << 6 | DOMAIN << 16, iova.unwrap_or(0));
    s.inv_descs += 1;
}

/// Ends a submission with a wait descriptor (status write), moves the tail and polls the status.
fn submit_and_wait(s: &mut State) -> Step {
    s.wait_seq = s.wait_seq.wrapping_add(1);
    let seq = s.wait_seq;
    // Type 5, SW (5), FN (6), status data 63:32; the status address in the high qword.
    queue_desc(s, 5 | 1 << 5 | 1 << 6 | (seq as u64) << 32, WAIT_STATUS);
    s.waits += 1;
    fence(Ordering::SeqCst);
    w32(s.regs + IQT, (s.iq_tail << 4) as u32);
    let t0 = arch::rdtsc();
    while r32(WAIT_STATUS) != seq {
        if arch::rdtsc() - t0 > s.stall_cycles {
            return Err(E_WAIT << 56 | r32(s.regs + FSTS) as u64);
        }
        arch::pause();
    }
    Ok(())
}

fn pte(iova_slot: u16) -> u64 {
    PTS + 8 * iova_slot as u64
}

/// At CPL3: the tables, queued invalidation, the global invalidations, translation on.
extern "C" fn vtd_enable(sid: u64) -> u64 {
    let s = state();
    match enable(s, sid) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

fn enable(s: &mut State, sid: u64) -> Step {
    for t in [ROOT, CONTEXT, PML4, PDPT, PD_LOW, PD_SLOTS] {
        virtio::zero(t, 0x1000);
    }
    virtio::zero(PTS, 8 * IOVA_SLOTS as u64);
    virtio::zero(IQ, 16 * IQ_LEN);
    w64(ROOT, CONTEXT | 1);
    // Context entry of bus 0's devfn: present, translation type 0, the PML4; AW 2 (4-level), DID.
    let ce = CONTEXT + 16 * (sid & 0xff);
    w64(ce, PML4 | 1);
    w64(ce + 8, 2 | DOMAIN << 8);
    w64(PML4, PDPT | 3);
    w64(PDPT, PD_LOW | 3);
    w64(PDPT + 8 * (IOVA_BASE >> 30), PD_SLOTS | 3);
    // The coherent region: one 2 MiB superpage, identity.
    w64(PD_LOW + 8 * (COHERENT >> 21), COHERENT | 1 << 7 | 3);
    for i in 0..(IOVA_SLOTS as u64 / 512) {
        w64(PD_SLOTS + 8 * i, (PTS + 0x1000 * i) | 3);
    }
    for i in 0..IOVA_SLOTS {
        s.free_iova[i] = (IOVA_SLOTS - 1 - i) as u16;
    }
    s.nfree_iova = IOVA_SLOTS;
    // Queued invalidation: 256 descriptors of 128 bits (QS 0), tail 0.
    w64(s.regs + IQA, IQ);
    w32(s.regs + IQT, 0);
    command(s, QIE)?;
    s.gcmd |= QIE;
    w64(s.regs + RTADDR, ROOT);
    command(s, SRTP)?;
    // Global context-cache (type 1, granularity 1) and IOTLB invalidations.
    queue_desc(s, 1 | 1 << 4, 0);
    queue_desc(s, 2 | 1 << 4 | 3 << 6, 0);
    submit_and_wait(s)?;
    command(s, TE)?;
    s.gcmd |= TE;
    // The counters are the workload's.
    s.waits = 0;
    Ok(())
}

fn iova_of(slot: u16) -> u64 {
    IOVA_BASE + REQ_BYTES * slot as u64
}

/// Maps buffer `b`; returns its IOVA.
fn map(s: &mut State, b: usize) -> Result<u64, u64> {
    let gpa = DATA + REQ_BYTES * b as u64;
    s.maps += 1;
    if s.strategy == Strategy::None {
        return Ok(gpa);
    }
    if s.cached[b] {
        lru_remove(s, b);
        s.reuses += 1;
        return Ok(iova_of(s.iova[b]));
    }
    if s.nfree_iova == 0 {
        return Err(E_IOVA << 56);
    }
    s.nfree_iova -= 1;
    let slot = s.free_iova[s.nfree_iova];
    // Read and write (the device writes read data into it); the IOMMU walks coherently.
    w64(pte(slot), gpa | 3);
    s.iova[b] = slot;
    Ok(iova_of(slot))
}

/// Unmaps buffer `b` as the strategy says.
fn unmap(s: &mut State, b: usize, now: u64) -> Step {
    match s.strategy {
        Strategy::None => Ok(()),
        Strategy::Strict => {
            let slot = clear(s, b);
            queue_iotlb(s, Some(iova_of(slot)));
            submit_and_wait(s)?;
            free_slot(s, slot);
            Ok(())
        }
        Strategy::Deferred => {
            let slot = clear(s, b);
            if s.npending == 0 {
                s.pending_since = now;
            }
            s.pending[s.npending] = slot;
            s.npending += 1;
            if s.npending == DEFERRED_MAX {
                flush_deferred(s)?;
            }
            Ok(())
        }
        Strategy::Optimistic(quota) => {
            s.unmapped_at[b] = now;
            lru_push(s, b);
            if s.lru_len > quota {
                let head = s.lru_head as usize;
                teardown(s, &[head])?;
            }
            Ok(())
        }
    }
}

/// Clears buffer `b`'s PTE; returns its IOVA slot.
fn clear(s: &mut State, b: usize) -> u16 {
    let slot = s.iova[b];
    w64(pte(slot), 0);
    s.iova[b] = NONE;
    s.teardowns += 1;
    slot
}

fn free_slot(s: &mut State, slot: u16) {
    s.free_iova[s.nfree_iova] = slot;
    s.nfree_iova += 1;
}

fn flush_deferred(s: &mut State) -> Step {
    if s.npending == 0 {
        return Ok(());
    }
    queue_iotlb(s, None);
    submit_and_wait(s)?;
    for i in 0..s.npending {
        let slot = s.pending[i];
        free_slot(s, slot);
    }
    s.npending = 0;
    Ok(())
}

/// Tears down cached (unused) mappings: PTEs cleared, one page-selective invalidation each, one
/// wait for them all.
fn teardown(s: &mut State, bufs: &[usize]) -> Step {
    let mut slots = [0u16; 64];
    for (i, &b) in bufs.iter().enumerate() {
        lru_remove(s, b);
        slots[i] = clear(s, b);
        queue_iotlb(s, Some(iova_of(slots[i])));
    }
    submit_and_wait(s)?;
    for &slot in &slots[..bufs.len()] {
        free_slot(s, slot);
    }
    Ok(())
}

/// True when `expire` has work: the idle poll times only that (its own cost is not teardown).
fn expire_due(s: &State, now: u64) -> bool {
    match s.strategy {
        Strategy::Deferred => s.npending > 0 && now - s.pending_since > s.limit_cycles,
        Strategy::Optimistic(_) => {
            s.lru_head != NONE && now - s.unmapped_at[s.lru_head as usize] > s.limit_cycles
        }
        _ => false,
    }
}

/// The periodic check: deferred IOVAs older than the limit are flushed, cached mappings older
/// than the limit torn down (at most 64 per submission).
fn expire(s: &mut State, now: u64) -> Step {
    match s.strategy {
        Strategy::Deferred if s.npending > 0 && now - s.pending_since > s.limit_cycles => {
            flush_deferred(s)
        }
        Strategy::Optimistic(_) => {
            let mut old = [0usize; 64];
            let mut n = 0;
            let mut b = s.lru_head;
            while b != NONE && n < old.len() && now - s.unmapped_at[b as usize] > s.limit_cycles {
                old[n] = b as usize;
                n += 1;
                b = s.next[b as usize];
            }
            if n > 0 {
                teardown(s, &old[..n])?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn lru_push(s: &mut State, b: usize) {
    s.cached[b] = true;
    s.prev[b] = s.lru_tail;
    s.next[b] = NONE;
    if s.lru_tail != NONE {
        s.next[s.lru_tail as usize] = b as u16;
    } else {
        s.lru_head = b as u16;
    }
    s.lru_tail = b as u16;
    s.lru_len += 1;
}

fn lru_remove(s: &mut State, b: usize) {
    let (p, n) = (s.prev[b], s.next[b]);
    if p != NONE {
        s.next[p as usize] = n;
    } else {
        s.lru_head = n;
    }
    if n != NONE {
        s.prev[n as usize] = p;
    } else {
        s.lru_tail = p;
    }
    s.cached[b] = false;
    s.lru_len -= 1;
}

// ---- The workload ----

fn write_desc(s: &State, i: u64, addr: u64, len: u32, flags: u16, next: u64) {
    let d = s.desc + 16 * i;
    w64(d, addr);
    w32(d + 8, len);
    w16(d + 12, flags);
    w16(d + 14, next as u16);
}

fn need_kick(s: &State, old: u16, new: u16) -> bool {
    if s.event_idx {
        let event = r16(s.used + 4 + 8 * s.qsize as u64);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        r16(s.used) & 1 == 0
    }
}

/// At CPL3: the whole read stream; 0 or an error code.
extern "C" fn workload(_: u64) -> u64 {
    match stream(state()) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

fn stream(s: &mut State) -> Step {
    let (total, qd, nbufs) = (s.requests, s.qd, s.bufs);
    // Free request slots (a stack) and free buffers (FIFO).
    let mut free_slots = [0usize; MAX_QD];
    for (i, f) in free_slots.iter_mut().enumerate().take(qd) {
        *f = i;
    }
    let mut nslots = qd;
    let mut buf_fifo = [0u16; MAX_BUFS];
    for (i, f) in buf_fifo.iter_mut().enumerate().take(nbufs) {
        *f = i as u16;
    }
    let (mut fifo_head, mut fifo_len) = (0usize, nbufs);
    let mut slot_req = [0u64; MAX_QD];
    let mut slot_buf = [0usize; MAX_QD];
    let (mut next, mut done, mut avail_idx, mut last_used) = (0u64, 0u64, 0u16, 0u16);
    let size = s.qsize as u64;
    let t0 = arch::rdtsc();
    let mut progress = t0;
    while done < total {
        let want = 8u64.min(total - next);
        if next < total && nslots as u64 >= want && fifo_len as u64 >= want {
            let old = avail_idx;
            while next < total && nslots > 0 && fifo_len > 0 {
                nslots -= 1;
                let slot = free_slots[nslots];
                let b = buf_fifo[fifo_head] as usize;
                fifo_head = (fifo_head + 1) % nbufs;
                fifo_len -= 1;
                let tm = arch::rdtsc();
                let iova = map(s, b)?;
                s.map_cycles += arch::rdtsc() - tm;
                slot_req[slot] = next;
                slot_buf[slot] = b;
                let block = next % s.blocks;
                let (hdr, st, d) = (
                    HDRS + 16 * slot as u64,
                    STATUS + 8 * slot as u64,
                    3 * slot as u64,
                );
                w32(hdr, T_IN);
                w32(hdr + 4, 0);
                w64(hdr + 8, block * (REQ_BYTES / 512));
                w64(st, 0xff);
                write_desc(s, d, hdr, 16, DESC_F_NEXT, d + 1);
                write_desc(
                    s,
                    d + 1,
                    iova,
                    REQ_BYTES as u32,
                    DESC_F_NEXT | DESC_F_WRITE,
                    d + 2,
                );
                write_desc(s, d + 2, st, 1, DESC_F_WRITE, 0);
                w16(s.avail + 4 + 2 * (avail_idx as u64 % size), d as u16);
                avail_idx = avail_idx.wrapping_add(1);
                next += 1;
            }
            fence(Ordering::SeqCst);
            w16(s.avail + 2, avail_idx);
            fence(Ordering::SeqCst);
            if need_kick(s, old, avail_idx) {
                w16(s.notify, s.qindex);
                s.kicks += 1;
            }
        }
        let used_idx = r16(s.used + 2);
        let now = arch::rdtsc();
        if used_idx == last_used {
            if now - progress > s.stall_cycles {
                return Err(E_STALL << 56 | done);
            }
            if expire_due(s, now) {
                let te = arch::rdtsc();
                expire(s, now)?;
                s.unmap_cycles += arch::rdtsc() - te;
            }
            arch::pause();
            continue;
        }
        fence(Ordering::SeqCst);
        progress = now;
        while last_used != used_idx {
            let e = s.used + 4 + 8 * (last_used as u64 % size);
            let id = r32(e) as usize;
            last_used = last_used.wrapping_add(1);
            if !id.is_multiple_of(3) || id / 3 >= qd {
                return Err(E_ID << 56 | id as u64);
            }
            let slot = id / 3;
            let (n, b) = (slot_req[slot], slot_buf[slot]);
            if r64(STATUS + 8 * slot as u64) as u8 != 0 {
                return Err(E_STATUS << 56 | n);
            }
            if r64(DATA + REQ_BYTES * b as u64) != TAG ^ (n % s.blocks) {
                return Err(E_TAG << 56 | n);
            }
            let tu = arch::rdtsc();
            unmap(s, b, tu)?;
            s.unmap_cycles += arch::rdtsc() - tu;
            buf_fifo[(fifo_head + fifo_len) % nbufs] = b as u16;
            fifo_len += 1;
            free_slots[nslots] = slot;
            nslots += 1;
            done += 1;
        }
        if s.event_idx {
            w16(s.avail + 4 + 2 * size, last_used.wrapping_add(0x8000));
        }
    }
    s.cycles = arch::rdtsc() - t0;
    Ok(())
}

fn fail_with(what: &str, r: u64) -> ! {
    let why = match r >> 56 {
        E_STALL => "no completion for 30 s after request count",
        E_STATUS => "non-zero status of request",
        E_TAG => "data read back differs (wrong translation?) for request",
        E_ID => "used ring names an unknown descriptor",
        E_WAIT => "invalidation wait never completed; FSTS",
        E_GSTS => "GSTS never showed command bits",
        E_IOVA => "out of IOVA slots",
        _ => "unknown error",
    };
    kit::fail(
        NAME,
        format_args!("{what}: {why} {:#x}", r & ((1 << 56) - 1)),
    );
}

fn arg(boot: &kit::BootInfo, key: &str, default: u64) -> u64 {
    boot.cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .find_map(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The register base of the DMAR's first DRHD (type 0 at offset 48, its base at +8).
fn dmar_base(rsdp_hint: u64) -> Option<u64> {
    let t = kit::acpi::find_table(kit::acpi::rsdp(rsdp_hint)?, b"DMAR")?;
    // SAFETY: the DMAR lies in identity-mapped low memory.
    let (ty, base) = unsafe {
        (
            core::ptr::read_unaligned((t + 48) as *const u16),
            core::ptr::read_unaligned((t + 56) as *const u64),
        )
    };
    (ty == 0 && base != 0).then_some(base)
}

/// Writes the tag-checked workload's parameters into the state; fails on nonsense.
fn configure(boot: &kit::BootInfo) -> &'static str {
    let s = state();
    let strategy_word = boot
        .cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("strategy="))
        .unwrap_or("strict");
    let Some(strategy) = Strategy::parse(strategy_word) else {
        kit::fail(NAME, format_args!("unknown strategy {strategy_word:?}"));
    };
    s.strategy = strategy;
    s.requests = arg(boot, "requests", 65536);
    s.qd = arg(boot, "qd", 32).clamp(1, MAX_QD as u64) as usize;
    s.bufs = (arg(boot, "bufs", 512) as usize).clamp(s.qd, MAX_BUFS);
    strategy_word
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let word = configure(boot);
    let hz = kit::lapic::tsc_hz();
    let s = state();
    s.stall_cycles = STALL_SECONDS * hz;
    s.limit_cycles = LIMIT_MS * hz / 1000;
    let dmar = dmar_base(boot.rsdp_hint);
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 2) else {
        kit::fail(NAME, format_args!("no virtio-blk device on PCI"));
    };
    let mut caching_mode = 0;
    if s.strategy != Strategy::None {
        let Some(regs) = dmar else {
            kit::fail(
                NAME,
                format_args!("strategy {word} needs an IOMMU; no DMAR"),
            );
        };
        s.regs = regs;
        caching_mode = (r64(regs + CAP) >> 7) & 1;
        let r = kit::run_user(vtd_enable, (dev.func.dev as u64) << 3, false);
        if r != 0 {
            fail_with("enabling the IOMMU", r);
        }
    }
    let platform = if s.strategy == Strategy::None {
        0
    } else {
        F_ACCESS_PLATFORM
    };
    let Some(features) = dev.negotiate(F_EVENT_IDX | platform) else {
        kit::fail(NAME, format_args!("virtio-blk refused the features"));
    };
    if features & platform != platform {
        kit::fail(
            NAME,
            format_args!("virtio-blk does not offer ACCESS_PLATFORM"),
        );
    }
    w16(dev.common + 0x16, 0);
    let size = r16(dev.common + 0x18).min(QUEUE);
    if (size as usize) < 3 * s.qd {
        kit::fail(
            NAME,
            format_args!("queue of {size} too small for qd {}", s.qd),
        );
    }
    virtio::zero(QMEM, 0x4000);
    let q = dev.setup_queue(0, size, QMEM);
    s.event_idx = features & F_EVENT_IDX != 0;
    if !s.event_idx {
        w16(q.avail, 1);
    }
    dev.driver_ok();
    let capacity = r32(dev.config) as u64 | (r32(dev.config + 4) as u64) << 32;
    s.blocks = capacity / (REQ_BYTES / 512);
    if s.blocks == 0 {
        kit::fail(NAME, format_args!("the disk is smaller than a block"));
    }
    (s.desc, s.avail, s.used, s.notify, s.qindex, s.qsize) =
        (q.desc, q.avail, q.used, q.notify, q.index, q.size);
    println!(
        "kit: iommu start version=1 tsc_hz={} strategy={} requests={} qd={} bufs={} blocks={} \
         dmar={} caching_mode={}",
        hz,
        word,
        s.requests,
        s.qd,
        s.bufs,
        s.blocks,
        dmar.is_some() as u8,
        caching_mode
    );
    let r = kit::run_user(workload, 0, false);
    if r != 0 {
        fail_with("read stream", r);
    }
    let s = state();
    println!(
        "kit: iommu result strategy={} requests={} bytes={} cycles={} map_cycles={} \
         unmap_cycles={} maps={} reuses={} teardowns={} inv_descs={} waits={} kicks={}",
        word,
        s.requests,
        s.requests * REQ_BYTES,
        s.cycles,
        s.map_cycles,
        s.unmap_cycles,
        s.maps,
        s.reuses,
        s.teardowns,
        s.inv_descs,
        s.waits,
        s.kicks
    );
    kit::pass(NAME);
    kit::poweroff()
}
