//! virtio-vsock (virtio 1.x §5.10, device type 19) in userspace, with a hybrid Unix-socket host
//! side like Firecracker's (`/dev/vhost-vsock` is not needed): stream sockets only, rx/tx/event
//! queues, configuration = the guest's CID.
//!
//! Owns the listening Unix socket `PATH` (bound at start-up, so a bad path is a start-up error;
//! removed when the device goes away) and, while the driver has the device running, the handler
//! that moves packets between the queues and [`muxer::Muxer`], which holds the connections and
//! their state machine (see there for the host conventions, flow control and bad input).
//!
//! The worker waits on the queues' ioeventfds and on one more descriptor, the muxer's own epoll
//! set (listener plus every host stream): connections come and go inside that set, so the worker's
//! interface (`QueueHandler::extra_fds`, fixed at start) did not have to change.
//!
//! Queue 0 (rx) receives the device's packets: control packets first, then host data, each in one
//! buffer (header + payload). Queue 1 (tx) carries the guest's packets; each chain is consumed
//! and returned with length 0. Queue 2 (event) carries the only event,
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which a device restored from a snapshot sends once: its
//! connections' host sockets stayed with the original process, so the guest must drop its own
//! (as Firecracker does); the guest then reads the CID again (a clone may have another).

pub mod muxer;
pub mod packet;

use std::os::fd::RawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use super::config::VsockConfig;
use super::queue::{Chain, Cursor, Vq};
use super::{common_features, Activation, DeviceStats, QueueHandler, VirtioDevice};
use muxer::Muxer;
use packet::{Hdr, HDR_LEN, MAX_PKT_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;

pub struct Vsock {
    cid: u64,
    path: PathBuf,
    /// The socket's path was removed (it is removed once: whichever thread drops the device last,
    /// e.g. a control-API client's, may not be allowed to unlink under seccomp).
    removed: bool,
    listener: UnixListener,
    stats: Arc<DeviceStats>,
}

impl Vsock {
    /// Binds the host-side socket. A stale socket file at `PATH` (nobody listening) is replaced;
    /// a live one, anything else there, or a missing directory is a start-up error naming the path.
    pub fn new(cfg: &VsockConfig) -> Result<Self, String> {
        let path = cfg.socket.clone();
        if cfg.cid < 3 || cfg.cid > u64::from(u32::MAX) {
            return Err(format!(
                "vsock cid {} is reserved or too large (3..2^32)",
                cfg.cid
            ));
        }
        if let Ok(m) = std::fs::symlink_metadata(&path) {
            if !m.file_type().is_socket() {
                return Err(format!(
                    "cannot listen on vsock socket {}: exists and is not a socket",
                    path.display()
                ));
            }
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(format!(
                    "cannot listen on vsock socket {}: another process listens there",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(&path);
        }
        let listener = UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on vsock socket {}: {e}", path.display()))?;
        let stats = Arc::new(DeviceStats::default());
        for k in muxer::FACTS {
            stats.set_extra(k, 0);
        }
        Ok(Vsock {
            cid: cfg.cid,
            path,
            removed: false,
            listener,
            stats,
        })
    }
}

impl Vsock {
    /// Removes the socket's path: host clients can no longer reach a VM that has ended.
    fn remove_socket(&mut self) {
        if !std::mem::replace(&mut self.removed, true) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

impl VirtioDevice for Vsock {
    /// Only the CID, for the record: connections cannot survive (their host sockets belong to
    /// this process), so a restored device resets the guest's transport instead (see
    /// [`VsockHandler`]); it reports the configured CID (the snapshot's, or `--vsock-cid`'s).
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!({ "cid": self.cid }))
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    fn name(&self) -> String {
        "virtio-vsock".into()
    }

    fn release(&mut self) {
        self.remove_socket();
    }
    fn kind(&self) -> &'static str {
        "virtio-vsock"
    }
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        // Stream sockets only: VIRTIO_VSOCK_F_SEQPACKET is not offered.
        common_features()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String> {
        let mut qs = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (qs.next(), qs.next()) else {
            return Err("virtio-vsock needs rx and tx queues".into());
        };
        let ev = qs.next();
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| format!("vsock listener: {e}"))?;
        let mux = Muxer::new(self.cid, &self.path, listener, a.stats.clone())
            .map_err(|e| format!("vsock: {e}"))?;
        Ok(Box::new(VsockHandler {
            rx,
            tx,
            mux,
            rx_spare: None,
            rx_ready: true,
            cid: self.cid,
            stats: a.stats,
            ev,
            reset_pending: false,
            unparked: None,
        }))
    }
    fn stats(&self) -> Arc<DeviceStats> {
        self.stats.clone()
    }
}

/// The worker's side: queues ↔ muxer.
pub struct VsockHandler {
    rx: Vq,
    tx: Vq,
    mux: Muxer,
    /// An rx buffer taken from the ring but not used yet.
    rx_spare: Option<(u16, Chain)>,
    /// False once the device found the rx ring empty; true again on its notification.
    rx_ready: bool,
    cid: u64,
    stats: Arc<DeviceStats>,
    /// The event queue (queue 2).
    ev: Option<Vq>,
    /// A restored device owes the driver `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the connections
    /// it knew are gone (sent in the first event buffer the driver gives).
    reset_pending: bool,
    /// Why the rx buffer it held could not be given back when parked (a snapshot is then
    /// refused).
    unparked: Option<String>,
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` (§5.10.6.7), the only event.
const EVENT_TRANSPORT_RESET: u32 = 0;

impl VsockHandler {
    /// Sends the transport reset a restored device owes, once the driver has an event buffer.
    fn send_reset(&mut self) {
        let Some(ev) = self.ev.as_mut().filter(|_| self.reset_pending) else {
            return;
        };
        while let Some((head, res)) = ev.pop() {
            let Some(c) = res.ok().filter(|c| c.writable_len() >= 4) else {
                self.stats.add(&self.stats.bad_chains, 1);
                ev.complete(head, 0);
                continue;
            };
            let ok = Cursor::new(&ev.mem, &c.writable).write(&EVENT_TRANSPORT_RESET.to_le_bytes());
            ev.complete(head, if ok { 4 } else { 0 });
            self.reset_pending = !ok;
            self.stats.add_extra("transport_resets", u64::from(ok));
            return;
        }
    }

    /// Serves the tx queue until it is empty, or until too many answers wait for rx buffers (the
    /// rest stays in the ring; `pump` comes back to it).
    fn serve_tx(&mut self) {
        loop {
            self.tx.disable_notification();
            while self.mux.ctrl_backlog() < muxer::MAX_CTRL {
                let Some((head, res)) = self.tx.pop() else {
                    break;
                };
                self.stats.add(&self.stats.requests, 1);
                match res {
                    Ok(chain) => self.tx_packet(&chain),
                    Err(e) => {
                        log::debug!("virtio-vsock: tx chain: {e}");
                        self.stats.add(&self.stats.bad_chains, 1);
                    }
                }
                self.tx.complete(head, 0);
            }
            if self.mux.ctrl_backlog() >= muxer::MAX_CTRL || !self.tx.enable_notification() {
                return;
            }
        }
    }

    fn tx_packet(&mut self, chain: &Chain) {
        let mut r = Cursor::new(&self.tx.mem, &chain.readable);
        let mut hb = [0u8; HDR_LEN];
        if !r.read(&mut hb) {
            self.stats.add_extra("dropped", 1);
            return;
        }
        let h = Hdr::parse(&hb);
        let avail = r.remaining();
        let mut payload = Vec::new();
        if h.check(self.cid, avail).is_ok() && h.len > 0 {
            payload.resize(h.len as usize, 0);
            if !r.read(&mut payload) {
                self.stats.add_extra("dropped", 1);
                return;
            }
        }
        self.mux.guest_packet(&h, avail, &payload);
    }

    /// The next usable rx buffer (bad chains are returned empty and counted).
    fn rx_buffer(&mut self) -> Option<(u16, Chain)> {
        if let Some(b) = self.rx_spare.take() {
            return Some(b);
        }
        loop {
            let Some((head, res)) = self.rx.pop() else {
                // Ask for a notification when the driver adds buffers (with EVENT_IDX it only
                // notifies past the index we publish here); buffers that raced in are used now.
                if self.rx.enable_notification() {
                    continue;
                }
                return None;
            };
            match res {
                Ok(c) if c.writable_len() >= HDR_LEN as u64 => return Some((head, c)),
                Ok(_) | Err(_) => {
                    self.stats.add(&self.stats.bad_chains, 1);
                    self.rx.complete(head, 0);
                }
            }
        }
    }

    /// Moves everything that can move: host news, host data and control packets into rx
    /// buffers, and the tx queue if it was left waiting for rx room.
    fn pump(&mut self) {
        loop {
            self.mux.fill();
            let mut delivered = false;
            while self.mux.has_to_guest() {
                let Some((head, chain)) = self.rx_buffer() else {
                    self.rx_ready = false;
                    break;
                };
                let room = (chain.writable_len() - HDR_LEN as u64).min(u64::from(MAX_PKT_LEN));
                let Some((h, data)) = self.mux.next_to_guest(room as usize) else {
                    self.rx_spare = Some((head, chain));
                    break;
                };
                let mut w = Cursor::new(&self.rx.mem, &chain.writable);
                if w.write(&h.encode()) && w.write(&data) {
                    self.rx.complete(head, (HDR_LEN + data.len()) as u32);
                } else {
                    self.stats.add(&self.stats.errors, 1);
                    self.rx.complete(head, 0);
                }
                delivered = true;
            }
            let tx_waiting = self.mux.ctrl_backlog() < muxer::MAX_CTRL / 2;
            if tx_waiting {
                let before = self.mux.ctrl_backlog();
                self.serve_tx();
                if self.mux.ctrl_backlog() != before {
                    continue;
                }
            }
            if !delivered {
                break;
            }
        }
        self.mux.update_interest(self.rx_ready);
    }
}

impl QueueHandler for VsockHandler {
    fn queues(&self) -> Vec<&Vq> {
        [&self.rx, &self.tx].into_iter().chain(&self.ev).collect()
    }
    /// The rx buffer it took for a packet that did not fit goes back to the ring; the
    /// connections stay with this handler (the original VM's), never with a restored one.
    fn park(&mut self) {
        let Some((head, _)) = &self.rx_spare else {
            return;
        };
        self.unparked = self.rx.give_back(&[*head]).err();
        if self.unparked.is_none() {
            self.rx_spare = None;
        }
    }
    fn save(&self) -> Result<serde_json::Value, String> {
        match &self.unparked {
            Some(why) => Err(why.clone()),
            None => Ok(serde_json::Value::Null),
        }
    }
    /// A restored handler starts with no connection: the guest is told to drop its own.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        self.reset_pending = true;
        Ok(())
    }
    fn process(&mut self, q: usize) -> Result<(), String> {
        self.send_reset();
        match q {
            RX => self.rx_ready = true,
            TX => self.serve_tx(),
            _ => {}
        }
        self.pump();
        Ok(())
    }
    fn extra_fds(&self) -> Vec<RawFd> {
        vec![self.mux.epoll_fd()]
    }
    fn fd_ready(&mut self, _i: usize) -> Result<(), String> {
        self.mux.host_events();
        self.pump();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use crate::devices::virtio::queue::testing::*;
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn vq(mem: &GuestMemoryMmap, dq: &DriverQueue, index: u16) -> Vq {
        crate::devices::virtio::queue::testing::vq(mem, dq, index, false)
    }

    fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// An empty directory of this test process's own, for a device's sockets.
    fn fresh_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("exitless-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A restored handler tells the driver its connections are gone, in the first event buffer
    /// it is given (a bad one is returned empty first), once.
    #[test]
    fn a_restored_device_sends_one_transport_reset() {
        let dir = fresh_dir("rst");
        let mut dev = Vsock::new(&VsockConfig {
            cid: 3,
            socket: dir.join("v.sock"),
        })
        .unwrap();
        assert_eq!(dev.save_state().unwrap()["cid"], 3);
        let (rx_mem, tx_mem, ev_mem) = (memory(), memory(), memory());
        let (rxq, txq, mut evq) = (
            DriverQueue::new(8),
            DriverQueue::new(8),
            DriverQueue::new(8),
        );
        let mut h = dev
            .activate(Activation {
                mem: rx_mem.clone(),
                queues: vec![
                    vq(&rx_mem, &rxq, 0),
                    vq(&tx_mem, &txq, 1),
                    vq(&ev_mem, &evq, 2),
                ],
                features: 0,
                stats: dev.stats(),
            })
            .unwrap();
        assert_eq!(
            h.queues().len(),
            3,
            "the event queue's position is saved too"
        );
        h.restore(&serde_json::Value::Null).unwrap();
        h.process(RX).unwrap();
        assert_eq!(evq.used(&ev_mem, 0).0, 0, "no event buffer yet: still owed");
        ev_mem
            .write_obj(0xffff_ffffu32, GuestAddress(0x8100))
            .unwrap();
        evq.add(&ev_mem, &[(0x8000, 2, true)]);
        evq.add(&ev_mem, &[(0x8100, 4, true)]);
        evq.add(&ev_mem, &[(0x8200, 4, true)]);
        h.process(2).unwrap();
        assert_eq!(evq.used(&ev_mem, 0), (2, 0, 0), "too small: returned empty");
        assert_eq!(evq.used(&ev_mem, 1), (2, 1, 4));
        let id: u32 = ev_mem.read_obj(GuestAddress(0x8100)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
        h.process(2).unwrap();
        assert_eq!(evq.used(&ev_mem, 0).0, 2, "once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two memories: the testing driver queue sits at fixed addresses, one queue per memory.
    #[test]
    fn queues_carry_packets_and_hostile_chains_are_survived() {
        let dir = fresh_dir("dev");
        let host = UnixListener::bind(dir.join("v.sock_5678")).unwrap();
        let mut dev = Vsock::new(&VsockConfig {
            cid: 3,
            socket: dir.join("v.sock"),
        })
        .unwrap();
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 3);
        let (rx_mem, tx_mem) = (memory(), memory());
        let (mut rxq, mut txq) = (DriverQueue::new(16), DriverQueue::new(16));
        let mut h = dev
            .activate(Activation {
                mem: rx_mem.clone(),
                queues: vec![vq(&rx_mem, &rxq, 0), vq(&tx_mem, &txq, 1)],
                features: 0,
                stats: dev.stats(),
            })
            .unwrap();
        // Hostile tx chains: a short header, a length beyond the buffer, a buffer outside
        // memory, a writable-only chain.
        tx_mem
            .write_slice(&[0u8; 20], GuestAddress(0x8000))
            .unwrap();
        txq.add(&tx_mem, &[(0x8000, 20, false)]);
        let big = guest_hdr(OP_RW, 1, 5678, 1000);
        tx_mem
            .write_slice(&big.encode(), GuestAddress(0x9000))
            .unwrap();
        txq.add(&tx_mem, &[(0x9000, 44 + 10, false)]);
        txq.add(&tx_mem, &[(0x7fff_0000_0000, 64, false)]);
        txq.add(&tx_mem, &[(0xa000, 64, true)]);
        // Then a good REQUEST split over two descriptors.
        let req = guest_hdr(OP_REQUEST, 1025, 5678, 0).encode();
        tx_mem
            .write_slice(&req[..10], GuestAddress(0xb000))
            .unwrap();
        tx_mem
            .write_slice(&req[10..], GuestAddress(0xc000))
            .unwrap();
        txq.add(&tx_mem, &[(0xb000, 10, false), (0xc000, 34, false)]);
        h.process(TX).unwrap();
        assert_eq!(txq.used(&tx_mem, 0).0, 5, "every tx chain is returned");
        let s = dev.stats();
        assert_eq!(s.extra.lock().unwrap()["dropped"], 3);
        assert_eq!(s.bad_chains.load(Ordering::Relaxed), 1);
        // No rx buffers yet: the RESPONSE waits. A too-small buffer is returned empty.
        rxq.add(&rx_mem, &[(0x10000, 16, true)]);
        rxq.add(&rx_mem, &[(0x11000, 4096, true)]);
        h.process(RX).unwrap();
        assert_eq!(rxq.used(&rx_mem, 0), (2, 0, 0));
        let (_, id, len) = rxq.used(&rx_mem, 1);
        assert_eq!((id, len), (1, 44));
        let mut b = [0u8; HDR_LEN];
        rx_mem.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        let resp = Hdr::parse(&b);
        assert_eq!(resp.op, OP_RESPONSE);
        assert_eq!(
            (resp.src_port, resp.dst_port, resp.dst_cid),
            (5678, 1025, 3)
        );
        // Host data flows into the next rx buffer when the host stream is readable.
        let (mut s2, _) = host.accept().unwrap();
        use std::io::Write;
        s2.write_all(b"hi there").unwrap();
        rxq.add(&rx_mem, &[(0x12000, 4096, true)]);
        h.process(RX).unwrap();
        for _ in 0..100 {
            if rxq.used(&rx_mem, 2).0 == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            h.fd_ready(0).unwrap();
        }
        let (idx, _, len) = rxq.used(&rx_mem, 2);
        assert_eq!((idx, len), (3, 44 + 8));
        let mut d = [0u8; 8];
        rx_mem
            .read_slice(&mut d, GuestAddress(0x12000 + 44))
            .unwrap();
        assert_eq!(&d, b"hi there");
        drop(h);
        drop(dev);
        assert!(
            !dir.join("v.sock").exists(),
            "socket removed with the device"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_socket_goes_when_the_vm_ends_even_while_the_device_is_still_held() {
        let dir = fresh_dir("rel");
        let mut dev = Vsock::new(&VsockConfig {
            cid: 3,
            socket: dir.join("v.sock"),
        })
        .unwrap();
        assert!(dir.join("v.sock").exists());
        dev.release();
        assert!(!dir.join("v.sock").exists(), "release removes the socket");
        // Dropping it later (maybe on a thread whose seccomp filter has no unlink) removes
        // nothing more: a new file at the path stays.
        std::fs::write(dir.join("v.sock"), b"someone else's").unwrap();
        drop(dev);
        assert!(dir.join("v.sock").exists(), "the path is removed once");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_socket_paths_are_start_up_errors() {
        let e = Vsock::new(&VsockConfig {
            cid: 3,
            socket: "/nonexistent/exitless/v.sock".into(),
        })
        .err()
        .unwrap();
        assert!(e.starts_with("cannot listen on vsock socket /nonexistent/exitless/v.sock"));
        let file = std::env::temp_dir().join(format!("exitless-vsock-file-{}", std::process::id()));
        std::fs::write(&file, b"keep me").unwrap();
        let e = Vsock::new(&VsockConfig {
            cid: 3,
            socket: file.clone(),
        })
        .err()
        .unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let _ = std::fs::remove_file(&file);
        // A live socket is not taken over; a stale one is replaced.
        let dir = fresh_dir("live");
        let live = UnixListener::bind(dir.join("v.sock")).unwrap();
        let cfg = VsockConfig {
            cid: 3,
            socket: dir.join("v.sock"),
        };
        let e = Vsock::new(&cfg).err().unwrap();
        assert!(e.contains("another process listens there"), "{e}");
        drop(live);
        assert!(dir.join("v.sock").exists());
        assert!(Vsock::new(&cfg).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(Vsock::new(&VsockConfig {
            cid: 2,
            socket: "/tmp/x".into(),
        })
        .is_err());
    }
}
