//! ACPI tables: how a stock Linux kernel finds the vCPUs, the interrupt controllers, the PCI host
//! bridge, the serial port and the way to power off and reset.
//!
//! Owns everything written to guest memory in the BIOS area between [`layout::ACPI_START`] and
//! [`layout::ACPI_END`]: the RSDP (first, 16-byte aligned, so a kernel that scans the BIOS area for
//! "RSD PTR " finds it even without a boot-protocol pointer), then XSDT, FADT, FACS, DSDT, MADT and,
//! when the VM has a PCIe host bridge, MCFG. Every address and port comes from [`layout`], so the
//! tables cannot disagree with the device models or the E820 map (which must mark the ACPI area
//! reserved).
//!
//! Why a full (not hardware-reduced) ACPI platform: a stock Debian kernel needs the MADT for SMP and
//! the FADT's PM1 control block plus `\_S5_` to power off; with `acpi=off` it loses both. The FADT
//! deliberately leaves the "8042 present" boot flag clear (Linux then skips probing the keyboard
//! controller, which costs seconds of emulated CPL0 time on PVM hosts) and says "no VGA" (no
//! `vgacon` probing of the legacy frame buffer). `SMI_CMD` is 0: the platform is always in ACPI
//! mode, so the kernel never does the SMI handshake.
//!
//! Static tables use `acpi_tables` where its builders fit (RSDP, XSDT, FADT, FACS, MCFG); the MADT
//! is assembled by hand on [`Sdt`] because the crate's MADT builder cannot set the `PCAT_COMPAT`
//! flag nor emit x86 interrupt source overrides and local APIC NMI entries. The DSDT is AML built
//! with `acpi_tables::aml`.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{self, ports};

/// A PCI segment's ECAM window.
///
/// `base` is the ECAM base address as the MCFG gives it: the address bus 0's configuration space
/// would have, so bus `b` starts at `base + (b << 20)` even when `start_bus` is not 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamRegion {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

impl EcamRegion {
    /// The guest-physical range `[start, end)` the buses `start_bus..=end_bus` occupy, or `None`
    /// when the bus range is empty or the window overflows the address space.
    pub fn window(&self) -> Option<(u64, u64)> {
        if self.start_bus > self.end_bus {
            return None;
        }
        let start = self.base.checked_add(u64::from(self.start_bus) << 20)?;
        let end = self.base.checked_add((u64::from(self.end_bus) + 1) << 20)?;
        Some((start, end))
    }
}

/// What the ACPI tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    pub num_cpus: u8,
    pub pci_ecam: Option<EcamRegion>,
    /// The emulated VT-d's register base, for a DMAR table (`--iommu`).
    pub dmar: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit in the BIOS area")]
    TooLarge,
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(String),
    #[error("invalid ACPI configuration: {0}")]
    Invalid(&'static str),
}

/// OEM ID of every table (and of the RSDP).
pub const OEM_ID: [u8; 6] = *b"EXITLS";
/// OEM table ID of every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"EXITLESS";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;

/// Width of the ACPI PM timer the FADT announces (`TMR_VAL_EXT`): the PM timer device at
/// [`ports::PM_TMR`] must count with 32 bits (3.579545 MHz). Linux itself only uses 24 of them.
pub const PM_TIMER_BITS: u32 = 32;

/// Reset value written to the FADT `RESET_REG` ([`ports::RESET_CF9`]).
pub const RESET_VALUE: u8 = 6;

/// `PM1_EVT_LEN`: status and enable registers, 16 bits each.
const PM1_EVT_LEN: u8 = 4;
/// `PM1_CNT_LEN`.
const PM1_CNT_LEN: u8 = 2;
/// `PM_TMR_LEN`.
const PM_TMR_LEN: u8 = 4;

/// FADT `IAPC_BOOT_ARCH` flags (ACPI 6.5 table 5.11).
pub mod boot_arch {
    /// Legacy (ISA/LPC) devices such as the UART and the RTC are present.
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// An 8042 keyboard controller is present. Never set by exitless.
    pub const I8042: u16 = 1 << 1;
    /// VGA is not present: do not probe the legacy frame buffer.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// MSI must not be enabled.
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// The OS must not enable PCIe ASPM.
    pub const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
    /// No CMOS RTC at the legacy ports.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// The `IAPC_BOOT_ARCH` the FADT carries.
pub const IAPC_BOOT_ARCH: u16 = boot_arch::LEGACY_DEVICES | boot_arch::VGA_NOT_PRESENT;

/// MADT flag: the system also has dual 8259 PICs (Linux then masks them).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override flags for the SCI: active high (01), level triggered (11 << 2).
pub const SCI_OVERRIDE_FLAGS: u16 = 0x000d;

const SCI_INT: u16 = ports::SCI_IRQ as u16;
const _: () = assert!(ports::SCI_IRQ <= u16::MAX as u32);
const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE <= 1 << 32);

/// Alignment of every table but the FACS.
const TABLE_ALIGN: u64 = 16;
/// The FACS must be 64-byte aligned.
const FACS_ALIGN: u64 = 64;

/// Hands out addresses in `[ACPI_START, ACPI_END)`.
struct Allocator {
    next: u64,
    end: u64,
}

impl Allocator {
    fn new(start: u64, end: u64) -> Self {
        Allocator { next: start, end }
    }

    /// Reserves `len` bytes aligned to `align` (a power of two) and returns their address.
    fn alloc(&mut self, len: usize, align: u64) -> Result<u64, AcpiError> {
        let len = u64::try_from(len).map_err(|_| AcpiError::TooLarge)?;
        let start = self
            .next
            .checked_add(align - 1)
            .ok_or(AcpiError::TooLarge)?
            & !(align - 1);
        let end = start.checked_add(len).ok_or(AcpiError::TooLarge)?;
        if end > self.end {
            return Err(AcpiError::TooLarge);
        }
        self.next = end;
        Ok(start)
    }
}

/// `IRQNoFlags() { irq }`: the small ISA IRQ descriptor (edge triggered, active high, exclusive).
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item, type 4 (IRQ), length 2
        sink.word(1u16 << self.0);
    }
}

fn serialize(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The AML body of the DSDT (everything after the table header).
fn dsdt_aml(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut bytes = Vec::new();

    // \_S5_: SLP_TYPa, SLP_TYPb, reserved, reserved.
    let slp_typ = layout::S5_SLP_TYP;
    Name::new(
        Path::new("\\_S5_"),
        &Package::new(vec![&slp_typ, &slp_typ, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut bytes);

    let mut sb = com1();
    if let Some(ecam) = &cfg.pci_ecam {
        sb.extend_from_slice(&pci_objects(ecam)?);
    }
    bytes.extend_from_slice(&Scope::raw(Path::new("\\_SB_"), sb));
    Ok(bytes)
}

/// `\_SB.COM1`: the 16550A at the legacy COM1 ports and IRQ.
fn com1() -> Vec<u8> {
    let io = IO::new(ports::COM1, ports::COM1, 1, 8);
    let irq = IrqNoFlags(ports::COM1_IRQ as u8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    serialize(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &aml::ONE),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

/// `\_SB.PCI0` and `\_SB.MRES` (a PNP0C02 device reserving the ECAM window; without it Linux
/// rejects the MCFG and falls back to configuration mechanism #1).
fn pci_objects(ecam: &EcamRegion) -> Result<Vec<u8>, AcpiError> {
    let (ecam_start, ecam_end) = ecam
        .window()
        .ok_or(AcpiError::Invalid("empty or overflowing ECAM bus range"))?;

    let bus_range = AddressSpace::<u16>::new_bus_number(ecam.start_bus.into(), ecam.end_bus.into());
    let cfg_ports = IO::new(ports::PCI_CONFIG_ADDRESS, ports::PCI_CONFIG_ADDRESS, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, ports::PCI_CONFIG_ADDRESS - 1, None);
    let io_high = AddressSpace::<u16>::new_io(ports::PCI_CONFIG_ADDRESS + 8, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        (layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus_range, &cfg_ports, &io_low, &io_high, &mmio32]);
    let bbn: u8 = ecam.start_bus;
    let mut bytes = serialize(&Device::new(
        Path::new("PCI0"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0A08")),
            &Name::new(Path::new("_CID"), &EISAName::new("PNP0A03")),
            &Name::new(Path::new("_ADR"), &aml::ZERO),
            &Name::new(Path::new("_SEG"), &aml::ZERO),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_BBN"), &bbn),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ));

    let len = ecam_end - ecam_start;
    let m32;
    let m64;
    let window: &dyn Aml = match (u32::try_from(ecam_start), u32::try_from(len)) {
        (Ok(start), Ok(len)) if ecam_end <= 1 << 32 => {
            m32 = Memory32Fixed::new(true, start, len);
            &m32
        }
        _ => {
            m64 = AddressSpace::<u64>::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                ecam_start,
                ecam_end - 1,
                None,
            );
            &m64
        }
    };
    let mres_crs = ResourceTemplate::new(vec![window]);
    bytes.extend_from_slice(&serialize(&Device::new(
        Path::new("MRES"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0C02")),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &mres_crs),
        ],
    )));
    Ok(bytes)
}

/// The DSDT: header plus AML.
fn dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    // Revision 2: 64-bit AML integers.
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&dsdt_aml(cfg)?);
    Ok(sdt.as_slice().to_vec())
}

/// The MADT: local APICs, the I/O APIC, ISA overrides and the LINT1 NMI.
fn madt(num_cpus: u8) -> Vec<u8> {
    // Revision 5 (ACPI 6.2+).
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.write_u32(36, layout::LAPIC_START as u32);
    sdt.write_u32(40, MADT_PCAT_COMPAT);

    let mut entries = Vec::new();
    for i in 0..num_cpus {
        // Processor Local APIC: type 0, length 8, ACPI processor UID, APIC ID, flags (enabled).
        entries.extend_from_slice(&[0, 8, i, i]);
        entries.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, ID, reserved, address, GSI base.
    entries.extend_from_slice(&[1, 12, num_cpus, 0]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides: type 2, length 10, bus 0 (ISA), source, GSI, flags.
    for (source, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (SCI_INT as u8, ports::SCI_IRQ, SCI_OVERRIDE_FLAGS),
    ] {
        entries.extend_from_slice(&[2, 10, 0, source]);
        entries.extend_from_slice(&gsi.to_le_bytes());
        entries.extend_from_slice(&flags.to_le_bytes());
    }
    // Local APIC NMI: type 4, length 6, all processors, flags (conforming), LINT1.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);

    sdt.append_slice(&entries);
    sdt.as_slice().to_vec()
}

/// The DMAR (Intel VT-d 3.4 §8): one remapping unit (DRHD) for every PCI device of segment 0
/// (INCLUDE_PCI_ALL, so no device scopes), its two register pages at `reg_base`. Flags are 0: no
/// interrupt remapping (so no x2APIC opt-out either); Linux then keeps x2APIC in physical mode
/// under KVM, and enables DMA remapping with `intel_iommu=on`.
fn dmar(reg_base: u64) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DMAR", 48, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // Host address width minus one (48 bits), flags, 10 reserved bytes.
    sdt.write_u8(36, 47);
    sdt.write_u8(37, 0);
    let mut drhd = Vec::with_capacity(16);
    drhd.extend_from_slice(&0u16.to_le_bytes()); // type: DRHD
    drhd.extend_from_slice(&16u16.to_le_bytes()); // length
    drhd.push(1); // flags: INCLUDE_PCI_ALL
    drhd.push(1); // size: 2^1 pages of registers
    drhd.extend_from_slice(&0u16.to_le_bytes()); // segment
    drhd.extend_from_slice(&reg_base.to_le_bytes());
    sdt.append_slice(&drhd);
    sdt.as_slice().to_vec()
}

/// The FADT, pointing at the FACS and the DSDT.
fn fadt(facs_addr: u64, dsdt_addr: u64) -> Vec<u8> {
    let io = |width_bits: u8, access: AccessSize, port: u16| {
        GAS::new(GasSpace::SystemIo, width_bits, 0, access, port.into())
    };
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_64(facs_addr)
        .dsdt_64(dsdt_addr)
        .flag(Flags::Wbinvd)
        // PWR_BUTTON clear: the power button is the fixed-hardware one in PM1 (the API's
        // shutdown presses it); SLP_BUTTON set: there is no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    f.sci_int = SCI_INT.into();
    // SMI_CMD, ACPI_ENABLE and ACPI_DISABLE stay 0: always in ACPI mode.
    f.pm1a_evt_blk = u32::from(ports::PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(ports::PM1A_CNT).into();
    f.pm_tmr_blk = u32::from(ports::PM_TMR).into();
    f.pm1_evt_len = PM1_EVT_LEN;
    f.pm1_cnt_len = PM1_CNT_LEN;
    f.pm_tmr_len = PM_TMR_LEN;
    // C2 and C3 not supported (latencies above 100 and 1000 µs).
    f.p_lvl2_lat = 101u16.into();
    f.p_lvl3_lat = 1001u16.into();
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.reset_reg = io(8, AccessSize::ByteAccess, ports::RESET_CF9);
    f.reset_value = RESET_VALUE;
    f.x_pm1a_evt_blk = io(PM1_EVT_LEN * 8, AccessSize::WordAccess, ports::PM1A_EVT);
    f.x_pm1a_cnt_blk = io(PM1_CNT_LEN * 8, AccessSize::WordAccess, ports::PM1A_CNT);
    f.x_pm_tmr_blk = io(PM_TMR_LEN * 8, AccessSize::DwordAccess, ports::PM_TMR);
    serialize(&f.finalize())
}

/// Writes the tables into guest memory at `layout::ACPI_START` and returns the RSDP's address.
pub fn setup_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if cfg.num_cpus == 0 {
        return Err(AcpiError::Invalid("no vCPUs"));
    }

    // Tables whose contents do not depend on where the others go.
    let facs = serialize(&FACS::new());
    let dsdt = dsdt(cfg)?;
    let madt = madt(cfg.num_cpus);
    let mcfg = cfg.pci_ecam.map(|ecam| {
        let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        mcfg.add_ecam(ecam.base, 0, ecam.start_bus, ecam.end_bus);
        serialize(&mcfg)
    });
    let dmar = cfg.dmar.map(dmar);
    let num_xsdt_entries = 2 + usize::from(mcfg.is_some()) + usize::from(dmar.is_some());

    // Placement: RSDP first, at the start of the area.
    let mut alloc = Allocator::new(layout::ACPI_START, layout::ACPI_END);
    let rsdp_addr = alloc.alloc(Rsdp::len(), TABLE_ALIGN)?;
    let xsdt_addr = alloc.alloc(36 + 8 * num_xsdt_entries, TABLE_ALIGN)?;
    let fadt_addr = alloc.alloc(acpi_tables::fadt::FADT::len(), TABLE_ALIGN)?;
    let facs_addr = alloc.alloc(facs.len(), FACS_ALIGN)?;
    let dsdt_addr = alloc.alloc(dsdt.len(), TABLE_ALIGN)?;
    let madt_addr = alloc.alloc(madt.len(), TABLE_ALIGN)?;
    let mcfg_addr = match &mcfg {
        Some(mcfg) => Some(alloc.alloc(mcfg.len(), TABLE_ALIGN)?),
        None => None,
    };
    let dmar_addr = match &dmar {
        Some(t) => Some(alloc.alloc(t.len(), TABLE_ALIGN)?),
        None => None,
    };

    let fadt = fadt(facs_addr, dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(addr) = mcfg_addr {
        xsdt.add_entry(addr);
    }
    if let Some(addr) = dmar_addr {
        xsdt.add_entry(addr);
    }
    let xsdt = serialize(&xsdt);
    let rsdp = serialize(&Rsdp::new(OEM_ID, xsdt_addr));

    let mut writes: Vec<(u64, &[u8])> = vec![
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (fadt_addr, &fadt),
        (facs_addr, &facs),
        (dsdt_addr, &dsdt),
        (madt_addr, &madt),
    ];
    if let (Some(addr), Some(mcfg)) = (mcfg_addr, &mcfg) {
        writes.push((addr, mcfg));
    }
    if let (Some(addr), Some(dmar)) = (dmar_addr, &dmar) {
        writes.push((addr, dmar));
    }
    for (addr, bytes) in writes {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Memory(format!("at {addr:#x}: {e}")))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn ecam() -> EcamRegion {
        EcamRegion {
            base: layout::PCI_ECAM_START,
            start_bus: 0,
            end_bus: 255,
        }
    }

    fn cfg(num_cpus: u8, pci_ecam: Option<EcamRegion>) -> AcpiConfig {
        AcpiConfig {
            num_cpus,
            pci_ecam,
            dmar: None,
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads a whole SDT (by its header's length) and checks its checksum and bounds.
    fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(addr >= layout::ACPI_START);
        assert!(
            addr + len as u64 <= layout::ACPI_END,
            "table at {addr:#x} ends past ACPI_END"
        );
        let t = read(mem, addr, len);
        assert_eq!(
            sum(&t),
            0,
            "bad checksum in {:?}",
            String::from_utf8_lossy(&t[..4])
        );
        t
    }

    struct Tables {
        rsdp: u64,
        xsdt: Vec<u8>,
        by_sig: Vec<([u8; 4], u64, Vec<u8>)>,
    }

    impl Tables {
        fn get(&self, sig: &[u8; 4]) -> Option<&([u8; 4], u64, Vec<u8>)> {
            self.by_sig.iter().find(|(s, _, _)| s == sig)
        }
    }

    fn load(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Tables {
        let rsdp = setup_acpi_tables(mem, cfg).unwrap().0;
        let r = read(mem, rsdp, 36);
        let xsdt_addr = u64_at(&r, 24);
        let xsdt = table(mem, xsdt_addr);
        let by_sig = (36..xsdt.len())
            .step_by(8)
            .map(|off| {
                let addr = u64_at(&xsdt, off);
                let t = table(mem, addr);
                (t[..4].try_into().unwrap(), addr, t)
            })
            .collect();
        Tables { rsdp, xsdt, by_sig }
    }

    #[test]
    fn rsdp_at_start_with_both_checksums() {
        let mem = memory();
        let rsdp = setup_acpi_tables(&mem, &cfg(1, None)).unwrap();
        assert_eq!(rsdp, GuestAddress(layout::ACPI_START));
        assert_eq!(rsdp.0 % 16, 0);
        let r = read(&mem, rsdp.0, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(sum(&r[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(u32_at(&r, 20), 36, "length");
        assert_eq!(sum(&r), 0, "extended checksum");
        let xsdt = u64_at(&r, 24);
        assert_ne!(xsdt, 0);
        assert_eq!(&read(&mem, xsdt, 4), b"XSDT");
    }

    #[test]
    fn xsdt_lists_fadt_madt_and_mcfg_only_with_ecam() {
        let mem = memory();
        let t = load(&mem, &cfg(2, None));
        assert_eq!(t.rsdp, layout::ACPI_START);
        let sigs: Vec<_> = t.by_sig.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC"]);
        assert_eq!(&t.xsdt[..4], b"XSDT");

        let mem = memory();
        let t = load(&mem, &cfg(2, Some(ecam())));
        let sigs: Vec<_> = t.by_sig.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG"]);
    }

    #[test]
    fn mcfg_covers_the_buses() {
        let mem = memory();
        let region = EcamRegion {
            base: layout::PCI_ECAM_START,
            start_bus: 0,
            end_bus: 15,
        };
        let t = load(&mem, &cfg(1, Some(region)));
        let (_, _, mcfg) = t.get(b"MCFG").unwrap();
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(mcfg, 44), layout::PCI_ECAM_START);
        assert_eq!(u16_at(mcfg, 52), 0, "segment");
        assert_eq!(mcfg[54], 0, "start bus");
        assert_eq!(mcfg[55], 15, "end bus");
    }

    #[test]
    fn madt_has_one_lapic_per_cpu_ioapic_overrides_and_nmi() {
        for n in [1u8, 2, 4, 8, 255] {
            let mem = memory();
            let t = load(&mem, &cfg(n, None));
            let (_, _, madt) = t.get(b"APIC").unwrap();
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT");
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut overrides = Vec::new();
            let mut nmis = Vec::new();
            let mut off = 44;
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                assert!(len >= 2 && off + len <= madt.len());
                let e = &madt[off..off + len];
                match ty {
                    0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                    1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                    2 => overrides.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8))),
                    4 => nmis.push((e[2], u16_at(e, 3), e[5])),
                    _ => panic!("unexpected MADT entry type {ty}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapics.len(), n as usize);
            for (i, (uid, apic_id, flags)) in lapics.into_iter().enumerate() {
                assert_eq!((uid as usize, apic_id as usize, flags), (i, i, 1));
            }
            assert_eq!(ioapics, vec![(n, 0xfec0_0000, 0)]);
            assert_eq!(overrides, vec![(0, 0, 2, 0), (0, 9, 9, 0x000d)]);
            assert_eq!(nmis, vec![(0xff, 0, 1)]);
        }
    }

    #[test]
    fn fadt_fields() {
        let mem = memory();
        let t = load(&mem, &cfg(2, Some(ecam())));
        let (_, _, f) = t.get(b"FACP").unwrap();
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major revision");
        assert_eq!(u16_at(f, 46), 9, "SCI_INT");
        assert_eq!(u32_at(f, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(f, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(f, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(f, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(
            (f[88], f[89], f[91]),
            (4, 2, 4),
            "PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN"
        );
        let boot_arch = u16_at(f, 109);
        assert_eq!(boot_arch & boot_arch::I8042, 0, "no 8042");
        assert_ne!(boot_arch & boot_arch::VGA_NOT_PRESENT, 0);
        assert_eq!(boot_arch & boot_arch::MSI_NOT_SUPPORTED, 0);
        assert_eq!(boot_arch & boot_arch::CMOS_RTC_NOT_PRESENT, 0);
        let flags = u32_at(f, 112);
        for bit in [0, 5, 8, 10] {
            assert_ne!(flags & (1 << bit), 0, "flag bit {bit}");
        }
        assert_eq!(
            flags & (1 << 4),
            0,
            "PWR_BUTTON clear: a fixed-hardware power button"
        );
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        // RESET_REG: system I/O, 8 bits, byte access, port 0xcf9; RESET_VALUE 6.
        assert_eq!(&f[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(f, 120), 0xcf9);
        assert_eq!(f[128], 6);
        // DSDT and FACS through the X_ fields only.
        assert_eq!(u32_at(f, 36), 0, "FIRMWARE_CTRL");
        assert_eq!(u32_at(f, 40), 0, "DSDT");
        let facs = u64_at(f, 132);
        let dsdt = u64_at(f, 140);
        assert_eq!(facs % 64, 0);
        let facs_bytes = read(&mem, facs, 64);
        assert_eq!(&facs_bytes[..4], b"FACS");
        assert_eq!(u32_at(&facs_bytes, 4), 64);
        assert!(facs + 64 <= layout::ACPI_END);
        assert_eq!(&table(&mem, dsdt)[..4], b"DSDT");
        // X_PM1a_EVT_BLK, X_PM1a_CNT_BLK, X_PM_TMR_BLK.
        assert_eq!(&f[148..152], &[1, 32, 0, 2]);
        assert_eq!(u64_at(f, 152), 0x600);
        assert_eq!(&f[172..176], &[1, 16, 0, 2]);
        assert_eq!(u64_at(f, 176), 0x604);
        assert_eq!(&f[208..212], &[1, 32, 0, 3]);
        assert_eq!(u64_at(f, 212), 0x608);
        // PM1b, PM2, GPE blocks absent.
        assert_eq!(u32_at(f, 60), 0);
        assert_eq!(u32_at(f, 80), 0);
    }

    fn dsdt_of(mem: &GuestMemoryMmap, t: &Tables) -> Vec<u8> {
        let (_, _, f) = t.get(b"FACP").unwrap();
        table(mem, u64_at(f, 140))
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dsdt_has_s5_and_com1() {
        let mem = memory();
        let t = load(&mem, &cfg(1, None));
        let d = dsdt_of(&mem, &t);
        assert_eq!(d[8], 2, "DSDT revision 2");
        // Name(\_S5_, Package(4) {0, 0, 0, 0}).
        assert!(contains(&d, b"\x08\\_S5_\x12\x06\x04\x00\x00\x00\x00"));
        assert!(contains(&d, b"COM1"));
        // EISAID("PNP0501") = 0x0105d041; IO 0x3f8 len 8; IRQ 4.
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(contains(
            &d,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        assert!(contains(&d, &[0x22, 0x10, 0x00]));
        assert!(!contains(&d, b"PCI0"));
    }

    #[test]
    fn dsdt_pci_host_bridge_and_ecam_reservation() {
        let mem = memory();
        let t = load(&mem, &cfg(1, Some(ecam())));
        let d = dsdt_of(&mem, &t);
        assert!(contains(&d, b"PCI0"));
        assert!(contains(&d, b"MRES"));
        // PNP0A08, PNP0A03, PNP0C02.
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        // Memory32Fixed(ReadWrite, 0xe0000000, 0x10000000).
        let mut m32 = vec![0x86, 0x09, 0x00, 0x01];
        m32.extend_from_slice(&0xe000_0000u32.to_le_bytes());
        m32.extend_from_slice(&0x1000_0000u32.to_le_bytes());
        assert!(contains(&d, &m32));
        // DWordMemory min/max of the 32-bit window.
        let mut win = 0xc000_0000u32.to_le_bytes().to_vec();
        win.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
        assert!(contains(&d, &win));
        // WordIO 0x0000-0x0cf7 and 0x0d00-0xffff.
        assert!(contains(
            &d,
            &[0x00, 0x00, 0x00, 0x00, 0xf7, 0x0c, 0x00, 0x00, 0xf8, 0x0c]
        ));
        assert!(contains(
            &d,
            &[0x00, 0x00, 0x00, 0x0d, 0xff, 0xff, 0x00, 0x00, 0x00, 0xf3]
        ));
        // WordBusNumber 0-255.
        assert!(contains(
            &d,
            &[0x00, 0x00, 0x00, 0x00, 0xff, 0x00, 0x00, 0x00, 0x00, 0x01]
        ));
    }

    #[test]
    fn ecam_window_above_4g_uses_a_qword_descriptor() {
        let mem = memory();
        let region = EcamRegion {
            base: 0x40_0000_0000,
            start_bus: 0,
            end_bus: 3,
        };
        let t = load(&mem, &cfg(1, Some(region)));
        let d = dsdt_of(&mem, &t);
        let mut min_max = 0x40_0000_0000u64.to_le_bytes().to_vec();
        min_max.extend_from_slice(&0x40_003f_ffffu64.to_le_bytes());
        assert!(contains(&d, &min_max));
    }

    #[test]
    fn all_cpu_counts_fit() {
        // u8 caps the vCPU count; even 255 leaves most of the 128 KiB area free.
        let mem = memory();
        let t = load(&mem, &cfg(255, Some(ecam())));
        for (_, addr, bytes) in &t.by_sig {
            assert!(addr + bytes.len() as u64 <= layout::ACPI_END);
        }
    }

    #[test]
    fn invalid_configs_are_errors() {
        let mem = memory();
        assert!(matches!(
            setup_acpi_tables(&mem, &cfg(0, None)),
            Err(AcpiError::Invalid(_))
        ));
        let backwards = EcamRegion {
            base: layout::PCI_ECAM_START,
            start_bus: 5,
            end_bus: 4,
        };
        assert!(matches!(
            setup_acpi_tables(&mem, &cfg(1, Some(backwards))),
            Err(AcpiError::Invalid(_))
        ));
        let overflowing = EcamRegion {
            base: u64::MAX - 0xfff,
            start_bus: 0,
            end_bus: 0,
        };
        assert!(matches!(
            setup_acpi_tables(&mem, &cfg(1, Some(overflowing))),
            Err(AcpiError::Invalid(_))
        ));
    }

    #[test]
    fn allocator_reports_too_large_instead_of_overflowing() {
        let mut a = Allocator::new(layout::ACPI_START, layout::ACPI_END);
        assert_eq!(a.alloc(36, 16).unwrap(), layout::ACPI_START);
        assert_eq!(a.alloc(10, 64).unwrap(), layout::ACPI_START + 64);
        assert!(matches!(a.alloc(0x20000, 16), Err(AcpiError::TooLarge)));
        assert!(matches!(a.alloc(usize::MAX, 16), Err(AcpiError::TooLarge)));
        let mut a = Allocator::new(u64::MAX - 4, u64::MAX);
        assert!(matches!(a.alloc(1, 16), Err(AcpiError::TooLarge)));
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            setup_acpi_tables(&mem, &cfg(1, None)),
            Err(AcpiError::Memory(_))
        ));
    }
}
