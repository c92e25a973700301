//! x86_64 boot: address map, ACPI tables, CPUID, MSRs, E820, kernel loading and boot registers;
//! nested virtualization.
pub mod acpi;
pub mod boot;
pub mod bzimage;
pub mod cpuid;
pub mod elf_stream;
pub mod irq_path;
pub mod layout;
pub mod msr;
pub mod nested;
