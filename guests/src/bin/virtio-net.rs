//! virtio-net through the kit's own driver: negotiates MAC, STATUS and mergeable receive buffers
//! (no offloads), fills the receive ring, sends an ARP request for the host's address and an ICMP
//! echo request to it, and checks the ARP reply and the echo reply (addresses, checksums, the
//! echoed payload, `num_buffers`). It answers ARP requests for its own address meanwhile, and
//! ignores other traffic (the host's IPv6 chatter). Prints
//! `kit: virtio-net mac=... host-mac=... ping-reply ...` and `kit: PASS virtio-net`.
//!
//! Addresses: the guest is 192.168.127.2, the host 192.168.127.1 (`guest=A.B.C.D` and
//! `host=A.B.C.D` on the command line change them). `pings=N` (default 1) pings N times,
//! `delay_us=D` apart, printing `kit: virtio-net ping P` every 10th.
#![no_std]
#![no_main]

use kit::println;
use kit::virtio::{self, r16, r32, Queue, DESC_F_WRITE};

kit::entry!(main);

const NAME: &str = "virtio-net";
const RXQ: u64 = 0x40_0000;
const TXQ: u64 = 0x40_4000;
const RXBUF: u64 = 0x50_0000;
const RXBUF_LEN: u64 = 2048;
const TXBUF: u64 = 0x58_0000;
const HDR: usize = 12;
const SPINS: u64 = 5_000_000;
const WAIT_SPINS: u64 = 1_500_000;

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;

const PAYLOAD: &[u8; 32] = b"exitless virtio-net kit ping 123";
const ICMP_ID: u16 = 0x6b69;
const ICMP_SEQ: u16 = 1;

fn buf(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: the kit's fixed buffers (identity-mapped RAM this guest owns, above its image);
    // each is used through one slice at a time.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum of `b` (ones' complement of the ones' complement sum).
fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < b.len() {
        sum += u32::from(be16(b, i));
        i += 2;
    }
    if i < b.len() {
        sum += u32::from(b[i]) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn parse_ip(s: &str) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

struct Net {
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    ip: [u8; 4],
    host_ip: [u8; 4],
    sent: u32,
    received: u32,
}

enum Got {
    ArpReply([u8; 6]),
    EchoReply(usize),
    Other,
}

impl Net {
    /// Sends the Ethernet frame `build` writes (after the 12-byte zero header) and waits for the
    /// device to take it.
    fn send(&mut self, build: impl FnOnce(&mut [u8]) -> usize) {
        let b = buf(TXBUF, 2048);
        b[..HDR].fill(0);
        let len = build(&mut b[HDR..]);
        match self.tx.submit(&[(TXBUF, (HDR + len) as u32, false)], SPINS) {
            Some(_) => self.sent += 1,
            None => kit::fail(
                NAME,
                format_args!("transmit of {len} bytes never completed"),
            ),
        }
    }

    fn arp(&mut self, oper: u16, tha: [u8; 6], tpa: [u8; 4]) {
        let (mac, ip) = (self.mac, self.ip);
        let dst = if oper == 1 { [0xff; 6] } else { tha };
        self.send(|f| {
            let me = Net::ethernet_of(mac);
            me(f, dst, 0x0806);
            let a = &mut f[14..42];
            put16(a, 0, 1);
            put16(a, 2, 0x0800);
            a[4] = 6;
            a[5] = 4;
            put16(a, 6, oper);
            a[8..14].copy_from_slice(&mac);
            a[14..18].copy_from_slice(&ip);
            a[18..24].copy_from_slice(if oper == 1 { &[0; 6] } else { &tha });
            a[24..28].copy_from_slice(&tpa);
            60
        });
    }

    fn ethernet_of(mac: [u8; 6]) -> impl Fn(&mut [u8], [u8; 6], u16) {
        move |f, dst, ty| {
            f[0..6].copy_from_slice(&dst);
            f[6..12].copy_from_slice(&mac);
            put16(f, 12, ty);
        }
    }

    fn ping(&mut self, host_mac: [u8; 6]) {
        let (ip, host_ip) = (self.ip, self.host_ip);
        let eth = Net::ethernet_of(self.mac);
        self.send(|f| {
            eth(f, host_mac, 0x0800);
            let total = 20 + 8 + PAYLOAD.len();
            let h = &mut f[14..14 + total];
            h[0] = 0x45;
            h[1] = 0;
            put16(h, 2, total as u16);
            put16(h, 4, 0x1234);
            put16(h, 6, 0x4000);
            h[8] = 64;
            h[9] = 1;
            put16(h, 10, 0);
            h[12..16].copy_from_slice(&ip);
            h[16..20].copy_from_slice(&host_ip);
            let c = checksum(&h[..20]);
            put16(h, 10, c);
            let i = &mut h[20..];
            i[0] = 8;
            i[1] = 0;
            put16(i, 2, 0);
            put16(i, 4, ICMP_ID);
            put16(i, 6, ICMP_SEQ);
            i[8..].copy_from_slice(PAYLOAD);
            let c = checksum(i);
            put16(i, 2, c);
            14 + total
        });
    }

    /// Waits for one received frame, looks at it, and gives its buffer back.
    /// Pings the host (up to three tries); the reply's length.
    fn echo(&mut self, host_mac: [u8; 6]) -> Option<usize> {
        for _ in 0..3 {
            self.ping(host_mac);
            while let Some(g) = self.receive() {
                if let Got::EchoReply(n) = g {
                    return Some(n);
                }
            }
        }
        None
    }

    fn receive(&mut self) -> Option<Got> {
        let (id, len) = self.rx.wait(WAIT_SPINS)?;
        self.received += 1;
        if id >= u32::from(self.rx.size) || u64::from(len) > RXBUF_LEN || (len as usize) < HDR {
            kit::fail(
                NAME,
                format_args!("bad receive completion id={id} len={len}"),
            );
        }
        let b = buf(RXBUF + u64::from(id) * RXBUF_LEN, len as usize);
        let nbuf = u16::from_le_bytes([b[10], b[11]]);
        if nbuf != 1 {
            kit::fail(
                NAME,
                format_args!("num_buffers {nbuf} for a {len}-byte frame"),
            );
        }
        let got = self.look(&b[HDR..]);
        self.rx.publish(id as u16);
        Some(got)
    }

    fn look(&mut self, f: &[u8]) -> Got {
        if f.len() < 14 {
            return Got::Other;
        }
        let ty = be16(f, 12);
        let p = &f[14..];
        if ty == 0x0806 && p.len() >= 28 && be16(p, 0) == 1 && be16(p, 2) == 0x0800 {
            let mut sha = [0u8; 6];
            sha.copy_from_slice(&p[8..14]);
            let spa = &p[14..18];
            let tpa = &p[24..28];
            match be16(p, 6) {
                2 if spa == self.host_ip && tpa == self.ip && p[18..24] == self.mac => {
                    return Got::ArpReply(sha)
                }
                1 if tpa == self.ip => {
                    let mut spa4 = [0u8; 4];
                    spa4.copy_from_slice(spa);
                    println!("kit: virtio-net answering an ARP request from {}", Mac(sha));
                    self.arp(2, sha, spa4);
                }
                _ => {}
            }
            return Got::Other;
        }
        if ty != 0x0800 || f[0..6] != self.mac || p.len() < 20 || p[0] >> 4 != 4 {
            return Got::Other;
        }
        let ihl = usize::from(p[0] & 15) * 4;
        let total = usize::from(be16(p, 2));
        if ihl < 20 || total > p.len() || total < ihl + 8 || p[9] != 1 {
            return Got::Other;
        }
        if p[12..16] != self.host_ip || p[16..20] != self.ip {
            return Got::Other;
        }
        if checksum(&p[..ihl]) != 0 {
            kit::fail(NAME, format_args!("echo reply with a bad IP checksum"));
        }
        let i = &p[ihl..total];
        if i[0] != 0 || be16(i, 4) != ICMP_ID || be16(i, 6) != ICMP_SEQ {
            return Got::Other;
        }
        if checksum(i) != 0 {
            kit::fail(NAME, format_args!("echo reply with a bad ICMP checksum"));
        }
        if &i[8..] != PAYLOAD {
            kit::fail(NAME, format_args!("echo reply payload differs"));
        }
        Got::EchoReply(f.len())
    }
}

fn main(boot: &'static kit::BootInfo) -> ! {
    let mut ip = [192, 168, 127, 2];
    let mut host_ip = [192, 168, 127, 1];
    let (mut pings, mut delay_us) = (1u64, 0u64);
    for w in boot.cmdline.split_whitespace() {
        if let Some(v) = w.strip_prefix("guest=").and_then(parse_ip) {
            ip = v;
        } else if let Some(v) = w.strip_prefix("host=").and_then(parse_ip) {
            host_ip = v;
        } else if let Some(v) = w.strip_prefix("pings=").and_then(|v| v.parse().ok()) {
            pings = v;
        } else if let Some(v) = w.strip_prefix("delay_us=").and_then(|v| v.parse().ok()) {
            delay_us = v;
        }
    }
    let access = kit::pci::access(boot.rsdp_hint);
    let Some(dev) = virtio::find(access, 1) else {
        kit::fail(
            NAME,
            format_args!("no virtio-net device on PCI ({access:?})"),
        );
    };
    let Some(features) = dev.negotiate(F_MAC | F_STATUS | F_MRG_RXBUF) else {
        kit::fail(NAME, format_args!("device refused the features"));
    };
    if features & F_MAC == 0 {
        kit::fail(NAME, format_args!("no VIRTIO_NET_F_MAC"));
    }
    let lo = r32(dev.config).to_le_bytes();
    let hi = r16(dev.config + 4).to_le_bytes();
    let mac = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];
    if features & F_STATUS != 0 && r16(dev.config + 6) & 1 == 0 {
        kit::fail(NAME, format_args!("link is down"));
    }
    virtio::zero(RXQ, 0x3000);
    virtio::zero(TXQ, 0x3000);
    let rx = dev.setup_queue(0, 0, RXQ);
    let tx = dev.setup_queue(1, 0, TXQ);
    dev.driver_ok();
    let mut net = Net {
        rx,
        tx,
        mac,
        ip,
        host_ip,
        sent: 0,
        received: 0,
    };
    for i in 0..net.rx.size {
        net.rx.write_desc(
            i,
            RXBUF + u64::from(i) * RXBUF_LEN,
            RXBUF_LEN as u32,
            DESC_F_WRITE,
            0,
        );
        net.rx.publish(i);
    }
    println!(
        "kit: virtio-net at 00:{:02x}.0 mac={} features={features:#x} queues={}/{}",
        dev.func.dev,
        Mac(mac),
        net.rx.size,
        net.tx.size
    );

    let mut host_mac = None;
    'arp: for _ in 0..3 {
        net.arp(1, [0; 6], host_ip);
        while let Some(g) = net.receive() {
            if let Got::ArpReply(m) = g {
                host_mac = Some(m);
                break 'arp;
            }
        }
    }
    let Some(host_mac) = host_mac else {
        kit::fail(
            NAME,
            format_args!(
                "no ARP reply from the host ({} frames received)",
                net.received
            ),
        );
    };
    let Some(n) = net.echo(host_mac) else {
        kit::fail(
            NAME,
            format_args!(
                "no echo reply from the host ({} frames received)",
                net.received
            ),
        );
    };
    // More pings (`pings=N`, `delay_us=D` apart): a guest that keeps using its network, for a
    // snapshot taken meanwhile.
    for p in 2..=pings {
        if net.echo(host_mac).is_none() {
            kit::fail(NAME, format_args!("no echo reply to ping {p}"));
        }
        if p % 10 == 0 {
            println!("kit: virtio-net ping {p}");
        }
        kit::lapic::delay_ns(delay_us * 1000);
    }
    println!(
        "kit: virtio-net mac={} host-mac={} arp-reply ok ping-reply bytes={n} sent={} received={}",
        Mac(mac),
        Mac(host_mac),
        net.sent,
        net.received
    );
    kit::pass(NAME);
    kit::poweroff()
}
