//! PCI configuration space through ECAM (the MCFG's base) or, without an MCFG, configuration
//! mechanism #1 (ports 0xcf8/0xcfc); bus 0 only.

use crate::arch;

/// How configuration space is reached.
#[derive(Clone, Copy, Debug)]
pub enum Access {
    Ecam(u64),
    Ports,
}

/// A function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub access: Access,
    pub dev: u8,
}

/// ECAM if the ACPI tables have an MCFG, else mechanism #1.
pub fn access(rsdp_hint: u64) -> Access {
    crate::acpi::rsdp(rsdp_hint)
        .and_then(|r| crate::acpi::find_table(r, b"MCFG"))
        // SAFETY: the MCFG lies in identity-mapped low memory; its first allocation at offset 44.
        .map(|t| Access::Ecam(unsafe { core::ptr::read_unaligned((t + 44) as *const u64) }))
        .unwrap_or(Access::Ports)
}

impl Function {
    pub fn read32(&self, off: u16) -> u32 {
        match self.access {
            Access::Ecam(base) => {
                arch::mmio_read32(base + ((self.dev as u64) << 15) + (off as u64 & 0xffc))
            }
            Access::Ports => {
                arch::outl(
                    0xcf8,
                    0x8000_0000 | ((self.dev as u32) << 11) | (off as u32 & 0xfc),
                );
                arch::inl(0xcfc)
            }
        }
    }

    pub fn write32(&self, off: u16, v: u32) {
        match self.access {
            Access::Ecam(base) => {
                arch::mmio_write32(base + ((self.dev as u64) << 15) + (off as u64 & 0xffc), v)
            }
            Access::Ports => {
                arch::outl(
                    0xcf8,
                    0x8000_0000 | ((self.dev as u32) << 11) | (off as u32 & 0xfc),
                );
                arch::outl(0xcfc, v)
            }
        }
    }

    pub fn read8(&self, off: u16) -> u8 {
        (self.read32(off & !3) >> (8 * (off & 3))) as u8
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// A 32-bit memory BAR's address.
    pub fn bar(&self, n: u16) -> u64 {
        (self.read32(0x10 + 4 * n) & !0xf) as u64
    }

    /// Turns on memory decoding and bus mastering.
    pub fn enable(&self) {
        let c = self.read32(4);
        self.write32(4, (c & 0xffff) | 0x6);
    }

    /// Calls `f(offset)` for each capability with ID `id`.
    pub fn for_each_cap(&self, id: u8, mut f: impl FnMut(u16)) {
        if self.read32(4) & (1 << 20) == 0 {
            return;
        }
        let mut p = self.read8(0x34) as u16 & !3;
        let mut guard = 0;
        while p != 0 && guard < 48 {
            if self.read8(p) == id {
                f(p);
            }
            p = self.read8(p + 1) as u16 & !3;
            guard += 1;
        }
    }
}

/// The first function on bus 0 with these IDs.
pub fn find(access: Access, vendor: u16, device: u16) -> Option<Function> {
    (0..32u8)
        .map(|dev| Function { access, dev })
        .find(|f| f.ids() == (vendor, device))
}
