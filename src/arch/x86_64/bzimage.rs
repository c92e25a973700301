//! Unpacking a bzImage in the VMM instead of in the guest.
//!
//! A bzImage is a small decompressor plus the compressed kernel ELF (the "payload", located by
//! `payload_offset`/`payload_length` in the setup header, boot protocol 2.08+). The decompressor
//! runs in guest kernel mode: on hardware that costs ~100 ms, but on a host that emulates guest
//! kernel code it costs 80–90 s for a Debian kernel (pvm-host.md). The VMM unpacks the payload
//! natively in a fraction of a second and boots the ELF directly (PVH when it has the note), so the
//! guest never runs its decompressor. Formats: gzip, xz (with the x86 BCJ filter the kernel uses),
//! LZ4 (the kernel's legacy frame format, which no crate parses: the framing is done here over
//! `lz4_flex`'s block decoder). Anything else returns `None` and the bzImage boots the usual way.

use std::io::Read;

/// Upper bound on an unpacked kernel (a guard against decompression bombs in a hostile image).
const MAX_UNPACKED: usize = 512 << 20;

/// Returns the uncompressed kernel ELF inside `image`, when it can.
pub fn unpack_payload(image: &[u8]) -> Option<Vec<u8>> {
    if image.len() < 0x270 || &image[0x202..0x206] != b"HdrS" {
        return None;
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x208 {
        return None;
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let offset = u32::from_le_bytes(image[0x248..0x24c].try_into().ok()?) as usize;
    let length = u32::from_le_bytes(image[0x24c..0x250].try_into().ok()?) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    let payload = image.get(start..start.checked_add(length)?)?;
    let elf = decompress(payload)?;
    (elf.len() > 4 && &elf[..4] == b"\x7fELF").then_some(elf)
}

fn decompress(p: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if p.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(p)
            .take(MAX_UNPACKED as u64)
            .read_to_end(&mut out)
            .ok()?;
    } else if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        out = xz_first_stream(p)?;
    } else if p.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        out = lz4_legacy(&p[4..])?;
    } else {
        return None;
    }
    Some(out)
}

/// Decodes the first xz stream of `p`; the kernel appends its size after the stream, which a
/// reader-based decoder would take for a corrupt second stream.
fn xz_first_stream(p: &[u8]) -> Option<Vec<u8>> {
    let mut stream = xz2::stream::Stream::new_stream_decoder(u64::MAX, 0).ok()?;
    let mut out = Vec::with_capacity(p.len() * 4);
    loop {
        if out.capacity() - out.len() < (1 << 20) {
            out.reserve(out.capacity().max(1 << 20));
        }
        let consumed = stream.total_in() as usize;
        match stream.process_vec(&p[consumed..], &mut out, xz2::stream::Action::Run) {
            Ok(xz2::stream::Status::StreamEnd) => return Some(out),
            Ok(_) if out.len() > MAX_UNPACKED => return None,
            Ok(_) if stream.total_in() as usize == consumed && out.len() < out.capacity() => {
                return None; // no progress: truncated input
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// LZ4 legacy frames: repeated (u32 LE compressed size, block), each block ≤ 8 MiB unpacked. The
/// kernel appends the uncompressed size as a trailing u32, which reads as a short "block".
fn lz4_legacy(mut p: &[u8]) -> Option<Vec<u8>> {
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    while p.len() >= 4 {
        let n = u32::from_le_bytes(p[..4].try_into().ok()?) as usize;
        if n == 0x184c_2102 {
            // A new legacy frame's magic.
            p = &p[4..];
            continue;
        }
        if n > p.len() - 4 || n > lz4_flex::block::get_maximum_output_size(BLOCK) {
            break; // trailing size field or padding
        }
        let block = &p[4..4 + n];
        let mut buf = vec![0u8; BLOCK];
        let k = lz4_flex::block::decompress_into(block, &mut buf).ok()?;
        out.extend_from_slice(&buf[..k]);
        if out.len() > MAX_UNPACKED {
            return None;
        }
        p = &p[4 + n..];
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A fake bzImage: setup header fields that matter plus `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 4usize;
        let mut img = vec![0u8; (setup_sects + 1) * 512];
        img[0x1f1] = setup_sects as u8;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 0x100]);
        img.extend_from_slice(payload);
        img
    }

    fn fake_elf() -> Vec<u8> {
        let mut e = b"\x7fELF".to_vec();
        e.extend((0..100_000u32).map(|i| (i % 251) as u8));
        e
    }

    #[test]
    fn unpacks_gzip_xz_and_lz4_payloads() {
        let elf = fake_elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&elf).unwrap();
        assert_eq!(
            unpack_payload(&fake_bzimage(&gz.finish().unwrap())).unwrap(),
            elf
        );

        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&elf).unwrap();
        assert_eq!(
            unpack_payload(&fake_bzimage(&xz.finish().unwrap())).unwrap(),
            elf
        );

        let block = lz4_flex::block::compress(&elf);
        let mut lz = vec![0x02, 0x21, 0x4c, 0x18];
        lz.extend_from_slice(&(block.len() as u32).to_le_bytes());
        lz.extend_from_slice(&block);
        lz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        assert_eq!(unpack_payload(&fake_bzimage(&lz)).unwrap(), elf);
    }

    #[test]
    fn refuses_what_it_cannot_unpack() {
        assert!(unpack_payload(b"short").is_none());
        assert!(unpack_payload(&fake_bzimage(b"BZh91AY&SY garbage")).is_none());
        // Corrupt streams and payloads that are not ELF.
        assert!(unpack_payload(&fake_bzimage(&[0x1f, 0x8b, 1, 2, 3])).is_none());
        assert!(unpack_payload(&fake_bzimage(&[0xfd, b'7', b'z', b'X', b'Z', 0, 9, 9])).is_none());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"not an elf").unwrap();
        assert!(unpack_payload(&fake_bzimage(&gz.finish().unwrap())).is_none());
        // A payload length pointing past the end of the file.
        let mut img = fake_bzimage(&[0x1f, 0x8b]);
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_payload(&img).is_none());
    }

    #[test]
    fn unpacks_real_kernels_when_present() {
        for p in [
            "../shared/guest/test-kernel/bzImage",
            "images/debian/vmlinuz",
        ] {
            let Ok(img) = std::fs::read(p) else {
                eprintln!("skipped {p}: not present");
                continue;
            };
            let elf = unpack_payload(&img).unwrap_or_else(|| panic!("{p} did not unpack"));
            assert!(elf.len() > img.len(), "{p}");
        }
    }
}
