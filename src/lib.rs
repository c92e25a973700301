//! exitless: a virtual machine monitor on KVM whose product is the exit path.
//!
//! Layout, one module per concern:
//! - [`arch`]: x86_64 boot (address map, kernel loading, boot registers, E820, ACPI, CPUID, MSRs);
//! - [`dedicated`]: dedicated cores (vCPU pinning, HLT/MWAIT/PAUSE kept in the guest), halt
//!   polling;
//! - [`memory`]: guest RAM; [`memlimit`]: the VMM's memory cgroup (`--mem-limit`);
//! - [`vcpu`]: the vCPU thread, its run loop and exit dispatch, completion of failed emulations;
//! - [`devices`]: device models by tier (`legacy` = emulated platform devices) and the I/O buses;
//! - [`stats`]: exit counters and the end-of-run summary; [`rates`]: ELI's Table 3.1 rows as
//!   rates; [`top`]: `exitless top`, the live view of a running VM;
//! - [`panics`]: panics of device workers and vCPUs, caught and reported once;
//! - [`seccomp`]: the system call filters of each kind of thread; [`sandbox`]: their Landlock
//!   file restrictions;
//! - [`ratelimit`]: rate limits on the warnings a guest can trigger;
//! - [`startup`]: where the time before the first `KVM_RUN` goes;
//! - [`host`]: what the host KVM is and what it cannot run; [`apicv`]: whether it virtualizes
//!   the guest's APIC (APICv/AVIC, posted interrupts), and why not;
//! - [`kvm_stats`]: KVM's own per-vCPU exit counters (binary statistics); [`kvm_trace`]: KVM's
//!   in-kernel exits by reason (the `kvm:kvm_exit` tracepoint);
//! - [`vmm`]: builds a VM from a [`config::VmConfig`] and runs it to the end;
//! - [`vm`] and [`lifecycle`]: the VM object and its states; [`api`]: its REST API;
//! - [`snapshot`]: a paused VM written to a directory, and read back for a restore;
//! - [`kit`]: the embedded test-kit guests;
//! - [`bench`]: benchmarks of the exit path on this host (`exitless bench exits`);
//! - [`cli`] and [`terminal`]: the command line and the console.

pub mod api;
pub mod apicv;
pub mod arch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dedicated;
pub mod devices;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod kit;
pub mod kvm_stats;
pub mod kvm_trace;
pub mod lifecycle;
pub mod memlimit;
pub mod memory;
pub mod panics;
pub mod ratelimit;
pub mod rates;
pub mod sandbox;
pub mod seccomp;
pub mod snapshot;
pub mod startup;
pub mod stats;
pub mod terminal;
pub mod top;
pub mod vcpu;
pub mod vm;
pub mod vmm;

/// Records that a unit test did not run, and why: one line past libtest's output capture, which
/// `tools/test.sh` counts as a skip (never a pass); the integration tests' twin is
/// `tests/common::skip`.
#[cfg(test)]
pub(crate) fn test_skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\nexitless-skip: exitless(lib)::{test}: {why}"
    );
}
