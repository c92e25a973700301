//! A minimal virtio 1.x driver over the modern PCI transport: feature negotiation, split
//! virtqueues in fixed guest memory, requests submitted one at a time and completion by polling
//! the used ring (no interrupts). Enough for the kit's device tests, and small, because CPL0 code
//! is emulated on some hosts.

use core::sync::atomic::{fence, Ordering};

use crate::pci::{self, Function};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const STATUS_ACK: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;

fn r8(a: u64) -> u8 {
    // SAFETY: device registers and queue memory are identity-mapped.
    unsafe { core::ptr::read_volatile(a as *const u8) }
}
fn w8(a: u64, v: u8) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u8, v) }
}
pub fn r16(a: u64) -> u16 {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::read_volatile(a as *const u16) }
}
pub fn w16(a: u64, v: u16) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u16, v) }
}
pub fn r32(a: u64) -> u32 {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}
pub fn w32(a: u64, v: u32) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u32, v) }
}
pub fn w64(a: u64, v: u64) {
    // SAFETY: as for `r8`.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

/// A virtio-pci device's register regions.
#[derive(Clone, Copy, Debug)]
pub struct Device {
    pub func: Function,
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    pub config: u64,
}

/// Finds the modern virtio device of type `ty` (vendor 0x1af4, device 0x1040 + ty).
pub fn find(access: pci::Access, ty: u16) -> Option<Device> {
    let func = pci::find(access, 0x1af4, 0x1040 + ty)?;
    func.enable();
    let mut d = Device {
        func,
        common: 0,
        notify: 0,
        notify_mult: 0,
        isr: 0,
        config: 0,
    };
    func.for_each_cap(0x09, |c| {
        let ty = func.read8(c + 3);
        let bar = func.read8(c + 4) as u16;
        let addr = func.bar(bar) + func.read32(c + 8) as u64;
        match ty {
            1 => d.common = addr,
            2 => {
                d.notify = addr;
                d.notify_mult = func.read32(c + 16);
            }
            3 => d.isr = addr,
            4 => d.config = addr,
            _ => {}
        }
    });
    (d.common != 0 && d.notify != 0).then_some(d)
}

impl Device {
    pub fn status(&self) -> u8 {
        r8(self.common + 0x14)
    }
    pub fn set_status(&self, s: u8) {
        w8(self.common + 0x14, s)
    }

    pub fn device_features(&self) -> u64 {
        w32(self.common, 0);
        let lo = r32(self.common + 4) as u64;
        w32(self.common, 1);
        let hi = r32(self.common + 4) as u64;
        lo | (hi << 32)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 plus `wanted` where offered), FEATURES_OK.
    /// Returns the accepted features, or None if the device refused them.
    pub fn negotiate(&self, wanted: u64) -> Option<u64> {
        self.set_status(0);
        self.set_status(STATUS_ACK);
        self.set_status(STATUS_ACK | STATUS_DRIVER);
        let f = self.device_features() & (wanted | VIRTIO_F_VERSION_1);
        w32(self.common + 8, 0);
        w32(self.common + 0xc, f as u32);
        w32(self.common + 8, 1);
        w32(self.common + 0xc, (f >> 32) as u32);
        self.set_status(STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        (self.status() & STATUS_FEATURES_OK != 0).then_some(f)
    }

    /// Sets up queue `index` with `size` entries (0: the device's maximum, at most 16) in the
    /// 16 KiB of zeroed memory at `mem`.
    pub fn setup_queue(&self, index: u16, size: u16, mem: u64) -> Queue {
        w16(self.common + 0x16, index);
        let max = r16(self.common + 0x18);
        let size = if size == 0 { max.min(16) } else { size };
        w16(self.common + 0x18, size);
        let q = Queue {
            index,
            size,
            desc: mem,
            avail: mem + 0x1000,
            used: mem + 0x2000,
            notify: self.notify + r16(self.common + 0x1e) as u64 * self.notify_mult as u64,
            avail_idx: 0,
            last_used: 0,
        };
        w64(self.common + 0x20, q.desc);
        w64(self.common + 0x28, q.avail);
        w64(self.common + 0x30, q.used);
        w16(self.common + 0x1c, 1);
        q
    }

    pub fn driver_ok(&self) {
        self.set_status(self.status() | STATUS_DRIVER_OK);
    }
}

/// A split virtqueue driven one request at a time.
pub struct Queue {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub notify: u64,
    pub avail_idx: u16,
    pub last_used: u16,
}

impl Queue {
    /// Writes descriptor `i` as it is (no checks: hostile tests use this directly).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * i as u64;
        w64(d, addr);
        w32(d + 8, len);
        w16(d + 12, flags);
        w16(d + 14, next);
    }

    /// Makes `head` available and notifies the device.
    pub fn publish(&mut self, head: u16) {
        w16(
            self.avail + 4 + 2 * (self.avail_idx % self.size) as u64,
            head,
        );
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        w16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        w16(self.notify, self.index);
    }

    /// Submits a chain of (address, length, device-writable) buffers in descriptors 0.. and
    /// waits for it: returns (id, written length), or None after `spins` polls.
    pub fn submit(&mut self, bufs: &[(u64, u32, bool)], spins: u64) -> Option<(u32, u32)> {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(i as u16, addr, len, flags, i as u16 + 1);
        }
        self.publish(0);
        self.wait(spins)
    }

    /// Polls the used ring for the next completion.
    pub fn wait(&mut self, spins: u64) -> Option<(u32, u32)> {
        for _ in 0..spins {
            if r16(self.used + 2) != self.last_used {
                fence(Ordering::SeqCst);
                let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
                self.last_used = self.last_used.wrapping_add(1);
                return Some((r32(e), r32(e + 4)));
            }
            crate::arch::pause();
        }
        None
    }
}

/// Zeroes `len` bytes at `addr` (qword stores: cheaper than bytes where CPL0 is emulated).
pub fn zero(addr: u64, len: u64) {
    let mut a = addr;
    while a < addr + len {
        w64(a, 0);
        a += 8;
    }
}
