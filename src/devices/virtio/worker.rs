//! A device's worker thread: an epoll loop over its queues' ioeventfds, a kill eventfd and the
//! device's own file descriptors (tap, sockets). See the threading model in `devices::virtio`.
//!
//! # Adaptive queue polling
//! Between bursts the worker spins on the avail index of the queues its handler lets it poll
//! ([`QueueHandler::polled_queue`]: block requests, network transmit) for a short window, with the
//! driver's notifications left off. A driver that keeps such a queue fed then never notifies:
//! no ioeventfd exit, no wake-up. The window adapts as QEMU's `AioContext` polling does: it grows
//! (from 4 µs, doubling, up to the maximum, `--queue-poll-us`) while the worker, once it blocked,
//! was woken within the maximum, and halves when it waited longer, so an idle or slow driver
//! costs no CPU. A window of 0 (the start, or `--queue-poll-us 0`) is the plain epoll loop.
//! While it polls, the worker also asks the handler for input on its own descriptors
//! ([`QueueHandler::poll_input`]: the tap of virtio-net), so received frames are delivered by the
//! same spin without an epoll wake-up: receive-side polling.
//!
//! # Held interrupts
//! An interrupt that moderation holds back (`moderation`) has a deadline; the worker keeps a
//! one-shot timerfd armed at the earliest one ([`QueueHandler::interrupt_deadline`]), checks it
//! while it spins, and sends what is due ([`QueueHandler::send_due`]) before it blocks and when
//! the timer fires. A timerfd, not an epoll timeout: epoll's is in milliseconds, the holds are
//! microseconds.
//!
//! # Parking (snapshots)
//! A worker stopped by its kill eventfd leaves its handler in the device's [`Parked`] slot. The
//! worker serves requests one whole batch at a time (every chain it took is in the used ring
//! before it looks at the kill eventfd again), so a parked handler has no request half-done: its
//! queues' positions describe everything, and a new worker can go on with it (after a snapshot,
//! or in the VM restored from one).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::irq::Msix;
use super::transport::Shared;
use super::{DeviceStats, QueueHandler};

const KILL: u64 = u64::MAX;
const TIMER: u64 = u64::MAX - 1;
const EXTRA: u64 = 1 << 32;
/// The first window once polling pays off.
const POLL_START: Duration = Duration::from_micros(4);

/// The adaptive poll window (see the module doc).
#[derive(Debug)]
pub struct PollWindow {
    max: Duration,
    now: Duration,
}

impl PollWindow {
    pub fn new(max: Duration) -> Self {
        PollWindow {
            max,
            now: Duration::ZERO,
        }
    }

    pub fn get(&self) -> Duration {
        self.now
    }

    /// The worker blocked and was woken `waited` after its last window began: a wait the
    /// maximum window would have covered grows the window, a longer one halves it.
    pub fn blocked(&mut self, waited: Duration) {
        if self.max.is_zero() || waited <= self.now {
            return;
        }
        if waited > self.max {
            self.now /= 2;
            if self.now < POLL_START {
                self.now = Duration::ZERO;
            }
        } else if self.now < self.max {
            self.now = (self.now * 2).clamp(POLL_START, self.max);
        }
    }
}

/// Where a stopped worker leaves its handler (see the module doc).
pub type Parked = Arc<std::sync::Mutex<Option<Box<dyn QueueHandler>>>>;

/// How a worker tells the driver it stopped on its own: DEVICE_NEEDS_RESET and a
/// configuration-change interrupt.
struct Ending {
    name: String,
    stats: Arc<DeviceStats>,
    shared: Arc<Shared>,
    msix: Arc<Msix>,
}

impl Ending {
    fn failed(&self, why: &str) {
        crate::warn_limited!(
            "virtio-needs-reset",
            "{}: {why}: device needs reset",
            self.name
        );
        self.shared.needs_reset(&self.stats, &self.msix);
    }

    /// A bug in exitless, not the guest's doing: said once per device on stderr, kept for the
    /// report, and the device stops as on any failure while the others keep running.
    fn panicked(&self, msg: String) {
        if self.stats.note_panic(&msg) {
            eprintln!(
                "exitless: {}: device worker panicked: {msg}; the device needs a reset, \
                 the other devices keep running",
                self.name
            );
        }
        self.shared.needs_reset(&self.stats, &self.msix);
    }
}

#[allow(clippy::too_many_arguments)]
pub fn spawn(
    name: String,
    kind: &str,
    mut handler: Box<dyn QueueHandler>,
    queue_evts: Vec<EventFd>,
    kill: EventFd,
    stats: Arc<DeviceStats>,
    shared: Arc<Shared>,
    msix: Arc<Msix>,
    poll_max: Duration,
    parked: Parked,
) -> std::io::Result<JoinHandle<()>> {
    let epoll = Epoll::new()?;
    let add = |fd: RawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(kill.as_raw_fd(), KILL)?;
    let timer = TimerFd::new()?;
    add(timer.as_raw_fd(), TIMER)?;
    for (i, e) in queue_evts.iter().enumerate() {
        add(e.as_raw_fd(), i as u64)?;
    }
    let extra = handler.extra_fds().len();
    for (i, fd) in handler.extra_fds().iter().enumerate() {
        add(*fd, EXTRA + i as u64)?;
    }
    // Through the launcher when seccomp filters are on (see `seccomp`); the worker installs its
    // device kind's filter before it runs.
    crate::seccomp::spawn_worker(name.clone(), kind, move || {
        let end = Ending {
            name,
            stats,
            shared,
            msix,
        };
        let served = crate::panics::catch(|| {
            serve(
                &mut *handler,
                &epoll,
                timer,
                &queue_evts,
                extra,
                &end.stats,
                poll_max,
            )
        });
        match served {
            Ok(Ok(())) => *parked.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler),
            Ok(Err(why)) => end.failed(&why),
            Err(msg) => end.panicked(msg),
        }
    })
}

/// The worker's loop: serves the queues until the kill eventfd fires (`Ok`) or the handler
/// fails (`Err`: the device needs a reset).
fn serve(
    handler: &mut dyn QueueHandler,
    epoll: &Epoll,
    timer: TimerFd,
    queue_evts: &[EventFd],
    extra: usize,
    stats: &DeviceStats,
    poll_max: Duration,
) -> Result<(), String> {
    // Chains made available before DRIVER_OK (or before this thread ran) are served now.
    for q in 0..queue_evts.len() {
        handler.process(q)?;
    }
    let polled: Vec<usize> = (0..queue_evts.len())
        .filter(|&q| handler.polled_queue(q).is_some())
        .collect();
    let mut window = PollWindow::new(if polled.is_empty() {
        Duration::ZERO
    } else {
        poll_max
    });
    let mut events = vec![EpollEvent::default(); 8 + extra];
    let mut polls = 0u64;
    let mut held = HeldInterrupts { timer, armed: None };
    loop {
        let started = Instant::now();
        let mut timeout = -1;
        if !window.get().is_zero() && poll(handler, &polled, window.get())? {
            // Found work: serve it, look at the other descriptors without blocking, and poll
            // again.
            polls += 1;
            stats.set_extra("queue_polls", polls);
            timeout = 0;
        }
        held.send_and_arm(handler)?;
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll: {e}")),
        };
        if timeout < 0 {
            window.blocked(started.elapsed());
        }
        for ev in &events[..n] {
            let token = ev.data();
            if token == KILL {
                handler.park();
                end_polling(handler, &polled);
                record_rings(handler, &polled, stats);
                return Ok(());
            } else if token == TIMER {
                // Expired (epoll said so): the read does not block, and clears the readiness.
                let _ = held.timer.wait();
                held.armed = None;
                handler.send_due(Instant::now());
            } else if token >= EXTRA {
                handler.fd_ready((token - EXTRA) as usize)?;
            } else {
                let q = token as usize;
                if let Ok(c) = queue_evts[q].read() {
                    stats.notifications.fetch_add(c, Ordering::Relaxed);
                }
                handler.process(q)?;
            }
        }
    }
}

/// Polling off and the driver's notifications back on, so that a next worker with this handler
/// (see the module doc) starts from the plain epoll loop with nothing missed: chains made
/// available meanwhile are served by its first look at every queue.
fn end_polling(handler: &mut dyn QueueHandler, polled: &[usize]) {
    for &q in polled {
        if let Some(vq) = handler.polled_queue(q) {
            vq.polling = false;
            vq.enable_notification();
        }
    }
}

/// At the end, each polled queue's ring positions go into the device's facts (`qN_avail`, the
/// driver's avail index; `qN_taken`, the device's next avail; `qN_used`): for a guest that hung
/// waiting on a queue they tell a chain the device never took from a completion it never announced.
fn record_rings(handler: &mut dyn QueueHandler, polled: &[usize], stats: &DeviceStats) {
    const KEYS: [[&str; 3]; 2] = [
        ["q0_avail", "q0_taken", "q0_used"],
        ["q1_avail", "q1_taken", "q1_used"],
    ];
    for &q in polled {
        let (Some(keys), Some(vq)) = (KEYS.get(q), handler.polled_queue(q)) else {
            continue;
        };
        if let Ok(avail) = vq.queue.avail_idx(&vq.mem, Ordering::Acquire) {
            stats.set_extra(keys[0], u64::from(avail.0));
        }
        stats.set_extra(keys[1], u64::from(vq.queue.next_avail()));
        stats.set_extra(keys[2], u64::from(vq.queue.next_used()));
    }
}

/// The one-shot timer of the held interrupts (see the module doc).
struct HeldInterrupts {
    timer: TimerFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
}

impl HeldInterrupts {
    /// Sends the interrupts due now and arms the timer for the next held one (or disarms it).
    fn send_and_arm(&mut self, handler: &mut dyn QueueHandler) -> Result<(), String> {
        let now = Instant::now();
        handler.send_due(now);
        let next = handler.interrupt_deadline();
        if next == self.armed {
            return Ok(());
        }
        let r = match next {
            // Never zero: that would disarm it.
            Some(d) => self.timer.reset(
                d.saturating_duration_since(now)
                    .max(Duration::from_nanos(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        self.armed = next;
        r.map_err(|e| format!("timerfd: {e}"))
    }
}

/// Spins on the `polled` queues for up to `window`, their notifications off. True if chains
/// arrived and were served (notifications stay off: the caller polls again); false if the window
/// passed empty, notifications are then back on (and chains that slipped in meanwhile served).
fn poll(
    handler: &mut dyn QueueHandler,
    polled: &[usize],
    window: Duration,
) -> Result<bool, String> {
    let set = |h: &mut dyn QueueHandler, on: bool| {
        for &q in polled {
            if let Some(vq) = h.polled_queue(q) {
                vq.polling = on;
            }
        }
    };
    set(handler, true);
    let start = Instant::now();
    loop {
        let mut found = handler.poll_input();
        for &q in polled {
            if handler.polled_queue(q).is_some_and(|vq| vq.has_avail()) {
                handler.process(q)?;
                found = true;
            }
        }
        if let Some(d) = handler.interrupt_deadline() {
            let now = Instant::now();
            if d <= now {
                handler.send_due(now);
            }
        }
        if found {
            return Ok(true);
        }
        if start.elapsed() >= window {
            break;
        }
        std::hint::spin_loop();
    }
    set(handler, false);
    for &q in polled {
        // Arm the notification; a chain made available since the last look is served now (the
        // handler re-arms itself when it is done).
        if handler
            .polled_queue(q)
            .is_some_and(|vq| vq.enable_notification())
        {
            handler.process(q)?;
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::testing::{self, DriverQueue, AVAIL, USED};
    use crate::devices::virtio::queue::Vq;
    use vm_memory::{Bytes, GuestAddress};

    /// A device that completes every chain of its one queue, the way the real handlers loop.
    struct Sink {
        vq: Vq,
        served: usize,
    }

    impl QueueHandler for Sink {
        fn process(&mut self, _q: usize) -> Result<(), String> {
            loop {
                self.vq.disable_notification();
                while let Some((head, _)) = self.vq.pop() {
                    self.vq.complete(head, 0);
                    self.served += 1;
                }
                if !self.vq.enable_notification() {
                    return Ok(());
                }
            }
        }
        fn polled_queue(&mut self, _q: usize) -> Option<&mut Vq> {
            Some(&mut self.vq)
        }
    }

    /// The avail_event the device published (EVENT_IDX): the driver notifies once its avail
    /// index passes it.
    fn avail_event(mem: &vm_memory::GuestMemoryMmap, size: u16) -> u16 {
        mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(size)))
            .unwrap()
    }

    #[test]
    fn polling_serves_new_chains_without_asking_for_notifications_and_rearms_when_idle() {
        let mem = testing::memory();
        let mut dq = DriverQueue::new(8);
        let mut h = Sink {
            vq: testing::vq(&mem, &dq, 0, true),
            served: 0,
        };
        h.process(0).unwrap();
        assert_eq!(avail_event(&mem, 8), 0, "armed at the start");
        // The driver adds two chains (it would notify once, crossing avail_event 0): the poll
        // finds them, serves them, and does not re-arm.
        dq.add(&mem, &[(0x8000, 16, false)]);
        dq.add(&mem, &[(0x8100, 16, false)]);
        let polled = [0];
        assert!(poll(&mut h, &polled, Duration::from_secs(5)).unwrap());
        assert_eq!(h.served, 2);
        assert!(h.vq.polling, "still polling");
        assert_eq!(
            avail_event(&mem, 8),
            0,
            "not re-armed: the driver's next chains need no notification"
        );
        // Nothing more: the window passes empty and the queue is armed at its avail index.
        assert!(!poll(&mut h, &polled, Duration::from_micros(50)).unwrap());
        assert!(!h.vq.polling);
        assert_eq!(avail_event(&mem, 8), 2);
        let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(avail_idx, 2);
    }

    #[test]
    fn the_window_grows_while_waits_are_short_and_shrinks_when_they_are_long() {
        let us = Duration::from_micros;
        let mut w = PollWindow::new(us(32));
        assert_eq!(w.get(), Duration::ZERO);
        w.blocked(us(10));
        assert_eq!(w.get(), us(4));
        w.blocked(us(10));
        assert_eq!(w.get(), us(8));
        w.blocked(us(6)); // caught by the window: unchanged
        assert_eq!(w.get(), us(8));
        for _ in 0..5 {
            w.blocked(us(20));
        }
        assert_eq!(w.get(), us(32), "capped at the maximum");
        w.blocked(Duration::from_millis(5));
        assert_eq!(w.get(), us(16));
        w.blocked(Duration::from_millis(5));
        w.blocked(Duration::from_millis(5));
        assert_eq!(w.get(), us(4));
        w.blocked(Duration::from_millis(5));
        assert_eq!(w.get(), Duration::ZERO, "an idle driver costs nothing");
        let mut off = PollWindow::new(Duration::ZERO);
        off.blocked(us(1));
        assert_eq!(off.get(), Duration::ZERO, "polling off stays off");
    }

    /// A device that holds one interrupt 2 ms from its start and records when it is sent.
    struct Holder {
        deadline: Option<Instant>,
        sent: Arc<std::sync::Mutex<Option<Instant>>>,
    }

    impl QueueHandler for Holder {
        fn process(&mut self, _q: usize) -> Result<(), String> {
            if self.deadline.is_none() {
                self.deadline = Some(Instant::now() + Duration::from_millis(2));
            }
            Ok(())
        }
        fn interrupt_deadline(&self) -> Option<Instant> {
            self.deadline
                .filter(|_| self.sent.lock().unwrap().is_none())
        }
        fn send_due(&mut self, now: Instant) {
            if self.deadline.is_some_and(|d| d <= now) {
                self.sent.lock().unwrap().get_or_insert(now);
            }
        }
    }

    #[test]
    fn a_held_interrupt_is_sent_by_the_timer_at_its_deadline() {
        use crate::devices::virtio::irq::NoRoutes;
        use std::sync::atomic::{AtomicU16, AtomicU8};
        let sent = Arc::new(std::sync::Mutex::new(None));
        let started = Instant::now();
        let kill = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let h = spawn(
            "holder".into(),
            "holder",
            Box::new(Holder {
                deadline: None,
                sent: sent.clone(),
            }),
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            kill.try_clone().unwrap(),
            Arc::new(DeviceStats::default()),
            Arc::new(Shared {
                device_status: AtomicU8::new(0),
                config_vector: AtomicU16::new(0),
            }),
            Arc::new(Msix::new(1, Arc::new(NoRoutes::default())).unwrap()),
            Duration::ZERO,
            Parked::default(),
        )
        .unwrap();
        // Nothing else wakes the worker: only its timer can send the interrupt.
        let until = Instant::now() + Duration::from_secs(5);
        while sent.lock().unwrap().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        kill.write(1).unwrap();
        assert!(h.join().is_ok());
        let at = sent.lock().unwrap().expect("the held interrupt was sent");
        assert!(
            at >= started + Duration::from_millis(2),
            "not before its deadline"
        );
    }

    /// A device whose handler panics on its first request (a bug in exitless, by assumption).
    struct Bomb;

    impl QueueHandler for Bomb {
        fn process(&mut self, _q: usize) -> Result<(), String> {
            panic!("bomb went off")
        }
    }

    #[test]
    fn a_panicking_handler_sets_needs_reset_and_raises_a_config_interrupt() {
        use crate::devices::virtio::irq::NoRoutes;
        use std::sync::atomic::{AtomicU16, AtomicU8};
        let stats = Arc::new(DeviceStats::default());
        let shared = Arc::new(Shared {
            device_status: AtomicU8::new(0),
            config_vector: AtomicU16::new(0),
        });
        let msix = Arc::new(Msix::new(1, Arc::new(NoRoutes::default())).unwrap());
        let h = spawn(
            "bomb".into(),
            "bomb",
            Box::new(Bomb),
            vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            stats.clone(),
            shared.clone(),
            msix.clone(),
            Duration::ZERO,
            Parked::default(),
        )
        .unwrap();
        assert!(h.join().is_ok(), "the panic is caught on the worker");
        assert_eq!(shared.device_status.load(Ordering::SeqCst), 0x40);
        assert_eq!(stats.needs_reset.load(Ordering::Relaxed), 1);
        assert_eq!(msix.isr.load(Ordering::SeqCst), 2, "configuration change");
        assert_eq!(
            msix.held.load(Ordering::Relaxed),
            1,
            "vector 0, masked: pending"
        );
        assert_eq!(stats.worker_panics.load(Ordering::Relaxed), 1);
        let msg = stats.first_panic().unwrap();
        assert!(
            msg.starts_with("bomb went off at src/devices/virtio/worker.rs:"),
            "{msg}"
        );
        assert_eq!(stats.facts()["worker_panics"], 1, "in the report");
    }
}
