//! Rate limits on warnings a guest can trigger (BAR moves, PM writes, queue and device errors):
//! a guest must not be able to flood the host's stderr.
//!
//! Owns one counter per kind of warning (a static name). The first [`BURST`] warnings of a kind
//! are shown; after that they are counted, and at most one line per [`INTERVAL`] shows the latest
//! with how many were suppressed since the last line. [`flush`], at the end of a run, says how
//! many were suppressed after the last such line. Use [`warn_limited!`](crate::warn_limited).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Warnings of one kind always shown.
pub const BURST: u32 = 10;
/// At most one line per kind in this long once past the burst.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What to do with one warning.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Show,
    Hide,
    /// Show it, with how many were hidden before it.
    ShowAfter(u64),
}

/// One kind's counts.
#[derive(Default)]
struct Kind {
    shown: u32,
    hidden: u64,
    /// When the last line past the burst was shown (or the first was hidden).
    since: Option<Instant>,
}

impl Kind {
    fn admit(&mut self, now: Instant) -> Admit {
        if self.shown < BURST {
            self.shown += 1;
            return Admit::Show;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < INTERVAL {
            self.hidden += 1;
            return Admit::Hide;
        }
        self.since = Some(now);
        Admit::ShowAfter(std::mem::take(&mut self.hidden))
    }
}

static KINDS: Mutex<BTreeMap<&'static str, Kind>> = Mutex::new(BTreeMap::new());

/// Whether a warning of `kind` is shown now.
pub fn admit(kind: &'static str) -> Admit {
    admit_at(kind, Instant::now())
}

fn admit_at(kind: &'static str, now: Instant) -> Admit {
    let mut k = KINDS.lock().unwrap_or_else(|p| p.into_inner());
    k.entry(kind).or_default().admit(now)
}

/// Says, per kind, how many warnings were suppressed since the last line (end of a run).
pub fn flush() {
    let mut k = KINDS.lock().unwrap_or_else(|p| p.into_inner());
    for (kind, c) in k.iter_mut() {
        let n = std::mem::take(&mut c.hidden);
        if n > 0 {
            log::warn!("{n} more warnings of kind {kind} were suppressed (rate limit)");
        }
    }
}

/// `log::warn!` under the rate limit of `kind` (see the module doc).
#[macro_export]
macro_rules! warn_limited {
    ($kind:expr, $($arg:tt)+) => {
        match $crate::ratelimit::admit($kind) {
            $crate::ratelimit::Admit::Show => log::warn!($($arg)+),
            $crate::ratelimit::Admit::Hide => {}
            $crate::ratelimit::Admit::ShowAfter(n) => log::warn!(
                "{} ({n} more like this suppressed before it)",
                format_args!($($arg)+)
            ),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut k = Kind::default();
        for _ in 0..BURST {
            assert_eq!(k.admit(t0), Admit::Show);
        }
        for _ in 0..1000 {
            assert_eq!(k.admit(t0), Admit::Hide);
        }
        let t1 = t0 + INTERVAL;
        assert_eq!(k.admit(t1), Admit::ShowAfter(1000));
        assert_eq!(k.admit(t1 + INTERVAL / 2), Admit::Hide);
        assert_eq!(k.admit(t1 + INTERVAL), Admit::ShowAfter(1));
    }

    #[test]
    fn kinds_are_limited_apart() {
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(admit_at("test-a", t0), Admit::Show);
        }
        assert_eq!(admit_at("test-a", t0), Admit::Hide);
        assert_eq!(admit_at("test-b", t0), Admit::Show);
    }
}
