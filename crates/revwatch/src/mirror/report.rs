//! What the mirror reports about itself: one method per event, each updating
//! [`Status`] and [`Metrics`] together, so that no caller needs to know which
//! fields an event touches or in which order.
//!
//! Two kinds of status update:
//! - events a watcher of [`Mirror::status_changes`](super::Mirror::status_changes)
//!   cares about (state, errors, reconnects, relists, rejections, the reported
//!   decode failures) wake its receivers;
//! - a list's progress wakes them at every page (a list is rare, its pages few:
//!   a progress bar can follow it without polling);
//! - the live figures (revisions, keys, counts of untrusted replies and stalls)
//!   are updated silently: [`Mirror::status`](super::Mirror::status) reads them.
//!
//! [`Reporter::published`] runs once a snapshot is current and before anyone
//! waiting for its revision is woken (the hub calls it at that point), so that a
//! status read after `snapshot_at_least` returns is at least as new.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::batch::ResyncReason;
use super::decode::DecodeFailure;
use super::error::FailureKind;
use super::metrics::{CauseLabel, Metrics, Verification};
use super::status::{LastError, ListProgress, ReconnectCause, State, Status};

/// What replies told about the server.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Heard {
    /// The highest header revision (0: none).
    pub(crate) server_revision: i64,
    /// Progress replies not (yet) trusted as bookmarks.
    pub(crate) untrusted_progress: u64,
}

impl Heard {
    /// Adds what one more reply told.
    pub(crate) fn add(&mut self, header_revision: i64, untrusted_progress: bool) {
        self.server_revision = self.server_revision.max(header_revision);
        self.untrusted_progress += u64::from(untrusted_progress);
    }
}

/// A published snapshot, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Published {
    pub(crate) revision: i64,
    pub(crate) keys: usize,
    /// The events and revisions applied since the previous publication; `None`
    /// for a list or a bookmark.
    pub(crate) applied: Option<(u64, u64)>,
    /// Decode errors since the previous publication.
    pub(crate) new_decode_failures: u64,
    /// Keys currently failing to decode.
    pub(crate) decode_failure_count: usize,
}

/// Why a response was rejected, as counted in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejected {
    /// A watch response that failed validation before anything from it was applied.
    Header,
    /// A watch event that failed validation or could not be applied.
    Event,
    /// A listed page.
    List,
}

impl Rejected {
    fn as_str(self) -> &'static str {
        match self {
            Rejected::Header => "header",
            Rejected::Event => "event",
            Rejected::List => "list",
        }
    }
}

/// The state a failure leaves the mirror in: degraded for failures retries are
/// unlikely to fix; otherwise reconnecting once it has been ready, stale while
/// it serves a loaded snapshot file, syncing before anything was served.
pub(crate) fn state_after_failure(kind: FailureKind, ever_ready: bool, loaded: bool) -> State {
    match kind {
        FailureKind::PermissionDenied | FailureKind::Auth => State::Degraded,
        _ if ever_ready => State::Reconnecting,
        _ if loaded => State::Stale,
        _ => State::Syncing,
    }
}

/// Status and metrics of one mirror. Cheap to clone: clones report to the same
/// status and metrics.
#[derive(Clone, Debug)]
pub(crate) struct Reporter {
    status: Arc<watch::Sender<Status>>,
    metrics: Metrics,
}

impl Reporter {
    pub(crate) fn new(status: Status, metrics: Metrics) -> Self {
        metrics.revision.set(status.revision);
        Reporter {
            status: Arc::new(watch::channel(status).0),
            metrics,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The current status.
    pub(crate) fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of the status, woken by the events that matter to a watcher.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Replies told `heard`: counts untrusted progress replies and raises the
    /// server revision (and the lag) in one status update, so that a status
    /// showing the revision of an untrusted reply also counts the reply.
    pub(crate) fn heard(&self, heard: Heard) {
        let Heard {
            server_revision,
            untrusted_progress,
        } = heard;
        if untrusted_progress > 0 {
            Metrics::inc_cause_by(
                &self.metrics.rejected_responses,
                "untrusted_progress",
                untrusted_progress,
            );
        }
        self.status.send_if_modified(|s| {
            s.untrusted_progress += untrusted_progress;
            if server_revision > s.server_revision {
                s.server_revision = server_revision;
                self.metrics.server_revision.set(server_revision);
                self.metrics.lag.set(s.lag());
            }
            false
        });
    }

    /// The server said its revision is at least `revision`.
    pub(crate) fn server_revision(&self, revision: i64) {
        self.heard(Heard {
            server_revision: revision,
            untrusted_progress: 0,
        });
    }

    /// A snapshot was made current. `decode_failures` lists the failing keys to
    /// report; it is called only when that list changed (a new failure, or a key
    /// that recovered or vanished), and only then are receivers woken.
    pub(crate) fn published(
        &self,
        published: Published,
        decode_failures: impl FnOnce() -> Vec<DecodeFailure>,
    ) {
        let Published {
            revision,
            keys,
            applied,
            new_decode_failures,
            decode_failure_count,
        } = published;
        self.metrics.revision.set(revision);
        if let Some((events, revisions)) = applied {
            self.metrics.events_applied.inc_by(events);
            self.metrics.revisions_applied.inc_by(revisions);
        }
        if new_decode_failures > 0 {
            self.metrics.decode_errors.inc_by(new_decode_failures);
        }
        self.status.send_if_modified(|s| {
            s.revision = revision;
            s.keys = keys;
            s.last_event_at = Some(SystemTime::now());
            self.metrics.lag.set(s.lag());
            let changed = new_decode_failures > 0 || decode_failure_count != s.decode_failure_count;
            if changed {
                s.decode_failures = decode_failures();
                s.decode_failure_count = decode_failure_count;
            }
            changed
        });
    }

    /// `revisions` revisions took `elapsed` to apply and publish (a share each).
    pub(crate) fn applied_in(&self, elapsed: Duration, revisions: u64) {
        let each = elapsed.as_secs_f64() / revisions.max(1) as f64;
        for _ in 0..revisions {
            self.metrics.apply_seconds.observe(each);
        }
    }

    pub(crate) fn rejected(&self, cause: Rejected) {
        Metrics::inc_cause(&self.metrics.rejected_responses, cause.as_str());
        self.status.send_modify(|s| s.rejected_responses += 1);
    }

    /// The mirror relists, for `reason` (not the initial list).
    pub(crate) fn relisting(&self, reason: ResyncReason) {
        Metrics::inc_cause(&self.metrics.relists, reason.as_str());
        self.status.send_modify(|s| {
            *s.relists.entry(reason).or_default() += 1;
            if s.state == State::Ready {
                s.state = State::Reconnecting;
            }
        });
    }

    /// A list got its first page: `listing` is its progress before any page.
    pub(crate) fn listing(&self, listing: ListProgress) {
        self.status.send_modify(|s| s.listing = Some(listing));
    }

    /// The list in progress received a page of `keys` keys.
    pub(crate) fn listed_page(&self, keys: usize) {
        self.status.send_if_modified(|s| match &mut s.listing {
            Some(l) => {
                l.page(keys as u64);
                true
            }
            None => false,
        });
    }

    /// The list in progress ended (published, failed or canceled).
    pub(crate) fn list_ended(&self) {
        self.status.send_if_modified(|s| s.listing.take().is_some());
    }

    /// The watch resumes, for `cause`.
    pub(crate) fn resuming(&self, cause: ReconnectCause) {
        Metrics::inc_cause(&self.metrics.reconnects, cause.as_str());
        self.status.send_modify(|s| {
            *s.reconnects.entry(cause).or_default() += 1;
        });
    }

    /// A failure that leaves the mirror in `state`. `blocking` marks a failure
    /// to list or to open a watch, which `wait_ready` reports.
    pub(crate) fn failed(&self, kind: FailureKind, message: String, state: State, blocking: bool) {
        self.status.send_modify(|s| {
            let err = LastError {
                kind,
                message,
                at: SystemTime::now(),
            };
            s.state = state;
            if blocking {
                s.failing = Some(err.clone());
            }
            s.last_error = Some(err);
            s.endpoint = None;
        });
    }

    pub(crate) fn stream_opened(&self) {
        self.metrics.streams_opened.inc();
    }

    /// A watch stream on `endpoint` was created: the failures are over.
    pub(crate) fn watch_created(&self, endpoint: &str) {
        self.status.send_modify(|s| {
            s.failing = None;
            s.last_error = None;
            s.endpoint = Some(endpoint.to_owned());
        });
    }

    /// The watch has caught up.
    pub(crate) fn ready(&self) {
        self.status.send_modify(|s| s.state = State::Ready);
    }

    /// A read verifying a progress reply ended.
    pub(crate) fn progress_verified(&self, outcome: Verification) {
        self.metrics
            .progress_verifications
            .get_or_create(&CauseLabel {
                cause: outcome.as_str(),
            })
            .inc();
    }

    /// A stream whose creation was answered but none of its progress requests
    /// stalled.
    pub(crate) fn unanswered_progress_stall(&self) {
        self.metrics.unanswered_progress_stalls.inc();
        self.status.send_if_modified(|s| {
            s.unanswered_progress_stalls += 1;
            false
        });
    }

    /// A snapshot file write finished (`ok` or not).
    pub(crate) fn snapshot_written(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        Metrics::inc_cause(&self.metrics.snapshot_writes, outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter::new(Status::new(State::Syncing), Metrics::new())
    }

    fn published(revision: i64) -> Published {
        Published {
            revision,
            keys: 2,
            applied: Some((3, 1)),
            new_decode_failures: 0,
            decode_failure_count: 0,
        }
    }

    fn failure(key: &str) -> DecodeFailure {
        DecodeFailure {
            key: key.as_bytes().into(),
            revision: 4,
            error: "bad".into(),
        }
    }

    #[test]
    fn heard_counts_untrusted_progress_in_the_same_update_as_the_revision() {
        let r = reporter();
        let rx = r.subscribe();
        let mut heard = Heard::default();
        heard.add(6, true);
        heard.add(5, false);
        r.heard(heard);
        let s = r.status();
        assert_eq!((s.server_revision, s.untrusted_progress), (6, 1));
        assert_eq!(r.metrics().server_revision.get(), 6);
        assert_eq!(
            r.metrics()
                .rejected_responses
                .get_or_create(&CauseLabel {
                    cause: "untrusted_progress"
                })
                .get(),
            1
        );
        assert!(!rx.has_changed().unwrap(), "live figures wake no receiver");
    }

    #[test]
    fn the_server_revision_only_rises_and_sets_the_lag() {
        let r = reporter();
        r.published(published(4), Vec::new);
        r.server_revision(9);
        r.server_revision(7);
        let s = r.status();
        assert_eq!((s.server_revision, s.lag()), (9, 5));
        assert_eq!(r.metrics().lag.get(), 5);
        r.published(published(9), Vec::new);
        assert_eq!(r.metrics().lag.get(), 0);
    }

    #[test]
    fn published_rebuilds_the_failure_list_only_when_it_changed() {
        let r = reporter();
        let mut rx = r.subscribe();
        r.published(published(3), || unreachable!("no failure to list"));
        assert!(!rx.has_changed().unwrap());
        assert_eq!((r.status().revision, r.status().keys), (3, 2));
        assert_eq!(r.metrics().events_applied.get(), 3);
        assert_eq!(r.metrics().revisions_applied.get(), 1);

        let with_failure = Published {
            new_decode_failures: 1,
            decode_failure_count: 1,
            ..published(4)
        };
        r.published(with_failure, || vec![failure("a")]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().decode_failures, [failure("a")]);
        assert_eq!(r.metrics().decode_errors.get(), 1);

        // Still failing, nothing new: the list stands.
        r.published(
            Published {
                decode_failure_count: 1,
                ..published(5)
            },
            || unreachable!("unchanged"),
        );
        assert!(!rx.has_changed().unwrap());
        // Recovered.
        r.published(published(6), Vec::new);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().decode_failure_count, 0);
    }

    #[test]
    fn a_failure_sets_the_state_and_blocks_readiness_only_when_blocking() {
        let r = reporter();
        r.failed(
            FailureKind::Other,
            "closed".into(),
            State::Reconnecting,
            false,
        );
        let s = r.status();
        assert_eq!(s.state, State::Reconnecting);
        assert!(s.failing.is_none());
        assert_eq!(s.last_error.map(|e| e.message), Some("closed".into()));
        r.failed(
            FailureKind::Unreachable,
            "down".into(),
            State::Syncing,
            true,
        );
        assert_eq!(
            r.status().failing.map(|e| e.kind),
            Some(FailureKind::Unreachable)
        );
        r.watch_created("e:1");
        let s = r.status();
        assert!(s.failing.is_none() && s.last_error.is_none());
        assert_eq!(s.endpoint.as_deref(), Some("e:1"));
    }

    #[test]
    fn failures_leave_the_state_by_kind_then_by_history() {
        use FailureKind::*;
        for kind in [PermissionDenied, Auth] {
            assert_eq!(state_after_failure(kind, true, true), State::Degraded);
        }
        assert_eq!(state_after_failure(Other, true, true), State::Reconnecting);
        assert_eq!(state_after_failure(Unreachable, false, true), State::Stale);
        assert_eq!(state_after_failure(Other, false, false), State::Syncing);
    }

    #[test]
    fn list_progress_wakes_receivers_at_every_page_until_it_ends() {
        let r = reporter();
        let mut rx = r.subscribe();
        r.listed_page(5);
        assert!(!rx.has_changed().unwrap(), "no list in progress");
        let at = SystemTime::now();
        r.listing(ListProgress::new(ResyncReason::Compacted, 9, 12, at));
        assert!(rx.has_changed().unwrap());
        let l = rx.borrow_and_update().listing.unwrap();
        assert_eq!(
            (l.reason, l.revision, l.keys_listed, l.total, l.pages),
            (ResyncReason::Compacted, 9, 0, 12, 0)
        );
        r.listed_page(5);
        r.listed_page(7);
        assert!(rx.has_changed().unwrap());
        let l = rx.borrow_and_update().listing.unwrap();
        assert_eq!((l.keys_listed, l.pages, l.started_at), (12, 2, at));
        r.list_ended();
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().listing, None);
        r.list_ended();
        assert!(!rx.has_changed().unwrap(), "nothing to clear");
    }

    #[test]
    fn a_relist_leaves_ready_and_counts_its_reason() {
        let r = reporter();
        r.ready();
        r.relisting(ResyncReason::Compacted);
        let s = r.status();
        assert_eq!(s.state, State::Reconnecting);
        assert_eq!(s.relists.get(&ResyncReason::Compacted), Some(&1));
        r.resuming(ReconnectCause::Stall);
        assert_eq!(r.status().reconnects.get(&ReconnectCause::Stall), Some(&1));
        r.rejected(Rejected::Header);
        assert_eq!(r.status().rejected_responses, 1);
    }
}
