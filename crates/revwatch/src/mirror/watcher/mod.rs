//! The watch state machine: one task that lists, watches, resumes and relists, and
//! publishes every change through the hub.
//!
//! ```text
//!            ┌──────────── compacted / invalid event ───────────┐
//!            ▼                                                   │
//!  ──► Listing(reason) ──ok──► Watching(from rev+1) ──────────────┤
//!            ▲  │ error: back off           │ stream error, close,│
//!            └──┘                           │ stall, bad header   │
//!                                           ▼                     │
//!                                   Resuming(from rev+1) ─────────┘
//! ```
//!
//! A loaded snapshot file starts in Resuming (from its revision + 1).

mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, watch};
use tokio::time::sleep_until;
use tracing::Instrument;

use super::batch::{ResyncReason, Update};
use super::config::MirrorConfig;
use super::error::FailureKind;
use super::hub::Hub;
use super::metrics::Metrics;
use super::persist;
use super::source::{Source, WatchHandle};
use super::status::{LastError, ReconnectCause, State, Status};
use super::store::{Applied, Invalid, Writer};
use crate::client::{Error, RangeRequest, WatchCreateRequest};

use stream::StreamCheck;
pub(crate) use stream::StreamEnd;

/// The key range being mirrored.
#[derive(Debug, Clone)]
pub(crate) struct KeyRange {
    pub(crate) prefix: Vec<u8>,
    pub(crate) key: Vec<u8>,
    pub(crate) range_end: Vec<u8>,
}

impl KeyRange {
    pub(crate) fn of_prefix(prefix: &[u8]) -> Self {
        // etcd reads an empty key as "no key": every key is key "\0", end "\0".
        let key = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.to_vec()
        };
        KeyRange {
            prefix: prefix.to_vec(),
            key,
            range_end: super::source::prefix_range_end(prefix),
        }
    }
}

/// How one watch attempt ended.
enum WatchEnd {
    Relist(ResyncReason),
    Reconnect {
        cause: ReconnectCause,
        error: Option<Error>,
        message: String,
        /// Whether the stream got as far as a created reply.
        created: bool,
    },
}

/// Why a list attempt failed.
enum ListError {
    Source(Error),
    Invalid(Invalid),
}

pub(crate) struct Runner<S: Source, T> {
    pub(crate) source: S,
    pub(crate) range: KeyRange,
    pub(crate) config: MirrorConfig,
    pub(crate) writer: Writer<T>,
    pub(crate) hub: Arc<Hub<T>>,
    pub(crate) status: Arc<watch::Sender<Status>>,
    pub(crate) metrics: Metrics,
    pub(crate) progress_wanted: Arc<Notify>,
    /// Whether a snapshot file was loaded (then start by resuming).
    pub(crate) loaded: bool,
    pub(crate) persist: Option<Persister>,
}

/// Rate-bounded snapshot file writes, one at a time, off the async threads.
pub(crate) struct Persister {
    pub(crate) path: std::path::PathBuf,
    pub(crate) interval: Duration,
    pub(crate) last_write: Option<Instant>,
    pub(crate) written_revision: i64,
    pub(crate) in_flight: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    pub(crate) async fn run(mut self) {
        let mut need_list = (!self.loaded).then_some(ResyncReason::InitialList);
        let mut ever_ready = false;
        let mut failures: u32 = 0;
        loop {
            if let Some(reason) = need_list {
                let span = tracing::info_span!("list", reason = reason.as_str(), prefix = %String::from_utf8_lossy(&self.range.prefix));
                match self.list(reason).instrument(span).await {
                    Ok(()) => {
                        need_list = None;
                        failures = 0;
                    }
                    Err(e) => {
                        let (kind, message) = match &e {
                            ListError::Source(e) => (FailureKind::of(e), e.to_string()),
                            ListError::Invalid(i) => (FailureKind::Other, i.to_string()),
                        };
                        tracing::warn!(error = %message, "list failed");
                        if let ListError::Invalid(_) = e {
                            self.reject("list");
                        }
                        // A page read at a pinned revision that got compacted meanwhile:
                        // start over at once.
                        let compacted = matches!(&e, ListError::Source(e) if e.is_compacted());
                        self.failed(kind, message, ever_ready, true);
                        if !compacted {
                            self.back_off(&mut failures).await;
                        }
                        continue;
                    }
                }
            }
            let span = tracing::info_span!("watch", from = self.writer.revision() + 1);
            match self.watch(&mut ever_ready).instrument(span).await {
                WatchEnd::Relist(reason) => {
                    Metrics::inc_cause(&self.metrics.relists, reason.as_str());
                    self.status.send_modify(|s| {
                        *s.relists.entry(reason).or_default() += 1;
                        if s.state == State::Ready {
                            s.state = State::Reconnecting;
                        }
                    });
                    tracing::warn!(reason = reason.as_str(), "relisting");
                    need_list = Some(reason);
                }
                WatchEnd::Reconnect {
                    cause,
                    error,
                    message,
                    created,
                } => {
                    Metrics::inc_cause(&self.metrics.reconnects, cause.as_str());
                    tracing::info!(cause = cause.as_str(), error = %message, "resuming watch");
                    let kind = error.as_ref().map_or(FailureKind::Other, FailureKind::of);
                    self.status.send_modify(|s| {
                        *s.reconnects.entry(cause).or_default() += 1;
                    });
                    // Only a failure to open the watch blocks readiness; a stream that
                    // worked and then ended is an ordinary resume.
                    self.failed(kind, message, ever_ready, !created);
                    if created {
                        failures = 0;
                    } else {
                        self.back_off(&mut failures).await;
                    }
                }
            }
        }
    }

    async fn back_off(&self, failures: &mut u32) {
        let delay = self.config.retry_backoff.delay(*failures, &mut rand::rng());
        *failures = failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }

    fn reject(&self, cause: &'static str) {
        Metrics::inc_cause(&self.metrics.rejected_responses, cause);
        self.status.send_modify(|s| s.rejected_responses += 1);
    }

    /// Records a failure and the state it leaves the mirror in. `blocking` marks a
    /// failure to list or open a watch, which `wait_ready` reports.
    fn failed(&self, kind: FailureKind, message: String, ever_ready: bool, blocking: bool) {
        let loaded = self.loaded;
        self.status.send_modify(|s| {
            let err = LastError {
                kind,
                message,
                at: SystemTime::now(),
            };
            s.state = match kind {
                FailureKind::PermissionDenied | FailureKind::Auth => State::Degraded,
                _ if ever_ready => State::Reconnecting,
                _ if loaded => State::Stale,
                _ => State::Syncing,
            };
            if blocking {
                s.failing = Some(err.clone());
            }
            s.last_error = Some(err);
            s.endpoint = None;
        });
    }

    /// Lists the prefix page by page at one pinned revision and publishes the
    /// difference from the current state as one resync batch.
    async fn list(&mut self, reason: ResyncReason) -> Result<(), ListError> {
        let page_size = self.config.page_size;
        let first = self
            .source
            .range(RangeRequest {
                key: self.range.key.clone(),
                range_end: self.range.range_end.clone(),
                limit: page_size,
                ..RangeRequest::default()
            })
            .await
            .map_err(ListError::Source)?;
        let revision = first.header.as_ref().map_or(0, |h| h.revision);
        self.saw_server_revision(revision);
        if revision < self.writer.revision() || revision <= 0 {
            return Err(ListError::Invalid(Invalid(format!(
                "list at revision {revision} is behind the published revision {}",
                self.writer.revision()
            ))));
        }
        let mut relist = self.writer.relist(revision, reason);
        let mut more = first.more;
        let mut next_key = first.kvs.last().map(|kv| kv.key.clone());
        relist.page(first.kvs).map_err(ListError::Invalid)?;
        let mut pages = 1u32;
        while more {
            let Some(mut key) = next_key.take() else {
                return Err(ListError::Invalid(Invalid(
                    "page says more keys follow but holds none".into(),
                )));
            };
            // The smallest key after the last one listed.
            key.push(0);
            let page = self
                .source
                .range(RangeRequest {
                    key,
                    range_end: self.range.range_end.clone(),
                    limit: page_size,
                    revision,
                    ..RangeRequest::default()
                })
                .await
                .map_err(ListError::Source)?;
            more = page.more;
            next_key = page.kvs.last().map(|kv| kv.key.clone());
            relist.page(page.kvs).map_err(ListError::Invalid)?;
            pages += 1;
        }
        let Applied { snapshot, batch } = relist.finish();
        tracing::info!(
            revision,
            pages,
            keys = snapshot.len(),
            changes = batch.changes.len(),
            "listed"
        );
        self.publish(snapshot, Update::Batch(batch), None);
        Ok(())
    }

    fn saw_server_revision(&self, revision: i64) {
        self.status.send_if_modified(|s| {
            if revision > s.server_revision {
                s.server_revision = revision;
                self.metrics.server_revision.set(revision);
                self.metrics.lag.set(s.lag());
            }
            false
        });
    }

    /// Publishes, updates status and metrics, and maybe writes the snapshot file.
    fn publish(
        &mut self,
        snapshot: Arc<super::snapshot::Snapshot<T>>,
        update: Update<T>,
        events: Option<u64>,
    ) {
        let revision = snapshot.revision();
        let keys = snapshot.len();
        self.hub.publish(Arc::clone(&snapshot), update);
        self.metrics.revision.set(revision);
        if let Some(n) = events {
            self.metrics.events_applied.inc_by(n);
            self.metrics.revisions_applied.inc();
        }
        let new_failures = self.writer.take_new_failures();
        if new_failures > 0 {
            self.metrics.decode_errors.inc_by(new_failures);
        }
        let max = self.config.max_reported_decode_failures;
        let failures = (new_failures > 0).then(|| {
            (
                self.writer
                    .failures()
                    .take(max)
                    .cloned()
                    .collect::<Vec<_>>(),
                self.writer.failures().count(),
            )
        });
        let failures_cleared = self.writer.failures().next().is_none();
        self.status.send_if_modified(|s| {
            s.revision = revision;
            s.keys = keys;
            s.last_event_at = Some(SystemTime::now());
            self.metrics.lag.set(s.lag());
            let mut changed = false;
            if let Some((list, count)) = failures {
                s.decode_failures = list;
                s.decode_failure_count = count;
                changed = true;
            } else if failures_cleared && s.decode_failure_count > 0 {
                s.decode_failures.clear();
                s.decode_failure_count = 0;
                changed = true;
            }
            changed
        });
        self.persist_maybe(&snapshot);
    }

    /// Starts a snapshot file write if one is due and none is running.
    fn persist_maybe(&mut self, snapshot: &Arc<super::snapshot::Snapshot<T>>) {
        let Some(p) = &mut self.persist else { return };
        if let Some(h) = &p.in_flight {
            if !h.is_finished() {
                return;
            }
            let outcome = match p.in_flight.take().map(futures::FutureExt::now_or_never) {
                Some(Some(Ok(Ok(())))) => "ok",
                Some(Some(Ok(Err(e)))) => {
                    tracing::warn!(path = %p.path.display(), error = %e, "snapshot file write failed");
                    "error"
                }
                _ => "error",
            };
            Metrics::inc_cause(&self.metrics.snapshot_writes, outcome);
        }
        let due = p.last_write.is_none_or(|t| t.elapsed() >= p.interval);
        if !due || snapshot.revision() <= p.written_revision {
            return;
        }
        p.last_write = Some(Instant::now());
        p.written_revision = snapshot.revision();
        let path = p.path.clone();
        let prefix = self.range.prefix.clone();
        let snapshot = Arc::clone(snapshot);
        p.in_flight = Some(tokio::task::spawn_blocking(move || {
            persist::write(&path, &prefix, &snapshot)
        }));
    }

    /// When the snapshot file should next be written, if it lags behind.
    fn persist_due(&self) -> Option<Instant> {
        let p = self.persist.as_ref()?;
        if self.writer.revision() <= p.written_revision {
            return None;
        }
        Some(p.last_write.map_or_else(Instant::now, |t| t + p.interval))
    }

    /// One watch stream, from the current revision + 1 until it ends.
    async fn watch(&mut self, ever_ready: &mut bool) -> WatchEnd {
        let applied = self.writer.revision();
        let req = WatchCreateRequest {
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            // Never 0: that would mean "from now" and skip what happened meanwhile.
            start_revision: applied + 1,
            progress_notify: true,
            fragment: true,
            ..WatchCreateRequest::default()
        };
        let mut stream = match self.source.watch(req).await {
            Ok(s) => s,
            Err(e) if e.is_compacted() => return WatchEnd::Relist(ResyncReason::Compacted),
            Err(e) => {
                return WatchEnd::Reconnect {
                    cause: ReconnectCause::StreamError,
                    message: e.to_string(),
                    error: Some(e),
                    created: false,
                };
            }
        };
        self.metrics.streams_opened.inc();
        let endpoint = stream.endpoint();
        tracing::debug!(%endpoint, from = applied + 1, "watch stream opened");
        let mut check = StreamCheck::new(
            applied,
            self.config.progress_trust,
            self.config.catch_up_grace,
        );
        let mut created = false;
        let mut last_message = Instant::now();
        let mut progress_due = last_message + self.config.progress_interval;
        loop {
            let stall_at = last_message + self.config.stall_timeout;
            let mut wake = progress_due.min(stall_at);
            if let Some(t) = self.persist_due() {
                wake = wake.min(t);
            }
            let reconnect = |cause, message: String, error| WatchEnd::Reconnect {
                cause,
                error,
                message,
                created,
            };
            tokio::select! {
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(resp)) => resp,
                        Ok(None) => return reconnect(ReconnectCause::StreamClosed, format!("{endpoint}: stream closed by the server"), None),
                        Err(e) => return reconnect(ReconnectCause::StreamError, e.to_string(), Some(e)),
                    };
                    last_message = Instant::now();
                    progress_due = last_message + self.config.progress_interval;
                    if let Some(h) = &resp.header {
                        self.saw_server_revision(h.revision);
                    }
                    let out = match check.on_message(resp, last_message) {
                        Ok(out) => out,
                        Err(StreamEnd::Compacted(at)) => {
                            tracing::warn!(compact_revision = at, from = applied + 1, "watch start revision compacted");
                            return WatchEnd::Relist(ResyncReason::Compacted);
                        }
                        Err(StreamEnd::Canceled(reason)) => return reconnect(ReconnectCause::Canceled, format!("{endpoint}: {reason}"), None),
                        Err(StreamEnd::Invalid { reason, relist }) => {
                            tracing::warn!(%endpoint, %reason, relist, "rejected watch response");
                            self.reject(if relist { "event" } else { "header" });
                            if relist {
                                return WatchEnd::Relist(ResyncReason::Validation);
                            }
                            return reconnect(ReconnectCause::Validation, format!("{endpoint}: {reason}"), None);
                        }
                    };
                    if out.created {
                        created = true;
                        *ever_ready = true;
                        self.status.send_modify(|s| {
                            s.state = State::Ready;
                            s.failing = None;
                            s.last_error = None;
                            s.endpoint = Some(endpoint.clone());
                        });
                    }
                    if out.untrusted_progress {
                        Metrics::inc_cause(&self.metrics.rejected_responses, "untrusted_progress");
                        self.status.send_if_modified(|s| { s.untrusted_progress += 1; false });
                    }
                    for (revision, events) in out.revisions {
                        let started = Instant::now();
                        let n = events.len() as u64;
                        match self.writer.apply_revision(revision, events) {
                            Ok(Applied { snapshot, batch }) => {
                                self.publish(snapshot, Update::Batch(batch), Some(n));
                                self.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
                            }
                            Err(Invalid(reason)) => {
                                tracing::warn!(%endpoint, %reason, "rejected watch event");
                                self.reject("event");
                                return WatchEnd::Relist(ResyncReason::Validation);
                            }
                        }
                    }
                    if let Some(revision) = out.bookmark {
                        let snapshot = self.writer.advance(revision);
                        self.publish(snapshot, Update::Progress(revision), None);
                    }
                }
                () = sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if now >= stall_at {
                        let message = format!("{endpoint}: nothing received for {:?}", self.config.stall_timeout);
                        tracing::warn!(%message, "watch stalled");
                        return reconnect(ReconnectCause::Stall, message, None);
                    }
                    if now >= progress_due {
                        progress_due = now + self.config.progress_interval;
                        if let Err(e) = self.request_progress(&mut stream, &mut check, stall_at).await {
                            return reconnect(ReconnectCause::StreamError, e.to_string(), Some(e));
                        }
                    }
                    let current = self.hub.snapshot();
                    self.persist_maybe(&current);
                }
                () = self.progress_wanted.notified() => {
                    if created && let Err(e) = self.request_progress(&mut stream, &mut check, stall_at).await {
                        return reconnect(ReconnectCause::StreamError, e.to_string(), Some(e));
                    }
                }
            }
        }
    }

    async fn request_progress(
        &self,
        stream: &mut S::Watch,
        check: &mut StreamCheck,
        stall_at: Instant,
    ) -> Result<(), Error> {
        // Bounded: a stuck send means a stuck stream.
        match tokio::time::timeout_at(stall_at.into(), stream.request_progress()).await {
            Ok(Ok(())) => {
                check.progress_requested();
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                endpoint: stream.endpoint(),
                after: self.config.stall_timeout,
            }),
        }
    }
}
