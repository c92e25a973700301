//! The test-kit guests (`guests/`), built by `build.rs` and embedded in the binary so that
//! `exitless run` with no kernel boots the demo, and the tests and benchmarks can boot any of them
//! on any KVM host with nothing else installed. The same files boot under QEMU
//! (`exitless kit extract DIR`, then `qemu-system-x86_64 -M q35 -kernel DIR/demo ...`).

macro_rules! guest {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!(env!("OUT_DIR"), "/guests/", $name)) as &'static [u8],
        )
    };
}

/// (name, ELF image) of every embedded guest.
pub const GUESTS: &[(&str, &[u8])] = &[
    guest!("demo"),
    guest!("exits"),
    guest!("bench"),
    guest!("smp"),
    guest!("serial"),
    guest!("poweroff"),
    guest!("reset"),
    guest!("fail"),
    guest!("triplefault"),
    guest!("syscall-probe"),
    guest!("virtio-blk"),
    guest!("virtio-hostile"),
    guest!("hostile"),
    guest!("console-flood"),
    guest!("virtio-rng"),
    guest!("virtio-vsock"),
    guest!("virtio-net"),
    guest!("virtio-balloon"),
    guest!("bench-io"),
    guest!("bench-iommu"),
    guest!("clock"),
    guest!("blk-flush"),
    guest!("compute"),
    guest!("power-button"),
    guest!("virtio-snap"),
];

/// The guest booted when no kernel is given.
pub const DEFAULT_GUEST: &str = "demo";

pub fn get(name: &str) -> Option<(&'static str, &'static [u8])> {
    GUESTS.iter().find(|(n, _)| *n == name).copied()
}

pub fn names() -> Vec<&'static str> {
    GUESTS.iter().map(|(n, _)| *n).collect()
}

/// Writes every guest into `dir` (for QEMU or inspection).
pub fn extract(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    GUESTS
        .iter()
        .map(|(n, bytes)| {
            let p = dir.join(n);
            std::fs::write(&p, bytes)?;
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_elf_with_a_pvh_note() {
        for (name, bytes) in GUESTS {
            assert_eq!(&bytes[..4], b"\x7fELF", "{name}");
            // The PVH note: name "Xen\0", type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
            let found = bytes
                .windows(12)
                .any(|w| w[0..4] == 4u32.to_le_bytes() && w[8..12] == 18u32.to_le_bytes());
            assert!(found, "{name} has no PVH note");
        }
        assert!(get(DEFAULT_GUEST).is_some());
        assert!(get("nope").is_none());
    }
}
