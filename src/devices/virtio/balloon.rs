//! virtio-balloon (virtio 1.x §5.5): the driver gives guest pages back to the host (inflate),
//! takes them back (deflate), reports its memory statistics and reports free pages.
//!
//! Owns the balloon's configuration (`num_pages`, the target: set at start-up and changed at run
//! time through the control API, which raises a configuration-change interrupt; `actual`, the one
//! field the driver may write), its counters and latest statistics (device facts), and the
//! release of guest RAM to the host: inflated PFNs (4 KiB units) and reported free ranges are
//! range-checked against guest RAM, sorted (per 1024 PFNs) and coalesced into contiguous runs,
//! and dropped with `madvise(MADV_DONTNEED)` on the host mapping (the pages read as zeros when the
//! guest touches them again; the RSS of the VMM falls by as much). Deflate needs nothing: deflated
//! pages fault back in; it is only counted.
//!
//! Queues (§5.5.2): 0 inflateq, 1 deflateq, then statsq if `VIRTIO_BALLOON_F_STATS_VQ` was
//! negotiated, then reporting_vq if `VIRTIO_BALLOON_F_REPORTING` was (free_page_vq, for the
//! unoffered `FREE_PAGE_HINT`, never exists), so the reporting queue is 2 or 3.
//!
//! False reads prevented: where the host has swap, a free-page report first looks its pages up
//! in `/proc/self/pagemap` (opened at start-up) and counts those the host had swapped out
//! (`false_reads_prevented`): dropping them frees their swap slots, and the guest's next use of
//! such a page (which overwrites it: the page was free) faults in a zero page instead of reading
//! the old content back from swap, the VSWAPPER thesis's *false read*. One `pread` per 512 pages
//! reported (reports come in blocks of 2 MiB or more, seconds apart).
//!
//! Statistics: the driver's first stats buffer is kept by the device; every `stats` seconds
//! (a timerfd on the worker) the device returns it, which asks the driver for fresh values, and
//! the driver sends it again.
//!
//! Bad input: a PFN or range outside guest RAM is counted (`bad_pfns`, `bad_report_bytes`) and
//! never released; a PFN array whose length is not a multiple of 4 is a bad request (`errors`,
//! the whole PFNs in it are still served); a chain that fails the checks of `queue` is counted in
//! `bad_chains` and returned untouched. Nothing a driver sends can make the VMM release memory
//! outside guest RAM or allocate without bound (PFN arrays are streamed in 4 KiB pieces).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::timerfd::TimerFd;

use super::config::BalloonConfig;
use super::queue::{Chain, ChainError, Cursor, Seg, Vq};
use super::swap_mapper::{for_each_swapped, host_pagemap};
use super::{common_features, Activation, DeviceStats, QueueHandler, VirtioDevice};

pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_REPORTING: u32 = 5;

/// The balloon's page size (PFNs are in these units whatever the guest's page size).
const PAGE: u64 = 4096;
const QUEUE_SIZE: u16 = 128;
/// Statistics entries read from one buffer (the spec defines 16 tags).
const MAX_STATS: u64 = 64;
/// Bytes of one statistics entry: le16 tag, le64 value.
const STAT_LEN: u64 = 10;

/// Fact name of each statistics tag (§5.5.6.3).
const STAT_NAMES: [&str; 16] = [
    "stat_swap_in",
    "stat_swap_out",
    "stat_major_faults",
    "stat_minor_faults",
    "stat_free_memory",
    "stat_total_memory",
    "stat_available_memory",
    "stat_disk_caches",
    "stat_hugetlb_allocations",
    "stat_hugetlb_failures",
    "stat_oom_kills",
    "stat_alloc_stalls",
    "stat_async_scans",
    "stat_direct_scans",
    "stat_async_reclaims",
    "stat_direct_reclaims",
];

/// The resident set of this process in KiB (from /proc/self/statm).
pub fn rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()? / 1024)
}

pub struct Balloon {
    cfg: BalloonConfig,
    /// `num_pages`: the target, in 4 KiB pages.
    target_pages: u32,
    /// `actual`, as the driver last wrote it.
    actual: u32,
    /// Guest RAM, the most a target may be.
    ram: u64,
    stats: Arc<DeviceStats>,
    /// `/proc/self/pagemap` where the host has swap: free-page reports count the pages it had
    /// swapped out (see the module doc).
    pagemap: Option<Arc<File>>,
}

impl Balloon {
    /// A balloon for a guest with `mem`; a target larger than guest RAM is an error.
    pub fn new(cfg: &BalloonConfig, mem: &GuestMemoryMmap) -> Result<Self, String> {
        let ram: u64 = mem.iter().map(|r| r.len()).sum();
        if cfg.size > ram {
            return Err(format!(
                "--balloon: size {} MiB is larger than guest memory ({} MiB)",
                cfg.size >> 20,
                ram >> 20
            ));
        }
        let target_pages =
            u32::try_from(cfg.size / PAGE).map_err(|_| "--balloon: size too large")?;
        let stats = Arc::new(DeviceStats::default());
        for k in [
            "pages_inflated",
            "pages_deflated",
            "bad_pfns",
            "bytes_reported",
            "false_reads_prevented",
            "madvise_calls",
            "actual_pages",
        ] {
            stats.set_extra(k, 0);
        }
        stats.set_extra("target_pages", u64::from(target_pages));
        Ok(Balloon {
            cfg: cfg.clone(),
            target_pages,
            actual: 0,
            ram,
            stats,
            pagemap: if cfg.reporting { host_pagemap() } else { None },
        })
    }

    fn config_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        b[4..8].copy_from_slice(&self.actual.to_le_bytes());
        // free_page_hint_cmd_id and poison_val stay 0 (those features are not offered).
        b
    }
}

impl VirtioDevice for Balloon {
    fn name(&self) -> String {
        "virtio-balloon".into()
    }
    fn kind(&self) -> &'static str {
        "virtio-balloon"
    }
    fn device_type(&self) -> u32 {
        5
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = 2 + usize::from(self.cfg.stats_interval > 0) + usize::from(self.cfg.reporting);
        vec![QUEUE_SIZE; n]
    }
    fn features(&self) -> u64 {
        let mut f = common_features();
        if self.cfg.stats_interval > 0 {
            f |= 1 << F_STATS_VQ;
        }
        if self.cfg.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.cfg.reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let b = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| b.get(o))
                .copied()
                .unwrap_or(0);
        }
    }
    /// A new target while the VM runs (the control API); the transport tells the driver.
    fn balloon_target(&mut self, bytes: u64) -> Option<Result<u32, String>> {
        if bytes > self.ram {
            return Some(Err(format!(
                "balloon target {} MiB is larger than guest memory ({} MiB)",
                bytes >> 20,
                self.ram >> 20
            )));
        }
        // `ram` fits the u32 page count: checked the same way at start-up.
        let pages = u32::try_from(bytes / PAGE).unwrap_or(u32::MAX);
        self.target_pages = pages;
        self.stats.set_extra("target_pages", u64::from(pages));
        Some(Ok(pages))
    }
    /// Only `actual` (bytes 4..8) is writable by the driver.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let end = offset.checked_add(data.len() as u64);
        if offset < 4 || end.is_none_or(|e| e > 8) || data.is_empty() {
            log::debug!(
                "virtio-balloon: write of {} bytes to config offset {offset:#x} refused",
                data.len()
            );
            self.stats.add(&self.stats.config_writes_refused, 1);
            return;
        }
        let mut a = self.actual.to_le_bytes();
        let o = (offset - 4) as usize;
        a[o..o + data.len()].copy_from_slice(data);
        self.actual = u32::from_le_bytes(a);
        self.stats.set_extra("actual_pages", u64::from(self.actual));
    }
    /// The target and `actual` (the pages given back are holes in the snapshot's memory file,
    /// as they are in guest RAM).
    fn save_state(&self) -> Result<serde_json::Value, String> {
        crate::devices::state_json(&BalloonSaved {
            target_pages: self.target_pages,
            actual: self.actual,
        })
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: BalloonSaved = crate::devices::state_from(state)?;
        if u64::from(s.target_pages) * PAGE > self.ram {
            return Err(format!(
                "balloon target of {} pages is larger than guest memory",
                s.target_pages
            ));
        }
        self.target_pages = s.target_pages;
        self.actual = s.actual;
        self.stats
            .set_extra("target_pages", u64::from(s.target_pages));
        self.stats.set_extra("actual_pages", u64::from(s.actual));
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String> {
        Ok(Box::new(BalloonHandler::new(
            &self.cfg,
            a,
            self.pagemap.clone(),
        )?))
    }
    fn reset(&mut self) {
        self.actual = 0;
        self.stats.set_extra("actual_pages", 0);
    }
    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// What releasing (or checking) a guest-physical range came to.
#[derive(Default, Debug, PartialEq, Eq)]
struct Released {
    /// Bytes inside guest RAM (released when asked to).
    in_ram: u64,
    /// Bytes outside guest RAM (refused).
    outside: u64,
    madvise_calls: u64,
    madvise_errors: u64,
    /// Pages the host had swapped out when they were released (counted only when asked).
    swapped: u64,
}

impl Released {
    fn add(&mut self, o: Released) {
        self.in_ram += o.in_ram;
        self.outside += o.outside;
        self.madvise_calls += o.madvise_calls;
        self.madvise_errors += o.madvise_errors;
        self.swapped += o.swapped;
    }
}

/// Checks `[gpa, gpa + len)` against guest RAM and, if `release`, drops the part inside RAM with
/// one `madvise(MADV_DONTNEED)` per region it covers, first counting with `pagemap` (if given)
/// the pages the host had swapped out. `gpa` and `len` must be 4 KiB aligned.
fn release_range(
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    release: bool,
    pagemap: Option<&File>,
) -> Released {
    let mut r = Released::default();
    let Some(end) = gpa.checked_add(len) else {
        r.outside = len;
        return r;
    };
    let mut a = gpa;
    while a < end {
        let Some(region) = mem.find_region(GuestAddress(a)) else {
            // Skip to the next region that starts inside the range, if any.
            let next = mem
                .iter()
                .map(|rg| rg.start_addr().0)
                .filter(|&s| s > a && s < end)
                .min()
                .unwrap_or(end);
            r.outside += next - a;
            a = next;
            continue;
        };
        let start = region.start_addr().0;
        let n = end.min(start + region.len()) - a;
        r.in_ram += n;
        if release {
            match region.get_host_address(MemoryRegionAddress(a - start)) {
                Ok(host) => {
                    if let Some(pm) = pagemap {
                        for_each_swapped(pm, host as u64, n, |_| r.swapped += 1);
                    }
                    r.madvise_calls += 1;
                    // SAFETY: `host..host + n` lies inside this region's mapping (the region
                    // covers `a..a + n`), which vm-memory mapped anonymous and private and keeps
                    // alive while `mem` lives. MADV_DONTNEED only discards the pages' contents
                    // (they read back as zeros), which the balloon protocol allows; the VMM holds
                    // no references into guest memory (every access is a volatile copy).
                    let rc = unsafe { libc::madvise(host.cast(), n as usize, libc::MADV_DONTNEED) };
                    if rc != 0 {
                        r.madvise_errors += 1;
                        crate::warn_limited!(
                            "virtio-balloon",
                            "virtio-balloon: madvise of {a:#x}+{n:#x}: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                }
                Err(e) => {
                    r.madvise_errors += 1;
                    crate::warn_limited!(
                        "virtio-balloon",
                        "virtio-balloon: host address of {a:#x}: {e}"
                    );
                }
            }
        }
        a += n;
    }
    r
}

/// Coalesces PFNs into contiguous runs, each checked (and released) as one range.
struct Runs<'a> {
    mem: &'a GuestMemoryMmap,
    release: bool,
    start: u64,
    count: u64,
    out: Released,
}

impl<'a> Runs<'a> {
    fn new(mem: &'a GuestMemoryMmap, release: bool) -> Self {
        Runs {
            mem,
            release,
            start: 0,
            count: 0,
            out: Released::default(),
        }
    }

    fn push(&mut self, pfn: u32) {
        let pfn = u64::from(pfn);
        if self.count > 0 && pfn == self.start + self.count {
            self.count += 1;
        } else {
            self.flush();
            self.start = pfn;
            self.count = 1;
        }
    }

    fn flush(&mut self) {
        if self.count > 0 {
            let (start, len) = (self.start * PAGE, self.count * PAGE);
            let r = release_range(self.mem, start, len, self.release, None);
            self.out.add(r);
            self.count = 0;
        }
    }

    fn finish(mut self) -> Released {
        self.flush();
        self.out
    }
}

/// What a snapshot keeps of the balloon's configuration.
#[derive(serde::Serialize, serde::Deserialize)]
struct BalloonSaved {
    target_pages: u32,
    actual: u32,
}

/// What a snapshot keeps of a parked handler: the statistics buffer it holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct HandlerSaved {
    held_stats: Option<u16>,
}

/// A device's work: the queues by role, the held statistics buffer and the polling timer.
pub struct BalloonHandler {
    mem: GuestMemoryMmap,
    queues: Vec<(Role, Vq)>,
    /// The statistics buffer the device keeps until it wants fresh values.
    held_stats: Option<u16>,
    timer: Option<TimerFd>,
    stats: Arc<DeviceStats>,
    pagemap: Option<Arc<File>>,
}

impl BalloonHandler {
    fn new(cfg: &BalloonConfig, a: Activation, pagemap: Option<Arc<File>>) -> Result<Self, String> {
        let stats_on = a.features & (1 << F_STATS_VQ) != 0;
        let reporting_on = a.features & (1 << F_REPORTING) != 0;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if stats_on {
            roles.push(Role::Stats);
        }
        if reporting_on {
            roles.push(Role::Reporting);
        }
        if a.queues.len() < roles.len() {
            return Err(format!(
                "{} queues for {} negotiated roles",
                a.queues.len(),
                roles.len()
            ));
        }
        // Queues beyond the negotiated ones (offered features the driver declined) stay unused.
        let queues: Vec<(Role, Vq)> = roles.into_iter().zip(a.queues).collect();
        let timer = if stats_on && cfg.stats_interval > 0 {
            let every = Duration::from_secs(u64::from(cfg.stats_interval));
            match TimerFd::new().and_then(|mut t| t.reset(every, Some(every)).map(|_| t)) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("virtio-balloon: statistics timer: {e}; no polling");
                    None
                }
            }
        } else {
            None
        };
        Ok(BalloonHandler {
            mem: a.mem,
            queues,
            held_stats: None,
            timer,
            stats: a.stats,
            pagemap,
        })
    }

    fn vq(&mut self, role: Role) -> Option<&mut Vq> {
        self.queues
            .iter_mut()
            .find(|(r, _)| *r == role)
            .map(|(_, q)| q)
    }

    /// Serves one chain of queue `q`; false when the queue is empty.
    fn serve_one(&mut self, q: usize) -> bool {
        let Some((role, vq)) = self.queues.get_mut(q) else {
            return false;
        };
        let role = *role;
        let popped = if role == Role::Reporting {
            pop_report(vq)
        } else {
            vq.pop()
        };
        let Some((head, res)) = popped else {
            return false;
        };
        let s = self.stats.clone();
        s.add(&s.requests, 1);
        let chain = match res {
            Ok(c) => c,
            Err(e) => {
                log::debug!("virtio-balloon: queue {q}: {e}");
                s.add(&s.bad_chains, 1);
                s.add(&s.errors, 1);
                self.queues[q].1.complete(head, 0);
                return true;
            }
        };
        match role {
            Role::Inflate | Role::Deflate => {
                self.pfns(&chain, role == Role::Inflate);
                self.queues[q].1.complete(head, 0);
            }
            Role::Stats => {
                self.read_stats(&chain);
                // Keep the newest buffer; an older one (a driver that sent two) goes back.
                if let Some(old) = self.held_stats.replace(head) {
                    self.queues[q].1.complete(old, 0);
                }
            }
            Role::Reporting => {
                self.report(&chain);
                self.queues[q].1.complete(head, 0);
            }
        }
        true
    }

    /// An inflate or deflate request: an array of le32 PFNs.
    fn pfns(&mut self, chain: &Chain, inflate: bool) {
        let s = self.stats.clone();
        let len = chain.readable_len();
        s.add(&s.bytes_from_guest, len);
        if !len.is_multiple_of(4) || len == 0 {
            log::debug!("virtio-balloon: PFN array of {len} bytes");
            s.add(&s.errors, 1);
        }
        // Once per VM (a re-activated device keeps the first sample).
        let first = || {
            !s.extra
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key("rss_before_inflate_kib")
        };
        if inflate && len >= 4 && first() {
            if let Some(k) = rss_kib() {
                s.set_extra("rss_before_inflate_kib", k);
            }
        }
        let mut runs = Runs::new(&self.mem, inflate);
        let mut cur = Cursor::new(&self.mem, &chain.readable);
        let mut left = len & !3;
        let mut buf = [0u8; 4096];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if !cur.read(&mut buf[..n]) {
                s.add(&s.errors, 1);
                break;
            }
            // Sorted per piece: a driver's PFNs come in allocation order (Linux's often run
            // downwards), and sorted ones coalesce into far fewer `madvise` calls.
            let mut pfns: Vec<u32> = buf[..n]
                .chunks_exact(4)
                .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
                .collect();
            pfns.sort_unstable();
            for pfn in pfns {
                runs.push(pfn);
            }
            left -= n as u64;
        }
        let r = runs.finish();
        let bad = r.outside / PAGE;
        if bad > 0 {
            log::debug!("virtio-balloon: {bad} PFNs outside guest RAM");
            s.add_extra("bad_pfns", bad);
            s.add(&s.errors, 1);
        }
        if inflate {
            s.add_extra("pages_inflated", r.in_ram / PAGE);
            s.add_extra("madvise_calls", r.madvise_calls);
            if r.madvise_errors > 0 {
                s.add_extra("madvise_errors", r.madvise_errors);
            }
            if let Some(k) = rss_kib() {
                s.set_extra("rss_after_inflate_kib", k);
            }
        } else {
            s.add_extra("pages_deflated", r.in_ram / PAGE);
        }
    }

    /// A free-page report: each buffer is a free range of guest RAM.
    fn report(&mut self, chain: &Chain) {
        let s = self.stats.clone();
        let mut total = Released::default();
        for seg in chain.readable.iter().chain(&chain.writable) {
            // Only whole pages inside the range are released.
            let start = seg.addr.checked_next_multiple_of(PAGE);
            let end = seg.addr.saturating_add(seg.len) / PAGE * PAGE;
            match start {
                Some(start) if start < end => total.add(release_range(
                    &self.mem,
                    start,
                    end - start,
                    true,
                    self.pagemap.as_deref(),
                )),
                _ => s.add_extra("report_unaligned", 1),
            }
        }
        s.add_extra("bytes_reported", total.in_ram);
        s.add_extra("false_reads_prevented", total.swapped);
        s.add_extra("madvise_calls", total.madvise_calls);
        if total.madvise_errors > 0 {
            s.add_extra("madvise_errors", total.madvise_errors);
        }
        if total.outside > 0 {
            s.add_extra("bad_report_bytes", total.outside);
            s.add(&s.errors, 1);
        }
        if let Some(k) = rss_kib() {
            s.set_extra("rss_after_report_kib", k);
        }
    }

    /// A statistics buffer: packed (le16 tag, le64 value) entries.
    fn read_stats(&mut self, chain: &Chain) {
        let s = self.stats.clone();
        let len = chain.readable_len();
        s.add(&s.bytes_from_guest, len);
        if !len.is_multiple_of(STAT_LEN) {
            s.add_extra("stats_malformed", 1);
        }
        let n = (len / STAT_LEN).min(MAX_STATS) as usize;
        let mut buf = vec![0u8; n * STAT_LEN as usize];
        if !Cursor::new(&self.mem, &chain.readable).read(&mut buf) {
            s.add(&s.errors, 1);
            return;
        }
        for e in buf.chunks_exact(STAT_LEN as usize) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            match STAT_NAMES.get(usize::from(tag)) {
                Some(name) => s.set_extra(name, u64::from_le_bytes(v)),
                None => s.add_extra("stats_unknown_tags", 1),
            }
        }
        s.add_extra("stats_updates", 1);
    }

    /// Asks the driver for fresh statistics by returning the buffer the device holds.
    fn request_stats(&mut self) {
        if let Some(head) = self.held_stats.take() {
            if let Some(vq) = self.vq(Role::Stats) {
                vq.complete(head, 0);
                self.stats.add_extra("stats_requests", 1);
            }
        }
    }
}

/// Pops a free-page report. Like [`Vq::pop`], but without its cap on a chain's total length: a
/// report legitimately covers up to 32 free blocks of 4 MiB. The walk is still bounded by the
/// queue size; the ranges are checked against RAM when they are released.
fn pop_report(vq: &mut Vq) -> Option<(u16, Result<Chain, ChainError>)> {
    if !vq.queue.ready() {
        return None;
    }
    let chain = vq.queue.pop_descriptor_chain(&vq.mem)?;
    let head = chain.head_index();
    let mut c = Chain {
        head,
        ..Default::default()
    };
    let mut truncated = false;
    let mut res = Ok(());
    for d in chain {
        truncated = d.has_next();
        let len = u64::from(d.len());
        match vq.translate.translate(d.addr().0, len) {
            Some(addr) => c.writable.push(Seg { addr, len }),
            None => {
                res = Err(ChainError::OutOfMemory(d.addr().0, len));
                break;
            }
        }
    }
    if res.is_ok() && truncated {
        res = Err(ChainError::Malformed("descriptor loop or bad next index"));
    }
    if res.is_err() {
        vq.bad_chains += 1;
    }
    Some((head, res.map(|_| c)))
}

impl QueueHandler for BalloonHandler {
    fn queues(&self) -> Vec<&Vq> {
        self.queues.iter().map(|(_, q)| q).collect()
    }
    fn save(&self) -> Result<serde_json::Value, String> {
        crate::devices::state_json(&HandlerSaved {
            held_stats: self.held_stats,
        })
    }
    /// The held statistics buffer must be a descriptor of the statistics queue.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let s: HandlerSaved = crate::devices::state_from(state)?;
        if let Some(head) = s.held_stats {
            let size = self
                .queues
                .iter()
                .find(|(r, _)| *r == Role::Stats)
                .map(|(_, q)| q.queue.size());
            if size.is_none_or(|n| head >= n) {
                return Err(format!(
                    "held statistics buffer {head} is not in the statistics queue"
                ));
            }
        }
        self.held_stats = s.held_stats;
        Ok(())
    }
    fn process(&mut self, q: usize) -> Result<(), String> {
        if q >= self.queues.len() {
            return Ok(());
        }
        loop {
            self.queues[q].1.disable_notification();
            while self.serve_one(q) {}
            if !self.queues[q].1.enable_notification() {
                return Ok(());
            }
        }
    }
    fn extra_fds(&self) -> Vec<RawFd> {
        self.timer.iter().map(|t| t.as_raw_fd()).collect()
    }
    fn fd_ready(&mut self, _i: usize) -> Result<(), String> {
        if let Some(t) = self.timer.as_mut() {
            // Readable, so this does not block; the count of expirations does not matter.
            let _ = t.wait();
        }
        self.request_stats();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::irq::{Msix, NoRoutes};
    use crate::devices::virtio::queue::testing::*;
    use crate::devices::virtio::queue::Identity;
    use std::sync::atomic::Ordering;
    use virtio_queue::Queue;
    use vm_memory::Bytes;

    fn cfg() -> BalloonConfig {
        BalloonConfig {
            size: 64 << 10,
            stats_interval: 1,
            reporting: true,
            deflate_on_oom: false,
        }
    }

    fn vq(mem: &GuestMemoryMmap, q: Option<&DriverQueue>, index: u16) -> Vq {
        Vq {
            queue: match q {
                Some(dq) => dq.device_queue(mem, false),
                None => Queue::new(8).unwrap(),
            },
            index,
            mem: mem.clone(),
            translate: Arc::new(Identity),
            msix: Arc::new(Msix::new(5, Arc::new(NoRoutes::default())).unwrap()),
            vector: 0,
            bad_chains: 0,
            polling: false,
            moderator: Default::default(),
            signalled: 0,
        }
    }

    /// A handler whose queue `active` is the driver's `dq` (the others are not ready).
    fn handler(
        mem: &GuestMemoryMmap,
        features: u64,
        active: usize,
        dq: &DriverQueue,
    ) -> (Balloon, BalloonHandler) {
        let b = Balloon::new(&cfg(), mem).unwrap();
        let n = b.queue_max_sizes().len();
        let queues = (0..n)
            .map(|i| vq(mem, (i == active).then_some(dq), i as u16))
            .collect();
        let h = BalloonHandler::new(
            &b.cfg,
            Activation {
                mem: mem.clone(),
                queues,
                features,
                stats: b.stats(),
            },
            b.pagemap.clone(),
        )
        .unwrap();
        (b, h)
    }

    fn extra(b: &Balloon, k: &str) -> u64 {
        *b.stats.extra.lock().unwrap().get(k).unwrap_or(&0)
    }

    fn pfn_array(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) {
        for (i, p) in pfns.iter().enumerate() {
            mem.write_obj(*p, GuestAddress(at + 4 * i as u64)).unwrap();
        }
    }

    #[test]
    fn inflate_releases_pages_and_coalesces_runs() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 0, 0, &dq);
        // Pages 0x10..0x18 hold a pattern; inflate 0x10..0x14 and 0x16 (two runs).
        for a in (0x10000..0x18000).step_by(8) {
            mem.write_obj(0x5a5a_5a5a_5a5a_5a5au64, GuestAddress(a))
                .unwrap();
        }
        pfn_array(&mem, 0x8000, &[0x10, 0x11, 0x12, 0x13, 0x16]);
        dq.add(&mem, &[(0x8000, 20, false)]);
        h.process(0).unwrap();
        assert_eq!(dq.used(&mem, 0), (1, 0, 0));
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(0x10000), 0);
        assert_eq!(r(0x13ff8), 0);
        assert_eq!(r(0x14000), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(r(0x16000), 0);
        assert_eq!(r(0x17000), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(extra(&b, "pages_inflated"), 5);
        assert_eq!(extra(&b, "madvise_calls"), 2);
        assert!(extra(&b, "rss_before_inflate_kib") > 0);
        assert!(extra(&b, "rss_after_inflate_kib") > 0);
        assert_eq!(b.stats.errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn pfns_in_any_order_coalesce_into_runs() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 0, 0, &dq);
        // Linux's allocation order: downwards, with one page out of place.
        pfn_array(&mem, 0x8000, &[0x27, 0x26, 0x25, 0x30, 0x24, 0x23, 0x31]);
        dq.add(&mem, &[(0x8000, 28, false)]);
        h.process(0).unwrap();
        assert_eq!(extra(&b, "pages_inflated"), 7);
        assert_eq!(extra(&b, "madvise_calls"), 2, "0x23..0x28 and 0x30..0x32");
    }

    #[test]
    fn hostile_inflate_and_deflate_requests_are_counted_not_served() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 0, 0, &dq);
        // PFNs beyond RAM (1 MiB = 256 pages), one straddling run, and the largest PFN.
        pfn_array(&mem, 0x8000, &[0xff, 0x100, 0x101, u32::MAX, 0x20]);
        dq.add(&mem, &[(0x8000, 20, false)]);
        // An odd length: 6 bytes (one whole PFN served).
        pfn_array(&mem, 0x9000, &[0x21, 0x22]);
        dq.add(&mem, &[(0x9000, 6, false)]);
        // A buffer outside guest memory, and an empty one.
        dq.add(&mem, &[(0x7fff_0000_0000, 16, false)]);
        dq.add(&mem, &[(0x9000, 0, false)]);
        h.process(0).unwrap();
        assert_eq!(dq.used(&mem, 0).0, 4, "every request completed");
        assert_eq!(extra(&b, "pages_inflated"), 3);
        assert_eq!(extra(&b, "bad_pfns"), 3);
        assert_eq!(b.stats.bad_chains.load(Ordering::Relaxed), 1);
        assert_eq!(b.stats.errors.load(Ordering::Relaxed), 4);
        assert_eq!(b.stats.requests.load(Ordering::Relaxed), 4);

        // Deflate counts and releases nothing.
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 0, 1, &dq);
        mem.write_obj(7u64, GuestAddress(0x30000)).unwrap();
        pfn_array(&mem, 0x8000, &[0x30, 0x31, 0x1_0000]);
        dq.add(&mem, &[(0x8000, 12, false)]);
        h.process(1).unwrap();
        assert_eq!(extra(&b, "pages_deflated"), 2);
        assert_eq!(extra(&b, "bad_pfns"), 1);
        assert_eq!(extra(&b, "madvise_calls"), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x30000)).unwrap(), 7);
    }

    #[test]
    fn release_range_clips_to_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap();
        let r = release_range(&mem, 0x8000, 0x20000, true, None);
        assert_eq!(r.in_ram, 0x8000 + 0x8000);
        assert_eq!(r.outside, 0x10000);
        assert_eq!(r.madvise_calls, 2);
        let r = release_range(&mem, u64::MAX - 0xfff, 0x2000, true, None);
        assert_eq!((r.in_ram, r.outside), (0, 0x2000));
        let r = release_range(&mem, 0x40000, 0x1000, false, None);
        assert_eq!((r.in_ram, r.outside, r.madvise_calls), (0, 0x1000, 0));
    }

    /// A free-page report counts the released pages the host had swapped out: each, reused by
    /// the guest, would have been read back from swap only to be overwritten.
    #[test]
    fn a_report_counts_the_swapped_out_pages_it_releases() {
        use super::super::swap_mapper::FakePagemap;
        let mem = memory();
        let host = mem.get_host_address(GuestAddress(0x40000)).unwrap() as u64;
        let pm = FakePagemap::new(&[
            (host, FakePagemap::SWAPPED),
            (host + PAGE, FakePagemap::PRESENT),
            (host + 3 * PAGE, FakePagemap::SWAPPED),
            // Outside the reported range.
            (host + 4 * PAGE, FakePagemap::SWAPPED),
        ]);
        let r = release_range(&mem, 0x40000, 4 * PAGE, true, Some(&pm.file));
        assert_eq!((r.in_ram, r.swapped), (4 * PAGE, 2));
        let r = release_range(&mem, 0x40000, 4 * PAGE, true, None);
        assert_eq!(r.swapped, 0, "no pagemap, nothing counted");
        // Through the reporting queue: the fact.
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 1 << F_REPORTING, 2, &dq);
        h.pagemap = Some(Arc::new(pm.file.try_clone().unwrap()));
        dq.add(&mem, &[(0x40000, 4 * PAGE as u32, true)]);
        h.process(2).unwrap();
        assert_eq!(extra(&b, "bytes_reported"), 4 * PAGE);
        assert_eq!(extra(&b, "false_reads_prevented"), 2);
    }

    #[test]
    fn target_actual_and_the_held_stats_buffer_are_saved_and_restored() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let (mut b, mut h) = handler(&mem, 1 << F_STATS_VQ, 2, &dq);
        b.write_config(4, &7u32.to_le_bytes());
        assert_eq!(b.balloon_target(128 << 10), Some(Ok(32)));
        dq.add(&mem, &[(0x8000, 10, false)]);
        h.process(2).unwrap();
        let (dev, held) = (b.save_state().unwrap(), h.save().unwrap());
        assert_eq!(held["held_stats"], 0, "{held}");
        let (mut c, mut g) = handler(&mem, 1 << F_STATS_VQ, 2, &dq);
        c.restore_state(&dev).unwrap();
        g.restore(&held).unwrap();
        let mut cfg = [0u8; 8];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [32, 0, 0, 0, 7, 0, 0, 0]);
        // The restored handler returns the buffer the first one held.
        g.request_stats();
        assert_eq!(dq.used(&mem, 0), (1, 0, 0));
        assert!(g.restore(&serde_json::json!({"held_stats": 8})).is_err());
        let too_big = serde_json::json!({"target_pages": 1 << 30, "actual": 0});
        assert!(c.restore_state(&too_big).unwrap_err().contains("larger"));
    }

    #[test]
    fn stats_are_kept_and_requested_by_returning_the_buffer() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let features = 1 << F_STATS_VQ;
        let (b, mut h) = handler(&mem, features, 2, &dq);
        let entry = |at: u64, tag: u16, v: u64| {
            mem.write_obj(tag, GuestAddress(at)).unwrap();
            mem.write_obj(v, GuestAddress(at + 2)).unwrap();
        };
        entry(0x8000, 4, 111 << 20);
        entry(0x800a, 5, 256 << 20);
        entry(0x8014, 99, 1);
        dq.add(&mem, &[(0x8000, 30, false)]);
        h.process(2).unwrap();
        assert_eq!(dq.used(&mem, 0).0, 0, "the device keeps the buffer");
        assert_eq!(extra(&b, "stat_free_memory"), 111 << 20);
        assert_eq!(extra(&b, "stat_total_memory"), 256 << 20);
        assert_eq!(extra(&b, "stats_unknown_tags"), 1);
        h.request_stats();
        assert_eq!(dq.used(&mem, 0), (1, 0, 0));
        h.request_stats();
        assert_eq!(dq.used(&mem, 0).0, 1, "nothing held, nothing returned");
        // A malformed (odd-length) refresh still updates what it holds.
        entry(0x9000, 4, 100 << 20);
        dq.add(&mem, &[(0x9000, 13, false)]);
        h.process(2).unwrap();
        assert_eq!(extra(&b, "stat_free_memory"), 100 << 20);
        assert_eq!(extra(&b, "stats_malformed"), 1);
        assert_eq!(extra(&b, "stats_updates"), 2);
        assert_eq!(extra(&b, "stats_requests"), 1);
    }

    #[test]
    fn reporting_queue_index_follows_the_negotiated_features() {
        let mem = memory();
        // Without the statistics queue, reporting is queue 2; with it, queue 3.
        for (features, q) in [(1u64 << F_REPORTING, 2), ((1 << F_REPORTING) | 2, 3)] {
            let mut dq = DriverQueue::new(8);
            let (b, mut h) = handler(&mem, features, q, &dq);
            mem.write_obj(9u64, GuestAddress(0x40000)).unwrap();
            mem.write_obj(9u64, GuestAddress(0x60000)).unwrap();
            // Two free ranges; a third one partly outside RAM; an unaligned crumb.
            dq.add(
                &mem,
                &[
                    (0x40000, 0x10000, true),
                    (0x60000, 0x2000, true),
                    (0xf_f000, 0x2000, true),
                    (0x70010, 0x100, true),
                ],
            );
            h.process(q).unwrap();
            assert_eq!(dq.used(&mem, 0), (1, 0, 0));
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40000)).unwrap(), 0);
            assert_eq!(mem.read_obj::<u64>(GuestAddress(0x60000)).unwrap(), 0);
            assert_eq!(extra(&b, "bytes_reported"), 0x13000);
            assert_eq!(extra(&b, "bad_report_bytes"), 0x1000);
            assert_eq!(extra(&b, "report_unaligned"), 1);
            assert_eq!(extra(&b, "madvise_calls"), 3);
        }
    }

    #[test]
    fn a_looping_report_chain_releases_nothing() {
        let mem = memory();
        let mut dq = DriverQueue::new(8);
        let (b, mut h) = handler(&mem, 1 << F_REPORTING, 2, &dq);
        mem.write_obj(9u64, GuestAddress(0x40000)).unwrap();
        let flags = (virtio_bindings::virtio_ring::VRING_DESC_F_NEXT
            | virtio_bindings::virtio_ring::VRING_DESC_F_WRITE) as u16;
        dq.write_desc(&mem, 0, 0x40000, 0x1000, flags, 1);
        dq.write_desc(&mem, 1, 0x40000, 0x1000, flags, 0);
        dq.publish(&mem, 0);
        h.process(2).unwrap();
        assert_eq!(dq.used(&mem, 0).0, 1);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40000)).unwrap(), 9);
        assert_eq!(b.stats.bad_chains.load(Ordering::Relaxed), 1);
        assert_eq!(extra(&b, "bytes_reported"), 0);
    }

    #[test]
    fn config_has_the_target_and_only_actual_is_writable() {
        let mem = memory();
        let mut b = Balloon::new(&cfg(), &mem).unwrap();
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 16);
        b.write_config(4, &7u32.to_le_bytes());
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        b.write_config(6, &[1]);
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1_0007);
        b.write_config(0, &9u32.to_le_bytes());
        b.write_config(6, &9u32.to_le_bytes());
        b.write_config(u64::MAX, &[1]);
        b.write_config(8, &[1]);
        assert_eq!(b.stats.config_writes_refused.load(Ordering::Relaxed), 4);
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 16);
        let mut far = [0xffu8; 4];
        b.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        assert_eq!(extra(&b, "actual_pages"), 0x1_0007);
        b.reset();
        assert_eq!(extra(&b, "actual_pages"), 0);
        // Queues and features follow the options.
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_ne!(b.features() & (1 << F_REPORTING), 0);
        let off = BalloonConfig {
            stats_interval: 0,
            reporting: false,
            deflate_on_oom: true,
            ..cfg()
        };
        let b = Balloon::new(&off, &mem).unwrap();
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(b.features() & 0x3f, 1 << F_DEFLATE_ON_OOM);
        let big = BalloonConfig {
            size: 2 << 20,
            ..cfg()
        };
        assert!(Balloon::new(&big, &mem).is_err());
    }
}
