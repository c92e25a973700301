//! The VT-d register file (VT-d 3.4 §10.4): offsets, the capability registers exitless offers, and
//! the state behind the writable registers. The side effects of writes live in `Iommu` (they
//! touch the caches and the invalidation queue); this module only says what is where.
//!
//! Layout (two 4 KiB pages): page 0 has every architectural register at its fixed offset; page 1
//! has the IOTLB invalidation registers (ECAP.IRO) and the fault recording registers (CAP.FRO).
//! The split matters for sidecore emulation: page 0 is guest RAM polled by the sidecore, page 1
//! still traps (register-based IOTLB invalidation is unused once queued invalidation is on, and
//! fault recording is the error path).

pub const VER: u64 = 0x00;
pub const CAP: u64 = 0x08;
pub const ECAP: u64 = 0x10;
pub const GCMD: u64 = 0x18;
pub const GSTS: u64 = 0x1c;
pub const RTADDR: u64 = 0x20;
pub const CCMD: u64 = 0x28;
pub const FSTS: u64 = 0x34;
pub const FECTL: u64 = 0x38;
pub const FEDATA: u64 = 0x3c;
pub const FEADDR: u64 = 0x40;
pub const FEUADDR: u64 = 0x44;
pub const IQH: u64 = 0x80;
pub const IQT: u64 = 0x88;
pub const IQA: u64 = 0x90;
pub const ICS: u64 = 0x9c;
pub const IECTL: u64 = 0xa0;
pub const IEDATA: u64 = 0xa4;
pub const IEADDR: u64 = 0xa8;
pub const IEUADDR: u64 = 0xac;
/// IOTLB registers: invalidate address, then the command (ECAP.IRO = 0x100, in 16-byte units).
pub const IVA: u64 = 0x1000;
pub const IOTLB: u64 = 0x1008;
/// Fault recording registers (CAP.FRO = 0x110), 16 bytes each.
pub const FRCD: u64 = 0x1100;
pub const NUM_FRCD: usize = 4;
/// Size of the register file: two pages.
pub const SIZE: u64 = 0x2000;

/// Version 1.0 (as QEMU's intel-iommu).
pub const VERSION: u32 = 0x10;

/// GCMD / GSTS bits.
pub const TE: u32 = 1 << 31;
pub const SRTP: u32 = 1 << 30;
pub const QIE: u32 = 1 << 26;
/// Fault status bits: primary fault overflow, primary pending fault, invalidation queue error,
/// invalidation completion error, invalidation time-out error.
pub const FSTS_PFO: u32 = 1 << 0;
pub const FSTS_PPF: u32 = 1 << 1;
pub const FSTS_IQE: u32 = 1 << 4;
pub const FSTS_ICE: u32 = 1 << 5;
pub const FSTS_ITE: u32 = 1 << 6;
/// Write-1-to-clear bits of FSTS (PFO, AFO, APF, IQE, ICE, ITE).
pub const FSTS_RW1C: u32 = 0x7d;
/// Interrupt mask and pending bits of FECTL / IECTL.
pub const IM: u32 = 1 << 31;
pub const IP: u32 = 1 << 30;

/// CAP: 256 domains, CM as asked, SAGAW 4-level (48-bit), MGAW 48, FRO, 2 MiB and 1 GiB
/// superpages, page-selective invalidation, NFR, MAMV 18, read and write draining.
pub fn cap(caching_mode: bool) -> u64 {
    let nd = 2u64;
    let cm = u64::from(caching_mode) << 7;
    let sagaw = 0b00100 << 8;
    let mgaw = 47 << 16;
    let fro = (FRCD / 16) << 24;
    let sllps = 0b11 << 34;
    let psi = 1 << 39;
    let nfr = (NUM_FRCD as u64 - 1) << 40;
    let mamv = 18 << 48;
    let drain = (1 << 54) | (1 << 55);
    nd | cm | sagaw | mgaw | fro | sllps | psi | nfr | mamv | drain
}

/// ECAP: coherent page walks (no cache flushes needed by the guest), queued invalidation,
/// pass-through, IRO. No interrupt remapping, no device TLB, no scalable mode (legacy tables only).
pub fn ecap() -> u64 {
    let coherent = 1;
    let qi = 1 << 1;
    let pt = 1 << 6;
    let iro = (IVA / 16) << 8;
    coherent | qi | pt | iro
}

/// The writable and status state (what is not a constant).
#[derive(Clone, Debug, Default)]
pub struct Regs {
    /// The persistent GCMD bits the guest set (TE, QIE) and the status it reads.
    pub gsts: u32,
    /// RTADDR as written, and the root table in use (latched by SRTP).
    pub rtaddr: u64,
    pub root: Option<u64>,
    pub ccmd: u64,
    pub iva: u64,
    pub iotlb: u64,
    pub fsts: u32,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    pub iqh: u64,
    pub iqt: u64,
    pub iqa: u64,
    pub ics: u32,
    pub iectl: u32,
    pub iedata: u32,
    pub ieaddr: u32,
    pub ieuaddr: u32,
    /// Fault records: (low, high) qwords; F is bit 63 of high.
    pub frcd: [(u64, u64); NUM_FRCD],
}

impl Regs {
    pub fn new() -> Self {
        Regs {
            fectl: IM,
            iectl: IM,
            ..Default::default()
        }
    }

    /// FSTS as the guest reads it: PPF is set while any record holds a fault; FRI (15:8) names
    /// the oldest pending record (Linux reads records from there on). `next` is the record the
    /// next fault goes to, so the oldest is the first pending one from there, circularly.
    pub fn fsts_value(&self, next: usize) -> u32 {
        let oldest = (0..NUM_FRCD)
            .map(|k| (next + k) % NUM_FRCD)
            .find(|&i| self.frcd[i].1 >> 63 != 0);
        let (ppf, fri) = match oldest {
            Some(i) => (FSTS_PPF, i as u32),
            None => (0, 0),
        };
        (self.fsts & FSTS_RW1C) | ppf | (fri << 8)
    }

    /// The invalidation queue: base, number of 16-byte descriptors, or None when the guest asked
    /// for 256-bit descriptors (DW, scalable mode only, which exitless does not offer).
    pub fn queue(&self) -> Option<(u64, u64)> {
        if self.iqa & (1 << 11) != 0 {
            return None;
        }
        Some((self.iqa & !0xfff, 256u64 << (self.iqa & 7)))
    }
}

/// Merges an access of `data.len()` bytes at byte `at` of a register of `width` bytes into `old`.
pub fn merge(old: u64, width: u64, at: u64, data: &[u8]) -> u64 {
    let mut b = old.to_le_bytes();
    for (i, v) in data.iter().enumerate() {
        let k = (at as usize) + i;
        if k < width as usize {
            b[k] = *v;
        }
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_say_what_linux_reads() {
        let c = cap(true);
        assert_eq!(c & 7, 2, "ND: 256 domains");
        assert_ne!(c & (1 << 7), 0, "CM");
        assert_eq!(cap(false) & (1 << 7), 0);
        assert_eq!((c >> 8) & 0x1f, 0b100, "SAGAW: 4-level only");
        assert_eq!((c >> 16) & 0x3f, 47, "MGAW");
        assert_eq!(((c >> 24) & 0x3ff) * 16, FRCD);
        assert_eq!(((c >> 40) & 0xff) + 1, NUM_FRCD as u64);
        assert_eq!(((ecap() >> 8) & 0x3ff) * 16, IVA);
        assert_eq!(ecap() & (1 << 3), 0, "no interrupt remapping");
        assert!(FRCD + 16 * NUM_FRCD as u64 <= SIZE);
    }

    #[test]
    fn partial_writes_merge() {
        assert_eq!(
            merge(0x1111_2222_3333_4444, 8, 4, &[0xaa, 0xbb, 0xcc, 0xdd]),
            0xddcc_bbaa_3333_4444
        );
        assert_eq!(
            merge(0x1234, 4, 3, &[1, 2, 3]),
            0x0100_1234,
            "clipped to the register"
        );
    }
}
