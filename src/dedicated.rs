//! Dedicated cores (ELI's assumption): each vCPU owns a host CPU, so it may idle in the guest.
//!
//! Owns `--dedicated-cores[=CPULIST]` and `--halt-poll-ns N`:
//!
//! - **pinning**: vCPU *i* runs only on the *i*-th CPU of the list (by default the last `--cpus`
//!   CPUs this process may use); every other exitless thread (main, device workers, control API,
//!   console) is moved to the remaining CPUs before it starts, so nothing of the VMM competes with
//!   a vCPU. Each vCPU pins itself before its seccomp filter is on; the main thread changes its
//!   own affinity before it spawns the others, which inherit it: no filter needs
//!   `sched_setaffinity`;
//! - **exits KVM need not take** (`KVM_CAP_X86_DISABLE_EXITS`, before any vCPU exists): HLT, and
//!   where the host allows them MWAIT, PAUSE and C-state exits. A halted vCPU then idles on its
//!   own core in guest mode: an interrupt wakes it without KVM's halt emulation, its wake-up
//!   timer, or a reschedule of the vCPU thread. The host's mask (`KVM_CHECK_EXTENSION`) says
//!   which it allows; without HLT the option is refused;
//! - **what the guest is told**: `KVM_HINTS_REALTIME` (CPUID 0x4000_0001 EDX bit 0: "your vCPUs
//!   are never preempted"), so Linux uses native spinlocks and may poll in its idle loop; and
//!   MONITOR/MWAIT (CPUID 1 ECX bit 3) where MWAIT exits are disabled, so it can idle with MWAIT;
//! - **halt polling** (`--halt-poll-ns`, `KVM_CAP_HALT_POLL` per VM): how long KVM polls for a
//!   wake-up before it puts a halted vCPU thread to sleep, for VMs whose HLT exits stay on.

use kvm_bindings::{
    kvm_enable_cap, CpuId, KVM_CAP_HALT_POLL, KVM_CAP_X86_DISABLE_EXITS,
    KVM_X86_DISABLE_EXITS_CSTATE, KVM_X86_DISABLE_EXITS_HLT, KVM_X86_DISABLE_EXITS_MWAIT,
    KVM_X86_DISABLE_EXITS_PAUSE,
};
use serde::Serialize;

/// The exits dedicated cores turn off, with the names the report uses.
const EXITS: [(u32, &str); 4] = [
    (KVM_X86_DISABLE_EXITS_HLT, "hlt"),
    (KVM_X86_DISABLE_EXITS_MWAIT, "mwait"),
    (KVM_X86_DISABLE_EXITS_PAUSE, "pause"),
    (KVM_X86_DISABLE_EXITS_CSTATE, "cstate"),
];
/// CPUID 0x4000_0001 EDX: KVM_HINTS_REALTIME.
const HINTS_REALTIME: u32 = 1 << 0;
/// CPUID 1 ECX: MONITOR/MWAIT.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// The largest `--halt-poll-ns` (KVM keeps it in an unsigned int; beyond a second it is a spin).
pub const MAX_HALT_POLL_NS: u64 = 1_000_000_000;

/// Parses a CPU list such as `2,3` or `0-3,8`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n < libc::CPU_SETSIZE as usize)
                .ok_or_else(|| format!("{t:?} in {s:?} is not a CPU number (e.g. 2,3 or 0-3)"))
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("{part:?} in {s:?} is a backwards range"));
        }
        for c in a..=b {
            if cpus.contains(&c) {
                return Err(format!("CPU {c} is listed twice in {s:?}"));
            }
            cpus.push(c);
        }
    }
    Ok(cpus)
}

/// What was asked for: `--dedicated-cores` (`cpus: None`) or `--dedicated-cores=LIST`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DedicatedRequest {
    pub cpus: Option<Vec<usize>>,
}

impl DedicatedRequest {
    /// From the option's value ("" when given without one).
    pub fn parse(value: &str) -> Result<DedicatedRequest, String> {
        Ok(DedicatedRequest {
            cpus: if value.trim().is_empty() {
                None
            } else {
                Some(parse_cpu_list(value).map_err(|e| format!("--dedicated-cores: {e}"))?)
            },
        })
    }
}

/// Where each thread runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// vCPU `i` runs on `vcpu_cpus[i]`.
    pub vcpu_cpus: Vec<usize>,
    /// Everything else of exitless (may be empty: then it shares the vCPUs' CPUs).
    pub vmm_cpus: Vec<usize>,
}

/// Chooses the CPUs: `list` (`None`: the last `vcpus` of `allowed`), which must be CPUs this
/// process may use, at least one per vCPU (the first `vcpus` are used).
pub fn place(list: Option<&[usize]>, allowed: &[usize], vcpus: usize) -> Result<Placement, String> {
    let chosen: Vec<usize> = match list {
        Some(l) => {
            if let Some(c) = l.iter().find(|c| !allowed.contains(c)) {
                return Err(format!(
                    "--dedicated-cores: CPU {c} is not one this process may run on (allowed: {})",
                    format_cpus(allowed)
                ));
            }
            if l.len() < vcpus {
                return Err(format!(
                    "--dedicated-cores: {} CPU(s) listed for {vcpus} vCPUs (one each)",
                    l.len()
                ));
            }
            l[..vcpus].to_vec()
        }
        None if allowed.len() < vcpus => {
            return Err(format!(
                "--dedicated-cores: {vcpus} vCPUs need {vcpus} CPUs, this process may use {} ({})",
                allowed.len(),
                format_cpus(allowed)
            ))
        }
        None => allowed[allowed.len() - vcpus..].to_vec(),
    };
    let vmm_cpus = allowed
        .iter()
        .copied()
        .filter(|c| !chosen.contains(c))
        .collect();
    Ok(Placement {
        vcpu_cpus: chosen,
        vmm_cpus,
    })
}

fn format_cpus(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The exits to disable out of the host's mask; refused where HLT exits cannot be disabled, and
/// on PVM hosts (`pvm`), which offer the mask but emulate guest kernel code, HLT included.
pub fn exits_to_disable(offered: u32, pvm: bool) -> Result<u32, String> {
    if pvm {
        return Err(
            "--dedicated-cores: this host's KVM is PVM, which emulates guest kernel code \
             (HLT included) in the host kernel: HLT cannot stay in the guest there"
                .into(),
        );
    }
    if offered & KVM_X86_DISABLE_EXITS_HLT == 0 {
        return Err(format!(
            "--dedicated-cores: the host KVM does not let a VM keep HLT in the guest \
             (KVM_CAP_X86_DISABLE_EXITS offers {offered:#x}{})",
            if offered == 0 {
                ": none; a PVM host or a KVM before Linux 4.17"
            } else {
                ""
            }
        ));
    }
    Ok(offered & EXITS.iter().fold(0, |m, (bit, _)| m | bit))
}

/// The names of the exits in `mask`.
pub fn exit_names(mask: u32) -> Vec<&'static str> {
    EXITS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|&(_, n)| n)
        .collect()
}

/// What a run got, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dedicated {
    #[serde(flatten)]
    pub placement: Placement,
    /// Exits kept in the guest ("hlt", "mwait", "pause", "cstate").
    pub exits_disabled: Vec<&'static str>,
}

/// Enables `KVM_CAP_X86_DISABLE_EXITS` with `mask` (before any vCPU is created).
pub fn disable_exits(vm: &kvm_ioctls::VmFd, mask: u32) -> Result<(), String> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_X86_DISABLE_EXITS,
        args: [mask.into(), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| format!("--dedicated-cores: KVM refused to disable exits {mask:#x}: {e}"))
}

/// Sets the VM's halt-polling time (`KVM_CAP_HALT_POLL`); refused where the host lacks it.
pub fn set_halt_poll(vm: &kvm_ioctls::VmFd, ns: u64) -> Result<(), String> {
    if vm.check_extension_raw(KVM_CAP_HALT_POLL.into()) <= 0 {
        return Err(
            "--halt-poll-ns: the host KVM cannot set halt polling per VM (KVM_CAP_HALT_POLL, \
             Linux 5.16+); the host-wide /sys/module/kvm/parameters/halt_poll_ns applies"
                .into(),
        );
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        args: [ns, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| format!("--halt-poll-ns {ns}: KVM refused it: {e}"))
}

/// Tells the guest its vCPUs are dedicated, and offers MONITOR/MWAIT where MWAIT stays in it.
pub fn apply_cpuid(cpuid: &mut CpuId, mask: u32) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 if mask & KVM_X86_DISABLE_EXITS_MWAIT != 0 => e.ecx |= LEAF1_ECX_MONITOR,
            0x4000_0001 => e.edx |= HINTS_REALTIME,
            _ => {}
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Result<Vec<usize>, String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most its size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live cpu_set_t and the size passed is its size.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if r != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Restricts the calling thread to `cpus` (threads it starts later inherit it).
pub fn set_thread_affinity(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: parse_cpu_list and allowed_cpus only give CPUs below CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a live cpu_set_t and the size passed is its size; 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if r != 0 {
        return Err(format!(
            "cannot run on CPU(s) {}: {}",
            format_cpus(cpus),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("3").unwrap(), [3]);
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), [0, 1, 2, 5]);
        assert_eq!(parse_cpu_list(" 4 , 1 ").unwrap(), [4, 1]);
        for bad in ["", "a", "3-1", "1,1", "0-2,2", "-1", "99999", "1-"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn placement_defaults_to_the_last_cpus_and_keeps_the_vmm_off_them() {
        let p = place(None, &[0, 1, 2, 3], 2).unwrap();
        assert_eq!(p.vcpu_cpus, [2, 3]);
        assert_eq!(p.vmm_cpus, [0, 1]);
        let p = place(Some(&[1, 3, 2]), &[0, 1, 2, 3], 2).unwrap();
        assert_eq!(p.vcpu_cpus, [1, 3]);
        assert_eq!(p.vmm_cpus, [0, 2]);
        // As many CPUs as vCPUs: the VMM shares them.
        let p = place(None, &[0, 1], 2).unwrap();
        assert!(p.vmm_cpus.is_empty());
    }

    #[test]
    fn placement_refuses_what_cannot_be() {
        let e = place(None, &[0, 1], 3).unwrap_err();
        assert!(e.contains("need 3 CPUs"), "{e}");
        let e = place(Some(&[5]), &[0, 1], 1).unwrap_err();
        assert!(e.contains("CPU 5 is not one"), "{e}");
        let e = place(Some(&[1]), &[0, 1], 2).unwrap_err();
        assert!(e.contains("1 CPU(s) listed for 2"), "{e}");
    }

    #[test]
    fn exits_follow_the_hosts_mask_and_need_hlt() {
        assert_eq!(exits_to_disable(0xf, false).unwrap(), 0xf);
        // A host without MWAIT in the guest (no host MWAIT, or errata).
        let m = exits_to_disable(0xe, false).unwrap();
        assert_eq!(exit_names(m), ["hlt", "pause", "cstate"]);
        // Unknown future bits are not asked for.
        assert_eq!(exits_to_disable(0x1f, false).unwrap(), 0xf);
        let e = exits_to_disable(0, false).unwrap_err();
        assert!(e.contains("PVM"), "{e}");
        let e = exits_to_disable(0xf, true).unwrap_err();
        assert!(e.contains("emulates guest kernel code"), "{e}");
        assert!(exits_to_disable(KVM_X86_DISABLE_EXITS_PAUSE, false).is_err());
    }

    #[test]
    fn cpuid_hints() {
        let entries = [
            kvm_bindings::kvm_cpuid_entry2 {
                function: 1,
                ecx: 0x8000_0000,
                ..Default::default()
            },
            kvm_bindings::kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x0100_7efb,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        apply_cpuid(&mut c, KVM_X86_DISABLE_EXITS_HLT);
        assert_eq!(c.as_slice()[0].ecx, 0x8000_0000, "no MONITOR without MWAIT");
        assert_eq!(c.as_slice()[1].edx, 1);
        assert_eq!(c.as_slice()[1].eax, 0x0100_7efb);
        let mut c = CpuId::from_entries(&entries).unwrap();
        apply_cpuid(&mut c, 0xf);
        assert_eq!(c.as_slice()[0].ecx, 0x8000_0008);
    }

    #[test]
    fn option_values() {
        assert_eq!(DedicatedRequest::parse("").unwrap().cpus, None);
        assert_eq!(
            DedicatedRequest::parse("1,3").unwrap().cpus,
            Some(vec![1, 3])
        );
        let e = DedicatedRequest::parse("x").unwrap_err();
        assert!(e.starts_with("--dedicated-cores: "), "{e}");
    }

    #[test]
    fn this_process_has_cpus() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
    }
}
