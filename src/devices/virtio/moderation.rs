//! Interrupt moderation: when a virtqueue's used-buffer interrupt is sent, given that the driver
//! wants one (EVENT_IDX's `used_event`, or no `VRING_AVAIL_F_NO_INTERRUPT`). Owns only the timing
//! decision; the queue (`queue::Vq`) asks it and sends the interrupt, the worker (`worker`) wakes
//! it when a deferred interrupt is due. Pure logic on `Instant`s so that it is unit-tested here.
//!
//! # Why
//! Every interrupt into a vCPU costs at least one exit on a host without posted interrupts
//! (AVIC/APICv), and on the ELI thesis's baseline 2.1–2.5. EVENT_IDX already spares interrupts
//! while a driver polls (NAPI); moderation spares those a busy stream still asks for, by holding
//! one back for a few microseconds so that it covers several used buffers.
//!
//! # Two sources of parameters
//! - **The driver** (virtio-net `VIRTIO_NET_F_NOTF_COAL`, i.e. `ethtool -C`): `max_usecs` and
//!   `max_packets`. An interrupt the driver wants is sent once `max_packets` buffers have been used
//!   since the first one it is owed for, or `max_usecs` after that first one, whichever comes
//!   first; `max_usecs == 0` means at once (and so do `max_packets` 1 with any time). Set values
//!   take precedence over the device's mode; all zero gives the queue back to the device's mode.
//! - **The device** (`coalesce=adaptive[:T]` on `--net` and `--disk`): a rate cap of T µs that
//!   applies itself only where it pays. An interrupt wanted more than T after the last one is
//!   sent at once (a sparse or request–response driver pays nothing). One wanted sooner starts a
//!   *hold* window (T/4 at first): the interrupt waits for the window's end. A window that ended
//!   with two or more buffers used doubles (up to T); one that ended with a single buffer (the
//!   driver was waiting for exactly that one: a request–response exchange) halves, and below
//!   [`MIN_HOLD`] holding stops for [`COOLDOWN`] interrupts before it is tried again, so a
//!   latency-bound driver pays a few µs on a few percent of its interrupts at most.
//!   `coalesce=off` sends every wanted interrupt at once (EVENT_IDX alone).
//!
//! # Bounds (a hostile or careless driver)
//! Whatever the driver programs, an owed interrupt is sent at most [`MAX_DRIVER_USECS`] after the
//! first buffer it covers (`max_usecs` is clamped; `max_packets == 0` means no packet limit, the
//! clamped time still holds), and in adaptive mode at most T after it, or at once when
//! [`BURST`] buffers are waiting (so that a receive ring never runs dry behind a held interrupt).
//! Nothing here stops the device from using buffers; only the interrupt waits.

use std::time::{Duration, Instant};

/// The longest a driver's `max_usecs` may hold an interrupt (10 ms; larger values are clamped).
pub const MAX_DRIVER_USECS: u32 = 10_000;
/// The device's default adaptive cap, in µs (see `Coalesce`).
pub const DEFAULT_CAP_US: u32 = 32;
/// The largest adaptive cap an option may ask for, in µs (above the thesis's 96 µs sweep, below a
/// timer tick).
pub const MAX_CAP_US: u32 = 1000;
/// A hold window shorter than this is not worth a timer: holding stops.
pub const MIN_HOLD: Duration = Duration::from_micros(2);
/// Interrupts sent at once after holding stopped, before holding is tried again.
pub const COOLDOWN: u32 = 32;
/// Buffers used behind a held interrupt that send it at once (adaptive mode).
pub const BURST: u32 = 64;

/// The device's own moderation mode (`coalesce=` on `--net` and `--disk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Coalesce {
    /// Every interrupt the driver wants is sent at once.
    Off,
    /// Rate cap of `cap_us` µs, applied only while holding pays (see the module doc).
    Adaptive { cap_us: u32 },
}

impl Default for Coalesce {
    fn default() -> Self {
        Coalesce::Adaptive {
            cap_us: DEFAULT_CAP_US,
        }
    }
}

impl Coalesce {
    /// `off`, `adaptive` or `adaptive:T` (T in µs, 1..=[`MAX_CAP_US`]).
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "coalesce={s:?}: expected off, adaptive or adaptive:T (T in µs, 1..={MAX_CAP_US})"
            )
        };
        match s.split_once(':') {
            None if s == "off" => Ok(Coalesce::Off),
            None if s == "adaptive" => Ok(Coalesce::default()),
            Some(("adaptive", t)) => match t.parse::<u32>() {
                Ok(cap_us @ 1..=MAX_CAP_US) => Ok(Coalesce::Adaptive { cap_us }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Coalesce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Coalesce::Off => write!(f, "off"),
            Coalesce::Adaptive { cap_us } => write!(f, "adaptive:{cap_us}"),
        }
    }
}

/// One queue's moderation state.
#[derive(Debug)]
pub struct Moderator {
    mode: Coalesce,
    /// The driver's `max_usecs` (clamped) and `max_packets`; (0, 0): not set.
    driver: (u32, u32),
    /// Buffers used since the first one an interrupt is owed for (0: none owed).
    owed: u32,
    first: Option<Instant>,
    deadline: Option<Instant>,
    last_sent: Option<Instant>,
    /// Adaptive: the current hold window (zero: send at once) and the interrupts left to send at
    /// once before holding is tried again.
    hold: Duration,
    cooldown: u32,
    /// Interrupts sent, and how many of them had been held.
    pub sent: u64,
    pub held: u64,
    /// Held interrupts the driver no longer wanted at their deadline (not sent).
    pub cancelled: u64,
}

impl Default for Moderator {
    fn default() -> Self {
        Moderator::new(Coalesce::Off)
    }
}

impl Moderator {
    pub fn new(mode: Coalesce) -> Self {
        Moderator {
            mode,
            driver: (0, 0),
            owed: 0,
            first: None,
            deadline: None,
            last_sent: None,
            hold: Duration::ZERO,
            cooldown: 0,
            sent: 0,
            held: 0,
            cancelled: 0,
        }
    }

    /// The driver's `VIRTIO_NET_CTRL_NOTF_COAL_*_SET` values (any u32 is accepted; see the bounds
    /// in the module doc). An interrupt held meanwhile keeps its deadline, which was bounded too.
    pub fn set_driver(&mut self, max_usecs: u32, max_packets: u32) {
        self.driver = (max_usecs.min(MAX_DRIVER_USECS), max_packets);
    }

    pub fn driver(&self) -> (u32, u32) {
        self.driver
    }

    /// When the held interrupt is due, if one is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// `n` buffers were just used (published) at `now`; `wanted` says whether the driver asked
    /// for an interrupt among them. True: send the interrupt now.
    pub fn used(&mut self, now: Instant, n: u32, wanted: bool) -> bool {
        if self.owed == 0 && !wanted {
            return false;
        }
        if self.owed == 0 {
            self.first = Some(now);
        }
        self.owed = self.owed.saturating_add(n.max(1));
        let first = self.first.unwrap_or(now);
        let send_now = match (self.driver, self.mode) {
            ((0, 0), Coalesce::Off) => true,
            ((0, 0), Coalesce::Adaptive { cap_us }) => self.adaptive(now, first, cap_us),
            ((usecs, packets), _) => {
                if usecs == 0 || (packets != 0 && self.owed >= packets) {
                    true
                } else {
                    self.deadline = Some(first + Duration::from_micros(u64::from(usecs)));
                    false
                }
            }
        };
        if send_now {
            self.sent_at(now);
        }
        send_now
    }

    /// Adaptive mode's decision for an owed interrupt (sets the deadline when it holds).
    fn adaptive(&mut self, now: Instant, first: Instant, cap_us: u32) -> bool {
        let cap = Duration::from_micros(u64::from(cap_us));
        if self.owed >= BURST {
            return true;
        }
        if self.hold.is_zero() {
            let soon = self.last_sent.is_some_and(|t| now.duration_since(t) < cap);
            if !soon || self.cooldown > 0 {
                return true;
            }
            self.hold = (cap / 4).max(MIN_HOLD);
        }
        let d = first + self.hold;
        if d <= now {
            return true;
        }
        self.deadline = Some(d);
        false
    }

    /// The worker's check: true if the held interrupt is due at `now` (it counts as sent).
    pub fn due(&mut self, now: Instant) -> bool {
        match self.deadline {
            Some(d) if d <= now => {
                self.sent_at(now);
                true
            }
            _ => false,
        }
    }

    /// The held interrupt is dropped at its deadline: the driver no longer wants it (it took the
    /// buffers itself and turned interrupts off). In adaptive mode holding paid (an interrupt
    /// saved), so the window grows as after a batch.
    pub fn cancel(&mut self, now: Instant) {
        if self.deadline.is_none() {
            return;
        }
        self.owed = self.owed.max(2);
        if self.driver == (0, 0) {
            self.learn();
        }
        self.owed = 0;
        self.first = None;
        self.deadline = None;
        self.last_sent = Some(now);
        self.cancelled += 1;
    }

    /// Bookkeeping for an interrupt sent at `now`; adaptive mode learns from a held one.
    fn sent_at(&mut self, now: Instant) {
        let was_held = self.deadline.is_some();
        if was_held {
            self.held += 1;
            if self.driver == (0, 0) {
                self.learn();
            }
        } else {
            self.cooldown = self.cooldown.saturating_sub(1);
        }
        self.sent += 1;
        self.owed = 0;
        self.first = None;
        self.deadline = None;
        self.last_sent = Some(now);
    }

    fn learn(&mut self) {
        let Coalesce::Adaptive { cap_us } = self.mode else {
            return;
        };
        let cap = Duration::from_micros(u64::from(cap_us));
        if self.owed >= 2 {
            self.hold = (self.hold * 2).min(cap);
        } else {
            self.hold /= 2;
            if self.hold < MIN_HOLD {
                self.hold = Duration::ZERO;
                self.cooldown = COOLDOWN;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn parses_the_option_and_refuses_nonsense() {
        assert_eq!(Coalesce::parse("off").unwrap(), Coalesce::Off);
        assert_eq!(Coalesce::parse("adaptive").unwrap(), Coalesce::default());
        assert_eq!(
            Coalesce::parse("adaptive:96").unwrap(),
            Coalesce::Adaptive { cap_us: 96 }
        );
        for bad in [
            "",
            "on",
            "adaptive:",
            "adaptive:0",
            "adaptive:1001",
            "adaptive:-1",
            "x:5",
        ] {
            assert!(Coalesce::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Coalesce::Adaptive { cap_us: 16 }.to_string(), "adaptive:16");
    }

    #[test]
    fn off_sends_what_the_driver_wants_and_nothing_else() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Off);
        assert!(!m.used(t, 3, false), "not wanted: no interrupt");
        assert!(m.used(t, 1, true));
        assert!(m.used(t + us(1), 1, true));
        assert_eq!(m.deadline(), None);
        assert_eq!((m.sent, m.held), (2, 0));
    }

    #[test]
    fn driver_values_hold_until_packets_or_time() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Off);
        m.set_driver(100, 4);
        assert!(!m.used(t, 1, true));
        assert_eq!(m.deadline(), Some(t + us(100)));
        // Later buffers count toward the owed interrupt even when not "wanted" on their own.
        assert!(!m.used(t + us(10), 2, false));
        assert!(m.used(t + us(20), 1, false), "fourth packet sends it");
        assert_eq!(m.deadline(), None);
        // The time bound: one packet, then the deadline.
        assert!(!m.used(t + us(200), 1, true));
        assert!(!m.due(t + us(299)));
        assert!(m.due(t + us(300)));
        assert!(!m.due(t + us(301)), "sent once");
        assert_eq!((m.sent, m.held), (2, 2));
        // usecs 0 means at once; max_packets 1 too.
        m.set_driver(0, 8);
        assert!(m.used(t + us(400), 1, true));
        m.set_driver(50, 1);
        assert!(m.used(t + us(500), 1, true));
        // All zero: back to the device's mode.
        m.set_driver(0, 0);
        assert!(m.used(t + us(600), 1, true));
    }

    #[test]
    fn hostile_driver_values_are_bounded() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Off);
        // Huge usecs and no packet limit: held at most MAX_DRIVER_USECS.
        m.set_driver(u32::MAX, 0);
        assert_eq!(m.driver(), (MAX_DRIVER_USECS, 0));
        assert!(!m.used(t, u32::MAX, true), "owed count saturates, no panic");
        assert!(!m.used(t + us(1), u32::MAX, true));
        assert_eq!(
            m.deadline(),
            Some(t + Duration::from_micros(u64::from(MAX_DRIVER_USECS)))
        );
        assert!(m.due(t + Duration::from_millis(10)));
        // Huge packets and zero usecs: at once.
        m.set_driver(0, u32::MAX);
        assert!(m.used(t + Duration::from_millis(20), 1, true));
    }

    #[test]
    fn adaptive_sends_sparse_interrupts_at_once() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Adaptive { cap_us: 32 });
        for i in 0..10 {
            assert!(m.used(t + us(100 * i), 1, true), "interval 100 µs > cap");
        }
        assert_eq!(m.held, 0);
    }

    #[test]
    fn adaptive_holds_a_stream_and_grows_to_the_cap() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Adaptive { cap_us: 32 });
        assert!(m.used(t, 1, true));
        // Wanted 5 µs later: too soon, hold T/4 = 8 µs from now.
        let mut now = t + us(5);
        assert!(!m.used(now, 1, true));
        assert_eq!(m.deadline(), Some(now + us(8)));
        assert!(!m.used(now + us(3), 1, false));
        assert!(m.due(now + us(8)));
        // It covered two buffers: the window doubles, and again up to the cap.
        for want in [16, 32, 32] {
            now += us(10);
            assert!(!m.used(now, 1, true));
            assert_eq!(m.deadline(), Some(now + us(want)));
            assert!(!m.used(now + us(1), 1, false));
            assert!(m.due(now + us(want)));
        }
        // A held interrupt the driver no longer wants is dropped, and the window stays.
        now += us(40);
        assert!(!m.used(now, 1, true));
        m.cancel(now + us(32));
        assert_eq!((m.cancelled, m.deadline()), (1, None));
        now += us(40);
        assert!(!m.used(now, 1, true));
        assert_eq!(m.deadline(), Some(now + us(32)));
        assert!(m.due(now + us(32)));
        // A burst sends it before the window ends.
        now += us(40);
        assert!(!m.used(now, 1, true));
        assert!(m.used(now + us(1), BURST, false));
    }

    #[test]
    fn adaptive_backs_off_for_request_response() {
        let t = Instant::now();
        let mut m = Moderator::new(Coalesce::Adaptive { cap_us: 32 });
        let mut now = t;
        assert!(m.used(now, 1, true));
        // Each held interrupt covers one buffer: 8, 4, 2 µs, then holding stops.
        let mut held_for = Duration::ZERO;
        for _ in 0..3 {
            now += us(10);
            if !m.used(now, 1, true) {
                let d = m.deadline().unwrap();
                held_for += d - now;
                now = d;
                assert!(m.due(now));
            }
        }
        assert_eq!(held_for, us(8 + 4 + 2));
        // Cooling down: COOLDOWN interrupts at once despite the short intervals.
        for _ in 0..COOLDOWN {
            now += us(10);
            assert!(m.used(now, 1, true));
        }
        // Then it tries again.
        now += us(10);
        assert!(!m.used(now, 1, true));
    }
}
