//! The I/O benchmark guest of `exitless bench io`: drives virtio devices through the kit's own
//! driver with a fixed workload, times it with the TSC and prints one result line per workload.
//! The same ELF runs under exitless and under QEMU (`-kernel`, virtio-pci devices).
//!
//! Workloads (in this order):
//! - `blk-write`: sequential writes of `REQ_BYTES` over `mib` MiB from sector 0, `qd` requests in
//!   flight; then one flush (untimed, reported as a note);
//! - `blk-read`: the same range read back, each buffer's tag checked against what was written;
//! - `net-tx` (with `frames=N`, N > 0, and a virtio-net device): `N` Ethernet frames of `FRAME`
//!   bytes on the transmit queue, `net_qd` in flight, refilled `net_batch` at a time (the host
//!   sinks them: see `build_frames`); the receive queue is left unused.
//!
//! A missing virtio-blk device fails the guest unless frames were asked for or the command line
//! says `net` (a network-only run); a missing virtio-net device makes `net-tx` `unsupported=no-virtio-net-device`.
//!
//! The request loop runs at CPL3 (native on hosts whose KVM emulates CPL0) and never takes an
//! interrupt: completions are found by polling the used ring, and interrupts are suppressed
//! (`used_event` kept far ahead with `VIRTIO_RING_F_EVENT_IDX`, else `VRING_AVAIL_F_NO_INTERRUPT`).
//! Requests are made available in batches (the free slots are refilled once at least `batch` of
//! them are free) and the device is notified only when it asked to be (`avail_event` with
//! EVENT_IDX, else `VRING_USED_F_NO_NOTIFY`): a device that is still working through the ring
//! gets no notification at all.
//!
//! Protocol (COM1, parsed by exitless's `bench::io` module; a line may start mid-line under QEMU
//! after the firmware's output, so the parser looks for `kit: io ` anywhere in a line):
//! ```text
//! kit: io start version=1 tsc_hz=<Hz> mode=<full|quick> mib=<n> qd=<n> batch=<n> req_bytes=<n> frames=<n> net_qd=<n> net_batch=<n>
//! kit: io device=blk queue=<size> event_idx=<0|1> capacity=<sectors>
//! kit: io device=net queue=<size> event_idx=<0|1> frame_bytes=<n>
//! kit: io workload=<name> requests=<n> bytes=<n> cycles=<TSC cycles> kicks=<n> kicks_suppressed=<n> reaps=<n> empty_polls=<n> irqs=0
//! kit: io note flush cycles=<n>
//! kit: io workload=<name> unsupported=<why, no spaces>
//! kit: io done workloads=<number of workload lines>
//! ```
//! `kicks` are notifications written to the device's notify register, `kicks_suppressed` the
//! batches made available without one, `reaps` the polls that found completions and
//! `empty_polls` those that did not. Command line: `quick` (32 MiB instead of 256), `mib=N`
//! (0 runs the set-up and the flush only: the baseline whose exits are subtracted), `qd=N`,
//! `batch=N`, `frames=N` (0, the default: the net device is set up but idle), `net_qd=N`,
//! `net_batch=N`, `hold` (after `kit: PASS bench-io`, print `kit: io hold` and halt with interrupts
//! off instead of powering off, so the host can read the VMM's exit statistics of the finished
//! run and then end the VM).
#![no_std]
#![no_main]

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering};

use kit::virtio::{self, r16, r32, w16, w32, w64, DESC_F_NEXT, DESC_F_WRITE};
use kit::{arch, println};

kit::entry!(main);

const NAME: &str = "bench-io";
/// Virtqueue memory (16 KiB: descriptors, avail ring at +0x1000, used ring at +0x2000).
const QMEM: u64 = 0x40_0000;
/// Request headers, 16 bytes per slot.
const HDRS: u64 = 0x50_0000;
/// Status bytes, 8 bytes apart per slot.
const STATUS: u64 = 0x50_1000;
/// Data buffers, `REQ_BYTES` per slot.
const DATA: u64 = 0x80_0000;
const REQ_BYTES: u64 = 64 << 10;
const MAX_QD: u64 = 128;
/// virtio-net: transmit queue memory, frame buffers (`NET_BUF` bytes per slot), frame length.
const NET_QMEM: u64 = 0x40_4000;
const NET_BUFS: u64 = 0xc0_0000;
const NET_BUF: u64 = 2048;
const NET_HDR: u64 = 12;
const FRAME: u64 = 1514;
const MAX_QUEUE: u16 = 256;
const F_FLUSH: u64 = 1 << 9;
const F_EVENT_IDX: u64 = 1 << 29;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Not a virtio-blk type: a workload of frames on the virtio-net transmit queue.
const T_NET_TX: u32 = 0x100;
/// The tag in each data buffer's first qword, xor the request number.
const TAG: u64 = 0x6b69_742d_696f_0000;
/// A workload that makes no progress for this long fails.
const STALL_SECONDS: u64 = 30;

/// Failure codes a CPL3 workload returns (in the top byte; the low bits say which request).
const E_STALL: u64 = 1;
const E_STATUS: u64 = 2;
const E_LEN: u64 = 3;
const E_TAG: u64 = 4;
const E_ID: u64 = 5;

/// A virtqueue as the request loop drives it.
#[derive(Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    index: u16,
    size: u16,
    event_idx: bool,
    avail_idx: u16,
    last_used: u16,
    /// Requests in flight and how many free slots make a batch.
    qd: u64,
    batch: u64,
    /// Descriptors per request (the head of slot `s` is `stride * s`).
    stride: u64,
}

const NO_RING: Ring = Ring {
    desc: 0,
    avail: 0,
    used: 0,
    notify: 0,
    index: 0,
    size: 0,
    event_idx: false,
    avail_idx: 0,
    last_used: 0,
    qd: 0,
    batch: 0,
    stride: 1,
};

impl Ring {
    fn new(q: &virtio::Queue, event_idx: bool, qd: u64, batch: u64, stride: u64) -> Ring {
        Ring {
            desc: q.desc,
            avail: q.avail,
            used: q.used,
            notify: q.notify,
            index: q.index,
            size: q.size,
            event_idx,
            avail_idx: 0,
            last_used: 0,
            qd,
            batch,
            stride,
        }
    }
}

/// The benchmark's state, shared by CPL0 (set-up, reporting) and CPL3 (the request loop).
struct State {
    /// virtio-blk's request queue and virtio-net's transmit queue.
    blk: Ring,
    net: Ring,
    stall_cycles: u64,
    /// Request number each slot carries.
    slot_req: [u64; MAX_QD as usize],
    // Results of the last workload.
    requests: u64,
    cycles: u64,
    kicks: u64,
    suppressed: u64,
    reaps: u64,
    empty_polls: u64,
}

struct Cell(UnsafeCell<State>);
// SAFETY: the guest runs on one CPU and takes no interrupts; CPL0 and CPL3 code never run at once.
unsafe impl Sync for Cell {}
static STATE: Cell = Cell(UnsafeCell::new(State {
    blk: NO_RING,
    net: NO_RING,
    stall_cycles: 0,
    slot_req: [0; MAX_QD as usize],
    requests: 0,
    cycles: 0,
    kicks: 0,
    suppressed: 0,
    reaps: 0,
    empty_polls: 0,
}));

fn state() -> &'static mut State {
    // SAFETY: single CPU, no interrupt handlers touch it; each caller's reference ends before
    // the next `run_user` or `state()` call that could alias it.
    unsafe { &mut *STATE.0.get() }
}

fn r64(a: u64) -> u64 {
    // SAFETY: identity-mapped guest RAM owned by this benchmark.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

fn write_desc(q: &Ring, i: u64, addr: u64, len: u32, flags: u16, next: u64) {
    let d = q.desc + 16 * i;
    w64(d, addr);
    w32(d + 8, len);
    w16(d + 12, flags);
    w16(d + 14, next as u16);
}

/// Fills slot `slot` with request `n` of type `ty` (virtio-blk: three descriptors from
/// `3 * slot`, two for a flush; virtio-net: one, header and frame); returns the chain's head.
fn prepare(q: &Ring, slot_req: &mut [u64], slot: u64, n: u64, ty: u32) -> u16 {
    slot_req[slot as usize] = n;
    if ty == T_NET_TX {
        let buf = NET_BUFS + NET_BUF * slot;
        // The frame's sequence number, after the MAC addresses and the EtherType.
        w64(buf + NET_HDR + 14, TAG ^ n);
        write_desc(q, slot, buf, (NET_HDR + FRAME) as u32, 0, 0);
        return slot as u16;
    }
    let hdr = HDRS + 16 * slot;
    let st = STATUS + 8 * slot;
    let data = DATA + REQ_BYTES * slot;
    w32(hdr, ty);
    w32(hdr + 4, 0);
    w64(hdr + 8, n * (REQ_BYTES / 512));
    w64(st, 0xff);
    let d = 3 * slot;
    if ty == T_FLUSH {
        write_desc(q, d, hdr, 16, DESC_F_NEXT, d + 2);
    } else {
        write_desc(q, d, hdr, 16, DESC_F_NEXT, d + 1);
        let flags = if ty == T_IN {
            w64(data, 0);
            DESC_F_NEXT | DESC_F_WRITE
        } else {
            w64(data, TAG ^ n);
            DESC_F_NEXT
        };
        write_desc(q, d + 1, data, REQ_BYTES as u32, flags, d + 2);
    }
    write_desc(q, d + 2, st, 1, DESC_F_WRITE, 0);
    d as u16
}

/// True if the device asked to be notified of the avail index moving from `old` to `new`.
fn need_kick(q: &Ring, old: u16, new: u16) -> bool {
    if q.event_idx {
        let event = r16(q.used + 4 + 8 * q.size as u64);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    } else {
        r16(q.used) & 1 == 0
    }
}

/// At CPL3: writes the constant part of every transmit buffer: a zero `virtio_net_hdr_v1` and
/// an Ethernet frame from 02:00:00:02:00:00 to 02:00:00:01:00:00 (locally administered, no host
/// interface has it: the host's stack drops the frame on arrival, the tap is the sink), EtherType
/// 0x88b5 (local experimental), zero payload.
extern "C" fn build_frames(qd: u64) -> u64 {
    const HEAD: [u8; 14] = [2, 0, 0, 1, 0, 0, 2, 0, 0, 2, 0, 0, 0x88, 0xb5];
    for slot in 0..qd {
        let buf = NET_BUFS + NET_BUF * slot;
        virtio::zero(buf, NET_BUF);
        for (i, b) in HEAD.iter().enumerate() {
            // SAFETY: the slot's buffer, identity-mapped RAM this guest owns.
            unsafe { core::ptr::write_volatile((buf + NET_HDR + i as u64) as *mut u8, *b) };
        }
    }
    qd
}

/// At CPL3: runs `total` requests of type `ty` (low 32 bits of `arg`: type, high: count).
/// Returns 0, or an error code << 56 | the request number.
extern "C" fn workload(arg: u64) -> u64 {
    let ty = arg as u32;
    let total = arg >> 32;
    let s = state();
    let stall = s.stall_cycles;
    let q = if ty == T_NET_TX {
        &mut s.net
    } else {
        &mut s.blk
    };
    let slot_req = &mut s.slot_req;
    let (size, qd, stride) = (q.size as u64, q.qd, q.stride);
    let mut free = [0u64; MAX_QD as usize];
    let mut nfree = qd as usize;
    for (i, f) in free.iter_mut().enumerate().take(nfree) {
        *f = i as u64;
    }
    let (mut next, mut done) = (0u64, 0u64);
    let (mut kicks, mut suppressed, mut reaps, mut empty) = (0u64, 0u64, 0u64, 0u64);
    let t0 = arch::rdtsc();
    let mut progress = t0;
    while done < total {
        let want = q.batch.min(total - next);
        if next < total && nfree as u64 >= want {
            let old = q.avail_idx;
            while next < total && nfree > 0 {
                nfree -= 1;
                let head = prepare(q, slot_req, free[nfree], next, ty);
                w16(q.avail + 4 + 2 * (q.avail_idx as u64 % size), head);
                q.avail_idx = q.avail_idx.wrapping_add(1);
                next += 1;
            }
            fence(Ordering::SeqCst);
            w16(q.avail + 2, q.avail_idx);
            fence(Ordering::SeqCst);
            if need_kick(q, old, q.avail_idx) {
                w16(q.notify, q.index);
                kicks += 1;
            } else {
                suppressed += 1;
            }
        }
        let used_idx = r16(q.used + 2);
        if used_idx == q.last_used {
            empty += 1;
            if empty % 1024 == 0 && arch::rdtsc() - progress > stall {
                return E_STALL << 56 | done;
            }
            arch::pause();
            continue;
        }
        fence(Ordering::SeqCst);
        reaps += 1;
        progress = arch::rdtsc();
        while q.last_used != used_idx {
            let e = q.used + 4 + 8 * (q.last_used as u64 % size);
            let (id, len) = (r32(e) as u64, r32(e + 4) as u64);
            q.last_used = q.last_used.wrapping_add(1);
            if id % stride != 0 || id / stride >= qd {
                return E_ID << 56 | id;
            }
            let slot = id / stride;
            let n = slot_req[slot as usize];
            if ty != T_NET_TX && r64(STATUS + 8 * slot) as u8 != 0 {
                return E_STATUS << 56 | n;
            }
            let want_len = if ty == T_IN { REQ_BYTES + 1 } else { 1 };
            if len != want_len && ty != T_FLUSH && ty != T_NET_TX {
                return E_LEN << 56 | n;
            }
            if ty == T_IN && r64(DATA + REQ_BYTES * slot) != TAG ^ n {
                return E_TAG << 56 | n;
            }
            free[nfree] = slot;
            nfree += 1;
            done += 1;
        }
        if q.event_idx {
            // used_event far ahead: no interrupt for the completions to come.
            w16(q.avail + 4 + 2 * size, q.last_used.wrapping_add(0x8000));
        }
    }
    s.cycles = arch::rdtsc() - t0;
    s.requests = total;
    s.kicks = kicks;
    s.suppressed = suppressed;
    s.reaps = reaps;
    s.empty_polls = empty;
    0
}

/// Runs a workload at CPL3; fails the guest with a reason if it failed.
fn run(name: &str, ty: u32, total: u64) {
    let r = kit::run_user(workload, ty as u64 | total << 32, false);
    if r != 0 {
        let what = match r >> 56 {
            E_STALL => "no completion for 30 s after request count",
            E_STATUS => "non-zero status of request",
            E_LEN => "wrong used length of request",
            E_TAG => "data read back differs for request",
            E_ID => "used ring names an unknown descriptor",
            _ => "unknown error",
        };
        kit::fail(NAME, format_args!("{name}: {what} {}", r & ((1 << 56) - 1)));
    }
}

fn arg(boot: &kit::BootInfo, key: &str, default: u64) -> u64 {
    boot.cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .find_map(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints a workload's result line (from the state the last `run` left).
fn report(name: &str, bytes_per_request: u64) {
    let s = state();
    println!(
        "kit: io workload={} requests={} bytes={} cycles={} kicks={} kicks_suppressed={} \
         reaps={} empty_polls={} irqs=0",
        name,
        s.requests,
        s.requests * bytes_per_request,
        s.cycles,
        s.kicks,
        s.suppressed,
        s.reaps,
        s.empty_polls
    );
}

/// A queue size for `qd` requests of `stride` descriptors: the device's maximum, at most
/// `MAX_QUEUE`; fails the guest if that is too small.
fn queue_size(dev: &virtio::Device, index: u16, qd: u64, stride: u64) -> u16 {
    w16(dev.common + 0x16, index);
    let max = r16(dev.common + 0x18);
    let size = max.min(MAX_QUEUE);
    if !size.is_power_of_two() || (size as u64) < stride * qd {
        kit::fail(
            NAME,
            format_args!("queue {index} of {max} entries is too small for {qd} requests"),
        );
    }
    size
}

/// virtio-blk: set-up, then `blk-write`, a flush and `blk-read` over `mib` MiB. Returns the
/// number of workload lines printed.
fn block(access: kit::pci::Access, mib: u64, qd: u64, batch: u64, net_only: bool) -> u32 {
    let Some(dev) = virtio::find(access, 2) else {
        if !net_only {
            kit::fail(NAME, format_args!("no virtio-blk device on PCI"));
        }
        println!("kit: io workload=blk-write unsupported=no-virtio-blk-device");
        println!("kit: io workload=blk-read unsupported=no-virtio-blk-device");
        return 2;
    };
    let Some(features) = dev.negotiate(F_FLUSH | F_EVENT_IDX) else {
        kit::fail(NAME, format_args!("virtio-blk refused the features"));
    };
    let size = queue_size(&dev, 0, qd, 3);
    virtio::zero(QMEM, 0x4000);
    let q = dev.setup_queue(0, size, QMEM);
    let event_idx = features & F_EVENT_IDX != 0;
    if !event_idx {
        // VRING_AVAIL_F_NO_INTERRUPT: completions are polled.
        w16(q.avail, 1);
    }
    dev.driver_ok();
    let capacity = r32(dev.config) as u64 | (r32(dev.config + 4) as u64) << 32;
    let total = mib * (1 << 20) / REQ_BYTES;
    if capacity * 512 < total * REQ_BYTES {
        kit::fail(
            NAME,
            format_args!("the disk has {capacity} sectors; {mib} MiB needed"),
        );
    }
    println!(
        "kit: io device=blk queue={} event_idx={} capacity={}",
        q.size, event_idx as u8, capacity
    );
    state().blk = Ring::new(&q, event_idx, qd, batch, 3);
    let mut lines = 0;
    if total > 0 {
        run("blk-write", T_OUT, total);
        report("blk-write", REQ_BYTES);
        lines += 1;
    }
    if features & F_FLUSH != 0 {
        run("flush", T_FLUSH, 1);
        println!("kit: io note flush cycles={}", state().cycles);
    }
    if total > 0 {
        run("blk-read", T_IN, total);
        report("blk-read", REQ_BYTES);
        lines += 1;
    }
    lines
}

/// virtio-net: set-up of the transmit queue only, then `net-tx`: `frames` frames of `FRAME`
/// bytes. Returns the number of workload lines printed.
fn net(access: kit::pci::Access, frames: u64, qd: u64, batch: u64) -> u32 {
    let Some(dev) = virtio::find(access, 1) else {
        println!("kit: io workload=net-tx unsupported=no-virtio-net-device");
        return 1;
    };
    let Some(features) = dev.negotiate(F_EVENT_IDX) else {
        kit::fail(NAME, format_args!("virtio-net refused the features"));
    };
    let size = queue_size(&dev, 1, qd, 1);
    virtio::zero(NET_QMEM, 0x4000);
    let q = dev.setup_queue(1, size, NET_QMEM);
    let event_idx = features & F_EVENT_IDX != 0;
    if !event_idx {
        w16(q.avail, 1);
    }
    dev.driver_ok();
    println!(
        "kit: io device=net queue={} event_idx={} frame_bytes={}",
        q.size, event_idx as u8, FRAME
    );
    if frames == 0 {
        // Set up but idle: the baseline of a run with frames.
        println!("kit: io workload=net-tx unsupported=not-asked-for-(frames=0)");
        return 1;
    }
    kit::run_user(build_frames, qd, false);
    state().net = Ring::new(&q, event_idx, qd, batch, 1);
    run("net-tx", T_NET_TX, frames);
    report("net-tx", FRAME);
    1
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let words = boot.cmdline.split_ascii_whitespace();
    let quick = words.clone().any(|w| w == "quick");
    let hold = words.clone().any(|w| w == "hold");
    let mib = arg(boot, "mib", if quick { 32 } else { 256 });
    let qd = arg(boot, "qd", 32).clamp(1, MAX_QD);
    let batch = arg(boot, "batch", 8).clamp(1, qd);
    let frames = arg(boot, "frames", 0);
    let net_qd = arg(boot, "net_qd", 128).clamp(1, MAX_QD);
    let net_batch = arg(boot, "net_batch", 32).clamp(1, net_qd);
    let hz = kit::lapic::tsc_hz();
    println!(
        "kit: io start version=1 tsc_hz={} mode={} mib={} qd={} batch={} req_bytes={} frames={} \
         net_qd={} net_batch={}",
        hz,
        if quick { "quick" } else { "full" },
        mib,
        qd,
        batch,
        REQ_BYTES,
        frames,
        net_qd,
        net_batch
    );
    state().stall_cycles = STALL_SECONDS * hz;
    let access = kit::pci::access(boot.rsdp_hint);
    let net_only = frames > 0 || words.clone().any(|w| w == "net");
    let mut lines = block(access, mib, qd, batch, net_only);
    lines += net(access, frames, net_qd, net_batch);
    println!("kit: io done workloads={}", lines);
    kit::pass(NAME);
    if hold {
        // The host reads the VMM's exit statistics now, then ends the VM itself.
        println!("kit: io hold");
        arch::halt_forever()
    }
    kit::poweroff()
}
