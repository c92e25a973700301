//! Seccomp filters, one per kind of thread (`exitless run --seccomp on|log|off`, default `on`).
//!
//! Each thread of a running VM installs, once its own set-up is done, a filter that allows only
//! the system calls that kind of thread makes:
//!
//! | kind | thread(s) | from |
//! |---|---|---|
//! | `main` | the main thread once the vCPUs run (waiting, kicks, the stop, the report) | [`Kind::Main`] |
//! | `console` | `console-in` (host stdin into the UART) | [`Kind::Console`] |
//! | `console-out` | `console-out` (the guest's console output to stdout and the log) | [`Kind::ConsoleOut`] |
//! | `vcpu` | `vcpuN` (KVM_RUN and the exit path, device set-up at DRIVER_OK, MSI-X routes, its own state for a snapshot) | [`Kind::Vcpu`] |
//! | `api` | `api` (the REST API's single-threaded runtime; pause, resume, writing a snapshot) | [`Kind::Api`] |
//! | `worker-*` | device workers: `blk`, `net`, `rng`, `balloon`, `vsock` | [`Kind::Worker`] |
//! | `launcher` | the thread that starts device workers | [`Kind::Launcher`] |
//! | `iommu-sidecore` | polls the emulated IOMMU's register page (`--iommu mode=sidecore`) | [`Kind::Sidecore`] |
//!
//! The lists are Rust functions here rather than seccompiler JSON files: the system calls are
//! named by `libc::SYS_*` and the ioctls by the same constants the code issues (kvm-bindings
//! structures, `libc::TUN*`), so a typo or a changed number does not compile, and each entry sits
//! next to the reason it is there. `ioctl` is allowed only for the request numbers listed (the
//! descriptor itself cannot be checked by seccomp); `socket` only for `AF_UNIX`; `tgkill` only
//! within this process.
//!
//! **Why a launcher.** A thread inherits its creator's filter and can only add to it. Device
//! workers start when the guest's driver sets DRIVER_OK, on a vCPU thread, so a worker spawned
//! there would carry the vCPU's filter and could not do its I/O. The vCPU hands the spawn to the
//! launcher thread instead (a channel; only at DRIVER_OK), whose filter is the union of the
//! workers' filters plus what starting a thread takes; each worker then adds its own, narrower one.
//!
//! **What a forbidden call does.** With `on`, the kernel stops the call with `SIGSYS`
//! (`SECCOMP_RET_TRAP`); exitless's handler restores the terminal, writes one line naming the
//! thread kind, the system call and its first three arguments (`exitless: seccomp: the vcpu
//! thread made a forbidden system call: getpgid (121) with 0x0, ...`) and ends the process with status [`TRAP_STATUS`] (159 = 128 + SIGSYS).
//! With `log`, the kernel logs the call (`SECCOMP_RET_LOG`: the audit log or `dmesg`) and lets it
//! through: the way to find a missing entry on a new host without losing a VM.
//!
//! **How the lists were found.** The kit-guest and device tests ran under `strace -f` (each
//! thread's calls after its set-up), then every test under `--seccomp on` (the default): the unit
//! and kit tests, the test kernel on virtio-blk/net/rng/balloon (`tests/virtio_linux.rs`, which
//! found `KVM_SET_VCPU_EVENTS`: a completed emulation that faults injects the exception) on this
//! project's PVM host, and the demo and the Debian guest driving every device
//! (`tests/debian_devices.rs`) in the emulated SVM host (hardware-style KVM). The code paths were
//! read for what the tests do not reach (errors, warnings, panics on any thread, the report). Calls of
//! the Rust standard library and glibc that any thread may make are in [`base`]: memory
//! (`mmap`, `munmap`, `madvise`, `brk`, ...), `futex`, signal masks and alternate stacks, clocks
//! (the vDSO falls back to the system call on some clock sources), sleeping, `getrandom` (a
//! `HashMap`'s keys), writing warnings and panics to stderr, thread exit. Where a path was
//! unsure, the call is allowed and the reason noted.
//!
//! Known limits: a thread's filter covers only what exitless itself does on it; a panic that is
//! not caught, printed with `RUST_BACKTRACE` set, reads the binary's debug information, which only
//! the main and API threads may (elsewhere the report is the SIGSYS line instead). Arguments are
//! checked only for `ioctl`, `socket` and `tgkill`: `openat` (main, API, balloon worker) takes any
//! path.

mod names;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_irq_level,
    kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msrs,
    kvm_nested_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_translation, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// The status exitless ends with when a thread makes a forbidden system call (`--seccomp on`):
/// 128 + SIGSYS, what a shell shows for a process killed by that signal.
pub const TRAP_STATUS: i32 = 128 + libc::SIGSYS;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// A forbidden system call ends exitless (status 159) naming the call and the thread.
    #[default]
    On,
    /// A forbidden system call is logged by the kernel and allowed.
    Log,
    /// No filters.
    Off,
}

/// The kinds of device worker, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Block,
    Net,
    Rng,
    Balloon,
    Vsock,
    /// A device this module does not know (tests' devices): the union of the workers' lists.
    Other,
}

impl Device {
    /// The kind of a device by its `VirtioDevice::kind()`.
    pub fn of(kind: &str) -> Device {
        match kind {
            "virtio-blk" => Device::Block,
            "virtio-net" => Device::Net,
            "virtio-rng" => Device::Rng,
            "virtio-balloon" => Device::Balloon,
            "virtio-vsock" => Device::Vsock,
            _ => Device::Other,
        }
    }
    const ALL: [Device; 5] = [
        Device::Block,
        Device::Net,
        Device::Rng,
        Device::Balloon,
        Device::Vsock,
    ];
}

/// A kind of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Main,
    Console,
    /// The console's writer (`devices::legacy::serial::ConsoleWriter`).
    ConsoleOut,
    Vcpu,
    Api,
    Launcher,
    Worker(Device),
    /// The IOMMU's sidecore poller.
    Sidecore,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Main => "main",
            Kind::Console => "console-in",
            Kind::ConsoleOut => "console-out",
            Kind::Vcpu => "vcpu",
            Kind::Api => "api",
            Kind::Launcher => "launcher",
            Kind::Sidecore => "iommu-sidecore",
            Kind::Worker(Device::Block) => "virtio-blk worker",
            Kind::Worker(Device::Net) => "virtio-net worker",
            Kind::Worker(Device::Rng) => "virtio-rng worker",
            Kind::Worker(Device::Balloon) => "virtio-balloon worker",
            Kind::Worker(Device::Vsock) => "virtio-vsock worker",
            Kind::Worker(Device::Other) => "device worker",
        }
    }

    fn code(self) -> u8 {
        match self {
            Kind::Main => 1,
            Kind::Console => 2,
            Kind::Vcpu => 3,
            Kind::Api => 4,
            Kind::Launcher => 5,
            Kind::Worker(d) => 6 + d as u8,
            Kind::Sidecore => 20,
            Kind::ConsoleOut => 21,
        }
    }

    /// Every thread kind, each device's worker included.
    fn all() -> impl Iterator<Item = Kind> {
        [
            Kind::Main,
            Kind::Console,
            Kind::ConsoleOut,
            Kind::Vcpu,
            Kind::Api,
            Kind::Launcher,
        ]
        .into_iter()
        .chain(Device::ALL.into_iter().map(Kind::Worker))
        .chain([Kind::Worker(Device::Other), Kind::Sidecore])
    }

    fn from_code(c: u8) -> Option<Kind> {
        Kind::all().find(|k| k.code() == c)
    }
}

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iowr_nr!(KVM_IRQ_LINE_STATUS, KVMIO, 0x67, kvm_irq_level);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
// A snapshot: the vCPU's state, read on its thread; the VM's, read on the API's.
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_iowr_nr!(KVM_GET_NESTED_STATE, KVMIO, 0xbe, kvm_nested_state);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(r: &mut Rules, calls: &[libc::c_long]) {
    for &c in calls {
        // An unconditional entry: an empty rule list matches any arguments.
        r.insert(c, vec![]);
    }
}

/// Allows `call` when argument `arg` equals one of `values` (unless it is already allowed
/// whatever its arguments).
fn allow_args(r: &mut Rules, call: libc::c_long, arg: u8, values: &[u64]) {
    let cond = |v: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
            .and_then(|c| SeccompRule::new(vec![c]))
            .expect("a one-condition rule is valid")
    };
    match r.get_mut(&call) {
        Some(rules) if rules.is_empty() => {}
        Some(rules) => rules.extend(values.iter().map(|&v| cond(v))),
        None => {
            r.insert(call, values.iter().map(|&v| cond(v)).collect());
        }
    }
}

/// The union of two lists.
fn merge(into: &mut Rules, from: Rules) {
    for (call, rules) in from {
        match into.get_mut(&call) {
            Some(have) if have.is_empty() => {}
            Some(have) if rules.is_empty() => have.clear(),
            Some(have) => {
                for rule in rules {
                    if !have.contains(&rule) {
                        have.push(rule);
                    }
                }
            }
            None => {
                into.insert(call, rules);
            }
        }
    }
}

/// What any thread may do: the standard library's and glibc's own calls (memory, locks, signal
/// masks and stacks, clocks, sleeping, thread exit), stderr for warnings and panics, and what
/// the SIGSYS handler needs (restoring the terminal, `exit_group`).
fn base() -> Rules {
    use libc::*;
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            SYS_brk,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_futex,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_gettid,
            SYS_getpid,
            SYS_getrandom,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_restart_syscall,
            SYS_rseq,
            SYS_set_robust_list,
            SYS_exit,
            SYS_exit_group,
        ],
    );
    // Signals only within this process (`abort` on a double panic, vCPU kicks).
    allow_args(&mut r, SYS_tgkill, 0, &[std::process::id() as u64]);
    // The SIGSYS handler and the SIGABRT/SIGQUIT handlers restore the terminal.
    allow_args(&mut r, SYS_ioctl, 1, &[TCSETS]);
    r
}

/// Starting a thread (std::thread::Builder::spawn: stack, guard page, name, glibc's set-up).
fn spawning() -> Rules {
    use libc::*;
    let mut r = Rules::new();
    allow(&mut r, &[SYS_clone3, SYS_clone, SYS_prctl]);
    r
}

/// Reading a small file (`/proc/self/statm` for the balloon's RSS facts).
fn read_file(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_openat,
            SYS_read,
            SYS_statx,
            SYS_newfstatat,
            SYS_fstat,
            SYS_lseek,
        ],
    );
}

/// The main thread once the vCPUs run: waiting for the end (channel, clock, sleep), kicks,
/// the stop (joins, device workers' kill eventfds), restoring the terminal, KVM's statistics
/// descriptors, the report (stderr, `--stats-json`), the vsock and control sockets' removal
/// (the control socket's drop connects to itself to wake its accept loop), and freeing it all.
fn main_thread() -> Rules {
    use libc::*;
    let mut r = base();
    read_file(&mut r);
    allow(
        &mut r,
        &[
            SYS_pread64,
            SYS_unlink,
            SYS_unlinkat,
            SYS_rmdir,
            SYS_getdents64,
            SYS_connect,
            SYS_fcntl,
            SYS_dup,
            SYS_ftruncate,
            SYS_sched_getaffinity,
        ],
    );
    allow_args(&mut r, SYS_socket, 0, &[AF_UNIX as u64]);
    allow_args(&mut r, SYS_ioctl, 1, &[TCGETS, TCSETSW, TCSETSF]);
    r
}

/// `console-in`: reads stdin, feeds the UART (its interrupt eventfd), sleeps while the FIFO is
/// full, sends Ctrl-A x as the VM's end.
fn console() -> Rules {
    let mut r = base();
    allow(&mut r, &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll]);
    r
}

/// A vCPU: `KVM_RUN`, the registers the exit path reads and completes (failed emulations, stuck
/// hypercalls, RIP samples), the console's output, and what a register write may set off on the
/// device side: MSI-X routes and irqfds, device activation at DRIVER_OK (eventfds, epoll, the
/// tap's offloads, the vsock listener made non-blocking), the worker's start through the
/// launcher and its stop (a reset).
fn vcpu() -> Rules {
    use libc::*;
    let mut r = base();
    allow(
        &mut r,
        &[
            SYS_read,
            SYS_eventfd2,
            SYS_fcntl,
            SYS_dup,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            // The balloon's statistics timer, made at activation.
            SYS_timerfd_create,
            SYS_timerfd_settime,
        ],
    );
    allow_args(
        &mut r,
        SYS_ioctl,
        1,
        &[
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_SET_SREGS(),
            KVM_TRANSLATE(),
            // A completed emulation that faults injects the exception.
            KVM_GET_VCPU_EVENTS(),
            KVM_SET_VCPU_EVENTS(),
            // Not issued on the paths the tests take; allowed so that a new exit path reading
            // vCPU state does not kill a VM on a host these tests have not seen.
            KVM_GET_MSRS(),
            KVM_SET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            // A snapshot's `Save`, answered by the parked vCPU (after a `KVM_RUN` with
            // immediate_exit that completes its pending I/O).
            KVM_GET_CPUID2(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_NESTED_STATE(),
            // VM-level interrupt plumbing (MSI-X table writes, BAR moves).
            KVM_SET_GSI_ROUTING(),
            KVM_IRQFD(),
            KVM_IOEVENTFD(),
            KVM_SIGNAL_MSI(),
            KVM_IRQ_LINE(),
            KVM_IRQ_LINE_STATUS(),
            // Device activation.
            TUNSETOFFLOAD,
            FIONBIO,
        ],
    );
    r
}

/// The control API: one thread running its event loop (accepting clients, reading requests and
/// writing replies), the live facts (KVM's statistics descriptors, the balloon's RSS), a balloon
/// target (a configuration interrupt), pause and resume (kicks, the guest clock), and a
/// snapshot (its directory and files written and synced, guest RAM's resident pages asked with
/// `mincore`, the irqchip and PIT read).
fn api() -> Rules {
    use libc::*;
    let mut r = base();
    read_file(&mut r);
    allow(
        &mut r,
        &[
            SYS_accept4,
            SYS_accept,
            SYS_read,
            SYS_recvfrom,
            SYS_recvmsg,
            SYS_sendto,
            SYS_sendmsg,
            SYS_pread64,
            SYS_fcntl,
            SYS_shutdown,
            SYS_poll,
            SYS_ppoll,
            // The tokio runtime's event loop (set up before the filter: its epoll and eventfd).
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_pwait2,
            SYS_epoll_ctl,
            // The shutdown's wake-up connects to the socket itself.
            SYS_connect,
            // A snapshot stops the device workers and starts them again (their eventfds, epoll
            // and timer, as at activation).
            SYS_eventfd2,
            SYS_epoll_create1,
            SYS_timerfd_create,
            // A snapshot.
            SYS_mkdir,
            SYS_mkdirat,
            SYS_pwrite64,
            SYS_write,
            SYS_ftruncate,
            SYS_fsync,
            SYS_fdatasync,
            SYS_mincore,
            SYS_unlink,
            SYS_unlinkat,
        ],
    );
    allow_args(&mut r, SYS_socket, 0, &[AF_UNIX as u64]);
    // Pause and resume freeze and restore the guest's kvmclock (the kicks are `tgkill`s); a
    // snapshot reads the irqchip and the PIT.
    allow_args(
        &mut r,
        SYS_ioctl,
        1,
        &[
            KVM_GET_CLOCK(),
            KVM_SET_CLOCK(),
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
        ],
    );
    r
}

/// A device worker: its epoll loop over eventfds (queue notifications, the kill), irqfd writes,
/// and per device the I/O it does.
fn worker(d: Device) -> Rules {
    use libc::*;
    let mut r = base();
    allow(
        &mut r,
        &[
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_read,
            // The timer of held interrupts (moderation).
            SYS_timerfd_settime,
        ],
    );
    match d {
        Device::Block => allow(
            &mut r,
            &[
                SYS_preadv,
                SYS_pwritev,
                SYS_pread64,
                SYS_pwrite64,
                SYS_fsync,
                SYS_fdatasync,
                SYS_fallocate,
                SYS_readahead,
                SYS_lseek,
                SYS_fstat,
                SYS_statx,
            ],
        ),
        Device::Net => allow(&mut r, &[SYS_readv]),
        Device::Rng => {}
        Device::Balloon => {
            // /proc/self/statm (the RSS facts), the statistics timer, and the pagemap (opened
            // at start-up) that free-page reports look up.
            read_file(&mut r);
            allow(&mut r, &[SYS_timerfd_gettime, SYS_pread64]);
        }
        Device::Vsock => {
            allow(
                &mut r,
                &[
                    SYS_accept4,
                    SYS_accept,
                    SYS_connect,
                    SYS_recvfrom,
                    SYS_recvmsg,
                    SYS_sendto,
                    SYS_sendmsg,
                    SYS_shutdown,
                    SYS_fcntl,
                    SYS_getsockopt,
                ],
            );
            allow_args(&mut r, SYS_socket, 0, &[AF_UNIX as u64]);
            allow_args(&mut r, SYS_ioctl, 1, &[FIONBIO]);
        }
        Device::Other => {
            for d in Device::ALL {
                merge(&mut r, worker(d));
            }
        }
    }
    r
}

/// The launcher: starts workers (which install their own filters), so its list is every
/// worker's plus starting a thread and installing a filter.
fn launcher() -> Rules {
    let mut r = worker(Device::Other);
    merge(&mut r, spawning());
    allow(&mut r, &[libc::SYS_seccomp]);
    r
}

/// The IOMMU's sidecore: polling and sleeping (base), interrupts through eventfd writes (base),
/// and the fault / invalidation event routes when the guest programs them in the polled page.
fn sidecore() -> Rules {
    let mut r = base();
    allow_args(&mut r, libc::SYS_ioctl, 1, &[KVM_SET_GSI_ROUTING()]);
    r
}

/// The list of a kind of thread.
pub fn rules(kind: Kind) -> Rules {
    match kind {
        Kind::Main => main_thread(),
        Kind::Console => console(),
        // Writes (stdout, the log, the log's note on stderr) and waits: all in `base`.
        Kind::ConsoleOut => base(),
        Kind::Vcpu => vcpu(),
        Kind::Api => api(),
        Kind::Launcher => launcher(),
        Kind::Worker(d) => worker(d),
        Kind::Sidecore => sidecore(),
    }
}

/// Compiles a kind's filter for `mode` (not `Off`).
fn compile(kind: Kind, mode: Mode) -> Result<BpfProgram, String> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    SeccompFilter::new(
        rules(kind),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| format!("seccomp filter for {} threads: {e}", kind.name()))
}

struct State {
    mode: Mode,
    programs: Vec<(Kind, BpfProgram)>,
}

static STATE: OnceLock<State> = OnceLock::new();

thread_local! {
    /// This thread's kind, once its filter is on (for the SIGSYS report).
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Which thread kind `--seccomp-selftest` makes issue a forbidden call (0: none).
static SELFTEST: AtomicU8 = AtomicU8::new(0);

/// `--seccomp-selftest`'s code for a kind: every worker kind is `worker`.
fn selftest_code(kind: Kind) -> u8 {
    match kind {
        Kind::Worker(_) => Kind::Worker(Device::Other).code(),
        k => k.code(),
    }
}

/// Compiles every filter and installs the SIGSYS handler. Nothing is filtered until a thread
/// calls [`apply`]; with `Off` nothing ever is.
pub fn init(mode: Mode, selftest: Option<&str>) -> Result<(), String> {
    if let Some(s) = selftest {
        let k = match s {
            "main" => Kind::Main,
            "vcpu" => Kind::Vcpu,
            "api" => Kind::Api,
            "worker" => Kind::Worker(Device::Rng),
            "console" => Kind::Console,
            "console-out" => Kind::ConsoleOut,
            other => return Err(format!("--seccomp-selftest: unknown thread kind {other:?}")),
        };
        SELFTEST.store(selftest_code(k), Ordering::SeqCst);
    }
    if mode == Mode::Off {
        return Ok(());
    }
    let mut programs = Vec::new();
    for k in Kind::all() {
        programs.push((k, compile(k, mode)?));
    }
    keep_heaps_unshrunk();
    install_sigsys_handler()?;
    let _ = STATE.set(State { mode, programs });
    Ok(())
}

/// glibc reads `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap (a
/// `free` that leaves enough free memory at the heap's top), whichever thread that is and
/// however late: a vCPU thread met it in the hostile-guest suite (`openat` under its filter,
/// status 159). A trim threshold no heap reaches keeps glibc from shrinking heaps (it still
/// unmaps a heap that becomes wholly free, and large blocks are their own mappings); the
/// memory this keeps is the VMM's own heap, small next to guest RAM, which is mapped apart.
fn keep_heaps_unshrunk() {
    // SAFETY: mallopt only sets an allocator parameter; called before the VM's threads start.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
}

/// Whether filters are on (`on` or `log`).
pub fn enabled() -> bool {
    STATE.get().is_some()
}

/// Installs `kind`'s filter on the calling thread (nothing if [`init`] was not called or the
/// mode is `Off`). A filter the kernel refuses ends the process: the user asked for it.
pub fn apply(kind: Kind) {
    // Landlock first (its calls are not in the filters); workers inherit their creator's.
    if !matches!(kind, Kind::Worker(_)) {
        crate::sandbox::restrict_thread(kind.name());
    }
    let Some(state) = STATE.get() else { return };
    let Some((_, prog)) = state.programs.iter().find(|(k, _)| *k == kind) else {
        return;
    };
    if let Err(e) = seccompiler::apply_filter(prog) {
        crate::terminal::restore();
        eprintln!(
            "exitless: cannot install the seccomp filter of the {} thread: {e} \
             (--seccomp off runs without)",
            kind.name()
        );
        std::process::exit(1);
    }
    KIND.with(|k| k.set(kind.code()));
    log::debug!("seccomp ({:?}) on for a {} thread", state.mode, kind.name());
    if SELFTEST.load(Ordering::SeqCst) == selftest_code(kind) {
        // A call no list allows; the kernel's answer shows (test only).
        // SAFETY: getpgid has no memory-safety preconditions.
        unsafe { libc::syscall(libc::SYS_getpgid, 0) };
    }
}

/// Name of system call `nr`.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s)
}

/// The `_sigsys` member of `siginfo_t` (after signo, errno, code and padding).
#[repr(C)]
struct SigsysInfo {
    _signo: libc::c_int,
    _errno: libc::c_int,
    _code: libc::c_int,
    _pad: libc::c_int,
    _call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    _arch: libc::c_uint,
}

/// A fixed buffer that `write!` fills without allocating (a signal handler must not).
struct StackBuf {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    use std::fmt::Write;
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS, whose layout is `SigsysInfo`.
    let nr = i64::from(unsafe { (*(info as *const SigsysInfo)).syscall });
    // The call's first three arguments, from the registers it was made with (rdi, rsi, rdx).
    // SAFETY: with SA_SIGINFO the third argument is the thread's ucontext_t.
    let regs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
    let args = [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX].map(|r| regs[r as usize] as u64);
    let kind = Kind::from_code(KIND.with(Cell::get)).map_or("unfiltered", Kind::name);
    crate::terminal::restore();
    let mut out = StackBuf {
        buf: [0; 512],
        len: 0,
    };
    let _ = writeln!(
        out,
        "\nexitless: seccomp: the {kind} thread made a forbidden system call: {} ({nr}) \
         with {:#x}, {:#x}, {:#x}; exiting with status {TRAP_STATUS} (--seccomp log allows and \
         logs it)",
        syscall_name(nr).unwrap_or("?"),
        args[0],
        args[1],
        args[2],
    );
    // SAFETY: write and _exit are async-signal-safe; `out.buf` holds `out.len` bytes.
    unsafe {
        libc::write(2, out.buf.as_ptr().cast(), out.len);
        libc::_exit(TRAP_STATUS);
    }
}

fn install_sigsys_handler() -> Result<(), String> {
    // SAFETY: an all-zero sigaction is valid; the handler only reads its siginfo, formats into a
    // stack buffer, writes and exits.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;
type Request = (
    String,
    Device,
    Job,
    mpsc::Sender<std::io::Result<JoinHandle<()>>>,
);

static LAUNCHER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

/// Starts the launcher thread (filters on): device workers started from then on come from it.
/// Dropping the returned guard stops it.
pub fn start_launcher() -> Result<LauncherGuard, String> {
    if !enabled() {
        return Ok(LauncherGuard);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            apply(Kind::Launcher);
            for (name, dev, job, reply) in rx {
                let _ = reply.send(spawn_filtered(name, dev, job));
            }
        })
        .map_err(|e| format!("cannot start the launcher thread: {e}"))?;
    *LAUNCHER.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    Ok(LauncherGuard)
}

/// Stops the launcher when dropped.
pub struct LauncherGuard;

impl Drop for LauncherGuard {
    fn drop(&mut self) {
        LAUNCHER.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn spawn_filtered(name: String, dev: Device, job: Job) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        apply(Kind::Worker(dev));
        job()
    })
}

/// Starts a device worker of kind `device` (a `VirtioDevice::kind()`) under its filter: through
/// the launcher when filters are on, else directly.
pub fn spawn_worker(
    name: String,
    device: &str,
    job: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let dev = Device::of(device);
    let launcher = LAUNCHER.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(tx) = launcher else {
        return spawn_filtered(name, dev, Box::new(job));
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.send((name, dev, Box::new(job), reply_tx))
        .map_err(|_| std::io::Error::other("the launcher thread has ended"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the launcher thread has ended"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_both_modes() {
        for mode in [Mode::On, Mode::Log] {
            for k in Kind::all() {
                compile(k, mode).unwrap();
                assert_eq!(Kind::from_code(k.code()), Some(k));
            }
        }
    }

    #[test]
    fn the_launcher_allows_what_every_worker_does() {
        let l = launcher();
        for d in Device::ALL {
            for (call, rules) in worker(d) {
                let have = l
                    .get(&call)
                    .unwrap_or_else(|| panic!("{:?}", syscall_name(call)));
                assert!(have.is_empty() || !rules.is_empty(), "{call}");
            }
        }
    }

    #[test]
    fn the_lists_stay_short_and_forbid_what_no_thread_needs() {
        for k in Kind::all() {
            let r = rules(k);
            let ioctls = r.get(&libc::SYS_ioctl).map_or(0, Vec::len);
            eprintln!(
                "{}: {} system calls, {ioctls} ioctl requests",
                k.name(),
                r.len()
            );
            assert!(r.len() < 70, "{}: {}", k.name(), r.len());
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_ptrace,
                libc::SYS_open_by_handle_at,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_kill,
            ] {
                assert!(!r.contains_key(&forbidden), "{}: {forbidden}", k.name());
            }
            assert!(!r[&libc::SYS_ioctl].is_empty(), "{}: any ioctl", k.name());
        }
        assert!(!rules(Kind::Vcpu).contains_key(&libc::SYS_openat));
        assert!(!rules(Kind::Worker(Device::Rng)).contains_key(&libc::SYS_socket));
    }

    #[test]
    fn names() {
        assert_eq!(syscall_name(libc::SYS_getpgid), Some("getpgid"));
        assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
        assert_eq!(syscall_name(100_000), None);
        assert!(!rules(Kind::Vcpu).contains_key(&libc::SYS_getpgid));
        // What strace prints for them.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
    }
}
