//! The guest physical address map and the I/O port map of an exitless VM.
//!
//! Owns every fixed address the guest can see. Other modules take their addresses from here so that
//! the ACPI tables, the E820 map, the boot code and the device buses can never disagree.

/// Where the boot GDT lives (boot-time only; the guest replaces it).
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the boot IDT lives (a null IDT: the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables: PML4, PDPT and one page directory mapping the first GiB with 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Initial stack pointer for the 64-bit Linux boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of conventional memory usable by the guest; 0x9fc00..0x100000 is EBDA, VGA hole and BIOS area.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) live in the BIOS area, where a kernel also finds the RSDP by scanning.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;

/// Low RAM ends here at most; the rest of RAM goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// 32-bit PCI memory window (BARs).
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM), 256 buses.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Platform MMIO devices (the test kit's probe device lives here).
pub const PLATFORM_MMIO_START: u64 = 0xf000_0000;
/// The kit probe device's MMIO page (see `devices::legacy::probe`).
pub const PROBE_MMIO_START: u64 = 0xf000_0000;
pub const PROBE_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The emulated VT-d's register file (`--iommu`), two pages (QEMU's intel-iommu is here too).
pub const IOMMU_MMIO_START: u64 = 0xfed9_0000;
pub const IOMMU_MMIO_SIZE: u64 = 0x2000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Start of high RAM.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// I/O ports.
pub mod ports {
    /// COM1, a 16550A UART on IRQ 4.
    pub const COM1: u16 = 0x3f8;
    pub const COM1_IRQ: u32 = 4;
    /// CMOS RTC (index, data).
    pub const RTC: u16 = 0x70;
    /// i8042 keyboard controller (data, command). Only reset (0xfe to 0x64) matters.
    pub const I8042_DATA: u16 = 0x60;
    pub const I8042_CMD: u16 = 0x64;
    /// QEMU-compatible `isa-debug-exit`: writing V ends the VM with status `(V << 1) | 1`.
    /// Present only for kit guests (`--debug-exit`), so the same guest binary behaves alike under QEMU.
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// ACPI PM1a event block (status, enable), control block and PM timer (ICH9/q35 layout, so a kit
    /// guest powers off the same way under QEMU `-M q35`).
    pub const PM_BASE: u16 = 0x600;
    pub const PM1A_EVT: u16 = 0x600;
    pub const PM1A_CNT: u16 = 0x604;
    pub const PM_TMR: u16 = 0x608;
    pub const PM_LEN: u16 = 0x10;
    /// ACPI SCI.
    pub const SCI_IRQ: u32 = 9;
    /// Reset control register (FADT RESET_REG), byte-wide; 0x06 resets.
    pub const RESET_CF9: u16 = 0xcf9;
    /// PCI configuration mechanism #1.
    pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
    pub const PCI_CONFIG_DATA: u16 = 0xcfc;
    /// The kit probe device: a claimed port range whose accesses are counted (see
    /// `devices::legacy::probe`).
    pub const PROBE: u16 = 0x510;
    pub const PROBE_LEN: u16 = 0x10;
}

/// ACPI S5 sleep type written to PM1a_CNT.SLP_TYP (same value as QEMU's q35 DSDT `_S5_`).
pub const S5_SLP_TYP: u16 = 0;
/// SLP_EN bit of PM1a_CNT.
pub const SLP_EN: u16 = 1 << 13;
