//! ACPI tables (stub: being written).
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// A PCI segment's ECAM window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamRegion {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// What the ACPI tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    pub num_cpus: u8,
    pub pci_ecam: Option<EcamRegion>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables do not fit in the BIOS area")]
    TooLarge,
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Memory(String),
}

/// Writes the tables into guest memory at `layout::ACPI_START` and returns the RSDP's address.
pub fn setup_acpi_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let _ = (mem, cfg);
    todo!()
}
