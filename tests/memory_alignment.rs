//! Guest RAM's host mappings start on 2 MiB boundaries (so KVM can map it with huge nested
//! pages). Its own test binary: the placement is the kernel's choice of the highest free gap, so
//! other tests mapping and unmapping memory in parallel threads of the same process can open a
//! gap that a mapping takes instead of its aligned window (the unit test failed so, about once in
//! five runs); a process with one VM has no such neighbours.

use exitless::arch::x86_64::layout::MMIO_HOLE_START;
use exitless::memory::{create, HUGE_PAGE};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

#[test]
fn every_region_s_host_mapping_starts_on_a_huge_page_boundary() {
    // Several in a row: the placement must not depend on where the last one went.
    for size in [
        (64u64 << 20) + 4096,
        66 << 20,
        512 << 20,
        MMIO_HOLE_START + (6 << 20) + 4096,
    ] {
        let m = create(size).unwrap();
        for r in m.iter() {
            let host = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "{size:#x}: region at {host:#x}");
        }
    }
}
