//! ACPI: find the RSDP, walk the XSDT/RSDT, and read the MADT's local APICs.

/// Upper bound on CPUs the kit tracks.
pub const MAX_CPUS: usize = 64;

/// Enabled processors listed in the MADT.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub count: usize,
    pub apic_ids: [u32; MAX_CPUS],
}

fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: the low 4 GiB are identity-mapped; ACPI tables live there.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, b)| peek::<u8>(addr + i as u64) == *b)
}

/// The RSDP: `hint` (hvm_start_info.rsdp_paddr) if valid, else a scan of 0xe0000..0x100000.
pub fn rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < 1 << 32 && sig_at(hint, b"RSD PTR ") {
        return Some(hint);
    }
    (0xe0000..0x100000u64)
        .step_by(16)
        .find(|&a| sig_at(a, b"RSD PTR "))
}

/// Finds an ACPI table by signature through the XSDT (revision >= 2) or the RSDT.
pub fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let xsdt: u64 = if peek::<u8>(rsdp + 15) >= 2 {
        peek(rsdp + 24)
    } else {
        0
    };
    let (root, width) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (peek::<u32>(rsdp + 16) as u64, 4)
    };
    let len = peek::<u32>(root + 4) as u64;
    (0..(len.saturating_sub(36) / width))
        .map(|i| match width {
            8 => peek::<u64>(root + 36 + 8 * i),
            _ => peek::<u32>(root + 36 + 4 * i) as u64,
        })
        .find(|&t| t != 0 && sig_at(t, sig))
}

/// Enabled local APICs (and x2APICs) of the MADT.
pub fn madt_cpus(rsdp: u64) -> Option<Cpus> {
    let madt = find_table(rsdp, b"APIC")?;
    let end = madt + peek::<u32>(madt + 4) as u64;
    let mut cpus = Cpus {
        count: 0,
        apic_ids: [0; MAX_CPUS],
    };
    let mut p = madt + 44;
    while p + 2 <= end {
        let (kind, len) = (peek::<u8>(p), peek::<u8>(p + 1) as u64);
        let id = match kind {
            0 if peek::<u32>(p + 4) & 1 != 0 => Some(peek::<u8>(p + 3) as u32),
            9 if peek::<u32>(p + 8) & 1 != 0 => Some(peek::<u32>(p + 4)),
            _ => None,
        };
        if let Some(id) = id {
            if cpus.count < MAX_CPUS {
                cpus.apic_ids[cpus.count] = id;
            }
            cpus.count += 1;
        }
        if len < 2 {
            break;
        }
        p += len;
    }
    Some(cpus)
}
