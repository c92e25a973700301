//! Thin wrappers around privileged and I/O instructions.

use core::arch::asm;

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory-safety effect on the guest; callers pick ports of devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes a 16-bit word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit word from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the TSC (CR4.TSD is clear, so it works at CPL3 too).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// Executes CPUID; returns (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Reads a model-specific register (CPL0 only).
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the kit only reads architectural MSRs that exist on every x86_64 CPU.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}

/// Writes a model-specific register (CPL0 only).
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: callers write architectural MSRs (STAR, LSTAR, SFMASK, EFER) with valid values.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Current privilege level (low two bits of CS).
#[inline(always)]
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs & 3
}

/// Disables interrupts.
#[inline(always)]
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// `sti; hlt; cli`: waits for one interrupt with interrupts enabled only for the wait.
#[inline(always)]
pub fn sti_hlt_cli() {
    // SAFETY: handlers are installed before any interrupt source is armed; the STI shadow makes
    // the wait race-free.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; nothing runs afterwards.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// CPU spin-wait hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop()
}

/// Reads a 32-bit MMIO register.
#[inline(always)]
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the kit's page tables identity-map all of the low 4 GiB, so any such address is
    // mapped; callers pass device registers or RAM.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
#[inline(always)]
pub fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// CPU vendor string (CPUID leaf 0), e.g. `GenuineIntel`.
pub fn vendor() -> [u8; 12] {
    let (_, b, c, d) = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&b.to_le_bytes());
    v[4..8].copy_from_slice(&d.to_le_bytes());
    v[8..].copy_from_slice(&c.to_le_bytes());
    v
}

/// CPU brand string (CPUID leaves 0x80000002..4), zero-filled if absent.
pub fn brand() -> [u8; 48] {
    let mut s = [0u8; 48];
    if cpuid(0x8000_0000, 0).0 >= 0x8000_0004 {
        for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
            let (a, b, c, d) = cpuid(leaf, 0);
            for (j, r) in [a, b, c, d].iter().enumerate() {
                s[16 * i + 4 * j..16 * i + 4 * j + 4].copy_from_slice(&r.to_le_bytes());
            }
        }
    }
    s
}

/// Bytes as text, up to the first NUL, trimmed.
pub fn text(b: &[u8]) -> &str {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    core::str::from_utf8(&b[..end]).unwrap_or("?").trim()
}

/// `dec`/`jnz` loop of `n` iterations; returns the TSC cycles it took.
#[inline(never)]
pub extern "C" fn spin(n: u64) -> u64 {
    let t = rdtsc();
    // SAFETY: a pure register loop.
    unsafe { asm!("2: dec {0}", "jnz 2b", inout(reg) n.max(1) => _, options(nomem, nostack)) }
    rdtsc() - t
}
