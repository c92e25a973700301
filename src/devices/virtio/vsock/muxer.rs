//! The host side of virtio-vsock: the Unix-socket listener, one host stream per connection, and
//! each connection's state machine and credit accounting (virtio 1.x §5.10.6.3).
//!
//! Owns the listener (a clone of the device's), a private epoll set holding the listener and
//! every host stream (the device worker waits on that epoll descriptor, so connections can come
//! and go without changing the worker's own set), the connection table and the queue of control
//! packets waiting for a guest rx buffer. It never touches guest memory: the device handler
//! (`super::VsockHandler`) hands it parsed packets from the tx queue and asks it for packets to put
//! in rx buffers, which is what makes it testable without KVM.
//!
//! # Host conventions (Firecracker's hybrid vsock)
//! - Host → guest: a client connects to the Unix socket `PATH` and writes `CONNECT <port>\n`; the
//!   device sends REQUEST to guest port `<port>` from a fresh host port; on the guest's RESPONSE the
//!   client reads `OK <host port>\n` and the stream carries the connection; on RST it is closed.
//! - Guest → host: a REQUEST to host port P connects to the Unix socket `PATH_P`; RESPONSE on
//!   success, RST when nothing listens there.
//!
//! # Flow control and bad input
//! The device advertises `BUF_ALLOC` bytes per connection and reports `fwd_cnt` (bytes written to
//! the host stream); guest data that the host stream does not take at once is kept, up to that
//! credit. A guest that sends beyond its credit gets RST (`credit_violations`). Host data is read
//! only while the guest has credit for it and rx buffers are available (otherwise the stream is not
//! polled, so nothing spins and nothing grows). Packets with the wrong CIDs or lengths are dropped
//! (`dropped`); unknown ops, other socket types and packets that do not fit the connection's state
//! are answered with RST (`bad_packets`). Nothing a guest sends can end the worker.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::*;
use crate::devices::virtio::DeviceStats;

/// Receive buffer the device advertises per connection (guest → host bytes not yet written).
pub const BUF_ALLOC: u32 = 256 << 10;
/// Most host bytes read ahead per connection.
const STASH_MAX: usize = 64 << 10;
/// Most connections at once (both directions, including clients still sending their line).
pub const MAX_CONNS: usize = 128;
/// Longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// Control packets queued for the guest beyond which the tx queue is not served.
pub const MAX_CTRL: usize = 1024;
/// How long a connection waits for the guest's RST after the device's full SHUTDOWN.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// First host port handed to host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

const LISTENER: u64 = 0;

/// The facts this module counts (all present in the summary, zero or not).
pub const FACTS: &[&str] = &[
    "conns_host",
    "conns_guest",
    "rst_sent",
    "dropped",
    "bad_packets",
    "credit_violations",
    "host_bad_connect",
    "host_refused",
    "conns_rejected",
];

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// A host client that has not finished its `CONNECT <port>\n` line.
    ConnectLine(Vec<u8>),
    /// REQUEST sent to the guest, waiting for its RESPONSE.
    LocalInit,
    Established,
    /// The device sent SHUTDOWN(RCV|SEND) and waits for the guest's RST (or its own SHUTDOWN).
    Closing(Instant),
}

struct Conn {
    stream: UnixStream,
    state: State,
    host_port: u32,
    guest_port: u32,
    /// Host bytes read, not yet in an rx buffer.
    stash: Vec<u8>,
    stash_off: usize,
    /// Payload bytes sent to the guest, and the guest's credit.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Guest bytes not yet written to the host stream.
    to_host: Vec<u8>,
    to_host_off: usize,
    /// Guest payload bytes received / written to the host stream / last reported to the guest.
    rx_cnt: u32,
    fwd_cnt: u32,
    fwd_reported: u32,
    /// The host stream ended (read 0) / hung up (both directions gone).
    host_eof: bool,
    host_hup: bool,
    /// The guest said it will send / receive no more.
    guest_no_send: bool,
    guest_no_recv: bool,
    /// Events registered in the epoll set (None: not registered).
    reg: Option<u32>,
}

impl Conn {
    fn new(stream: UnixStream, state: State, host_port: u32, guest_port: u32) -> Conn {
        Conn {
            stream,
            state,
            host_port,
            guest_port,
            stash: Vec::new(),
            stash_off: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            to_host: Vec::new(),
            to_host_off: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_reported: 0,
            host_eof: false,
            host_hup: false,
            guest_no_send: false,
            guest_no_recv: false,
            reg: None,
        }
    }

    /// Bytes the guest may still send us before it must wait for a credit update: its view.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn stash_left(&self) -> usize {
        self.stash.len() - self.stash_off
    }

    fn to_host_left(&self) -> usize {
        self.to_host.len() - self.to_host_off
    }

    /// Whether host data should be read now.
    fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_no_recv
            && self.stash_left() == 0
            && self.peer_credit() > 0
    }
}

/// A packet from the host end of connection `c` to the guest `cid`.
fn pkt(cid: u64, c: &Conn, op: u16) -> Hdr {
    Hdr {
        src_cid: HOST_CID,
        dst_cid: cid,

        src_port: c.host_port,
        dst_port: c.guest_port,
        len: 0,
        ty: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: c.fwd_cnt,
    }
}

/// `send(2)` without SIGPIPE; returns bytes written.
fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes from the live slice; `fd` is a socket we own.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Connects to the Unix socket `path` without ever blocking the worker: a listener whose backlog
/// is full (one that does not accept) is refused like a missing one.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        // A Unix stream connect either completes or fails at once (EAGAIN: backlog full).
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: BTreeMap<u64, Conn>,
    next_id: u64,
    next_host_port: u32,
    /// Where the last data delivery stopped (round robin over connections).
    rr: u64,
    ctrl: VecDeque<Hdr>,
    stats: Arc<DeviceStats>,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        path: &Path,
        listener: UnixListener,
        stats: Arc<DeviceStats>,
    ) -> std::io::Result<Muxer> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            conns: BTreeMap::new(),
            next_id: 1,
            next_host_port: FIRST_HOST_PORT,
            rr: 0,
            ctrl: VecDeque::new(),
            stats,
        })
    }

    /// The descriptor the worker waits on: readable when the listener or a stream has news.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn ctrl_backlog(&self) -> usize {
        self.ctrl.len()
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn count(&self, k: &'static str) {
        self.stats.add_extra(k, 1);
    }

    fn hdr(&self, c: &Conn, op: u16) -> Hdr {
        pkt(self.guest_cid, c, op)
    }

    fn push_ctrl(&mut self, h: Hdr) {
        if h.op == OP_RST {
            self.count("rst_sent");
        }
        self.ctrl.push_back(h);
    }

    fn find(&self, host_port: u32, guest_port: u32) -> Option<u64> {
        self.conns
            .iter()
            .find(|(_, c)| {
                c.host_port == host_port
                    && c.guest_port == guest_port
                    && !matches!(c.state, State::ConnectLine(_))
            })
            .map(|(id, _)| *id)
    }

    fn insert(&mut self, c: Conn) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(id, c);
        id
    }

    /// Drops connection `id` (closing its host stream), sending RST to the guest if asked.
    fn remove(&mut self, id: u64, rst: bool) {
        if let Some(c) = self.conns.remove(&id) {
            if c.reg.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            if rst && !matches!(c.state, State::ConnectLine(_)) {
                let h = self.hdr(&c, OP_RST);
                self.push_ctrl(h);
            }
        }
    }

    // ---- Guest → device ----------------------------------------------------------------------

    /// A packet from the tx queue. `avail` is how many bytes followed the header in its buffer;
    /// `payload` holds the packet's `len` bytes when the header passed [`Hdr::check`] (else it
    /// is ignored); a packet whose payload is not `len` bytes long is dropped. Nothing a guest
    /// sends can panic here: every lookup of a connection is checked.
    pub fn guest_packet(&mut self, h: &Hdr, avail: u64, payload: &[u8]) {
        match h.check(self.guest_cid, avail) {
            Ok(()) if payload.len() == h.len as usize => {}
            Ok(()) | Err(Bad::Cid) | Err(Bad::Len) => {
                self.count("dropped");
                return;
            }
            Err(Bad::Type) | Err(Bad::Op) => return self.refuse(h),
        }
        let Some(id) = self.find(h.dst_port, h.src_port) else {
            match h.op {
                OP_REQUEST => self.guest_connect(h),
                OP_RST => {}
                _ => self.refuse(h),
            }
            return;
        };
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE => self.guest_response(id),
            OP_RST => self.remove(id, false),
            OP_SHUTDOWN => self.guest_shutdown(id, h.flags),
            OP_RW => self.guest_data(id, payload),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.credit_update(id),
            _ => {
                // A second REQUEST on a live connection (the guest lost track), or an op
                // `check` let through by mistake: reset the connection.
                self.count("bad_packets");
                self.remove(id, true);
            }
        }
    }

    /// A packet that belongs to no connection: counted and answered with RST (never an RST).
    fn refuse(&mut self, h: &Hdr) {
        self.count("bad_packets");
        if h.op != OP_RST {
            self.push_ctrl(h.reply(OP_RST));
        }
    }

    /// The guest accepted a host-initiated connection: tell the host client.
    fn guest_response(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.state != State::LocalInit {
            self.count("bad_packets");
            return self.remove(id, true);
        }
        let line = format!("OK {}\n", c.host_port);
        match send(c.stream.as_raw_fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => {
                c.state = State::Established;
                self.count("conns_host");
            }
            _ => self.remove(id, true),
        }
    }

    fn guest_shutdown(&mut self, id: u64, flags: u32) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.guest_no_send |= flags & SHUTDOWN_SEND != 0;
        c.guest_no_recv |= flags & SHUTDOWN_RCV != 0;
        if matches!(c.state, State::Closing(_)) {
            return self.remove(id, true);
        }
        self.flush(id);
    }

    /// Data for the host, within the credit the device gave.
    fn guest_data(&mut self, id: u64, payload: &[u8]) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if matches!(c.state, State::Closing(_)) {
            // Data in flight when the host went away: nobody can take it.
            return;
        }
        if c.state != State::Established || c.guest_no_send {
            self.count("bad_packets");
            return self.remove(id, true);
        }
        let len = payload.len() as u32;
        let buffered = c.rx_cnt.wrapping_sub(c.fwd_cnt);
        if u64::from(buffered) + u64::from(len) > u64::from(BUF_ALLOC) {
            self.count("credit_violations");
            return self.remove(id, true);
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(len);
        if c.to_host_off == c.to_host.len() {
            c.to_host.clear();
            c.to_host_off = 0;
        }
        c.to_host.extend_from_slice(payload);
        self.stats.add(&self.stats.bytes_from_guest, u64::from(len));
        self.flush(id);
    }

    /// The guest asked how much room the device has.
    fn credit_update(&mut self, id: u64) {
        let Some(c) = self.conns.get(&id) else {
            return;
        };
        if c.state != State::Established {
            return;
        }
        let u = self.hdr(c, OP_CREDIT_UPDATE);
        if let Some(c) = self.conns.get_mut(&id) {
            c.fwd_reported = u.fwd_cnt;
        }
        self.push_ctrl(u);
    }

    /// A guest REQUEST to host port `h.dst_port`: connect to `PATH_<port>`.
    fn guest_connect(&mut self, h: &Hdr) {
        if self.conns.len() >= MAX_CONNS {
            self.count("conns_rejected");
            self.push_ctrl(h.reply(OP_RST));
            return;
        }
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&p)) {
            Ok(s) => s,
            Err(_) => {
                log::debug!("vsock: guest connect to {p:?} refused");
                self.count("host_refused");
                self.push_ctrl(h.reply(OP_RST));
                return;
            }
        };
        let mut c = Conn::new(stream, State::Established, h.dst_port, h.src_port);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let resp = self.hdr(&c, OP_RESPONSE);
        self.insert(c);
        self.count("conns_guest");
        self.push_ctrl(resp);
    }

    /// Writes what the host stream takes of connection `id`'s pending guest data, and finishes a
    /// shutdown the guest asked for once that data is out.
    fn flush(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut failed = false;
        while c.to_host_left() > 0 {
            match send(c.stream.as_raw_fd(), &c.to_host[c.to_host_off..]) {
                Ok(n) => {
                    c.to_host_off += n;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // The host end is gone: the guest's data cannot be delivered.
            self.remove(id, true);
            return;
        }
        if c.to_host_left() == 0 {
            c.to_host.clear();
            c.to_host_off = 0;
            if c.guest_no_send && c.guest_no_recv {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                self.remove(id, true);
                return;
            }
            if c.guest_no_send {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        // Tell the guest about freed space before it runs dry.
        if c.state == State::Established && c.fwd_cnt.wrapping_sub(c.fwd_reported) >= BUF_ALLOC / 4
        {
            let u = pkt(self.guest_cid, c, OP_CREDIT_UPDATE);
            c.fwd_reported = u.fwd_cnt;
            self.push_ctrl(u);
        }
    }

    // ---- Host side ---------------------------------------------------------------------------

    /// Handles whatever the listener and host streams report (non-blocking).
    pub fn host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("vsock: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let id = ev.data();
            if id == LISTENER {
                self.accept();
                continue;
            }
            let set = ev.event_set();
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                if let Some(c) = self.conns.get_mut(&id) {
                    // Always reported, even without interest: leave the set, and read what is
                    // left without it.
                    c.host_hup = true;
                    if c.reg.take().is_some() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            c.stream.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                }
            }
            let line = matches!(
                self.conns.get(&id).map(|c| &c.state),
                Some(State::ConnectLine(_))
            );
            if line {
                self.read_connect_line(id);
            } else if set.contains(EventSet::OUT) || set.contains(EventSet::HANG_UP) {
                self.flush(id);
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.conns.len() >= MAX_CONNS || s.set_nonblocking(true).is_err() {
                        self.count("conns_rejected");
                        continue;
                    }
                    self.insert(Conn::new(s, State::ConnectLine(Vec::new()), 0, 0));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // E.g. EMFILE: the client stays queued and the listener stays readable, so
                    // without a pause the worker would spin on it. Retry at most 100 times a second.
                    crate::warn_limited!("vsock-accept", "vsock: accepting a host connection: {e}");
                    self.count("accept_errors");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    return;
                }
            }
        }
    }

    fn alloc_host_port(&mut self) -> u32 {
        loop {
            let p = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.values().any(|c| c.host_port == p) {
                return p;
            }
        }
    }

    /// Reads a host client's `CONNECT <port>\n`; on a full line sends REQUEST to the guest.
    fn read_connect_line(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let State::ConnectLine(buf) = &mut c.state else {
            return;
        };
        let mut chunk = [0u8; MAX_LINE];
        let want = MAX_LINE - buf.len();
        match c.stream.read(&mut chunk[..want]) {
            Ok(0) => {
                self.count("host_bad_connect");
                self.remove(id, false);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if !c.host_hup {
                    return;
                }
                self.count("host_bad_connect");
                self.remove(id, false);
                return;
            }
            Err(_) => {
                self.count("host_bad_connect");
                self.remove(id, false);
                return;
            }
        }
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() >= MAX_LINE {
                self.count("host_bad_connect");
                self.remove(id, false);
            }
            return;
        };
        let Some(port) = parse_connect(&buf[..nl]) else {
            let _ = send(c.stream.as_raw_fd(), b"ERROR bad CONNECT line\n");
            self.count("host_bad_connect");
            self.remove(id, false);
            return;
        };
        let rest = buf[nl + 1..].to_vec();
        let host_port = self.alloc_host_port();
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.state = State::LocalInit;
        c.host_port = host_port;
        c.guest_port = port;
        // Bytes the client sent after its line wait for the connection.
        c.stash = rest;
        let req = pkt(self.guest_cid, c, OP_REQUEST);
        self.push_ctrl(req);
    }

    /// Reads host data for connections the guest has credit for (only into empty stashes), and
    /// notices host streams that ended. Also expires connections whose close timed out.
    pub fn fill(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        let now = Instant::now();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if let State::Closing(since) = c.state {
                if now.duration_since(since) > CLOSE_TIMEOUT {
                    self.remove(id, true);
                }
                continue;
            }
            if c.host_hup && matches!(c.state, State::ConnectLine(_)) {
                self.read_connect_line(id);
                continue;
            }
            if c.host_hup && c.to_host_left() > 0 {
                // Nobody will read the guest's data.
                self.remove(id, true);
                continue;
            }
            if !c.wants_host_data() {
                continue;
            }
            let n = (c.peer_credit() as usize).min(STASH_MAX);
            c.stash.clear();
            c.stash.resize(n, 0);
            c.stash_off = 0;
            let r = c.stream.read(&mut c.stash);
            match r {
                Ok(0) => {
                    c.stash.clear();
                    c.host_eof = true;
                    if c.host_hup {
                        // Gone for good: full shutdown, then the guest's RST ends it.
                        let mut h = pkt(self.guest_cid, c, OP_SHUTDOWN);
                        h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                        c.state = State::Closing(now);
                        self.push_ctrl(h);
                    } else {
                        // Half close: the host sends no more (it may still read).
                        let mut h = pkt(self.guest_cid, c, OP_SHUTDOWN);
                        h.flags = SHUTDOWN_SEND;
                        self.push_ctrl(h);
                    }
                }
                Ok(k) => c.stash.truncate(k),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    c.stash.clear();
                }
                Err(_) => {
                    c.stash.clear();
                    self.remove(id, true);
                }
            }
        }
    }

    /// Whether [`Muxer::next_to_guest`] has something.
    pub fn has_to_guest(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state == State::Established && c.stash_left() > 0 && c.peer_credit() > 0)
    }

    /// The next packet for an rx buffer with room for `room` payload bytes: control packets
    /// first, then host data (round robin), never more than the guest's credit.
    pub fn next_to_guest(&mut self, room: usize) -> Option<(Hdr, Vec<u8>)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, Vec::new()));
        }
        let room = room.min(MAX_PKT_LEN as usize);
        let ids: Vec<u64> = self
            .conns
            .range(self.rr + 1..)
            .chain(self.conns.range(..=self.rr))
            .filter(|(_, c)| {
                c.state == State::Established && c.stash_left() > 0 && c.peer_credit() > 0
            })
            .map(|(id, _)| *id)
            .take(1)
            .collect();
        let id = *ids.first()?;
        self.rr = id;
        let c = self.conns.get_mut(&id)?;
        let n = c.stash_left().min(room).min(c.peer_credit() as usize);
        if n == 0 {
            return None;
        }
        let data = c.stash[c.stash_off..c.stash_off + n].to_vec();
        c.stash_off += n;
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        let mut h = pkt(self.guest_cid, c, OP_RW);
        h.len = n as u32;
        c.fwd_reported = h.fwd_cnt;
        self.stats.add(&self.stats.bytes_to_guest, n as u64);
        Some((h, data))
    }

    /// Sets each host stream's epoll interest: readable only when its data could go to the
    /// guest now (`rx_ready`: the rx queue had buffers), writable only with guest data pending.
    pub fn update_interest(&mut self, rx_ready: bool) {
        for (id, c) in self.conns.iter_mut() {
            if c.host_hup {
                continue;
            }
            let mut want = EventSet::empty();
            let reading = match c.state {
                State::ConnectLine(_) => true,
                _ => rx_ready && c.wants_host_data(),
            };
            if reading {
                want |= EventSet::IN;
            }
            if c.to_host_left() > 0 {
                want |= EventSet::OUT;
            }
            if c.reg == Some(want.bits()) {
                continue;
            }
            let op = if c.reg.is_some() {
                ControlOperation::Modify
            } else {
                ControlOperation::Add
            };
            match self
                .epoll
                .ctl(op, c.stream.as_raw_fd(), EpollEvent::new(want, *id))
            {
                Ok(()) => c.reg = Some(want.bits()),
                Err(e) => log::debug!("vsock: epoll_ctl: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::Ordering;

    const CID: u64 = 3;

    struct Fixture {
        dir: PathBuf,
        mux: Muxer,
        stats: Arc<DeviceStats>,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(name: &str) -> Fixture {
        let dir =
            std::env::temp_dir().join(format!("exitless-vsock-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let stats = Arc::new(DeviceStats::default());
        let mux = Muxer::new(CID, &path, l, stats.clone()).unwrap();
        Fixture { dir, mux, stats }
    }

    fn extra(s: &DeviceStats, k: &str) -> u64 {
        s.extra.lock().unwrap().get(k).copied().unwrap_or(0)
    }

    fn from_guest(op: u16, src_port: u32, dst_port: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: CID,
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

    fn send_guest(m: &mut Muxer, h: Hdr, payload: &[u8]) {
        m.guest_packet(&h, payload.len() as u64, payload);
    }

    /// Lets the host side run until `f` has packets or a second passes.
    fn pump(m: &mut Muxer) -> Vec<(Hdr, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            m.host_events();
            m.fill();
            while let Some(p) = m.next_to_guest(4096 - HDR_LEN) {
                out.push(p);
            }
            m.update_interest(true);
            if !out.is_empty() {
                return out;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        out
    }

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT +1"), None);
        assert_eq!(parse_connect(b"connect 1"), None);
        assert_eq!(parse_connect(b"CONNECT 1 2"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn host_initiated_connection_moves_data_both_ways_and_closes() {
        let mut f = fixture("host");
        let mut client = UnixStream::connect(f.dir.join("v.sock")).unwrap();
        client.write_all(b"CONNECT 1234\nearly").unwrap();
        let p = pump(&mut f.mux);
        assert_eq!(p.len(), 1);
        let req = p[0].0;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, CID, 1234)
        );
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        let hp = req.src_port;
        // Nothing flows before the guest answers.
        assert!(pump(&mut f.mux).is_empty());
        send_guest(&mut f.mux, from_guest(OP_RESPONSE, 1234, hp, 0), b"");
        let mut line = [0u8; 64];
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {hp}\n").as_bytes());
        // The bytes sent after the line arrive once established.
        let p = pump(&mut f.mux);
        assert_eq!(p[0].0.op, OP_RW);
        assert_eq!(p[0].1, b"early");
        client.write_all(b"hello\n").unwrap();
        let p = pump(&mut f.mux);
        assert_eq!(p[0].1, b"hello\n");
        send_guest(&mut f.mux, from_guest(OP_RW, 1234, hp, 6), b"HELLO\n");
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], b"HELLO\n");
        // The guest closes: the host reads EOF and the guest gets RST.
        let mut sd = from_guest(OP_SHUTDOWN, 1234, hp, 0);
        sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        send_guest(&mut f.mux, sd, b"");
        let p = pump(&mut f.mux);
        assert_eq!(p[0].0.op, OP_RST);
        assert_eq!(client.read(&mut line).unwrap(), 0);
        assert_eq!(f.mux.connections(), 0);
        assert_eq!(extra(&f.stats, "conns_host"), 1);
        assert_eq!(f.stats.bytes_to_guest.load(Ordering::Relaxed), 11);
        assert_eq!(f.stats.bytes_from_guest.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn guest_initiated_connection_and_host_disconnect() {
        let mut f = fixture("guest");
        let l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        send_guest(&mut f.mux, from_guest(OP_REQUEST, 1025, 5678, 0), b"");
        let p = pump(&mut f.mux);
        assert_eq!(p[0].0.op, OP_RESPONSE);
        assert_eq!((p[0].0.src_port, p[0].0.dst_port), (5678, 1025));
        let (mut s, _) = l.accept().unwrap();
        send_guest(&mut f.mux, from_guest(OP_RW, 1025, 5678, 4), b"ping");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").unwrap();
        drop(s);
        let mut got = Vec::new();
        let mut ops = Vec::new();
        for _ in 0..3 {
            for (h, d) in pump(&mut f.mux) {
                ops.push((h.op, h.flags));
                got.extend(d);
            }
            if ops.iter().any(|o| o.0 == OP_SHUTDOWN) {
                break;
            }
        }
        assert_eq!(got, b"pong");
        assert!(
            ops.contains(&(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND)),
            "{ops:?}"
        );
        send_guest(&mut f.mux, from_guest(OP_RST, 1025, 5678, 0), b"");
        assert_eq!(f.mux.connections(), 0);
        // Nothing listens on another port: RST.
        send_guest(&mut f.mux, from_guest(OP_REQUEST, 1026, 9999, 0), b"");
        let p = pump(&mut f.mux);
        assert_eq!(p[0].0.op, OP_RST);
        assert_eq!(extra(&f.stats, "conns_guest"), 1);
        assert_eq!(extra(&f.stats, "host_refused"), 1);
    }

    #[test]
    fn hostile_packets_are_dropped_or_reset() {
        let mut f = fixture("hostile");
        let _l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        // Spoofed source CID, wrong destination, length beyond the buffer: dropped silently.
        let mut h = from_guest(OP_REQUEST, 1, 5678, 0);
        h.src_cid = 7;
        send_guest(&mut f.mux, h, b"");
        let mut h = from_guest(OP_REQUEST, 1, 5678, 0);
        h.dst_cid = 1;
        send_guest(&mut f.mux, h, b"");
        f.mux
            .guest_packet(&from_guest(OP_RW, 1, 5678, 100), 10, b"");
        assert_eq!(extra(&f.stats, "dropped"), 3);
        assert!(pump(&mut f.mux).is_empty());
        // Unknown op, data for no connection, RESPONSE out of the blue: RST each.
        send_guest(&mut f.mux, from_guest(99, 1, 5678, 0), b"");
        send_guest(&mut f.mux, from_guest(OP_RW, 1, 5678, 3), b"abc");
        send_guest(&mut f.mux, from_guest(OP_RESPONSE, 1, 5678, 0), b"");
        let p = pump(&mut f.mux);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|(h, _)| h.op == OP_RST && h.dst_port == 1));
        // An unknown socket type.
        let mut t = from_guest(OP_REQUEST, 3, 5678, 0);
        t.ty = 2;
        send_guest(&mut f.mux, t, b"");
        assert!(extra(&f.stats, "bad_packets") >= 4);
        // A second REQUEST on a live connection resets it.
        send_guest(&mut f.mux, from_guest(OP_REQUEST, 4, 5678, 0), b"");
        send_guest(&mut f.mux, from_guest(OP_REQUEST, 4, 5678, 0), b"");
        let ops: Vec<u16> = pump(&mut f.mux).iter().map(|p| p.0.op).collect();
        assert!(ops.ends_with(&[OP_RESPONSE, OP_RST]), "{ops:?}");
    }

    #[test]
    fn credit_is_respected_both_ways() {
        let mut f = fixture("credit");
        let l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        let mut req = from_guest(OP_REQUEST, 7, 5678, 0);
        req.buf_alloc = 10;
        send_guest(&mut f.mux, req, b"");
        assert_eq!(pump(&mut f.mux)[0].0.op, OP_RESPONSE);
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&[1u8; 25]).unwrap();
        // Only 10 bytes of credit: one packet of 10, then nothing.
        let p = pump(&mut f.mux);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].1.len(), 10);
        assert!(pump(&mut f.mux).is_empty());
        // The guest consumed them: 10 more.
        let mut u = from_guest(OP_CREDIT_UPDATE, 7, 5678, 0);
        u.buf_alloc = 10;
        u.fwd_cnt = 10;
        send_guest(&mut f.mux, u, b"");
        let p = pump(&mut f.mux);
        assert_eq!(p.iter().map(|x| x.1.len()).sum::<usize>(), 10);
        // A credit request gets an update.
        let mut r = from_guest(OP_CREDIT_REQUEST, 7, 5678, 0);
        r.buf_alloc = 10;
        r.fwd_cnt = 10;
        send_guest(&mut f.mux, r, b"");
        let p = pump(&mut f.mux);
        assert_eq!(p[0].0.op, OP_CREDIT_UPDATE);
        assert_eq!(p[0].0.buf_alloc, BUF_ALLOC);
        // Guest → host beyond the device's credit while the host does not read: RST.
        drop(s);
        let mut req = from_guest(OP_REQUEST, 8, 5678, 0);
        req.buf_alloc = 4096;
        send_guest(&mut f.mux, req, b"");
        let (_s2, _) = l.accept().unwrap();
        let big = vec![0u8; MAX_PKT_LEN as usize];
        for _ in 0..64 {
            let mut h = from_guest(OP_RW, 8, 5678, MAX_PKT_LEN);
            h.buf_alloc = 4096;
            send_guest(&mut f.mux, h, &big);
            if extra(&f.stats, "credit_violations") > 0 {
                break;
            }
        }
        assert_eq!(extra(&f.stats, "credit_violations"), 1);
    }

    #[test]
    fn a_host_listener_that_does_not_accept_never_blocks_the_device() {
        let mut f = fixture("backlog");
        let l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        // SAFETY: shrinks the backlog of a listening socket we own.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 1) }, 0);
        let t = Instant::now();
        for port in 1..=8 {
            send_guest(&mut f.mux, from_guest(OP_REQUEST, port, 5678, 0), b"");
        }
        assert!(t.elapsed() < Duration::from_secs(2));
        let ops: Vec<u16> = pump(&mut f.mux).iter().map(|p| p.0.op).collect();
        assert_eq!(ops.len(), 8);
        assert!(
            ops.contains(&OP_RESPONSE) && ops.contains(&OP_RST),
            "{ops:?}"
        );
        assert!(extra(&f.stats, "host_refused") >= 1);
    }

    #[test]
    fn large_host_writes_are_split_to_fit_rx_buffers_and_keep_order() {
        let mut f = fixture("split");
        let l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        let mut req = from_guest(OP_REQUEST, 9, 5678, 0);
        req.buf_alloc = 1 << 20;
        send_guest(&mut f.mux, req, b"");
        assert_eq!(pump(&mut f.mux)[0].0.op, OP_RESPONSE);
        let (mut s, _) = l.accept().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        let mut got = Vec::new();
        for _ in 0..20 {
            for (h, d) in pump(&mut f.mux) {
                assert_eq!(h.op, OP_RW);
                assert!(d.len() <= 4096 - HDR_LEN && h.len as usize == d.len());
                got.extend(d);
            }
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
    }

    #[test]
    fn bad_connect_lines_close_the_client() {
        let mut f = fixture("line");
        let mut a = UnixStream::connect(f.dir.join("v.sock")).unwrap();
        a.write_all(b"HELLO\n").unwrap();
        let mut b = UnixStream::connect(f.dir.join("v.sock")).unwrap();
        b.write_all(&[b'x'; 40]).unwrap();
        let c = UnixStream::connect(f.dir.join("v.sock")).unwrap();
        drop(c);
        assert!(pump(&mut f.mux).is_empty());
        a.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut s = String::new();
        a.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("ERROR"), "{s}");
        assert_eq!(extra(&f.stats, "host_bad_connect"), 3);
        assert_eq!(f.mux.connections(), 0);
    }

    #[test]
    fn a_payload_that_disagrees_with_its_header_is_dropped() {
        let mut f = fixture("payload");
        let l = UnixListener::bind(f.dir.join("v.sock_5678")).unwrap();
        send_guest(&mut f.mux, from_guest(OP_REQUEST, 11, 5678, 0), b"");
        assert_eq!(pump(&mut f.mux)[0].0.op, OP_RESPONSE);
        let (mut s, _) = l.accept().unwrap();
        // The header claims 6 bytes, 3 came: nothing reaches the host, nothing is counted.
        f.mux
            .guest_packet(&from_guest(OP_RW, 11, 5678, 6), 6, b"abc");
        assert_eq!(extra(&f.stats, "dropped"), 1);
        assert_eq!(f.stats.bytes_from_guest.load(Ordering::Relaxed), 0);
        // The connection still works.
        send_guest(&mut f.mux, from_guest(OP_RW, 11, 5678, 2), b"ok");
        let mut b = [0u8; 2];
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ok");
    }
}
