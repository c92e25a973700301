//! The command line: `exitless run`, `exitless restore`, `exitless kit`, `exitless host`,
//! `exitless bench`, `exitless ctl`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{parse_size, KernelSource, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser, Debug)]
#[command(
    name = "exitless",
    version,
    about = "A KVM virtual machine monitor that counts, cheapens and avoids VM exits"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
// Parsed once per process: the size of `RunArgs` does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Boot a guest: a Linux kernel (bzImage or ELF vmlinux) or, with no kernel, the embedded demo.
    Run(RunArgs),
    /// Run a VM from a snapshot (`exitless ctl snapshot DIR` of a paused VM): its memory mapped
    /// lazily from the snapshot, its state set back, the guest going on where it stopped.
    Restore(RestoreArgs),
    /// The embedded test-kit guests.
    Kit {
        #[command(subcommand)]
        command: KitCommand,
    },
    /// What exitless sees of this host's KVM.
    Host,
    /// Benchmarks of the exit path on this host (e.g. `bench exits --vs qemu`).
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
    /// A live view of a running VM (through its `--api-socket`): exits/s by reason (exitless's
    /// own and KVM's in-kernel ones), interrupts injected/s, IRQ-window and halt exits/s, time in
    /// guest, per vCPU and in all; `--json` prints one object per interval.
    Top(crate::top::TopArgs),
    /// Talk to a running VM through its `--api-socket` (REST; see docs/api.yaml).
    Ctl {
        /// The VM's API socket.
        #[arg(long)]
        socket: PathBuf,
        #[command(subcommand)]
        request: CtlRequest,
    },
}

#[derive(Subcommand, Debug)]
pub enum CtlRequest {
    /// The VM's info and lifecycle state (created, running, paused, stopped).
    State,
    /// Pause a running VM: every vCPU stops, and its kvmclock with them.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Live statistics: devices' facts and KVM's counters (JSON).
    Stats,
    /// Set the balloon's target, e.g. `256M` (the guest's driver inflates or deflates to it).
    Balloon { size: String },
    /// Write a snapshot of the paused VM into DIR (a new directory, or one without a snapshot);
    /// `exitless restore --snapshot DIR` runs it again.
    Snapshot { dir: PathBuf },
    /// Stop the VM (it prints its summary as when interrupted).
    Quit,
    /// Press the guest's ACPI power button, and stop the VM if it has not powered off after
    /// GRACE seconds (an ACPI-aware guest shuts down cleanly; one that ignores the button is
    /// stopped as by `quit`).
    Shutdown {
        #[arg(long, default_value = "10", value_parser = parse_grace)]
        grace: std::time::Duration,
    },
}

impl CtlRequest {
    /// The API call it makes.
    pub fn call(&self) -> crate::api::Call {
        use crate::api::Call;
        match self {
            CtlRequest::State => Call::State,
            CtlRequest::Pause => Call::Pause,
            CtlRequest::Resume => Call::Resume,
            CtlRequest::Stats => Call::Stats,
            CtlRequest::Balloon { size } => Call::Balloon(size.clone()),
            CtlRequest::Snapshot { dir } => Call::Snapshot(absolute(dir)),
            CtlRequest::Quit => Call::Quit,
            CtlRequest::Shutdown { grace } => Call::PowerButton(*grace),
        }
    }
}

/// `ctl shutdown --grace SECONDS`: 0 to an hour, as the API takes it.
fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|g| (0.0..=3600.0).contains(g))
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds from 0 to 3600"))
}

/// `path` made absolute against this process's working directory (the VM's may differ).
fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `exitless restore`.
#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The snapshot directory (`state.json` and `memory`).
    #[arg(long, value_name = "DIR")]
    pub snapshot: PathBuf,
    /// Start paused: every vCPU is held before it runs, until `exitless ctl resume`.
    #[arg(long)]
    pub paused: bool,
    /// Read the whole memory file and check its checksum before anything runs (by default a
    /// restore reads no guest memory: pages come in as the guest touches them).
    #[arg(long)]
    pub verify_memory: bool,
    /// The control API's socket (as for `exitless run`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Stop the VM after this many seconds (status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Also copy the guest console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Write the run report as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Do not print the exit summary at the end.
    #[arg(long)]
    pub no_summary: bool,
    /// Exit status when the guest reboots or triple-faults (default 0, as for `exitless run`).
    #[arg(long, default_value_t = 0)]
    pub reboot_status: i32,
    /// System call filters (as for `exitless run`).
    #[arg(long, value_enum, default_value_t = crate::seccomp::Mode::On)]
    pub seccomp: crate::seccomp::Mode,
    /// Landlock file restrictions (as for `exitless run`).
    #[arg(long, value_enum, default_value_t = crate::sandbox::Mode::On)]
    pub landlock: crate::sandbox::Mode,
    /// Where snapshots of the restored VM may be written (as for `exitless run`).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// The image for the snapshot's disks, in order (repeat for the next), instead of the path
    /// they had: a clone's own copy (the same size; a disk written by two VMs is corrupted).
    #[arg(long = "disk-image", value_name = "PATH")]
    pub disk_images: Vec<PathBuf>,
    /// The tap for the snapshot's network devices, in order (repeat for the next), instead of
    /// the one they had: a clone next to its original needs its own.
    #[arg(long = "net-tap", value_name = "NAME")]
    pub net_taps: Vec<String>,
    /// The MAC address the snapshot's network devices report, in order, instead of theirs
    /// (a running guest's driver keeps the one it read when it probed the device).
    #[arg(long = "net-mac", value_name = "MAC")]
    pub net_macs: Vec<String>,
    /// The vsock device's CID instead of the snapshot's (the guest reads it again when the
    /// restored device resets its transport).
    #[arg(long, value_name = "CID")]
    pub vsock_cid: Option<u64>,
    /// The vsock device's host socket instead of the snapshot's: a clone next to its original
    /// cannot listen where the original does.
    #[arg(long, value_name = "PATH")]
    pub vsock_socket: Option<PathBuf>,
}

impl RestoreArgs {
    /// The snapshot's devices with this restore's overrides.
    fn devices(
        &self,
        saved: &crate::devices::virtio::config::VirtioConfig,
    ) -> Result<crate::devices::virtio::config::VirtioConfig, String> {
        let mut v = saved.clone();
        let too_many = |opt: &str, n: usize, what: &str, have: usize| {
            format!("{opt} given {n} times; the snapshot has {have} {what}")
        };
        if self.disk_images.len() > v.disks.len() {
            let n = self.disk_images.len();
            return Err(too_many("--disk-image", n, "disk(s)", v.disks.len()));
        }
        for (d, p) in v.disks.iter_mut().zip(&self.disk_images) {
            d.path = absolute(p);
        }
        for (opt, n) in [
            ("--net-tap", self.net_taps.len()),
            ("--net-mac", self.net_macs.len()),
        ] {
            if n > v.nets.len() {
                return Err(too_many(opt, n, "network device(s)", v.nets.len()));
            }
        }
        for (d, t) in v.nets.iter_mut().zip(&self.net_taps) {
            d.tap.clone_from(t);
        }
        for (d, m) in v.nets.iter_mut().zip(&self.net_macs) {
            d.mac = crate::devices::virtio::config::parse_mac(m)?;
        }
        if self.vsock_cid.is_some() || self.vsock_socket.is_some() {
            let Some(vs) = v.vsock.as_mut() else {
                return Err("--vsock-cid/--vsock-socket: the snapshot has no vsock device".into());
            };
            vs.cid = self.vsock_cid.unwrap_or(vs.cid);
            if let Some(p) = &self.vsock_socket {
                vs.socket = absolute(p);
            }
        }
        Ok(v)
    }

    /// The configuration of the VM a snapshot's machine describes, run as these options say.
    pub fn to_config(&self, m: &crate::snapshot::Machine) -> Result<VmConfig, String> {
        use crate::arch::x86_64::nested::NestedMode;
        let timeout = match self.timeout {
            Some(t) if !(t.is_finite() && t > 0.0) => {
                return Err(format!(
                    "--timeout must be a positive number of seconds, not {t}"
                ))
            }
            t => t.map(Duration::from_secs_f64),
        };
        Ok(VmConfig {
            kernel: KernelSource::Snapshot {
                dir: self.snapshot.clone(),
                guest: m.guest.clone(),
            },
            initrd: None,
            cmdline: m.cmdline.clone(),
            mem_bytes: m.mem_bytes,
            cpus: m.cpus,
            debug_exit: m.debug_exit,
            probe: m.probe,
            stats_json: self.stats_json.clone(),
            summary: !self.no_summary,
            reboot_status: self.reboot_status,
            timeout,
            console_log: self.console_log.clone(),
            console_log_max: 64 << 20,
            console_buffer: 1 << 20,
            unpack_bzimage: true,
            sample_rips: false,
            virtio: self.devices(&m.virtio)?,
            api_socket: self.api_socket.clone(),
            nested: if m.nested.is_some() {
                NestedMode::On
            } else {
                NestedMode::Off
            },
            irq_path: Default::default(),
            dedicated: None,
            halt_poll_ns: None,
            kernel_exit_reasons: false,
            seccomp: self.seccomp,
            seccomp_selftest: None,
            mem_limit: None,
            landlock: self.landlock,
            landlock_selftest: None,
            snapshot_dir: self.snapshot_dir.as_deref().map(absolute),
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum KitCommand {
    /// List the embedded guests.
    List,
    /// Write the embedded guests into DIR (they boot under QEMU too).
    Extract { dir: PathBuf },
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Kernel image: bzImage (a distribution's vmlinuz) or ELF vmlinux (PVH entry if present).
    #[arg(long, conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, appended to exitless's defaults (see --no-default-cmdline).
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Use only --cmdline, without exitless's fast-boot defaults.
    #[arg(long)]
    pub no_default_cmdline: bool,
    /// Let the kernel print its whole boot log (drops `quiet`).
    #[arg(long)]
    pub verbose_boot: bool,
    /// Guest memory, e.g. 512M or 2G (default: 512M for Linux, 64M for kit guests).
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u8,
    /// Boot an embedded test-kit guest by name (see `exitless kit list`); default: demo.
    #[arg(long)]
    pub guest: Option<String>,
    /// Write the run report (exit counts by reason, port, device) as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Do not print the exit summary at the end.
    #[arg(long)]
    pub no_summary: bool,
    /// Exit status when the guest reboots (default 0).
    #[arg(long, default_value_t = 0)]
    pub reboot_status: i32,
    /// Stop the VM after this many seconds (status 124).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Also copy the guest console to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Stop writing the console log at this size (a note ends it), so a guest cannot fill the
    /// disk (e.g. 64M, 100B); stdout is not limited.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    pub console_log_max: u64,
    /// Room for console output on its way to stdout (e.g. 1M, 4K): the guest never waits for
    /// stdout; when a stalled stdout (a pipe nobody reads) lets this fill, the rest is dropped
    /// and counted (`bytes_dropped` in the report).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub console_buffer: u64,
    /// Add the QEMU-compatible isa-debug-exit port (0xf4); on for kit guests.
    #[arg(long)]
    pub debug_exit: bool,
    /// Add the kit's probe device (counted PIO/MMIO exits); on for kit guests.
    #[arg(long)]
    pub probe: bool,
    /// Sample each vCPU's instruction pointer about 100 times a second and print the hottest
    /// addresses at the end: where a slow or hung guest spends its time.
    #[arg(long)]
    pub sample_rips: bool,
    /// Boot a bzImage through its own decompressor instead of unpacking it in exitless.
    #[arg(long)]
    pub guest_decompress: bool,
    /// Print the kernel command line exitless would use, and exit.
    #[arg(long)]
    pub print_cmdline: bool,
    /// A virtio-blk disk over a raw image:
    /// `path=IMG[,readonly=on][,id=SERIAL][,direct=on][,coalesce=off|adaptive[:T]]`
    /// (repeatable; `direct=on` bypasses the host's page cache with O_DIRECT). `coalesce`: the
    /// device's interrupt moderation, as on --net (default adaptive:32).
    #[arg(
        long,
        value_name = "path=IMG[,readonly=on][,id=ID][,direct=on][,coalesce=off|adaptive[:T]]"
    )]
    pub disk: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-net device over a host tap: `tap=NAME[,mac=MAC][,coalesce=off|adaptive[:T]]`
    /// (repeatable). The tap must exist (`ip tuntap add NAME mode tap [user USER]`); as root a
    /// missing one is created, down. `coalesce`: interrupt moderation, fewer interrupts (exits)
    /// per packet. `adaptive:T` (default adaptive:32) never sends two interrupts less than T µs
    /// (1..=1000) apart while holding one back pays (it covered several packets) and sends at
    /// once for sparse or request-response traffic; 32 µs is where the thesis's sweep (16..96)
    /// had already cut most interrupts at no throughput cost. `off`: every interrupt the driver
    /// asks for (EVENT_IDX alone). The guest's own `ethtool -C` (VIRTIO_NET_F_NOTF_COAL) takes
    /// precedence; its values are bounded (at most 10 ms).
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,coalesce=off|adaptive[:T]]")]
    pub net: Vec<String>,
    /// A virtio-balloon device (statistics, free-page reporting):
    /// `[size=SIZE][,stats=SECONDS][,reporting=on|off][,deflate_on_oom=on|off]`.
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "",
        value_name = "size=SIZE,stats=SECS,reporting=on|off,deflate_on_oom=on|off"
    )]
    pub balloon: Option<String>,
    /// A virtio-vsock device whose host side is a Unix socket: `cid=N,socket=PATH`.
    #[arg(long, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<String>,
    /// The longest time a device worker spins on its request queues (block requests, network
    /// transmit) and its network receive (the tap) after a burst, so that a driver that keeps
    /// them fed needs no notification (no exit) and a frame from the host needs no wake-up.
    /// Adaptive: it only grows while work comes back that fast. 0 turns it off.
    #[arg(long, default_value_t = 32, value_name = "MICROSECONDS",
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub queue_poll_us: u64,
    /// An emulated Intel VT-d IOMMU in front of the virtio devices (they then offer
    /// VIRTIO_F_ACCESS_PLATFORM): `[mode=samecore|sidecore][,caching-mode=on|off][,cpu=N]`.
    /// Samecore traps every register access; sidecore polls the register page from a VMM thread
    /// (pinned to host CPU N if given). A Linux guest needs `intel_iommu=on`.
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "",
        value_name = "mode=samecore|sidecore,caching-mode=on|off,cpu=N"
    )]
    pub iommu: Option<String>,
    /// Listen for control requests on this Unix socket while the VM runs: live statistics, the
    /// balloon's target, quit (`exitless ctl`; one JSON object per line).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Hardware virtualization (AMD SVM, Intel VMX) for the guest, so that it can run VMs itself:
    /// `on` or `off`. Default: on where the host KVM offers it to guests (its supported CPUID has
    /// SVM or VMX: kvm_amd/kvm_intel loaded with nested=1), off elsewhere; never on PVM hosts
    /// (`on` is refused there, as on any host that cannot give it).
    #[arg(
        long,
        value_name = "on|off",
        default_value = "auto",
        hide_default_value = true
    )]
    pub nested: crate::arch::x86_64::nested::NestedMode,
    /// x2APIC for the guest: `on` or `off`. With x2APIC the guest's LAPIC is driven by MSRs (an
    /// EOI is a short in-kernel MSR exit, or none with APICv) instead of the xAPIC MMIO page
    /// (an APIC-access exit KVM must decode). Default: on where the host KVM offers it (every
    /// KVM emulates it); `off` hides the CPUID bit; `on` is refused where KVM lacks it.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "auto",
        hide_default_value = true
    )]
    pub x2apic: crate::arch::x86_64::irq_path::Toggle,
    /// KVM's paravirtual EOI (KVM_FEATURE_PV_EOI): the guest acknowledges most interrupts in
    /// shared memory instead of writing the EOI register, with no exit. Default: on where the
    /// host KVM offers it; `off` hides the feature bit; `on` is refused where KVM lacks it.
    #[arg(
        long,
        value_name = "on|off",
        default_value = "auto",
        hide_default_value = true
    )]
    pub pv_eoi: crate::arch::x86_64::irq_path::Toggle,
    /// Dedicated cores (for hosts with a core per vCPU to spare): pin vCPU i to the i-th CPU of
    /// CPULIST (e.g. `2,3` or `2-3`; default: the last --cpus CPUs this process may use), move
    /// exitless's other threads to the remaining CPUs, and keep HLT (and MWAIT, PAUSE, C-state
    /// changes where the host allows) in the guest (KVM_CAP_X86_DISABLE_EXITS): an idle vCPU
    /// halts on its own core with no exit. The guest is told its vCPUs are never preempted
    /// (KVM_HINTS_REALTIME). Refused where the host cannot keep HLT in the guest (PVM).
    #[arg(
        long,
        value_name = "CPULIST",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    pub dedicated_cores: Option<String>,
    /// How long KVM polls for a wake-up before it puts a halted vCPU thread to sleep, for this VM
    /// (KVM_CAP_HALT_POLL; default: the host's kvm.halt_poll_ns). 0 sleeps at once.
    #[arg(long, value_name = "NS",
          value_parser = clap::value_parser!(u64).range(0..=crate::dedicated::MAX_HALT_POLL_NS))]
    pub halt_poll_ns: Option<u64>,
    /// Count KVM's in-kernel exits by reason too (HLT, MSR, interrupt window, nested page fault,
    /// ...), with counting perf events on the kvm:kvm_exit tracepoint, one set per vCPU thread.
    /// Needs tracefs mounted, root (or CAP_PERFMON) and a hardware KVM; where that is missing the
    /// run goes on with KVM's aggregate counters and says why. Off by default: each exit then
    /// pays for the tracepoint.
    #[arg(long)]
    pub kernel_exit_reasons: bool,
    /// System call filters, one per kind of thread (vCPU, device worker, control API, main):
    /// `on` stops a forbidden call with SIGSYS, names the call and the thread on stderr and
    /// exits with status 159; `log` lets it through and the kernel logs it (audit log or dmesg);
    /// `off` runs unfiltered.
    #[arg(long, value_enum, default_value_t = crate::seccomp::Mode::On)]
    pub seccomp: crate::seccomp::Mode,
    /// Landlock: once set up, each thread may open only the few files the VMM still needs
    /// (the report, `/proc/self`, removing its sockets at the end); every other path is refused.
    /// `on` restricts where the kernel has Landlock and says once where it has none; `require`
    /// refuses to start there; `off` does not restrict.
    #[arg(long, value_enum, default_value_t = crate::sandbox::Mode::On)]
    pub landlock: crate::sandbox::Mode,
    /// Test only: the main thread tries to open PATH once restricted and says whether it could.
    #[arg(long, hide = true, value_name = "PATH")]
    pub landlock_selftest: Option<PathBuf>,
    /// Snapshots (`exitless ctl snapshot DIR`) may be written beneath this directory (created
    /// if missing); with Landlock on it is the only place they may go.
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Limit the memory the VMM (guest RAM included) may use, so that the host reclaims guest
    /// RAM behind the guest's back (uncooperative swapping): `SIZE[,swap=SIZE][,cgroup=PATH]`.
    /// exitless creates a memory cgroup for itself (root only) and removes it at the end, or
    /// joins the existing group PATH (size 0 keeps that group's limit).
    #[arg(long, value_name = "SIZE[,swap=SIZE][,cgroup=PATH]")]
    pub mem_limit: Option<String>,
    /// Test only: make a thread of this kind (main, vcpu, worker, api, console) issue a
    /// forbidden system call (getpgid) once its filter is on.
    #[arg(long, hide = true, value_name = "KIND")]
    pub seccomp_selftest: Option<String>,
}

impl RunArgs {
    /// The virtio devices asked for.
    pub fn virtio_config(&self) -> Result<crate::devices::virtio::config::VirtioConfig, String> {
        use crate::devices::virtio::config as vc;
        Ok(vc::VirtioConfig {
            disks: self
                .disk
                .iter()
                .map(|d| vc::parse_disk(d))
                .collect::<Result<_, _>>()?,
            rng: self.rng,
            nets: self
                .net
                .iter()
                .enumerate()
                .map(|(i, n)| vc::parse_net(n, i))
                .collect::<Result<_, _>>()?,
            balloon: self
                .balloon
                .as_deref()
                .map(vc::parse_balloon)
                .transpose()
                .map_err(|e| format!("--balloon: {e}"))?,
            vsock: self.vsock.as_deref().map(vc::parse_vsock).transpose()?,
            queue_poll_us: self.queue_poll_us,
            iommu: self
                .iommu
                .as_deref()
                .map(crate::devices::iommu::parse)
                .transpose()?,
        })
    }
}

impl RunArgs {
    /// Turns arguments into a VM configuration; `host_cmdline` is what this host needs added to a
    /// Linux command line.
    pub fn to_config(&self, host_cmdline: &str) -> Result<VmConfig, String> {
        let kernel = match (&self.kernel, &self.guest) {
            (Some(k), _) => KernelSource::File(k.clone()),
            (None, Some(g)) => {
                let (name, _) = crate::kit::get(g).ok_or_else(|| {
                    format!(
                        "no embedded guest named {g:?} (have: {})",
                        crate::kit::names().join(", ")
                    )
                })?;
                KernelSource::Embedded(name)
            }
            (None, None) => KernelSource::Embedded(crate::kit::DEFAULT_GUEST),
        };
        if self.cpus == 0 {
            return Err("--cpus must be at least 1".into());
        }
        let kit = matches!(kernel, KernelSource::Embedded(_));
        let mut cmdline = String::new();
        if !self.no_default_cmdline && !kit {
            cmdline.push_str(DEFAULT_CMDLINE);
            if !self.verbose_boot {
                cmdline.push_str(" quiet");
            }
            if !host_cmdline.is_empty() {
                cmdline.push(' ');
                cmdline.push_str(host_cmdline);
            }
        }
        if !self.cmdline.is_empty() {
            cmdline = crate::config::append_cmdline(&cmdline, &self.cmdline);
        }
        let timeout = match self.timeout {
            Some(t) if !(t.is_finite() && t > 0.0) => {
                return Err(format!(
                    "--timeout must be a positive number of seconds, not {t}"
                ))
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        Ok(VmConfig {
            mem_bytes: self.mem.unwrap_or_else(|| VmConfig::default_mem(&kernel)),
            kernel,
            initrd: self.initrd.clone(),
            cmdline,
            cpus: self.cpus,
            debug_exit: self.debug_exit || kit,
            probe: self.probe || kit,
            stats_json: self.stats_json.clone(),
            summary: !self.no_summary,
            reboot_status: self.reboot_status,
            timeout,
            console_log: self.console_log.clone(),
            console_log_max: self.console_log_max,
            console_buffer: self.console_buffer,
            unpack_bzimage: !self.guest_decompress,
            sample_rips: self.sample_rips,
            virtio: self.virtio_config()?,
            api_socket: self.api_socket.clone(),
            nested: self.nested,
            irq_path: crate::arch::x86_64::irq_path::IrqPathRequest {
                x2apic: self.x2apic,
                pv_eoi: self.pv_eoi,
            },
            dedicated: self
                .dedicated_cores
                .as_deref()
                .map(crate::dedicated::DedicatedRequest::parse)
                .transpose()?,
            halt_poll_ns: self.halt_poll_ns,
            kernel_exit_reasons: self.kernel_exit_reasons,
            seccomp: self.seccomp,
            seccomp_selftest: self.seccomp_selftest.clone(),
            landlock: self.landlock,
            landlock_selftest: self.landlock_selftest.clone(),
            snapshot_dir: self.snapshot_dir.as_deref().map(absolute),
            mem_limit: self
                .mem_limit
                .as_deref()
                .map(crate::memlimit::parse)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["exitless", "run"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| match c.command {
            Command::Run(r) => r,
            _ => unreachable!(),
        })
    }

    #[test]
    fn a_restore_takes_the_snapshot_s_devices_with_its_overrides() {
        let restore = |args: &[&str]| {
            let mut v = vec!["exitless", "restore", "--snapshot", "/s"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Restore(r) => r,
                _ => unreachable!(),
            }
        };
        let run = run_args(&["--disk", "path=/a.img", "--net", "tap=tap0", "--rng"]).unwrap();
        let mut m = crate::snapshot::Machine {
            guest: "kit:demo".into(),
            mem_bytes: 64 << 20,
            cpus: 1,
            nested: None,
            debug_exit: true,
            probe: true,
            cmdline: String::new(),
            virtio: run.to_config("").unwrap().virtio,
        };
        let same = restore(&[]).to_config(&m).unwrap().virtio;
        assert_eq!(same, m.virtio, "the snapshot's devices");
        let c = restore(&["--disk-image", "/b.img", "--net-tap", "tap9"])
            .to_config(&m)
            .unwrap();
        assert_eq!(c.virtio.disks[0].path, PathBuf::from("/b.img"));
        assert_eq!(c.virtio.nets[0].tap, "tap9");
        assert!(c.virtio.rng);
        let e = restore(&["--net-tap", "a", "--net-tap", "b"])
            .to_config(&m)
            .unwrap_err();
        assert!(e.contains("--net-tap given 2 times"), "{e}");
        m.virtio.disks.clear();
        assert!(restore(&["--disk-image", "/b.img"]).to_config(&m).is_err());
        assert!(restore(&["--net-mac", "zz"]).to_config(&m).is_err());
        assert!(
            restore(&["--vsock-cid", "9"]).to_config(&m).is_err(),
            "no vsock"
        );
        m.virtio.vsock = Some(crate::devices::virtio::config::VsockConfig {
            cid: 3,
            socket: "/v.sock".into(),
        });
        let c = restore(&["--vsock-cid", "9", "--vsock-socket", "/w.sock"])
            .to_config(&m)
            .unwrap();
        let v = c.virtio.vsock.unwrap();
        assert_eq!((v.cid, v.socket), (9, PathBuf::from("/w.sock")));
    }

    #[test]
    fn defaults_boot_the_demo() {
        let c = run_args(&[]).unwrap().to_config("").unwrap();
        assert_eq!(c.kernel, KernelSource::Embedded("demo"));
        assert_eq!(c.cpus, 1);
        assert_eq!(c.mem_bytes, 64 << 20);
        assert!(c.debug_exit && c.probe && c.summary);
        assert!(c.cmdline.is_empty());
        assert_eq!(c.irq_path, Default::default());
        assert_eq!((c.dedicated.clone(), c.halt_poll_ns), (None, None));
        let c = run_args(&["--dedicated-cores", "--halt-poll-ns", "0"])
            .unwrap()
            .to_config("")
            .unwrap();
        assert_eq!(c.dedicated.unwrap().cpus, None);
        assert_eq!(c.halt_poll_ns, Some(0));
        let c = run_args(&["--dedicated-cores=2,3"])
            .unwrap()
            .to_config("")
            .unwrap();
        assert_eq!(c.dedicated.unwrap().cpus, Some(vec![2, 3]));
        let c = run_args(&["--x2apic", "off", "--pv-eoi=on"])
            .unwrap()
            .to_config("")
            .unwrap();
        use crate::arch::x86_64::irq_path::Toggle;
        assert_eq!(
            (c.irq_path.x2apic, c.irq_path.pv_eoi),
            (Toggle::Off, Toggle::On)
        );
    }

    #[test]
    fn linux_gets_the_fast_boot_command_line() {
        let c = run_args(&[
            "--kernel",
            "/k",
            "--mem",
            "2G",
            "--cpus",
            "2",
            "--cmdline",
            "root=/dev/vda",
        ])
        .unwrap()
        .to_config("noxsave")
        .unwrap();
        assert_eq!(c.kernel, KernelSource::File("/k".into()));
        assert_eq!(c.mem_bytes, 2 << 30);
        assert!(c.cmdline.starts_with(DEFAULT_CMDLINE));
        assert!(c.cmdline.contains(" quiet"));
        assert!(c.cmdline.contains("noxsave"));
        assert!(c.cmdline.ends_with("root=/dev/vda"));
        assert!(!c.debug_exit && !c.probe);
        let v = run_args(&[
            "--kernel",
            "/k",
            "--verbose-boot",
            "--no-default-cmdline",
            "--cmdline",
            "x=1",
        ])
        .unwrap()
        .to_config("noxsave")
        .unwrap();
        assert_eq!(v.cmdline, "x=1");
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(run_args(&["--mem", "lots"]).is_err());
        assert!(run_args(&["--cpus", "-1"]).is_err());
        assert!(run_args(&["--cpus", "300"]).is_err());
        assert!(
            run_args(&["--initrd", "/i"]).is_err(),
            "initrd needs a kernel"
        );
        assert!(run_args(&["--kernel", "/k", "--guest", "demo"]).is_err());
        assert!(run_args(&["--cpus", "0"]).unwrap().to_config("").is_err());
        assert!(run_args(&["--guest", "nope"])
            .unwrap()
            .to_config("")
            .is_err());
        // clap takes "-3" for an unknown flag; either way the value is refused.
        assert!(run_args(&["--timeout=-3"])
            .map(|a| a.to_config("").is_err())
            .unwrap_or(true));
        assert!(run_args(&["--dedicated-cores=1-0"])
            .unwrap()
            .to_config("")
            .unwrap_err()
            .starts_with("--dedicated-cores: "));
        assert!(run_args(&["--halt-poll-ns", "-5"]).is_err());
        assert!(run_args(&["--halt-poll-ns", "2000000000"]).is_err());
        for opt in ["--x2apic", "--pv-eoi"] {
            let e = run_args(&[opt, "maybe"]).unwrap_err().to_string();
            assert!(e.contains("on, off or auto"), "{e}");
        }
        assert!(run_args(&["--timeout", "0"])
            .unwrap()
            .to_config("")
            .is_err());
    }
}
