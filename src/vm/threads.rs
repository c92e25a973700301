//! The VM's threads other than the API's: each vCPU's (its set-up on the thread, its filter, its
//! panics caught), their stop and join, the console's input, and the stop signals.
//!
//! Owns the thread handles once started; it may touch a vCPU only through its thread (a kick, the
//! join) and the VM only through the end channel.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use crate::devices::legacy::serial;
use crate::devices::VmEnd;
use crate::stats::VcpuStats;
use crate::vcpu::{self, Vcpu};

pub(crate) type VcpuThread = std::thread::JoinHandle<VcpuStats>;

/// The `kvm:kvm_exit` tracepoint's id and the host's exit reasons.
pub(crate) type KernelTrace = (u64, crate::kvm_trace::Reasons);

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP end the VM (seen by [`signalled`]).
pub(crate) fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether a stop signal came since the last call.
pub(crate) fn signalled() -> bool {
    SIGNALLED.swap(false, Ordering::SeqCst)
}

/// Kicks the thread out of `KVM_RUN` (or out of a blocking call: the handler does nothing).
pub(crate) fn kick_thread(p: libc::pthread_t) {
    // SAFETY: callers pass the pthread_t of a vCPU thread that has not been joined (threads are
    // joined only once the lifecycle is stopped and no more kicks are sent); the kick handler
    // does nothing but interrupt KVM_RUN.
    unsafe { libc::pthread_kill(p, vcpu::kick_signal()) };
}

/// Kicks before a vCPU thread that stays in `KVM_RUN` is given up on (5 s at 2 ms).
pub(crate) const STOP_KICKS: u32 = 2500;

/// Joins the vCPU threads (the lifecycle has told them to stop), kicking each out of `KVM_RUN` every
/// `interval`, at most [`STOP_KICKS`] times. Returns the counters of the threads that ended and,
/// per vCPU, what went wrong (a panic, or a thread given up on: it is left running, detached,
/// and ends with the process).
pub(crate) fn stop_vcpus(
    handles: Vec<VcpuThread>,
    kick: &dyn Fn(&VcpuThread),
    interval: Duration,
) -> (Vec<VcpuStats>, Vec<String>) {
    let mut stats = Vec::new();
    let mut problems = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let mut kicks = 0;
        while !h.is_finished() && kicks < STOP_KICKS {
            kick(&h);
            kicks += 1;
            std::thread::sleep(interval);
        }
        if !h.is_finished() {
            problems.push(format!(
                "vcpu{i} did not leave KVM_RUN after {STOP_KICKS} kicks; its counters are missing"
            ));
            continue;
        }
        match h.join() {
            Ok(s) => stats.push(s),
            Err(p) => problems.push(format!(
                "vcpu{i} panicked: {}; its counters are missing",
                crate::panics::payload_text(&*p)
            )),
        }
    }
    (stats, problems)
}

/// Runs one vCPU on its thread. A panic (a bug in exitless) ends the VM with an error instead
/// of leaving the other vCPUs running; the panic goes on to the join, which reports it.
/// With dedicated cores it first pins itself to its CPU (`pin`), and with
/// `--kernel-exit-reasons` opens its tracepoint counters (`trace`), before its filter is on.
pub(crate) fn vcpu_thread(
    v: Vcpu,
    pin: Option<usize>,
    trace: Option<(KernelTrace, crate::kvm_trace::Shared)>,
    end: crate::devices::VmEndSender,
) -> VcpuStats {
    let id = v.id;
    if let Some(((tp, reasons), shared)) = trace {
        match crate::kvm_trace::ExitCounters::open_for_this_thread(tp, reasons) {
            Ok(c) => {
                let _ = shared[usize::from(id)].set(c);
            }
            Err(e) => log::warn!("vCPU {id}: no in-kernel exit reasons: {e}"),
        }
    }
    if let Some(cpu) = pin {
        if let Err(e) = crate::dedicated::set_thread_affinity(&[cpu]) {
            let _ = end.send(VmEnd::Error(format!("vCPU {id}: --dedicated-cores: {e}")));
        }
    }
    // The vCPU's descriptors and its kvm_run page were set up on the main thread.
    crate::seccomp::apply(crate::seccomp::Kind::Vcpu);
    match crate::panics::catch(|| v.run()) {
        Ok(s) => s,
        Err(msg) => {
            let _ = end.send(VmEnd::Error(format!("vCPU {id} panicked")));
            std::panic::resume_unwind(Box::new(msg))
        }
    }
}

/// Copies host stdin into the UART. Ctrl-A x ends the VM (as in QEMU); Ctrl-A Ctrl-A sends one
/// Ctrl-A. When stdin ends, the guest simply gets no more input.
pub(crate) fn spawn_console_input(serial: Arc<Mutex<serial::Serial>>, end: mpsc::Sender<VmEnd>) {
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::Kind::Console);
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut bytes = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                let _ = end.send(VmEnd::Interrupted);
                                return;
                            }
                            0x01 => bytes.push(0x01),
                            _ => {}
                        }
                    } else if b == 0x01 {
                        escape = true;
                    } else {
                        bytes.push(b);
                    }
                }
                let mut rest: &[u8] = &bytes;
                while !rest.is_empty() {
                    let k = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue(rest);
                    rest = &rest[k..];
                    if !rest.is_empty() {
                        // The guest has not drained its receive FIFO yet.
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_panicked_vcpu_is_named_not_counted_as_zero() {
        let ok = std::thread::spawn(VcpuStats::default);
        let bad = std::thread::spawn(|| -> VcpuStats { panic!("vCPU bug") });
        // Both have ended (a zero wait gives up on any thread still running, loaded host or not).
        while !bad.is_finished() || !ok.is_finished() {
            std::thread::yield_now();
        }
        let (stats, problems) = stop_vcpus(vec![ok, bad], &|_| {}, Duration::ZERO);
        assert_eq!(stats.len(), 1, "only the vCPU that ended has counters");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("vcpu1 panicked: vCPU bug"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_vcpu_that_never_leaves_kvm_run_is_given_up_on() {
        let (tx, rx) = mpsc::channel::<()>();
        let stuck = std::thread::spawn(move || {
            // Leaves only after far more kicks than the stop allows.
            let _ = rx.recv();
            VcpuStats::default()
        });
        let kicks = std::sync::atomic::AtomicU32::new(0);
        let kick = |_: &VcpuThread| {
            if kicks.fetch_add(1, Ordering::SeqCst) + 1 == 10 * STOP_KICKS {
                let _ = tx.send(());
            }
        };
        let (stats, problems) = stop_vcpus(vec![stuck], &kick, Duration::ZERO);
        assert_eq!(kicks.load(Ordering::SeqCst), STOP_KICKS);
        assert!(stats.is_empty());
        assert!(
            problems[0].contains("vcpu0 did not leave KVM_RUN"),
            "{problems:?}"
        );
    }
}
