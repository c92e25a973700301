//! Loading a kernel into guest memory and the vCPU state it starts in.
//!
//! Owns: kernel format detection (bzImage, ELF `vmlinux` with or without a PVH note), the initrd and
//! command line placement, the E820 map, Linux `boot_params`, PVH `hvm_start_info`, the boot page
//! tables and GDT, and the boot register state of the first vCPU. Kernel parsing itself is
//! `linux-loader`'s, but for a bzImage whose payload the VMM unpacks straight into guest memory
//! (`bzimage`, `elf_stream`); this module only decides where things go.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::bzimage::Payload;
use super::elf_stream::{ElfKernel, ElfSink};
use super::layout::*;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const PVH_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_MAX_ZEROPAGE: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {err}")]
    OpenKernel { path: String, err: std::io::Error },
    #[error("cannot open initrd {path}: {err}")]
    OpenInitrd { path: String, err: std::io::Error },
    #[error(
        "{path} is not a kernel exitless can boot (neither an x86_64 ELF nor a bzImage): {err}"
    )]
    NotAKernel { path: String, err: String },
    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot data to guest memory: {0}")]
    Memory(String),
}

fn mem_err<E: std::fmt::Display>(e: E) -> BootError {
    BootError::Memory(e.to_string())
}

/// The kinds of kernel images we recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

/// How the first vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryProtocol {
    /// 64-bit Linux boot protocol: long mode, paging on, `rsi` = `boot_params`.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh { entry: u64 },
}

/// What was loaded and how to start it.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// A bzImage whose payload the VMM unpacked (booted as the ELF inside).
    pub unpacked: bool,
    pub entry: EntryProtocol,
    pub kernel_end: u64,
}

/// Sniffs the first bytes of a kernel image.
pub fn detect_format(header: &[u8]) -> Option<KernelFormat> {
    if header.len() >= 4 && &header[..4] == b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// The E820 map of a VM with `low_ram` bytes below the MMIO hole and `high_ram` bytes above 4 GiB.
pub fn e820_map(low_ram: u64, high_ram: u64, pci_ecam: bool) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, ACPI_END - ACPI_START, E820_RESERVED),
    ];
    if low_ram > HIMEM_START {
        map.push((HIMEM_START, low_ram - HIMEM_START, E820_RAM));
    }
    if pci_ecam {
        map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    }
    if high_ram > 0 {
        map.push((HIGH_RAM_START, high_ram, E820_RAM));
    }
    map
}

/// Everything the boot code needs to know.
pub struct BootSpec<'a> {
    pub kernel: &'a Path,
    pub kernel_bytes: Option<&'a [u8]>,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub low_ram: u64,
    pub high_ram: u64,
    pub rsdp: GuestAddress,
    pub pci_ecam: bool,
    /// Unpack a bzImage's compressed kernel in the VMM (see `bzimage`) instead of running its
    /// decompressor in the guest.
    pub unpack_bzimage: bool,
}

/// A `Read + Seek + ReadVolatile` view of either a file or embedded bytes.
enum KernelSource {
    File(File),
    Bytes(std::io::Cursor<Vec<u8>>),
}

impl KernelSource {
    fn with<R>(&mut self, f: impl FnOnce(&mut dyn ReadSeek) -> R) -> R {
        match self {
            KernelSource::File(f0) => f(f0),
            KernelSource::Bytes(c) => f(c),
        }
    }
}

trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// Loads kernel, initrd and command line, and writes the boot information the entry protocol wants;
/// marks its phases on `clock`: for a bzImage the VMM unpacks, reading it (`kernel_read`) and
/// unpacking it straight into guest memory (`kernel_unpack`, which leaves nothing to
/// `kernel_copy`); otherwise copying the kernel in (`kernel_copy`); then the initrd.
pub fn load(
    mem: &GuestMemoryMmap,
    spec: &BootSpec,
    clock: &mut crate::startup::StartupClock,
) -> Result<LoadedKernel, BootError> {
    let path_str = spec.kernel.display().to_string();
    let mut src = open_kernel(spec)?;
    let mut header = [0u8; 0x210];
    let n = src.with(|r| {
        r.seek(SeekFrom::Start(0))?;
        read_up_to(r, &mut header)
    });
    let n = n.map_err(|err| BootError::OpenKernel {
        path: path_str.clone(),
        err,
    })?;
    let format = detect_format(&header[..n]).ok_or_else(|| BootError::NotAKernel {
        path: path_str.clone(),
        err: "no ELF magic and no bzImage \"HdrS\" header".into(),
    })?;
    let streamed = match format {
        KernelFormat::BzImage if spec.unpack_bzimage => unpack_into_guest(mem, &mut src, clock),
        _ => None,
    };
    let unpacked = streamed.is_some();
    let (format, result) = match streamed {
        Some(result) => (KernelFormat::Elf, result),
        None => (format, copy_in(mem, &mut src, format, &path_str)?),
    };
    clock.mark("kernel_copy");

    // Command line.
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(mem_err)?;
    let cmdline_size = spec.cmdline.len() as u32 + 1;

    let initrd_limit = match &result.setup_header {
        Some(h) if h.initrd_addr_max != 0 => (h.initrd_addr_max as u64 + 1).min(spec.low_ram),
        _ => spec.low_ram,
    };
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, result.kernel_end, initrd_limit)?),
        None => None,
    };
    clock.mark("initrd");
    let e820 = e820_map(spec.low_ram, spec.high_ram, spec.pci_ecam);

    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => {
            write_pvh_info(mem, &e820, initrd, spec.rsdp)?;
            EntryProtocol::Pvh { entry: addr.0 }
        }
        _ => {
            let entry = match format {
                // The 64-bit entry point of a bzImage is 0x200 past the protected-mode code.
                KernelFormat::BzImage => result.kernel_load.raw_value() + 0x200,
                KernelFormat::Elf => result.kernel_load.raw_value(),
            };
            write_boot_params(
                mem,
                result.setup_header,
                &e820,
                initrd,
                cmdline_size,
                spec.rsdp,
            )?;
            EntryProtocol::Linux64 { entry }
        }
    };
    Ok(LoadedKernel {
        format,
        unpacked,
        entry,
        kernel_end: result.kernel_end,
    })
}

fn open_kernel(spec: &BootSpec) -> Result<KernelSource, BootError> {
    match spec.kernel_bytes {
        Some(b) => Ok(KernelSource::Bytes(std::io::Cursor::new(b.to_vec()))),
        None => File::open(spec.kernel)
            .map(KernelSource::File)
            .map_err(|err| BootError::OpenKernel {
                path: spec.kernel.display().to_string(),
                err,
            }),
    }
}

/// Reads a bzImage and unpacks its payload straight into guest memory (`bzimage`, `elf_stream`):
/// what linux-loader would have said of the ELF inside, or `None`, guest RAM as it was, when the
/// payload cannot be unpacked or is not a kernel ELF the sink takes.
fn unpack_into_guest(
    mem: &GuestMemoryMmap,
    src: &mut KernelSource,
    clock: &mut crate::startup::StartupClock,
) -> Option<KernelLoaderResult> {
    let mut image = Vec::new();
    let read = src.with(|r| {
        r.seek(SeekFrom::Start(0))?;
        r.read_to_end(&mut image)
    });
    clock.mark("kernel_read");
    let kernel = read.ok().and_then(|_| stream_payload(mem, &image));
    drop(image);
    clock.mark("kernel_unpack");
    let kernel = kernel?;
    let pvh_boot_cap = match kernel.pvh_entry {
        Some(entry) => PvhBootCapability::PvhEntryPresent(GuestAddress(entry)),
        None => PvhBootCapability::PvhEntryNotPresent,
    };
    Some(KernelLoaderResult {
        kernel_load: GuestAddress(kernel.entry),
        kernel_end: kernel.kernel_end,
        setup_header: None,
        pvh_boot_cap,
    })
}

/// Streams the payload of `image` through an `ElfSink`; on a refusal wipes what it wrote.
fn stream_payload(mem: &GuestMemoryMmap, image: &[u8]) -> Option<ElfKernel> {
    let payload = Payload::of(image)?;
    let mut sink = ElfSink::new(mem, payload.size() as u64);
    let result = match payload.unpack_into(&mut sink) {
        Some(()) => sink.finish().map_err(|e| e.to_string()),
        None => Err(sink.error().map_or_else(
            || "the payload is corrupt or truncated".to_string(),
            ToString::to_string,
        )),
    };
    match result {
        Ok(kernel) => {
            log::info!(
                "unpacked the bzImage payload ({} bytes of ELF) into guest memory",
                payload.size()
            );
            Some(kernel)
        }
        Err(why) => {
            log::info!("booting the bzImage through its own decompressor: {why}");
            sink.wipe();
            None
        }
    }
}

/// Copies a kernel file into guest memory with linux-loader.
fn copy_in(
    mem: &GuestMemoryMmap,
    src: &mut KernelSource,
    format: KernelFormat,
    path: &str,
) -> Result<KernelLoaderResult, BootError> {
    let not_a_kernel = |e: linux_loader::loader::Error| BootError::NotAKernel {
        path: path.to_string(),
        err: e.to_string(),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match (src, format) {
        (KernelSource::File(f), KernelFormat::Elf) => Elf::load(mem, None, f, himem),
        (KernelSource::Bytes(c), KernelFormat::Elf) => Elf::load(mem, None, c, himem),
        (KernelSource::File(f), KernelFormat::BzImage) => BzImage::load(mem, None, f, himem),
        (KernelSource::Bytes(c), KernelFormat::BzImage) => BzImage::load(mem, None, c, himem),
    }
    .map_err(not_a_kernel)
}

fn read_up_to(r: &mut dyn ReadSeek, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Puts the initrd as high as allowed below `limit`, page aligned. Returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let open_err = |err| BootError::OpenInitrd {
        path: path.display().to_string(),
        err,
    };
    let mut f = File::open(path).map_err(open_err)?;
    let size = f.metadata().map_err(open_err)?.len();
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.max(HIMEM_START))
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(mem_err)?;
    Ok((addr, size))
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    cmdline_size: u32,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    for (i, &(addr, size, type_)) in e820.iter().take(E820_MAX_ZEROPAGE).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX_ZEROPAGE) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err)
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data C struct with no padding-dependent invariants; any byte pattern is valid.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let start = GuestAddress(PVH_INFO_START);
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let modlist_addr = start.unchecked_add(info_size);
    let memmap_addr = modlist_addr.unchecked_add(std::mem::size_of::<hvm_modlist_entry>() as u64);
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: memmap_addr.0,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr.0;
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(ModlistEntry(m), modlist_addr)
            .map_err(mem_err)?;
    }
    for (i, &(addr, size, type_)) in e820.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at =
            memmap_addr.unchecked_add((i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64);
        mem.write_obj(MemmapEntry(e), at).map_err(mem_err)?;
    }
    mem.write_obj(StartInfo(info), start).map_err(mem_err)
}

// GDT entries as the CPU wants them: (flags, base, limit) packed.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (table_index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Sets up the first vCPU's special registers for `entry`, writing the boot GDT (and for the
/// 64-bit protocol the identity-mapped page tables) into guest memory.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    entry: EntryProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), BootError> {
    let gdt: [u64; 4] = match entry {
        EntryProtocol::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        EntryProtocol::Pvh { .. } => [
            0,
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code at selector 0x10
            gdt_entry(0xc093, 0, 0xffff_ffff), // data at 0x18
        ],
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem_err)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let (code, data) = match entry {
        EntryProtocol::Linux64 { .. } => (segment_from_gdt(gdt[1], 1), segment_from_gdt(gdt[2], 2)),
        EntryProtocol::Pvh { .. } => (segment_from_gdt(gdt[2], 2), segment_from_gdt(gdt[3], 3)),
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    match entry {
        EntryProtocol::Linux64 { .. } => {
            sregs.tr = segment_from_gdt(gdt[3], 3);
            setup_page_tables(mem, sregs)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        EntryProtocol::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages (enough for the 64-bit Linux entry, which builds
/// its own tables at once).
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), BootError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(mem_err)?;
    }
    sregs.cr3 = PML4_START;
    Ok(())
}

/// General-purpose registers of the first vCPU at entry.
pub fn boot_regs(entry: EntryProtocol) -> kvm_regs {
    match entry {
        EntryProtocol::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryProtocol::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// FPU state at reset (x87 control word and MXCSR defaults).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Is `addr..addr+len` inside guest RAM? (Used by tests and callers validating placements.)
pub fn in_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    len == 0
        || (mem.address_in_range(GuestAddress(addr))
            && mem.address_in_range(GuestAddress(addr + len - 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        let mut elf = vec![0u8; 0x300];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert_eq!(detect_format(&elf), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(b"hello world"), None);
        assert_eq!(detect_format(&[]), None);
    }

    #[test]
    fn e820_leaves_holes_for_bios_area_and_mmio() {
        let map = e820_map(512 << 20, 0, false);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert!(map.contains(&(ACPI_START, ACPI_END - ACPI_START, E820_RESERVED)));
        assert!(map.contains(&(HIMEM_START, (512 << 20) - HIMEM_START, E820_RAM)));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, EBDA_START + (512 << 20) - HIMEM_START);

        let big = e820_map(MMIO_HOLE_START, 1 << 30, true);
        assert!(big.contains(&(HIGH_RAM_START, 1 << 30, E820_RAM)));
        assert!(big.contains(&(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED)));
        // No RAM entry overlaps the MMIO hole.
        for (a, s, t) in big {
            if t == E820_RAM {
                assert!(a + s <= MMIO_HOLE_START || a >= HIGH_RAM_START);
            }
        }
    }

    #[test]
    fn gdt_round_trips_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.l, 1);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data32 = segment_from_gdt(gdt_entry(0xc093, 0, 0xffff_ffff), 3);
        assert_eq!(data32.db, 1);
        assert_eq!(data32.selector, 0x18);
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let dir = std::env::temp_dir().join(format!("exitless-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("garbage");
        std::fs::write(&p, b"this is not a kernel at all").unwrap();
        let spec = BootSpec {
            kernel: &p,
            kernel_bytes: None,
            initrd: None,
            cmdline: "console=ttyS0",
            low_ram: 64 << 20,
            high_ram: 0,
            rsdp: GuestAddress(ACPI_START),
            pci_ecam: false,
            unpack_bzimage: true,
        };
        let err = load(&mem(), &spec, &mut crate::startup::StartupClock::new()).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        // A truncated ELF is also refused cleanly.
        std::fs::write(&p, b"\x7fELF\x02\x01\x01").unwrap();
        assert!(matches!(
            load(&mem(), &spec, &mut crate::startup::StartupClock::new()).unwrap_err(),
            BootError::NotAKernel { .. }
        ));
        let missing = dir.join("missing");
        let spec = BootSpec {
            kernel: &missing,
            ..spec
        };
        assert!(matches!(
            load(&mem(), &spec, &mut crate::startup::StartupClock::new()).unwrap_err(),
            BootError::OpenKernel { .. }
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn pvh_info_describes_memory_and_initrd() {
        let m = mem();
        let e820 = e820_map(64 << 20, 0, false);
        write_pvh_info(
            &m,
            &e820,
            Some((0x200_0000, 0x1000)),
            GuestAddress(ACPI_START),
        )
        .unwrap();
        let info: StartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.0.magic, PVH_START_MAGIC);
        assert_eq!(info.0.memmap_entries as usize, e820.len());
        assert_eq!(info.0.nr_modules, 1);
        assert_eq!(info.0.rsdp_paddr, ACPI_START);
        let first: MemmapEntry = m.read_obj(GuestAddress(info.0.memmap_paddr)).unwrap();
        assert_eq!(first.0.addr, 0);
        assert_eq!(first.0.type_, E820_RAM);
        let module: ModlistEntry = m.read_obj(GuestAddress(info.0.modlist_paddr)).unwrap();
        assert_eq!((module.0.paddr, module.0.size), (0x200_0000, 0x1000));
    }
}
