//! Paravirtual devices (the seeds' middle tier): virtio 1.x devices on the PCI bus.
//!
//! Owns the device models (`block`, `rng`, `net`, ...), the virtio-pci transport (`transport`),
//! queue handling and its checks against hostile drivers (`queue`), interrupt delivery (`irq`) and
//! the construction of the whole set from a [`config::VirtioConfig`] ([`build`]).
//!
//! # Exits
//! The point of this tier is that the data path takes no exit to userspace: a queue notification
//! is a write to the device's notify register, which KVM completes in the kernel through an
//! ioeventfd (`KVM_IOEVENTFD`, one per queue); an interrupt is an MSI-X message, which the device
//! worker raises by writing an irqfd bound to a GSI with an MSI route (`KVM_SET_GSI_ROUTING`).
//! With `VIRTIO_RING_F_EVENT_IDX` both sides also suppress notifications and interrupts they do
//! not need. Only set-up (configuration space, the common configuration, the MSI-X table) exits.
//!
//! # Threading model
//! One worker thread per device, started when the driver sets DRIVER_OK and stopped (joined) on a
//! device reset or when the VM ends, and for the length of a snapshot (quiesced: see `worker`'s
//! parking and `transport`'s snapshot module). It blocks in `epoll_wait` on the device's queue ioeventfds, a
//! kill eventfd and the device's own descriptors (a tap, a socket), and does all the device's work:
//! it walks the queues, does the I/O, fills the used rings and signals irqfds. The vCPU threads
//! only touch the transport's registers (under the device's mutex) and never wait for device I/O,
//! so a slow `fdatasync` stalls one device, not a vCPU. This is Cloud Hypervisor's model: simple,
//! one context switch per batch of requests, and devices are isolated from one another (a device
//! that needs a reset, or a worker that panics, leaves the others running). A shared I/O thread
//! would save threads but couple devices; a vCPU-side handler would put I/O latency on the vCPU.
//! A worker's panic (a bug in exitless) is caught on the worker, said once on stderr and in the
//! report (`worker_panics`, `panics`), and the device enters DEVICE_NEEDS_RESET with a
//! configuration interrupt, as on any other device failure.
//!
//! # Bad input
//! A queue whose set-up is invalid at DRIVER_OK (size not a power of two or above the maximum, rings
//! misaligned or outside RAM) puts the device in DEVICE_NEEDS_RESET (with a configuration-change
//! interrupt) and it is not started; a bad descriptor chain (see `queue`) fails that request only;
//! notifications before DRIVER_OK are counted by the eventfd and served once the device starts;
//! writes to read-only configuration are ignored (counted as `config_writes_refused`).

pub mod balloon;
pub mod block;
pub mod config;
pub mod irq;
pub mod moderation;
pub mod net;
pub mod queue;
pub mod rng;
pub mod swap_mapper;
pub mod tap;
pub mod transport;
pub mod vsock;
mod worker;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::layout::{self, ports};
use crate::devices::pci::{BarAllocator, ConfigAddress, ConfigData, Ecam, PciRoot};
use crate::devices::Bus;
use crate::stats::DeviceFact;

use queue::Vq;

/// Counters every device keeps; they become the device's facts in the exit summary.
#[derive(Default)]
pub struct DeviceStats {
    /// Times the driver set DRIVER_OK (and the device started).
    pub driver_ok: AtomicU64,
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Bytes the device wrote into guest buffers / read from them.
    pub bytes_to_guest: AtomicU64,
    pub bytes_from_guest: AtomicU64,
    /// Requests completed with an error status, and chains refused as invalid.
    pub errors: AtomicU64,
    pub bad_chains: AtomicU64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: AtomicU64,
    /// Queue notifications the worker received (KVM completed them in-kernel via ioeventfd).
    pub notifications: AtomicU64,
    pub config_writes_refused: AtomicU64,
    /// Panics of the worker (bugs in exitless; each stopped the device), and the first's message.
    pub worker_panics: AtomicU64,
    panic: Mutex<Option<String>>,
    /// Device-specific facts.
    pub extra: Mutex<BTreeMap<&'static str, u64>>,
}

impl DeviceStats {
    pub fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set_extra(&self, k: &'static str, v: u64) {
        self.extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, v);
    }

    pub fn add_extra(&self, k: &'static str, v: u64) {
        *self
            .extra
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(k)
            .or_default() += v;
    }

    /// Counts a worker panic; true for the device's first (the one to report).
    pub fn note_panic(&self, msg: &str) -> bool {
        let first = self.worker_panics.fetch_add(1, Ordering::Relaxed) == 0;
        if first {
            *self.panic.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.to_string());
        }
        first
    }

    pub fn first_panic(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn facts(&self) -> BTreeMap<String, u64> {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut m = BTreeMap::from([
            ("driver_ok".to_string(), ld(&self.driver_ok)),
            ("requests".into(), ld(&self.requests)),
            ("bytes_to_guest".into(), ld(&self.bytes_to_guest)),
            ("bytes_from_guest".into(), ld(&self.bytes_from_guest)),
            ("errors".into(), ld(&self.errors)),
            ("bad_chains".into(), ld(&self.bad_chains)),
            ("needs_reset".into(), ld(&self.needs_reset)),
            ("notifications".into(), ld(&self.notifications)),
        ]);
        if ld(&self.config_writes_refused) > 0 {
            m.insert(
                "config_writes_refused".into(),
                ld(&self.config_writes_refused),
            );
        }
        if ld(&self.worker_panics) > 0 {
            m.insert("worker_panics".into(), ld(&self.worker_panics));
        }
        for (k, v) in self.extra.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            m.insert((*k).to_string(), *v);
        }
        m
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// Every queue (unready ones serve nothing).
    pub queues: Vec<Vq>,
    /// The features the driver accepted.
    pub features: u64,
    pub stats: Arc<DeviceStats>,
}

/// A device model, as the transport sees it.
pub trait VirtioDevice: Send {
    /// `virtio-blk0`, ...
    fn name(&self) -> String;
    /// Name of the kind of device, for the bus map.
    fn kind(&self) -> &'static str;
    /// Virtio device ID (2 block, 1 net, 4 rng, 5 balloon, 19 vsock).
    fn device_type(&self) -> u32;
    /// PCI class code (24 bits).
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    /// Maximum size of each queue (powers of two).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features (VERSION_1 and EVENT_IDX included).
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A balloon's new target in bytes, set while the VM runs: the new `num_pages`, or why not.
    /// None: this device is no balloon.
    fn balloon_target(&mut self, _bytes: u64) -> Option<Result<u32, String>> {
        None
    }
    /// Writes to device configuration; read-only by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: write of {} bytes to read-only config offset {offset:#x} ignored",
            self.name(),
            data.len()
        );
        self.stats()
            .config_writes_refused
            .fetch_add(1, Ordering::Relaxed);
    }
    /// The device's own state for a snapshot (what it was opened with, what the driver set in
    /// its configuration); the transport saves the rest. The default refuses, naming why.
    fn save_state(&self) -> Result<serde_json::Value, String> {
        Err("its state cannot be saved yet".into())
    }
    /// Takes back [`Self::save_state`]'s state in a device opened from the same configuration;
    /// refuses one that does not fit it.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Err("its state cannot be restored yet".into())
    }
    /// Starts serving: returns the handler the worker thread runs.
    fn activate(&mut self, a: Activation) -> Result<Box<dyn QueueHandler>, String>;
    /// The driver reset the device (the worker has already stopped).
    fn reset(&mut self) {}
    /// The VM has ended: give back what other processes can see (a listening socket's path),
    /// even while something still holds the device (the control API's last client).
    fn release(&mut self) {}
    fn stats(&self) -> Arc<DeviceStats>;
}

/// A device's work, run on its worker thread.
pub trait QueueHandler: Send {
    /// The queues it serves, for a snapshot of a parked handler (see `worker`); a queue it does
    /// not serve is saved as never used. Every device that can be saved
    /// ([`VirtioDevice::save_state`]) must list the queues it takes chains from.
    fn queues(&self) -> Vec<&Vq> {
        vec![]
    }
    /// The worker is stopping with this handler parked (see `worker`): give back to the rings
    /// what it took but has not used, so that its queues' positions describe everything.
    fn park(&mut self) {}
    /// What the handler holds beyond its queues' positions (buffers it keeps, such as the
    /// balloon's statistics buffer), for a snapshot of a parked handler.
    fn save(&self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    /// Takes back [`Self::save`]'s state, in a handler just activated on the restored queues.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Queue `q` was notified (also called once per queue when the worker starts). An error puts
    /// the device in DEVICE_NEEDS_RESET and ends the worker.
    fn process(&mut self, q: usize) -> Result<(), String>;
    /// More descriptors to wait on (tap, sockets).
    fn extra_fds(&self) -> Vec<RawFd> {
        vec![]
    }
    /// `extra_fds()[i]` is readable.
    fn fd_ready(&mut self, _i: usize) -> Result<(), String> {
        Ok(())
    }
    /// Queue `q`, if the worker may poll it for new chains between bursts instead of waiting for
    /// the driver's notification: a queue the driver fills with requests (block requests, network
    /// transmit). None (the default): only notifications wake the device for it.
    fn polled_queue(&mut self, _q: usize) -> Option<&mut Vq> {
        None
    }
    /// The earliest interrupt one of the handler's queues holds back (`moderation`), if any: the
    /// worker wakes then and calls [`Self::send_due`].
    fn interrupt_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// Sends the held interrupts that are due at `now`.
    fn send_due(&mut self, _now: std::time::Instant) {}
    /// While the worker polls: looks for input on the handler's own descriptors without waiting
    /// (network receive); true if some was served.
    fn poll_input(&mut self) -> bool {
        false
    }
}

/// The offered features every device shares.
pub fn common_features() -> u64 {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
}

/// The PCI devices of a running VM.
pub struct VirtioSet {
    devices: Vec<Arc<Mutex<transport::VirtioPci>>>,
    iommu: Option<Arc<crate::devices::iommu::Iommu>>,
}

impl VirtioSet {
    /// Each device's facts for the summary.
    pub fn facts(&self) -> Vec<DeviceFact> {
        let iommu = self.iommu.iter().map(|m| DeviceFact {
            device: "iommu".into(),
            facts: m.facts(),
        });
        self.devices
            .iter()
            .map(|d| {
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                let mut facts = d.stats().facts();
                facts.insert(
                    "interrupts".into(),
                    d.msix().delivered.load(Ordering::Relaxed),
                );
                DeviceFact {
                    device: d.name(),
                    facts,
                }
            })
            .chain(iommu)
            .collect()
    }

    /// The first worker panic of each device that had one ("virtio-rng0: worker panicked: ...").
    pub fn panics(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|d| {
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                let msg = d.stats().first_panic()?;
                Some(format!("{}: worker panicked: {msg}", d.name()))
            })
            .collect()
    }

    /// Sets the balloon's target (bytes) while the VM runs and tells the driver (a configuration
    /// change interrupt); returns the target in 4 KiB pages.
    pub fn set_balloon_target(&self, bytes: u64) -> Result<u32, String> {
        for d in &self.devices {
            let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(r) = d.set_balloon_target(bytes) {
                return r;
            }
        }
        Err("this VM has no balloon (start it with --balloon)".into())
    }

    /// Stops every worker and releases what the host sees of the devices (at the end of the run).
    pub fn shutdown(&self) {
        if let Some(m) = &self.iommu {
            m.stop();
        }
        for d in &self.devices {
            let mut d = d.lock().unwrap_or_else(|p| p.into_inner());
            d.stop_worker();
            // The handler the stopped worker parked holds host descriptors (vsock connections,
            // the tap's clone): closed now, as when the worker itself dropped it.
            d.discard_parked();
            d.release();
        }
    }
}

impl Drop for VirtioSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The ECAM region exitless describes in the MCFG (bus 0 only).
pub fn ecam_region() -> crate::arch::x86_64::acpi::EcamRegion {
    crate::arch::x86_64::acpi::EcamRegion {
        base: layout::PCI_ECAM_START,
        start_bus: 0,
        end_bus: 0,
    }
}

/// Opens the configured devices (a missing image or tap is an error here, before the VM runs),
/// puts them on a PCI bus with a host bridge, and wires configuration space (0xcf8/0xcfc, ECAM),
/// BARs, ioeventfds and MSI-X routing. None when no device is configured.
pub fn build(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cfg: &config::VirtioConfig,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<Option<VirtioSet>, String> {
    if !cfg.any() {
        return Ok(None);
    }
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        devs.push(Box::new(block::Block::open(d, i)?));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        devs.push(Box::new(net::Net::open(n, i)?));
    }
    if cfg.rng {
        devs.push(Box::new(rng::Rng::new()));
    }
    if let Some(b) = &cfg.balloon {
        devs.push(Box::new(balloon::Balloon::new(b, mem)?));
    }
    if let Some(v) = &cfg.vsock {
        devs.push(Box::new(vsock::Vsock::new(v)?));
    }

    if !vm.check_extension(Cap::IrqRouting) {
        return Err("this host's KVM lacks GSI routing, which MSI-X needs".into());
    }
    // SAFETY: dup of a valid descriptor we own; the result is checked before use.
    let fd = unsafe { libc::dup(vm.as_raw_fd()) };
    if fd < 0 {
        return Err(format!(
            "dup of the VM descriptor: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor of the VM that nothing else owns.
    let router_vm = unsafe { kvm.create_vmfd_from_rawfd(fd) }
        .map_err(|e| format!("VM descriptor for MSI routing: {e}"))?;
    let routes: Arc<dyn irq::MsiRoutes> = Arc::new(irq::GsiRouter::new(router_vm));
    // Install the default routes once so that later updates never drop the irqchip's pins.
    let probe_gsi = routes.alloc_gsi().ok_or("no GSI")?;
    routes.set_route(probe_gsi, None)?;

    let mut root = PciRoot::default();
    let mut bars = BarAllocator::new(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE);
    let mut devices = Vec::new();
    let iommu = match &cfg.iommu {
        Some(c) => Some(Arc::new(crate::devices::iommu::Iommu::new(
            mem.clone(),
            *c,
            routes.clone(),
        )?)),
        None => None,
    };
    let identity: Arc<dyn queue::Translate> = Arc::new(queue::Identity);
    for (i, dev) in devs.into_iter().enumerate() {
        let kind = dev.kind();
        // Slot 0 is the host bridge: device i is 00:(i+1).0.
        let translate = match &iommu {
            Some(m) => Arc::new(crate::devices::iommu::DeviceTranslate {
                iommu: m.clone(),
                sid: (i as u16 + 1) << 3,
            }) as Arc<dyn queue::Translate>,
            None => identity.clone(),
        };
        let bar = bars
            .alloc(transport::BAR_SIZE)
            .ok_or("PCI MMIO window is full")?;
        let mut t = transport::VirtioPci::new(dev, bar, mem.clone(), translate, routes.clone())?;
        t.set_queue_poll(std::time::Duration::from_micros(cfg.queue_poll_us));
        for (addr, evt) in t.notify_events() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
                .map_err(|e| format!("ioeventfd at {addr:#x}: {e}"))?;
        }
        let t = Arc::new(Mutex::new(t));
        mmio.insert(kind, bar, transport::BAR_SIZE, t.clone())
            .map_err(|e| e.to_string())?;
        root.add(t.clone()).ok_or("PCI bus 0 is full")?;
        devices.push(t);
    }
    let root = Arc::new(root);
    let address = Arc::new(std::sync::atomic::AtomicU32::new(0));
    pio.insert(
        "pci-config",
        u64::from(ports::PCI_CONFIG_ADDRESS),
        1,
        Arc::new(Mutex::new(ConfigAddress(address.clone()))),
    )
    .map_err(|e| e.to_string())?;
    pio.insert(
        "pci-config",
        u64::from(ports::PCI_CONFIG_DATA),
        4,
        Arc::new(Mutex::new(ConfigData {
            address,
            root: root.clone(),
        })),
    )
    .map_err(|e| e.to_string())?;
    let (start, end) = ecam_region().window().ok_or("bad ECAM region")?;
    mmio.insert(
        "pci-ecam",
        start,
        end - start,
        Arc::new(Mutex::new(Ecam(root))),
    )
    .map_err(|e| e.to_string())?;
    if let Some(m) = &iommu {
        crate::devices::iommu::attach(m, vm, mmio)?;
    }
    Ok(Some(VirtioSet { devices, iommu }))
}
