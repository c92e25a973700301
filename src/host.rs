//! What the host KVM is, and what it cannot run.
//!
//! exitless runs on ordinary hardware KVM (VMX/SVM) and on PVM hosts: KVM built as `kvm_pvm`
//! ("Pagetable-based Virtual Machine"), which runs guests without hardware virtualization by
//! shadow paging and a world switcher. On a PVM host with `pvm_native=Y`, an unmodified guest's
//! kernel-mode code is *emulated* by KVM's instruction emulator (roughly 0.3–0.75 µs per
//! instruction) while its user-mode code runs natively. That emulator lacks instructions a stock
//! Linux kernel uses, the host ORs its own feature bits into guest CPUID leaves 1 and 7 whatever the
//! VMM sets, and a guest `syscall` from user mode never reaches the guest kernel.
//!
//! This module owns the detection ([`HostInfo::detect`]: cheap, advisory, never fails) and the
//! defaults that follow from it: the start-up banner, the CPUID features to hide
//! ([`HostInfo::cpuid_quirks`]), the Linux command-line options that keep a guest kernel away from
//! what the emulator cannot run ([`HostInfo::linux_cmdline_extras`]), and the explanation of the one
//! failure no VMM can fix here ([`HostInfo::explain_guest_failure`]).

use std::fmt::Write as _;
use std::path::Path;

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};

use crate::arch::x86_64::cpuid::CpuidQuirks;

/// Where the PVM module publishes itself.
const PVM_SYSFS: &str = "/sys/module/kvm_pvm";
/// "PVM" as a little-endian 32-bit value, the PVM signature.
const PVM_SIGNATURE: u64 = 0x4d5650;
/// Public PVM: the hypervisor CPUID leaf carrying the signature in EBX.
const PVM_CPUID_LEAF: u32 = 0x4000_0002;
/// Public PVM: its MSR range.
const PVM_PUBLIC_MSRS: std::ops::RangeInclusive<u32> = 0x4b56_4df0..=0x4b56_4df6;
/// This host's private variant: read-only ID MSRs.
const PVM_MSR_VERSION: u32 = 0x4b56_4d10;
const PVM_MSR_SIGNATURE: u32 = 0x4b56_4d11;
const PVM_MSR_FEATURES: u32 = 0x4b56_4d12;
const PVM_MSR_TSC_KHZ: u32 = 0x4b56_4d13;

/// The Linux options exitless adds on PVM hosts (verified with Debian's 6.1 kernel, which reports
/// "Clearing CPUID bits: smap popcnt ssse3 clflushopt cx16"; `clearcpuid=` takes /proc/cpuinfo
/// names since Linux 5.19):
/// - `noxsave`: the guest stalls in XSAVE set-up (`xrstor64` fails to emulate); also drops AVX*;
/// - `clearcpuid=smap`: `clac`/`stac` on every kernel entry would each be an emulation failure;
/// - `clearcpuid=popcnt`: `__bitmap_weight` and friends;
/// - `clearcpuid=ssse3,clflushopt` and `nofsgsbase`: instructions the emulator lacks, avoided
///   before the guest finds them;
/// - `clearcpuid=cx16`: SLUB's `cmpxchg16b` (also hidden in CPUID; the option is belt and braces);
/// - `clearcpuid=abm`: the emulator silently runs `lzcnt` as `bsr` (wrong results, no failure);
/// - `clearcpuid=erms,fsrm`: with them Linux clears and copies pages with `rep stosb`/`rep movsb`,
///   which the emulator runs byte by byte (~0.65 µs a byte: 2.7 ms per page cleared); without
///   them it uses `rep stosq`/`movsq`, ~8x cheaper;
/// - `nowatchdog`: emulated kernel code is slow enough to trip the soft-lockup detector;
/// - `lapic=notscdeadline`: with the TSC-deadline timer the LAPIC clockevent is one-shot only, and
///   Linux emulates a periodic tick on it by catching up one missed tick at a time
///   (`tick_handle_periodic`). When an emulated tick costs more than a tick period (a loaded
///   host, or a stretch with interrupts off such as console output), that loop never ends: the
///   guest does nothing but timekeeping (seen with `--sample-rips` in HZ_PERIODIC kernels and in
///   stalled boots of the Debian kernel). A periodic-capable LAPIC timer just drops missed ticks.
///
/// `noxsave` is parsed by the x86 early code, so Linux also reports it as an "unknown parameter
/// passed to user space" (harmless: init sees an extra argument).
const PVM_LINUX_CMDLINE: &str =
    "noxsave clearcpuid=smap,popcnt,ssse3,clflushopt,cx16,abm,erms,fsrm nofsgsbase nowatchdog \
     lapic=notscdeadline";

/// How PVM was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvmEvidence {
    /// This host's variant: ID MSR 0x4b564d11 reads "PVM" on a throwaway vCPU.
    IdMsr,
    /// Public PVM: the supported hypervisor CPUID leaf 0x40000002 carries "PVM".
    PublicCpuid,
    /// Public PVM: its MSRs 0x4b564df0–f6 are in KVM's MSR index list.
    PublicMsrs,
    /// Only `/sys/module/kvm_pvm` exists.
    Module,
}

/// A PVM host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PvmInfo {
    /// `kvm_pvm.pvm_native`: unmodified (non-PVM) guests are accepted, their kernel code emulated.
    /// Assumed true when the parameter cannot be read (this is the only mode exitless guests use).
    pub native_guests_emulated: bool,
    /// ID MSR 0x4b564d10 (this host: 0x400).
    pub version: Option<u64>,
    /// ID MSR 0x4b564d12.
    pub features: Option<u64>,
    /// ID MSR 0x4b564d13: the TSC frequency in kHz.
    pub tsc_khz: Option<u64>,
    /// `kvm_pvm.pvm_emul_batch`: guest kernel instructions emulated per batch.
    pub emul_batch: Option<u64>,
    /// The strongest evidence found.
    pub evidence: PvmEvidence,
}

/// What exitless knows about the host KVM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostInfo {
    /// Set on PVM hosts.
    pub pvm: Option<PvmInfo>,
    /// Which KVM vendor module is loaded (`kvm_intel`, `kvm_amd`, `kvm_pvm`), if visible in sysfs.
    pub kvm_module: Option<&'static str>,
    /// The CPU vendor string from host CPUID leaf 0 (e.g. "AuthenticAMD").
    pub cpu_vendor: String,
}

/// How a guest ended badly, for [`HostInfo::explain_guest_failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFailureKind {
    /// The guest stopped making progress (timeout, or halted forever).
    Hung,
    /// The guest shut down or reset (e.g. `panic=` reboot, triple fault).
    Shutdown,
    /// An exit exitless could not handle (e.g. an emulation failure it could not complete).
    Internal,
    /// Anything else.
    Other,
}

/// What is known about a failed guest run.
#[derive(Clone, Copy, Debug)]
pub struct GuestFailureHint<'a> {
    /// The last console output (a few KiB is plenty), as text.
    pub console_tail: &'a str,
    /// How the run ended.
    pub kind: GuestFailureKind,
}

impl HostInfo {
    /// Looks at the host once per process (later calls return the first answer: the host does
    /// not change under a running VMM, and the probe creates a throwaway VM): sysfs, then `kvm`'s
    /// supported CPUID and MSR index list, then, unless sysfs shows a hardware vendor module and
    /// no PVM, the PVM ID MSRs on a throwaway VM and vCPU. Cheap, advisory, never fails: anything
    /// unreadable counts as "not found".
    pub fn detect(kvm: &kvm_ioctls::Kvm) -> HostInfo {
        static DETECTED: std::sync::OnceLock<HostInfo> = std::sync::OnceLock::new();
        DETECTED.get_or_init(|| Self::probe(kvm)).clone()
    }

    fn probe(kvm: &kvm_ioctls::Kvm) -> HostInfo {
        let sys = Path::new("/sys/module");
        let kvm_module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| sys.join(m).exists());
        let module = Path::new(PVM_SYSFS).exists();
        let param = |name: &str| {
            std::fs::read_to_string(Path::new(PVM_SYSFS).join("parameters").join(name))
                .ok()
                .map(|s| s.trim().to_string())
        };

        let public_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map(|c| {
                c.as_slice()
                    .iter()
                    .any(|e| e.function == PVM_CPUID_LEAF && u64::from(e.ebx) == PVM_SIGNATURE)
            })
            .unwrap_or(false);
        let public_msrs = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().iter().any(|m| PVM_PUBLIC_MSRS.contains(m)))
            .unwrap_or(false);
        // A hardware vendor module without PVM's: no PVM ID MSRs to look for.
        let hardware_only = !module && matches!(kvm_module, Some("kvm_intel" | "kvm_amd"));
        let id = if hardware_only {
            [None; 4]
        } else {
            read_id_msrs(kvm)
        };
        let id_msr = id[1] == Some(PVM_SIGNATURE);

        let evidence = if id_msr {
            Some(PvmEvidence::IdMsr)
        } else if public_cpuid {
            Some(PvmEvidence::PublicCpuid)
        } else if public_msrs {
            Some(PvmEvidence::PublicMsrs)
        } else if module {
            Some(PvmEvidence::Module)
        } else {
            None
        };
        let pvm = evidence.map(|evidence| PvmInfo {
            native_guests_emulated: param("pvm_native").is_none_or(|v| v.starts_with(['Y', '1'])),
            version: id_msr.then_some(id[0]).flatten(),
            features: id_msr.then_some(id[2]).flatten(),
            tsc_khz: id_msr.then_some(id[3]).flatten(),
            emul_batch: param("pvm_emul_batch").and_then(|v| v.parse().ok()),
            evidence,
        });
        HostInfo {
            pvm,
            kvm_module,
            cpu_vendor: host_cpu_vendor(),
        }
    }

    /// True on a PVM host.
    pub fn is_pvm(&self) -> bool {
        self.pvm.is_some()
    }

    /// One line for start-up on PVM hosts; `None` on hardware KVM.
    pub fn banner(&self) -> Option<String> {
        let pvm = self.pvm.as_ref()?;
        let mut s = String::from("host: PVM KVM (no hardware virtualization");
        if let Some(v) = pvm.version {
            let _ = write!(s, ", version {v:#x}");
        }
        s.push(')');
        if pvm.native_guests_emulated {
            s.push_str(": guest kernel code is emulated");
            if let Some(b) = pvm.emul_batch {
                let _ = write!(s, " in batches of {b} instructions");
            }
            s.push_str(
                " (~0.3-0.75 us each) and guest user code runs natively: expect slow guest kernels",
            );
        } else {
            s.push_str(": pvm_native=N, only PVM-aware guests are accepted");
        }
        Some(s)
    }

    /// The CPUID features to hide from guests on this host.
    pub fn cpuid_quirks(&self) -> CpuidQuirks {
        let pvm = self.is_pvm();
        CpuidQuirks {
            hide_cx16: pvm,
            hide_xsave: pvm,
            hide_kvm_steal_and_stable: pvm,
            hide_kvm_hypercalls: pvm,
        }
    }

    /// Options to append to a Linux guest's command line on this host; empty on hardware KVM.
    pub fn linux_cmdline_extras(&self) -> &'static str {
        if self.is_pvm() {
            PVM_LINUX_CMDLINE
        } else {
            ""
        }
    }

    /// On a PVM host, recognises a Linux guest whose init died (or hung) on its first system call,
    /// and says why in one sentence; `None` otherwise.
    pub fn explain_guest_failure(&self, what: &GuestFailureHint) -> Option<String> {
        self.pvm.as_ref()?;
        if !init_died_on_first_syscall(what) {
            return None;
        }
        Some(
            "The guest kernel booted but its init died on its first system call: on this PVM host \
             a `syscall` (or `int $0x80`) from guest user mode never reaches the guest kernel \
             (KVM neither delivers it nor exits to the VMM), so an unmodified Linux guest cannot \
             run user space here; run Linux user space on a hardware-KVM host, or use \
             kernel-mode guests here."
                .to_string(),
        )
    }
}

/// The Linux console signs of init dying before it could print anything: a panic naming init, or
/// the kernel handing over to init ("Run /init as init process") followed by nothing from user
/// space before a hang or shutdown.
fn init_died_on_first_syscall(what: &GuestFailureHint) -> bool {
    let text = what.console_tail;
    // The kernel found no init to run at all (e.g. an empty root file system): not our case.
    if text.contains("No working init found") {
        return false;
    }
    if let Some(at) = text.rfind("Attempted to kill init") {
        // "exitcode=0x…" is the wait status: a zero signal number means init called exit(2), so
        // its system calls worked and something else is wrong.
        let code = text[at..].split_once("exitcode=0x").and_then(|(_, rest)| {
            let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
            u32::from_str_radix(&hex, 16).ok()
        });
        return code.is_none_or(|c| c & 0x7f != 0);
    }
    let Some(at) = text.rfind(" as init process") else {
        return false;
    };
    if !matches!(
        what.kind,
        GuestFailureKind::Hung | GuestFailureKind::Shutdown
    ) {
        return false;
    }
    // After the hand-over, only kernel log lines (or nothing) may follow: any other line means
    // init got to write(2), i.e. system calls work.
    let after = &text[at..];
    after
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .all(is_kernel_log_line)
}

/// A `[  12.345678] …` printk line (or a panic banner / trace line without a timestamp).
fn is_kernel_log_line(line: &str) -> bool {
    let timestamped = line.strip_prefix('[').is_some_and(|rest| {
        rest.split_once(']').is_some_and(|(ts, _)| {
            !ts.trim().is_empty() && ts.trim().chars().all(|c| c.is_ascii_digit() || c == '.')
        })
    });
    timestamped
        || line.starts_with("Kernel panic")
        || line.starts_with("---[ ")
        || line.starts_with("Run ")
        || line.contains("with arguments:")
        || line.contains("with environment:")
}

/// Reads the PVM ID MSRs (version, signature, features, TSC kHz) on a throwaway VM and vCPU.
/// `None` for each MSR the host does not have, or everything if the VM cannot be made.
fn read_id_msrs(kvm: &kvm_ioctls::Kvm) -> [Option<u64>; 4] {
    let mut out = [None; 4];
    let Ok(vm) = kvm.create_vm() else {
        return out;
    };
    let Ok(vcpu) = vm.create_vcpu(0) else {
        return out;
    };
    for (slot, index) in [
        PVM_MSR_VERSION,
        PVM_MSR_SIGNATURE,
        PVM_MSR_FEATURES,
        PVM_MSR_TSC_KHZ,
    ]
    .into_iter()
    .enumerate()
    {
        // One MSR per call: KVM_GET_MSRS stops at the first MSR it cannot read.
        let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if let Ok(1) = vcpu.get_msrs(&mut msrs) {
            out[slot] = Some(msrs.as_slice()[0].data);
        }
    }
    out
}

/// The host CPU's vendor string (CPUID leaf 0).
fn host_cpu_vendor() -> String {
    let r = core::arch::x86_64::__cpuid(0);
    let mut v = Vec::with_capacity(12);
    for reg in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&reg.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvm_host() -> HostInfo {
        HostInfo {
            pvm: Some(PvmInfo {
                native_guests_emulated: true,
                version: Some(0x400),
                features: Some(0),
                tsc_khz: Some(2_000_000),
                emul_batch: Some(1024),
                evidence: PvmEvidence::IdMsr,
            }),
            kvm_module: Some("kvm_pvm"),
            cpu_vendor: "AuthenticAMD".into(),
        }
    }

    fn hw_host() -> HostInfo {
        HostInfo {
            pvm: None,
            kvm_module: Some("kvm_intel"),
            cpu_vendor: "GenuineIntel".into(),
        }
    }

    #[test]
    fn banner_only_on_pvm() {
        assert_eq!(hw_host().banner(), None);
        let b = pvm_host().banner().unwrap();
        assert!(b.starts_with("host: PVM KVM"), "{b}");
        assert!(b.contains("version 0x400"), "{b}");
        assert!(b.contains("batches of 1024"), "{b}");
        assert!(!b.contains('\n'));
        let mut h = pvm_host();
        h.pvm.as_mut().unwrap().native_guests_emulated = false;
        assert!(h.banner().unwrap().contains("pvm_native=N"));
    }

    #[test]
    fn quirks_and_cmdline() {
        assert_eq!(hw_host().cpuid_quirks(), CpuidQuirks::default());
        assert_eq!(hw_host().linux_cmdline_extras(), "");
        assert_eq!(
            pvm_host().cpuid_quirks(),
            CpuidQuirks {
                hide_cx16: true,
                hide_xsave: true,
                hide_kvm_steal_and_stable: true,
                hide_kvm_hypercalls: true,
            }
        );
        let extras = pvm_host().linux_cmdline_extras();
        for opt in ["noxsave", "nofsgsbase", "clearcpuid="] {
            assert!(extras.split(' ').any(|o| o.starts_with(opt)), "{extras}");
        }
        let clear = extras
            .split(' ')
            .find_map(|o| o.strip_prefix("clearcpuid="))
            .unwrap();
        for f in ["smap", "popcnt", "ssse3", "clflushopt"] {
            assert!(clear.split(',').any(|x| x == f), "{clear}");
        }
    }

    const HANDOVER: &str =
        "[    2.100000] Freeing unused kernel image (rodata/data gap) memory: 1000K\n\
        [    2.110000] Run /init as init process\n\
        [    2.110001]   with arguments:\n\
        [    2.110002]     /init\n\
        [    2.110003]   with environment:\n\
        [    2.110004]     HOME=/\n";

    fn hint(console: &str, kind: GuestFailureKind) -> GuestFailureHint<'_> {
        GuestFailureHint {
            console_tail: console,
            kind,
        }
    }

    #[test]
    fn recognises_init_dying_on_its_first_syscall() {
        let panic = format!(
            "{HANDOVER}[    2.200000] Kernel panic - not syncing: Attempted to kill init! \
             exitcode=0x0000000b\n---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n"
        );
        let pvm = pvm_host();
        let s = pvm
            .explain_guest_failure(&hint(&panic, GuestFailureKind::Hung))
            .unwrap();
        assert!(s.contains("first system call"), "{s}");
        assert!(!s.contains('\n'));
        // Panic on its own (quiet kernel: no hand-over line) is enough.
        assert!(pvm
            .explain_guest_failure(&hint(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004\n",
                GuestFailureKind::Other
            ))
            .is_some());
        // Hand-over then silence and a hang.
        assert!(pvm
            .explain_guest_failure(&hint(HANDOVER, GuestFailureKind::Hung))
            .is_some());
        assert!(pvm
            .explain_guest_failure(&hint(HANDOVER, GuestFailureKind::Shutdown))
            .is_some());
        // Never on hardware KVM.
        assert_eq!(
            hw_host().explain_guest_failure(&hint(&panic, GuestFailureKind::Hung)),
            None
        );
    }

    #[test]
    fn does_not_blame_syscalls_for_other_failures() {
        let pvm = pvm_host();
        // init printed something: its system calls work.
        let worked = format!("{HANDOVER}exitless-guest: nproc=2\n/ # ");
        assert_eq!(
            pvm.explain_guest_failure(&hint(&worked, GuestFailureKind::Hung)),
            None
        );
        // A kernel stall before init.
        assert_eq!(
            pvm.explain_guest_failure(&hint(
                "[    0.500000] x86/fpu: Enabled xstate features 0x7\n",
                GuestFailureKind::Hung
            )),
            None
        );
        // init exiting with a status made system calls.
        assert_eq!(
            pvm.explain_guest_failure(&hint(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
                GuestFailureKind::Hung
            )),
            None
        );
        // A missing init is a different problem, even after the kernel tried candidates.
        assert_eq!(
            pvm.explain_guest_failure(&hint(
                "Kernel panic - not syncing: No working init found.\n",
                GuestFailureKind::Hung
            )),
            None
        );
        let tried = format!("{HANDOVER}Kernel panic - not syncing: No working init found.\n");
        assert_eq!(
            pvm.explain_guest_failure(&hint(&tried, GuestFailureKind::Shutdown)),
            None
        );
        // An emulation failure after the hand-over is reported by the emulator path, not here.
        assert_eq!(
            pvm.explain_guest_failure(&hint(HANDOVER, GuestFailureKind::Internal)),
            None
        );
        assert_eq!(
            pvm.explain_guest_failure(&hint("", GuestFailureKind::Hung)),
            None
        );
    }

    #[test]
    fn kernel_log_lines() {
        assert!(is_kernel_log_line(
            "[    2.110000] Run /init as init process"
        ));
        assert!(is_kernel_log_line("---[ end Kernel panic ]---"));
        assert!(!is_kernel_log_line("exitless-guest: nproc=1"));
        assert!(!is_kernel_log_line("[ ] x"));
        assert!(!is_kernel_log_line("/ # "));
    }

    /// Detection against this machine's /dev/kvm. On the project's PVM development host it must
    /// find PVM; elsewhere it must at least not fail.
    #[test]
    fn detect_on_this_host() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => return crate::test_skip("detect_on_this_host", &format!("/dev/kvm: {e}")),
        };
        let t = std::time::Instant::now();
        let info = HostInfo::detect(&kvm);
        eprintln!("{info:?} in {:?}", t.elapsed());
        if let Some(b) = info.banner() {
            eprintln!("{b}");
        }
        if Path::new(PVM_SYSFS).exists() {
            let pvm = info
                .pvm
                .as_ref()
                .expect("kvm_pvm present but PVM not detected");
            if pvm.evidence == PvmEvidence::IdMsr {
                assert!(pvm.version.is_some());
            }
            assert_eq!(info.kvm_module, Some("kvm_pvm"));
        }
        assert!(!info.cpu_vendor.is_empty());
    }
}
