//! Guest RAM.
//!
//! Owns the layout of RAM around the MMIO hole and its host mappings. RAM is anonymous, private
//! and mapped with `MAP_NORESERVE` (vm-memory's default), so the host commits a page only when the
//! guest first touches it: a 2 GiB guest that uses 40 MiB costs 40 MiB (rounded up to the 2 MiB
//! transparent huge pages exitless asks for, as QEMU does).

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{HIGH_RAM_START, MMIO_HOLE_START};

/// Smallest guest we accept: enough for the boot data below 1 MiB plus a kernel.
pub const MIN_MEM: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory {0} MiB is too small (at least {min} MiB)", min = MIN_MEM >> 20)]
    TooSmall(u64),
    #[error("guest memory {asked} MiB is more than this host has ({host} MiB of RAM and swap)")]
    TooLarge { asked: u64, host: u64 },
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

/// Maps `size` bytes of guest RAM.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if size < MIN_MEM {
        return Err(MemoryError::TooSmall(size >> 20));
    }
    if let Some(host) = host_capacity() {
        if size > host {
            return Err(MemoryError::TooLarge {
                asked: size >> 20,
                host: host >> 20,
            });
        }
    }
    let (low, high) = split(size);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if high > 0 {
        ranges.push((GuestAddress(HIGH_RAM_START), high as usize));
    }
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| MemoryError::Map(size >> 20, e.to_string()))?;
    advise_huge_pages(&mem);
    Ok(mem)
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
