//! Guest CPUID: built from `KVM_GET_SUPPORTED_CPUID`, with topology filled in and what the host
//! cannot run masked out.
//!
//! Owns every CPUID value a vCPU sees. KVM's supported list says which features KVM can virtualize
//! but describes the *host's* topology (or none: recent KVMs zero leaf 0xb and 0x8000_001e), so
//! this module rewrites what must be per vCPU and per VM, and leaves everything else as KVM
//! reports it:
//!
//! - topology: one thread per core, `num_cpus` cores in one package, APIC ID = x2APIC ID =
//!   `vcpu_id` (the MADT built by `acpi` says the same). Leaves 1, 4, 0xb, 0x1f and, on AMD,
//!   0x8000_0008, 0x8000_001d and 0x8000_001e agree on it, so Linux's legacy and x2APIC topology
//!   code paths compute the same core and package IDs;
//! - the hypervisor bit, and the TSC-deadline timer (KVM's in-kernel LAPIC always provides it;
//!   Linux then skips the LAPIC timer calibration loop);
//! - leaf 6 (thermal and power management) cleared: the guest cannot manage the host's power. ARAT
//!   (APIC timer always running) is kept: KVM's LAPIC timer never stops in idle states, and
//!   without it Linux would set up a broadcast timer it does not need;
//! - SVM (0x8000_0001 ECX, leaf 0x8000_000A) and VMX (leaf 1 ECX) stay as KVM reports them; the
//!   `nested` module clears them when the guest is not to be a hypervisor itself;
//! - [`CpuidQuirks`]: features hidden because the host's instruction emulator cannot run them
//!   (PVM hosts, see `host`). The same function serves hardware VMX/SVM hosts, where the quirks
//!   are normally all off.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Features to hide from the guest because the host cannot run them (see `host`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidQuirks {
    /// Hide CMPXCHG16B (KVM's emulator fails on it on PVM hosts).
    pub hide_cx16: bool,
    /// Hide XSAVE and all XSAVE-managed state (a Linux guest stalls in XSAVE set-up on PVM hosts).
    pub hide_xsave: bool,
    /// Hide KVM steal time and the kvmclock "stable" bit (their static-key flips leave `int3`s the
    /// emulator cannot run on PVM hosts).
    pub hide_kvm_steal_and_stable: bool,
    /// Hide the KVM paravirtual features whose guest side issues hypercalls from kernel mode (PV
    /// unhalt/spinlock kicks, PV IPIs, PV TLB flush, PV sched-yield): a CPL0 `vmcall`/`vmmcall`
    /// never completes on PVM hosts, so a guest that relies on one (a spinlock kick, an IPI) waits
    /// for good. Without them the guest uses the in-kernel LAPIC's ordinary IPIs and plain spinlocks.
    pub hide_kvm_hypercalls: bool,
}

/// CPUID bit numbers this module reads or writes.
pub mod bits {
    /// Leaf 1 ECX.
    pub const ECX_FMA: u32 = 12;
    pub const ECX_CX16: u32 = 13;
    pub const ECX_X2APIC: u32 = 21;
    pub const ECX_TSC_DEADLINE: u32 = 24;
    pub const ECX_XSAVE: u32 = 26;
    pub const ECX_OSXSAVE: u32 = 27;
    pub const ECX_AVX: u32 = 28;
    pub const ECX_F16C: u32 = 29;
    pub const ECX_HYPERVISOR: u32 = 31;
    /// Leaf 1 EDX.
    pub const EDX_HTT: u32 = 28;
    /// Leaf 6 EAX: APIC timer always running.
    pub const LEAF6_EAX_ARAT: u32 = 2;
    /// Leaf 0x4000_0001 EAX (KVM paravirtual features).
    pub const KVM_FEATURE_STEAL_TIME: u32 = 5;
    pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 24;
    pub const KVM_FEATURE_PV_EOI: u32 = 6;
    pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
    pub const KVM_FEATURE_PV_TLB_FLUSH: u32 = 9;
    pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
    pub const KVM_FEATURE_POLL_CONTROL: u32 = 12;
    pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
    /// Leaf 0x4000_0001 EDX: the vCPUs never get preempted (dedicated cores).
    pub const KVM_HINTS_REALTIME: u32 = 0;
}

/// The KVM paravirtual features of the interrupt and idle paths a guest can use without help from
/// the VMM, by leaf 0x4000_0001 EAX bit, with the names `exitless host` prints.
pub const KVM_PV_FEATURES: [(u32, &str); 6] = [
    (bits::KVM_FEATURE_PV_EOI, "pv-eoi"),
    (bits::KVM_FEATURE_PV_UNHALT, "pv-unhalt"),
    (bits::KVM_FEATURE_PV_SEND_IPI, "pv-send-ipi"),
    (bits::KVM_FEATURE_PV_TLB_FLUSH, "pv-tlb-flush"),
    (bits::KVM_FEATURE_PV_SCHED_YIELD, "pv-sched-yield"),
    (bits::KVM_FEATURE_POLL_CONTROL, "poll-control"),
];

/// The names of the [`KVM_PV_FEATURES`] set in a vCPU's (or KVM's supported) CPUID.
pub fn kvm_pv_features(entries: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    let signed = entries
        .iter()
        .any(|e| e.function == 0x4000_0000 && e.eax >= 0x4000_0001);
    let eax = entries
        .iter()
        .find(|e| e.function == 0x4000_0001)
        .map_or(0, |e| e.eax);
    KVM_PV_FEATURES
        .iter()
        .filter(|(bit, _)| signed && eax & (1 << bit) != 0)
        .map(|&(_, name)| name)
        .collect()
}

/// Leaf 0x4000_0001 EAX bits hidden with [`CpuidQuirks::hide_kvm_hypercalls`].
pub const KVM_HYPERCALL_FEATURES: u32 = 1 << bits::KVM_FEATURE_PV_UNHALT
    | 1 << bits::KVM_FEATURE_PV_TLB_FLUSH
    | 1 << bits::KVM_FEATURE_PV_SEND_IPI
    | 1 << bits::KVM_FEATURE_PV_SCHED_YIELD;

/// Leaf 1 ECX bits hidden with [`CpuidQuirks::hide_xsave`]: XSAVE itself and the VEX-encoded
/// extensions whose state only XSAVE can switch.
pub const LEAF1_ECX_XSAVE_MASK: u32 = 1 << bits::ECX_FMA
    | 1 << bits::ECX_XSAVE
    | 1 << bits::ECX_OSXSAVE
    | 1 << bits::ECX_AVX
    | 1 << bits::ECX_F16C;
/// Leaf 7.0 EBX bits hidden with `hide_xsave`: AVX2, MPX, AVX-512 F/DQ/IFMA/PF/ER/CD/BW/VL.
pub const LEAF7_EBX_XSAVE_MASK: u32 = 1 << 5
    | 1 << 14
    | 1 << 16
    | 1 << 17
    | 1 << 21
    | 1 << 26
    | 1 << 27
    | 1 << 28
    | 1 << 30
    | 1 << 31;
/// Leaf 7.0 ECX bits hidden with `hide_xsave`: AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, CET_SS,
/// VAES, VPCLMULQDQ, AVX512_VNNI, AVX512_BITALG, AVX512_VPOPCNTDQ.
pub const LEAF7_ECX_XSAVE_MASK: u32 =
    1 << 1 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 14;
/// Leaf 7.0 EDX bits hidden with `hide_xsave`: AVX512_4VNNIW, AVX512_4FMAPS, AVX512_VP2INTERSECT,
/// CET_IBT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8.
pub const LEAF7_EDX_XSAVE_MASK: u32 =
    1 << 2 | 1 << 3 | 1 << 8 | 1 << 20 | 1 << 22 | 1 << 23 | 1 << 24 | 1 << 25;
/// Leaf 7.1 EAX bits hidden with `hide_xsave`: AVX_VNNI, AVX512_BF16, AMX_FP16, AVX_IFMA.
pub const LEAF7_1_EAX_XSAVE_MASK: u32 = 1 << 4 | 1 << 5 | 1 << 21 | 1 << 23;
/// Leaf 7.1 EDX bits hidden with `hide_xsave`: AVX_VNNI_INT8, AVX_NE_CONVERT, AMX_COMPLEX,
/// AVX_VNNI_INT16, AVX10, APX_F.
pub const LEAF7_1_EDX_XSAVE_MASK: u32 = 1 << 4 | 1 << 5 | 1 << 8 | 1 << 10 | 1 << 19 | 1 << 21;
/// Leaf 0x8000_0001 ECX bits hidden with `hide_xsave` (AMD): XOP, LWP, FMA4, TBM.
pub const LEAF_8000_0001_ECX_XSAVE_MASK: u32 = 1 << 11 | 1 << 15 | 1 << 16 | 1 << 21;
/// Leaves zeroed with `hide_xsave`: XSAVE state enumeration, AMX tile and TMUL information, AVX10.
pub const XSAVE_LEAVES: [u32; 4] = [0xd, 0x1d, 0x1e, 0x24];

/// Leaf 0xb/0x1f level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vendor {
    Intel,
    Amd,
    Other,
}

impl Vendor {
    fn of(entries: &[kvm_cpuid_entry2]) -> Vendor {
        let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
            return Vendor::Other;
        };
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// The VM's topology: one package of `num_cpus` single-threaded cores.
#[derive(Clone, Copy, Debug)]
struct Topology {
    vcpu_id: u32,
    num_cpus: u32,
    /// Bits of the APIC ID that number the cores: ceil(log2(num_cpus)).
    core_bits: u32,
}

impl Topology {
    fn new(vcpu_id: u8, num_cpus: u8) -> Self {
        let num_cpus = u32::from(num_cpus.max(1));
        Topology {
            vcpu_id: vcpu_id.into(),
            num_cpus,
            core_bits: num_cpus.next_power_of_two().trailing_zeros(),
        }
    }

    /// Addressable logical processor IDs per package: a power of two, as Intel documents it.
    fn ids_per_package(&self) -> u32 {
        1 << self.core_bits
    }

    /// Leaf 1 EBX[23:16]. Its next power of two is what counts, so when 2^core_bits does not fit in
    /// 8 bits the exact count (which rounds up to the same power) is used.
    fn leaf1_logical_count(&self) -> u32 {
        let ids = self.ids_per_package();
        if ids <= 0xff {
            ids
        } else {
            self.num_cpus
        }
    }

    /// Leaf 4 EAX[31:26]: addressable core IDs per package - 1 (6 bits).
    fn leaf4_cores_field(&self) -> u32 {
        self.ids_per_package().min(64) - 1
    }

    /// Leaf 4 / 0x8000_001d EAX[25:14]: addressable logical processors sharing a cache of `level`,
    /// minus 1. L1 and L2 are per core; L3 and beyond are shared by the package.
    fn cache_sharing_field(&self, level: u32) -> u32 {
        if level >= 3 {
            self.ids_per_package().min(0x1000) - 1
        } else {
            0
        }
    }

    /// Leaf 0xb/0x1f subleaf `index`.
    fn ext_topology(&self, function: u32, index: u32) -> kvm_cpuid_entry2 {
        let (eax, ebx, ecx) = match index {
            0 => (0, 1, LEVEL_TYPE_SMT << 8),
            1 => (self.core_bits, self.num_cpus, LEVEL_TYPE_CORE << 8 | 1),
            _ => (0, 0, index & 0xff),
        };
        kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            edx: self.vcpu_id,
            ..Default::default()
        }
    }
}

/// Rewrites the sharing field of a deterministic cache parameters entry (leaf 4 or 0x8000_001d).
fn cache_params(e: &mut kvm_cpuid_entry2, topo: &Topology, with_cores_field: bool) {
    if e.eax & 0x1f == 0 {
        return; // no more caches
    }
    let level = (e.eax >> 5) & 0x7;
    e.eax = (e.eax & !(0xfff << 14)) | topo.cache_sharing_field(level) << 14;
    if with_cores_field {
        e.eax = (e.eax & !(0x3f << 26)) | topo.leaf4_cores_field() << 26;
    }
}

fn filter_entry(e: &mut kvm_cpuid_entry2, topo: &Topology, vendor: Vendor, quirks: &CpuidQuirks) {
    if quirks.hide_xsave && XSAVE_LEAVES.contains(&e.function) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        return;
    }
    match e.function {
        0x1 => {
            e.ebx = (e.ebx & 0xff)
                | 8 << 8 // CLFLUSH line size: 8 quadwords
                | topo.leaf1_logical_count() << 16
                | topo.vcpu_id << 24;
            e.ecx |= 1 << bits::ECX_HYPERVISOR | 1 << bits::ECX_TSC_DEADLINE;
            if quirks.hide_cx16 {
                e.ecx &= !(1 << bits::ECX_CX16);
            }
            if quirks.hide_xsave {
                e.ecx &= !LEAF1_ECX_XSAVE_MASK;
            }
            if topo.num_cpus > 1 {
                e.edx |= 1 << bits::EDX_HTT;
            } else {
                e.edx &= !(1 << bits::EDX_HTT);
            }
        }
        0x4 => cache_params(e, topo, true),
        0x6 => {
            e.eax &= 1 << bits::LEAF6_EAX_ARAT;
            (e.ebx, e.ecx, e.edx) = (0, 0, 0);
        }
        0x7 if quirks.hide_xsave => match e.index {
            0 => {
                e.ebx &= !LEAF7_EBX_XSAVE_MASK;
                e.ecx &= !LEAF7_ECX_XSAVE_MASK;
                e.edx &= !LEAF7_EDX_XSAVE_MASK;
            }
            1 => {
                e.eax &= !LEAF7_1_EAX_XSAVE_MASK;
                e.edx &= !LEAF7_1_EDX_XSAVE_MASK;
            }
            _ => {}
        },
        0xb | 0x1f => *e = topo.ext_topology(e.function, e.index),
        0x4000_0001 => {
            if quirks.hide_kvm_steal_and_stable {
                e.eax &= !(1 << bits::KVM_FEATURE_STEAL_TIME
                    | 1 << bits::KVM_FEATURE_CLOCKSOURCE_STABLE_BIT);
            }
            if quirks.hide_kvm_hypercalls {
                e.eax &= !KVM_HYPERCALL_FEATURES;
            }
        }
        0x8000_0001 if quirks.hide_xsave => e.ecx &= !LEAF_8000_0001_ECX_XSAVE_MASK,
        0x8000_0008 if vendor == Vendor::Amd => {
            // NC (cores - 1) and ApicIdCoreIdSize; PerfTscSize and the rest stay.
            e.ecx = (e.ecx & !0xf0ff) | (topo.num_cpus - 1) | topo.core_bits << 12;
        }
        0x8000_001d => cache_params(e, topo, false),
        0x8000_001e => {
            e.eax = topo.vcpu_id; // extended APIC ID
            e.ebx = topo.vcpu_id; // compute unit / core ID; threads per core - 1 = 0
            e.ecx = 0; // node 0, one node per package
            e.edx = 0;
        }
        _ => {}
    }
}

/// Turns the host's supported CPUID into vCPU `vcpu_id`'s CPUID for a VM of `num_cpus` vCPUs.
///
/// A `num_cpus` of 0 is treated as 1. Leaf 0xb subleaves 0–2 are added when the maximum basic leaf
/// covers 0xb and KVM left them out (it reports at most a zeroed subleaf 0); leaf 0x1f gets the
/// same subleaves only if KVM reports the leaf at all.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_cpus: u8, quirks: &CpuidQuirks) {
    let topo = Topology::new(vcpu_id, num_cpus);
    let vendor = Vendor::of(cpuid.as_slice());
    let max_basic = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    for e in cpuid.as_mut_slice() {
        filter_entry(e, &topo, vendor, quirks);
    }

    let has_1f = cpuid.as_slice().iter().any(|e| e.function == 0x1f);
    let mut topology_leaves = Vec::new();
    if max_basic >= 0xb {
        topology_leaves.push(0xb);
    }
    if max_basic >= 0x1f && has_1f {
        topology_leaves.push(0x1f);
    }
    for function in topology_leaves {
        for index in 0..=2 {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == function && e.index == index);
            if !present {
                if let Err(e) = cpuid.push(topo.ext_topology(function, index)) {
                    log::warn!("CPUID: cannot add leaf {function:#x}.{index}: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let flags = if [4, 7, 0xb, 0xd, 0x1f, 0x8000_001d].contains(&function) {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        };
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_regs(vendor: &[u8; 12], max_leaf: u32) -> [u32; 4] {
        let r = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        [max_leaf, r(0), r(8), r(4)]
    }

    /// A plausible Intel host as KVM reports it, with host topology (2 threads x 8 cores) in it.
    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, vendor_regs(b"GenuineIntel", 0x1f)),
            entry(1, 0, [0x000906ea, 0x0710_0805, 0x7ffa_fbff, 0xbfeb_fbff]),
            entry(2, 0, [0x0076_0301, 0, 0, 0x00c3_0000]),
            entry(4, 0, [0x1c00_4121, 0x01c0_003f, 0x3f, 0]),
            entry(4, 1, [0x1c00_4122, 0x01c0_003f, 0x3f, 0]),
            entry(4, 2, [0x1c00_4143, 0x00c0_003f, 0x3ff, 0]),
            entry(4, 3, [0x1c03_c163, 0x03c0_003f, 0x3fff, 6]),
            entry(4, 4, [0, 0, 0, 0]),
            entry(6, 0, [0x0000_27f7, 2, 9, 0]),
            entry(7, 0, [0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            entry(7, 1, [0xffff_ffff, 0, 0, 0xffff_ffff]),
            entry(0xb, 0, [0, 0, 0, 0]),
            entry(0xd, 0, [0x2e7, 0xa88, 0xa88, 0]),
            entry(0xd, 1, [0xf, 0, 0, 0]),
            entry(0x1f, 0, [0, 0, 0, 0]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ]
    }

    /// A plausible AMD host (the shape this project's PVM host reports).
    fn amd() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, vendor_regs(b"AuthenticAMD", 0x10)),
            entry(1, 0, [0x00a0_0f11, 0x0102_0800, 0x8120_2000, 0x078b_fbff]),
            entry(6, 0, [4, 0, 0, 0]),
            entry(0xb, 0, [0, 0, 0, 1]),
            entry(0xd, 0, [0x207, 0x988, 0x988, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0022, 0, 0, 0]),
            entry(0x8000_0001, 0, [0x00a0_0f11, 0, 0x0041_0b93, 0x23d3_fbff]),
            entry(
                0x8000_0005,
                0,
                [0xff40_ff40, 0xff40_ff40, 0x2008_0140, 0x2008_0140],
            ),
            entry(0x8000_0008, 0, [0x3030, 0x110a_d205, 0x0003_7001, 0]),
            entry(0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(0x8000_001d, 3, [0x0000_4163, 0x03c0_003f, 0x7fff, 1]),
            entry(0x8000_001e, 0, [0, 0, 0, 0]),
        ]
    }

    fn filtered(
        entries: &[kvm_cpuid_entry2],
        vcpu_id: u8,
        num_cpus: u8,
        quirks: &CpuidQuirks,
    ) -> CpuId {
        let mut cpuid = CpuId::from_entries(entries).unwrap();
        filter_cpuid(&mut cpuid, vcpu_id, num_cpus, quirks);
        cpuid
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        let matches: Vec<_> = cpuid
            .as_slice()
            .iter()
            .filter(|e| e.function == function && e.index == index)
            .copied()
            .collect();
        assert_eq!(matches.len(), 1, "leaf {function:#x}.{index}");
        matches[0]
    }

    fn has(cpuid: &CpuId, function: u32) -> bool {
        cpuid.as_slice().iter().any(|e| e.function == function)
    }

    const ALL_QUIRKS: CpuidQuirks = CpuidQuirks {
        hide_cx16: true,
        hide_xsave: true,
        hide_kvm_steal_and_stable: true,
        hide_kvm_hypercalls: true,
    };

    #[test]
    fn leaf1_apic_id_count_clflush_htt_hypervisor_tsc_deadline() {
        for host in [intel(), amd()] {
            let c = filtered(&host, 3, 4, &CpuidQuirks::default());
            let l1 = get(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, 3, "initial APIC ID");
            assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
            assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH size");
            let host_l1 = get(&CpuId::from_entries(&host).unwrap(), 1, 0);
            assert_eq!(l1.ebx & 0xff, host_l1.ebx & 0xff, "brand index kept");
            assert_ne!(l1.edx & (1 << bits::EDX_HTT), 0);
            assert_ne!(l1.ecx & (1 << bits::ECX_HYPERVISOR), 0);
            assert_ne!(l1.ecx & (1 << bits::ECX_TSC_DEADLINE), 0);
            assert_eq!(l1.eax, host_l1.eax, "signature kept");
        }
    }

    #[test]
    fn leaf1_single_cpu_clears_htt() {
        let c = filtered(&intel(), 0, 1, &CpuidQuirks::default());
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.edx & (1 << bits::EDX_HTT), 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.ebx >> 24, 0);
    }

    #[test]
    fn logical_count_rounds_to_a_power_of_two_that_fits() {
        for (n, expected) in [
            (1u8, 1u32),
            (2, 2),
            (3, 4),
            (5, 8),
            (64, 64),
            (100, 128),
            (129, 129),
            (255, 255),
        ] {
            let c = filtered(&intel(), 0, n, &CpuidQuirks::default());
            assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, expected, "{n} CPUs");
        }
    }

    #[test]
    fn zero_cpus_is_treated_as_one() {
        let c = filtered(&intel(), 0, 0, &CpuidQuirks::default());
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 1);
        assert_eq!(get(&c, 0xb, 1).ebx, 1);
    }

    #[test]
    fn cx16_hidden_only_with_quirk() {
        let cx16 = 1 << bits::ECX_CX16;
        let c = filtered(&intel(), 0, 1, &CpuidQuirks::default());
        assert_ne!(get(&c, 1, 0).ecx & cx16, 0);
        let quirks = CpuidQuirks {
            hide_cx16: true,
            ..Default::default()
        };
        let c = filtered(&intel(), 0, 1, &quirks);
        assert_eq!(get(&c, 1, 0).ecx & cx16, 0);
        assert_ne!(
            get(&c, 1, 0).ecx & (1 << bits::ECX_AVX),
            0,
            "only CX16 hidden"
        );
    }

    #[test]
    fn xsave_and_its_state_hidden_with_quirk() {
        let quirks = CpuidQuirks {
            hide_xsave: true,
            ..Default::default()
        };
        let c = filtered(&intel(), 0, 2, &quirks);
        let l1 = get(&c, 1, 0);
        for bit in [12, 26, 27, 28, 29] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        assert_ne!(l1.ecx & (1 << bits::ECX_CX16), 0, "CX16 kept");
        let l7 = get(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2");
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX512F");
        assert_eq!(l7.ebx & LEAF7_EBX_XSAVE_MASK, 0);
        assert_ne!(l7.ebx & (1 << 0), 0, "FSGSBASE kept");
        assert_ne!(l7.ebx & (1 << 9), 0, "ERMS kept");
        assert_eq!(l7.ecx & LEAF7_ECX_XSAVE_MASK, 0);
        assert_ne!(l7.ecx & (1 << 8), 0, "GFNI kept");
        assert_eq!(l7.edx & LEAF7_EDX_XSAVE_MASK, 0);
        let l7_1 = get(&c, 7, 1);
        assert_eq!(l7_1.eax & LEAF7_1_EAX_XSAVE_MASK, 0);
        assert_eq!(l7_1.edx & LEAF7_1_EDX_XSAVE_MASK, 0);
        for index in [0, 1] {
            let d = get(&c, 0xd, index);
            assert_eq!(
                (d.eax, d.ebx, d.ecx, d.edx),
                (0, 0, 0, 0),
                "leaf 0xd.{index}"
            );
        }

        let c = filtered(&amd(), 0, 2, &quirks);
        let e1 = get(&c, 0x8000_0001, 0);
        assert_eq!(
            e1.ecx & LEAF_8000_0001_ECX_XSAVE_MASK,
            0,
            "XOP, LWP, FMA4, TBM"
        );
        assert_ne!(e1.ecx & (1 << 22), 0, "TOPOEXT kept");
        assert_eq!(get(&c, 0xd, 2).eax, 0);
    }

    #[test]
    fn xsave_kept_without_quirk() {
        let host = CpuId::from_entries(&intel()).unwrap();
        let c = filtered(&intel(), 0, 2, &CpuidQuirks::default());
        assert_eq!(
            get(&c, 1, 0).ecx & LEAF1_ECX_XSAVE_MASK,
            LEAF1_ECX_XSAVE_MASK
        );
        assert_eq!(get(&c, 7, 0), get(&host, 7, 0));
        assert_eq!(get(&c, 7, 1), get(&host, 7, 1));
        assert_eq!(get(&c, 0xd, 0), get(&host, 0xd, 0));
    }

    #[test]
    fn leaf4_cores_and_cache_sharing() {
        let c = filtered(&intel(), 1, 6, &CpuidQuirks::default());
        for index in 0..4 {
            let l4 = get(&c, 4, index);
            assert_eq!(l4.eax >> 26, 7, "cores per package - 1 (8 IDs for 6 cores)");
            let level = (l4.eax >> 5) & 7;
            let sharing = (l4.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level >= 3 { 7 } else { 0 }, "leaf 4.{index}");
            assert_eq!(l4.eax & 0x3fff, intel()[3 + index as usize].eax & 0x3fff);
        }
        let end = get(&c, 4, 4);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 0, 0));
        // More than 64 cores: the 6-bit field saturates.
        let c = filtered(&intel(), 0, 200, &CpuidQuirks::default());
        assert_eq!(get(&c, 4, 0).eax >> 26, 63);
        assert_eq!((get(&c, 4, 3).eax >> 14) & 0xfff, 255);
    }

    #[test]
    fn x2apic_topology_leaves() {
        for (host, has_1f) in [(intel(), true), (amd(), false)] {
            for (vcpu, n) in [(0u8, 1u8), (2, 3), (7, 8), (200, 255)] {
                let c = filtered(&host, vcpu, n, &CpuidQuirks::default());
                let mut leaves = vec![0xb];
                if has_1f {
                    leaves.push(0x1f);
                } else {
                    assert!(!has(&c, 0x1f), "0x1f not invented");
                }
                for leaf in leaves {
                    let smt = get(&c, leaf, 0);
                    assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
                    let core = get(&c, leaf, 1);
                    let bits = u32::from(n).next_power_of_two().trailing_zeros();
                    assert_eq!((core.eax, core.ebx, core.ecx), (bits, n.into(), 0x201));
                    let end = get(&c, leaf, 2);
                    assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
                    for e in [smt, core, end] {
                        assert_eq!(e.edx, u32::from(vcpu), "x2APIC ID");
                        assert_eq!(e.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
                    }
                }
            }
        }
    }

    #[test]
    fn topology_leaf_not_added_below_max_basic_leaf() {
        let mut host = amd();
        host[0].eax = 0xa;
        host.retain(|e| e.function != 0xb);
        let c = filtered(&host, 0, 2, &CpuidQuirks::default());
        assert!(!has(&c, 0xb));
    }

    #[test]
    fn extra_topology_subleaves_become_invalid_levels() {
        let mut host = intel();
        host.push(entry(0xb, 3, [1, 2, 0x303, 9]));
        let c = filtered(&host, 5, 8, &CpuidQuirks::default());
        let e = get(&c, 0xb, 3);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 3, 5));
    }

    #[test]
    fn amd_core_count_and_topoext() {
        let c = filtered(&amd(), 5, 6, &CpuidQuirks::default());
        let l8 = get(&c, 0x8000_0008, 0);
        assert_eq!(l8.ecx & 0xff, 5, "NC");
        assert_eq!((l8.ecx >> 12) & 0xf, 3, "ApicIdCoreIdSize");
        assert_eq!(l8.ecx & 0x3_0000, 0x3_0000, "PerfTscSize kept");
        assert_eq!((l8.eax, l8.ebx), (0x3030, 0x110a_d205));
        let t = get(&c, 0x8000_001e, 0);
        assert_eq!((t.eax, t.ebx, t.ecx, t.edx), (5, 5, 0, 0));
        let l1 = get(&c, 0x8000_001d, 0);
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 per core");
        let l3 = get(&c, 0x8000_001d, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 7, "L3 per package");
        assert_eq!(l3.eax & 0x3fff, 0x163);
    }

    #[test]
    fn intel_leaf_8000_0008_ecx_untouched() {
        let c = filtered(&intel(), 1, 4, &CpuidQuirks::default());
        assert_eq!(get(&c, 0x8000_0008, 0).ecx, 0);
        assert!(!has(&c, 0x8000_001e));
    }

    #[test]
    fn kvm_leaves_kept_and_quirk_clears_steal_time_and_stable_bit() {
        let host = CpuId::from_entries(&intel()).unwrap();
        let c = filtered(&intel(), 0, 2, &CpuidQuirks::default());
        assert_eq!(get(&c, 0x4000_0000, 0), get(&host, 0x4000_0000, 0));
        let sig = get(&c, 0x4000_0000, 0);
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&c, 0x4000_0001, 0), get(&host, 0x4000_0001, 0));

        let quirks = CpuidQuirks {
            hide_kvm_steal_and_stable: true,
            ..Default::default()
        };
        let c = filtered(&intel(), 0, 2, &quirks);
        let f = get(&c, 0x4000_0001, 0).eax;
        assert_eq!(f & (1 << 5), 0, "steal time");
        assert_eq!(f & (1 << 24), 0, "clocksource stable");
        assert_eq!(f, 0x0100_7efb & !(1 << 5 | 1 << 24));
    }

    #[test]
    fn hypercall_quirk_clears_only_the_pv_features_that_make_hypercalls() {
        let quirks = CpuidQuirks {
            hide_kvm_hypercalls: true,
            ..Default::default()
        };
        let c = filtered(&intel(), 0, 2, &quirks);
        let f = get(&c, 0x4000_0001, 0).eax;
        for bit in [7, 9, 11, 13] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        // kvmclock, PV EOI (an MSR, the exitless EOI path) and the rest stay.
        assert_eq!(f, 0x0100_7efb & !(1 << 7 | 1 << 9 | 1 << 11 | 1 << 13));
        assert_ne!(f & (1 << 6), 0, "PV EOI kept");
    }

    /// Hardware-style hosts: every PV feature of the interrupt and idle paths KVM offers reaches
    /// the guest. PVM hosts: only those that need no kernel-mode hypercall (PV EOI, poll control).
    #[test]
    fn pv_feature_sets_per_host_kind() {
        let all = [
            "pv-eoi",
            "pv-unhalt",
            "pv-send-ipi",
            "pv-tlb-flush",
            "pv-sched-yield",
            "poll-control",
        ];
        for host in [intel(), amd()] {
            assert_eq!(kvm_pv_features(&host), all, "KVM's supported set");
            let c = filtered(&host, 0, 2, &CpuidQuirks::default());
            assert_eq!(kvm_pv_features(c.as_slice()), all, "hardware host");
            let pvm = crate::host::HostInfo {
                pvm: Some(crate::host::PvmInfo {
                    native_guests_emulated: true,
                    version: None,
                    features: None,
                    tsc_khz: None,
                    emul_batch: None,
                    evidence: crate::host::PvmEvidence::Module,
                }),
                kvm_module: Some("kvm_pvm"),
                cpu_vendor: String::new(),
            };
            let c = filtered(&host, 0, 2, &pvm.cpuid_quirks());
            assert_eq!(kvm_pv_features(c.as_slice()), ["pv-eoi", "poll-control"]);
        }
        // No KVM signature: no KVM features, whatever the bits say.
        let mut unsigned = intel();
        unsigned.retain(|e| e.function != 0x4000_0000);
        assert!(kvm_pv_features(&unsigned).is_empty());
    }

    #[test]
    fn leaf6_zeroed_but_arat() {
        let c = filtered(&intel(), 0, 2, &ALL_QUIRKS);
        let l6 = get(&c, 6, 0);
        assert_eq!(
            (l6.eax, l6.ebx, l6.ecx, l6.edx),
            (1 << bits::LEAF6_EAX_ARAT, 0, 0, 0)
        );
    }

    #[test]
    fn other_leaves_unchanged() {
        let host = CpuId::from_entries(&amd()).unwrap();
        let c = filtered(&amd(), 1, 2, &ALL_QUIRKS);
        for (f, i) in [(0, 0), (0x8000_0000, 0), (0x8000_0005, 0)] {
            assert_eq!(get(&c, f, i), get(&host, f, i));
        }
        let host = CpuId::from_entries(&intel()).unwrap();
        let c = filtered(&intel(), 1, 2, &ALL_QUIRKS);
        assert_eq!(get(&c, 2, 0), get(&host, 2, 0));
        // Only the added 0xb/0x1f subleaves change the entry count.
        assert_eq!(c.as_slice().len(), host.as_slice().len() + 4);
    }

    /// Runs against the real `KVM_GET_SUPPORTED_CPUID`; skipped when `/dev/kvm` is unavailable.
    #[test]
    fn real_kvm_supported_cpuid_invariants() {
        use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                return crate::test_skip("real_kvm_supported_cpuid_invariants", &e.to_string())
            }
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let vm = kvm.create_vm().unwrap();
        let num_cpus = 4u8;
        for vcpu_id in 0..num_cpus {
            let mut c = supported.clone();
            filter_cpuid(&mut c, vcpu_id, num_cpus, &ALL_QUIRKS);
            assert!(c.as_slice().len() <= KVM_MAX_CPUID_ENTRIES);
            let l1 = get(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(vcpu_id));
            assert_ne!(l1.ecx & (1 << bits::ECX_HYPERVISOR), 0);
            assert_eq!(l1.ecx & (1 << bits::ECX_CX16), 0);
            assert_eq!(l1.ecx & LEAF1_ECX_XSAVE_MASK, 0);
            assert_ne!(l1.edx & (1 << bits::EDX_HTT), 0);
            if has(&c, 0xb) {
                assert_eq!(get(&c, 0xb, 0).edx, u32::from(vcpu_id));
                assert_eq!(get(&c, 0xb, 1).ebx, u32::from(num_cpus));
            }
            if has(&c, 0x4000_0001) {
                let f = get(&c, 0x4000_0001, 0).eax;
                assert_eq!(f & (1 << 5 | 1 << 24), 0);
                assert_eq!(f & KVM_HYPERCALL_FEATURES, 0);
            }
            // KVM accepts the result.
            let vcpu = vm.create_vcpu(vcpu_id.into()).unwrap();
            vcpu.set_cpuid2(&c).unwrap();
        }
    }
}
