//! virtio-blk over a raw image file (virtio 1.x §5.2): read, write, flush (`fdatasync`: data the
//! guest flushed is on the host file when the flush completes), discard (hole punching), write
//! zeroes, get-id. One request queue.
//!
//! Owns the image file and the request parsing. Every request is checked before any I/O: the
//! header must be readable and the status byte writable, the data length a multiple of 512, the
//! sectors inside the image, writes refused on a read-only disk; a failed check completes the
//! request with `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for unknown types) and the queue goes on.
//!
//! # Data path
//! A read is one `preadv` straight into the guest's writable buffers, a write one `pwritev`
//! straight from its readable ones (iovecs over guest memory, resumed after a short transfer; a
//! read that meets the end of the file is an IOERR). A buffer that crosses a memory-region
//! boundary is split into one iovec per region rather than copied; the bounce buffer is left for
//! guest memory that cannot be described by iovecs at all (counted as the `bounced` fact).
//! Requests are served in batches of up to `BATCH`, in ring order: a run of reads (or of writes)
//! over adjacent sectors is merged into one system call of up to `MERGE_BYTES` (as QEMU's
//! virtio-blk merges requests; counted as the `merged` fact), and is retried request by request
//! if the merged call fails, so an error lands on the request it belongs to. Anything else (a
//! flush, a gap, a change of direction) ends the run, so a flush still follows every write
//! before it. Every request of a batch is in the used ring before the interrupt decision, made
//! once per batch.
//!
//! `direct=on` opens the image `O_DIRECT` (the host's page cache is bypassed: no double caching
//! of guest data, and host memory does not grow with the guest's I/O). `O_DIRECT` needs offsets,
//! lengths and buffers aligned: the alignment is probed at open (512, else 4096) and given to the
//! guest as `blk_size`, which Linux takes as its logical block size; a guest buffer that is not
//! aligned goes through an aligned bounce buffer (`bounced`), a request below the block size
//! fails.
//!
//! One worker thread, no pool: the worker spends most of a read workload inside the kernel's
//! page-cache copy (`perf`, `bench io`), so a pool only helps with a free core. Measured on a
//! 2-core host with the other core busy (a vCPU polling for completions): two threads copying
//! from the page cache moved no more than one (~9 GB/s either way), while merging 64 KiB requests
//! into 512 KiB calls gained ~15%. A pool would also give up the device's ordering on a single
//! queue.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::QueueT;
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::DiskConfig;
use super::moderation::{Coalesce, Moderator};
use super::queue::{Chain, Cursor, Seg, Vq};
use super::swap_mapper::{Mapper, Setup as MapperSetup};
use super::{common_features, Activation, DeviceStats, QueueHandler, VirtioDevice};

pub const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Bytes moved per step through the bounce buffer (the rare path, see [`guest_iovecs`]).
const CHUNK: usize = 1 << 20;
/// Most requests completed before the interrupt decision: bounds the latency an
/// interrupt-driven driver sees while a long run of requests is served.
const BATCH: usize = 32;
/// Most data bytes one merged run of adjacent requests moves in one system call: large enough
/// that the page-cache copy, not the per-call cost, dominates (`preadv` of 512 KiB runs ~15%
/// faster than eight of 64 KiB here), small enough that the first request of a run is not held
/// back for long.
const MERGE_BYTES: u64 = 1 << 20;

pub struct Block {
    index: usize,
    file: Arc<File>,
    sectors: u64,
    readonly: bool,
    /// `direct=on`: the alignment `O_DIRECT` needs of offsets, lengths and buffers (512 or
    /// 4096, told to the guest as its block size); 0 through the page cache.
    align: u64,
    id: [u8; 20],
    stats: Arc<DeviceStats>,
    /// What the data path's mapper needs (see `swap_mapper`).
    mapper_setup: MapperSetup,
    coalesce: Coalesce,
}

impl Block {
    /// Opens the image; a missing or unreadable image is a start-up error naming the file, and so
    /// is `direct=on` on a file system without `O_DIRECT`.
    pub fn open(cfg: &DiskConfig, index: usize) -> Result<Self, String> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = File::options()
            .read(true)
            .write(!cfg.readonly)
            .custom_flags(if cfg.direct { libc::O_DIRECT } else { 0 })
            .open(&cfg.path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) if cfg.direct => format!(
                    "disk image {}: its file system does not support O_DIRECT (direct=on)",
                    cfg.path.display()
                ),
                _ => format!("cannot open disk image {}: {e}", cfg.path.display()),
            })?;
        let len = file
            .metadata()
            .map_err(|e| format!("disk image {}: {e}", cfg.path.display()))?
            .len();
        let align = if cfg.direct {
            dio_alignment(&file)
                .map_err(|e| format!("disk image {} with direct=on: {e}", cfg.path.display()))?
        } else {
            0
        };
        let mapper_image = if cfg.swap_mapper {
            if !super::swap_mapper::supported() {
                return Err(format!(
                    "disk image {}: swap-mapper=on needs madvise(MADV_POPULATE_READ/WRITE) \
                     (Linux 5.14 or later)",
                    cfg.path.display()
                ));
            }
            let f = File::open(&cfg.path)
                .map_err(|e| format!("disk image {} (swap mapper): {e}", cfg.path.display()))?;
            Some(f)
        } else {
            None
        };
        let mapper_setup = MapperSetup::new(mapper_image);
        let mut id = [0u8; 20];
        let name = cfg
            .id
            .clone()
            .unwrap_or_else(|| format!("exitless-disk{index}"));
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Block {
            index,
            file: Arc::new(file),
            sectors: len / SECTOR,
            readonly: cfg.readonly,
            align,
            id,
            stats: Arc::default(),
            mapper_setup,
            coalesce: cfg.coalesce,
        })
    }

    /// The data path's mapper (see `swap_mapper`): mappings where `swap-mapper=on`, stale-read
    /// avoidance always.
    fn mapper(&self) -> Mapper {
        Mapper::new(&self.mapper_setup)
    }

    /// The block size the guest is told: what `O_DIRECT` needs, 4 KiB with the mapper (whole
    /// pages), else a sector.
    fn blk_size(&self) -> u64 {
        let page = if self.mapper_setup.image.is_some() {
            4096
        } else {
            0
        };
        self.align.max(page).max(SECTOR)
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        // seg_max: a request's data segments (chain minus header and status).
        c[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        c[20..24].copy_from_slice(&(self.blk_size() as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        // Discard and write zeroes: one segment per request, 4 KiB aligned.
        c[36..40].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[40..44].copy_from_slice(&1u32.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&(u32::MAX >> 9).to_le_bytes());
        c[52..56].copy_from_slice(&1u32.to_le_bytes());
        c[56] = 1;
        c
    }
}

impl VirtioDevice for Block {
    fn name(&self) -> String {
        format!("virtio-blk{}", self.index)
    }
    fn kind(&self) -> &'static str {
        "virtio-blk"
    }
    fn device_type(&self) -> u32 {
        2
    }
    fn pci_class(&self) -> u32 {
        0x01_80_00
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let mut f = common_features()
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    /// What the guest was told of the image: a restore opens the same path and refuses an image
    /// that changed size (or mode). The data is the image's: it is not in the snapshot.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        if self.mapper_setup.image.is_some() {
            return Err(
                "swap-mapper=on: the image pages it mapped into guest RAM are not saved".into(),
            );
        }
        crate::devices::state_json(&BlockSaved {
            sectors: self.sectors,
            readonly: self.readonly,
            blk_size: self.blk_size(),
        })
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: BlockSaved = crate::devices::state_from(state)?;
        let here = BlockSaved {
            sectors: self.sectors,
            readonly: self.readonly,
            blk_size: self.blk_size(),
        };
        if s != here {
            return Err(format!(
                "the disk image was {s:?} when the snapshot was taken and is {here:?} now \
                 (the guest's view of a disk cannot change under it)"
            ));
        }
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String> {
        let mut vq = a.queues.into_iter().next().ok_or("no request queue")?;
        vq.moderator = Moderator::new(self.coalesce);
        Ok(Box::new(BlockHandler {
            vq,
            file: self.file.clone(),
            sectors: self.sectors,
            readonly: self.readonly,
            align: self.align,
            id: self.id,
            stats: a.stats,
            buf: Vec::new(),
            run: Vec::new(),
            mapper: self.mapper(),
        }))
    }
    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }
}

/// What a snapshot keeps of a disk (its `save_state`).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BlockSaved {
    sectors: u64,
    readonly: bool,
    blk_size: u64,
}

pub struct BlockHandler {
    pub vq: Vq,
    file: Arc<File>,
    sectors: u64,
    readonly: bool,
    /// See [`Block`]: 0, or what `O_DIRECT` needs aligned.
    align: u64,
    id: [u8; 20],
    stats: Arc<DeviceStats>,
    buf: Vec<u8>,
    /// The run being gathered by [`Self::serve_batch`], kept for its allocation.
    run: Vec<Rw>,
    /// Reads into guest RAM as mappings, and what must happen before writes (`swap_mapper`).
    mapper: Mapper,
}

impl BlockHandler {
    /// Checks `sector .. sector + bytes/512` against the image.
    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        bytes.is_multiple_of(SECTOR)
            && sector
                .checked_add(bytes / SECTOR)
                .is_some_and(|end| end <= self.sectors)
    }

    /// Moves `len` bytes between the image at byte `pos` and the buffers `segs` from their byte
    /// `skip` on: into the guest (`to_guest`, a read request) or out of it. One `preadv` /
    /// `pwritev` straight between the file and guest memory; the bounce buffer only when guest
    /// memory cannot be described by iovecs (see [`guest_iovecs`]). False on any failure, a
    /// short read at the end of the file included.
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[Seg],
        skip: u64,
        len: u64,
        pos: u64,
        to_guest: bool,
    ) -> bool {
        if len == 0 {
            return true;
        }
        if self.align > 0 && !(pos.is_multiple_of(self.align) && len.is_multiple_of(self.align)) {
            // Below the block size the guest was told: O_DIRECT cannot do it.
            return false;
        }
        if let Some(mut g) = guest_iovecs(mem, segs, skip, len) {
            if iov_aligned(&g.iov, self.align) {
                return self.io(&mut g.iov, pos, !to_guest).is_ok();
            }
        }
        if !to_guest && self.mapper.before_write(pos, len).is_err() {
            return false;
        }
        self.stats.add_extra("bounced", 1);
        let mut c = Cursor::new(mem, segs);
        if !c.skip(skip) {
            return false;
        }
        let (mut pos, mut left) = (pos, len);
        while left > 0 {
            let n = (left as usize).min(CHUNK);
            let buf = aligned(&mut self.buf, n, self.align);
            let ok = if to_guest {
                self.file.read_exact_at(buf, pos).is_ok() && c.write(buf)
            } else {
                c.read(buf) && self.file.write_all_at(buf, pos).is_ok()
            };
            if !ok {
                return false;
            }
            pos += n as u64;
            left -= n as u64;
        }
        true
    }

    /// One read or write between the image at `pos` and guest memory described by `iov`: a write
    /// first breaks the mappings of the blocks it changes, a read goes through the mapper (which
    /// maps whole pages where it is on, and copies the rest). See `swap_mapper`.
    fn io(&mut self, iov: &mut [libc::iovec], pos: u64, write: bool) -> io::Result<()> {
        if write {
            let len = iov.iter().map(|v| v.iov_len as u64).sum();
            if let Err(e) = self.mapper.before_write(pos, len) {
                crate::warn_limited!("virtio-blk", "virtio-blk: breaking mappings: {e}");
                return Err(e);
            }
            return rw_all(&self.file, iov, pos, true);
        }
        self.mapper.read(&self.file, iov, pos)
    }

    /// The mapper's counts into the device's facts (once per batch).
    fn mapper_facts(&mut self) {
        let (c, extents) = self.mapper.take_counts();
        let s = &self.stats;
        for (k, v) in [
            ("mapper_pages", c.mapped_pages),
            ("mapper_calls", c.map_calls),
            ("mapper_breaks", c.broken_pages),
            ("mapper_full", c.full),
            ("mapper_failures", c.map_failures),
            ("stale_dropped", c.stale_dropped),
        ] {
            if v > 0 {
                s.add_extra(k, v);
            }
        }
        if self.mapper.enabled() {
            s.set_extra("mapper_extents", extents as u64);
        }
    }

    /// Serves one request other than a read or write that passed [`Self::rw_of`]; returns
    /// (status, bytes written to the guest excluding the status).
    fn request(&mut self, chain: &Chain, mem: &GuestMemoryMmap) -> (u8, u64) {
        let mut r = Cursor::new(mem, &chain.readable);
        let mut hdr = [0u8; 16];
        if !r.read(&mut hdr) {
            return (VIRTIO_BLK_S_IOERR as u8, 0);
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let data_in = chain.writable_len() - 1;
        let data_out = r.remaining();
        let ioerr = (VIRTIO_BLK_S_IOERR as u8, 0);
        match ty {
            // A read or write that passed its checks was served by `serve_run`; this one failed
            // them (out of range, not whole sectors, or a write to a read-only disk).
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => ioerr,
            VIRTIO_BLK_T_FLUSH => {
                self.stats.add_extra("flushes", 1);
                match self.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                    Err(_) => ioerr,
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_in as usize).min(20);
                let mut w = Cursor::new(mem, &chain.writable);
                if !w.write(&self.id[..n]) {
                    return ioerr;
                }
                (VIRTIO_BLK_S_OK as u8, n as u64)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly || data_out == 0 || !data_out.is_multiple_of(16) {
                    return ioerr;
                }
                let mut seg = [0u8; 16];
                while r.remaining() >= 16 {
                    if !r.read(&mut seg) {
                        return ioerr;
                    }
                    let s = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                    let n = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                    if !self.in_range(s, n * SECTOR) {
                        return ioerr;
                    }
                    let zero = ty == VIRTIO_BLK_T_WRITE_ZEROES;
                    let unmap = !zero || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                    if !self.deallocate(s * SECTOR, n * SECTOR, zero, unmap) {
                        return ioerr;
                    }
                }
                self.stats.add_extra(
                    if ty == VIRTIO_BLK_T_DISCARD {
                        "discards"
                    } else {
                        "write_zeroes"
                    },
                    1,
                );
                (VIRTIO_BLK_S_OK as u8, 0)
            }
            _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    /// Discard (`zero` false: advisory, failures ignored) or write zeroes over a byte range.
    fn deallocate(&mut self, off: u64, len: u64, zero: bool, unmap: bool) -> bool {
        if self.mapper.before_write(off, len).is_err() {
            return false;
        }
        let fd = self.file.as_raw_fd();
        let falloc = |mode: i32| {
            // SAFETY: fallocate on a descriptor we own, with checked in-range arguments.
            unsafe { libc::fallocate(fd, mode, off as i64, len as i64) == 0 }
        };
        if unmap && falloc(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) {
            return true;
        }
        if !zero {
            return true;
        }
        if falloc(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) {
            return true;
        }
        let mut zeros = Vec::new();
        let zeros = aligned(&mut zeros, CHUNK, self.align);
        let mut pos = off;
        while pos < off + len {
            let n = ((off + len - pos) as usize).min(CHUNK);
            if self.file.write_all_at(&zeros[..n], pos).is_err() {
                return false;
            }
            pos += n as u64;
        }
        true
    }

    /// Where a chain that is a plain read or write points: `(write, byte position in the image,
    /// data bytes)`, when every check passed (header readable, status writable, length and range
    /// fit, not a write to a read-only disk). Anything else, failures included, is served one at a
    /// time by [`Self::request`].
    fn rw_of(&self, chain: &Chain, mem: &GuestMemoryMmap) -> Option<(bool, u64, u64)> {
        let mut hdr = [0u8; 16];
        if !Cursor::new(mem, &chain.readable).read(&mut hdr) {
            return None;
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        let (write, len) = match ty {
            VIRTIO_BLK_T_IN => (false, chain.writable_len() - 1),
            VIRTIO_BLK_T_OUT if !self.readonly => (true, chain.readable_len() - 16),
            _ => return None,
        };
        self.in_range(sector, len)
            .then(|| (write, sector * SECTOR, len))
    }

    /// Takes up to `BATCH` available requests, serving them in ring order: runs of reads (or of
    /// writes) over adjacent sectors are merged into one `preadv`/`pwritev`, everything else is
    /// served alone (after the run before it, so a flush still follows the writes before it).
    /// Every request is in the used ring when this returns. Returns how many were taken.
    fn serve_batch(&mut self) -> usize {
        let mem = self.vq.mem.clone();
        let mut run = std::mem::take(&mut self.run);
        let mut taken = 0;
        while taken < BATCH {
            let Some((head, res)) = self.vq.pop() else {
                break;
            };
            taken += 1;
            self.stats.add(&self.stats.requests, 1);
            let chain = match res {
                Ok(c) if c.writable_len() >= 1 && c.readable_len() >= 16 => c,
                other => {
                    // Malformed or hostile: nothing can be trusted, not even where the status goes.
                    if other.is_err() {
                        self.stats.add(&self.stats.bad_chains, 1);
                    }
                    self.stats.add(&self.stats.errors, 1);
                    self.add_used(head, 0);
                    continue;
                }
            };
            if let Some((write, pos, len)) = self.rw_of(&chain, &mem) {
                let adjacent = run.last().is_some_and(|r: &Rw| {
                    r.write == write && r.pos + r.len == pos && run_bytes(&run) + len <= MERGE_BYTES
                });
                if !adjacent {
                    self.serve_run(&mut run, &mem);
                }
                run.push(Rw {
                    head,
                    chain,
                    write,
                    pos,
                    len,
                });
                continue;
            }
            self.serve_run(&mut run, &mem);
            let (status, written) = self.request(&chain, &mem);
            self.finish(head, &chain, &mem, status, written);
        }
        self.serve_run(&mut run, &mem);
        self.run = run;
        taken
    }

    /// Serves a run of adjacent reads or writes (see [`Self::serve_batch`]) and empties it: one
    /// system call for the whole run, or, if that fails or the run is a single request, one per
    /// request, so a failure is reported on the request it belongs to.
    fn serve_run(&mut self, run: &mut Vec<Rw>, mem: &GuestMemoryMmap) {
        let Some(first) = run.first() else {
            return;
        };
        let (write, pos) = (first.write, first.pos);
        let merged = run.len() > 1 && {
            let mut iov = Vec::new();
            let mut guards = Vec::new();
            let mut whole = true;
            for r in run.iter() {
                let (segs, skip) = r.data();
                match guest_iovecs(mem, segs, skip, r.len) {
                    Some(g) => {
                        iov.extend_from_slice(&g.iov);
                        guards.push(g);
                    }
                    None => {
                        whole = false;
                        break;
                    }
                }
            }
            whole
                && iov.len() <= IOV_MAX
                && iov_aligned(&iov, self.align)
                && self.io(&mut iov, pos, write).is_ok()
        };
        if merged {
            self.stats.add_extra("merged", run.len() as u64 - 1);
        }
        for r in run.drain(..) {
            let ok = merged || {
                let (segs, skip) = r.data();
                self.transfer(mem, segs, skip, r.len, r.pos, !r.write)
            };
            let (status, written) = match (ok, r.write) {
                (false, _) => (VIRTIO_BLK_S_IOERR as u8, 0),
                (true, true) => {
                    self.stats.add(&self.stats.bytes_from_guest, r.len);
                    self.stats.add_extra("writes", 1);
                    (VIRTIO_BLK_S_OK as u8, 0)
                }
                (true, false) => {
                    self.stats.add(&self.stats.bytes_to_guest, r.len);
                    self.stats.add_extra("reads", 1);
                    (VIRTIO_BLK_S_OK as u8, r.len)
                }
            };
            self.finish(r.head, &r.chain, mem, status, written);
        }
    }

    /// Writes a served request's status byte (the chain's last writable byte) and puts it in the
    /// used ring (the used index moves at once, for a driver that polls); the interrupt is left
    /// to [`Self::signal`]. The chain has room for the status (checked when it was taken).
    fn finish(
        &mut self,
        head: u16,
        chain: &Chain,
        mem: &GuestMemoryMmap,
        status: u8,
        written: u64,
    ) {
        if status != VIRTIO_BLK_S_OK as u8 {
            self.stats.add(&self.stats.errors, 1);
        }
        let mut w = Cursor::new(mem, &chain.writable);
        let ok = w.skip(chain.writable_len() - 1) && w.write(&[status]);
        let len = if ok { written + 1 } else { 0 };
        self.add_used(head, len as u32);
    }

    fn add_used(&mut self, head: u16, len: u32) {
        if let Err(e) = self.vq.queue.add_used(&self.vq.mem, head, len) {
            crate::warn_limited!("virtio-queue", "virtio-blk: add_used: {e:?}");
        }
    }

    /// One interrupt for the `n` requests completed since the last call, if the driver wants one
    /// (`used_event` with EVENT_IDX: whether it lies among those completions), now or when
    /// moderation (`coalesce=`) says.
    fn signal(&mut self, n: usize) {
        self.vq.signal_used(n as u32);
        self.stats
            .set_extra("interrupts_held", self.vq.moderator.held);
    }
}

/// A read or write that passed its checks, waiting in a run of adjacent ones
/// (see [`BlockHandler::serve_batch`]).
struct Rw {
    head: u16,
    chain: Chain,
    write: bool,
    /// Byte position in the image.
    pos: u64,
    /// Data bytes.
    len: u64,
}

impl Rw {
    /// The data buffers and how many of their first bytes are not data (a write's header).
    fn data(&self) -> (&[Seg], u64) {
        if self.write {
            (&self.chain.readable, 16)
        } else {
            (&self.chain.writable, 0)
        }
    }
}

fn run_bytes(run: &[Rw]) -> u64 {
    run.iter().map(|r| r.len).sum()
}

impl QueueHandler for BlockHandler {
    fn queues(&self) -> Vec<&Vq> {
        vec![&self.vq]
    }

    /// Serves every available request, with one interrupt decision per batch of up to `BATCH`
    /// (not per request), then re-enables notifications and goes on if more arrived meanwhile.
    fn process(&mut self, _q: usize) -> Result<(), String> {
        loop {
            self.vq.disable_notification();
            loop {
                let n = self.serve_batch();
                if n == 0 {
                    break;
                }
                self.signal(n);
                self.mapper_facts();
            }
            if !self.vq.enable_notification() {
                break;
            }
        }
        Ok(())
    }

    fn polled_queue(&mut self, _q: usize) -> Option<&mut Vq> {
        Some(&mut self.vq)
    }

    fn interrupt_deadline(&self) -> Option<std::time::Instant> {
        self.vq.moderator.deadline()
    }

    fn send_due(&mut self, now: std::time::Instant) {
        self.vq.send_due(now);
    }
}

/// The alignment `O_DIRECT` needs on `file`: 512 unless a 512-byte read at 0 into an aligned
/// buffer is refused, then 4096 (4Kn devices); an error if neither works.
fn dio_alignment(file: &File) -> Result<u64, String> {
    let mut buf = Vec::new();
    for align in [SECTOR, 4096] {
        let b = aligned(&mut buf, align as usize, align);
        match file.read_at(b, 0) {
            Ok(_) => return Ok(align),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(format!("O_DIRECT read: {e}")),
        }
    }
    Err("O_DIRECT reads are refused at every alignment tried (512, 4096)".into())
}

/// The first `n` bytes of `buf` from an address aligned to `align` (0: any), growing `buf` (zero
/// filled) as needed: the bounce buffer of an `O_DIRECT` disk must be aligned like the I/O.
fn aligned(buf: &mut Vec<u8>, n: usize, align: u64) -> &mut [u8] {
    let a = (align as usize).max(1);
    if buf.len() < n + a {
        buf.resize(n + a, 0);
    }
    let off = buf.as_ptr().align_offset(a);
    &mut buf[off..off + n]
}

/// Whether every iovec's address and length are multiples of `align` (0: no constraint).
fn iov_aligned(iov: &[libc::iovec], align: u64) -> bool {
    align == 0
        || iov.iter().all(|v| {
            (v.iov_base as u64).is_multiple_of(align) && (v.iov_len as u64).is_multiple_of(align)
        })
}

/// Most iovecs one `preadv`/`pwritev` takes (`UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Guest buffers as iovecs, with the guards that keep their mappings alive until the I/O is done.
struct GuestIov {
    iov: Vec<libc::iovec>,
    _guards: Vec<PtrGuardMut>,
}

/// `len` bytes of the buffers `segs` from their byte `skip` on, as iovecs into guest memory. A
/// buffer that crosses a memory-region boundary becomes one iovec per region (the regions are
/// separate host mappings). None when some part is not mapped guest memory (the buffers were
/// checked when the chain was taken, so only a region gone since could do it) or the pieces
/// exceed `IOV_MAX`: the caller then copies through its bounce buffer.
fn guest_iovecs(mem: &GuestMemoryMmap, segs: &[Seg], skip: u64, len: u64) -> Option<GuestIov> {
    let mut g = GuestIov {
        iov: Vec::with_capacity(segs.len()),
        _guards: Vec::with_capacity(segs.len()),
    };
    let (mut skip, mut left) = (skip, len);
    for s in segs {
        if left == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let k = (s.len - skip).min(left);
        let at = GuestAddress(s.addr.checked_add(skip)?);
        skip = 0;
        left -= k;
        for slice in GuestMemoryBackend::get_slices(mem, at, usize::try_from(k).ok()?) {
            let slice = slice.ok()?;
            if slice.is_empty() {
                continue;
            }
            let guard = slice.ptr_guard_mut();
            g.iov.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
            g._guards.push(guard);
        }
    }
    (left == 0 && g.iov.len() <= IOV_MAX).then_some(g)
}

/// All of `iov` from the file at `pos`: `pwritev` (`write`) or `preadv`, resumed after a short
/// transfer or a signal. A transfer of 0 bytes (a read at the end of the file) is an error.
pub(super) fn rw_all(
    file: &File,
    iov: &mut [libc::iovec],
    mut pos: u64,
    write: bool,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut at = 0;
    while at < iov.len() {
        let rest = &iov[at..];
        let off = libc::off_t::try_from(pos).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: every iovec is a live mapping of guest memory (kept by the caller's guards) or
        // a part of one, `rest.len()` is at most IOV_MAX (checked when the iovecs were built), and
        // the kernel only copies between those bytes and the file. The guest may touch the same
        // memory meanwhile: that is its own data race, which cannot affect this process.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), rest.len() as libc::c_int, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), rest.len() as libc::c_int, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(if write {
                io::ErrorKind::WriteZero
            } else {
                io::ErrorKind::UnexpectedEof
            }
            .into());
        }
        let mut n = n as usize;
        pos += n as u64;
        while n > 0 && at < iov.len() {
            let v = &mut iov[at];
            if n >= v.iov_len {
                n -= v.iov_len;
                at += 1;
            } else {
                // SAFETY: `n < iov_len`, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn disk(readonly: bool) -> (tempfile_path::TempPath, Block) {
        disk_with(readonly, false).unwrap()
    }

    /// A 64 KiB image of 0xaa; with `direct`, None (and why, printed) where the temporary
    /// directory's file system has no O_DIRECT.
    fn disk_with(readonly: bool, direct: bool) -> Option<(tempfile_path::TempPath, Block)> {
        let p = tempfile_path::TempPath::new("blk");
        std::fs::write(&p.0, vec![0xaau8; 64 * 1024]).unwrap();
        let b = Block::open(
            &DiskConfig {
                path: p.0.clone(),
                readonly,
                id: Some("serial-1".into()),
                direct,
                swap_mapper: false,
                coalesce: Coalesce::Off,
            },
            0,
        );
        match b {
            Err(e) if direct && e.contains("does not support O_DIRECT") => {
                eprintln!("skipped: {e}");
                None
            }
            b => Some((p, b.unwrap())),
        }
    }

    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(tag: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                TempPath(
                    std::env::temp_dir()
                        .join(format!("exitless-test-{tag}-{}-{n}", std::process::id())),
                )
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn handler(b: &mut Block, mem: &GuestMemoryMmap, dq: &DriverQueue) -> BlockHandler {
        let vq = vq(mem, dq, 0, true);
        BlockHandler {
            vq,
            file: b.file.clone(),
            sectors: b.sectors,
            readonly: b.readonly,
            align: b.align,
            id: b.id,
            stats: b.stats(),
            buf: Vec::new(),
            run: Vec::new(),
            mapper: b.mapper(),
        }
    }

    fn header(mem: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
        mem.write_obj(ty, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Found by fuzzing (`fuzz/`, virtio_block): a read of a sector past 2^55 computed its byte
    /// position (`sector * 512`) before the range check refused it, an overflow that panicked the
    /// worker in a build with overflow checks.
    #[test]
    fn a_sector_whose_byte_position_overflows_is_an_io_error() {
        let (_path, mut b) = disk(false);
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let mut h = handler(&mut b, &mem, &dq);
        for (i, sector) in [1u64 << 55, u64::MAX].into_iter().enumerate() {
            let at = 0x10000 + 0x100 * i as u64;
            header(&mem, at, VIRTIO_BLK_T_IN, sector);
            mem.write_obj(0xffu8, GuestAddress(0x12000 + i as u64))
                .unwrap();
            dq.add(
                &mem,
                &[
                    (at, 16, false),
                    (0x11000, 512, true),
                    (0x12000 + i as u64, 1, true),
                ],
            );
        }
        h.process(0).unwrap();
        for i in 0..2u64 {
            let status: u8 = mem.read_obj(GuestAddress(0x12000 + i)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
        }
    }

    #[test]
    fn write_flush_read_get_id_and_errors() {
        let (path, mut b) = disk(false);
        let mem = memory();
        let mut dq = DriverQueue::new(32);
        let mut h = handler(&mut b, &mem, &dq);
        // Write 1024 bytes at sector 2.
        header(&mem, 0x10000, VIRTIO_BLK_T_OUT, 2);
        mem.write_slice(&[0x5au8; 1024], GuestAddress(0x11000))
            .unwrap();
        dq.add(
            &mem,
            &[
                (0x10000, 16, false),
                (0x11000, 1024, false),
                (0x12000, 1, true),
            ],
        );
        // Flush.
        header(&mem, 0x10100, VIRTIO_BLK_T_FLUSH, 0);
        dq.add(&mem, &[(0x10100, 16, false), (0x12001, 1, true)]);
        // Read it back (header and data in separate buffers, status last).
        header(&mem, 0x10200, VIRTIO_BLK_T_IN, 2);
        dq.add(
            &mem,
            &[
                (0x10200, 16, false),
                (0x13000, 1024, true),
                (0x12002, 1, true),
            ],
        );
        // Get ID.
        header(&mem, 0x10300, VIRTIO_BLK_T_GET_ID, 0);
        dq.add(
            &mem,
            &[
                (0x10300, 16, false),
                (0x14000, 20, true),
                (0x12003, 1, true),
            ],
        );
        // Past the end of the disk.
        header(&mem, 0x10400, VIRTIO_BLK_T_IN, 127);
        dq.add(
            &mem,
            &[
                (0x10400, 16, false),
                (0x15000, 1024, true),
                (0x12004, 1, true),
            ],
        );
        // Unknown type.
        header(&mem, 0x10500, 77, 0);
        dq.add(&mem, &[(0x10500, 16, false), (0x12005, 1, true)]);
        // Header in a writable buffer (wrong direction): no readable header.
        dq.add(&mem, &[(0x10600, 16, true), (0x12006, 1, true)]);
        // Write zeroes over sectors 4..8.
        header(&mem, 0x10700, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        mem.write_obj(4u64, GuestAddress(0x10710)).unwrap();
        mem.write_obj(4u32, GuestAddress(0x10718)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x1071c)).unwrap();
        dq.add(&mem, &[(0x10700, 32, false), (0x12007, 1, true)]);
        h.process(0).unwrap();

        let status = |i: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + i)).unwrap();
        assert_eq!(status(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status(1), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status(2), VIRTIO_BLK_S_OK as u8);
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x13000)).unwrap();
        assert_eq!(back, [0x5a; 1024]);
        assert_eq!(status(3), VIRTIO_BLK_S_OK as u8);
        let mut id = [0u8; 8];
        mem.read_slice(&mut id, GuestAddress(0x14000)).unwrap();
        assert_eq!(&id, b"serial-1");
        assert_eq!(status(4), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(5), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(status(7), VIRTIO_BLK_S_OK as u8);
        // Used ring: 8 completions; the read returned 1024 data bytes + status.
        let (idx, id2, len2) = dq.used(&mem, 2);
        assert_eq!(idx, 8);
        assert_eq!((id2, len2), (5, 1025));
        assert_eq!(
            dq.used(&mem, 6).2,
            0,
            "malformed request completes with 0 bytes"
        );
        let file = std::fs::read(&path.0).unwrap();
        assert!(file[1024..2048].iter().all(|&b| b == 0x5a));
        assert!(file[0..1024].iter().all(|&b| b == 0xaa));
        assert!(file[2048..4096].iter().all(|&b| b == 0), "write zeroes");
        assert_eq!(file[4096], 0xaa);
        let s = b.stats();
        assert_eq!(s.requests.load(std::sync::atomic::Ordering::Relaxed), 8);
        assert_eq!(s.errors.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// Byte `i` of the patterned image.
    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    fn extra(b: &Block, k: &str) -> u64 {
        b.stats().extra.lock().unwrap().get(k).copied().unwrap_or(0)
    }

    /// A data request of `len` bytes at `sector`: header at `hdr`, data at `data`, status at
    /// `status`.
    fn rw(
        dq: &mut DriverQueue,
        mem: &GuestMemoryMmap,
        ty: u32,
        sector: u64,
        at: (u64, u64, u64),
        len: u32,
    ) {
        let (hdr, data, status) = at;
        header(mem, hdr, ty, sector);
        dq.add(
            mem,
            &[
                (hdr, 16, false),
                (data, len, ty == VIRTIO_BLK_T_IN),
                (status, 1, true),
            ],
        );
    }

    #[test]
    fn adjacent_requests_are_merged_and_a_flush_or_a_gap_ends_the_run() {
        let (path, mut b) = disk(false);
        let img: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        std::fs::write(&path.0, &img).unwrap();
        let mem = memory();
        let mut dq = DriverQueue::new(32);
        let mut h = handler(&mut b, &mem, &dq);
        // Three adjacent 1 KiB reads (sectors 0, 2, 4) into scattered buffers: one run.
        for i in 0..3u64 {
            rw(
                &mut dq,
                &mem,
                VIRTIO_BLK_T_IN,
                2 * i,
                (0x10000 + 0x100 * i, 0x20000 + 0x1100 * i, 0x12000 + i),
                1024,
            );
        }
        // A gap (sector 10): a run of its own. Then two adjacent writes, a flush, one more
        // adjacent write: the flush ends the run.
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            10,
            (0x10300, 0x24000, 0x12003),
            512,
        );
        mem.write_slice(&[0x11u8; 512], GuestAddress(0x30000))
            .unwrap();
        mem.write_slice(&[0x22u8; 512], GuestAddress(0x31000))
            .unwrap();
        mem.write_slice(&[0x33u8; 512], GuestAddress(0x32000))
            .unwrap();
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            20,
            (0x10400, 0x30000, 0x12004),
            512,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            21,
            (0x10500, 0x31000, 0x12005),
            512,
        );
        header(&mem, 0x10600, VIRTIO_BLK_T_FLUSH, 0);
        dq.add(&mem, &[(0x10600, 16, false), (0x12006, 1, true)]);
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            22,
            (0x10700, 0x32000, 0x12007),
            512,
        );
        // A read of what the writes before it in the ring wrote: served after them.
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            20,
            (0x10800, 0x33000, 0x12008),
            1536,
        );
        h.process(0).unwrap();

        for i in 0..9u64 {
            let st: u8 = mem.read_obj(GuestAddress(0x12000 + i)).unwrap();
            assert_eq!(st, VIRTIO_BLK_S_OK as u8, "request {i}");
        }
        for i in 0..3usize {
            let mut got = vec![0u8; 1024];
            mem.read_slice(&mut got, GuestAddress(0x20000 + 0x1100 * i as u64))
                .unwrap();
            assert_eq!(got, &img[1024 * i..1024 * (i + 1)], "read {i}");
        }
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x24000)).unwrap();
        assert_eq!(got, &img[5120..5632]);
        let mut back = vec![0u8; 1536];
        mem.read_slice(&mut back, GuestAddress(0x33000)).unwrap();
        assert!(back[..512].iter().all(|&x| x == 0x11));
        assert!(back[512..1024].iter().all(|&x| x == 0x22));
        assert!(back[1024..].iter().all(|&x| x == 0x33));
        let file = std::fs::read(&path.0).unwrap();
        assert!(file[20 * 512..21 * 512].iter().all(|&x| x == 0x11));
        assert!(file[22 * 512..23 * 512].iter().all(|&x| x == 0x33));
        // Used ring in ring order, each read with its own length.
        assert_eq!(dq.used(&mem, 0).2, 1025);
        assert_eq!(dq.used(&mem, 3).2, 513);
        assert_eq!(dq.used(&mem, 4).2, 1);
        assert_eq!(dq.used(&mem, 8).2, 1537);
        // Merged: reads 1 and 2 into read 0, the second write into the first.
        assert_eq!(extra(&b, "merged"), 3);
        assert_eq!(extra(&b, "reads"), 5);
        assert_eq!(extra(&b, "writes"), 3);
    }

    #[test]
    fn a_merged_run_that_fails_is_retried_request_by_request() {
        let (path, mut b) = disk(false);
        let img: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        std::fs::write(&path.0, &img).unwrap();
        let mem = memory();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        // The image shrinks under the device to 3 sectors: a run of reads over sectors 0..4
        // fails as a whole; the first two requests are still served, the last one fails.
        std::fs::File::options()
            .write(true)
            .open(&path.0)
            .unwrap()
            .set_len(1536)
            .unwrap();
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            (0x10000, 0x20000, 0x12000),
            512,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            1,
            (0x10100, 0x21000, 0x12001),
            1024,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            3,
            (0x10200, 0x22000, 0x12002),
            512,
        );
        h.process(0).unwrap();
        let st = |i: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + i)).unwrap();
        assert_eq!(st(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(st(1), VIRTIO_BLK_S_OK as u8);
        assert_eq!(st(2), VIRTIO_BLK_S_IOERR as u8);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(0x21000)).unwrap();
        assert_eq!(got, &img[512..1536]);
        assert_eq!(extra(&b, "merged"), 0);
        assert_eq!(
            b.stats().errors.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_read_scatters_into_several_descriptors_at_the_right_addresses() {
        let (path, mut b) = disk(false);
        let img: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        std::fs::write(&path.0, &img).unwrap();
        let mem = memory();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        // 2048 bytes from sector 3 into 300 + 700 + 1049 bytes, the status being the last byte
        // of the last buffer; guard bytes around each buffer must stay untouched.
        mem.write_slice(&[0xeeu8; 0x8000], GuestAddress(0x20000))
            .unwrap();
        header(&mem, 0x10000, VIRTIO_BLK_T_IN, 3);
        let bufs = [(0x20010u64, 300usize), (0x21007, 700), (0x23003, 1048)];
        dq.add(
            &mem,
            &[
                (0x10000, 16, false),
                (bufs[0].0, 300, true),
                (bufs[1].0, 700, true),
                (bufs[2].0, 1049, true),
            ],
        );
        h.process(0).unwrap();
        let mut at = 3 * 512;
        for (addr, len) in bufs {
            let mut got = vec![0u8; len];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert_eq!(got, &img[at..at + len], "buffer at {addr:#x}");
            at += len;
            let before: u8 = mem.read_obj(GuestAddress(addr - 1)).unwrap();
            assert_eq!(before, 0xee, "byte before {addr:#x}");
        }
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x23003 + 1048)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x20010 + 300)).unwrap(),
            0xee
        );
        assert_eq!(dq.used(&mem, 0), (1, 0, 2049));
        let s = b.stats();
        assert_eq!(
            s.bytes_to_guest.load(std::sync::atomic::Ordering::Relaxed),
            2048
        );
        assert!(!s.extra.lock().unwrap().contains_key("bounced"));
    }

    #[test]
    fn a_write_gathers_from_several_descriptors() {
        let (path, mut b) = disk(false);
        let mem = memory();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        // The header and the first 200 data bytes share a buffer; then 312 and 1024 bytes.
        header(&mem, 0x10000, VIRTIO_BLK_T_OUT, 5);
        let data: Vec<u8> = (0..1536).map(pattern).collect();
        mem.write_slice(&data[..200], GuestAddress(0x10010))
            .unwrap();
        mem.write_slice(&data[200..512], GuestAddress(0x21001))
            .unwrap();
        mem.write_slice(&data[512..], GuestAddress(0x22fff))
            .unwrap();
        dq.add(
            &mem,
            &[
                (0x10000, 216, false),
                (0x21001, 312, false),
                (0x22fff, 1024, false),
                (0x12000, 1, true),
            ],
        );
        h.process(0).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(dq.used(&mem, 0), (1, 0, 1));
        let file = std::fs::read(&path.0).unwrap();
        assert_eq!(&file[5 * 512..5 * 512 + 1536], &data[..]);
        assert!(file[..5 * 512].iter().all(|&b| b == 0xaa));
        assert!(file[5 * 512 + 1536..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn buffers_across_memory_regions_and_reads_past_the_end_of_the_file() {
        let (path, mut b) = disk(false);
        let img: Vec<u8> = (0..64 * 1024).map(pattern).collect();
        std::fs::write(&path.0, &img).unwrap();
        // Two regions (two host mappings) meeting at 0x80000.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x80000),
            (GuestAddress(0x80000), 0x80000),
        ])
        .unwrap();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        // A write of 1 KiB from a straddling buffer to sector 0 (served before the read below
        // overwrites the buffer).
        header(&mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0x77u8; 1024], GuestAddress(0x7fe00))
            .unwrap();
        dq.add(
            &mem,
            &[
                (0x10000, 16, false),
                (0x7fe00, 1024, false),
                (0x12000, 1, true),
            ],
        );
        // A read of 4 KiB from sector 8 into a buffer that straddles the boundary.
        header(&mem, 0x10100, VIRTIO_BLK_T_IN, 8);
        dq.add(
            &mem,
            &[
                (0x10100, 16, false),
                (0x7f800, 4096, true),
                (0x12001, 1, true),
            ],
        );
        h.process(0).unwrap();
        let status = |i: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + i)).unwrap();
        assert_eq!(status(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(status(1), VIRTIO_BLK_S_OK as u8);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x7f800)).unwrap();
        assert_eq!(got, &img[4096..8192]);
        assert!(std::fs::read(&path.0).unwrap()[..1024]
            .iter()
            .all(|&b| b == 0x77));
        // One iovec per region, no copy.
        assert!(!b.stats().extra.lock().unwrap().contains_key("bounced"));
        // The image shrinks behind the device's back: a read of sectors it announced but the file
        // no longer has is an I/O error, not a partial success.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path.0)
            .unwrap()
            .set_len(8192)
            .unwrap();
        header(&mem, 0x10200, VIRTIO_BLK_T_IN, 14);
        dq.add(
            &mem,
            &[
                (0x10200, 16, false),
                (0x30000, 2048, true),
                (0x12002, 1, true),
            ],
        );
        h.process(0).unwrap();
        assert_eq!(status(2), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(dq.used(&mem, 2), (3, 6, 1));
    }

    #[test]
    fn readonly_disks_refuse_writes() {
        let (path, mut b) = disk(true);
        assert!(b.features() & (1 << VIRTIO_BLK_F_RO) != 0);
        let mem = memory();
        let mut dq = DriverQueue::new(4);
        let mut h = handler(&mut b, &mem, &dq);
        header(&mem, 0x10000, VIRTIO_BLK_T_OUT, 0);
        dq.add(
            &mem,
            &[
                (0x10000, 16, false),
                (0x11000, 512, false),
                (0x12000, 1, true),
            ],
        );
        h.process(0).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        assert_eq!(std::fs::read(&path.0).unwrap()[0], 0xaa);
        // Config is read-only.
        b.write_config(0, &[0; 8]);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
    }

    #[test]
    fn direct_disks_bypass_the_page_cache_and_bounce_unaligned_buffers() {
        let Some((path, mut b)) = disk_with(false, true) else {
            return;
        };
        assert!(b.align == 512 || b.align == 4096, "{}", b.align);
        let mut cfg = [0u8; 4];
        b.read_config(20, &mut cfg);
        assert_eq!(u64::from(u32::from_le_bytes(cfg)), b.align, "blk_size");
        let a = b.align;
        let mem = memory();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        // An aligned write straight from guest memory, then the same sectors read back into an
        // unaligned buffer (bounced), then a request below the block size (refused when the
        // block size is 4096; 512-byte sectors are always fine).
        mem.write_slice(&vec![0x3cu8; 2 * a as usize], GuestAddress(0x20000))
            .unwrap();
        let sector = a / 512;
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            sector,
            (0x10000, 0x20000, 0x12000),
            2 * a as u32,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            sector,
            (0x10100, 0x30008, 0x12001),
            2 * a as u32,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            1,
            (0x10200, 0x40000, 0x12002),
            512,
        );
        h.process(0).unwrap();
        let st = |i: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + i)).unwrap();
        assert_eq!(st(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(st(1), VIRTIO_BLK_S_OK as u8);
        let mut back = vec![0u8; 2 * a as usize];
        mem.read_slice(&mut back, GuestAddress(0x30008)).unwrap();
        assert!(back.iter().all(|&x| x == 0x3c));
        assert_eq!(extra(&b, "bounced"), 1, "only the unaligned read");
        let want = if a == 512 {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        assert_eq!(st(2), want as u8);
        let file = std::fs::read(&path.0).unwrap();
        let at = a as usize;
        assert!(file[at..3 * at].iter().all(|&x| x == 0x3c));
        assert_eq!(file[3 * at], 0xaa);
        assert_eq!(file[at - 1], 0xaa);
    }

    /// A 256 KiB image whose every 4 KiB page is filled with its own number, behind a disk with
    /// the swap mapper on.
    fn mapper_disk() -> (tempfile_path::TempPath, Block, Vec<u8>) {
        let p = tempfile_path::TempPath::new("blk-mapper");
        let img: Vec<u8> = (0..64u8).flat_map(|i| vec![i + 1; 4096]).collect();
        std::fs::write(&p.0, &img).unwrap();
        let cfg = DiskConfig {
            path: p.0.clone(),
            readonly: false,
            id: None,
            direct: false,
            swap_mapper: true,
            coalesce: Coalesce::Off,
        };
        let b = Block::open(&cfg, 0).unwrap();
        (p, b, img)
    }

    /// Whether the page at `gpa` is backed by a file now (`/proc/self/pagemap` bit 61, present).
    fn file_backed(mem: &GuestMemoryMmap, gpa: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut e = [0u8; 8];
        pm.read_exact_at(&mut e, host / 4096 * 8).unwrap();
        let e = u64::from_le_bytes(e);
        e & (1 << 63) != 0 && e & (1 << 61) != 0
    }

    fn page(mem: &GuestMemoryMmap, gpa: u64) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    #[test]
    fn the_swap_mapper_maps_whole_pages_and_keeps_them_when_the_disk_is_written() {
        if !super::super::swap_mapper::supported() {
            return crate::test_skip(
                "the_swap_mapper_maps_whole_pages_and_keeps_them_when_the_disk_is_written",
                "no MADV_POPULATE_WRITE (Linux < 5.14)",
            );
        }
        let (path, mut b, img) = mapper_disk();
        let mut cfg = [0u8; 4];
        b.read_config(20, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 4096, "blk_size");
        let mem = memory();
        let mut dq = DriverQueue::new(32);
        let mut h = handler(&mut b, &mem, &dq);
        // 1. Blocks 2..5 (3 pages) into 0x40000, block 2 again into 0x50000, and an unaligned
        // read (block 6 into 0x60200): mapped, mapped, copied.
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            16,
            (0x10000, 0x40000, 0x12000),
            3 * 4096,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            16,
            (0x10100, 0x50000, 0x12001),
            4096,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            48,
            (0x10200, 0x60200, 0x12002),
            4096,
        );
        h.process(0).unwrap();
        let st = |i: u64| mem.read_obj::<u8>(GuestAddress(0x12000 + i)).unwrap();
        for i in 0..3 {
            assert_eq!(st(i), VIRTIO_BLK_S_OK as u8, "request {i}");
        }
        for i in 0..3u64 {
            assert_eq!(
                page(&mem, 0x40000 + i * 4096),
                img[(2 + i as usize) * 4096..][..4096]
            );
            assert!(file_backed(&mem, 0x40000 + i * 4096), "page {i} mapped");
        }
        assert_eq!(page(&mem, 0x50000), img[2 * 4096..3 * 4096]);
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(0x60200)).unwrap();
        assert_eq!(got, img[6 * 4096..7 * 4096]);
        assert_eq!(extra(&b, "mapper_pages"), 4);
        assert_eq!(extra(&b, "mapper_calls"), 2);
        assert_eq!(extra(&b, "mapper_extents"), 2);

        // 2. The guest stores into a mapped page: its copy changes, the image does not.
        mem.write_obj(0xeeu8, GuestAddress(0x41000)).unwrap();
        assert!(!file_backed(&mem, 0x41000));
        assert_eq!(std::fs::read(&path.0).unwrap()[3 * 4096], 4);

        // 3. The guest writes block 2 (mapped at 0x40000 and 0x50000) and half of block 4: both
        // pages keep the old bytes, the image gets the new ones, and a new read sees them.
        mem.write_slice(&[0x77u8; 4096], GuestAddress(0x30000))
            .unwrap();
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            16,
            (0x10300, 0x30000, 0x12003),
            4096,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_OUT,
            32,
            (0x10400, 0x30000, 0x12004),
            512,
        );
        h.process(0).unwrap();
        assert_eq!(st(3), VIRTIO_BLK_S_OK as u8);
        assert_eq!(st(4), VIRTIO_BLK_S_OK as u8);
        assert_eq!(page(&mem, 0x40000), img[2 * 4096..3 * 4096]);
        assert_eq!(page(&mem, 0x50000), img[2 * 4096..3 * 4096]);
        assert_eq!(page(&mem, 0x42000), img[4 * 4096..5 * 4096]);
        assert!(!file_backed(&mem, 0x40000) && !file_backed(&mem, 0x50000));
        assert_eq!(extra(&b, "mapper_breaks"), 3);
        let file = std::fs::read(&path.0).unwrap();
        assert!(file[2 * 4096..3 * 4096].iter().all(|&x| x == 0x77));
        assert!(file[4 * 4096..4 * 4096 + 512].iter().all(|&x| x == 0x77));
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            16,
            (0x10500, 0x70000, 0x12005),
            4096,
        );
        // 4. Discard of block 7 while it is mapped: the page keeps its bytes.
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            56,
            (0x10600, 0x71000, 0x12006),
            4096,
        );
        h.process(0).unwrap();
        assert!(page(&mem, 0x70000).iter().all(|&x| x == 0x77));
        assert!(file_backed(&mem, 0x71000));
        header(&mem, 0x10700, VIRTIO_BLK_T_DISCARD, 0);
        mem.write_obj(56u64, GuestAddress(0x10710)).unwrap();
        mem.write_obj(8u32, GuestAddress(0x10718)).unwrap();
        mem.write_obj(0u32, GuestAddress(0x1071c)).unwrap();
        dq.add(&mem, &[(0x10700, 32, false), (0x12007, 1, true)]);
        h.process(0).unwrap();
        assert_eq!(st(7), VIRTIO_BLK_S_OK as u8);
        assert_eq!(page(&mem, 0x71000), img[7 * 4096..8 * 4096]);
        assert!(!file_backed(&mem, 0x71000));
    }

    /// At the bound (no room for a mapping) reads are copied and counted; a mapped page that the
    /// balloon or free-page reporting drops (`MADV_DONTNEED`) reads the block again, never zeros
    /// from a stale mapping of another block.
    #[test]
    fn the_swap_mapper_copies_at_its_bound_and_survives_dontneed() {
        if !super::super::swap_mapper::supported() {
            return crate::test_skip(
                "the_swap_mapper_copies_at_its_bound_and_survives_dontneed",
                "no MADV_POPULATE_WRITE (Linux < 5.14)",
            );
        }
        let (_path, mut b, img) = mapper_disk();
        let mem = memory();
        let mut dq = DriverQueue::new(16);
        let mut h = handler(&mut b, &mem, &dq);
        h.mapper = Mapper::new(&MapperSetup {
            max_extents: 1,
            ..b.mapper_setup.clone()
        });
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            8,
            (0x10000, 0x40000, 0x12000),
            4096,
        );
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            80,
            (0x10100, 0x48000, 0x12001),
            4096,
        );
        h.process(0).unwrap();
        assert_eq!(page(&mem, 0x40000), img[4096..2 * 4096]);
        assert_eq!(page(&mem, 0x48000), img[10 * 4096..11 * 4096]);
        assert!(file_backed(&mem, 0x40000));
        assert!(!file_backed(&mem, 0x48000), "copied at the bound");
        assert_eq!(extra(&b, "mapper_full"), 1);
        let host = mem.get_host_address(GuestAddress(0x40000)).unwrap();
        // SAFETY: one page of the test's own guest memory, mapped by the mapper above.
        assert_eq!(
            unsafe { libc::madvise(host.cast(), 4096, libc::MADV_DONTNEED) },
            0
        );
        assert_eq!(page(&mem, 0x40000), img[4096..2 * 4096]);
    }

    /// An image that shrank under the device: the mapping of a block past its end cannot be
    /// populated, so the pages go back to anonymous memory (touching them must not raise SIGBUS)
    /// and the request fails like a copied read past the end.
    #[test]
    fn the_swap_mapper_fails_a_read_past_the_end_without_leaving_a_mapping() {
        if !super::super::swap_mapper::supported() {
            return crate::test_skip(
                "the_swap_mapper_fails_a_read_past_the_end_without_leaving_a_mapping",
                "no MADV_POPULATE_WRITE (Linux < 5.14)",
            );
        }
        let (path, mut b, _img) = mapper_disk();
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let mut h = handler(&mut b, &mem, &dq);
        std::fs::File::options()
            .write(true)
            .open(&path.0)
            .unwrap()
            .set_len(8192)
            .unwrap();
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            32,
            (0x10000, 0x40000, 0x12000),
            8192,
        );
        h.process(0).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        mem.write_obj(0x11u8, GuestAddress(0x41000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x41000)).unwrap(), 0x11);
        assert!(!file_backed(&mem, 0x40000));
        assert_eq!(h.mapper.maps().extents(), 0);
        assert_eq!(extra(&b, "mapper_failures"), 1);
    }

    /// A read into a page the host swapped out drops it first instead of swapping it in (needs
    /// host swap, which neither this project's hosts nor the emulated SVM host have by default:
    /// run with `--ignored` where swap is on, e.g. in the emulated host with a `--drive` made swap
    /// as for `bench vswap`; `MADV_PAGEOUT` pushes the page out).
    #[test]
    #[ignore = "needs host swap (see the comment)"]
    fn a_read_into_a_swapped_out_page_does_not_swap_it_in() {
        const TEST: &str = "a_read_into_a_swapped_out_page_does_not_swap_it_in";
        let (_path, mut b) = disk(false);
        if b.mapper_setup.pagemap.is_none() {
            return crate::test_skip(TEST, "the host has no swap");
        }
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let mut h = handler(&mut b, &mem, &dq);
        mem.write_slice(&[0x5au8; 4096], GuestAddress(0x40000))
            .unwrap();
        let host = mem.get_host_address(GuestAddress(0x40000)).unwrap();
        let pm = std::fs::File::open("/proc/self/pagemap").unwrap();
        let swapped = || {
            let mut e = [0u8; 8];
            pm.read_exact_at(&mut e, host as u64 / 4096 * 8).unwrap();
            u64::from_le_bytes(e) & (1 << 62) != 0
        };
        // SAFETY: one page of the test's own guest memory; MADV_PAGEOUT keeps its content.
        assert_eq!(
            unsafe { libc::madvise(host.cast(), 4096, libc::MADV_PAGEOUT) },
            0
        );
        if !swapped() {
            return crate::test_skip(TEST, "MADV_PAGEOUT did not swap the page out");
        }
        rw(
            &mut dq,
            &mem,
            VIRTIO_BLK_T_IN,
            0,
            (0x10000, 0x40000, 0x12000),
            4096,
        );
        h.process(0).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert!(page(&mem, 0x40000).iter().all(|&x| x == 0xaa));
        assert_eq!(extra(&b, "stale_dropped"), 1);
    }

    #[test]
    fn disk_options_parse_direct() {
        use crate::devices::virtio::config::parse_disk;
        assert!(parse_disk("path=a.img,direct=on").unwrap().direct);
        assert!(!parse_disk("path=a.img").unwrap().direct);
        let e = parse_disk("path=a.img,direct=maybe").unwrap_err();
        assert!(e.contains("not on or off"), "{e}");
    }

    #[test]
    fn missing_image_is_a_clear_error() {
        let e = Block::open(
            &DiskConfig {
                path: "/nonexistent/disk.img".into(),
                readonly: false,
                id: None,
                direct: false,
                swap_mapper: false,
                coalesce: Coalesce::Off,
            },
            0,
        )
        .err()
        .unwrap();
        assert!(e.contains("/nonexistent/disk.img"), "{e}");
    }
}
