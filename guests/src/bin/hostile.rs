//! The hostile-guest suite: attacks every device the VMM gives it, driven by a seed, then checks
//! that a device still works. Replayable: the seed is printed first and taken from the command
//! line (`seed=N`; `rounds=N` scales every phase, default 400).
//!
//! Phases (all heavy work at CPL3, where it runs natively on hosts that emulate CPL0):
//! 1. random port I/O over the whole port space;
//! 2. random MMIO over every BAR of every PCI function, the ECAM window (configuration space of
//!    every bus, device and function) and the platform MMIO (probe page, unassigned space);
//! 3. per virtio device: random features, queue sizes (not powers of two, zero, huge), ring
//!    addresses, malformed, cyclic and indirect descriptor chains whose buffers aim at MMIO,
//!    outside RAM, across the end of RAM or wrap the address space, avail indices that jump,
//!    notifications of queues that do not exist, device resets and queue disables mid-flight;
//! 4. an interrupt storm: every MSI-X vector of every device armed, requests completing with
//!    interrupts on, the function mask toggled under them;
//! 5. a console flood (UART registers poked, then restored);
//! 6. with an emulated VT-d (`--iommu`): garbage in its register file (both pages), root and
//!    context tables pointing past RAM, at MMIO or at each other, looping page tables, an
//!    invalidation queue of garbage descriptors whose wait descriptors write their status at
//!    MMIO or past RAM, register-based invalidations, and device DMA through all of it; then a
//!    clean root table must give a recorded fault for a device's DMA, and a pass-through context
//!    a working virtio-rng through the IOMMU;
//! 7. the check: virtio-rng gives entropy, and the read-only virtio-blk disk reads back the
//!    pattern the host wrote (`kit: PASS hostile` only then).
//!
//! What the guest must not do to itself is filtered out of the random accesses, so that only the
//! VMM is under test: the ports that end the VM (isa-debug-exit, ACPI S5, i8042 and 0xcf9 reset),
//! COM1 (the result channel), the LAPIC and IOAPIC (an INIT or NMI would end the guest), MSI data
//! other than fixed delivery to a vector >= 0x30, and device DMA into guest memory below 4 MiB
//! (the kit's image, stacks and page tables). Every device gets its own 4 MiB scratch window for
//! rings and buffers; devices only write upwards from an address, and the balloon (which discards
//! the pages it is given) has the lowest window, so no device write reaches what it reads.
//!
//! The IOMMU phase keeps its tables and queue in a 4 MiB area of their own above the windows,
//! laid out so that no translation the guest's garbage can produce lets a device write guest RAM
//! outside it: page tables (TABLE_AREA) point into TABLE_AREA only read-only (loops included) and
//! writable only where no RAM is; root and context tables (CTX_AREA) point to CTX_AREA, to
//! TABLE_AREA or where no RAM is; the invalidation queue lies only in QI_AREA, whose every
//! descriptor that writes a status writes it in STATUS_AREA, at MMIO or past RAM; register writes
//! that would move the root table, the queue or the IOMMU's interrupts elsewhere are rewritten.
//! The balloon (which discards the pages it reads) takes no DMA in this phase.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use kit::arch::{inb, inl, outb, outl, outw};
use kit::pci::{Access, Function};
use kit::println;
use kit::virtio::{r16, r32, w16, w32, w64};

kit::entry!(main);

const NAME: &str = "hostile";
/// The clean memory of the final check (no hostile address points below 4 MiB).
const CHECK_MEM: u64 = 0x30_0000;
const WINDOW_BASE: u64 = 0x40_0000;
const WINDOW_SIZE: u64 = 0x40_0000;
const MAX_WINDOWS: u64 = 10;
const MAX_FUNCS: usize = 32;
const STORM_VECTOR_MIN: u64 = 0x30;
const NO_VECTOR: u16 = 0xffff;
const BLK_F_RO: u32 = 1 << 5;

/// A PCI function found on bus 0 and what the attack needs to know about it.
#[derive(Clone, Copy)]
struct Dev {
    func: Function,
    /// (address, size) of each memory BAR (size 0: none).
    bars: [(u64, u64); 6],
    /// virtio device type (0: not virtio).
    virtio: u16,
    common: u64,
    notify: u64,
    notify_mult: u32,
    device_cfg: u64,
    msix_cap: u16,
    msix_table: u64,
    msix_entries: u16,
    window: u64,
}

const NO_DEV: Dev = Dev {
    func: Function {
        access: Access::Ports,
        dev: 0,
    },
    bars: [(0, 0); 6],
    virtio: 0,
    common: 0,
    notify: 0,
    notify_mult: 0,
    device_cfg: 0,
    msix_cap: 0,
    msix_table: 0,
    msix_entries: 0,
    window: 0,
};

/// Everything the CPL3 phases share (no allocator in the kit).
struct State {
    rng: u64,
    rounds: u64,
    ram_end: u64,
    ecam: u64,
    devs: [Dev; MAX_FUNCS],
    ndevs: usize,
    counts: Counts,
    /// An emulated VT-d answers at `IOMMU_REGS`.
    iommu: bool,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    pio: u64,
    mmio: u64,
    config: u64,
    chains: u64,
    resets: u64,
    console: u64,
    storm_requests: u64,
    iommu_regs: u64,
    iommu_tables: u64,
    iommu_descs: u64,
    iommu_dma: u64,
}

static mut STATE: State = State {
    rng: 0,
    rounds: 0,
    ram_end: 0,
    ecam: 0,
    devs: [NO_DEV; MAX_FUNCS],
    ndevs: 0,
    iommu: false,
    counts: Counts {
        pio: 0,
        mmio: 0,
        config: 0,
        chains: 0,
        resets: 0,
        console: 0,
        storm_requests: 0,
        iommu_regs: 0,
        iommu_tables: 0,
        iommu_descs: 0,
        iommu_dma: 0,
    },
};

static INTERRUPTS: AtomicU64 = AtomicU64::new(0);

fn state() -> &'static mut State {
    // SAFETY: one vCPU; the CPL0 part and the CPL3 phases never run at once, and interrupt
    // handlers only touch `INTERRUPTS`.
    unsafe { &mut *core::ptr::addr_of_mut!(STATE) }
}

impl State {
    /// xorshift64*: small, and the same sequence for the same seed everywhere.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn devs(&self) -> &[Dev] {
        &self.devs[..self.ndevs]
    }

    fn random_dev(&mut self) -> Dev {
        let i = self.below(self.ndevs as u64) as usize;
        self.devs[i]
    }

    /// An address no device may use: MMIO, past the end of RAM, above 4 GiB or wrapping.
    fn not_ram(&mut self) -> u64 {
        match self.below(6) {
            0 => 0xf000_0000 + (self.below(0x1000) & !3),
            1 => {
                let d = self.random_dev();
                let (a, s) = d.bars[0];
                if s == 0 {
                    0xfee0_0000
                } else {
                    a + self.below(s)
                }
            }
            2 => [0xfee0_0000, 0xfec0_0000, 0xe000_0000, 0xfed9_0000][self.below(4) as usize],
            3 => self.ram_end + self.below(0xc000_0000 - self.ram_end),
            4 => (1 << 32) + (self.next() & 0xffff_ffff_f000),
            _ => u64::MAX - self.below(0x1_0000),
        }
    }

    /// A buffer address for a device whose window is `w`: mostly inside the window, else where
    /// no RAM is, or straddling the end of RAM.
    fn dma_addr(&mut self, w: u64) -> u64 {
        match self.below(10) {
            0..=5 => w + 0x2_0000 + self.below(WINDOW_SIZE - 0x2_0000),
            6 => self.ram_end - 1 - self.below(0x2000),
            _ => self.not_ram(),
        }
    }

    /// A buffer for device `d`. The balloon reads its buffers as page numbers to discard: its
    /// buffers stay inside its window (filled by `fill_balloon_pfns`) or where no RAM is, so it
    /// never reads another device's data (or a descriptor) as the number of a page of the kit.
    fn buffer(&mut self, d: &Dev) -> (u64, u32) {
        let w = d.window;
        let (addr, len) = (self.dma_addr(w), self.dma_len());
        if d.virtio != 5 {
            return (addr, len);
        }
        if (w..w + WINDOW_SIZE).contains(&addr) {
            (addr, len.min((w + WINDOW_SIZE - addr) as u32))
        } else if addr < self.ram_end {
            (self.not_ram(), len)
        } else {
            (addr, len)
        }
    }

    /// A buffer length: empty, small, a page, large, or absurd.
    fn dma_len(&mut self) -> u32 {
        match self.below(8) {
            0 => 0,
            1 => 1 + self.below(16) as u32,
            2 => 512,
            3 => 4096,
            4 => self.below(0x1_0000) as u32,
            5 => 0x10_0000,
            6 => 0xffff_ffff,
            _ => self.next() as u32,
        }
    }

    /// The low half of a ring or buffer address written through a register: with a high half of
    /// zero it must not point at guest memory outside the window.
    fn low_half(&mut self, w: u64) -> u32 {
        match self.below(3) {
            0 => (w + self.below(WINDOW_SIZE)) as u32,
            1 => (self.ram_end + self.below(0xc000_0000 - self.ram_end)) as u32,
            _ => 0xc000_0000 + self.below(0x3fff_ffff) as u32,
        }
    }

    /// MSI data the guest can take: fixed delivery, edge, a vector it handles.
    fn msi_data(&mut self) -> u32 {
        (STORM_VECTOR_MIN + self.below(0xff - STORM_VECTOR_MIN)) as u32
    }
}

fn parse_arg(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

// ---------------------------------------------------------------- discovery (CPL0, once)

fn bar_size(f: &Function, off: u16) -> u64 {
    let old = f.read32(off);
    if old & 1 != 0 {
        return 0; // an I/O BAR: reached by the random port I/O
    }
    f.write32(off, 0xffff_ffff);
    let mask = f.read32(off) & !0xf;
    f.write32(off, old);
    if mask == 0 {
        0
    } else {
        (!mask as u64 + 1) & 0xffff_ffff
    }
}

fn discover(s: &mut State, access: Access) {
    let mut window = 0u64;
    // The balloon first: it gets the lowest window (see the module doc).
    for pass in 0..2 {
        for dev in 0..32u8 {
            let func = Function { access, dev };
            let (vendor, device) = func.ids();
            if vendor == 0xffff || vendor == 0 {
                continue;
            }
            let ty = if vendor == 0x1af4 && device >= 0x1040 {
                device - 0x1040
            } else {
                0
            };
            if (pass == 0) != (ty == 5) || s.ndevs == MAX_FUNCS {
                continue;
            }
            let mut d = NO_DEV;
            d.func = func;
            d.virtio = ty;
            func.enable();
            for b in 0..6u16 {
                let size = bar_size(&func, 0x10 + 4 * b);
                d.bars[b as usize] = (func.bar(b), size);
            }
            func.for_each_cap(0x09, |c| {
                let bar = func.read8(c + 4) as usize;
                let addr = d.bars[bar.min(5)].0 + func.read32(c + 8) as u64;
                match func.read8(c + 3) {
                    1 => d.common = addr,
                    2 => {
                        d.notify = addr;
                        d.notify_mult = func.read32(c + 16);
                    }
                    4 => d.device_cfg = addr,
                    _ => {}
                }
            });
            func.for_each_cap(0x11, |c| {
                d.msix_cap = c;
                d.msix_entries = ((func.read32(c) >> 16) & 0x7ff) as u16 + 1;
                let t = func.read32(c + 4);
                d.msix_table = d.bars[(t & 7).min(5) as usize].0 + (t & !7) as u64;
            });
            if ty != 0 && window < MAX_WINDOWS {
                d.window = WINDOW_BASE + window * WINDOW_SIZE;
                window += 1;
            }
            println!(
                "kit: hostile: {:02x}.0 {:04x}:{:04x} virtio type {} bar0 {:#x}+{:#x} msix {} window {:#x}",
                dev, vendor, device, ty, d.bars[0].0, d.bars[0].1, d.msix_entries, d.window
            );
            s.devs[s.ndevs] = d;
            s.ndevs += 1;
        }
    }
}

// ---------------------------------------------------------------- phase 1: port I/O

/// Rewrites a port write that would end the VM or silence the console; None skips it.
fn sanitize_port_write(port: u16, size: u16, v: u32) -> Option<u32> {
    let overlaps = |lo: u16, hi: u16| port <= hi && port + size > lo;
    if overlaps(0x3f8, 0x3ff) || overlaps(0xf4, 0xf7) {
        return None;
    }
    match port {
        0x64 if v as u8 == 0xfe => Some(v ^ 1),
        0x604 => Some(v & !0x2000),
        0xcf9 => Some(v & !0x04),
        _ => Some(v),
    }
}

extern "C" fn random_pio(_: u64) -> u64 {
    let s = state();
    for _ in 0..s.rounds * 10 {
        let size = [1u16, 2, 4][s.below(3) as usize];
        let port = match s.below(4) {
            // A quarter of the accesses on the legacy and PCI ports, where devices are.
            0 => s.below(0x1000) as u16,
            1 => 0xcf8 + s.below(8) as u16,
            _ => s.next() as u16,
        };
        let port = port.min(0xffff - size + 1);
        if s.chance(2) {
            let _ = match size {
                1 => inb(port) as u32,
                2 => inw(port) as u32,
                _ => inl(port),
            };
        } else {
            let v = s.next() as u32;
            let Some(v) = sanitize_port_write(port, size, v) else {
                continue;
            };
            match size {
                1 => outb(port, v as u8),
                2 => outw(port, v as u16),
                _ => outl(port, v),
            }
        }
        s.counts.pio += 1;
    }
    0
}

fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port I/O has no memory-safety effect on the guest.
    unsafe { core::arch::asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack)) }
    v
}

// ---------------------------------------------------------------- phase 2: MMIO

fn mmio_write(addr: u64, size: u64, v: u64) {
    // SAFETY: the kit identity-maps the low 4 GiB (the top GiB uncached); these addresses are
    // device registers or unassigned MMIO, never memory Rust uses.
    unsafe {
        match size {
            1 => core::ptr::write_volatile(addr as *mut u8, v as u8),
            2 => core::ptr::write_volatile(addr as *mut u16, v as u16),
            4 => core::ptr::write_volatile(addr as *mut u32, v as u32),
            _ => core::ptr::write_volatile(addr as *mut u64, v),
        }
    }
}

fn mmio_read(addr: u64, size: u64) -> u64 {
    // SAFETY: as for `mmio_write`.
    unsafe {
        match size {
            1 => core::ptr::read_volatile(addr as *const u8) as u64,
            2 => core::ptr::read_volatile(addr as *const u16) as u64,
            4 => core::ptr::read_volatile(addr as *const u32) as u64,
            _ => core::ptr::read_volatile(addr as *const u64),
        }
    }
}

/// Makes a random write to `addr` in device `d`'s BARs harmless to the guest itself: MSI data
/// becomes fixed delivery to a handled vector, ring addresses stay out of guest memory.
fn sanitize_mmio(s: &mut State, d: &Dev, addr: u64, size: u64, v: u64) -> (u64, u64, u64) {
    let table = d.msix_table..d.msix_table + 16 * d.msix_entries as u64;
    if d.msix_entries > 0 && table.contains(&addr) {
        let entry = (addr - d.msix_table) & !0xf;
        let a = d.msix_table + entry + (s.below(4) * 4);
        let v = match a & 0xf {
            0 => 0xfee0_0000 | (s.below(0x100) << 12) | (s.below(4) << 2),
            8 => s.msi_data() as u64,
            _ => v & 0xffff_ffff,
        };
        return (a, 4, v);
    }
    if d.common != 0 && (d.common + 0x20..d.common + 0x38).contains(&addr) {
        let a = d.common + 0x20 + ((addr - d.common - 0x20) & !7);
        let v = if s.chance(2) {
            s.low_half(d.window) as u64
        } else {
            s.not_ram()
        };
        return (a, 8, v);
    }
    (addr & !(size - 1), size, v)
}

/// Reads of many distinct unassigned pages (above the BARs in the PCI hole): the VMM's per-page
/// exit counts must stay bounded (they once grew on the vCPU thread until glibc, shrinking its
/// heap, read /proc under the vCPU's seccomp filter).
fn page_sweep(s: &mut State) {
    let start = 0xc100_0000u64;
    for i in 0..s.rounds * 40 {
        mmio_read(start + (i << 12), 4);
        s.counts.mmio += 1;
    }
}

extern "C" fn random_mmio(_: u64) -> u64 {
    let s = state();
    page_sweep(s);
    for _ in 0..s.rounds * 10 {
        let size = [1u64, 2, 4, 8][s.below(4) as usize];
        let write = s.chance(2);
        let v = s.next();
        match s.below(8) {
            // Configuration space: mostly the functions that exist, sometimes any bus.
            0 | 1 => {
                let off = if s.chance(4) {
                    s.below(0x1000_0000)
                } else {
                    ((s.random_dev().func.dev as u64) << 15) + s.below(0x1000)
                };
                let a = (s.ecam + off) & !(size - 1);
                if write {
                    mmio_write(a, size, v);
                } else {
                    mmio_read(a, size);
                }
                s.counts.config += 1;
            }
            // The probe page and unassigned space in the PCI hole.
            2 => {
                let a = if s.chance(2) {
                    0xf000_0000 + s.below(0x1000)
                } else {
                    0xc000_0000 + s.below(0x2000_0000)
                } & !(size - 1);
                if write {
                    mmio_write(a, size, v);
                } else {
                    mmio_read(a, size);
                }
                s.counts.mmio += 1;
            }
            _ => {
                let d = s.random_dev();
                let b = s.below(6) as usize;
                let (base, len) = d.bars[b];
                if len == 0 || base == 0 {
                    continue;
                }
                let a = base + s.below(len);
                if write {
                    let (a, size, v) = sanitize_mmio(s, &d, a, size, v);
                    mmio_write(a, size, v);
                } else {
                    mmio_read(a & !(size - 1), size);
                }
                s.counts.mmio += 1;
            }
        }
    }
    0
}

// ---------------------------------------------------------------- phase 3: virtqueues

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
}

fn write_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    w64(at, addr);
    w32(at + 8, len);
    w16(at + 12, flags);
    w16(at + 14, next);
}

/// Fills a device's buffers so that what the balloon reads as page numbers are its own
/// window's pages or pages that do not exist.
fn fill_balloon_pfns(s: &mut State, w: u64) {
    let mut a = w + 0x2_0000;
    while a < w + WINDOW_SIZE {
        let pfn = if s.chance(2) {
            (w >> 12) + s.below(WINDOW_SIZE >> 12)
        } else {
            (s.ram_end >> 12) + s.below(0xfff_ffff)
        };
        w32(a, pfn as u32);
        a += 4;
    }
}

/// One hostile round on one virtio device.
fn virtio_round(s: &mut State, d: &Dev) {
    let c = d.common;
    let w = d.window;
    outb_status(c, 0);
    s.counts.resets += 1;
    outb_status(c, 1);
    outb_status(c, 3);
    w32(c, 0);
    let lo = r32(c + 4);
    w32(c, 1);
    let hi = r32(c + 4);
    let offered = (lo as u64) | ((hi as u64) << 32);
    // A third of the rounds set the device up properly (what it offers, valid queues), so that
    // it starts and the chains reach its request handling; the rest set it up wrongly too.
    let proper = s.chance(3);
    let features = if proper {
        offered
    } else if s.chance(8) {
        s.next() | (1 << 32)
    } else {
        offered & s.next() | (1 << 32)
    };
    w32(c + 8, 0);
    w32(c + 0xc, features as u32);
    w32(c + 8, 1);
    w32(c + 0xc, (features >> 32) as u32);
    outb_status(c, 0xb);
    if d.virtio == 5 {
        fill_balloon_pfns(s, w);
    }
    let nq = r16(c + 0x12);
    let mut rings: [Option<Ring>; 4] = [None, None, None, None];
    for (qi, slot) in rings.iter_mut().enumerate() {
        let q = if !proper && s.chance(8) {
            s.next() as u16
        } else {
            qi as u16
        };
        if q >= nq && !s.chance(4) {
            continue;
        }
        w16(c + 0x16, q);
        let max = r16(c + 0x18).max(1);
        let size = match if proper { 5 } else { s.below(6) } {
            0 => 0,
            1 => 3,
            2 => s.next() as u16,
            _ => 1 << s.below(16 - max.leading_zeros() as u64),
        };
        w16(c + 0x18, size);
        w16(c + 0x1a, s.below(4) as u16);
        // Queue `qi`'s rings at window + 32 KiB * qi (desc, then avail at +4 KiB, used at +8 KiB).
        let base = w + 0x8000 * (qi as u64);
        let ring = if !proper && s.chance(10) {
            Ring {
                desc: s.not_ram(),
                avail: base + 0x1000,
                used: s.not_ram(),
                size: size.clamp(1, 256),
            }
        } else {
            Ring {
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                size: size.clamp(1, 256),
            }
        };
        w64(c + 0x20, ring.desc);
        w64(c + 0x28, ring.avail);
        w64(c + 0x30, ring.used);
        w16(c + 0x1c, if !proper && s.chance(8) { 0 } else { 1 });
        *slot = Some(ring);
    }
    if proper || !s.chance(8) {
        outb_status(c, 0xf);
    }
    for (qi, ring) in rings.iter().enumerate() {
        let Some(ring) = ring else { continue };
        publish_chains(s, d, qi as u16, ring);
        if s.chance(6) {
            // A reset while the device may be working on what it was just given.
            outb_status(c, 0);
            s.counts.resets += 1;
            return;
        }
        if s.chance(6) {
            w16(c + 0x16, qi as u16);
            w16(c + 0x1c, 0);
        }
    }
    // Random writes to the device's own configuration.
    if d.device_cfg != 0 {
        for _ in 0..4 {
            let a = d.device_cfg + s.below(0x40);
            if d.virtio == 5 && s.chance(2) {
                continue; // the balloon's target: leave it to the other attacks
            }
            mmio_write(a, 1, s.next());
        }
    }
    // Give the device a moment to work on it (its used index moving ends the wait early).
    for r in rings.iter().flatten() {
        if (w..w + WINDOW_SIZE).contains(&r.used) {
            let before = r16(r.used + 2);
            for _ in 0..2000 {
                if r16(r.used + 2) != before {
                    break;
                }
                kit::arch::pause();
            }
        }
    }
}

fn outb_status(common: u64, v: u8) {
    // SAFETY: the common configuration's status byte.
    unsafe { core::ptr::write_volatile((common + 0x14) as *mut u8, v) }
}

/// Writes random descriptors (cycles, indirect tables, hostile buffers) and publishes heads.
fn publish_chains(s: &mut State, d: &Dev, q: u16, ring: &Ring) {
    let w = d.window;
    let in_window = (w..w + WINDOW_SIZE).contains(&ring.desc);
    let n = ring.size.min(64);
    if in_window {
        for i in 0..n {
            let mut flags = 0;
            if s.chance(2) {
                flags |= F_NEXT;
            }
            if s.chance(2) {
                flags |= F_WRITE;
            }
            let (addr, len) = if s.chance(8) {
                flags |= F_INDIRECT;
                // In the free tail of a queue's 32 KiB slot: never read as page numbers.
                let table = w + 0x8000 * s.below(4) + 0x4000 + 0x1000 * s.below(4);
                indirect_table(s, d, table);
                (
                    table,
                    [16, 64, 0x1000, 0x10, 0xffff_fff0][s.below(5) as usize],
                )
            } else {
                s.buffer(d)
            };
            // `next` is often the descriptor itself or an earlier one: a cycle.
            let next = match s.below(4) {
                0 => i,
                1 => s.below(i as u64 + 1) as u16,
                2 => s.next() as u16,
                _ => (i + 1) % n,
            };
            write_desc(ring.desc + 16 * i as u64, addr, len, flags, next);
        }
    }
    if !(w..w + WINDOW_SIZE).contains(&ring.avail) {
        return;
    }
    let mut idx = r16(ring.avail + 2);
    let heads = 1 + s.below(n as u64);
    for _ in 0..heads {
        let head = if s.chance(8) {
            s.next() as u16
        } else {
            s.below(n as u64) as u16
        };
        w16(ring.avail + 4 + 2 * (idx % ring.size) as u64, head);
        idx = idx.wrapping_add(1);
        s.counts.chains += 1;
    }
    if s.chance(10) {
        idx = idx.wrapping_add(s.next() as u16); // more available than the ring holds
    }
    w16(ring.avail, s.below(2) as u16);
    w16(ring.avail + 2, idx);
    let notify_q = if s.chance(10) { s.next() as u16 } else { q };
    let off = {
        w16(d.common + 0x16, q);
        r16(d.common + 0x1e) as u64
    };
    w16(d.notify + off * d.notify_mult as u64, notify_q);
}

/// An indirect table: random descriptors, some pointing back into the table (loops), some
/// nested indirect (not allowed by the spec).
fn indirect_table(s: &mut State, d: &Dev, table: u64) {
    for i in 0..16u64 {
        let flags = (s.below(8) as u16) & (F_NEXT | F_WRITE | F_INDIRECT);
        let (addr, len) = if flags & F_INDIRECT != 0 {
            (table, s.dma_len())
        } else {
            s.buffer(d)
        };
        write_desc(table + 16 * i, addr, len, flags, s.below(20) as u16);
    }
}

extern "C" fn virtio_attacks(_: u64) -> u64 {
    let s = state();
    let devs: [Dev; MAX_FUNCS] = s.devs;
    let n = s.ndevs;
    // Round-robin, so that every device gets its share whatever the seed.
    for r in 0..s.rounds / 4 {
        let d = devs[r as usize % n];
        if d.virtio == 0 || d.common == 0 || d.window == 0 {
            continue;
        }
        virtio_round(s, &d);
    }
    // Leave every device reset: nothing in flight while the storm sets them up again.
    for d in &devs[..n] {
        if d.common != 0 {
            outb_status(d.common, 0);
        }
    }
    0
}

// ---------------------------------------------------------------- phase 4: interrupt storm

fn count_interrupt(_: &mut kit::TrapFrame) {
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    kit::lapic::eoi();
}

/// Arms every MSI-X vector of every device (fixed delivery to this CPU's handled vectors).
fn arm_msix(s: &mut State) {
    let devs: [Dev; MAX_FUNCS] = s.devs;
    for d in &devs[..s.ndevs] {
        if d.msix_entries == 0 {
            continue;
        }
        for e in 0..d.msix_entries as u64 {
            let t = d.msix_table + 16 * e;
            w32(t, 0xfee0_0000);
            w32(t + 4, 0);
            w32(t + 8, s.msi_data());
            w32(t + 12, 0);
        }
        let ctl = d.func.read32(d.msix_cap);
        d.func.write32(d.msix_cap, ctl | (1 << 31));
    }
}

/// Requests to virtio-rng with every completion interrupting, the function mask toggled
/// under them.
extern "C" fn storm(_: u64) -> u64 {
    let s = state();
    arm_msix(s);
    let Some(d) = s.devs().iter().copied().find(|d| d.virtio == 4) else {
        return 0;
    };
    let mut q = setup(&d, d.window + 0x20_0000, 0);
    let buf = d.window + 0x30_0000;
    for i in 0..s.rounds {
        if i % 16 == 8 {
            let ctl = d.func.read32(d.msix_cap);
            d.func.write32(d.msix_cap, ctl ^ (1 << 30));
        }
        if q.submit(&[(buf, 16, true)], 200_000).is_some() {
            s.counts.storm_requests += 1;
        }
    }
    let ctl = d.func.read32(d.msix_cap);
    d.func.write32(d.msix_cap, ctl & !(1 << 30));
    outb_status(d.common, 0);
    0
}

// ---------------------------------------------------------------- phase 5: console flood

extern "C" fn console_flood(_: u64) -> u64 {
    let s = state();
    let (ier, lcr, mcr) = (inb(0x3f9), inb(0x3fb), inb(0x3fc));
    for i in 0..s.rounds * 8 {
        if s.chance(64) {
            // Any register but the divisor latch (DLAB) and loopback: restored right after.
            let reg = 1 + s.below(7) as u16;
            outb(0x3f8 + reg, s.next() as u8 & 0x7f);
            outb(0x3f9, ier);
            outb(0x3fb, lcr);
            outb(0x3fc, mcr);
        }
        let b = if i % 80 == 79 {
            b'\n'
        } else {
            b' ' + s.below(95) as u8
        };
        kit::console::putb(b);
        s.counts.console += 1;
    }
    kit::console::putb(b'\n');
    0
}

// ---------------------------------------------------------------- phase 6: the IOMMU

#[path = "hostile/iommu.rs"]
mod iommu;

// ---------------------------------------------------------------- phase 7: the check

/// Resets `d` and sets up its queue 0 (8 entries at `mem`) the proper way; `vector`: the MSI-X
/// vector of the queue and of configuration changes.
fn setup(d: &Dev, mem: u64, vector: u16) -> kit::virtio::Queue {
    setup_with(d, mem, vector, 0)
}

/// `setup`, also accepting the features `wanted` (e.g. ACCESS_PLATFORM).
fn setup_with(d: &Dev, mem: u64, vector: u16, wanted: u64) -> kit::virtio::Queue {
    let v = kit::virtio::Device {
        func: d.func,
        common: d.common,
        notify: d.notify,
        notify_mult: d.notify_mult,
        isr: 0,
        config: d.device_cfg,
    };
    d.func.enable();
    if v.negotiate(wanted).is_none() {
        kit::fail(NAME, format_args!("{:02x}.0 refused VERSION_1", d.func.dev));
    }
    w16(d.common + 0x10, vector);
    w16(d.common + 0x16, 0);
    w16(d.common + 0x1a, vector);
    kit::virtio::zero(mem, 0x3000);
    let q = v.setup_queue(0, 8, mem);
    v.driver_ok();
    q
}

fn check(s: &State) {
    let Some(rng) = s.devs().iter().copied().find(|d| d.virtio == 4) else {
        kit::fail(NAME, format_args!("no virtio-rng to check"));
    };
    let buf = CHECK_MEM + 0x8000;
    kit::virtio::zero(buf, 64);
    let mut q = setup(&rng, CHECK_MEM, NO_VECTOR);
    match q.submit(&[(buf, 64, true)], 50_000_000) {
        Some((_, 64)) if (0..16).any(|i| r32(buf + 4 * i) != 0) => {}
        r => kit::fail(NAME, format_args!("virtio-rng after the attack: {r:?}")),
    }
    outb_status(rng.common, 0);
    println!("kit: hostile: virtio-rng works after the attack");
    // The read-only disk (VIRTIO_BLK_F_RO) holds 0x5a in every byte.
    let disk = s.devs().iter().copied().find(|d| {
        d.virtio == 2 && {
            w32(d.common, 0);
            r32(d.common + 4) & BLK_F_RO != 0
        }
    });
    let Some(disk) = disk else {
        kit::fail(NAME, format_args!("no read-only virtio-blk disk to check"));
    };
    let (hdr, data, status) = (CHECK_MEM + 0x9000, CHECK_MEM + 0xa000, CHECK_MEM + 0x9100);
    let mut q = setup(&disk, CHECK_MEM + 0x1_0000, NO_VECTOR);
    w32(hdr, 0);
    w32(hdr + 4, 0);
    w64(hdr + 8, 1);
    w32(status, 0xff);
    kit::virtio::zero(data, 512);
    match q.submit(
        &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
        50_000_000,
    ) {
        Some((_, 513)) if r32(status) as u8 == 0 => {}
        r => kit::fail(
            NAME,
            format_args!(
                "virtio-blk read after the attack: {r:?} status {:#x}",
                r32(status)
            ),
        ),
    }
    if (0..128).any(|i| r32(data + 4 * i) != 0x5a5a_5a5a) {
        kit::fail(
            NAME,
            format_args!("virtio-blk sector 1 does not hold the pattern"),
        );
    }
    outb_status(disk.common, 0);
    println!(
        "kit: hostile: virtio-blk {:02x}.0 reads its pattern after the attack",
        disk.func.dev
    );
}

fn phase(what: &str, f: extern "C" fn(u64) -> u64, interrupts: bool) {
    if let Err(e) = kit::try_run_user(f, 0, interrupts) {
        kit::fail(
            NAME,
            format_args!(
                "{what}: {} at rip={:#x} err={:#x}",
                kit::trap::exception_name(e.vector),
                e.rip,
                e.error
            ),
        );
    }
    println!("kit: hostile: {what} done");
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let s = state();
    let seed = parse_arg(boot.cmdline, "seed").unwrap_or_else(|| kit::arch::rdtsc() | 1);
    s.rng = seed | 1;
    s.rounds = parse_arg(boot.cmdline, "rounds").unwrap_or(400);
    // Replay: `exitless run --guest hostile --cmdline seed=N` with the same devices.
    println!("kit: hostile seed={seed} rounds={}", s.rounds);
    if boot.ram_bytes < WINDOW_BASE + MAX_WINDOWS * WINDOW_SIZE + (4 << 20) {
        kit::fail(NAME, format_args!("needs at least 48 MiB of RAM"));
    }
    s.ram_end = boot.ram_bytes.min(0xc000_0000);
    let access = kit::pci::access(boot.rsdp_hint);
    let Access::Ecam(ecam) = access else {
        kit::fail(NAME, format_args!("no MCFG: the attack needs ECAM"));
    };
    s.ecam = ecam;
    discover(s, access);
    for v in STORM_VECTOR_MIN as u8..0xff {
        kit::set_handler(v, count_interrupt);
    }
    phase("port I/O", random_pio, false);
    phase("MMIO and configuration space", random_mmio, false);
    phase("virtqueues", virtio_attacks, false);
    phase("interrupt storm", storm, true);
    phase("console flood", console_flood, false);
    s.iommu = iommu::present();
    if s.iommu {
        phase("IOMMU", iommu::attacks, true);
        iommu::check(s);
    }
    let c = s.counts;
    println!(
        "kit: hostile counts pio={} mmio={} config={} chains={} resets={} storm_requests={} interrupts={} console_bytes={} iommu_regs={} iommu_tables={} iommu_descs={} iommu_dma={}",
        c.pio,
        c.mmio,
        c.config,
        c.chains,
        c.resets,
        c.storm_requests,
        INTERRUPTS.load(Ordering::Relaxed),
        c.console,
        c.iommu_regs,
        c.iommu_tables,
        c.iommu_descs,
        c.iommu_dma
    );
    check(s);
    kit::pass(NAME);
    kit::poweroff()
}
