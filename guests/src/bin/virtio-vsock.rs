//! virtio-vsock through the kit's own driver (stream sockets, polling the used rings):
//! 1. listens on guest port 1234: accepts the host's connection (REQUEST → RESPONSE), reads a line,
//!    answers it uppercased, shuts down and waits for the device's RST;
//! 2. connects to host port 5678, sends `hello from the guest\n`, expects
//!    `host saw: hello from the guest\n` back, shuts down and waits for the RST;
//! 3. sends a packet with a spoofed source CID (must be dropped), one with an unknown op and data
//!    for no connection (each must be answered with RST).
//!
//! Prints `kit: vsock host->guest ...`, `kit: vsock guest->host ...`, `kit: vsock hostile ...`,
//! then PASS. With `wait-reset` on the command line it only waits for a transport reset (see
//! [`wait_reset`]).
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r16, r32, w16, w32, w64, Queue, DESC_F_WRITE};

kit::entry!(main);

const NAME: &str = "virtio-vsock";
const RXQ: u64 = 0x40_0000;
const TXQ: u64 = 0x40_4000;
const EVQ: u64 = 0x40_8000;
const RXBUF: u64 = 0x50_0000;
const RXBUF_SIZE: u32 = 0x1000;
const RXBUFS: u16 = 8;
const TXBUF: u64 = 0x58_0000;
/// Polls of a used ring before giving up (5-15 us each where CPL0 is emulated: 10-20 s).
const SPINS: u64 = 1_500_000;
const HDR: u64 = 44;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;

const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5678;
const LOCAL_PORT: u32 = 1025;
const HOSTILE_PORT: u32 = 2000;
const MESSAGE: &[u8] = b"hello from the guest\n";
const EXPECTED: &[u8] = b"host saw: hello from the guest\n";
const BUF_ALLOC: u32 = 64 << 10;

#[derive(Clone, Copy, Debug)]
struct Pkt {
    src_cid: u32,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    data: u64,
}

struct Vsock {
    cid: u64,
    rx: Queue,
    tx: Queue,
    /// Payload bytes received on the current connection (our fwd_cnt).
    fwd: u32,
}

impl Vsock {
    fn send(&mut self, op: u16, src_port: u32, dst_port: u32, flags: u32, payload: &[u8]) {
        self.send_as(self.cid, op, src_port, dst_port, flags, payload)
    }

    /// Like `send` with any source CID (hostile packets).
    fn send_as(
        &mut self,
        src_cid: u64,
        op: u16,
        src_port: u32,
        dst_port: u32,
        flags: u32,
        payload: &[u8],
    ) {
        w64(TXBUF, src_cid);
        w64(TXBUF + 8, 2);
        w32(TXBUF + 16, src_port);
        w32(TXBUF + 20, dst_port);
        w32(TXBUF + 24, payload.len() as u32);
        w16(TXBUF + 28, 1);
        w16(TXBUF + 30, op);
        w32(TXBUF + 32, flags);
        w32(TXBUF + 36, BUF_ALLOC);
        w32(TXBUF + 40, self.fwd);
        // SAFETY: TXBUF is identity-mapped guest RAM owned by this driver.
        let dst =
            unsafe { core::slice::from_raw_parts_mut((TXBUF + HDR) as *mut u8, payload.len()) };
        dst.copy_from_slice(payload);
        if self
            .tx
            .submit(&[(TXBUF, HDR as u32 + payload.len() as u32, false)], SPINS)
            .is_none()
        {
            kit::fail(NAME, format_args!("tx op {op} not completed"));
        }
    }

    /// The next packet from the device; its rx buffer goes back with [`Vsock::recycle`].
    fn recv(&mut self, what: &str) -> (u16, Pkt) {
        let Some((id, len)) = self.rx.wait(SPINS) else {
            kit::fail(NAME, format_args!("timed out waiting for {what}"));
        };
        let id = id as u16;
        if id >= RXBUFS || (len as u64) < HDR {
            kit::fail(NAME, format_args!("bad rx completion id={id} len={len}"));
        }
        let b = RXBUF + id as u64 * RXBUF_SIZE as u64;
        let p = Pkt {
            src_cid: r32(b),
            src_port: r32(b + 16),
            dst_port: r32(b + 20),
            len: r32(b + 24),
            op: r16(b + 30),
            data: b + HDR,
        };
        if r32(b + 8) as u64 != self.cid || p.src_cid != 2 || p.len as u64 > len as u64 - HDR {
            kit::fail(NAME, format_args!("bad packet from the device: {p:?}"));
        }
        (id, p)
    }

    fn recycle(&mut self, id: u16) {
        self.rx.publish(id);
    }

    /// Reads the connection's bytes until a newline into `line`; returns its length.
    fn read_line(&mut self, local: u32, peer: u32, line: &mut [u8]) -> usize {
        let mut n = 0;
        loop {
            let (id, p) = self.recv("data");
            let mine = p.dst_port == local && p.src_port == peer;
            if mine && p.op == OP_RW {
                // SAFETY: the payload lies in our rx buffer (length checked in `recv`).
                let d = unsafe { core::slice::from_raw_parts(p.data as *const u8, p.len as usize) };
                if n + d.len() > line.len() {
                    kit::fail(NAME, format_args!("line too long"));
                }
                line[n..n + d.len()].copy_from_slice(d);
                n += d.len();
                self.fwd = self.fwd.wrapping_add(p.len);
                self.recycle(id);
                if line[..n].contains(&b'\n') {
                    return n;
                }
            } else if mine && (p.op == OP_RST || p.op == OP_SHUTDOWN) {
                kit::fail(
                    NAME,
                    format_args!("connection ended (op {}) after {n} bytes", p.op),
                );
            } else {
                self.recycle(id);
            }
        }
    }

    /// Sends SHUTDOWN(both) and waits for the device's RST (other packets are ignored).
    fn close(&mut self, local: u32, peer: u32) {
        self.send(OP_SHUTDOWN, local, peer, 3, &[]);
        loop {
            let (id, p) = self.recv("RST after shutdown");
            self.recycle(id);
            if p.dst_port == local && p.src_port == peer && p.op == OP_RST {
                return;
            }
        }
    }
}

/// `wait-reset` on the command line: gives the device one event buffer and waits (printing
/// `kit: virtio-vsock waiting N` every 100 ms) for VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, which a
/// device restored from a snapshot sends; then reads the CID again, prints
/// `kit: virtio-vsock transport reset cid=N` and passes. Fails after 120 s.
fn wait_reset(mut ev: Queue, config: u64) -> ! {
    const EVBUF: u64 = 0x5f_0000;
    w32(EVBUF, 0xffff_ffff);
    ev.write_desc(0, EVBUF, 4, DESC_F_WRITE, 0);
    ev.publish(0);
    for n in 0..1200u32 {
        if let Some((id, len)) = ev.wait(1) {
            if (id, len, r32(EVBUF)) != (0, 4, 0) {
                kit::fail(
                    NAME,
                    format_args!("event id={id} len={len} value={:#x}", r32(EVBUF)),
                );
            }
            let cid = r32(config) as u64 | ((r32(config + 4) as u64) << 32);
            println!("kit: virtio-vsock transport reset cid={cid}");
            kit::pass(NAME);
            kit::poweroff()
        }
        println!("kit: virtio-vsock waiting {n}");
        kit::lapic::delay_ns(100_000_000);
    }
    kit::fail(NAME, format_args!("no transport reset in 120 s"));
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 19) else {
        kit::fail(
            NAME,
            format_args!("no virtio-vsock device on PCI ({access:?})"),
        );
    };
    if dev.negotiate(0).is_none() {
        kit::fail(NAME, format_args!("device refused the features"));
    }
    virtio::zero(RXQ, 0x3000);
    virtio::zero(TXQ, 0x3000);
    virtio::zero(EVQ, 0x3000);
    let mut rx = dev.setup_queue(0, 0, RXQ);
    let tx = dev.setup_queue(1, 0, TXQ);
    let ev = dev.setup_queue(2, 0, EVQ);
    dev.driver_ok();
    let cid = r32(dev.config) as u64 | ((r32(dev.config + 4) as u64) << 32);
    println!("kit: virtio-vsock cid={cid} rx queue={}", rx.size);
    if boot.cmdline.split_whitespace().any(|w| w == "wait-reset") {
        wait_reset(ev, dev.config);
    }
    for i in 0..RXBUFS {
        rx.write_desc(
            i,
            RXBUF + i as u64 * RXBUF_SIZE as u64,
            RXBUF_SIZE,
            DESC_F_WRITE,
            0,
        );
        rx.publish(i);
    }
    let mut v = Vsock {
        cid,
        rx,
        tx,
        fwd: 0,
    };

    // 1. The host connects to our port 1234.
    let peer = loop {
        let (id, p) = v.recv("the host's REQUEST");
        v.recycle(id);
        if p.op == OP_REQUEST && p.dst_port == GUEST_PORT {
            break p.src_port;
        }
        if p.op == OP_REQUEST {
            v.send(OP_RST, p.dst_port, p.src_port, 0, &[]);
        }
    };
    v.send(OP_RESPONSE, GUEST_PORT, peer, 0, &[]);
    let mut line = [0u8; 128];
    let n = v.read_line(GUEST_PORT, peer, &mut line);
    let mut upper = line;
    upper[..n].make_ascii_uppercase();
    v.send(OP_RW, GUEST_PORT, peer, 0, &upper[..n]);
    v.close(GUEST_PORT, peer);
    println!(
        "kit: vsock host->guest port {GUEST_PORT} from host port {peer}: got {:?} replied {:?}",
        kit::arch::text(&line[..n]),
        kit::arch::text(&upper[..n])
    );

    // 2. We connect to host port 5678.
    v.fwd = 0;
    v.send(OP_REQUEST, LOCAL_PORT, HOST_PORT, 0, &[]);
    loop {
        let (id, p) = v.recv("RESPONSE from host port 5678");
        v.recycle(id);
        if p.dst_port != LOCAL_PORT || p.src_port != HOST_PORT {
            continue;
        }
        match p.op {
            OP_RESPONSE => break,
            OP_CREDIT_UPDATE => continue,
            op => kit::fail(
                NAME,
                format_args!("connect to host port {HOST_PORT}: op {op}"),
            ),
        }
    }
    v.send(OP_RW, LOCAL_PORT, HOST_PORT, 0, MESSAGE);
    let mut reply = [0u8; 128];
    let n = v.read_line(LOCAL_PORT, HOST_PORT, &mut reply);
    if &reply[..n] != EXPECTED {
        kit::fail(
            NAME,
            format_args!(
                "host port {HOST_PORT} replied {:?}",
                kit::arch::text(&reply[..n])
            ),
        );
    }
    v.close(LOCAL_PORT, HOST_PORT);
    println!(
        "kit: vsock guest->host port {HOST_PORT}: sent {:?} got {:?}",
        kit::arch::text(MESSAGE),
        kit::arch::text(&reply[..n])
    );
    // 3. Hostile packets: a spoofed source CID (dropped), an unknown op and data for no
    //    connection (each answered with RST).
    v.send_as(cid + 1, OP_REQUEST, HOSTILE_PORT, HOST_PORT, 0, &[]);
    v.send(99, HOSTILE_PORT, 4444, 0, &[]);
    v.send(OP_RW, HOSTILE_PORT, 4444, 0, b"nobody");
    let mut rsts = 0;
    while rsts < 2 {
        let (id, p) = v.recv("RST for the hostile packets");
        v.recycle(id);
        match (p.dst_port, p.op) {
            (HOSTILE_PORT, OP_RST) => rsts += 1,
            (HOSTILE_PORT, op) => kit::fail(NAME, format_args!("hostile packet answered op {op}")),
            _ => {}
        }
    }
    println!("kit: vsock hostile packets: 2 RST, spoofed CID dropped");
    kit::pass(NAME);
    kit::poweroff()
}
