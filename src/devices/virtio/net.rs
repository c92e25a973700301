//! virtio-net over a tap device (virtio 1.x §5.1): one receive and one transmit queue, the MAC
//! address and link status in configuration, mergeable receive buffers, and checksum/segmentation
//! offloads offered as far as the tap supports them and set on the tap (`TUNSETOFFLOAD`) from
//! what the driver accepted.
//!
//! Owns the tap (`super::tap`, opened at start-up so that a missing tap is a start-up error) and
//! the frame path. Every frame carries the 12-byte `virtio_net_hdr_v1` on both sides, so the tap
//! and the driver share one header format and the device copies it as is, only filling
//! `num_buffers` (and clearing the checksum flags when the driver did not accept
//! `VIRTIO_NET_F_GUEST_CSUM`).
//!
//! # Receive
//! The worker polls the tap through an epoll set of the handler's own (the tap is its only
//! member, and that set is the descriptor the worker waits on), so the handler can stop polling
//! the tap when the receive ring is empty: the frame it has read stays pending, notifications
//! are re-enabled, and the receive queue's notification (new buffers) resumes polling. Nothing
//! spins and exitless drops no frame for lack of buffers (meanwhile the tap's own queue fills,
//! and the kernel drops beyond its `txqueuelen`: `ip -s link` shows those as TX drops); frames
//! are dropped here (`rx_dropped`) only when they cannot fit at all: longer than a single chain
//! without `MRG_RXBUF`, or longer than all the buffers of the ring together. A frame's used
//! elements are published with one index update, so the driver never sees part of a merged frame.
//!
//! # Transmit
//! Each chain (header + frame, device-readable only) goes to the tap in one `writev` straight
//! from guest memory (a copy only when a buffer straddles two memory regions).
//!
//! # Bad input
//! A chain with the wrong direction (writable buffers on transmit, readable ones on receive), one
//! too short for the header, or one that fails `queue`'s checks is returned with length 0 and
//! counted in `bad_chains`; a transmit chain longer than the largest frame is refused the same
//! way. A frame the tap refuses (a bad GSO header from the driver, the tap down) is counted in
//! `tx_dropped`. None of these stop the device.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::config::NetConfig;
use super::moderation::{Coalesce, Moderator};
use super::queue::{Chain, Cursor, Vq};
use super::tap::{Tap, VNET_HDR_LEN};
use super::{common_features, Activation, DeviceStats, QueueHandler, VirtioDevice};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// The control queue (`VIRTIO_NET_F_CTRL_VQ`; index 2 without multiqueue).
const CTRL: usize = 2;
/// Control queue size: the driver sends one command at a time and waits for it.
const CTRL_QUEUE_SIZE: u16 = 64;
/// The longest command this device understands (class, command, `virtio_net_ctrl_coal`).
const CTRL_MAX: usize = 2 + 8;
/// The largest frame with its header: 64 KiB of GSO payload plus Ethernet and VLAN headers
/// (what Linux's virtio-net driver sizes its big receive buffers for).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// The offload features (`VIRTIO_NET_F_*` bits) this device may offer.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_ECN)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6)
    | (1 << VIRTIO_NET_F_HOST_ECN)
    | (1 << VIRTIO_NET_F_HOST_UFO);

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The offload features to offer given the tap's `TUN_F_*` support. Guest-side offloads are
/// frames the tap hands us partially checksummed or unsegmented, which TUNSETOFFLOAD must allow;
/// host-side ones are frames we write that way, which a tap with a vnet header takes whenever the
/// kernel knows the GSO type (the same support the TUN_F_ bits show). The dependencies of virtio
/// §5.1.3.1 hold: nothing without the checksum offload, ECN only with TSO.
pub fn offered_offloads(tun: u32) -> u64 {
    if tun & libc::TUN_F_CSUM == 0 {
        return 0;
    }
    let mut f = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
    if tun & libc::TUN_F_TSO4 != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO4);
    }
    if tun & libc::TUN_F_TSO6 != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_TSO6) | bit(VIRTIO_NET_F_HOST_TSO6);
    }
    if tun & libc::TUN_F_TSO_ECN != 0 && tun & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_ECN) | bit(VIRTIO_NET_F_HOST_ECN);
    }
    if tun & libc::TUN_F_UFO != 0 {
        f |= bit(VIRTIO_NET_F_GUEST_UFO) | bit(VIRTIO_NET_F_HOST_UFO);
    }
    f
}

/// The `TUN_F_*` flags for what the driver accepted: the tap may hand the guest only what the
/// driver can take. A driver that accepted a segmentation offload without the checksum offload
/// it depends on gets none (the kernel would refuse the set anyway).
pub fn tap_offloads(features: u64) -> u32 {
    let has = |b: u32| features & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut t = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        t |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        t |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && t & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        t |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        t |= libc::TUN_F_UFO;
    }
    t
}

pub struct Net {
    index: usize,
    tap: Arc<Tap>,
    mac: [u8; 6],
    coalesce: Coalesce,
    stats: Arc<DeviceStats>,
}

impl Net {
    /// Opens the tap; a missing tap or a lack of permission is a start-up error naming it.
    pub fn open(cfg: &NetConfig, index: usize) -> Result<Self, String> {
        let tap = Tap::open(&cfg.tap)?;
        let stats = Arc::new(DeviceStats::default());
        stats.set_extra(
            "tap_offloads_supported",
            u64::from(tap.supported_offloads()),
        );
        Ok(Net {
            index,
            tap: Arc::new(tap),
            mac: cfg.mac,
            coalesce: cfg.coalesce,
            stats,
        })
    }

    fn config_bytes(&self) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> String {
        format!("virtio-net{}", self.index)
    }
    fn kind(&self) -> &'static str {
        "virtio-net"
    }
    fn device_type(&self) -> u32 {
        1
    }
    fn pci_class(&self) -> u32 {
        0x02_00_00
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        common_features()
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_NOTF_COAL)
            | offered_offloads(self.tap.supported_offloads())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    /// The MAC it reports, for the record: a restore reports the configured one (the
    /// snapshot's, or `--net-mac`'s), whatever was saved; the features are the transport's, and
    /// a tap that lacks an offload the driver accepted refuses them.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!({ "tap": self.tap.name(), "mac": self.mac }))
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String> {
        let tun = tap_offloads(a.features);
        self.tap
            .set_offloads(tun)
            .map_err(|e| format!("tap {}: TUNSETOFFLOAD {tun:#x}: {e}", self.tap.name()))?;
        a.stats
            .set_extra("offload_features", a.features & OFFLOAD_FEATURES);
        a.stats.set_extra("tap_offloads", u64::from(tun));
        a.stats.set_extra(
            "mrg_rxbuf",
            u64::from(a.features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0),
        );
        for k in [
            "rx_frames",
            "rx_bytes",
            "rx_dropped",
            "tx_frames",
            "tx_bytes",
            "tx_dropped",
            "interrupts_held",
            "interrupts_cancelled",
            "ctrl_commands",
            "ctrl_errors",
        ] {
            a.stats.add_extra(k, 0);
        }
        let h = handler(
            a.queues,
            self.tap.clone(),
            a.features,
            a.stats,
            self.coalesce,
        )?;
        Ok(Box::new(h))
    }
    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }
}

/// The queue handler over `queues` (receive, transmit, then control if negotiated) once the
/// tap's offloads are set; apart so that the fuzz target can drive it over a socket.
pub(crate) fn handler(
    queues: Vec<Vq>,
    tap: Arc<Tap>,
    features: u64,
    stats: Arc<DeviceStats>,
    coalesce: Coalesce,
) -> Result<NetHandler, String> {
    let mut queues = queues.into_iter();
    let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
        return Err("virtio-net needs a receive and a transmit queue".into());
    };
    rx.moderator = Moderator::new(coalesce);
    tx.moderator = Moderator::new(coalesce);
    let ctrl = queues
        .next()
        .filter(|_| features & bit(VIRTIO_NET_F_CTRL_VQ) != 0);
    let mut h = NetHandler::new(rx, tx, tap, features, stats)?;
    h.ctrl = ctrl;
    Ok(h)
}

enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

pub struct NetHandler {
    rx: Vq,
    tx: Vq,
    /// The control queue, when the driver accepted `VIRTIO_NET_F_CTRL_VQ`.
    ctrl: Option<Vq>,
    ctrl_commands: u64,
    ctrl_errors: u64,
    tap: Arc<Tap>,
    mrg: bool,
    guest_csum: bool,
    stats: Arc<DeviceStats>,
    /// The handler's own epoll set: the tap alone, polled only while receive buffers exist.
    epoll: Epoll,
    polling: bool,
    /// The frame read from the tap (header first) and its length; 0 when none is pending.
    frame: Vec<u8>,
    pending: usize,
    /// Receive chains taken from the ring but not yet used (a frame did not fit them yet).
    held: VecDeque<Chain>,
    used: Vec<(u16, u32)>,
    copy: Vec<u8>,
    rx_frames: u64,
    rx_bytes: u64,
    rx_dropped: u64,
    /// Frames delivered by receive-side polling (no wake-up of the worker).
    rx_polled: u64,
    tx_frames: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    warned_down: bool,
    /// Why the receive chains it held could not be given back when it was parked (a snapshot
    /// is then refused).
    unparked: Option<String>,
}

impl NetHandler {
    pub fn new(
        rx: Vq,
        tx: Vq,
        tap: Arc<Tap>,
        features: u64,
        stats: Arc<DeviceStats>,
    ) -> Result<Self, String> {
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(|e| format!("epoll: {e}"))?;
        Ok(NetHandler {
            rx,
            tx,
            ctrl: None,
            ctrl_commands: 0,
            ctrl_errors: 0,
            tap,
            mrg: features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: features & bit(VIRTIO_NET_F_GUEST_CSUM) != 0,
            stats,
            epoll,
            polling: true,
            frame: vec![0; MAX_FRAME],
            pending: 0,
            held: VecDeque::new(),
            used: Vec::new(),
            copy: Vec::new(),
            rx_frames: 0,
            rx_bytes: 0,
            rx_dropped: 0,
            rx_polled: 0,
            tx_frames: 0,
            tx_bytes: 0,
            tx_dropped: 0,
            warned_down: false,
            unparked: None,
        })
    }

    fn set_polling(&mut self, on: bool) {
        if self.polling == on {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.tap.as_raw_fd(),
            EpollEvent::new(events, 0),
        ) {
            Ok(()) => self.polling = on,
            Err(e) => crate::warn_limited!("virtio-net", "virtio-net: epoll on the tap: {e}"),
        }
    }

    /// The next usable receive chain: held ones first; invalid ones (wrong direction, too short
    /// for the header) are returned to the driver with length 0 on the way.
    fn next_rx_chain(&mut self) -> Option<Chain> {
        if let Some(c) = self.held.pop_front() {
            return Some(c);
        }
        loop {
            let (head, res) = self.rx.pop()?;
            match res {
                Ok(c) if c.readable.is_empty() && c.writable_len() >= VNET_HDR_LEN as u64 => {
                    return Some(c)
                }
                _ => {
                    self.stats.add(&self.stats.bad_chains, 1);
                    self.used.push((head, 0));
                }
            }
        }
    }

    /// Puts the pending frame into receive buffers.
    fn deliver(&mut self) -> Delivery {
        let len = self.pending;
        if !self.guest_csum {
            // virtio §5.1.6.3.1: flags are zero unless the driver accepted GUEST_CSUM.
            self.frame[0] = 0;
        }
        let mut chains = Vec::new();
        let mut room = 0u64;
        while room < len as u64 {
            let Some(c) = self.next_rx_chain() else {
                let whole_ring = chains.len() >= usize::from(self.rx.queue.size());
                for c in chains.into_iter().rev() {
                    self.held.push_front(c);
                }
                return if whole_ring {
                    Delivery::Dropped
                } else {
                    Delivery::NoBuffers
                };
            };
            room += c.writable_len();
            chains.push(c);
            if !self.mrg && room < len as u64 {
                // Without mergeable buffers a frame takes exactly one chain: this one is too
                // small for it (the driver's buffers are smaller than the frames it allowed).
                self.held.extend(chains);
                return Delivery::Dropped;
            }
        }
        let n = chains.len() as u16;
        self.frame[10..12].copy_from_slice(&n.to_le_bytes());
        let mut at = 0usize;
        for c in &chains {
            let take = (c.writable_len() as usize).min(len - at);
            let mut w = Cursor::new(&self.rx.mem, &c.writable);
            if !w.write(&self.frame[at..at + take]) {
                // Validated at pop; only a hot-unplugged region could get here.
                self.stats.add(&self.stats.errors, 1);
            }
            at += take;
            self.used.push((c.head, take as u32));
        }
        self.stats.add(&self.stats.bytes_to_guest, len as u64);
        self.stats.add(&self.stats.requests, 1);
        self.rx_frames += 1;
        self.rx_bytes += (len - VNET_HDR_LEN) as u64;
        Delivery::Done
    }

    /// Gives the receive chains it holds (taken for a frame that did not fit them yet) back to
    /// the ring by moving its next avail index back over them: they are the last chains it took,
    /// in order, which the avail ring must still show. The frame read from the tap stays with
    /// this handler; a restored device never sees it (a dropped frame, as a network may drop).
    fn give_back_held(&mut self) -> Result<(), String> {
        let heads: Vec<u16> = self.held.iter().map(|c| c.head).collect();
        self.rx.give_back(&heads)?;
        self.held.clear();
        Ok(())
    }

    /// Moves frames from the tap to the receive ring while both have some.
    fn receive(&mut self) {
        let before = (self.rx_frames, self.rx_dropped);
        loop {
            if self.pending == 0 {
                if !self.polling {
                    break;
                }
                match self.tap.read(&mut self.frame) {
                    Ok(n) if n <= VNET_HDR_LEN => self.rx_dropped += 1,
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("virtio-net: read from tap {}: {e}", self.tap.name());
                        break;
                    }
                }
                continue;
            }
            match self.deliver() {
                Delivery::Done => self.pending = 0,
                Delivery::Dropped => {
                    self.pending = 0;
                    self.rx_dropped += 1;
                }
                Delivery::NoBuffers => {
                    // Ask for a notification when buffers arrive; if some came meanwhile, go on.
                    if self.rx.enable_notification() {
                        continue;
                    }
                    self.set_polling(false);
                    break;
                }
            }
        }
        publish(&mut self.rx, &mut self.used);
        if (self.rx_frames, self.rx_dropped) != before {
            self.update_stats();
        }
    }

    /// Writes one transmit chain to the tap.
    fn transmit(&mut self, c: &Chain) {
        let len = c.readable_len() as usize;
        let mem = &self.tx.mem;
        let mut iov = Vec::with_capacity(c.readable.len());
        // The guards keep each buffer's mapping valid until the write is done (the iovecs hold
        // raw pointers into them).
        let mut guards = Vec::with_capacity(c.readable.len());
        for s in &c.readable {
            match mem.get_slice(GuestAddress(s.addr), s.len as usize) {
                Ok(v) => {
                    let g = v.ptr_guard();
                    iov.push(libc::iovec {
                        iov_base: g.as_ptr() as *mut libc::c_void,
                        iov_len: s.len as usize,
                    });
                    guards.push(g);
                }
                Err(_) => {
                    iov.clear();
                    break;
                }
            }
        }
        if iov.len() != c.readable.len() {
            // A buffer straddles two memory regions: copy.
            self.copy.resize(len, 0);
            if !Cursor::new(mem, &c.readable).read(&mut self.copy) {
                self.tx_dropped += 1;
                return;
            }
            iov = vec![libc::iovec {
                iov_base: self.copy.as_mut_ptr().cast(),
                iov_len: len,
            }];
        }
        // SAFETY: each iovec is a range of guest memory checked at pop whose mapping `guards`
        // keeps alive until after the write, or our own copy buffer.
        let written = unsafe { self.tap.writev(&iov) };
        drop(guards);
        match written {
            Ok(_) => {
                self.tx_frames += 1;
                self.tx_bytes += (len - VNET_HDR_LEN) as u64;
                self.stats.add(&self.stats.bytes_from_guest, len as u64);
                self.stats.add(&self.stats.requests, 1);
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EIO) && !self.warned_down {
                    self.warned_down = true;
                    log::warn!(
                        "virtio-net: tap {} is down: the guest's frames are dropped",
                        self.tap.name()
                    );
                } else {
                    log::debug!("virtio-net: write to tap {}: {e}", self.tap.name());
                }
                self.tx_dropped += 1;
            }
        }
    }

    fn send(&mut self) {
        let mut used = Vec::new();
        loop {
            self.tx.disable_notification();
            while let Some((head, res)) = self.tx.pop() {
                match res {
                    Ok(c)
                        if c.writable.is_empty()
                            && (VNET_HDR_LEN as u64..=MAX_FRAME as u64)
                                .contains(&c.readable_len()) =>
                    {
                        self.transmit(&c)
                    }
                    _ => {
                        self.stats.add(&self.stats.bad_chains, 1);
                        self.stats.add(&self.stats.errors, 1);
                    }
                }
                used.push((head, 0));
            }
            publish(&mut self.tx, &mut used);
            if !self.tx.enable_notification() {
                break;
            }
        }
        self.update_stats();
    }

    /// Serves the control queue: each command is acknowledged VIRTIO_NET_OK or VIRTIO_NET_ERR
    /// in its last writable byte; a chain with no writable byte is returned unanswered (len 0).
    fn control(&mut self) {
        let Some(mut ctrl) = self.ctrl.take() else {
            return;
        };
        loop {
            ctrl.disable_notification();
            while let Some((head, res)) = ctrl.pop() {
                let len = match res {
                    Ok(c) if c.writable_len() > 0 => {
                        let ack = self.command(&ctrl, &c);
                        let mut w = Cursor::new(&ctrl.mem, &c.writable);
                        let ok = w.skip(c.writable_len() - 1) && w.write(&[ack]);
                        u32::from(ok)
                    }
                    _ => {
                        self.stats.add(&self.stats.bad_chains, 1);
                        0
                    }
                };
                ctrl.complete(head, len);
            }
            if !ctrl.enable_notification() {
                break;
            }
        }
        self.ctrl = Some(ctrl);
        self.update_stats();
    }

    /// One control command (class, command, data): the coalescing commands of
    /// `VIRTIO_NET_F_NOTF_COAL` are done; anything else (another class, a short or long
    /// command, a per-queue command this device did not offer) is refused with VIRTIO_NET_ERR.
    fn command(&mut self, ctrl: &Vq, c: &Chain) -> u8 {
        self.ctrl_commands += 1;
        let mut b = [0u8; CTRL_MAX];
        let len = c.readable_len();
        let ok = len == CTRL_MAX as u64 && Cursor::new(&ctrl.mem, &c.readable).read(&mut b);
        let le32 = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let target = match (u32::from(b[0]), u32::from(b[1])) {
            _ if !ok => None,
            (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_TX_SET) => Some(&mut self.tx),
            (VIRTIO_NET_CTRL_NOTF_COAL, VIRTIO_NET_CTRL_NOTF_COAL_RX_SET) => Some(&mut self.rx),
            _ => None,
        };
        match target {
            Some(vq) => {
                // virtio_net_ctrl_coal: max_packets, then max_usecs.
                vq.moderator.set_driver(le32(6), le32(2));
                VIRTIO_NET_OK as u8
            }
            None => {
                self.ctrl_errors += 1;
                VIRTIO_NET_ERR as u8
            }
        }
    }

    fn update_stats(&self) {
        let s = &self.stats;
        for (k, v) in [
            ("rx_frames", self.rx_frames),
            ("rx_bytes", self.rx_bytes),
            ("rx_dropped", self.rx_dropped),
            ("rx_polled", self.rx_polled),
            ("tx_frames", self.tx_frames),
            ("tx_bytes", self.tx_bytes),
            ("tx_dropped", self.tx_dropped),
            (
                "interrupts_held",
                self.rx.moderator.held + self.tx.moderator.held,
            ),
            ("ctrl_commands", self.ctrl_commands),
            ("ctrl_errors", self.ctrl_errors),
        ] {
            s.set_extra(k, v);
        }
    }
}

/// Returns `used` (head, length) to the driver with a single used-index update, so that the
/// elements of a merged frame appear together, then interrupts if the driver asked for it
/// (`used_event` with EVENT_IDX, else the avail ring's NO_INTERRUPT flag).
fn publish(vq: &mut Vq, used: &mut Vec<(u16, u32)>) {
    if used.is_empty() {
        return;
    }
    let n = used.len() as u32;
    let q = &mut vq.queue;
    let size = q.size();
    let ring = q.used_ring();
    let old = q.next_used();
    let mut new = old;
    for &(id, len) in used.iter() {
        if id >= size {
            continue;
        }
        let at = ring + 4 + 8 * u64::from(new % size);
        let ok = vq
            .mem
            .write_obj(u32::from(id).to_le(), GuestAddress(at))
            .is_ok()
            && vq.mem.write_obj(len.to_le(), GuestAddress(at + 4)).is_ok();
        if !ok {
            crate::warn_limited!(
                "virtio-queue",
                "virtqueue {}: used ring not writable",
                vq.index
            );
            used.clear();
            return;
        }
        new = new.wrapping_add(1);
    }
    used.clear();
    if vq
        .mem
        .store(new.to_le(), GuestAddress(ring + 2), Ordering::Release)
        .is_err()
    {
        return;
    }
    q.set_next_used(new);
    fence(Ordering::SeqCst);
    let avail = q.avail_ring();
    let notify = if q.event_idx_enabled() {
        let at = GuestAddress(avail + 4 + 2 * u64::from(size));
        match vq.mem.load::<u16>(at, Ordering::Acquire) {
            Ok(e) => new.wrapping_sub(u16::from_le(e)).wrapping_sub(1) < new.wrapping_sub(old),
            Err(_) => true,
        }
    } else {
        match vq.mem.load::<u16>(GuestAddress(avail), Ordering::Acquire) {
            Ok(f) => u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
            Err(_) => true,
        }
    };
    vq.interrupt(n, notify);
}

impl QueueHandler for NetHandler {
    fn queues(&self) -> Vec<&Vq> {
        [&self.rx, &self.tx].into_iter().chain(&self.ctrl).collect()
    }

    fn park(&mut self) {
        self.unparked = self.give_back_held().err();
    }

    fn save(&self) -> Result<serde_json::Value, String> {
        match &self.unparked {
            Some(why) => Err(why.clone()),
            None => Ok(serde_json::Value::Null),
        }
    }

    fn process(&mut self, q: usize) -> Result<(), String> {
        match q {
            RX => {
                // New receive buffers: poll the tap again and deliver a pending frame.
                self.set_polling(true);
                self.receive();
            }
            TX => self.send(),
            CTRL => self.control(),
            _ => {}
        }
        Ok(())
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.epoll.as_raw_fd()]
    }

    fn fd_ready(&mut self, _i: usize) -> Result<(), String> {
        // Consume the inner set's readiness (level-triggered: it reports again while the tap
        // has frames and is polled).
        let mut ev = [EpollEvent::default(); 1];
        let _ = self.epoll.wait(0, &mut ev);
        self.receive();
        Ok(())
    }

    fn polled_queue(&mut self, q: usize) -> Option<&mut Vq> {
        (q == TX).then_some(&mut self.tx)
    }

    fn interrupt_deadline(&self) -> Option<std::time::Instant> {
        match (self.rx.moderator.deadline(), self.tx.moderator.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn send_due(&mut self, now: std::time::Instant) {
        self.rx.send_due(now);
        self.tx.send_due(now);
    }

    /// Receive-side polling: while the worker polls the transmit queue it also reads the tap
    /// (when receive buffers exist), so a frame from the host is delivered without the wake-up.
    fn poll_input(&mut self) -> bool {
        if !self.polling {
            return false;
        }
        let (frames, dropped) = (self.rx_frames, self.rx_dropped);
        self.receive();
        if self.rx_frames != frames {
            self.rx_polled += self.rx_frames - frames;
            self.update_stats();
        }
        (self.rx_frames, self.rx_dropped) != (frames, dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::GuestMemoryMmap;

    /// A datagram socket pair standing in for the tap: one frame per read and write.
    fn pair() -> (Arc<Tap>, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a live array of two descriptors for the kernel to fill; checked.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        (Arc::new(Tap::from_file(a, "test")), b)
    }

    struct Rig {
        rxm: GuestMemoryMmap,
        txm: GuestMemoryMmap,
        rxq: DriverQueue,
        txq: DriverQueue,
        h: NetHandler,
        peer: File,
        stats: Arc<DeviceStats>,
    }

    fn rig(features: u64) -> Rig {
        rig_with(features, false)
    }

    fn rig_with(features: u64, event_idx: bool) -> Rig {
        // Each queue in its own memory so both can use the test driver's fixed ring addresses.
        let (rxm, txm) = (memory(), memory());
        let (rxq, txq) = (DriverQueue::new(8), DriverQueue::new(8));
        let (tap, peer) = pair();
        let stats = Arc::new(DeviceStats::default());
        let h = NetHandler::new(
            vq(&rxm, &rxq, 0, event_idx),
            vq(&txm, &txq, 1, event_idx),
            tap,
            features,
            stats.clone(),
        )
        .unwrap();
        Rig {
            rxm,
            txm,
            rxq,
            txq,
            h,
            peer,
            stats,
        }
    }

    fn send_to_device(peer: &File, frame: &[u8]) {
        use std::io::Write;
        (&*peer).write_all(frame).unwrap();
    }

    fn recv_from_device(peer: &File) -> Option<Vec<u8>> {
        use std::io::Read;
        let mut b = vec![0u8; MAX_FRAME];
        match (&*peer).read(&mut b) {
            Ok(n) => Some(b[..n].to_vec()),
            Err(_) => None,
        }
    }

    fn extra(s: &DeviceStats, k: &str) -> u64 {
        s.extra.lock().unwrap().get(k).copied().unwrap_or(0)
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(fill, n));
        f
    }

    #[test]
    fn transmits_chains_and_refuses_hostile_ones() {
        let mut r = rig(0);
        let f = frame(60, 0xab);
        r.txm.write_slice(&f[..20], GuestAddress(0x8000)).unwrap();
        r.txm.write_slice(&f[20..], GuestAddress(0x9000)).unwrap();
        r.txq
            .add(&r.txm, &[(0x8000, 20, false), (0x9000, 52, false)]);
        // Wrong direction, too short for the header, outside memory.
        r.txq.add(&r.txm, &[(0x8000, 72, true)]);
        r.txq.add(&r.txm, &[(0x8000, 8, false)]);
        r.txq.add(&r.txm, &[(0x7fff_0000_0000, 64, false)]);
        r.h.process(TX).unwrap();
        assert_eq!(recv_from_device(&r.peer).unwrap(), f);
        assert!(recv_from_device(&r.peer).is_none(), "one frame only");
        assert_eq!(r.txq.used(&r.txm, 0).0, 4, "every chain returned");
        assert_eq!(r.stats.bad_chains.load(Ordering::Relaxed), 3);
        assert_eq!(extra(&r.stats, "tx_frames"), 1);
        assert_eq!(extra(&r.stats, "tx_bytes"), 60);
    }

    #[test]
    fn receives_frames_and_keeps_them_until_buffers_arrive() {
        let mut r = rig(0);
        let f = frame(100, 0x11);
        send_to_device(&r.peer, &f);
        // No buffers yet: the frame is read and kept, the tap is no longer polled.
        r.h.fd_ready(0).unwrap();
        assert_eq!(r.h.pending, f.len());
        assert!(!r.h.polling);
        // Hostile buffers: readable, too short for the header. Then a good one.
        r.rxq.add(&r.rxm, &[(0x8000, 64, false)]);
        r.rxq.add(&r.rxm, &[(0x8000, 4, true)]);
        r.rxq.add(&r.rxm, &[(0xa000, 2048, true)]);
        r.h.process(RX).unwrap();
        assert!(r.h.polling);
        assert_eq!(r.h.pending, 0);
        let (idx, id, len) = r.rxq.used(&r.rxm, 2);
        assert_eq!((idx, id, len), (3, 2, f.len() as u32));
        assert_eq!(r.rxq.used(&r.rxm, 0).2, 0);
        let mut got = vec![0u8; f.len()];
        r.rxm.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
        assert_eq!(r.stats.bad_chains.load(Ordering::Relaxed), 2);
        assert_eq!(extra(&r.stats, "rx_frames"), 1);
        assert_eq!(extra(&r.stats, "rx_dropped"), 0);
    }

    /// Receive-side polling delivers a frame waiting on the tap while buffers exist, and says
    /// whether it found any; without buffers it leaves the tap alone.
    #[test]
    fn receive_polling_delivers_waiting_frames_and_counts_them() {
        let mut r = rig(0);
        assert!(!r.h.poll_input(), "nothing on the tap");
        r.rxq.add(&r.rxm, &[(0xa000, 2048, true)]);
        r.h.process(RX).unwrap();
        let f = frame(80, 0x22);
        send_to_device(&r.peer, &f);
        assert!(
            r.h.poll_input(),
            "the waiting frame is delivered by the poll"
        );
        assert_eq!(r.rxq.used(&r.rxm, 0).2, f.len() as u32);
        assert_eq!(extra(&r.stats, "rx_polled"), 1);
        // No buffers left: the next frame is read and kept, and polling stops.
        send_to_device(&r.peer, &f);
        send_to_device(&r.peer, &f);
        assert!(!r.h.poll_input());
        assert!(!r.h.polling);
        assert_eq!(r.h.pending, f.len(), "one frame kept");
        assert!(!r.h.poll_input(), "the tap is left alone without buffers");
        assert_eq!(r.h.pending, f.len(), "the third frame is still on the tap");
        assert_eq!(extra(&r.stats, "rx_frames"), 1);
    }

    #[test]
    fn merges_buffers_or_drops_what_cannot_fit() {
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        let big = frame(3000, 0x22);
        for i in 0..2 {
            r.rxq.add(&r.rxm, &[(0x10000 + 0x1000 * i, 2048, true)]);
        }
        send_to_device(&r.peer, &big);
        r.h.fd_ready(0).unwrap();
        let (idx, id0, len0) = r.rxq.used(&r.rxm, 0);
        assert_eq!((idx, id0, len0), (2, 0, 2048));
        assert_eq!(r.rxq.used(&r.rxm, 1).2 as usize, big.len() - 2048);
        let mut hdr = [0u8; VNET_HDR_LEN];
        r.rxm.read_slice(&mut hdr, GuestAddress(0x10000)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 2);

        // Without MRG_RXBUF a frame larger than a chain is dropped, and the chain is kept for
        // the next frame that fits.
        let mut r = rig(0);
        r.rxq.add(&r.rxm, &[(0x10000, 1024, true)]);
        send_to_device(&r.peer, &big);
        send_to_device(&r.peer, &frame(64, 0x33));
        r.h.fd_ready(0).unwrap();
        assert_eq!(extra(&r.stats, "rx_dropped"), 1);
        assert_eq!(extra(&r.stats, "rx_frames"), 1);
        assert_eq!(r.rxq.used(&r.rxm, 0), (1, 0, 76));
    }

    #[test]
    fn parking_gives_held_receive_buffers_back_to_the_ring() {
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        r.rxq.add(&r.rxm, &[(0x10000, 2048, true)]);
        send_to_device(&r.peer, &frame(3000, 0x22));
        r.h.fd_ready(0).unwrap();
        assert_eq!(r.h.held.len(), 1, "too small alone: held");
        assert_eq!(r.h.rx.queue.next_avail(), 1);
        r.h.park();
        assert_eq!(r.h.save().unwrap(), serde_json::Value::Null);
        assert!(r.h.held.is_empty());
        assert_eq!(r.h.queues()[0].queue.next_avail(), 0, "given back");
        // The frame it kept is delivered once a second buffer arrives, into both, in order.
        r.rxq.add(&r.rxm, &[(0x11000, 2048, true)]);
        r.h.process(RX).unwrap();
        assert_eq!(r.rxq.used(&r.rxm, 0), (2, 0, 2048));
        // A held chain the avail ring no longer shows (a driver that rewrote it) is not given
        // back: the snapshot is refused.
        let mut r = rig(bit(VIRTIO_NET_F_MRG_RXBUF));
        r.rxq.add(&r.rxm, &[(0x10000, 2048, true)]);
        send_to_device(&r.peer, &frame(3000, 0x22));
        r.h.fd_ready(0).unwrap();
        r.rxm.write_obj(5u16, GuestAddress(AVAIL + 4)).unwrap();
        r.h.park();
        assert!(r.h.save().unwrap_err().contains("buffer 0 it holds"));
    }

    fn interrupts(vq: &Vq) -> u64 {
        vq.msix.delivered.load(Ordering::Relaxed) + vq.msix.held.load(Ordering::Relaxed)
    }

    #[test]
    fn interrupts_only_when_the_driver_wants_them() {
        // EVENT_IDX: used_event 1 asks for an interrupt once the second element is used.
        let mut r = rig_with(0, true);
        r.rxm
            .write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * 8))
            .unwrap();
        for i in 0..3 {
            r.rxq.add(&r.rxm, &[(0x10000 + 0x1000 * i, 2048, true)]);
        }
        send_to_device(&r.peer, &frame(64, 1));
        r.h.fd_ready(0).unwrap();
        assert_eq!(interrupts(&r.h.rx), 0, "used_event not reached");
        send_to_device(&r.peer, &frame(64, 2));
        r.h.fd_ready(0).unwrap();
        assert_eq!(interrupts(&r.h.rx), 1);
        send_to_device(&r.peer, &frame(64, 3));
        r.h.fd_ready(0).unwrap();
        assert_eq!(interrupts(&r.h.rx), 1, "used_event passed");
        assert_eq!(r.rxq.used(&r.rxm, 0).0, 3);
        // A fourth frame finds the ring empty: it is kept, the tap is no longer polled, and the
        // device asks to be notified at the next buffer (avail_event).
        send_to_device(&r.peer, &frame(64, 4));
        r.h.fd_ready(0).unwrap();
        assert!(r.h.pending > 0 && !r.h.polling);
        let avail_event: u16 = r.rxm.read_obj(GuestAddress(USED + 4 + 8 * 8)).unwrap();
        assert_eq!(avail_event, 3);

        // No EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT suppresses the transmit interrupt.
        let mut r = rig(0);
        r.txm.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        r.txm
            .write_slice(&frame(60, 0), GuestAddress(0x8000))
            .unwrap();
        r.txq.add(&r.txm, &[(0x8000, 72, false)]);
        r.h.process(TX).unwrap();
        assert_eq!(interrupts(&r.h.tx), 0);
        r.txm.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
        r.txq.add(&r.txm, &[(0x8000, 72, false)]);
        r.h.process(TX).unwrap();
        assert_eq!(interrupts(&r.h.tx), 1);
        assert_eq!(extra(&r.stats, "tx_frames"), 2);
    }

    /// A control command chain: `cmd` readable (split in two buffers when long enough), then
    /// `ack` writable bytes; returns the ack byte's address.
    fn ctrl_cmd(m: &GuestMemoryMmap, q: &mut DriverQueue, cmd: &[u8], ack: u32) -> u64 {
        m.write_slice(cmd, GuestAddress(0x8000)).unwrap();
        m.write_obj(0xeeu8, GuestAddress(0x9000)).unwrap();
        let mut bufs = vec![];
        if cmd.len() > 2 {
            bufs.push((0x8000, 2, false));
            bufs.push((0x8002, cmd.len() as u32 - 2, false));
        } else if !cmd.is_empty() {
            bufs.push((0x8000, cmd.len() as u32, false));
        }
        if ack > 0 {
            bufs.push((0x9000, ack, true));
        }
        q.add(m, &bufs);
        0x9000 + u64::from(ack.max(1)) - 1
    }

    fn coal(class: u8, cmd: u8, packets: u32, usecs: u32) -> Vec<u8> {
        let mut v = vec![class, cmd];
        v.extend(packets.to_le_bytes());
        v.extend(usecs.to_le_bytes());
        v
    }

    #[test]
    fn control_queue_sets_coalescing_and_refuses_garbage() {
        let mut r = rig(0);
        let cm = memory();
        let mut cq = DriverQueue::new(16);
        r.h.ctrl = Some(vq(&cm, &cq, 2, false));
        let (c, tx, rx) = (
            VIRTIO_NET_CTRL_NOTF_COAL as u8,
            VIRTIO_NET_CTRL_NOTF_COAL_TX_SET as u8,
            VIRTIO_NET_CTRL_NOTF_COAL_RX_SET as u8,
        );
        let ok = VIRTIO_NET_OK as u8;
        let err = VIRTIO_NET_ERR as u8;
        let cases: Vec<(Vec<u8>, u32, u8)> = vec![
            (coal(c, tx, 8, 50), 1, ok),
            (coal(c, rx, 3, u32::MAX), 1, ok),
            // Per-queue commands (not offered), other classes, short and long commands.
            (
                coal(c, VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET as u8, 1, 1),
                1,
                err,
            ),
            (coal(0, 0, 1, 1), 1, err),
            (coal(0xff, 0xff, 0, 0), 1, err),
            (vec![c, rx], 1, err),
            ([coal(c, rx, 1, 1), vec![0]].concat(), 1, err),
            (vec![], 1, err),
            // A longer writable part: the ack is its last byte.
            (coal(c, rx, 3, u32::MAX), 4, ok),
        ];
        for (cmd, ack_len, want) in &cases {
            let at = ctrl_cmd(&cm, &mut cq, cmd, *ack_len);
            r.h.process(CTRL).unwrap();
            let got: u8 = cm.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(got, *want, "{cmd:?}");
        }
        // No writable byte: returned unanswered, counted, the queue goes on.
        ctrl_cmd(&cm, &mut cq, &coal(c, tx, 1, 1), 0);
        r.h.process(CTRL).unwrap();
        let n = cases.len() as u16;
        let (idx, _, len) = cq.used(&cm, n);
        assert_eq!((idx, len), (n + 1, 0));
        assert_eq!(r.stats.bad_chains.load(Ordering::Relaxed), 1);
        assert_eq!(extra(&r.stats, "ctrl_errors"), 6);
        assert_eq!(r.h.tx.moderator.driver(), (50, 8));
        assert_eq!(
            r.h.rx.moderator.driver(),
            (crate::devices::virtio::moderation::MAX_DRIVER_USECS, 3),
            "huge usecs clamped"
        );
    }

    #[test]
    fn driver_coalescing_holds_receive_interrupts() {
        let mut r = rig(0);
        r.h.rx.moderator.set_driver(5_000, 3);
        for i in 0..8 {
            r.rxq.add(&r.rxm, &[(0x10000 + 0x1000 * i, 2048, true)]);
        }
        for i in 0..2 {
            send_to_device(&r.peer, &frame(64, i));
            r.h.fd_ready(0).unwrap();
        }
        assert_eq!(interrupts(&r.h.rx), 0, "held: two of three packets");
        assert!(r.h.interrupt_deadline().is_some());
        send_to_device(&r.peer, &frame(64, 3));
        r.h.fd_ready(0).unwrap();
        assert_eq!(interrupts(&r.h.rx), 1, "the third sends it");
        assert!(r.h.interrupt_deadline().is_none());
        // One more frame: held until the time bound, which the worker's timer reaches.
        send_to_device(&r.peer, &frame(64, 4));
        r.h.fd_ready(0).unwrap();
        let d = r.h.interrupt_deadline().expect("held");
        r.h.send_due(d - std::time::Duration::from_micros(1));
        assert_eq!(interrupts(&r.h.rx), 1);
        r.h.send_due(d);
        assert_eq!(interrupts(&r.h.rx), 2);
        assert_eq!(r.rxq.used(&r.rxm, 0).0, 4, "every frame was used at once");
        // Held, then the driver turns interrupts off (it polls): none is sent at the deadline.
        send_to_device(&r.peer, &frame(64, 5));
        r.h.fd_ready(0).unwrap();
        let d = r.h.interrupt_deadline().expect("held");
        r.rxm.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
        r.h.send_due(d);
        assert_eq!(interrupts(&r.h.rx), 2, "suppressed by the driver");
        assert!(r.h.interrupt_deadline().is_none());
        assert_eq!(r.h.rx.moderator.cancelled, 1);
    }

    /// A real tap, in a network namespace private to this test's thread (root only).
    #[test]
    fn opens_a_tap_and_sets_the_offloads_the_driver_accepted() {
        let t = std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which ends with the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipped: no private network namespace: {}",
                    io::Error::last_os_error()
                );
                return;
            }
            let cfg = NetConfig {
                tap: "xl-unit0".into(),
                mac: [2, 0, 0, 0, 0, 7],
                coalesce: Default::default(),
            };
            let mut net = match Net::open(&cfg, 0) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("skipped: {e}");
                    return;
                }
            };
            let supported = net.tap.supported_offloads();
            assert_ne!(supported & libc::TUN_F_CSUM, 0, "{supported:#x}");
            let offered = net.features();
            assert_ne!(offered & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
            assert_eq!(offered & OFFLOAD_FEATURES, offered_offloads(supported));
            let mut c = [0u8; 8];
            net.read_config(0, &mut c);
            assert_eq!(&c[..6], &cfg.mac);
            assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1, "link up");
            // The kernel refuses segmentation without the checksum offload.
            assert!(net.tap.set_offloads(libc::TUN_F_TSO4).is_err());

            let (m1, m2) = (memory(), memory());
            let (d1, d2) = (DriverQueue::new(8), DriverQueue::new(8));
            let accepted = offered
                & (bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_CSUM)
                    | bit(VIRTIO_NET_F_MRG_RXBUF));
            let stats = net.stats();
            let h = net.activate(Activation {
                mem: m1.clone(),
                queues: vec![vq(&m1, &d1, 0, false), vq(&m2, &d2, 1, false)],
                features: accepted,
                stats: stats.clone(),
            });
            assert!(h.is_ok());
            assert_ne!(offered & bit(VIRTIO_NET_F_NOTF_COAL), 0);
            assert_ne!(offered & bit(VIRTIO_NET_F_CTRL_VQ), 0);
            assert_eq!(
                extra(&stats, "tap_offloads"),
                u64::from(libc::TUN_F_CSUM | (supported & libc::TUN_F_TSO4))
            );
            assert_eq!(
                extra(&stats, "offload_features"),
                accepted & OFFLOAD_FEATURES
            );
            // Activation with a single queue is refused (the device needs reset), not a crash.
            assert!(net
                .activate(Activation {
                    mem: m1.clone(),
                    queues: vec![vq(&m1, &d1, 0, false)],
                    features: 0,
                    stats,
                })
                .is_err());
        });
        t.join().unwrap();
    }

    #[test]
    fn offloads_follow_the_tap_and_the_driver() {
        assert_eq!(offered_offloads(0), 0);
        let all = offered_offloads(crate::devices::virtio::tap::ALL_OFFLOADS);
        assert_eq!(all, OFFLOAD_FEATURES);
        let no_ufo = offered_offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        assert_eq!(no_ufo & bit(VIRTIO_NET_F_GUEST_UFO), 0);
        assert_eq!(no_ufo & bit(VIRTIO_NET_F_GUEST_ECN), 0);
        assert_eq!(tap_offloads(0), 0);
        // TSO without the checksum offload it depends on: nothing.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(
            tap_offloads(
                bit(VIRTIO_NET_F_GUEST_CSUM)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_ECN)
            ),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN
        );
    }
}
