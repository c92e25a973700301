//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): not part of exitless's API.
//!
//! Each function takes the fuzzer's bytes and drives one piece of code that parses guest- or
//! user-controlled input, the way the VMM drives it; none may panic, whatever the bytes.
//! `fuzz/fuzz_targets/*.rs` are one line each over these, and the regression tests of the
//! modules they reach feed the crashing inputs to the same code.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::bzimage::{Payload, VecOutput};
use crate::arch::x86_64::elf_stream::ElfSink;
use crate::devices::virtio::irq::{Msix, NoRoutes};
use crate::devices::virtio::queue::{Identity, Vq};
use crate::devices::virtio::{Activation, VirtioDevice};

/// Largest unpacked size the bzImage target lets a `VecOutput` have (the code's own bound,
/// `MAX_UNPACKED`, is 512 MiB: fine for a boot, too slow for a fuzzer's every input).
const FUZZ_MAX_VEC: usize = 16 << 20;

/// A bzImage around `payload`: a setup header (boot protocol 2.15, one setup sector) whose
/// `payload_offset`/`payload_length` name `payload`, placed right after the setup.
pub fn bzimage_around(payload: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; 1024];
    image[0x1f1] = 1;
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
    image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    image.extend_from_slice(payload);
    image
}

/// bzImage unpacking: the first byte picks whether `data[1..]` is a whole image (the header
/// parse) or a payload (wrapped by [`bzimage_around`], to reach the decoders); the payload is
/// unpacked into a `VecOutput` (sizes up to 16 MiB) and streamed into an `ElfSink` over 4 MiB of
/// guest memory (every size).
pub fn bzimage(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let image = if mode & 1 == 0 {
        bzimage_around(rest)
    } else {
        rest.to_vec()
    };
    let Some(payload) = Payload::of(&image) else {
        return;
    };
    if payload.size() <= FUZZ_MAX_VEC {
        let mut out = VecOutput::new(payload.size());
        if payload.unpack_into(&mut out).is_some() {
            assert_eq!(out.into_vec().len(), payload.size());
        }
    }
    let mem = guest_memory(4 << 20);
    let mut sink = ElfSink::new(&mem, payload.size() as u64);
    let unpacked = payload.unpack_into(&mut sink);
    let kernel = sink.finish();
    if unpacked.is_none() || kernel.is_err() {
        sink.wipe();
    }
}

/// The kernel-ELF sink on its own: `data` is the unpacked file, fed in pieces whose sizes come
/// from its first bytes (as a decoder's windows would be), into 4 MiB of guest memory.
pub fn elf_sink(data: &[u8]) {
    use crate::arch::x86_64::bzimage::Output;
    if data.len() < 2 {
        return;
    }
    let (step, file) = (
        usize::from(u16::from_le_bytes([data[0], data[1]])) + 1,
        &data[2..],
    );
    let mem = guest_memory(4 << 20);
    let mut sink = ElfSink::new(&mem, file.len() as u64);
    let mut done = 0;
    while done < file.len() {
        let want = step.min(file.len() - done);
        let Some(w) = sink.window(1, want) else {
            break;
        };
        let n = w.len().min(want);
        w[..n].copy_from_slice(&file[done..done + n]);
        if sink.commit(n).is_none() {
            break;
        }
        done += n;
    }
    if sink.finish().is_err() {
        sink.wipe();
    }
}

/// A control-API request (first line `METHOD PATH`, the rest its body), against a VM that does
/// nothing: every answer is a status the API documents, with a JSON body.
pub fn api_line(data: &[u8]) {
    struct Idle;
    impl crate::api::Control for Idle {
        fn info(&self) -> serde_json::Value {
            serde_json::json!({"state": "running"})
        }
        fn pause(&self) -> Result<(), crate::api::ApiError> {
            Err(crate::api::ApiError::bad_request(
                "cannot pause a VM that is paused",
            ))
        }
        fn resume(&self) -> Result<(), crate::api::ApiError> {
            Ok(())
        }
        fn stats(&self) -> serde_json::Value {
            serde_json::json!({"uptime_s": 1.0})
        }
        fn snapshot(
            &self,
            _dir: &std::path::Path,
        ) -> Result<serde_json::Value, crate::api::ApiError> {
            Err(crate::api::ApiError::bad_request(
                "cannot snapshot a VM that is running",
            ))
        }
        fn set_balloon(&self, bytes: u64) -> Result<u32, String> {
            u32::try_from(bytes / 4096).map_err(|e| e.to_string())
        }
        fn quit(&self) {}
        fn power_button(
            &self,
            _grace: std::time::Duration,
        ) -> Result<serde_json::Value, crate::api::ApiError> {
            Ok(serde_json::json!({"acpi": true}))
        }
    }
    let (line, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, answer) = crate::api::handle(method, path, body, &Idle);
    // 409 is the answer for a request the VM cannot do as asked (here: a balloon target past
    // 2^32 pages, which `Idle` refuses as a VM refuses one larger than its memory).
    let conflict = status == 409 && method == "PUT" && path == "/api/v1/vm/balloon";
    assert!(
        [200, 400, 404, 405].contains(&status) || conflict,
        "{status} for {method} {path}: {answer}"
    );
    assert!(answer.is_object(), "an answer is a JSON object: {answer}");
}

/// Guest memory of `size` bytes from address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
}

/// Entries of each fuzzed queue.
const QUEUE_SIZE: u16 = 16;
/// Guest memory of the virtio targets.
const VIRTIO_MEM: usize = 1 << 20;
/// Where queue `q`'s rings go: `q * RING_STRIDE` + descriptor table, avail ring, used ring.
const RING_STRIDE: u64 = 0x1000;
const AVAIL_OFF: u64 = 0x100;
const USED_OFF: u64 = 0x200;
/// Where the fuzzer's buffer bytes go.
const BUFFERS: u64 = 0x10000;

/// A device's queues driven by a hostile driver. `data`, read in order (missing bytes are 0):
/// one byte of options (bit 0: `EVENT_IDX`), then for each queue: a descriptor count `n` (at most
/// the queue's 16 entries), `n` descriptors of 8 bytes (u16 address in 16-byte units, `0xffff`:
/// far outside memory; u16 length, `0xffff`: 4 GiB - 1; u8 flags; u8 next), an available count
/// `m`, `m` head bytes; then the bytes the buffers hold, from `BUFFERS` on. The device is
/// activated with every queue and each queue is processed in turn, twice.
fn virtio_queues(dev: &mut dyn VirtioDevice, mem: &GuestMemoryMmap, data: &[u8]) {
    let nq = dev.queue_max_sizes().len();
    let queues = fuzzed_queues(nq, mem, data);
    let features = dev.features();
    let stats = dev.stats();
    let Ok(handler) = dev.activate(Activation {
        mem: mem.clone(),
        queues,
        features,
        stats,
    }) else {
        return;
    };
    process_twice(handler, nq);
}

/// Processes each of `nq` queues in turn, twice (a second pass finds what the first left).
fn process_twice(mut handler: Box<dyn crate::devices::virtio::QueueHandler>, nq: usize) {
    for _ in 0..2 {
        for q in 0..nq {
            if handler.process(q).is_err() {
                return;
            }
        }
    }
}

/// The queues of [`virtio_queues`], laid out from `data` in `mem`.
fn fuzzed_queues(nq: usize, mem: &GuestMemoryMmap, data: &[u8]) -> Vec<Vq> {
    let mut pos = 0;
    let mut next = || {
        pos += 1;
        data.get(pos - 1).copied().unwrap_or(0)
    };
    let event_idx = next() & 1 != 0;
    let msix = Arc::new(Msix::new(nq as u16 + 1, Arc::new(NoRoutes::default())).expect("msix"));
    let mut queues = Vec::new();
    for q in 0..nq {
        let base = q as u64 * RING_STRIDE;
        let n = next().min(QUEUE_SIZE as u8);
        for i in 0..u64::from(n) {
            let unit = u16::from_le_bytes([next(), next()]);
            let addr = match unit {
                0xffff => 0x7fff_ffff_f000u64,
                u => u64::from(u) * 16,
            };
            let len = match u16::from_le_bytes([next(), next()]) {
                0xffff => u32::MAX,
                l => u32::from(l),
            };
            let (flags, nxt) = (u16::from(next()), u16::from(next()));
            let d = base + 16 * i;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(nxt, GuestAddress(d + 14)).unwrap();
        }
        let m = next();
        for k in 0..u64::from(m) {
            let slot = base + AVAIL_OFF + 4 + 2 * (k % u64::from(QUEUE_SIZE));
            mem.write_obj(u16::from(next()), GuestAddress(slot))
                .unwrap();
        }
        mem.write_obj(u16::from(m), GuestAddress(base + AVAIL_OFF + 2))
            .unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
        queue.set_size(QUEUE_SIZE);
        queue
            .try_set_desc_table_address(GuestAddress(base))
            .expect("aligned");
        queue
            .try_set_avail_ring_address(GuestAddress(base + AVAIL_OFF))
            .expect("aligned");
        queue
            .try_set_used_ring_address(GuestAddress(base + USED_OFF))
            .expect("aligned");
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queues.push(Vq {
            queue,
            index: q as u16,
            mem: mem.clone(),
            translate: Arc::new(Identity),
            msix: msix.clone(),
            vector: q as u16,
            bad_chains: 0,
            polling: false,
            moderator: Default::default(),
            signalled: 0,
        });
    }
    let rest = data.get(pos..).unwrap_or_default();
    let rest = &rest[..rest.len().min(VIRTIO_MEM - BUFFERS as usize)];
    mem.write_slice(rest, GuestAddress(BUFFERS)).unwrap();
    queues
}

/// virtio-net over a datagram socket pair standing in for the tap (no host network), queues
/// as [`virtio_queues`] lays them out (receive, transmit, control). The options byte picks the
/// features: bit 1 `MRG_RXBUF`, bit 2 `CTRL_VQ`, bit 3 `GUEST_CSUM`, bit 4 `NOTF_COAL`, bit 5
/// adaptive moderation; the first 1600 buffer bytes (from `BUFFERS` on) are also sent as a frame
/// from the host side before the queues are processed, so receive has something to deliver.
/// Control commands (`NOTF_COAL`'s included) come from the control queue's chains.
pub fn virtio_net(data: &[u8]) {
    use crate::devices::virtio::moderation::Coalesce;
    use crate::devices::virtio::tap::Tap;
    use std::os::fd::FromRawFd;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_NOTF_COAL,
    };
    let opts = data.first().copied().unwrap_or(0);
    let mut features = 1u64 << 32;
    for (b, f) in [
        (1, VIRTIO_NET_F_MRG_RXBUF),
        (2, VIRTIO_NET_F_CTRL_VQ),
        (3, VIRTIO_NET_F_GUEST_CSUM),
        (4, VIRTIO_NET_F_NOTF_COAL),
    ] {
        if opts & (1 << b) != 0 {
            features |= 1 << f;
        }
    }
    let coalesce = if opts & 0x20 != 0 {
        Coalesce::Adaptive { cap_us: 32 }
    } else {
        Coalesce::Off
    };
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair returns; checked.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both descriptors are fresh and owned here alone.
    let (ours, peer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mem = guest_memory(VIRTIO_MEM);
    let queues = fuzzed_queues(3, &mem, data);
    let mut frame = vec![0u8; 1600];
    let _ = mem.read_slice(&mut frame, GuestAddress(BUFFERS));
    let _ = std::io::Write::write(&mut &peer, &frame);
    let stats = Arc::new(crate::devices::virtio::DeviceStats::default());
    let tap = Arc::new(Tap::from_file(ours, "fuzz"));
    let Ok(h) = crate::devices::virtio::net::handler(queues, tap, features, stats, coalesce) else {
        return;
    };
    process_twice(Box::new(h), 3);
}

/// The boot-time tables from a hostile configuration: a guest memory size (as `--mem` gives it,
/// parsed from text when the first byte is odd), a vCPU count, an ECAM window (any base, any
/// bus range) and a DMAR base. The E820 map of the size must keep its RAM out of the MMIO hole,
/// its entries apart and non-empty, and count every byte of RAM once; the ACPI tables, written
/// into guest memory of 0.5 to 2 MiB, must either fail with an error or leave an RSDP whose
/// checksums and XSDT entries hold.
pub fn acpi_e820(data: &[u8]) {
    use crate::arch::x86_64::acpi::{setup_acpi_tables, AcpiConfig, EcamRegion};
    use crate::arch::x86_64::boot::e820_map;
    use crate::arch::x86_64::layout::{HIGH_RAM_START, MMIO_HOLE_START};
    let mut b = [0u8; 32];
    let n = data.len().min(32);
    b[..n].copy_from_slice(&data[..n]);
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let mem_bytes = if b[0] & 1 != 0 {
        let text = String::from_utf8_lossy(data.get(32..).unwrap_or_default());
        match crate::config::parse_size(&text) {
            Ok(v) => v,
            Err(_) => return,
        }
    } else {
        word(1)
    };
    if crate::memory::check_size(mem_bytes).is_err() {
        return; // refused before any table is built (memory::create)
    }
    let (low, high) = crate::memory::split(mem_bytes);
    let map = e820_map(low, high, b[0] & 2 != 0);
    let mut ram = 0u64;
    for (i, &(a, len, ty)) in map.iter().enumerate() {
        assert!(len > 0, "an empty E820 entry in {map:x?}");
        let end = a.checked_add(len).expect("an E820 entry wraps");
        if ty == 1 {
            assert!(end <= MMIO_HOLE_START || a >= HIGH_RAM_START, "{map:x?}");
            ram += len;
        }
        for &(a2, len2, _) in &map[i + 1..] {
            assert!(
                end <= a2 || a2 + len2 <= a,
                "overlapping E820 entries: {map:x?}"
            );
        }
    }
    // Every byte of RAM once, less the BIOS area and the gap below 1 MiB.
    use crate::arch::x86_64::layout::{EBDA_START, HIMEM_START};
    assert_eq!(ram, EBDA_START + (low - HIMEM_START) + high, "{map:x?}");

    let cfg = AcpiConfig {
        num_cpus: b[9],
        pci_ecam: (b[0] & 4 != 0).then(|| EcamRegion {
            base: word(10),
            start_bus: b[18],
            end_bus: b[19],
        }),
        dmar: (b[0] & 8 != 0).then(|| word(20)),
    };
    let mem = guest_memory([512 << 10, 1 << 20, 2 << 20, 2 << 20][usize::from(b[28] % 4)]);
    let Ok(rsdp) = setup_acpi_tables(&mem, &cfg) else {
        return;
    };
    let table = |at: u64, len: usize| {
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(at))
            .expect("a table in memory");
        t
    };
    let sum = |t: &[u8]| t.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    let r = table(rsdp.0, 36);
    assert_eq!(&r[..8], b"RSD PTR ");
    assert_eq!(sum(&r[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    let xsdt_at = u64::from_le_bytes(r[24..32].try_into().unwrap());
    let head = table(xsdt_at, 36);
    let xlen = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    let xsdt = table(xsdt_at, xlen);
    assert_eq!(sum(&xsdt), 0, "XSDT checksum");
    for e in xsdt[36..].chunks_exact(8) {
        let at = u64::from_le_bytes(e.try_into().unwrap());
        let h = table(at, 36);
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        assert_eq!(sum(&table(at, len)), 0, "checksum of {:?}", &h[..4]);
    }
}

/// A directory of this process's own for the files and sockets of the device targets.
fn scratch_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("exitless-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch directory");
        d
    })
}

/// virtio-blk over a 64 KiB image (the same image for every input of a process; it is unlinked
/// once open and reached through `/proc/self/fd`, so nothing is left behind), queues as
/// [`virtio_queues`] lays them out; bit 1 of the options byte makes the disk read-only.
pub fn virtio_block(data: &[u8]) {
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::config::DiskConfig;
    use std::os::fd::AsRawFd;
    static IMAGE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        let path = scratch_dir().join("disk.img");
        std::fs::write(&path, vec![0xaau8; 64 << 10]).expect("disk image");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("disk image");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(scratch_dir());
        f
    });
    let cfg = DiskConfig {
        path: format!("/proc/self/fd/{}", image.as_raw_fd()).into(),
        readonly: data.first().is_some_and(|o| o & 2 != 0),
        id: Some("fuzz".into()),
        direct: false,
        swap_mapper: false,
        coalesce: Default::default(),
    };
    let mut dev = Block::open(&cfg, 0).expect("virtio-blk");
    virtio_queues(&mut dev, &guest_memory(VIRTIO_MEM), data);
}

/// virtio-rng, queues as [`virtio_queues`] lays them out.
pub fn virtio_rng(data: &[u8]) {
    let mut dev = crate::devices::virtio::rng::Rng::new();
    virtio_queues(&mut dev, &guest_memory(VIRTIO_MEM), data);
}

/// virtio-balloon with every queue offered (statistics, reporting), queues as
/// [`virtio_queues`] lays them out.
pub fn virtio_balloon(data: &[u8]) {
    use crate::devices::virtio::balloon::Balloon;
    use crate::devices::virtio::config::BalloonConfig;
    let mem = guest_memory(VIRTIO_MEM);
    let cfg = BalloonConfig {
        size: 64 << 10,
        stats_interval: 1,
        reporting: true,
        deflate_on_oom: data.first().is_some_and(|o| o & 2 != 0),
    };
    let mut dev = Balloon::new(&cfg, &mem).expect("virtio-balloon");
    virtio_queues(&mut dev, &mem, data);
}

/// virtio-vsock (guest cid 3) with its host socket in a directory of this process's own, queues
/// as [`virtio_queues`] lays them out: the guest's packets go through the muxer (connections
/// to host ports find no socket), its replies back to the rx queue.
pub fn virtio_vsock(data: &[u8]) {
    use crate::devices::virtio::config::VsockConfig;
    use crate::devices::virtio::vsock::Vsock;
    let dir = scratch_dir();
    std::fs::create_dir_all(dir).expect("scratch directory");
    let cfg = VsockConfig {
        cid: 3,
        socket: dir.join("v.sock"),
    };
    let mut dev = Vsock::new(&cfg).expect("virtio-vsock");
    virtio_queues(&mut dev, &guest_memory(VIRTIO_MEM), data);
    drop(dev);
    let _ = std::fs::remove_dir(dir);
}

/// The PCI side of a virtio device as a guest reaches it: configuration space through ECAM and
/// through 0xcf8/0xcfc, BAR 0 (common configuration, notifications, ISR, device configuration,
/// MSI-X table and PBA). `data` is a list of 12-byte accesses: u8 kind (0-1 ECAM read/write,
/// 2-3 0xcf8/0xcfc read/write, 4-5 BAR read/write, kind / 6 picks the length 1, 2, 4 or 8),
/// u24 offset (within the region), u64 value for a write. The device is virtio-rng (a driver
/// that gets as far as DRIVER_OK starts its worker thread, stopped at the end).
pub fn pci(data: &[u8]) {
    use crate::devices::pci::{ConfigAddress, ConfigData, Ecam, PciDevice, PciRoot};
    use crate::devices::virtio::transport::{VirtioPci, BAR_SIZE};
    use crate::devices::BusDevice;
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;
    const BAR0: u64 = 0xc000_0000;
    let mem = guest_memory(VIRTIO_MEM);
    let dev = VirtioPci::new(
        Box::new(crate::devices::virtio::rng::Rng::new()),
        BAR0,
        mem,
        Arc::new(Identity),
        Arc::new(NoRoutes::default()),
    )
    .expect("virtio-pci");
    let dev = Arc::new(Mutex::new(dev));
    let mut root = PciRoot::default();
    let as_pci: Arc<Mutex<dyn PciDevice>> = dev.clone();
    root.add(as_pci).expect("a PCI slot");
    let root = Arc::new(root);
    let mut ecam = Ecam(root.clone());
    let address = Arc::new(AtomicU32::new(0));
    let mut cf8 = ConfigAddress(address.clone());
    let mut cfc = ConfigData { address, root };
    for op in data.chunks_exact(12) {
        let kind = op[0] % 24;
        let len = [1, 2, 4, 8][usize::from(kind / 6)];
        let offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], 0]));
        let mut value = [0u8; 8];
        value.copy_from_slice(&op[4..12]);
        let buf = &mut value[..len];
        match kind % 6 {
            0 => ecam.read(offset % (1 << 20), buf),
            1 => ecam.write(offset % (1 << 20), buf),
            // The I/O ports: 0xcf8 takes 4-byte accesses at offset 0, 0xcfc 1 to 4 bytes.
            2 | 3 if offset & 0x100 != 0 && len == 4 => {
                if kind % 6 == 2 {
                    cf8.read(0, buf)
                } else {
                    cf8.write(0, buf)
                }
            }
            2 if len <= 4 => cfc.read(offset % 4, buf),
            3 if len <= 4 => cfc.write(offset % 4, buf),
            2 | 3 => {}
            4 => dev.lock().unwrap().read(offset % BAR_SIZE, buf),
            _ => dev.lock().unwrap().write(offset % BAR_SIZE, buf),
        }
    }
    dev.lock().unwrap().stop_worker();
}

/// The emulated VT-d, as a guest drives it: the first 32 KiB of `data` become guest memory at 0
/// (root, context and page tables, the invalidation queue: wherever the register writes point),
/// the rest is a list of 12-byte operations: u8 kind (0 a 4-byte register write, 1 an 8-byte
/// one, 2 a register read, 3 a DMA), u16 register offset or requester ID, u8 DMA length / 16,
/// u64 value or I/O address (bit 0: a DMA write). A translated DMA's pieces must add up to its
/// length; nothing may panic or hang.
pub fn iommu(data: &[u8]) {
    use crate::devices::iommu::{regs::SIZE, Iommu, IommuConfig};
    let mem = guest_memory(1 << 20);
    let (image, ops) = data.split_at(data.len().min(0x8000));
    mem.write_slice(image, GuestAddress(0)).expect("1 MiB");
    let cfg = IommuConfig {
        caching_mode: data.first().is_some_and(|b| b & 1 != 0),
        ..Default::default()
    };
    let m = Iommu::new(mem, cfg, Arc::new(NoRoutes::default())).expect("iommu");
    for op in ops.chunks_exact(12) {
        let at = u16::from_le_bytes([op[1], op[2]]);
        let mut value = [0u8; 8];
        value.copy_from_slice(&op[4..12]);
        let v = u64::from_le_bytes(value);
        let off = u64::from(at) % SIZE;
        match op[0] % 4 {
            0 => m.write_reg(off & !3, &value[..4]),
            1 => m.write_reg(off & !7, &value),
            2 => {
                let mut b = [0u8; 8];
                m.read_reg(off & !7, &mut b);
            }
            _ => {
                let len = u64::from(op[3]) * 16;
                let mut out = Vec::new();
                if m.translate(at, v & !1, len, v & 1 != 0, &mut out).is_ok() && len > 0 {
                    assert_eq!(out.iter().map(|s| s.len).sum::<u64>(), len);
                }
            }
        }
    }
}

/// A snapshot's state file, as `exitless restore` reads it before it creates anything. The
/// first byte picks what `data[1..]` is: 0, a whole state file (the container's checks, then
/// every section's); 1, a JSON object of section bodies, put in a container with their
/// checksums by the snapshot's own writer (so the fuzzer reaches the sections' parsing and
/// checks, [`crate::snapshot::Sections::read`], without forging CRC-32s), whose `devices` are
/// then restored; 2, a `devices` section alone, restored. Restoring puts each saved state into
/// a fresh legacy device of that name, as a restore does, and then the device is read and
/// written at every offset: a saved state must not make a later guest access panic.
pub fn snapshot(data: &[u8]) {
    use crate::snapshot::{format, DeviceStates, Sections};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            if let Ok(r) = format::Reader::parse(rest, "fuzz") {
                let _ = Sections::read(&r);
            }
        }
        1 => {
            type Bodies = std::collections::BTreeMap<String, serde_json::Value>;
            let Ok(bodies) = serde_json::from_slice::<Bodies>(rest) else {
                return;
            };
            let mut w = format::Writer::default();
            for (name, body) in &bodies {
                if w.add(name, body).is_err() {
                    return;
                }
            }
            let text = w
                .into_bytes()
                .expect("sections that encoded once encode again");
            let r = format::Reader::parse(&text, "fuzz").expect("its own writer's file is valid");
            if let Ok(s) = Sections::read(&r) {
                restore_legacy(&s.devices);
            }
        }
        _ => {
            if let Ok(d) = serde_json::from_slice::<DeviceStates>(rest) {
                restore_legacy(&d);
            }
        }
    }
}

/// A saved virtio-rng or virtio-balloon state restored into a fresh device over 8 MiB of guest
/// memory (the checks of `transport`'s snapshot module, the queues made from it; no worker is
/// started): one that is taken must save again, and its registers are read. True if taken.
fn restore_virtio(key: &str, state: &serde_json::Value) -> bool {
    use crate::devices::virtio::{balloon, config, irq, queue, rng, transport, VirtioDevice};
    use crate::devices::BusDevice;
    // `NAME@BASE`: BAR 0 where the saved one was (a BAR never moves).
    let (name, base) = key.split_once('@').unwrap_or((key, ""));
    let Some(bar) = u64::from_str_radix(base.trim_start_matches("0x"), 16)
        .ok()
        .filter(|b| (0xc000_0000..0xe000_0000).contains(b) && b % transport::BAR_SIZE == 0)
    else {
        return false;
    };
    let mem = guest_memory(8 << 20);
    let dev: Box<dyn VirtioDevice> = match name {
        "virtio-rng" => Box::new(rng::Rng::new()),
        _ => match balloon::Balloon::new(&config::BalloonConfig::default(), &mem) {
            Ok(b) => Box::new(b),
            Err(_) => return false,
        },
    };
    let Ok(mut t) = transport::VirtioPci::new(
        dev,
        bar,
        mem,
        Arc::new(queue::Identity),
        Arc::new(irq::NoRoutes::default()),
    ) else {
        return false;
    };
    if t.restore_state(state).is_err() {
        return false;
    }
    t.save_state().expect("a restored device saves again");
    for offset in (0..0x38).step_by(2) {
        t.read(offset, &mut [0u8; 2]);
    }
    true
}

/// Every saved state whose name is a legacy device's, restored into a fresh one; each device
/// that took its state is then read and written at every offset of its range.
fn restore_legacy(d: &crate::snapshot::DeviceStates) {
    use crate::arch::x86_64::layout::ports;
    use crate::devices::legacy::{debug_exit, i8042, pm, probe, rtc, serial};
    use crate::devices::BusDevice;
    let (end, _ends) = std::sync::mpsc::channel();
    for (key, state) in d.pio.iter().chain(&d.mmio) {
        let name = key.split('@').next().unwrap_or_default();
        let (mut dev, len): (Box<dyn BusDevice>, u64) = match name {
            "serial" => {
                let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
                let watch = Arc::new(std::sync::Mutex::new(serial::ConsoleWatch::default()));
                let out = serial::ConsoleOut::new(None, watch, end.clone());
                (Box::new(serial::Serial::new(irq, out)), 8)
            }
            "rtc" => (Box::new(rtc::Rtc::new()), 2),
            "i8042" => (Box::new(i8042::I8042::new(end.clone())), 5),
            "acpi-pm" => (Box::new(pm::Pm::new(end.clone())), ports::PM_LEN.into()),
            "reset" => (Box::new(pm::ResetControl::new(end.clone())), 1),
            "debug-exit" => (Box::new(debug_exit::DebugExit::new(end.clone())), 4),
            "probe" => (Box::new(probe::Probe::pio(Arc::default())), 8),
            "virtio-rng" | "virtio-balloon" => {
                let _ = restore_virtio(key, state);
                continue;
            }
            _ => continue,
        };
        if dev.restore_state(state).is_err() {
            continue;
        }
        for offset in 0..len {
            for size in [1usize, 2, 4] {
                let mut b = [0u8; 4];
                dev.read(offset, &mut b[..size]);
            }
        }
        for offset in 0..len {
            dev.write(offset, &[0xa5]);
        }
        // Every RTC register through its index port (the clock's date arithmetic included).
        for reg in 0..=0x7fu8 {
            dev.write(0, &[reg]);
            dev.read(1, &mut [0u8]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// The seed corpus of the newer targets runs through them without a panic (the targets'
    /// own assertions included), in the ordinary test run.
    #[test]
    fn the_seed_corpus_runs_clean() {
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 4] = [
            ("api_line", super::api_line),
            ("virtio_net", super::virtio_net),
            ("acpi_e820", super::acpi_e820),
            ("snapshot", super::snapshot),
        ];
        for (name, target) in targets {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus")
                .join(name);
            let mut n = 0;
            for e in std::fs::read_dir(&dir).unwrap() {
                target(&std::fs::read(e.unwrap().path()).unwrap());
                n += 1;
            }
            assert!(n >= 3, "{n} seeds in {}", dir.display());
        }
    }

    /// The seeds of virtio states (from a snapshot of the virtio-snap guest, with --rng and
    /// --balloon): the real one is taken by both devices, the one with a damaged rng queue is
    /// refused for the rng only.
    #[test]
    fn virtio_state_seeds_are_taken_or_refused() {
        let seed = |name: &str| {
            let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/corpus/snapshot")
                .join(name);
            let d: crate::snapshot::DeviceStates =
                serde_json::from_slice(&std::fs::read(p).unwrap()[1..]).unwrap();
            d.mmio
        };
        let (rng, balloon) = ("virtio-rng@0xc0000000", "virtio-balloon@0xc0008000");
        let good = seed("virtio_devices");
        assert_eq!(good[rng]["active"], true);
        assert!(super::restore_virtio(rng, &good[rng]));
        assert!(super::restore_virtio(balloon, &good[balloon]));
        assert!(
            !super::restore_virtio("virtio-rng@0xc0008000", &good[rng]),
            "BAR moved"
        );
        let bad = seed("virtio_garbage_queue");
        assert!(!super::restore_virtio(rng, &bad[rng]));
    }
}
