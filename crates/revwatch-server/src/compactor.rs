//! When to auto-compact, and at which revision: etcd 3.4's revision and periodic
//! compactors as plain state machines over instants and revisions, so the writer thread
//! only asks, and the schedules are tested without a clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::{AutoCompaction, timer_period};

/// The schedule of one [`AutoCompaction`] setting.
#[derive(Debug)]
pub(crate) enum Compactor {
    Revision(RevisionSchedule),
    Periodic(PeriodicSchedule),
}

impl Compactor {
    /// The schedule of `config` (its interval already in range, as
    /// `ServerConfig::with_timers_in_range` leaves it) starting at `now` with `current`
    /// the latest revision; `None` when the retention turns auto-compaction off.
    pub fn new(config: AutoCompaction, now: Instant, current: i64) -> Option<Self> {
        match config {
            AutoCompaction::Revision {
                retention,
                interval,
            } if retention > 0 => Some(Self::Revision(RevisionSchedule {
                retention: i64::try_from(retention).unwrap_or(i64::MAX),
                interval,
                due: now + interval,
            })),
            AutoCompaction::Periodic { retention } if !retention.is_zero() => Some(Self::Periodic(
                PeriodicSchedule::new(retention, now, current),
            )),
            _ => None,
        }
    }

    /// When [`tick`](Self::tick) should next be called.
    pub fn due(&self) -> Instant {
        match self {
            Self::Revision(r) => r.due,
            Self::Periodic(p) => p.due,
        }
    }

    /// Moves the schedule on at `now` (at or after [`due`](Self::due)), `current` being
    /// the latest durable revision; returns the revision to compact at, if it is time.
    /// The caller skips a revision already compacted: etcd counts that as done, too.
    pub fn tick(&mut self, now: Instant, current: i64) -> Option<i64> {
        match self {
            Self::Revision(r) => r.tick(now, current),
            Self::Periodic(p) => p.tick(now, current),
        }
    }
}

/// etcd's revision compactor: every `interval`, the current revision minus `retention`.
#[derive(Debug)]
pub(crate) struct RevisionSchedule {
    retention: i64,
    interval: Duration,
    due: Instant,
}

impl RevisionSchedule {
    fn tick(&mut self, now: Instant, current: i64) -> Option<i64> {
        self.due = now + self.interval;
        Some(current.saturating_sub(self.retention)).filter(|rev| *rev > 0)
    }
}

/// etcd's periodic compactor. It samples the current revision every `sample_every` (a
/// tenth of the retention, or of an hour when the retention is longer) and keeps the
/// samples of the last `retention`. Once `retention` has passed since it started it
/// compacts at the oldest sample, then again whenever `compact_every` (the retention, at
/// most an hour) has passed since the last compaction.
#[derive(Debug)]
pub(crate) struct PeriodicSchedule {
    sample_every: Duration,
    compact_every: Duration,
    /// Revisions sampled, oldest first: at most `retention / sample_every + 1`.
    samples: VecDeque<i64>,
    capacity: usize,
    /// Time since `last` before the next compaction: `retention` for the first one.
    wait: Duration,
    last: Instant,
    due: Instant,
}

impl PeriodicSchedule {
    const HOUR: Duration = Duration::from_secs(3600);

    fn new(retention: Duration, now: Instant, current: i64) -> Self {
        let compact_every = retention.min(Self::HOUR);
        let sample_every = timer_period(compact_every / 10);
        let capacity = usize::try_from(retention.as_nanos() / sample_every.as_nanos())
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let mut samples = VecDeque::with_capacity(capacity.min(1024));
        samples.push_back(current);
        Self {
            sample_every,
            compact_every,
            samples,
            capacity,
            wait: retention,
            last: now,
            due: now + sample_every,
        }
    }

    fn tick(&mut self, now: Instant, current: i64) -> Option<i64> {
        let mut compact_at = None;
        if now.saturating_duration_since(self.last) >= self.wait {
            // Only the first compaction waits the whole retention.
            self.wait = self.compact_every;
            self.last = now;
            compact_at = self.samples.front().copied();
        }
        self.samples.push_back(current);
        if self.samples.len() > self.capacity {
            self.samples.pop_front();
        }
        self.due = now + self.sample_every;
        compact_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MIN_TIMER, ServerConfig};

    /// Drives `c` tick by tick until `until` after `start`, the current revision being
    /// `rev(elapsed)`; returns (elapsed, revision) of every compaction.
    fn run(
        c: &mut Compactor,
        start: Instant,
        until: Duration,
        rev: impl Fn(Duration) -> i64,
    ) -> Vec<(Duration, i64)> {
        let mut out = Vec::new();
        loop {
            let now = c.due();
            let elapsed = now - start;
            if elapsed > until {
                return out;
            }
            if let Some(at) = c.tick(now, rev(elapsed)) {
                out.push((elapsed, at));
            }
        }
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// One revision per millisecond, from revision 1 at the start.
    fn per_ms(elapsed: Duration) -> i64 {
        1 + elapsed.as_millis() as i64
    }

    #[test]
    fn periodic_compacts_each_retention_at_the_revision_sampled_that_long_ago() {
        let start = Instant::now();
        let config = AutoCompaction::periodic(secs(1.0));
        let mut c = Compactor::new(config, start, per_ms(Duration::ZERO)).expect("on");
        let got = run(&mut c, start, secs(3.05), per_ms);
        // Samples every 100 ms; the first compaction, at 1 s, is at the revision sampled
        // at the start; each later one, a second after the previous, at the oldest
        // sample kept: the one taken 1.1 s earlier.
        assert_eq!(
            got,
            vec![(secs(1.0), 1), (secs(2.0), 901), (secs(3.0), 1901)]
        );
    }

    #[test]
    fn periodic_with_a_long_retention_compacts_hourly_and_keeps_the_whole_retention() {
        let start = Instant::now();
        let day = Duration::from_secs(24 * 3600);
        let mut c = Compactor::new(AutoCompaction::periodic(day), start, 1).expect("on");
        // One revision per second.
        let per_s = |e: Duration| 1 + e.as_secs() as i64;
        let got = run(
            &mut c,
            start,
            day + Duration::from_secs(2 * 3600 + 1),
            per_s,
        );
        let hours = |h: u64| Duration::from_secs(h * 3600);
        // Samples every 6 minutes, 241 of them kept (24 h); nothing before a day has
        // passed, then every hour, each at the sample from 24 h 6 min earlier.
        assert_eq!(
            got,
            vec![
                (hours(24), 1),
                (hours(25), 1 + 3600 - 360),
                (hours(26), 1 + 2 * 3600 - 360),
            ]
        );
    }

    #[test]
    fn periodic_samples_no_faster_than_the_timer_floor() {
        let start = Instant::now();
        let mut c = Compactor::new(AutoCompaction::periodic(secs(0.02)), start, 1).expect("on");
        assert_eq!(c.due() - start, MIN_TIMER);
        assert_eq!(c.tick(c.due(), 2), None);
        // 20 ms: the retention has passed; the oldest sample is the start's.
        assert_eq!(c.tick(c.due(), 3), Some(1));
    }

    #[test]
    fn revision_compacts_every_interval_at_current_minus_retention() {
        let start = Instant::now();
        let config = AutoCompaction::Revision {
            retention: 100,
            interval: secs(0.5),
        };
        let mut c = Compactor::new(config, start, 1).expect("on");
        // 50 revisions per interval; at 0.5 s, 51 - 100 leaves nothing to compact.
        let got = run(&mut c, start, secs(2.0), |e| {
            1 + 50 * e.as_millis() as i64 / 500
        });
        assert_eq!(got, vec![(secs(1.0), 1), (secs(1.5), 51), (secs(2.0), 101)]);
    }

    #[test]
    fn zero_retention_is_off_in_both_modes() {
        let now = Instant::now();
        assert!(Compactor::new(AutoCompaction::periodic(Duration::ZERO), now, 1).is_none());
        assert!(Compactor::new(AutoCompaction::revisions(0), now, 1).is_none());
    }

    #[test]
    fn huge_settings_do_not_overflow_the_clock() {
        let now = Instant::now();
        // The longest revision interval the configuration lets through.
        let never = ServerConfig::new("unused")
            .with_auto_compaction(Some(AutoCompaction::Revision {
                retention: u64::MAX,
                interval: Duration::MAX,
            }))
            .with_timers_in_range()
            .auto_compaction
            .expect("set");
        let mut c = Compactor::new(never, now, 1).expect("on");
        assert!(c.due() - now > Duration::from_secs(50 * 365 * 24 * 3600));
        assert_eq!(c.tick(c.due(), i64::MAX), None);
        // A periodic retention is not a timer period: it is taken as it is.
        let mut c = Compactor::new(AutoCompaction::periodic(Duration::MAX), now, 1).expect("on");
        // Sampled every tenth of an hour, compacting only once the retention has passed.
        assert_eq!(c.due() - now, Duration::from_secs(360));
        assert_eq!(c.tick(c.due(), 2), None);
    }
}
