//! What the mirror reports about itself.

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::batch::ResyncReason;
use super::decode::DecodeFailure;
use super::error::FailureKind;

/// The mirror's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Listing the prefix for the first time (nothing is served yet), or catching
    /// up right after.
    Syncing,
    /// Watching and caught up with the server revision seen when the watch was
    /// created: snapshots follow etcd.
    Ready,
    /// The watch was lost; resuming (or relisting, or catching up on what was
    /// missed). The last snapshot is served.
    Reconnecting,
    /// Serving a snapshot loaded from the snapshot file, etcd not reached (or not
    /// caught up with) yet.
    Stale,
    /// Failing for a reason retries are unlikely to fix (e.g. permission denied);
    /// the last snapshot is served and retries go on.
    Degraded,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Syncing => "syncing",
            State::Ready => "ready",
            State::Reconnecting => "reconnecting",
            State::Stale => "stale",
            State::Degraded => "degraded",
        })
    }
}

/// Why a watch was resumed (without relisting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReconnectCause {
    /// The stream failed or could not be opened.
    StreamError,
    /// The server closed the stream.
    StreamClosed,
    /// Nothing arrived within the stall timeout.
    Stall,
    /// The server canceled the watch (other than for compaction).
    Canceled,
    /// A response failed validation before anything from it was applied.
    Validation,
}

impl ReconnectCause {
    /// A short lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ReconnectCause::StreamError => "stream_error",
            ReconnectCause::StreamClosed => "stream_closed",
            ReconnectCause::Stall => "stall",
            ReconnectCause::Canceled => "canceled",
            ReconnectCause::Validation => "validation",
        }
    }
}

/// The last error the mirror met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastError {
    /// Its class.
    pub kind: FailureKind,
    /// Its text.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// A list of the prefix in progress, updated at every page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListProgress {
    /// Why the mirror lists: [`ResyncReason::InitialList`], [`ResyncReason::Compacted`]
    /// or [`ResyncReason::Validation`].
    pub reason: ResyncReason,
    /// The revision every page is read at (the first page's).
    pub revision: i64,
    /// Keys received so far.
    pub keys_listed: u64,
    /// Keys in the whole prefix at `revision`, as the first page counted them.
    pub total: u64,
    /// Pages received so far.
    pub pages: u32,
    /// When the list began (before its first page was asked for).
    pub started_at: SystemTime,
}

impl ListProgress {
    /// The progress of a list for `reason` that began at `started_at`, once its
    /// first page, read at `revision`, counted `total` keys in the prefix.
    pub fn new(reason: ResyncReason, revision: i64, total: u64, started_at: SystemTime) -> Self {
        ListProgress {
            reason,
            revision,
            keys_listed: 0,
            total,
            pages: 0,
            started_at,
        }
    }

    /// Records a page of `keys` keys.
    pub(crate) fn page(&mut self, keys: u64) {
        self.keys_listed += keys;
        self.pages = self.pages.saturating_add(1);
    }
}

/// The snapshot file a mirror started from ([`Status::loaded_snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadedSnapshot {
    /// Its revision: where the watch resumed (unless compaction had passed it).
    pub revision: i64,
    /// When it was written.
    pub written_at: SystemTime,
}

/// A point-in-time report, from [`Mirror::status`](super::Mirror::status).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// The state.
    pub state: State,
    /// Revision of the published snapshot.
    pub revision: i64,
    /// Highest revision seen in any server response header.
    pub server_revision: i64,
    /// Last time an event was applied or a bookmark advanced the revision.
    pub last_event_at: Option<SystemTime>,
    /// The last error, cleared when a watch is established again.
    pub last_error: Option<LastError>,
    /// The failure of the latest attempt to list or to open a watch, while no
    /// attempt has succeeded since: what [`Mirror::wait_ready`](super::Mirror::wait_ready)
    /// reports.
    pub failing: Option<LastError>,
    /// Endpoint of the current watch stream.
    pub endpoint: Option<String>,
    /// Watch resumptions, by cause.
    pub reconnects: BTreeMap<ReconnectCause, u64>,
    /// Relists, by cause ([`ResyncReason::Compacted`] or
    /// [`ResyncReason::Validation`]); the initial list is not counted.
    pub relists: BTreeMap<ResyncReason, u64>,
    /// Responses rejected by validation (also counted in `reconnects` or `relists`).
    pub rejected_responses: u64,
    /// Progress replies not used as bookmarks when they came: below the applied
    /// revision, before the watch caught up, or awaiting verification.
    pub untrusted_progress: u64,
    /// Stalls of streams whose creation the server answered but none of whose progress
    /// requests, while the same endpoint still answered a read sent at the stall: the
    /// mark of etcd 3.4's grpc-proxy when etcd sends no periodic progress notifications.
    /// A stall whose endpoint answered no read either (a connection or member gone
    /// silent) is not counted, and its message does not name the proxy.
    pub unanswered_progress_stalls: u64,
    /// Keys whose current value failed to decode (at most
    /// `max_reported_decode_failures`).
    pub decode_failures: Vec<DecodeFailure>,
    /// Number of keys currently failing to decode.
    pub decode_failure_count: usize,
    /// The snapshot file the mirror started from, if it loaded one.
    pub loaded_snapshot: Option<LoadedSnapshot>,
    /// Keys in the published snapshot.
    pub keys: usize,
    /// The list in progress, if the mirror is listing: set at the first page,
    /// updated (waking [`Mirror::status_changes`](super::Mirror::status_changes)
    /// receivers) at every page, cleared once the list is published or failed.
    pub listing: Option<ListProgress>,
}

impl Status {
    /// A report in `state` with nothing recorded yet (revision 0, no counts): how a
    /// mirror starts, and a base for tests of code that reads statuses.
    pub fn new(state: State) -> Self {
        Status {
            state,
            revision: 0,
            server_revision: 0,
            last_event_at: None,
            last_error: None,
            failing: None,
            endpoint: None,
            reconnects: BTreeMap::new(),
            relists: BTreeMap::new(),
            rejected_responses: 0,
            untrusted_progress: 0,
            unanswered_progress_stalls: 0,
            decode_failures: Vec::new(),
            decode_failure_count: 0,
            loaded_snapshot: None,
            keys: 0,
            listing: None,
        }
    }

    /// Server revision minus published revision (0 when unknown).
    pub fn lag(&self) -> i64 {
        (self.server_revision - self.revision).max(0)
    }
}
