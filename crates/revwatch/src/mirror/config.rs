//! Mirror settings.

use std::path::PathBuf;
use std::time::Duration;

use super::decode::DecodePolicy;
use super::error::MirrorError;
use crate::client::Backoff;

/// How far the mirror trusts a progress reply (`watch_id = -1`) as a bookmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressTrust {
    /// For etcd 3.4 (before 3.4.31) and 3.5 (before 3.5.13), which may answer a
    /// progress request before the stream delivered events up to the reply's
    /// revision (etcd#15220). A reply at R above the applied revision A becomes a
    /// bookmark only once the watch is known to have caught up and a read at R
    /// shows the range exactly as it was at A (no key modified after A, as many
    /// keys). The read costs the server a scan of the range, so it runs when a
    /// reader waits for a revision, and otherwise at most once per
    /// [`MirrorConfig::progress_verify_interval`].
    #[default]
    Confirmed,
    /// For servers that answer progress requests only when the stream is caught up
    /// (fixed etcd, revwatch's server): a reply at or above the last applied
    /// revision is a bookmark at once.
    Immediate,
}

/// Settings of a [`Mirror`](super::Mirror). Start from `MirrorConfig::default()`
/// and change what you need with the `with_*` setters; the fields stay readable
/// and assignable, and new ones can be added without breaking callers.
///
/// ```
/// use std::time::Duration;
/// use revwatch::mirror::MirrorConfig;
///
/// let config = MirrorConfig::default()
///     .with_page_size(500)
///     .with_stall_timeout(Duration::from_secs(5));
/// assert_eq!(config.page_size, 500);
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MirrorConfig {
    /// Keys per page of the initial list and of relists. Default 1000.
    pub page_size: i64,
    /// Silence on the watch stream after which a progress request is sent.
    /// Default 3 s.
    pub progress_interval: Duration,
    /// Silence (no event, no progress reply) after which the stream is considered
    /// dead and the watch resumes elsewhere: the bound on detecting a frozen member
    /// or a blackholed connection. Default 10 s.
    pub stall_timeout: Duration,
    /// Updates queued per subscriber before it is marked lagging. Default 1024.
    pub subscriber_buffer: usize,
    /// What to do with a value that fails to decode.
    pub decode_policy: DecodePolicy,
    /// Delay between failed attempts to list or watch.
    pub retry_backoff: Backoff,
    /// How progress replies are trusted.
    pub progress_trust: ProgressTrust,
    /// Least time between two reads that verify a progress reply no reader is
    /// waiting for ([`ProgressTrust::Confirmed`]): how soon a quiet range's
    /// revision (and so its lag and resume point) follows the server's. A reader
    /// waiting for a revision has its reply verified at once. Default 10 s.
    pub progress_verify_interval: Duration,
    /// How long after its creation a watch that had history to catch up on (and
    /// delivered neither an event nor a bookmark at or above its creation
    /// revision) is assumed caught up: for trusting progress replies
    /// ([`ProgressTrust::Confirmed`]), for readiness, and for re-checking that
    /// compaction did not reach its start. etcd syncs lagging watchers every
    /// 100 ms. Default 1 s.
    pub catch_up_grace: Duration,
    /// Snapshot file to load at start and to keep written. Default none.
    pub snapshot_file: Option<PathBuf>,
    /// Least time between two snapshot file writes. Default 5 s.
    pub snapshot_interval: Duration,
    /// Most failing keys listed in [`Status::decode_failures`](super::Status)
    /// (all are counted). Default 100.
    pub max_reported_decode_failures: usize,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            page_size: 1000,
            progress_interval: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(10),
            subscriber_buffer: 1024,
            decode_policy: DecodePolicy::default(),
            retry_backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            progress_trust: ProgressTrust::default(),
            progress_verify_interval: Duration::from_secs(10),
            catch_up_grace: Duration::from_secs(1),
            snapshot_file: None,
            snapshot_interval: Duration::from_secs(5),
            max_reported_decode_failures: 100,
        }
    }
}

impl MirrorConfig {
    /// Sets [`page_size`](Self::page_size).
    pub fn with_page_size(mut self, page_size: i64) -> Self {
        self.page_size = page_size;
        self
    }

    /// Sets [`progress_interval`](Self::progress_interval).
    pub fn with_progress_interval(mut self, progress_interval: Duration) -> Self {
        self.progress_interval = progress_interval;
        self
    }

    /// Sets [`stall_timeout`](Self::stall_timeout).
    pub fn with_stall_timeout(mut self, stall_timeout: Duration) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }

    /// Sets [`subscriber_buffer`](Self::subscriber_buffer).
    pub fn with_subscriber_buffer(mut self, subscriber_buffer: usize) -> Self {
        self.subscriber_buffer = subscriber_buffer;
        self
    }

    /// Sets [`decode_policy`](Self::decode_policy).
    pub fn with_decode_policy(mut self, decode_policy: DecodePolicy) -> Self {
        self.decode_policy = decode_policy;
        self
    }

    /// Sets [`retry_backoff`](Self::retry_backoff).
    pub fn with_retry_backoff(mut self, retry_backoff: Backoff) -> Self {
        self.retry_backoff = retry_backoff;
        self
    }

    /// Sets [`progress_trust`](Self::progress_trust).
    pub fn with_progress_trust(mut self, progress_trust: ProgressTrust) -> Self {
        self.progress_trust = progress_trust;
        self
    }

    /// Sets [`progress_verify_interval`](Self::progress_verify_interval).
    pub fn with_progress_verify_interval(mut self, interval: Duration) -> Self {
        self.progress_verify_interval = interval;
        self
    }

    /// Sets [`catch_up_grace`](Self::catch_up_grace).
    pub fn with_catch_up_grace(mut self, catch_up_grace: Duration) -> Self {
        self.catch_up_grace = catch_up_grace;
        self
    }

    /// Sets [`snapshot_file`](Self::snapshot_file): a path, or `None` for no file.
    pub fn with_snapshot_file(mut self, path: impl Into<Option<PathBuf>>) -> Self {
        self.snapshot_file = path.into();
        self
    }

    /// Sets [`snapshot_interval`](Self::snapshot_interval).
    pub fn with_snapshot_interval(mut self, snapshot_interval: Duration) -> Self {
        self.snapshot_interval = snapshot_interval;
        self
    }

    /// Sets [`max_reported_decode_failures`](Self::max_reported_decode_failures).
    pub fn with_max_reported_decode_failures(
        mut self,
        max_reported_decode_failures: usize,
    ) -> Self {
        self.max_reported_decode_failures = max_reported_decode_failures;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), MirrorError> {
        let bad = |msg: String| Err(MirrorError::InvalidConfig(msg));
        if self.page_size <= 0 {
            return bad(format!(
                "page_size must be positive, got {}",
                self.page_size
            ));
        }
        if self.progress_interval.is_zero() || self.stall_timeout <= self.progress_interval {
            return bad(format!(
                "need 0 < progress_interval < stall_timeout, got {:?} and {:?}",
                self.progress_interval, self.stall_timeout
            ));
        }
        if self.subscriber_buffer == 0 {
            return bad("subscriber_buffer must be positive".into());
        }
        // The client's own check: the same bounds, and the same message.
        self.retry_backoff
            .validate("retry_backoff")
            .map_err(|e| MirrorError::InvalidConfig(e.to_string()))
    }
}
