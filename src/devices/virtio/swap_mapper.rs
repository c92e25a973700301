//! VSWAPPER's Swap Mapper for virtio-blk (`--disk path=IMG,swap-mapper=on`), and the avoidance
//! of stale swap reads on every disk.
//!
//! Owns the file mappings of a disk image inside guest RAM and their bookkeeping; touches guest
//! memory only through the host addresses the block device hands it (the destination pages of a
//! read, the pages mapped to blocks about to be written), never the layout of guest RAM. Behind
//! `--iommu` the queue has already translated the driver's I/O virtual addresses into guest
//! physical ones (`queue::Translate`), so the mapper only ever sees guest RAM.
//!
//! # Why
//! Under uncooperative overcommit (`--mem-limit`, `memlimit`) the host reclaims guest RAM as if it
//! were anonymous memory. A guest's page cache is mostly clean copies of disk blocks, yet the host
//! writes them to swap (*silent swap writes*), reads them back from a swap area where they lost
//! their order (*decayed sequentiality*), and prefers to evict the VMM's own code, the only named
//! pages (*false page anonymity*). The mapper makes those pages named again: a read of whole,
//! aligned 4 KiB pages into guest RAM is served by `mmap(MAP_PRIVATE | MAP_FIXED)` of the image at
//! the destination pages, then `madvise(MADV_POPULATE_READ)` (the read happens now, started for
//! the whole request at once with `readahead`, and the pages are mapped without copy-on-write). The page then *is* the
//! image's page-cache page: reclaim drops it instead of swapping it, a refault reads the image
//! sequentially, and the first store to it (guest or host) copies it into ordinary anonymous
//! memory (private mapping), so the guest's stores never reach the image.
//!
//! # Consistency
//! A private mapping's untouched pages follow the file: if the guest wrote block B while page P
//! still maps B, P would change under the guest (at once, or when P is refaulted after reclaim).
//! So before any write to the image (write, discard, write zeroes) every page still mapped to an
//! affected block is *broken*: `madvise(MADV_POPULATE_WRITE)` write-faults it, which copies the
//! block's current (old) content into an anonymous page exactly as a guest store would, and is
//! atomic with respect to the guest's own stores (no window where a store could be lost, unlike
//! copy-then-remap). The reverse map (image page → guest pages, [`Maps`]) finds those pages; a
//! block read into many pages has many entries. A page the guest already stored to is anonymous
//! anyway (the populate is then a no-op). Writes are written once with `pwritev`; the pages written
//! *from* are not mapped to the blocks afterwards (the thesis does): Linux may store to a page
//! under writeback, and a store between the write and the `mmap` would be lost.
//!
//! # Bounds and huge pages
//! Each mapping is a VMA, and one in the middle of guest RAM's anonymous VMA splits it: up to two
//! VMAs per extent. Adjacent pages of adjacent blocks make one extent (the kernel merges such
//! VMAs too, and so does [`Maps::insert`]). The extents are bounded by
//! `(vm.max_map_count - VMAs at start - 1024) / 2` (at most [`MAX_EXTENTS`]); at the bound a read
//! is served by copying, as without the mapper (counted as `mapper_full`). A mapping inside a
//! transparent huge page splits it (the kernel splits the PMD; KVM then maps 4 KiB there): the
//! mapper trades huge pages for named pages, which is why it is an option and not the default.
//! Reads that are not whole aligned pages (or when mapping fails) are copied. The guest is told a
//! 4 KiB logical block size, so Linux's page-cache I/O is whole pages. Measured (`bench vswap` in
//! the emulated SVM host, 192 MiB read with ample memory): the mapper's first pass took 4.4x the
//! copying baseline's, mostly the guest's nested page faults, one per 4 KiB file page against one
//! per 2 MiB of THP-backed RAM (`KVM_PRE_FAULT_MEMORY` would pre-map them, but it is a vCPU ioctl
//! that serialises with `KVM_RUN`). Under a limit it pays off from the second pass on (the README
//! has the tables); mapping only under memory pressure is a possible refinement, not built.
//!
//! # Stale reads (every disk, mapper or not)
//! A read into a guest page that the host swapped out would first swap it in only to overwrite it.
//! Before a copied read, the destination's whole pages are looked up in `/proc/self/pagemap`
//! (bit 62: swapped) and the swapped ones dropped with `MADV_DONTNEED` (counted as
//! `stale_dropped`); resident pages are left alone (no cost beyond one `pread` of the pagemap).
//! Done only when the host has swap. Mapped reads need nothing: `MAP_FIXED` drops the old page.
//!
//! # The False Reads Preventer: not built, what stock KVM offers
//! A guest *CPU* store that overwrites a whole swapped-out page (zeroing, copy-on-write) faults the
//! old content in first. The thesis emulates such stores in the hypervisor into page buffers. On
//! stock KVM: (1) userfaultfd reports the faulting address and whether it was a write, never the
//! data, and the vCPU sits inside `KVM_RUN` meanwhile, so userspace cannot finish the store;
//! userfaultfd also cannot see swap-ins of pages the kernel swapped (it handles missing pages of
//! registered ranges, i.e. a VMM-managed swap would have to replace the kernel's: pages evicted by
//! exitless with `MADV_DONTNEED` after writing them out itself, refilled on `UFFD_EVENT` MISSING
//! with `UFFDIO_COPY`, still with no way to tell a full overwrite from a read); (2) a read-only or
//! absent memslot turns stores into `KVM_EXIT_MMIO` exits carrying the data (8 bytes at a time,
//! one exit per store, `REP STOSB` one exit per iteration), which would need memslot churn per
//! page and cost ~512 exits per 4 KiB page zeroed; (3) free-page reporting (`--balloon
//! reporting=on`) is the cooperative equivalent: pages the guest frees are dropped, so the guest's
//! later zeroing of them faults in zero pages, not swap. exitless relies on (3) and counts what it
//! prevents: the reported pages the host had swapped out (`false_reads_prevented`, a fact of
//! virtio-balloon; see `balloon`); `memlimit` reports major faults (`pgmajfault`) and swap-ins.
//! Its reach is the guest's free memory: Linux reports free blocks of 2 MiB and more, some
//! seconds after they were freed, so a page the guest takes straight from its page cache for
//! new data (the `fresh-memory` workload of `bench vswap`) is never free long enough.
//!
//! # Other limits
//! The image must not shrink while mapped (a mapped page past the end raises SIGBUS); several
//! `--disk` of one image file are not kept consistent with each other. With `direct=on` the
//! mappings still go through the host's page cache (a second descriptor without `O_DIRECT`).
//! Free-page reporting and the balloon drop pages with `MADV_DONTNEED`; on a mapped page that
//! drops the page and a later touch reads the block again (the guest freed the page, so any
//! content is right; the reverse map keeps the page until it is remapped or broken, which costs
//! at most a needless populate).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub const PAGE: u64 = 4096;
/// Most extents (file mappings) the mapper keeps, whatever `vm.max_map_count` allows.
pub const MAX_EXTENTS: usize = 1 << 15;
/// VMAs left to the rest of the VMM (threads' stacks, libraries, later mappings).
const VMA_RESERVE: u64 = 1024;

/// Bits of a `/proc/self/pagemap` entry.
const PM_SWAPPED: u64 = 1 << 62;
const PM_PRESENT: u64 = 1 << 63;
/// Linux 5.14+.
const MADV_POPULATE_READ: i32 = 22;
const MADV_POPULATE_WRITE: i32 = 23;

/// One file mapping in guest RAM: `pages` pages from host address `host` map the image from
/// page `file_page` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub pages: u64,
    pub file_page: u64,
}

/// The mapper's bookkeeping, without system calls: the extents (by host address) and the reverse
/// map from image pages to the guest pages (host addresses) that still map them.
#[derive(Debug, Default)]
pub struct Maps {
    extents: BTreeMap<u64, Extent>,
    rev: HashMap<u64, Vec<u64>>,
    max_extents: usize,
}

impl Maps {
    pub fn new(max_extents: usize) -> Maps {
        Maps {
            max_extents,
            ..Maps::default()
        }
    }

    pub fn extents(&self) -> usize {
        self.extents.len()
    }

    /// Guest pages still mapped to some image page.
    pub fn mapped_pages(&self) -> usize {
        self.rev.values().map(Vec::len).sum()
    }

    /// Whether one more mapping may be made (a new extent, at worst, replacing none).
    pub fn has_room(&self) -> bool {
        self.extents.len() < self.max_extents
    }

    /// Records that `pages` pages at `host` now map the image from `file_page` on, replacing
    /// whatever was mapped there, merging with neighbours that continue it in both address and
    /// file.
    pub fn insert(&mut self, host: u64, file_page: u64, pages: u64) {
        self.remove(host, pages);
        let (mut start, mut e) = (host, Extent { pages, file_page });
        if let Some((&ls, &l)) = self.extents.range(..host).next_back() {
            if ls + l.pages * PAGE == host && l.file_page + l.pages == file_page {
                self.extents.remove(&ls);
                start = ls;
                e = Extent {
                    pages: l.pages + pages,
                    file_page: l.file_page,
                };
            }
        }
        let end = host + pages * PAGE;
        if let Some(&r) = self.extents.get(&end) {
            if file_page + pages == r.file_page {
                self.extents.remove(&end);
                e.pages += r.pages;
            }
        }
        self.extents.insert(start, e);
        for i in 0..pages {
            self.rev
                .entry(file_page + i)
                .or_default()
                .push(host + i * PAGE);
        }
    }

    /// Forgets the mappings of `pages` pages at `host` (they were replaced), trimming or splitting
    /// the extents that cover them.
    pub fn remove(&mut self, host: u64, pages: u64) {
        let end = host + pages * PAGE;
        let first = self
            .extents
            .range(..=host)
            .next_back()
            .map_or(host, |(&s, _)| s);
        let hit: Vec<(u64, Extent)> = self
            .extents
            .range(first..end)
            .map(|(&s, &e)| (s, e))
            .filter(|&(s, e)| s + e.pages * PAGE > host)
            .collect();
        for (s, e) in hit {
            self.extents.remove(&s);
            let e_end = s + e.pages * PAGE;
            if s < host {
                let n = (host - s) / PAGE;
                self.extents.insert(
                    s,
                    Extent {
                        pages: n,
                        file_page: e.file_page,
                    },
                );
            }
            if e_end > end {
                let skip = (end - s) / PAGE;
                self.extents.insert(
                    end,
                    Extent {
                        pages: e.pages - skip,
                        file_page: e.file_page + skip,
                    },
                );
            }
            let (a, b) = (s.max(host), e_end.min(end));
            for h in (a..b).step_by(PAGE as usize) {
                self.unlink(e.file_page + (h - s) / PAGE, h);
            }
        }
    }

    fn unlink(&mut self, file_page: u64, host: u64) {
        if let Some(v) = self.rev.get_mut(&file_page) {
            v.retain(|&h| h != host);
            if v.is_empty() {
                self.rev.remove(&file_page);
            }
        }
    }

    /// Takes out of the reverse map every guest page mapped to image pages `first..first+count`
    /// (they are about to be broken), sorted by address. Their extents stay: the VMAs do.
    pub fn take_pages_of(&mut self, first: u64, count: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if self.rev.is_empty() {
            return out;
        }
        for fp in first..first.saturating_add(count) {
            if let Some(v) = self.rev.remove(&fp) {
                out.extend(v);
            }
        }
        out.sort_unstable();
        out
    }

    /// The extent at `host` (tests and the report).
    pub fn extent_at(&self, host: u64) -> Option<Extent> {
        self.extents.get(&host).copied()
    }
}

/// Runs of consecutive pages in a sorted list of page addresses: (start, pages).
pub fn page_runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match runs.last_mut() {
            Some((s, n)) if *s + *n * PAGE == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

/// The whole, mappable pages of a buffer of `len` bytes at host address `host` that receives the
/// image from byte `pos` on: `(offset into the buffer, pages)`, where both the host address and
/// the file position are page aligned. None when they are not congruent modulo a page (nothing can
/// be mapped) or no whole page fits.
pub fn mappable(host: u64, pos: u64, len: u64) -> Option<(u64, u64)> {
    if host % PAGE != pos % PAGE {
        return None;
    }
    let head = (PAGE - host % PAGE) % PAGE;
    let pages = len.checked_sub(head)? / PAGE;
    (pages > 0).then_some((head, pages))
}

/// Facts of one disk's mapper (see [`Mapper::take_counts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub mapped_pages: u64,
    pub map_calls: u64,
    pub broken_pages: u64,
    pub full: u64,
    pub map_failures: u64,
    pub stale_dropped: u64,
}

/// What a disk's mappers need from the host, found once when the disk is opened (on the main
/// thread: device workers may not open files).
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// The image for mappings (read-only, never `O_DIRECT`); None: mapper off.
    pub image: Option<Arc<File>>,
    /// `/proc/self/pagemap`, where the host has swap (stale-read avoidance).
    pub pagemap: Option<Arc<File>>,
    pub max_extents: usize,
}

impl Setup {
    /// `image`: the disk's image opened again read-only (mapper on), or None.
    pub fn new(image: Option<File>) -> Setup {
        let pagemap = host_pagemap();
        Setup {
            max_extents: if image.is_some() { max_extents() } else { 0 },
            image: image.map(Arc::new),
            pagemap,
        }
    }
}

/// What the block device's data path asks of the mapper; one per disk, on its worker thread.
pub struct Mapper {
    image: Option<Arc<File>>,
    maps: Maps,
    pagemap: Option<Arc<File>>,
    pub counts: Counts,
}

impl Mapper {
    pub fn new(setup: &Setup) -> Mapper {
        Mapper {
            image: setup.image.clone(),
            maps: Maps::new(setup.max_extents),
            pagemap: setup.pagemap.clone(),
            counts: Counts::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.image.is_some()
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Before the image's bytes `pos..pos+len` change: breaks every page still mapped to them
    /// (see the module doc). An error means a page could not be broken: the write must not go on.
    pub fn before_write(&mut self, pos: u64, len: u64) -> io::Result<()> {
        if self.image.is_none() || len == 0 {
            return Ok(());
        }
        let first = pos / PAGE;
        let last = (pos + len).div_ceil(PAGE);
        let pages = self.maps.take_pages_of(first, last - first);
        for (start, n) in page_runs(&pages) {
            // SAFETY: [start, start + n pages) lies in guest RAM (recorded when mapped) and is
            // still mapped; MADV_POPULATE_WRITE only write-faults it, which copies each page's
            // content into an anonymous page as a store would, changing no byte.
            let rc =
                unsafe { libc::madvise(start as *mut _, (n * PAGE) as usize, MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            self.counts.broken_pages += n;
        }
        Ok(())
    }

    /// Serves a read of the image from byte `pos` into `iov` (guest memory): whole aligned pages
    /// are mapped where the mapper is on and has room, the rest is copied with `preadv` after the
    /// swapped-out destination pages were dropped. Errors as `preadv` has them (a read past the
    /// end of the file is one).
    pub fn read(&mut self, file: &File, iov: &[libc::iovec], pos: u64) -> io::Result<()> {
        if let Some(image) = &self.image {
            // One asynchronous read of the whole run into the host's page cache first: the
            // populates below then find the pages (or wait for them) instead of faulting them in
            // 128 KiB of read-around at a time, each a synchronous read.
            let len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
            // SAFETY: readahead only reads the image into the page cache; a failure is harmless.
            unsafe { libc::readahead(image.as_raw_fd(), pos as i64, len as usize) };
        }
        let mut copy: Vec<libc::iovec> = Vec::new();
        let mut copy_pos = pos;
        let mut at = pos;
        for v in iov {
            let (host, len) = (v.iov_base as u64, v.iov_len as u64);
            match self.mappable_here(host, at, len) {
                Some((head, pages)) => {
                    push_piece(&mut copy, host, head);
                    self.flush_copy(file, &mut copy, &mut copy_pos)?;
                    let (h, p) = (host + head, at + head);
                    if self.map(h, p, pages).is_err() {
                        self.counts.map_failures += 1;
                        push_piece(&mut copy, h, pages * PAGE);
                    } else {
                        copy_pos = p + pages * PAGE;
                    }
                    let tail = head + pages * PAGE;
                    push_piece(&mut copy, host + tail, len - tail);
                }
                None => push_piece(&mut copy, host, len),
            }
            at += len;
        }
        self.flush_copy(file, &mut copy, &mut copy_pos)
    }

    fn mappable_here(&mut self, host: u64, pos: u64, len: u64) -> Option<(u64, u64)> {
        self.image.as_ref()?;
        let m = mappable(host, pos, len)?;
        if !self.maps.has_room() {
            self.counts.full += 1;
            return None;
        }
        Some(m)
    }

    /// `preadv` of the pieces gathered so far (file-contiguous from `*pos`), after dropping their
    /// swapped-out whole pages; then empties them.
    fn flush_copy(
        &mut self,
        file: &File,
        copy: &mut Vec<libc::iovec>,
        pos: &mut u64,
    ) -> io::Result<()> {
        if copy.is_empty() {
            return Ok(());
        }
        let len: u64 = copy.iter().map(|v| v.iov_len as u64).sum();
        for v in copy.iter() {
            self.drop_swapped(v.iov_base as u64, v.iov_len as u64);
        }
        super::block::rw_all(file, copy, *pos, false)?;
        *pos += len;
        copy.clear();
        Ok(())
    }

    /// Maps `pages` pages of the image from byte `pos` at host address `host` and reads them in.
    fn map(&mut self, host: u64, pos: u64, pages: u64) -> io::Result<()> {
        let Some(image) = &self.image else {
            return Err(io::ErrorKind::Unsupported.into());
        };
        let len = (pages * PAGE) as usize;
        let off = libc::off_t::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: [host, host + len) is a destination buffer of a read, inside guest RAM's host
        // mapping (the block device built it from guest memory and holds its guards); the guest
        // gave these pages to the device to overwrite. MAP_FIXED replaces them with a private
        // mapping of the image at the same place, so every pointer into guest RAM stays valid.
        let p = unsafe {
            libc::mmap(
                host as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                image.as_raw_fd(),
                off,
            )
        };
        // SAFETY (populate): the mapping just made; populating only reads the image into it.
        if p == libc::MAP_FAILED
            || unsafe { libc::madvise(host as *mut _, len, MADV_POPULATE_READ) } != 0
        {
            let e = io::Error::last_os_error();
            // The old pages may be gone already: anonymous memory back for the copy, and
            // whatever was mapped there forgotten.
            restore_anonymous(host, len);
            self.maps.remove(host, pages);
            return Err(e);
        }
        self.maps.insert(host, pos / PAGE, pages);
        self.counts.mapped_pages += pages;
        self.counts.map_calls += 1;
        Ok(())
    }

    /// Drops the swapped-out whole pages of `[host, host + len)` (about to be overwritten).
    fn drop_swapped(&mut self, host: u64, len: u64) {
        let Some(pm) = &self.pagemap else {
            return;
        };
        let mut swapped = Vec::new();
        for_each_swapped(pm, host, len, |p| swapped.push(p));
        for (start, n) in page_runs(&swapped) {
            // SAFETY: whole pages of a read's destination buffer in guest RAM, about to be
            // overwritten by the read: their old contents are not needed.
            if unsafe { libc::madvise(start as *mut _, (n * PAGE) as usize, libc::MADV_DONTNEED) }
                == 0
            {
                self.counts.stale_dropped += n;
            }
        }
    }

    /// The counts since the last call, and the extents now.
    pub fn take_counts(&mut self) -> (Counts, usize) {
        (std::mem::take(&mut self.counts), self.maps.extents())
    }
}

/// `/proc/self/pagemap` where the host has swap (None without swap: nothing is ever swapped out,
/// so there is nothing to look up). Opened on the main thread: device workers may not open files.
pub fn host_pagemap() -> Option<Arc<File>> {
    crate::memlimit::host_has_swap()
        .then(|| File::open("/proc/self/pagemap").ok().map(Arc::new))
        .flatten()
}

/// Calls `f` with the host address of each whole page of `[host, host + len)` that the host has
/// swapped out (pagemap: swapped, not present), reading at most 512 entries at a time. Stops
/// quietly where the pagemap cannot be read (what was found so far stands).
pub fn for_each_swapped(pm: &File, host: u64, len: u64, mut f: impl FnMut(u64)) {
    const CHUNK: u64 = 512;
    let mut first = host.div_ceil(PAGE);
    let end = host.saturating_add(len) / PAGE;
    let mut raw = [0u8; (CHUNK * 8) as usize];
    while first < end {
        let n = (end - first).min(CHUNK);
        let buf = &mut raw[..(n * 8) as usize];
        if pm.read_exact_at(buf, first * 8).is_err() {
            return;
        }
        for (i, e) in buf.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if e & PM_SWAPPED != 0 && e & PM_PRESENT == 0 {
                f((first + i as u64) * PAGE);
            }
        }
        first += n;
    }
}

fn push_piece(copy: &mut Vec<libc::iovec>, host: u64, len: u64) {
    if len > 0 {
        copy.push(libc::iovec {
            iov_base: host as *mut _,
            iov_len: len as usize,
        });
    }
}

/// Anonymous memory back at `[host, host + len)` after a failed mapping (its content is about to
/// be read from the image by the copy path).
fn restore_anonymous(host: u64, len: usize) {
    // SAFETY: the range is a read's destination inside guest RAM (see `Mapper::map`).
    unsafe {
        libc::mmap(
            host as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        );
    }
}

/// How many extents fit under `vm.max_map_count` (see the module doc).
fn max_extents() -> usize {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(65530);
    let now = std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count() as u64)
        .unwrap_or(0);
    let room = limit.saturating_sub(now + VMA_RESERVE) / 2;
    (room as usize).min(MAX_EXTENTS)
}

/// Whether `madvise(MADV_POPULATE_READ/WRITE)` exist here (Linux 5.14+): the mapper needs both.
pub fn supported() -> bool {
    // SAFETY: a populate of zero bytes at a null address touches nothing; the kernel checks the
    // advice before the range (EINVAL for an unknown advice).
    let rc = unsafe { libc::madvise(std::ptr::null_mut(), 0, MADV_POPULATE_WRITE) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
}

/// A file laid out like `/proc/self/pagemap`, for tests: the given entries (host address of a
/// page, entry) and zeros elsewhere (a sparse file); removed on drop.
#[cfg(test)]
pub(crate) struct FakePagemap {
    pub file: File,
    path: std::path::PathBuf,
}

#[cfg(test)]
impl FakePagemap {
    pub const SWAPPED: u64 = PM_SWAPPED;
    pub const PRESENT: u64 = PM_PRESENT;

    pub fn new(entries: &[(u64, u64)]) -> FakePagemap {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("exitless-test-pagemap-{}-{n}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for &(host, e) in entries {
            file.write_all_at(&e.to_le_bytes(), host / PAGE * 8)
                .unwrap();
        }
        // Entries past the last one read as zeros, as for pages never touched.
        let end = entries
            .iter()
            .map(|&(h, _)| h / PAGE + 4096)
            .max()
            .unwrap_or(4096);
        file.set_len(end * 8).unwrap();
        FakePagemap { file, path }
    }
}

#[cfg(test)]
impl Drop for FakePagemap {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole pages only, swapped and not present, across the 512-entry chunks.
    #[test]
    fn for_each_swapped_finds_the_swapped_out_whole_pages() {
        let base = 0x4000_0000u64;
        let pm = FakePagemap::new(&[
            (base, PM_SWAPPED),
            (base + PAGE, PM_PRESENT),
            // Swapped and present (a swap-cache page being read back): not counted.
            (base + 2 * PAGE, PM_SWAPPED | PM_PRESENT),
            (base + 600 * PAGE, PM_SWAPPED),
            (base + 1100 * PAGE, PM_SWAPPED),
        ]);
        let mut found = Vec::new();
        for_each_swapped(&pm.file, base, 1100 * PAGE, |p| found.push(p));
        assert_eq!(found, vec![base, base + 600 * PAGE]);
        // A range that starts mid-page skips that page; one that ends mid-page skips the last.
        found.clear();
        for_each_swapped(&pm.file, base + 1, 1101 * PAGE - 2, |p| found.push(p));
        assert_eq!(found, vec![base + 600 * PAGE]);
        // Past the file's end: what was found so far stands, no panic.
        found.clear();
        for_each_swapped(&pm.file, base + 1100 * PAGE, 1 << 40, |p| found.push(p));
        assert_eq!(found, vec![base + 1100 * PAGE]);
    }

    const H: u64 = 0x7f00_0000_0000;

    #[test]
    fn adjacent_pages_of_adjacent_blocks_merge_into_one_extent() {
        let mut m = Maps::new(100);
        m.insert(H, 10, 2);
        m.insert(H + 2 * PAGE, 12, 3);
        assert_eq!(m.extents(), 1);
        assert_eq!(
            m.extent_at(H),
            Some(Extent {
                pages: 5,
                file_page: 10
            })
        );
        // Before it, continuing it: merged on the left too.
        m.insert(H - PAGE, 9, 1);
        assert_eq!(
            m.extent_at(H - PAGE),
            Some(Extent {
                pages: 6,
                file_page: 9
            })
        );
        // Adjacent in memory but not in the file: a separate extent.
        m.insert(H + 5 * PAGE, 40, 1);
        assert_eq!(m.extents(), 2);
        assert_eq!(m.mapped_pages(), 7);
    }

    #[test]
    fn a_new_mapping_over_old_ones_trims_and_splits_them() {
        let mut m = Maps::new(100);
        m.insert(H, 100, 8);
        // Pages 2..4 now map blocks 7..9: the old extent splits in two around them.
        m.insert(H + 2 * PAGE, 7, 2);
        assert_eq!(
            m.extent_at(H),
            Some(Extent {
                pages: 2,
                file_page: 100
            })
        );
        assert_eq!(
            m.extent_at(H + 2 * PAGE),
            Some(Extent {
                pages: 2,
                file_page: 7
            })
        );
        assert_eq!(
            m.extent_at(H + 4 * PAGE),
            Some(Extent {
                pages: 4,
                file_page: 104
            })
        );
        assert_eq!(m.extents(), 3);
        // Blocks 102 and 103 are mapped nowhere now; 104 still is.
        assert!(m.take_pages_of(102, 2).is_empty());
        assert_eq!(m.take_pages_of(104, 1), vec![H + 4 * PAGE]);
        assert_eq!(m.mapped_pages(), 2 + 2 + 3);
    }

    #[test]
    fn the_reverse_map_finds_every_page_a_block_was_read_into() {
        let mut m = Maps::new(100);
        // Block 5 read into three pages, block 6 into one.
        m.insert(H, 5, 1);
        m.insert(H + 10 * PAGE, 5, 2);
        m.insert(H + 40 * PAGE, 5, 1);
        assert_eq!(m.take_pages_of(5, 1), vec![H, H + 10 * PAGE, H + 40 * PAGE]);
        // Taken out: a second write of the block breaks nothing more.
        assert!(m.take_pages_of(5, 1).is_empty());
        assert_eq!(m.take_pages_of(6, 1), vec![H + 11 * PAGE]);
        assert_eq!(m.mapped_pages(), 0);
        // The extents (VMAs) stay until replaced.
        assert_eq!(m.extents(), 3);
        m.remove(H, 41);
        assert_eq!(m.extents(), 0);
    }

    #[test]
    fn the_bound_is_kept() {
        let mut m = Maps::new(2);
        m.insert(H, 1, 1);
        assert!(m.has_room());
        m.insert(H + 5 * PAGE, 9, 1);
        assert!(!m.has_room());
        // Merging into an existing extent still fits.
        m.insert(H + PAGE, 2, 1);
        assert_eq!(m.extents(), 2);
    }

    #[test]
    fn only_whole_congruent_pages_are_mappable() {
        assert_eq!(mappable(H, 0, 3 * PAGE), Some((0, 3)));
        assert_eq!(mappable(H + 512, 512, 3 * PAGE), Some((PAGE - 512, 2)));
        assert_eq!(mappable(H + 512, 0, 8 * PAGE), None);
        assert_eq!(mappable(H, 0, PAGE - 1), None);
        assert_eq!(mappable(H + 100, 100, PAGE), None);
        assert_eq!(
            page_runs(&[H, H + PAGE, H + 3 * PAGE]),
            vec![(H, 2), (H + 3 * PAGE, 1)]
        );
    }
}
