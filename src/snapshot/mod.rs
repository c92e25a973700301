//! Snapshot and restore: a paused VM written to a directory ([`create`]), and read back and
//! checked for a restore ([`load`]; the VM is then built from it by
//! [`crate::vm::VmBuilder::restore`]).
//!
//! A snapshot directory holds two files:
//! - `state.json`: the versioned, checksummed container ([`format`]) of the sections `host`
//!   (the CPU and KVM it was taken on, [`HostIdentity`]), `machine` (what the VM is made of,
//!   [`Machine`]), `vcpus` ([`vcpu`]), `vm` (irqchip, PIT, kvmclock: [`vm`]), `devices` (each
//!   device's own state, by bus slot: [`crate::devices::Bus::save_states`]) and `memory` (the
//!   layout and checksum of the memory file);
//! - `memory`: guest RAM, sparse ([`memory`]).
//!
//! `state.json` is written last, so a directory with one holds a whole snapshot; neither file is
//! ever overwritten (a VM restored from a snapshot maps its memory file).
//!
//! **Devices with work of their own.** The virtio devices' workers are quiesced for the whole
//! snapshot ([`crate::devices::Bus::quiesce`], and resumed after it, written or refused): each
//! worker stops between batches, after every request it took is completed in the used ring (a
//! block request's I/O done, a flush's `fdatasync` returned), and leaves its handler parked, so
//! a device's queue positions and guest memory agree; requests the driver made available but
//! the device had not taken are taken by the restored device. A restored VM's devices are
//! resumed only once every state is set (irqchip included), so an interrupt they raise lands.
//!
//! **What is refused, and when.** A snapshot needs a paused VM (the lifecycle says so otherwise)
//! and devices that can all be saved: a device that cannot (the IOMMU, a disk with
//! `swap-mapper=on`) is named with its reason and nothing is written, so no snapshot can restore
//! wrong. vsock connections do not survive: a restored vsock device resets the guest's
//! transport. A restore refuses, before
//! anything runs: a file that is not a snapshot, another format version, any section whose
//! checksum does not match, a memory file of the wrong length (and, with `--verify-memory`, of
//! the wrong content), a snapshot from another host (CPU vendor or model, or KVM flavour:
//! saved CPU state is only valid on the CPU it came from), and a device state that does not fit
//! its device (see `devices::virtio::transport`'s snapshot module: queues outside RAM, sizes
//! that are not powers of two, features the device does not offer, a disk of another size).
//!
//! Owns the snapshot's files. It may read a paused VM's state through [`Source`] (the vCPUs'
//! through the lifecycle's `Save` message, answered on each vCPU's thread) and touches nothing
//! of a running VM.

pub mod format;
pub mod memory;
pub mod vcpu;
pub mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::devices::Bus;
use crate::lifecycle::Lifecycle;

/// Why a snapshot or a restore could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Writing the snapshot failed.
    #[error("snapshot: {0}")]
    Save(String),
    /// This VM cannot be snapshotted (a device that cannot be saved, the wrong state).
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// The directory asked for cannot take a snapshot (it already holds one, or cannot be
    /// created): the client's mistake, not the VM's.
    #[error("snapshot: {0}")]
    Place(String),
    /// The directory does not hold a usable snapshot.
    #[error("not a usable snapshot: {0}")]
    Invalid(String),
    #[error(
        "snapshot format version {found}; this exitless reads version {supported} (take the \
         snapshot again with this exitless)"
    )]
    Version { found: String, supported: u32 },
    #[error("the snapshot was taken on another host: {0}")]
    WrongHost(String),
}

/// The host a snapshot was taken on: what saved CPU state depends on.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostIdentity {
    /// CPUID leaf 0's vendor string.
    pub cpu_vendor: String,
    /// CPUID leaf 1's EAX: family, model and stepping.
    pub cpu_signature: u32,
    pub cpu_brand: String,
    /// The KVM flavour: `kvm_intel`, `kvm_amd`, `kvm_pvm` (or `kvm` when unknown).
    pub kvm: String,
}

impl HostIdentity {
    /// This host's.
    pub fn current(host: &crate::host::HostInfo) -> Self {
        let leaf1 = std::arch::x86_64::__cpuid(1);
        let kvm = if host.is_pvm() {
            "kvm_pvm"
        } else {
            host.kvm_module.unwrap_or("kvm")
        };
        HostIdentity {
            cpu_vendor: host.cpu_vendor.clone(),
            cpu_signature: leaf1.eax,
            cpu_brand: cpu_brand(),
            kvm: kvm.into(),
        }
    }

    /// Whether a snapshot taken on `self` may be restored on `here`, and if not why.
    pub fn check(&self, here: &HostIdentity) -> Result<(), SnapshotError> {
        let same_cpu =
            self.cpu_vendor == here.cpu_vendor && self.cpu_signature == here.cpu_signature;
        if same_cpu && self.kvm == here.kvm {
            return Ok(());
        }
        Err(SnapshotError::WrongHost(format!(
            "it needs {} ({}, signature {:#x}) under {}; this host is {} ({}, signature {:#x}) \
             under {}",
            self.cpu_brand,
            self.cpu_vendor,
            self.cpu_signature,
            self.kvm,
            here.cpu_brand,
            here.cpu_vendor,
            here.cpu_signature,
            here.kvm
        )))
    }
}

fn cpu_brand() -> String {
    let mut b = Vec::new();
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        // Leaves past the maximum return zeros, which are trimmed.
        let r = std::arch::x86_64::__cpuid(leaf);
        for v in [r.eax, r.ebx, r.ecx, r.edx] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&b)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}

/// What the VM is made of: what a restore builds before it sets the saved state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Machine {
    /// The guest it booted (`kit:NAME` or the kernel's path): information only.
    pub guest: String,
    pub mem_bytes: u64,
    pub cpus: u8,
    /// `SVM` or `VMX` when the guest was given hardware virtualization.
    pub nested: Option<String>,
    pub debug_exit: bool,
    pub probe: bool,
    pub cmdline: String,
    /// The PCI/virtio devices, as configured (a restore opens them again: the same images, taps
    /// and sockets, unless its options override them).
    #[serde(default)]
    pub virtio: crate::devices::virtio::config::VirtioConfig,
}

/// Every device's state, by bus and slot.
#[derive(Serialize, Deserialize)]
pub struct DeviceStates {
    pub pio: BTreeMap<String, serde_json::Value>,
    pub mmio: BTreeMap<String, serde_json::Value>,
}

/// What a running VM hands over so that it can be snapshotted.
pub struct Source {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    /// RAM is anonymous memory (false for a VM itself restored: a file mapping).
    pub anonymous_ram: bool,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub machine: Machine,
    pub host: HostIdentity,
}

/// What a snapshot wrote.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub dir: PathBuf,
    /// `state.json`'s size.
    pub state_bytes: u64,
    /// Guest RAM's size (the memory file's length).
    pub memory_bytes: u64,
    /// The memory file's data (what it costs on disk).
    pub memory_data_bytes: u64,
    pub ms: f64,
}

/// Writes a snapshot of the paused VM into `dir` (created if missing; one that already holds
/// a snapshot is refused).
pub fn create(src: &Source, lifecycle: &Lifecycle, dir: &Path) -> Result<Summary, SnapshotError> {
    let t0 = Instant::now();
    // Paused first: nothing below may touch a running VM.
    let clock_ns = lifecycle
        .frozen_clock()
        .map_err(|e| SnapshotError::Unsupported(e.to_string()))?;
    // Devices with work of their own stop it for the whole snapshot (memory included, which their
    // queues' positions must match) and go on after it, written or refused.
    let _quiet = Quiesced::new(&src.pio, &src.mmio);
    let devices = match (src.pio.save_states(), src.mmio.save_states()) {
        (Ok(pio), Ok(mmio)) => DeviceStates { pio, mmio },
        (pio, mmio) => {
            let refused: Vec<String> = [pio.err(), mmio.err()]
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            return Err(SnapshotError::Unsupported(format!(
                "devices whose state cannot be saved yet: {}",
                refused.join("; ")
            )));
        }
    };
    let vcpus = save_vcpus(lifecycle)?;
    let vm = vm::capture(&src.vm, clock_ns).map_err(SnapshotError::Save)?;
    prepare_dir(dir)?;
    let mem = memory::save(&src.mem, dir, src.anonymous_ram).inspect_err(|_| {
        let _ = std::fs::remove_file(dir.join(memory::MEMORY_FILE));
    })?;
    let mut w = format::Writer::default();
    w.add("host", &src.host)?;
    w.add("machine", &src.machine)?;
    w.add("vcpus", &vcpus)?;
    w.add("vm", &vm)?;
    w.add("devices", &devices)?;
    w.add("memory", &mem)?;
    let state_bytes = w.write(dir)?;
    Ok(Summary {
        dir: dir.to_path_buf(),
        state_bytes,
        memory_bytes: mem.size,
        memory_data_bytes: mem.data_bytes,
        ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

/// The buses' devices quiesced while this lives (see [`crate::devices::BusDevice::quiesce`]).
struct Quiesced<'a>([&'a Bus; 2]);

impl<'a> Quiesced<'a> {
    fn new(pio: &'a Bus, mmio: &'a Bus) -> Self {
        pio.quiesce();
        mmio.quiesce();
        Quiesced([pio, mmio])
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for b in self.0 {
            b.resume();
        }
    }
}

/// Every vCPU's state, read on its own thread.
fn save_vcpus(lifecycle: &Lifecycle) -> Result<Vec<vcpu::VcpuState>, SnapshotError> {
    let saved = lifecycle.save_vcpus().map_err(|e| match e {
        crate::lifecycle::LifecycleError::WrongState { .. } => {
            SnapshotError::Unsupported(e.to_string())
        }
        e => SnapshotError::Save(e.to_string()),
    })?;
    saved
        .into_iter()
        .map(|b| {
            b.downcast::<vcpu::VcpuState>()
                .map(|s| *s)
                .map_err(|_| SnapshotError::Save("a vCPU answered with something else".into()))
        })
        .collect()
}

/// `dir` exists and holds no snapshot.
fn prepare_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| SnapshotError::Place(format!("cannot create {}: {e}", dir.display())))?;
    for f in [format::STATE_FILE, memory::MEMORY_FILE] {
        if dir.join(f).exists() {
            return Err(SnapshotError::Place(format!(
                "{} already holds a snapshot ({f}); choose a new directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A snapshot read and checked, ready for [`crate::vm::VmBuilder::restore`].
pub struct Loaded {
    pub dir: PathBuf,
    /// Its state file's sections.
    pub state: Sections,
    pub memory_file: std::fs::File,
}

/// Reads and checks the snapshot in `dir` (with `verify_memory` the memory file's content too).
/// Whether it suits this host is checked by the builder, once it knows the host
/// ([`HostIdentity::check`]), before it creates anything.
pub fn load(dir: &Path, verify_memory: bool) -> Result<Loaded, SnapshotError> {
    let state = Sections::read(&format::Reader::open(dir)?)?;
    let memory_file = memory::open(dir, &state.memory, state.machine.mem_bytes)?;
    if verify_memory {
        memory::verify(&memory_file, &state.memory)?;
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        memory_file,
    })
}

/// Every section of a state file, parsed and checked against each other (no file is opened:
/// the snapshot fuzz target runs this on arbitrary bytes).
pub struct Sections {
    pub host: HostIdentity,
    pub machine: Machine,
    pub vcpus: Vec<vcpu::VcpuState>,
    pub vm: vm::VmState,
    pub devices: DeviceStates,
    pub memory: memory::MemoryInfo,
}

impl Sections {
    pub fn read(r: &format::Reader) -> Result<Sections, SnapshotError> {
        let machine: Machine = r.get("machine")?;
        let vcpus: Vec<vcpu::VcpuState> = r.get("vcpus")?;
        if vcpus.len() != usize::from(machine.cpus)
            || vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(SnapshotError::Invalid(format!(
                "{} vCPU states for a machine of {} vCPUs",
                vcpus.len(),
                machine.cpus
            )));
        }
        let memory: memory::MemoryInfo = r.get("memory")?;
        memory::check(&memory, machine.mem_bytes)
            .map_err(|e| SnapshotError::Invalid(format!("the memory section: {e}")))?;
        Ok(Sections {
            host: r.get("host")?,
            machine,
            vcpus,
            vm: r.get("vm")?,
            devices: r.get("devices")?,
            memory,
        })
    }
}

/// Rewrites the `host` section of the snapshot in `dir` (tests: a snapshot "from another
/// host" with valid checksums).
#[doc(hidden)]
pub fn rewrite_host_for_tests(dir: &Path, host: &HostIdentity) -> Result<(), SnapshotError> {
    format::rewrite_section(dir, "host", host)
}

/// Rewrites the `devices` section of the snapshot in `dir` (tests: a snapshot with a damaged
/// device state and valid checksums).
#[doc(hidden)]
pub fn rewrite_devices_for_tests(
    dir: &Path,
    devices: &serde_json::Value,
) -> Result<(), SnapshotError> {
    format::rewrite_section(dir, "devices", devices)
}
