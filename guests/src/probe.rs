//! exitless's probe device: every access below is exactly one exit to the VMM (and is counted
//! there). Under QEMU the same accesses go to unassigned space (reads then return all-ones).

use core::arch::asm;

/// First probe port (0x510..=0x51f are the device's).
pub const PORT: u16 = 0x510;
/// The probe MMIO page.
pub const MMIO: u64 = 0xf000_0000;

/// One 32-bit `out` to `port`.
#[inline(always)]
pub fn pio_write_port(port: u16, v: u32) {
    // SAFETY: port I/O to the probe device has no effect on guest memory.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// One 32-bit `out` to 0x510.
#[inline(always)]
pub fn pio_write(v: u32) {
    pio_write_port(PORT, v)
}

/// One 32-bit `in` from 0x510.
#[inline(always)]
pub fn pio_read() -> u32 {
    let v: u32;
    // SAFETY: as for `pio_write_port`.
    unsafe {
        asm!("in eax, dx", in("dx") PORT, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// One 32-bit store to 0xf0000000.
#[inline(always)]
pub fn mmio_write(v: u32) {
    // SAFETY: the probe page is identity-mapped (uncached) by the kit's page tables; the store
    // targets a device, not guest memory Rust knows about.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) MMIO, v = in(reg) v, options(nostack, preserves_flags))
    }
}

/// One 32-bit load from 0xf0000000.
#[inline(always)]
pub fn mmio_read() -> u32 {
    let v: u32;
    // SAFETY: as for `mmio_write`.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) MMIO, v = out(reg) v, options(nostack, preserves_flags, readonly))
    }
    v
}
