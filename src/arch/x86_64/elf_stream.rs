//! Loading a kernel ELF into guest memory as its bytes go by.
//!
//! Owns `ElfSink`, the `bzimage::Output` that the boot code unpacks a bzImage's payload into. The
//! payload is the kernel's ELF file (`vmlinux`, 53 MB for Debian's); the sink takes its bytes in
//! order and puts each `PT_LOAD` segment's bytes where they belong in guest memory. Where the next
//! bytes lie inside one segment, the decoder gets a window of guest memory and decodes straight
//! into it; elsewhere (headers, gaps between segments, a decoder's block that straddles a
//! segment's edge) it gets a reusable scratch buffer, copied from on commit.
//!
//! Why not linux-loader's `Elf::load` (which still loads an ELF `--kernel` and the test-kit
//! guests): it wants a `Read + Seek` of the whole file (it seeks to the program headers, to every
//! segment and to the notes) and copies each segment out of it, so an unpacked payload had to sit
//! in a buffer of its own first (53 MB to fault in) and be copied a second time.
//!
//! The ELF header and the program headers come first in any ELF a kernel build makes: the sink
//! buffers the stream until it has them (within the first `MAX_HEADERS` bytes), checks every
//! segment before it writes a byte, then replays what it buffered. It yields what `boot::load`
//! used of linux-loader's result: the entry point, the end of the kernel, and the PVH entry, read
//! from the `PT_NOTE` segments as linux-loader reads it (the last `PT_NOTE` decides; in it, the
//! first note named "Xen" of type `XEN_ELFNOTE_PHYS32_ENTRY`, its descriptor's first 32 bits).
//!
//! Checks, linux-loader's or stricter (a refused kernel boots as a bzImage, the usual way): an
//! ELF64, little-endian, x86_64 file; 56-byte program headers after the ELF header, 1 to
//! `MAX_PHDRS` of them; the entry point at or above `HIMEM_START`; at least one `PT_LOAD`; every
//! `PT_LOAD` with `filesz <= memsz`, its file bytes within the file, its memory (`paddr..paddr +
//! memsz`) at or above `HIMEM_START` inside one region of guest RAM, and no two overlapping;
//! `PT_NOTE` segments within the file and at most `MAX_NOTES` bytes; a note header, or the PVH
//! note's name or entry, that runs past its segment is refused (linux-loader reads on into the
//! file); the file exactly as long as announced. Numbers from the file go through checked
//! arithmetic. As with linux-loader, a segment's bss (`memsz - filesz`) is left as fresh guest RAM
//! has it, zero (the kernel clears its bss itself); unlike it, a `PT_LOAD` with no file bytes
//! counts for the kernel's end.
//!
//! After a refusal midway (a payload corrupt past its first segment), `ElfSink::wipe` zeroes
//! whatever the sink may have written, so that the fallback finds guest RAM as it was.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::bzimage::Output;
use super::layout::HIMEM_START;

/// Most program headers accepted (an x86_64 vmlinux has 5 or 6).
const MAX_PHDRS: usize = 64;
/// The ELF header and the program headers must end within this many bytes of the file's start.
const MAX_HEADERS: u64 = 64 << 10;
/// Most bytes of one `PT_NOTE` segment (a kernel's is a few hundred bytes).
const MAX_NOTES: u64 = 64 << 10;
/// The scratch buffer's size for decoders that can stop anywhere (a block decoder's window is its
/// block's size).
const CHUNK: usize = 256 << 10;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The Xen ELF note that holds the PVH entry point (linux-loader's `XEN_ELFNOTE_PHYS32_ENTRY`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Why the sink refused a kernel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF64 little-endian x86_64 file ({0})")]
    NotX86_64Elf(&'static str),
    #[error("program headers: {0}")]
    ProgramHeaders(&'static str),
    #[error("entry point {0:#x} below {HIMEM_START:#x}")]
    Entry(u64),
    #[error("no PT_LOAD segment")]
    NoSegments,
    #[error("segment {index}: {why}")]
    Segment { index: usize, why: &'static str },
    #[error("segments {0} and {1} overlap in guest memory")]
    Overlap(usize, usize),
    #[error("PVH note: {0}")]
    Note(&'static str),
    #[error("the file ended after {got} of its {size} bytes")]
    Truncated { got: u64, size: u64 },
    #[error("the decoder asked for a bad window or commit ({0} bytes)")]
    BadWindow(usize),
    #[error("writing guest memory: {0}")]
    Memory(String),
}

/// What the boot code needs of a loaded kernel (what it used of linux-loader's
/// `KernelLoaderResult` for an ELF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElfKernel {
    /// `e_entry`, the 64-bit entry (linux-loader's `kernel_load`).
    pub entry: u64,
    /// The end of the highest segment in guest memory (`paddr + memsz`).
    pub kernel_end: u64,
    /// The PVH entry point, when the kernel has the note.
    pub pvh_entry: Option<u64>,
}

/// A `PT_LOAD` segment, checked: `offset + filesz` and `paddr + memsz` do not overflow.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Its index among the program headers (for messages).
    index: usize,
    offset: u64,
    filesz: u64,
    paddr: u64,
    memsz: u64,
}

impl Load {
    fn file_end(&self) -> u64 {
        self.offset + self.filesz
    }
}

/// A `PT_NOTE` segment and its bytes as they arrive.
#[derive(Debug)]
struct Note {
    offset: u64,
    bytes: Vec<u8>,
}

/// What the headers say.
#[derive(Debug)]
struct Layout {
    entry: u64,
    loads: Vec<Load>,
    /// In program-header order (the last one decides the PVH entry, as with linux-loader).
    notes: Vec<Note>,
}

/// The last window handed out, until it is committed.
#[derive(Clone, Copy, Debug)]
enum Window {
    /// The first `len` bytes of `scratch`.
    Scratch(usize),
    /// Guest memory for `Layout::loads[load]`, `len` bytes from `ptr`.
    Guest {
        load: usize,
        ptr: *mut u8,
        len: usize,
    },
}

/// Loads a kernel ELF file of `size` bytes into guest memory from its bytes in order (see the
/// module doc). Nothing else may use guest memory meanwhile (no vCPU runs yet, no device exists):
/// the sink hands out plain `&mut [u8]` windows of it.
pub struct ElfSink<'m> {
    mem: &'m GuestMemoryMmap,
    size: u64,
    /// Bytes committed so far.
    pos: u64,
    /// The headers, buffered until complete.
    head: Vec<u8>,
    layout: Option<Layout>,
    scratch: Vec<u8>,
    window: Option<Window>,
    /// The furthest file offset a guest window or a copy reached (what `wipe` undoes).
    reach: u64,
    /// The first refusal: every later call fails.
    failed: Option<ElfError>,
}

impl<'m> ElfSink<'m> {
    /// A sink for an ELF file of exactly `size` bytes.
    pub fn new(mem: &'m GuestMemoryMmap, size: u64) -> Self {
        ElfSink {
            mem,
            size,
            pos: 0,
            head: Vec::new(),
            layout: None,
            scratch: Vec::new(),
            window: None,
            reach: 0,
            failed: None,
        }
    }

    /// Why the sink refused, if it did.
    pub fn error(&self) -> Option<&ElfError> {
        self.failed.as_ref()
    }

    /// After the last byte: the kernel, or why not.
    pub fn finish(&mut self) -> Result<ElfKernel, ElfError> {
        let result = self.failed.clone().map_or_else(|| self.kernel(), Err);
        if let Err(e) = &result {
            self.failed.get_or_insert(e.clone());
        }
        result
    }

    fn kernel(&self) -> Result<ElfKernel, ElfError> {
        let layout = self.layout.as_ref().filter(|_| self.pos == self.size);
        let layout = layout.ok_or(ElfError::Truncated {
            got: self.pos,
            size: self.size,
        })?;
        let mut pvh_entry = None;
        for note in &layout.notes {
            pvh_entry = pvh_entry_of(&note.bytes)?;
        }
        let kernel_end = layout.loads.iter().map(|l| l.paddr + l.memsz).max();
        Ok(ElfKernel {
            entry: layout.entry,
            kernel_end: kernel_end.unwrap_or(0), // `parse`: at least one
            pvh_entry,
        })
    }

    /// Zeroes every byte of guest memory the sink may have written, for a fallback that wants
    /// guest RAM as it was (fresh, zero: nothing but the kernel goes at or above `HIMEM_START`
    /// before it).
    pub fn wipe(&mut self) {
        let Some(layout) = &self.layout else {
            return; // nothing is written before the headers are checked
        };
        for load in &layout.loads {
            let written = self.reach.clamp(load.offset, load.file_end()) - load.offset;
            let _ = zero(self.mem, load.paddr, written);
        }
    }

    /// Where the next window goes, `min..=max` bytes long.
    fn place(&self, min: usize, max: usize) -> Result<Window, ElfError> {
        if min == 0 || min > max || max as u64 > self.size - self.pos {
            return Err(ElfError::BadWindow(max));
        }
        let Some(layout) = &self.layout else {
            // Up to the end of the headers, so that what follows them gets windows of its own.
            let want = headers_len(&self.head, self.size)? - self.head.len();
            return Ok(Window::Scratch(max.min(want.max(min))));
        };
        let pos = self.pos;
        let inside = |l: &Load| l.offset <= pos && pos < l.file_end();
        if let Some(load) = layout.loads.iter().position(inside) {
            let avail = layout.loads[load].file_end() - pos;
            if avail >= min as u64 {
                return self.guest_window(load, max.min(avail as usize));
            }
        }
        // A gap, or a block that straddles a segment's end: scratch, up to the next segment's
        // start when the decoder can stop there.
        let next = layout
            .loads
            .iter()
            .filter(|l| l.offset > pos && l.filesz > 0)
            .map(|l| l.offset - pos)
            .min()
            .filter(|&d| d >= min as u64);
        let len = max.min(CHUNK.max(min));
        Ok(Window::Scratch(next.map_or(len, |d| len.min(d as usize))))
    }

    /// A window of `len` bytes at `pos` in segment `load`.
    fn guest_window(&self, load: usize, len: usize) -> Result<Window, ElfError> {
        let l = &self.layout.as_ref().expect("placed in a segment").loads[load];
        let addr = GuestAddress(l.paddr + (self.pos - l.offset));
        let slice = self
            .mem
            .get_slice(addr, len)
            .map_err(|e| ElfError::Memory(e.to_string()))?;
        let ptr = slice.ptr_guard_mut().as_ptr();
        Ok(Window::Guest { load, ptr, len })
    }

    /// Takes the next `data`: buffers the headers, copies the rest where it belongs but to
    /// segment `decoded_in` (the window it was decoded into).
    fn take(&mut self, mut data: &[u8], decoded_in: Option<usize>) -> Result<(), ElfError> {
        if self.layout.is_none() {
            data = self.buffer_headers(data)?;
            if self.layout.is_none() {
                return Ok(());
            }
        }
        self.copy_out(self.pos, data, decoded_in)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Buffers header bytes off the front of `data`; once they are all in, parses them and
    /// replays them. Returns the rest of `data`.
    fn buffer_headers<'d>(&mut self, mut data: &'d [u8]) -> Result<&'d [u8], ElfError> {
        loop {
            let need = headers_len(&self.head, self.size)?;
            if self.head.len() == need {
                break;
            }
            if data.is_empty() {
                return Ok(data);
            }
            let k = (need - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..k]);
            self.pos += k as u64;
            data = &data[k..];
        }
        self.layout = Some(parse(&self.head, self.size, self.mem)?);
        let head = std::mem::take(&mut self.head);
        self.copy_out(0, &head, None)?;
        Ok(data)
    }

    /// Copies `data`, the file's bytes from offset `at`, to every segment and note they belong
    /// to, but segment `skip`.
    fn copy_out(&mut self, at: u64, data: &[u8], skip: Option<usize>) -> Result<(), ElfError> {
        let end = at + data.len() as u64;
        self.reach = self.reach.max(end);
        let layout = self.layout.as_mut().expect("headers parsed");
        for (i, load) in layout.loads.iter().enumerate() {
            let (lo, hi) = (at.max(load.offset), end.min(load.file_end()));
            if lo < hi && skip != Some(i) {
                let part = &data[(lo - at) as usize..(hi - at) as usize];
                self.mem
                    .write_slice(part, GuestAddress(load.paddr + (lo - load.offset)))
                    .map_err(|e| ElfError::Memory(e.to_string()))?;
            }
        }
        for note in &mut layout.notes {
            let (lo, hi) = (
                at.max(note.offset),
                end.min(note.offset + note.bytes.len() as u64),
            );
            if lo < hi {
                note.bytes[(lo - note.offset) as usize..(hi - note.offset) as usize]
                    .copy_from_slice(&data[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        Ok(())
    }

    fn try_commit(&mut self, n: usize) -> Result<(), ElfError> {
        match self.window.take() {
            Some(Window::Scratch(len)) if n <= len => {
                let scratch = std::mem::take(&mut self.scratch);
                let result = self.take(&scratch[..n], None);
                self.scratch = scratch;
                result
            }
            Some(Window::Guest { load, ptr, len }) if n <= len => {
                // SAFETY: `ptr..ptr + n` lies in the window `guest_window` checked, guest memory
                // that `self.mem` keeps mapped while the sink borrows it; the window's borrow of
                // the sink has ended, and `take` only reads these bytes (it writes the notes and
                // the other segments, whose memory does not overlap this one's: `parse`).
                let data = unsafe { std::slice::from_raw_parts(ptr, n) };
                self.take(data, Some(load))
            }
            _ => Err(ElfError::BadWindow(n)),
        }
    }

    /// Records a refusal; `None` for the `Output` calls.
    fn refuse<T>(&mut self, e: ElfError) -> Option<T> {
        self.failed = Some(e);
        None
    }
}

impl Output for ElfSink<'_> {
    fn window(&mut self, min: usize, max: usize) -> Option<&mut [u8]> {
        if self.failed.is_some() {
            return None;
        }
        let window = match self.place(min, max) {
            Ok(w) => w,
            Err(e) => return self.refuse(e),
        };
        self.window = Some(window);
        match window {
            Window::Scratch(len) => {
                if self.scratch.len() < len {
                    self.scratch.resize(len, 0);
                }
                Some(&mut self.scratch[..len])
            }
            Window::Guest { ptr, len, .. } => {
                // The decoder may write anywhere in the window, committed or not.
                self.reach = self.reach.max(self.pos + len as u64);
                // SAFETY: `ptr..ptr + len` is guest memory inside one mapped region
                // (`guest_window` checked it) that `self.mem` keeps mapped while the sink borrows
                // it. Nothing else reads or writes guest memory while the kernel loads (no vCPU
                // runs, no device exists yet: see `ElfSink`), and the slice borrows the sink
                // mutably, so no other window or copy of the sink's touches it while it lives.
                Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
            }
        }
    }

    fn commit(&mut self, n: usize) -> Option<()> {
        if self.failed.is_some() {
            return None;
        }
        match self.try_commit(n) {
            Ok(()) => Some(()),
            Err(e) => self.refuse(e),
        }
    }
}

/// Writes `len` zeros at `addr`.
fn zero(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), ElfError> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64);
        mem.write_slice(&ZEROS[..n as usize], GuestAddress(addr + done))
            .map_err(|e| ElfError::Memory(e.to_string()))?;
        done += n;
    }
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// How many bytes of the file's start hold its headers: the ELF header's size until `head` has
/// it, then the end of the program headers (checked against `size` and `MAX_HEADERS`).
fn headers_len(head: &[u8], size: u64) -> Result<usize, ElfError> {
    if head.len() < EHDR_SIZE {
        return Ok(EHDR_SIZE);
    }
    if &head[..4] != b"\x7fELF" {
        return Err(ElfError::NotX86_64Elf("no ELF magic"));
    }
    if head[4] != ELFCLASS64 || head[5] != ELFDATA2LSB || u16_at(head, 18) != EM_X86_64 {
        return Err(ElfError::NotX86_64Elf("its class, data or machine"));
    }
    let phoff = u64_at(head, 32);
    let phnum = u16_at(head, 56) as usize;
    if u16_at(head, 54) as usize != PHDR_SIZE {
        return Err(ElfError::ProgramHeaders("not 56 bytes each"));
    }
    if phoff < EHDR_SIZE as u64 {
        return Err(ElfError::ProgramHeaders("inside the ELF header"));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::ProgramHeaders("none, or more than 64"));
    }
    let end = phoff
        .checked_add((phnum * PHDR_SIZE) as u64)
        .filter(|&end| end <= MAX_HEADERS.min(size))
        .ok_or(ElfError::ProgramHeaders(
            "past the file's end or its first 64 KiB",
        ))?;
    Ok(end as usize)
}

/// Reads and checks the headers (`head` holds them all: `headers_len`).
fn parse(head: &[u8], size: u64, mem: &GuestMemoryMmap) -> Result<Layout, ElfError> {
    let entry = u64_at(head, 24);
    if entry < HIMEM_START {
        return Err(ElfError::Entry(entry));
    }
    let phoff = u64_at(head, 32) as usize; // within `head`: `headers_len`
    let mut layout = Layout {
        entry,
        loads: Vec::new(),
        notes: Vec::new(),
    };
    for index in 0..u16_at(head, 56) as usize {
        let ph = &head[phoff + index * PHDR_SIZE..][..PHDR_SIZE];
        segment(&mut layout, index, ph, size, mem)?;
    }
    if layout.loads.is_empty() {
        return Err(ElfError::NoSegments);
    }
    let mut by_addr: Vec<&Load> = layout.loads.iter().collect();
    by_addr.sort_by_key(|l| l.paddr);
    for pair in by_addr.windows(2) {
        if pair[0].paddr + pair[0].memsz > pair[1].paddr {
            return Err(ElfError::Overlap(pair[0].index, pair[1].index));
        }
    }
    Ok(layout)
}

/// Checks program header `index` (`ph`) and adds it to `layout` if it is a `PT_LOAD` with memory
/// or a `PT_NOTE`.
fn segment(
    layout: &mut Layout,
    index: usize,
    ph: &[u8],
    size: u64,
    mem: &GuestMemoryMmap,
) -> Result<(), ElfError> {
    let bad = |why| ElfError::Segment { index, why };
    let (kind, offset, paddr) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24));
    let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
    if kind != PT_LOAD && kind != PT_NOTE {
        return Ok(());
    }
    if offset.checked_add(filesz).is_none_or(|end| end > size) {
        return Err(bad("its bytes run past the end of the file"));
    }
    if kind == PT_NOTE {
        if filesz > MAX_NOTES {
            return Err(bad("a PT_NOTE larger than 64 KiB"));
        }
        let bytes = vec![0; filesz as usize];
        layout.notes.push(Note { offset, bytes });
        return Ok(());
    }
    if filesz > memsz {
        return Err(bad(
            "more bytes in the file than in memory (filesz > memsz)",
        ));
    }
    if memsz == 0 {
        return Ok(());
    }
    if paddr < HIMEM_START {
        return Err(bad("below HIMEM_START"));
    }
    let in_ram = paddr.checked_add(memsz).is_some()
        && usize::try_from(memsz).is_ok_and(|len| mem.get_slice(GuestAddress(paddr), len).is_ok());
    if !in_ram {
        return Err(bad("not inside one region of guest RAM"));
    }
    layout.loads.push(Load {
        index,
        offset,
        filesz,
        paddr,
        memsz,
    });
    Ok(())
}

/// The PVH entry in a `PT_NOTE` segment's bytes, found as linux-loader finds it (its
/// `parse_elf_note`), except that a note header or the PVH note's name or entry past the segment's
/// end is refused rather than read from the bytes after it.
fn pvh_entry_of(notes: &[u8]) -> Result<Option<u64>, ElfError> {
    let field = |at: u64, len: usize, why| {
        usize::try_from(at)
            .ok()
            .and_then(|at| notes.get(at..at.checked_add(len)?))
            .ok_or(ElfError::Note(why))
    };
    let align4 = |n: u32| (u64::from(n) + 3) & !3;
    let mut at = 0u64;
    while at < notes.len() as u64 {
        let header = field(at, 12, "a note header runs past its segment")?;
        let (namesz, descsz, kind) = (u32_at(header, 0), u32_at(header, 4), u32_at(header, 8));
        let name_at = at + 12;
        let desc_at = name_at + align4(namesz);
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && namesz == 4 {
            let name = field(name_at, 4, "a Xen note's name runs past its segment")?;
            if name == b"Xen\0" {
                if descsz < 4 {
                    return Err(ElfError::Note("the PVH entry note holds less than 32 bits"));
                }
                let desc = field(desc_at, 4, "the PVH entry runs past its segment")?;
                return Ok(Some(u64::from(u32_at(desc, 0))));
            }
        }
        at = desc_at + align4(descsz);
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Building ELF files and comparing the sink with linux-loader (here and in `bzimage`).

    use super::*;
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use linux_loader::loader::KernelLoader;

    /// A program header and, for `PT_LOAD` and `PT_NOTE`, its file bytes.
    #[derive(Clone)]
    pub struct Seg {
        pub kind: u32,
        pub offset: u64,
        pub paddr: u64,
        pub filesz: u64,
        pub memsz: u64,
        /// Written at `offset` (at most `filesz` of them).
        pub data: Vec<u8>,
    }

    impl Seg {
        /// A `PT_LOAD` of `filesz` pseudo-random bytes (seeded by `paddr`) and `bss` more in memory.
        pub fn load(offset: u64, paddr: u64, filesz: u64, bss: u64) -> Seg {
            Seg {
                kind: PT_LOAD,
                offset,
                paddr,
                filesz,
                memsz: filesz + bss,
                data: noise(filesz as usize, paddr),
            }
        }

        /// A `PT_NOTE` holding `data`.
        pub fn note(offset: u64, data: Vec<u8>) -> Seg {
            Seg {
                kind: PT_NOTE,
                offset,
                paddr: 0,
                filesz: data.len() as u64,
                memsz: 0,
                data,
            }
        }
    }

    pub fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// One ELF note.
    pub fn elf_note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    /// Notes as a kernel has them: some Xen ones, a GNU build id, then (with `pvh`) the PVH entry
    /// as a 64-bit value (`_ASM_PTR`).
    pub fn kernel_notes(pvh: Option<u64>) -> Vec<u8> {
        let mut n = elf_note(b"Xen\0", 6, b"linux\0");
        n.extend(elf_note(
            b"Xen\0",
            3,
            &0xffff_ffff_8000_0000u64.to_le_bytes(),
        ));
        n.extend(elf_note(b"GNU\0", 3, &[7; 20]));
        // Type 18 under another name: not the PVH note.
        n.extend(elf_note(b"Linux\0", 18, &[1, 2, 3, 4]));
        if let Some(entry) = pvh {
            n.extend(elf_note(b"Xen\0", 18, &entry.to_le_bytes()));
        }
        n
    }

    /// An ELF64 x86_64 executable with these program headers (at offset 64) and their bytes.
    pub fn build_elf(entry: u64, segs: &[Seg]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 * segs.len()];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = ELFCLASS64;
        elf[5] = ELFDATA2LSB;
        elf[6] = 1;
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&entry.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, s) in segs.iter().enumerate() {
            let ph = &mut elf[64 + 56 * i..][..56];
            ph[0..4].copy_from_slice(&s.kind.to_le_bytes());
            ph[4..8].copy_from_slice(&7u32.to_le_bytes());
            ph[8..16].copy_from_slice(&s.offset.to_le_bytes());
            ph[16..24].copy_from_slice(&(s.paddr | 0xffff_ffff_0000_0000).to_le_bytes());
            ph[24..32].copy_from_slice(&s.paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&s.filesz.to_le_bytes());
            ph[40..48].copy_from_slice(&s.memsz.to_le_bytes());
            ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        for s in segs {
            // Where a hostile offset points nowhere, the bytes are left out.
            let end = (s.offset as usize).checked_add(s.data.len());
            let Some(end) = end.filter(|&end| end < 1 << 30) else {
                continue;
            };
            if elf.len() < end {
                elf.resize(end, 0);
            }
            elf[s.offset as usize..end].copy_from_slice(&s.data);
        }
        elf
    }

    pub fn guest_mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// How a test feeds a sink: the window it asks for, given the bytes left and the step.
    pub type Asking = fn(usize, usize) -> (usize, usize);

    /// A streaming decoder: any window up to all that is left.
    pub const ANY: Asking = |left, _| (1, left);
    /// Odd little windows.
    pub const TINY: Asking = |left, step| (1, left.min(1 + step % 7));
    /// Whole blocks of 1 MiB, as the LZ4 decoder asks.
    pub const BLOCKS: Asking = |left, _| (left.min(1 << 20), left.min(1 << 20));
    /// Blocks of 3000 bytes (not a divisor of anything in the ELF).
    pub const ODD_BLOCKS: Asking = |left, _| (left.min(3000), left.min(3000));

    /// Feeds `elf` to a sink over `mem` the way `asking` says, committing `commit(window)` bytes
    /// of each window.
    pub fn stream(
        mem: &GuestMemoryMmap,
        elf: &[u8],
        asking: Asking,
        partial: bool,
    ) -> Result<ElfKernel, ElfError> {
        let mut sink = ElfSink::new(mem, elf.len() as u64);
        let mut done = 0;
        let mut step = 0;
        let result = loop {
            if done == elf.len() {
                break sink.finish();
            }
            let (min, max) = asking(elf.len() - done, step);
            step += 1;
            let Some(w) = sink.window(min, max) else {
                break Err(sink.error().cloned().unwrap());
            };
            assert!(
                w.len() >= min && w.len() <= max,
                "{min}..={max}: {}",
                w.len()
            );
            let n = if partial && w.len() > min {
                min.max(w.len() / 2)
            } else {
                w.len()
            };
            w[..n].copy_from_slice(&elf[done..done + n]);
            if sink.commit(n).is_none() {
                break Err(sink.error().cloned().unwrap());
            }
            done += n;
        };
        if result.is_err() {
            sink.wipe();
        }
        result
    }

    /// What linux-loader's `Elf::load` makes of `elf` in a fresh memory of `size` bytes.
    pub fn linux_loader(elf: &[u8], size: usize) -> (GuestMemoryMmap, ElfKernel) {
        let mem = guest_mem(size);
        let r = Elf::load(
            &mem,
            None,
            &mut std::io::Cursor::new(elf),
            Some(GuestAddress(HIMEM_START)),
        )
        .expect("linux-loader loads it");
        let pvh_entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
            _ => None,
        };
        let kernel = ElfKernel {
            entry: r.kernel_load.0,
            kernel_end: r.kernel_end,
            pvh_entry,
        };
        (mem, kernel)
    }

    /// Whether two guest memories of the same size hold the same bytes (the first difference).
    pub fn first_difference(a: &GuestMemoryMmap, b: &GuestMemoryMmap, size: usize) -> Option<u64> {
        let mut x = vec![0u8; 1 << 20];
        let mut y = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < size {
            let n = x.len().min(size - at);
            a.read_slice(&mut x[..n], GuestAddress(at as u64)).unwrap();
            b.read_slice(&mut y[..n], GuestAddress(at as u64)).unwrap();
            if x[..n] != y[..n] {
                let i = x[..n]
                    .iter()
                    .zip(&y[..n])
                    .position(|(p, q)| p != q)
                    .unwrap();
                return Some((at + i) as u64);
            }
            at += n;
        }
        None
    }

    /// Whether the first `size` bytes of `mem` are all zero.
    pub fn all_zero(mem: &GuestMemoryMmap, size: usize) -> bool {
        first_difference(mem, &guest_mem(size), size).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    const MEM: usize = 64 << 20;

    /// Like a vmlinux: text+rodata (with the notes inside), data, percpu (its own delta, placed in
    /// memory between the others, after them in the file), then init with bss; paddr order is not
    /// file order.
    fn kernel_like(pvh: Option<u64>) -> (u64, Vec<Seg>) {
        let notes = kernel_notes(pvh);
        let text = Seg::load(0x20_0000, 0x100_0000, 0x23_4567, 0);
        let mut text_with_notes = text.clone();
        let note_at = 0x1f_0000;
        text_with_notes.data[note_at..note_at + notes.len()].copy_from_slice(&notes);
        let segs = vec![
            text_with_notes,
            Seg::load(0x60_0000, 0x150_0000, 0x9_8000, 0),
            Seg::load(0x70_0000, 0x140_0000, 0x3_4000, 0),
            Seg::load(0x74_e123, 0x160_0123, 0x12_3456, 0x7_b000),
            Seg::note(0x20_0000 + note_at as u64, notes),
        ];
        (0x100_0000, segs)
    }

    fn assert_like_linux_loader(elf: &[u8], what: &str) {
        let (want_mem, want) = linux_loader(elf, MEM);
        for (name, asking) in [
            ("any", ANY),
            ("tiny", TINY),
            ("blocks", BLOCKS),
            ("odd blocks", ODD_BLOCKS),
        ] {
            for partial in [false, true] {
                if name == "tiny" && partial {
                    continue;
                }
                let mem = guest_mem(MEM);
                let got = stream(&mem, elf, asking, partial)
                    .unwrap_or_else(|e| panic!("{what} ({name}, partial {partial}): {e}"));
                assert_eq!(got, want, "{what} ({name}, partial {partial})");
                assert_eq!(
                    first_difference(&mem, &want_mem, MEM),
                    None,
                    "{what} ({name}, partial {partial})"
                );
            }
        }
    }

    #[test]
    fn loads_like_linux_loader() {
        let (entry, segs) = kernel_like(Some(0x100_0850));
        let elf = build_elf(entry, &segs);
        assert_like_linux_loader(&elf, "kernel-like with PVH");
        let (_, want) = linux_loader(&elf, MEM);
        assert_eq!(want.pvh_entry, Some(0x100_0850));
        assert_eq!(want.kernel_end, 0x160_0123 + 0x12_3456 + 0x7_b000);

        // The same notes without the PVH one; no notes at all.
        let (entry, segs) = kernel_like(None);
        let elf = build_elf(entry, &segs);
        assert_like_linux_loader(&elf, "kernel-like without PVH");
        assert_eq!(linux_loader(&elf, MEM).1.pvh_entry, None);
        let elf = build_elf(entry, &segs[..4]);
        assert_like_linux_loader(&elf, "no PT_NOTE");

        // A segment that holds the headers themselves (offset 0), one after another with no gap,
        // and a note segment at the file's end outside any PT_LOAD.
        let notes = kernel_notes(Some(0x20_0000));
        let mut segs = vec![
            Seg::load(0, 0x10_0000, 0x1234, 0x100),
            Seg::load(0x1234, 0x20_0000, 0x5_0000, 0),
            Seg::note(0x5_1234, notes.clone()),
        ];
        let mut headers_only = segs.clone();
        headers_only[0].data.clear();
        let head = build_elf(0x20_0000, &headers_only)[..64 + 56 * 3].to_vec();
        segs[0].data[..head.len()].copy_from_slice(&head);
        let elf = build_elf(0x20_0000, &segs);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_like_linux_loader(&elf, "headers inside a segment");
    }

    /// The sink refuses, without a panic, and leaves guest memory zero.
    fn refused(elf: &[u8], what: &str) -> ElfError {
        let mut errors = [ANY, BLOCKS].map(|asking| {
            let mem = guest_mem(MEM);
            let err = stream(&mem, elf, asking, false).expect_err(what);
            assert!(all_zero(&mem, MEM), "{what}: memory written");
            err
        });
        std::mem::replace(&mut errors[0], ElfError::NoSegments)
    }

    type Case = (&'static str, Vec<u8>, fn(&ElfError) -> bool);

    #[test]
    fn refuses_hostile_elfs() {
        let (entry, segs) = kernel_like(Some(0x100_0850));
        let good = build_elf(entry, &segs);
        let with = |f: &dyn Fn(&mut Vec<Seg>)| {
            let mut s = segs.clone();
            f(&mut s);
            build_elf(entry, &s)
        };
        let cases: Vec<Case> = vec![
            (
                "overlap",
                with(&|s| s[2].paddr = 0x150_0000 + 0x9_7000),
                |e| matches!(e, ElfError::Overlap(1, 2)),
            ),
            (
                "bss overlaps the next segment",
                with(&|s| s[0].memsz = 0x50_0000),
                |e| matches!(e, ElfError::Overlap(0, _)),
            ),
            ("outside RAM", with(&|s| s[1].paddr = MEM as u64), |e| {
                matches!(e, ElfError::Segment { index: 1, .. })
            }),
            (
                "crosses the end of RAM",
                with(&|s| s[3].paddr = MEM as u64 - 0x1000),
                |e| matches!(e, ElfError::Segment { index: 3, .. }),
            ),
            (
                "bss past the end of RAM",
                with(&|s| s[3].memsz = MEM as u64),
                |e| matches!(e, ElfError::Segment { index: 3, .. }),
            ),
            ("below HIMEM_START", with(&|s| s[2].paddr = 0x8_0000), |e| {
                matches!(e, ElfError::Segment { index: 2, .. })
            }),
            (
                "filesz > memsz",
                with(&|s| s[1].memsz = s[1].filesz - 1),
                |e| matches!(e, ElfError::Segment { index: 1, .. }),
            ),
            (
                "memsz overflows",
                with(&|s| s[3].memsz = u64::MAX - 0x1000),
                |e| matches!(e, ElfError::Segment { index: 3, .. }),
            ),
            (
                "file bytes past the end",
                with(&|s| s[3].filesz = 0x1000_0000),
                |e| matches!(e, ElfError::Segment { index: 3, .. }),
            ),
            (
                "offset overflows",
                with(&|s| s[1].offset = u64::MAX - 10),
                |e| matches!(e, ElfError::Segment { index: 1, .. }),
            ),
            (
                "note past the end",
                {
                    // In the program header only (`build_elf` would grow the file to hold it).
                    let mut e = good.clone();
                    let past = (good.len() as u64 - 8).to_le_bytes();
                    e[64 + 56 * 4 + 8..][..8].copy_from_slice(&past);
                    e
                },
                |e| matches!(e, ElfError::Segment { index: 4, .. }),
            ),
            ("huge note", with(&|s| s[4].filesz = MAX_NOTES + 4), |e| {
                matches!(e, ElfError::Segment { index: 4, .. })
            }),
            (
                "no PT_LOAD",
                with(&|s| s.retain(|s| s.kind == PT_NOTE)),
                |e| *e == ElfError::NoSegments,
            ),
        ];
        for (what, elf, ok) in cases {
            let err = refused(&elf, what);
            assert!(ok(&err), "{what}: {err}");
        }

        let header = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut e = good.clone();
            f(&mut e);
            e
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("not ELF", header(&|e| e[0] = b'E')),
            ("ELF32", header(&|e| e[4] = 1)),
            ("big-endian", header(&|e| e[5] = 2)),
            ("not x86_64", header(&|e| e[18] = 3)),
            ("program header size", header(&|e| e[54] = 32)),
            ("program headers in the ELF header", header(&|e| e[32] = 8)),
            ("no program headers", header(&|e| e[56..58].fill(0))),
            ("65535 program headers", header(&|e| e[56..58].fill(0xff))),
            ("65 program headers", header(&|e| e[56] = 65)),
            (
                "program headers past the end",
                header(&|e| {
                    let past = (e.len() as u64 - 100).to_le_bytes();
                    e[32..40].copy_from_slice(&past)
                }),
            ),
            (
                "program headers far out",
                header(&|e| e[32..40].copy_from_slice(&(u64::MAX - 100).to_le_bytes())),
            ),
            ("entry below HIMEM_START", header(&|e| e[24..32].fill(0))),
            ("just a header", good[..100].to_vec()),
            ("nothing", Vec::new()),
        ];
        for (what, elf) in cases {
            if elf.is_empty() {
                let mem = guest_mem(MEM);
                let mut sink = ElfSink::new(&mem, 0);
                assert!(sink.window(1, 1).is_none(), "{what}");
                assert!(sink.finish().is_err(), "{what}");
                continue;
            }
            refused(&elf, what);
        }
    }

    #[test]
    fn refuses_bad_pvh_notes_as_linux_loader_does_or_stricter() {
        let (entry, segs) = kernel_like(None);
        let with_notes = |notes: Vec<u8>| {
            let mut s = segs.clone();
            let n = notes.len();
            s[4].data = notes;
            s[4].filesz = n as u64;
            let notes = s[4].data.clone();
            s[0].data[0x1f_0000..0x1f_0000 + n].copy_from_slice(&notes);
            build_elf(entry, &s)
        };
        // The PVH note with a 16-bit descriptor: linux-loader refuses it too.
        let short = with_notes(elf_note(b"Xen\0", 18, &[1, 2]));
        assert!(linux_loader_refuses(&short));
        assert_eq!(
            refused(&short, "short PVH note"),
            ElfError::Note("the PVH entry note holds less than 32 bits")
        );
        // A note header cut by the segment's end.
        let mut cut = kernel_notes(Some(0x100_0000));
        cut.truncate(cut.len() - 12);
        let cut = with_notes(cut);
        assert!(matches!(refused(&cut, "cut note"), ElfError::Note(_)));
        // Sizes that would overflow 32 bits once aligned, and a huge descriptor: the walk ends.
        let mut huge = elf_note(b"Xen\0", 6, b"linux\0");
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mem = guest_mem(MEM);
        assert_eq!(
            stream(&mem, &with_notes(huge), ANY, false)
                .unwrap()
                .pvh_entry,
            None
        );
        let mut huge = elf_note(b"Xen\0", 6, b"linux\0");
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        huge.extend(elf_note(b"Xen\0", 18, &[1, 0, 0, 1]));
        let mem = guest_mem(MEM);
        assert_eq!(
            stream(&mem, &with_notes(huge), ANY, false)
                .unwrap()
                .pvh_entry,
            None
        );
        // An empty PT_NOTE after one with the entry: the last one decides, as with linux-loader.
        let (entry, mut segs) = kernel_like(Some(0x100_0850));
        segs.push(Seg::note(0x100, Vec::new()));
        let elf = build_elf(entry, &segs);
        assert_eq!(linux_loader(&elf, MEM).1.pvh_entry, None);
        assert_like_linux_loader(&elf, "empty last note");
    }

    fn linux_loader_refuses(elf: &[u8]) -> bool {
        use linux_loader::loader::KernelLoader;
        linux_loader::loader::elf::Elf::load(
            &guest_mem(MEM),
            None,
            &mut std::io::Cursor::new(elf),
            Some(GuestAddress(HIMEM_START)),
        )
        .is_err()
    }

    #[test]
    fn refuses_truncated_and_overlong_streams_and_wipes_what_it_wrote() {
        let (entry, segs) = kernel_like(Some(0x100_0850));
        let elf = build_elf(entry, &segs);
        for cut in [10, 64, 200, 0x20_0000, 0x30_0000, elf.len() - 1] {
            for asking in [ANY, BLOCKS] {
                let mem = guest_mem(MEM);
                let mut sink = ElfSink::new(&mem, elf.len() as u64);
                let mut done = 0;
                while done < cut {
                    let (min, max) = asking(cut - done, 0);
                    let w = sink.window(min, max).unwrap();
                    let n = w.len().min(cut - done);
                    w[..n].copy_from_slice(&elf[done..done + n]);
                    sink.commit(n).unwrap();
                    done += n;
                }
                assert_eq!(
                    sink.finish(),
                    Err(ElfError::Truncated {
                        got: cut as u64,
                        size: elf.len() as u64
                    })
                );
                // Decoded into the next window, then the payload turned out corrupt.
                if let Some(w) = sink.window(1, 1) {
                    w[0] = 0xff;
                }
                sink.wipe();
                assert!(all_zero(&mem, MEM), "cut at {cut}");
            }
        }
        // A window past the announced size, and a commit larger than the window.
        let mem = guest_mem(MEM);
        let mut sink = ElfSink::new(&mem, elf.len() as u64);
        assert!(sink.window(1, elf.len() + 1).is_none());
        assert!(matches!(sink.error(), Some(ElfError::BadWindow(_))));
        let mut sink = ElfSink::new(&mem, elf.len() as u64);
        assert!(sink.window(1, 10).is_some());
        assert!(sink.commit(11).is_none());
        let mut sink = ElfSink::new(&mem, elf.len() as u64);
        assert!(sink.commit(1).is_none(), "a commit without a window");
        // The stream goes on after a refusal: nothing more is taken.
        assert!(sink.window(1, 1).is_none());
    }

    #[test]
    fn writes_guest_memory_directly_inside_segments() {
        let (entry, segs) = kernel_like(None);
        let elf = build_elf(entry, &segs);
        let mem = guest_mem(MEM);
        let mut sink = ElfSink::new(&mem, elf.len() as u64);
        let mut direct = 0;
        let mut done = 0;
        while done < elf.len() {
            let w = sink.window(1, elf.len() - done).unwrap();
            let n = w.len();
            let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let at = w.as_ptr() as usize;
            if (host..host + MEM).contains(&at) {
                direct += n;
            }
            w.copy_from_slice(&elf[done..done + n]);
            sink.commit(n).unwrap();
            done += n;
        }
        sink.finish().unwrap();
        let in_segments: u64 = segs[..4].iter().map(|s| s.filesz).sum();
        assert_eq!(direct as u64, in_segments);
    }
}
