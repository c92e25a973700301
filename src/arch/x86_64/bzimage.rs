//! Unpacking a bzImage in the VMM instead of in the guest.
//!
//! A bzImage is a small decompressor plus the compressed kernel ELF (the "payload", located by
//! `payload_offset`/`payload_length` in the setup header, boot protocol 2.08+). The decompressor
//! runs in guest kernel mode: on hardware that costs ~100 ms, but on a host that emulates guest
//! kernel code it costs 80–90 s for a Debian kernel (pvm-host.md). The VMM unpacks the payload
//! natively in a fraction of a second and boots the ELF directly (PVH when it has the note), so the
//! guest never runs its decompressor.
//!
//! The decoders write into an [`Output`], not a buffer of their own: the boot code's is
//! `elf_stream::ElfSink`, which puts the kernel's segments straight into guest memory as they
//! unpack (no 53 MB buffer to fault in and copy again); [`VecOutput`] collects the whole file.
//!
//! Formats: the seven the kernel can compress itself with (`CONFIG_KERNEL_*`), told apart by the
//! magic numbers its own decompressors accept (lib/decompress.c):
//! - gzip (`flate2`); bzip2 (`bzip2`, over the pure-Rust `libbz2-rs-sys`); lzma, the legacy
//!   `.lzma` format of `lzma -9`, its header's uncompressed size unknown (all ones, and the stream
//!   ends with a marker: what the kernel build makes) or given (`xz2`, liblzma's "alone" decoder);
//!   xz with the x86 BCJ filter the kernel uses (`xz2`); zstd (`zstd`, decoded in a single pass
//!   into one window as large as the whole output, as the kernel's own decompressor does, so no
//!   window buffer is allocated whatever a frame header asks for; `ElfSink` copies out of it).
//! - LZO and LZ4 come in containers that no well-kept crate parses, so their framing is done here,
//!   over crates' block decoders. LZO is the `lzop` file format (`lzop -9`; read as linux
//!   lib/decompress_unlzo.c does): a header, then blocks of (u32 BE unpacked size ≤ 256 KiB, u32 BE
//!   packed size, the checksums the header's flags name, then LZO1X data, or the block as is when
//!   it did not shrink), ended by an unpacked size of 0; `lzo` decodes the LZO1X data, and the
//!   unpacked data's checksums (Adler-32, CRC-32) are verified. LZ4 is the legacy frame
//!   (`lz4 -l`): a magic, then blocks of (u32 LE packed size, data), each ≤ 8 MiB unpacked;
//!   `lz4_flex` decodes the blocks.
//!
//! The kernel build appends the unpacked size as a u32 LE to every payload (`size_append`; gzip's
//! own trailer ends with the same field), and the kernel's boot code relies on it (`z_output_len`).
//! Here it is the output's size: every decoder but gzip's sees only the bytes before it, no decoder
//! is given room past it (an `Output` refuses a window past the size it was told), and the
//! unpacked length must equal it. A size over `MAX_UNPACKED` (a guard against decompression bombs;
//! what an output allocates or writes is bounded by the size), a corrupt or truncated stream, or
//! one that yields more or fewer bytes than its size is refused, and the bzImage then boots the
//! usual way. Neither the legacy LZ4 frame nor `.lzma` has a checksum: corruption that leaves
//! their streams well formed goes unnoticed, as it would by the kernel.

use std::io::Read;

/// Upper bound on an unpacked kernel (a guard against decompression bombs in a hostile image).
const MAX_UNPACKED: usize = 512 << 20;

/// Most memory liblzma may take for an xz or lzma stream, its dictionary above all (the kernel
/// uses 32 MiB for xz, 64 MiB with `lzma -9`): a header asking for more is refused, not allocated.
const MAX_LZMA_MEMORY: u64 = 256 << 20;

/// Where a decoder puts the bytes it unpacks, in order. The decoder asks for a window, decodes
/// into it, then commits how many of the window's first bytes are output; the next window
/// continues there. An output is told its size up front and refuses a window past it, so a
/// decoder never gets room for more than the payload's size. `None` is a refusal: the decoder
/// gives up.
pub trait Output {
    /// Room for the next bytes of output, `min..=max` bytes long (`1 <= min <= max`, `max` within
    /// the output's size); a decoder may write anywhere in it.
    fn window(&mut self, min: usize, max: usize) -> Option<&mut [u8]>;
    /// The first `n` bytes of the last window are the next bytes of output.
    fn commit(&mut self, n: usize) -> Option<()>;
}

/// The output in one buffer of the size it is told.
pub struct VecOutput {
    buf: Vec<u8>,
    len: usize,
    /// The last window's length, until it is committed.
    window: Option<usize>,
}

impl VecOutput {
    pub fn new(size: usize) -> Self {
        VecOutput {
            buf: vec![0; size],
            len: 0,
            window: None,
        }
    }

    /// The bytes committed so far.
    pub fn into_vec(mut self) -> Vec<u8> {
        self.buf.truncate(self.len);
        self.buf
    }
}

impl Output for VecOutput {
    fn window(&mut self, min: usize, max: usize) -> Option<&mut [u8]> {
        let room = self.buf.len() - self.len;
        if min == 0 || min > max || max > room {
            return None;
        }
        self.window = Some(max);
        Some(&mut self.buf[self.len..self.len + max])
    }

    fn commit(&mut self, n: usize) -> Option<()> {
        self.window.take().filter(|&len| n <= len)?;
        self.len += n;
        Some(())
    }
}

/// A payload's compression format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Gzip,
    Bzip2,
    Lzma,
    Xz,
    Lzo,
    Lz4,
    Zstd,
}

impl Format {
    /// The format whose magic number `payload` starts with.
    fn of(payload: &[u8]) -> Option<Format> {
        const MAGICS: [(&[u8], Format); 7] = [
            (&[0x1f, 0x8b], Format::Gzip),
            (b"BZh", Format::Bzip2),
            (&[0x5d, 0x00], Format::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Format::Xz),
            (LZOP_MAGIC, Format::Lzo),
            (&LZ4_LEGACY_MAGIC.to_le_bytes(), Format::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Format::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, format)| format)
    }
}

/// A bzImage's compressed kernel: its format, its bytes and the size it unpacks to.
pub struct Payload<'a> {
    format: Format,
    /// The whole payload, the appended size included.
    bytes: &'a [u8],
    size: usize,
}

impl<'a> Payload<'a> {
    /// The payload of `image`, when it is a bzImage whose payload exitless can unpack (its size at
    /// most `MAX_UNPACKED`).
    pub fn of(image: &'a [u8]) -> Option<Self> {
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
        Self::from_bytes(image.get(start..start.checked_add(length)?)?)
    }

    /// A payload on its own (the appended size last).
    fn from_bytes(bytes: &'a [u8]) -> Option<Self> {
        let format = Format::of(bytes)?;
        let (_, size) = bytes.split_last_chunk::<4>()?;
        let size = u32::from_le_bytes(*size) as usize;
        (size <= MAX_UNPACKED).then_some(Payload {
            format,
            bytes,
            size,
        })
    }

    /// How many bytes it unpacks to (what the kernel build appended).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Unpacks it into `out`: `Some` when exactly `size` bytes came out and the stream ended
    /// there, as well formed as its format lets this tell.
    pub fn unpack_into(&self, out: &mut dyn Output) -> Option<()> {
        let (size, body) = (self.size, &self.bytes[..self.bytes.len() - 4]);
        match self.format {
            // The gzip trailer (CRC-32, size) is the stream's own: the decoder reads it.
            Format::Gzip => read_exact_size(flate2::bufread::GzDecoder::new(self.bytes), size, out),
            Format::Bzip2 => read_exact_size(bzip2::bufread::BzDecoder::new(body), size, out),
            Format::Lzma => liblzma(
                xz2::stream::Stream::new_lzma_decoder(MAX_LZMA_MEMORY).ok()?,
                body,
                size,
                out,
            ),
            Format::Xz => liblzma(
                xz2::stream::Stream::new_stream_decoder(MAX_LZMA_MEMORY, 0).ok()?,
                body,
                size,
                out,
            ),
            Format::Lzo => lzop(body, size, out),
            Format::Lz4 => lz4_legacy(body, size, out),
            Format::Zstd => zstd_single_pass(body, size, out),
        }
    }
}

/// Reads exactly `size` bytes from `decoder` into `out`; the stream must end there.
fn read_exact_size(mut decoder: impl Read, size: usize, out: &mut dyn Output) -> Option<()> {
    let mut done = 0;
    while done < size {
        let n = decoder.read(out.window(1, size - done)?).ok()?;
        if n == 0 {
            return None; // the stream ended short
        }
        out.commit(n)?;
        done += n;
    }
    // One more read finishes the stream (and checks its trailer): it must yield nothing.
    (decoder.read(&mut [0u8; 1]).ok()? == 0).then_some(())
}

/// Runs a liblzma decoder over `input` into `out`, to the stream's end, which must come after
/// exactly `size` bytes: past them it decodes into a spare byte, which must stay unused.
fn liblzma(
    mut stream: xz2::stream::Stream,
    input: &[u8],
    size: usize,
    out: &mut dyn Output,
) -> Option<()> {
    let mut spare = [0u8; 1];
    loop {
        let (read, written) = (stream.total_in() as usize, stream.total_out() as usize);
        let left = size - written;
        let buf = match left {
            0 => &mut spare[..],
            _ => out.window(1, left)?,
        };
        let status = stream
            .process(&input[read..], buf, xz2::stream::Action::Finish)
            .ok()?;
        let n = stream.total_out() as usize - written;
        match left {
            0 if n > 0 => return None, // more output than `size`
            0 => {}
            _ => out.commit(n)?,
        }
        if status == xz2::stream::Status::StreamEnd {
            return (written + n == size).then_some(());
        }
        if n == 0 && stream.total_in() as usize == read {
            return None; // no progress: truncated input
        }
    }
}

/// zstd frames decoded in one pass into one window of `size` bytes (a stream that runs longer
/// fails for want of room).
fn zstd_single_pass(input: &[u8], size: usize, out: &mut dyn Output) -> Option<()> {
    let n = zstd::bulk::decompress_to_buffer(input, out.window(size, size)?).ok()?;
    (n == size).then_some(())?;
    out.commit(n)
}

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;

/// The legacy LZ4 frame: the magic, then blocks of (u32 LE packed size, block), each at most 8 MiB
/// unpacked; a repeated magic starts another frame. Each block is decoded into a window of its
/// largest possible size (8 MiB, or what is left of `size`).
fn lz4_legacy(body: &[u8], size: usize, out: &mut dyn Output) -> Option<()> {
    const BLOCK: usize = 8 << 20;
    let mut done = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let (n, tail) = rest.split_first_chunk::<4>()?;
        let n = u32::from_le_bytes(*n);
        if n == LZ4_LEGACY_MAGIC {
            rest = tail;
            continue;
        }
        let block = tail.get(..n as usize)?;
        let room = (size - done).min(BLOCK);
        if room == 0 {
            return None; // a block past the size
        }
        let got = lz4_flex::block::decompress_into(block, out.window(room, room)?).ok()?;
        out.commit(got)?;
        done += got;
        rest = &tail[n as usize..];
    }
    (done == size).then_some(())
}

const LZOP_MAGIC: &[u8] = &[0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a];

/// The `lzop` file format over LZO1X blocks (see the module doc).
fn lzop(body: &[u8], size: usize, out: &mut dyn Output) -> Option<()> {
    // Header flags (lzop's conf.h).
    const ADLER32_D: u32 = 0x1;
    const ADLER32_C: u32 = 0x2;
    const EXTRA_FIELD: u32 = 0x40;
    const CRC32_D: u32 = 0x100;
    const CRC32_C: u32 = 0x200;
    const FILTER: u32 = 0x800;
    /// The largest block the kernel's decompressor accepts (lzop's default block size).
    const BLOCK: usize = 256 << 10;

    let mut r = Bytes(body.get(LZOP_MAGIC.len()..)?);
    let version = r.u16()?;
    r.take(2)?; // library version
    if version >= 0x0940 {
        r.take(2)?; // version needed to extract
    }
    let method = r.u8()?;
    if version >= 0x0940 {
        r.take(1)?; // level
    }
    let flags = r.u32()?;
    // LZO1X-1, LZO1X-1(15), LZO1X-999; no filter (which the kernel would not undo either) and no
    // extra field (which it would not skip).
    if !(1..=3).contains(&method) || flags & (FILTER | EXTRA_FIELD) != 0 {
        return None;
    }
    r.take(8)?; // mode, mtime
    if version >= 0x0940 {
        r.take(4)?; // mtime, high half
    }
    let name = r.u8()? as usize;
    r.take(name + 4)?; // file name, header checksum

    let mut done = 0;
    loop {
        let unpacked = r.u32()? as usize;
        if unpacked == 0 {
            break;
        }
        let packed = r.u32()? as usize;
        if unpacked > BLOCK || unpacked > size - done || packed == 0 || packed > unpacked {
            return None;
        }
        let adler = if flags & ADLER32_D != 0 {
            Some(r.u32()?)
        } else {
            None
        };
        let crc = if flags & CRC32_D != 0 {
            Some(r.u32()?)
        } else {
            None
        };
        if packed < unpacked {
            // Checksums of the packed data: the unpacked data's are enough.
            r.take(4 * (flags & ADLER32_C != 0) as usize + 4 * (flags & CRC32_C != 0) as usize)?;
        }
        let data = r.take(packed)?;
        let block = out.window(unpacked, unpacked)?;
        if packed == unpacked {
            block.copy_from_slice(data); // stored: it did not shrink
        } else if lzo::decompress_into(data, block).ok()? != unpacked {
            return None;
        }
        if adler.is_some_and(|sum| sum != adler32(block)) {
            return None;
        }
        if crc.is_some_and(|sum| {
            let mut crc = flate2::Crc::new();
            crc.update(block);
            sum != crc.sum()
        }) {
            return None;
        }
        out.commit(unpacked)?;
        done += unpacked;
    }
    (done == size).then_some(())
}

/// Big-endian fields read off the front of a byte slice.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
}

/// Adler-32 (RFC 1950), lzop's default checksum.
fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that can be summed before `b` could overflow.
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

#[cfg(test)]
mod tests {
    use super::super::elf_stream::testing::*;
    use super::super::elf_stream::{ElfKernel, ElfSink};
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::io::Write;
    use vm_memory::GuestMemoryMmap;

    /// The kernel ELF file inside `image`, unpacked into a `VecOutput`.
    fn unpack_payload(image: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload::of(image)?;
        let mut out = VecOutput::new(payload.size());
        payload.unpack_into(&mut out)?;
        Some(out.into_vec())
    }

    /// A payload on its own unpacked into a `VecOutput`.
    fn decompress(payload: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload::from_bytes(payload)?;
        let mut out = VecOutput::new(payload.size());
        payload.unpack_into(&mut out)?;
        Some(out.into_vec())
    }

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

    /// A stand-in for a kernel ELF, 600 KB: the magic, data that packs well, then noise that does
    /// not (lzop then stores its last block as is).
    fn fake_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..300_000u32).map(|i| (i % 251) as u8 ^ (i >> 12) as u8));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        elf.extend((0..300_000).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        }));
        elf
    }

    fn unpacks_to(payload: &[u8], elf: &[u8]) -> bool {
        unpack_payload(&fake_bzimage(payload)).as_deref() == Some(elf)
    }

    // Each format packed the way the kernel build packs a bzImage payload (scripts/Makefile.lib,
    // arch/x86/boot/compressed/Makefile), with the crates' encoders. Dictionaries are smaller than
    // the kernel's (1 MiB instead of 32/64 MiB) to spare the tests' memory: liblzma's encoder
    // takes about ten times its dictionary.

    /// `size_append`: the unpacked size as a u32 LE after the packed data.
    fn with_size(mut packed: Vec<u8>, unpacked: usize) -> Vec<u8> {
        packed.extend_from_slice(&(unpacked as u32).to_le_bytes());
        packed
    }

    /// `gzip -n -9`; gzip's own trailer ends with the size.
    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `bzip2 -9`.
    fn bzip2(data: &[u8]) -> Vec<u8> {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        e.write_all(data).unwrap();
        with_size(e.finish().unwrap(), data.len())
    }

    /// `lzma -9` from a pipe: the `.lzma` header (its size unknown: all ones), the stream and its
    /// end marker. The header's dictionary size is then set to what `lzma -9` writes (64 MiB),
    /// which a stream packed with a smaller one decodes with as well.
    fn lzma(data: &[u8]) -> Vec<u8> {
        let mut options = xz2::stream::LzmaOptions::new_preset(9).unwrap();
        options.dict_size(1 << 20);
        let stream = xz2::stream::Stream::new_lzma_encoder(&options).unwrap();
        let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        e.write_all(data).unwrap();
        let mut packed = e.finish().unwrap();
        assert_eq!(&packed[..5], &[0x5d, 0x00, 0x00, 0x10, 0x00]);
        assert_eq!(&packed[5..13], &[0xff; 8]);
        packed[1..5].copy_from_slice(&(64u32 << 20).to_le_bytes());
        with_size(packed, data.len())
    }

    /// scripts/xz_wrap.sh: `xz --check=crc32 --x86 --lzma2=,dict=32MiB` (here 1 MiB).
    fn xz(data: &[u8]) -> Vec<u8> {
        let mut options = xz2::stream::LzmaOptions::new_preset(6).unwrap();
        options.dict_size(1 << 20);
        let mut filters = xz2::stream::Filters::new();
        filters.x86().lzma2(&options);
        let stream =
            xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32).unwrap();
        let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), stream);
        e.write_all(data).unwrap();
        with_size(e.finish().unwrap(), data.len())
    }

    /// `lzop -9` from a pipe, as lzop 1.04 writes it: its header, then 256 KiB blocks packed with
    /// LZO1X-999 (stored when they do not shrink), each with the Adler-32 of its unpacked data.
    fn lzop(data: &[u8]) -> Vec<u8> {
        lzop_with(data, 0x0300_000d, b"") // Unix, stdin/out, Adler-32 (unpacked)
    }

    /// lzop's format with the checksums `flags` name and a file name.
    fn lzop_with(data: &[u8], flags: u32, name: &[u8]) -> Vec<u8> {
        let crc32 = |data: &[u8]| {
            let mut crc = flate2::Crc::new();
            crc.update(data);
            crc.sum()
        };
        let mut header = Vec::new();
        header.extend_from_slice(&0x1040u16.to_be_bytes()); // lzop 1.04
        header.extend_from_slice(&0x20a0u16.to_be_bytes()); // LZO 2.10
        header.extend_from_slice(&0x0940u16.to_be_bytes()); // needed to extract
        header.extend_from_slice(&[3, 9]); // LZO1X-999, level 9
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&0o100644u32.to_be_bytes()); // mode
        header.extend_from_slice(&[0; 8]); // mtime
        header.push(name.len() as u8);
        header.extend_from_slice(name);
        let mut packed = LZOP_MAGIC.to_vec();
        packed.extend_from_slice(&header);
        packed.extend_from_slice(&adler32(&header).to_be_bytes());
        for block in data.chunks(256 << 10) {
            let lzo = lzokay_native::compress(block).unwrap();
            let lzo = if lzo.len() < block.len() {
                &lzo[..]
            } else {
                block
            };
            packed.extend_from_slice(&(block.len() as u32).to_be_bytes());
            packed.extend_from_slice(&(lzo.len() as u32).to_be_bytes());
            let mut sums = vec![(0x1, adler32(block)), (0x100, crc32(block))];
            if lzo.len() < block.len() {
                sums.extend([(0x2, adler32(lzo)), (0x200, crc32(lzo))]);
            }
            for (flag, sum) in sums {
                if flags & flag != 0 {
                    packed.extend_from_slice(&sum.to_be_bytes());
                }
            }
            packed.extend_from_slice(lzo);
        }
        packed.extend_from_slice(&[0; 4]);
        with_size(packed, data.len())
    }

    /// `lz4 -l -9`: the legacy frame, 8 MiB blocks.
    fn lz4(data: &[u8]) -> Vec<u8> {
        let mut packed = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for block in data.chunks(8 << 20) {
            let block = lz4_flex::block::compress(block);
            packed.extend_from_slice(&(block.len() as u32).to_le_bytes());
            packed.extend_from_slice(&block);
        }
        with_size(packed, data.len())
    }

    /// `zstd -22 --ultra` from a pipe: no content size in the frame, a checksum (the tool's
    /// default). Told the input's size, as `--stream-size` would, so that the encoder sizes its
    /// tables to it.
    fn zstd(data: &[u8]) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), 22).unwrap();
        e.include_checksum(true).unwrap();
        e.include_contentsize(false).unwrap();
        e.set_pledged_src_size(Some(data.len() as u64)).unwrap();
        e.write_all(data).unwrap();
        with_size(e.finish().unwrap(), data.len())
    }

    type Packer = fn(&[u8]) -> Vec<u8>;

    const PACKERS: [(Format, Packer); 7] = [
        (Format::Gzip, gzip),
        (Format::Bzip2, bzip2),
        (Format::Lzma, lzma),
        (Format::Xz, xz),
        (Format::Lzo, lzop),
        (Format::Lz4, lz4),
        (Format::Zstd, zstd),
    ];

    #[test]
    fn unpacks_every_format_the_kernel_builds_with() {
        let elf = fake_elf();
        for (format, pack) in PACKERS {
            let payload = pack(&elf);
            assert_eq!(Format::of(&payload), Some(format));
            assert!(unpacks_to(&payload, &elf), "{format:?}");
        }
    }

    #[test]
    fn unpacks_lzma_with_its_size_in_the_header_unknown_or_given() {
        let elf = fake_elf();
        let unknown = lzma(&elf);
        let mut given = unknown.clone();
        given[5..13].copy_from_slice(&(elf.len() as u64).to_le_bytes());
        assert!(unpacks_to(&unknown, &elf));
        assert!(unpacks_to(&given, &elf));
        // A header size that disagrees with the appended one.
        let mut short = unknown.clone();
        short[5..13].copy_from_slice(&(elf.len() as u64 - 1).to_le_bytes());
        assert!(unpack_payload(&fake_bzimage(&short)).is_none());
    }

    #[test]
    fn unpacks_lzop_with_every_checksum_and_a_file_name() {
        let elf = fake_elf();
        // Adler-32 and CRC-32 of the unpacked and of the packed data.
        let payload = lzop_with(&elf, 0x0300_0303, b"vmlinux.bin");
        assert!(unpacks_to(&payload, &elf));
        // A CRC-32 (of unpacked data) that does not match.
        let crc_only = lzop_with(&elf, 0x0300_0100, b"");
        let first_sum = LZOP_FIRST_BLOCK + 8;
        let mut bad = crc_only.clone();
        bad[first_sum] ^= 1;
        assert!(unpacks_to(&crc_only, &elf));
        assert!(unpack_payload(&fake_bzimage(&bad)).is_none());
    }

    #[test]
    fn unpacks_lz4_over_several_blocks_and_frames() {
        let elf = fake_elf().repeat(30); // 18 MB: three 8 MiB blocks
        let payload = lz4(&elf);
        assert!(unpacks_to(&payload, &elf));
        // `lz4 -l` output concatenated: a magic before every block.
        let mut frames = Vec::new();
        for block in elf.chunks(8 << 20) {
            let frame = lz4(block);
            frames.extend_from_slice(&frame[..frame.len() - 4]);
        }
        assert!(frames.len() > payload.len());
        assert!(unpacks_to(&with_size(frames, elf.len()), &elf));
    }

    #[test]
    fn refuses_corrupt_or_truncated_payloads_of_every_format() {
        let elf = fake_elf();
        for (format, pack) in PACKERS {
            let payload = pack(&elf);
            let (body, size) = payload.split_at(payload.len() - 4);
            let n = body.len();
            let mut bad = vec![
                // Truncated midway and by its last byte, the size still appended.
                ("cut midway", [&body[..n / 2], size].concat()),
                ("cut by a byte", [&body[..n - 1], size].concat()),
                // Without the appended size: the stream's last 4 bytes read as the size.
                ("no size", body.to_vec()),
                // A size one off either way.
                ("size + 1", with_size(body.to_vec(), elf.len() + 1)),
                ("size - 1", with_size(body.to_vec(), elf.len() - 1)),
            ];
            // A flipped bit, and 8 bytes overwritten, early and midway. The legacy LZ4 frame has no
            // checksum: corrupt literals go unnoticed (by the kernel too), so there the block size
            // and the first sequences are hit instead.
            let spots = match format {
                Format::Lz4 => [4, 8],
                _ => [n / 8, n / 2],
            };
            for at in spots {
                let mut flipped = payload.clone();
                flipped[at] ^= 0x10;
                bad.push(("bit flipped", flipped));
                let mut overwritten = payload.clone();
                overwritten[at..at + 8].fill(0xff);
                bad.push(("overwritten", overwritten));
            }
            for (what, p) in bad {
                assert!(
                    unpack_payload(&fake_bzimage(&p)).is_none(),
                    "{format:?}: {what}"
                );
            }
        }
    }

    // Heap accounting for the bomb tests: each thread's live heap bytes and their peak.
    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn count(grown: usize, shrunk: usize) {
        let _ = LIVE.try_with(|live| {
            let now = (live.get() + grown).saturating_sub(shrunk);
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    /// The system allocator, counting each thread's heap (in this crate's unit tests only).
    struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                count(layout.size(), 0);
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                count(layout.size(), 0);
            }
            p
        }

        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            unsafe { System.dealloc(p, layout) };
            count(0, layout.size());
        }

        unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, layout, size) };
            if !q.is_null() {
                count(size, layout.size());
            }
            q
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Unpacks `payload` in a fake bzImage; returns whether it did and the most heap (Rust's; the
    /// C decoders' own allocations are not seen) this thread held meanwhile.
    fn unpack_counting(payload: &[u8]) -> (bool, usize) {
        let image = fake_bzimage(payload);
        let base = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(base));
        let unpacked = unpack_payload(&image).is_some();
        (unpacked, PEAK.with(Cell::get) - base)
    }

    /// 600 MiB of zeros, which pack to little.
    const BOMB: usize = 600 << 20;
    const MIB: usize = 1 << 20;

    /// `n` zeros (a multiple of 8 MiB) as legacy LZ4 blocks, without the size.
    fn lz4_zeros(n: usize) -> Vec<u8> {
        let block = lz4_flex::block::compress(&vec![0u8; 8 << 20]);
        let mut packed = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for _ in 0..n / (8 << 20) {
            packed.extend_from_slice(&(block.len() as u32).to_le_bytes());
            packed.extend_from_slice(&block);
        }
        packed
    }

    /// Where an lzop stream's first block starts (`lzop()`'s header).
    const LZOP_FIRST_BLOCK: usize = 9 + 29;

    /// `n` zeros (a multiple of 256 KiB) the way `lzop` packs them, without the size.
    fn lzop_zeros(n: usize) -> Vec<u8> {
        let one = lzop(&vec![0u8; 256 << 10]);
        let (header, block) = one[..one.len() - 8].split_at(LZOP_FIRST_BLOCK);
        assert_eq!(&block[..4], &(256u32 << 10).to_be_bytes());
        let mut packed = header.to_vec();
        for _ in 0..n / (256 << 10) {
            packed.extend_from_slice(block);
        }
        packed.extend_from_slice(&[0; 4]);
        packed
    }

    /// `n` zeros through zstd's encoder, without the size.
    fn zstd_zeros(n: usize) -> Vec<u8> {
        let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        e.include_checksum(true).unwrap();
        let zeros = vec![0u8; MIB];
        for _ in 0..n / MIB {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap()
    }

    /// A zstd frame claiming `content_size` bytes and a 128 KiB window, then `blocks` blocks of
    /// 128 KiB, each one zero byte repeated.
    fn zstd_rle_frame(content_size: u64, blocks: usize) -> Vec<u8> {
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0xc0, 0x38];
        frame.extend_from_slice(&content_size.to_le_bytes());
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let header = last | 1 << 1 | (128 << 10) << 3; // an RLE block
            frame.extend_from_slice(&header.to_le_bytes()[..3]);
            frame.push(0);
        }
        frame
    }

    #[test]
    fn refuses_bombs_holding_no_more_than_the_output_limit() {
        for (format, pack) in PACKERS {
            // Room for the decoder's own heap beside the output (bzip2's is 3.6 MB for 900 kB
            // blocks; the C decoders' allocations are not counted).
            let slack = match format {
                Format::Bzip2 => 4 * MIB,
                _ => 64 << 10,
            };
            // Zeros: 600 MiB where they pack fast (blocks repeated, or zstd), 32 MiB otherwise.
            let (zeros, n): (&dyn Fn(usize) -> Vec<u8>, usize) = match format {
                Format::Lz4 => (&lz4_zeros, BOMB),
                Format::Lzo => (&lzop_zeros, BOMB),
                Format::Zstd => (&zstd_zeros, BOMB),
                _ => (
                    &|n| {
                        let mut packed = pack(&vec![0; n]);
                        packed.truncate(packed.len() - 4);
                        packed
                    },
                    32 * MIB,
                ),
            };
            // Well formed: 16 MiB of them unpack (to zeros, not an ELF: `decompress`).
            let small = with_size(zeros(16 * MIB), 16 * MIB);
            assert_eq!(decompress(&small), Some(vec![0; 16 * MIB]), "{format:?}");
            let bomb = zeros(n);
            assert!(bomb.len() < n / 100, "{format:?}: {} bytes", bomb.len());
            if n > MAX_UNPACKED {
                // With its true size, over the limit: refused before decoding.
                let (unpacked, peak) = unpack_counting(&with_size(bomb.clone(), n));
                assert!(!unpacked && peak < MIB, "{format:?}: {peak} bytes");
            }
            // Claiming less: decoding stops right past the claim.
            for claim in [MIB, MAX_UNPACKED].into_iter().filter(|&claim| claim < n) {
                let (unpacked, peak) = unpack_counting(&with_size(bomb.clone(), claim));
                assert!(!unpacked, "{format:?}");
                assert!(
                    peak <= claim + slack,
                    "{format:?}: {peak} bytes for {claim}"
                );
            }
        }
    }

    #[test]
    fn refuses_headers_that_claim_too_much() {
        let elf = fake_elf();
        // An lzop block claiming 4 GiB unpacked.
        let mut lzo = lzop(&elf);
        lzo[LZOP_FIRST_BLOCK..LZOP_FIRST_BLOCK + 4].fill(0xff);
        // A zstd frame claiming 2^60 bytes, then 600 MiB of them (a well-formed frame: with its
        // true content size it unpacks).
        let honest = with_size(zstd_rle_frame(MIB as u64, 8), MIB);
        assert_eq!(decompress(&honest), Some(vec![0; MIB]));
        let zst = with_size(zstd_rle_frame(1 << 60, BOMB / (128 << 10)), MIB);
        // lzma: a 4 GiB dictionary and 2^60 bytes, which liblzma refuses to allocate.
        let mut lzma = lzma(&elf);
        lzma[1..5].fill(0xff);
        lzma[5..13].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let mut decoder = xz2::stream::Stream::new_lzma_decoder(MAX_LZMA_MEMORY).unwrap();
        let refused = decoder.process(&lzma, &mut [0; 16], xz2::stream::Action::Run);
        assert_eq!(refused.unwrap_err(), xz2::stream::Error::MemLimit);
        for (format, payload) in [
            (Format::Lzo, lzo),
            (Format::Zstd, zst),
            (Format::Lzma, lzma),
        ] {
            let (unpacked, peak) = unpack_counting(&payload);
            assert!(!unpacked, "{format:?}");
            assert!(peak <= 2 * MIB, "{format:?}: {peak} bytes");
        }
    }

    #[test]
    fn refuses_what_it_cannot_unpack() {
        assert!(unpack_payload(b"short").is_none());
        assert!(unpack_payload(&fake_bzimage(b"BZh91AY&SY garbage")).is_none());
        // Unknown magic.
        let elf = fake_elf();
        assert!(unpack_payload(&fake_bzimage(&with_size(elf.clone(), elf.len()))).is_none());
        // A payload length pointing past the end of the file.
        let mut img = fake_bzimage(&gzip(&elf));
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack_payload(&img).is_none());
    }

    /// Unpacks the payload of `image` into a fresh guest memory through an `ElfSink`, as
    /// `boot::load` does: the kernel, or why not (guest memory then wiped).
    fn stream(image: &[u8]) -> (GuestMemoryMmap, Result<ElfKernel, String>) {
        let mem = guest_mem(GUEST_MEM);
        let Some(payload) = Payload::of(image) else {
            return (mem, Err("no payload".into()));
        };
        let mut sink = ElfSink::new(&mem, payload.size() as u64);
        let result = match payload.unpack_into(&mut sink) {
            Some(()) => sink.finish().map_err(|e| e.to_string()),
            None => Err(sink.error().map_or("decoder".into(), ToString::to_string)),
        };
        if result.is_err() {
            sink.wipe();
        }
        (mem, result)
    }

    const GUEST_MEM: usize = 64 << 20;

    /// A small kernel-like ELF: text (the notes inside, the PVH one among them), then data with
    /// some bss, at file offsets that are not block multiples; `fake_elf`'s bytes as contents.
    fn kernel_elf() -> Vec<u8> {
        let notes = kernel_notes(Some(0x100_0850));
        let mut segs = vec![
            Seg::load(0x1000, 0x100_0000, 0x6_0000, 0),
            Seg::load(0x6_5123, 0x120_0123, 0x3_1234, 0x1_0000),
            Seg::note(0x1100, notes.clone()),
        ];
        let bytes = fake_elf();
        segs[0].data.copy_from_slice(&bytes[..0x6_0000]);
        segs[1].data.copy_from_slice(&bytes[0x6_0000..0x9_1234]);
        segs[0].data[0x100..0x100 + notes.len()].copy_from_slice(&notes);
        build_elf(0x100_0000, &segs)
    }

    #[test]
    fn streams_every_format_into_guest_memory_as_linux_loader_loads_the_elf() {
        let elf = kernel_elf();
        let (want_mem, want) = linux_loader(&elf, GUEST_MEM);
        assert_eq!(want.pvh_entry, Some(0x100_0850));
        for (format, pack) in PACKERS {
            let payload = pack(&elf);
            let (mem, got) = stream(&fake_bzimage(&payload));
            assert_eq!(got, Ok(want), "{format:?}");
            let diff = first_difference(&mem, &want_mem, GUEST_MEM);
            assert_eq!(diff, None, "{format:?}");
            // Cut midway (past the first segment's start): refused, guest memory left as it was.
            let (body, size) = payload.split_at(payload.len() - 4);
            let cut = [&body[..body.len() * 3 / 4], size].concat();
            let (mem, got) = stream(&fake_bzimage(&cut));
            assert!(got.is_err(), "{format:?}");
            assert!(all_zero(&mem, GUEST_MEM), "{format:?}: written");
            // Not an ELF.
            let (mem, got) = stream(&fake_bzimage(&pack(b"not an elf")));
            assert!(got.is_err() && all_zero(&mem, GUEST_MEM), "{format:?}");
        }
    }

    /// Real kernels: the shared test kernel and the Debian guest's (tools/test.sh builds it; a
    /// missing one is a recorded skip, which fails CI). Their header and 2 MiB of their code (x86
    /// text, which xz's BCJ filter rewrites) are also repacked in every format.
    #[test]
    fn unpacks_real_kernels() {
        for path in [
            "../shared/guest/test-kernel/bzImage",
            "images/debian/vmlinuz",
        ] {
            let Ok(img) = std::fs::read(path) else {
                crate::test_skip("unpacks_real_kernels", &format!("{path} is missing"));
                continue;
            };
            let elf = unpack_payload(&img).unwrap_or_else(|| panic!("{path} did not unpack"));
            assert!(elf.len() > img.len(), "{path}");
            // Streamed into guest memory, as linux-loader loads the unpacked ELF.
            let (want_mem, want) = linux_loader(&elf, GUEST_MEM);
            let (mem, got) = stream(&img);
            assert_eq!(got, Ok(want), "{path}");
            assert_eq!(first_difference(&mem, &want_mem, GUEST_MEM), None, "{path}");
            let code = elf.get(2 * MIB..4 * MIB).expect(path);
            let part = [&elf[..4096], code].concat();
            for (format, pack) in PACKERS {
                assert!(unpacks_to(&pack(&part), &part), "{path}: {format:?}");
            }
        }
    }
}
