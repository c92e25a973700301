//! The virtio-vsock packet header (virtio 1.x §5.10.6, `struct virtio_vsock_hdr`, 44 bytes,
//! little-endian) and its checks against what a guest may put there.
//!
//! Owns only parsing and encoding: nothing here trusts the guest's `len`; [`Hdr::check`] decides
//! whether a packet the guest sent may go on to the connection table.

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// Largest payload the device accepts from the guest or puts in one packet (Linux uses 64 KiB).
pub const MAX_PKT_LEN: u32 = 64 << 10;

pub const TYPE_STREAM: u16 = 1;

pub const OP_INVALID: u16 = 0;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub ty: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a packet from the guest is refused.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Bad {
    /// Source is not the guest's CID or destination not the host's: dropped.
    Cid,
    /// `len` exceeds the buffer that carried the packet or [`MAX_PKT_LEN`]: dropped.
    Len,
    /// Not a stream socket: answered with RST.
    Type,
    /// Unknown operation: answered with RST.
    Op,
}

impl Hdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> Hdr {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a packet the guest (CID `guest_cid`) sent in a buffer with `avail` bytes after the
    /// header.
    pub fn check(&self, guest_cid: u64, avail: u64) -> Result<(), Bad> {
        if self.src_cid != guest_cid || self.dst_cid != HOST_CID {
            return Err(Bad::Cid);
        }
        if self.len > MAX_PKT_LEN || u64::from(self.len) > avail {
            return Err(Bad::Len);
        }
        if self.ty != TYPE_STREAM {
            return Err(Bad::Type);
        }
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&self.op) {
            return Err(Bad::Op);
        }
        // Only RW carries data; a control packet with a payload is malformed.
        if self.op != OP_RW && self.len != 0 {
            return Err(Bad::Len);
        }
        Ok(())
    }

    /// The RST answering this packet (ports and CIDs swapped).
    pub fn reply(&self, op: u16) -> Hdr {
        Hdr {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ty: TYPE_STREAM,
            op,
            ..Hdr::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_pkt(op: u16, len: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1025,
            dst_port: 5678,
            len,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = guest_pkt(OP_RW, 5);
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Hdr::parse(&b), h);
    }

    #[test]
    fn hostile_headers_are_refused() {
        assert_eq!(guest_pkt(OP_RW, 5).check(3, 5), Ok(()));
        assert_eq!(guest_pkt(OP_REQUEST, 0).check(3, 0), Ok(()));
        // Spoofed source, wrong destination.
        assert_eq!(guest_pkt(OP_RW, 0).check(4, 0), Err(Bad::Cid));
        let mut h = guest_pkt(OP_RW, 0);
        h.dst_cid = 3;
        assert_eq!(h.check(3, 0), Err(Bad::Cid));
        h.dst_cid = u64::MAX;
        assert_eq!(h.check(3, 0), Err(Bad::Cid));
        // Lengths beyond the buffer or the cap, payload on a control packet.
        assert_eq!(guest_pkt(OP_RW, 6).check(3, 5), Err(Bad::Len));
        assert_eq!(guest_pkt(OP_RW, u32::MAX).check(3, u64::MAX), Err(Bad::Len));
        assert_eq!(
            guest_pkt(OP_RW, MAX_PKT_LEN + 1).check(3, u64::MAX),
            Err(Bad::Len)
        );
        assert_eq!(guest_pkt(OP_REQUEST, 1).check(3, 1), Err(Bad::Len));
        // Unknown ops and types.
        assert_eq!(guest_pkt(OP_INVALID, 0).check(3, 0), Err(Bad::Op));
        assert_eq!(guest_pkt(8, 0).check(3, 0), Err(Bad::Op));
        assert_eq!(guest_pkt(0xffff, 0).check(3, 0), Err(Bad::Op));
        let mut s = guest_pkt(OP_RW, 0);
        s.ty = 2;
        assert_eq!(s.check(3, 0), Err(Bad::Type));
        // The answer swaps the ends.
        let r = guest_pkt(OP_RW, 0).reply(OP_RST);
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (5678, 1025));
        assert_eq!(r.op, OP_RST);
    }
}
