//! Server configuration and limits.

use std::path::PathBuf;
use std::time::Duration;

/// Limits that protect the server from oversized or abusive requests.
///
/// Hitting any of them yields an etcd-style error for that request only; the server keeps
/// serving everyone else. Start from [`Limits::default`] (etcd's defaults) and change the
/// fields you need; more may be added without a breaking change.
///
/// ```
/// let mut limits = revwatch_server::Limits::default();
/// limits.max_txn_ops = 16;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest accepted request, in bytes (etcd's `--max-request-bytes`, default 1.5 MiB).
    /// Larger requests fail with InvalidArgument "etcdserver: request is too large".
    pub max_request_bytes: usize,
    /// Most operations in one txn branch (etcd's `--max-txn-ops`, default 128).
    pub max_txn_ops: usize,
    /// Largest accepted value in a put, in bytes. etcd has no separate value limit, so the
    /// default equals `max_request_bytes`.
    pub max_value_bytes: usize,
    /// Most watchers open at once across all streams. A create beyond it is refused in-band
    /// (created and canceled, with a cancel reason), like etcd's other create errors.
    pub max_watchers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        const MAX_REQUEST_BYTES: usize = 1536 * 1024;
        Self {
            max_request_bytes: MAX_REQUEST_BYTES,
            max_txn_ops: 128,
            max_value_bytes: MAX_REQUEST_BYTES,
            max_watchers: 100_000,
        }
    }
}

/// Compaction the server does by itself, like etcd's `--auto-compaction-mode` and
/// `--auto-compaction-retention`.
///
/// The server keeps its whole history in memory until a compaction, so a long-running
/// server that nobody compacts grows without bound; this bounds it.
///
/// ```
/// use std::time::Duration;
/// use revwatch_server::AutoCompaction;
///
/// // etcd's flags, read as etcd reads them: a bare number is hours in periodic mode.
/// let auto = AutoCompaction::from_etcd_flags("periodic", "1")?;
/// assert_eq!(auto, Some(AutoCompaction::periodic(Duration::from_secs(3600))));
/// assert_eq!(
///     AutoCompaction::from_etcd_flags("revision", "1000")?,
///     Some(AutoCompaction::revisions(1000)),
/// );
/// // A zero retention turns it off.
/// assert_eq!(AutoCompaction::from_etcd_flags("periodic", "0s")?, None);
/// # Ok::<(), revwatch_server::AutoCompactionError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// etcd's periodic mode: keeps about `retention` of history. The current revision is
    /// sampled every tenth of `retention` (of an hour, when `retention` is longer);
    /// once `retention` has passed, the server compacts at the revision sampled
    /// `retention` ago, and again every `retention` (at most every hour).
    Periodic {
        /// How long history is kept. Zero turns auto-compaction off.
        retention: Duration,
    },
    /// etcd's revision mode: every `interval`, the server compacts at the current
    /// revision minus `retention`.
    Revision {
        /// Revisions kept. 0 turns auto-compaction off, as in etcd.
        retention: u64,
        /// How often to compact (etcd 3.4: every 5 minutes); at least 10 ms.
        interval: Duration,
    },
}

/// The shortest period of the server's own timers: a zero interval would make them spin.
pub(crate) const MIN_TIMER: Duration = Duration::from_millis(10);

/// The longest: a century, so that adding it to an instant cannot overflow.
const MAX_TIMER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `period` as one of the server's timer periods, between [`MIN_TIMER`] and a century.
pub(crate) fn timer_period(period: Duration) -> Duration {
    period.clamp(MIN_TIMER, MAX_TIMER)
}

impl AutoCompaction {
    /// etcd's default `--auto-compaction-mode`.
    pub const DEFAULT_MODE: &'static str = "periodic";
    /// etcd's default `--auto-compaction-retention`: off.
    pub const DEFAULT_RETENTION: &'static str = "0";

    /// Keeps `retention` revisions, compacting every 5 minutes as etcd 3.4 does.
    pub fn revisions(retention: u64) -> Self {
        Self::Revision {
            retention,
            interval: Duration::from_secs(300),
        }
    }

    /// Keeps about `retention` of history (etcd's periodic mode).
    pub fn periodic(retention: Duration) -> Self {
        Self::Periodic { retention }
    }

    /// Reads etcd's `--auto-compaction-mode` (`periodic`, etcd's default, or `revision`)
    /// and `--auto-compaction-retention` the way etcd 3.4 does: in periodic mode a
    /// whole number is hours and anything else a Go duration (`30m`, `1h30m`, `1.5h`);
    /// in revision mode it is a revision count. `None` when the retention is zero,
    /// which turns auto-compaction off.
    pub fn from_etcd_flags(
        mode: &str,
        retention: &str,
    ) -> Result<Option<Self>, AutoCompactionError> {
        let bad = |reason: &str| AutoCompactionError::Retention {
            mode: mode.to_owned(),
            value: retention.to_owned(),
            reason: reason.to_owned(),
        };
        let auto = match mode {
            "periodic" => {
                let retention = match retention.parse::<u64>() {
                    Ok(hours) => hours
                        .checked_mul(3600)
                        .map(Duration::from_secs)
                        .ok_or_else(|| bad("too many hours"))?,
                    Err(_) => {
                        let nanos = go_parse_duration::parse_duration(retention).map_err(|_| {
                            bad("expected hours or a duration such as 30m or 1h30m")
                        })?;
                        let nanos = u64::try_from(nanos).map_err(|_| bad("negative duration"))?;
                        Duration::from_nanos(nanos)
                    }
                };
                (!retention.is_zero()).then_some(Self::periodic(retention))
            }
            "revision" => {
                let revisions = retention
                    .parse::<u64>()
                    .map_err(|_| bad("expected a whole number of revisions"))?;
                (revisions > 0).then_some(Self::revisions(revisions))
            }
            _ => return Err(AutoCompactionError::Mode(mode.to_owned())),
        };
        Ok(auto)
    }
}

/// Why etcd-style auto-compaction flags were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutoCompactionError {
    /// The mode is neither `periodic` nor `revision`.
    #[error("unknown auto-compaction mode {0:?} (expected \"periodic\" or \"revision\")")]
    Mode(String),
    /// The retention does not fit the mode.
    #[error("bad auto-compaction retention {value:?} for {mode} mode: {reason}")]
    Retention {
        mode: String,
        value: String,
        reason: String,
    },
}

/// Everything [`Server::open`](crate::Server::open) needs.
///
/// Start from [`ServerConfig::new`] (etcd's defaults) and change what you need with the
/// `with_*` setters or the fields; more settings may be added without a breaking change.
///
/// ```
/// use std::time::Duration;
/// use revwatch_server::{AutoCompaction, ServerConfig};
///
/// let config = ServerConfig::new("/tmp/revwatch-data")
///     .with_name("mirror-test")
///     .with_auto_compaction(Some(AutoCompaction::revisions(1000)))
///     .with_progress_notify_interval(Duration::from_secs(1));
/// assert_eq!(config.min_lease_ttl, 2);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Directory holding the database file. Created if missing.
    pub data_dir: PathBuf,
    /// Member name reported by MemberList (etcd's `--name`, default "default").
    pub name: String,
    /// Request limits.
    pub limits: Limits,
    /// Interval of the periodic progress notification sent to watchers created with
    /// `progress_notify` (etcd's `--experimental-watch-progress-notify-interval`, default 10 min);
    /// at least 10 ms.
    pub progress_notify_interval: Duration,
    /// Minimum lease TTL in seconds; shorter grants are raised to it (etcd's default is 2).
    pub min_lease_ttl: i64,
    /// How often expired leases are looked for.
    pub lease_check_interval: Duration,
    /// How long logged writes may wait before they are copied into the database file
    /// (etcd's backend batch interval, 100 ms). Durability never waits for it: a write
    /// is acknowledged once its log record is fsynced.
    pub checkpoint_interval: Duration,
    /// Compaction without a client asking for it; none by default, as in etcd.
    pub auto_compaction: Option<AutoCompaction>,
}

impl ServerConfig {
    /// A configuration with etcd's defaults, storing data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            name: "default".to_owned(),
            limits: Limits::default(),
            progress_notify_interval: Duration::from_secs(600),
            min_lease_ttl: 2,
            lease_check_interval: Duration::from_millis(250),
            checkpoint_interval: Duration::from_millis(100),
            auto_compaction: None,
        }
    }

    /// Sets [`name`](Self::name).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets [`limits`](Self::limits).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets [`progress_notify_interval`](Self::progress_notify_interval).
    pub fn with_progress_notify_interval(mut self, interval: Duration) -> Self {
        self.progress_notify_interval = interval;
        self
    }

    /// Sets [`min_lease_ttl`](Self::min_lease_ttl), in seconds.
    pub fn with_min_lease_ttl(mut self, seconds: i64) -> Self {
        self.min_lease_ttl = seconds;
        self
    }

    /// Sets [`lease_check_interval`](Self::lease_check_interval).
    pub fn with_lease_check_interval(mut self, interval: Duration) -> Self {
        self.lease_check_interval = interval;
        self
    }

    /// Sets [`checkpoint_interval`](Self::checkpoint_interval).
    pub fn with_checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// Sets [`auto_compaction`](Self::auto_compaction); `None` turns it off.
    pub fn with_auto_compaction(mut self, auto_compaction: Option<AutoCompaction>) -> Self {
        self.auto_compaction = auto_compaction;
        self
    }

    /// This configuration with every timer period where the server's timers can take it:
    /// periods at least [`MIN_TIMER`] (a zero one would spin, and tokio refuses it) and
    /// at most a century (so that adding one to an instant cannot overflow). The
    /// checkpoint interval may stay zero: it is a delay, not a period.
    pub(crate) fn with_timers_in_range(mut self) -> Self {
        self.progress_notify_interval = timer_period(self.progress_notify_interval);
        self.lease_check_interval = timer_period(self.lease_check_interval);
        self.checkpoint_interval = self.checkpoint_interval.min(MAX_TIMER);
        if let Some(AutoCompaction::Revision { interval, .. }) = &mut self.auto_compaction {
            *interval = timer_period(*interval);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(mode: &str, retention: &str) -> Result<Option<AutoCompaction>, AutoCompactionError> {
        AutoCompaction::from_etcd_flags(mode, retention)
    }

    #[test]
    fn periodic_retention_is_hours_or_a_go_duration() {
        let periodic = |secs| Ok(Some(AutoCompaction::periodic(Duration::from_secs(secs))));
        assert_eq!(flags("periodic", "1"), periodic(3600));
        assert_eq!(flags("periodic", "30m"), periodic(1800));
        assert_eq!(flags("periodic", "1.5h"), periodic(5400));
        assert_eq!(flags("periodic", "1h30m"), periodic(5400));
        assert_eq!(flags("periodic", "0"), Ok(None));
        assert_eq!(flags("periodic", "0s"), Ok(None));
        for bad in ["-1", "-5m", "abc", "", "1x"] {
            let err = flags("periodic", bad).expect_err(bad).to_string();
            assert!(err.contains("for periodic mode"), "{bad}: {err}");
        }
    }

    #[test]
    fn timer_periods_are_brought_in_range_once_at_intake() {
        let century = Duration::from_secs(100 * 365 * 24 * 3600);
        let revision = |interval| {
            Some(AutoCompaction::Revision {
                retention: 1,
                interval,
            })
        };
        // Every timer set to `d`, then brought in range.
        let all = |d| {
            ServerConfig::new("d")
                .with_progress_notify_interval(d)
                .with_lease_check_interval(d)
                .with_checkpoint_interval(d)
                .with_auto_compaction(revision(d))
                .with_timers_in_range()
        };
        let zero = all(Duration::ZERO);
        assert_eq!(zero.progress_notify_interval, MIN_TIMER);
        assert_eq!(zero.lease_check_interval, MIN_TIMER);
        assert_eq!(
            zero.checkpoint_interval,
            Duration::ZERO,
            "a delay may be zero"
        );
        assert_eq!(zero.auto_compaction, revision(MIN_TIMER));
        let huge = all(Duration::MAX);
        assert_eq!(huge.progress_notify_interval, century);
        assert_eq!(huge.lease_check_interval, century);
        assert_eq!(huge.checkpoint_interval, century);
        assert_eq!(huge.auto_compaction, revision(century));
        // Settings in range are left alone.
        let defaults = ServerConfig::new("d");
        let kept = defaults.clone().with_timers_in_range();
        assert_eq!(
            (
                kept.progress_notify_interval,
                kept.lease_check_interval,
                kept.checkpoint_interval
            ),
            (
                defaults.progress_notify_interval,
                defaults.lease_check_interval,
                defaults.checkpoint_interval
            )
        );
    }

    #[test]
    fn revision_retention_is_a_count() {
        assert_eq!(
            flags("revision", "1000"),
            Ok(Some(AutoCompaction::revisions(1000)))
        );
        assert_eq!(flags("revision", "0"), Ok(None));
        for bad in ["10m", "-3", "1.5", ""] {
            let err = flags("revision", bad).expect_err(bad).to_string();
            assert!(err.contains("for revision mode"), "{bad}: {err}");
        }
        assert_eq!(
            flags("Revision", "1"),
            Err(AutoCompactionError::Mode("Revision".into()))
        );
    }
}
