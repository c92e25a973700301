//! KVM's own per-vCPU counters, read through its binary statistics interface
//! (`KVM_GET_STATS_FD`, Linux 5.14+; the kernel's Documentation/virt/kvm/api.rst).
//!
//! Owns opening a vCPU's statistics descriptor, parsing its header and descriptors, and summing
//! the cumulative counters over vCPUs: `exits` (every exit, those KVM handles in the kernel
//! included), `halt_exits`, `io_exits`, `mmio_exits`, `irq_exits`, `signal_exits`,
//! `insn_emulation`, `hypercalls`, `irq_injections`, ... whatever the host exposes. They complete
//! exitless's own counters, which only see exits to userspace. A host without the ioctl (or a
//! descriptor that does not parse) gives no statistics, never an error.
//!
//! The layout (all little-endian on x86_64): a header `{flags, name_size, num_desc, id_offset,
//! desc_offset, data_offset}` (six u32), `num_desc` descriptors of `16 + name_size` bytes each
//! `{flags: u32, exponent: i16, size: u16, offset: u32, bucket_size: u32, name[name_size]}`, and
//! the data: `size` u64 values per descriptor at `data_offset + offset`. Only cumulative
//! (`KVM_STATS_TYPE_CUMULATIVE`) single-value statistics are kept; instants, peaks and
//! histograms do not sum over vCPUs or over time.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

const KVMIO: u32 = 0xae;
ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);

const KVM_STATS_TYPE_MASK: u32 = 0xf;
const KVM_STATS_TYPE_CUMULATIVE: u32 = 0;
const HEADER_LEN: usize = 24;
const DESC_LEN: usize = 16;
/// Bounds on what a descriptor may claim (the kernel's names are < 64 bytes, a few hundred
/// statistics at most): a file that claims more is not parsed.
const MAX_NAME: usize = 256;
const MAX_DESCS: usize = 4096;

/// One statistic: its name and where its value lies in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Desc {
    name: String,
    offset: u64,
}

/// A vCPU's statistics descriptor, its layout parsed once.
#[derive(Debug)]
pub struct VcpuStatsFd {
    file: File,
    descs: Vec<Desc>,
}

impl VcpuStatsFd {
    /// Opens the statistics of a vCPU; None when the host does not support them.
    pub fn open(vcpu: &kvm_ioctls::VcpuFd) -> Option<VcpuStatsFd> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new descriptor (or -1);
        // `vcpu` is a live vCPU descriptor.
        let fd = unsafe { ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            log::debug!(
                "KVM_GET_STATS_FD: {} (no KVM statistics)",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor the kernel just gave us and nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let descs = parse_layout(&file)?;
        log::debug!(
            "KVM statistics on fd {}: {} cumulative counters",
            file.as_raw_fd(),
            descs.len()
        );
        Some(VcpuStatsFd { file, descs })
    }

    /// The current value of every cumulative counter.
    pub fn read(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for d in &self.descs {
            let mut v = [0u8; 8];
            if self.file.read_exact_at(&mut v, d.offset).is_ok() {
                m.insert(d.name.clone(), u64::from_le_bytes(v));
            }
        }
        m
    }
}

/// Sums the counters of several vCPUs (missing ones contribute nothing).
pub fn sum<'a>(fds: impl IntoIterator<Item = &'a VcpuStatsFd>) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for f in fds {
        for (k, v) in f.read() {
            let e: &mut u64 = total.entry(k).or_default();
            *e = e.wrapping_add(v);
        }
    }
    total
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Reads the header and the descriptors; keeps the cumulative single-value counters.
fn parse_layout(file: &impl FileExt) -> Option<Vec<Desc>> {
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0).ok()?;
    let name_size = u32_at(&h, 4)? as usize;
    let num_desc = u32_at(&h, 8)? as usize;
    let desc_offset = u64::from(u32_at(&h, 16)?);
    let data_offset = u64::from(u32_at(&h, 20)?);
    if name_size == 0 || name_size > MAX_NAME || num_desc > MAX_DESCS {
        log::debug!("KVM statistics: implausible header (names {name_size}, {num_desc} stats)");
        return None;
    }
    let mut raw = vec![0u8; num_desc * (DESC_LEN + name_size)];
    file.read_exact_at(&mut raw, desc_offset).ok()?;
    parse_descs(&raw, name_size, num_desc, data_offset)
}

/// Parses `num_desc` descriptors (see the module doc) into the counters worth keeping.
fn parse_descs(raw: &[u8], name_size: usize, num_desc: usize, data: u64) -> Option<Vec<Desc>> {
    let mut out = Vec::new();
    for i in 0..num_desc {
        let d = raw.get(i * (DESC_LEN + name_size)..(i + 1) * (DESC_LEN + name_size))?;
        let flags = u32_at(d, 0)?;
        let size = u16_at(d, 6)?;
        let offset = u64::from(u32_at(d, 8)?);
        let name = &d[DESC_LEN..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        if flags & KVM_STATS_TYPE_MASK == KVM_STATS_TYPE_CUMULATIVE && size == 1 && !name.is_empty()
        {
            out.push(Desc {
                name: name.to_string(),
                offset: data + offset,
            });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file as the kernel lays it out: header, descriptors, data.
    fn image(stats: &[(&str, u32, u16, u64)]) -> Vec<u8> {
        let name_size = 48usize;
        let desc_offset = HEADER_LEN + 16; // after the id string
        let data_offset = desc_offset + stats.len() * (DESC_LEN + name_size);
        let mut f = vec![0u8; data_offset];
        let w32 = |f: &mut Vec<u8>, at: usize, v: u32| {
            f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        w32(&mut f, 4, name_size as u32);
        w32(&mut f, 8, stats.len() as u32);
        w32(&mut f, 12, HEADER_LEN as u32);
        w32(&mut f, 16, desc_offset as u32);
        w32(&mut f, 20, data_offset as u32);
        let mut data = Vec::new();
        for (i, (name, flags, size, v)) in stats.iter().enumerate() {
            let at = desc_offset + i * (DESC_LEN + name_size);
            w32(&mut f, at, *flags);
            f[at + 6..at + 8].copy_from_slice(&size.to_le_bytes());
            w32(&mut f, at + 8, (data.len() * 8) as u32);
            f[at + DESC_LEN..at + DESC_LEN + name.len()].copy_from_slice(name.as_bytes());
            for k in 0..*size {
                data.push(v + u64::from(k));
            }
        }
        for v in data {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f
    }

    struct Mem(Vec<u8>);
    impl FileExt for Mem {
        fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
            let s = self.0.get(off as usize..).unwrap_or(&[]);
            let n = s.len().min(buf.len());
            buf[..n].copy_from_slice(&s[..n]);
            Ok(n)
        }
        fn write_at(&self, _: &[u8], _: u64) -> std::io::Result<usize> {
            unreachable!()
        }
    }

    #[test]
    fn keeps_cumulative_counters_and_skips_the_rest() {
        let img = image(&[
            ("exits", 0, 1, 1234),
            ("guest_mode", 0x41, 1, 1),                // instant, boolean
            ("halt_wait_hist", 0x34, 32, 0),           // log histogram
            ("max_mmu_page_hash_collisions", 2, 1, 9), // peak
            ("mmio_exits", 0, 1, 77),
        ]);
        let m = Mem(img);
        let descs = parse_layout(&m).unwrap();
        let names: Vec<&str> = descs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["exits", "mmio_exits"]);
        let mut v = [0u8; 8];
        m.read_exact_at(&mut v, descs[1].offset).unwrap();
        assert_eq!(u64::from_le_bytes(v), 77);
        // Truncated or implausible files are refused, not trusted.
        assert!(parse_layout(&Mem(m.0[..30].to_vec())).is_none());
        let mut bad = m.0.clone();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_layout(&Mem(bad)).is_none());
    }

    /// A vCPU that ran one `hlt` in real mode: KVM counted at least that exit, and the sum over
    /// two readers of its statistics is twice it.
    #[test]
    fn a_real_vcpu_has_an_exits_counter_where_the_host_supports_it() {
        const TEST: &str = "a_real_vcpu_has_an_exits_counter_where_the_host_supports_it";
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => return crate::test_skip(TEST, &format!("/dev/kvm: {e}")),
        };
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let page = vm_memory::MmapRegion::<()>::new(4096).expect("mmap");
        // SAFETY: `page` is a fresh 4 KiB anonymous mapping we own.
        unsafe { *page.as_ptr() = 0xf4 }; // hlt
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0x1000,
            memory_size: 4096,
            userspace_addr: page.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region maps `page`, which outlives the VM (dropped after it below).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        let mut vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        let exit = format!("{:?}", vcpu.run().expect("KVM_RUN"));
        assert_eq!(exit, "Hlt");
        let Some(f) = VcpuStatsFd::open(&vcpu) else {
            return crate::test_skip(TEST, "this host's KVM has no binary statistics");
        };
        let one = f.read()["exits"];
        assert!(one >= 1, "a vCPU that exited on hlt counted {one} exits");
        let m = sum([&f, &f]);
        assert_eq!(m["exits"], 2 * one);
        drop(vcpu);
        drop(vm);
        drop(page);
    }
}
