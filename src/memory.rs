//! Guest RAM.
//!
//! Owns the layout of RAM around the MMIO hole and its host mappings. RAM is anonymous, private
//! and mapped with `MAP_NORESERVE` (vm-memory's default), so the host commits a page only when the
//! guest first touches it: a 2 GiB guest that uses 40 MiB costs 40 MiB (rounded up to the 2 MiB
//! transparent huge pages exitless asks for, as QEMU does).
//!
//! Each region's host mapping starts on a 2 MiB boundary, as guest RAM does. Without that, neither
//! transparent huge pages nor KVM's 2 MiB nested-page mappings can back it (KVM maps a large page
//! only where guest-physical and host-virtual addresses agree modulo 2 MiB): every 4 KiB the guest
//! touches first costs an exit. Linux aligns large anonymous mappings by itself only since 6.7;
//! on older hosts (6.1 measured: 18 000 extra exits in a Debian guest's boot to userspace) a
//! mapping lands wherever. vm-memory maps regions without a placement hint and unmaps them when
//! the last user drops them, so exitless keeps that ownership and steers the placement instead:
//! it reserves the region's size plus 2 MiB, frees exactly the aligned window inside, and lets
//! vm-memory map into that hole (the kernel places a new mapping in the highest gap that fits,
//! and the reservation was the highest). The result is checked; a region that lands elsewhere
//! (another thread mapped in between) still works, with 4 KiB pages.

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::layout::{HIGH_RAM_START, MMIO_HOLE_START};

/// Smallest guest we accept: enough for the boot data below 1 MiB plus a kernel.
pub const MIN_MEM: u64 = 16 << 20;
/// Largest guest we accept: its RAM above 4 GiB must end within 46 physical address bits (what
/// x86_64 CPUs give guests at the least), and so never wrap the address space (the fuzz target
/// `acpi_e820` found an E820 entry that did, for a size near 2^64, on a host whose capacity
/// could not be read).
pub const MAX_MEM: u64 = (1 << 46) - (HIGH_RAM_START - MMIO_HOLE_START);

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory {0} MiB is too small (at least {min} MiB)", min = MIN_MEM >> 20)]
    TooSmall(u64),
    #[error("guest memory {asked} MiB is more than this host has ({host} MiB of RAM and swap)")]
    TooLarge { asked: u64, host: u64 },
    #[error("guest memory {0} MiB does not fit a guest's address space (at most {max} MiB)", max = MAX_MEM >> 20)]
    BeyondAddressSpace(u64),
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(u64, String),
}

/// RAM split around the MMIO hole: (low bytes, high bytes).
pub fn split(size: u64) -> (u64, u64) {
    let low = size.min(MMIO_HOLE_START);
    (low, size - low)
}

/// Host RAM plus swap, in bytes, from /proc/meminfo (None when unreadable).
pub fn host_capacity() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        info.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|kib| kib << 10)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

/// Whether a guest of `size` bytes can be laid out at all (the host's capacity aside).
pub fn check_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_MEM {
        return Err(MemoryError::TooSmall(size >> 20));
    }
    if size > MAX_MEM {
        return Err(MemoryError::BeyondAddressSpace(size >> 20));
    }
    Ok(())
}

/// Maps `size` bytes of guest RAM.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < MIN_MEM {
        return Err(MemoryError::TooSmall(size >> 20));
    }
    // The host's limit first: the one a user meets.
    if let Some(host) = host_capacity() {
        if size > host {
            return Err(MemoryError::TooLarge {
                asked: size >> 20,
                host: host >> 20,
            });
        }
    }
    check_size(size)?;
    let (low, high) = split(size);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if high > 0 {
        ranges.push((GuestAddress(HIGH_RAM_START), high as usize));
    }
    let map_err = |e: String| MemoryError::Map(size >> 20, e);
    let regions = ranges
        .iter()
        .map(|&(addr, len)| {
            let mapping = map_aligned(len).map_err(|e| map_err(e.to_string()))?;
            GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| map_err(format!("region at {:#x} overflows", addr.0)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Maps guest RAM of `size` bytes from a snapshot's memory file (RAM's regions back to back in
/// it), private and lazy: pages are read from the file when first touched, and the guest's
/// writes go to its own copies, never to the file (see `snapshot::memory`).
pub fn map_file(size: u64, file: &std::fs::File) -> Result<GuestMemoryMmap, MemoryError> {
    check_size(size)?;
    let (low, high) = split(size);
    let mut ranges = vec![(GuestAddress(0), low as usize, 0u64)];
    if high > 0 {
        ranges.push((GuestAddress(HIGH_RAM_START), high as usize, low));
    }
    let map_err = |e: String| MemoryError::Map(size >> 20, e);
    let regions = ranges
        .iter()
        .map(|&(addr, len, offset)| {
            let file = file.try_clone().map_err(|e| map_err(e.to_string()))?;
            let file = std::sync::Arc::new(file);
            let map = |len: usize| {
                vm_memory::mmap::MmapRegionBuilder::new(len)
                    .with_file_offset(vm_memory::FileOffset::from_arc(file.clone(), offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
            };
            let mapping = map_aligned_with(len, &map).map_err(|e| map_err(e.to_string()))?;
            GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| map_err(format!("region at {:#x} overflows", addr.0)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

/// Huge pages' size and the alignment of every region's host mapping.
pub const HUGE_PAGE: usize = 2 << 20;

/// Attempts at an aligned mapping before settling for any. An attempt misses its window when the
/// kernel finds a higher gap of at least `len` (top-down placement): one another thread's munmap
/// opened, or a freed mapping's. Each missed mapping is kept until the end as a plug in that gap,
/// so the next attempt cannot land there again (before, every attempt went to the same gap and a
/// 64 MiB VM's RAM sat off its 2 MiB boundary: CI, stop 19).
const ALIGN_ATTEMPTS: usize = 16;

/// Held from [`map_once`]'s munmap to vm-memory's mmap, so that two of exitless's own mappings
/// (parallel tests, a restore's regions) never take each other's window; other mmaps (the
/// allocator's) can still, which the attempts cover.
static MAP_WINDOW: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// An anonymous mapping of `len` bytes owned by vm-memory, placed on a [`HUGE_PAGE`] boundary
/// when the kernel allows (see the module doc).
fn map_aligned(len: usize) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    map_aligned_with(len, &|len| MmapRegion::new(len))
}

type MapFn<'a> = &'a dyn Fn(usize) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError>;

/// [`map_aligned`] for any mapping `map` makes (anonymous RAM, a snapshot's file).
fn map_aligned_with(
    len: usize,
    map: MapFn,
) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    // Misplaced mappings, unmapped (dropped) only once the aligned one exists.
    let mut plugs = Vec::new();
    for _ in 1..ALIGN_ATTEMPTS {
        let mapping = map_once(len, map)?;
        if (mapping.as_ptr() as usize).is_multiple_of(HUGE_PAGE) {
            return Ok(mapping);
        }
        plugs.push(mapping);
    }
    map_once(len, map)
}

/// One try of [`map_aligned`]: reserve `len` + 2 MiB, free the aligned window inside, let
/// vm-memory map there.
fn map_once(len: usize, map: MapFn) -> Result<MmapRegion, vm_memory::mmap::MmapRegionError> {
    let reserve = len.checked_add(HUGE_PAGE);
    // SAFETY: a fresh inaccessible anonymous mapping; nothing refers to it yet.
    let base = reserve.map(|r| unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            r,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    });
    let (Some(reserve), Some(base)) = (reserve, base.filter(|b| *b != libc::MAP_FAILED)) else {
        return map(len);
    };
    let base = base as usize;
    let window = base.next_multiple_of(HUGE_PAGE);
    let window_lock = MAP_WINDOW.lock().unwrap_or_else(|p| p.into_inner());
    // SAFETY: [window, window + len) lies inside the reservation just made (window - base < 2 MiB)
    // and only this function knows of it; freeing it leaves the hole vm-memory maps into.
    unsafe { libc::munmap(window as *mut libc::c_void, len) };
    let mapping = map(len);
    drop(window_lock);
    // SAFETY: the reservation's head and tail around the window are still this function's own
    // PROT_NONE mappings (vm-memory's mapping is in the window or elsewhere, never in them).
    unsafe {
        libc::munmap(base as *mut libc::c_void, window - base);
        let end = window + len;
        libc::munmap(end as *mut libc::c_void, base + reserve - end);
    }
    let mapping = mapping?;
    if !(mapping.as_ptr() as usize).is_multiple_of(HUGE_PAGE) {
        log::debug!("guest RAM mapped off a 2 MiB boundary: 4 KiB nested pages only");
    }
    Ok(mapping)
}

/// Asks for transparent huge pages on guest RAM (hosts often give them only on request,
/// `enabled=madvise`): fewer TLB misses for the guest and for device workers copying into it.
/// Only advice: RAM is still committed on first touch (a 2 MiB page at a time where the host
/// grants one), and 4 KiB `madvise(MADV_DONTNEED)` from the balloon still frees 4 KiB.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for r in mem.iter() {
        let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping of guest RAM owned by `mem`; MADV_HUGEPAGE
        // changes no contents, only how the kernel backs the range.
        let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn sizes_past_the_address_space_are_refused() {
        assert!(matches!(
            check_size(u64::MAX),
            Err(MemoryError::BeyondAddressSpace(_))
        ));
        // create: the host's capacity refuses it, or where unreadable the address space.
        assert!(create(MAX_MEM + 1).is_err());
        assert!(matches!(
            check_size(MIN_MEM - 1),
            Err(MemoryError::TooSmall(_))
        ));
        assert!(check_size(MAX_MEM).is_ok());
        let (_, high) = split(MAX_MEM);
        assert!(HIGH_RAM_START
            .checked_add(high)
            .is_some_and(|e| e <= 1 << 46));
    }

    #[test]
    fn splits_around_the_hole() {
        assert_eq!(split(512 << 20), (512 << 20, 0));
        assert_eq!(
            split(4 << 30),
            (MMIO_HOLE_START, (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn refuses_silly_sizes() {
        assert!(matches!(create(1 << 20), Err(MemoryError::TooSmall(1))));
        assert!(matches!(create(1 << 50), Err(MemoryError::TooLarge { .. })));
    }

    #[test]
    fn maps_both_sides_of_the_hole() {
        let m = create(MMIO_HOLE_START + (16 << 20)).unwrap();
        assert_eq!(m.num_regions(), 2);
        assert!(m.address_in_range(GuestAddress(HIGH_RAM_START)));
        assert!(!m.address_in_range(GuestAddress(MMIO_HOLE_START)));
    }
}
