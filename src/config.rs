//! What a VM is made of, independent of how it was asked for (CLI today, an API later).

use std::path::PathBuf;

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// A kernel file on the host (bzImage or ELF).
    File(PathBuf),
    /// A test-kit guest built into the binary (see `kit`).
    Embedded(&'static str),
    /// None: the VM is restored from the snapshot in `dir`, which booted `guest`.
    Snapshot { dir: PathBuf, guest: String },
}

/// The kernel command line exitless uses unless told otherwise: serial console, reboot through the
/// i8042 (exitless's reset line), reboot at once on panic (the console watcher reports the panic),
/// no i8042 probing, no crypto self-tests (~0.74 G instructions of a stock Debian boot), quiet.
/// Deliberately not `tsc=reliable`: with kvm-clock it made Linux 6.1 stall for good right after
/// "Switched to clocksource kvm-clock" on a PVM host (measured; without it the boot goes on).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux \
     i8042.nopnp i8042.dumbkbd cryptomgr.notests=1";

/// `base` followed by the user's `extra`, except that `clearcpuid=` lists are merged: Linux keeps
/// only the last `clearcpuid=` it sees, so a user's own list would silently drop the features the
/// host needs hidden (see `host`). The union goes where the user put theirs.
pub fn append_cmdline(base: &str, extra: &str) -> String {
    const KEY: &str = "clearcpuid=";
    let lists = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .filter_map(|t| t.strip_prefix(KEY))
            .flat_map(|v| v.split(','))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect()
    };
    let extra_has = extra.split_whitespace().any(|t| t.starts_with(KEY));
    let mut out: Vec<String> = Vec::new();
    if extra_has {
        out.extend(
            base.split_whitespace()
                .filter(|t| !t.starts_with(KEY))
                .map(str::to_string),
        );
        let mut union: Vec<String> = Vec::new();
        for v in lists(base).into_iter().chain(lists(extra)) {
            if !union.contains(&v) {
                union.push(v);
            }
        }
        let mut placed = false;
        for t in extra.split_whitespace() {
            if t.starts_with(KEY) {
                if !placed {
                    out.push(format!("{KEY}{}", union.join(",")));
                    placed = true;
                }
            } else {
                out.push(t.to_string());
            }
        }
        return out.join(" ");
    }
    match (base.is_empty(), extra.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => extra.to_string(),
        (false, false) => format!("{base} {extra}"),
    }
}

/// A VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    /// The complete kernel command line.
    pub cmdline: String,
    pub mem_bytes: u64,
    pub cpus: u8,
    /// QEMU-compatible isa-debug-exit port at 0xf4 (on for kit guests).
    pub debug_exit: bool,
    /// The kit's probe device (counted PIO/MMIO, ioeventfd ports); on for kit guests.
    pub probe: bool,
    /// Where to write the exit statistics as JSON at the end.
    pub stats_json: Option<PathBuf>,
    /// Print the exit summary on stderr at the end.
    pub summary: bool,
    /// Exit status when the guest reboots.
    pub reboot_status: i32,
    /// Give up and stop the VM after this long (None: run until the guest ends).
    pub timeout: Option<std::time::Duration>,
    /// Copy of the guest console to this file.
    pub console_log: Option<PathBuf>,
    /// The console log stops at this many bytes.
    pub console_log_max: u64,
    /// Bytes of console output that may wait for stdout before more is dropped.
    pub console_buffer: u64,
    /// Unpack a bzImage in the VMM and boot the kernel ELF inside it (skips the guest's
    /// decompressor, which is emulated on hosts without VMX/SVM).
    pub unpack_bzimage: bool,
    /// Sample the vCPUs' RIPs periodically for the report (`--sample-rips`).
    pub sample_rips: bool,
    /// Paravirtual devices on PCI (`--disk`, `--rng`, `--net`, `--balloon`, `--vsock`).
    pub virtio: crate::devices::virtio::config::VirtioConfig,
    /// The control socket (`--api-socket`, see `api`).
    pub api_socket: Option<PathBuf>,
    /// Hardware virtualization for the guest (`--nested`, see `arch::x86_64::nested`).
    pub nested: crate::arch::x86_64::nested::NestedMode,
    /// x2APIC and PV EOI for the guest (`--x2apic`, `--pv-eoi`, see `arch::x86_64::irq_path`).
    pub irq_path: crate::arch::x86_64::irq_path::IrqPathRequest,
    /// Dedicated cores (`--dedicated-cores`, see `dedicated`).
    pub dedicated: Option<crate::dedicated::DedicatedRequest>,
    /// The VM's halt-polling time (`--halt-poll-ns`).
    pub halt_poll_ns: Option<u64>,
    /// Count in-kernel exits by reason (`--kernel-exit-reasons`, see `kvm_trace`).
    pub kernel_exit_reasons: bool,
    /// Seccomp filters per thread kind (`--seccomp`, see `seccomp`).
    pub seccomp: crate::seccomp::Mode,
    /// Test only: the thread kind that makes a forbidden system call (`--seccomp-selftest`).
    pub seccomp_selftest: Option<String>,
    /// Landlock file restrictions per thread (`--landlock`, see `sandbox`).
    pub landlock: crate::sandbox::Mode,
    /// Test only: a path the main thread tries to open once restricted (`--landlock-selftest`).
    pub landlock_selftest: Option<PathBuf>,
    /// Where snapshots may be written (`--snapshot-dir`; with Landlock the only place).
    pub snapshot_dir: Option<PathBuf>,
    /// `--mem-limit`: the VMM runs in a memory cgroup with this limit (see `memlimit`).
    pub mem_limit: Option<crate::memlimit::MemLimitConfig>,
}

impl VmConfig {
    /// Kit guests only need a few MiB; Linux gets 512 MiB unless asked.
    pub fn default_mem(kernel: &KernelSource) -> u64 {
        match kernel {
            KernelSource::Embedded(_) => 64 << 20,
            KernelSource::File(_) | KernelSource::Snapshot { .. } => 512 << 20,
        }
    }
}

/// Parses sizes such as `512M`, `2G`, `1024K`, `4096` (bytes) or `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    // "2GiB", "2GB" and "2G" all mean 2 GiB; a bare "B" suffix means bytes.
    let t = match t.strip_suffix(['B', 'b']) {
        Some(rest) if rest.ends_with(|c: char| "KkMmGgTtIi".contains(c)) => {
            rest.trim_end_matches(['i', 'I'])
        }
        _ => t,
    };
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (t[..i].trim(), m)
        }
        _ => (t, 1u64 << 20),
    };
    let bytes = if let Ok(n) = num.parse::<u64>() {
        n.checked_mul(mult)
    } else if let Ok(f) = num.parse::<f64>() {
        (f.is_finite() && f >= 0.0 && f * (mult as f64) < u64::MAX as f64)
            .then_some((f * mult as f64) as u64)
    } else {
        return Err(format!("{s:?} is not a size (e.g. 512M, 2G)"));
    };
    bytes.ok_or_else(|| format!("size {s:?} is too large"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn user_clearcpuid_is_merged_with_the_hosts() {
        use super::append_cmdline;
        assert_eq!(append_cmdline("a b", "c"), "a b c");
        assert_eq!(append_cmdline("", "c d"), "c d");
        assert_eq!(append_cmdline("a  b", ""), "a  b");
        assert_eq!(
            append_cmdline("a clearcpuid=smap,cx16 b", "x clearcpuid=pku,cx16 y"),
            "a b x clearcpuid=smap,cx16,pku y"
        );
        assert_eq!(
            append_cmdline("clearcpuid=smap", "clearcpuid=a clearcpuid=b"),
            "clearcpuid=smap,a,b"
        );
        assert_eq!(
            append_cmdline("clearcpuid=smap q", "r"),
            "clearcpuid=smap q r"
        );
    }

    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024K").unwrap(), 1 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(
            parse_size("256").unwrap(),
            256 << 20,
            "a bare number means MiB"
        );
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("-1G").is_err());
    }
}
