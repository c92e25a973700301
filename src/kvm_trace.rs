//! KVM's in-kernel exits by reason (`--kernel-exit-reasons`), counted through the `kvm:kvm_exit`
//! tracepoint.
//!
//! exitless counts every exit that reaches it by reason (`stats`), and KVM's binary statistics
//! (`kvm_stats`) count all exits but only by a few kinds. The `kvm:kvm_exit` tracepoint fires on
//! every exit with its hardware exit reason; a *counting* perf event on it, one per reason of
//! interest with a kernel-side filter (`exit_reason == N`), opened by each vCPU thread for itself,
//! counts them with no ring buffer, no samples and nothing for exitless to do per exit: cheap
//! enough to leave on, yet off by default (each exit then pays for the tracepoint).
//!
//! Needs: tracefs mounted (the tracepoint's id is in `events/kvm/kvm_exit/id`), permission to
//! open tracepoint events (root, CAP_PERFMON, or `kernel.perf_event_paranoid` = -1), and a
//! hardware KVM (the reasons are SVM's or VMX's exit codes). Where any is missing the run goes on
//! with KVM's aggregate counters only and says why. Each vCPU thread opens its counters before
//! its seccomp filter is on; reading them is a `read(2)`.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// SVM exit codes (arch/x86/include/uapi/asm/svm.h) by the names exitless reports.
const SVM_REASONS: &[(&str, u32)] = &[
    ("external_interrupt", 0x060),
    ("nmi", 0x061),
    ("irq_window", 0x064),
    ("cpuid", 0x072),
    ("pause", 0x077),
    ("hlt", 0x078),
    ("io", 0x07b),
    ("msr", 0x07c),
    ("shutdown", 0x07f),
    ("hypercall", 0x081),
    ("xsetbv", 0x08d),
    ("nested_page_fault", 0x400),
    ("ipi", 0x401),
    ("apic_access", 0x402),
];

/// VMX basic exit reasons (arch/x86/include/uapi/asm/vmx.h).
const VMX_REASONS: &[(&str, u32)] = &[
    ("nmi_or_exception", 0),
    ("external_interrupt", 1),
    ("irq_window", 7),
    ("cpuid", 10),
    ("hlt", 12),
    ("hypercall", 18),
    ("cr_access", 28),
    ("io", 30),
    ("msr", 31),
    ("msr", 32),
    ("pause", 40),
    ("apic_access", 44),
    ("eoi_induced", 45),
    ("nested_page_fault", 48),
    ("mmio", 49),
    ("preemption_timer", 52),
    ("xsetbv", 55),
    ("apic_write", 56),
];

/// The reasons of a host's vendor module, or why there are none.
pub fn reasons(kvm_module: Option<&str>) -> Result<Reasons, String> {
    match kvm_module {
        Some("kvm_amd") => Ok(SVM_REASONS),
        Some("kvm_intel") => Ok(VMX_REASONS),
        Some("kvm_pvm") => Err("PVM's exits are not SVM's or VMX's".into()),
        _ => Err("no kvm_amd or kvm_intel module in /sys/module".into()),
    }
}

/// The tracepoint's id, or why it cannot be had.
pub fn tracepoint_id() -> Result<u64, String> {
    for root in TRACEFS {
        let path = format!("{root}/events/kvm/kvm_exit/id");
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                return s
                    .trim()
                    .parse()
                    .map_err(|_| format!("{path} does not hold a number"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(format!("{path}: {e} (run as root)"))
            }
            Err(_) => {}
        }
    }
    Err(
        "tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing) or has no \
         kvm:kvm_exit"
            .into(),
    )
}

/// `struct perf_event_attr` up to `config1` (PERF_ATTR_SIZE_VER0, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
vmm_sys_util::ioctl_iow_nr!(PERF_EVENT_IOC_SET_FILTER, 0x24, 6, *const libc::c_char);

/// One counting event on `kvm:kvm_exit` for the calling thread, counting only `filter`.
fn open_counter(id: u64, filter: &str) -> Result<File, String> {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        ..Default::default()
    };
    // SAFETY: perf_event_open reads `attr` (a valid perf_event_attr of the size it claims) and
    // returns a new descriptor or -1; pid 0 / cpu -1 is "this thread, any CPU", no group.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            0,
            -1,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EACCES | libc::EPERM) => {
                " (needs root, CAP_PERFMON or kernel.perf_event_paranoid=-1)"
            }
            _ => "",
        };
        return Err(format!("perf_event_open(kvm:kvm_exit): {e}{hint}"));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd as i32) };
    let c = std::ffi::CString::new(filter).map_err(|e| e.to_string())?;
    // SAFETY: the ioctl reads the NUL-terminated filter string, alive across the call.
    let r = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(&file, PERF_EVENT_IOC_SET_FILTER(), c.as_ptr())
    };
    if r < 0 {
        return Err(format!(
            "setting the filter {filter:?} on kvm:kvm_exit: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// Every vCPU's counters (set by each vCPU thread as it starts; empty where they could not be
/// opened), readable from any thread.
pub type Shared = std::sync::Arc<Vec<std::sync::OnceLock<ExitCounters>>>;

/// Exit reasons by name and hardware code.
pub type Reasons = &'static [(&'static str, u32)];

/// What `--kernel-exit-reasons` got: the tracepoint's id and the reasons, or why not.
pub fn prepare(kvm_module: Option<&str>) -> Result<(u64, Reasons), String> {
    let reasons = reasons(kvm_module)?;
    Ok((tracepoint_id()?, reasons))
}

/// The counts of every vCPU that has counters, summed.
pub fn sum(shared: &Shared) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for c in shared.iter().filter_map(|c| c.get()) {
        for (k, v) in c.read() {
            *m.entry(k).or_default() += v;
        }
    }
    m
}

/// One vCPU thread's counters: one per reason, and one of every exit (for "other").
#[derive(Debug)]
pub struct ExitCounters {
    by_reason: Vec<(&'static str, File)>,
    all: File,
}

impl ExitCounters {
    /// Opens the counters for the calling thread (a vCPU thread, before its filter is on).
    pub fn open_for_this_thread(
        id: u64,
        reasons: &[(&'static str, u32)],
    ) -> Result<ExitCounters, String> {
        let by_reason = reasons
            .iter()
            .map(|&(name, code)| Ok((name, open_counter(id, &format!("exit_reason == {code}"))?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ExitCounters {
            by_reason,
            all: open_counter(id, "exit_reason != 4294967295")?,
        })
    }

    /// The counts so far, keyed `kvm_exit.<reason>` (see `rates::TRACED_PREFIX`), with
    /// `kvm_exit.other` for the exits of no listed reason.
    pub fn read(&self) -> std::collections::BTreeMap<String, u64> {
        let value = |mut f: &File| {
            let mut b = [0u8; 8];
            f.read_exact(&mut b)
                .map(|_| u64::from_ne_bytes(b))
                .unwrap_or(0)
        };
        let mut m = std::collections::BTreeMap::new();
        let mut named = 0u64;
        for (name, f) in &self.by_reason {
            let n = value(f);
            named += n;
            *m.entry(format!("{}{name}", crate::rates::TRACED_PREFIX))
                .or_default() += n;
        }
        m.insert(
            format!("{}other", crate::rates::TRACED_PREFIX),
            value(&self.all).saturating_sub(named),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_tables() {
        assert_eq!(reasons(Some("kvm_amd")).unwrap()[5], ("hlt", 0x78));
        assert!(reasons(Some("kvm_intel"))
            .unwrap()
            .contains(&("irq_window", 7)));
        assert!(reasons(Some("kvm_pvm")).unwrap_err().contains("PVM"));
        assert!(reasons(None).is_err());
        for table in [SVM_REASONS, VMX_REASONS] {
            let mut codes: Vec<u32> = table.iter().map(|r| r.1).collect();
            codes.sort();
            codes.dedup();
            assert_eq!(codes.len(), table.len(), "a code listed twice");
        }
    }

    #[test]
    fn attr_is_the_size_the_kernel_knows() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 64);
    }
}
