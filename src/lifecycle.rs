//! The VM's lifecycle: its state and the messages that move its vCPUs between states.
//!
//! ```text
//!   Created --start--> Running --pause--> Paused
//!                         ^  <--resume----  |
//!                         |                 |
//!                         +----> Stopped <--+   (the guest ends the VM, quit/shutdown, a signal,
//!                                                the time limit, an error)
//! ```
//!
//! Owns the state and each vCPU's mailbox; it may touch the vCPU threads only through those
//! mailboxes and a kick (the signal that makes `KVM_RUN` return), and the VM only through a
//! [`GuestClock`]. A request in the wrong state (resume a running VM, pause a paused one, anything
//! but `state` once stopped) is refused with a [`LifecycleError::WrongState`] naming the state;
//! nothing changes.
//!
//! **How a pause works.** The controller posts `Pause` to every vCPU's mailbox and raises the
//! vCPU's `pending` flag (one atomic load on the exit path, the same cost as the stop flag it
//! replaced), then kicks every vCPU that has not answered, every millisecond, until each has
//! answered `Paused`: the kick takes it out of `KVM_RUN`, it sees the flag, reads its mailbox and
//! parks, blocked on the mailbox, until `Resume` or `Stop`. Every command carries a sequence
//! number and its answers echo it, so an answer that comes after its command was given up on is
//! ignored. Once every vCPU is parked, guest time is frozen: the VM's kvmclock is read
//! (`KVM_GET_CLOCK`) and written back at the resume (`KVM_SET_CLOCK`), so a guest on kvmclock
//! does not see the pause (as Cloud Hypervisor does). The guest's raw TSC keeps counting, as on
//! every KVM VMM.
//!
//! **What a pause does not stop**: device workers (virtio) finish the requests already in their
//! queues and may raise interrupts, which the guest takes at the resume. (A snapshot refuses a
//! VM with such devices for now: see `snapshot`.)
//!
//! **Snapshots.** Only from `Paused`: [`Lifecycle::save_vcpus`] posts `Save` to every parked
//! vCPU, which reads its own state on its thread (the closure its run loop hands to
//! [`VcpuMailbox::handle`]) and answers with it; the VM stays paused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl VmState {
    pub fn name(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        }
    }
}

/// A message to one vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Leave `KVM_RUN` and park until `Resume` or `Stop`.
    Pause,
    /// Go on (a no-op for a running vCPU).
    Resume,
    /// Leave the run loop; the thread ends.
    Stop,
    /// (Parked only) answer with this vCPU's state, for a snapshot; stay parked.
    Save,
}

/// A vCPU's saved state (opaque here: `snapshot::vcpu::VcpuState`), or why it could not be read.
pub type SavedVcpu = Result<Box<dyn std::any::Any + Send>, String>;

/// What a vCPU does to answer `Save`.
pub type SaveFn<'a> = &'a mut dyn FnMut() -> SavedVcpu;

/// A vCPU's answer: its id, the command's sequence number, and what it did (with its state,
/// for `Save`).
#[derive(Debug)]
pub struct VcpuAck {
    pub id: u8,
    pub seq: u64,
    pub command: VcpuCommand,
    pub saved: Option<SavedVcpu>,
}

/// Why a lifecycle request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The request does not apply in this state (an API client's mistake: HTTP 400).
    #[error("cannot {op} a VM that is {}", .state.name())]
    WrongState { op: &'static str, state: VmState },
    /// The VM could not do it (a vCPU did not answer, KVM refused): HTTP 500.
    #[error("{0}")]
    Failed(String),
}

/// The VM's clock, frozen while the VM is paused.
pub trait GuestClock: Send + Sync {
    /// Reads the guest's clock (ns), to be written back at the resume.
    fn freeze(&self) -> Result<u64, String>;
    /// Sets the guest's clock back to what `freeze` read.
    fn thaw(&self, ns: u64) -> Result<(), String>;
}

/// kvmclock through `KVM_GET_CLOCK` / `KVM_SET_CLOCK`.
pub struct KvmClock(pub Arc<kvm_ioctls::VmFd>);

impl GuestClock for KvmClock {
    fn freeze(&self) -> Result<u64, String> {
        self.0
            .get_clock()
            .map(|c| c.clock)
            .map_err(|e| format!("KVM_GET_CLOCK: {e}"))
    }

    fn thaw(&self, ns: u64) -> Result<(), String> {
        let data = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.0
            .set_clock(&data)
            .map_err(|e| format!("KVM_SET_CLOCK: {e}"))
    }
}

/// One vCPU's end of the lifecycle: its mailbox, its flag and where it answers.
pub struct VcpuMailbox {
    pub id: u8,
    pending: Arc<AtomicBool>,
    commands: mpsc::Receiver<(u64, VcpuCommand)>,
    acks: mpsc::Sender<VcpuAck>,
}

/// What a vCPU does after reading its mailbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Run,
    Stop,
}

impl VcpuMailbox {
    /// The exit path's check: is there a command? (one atomic load)
    #[inline]
    pub fn has_mail(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Reads the mailbox; on `Pause` answers and parks until `Resume` (answered) or `Stop`,
    /// answering `Save` with what `save` reads.
    pub fn handle(&self, save: SaveFn) -> Next {
        self.pending.store(false, Ordering::Release);
        while let Ok((seq, cmd)) = self.commands.try_recv() {
            if self.obey(seq, cmd, save) == Next::Stop {
                return Next::Stop;
            }
        }
        Next::Run
    }

    fn obey(&self, seq: u64, cmd: VcpuCommand, save: SaveFn) -> Next {
        match cmd {
            VcpuCommand::Stop => Next::Stop,
            VcpuCommand::Resume => {
                self.ack(seq, cmd, None);
                Next::Run
            }
            VcpuCommand::Pause => {
                self.ack(seq, cmd, None);
                self.park(save)
            }
            VcpuCommand::Save => {
                // Only a parked vCPU's state is whole; the controller sends `Save` only then.
                self.ack(seq, cmd, Some(Err("the vCPU is not parked".into())));
                Next::Run
            }
        }
    }

    /// Blocks on the mailbox (a kick's signal does not wake it for good) until told to go on.
    fn park(&self, save: SaveFn) -> Next {
        loop {
            match self.commands.recv() {
                Err(_) | Ok((_, VcpuCommand::Stop)) => return Next::Stop,
                Ok((seq, VcpuCommand::Resume)) => {
                    self.pending.store(false, Ordering::Release);
                    self.ack(seq, VcpuCommand::Resume, None);
                    return Next::Run;
                }
                Ok((seq, VcpuCommand::Pause)) => self.ack(seq, VcpuCommand::Pause, None),
                Ok((seq, VcpuCommand::Save)) => self.ack(seq, VcpuCommand::Save, Some(save())),
            }
        }
    }

    fn ack(&self, seq: u64, command: VcpuCommand, saved: Option<SavedVcpu>) {
        let _ = self.acks.send(VcpuAck {
            id: self.id,
            seq,
            command,
            saved,
        });
    }
}

/// The controller's end of one vCPU.
struct VcpuLink {
    pending: Arc<AtomicBool>,
    commands: mpsc::Sender<(u64, VcpuCommand)>,
}

/// Kicks vCPU `id` out of `KVM_RUN`.
pub type Kick = Box<dyn Fn(usize) + Send + Sync>;

/// How long a pause waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

struct Inner {
    state: VmState,
    seq: u64,
    /// The guest clock read at the pause.
    frozen_clock: Option<u64>,
    paused_at: Option<Instant>,
    /// Total time spent paused.
    paused_total: Duration,
}

/// The VM's state and the controller of its vCPUs (shared by the main thread and the API).
pub struct Lifecycle {
    inner: Mutex<Inner>,
    links: Vec<VcpuLink>,
    acks: Mutex<mpsc::Receiver<VcpuAck>>,
    kick: Mutex<Option<Kick>>,
    clock: Option<Box<dyn GuestClock>>,
}

impl Lifecycle {
    /// A lifecycle for `vcpus` vCPUs and their mailboxes (one each, in id order).
    pub fn new(vcpus: u8, clock: Option<Box<dyn GuestClock>>) -> (Arc<Self>, Vec<VcpuMailbox>) {
        let (ack_tx, ack_rx) = mpsc::channel();
        let mut links = Vec::new();
        let mut boxes = Vec::new();
        for id in 0..vcpus {
            let pending = Arc::new(AtomicBool::new(false));
            let (tx, rx) = mpsc::channel();
            links.push(VcpuLink {
                pending: pending.clone(),
                commands: tx,
            });
            boxes.push(VcpuMailbox {
                id,
                pending,
                commands: rx,
                acks: ack_tx.clone(),
            });
        }
        let lc = Lifecycle {
            inner: Mutex::new(Inner {
                state: VmState::Created,
                seq: 0,
                frozen_clock: None,
                paused_at: None,
                paused_total: Duration::ZERO,
            }),
            links,
            acks: Mutex::new(ack_rx),
            kick: Mutex::new(None),
            clock,
        };
        (Arc::new(lc), boxes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Time spent paused so far (the current pause included).
    pub fn paused_for(&self) -> Duration {
        let i = self.lock();
        i.paused_total + i.paused_at.map(|t| t.elapsed()).unwrap_or_default()
    }

    /// The vCPU threads run: `kick` takes vCPU `id` out of `KVM_RUN`. Created -> Running.
    pub fn started(&self, kick: Kick) -> Result<(), LifecycleError> {
        let mut i = self.lock();
        expect(&i, "start", VmState::Created)?;
        *self.kick.lock().unwrap_or_else(|p| p.into_inner()) = Some(kick);
        i.state = VmState::Running;
        Ok(())
    }

    /// Before the vCPU threads start (Created): each will park before its first `KVM_RUN`
    /// (a VM restored paused). [`Lifecycle::started_held`] then waits for them.
    pub fn hold_at_start(&self) -> Result<(), LifecycleError> {
        let mut i = self.lock();
        expect(&i, "start paused", VmState::Created)?;
        i.seq += 1;
        for link in &self.links {
            let _ = link.commands.send((i.seq, VcpuCommand::Pause));
            link.pending.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Created -> Paused, after [`Lifecycle::hold_at_start`]: waits until every vCPU has parked.
    pub fn started_held(&self, kick: Kick) -> Result<(), LifecycleError> {
        let mut i = self.lock();
        expect(&i, "start", VmState::Created)?;
        *self.kick.lock().unwrap_or_else(|p| p.into_inner()) = Some(kick);
        let seq = i.seq;
        self.wait_all(seq, VcpuCommand::Pause, PAUSE_TIMEOUT)?;
        i.frozen_clock = match &self.clock {
            Some(c) => Some(c.freeze().map_err(LifecycleError::Failed)?),
            None => None,
        };
        i.paused_at = Some(Instant::now());
        i.state = VmState::Paused;
        Ok(())
    }

    /// Running -> Paused: every vCPU parked, the guest clock frozen.
    pub fn pause(&self) -> Result<(), LifecycleError> {
        let mut i = self.lock();
        expect(&i, "pause", VmState::Running)?;
        i.seq += 1;
        let seq = i.seq;
        if let Err(e) = self.command_all(seq, VcpuCommand::Pause, PAUSE_TIMEOUT) {
            // Whoever parked goes on; the VM stays running.
            i.seq += 1;
            let _ = self.command_all(i.seq, VcpuCommand::Resume, PAUSE_TIMEOUT);
            return Err(e);
        }
        i.frozen_clock = match &self.clock {
            Some(c) => Some(c.freeze().map_err(LifecycleError::Failed)?),
            None => None,
        };
        i.paused_at = Some(Instant::now());
        i.state = VmState::Paused;
        Ok(())
    }

    /// Paused -> Running: the guest clock set back to where it stopped, every vCPU on.
    pub fn resume(&self) -> Result<(), LifecycleError> {
        let mut i = self.lock();
        expect(&i, "resume", VmState::Paused)?;
        if let (Some(c), Some(ns)) = (&self.clock, i.frozen_clock) {
            c.thaw(ns).map_err(LifecycleError::Failed)?;
        }
        i.seq += 1;
        let seq = i.seq;
        self.command_all(seq, VcpuCommand::Resume, PAUSE_TIMEOUT)?;
        if let Some(t) = i.paused_at.take() {
            i.paused_total += t.elapsed();
        }
        i.frozen_clock = None;
        i.state = VmState::Running;
        Ok(())
    }

    /// The guest clock the pause froze (Paused only): what a snapshot saves as kvmclock.
    pub fn frozen_clock(&self) -> Result<u64, LifecycleError> {
        let i = self.lock();
        expect(&i, "snapshot", VmState::Paused)?;
        i.frozen_clock
            .ok_or_else(|| LifecycleError::Failed("this VM has no guest clock to save".into()))
    }

    /// Paused: every vCPU's state, read on its thread, in id order. The VM stays paused.
    pub fn save_vcpus(&self) -> Result<Vec<Box<dyn std::any::Any + Send>>, LifecycleError> {
        let mut i = self.lock();
        expect(&i, "snapshot", VmState::Paused)?;
        i.seq += 1;
        let seq = i.seq;
        let saved = self.command_all(seq, VcpuCommand::Save, PAUSE_TIMEOUT)?;
        saved
            .into_iter()
            .enumerate()
            .map(|(id, s)| match s {
                Some(Ok(b)) => Ok(b),
                Some(Err(e)) => Err(LifecycleError::Failed(format!("vCPU {id}: {e}"))),
                None => Err(LifecycleError::Failed(format!("vCPU {id} sent no state"))),
            })
            .collect()
    }

    /// Any state -> Stopped: every vCPU is told to leave its loop (the caller kicks and joins).
    /// Returns the state it was in.
    pub fn stop(&self) -> VmState {
        let mut i = self.lock();
        let was = i.state;
        i.seq += 1;
        for link in &self.links {
            let _ = link.commands.send((i.seq, VcpuCommand::Stop));
            link.pending.store(true, Ordering::Release);
        }
        if let Some(t) = i.paused_at.take() {
            i.paused_total += t.elapsed();
        }
        i.state = VmState::Stopped;
        was
    }

    /// Posts `cmd` to every vCPU and waits (kicking those that have not answered, every
    /// millisecond) until each has answered it, or `timeout`. Returns what each sent with its
    /// answer (their states, for `Save`).
    fn command_all(
        &self,
        seq: u64,
        cmd: VcpuCommand,
        timeout: Duration,
    ) -> Result<Vec<Option<SavedVcpu>>, LifecycleError> {
        // Posted to every vCPU even when one has ended, so that none is left parked.
        let mut ended = Vec::new();
        for (id, link) in self.links.iter().enumerate() {
            if link.commands.send((seq, cmd)).is_err() {
                ended.push(id);
            }
            link.pending.store(true, Ordering::Release);
        }
        if !ended.is_empty() {
            return Err(LifecycleError::Failed(format!(
                "vCPU(s) {ended:?} have ended (the VM is stopping)"
            )));
        }
        self.wait_all(seq, cmd, timeout)
    }

    /// Waits (kicking those that have not answered a `Pause`, every millisecond) until every
    /// vCPU has answered `cmd` numbered `seq`, or `timeout`.
    fn wait_all(
        &self,
        seq: u64,
        cmd: VcpuCommand,
        timeout: Duration,
    ) -> Result<Vec<Option<SavedVcpu>>, LifecycleError> {
        let mut waiting: Vec<bool> = vec![true; self.links.len()];
        let mut saved: Vec<Option<SavedVcpu>> = (0..self.links.len()).map(|_| None).collect();
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let kick = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        while waiting.iter().any(|w| *w) {
            if cmd == VcpuCommand::Pause {
                if let Some(k) = kick.as_ref() {
                    waiting
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| **w)
                        .for_each(|(id, _)| k(id));
                }
            }
            match acks.recv_timeout(Duration::from_millis(1)) {
                Ok(a) if a.seq == seq && a.command == cmd => {
                    waiting[usize::from(a.id)] = false;
                    saved[usize::from(a.id)] = a.saved;
                }
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(LifecycleError::Failed("every vCPU has ended".into()))
                }
            }
            if Instant::now() >= deadline {
                let late: Vec<usize> = (0..waiting.len()).filter(|&i| waiting[i]).collect();
                return Err(LifecycleError::Failed(format!(
                    "vCPU(s) {late:?} did not answer {cmd:?} within {timeout:?}"
                )));
            }
        }
        Ok(saved)
    }
}

fn expect(i: &Inner, op: &'static str, want: VmState) -> Result<(), LifecycleError> {
    if i.state == want {
        Ok(())
    } else {
        Err(LifecycleError::WrongState { op, state: i.state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A vCPU thread without KVM: "runs" (counts) until its mailbox says otherwise.
    fn fake_vcpu(mb: VcpuMailbox, work: Arc<AtomicU64>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || loop {
            if mb.has_mail() && mb.handle(&mut || Ok(Box::new(u32::from(mb.id)))) == Next::Stop {
                return;
            }
            work.fetch_add(1, Ordering::Relaxed);
            std::thread::yield_now();
        })
    }

    struct FakeClock(AtomicU64, Mutex<Vec<u64>>);
    impl GuestClock for FakeClock {
        fn freeze(&self) -> Result<u64, String> {
            Ok(self.0.fetch_add(1000, Ordering::SeqCst))
        }
        fn thaw(&self, ns: u64) -> Result<(), String> {
            self.1.lock().unwrap().push(ns);
            Ok(())
        }
    }

    #[test]
    fn every_transition_allowed_and_refused() {
        let clock = Arc::new(FakeClock(AtomicU64::new(5000), Mutex::new(vec![])));
        struct Shared(Arc<FakeClock>);
        impl GuestClock for Shared {
            fn freeze(&self) -> Result<u64, String> {
                self.0.freeze()
            }
            fn thaw(&self, ns: u64) -> Result<(), String> {
                self.0.thaw(ns)
            }
        }
        let (lc, boxes) = Lifecycle::new(3, Some(Box::new(Shared(clock.clone()))));
        let work = Arc::new(AtomicU64::new(0));
        let wrong = |op, state| Err(LifecycleError::WrongState { op, state });
        assert_eq!(lc.state(), VmState::Created);
        assert_eq!(lc.pause(), wrong("pause", VmState::Created));
        assert_eq!(lc.resume(), wrong("resume", VmState::Created));
        let threads: Vec<_> = boxes
            .into_iter()
            .map(|b| fake_vcpu(b, work.clone()))
            .collect();
        lc.started(Box::new(|_| {})).unwrap();
        assert_eq!(lc.state(), VmState::Running);
        assert!(lc.started(Box::new(|_| {})).is_err());
        assert_eq!(lc.resume(), wrong("resume", VmState::Running));
        lc.pause().unwrap();
        assert_eq!(lc.state(), VmState::Paused);
        // Every fake vCPU is parked: no work is done while paused.
        let before = work.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(work.load(Ordering::SeqCst), before);
        assert_eq!(lc.pause(), wrong("pause", VmState::Paused));
        // A snapshot's vCPU states: one from each parked vCPU, in id order; still paused.
        let ids: Vec<u32> = lc
            .save_vcpus()
            .unwrap()
            .into_iter()
            .map(|b| *b.downcast::<u32>().unwrap())
            .collect();
        assert_eq!(ids, [0, 1, 2]);
        assert_eq!(lc.frozen_clock(), Ok(5000));
        assert_eq!(lc.state(), VmState::Paused);
        assert_eq!(work.load(Ordering::SeqCst), before);
        lc.resume().unwrap();
        assert!(matches!(
            lc.save_vcpus(),
            Err(LifecycleError::WrongState { op: "snapshot", .. })
        ));
        assert_eq!(
            *clock.1.lock().unwrap(),
            vec![5000],
            "the frozen clock written back"
        );
        while work.load(Ordering::SeqCst) == before {
            std::thread::yield_now();
        }
        assert_eq!(lc.state(), VmState::Running);
        lc.pause().unwrap();
        assert_eq!(lc.stop(), VmState::Paused);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(lc.state(), VmState::Stopped);
        assert_eq!(lc.pause(), wrong("pause", VmState::Stopped));
        assert_eq!(lc.resume(), wrong("resume", VmState::Stopped));
        assert_eq!(
            lc.resume().unwrap_err().to_string(),
            "cannot resume a VM that is stopped"
        );
    }

    #[test]
    fn a_vcpu_that_never_parks_fails_the_pause_and_the_vm_stays_running() {
        let (lc, mut boxes) = Lifecycle::new(2, None);
        let work = Arc::new(AtomicU64::new(0));
        let ok = fake_vcpu(boxes.remove(0), work);
        let stuck = boxes.remove(0); // never reads its mailbox
        lc.started(Box::new(|_| {})).unwrap();
        let e = lc
            .command_all(99, VcpuCommand::Pause, Duration::from_millis(30))
            .unwrap_err();
        assert!(e.to_string().contains("[1]"), "{e}");
        // The real pause gives up the same way (with its own longer timeout, not waited here):
        // the healthy vCPU is resumed and the state is unchanged.
        lc.command_all(100, VcpuCommand::Resume, Duration::from_millis(30))
            .unwrap_err();
        assert_eq!(lc.state(), VmState::Running);
        lc.stop();
        ok.join().unwrap();
        drop(stuck);
    }

    #[test]
    fn a_pause_after_a_vcpu_ended_fails_and_leaves_no_vcpu_parked() {
        let (lc, mut boxes) = Lifecycle::new(2, None);
        drop(boxes.remove(0)); // vCPU 0's thread has ended
        let other = fake_vcpu(boxes.remove(0), Arc::new(AtomicU64::new(0)));
        lc.started(Box::new(|_| {})).unwrap();
        let e = lc.pause().unwrap_err();
        assert!(e.to_string().contains("[0] have ended"), "{e}");
        assert_eq!(lc.state(), VmState::Running);
        // vCPU 1 was told to pause and then to resume, and answered both: it is not parked.
        let acks = lc.acks.lock().unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let a = acks.recv_timeout(Duration::from_secs(60)).unwrap();
            seen.push((a.id, a.command));
        }
        drop(acks);
        assert_eq!(
            seen,
            [(1, VcpuCommand::Pause), (1, VcpuCommand::Resume)],
            "{seen:?}"
        );
        lc.stop();
        other.join().unwrap();
    }
}
