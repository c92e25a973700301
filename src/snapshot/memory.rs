//! Guest RAM in a snapshot: the sparse file `DIR/memory`, and how a restored VM maps it.
//!
//! **The file.** Guest RAM as the guest sees it, low RAM then high RAM (the regions of
//! [`crate::memory`], back to back; the `memory` section records them). Only pages that hold
//! data are written: a page the host never committed (`mincore` says so, for anonymous RAM) or
//! that reads as zeros is left a hole, so a 256 MiB guest that touched 5 MiB costs 5 MiB of disk
//! (`du`), and `cp --sparse` keeps it so. The `memory` section holds a CRC-32 over every data
//! page with its offset; checking it means reading all the data, so a restore does it only when
//! asked (`exitless restore --verify-memory`): the default restore reads nothing of RAM.
//!
//! **The restore maps it, lazily.** Each region is a `MAP_PRIVATE` mapping of the file: nothing
//! is read at restore time; a page comes in from the page cache when the guest (or a device)
//! first touches it, and a write makes the guest's own copy, never touching the file. Why a
//! private file mapping rather than userfaultfd (Firecracker's other option): the kernel does
//! the lazy loading with no handler thread, no extra system call per fault and no extra
//! seccomp surface; clones restored from one snapshot share its page cache for every page they
//! only read; holes cost nothing. What it gives up: pages the guest writes are 4 KiB private
//! copies (no transparent huge pages on them), and the file must not change while a VM maps it
//! — which is why a snapshot directory is never written into twice.
//!
//! Owns the file's layout; it reads guest RAM through the host mappings it is given.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::SnapshotError;

/// The memory file's name in the snapshot directory.
pub const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;

/// One region of guest RAM in the file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Region {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// The `memory` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The file's length: all of guest RAM.
    pub size: u64,
    pub regions: Vec<Region>,
    /// Bytes actually written (pages with data).
    pub data_bytes: u64,
    /// CRC-32 over every data page, each preceded by its file offset (little-endian u64).
    pub data_crc32: u32,
}

/// Pages written, their bytes and checksum, as the file is written.
struct Written {
    data_bytes: u64,
    crc: crc32fast::Hasher,
}

/// Writes guest RAM to `dir/memory` (a new file). `anonymous`: RAM is anonymous memory, where
/// `mincore` tells which pages were ever committed (a restored VM's RAM is a file mapping, where
/// it does not: every page is compared with zeros).
pub fn save(
    mem: &GuestMemoryMmap,
    dir: &Path,
    anonymous: bool,
) -> Result<MemoryInfo, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let io = |e: std::io::Error| SnapshotError::Save(format!("{}: {e}", path.display()));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io)?;
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(size).map_err(io)?;
    let mut w = Written {
        data_bytes: 0,
        crc: crc32fast::Hasher::new(),
    };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for r in mem.iter() {
        let host = r
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| SnapshotError::Save(format!("guest RAM: {e}")))?;
        // SAFETY: `host..host+len` is one live mapping of guest RAM owned by `mem`. The VM is
        // paused and has no device that writes guest memory (a snapshot of one with virtio
        // devices is refused earlier), so nothing changes it while it is read.
        let ram = unsafe { std::slice::from_raw_parts(host as *const u8, r.len() as usize) };
        write_region(&file, ram, offset, anonymous, &mut w).map_err(io)?;
        regions.push(Region {
            guest_addr: r.start_addr().0,
            len: r.len(),
            file_offset: offset,
        });
        offset += r.len();
    }
    file.sync_all().map_err(io)?;
    Ok(MemoryInfo {
        size,
        regions,
        data_bytes: w.data_bytes,
        data_crc32: w.crc.finalize(),
    })
}

/// Which pages of `ram` the host has committed (all, where it cannot tell).
fn resident(ram: &[u8], anonymous: bool) -> Vec<bool> {
    let pages = ram.len().div_ceil(PAGE);
    if !anonymous {
        return vec![true; pages];
    }
    let mut v = vec![0u8; pages];
    // SAFETY: `ram` is a page-aligned live mapping; `v` has one byte per page of it.
    let rc = unsafe { libc::mincore(ram.as_ptr() as *mut libc::c_void, ram.len(), v.as_mut_ptr()) };
    if rc != 0 {
        return vec![true; pages];
    }
    v.iter().map(|b| b & 1 != 0).collect()
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Writes the data pages of one region at `base` in the file, runs of pages at a time.
fn write_region(
    file: &File,
    ram: &[u8],
    base: u64,
    anonymous: bool,
    w: &mut Written,
) -> std::io::Result<()> {
    let present = resident(ram, anonymous);
    let mut run: Option<usize> = None;
    for (i, page) in ram.chunks(PAGE).enumerate() {
        let data = present[i] && !is_zero(page);
        if data {
            w.crc.update(&(base + (i * PAGE) as u64).to_le_bytes());
            w.crc.update(page);
            w.data_bytes += page.len() as u64;
            run.get_or_insert(i);
        } else if let Some(start) = run.take() {
            file.write_all_at(&ram[start * PAGE..i * PAGE], base + (start * PAGE) as u64)?;
        }
    }
    if let Some(start) = run {
        file.write_all_at(&ram[start * PAGE..], base + (start * PAGE) as u64)?;
    }
    Ok(())
}

/// Opens `dir/memory` for a restore: its length must be what the snapshot says (a cut file is
/// refused) and its regions RAM's layout for that size.
pub fn open(dir: &Path, info: &MemoryInfo, mem_bytes: u64) -> Result<File, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let bad = |why: String| SnapshotError::Invalid(format!("{}: {why}", path.display()));
    let file = File::open(&path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    check(info, mem_bytes).map_err(bad)?;
    if len != info.size {
        return Err(bad(format!(
            "{len} bytes, the snapshot's guest RAM is {} bytes (truncated or not this snapshot's)",
            info.size
        )));
    }
    Ok(file)
}

/// Whether the `memory` section describes the RAM of a guest with `mem_bytes`: its size and
/// the layout of its regions.
pub fn check(info: &MemoryInfo, mem_bytes: u64) -> Result<(), String> {
    if info.size != mem_bytes {
        return Err(format!(
            "the snapshot's guest RAM is {} bytes, its machine's {mem_bytes}",
            info.size
        ));
    }
    let expected = layout(mem_bytes);
    if info.regions != expected {
        return Err(format!(
            "its regions {:?} are not guest RAM's layout {expected:?}",
            info.regions
        ));
    }
    Ok(())
}

/// The regions of a guest with `mem_bytes` of RAM, as they lie in the file.
pub fn layout(mem_bytes: u64) -> Vec<Region> {
    let (low, high) = crate::memory::split(mem_bytes);
    let mut v = vec![Region {
        guest_addr: 0,
        len: low,
        file_offset: 0,
    }];
    if high > 0 {
        v.push(Region {
            guest_addr: crate::arch::x86_64::layout::HIGH_RAM_START,
            len: high,
            file_offset: low,
        });
    }
    v
}

/// Reads the whole file and checks its data pages against the recorded checksum
/// (`--verify-memory`).
pub fn verify(file: &File, info: &MemoryInfo) -> Result<(), SnapshotError> {
    let mut crc = crc32fast::Hasher::new();
    let mut data = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < info.size {
        let n = (info.size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(|e| SnapshotError::Invalid(format!("reading the memory file: {e}")))?;
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            if !is_zero(page) {
                crc.update(&(at + (i * PAGE) as u64).to_le_bytes());
                crc.update(page);
                data += page.len() as u64;
            }
        }
        at += n as u64;
    }
    let got = crc.finalize();
    if got != info.data_crc32 || data != info.data_bytes {
        return Err(SnapshotError::Invalid(format!(
            "the memory file is corrupted ({data} data bytes with CRC-32 {got:#010x}; the \
             snapshot recorded {} with {:#010x})",
            info.data_bytes, info.data_crc32
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_data_pages_are_written_and_the_checksum_catches_a_change() {
        let dir = std::env::temp_dir().join(format!("exitless-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = crate::memory::create(16 << 20).unwrap();
        use vm_memory::{Bytes, GuestAddress};
        mem.write_slice(&[7u8; 10], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[9u8; 5000], GuestAddress(0x10_0000))
            .unwrap();
        let info = save(&mem, &dir, true).unwrap();
        assert_eq!(info.size, 16 << 20);
        assert_eq!(info.data_bytes, 3 * 4096, "one page, then two");
        let file = open(&dir, &info, 16 << 20).unwrap();
        verify(&file, &info).unwrap();
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap().blocks();
        assert!(
            blocks * 512 < 1 << 20,
            "sparse: {} bytes on disk",
            blocks * 512
        );
        let mut back = [0u8; 4];
        file.read_exact_at(&mut back, 0x10_0000 + 4996).unwrap();
        assert_eq!(back, [9; 4]);
        // One byte changed in a data page, or data in a hole: refused.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        w.write_all_at(&[1], 0x3004).unwrap();
        assert!(verify(&file, &info).is_err());
        w.write_all_at(&[7], 0x3004).unwrap();
        verify(&file, &info).unwrap();
        w.write_all_at(&[1], 0x50_0000).unwrap();
        assert!(verify(&file, &info).is_err());
        // A cut file is refused before anything maps it.
        w.set_len(8 << 20).unwrap();
        let e = open(&dir, &info, 16 << 20).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
