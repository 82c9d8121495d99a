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

use etcd_proto::mvccpb::Event;
use futures::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::time::sleep_until;
use tracing::Instrument;

use super::batch::{ResyncReason, Update};
use super::config::MirrorConfig;
use super::error::{FailureKind, MirrorError};
use super::hub::{Hub, Quiet};
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

/// Bounds of a run of replies handled in a row (see [`Run`]): events, and time
/// (checked every [`RUN_TIME_CHECK`] events). They bound how long a revision
/// applied in a run waits to be visible, how long a subscription made meanwhile
/// waits, and how long the task goes without yielding.
const MAX_RUN_EVENTS: u64 = 16_384;
const MAX_RUN_TIME: Duration = Duration::from_millis(2);
const RUN_TIME_CHECK: u64 = 64;

/// Replies handled in a row: one that arrived, then those already received
/// after it (up to the bounds above), as long as they carry only events.
///
/// While no subscription is live, their revisions are applied without a batch
/// or a snapshot each, and only the state after the last one is published:
/// readers and waiters skip the revisions in between (they never see part of
/// one), and nobody else could see them. That spares a snapshot per revision,
/// and with it the copy of the map's path to each changed key (and freeing it
/// again). A subscription made during the run waits until it is published and
/// starts from there. With a live subscription, every revision is published on
/// its own, with its batch, as it is applied.
struct Run<'a, T> {
    /// Held while no subscription is live.
    quiet: Option<Quiet<'a, T>>,
    started: Instant,
    events: u64,
    revisions: u64,
    /// `events` at the last time check.
    checked: u64,
}

impl<'a, T> Run<'a, T> {
    fn new(hub: &'a Hub<T>, started: Instant) -> Self {
        Run {
            quiet: hub.quiet(),
            started,
            events: 0,
            revisions: 0,
            checked: 0,
        }
    }

    /// Whether the run has reached its bounds.
    fn is_full(&mut self) -> bool {
        if self.events >= MAX_RUN_EVENTS {
            return true;
        }
        if self.events - self.checked < RUN_TIME_CHECK {
            return false;
        }
        self.checked = self.events;
        self.started.elapsed() >= MAX_RUN_TIME
    }
}

/// What the replies of a run told about the server, for status and metrics.
#[derive(Debug, Default)]
struct Heard {
    /// The highest header revision.
    server_revision: i64,
    /// Progress replies not (yet) trusted as bookmarks.
    untrusted_progress: u64,
}

/// What ended a run of replies.
enum Next {
    /// Nothing: no further reply is ready, or the run is full.
    Nothing,
    /// A reply with more than events (created, progress), handled after the run.
    Out(stream::Output),
    /// The stream ended or a reply failed validation.
    End(StreamEnd),
    /// An event could not be applied.
    Invalid(Invalid),
    Closed,
    Failed(Error),
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
    /// Set to true to stop: the runner then writes a final snapshot file.
    pub(crate) stop: watch::Receiver<bool>,
    /// Where the runner reports how it stopped.
    pub(crate) stopped: watch::Sender<Option<Result<(), MirrorError>>>,
}

/// Rate-bounded snapshot file writes, one at a time, off the async threads.
pub(crate) struct Persister {
    pub(crate) path: std::path::PathBuf,
    pub(crate) interval: Duration,
    pub(crate) last_write: Option<Instant>,
    pub(crate) written_revision: i64,
    pub(crate) in_flight: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Raises the highest server revision seen (status and metrics) to `revision`, and the
/// lag with it. Silent for `watch` receivers: it moves no published state.
pub(crate) fn record_server_revision(
    status: &watch::Sender<Status>,
    metrics: &Metrics,
    revision: i64,
) {
    record_heard(
        status,
        metrics,
        Heard {
            server_revision: revision,
            untrusted_progress: 0,
        },
    );
}

/// Records what replies told about the server in one status update, so that a status
/// showing the revision of an untrusted progress reply also counts the reply.
fn record_heard(status: &watch::Sender<Status>, metrics: &Metrics, heard: Heard) {
    let Heard {
        server_revision,
        untrusted_progress,
    } = heard;
    if untrusted_progress > 0 {
        Metrics::inc_cause_by(
            &metrics.rejected_responses,
            "untrusted_progress",
            untrusted_progress,
        );
    }
    status.send_if_modified(|s| {
        s.untrusted_progress += untrusted_progress;
        if server_revision > s.server_revision {
            s.server_revision = server_revision;
            metrics.server_revision.set(server_revision);
            metrics.lag.set(s.lag());
        }
        false
    });
}

/// Counts (and logs) a finished snapshot file write; the error text if it failed.
fn record_write(
    metrics: &Metrics,
    path: &std::path::Path,
    written: Result<std::io::Result<()>, tokio::task::JoinError>,
) -> Result<(), String> {
    let result = match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{}: {e}", path.display())),
        Err(e) => Err(format!("{}: write task failed: {e}", path.display())),
    };
    let outcome = match &result {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "snapshot file write failed");
            "error"
        }
    };
    Metrics::inc_cause(&metrics.snapshot_writes, outcome);
    result
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    /// Mirrors until asked to stop, then flushes the snapshot file.
    pub(crate) async fn run(mut self) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = self.mirror() => {}
            // Cancels whatever is in flight: state changes only through `publish`
            // and runs of replies (see `Run`), which never await, so the
            // published state is whole.
            Ok(_) = stop.wait_for(|s| *s) => {}
        }
        let outcome = self.flush().await;
        self.stopped.send_replace(Some(outcome));
    }

    /// Writes the published snapshot to the file, if configured and newer than the
    /// last write, after any write in flight (which must not land after it).
    async fn flush(&mut self) -> Result<(), MirrorError> {
        let snapshot = self.hub.snapshot();
        let Some(p) = &mut self.persist else {
            return Ok(());
        };
        if let Some(h) = p.in_flight.take()
            && record_write(&self.metrics, &p.path, h.await).is_err()
        {
            p.written_revision = 0;
        }
        if snapshot.revision() <= p.written_revision {
            return Ok(());
        }
        let revision = snapshot.revision();
        let (path, prefix) = (p.path.clone(), self.range.prefix.clone());
        let written =
            tokio::task::spawn_blocking(move || persist::write(&path, &prefix, &snapshot)).await;
        record_write(&self.metrics, &p.path, written).map_err(MirrorError::Persist)?;
        p.written_revision = revision;
        tracing::info!(path = %p.path.display(), revision, "wrote the final snapshot file");
        Ok(())
    }

    async fn mirror(&mut self) {
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
            let from = self.writer.revision();
            let opened = Instant::now();
            let span = tracing::info_span!("watch", from = from + 1);
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
                    // A stream that was created and then worked (delivered something,
                    // or lived a stall timeout) is an ordinary resume. One that ends
                    // at once backs off like a failure to open, or a server (or a
                    // proxy) that fails every new watch would make this loop spin.
                    let worked = created
                        && (self.writer.revision() > from
                            || opened.elapsed() >= self.config.stall_timeout);
                    if worked {
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
        record_server_revision(&self.status, &self.metrics, revision);
    }

    fn record_heard(&self, heard: Heard) {
        record_heard(&self.status, &self.metrics, heard);
    }

    /// Publishes, updates status and metrics, and maybe writes the snapshot file.
    /// `events`: the number of events, for the batch of one applied revision.
    fn publish(
        &mut self,
        snapshot: Arc<super::snapshot::Snapshot<T>>,
        update: Update<T>,
        events: Option<u64>,
    ) {
        let hub = Arc::clone(&self.hub);
        hub.publish(Arc::clone(&snapshot), update, || {
            self.record_published(&snapshot, events.map(|n| (n, 1)));
        });
        self.persist_maybe(&snapshot);
    }

    /// Applies `revisions` (draining it; in increasing order, validated by the
    /// stream check) as part of `run`: unpublished while the run is quiet,
    /// otherwise each published with its batch. Stops at a revision that fails
    /// to apply, which leaves the state as it was before it.
    fn apply(
        &mut self,
        revisions: &mut Vec<(i64, Vec<Event>)>,
        run: &mut Run<'_, T>,
    ) -> Result<(), Invalid> {
        for (revision, events) in revisions.drain(..) {
            let n = events.len() as u64;
            if run.quiet.is_some() {
                self.writer.apply_unpublished(revision, events)?;
            } else {
                let started = Instant::now();
                let Applied { snapshot, batch } = self.writer.apply_revision(revision, events)?;
                self.publish(snapshot, Update::Batch(batch), Some(n));
                self.metrics
                    .apply_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            run.events += n;
            run.revisions += 1;
        }
        Ok(())
    }

    /// Ends `run`: publishes what a quiet run applied, records what its replies told
    /// about the server, and updates status and metrics.
    fn finish(&mut self, run: Run<'_, T>, heard: Heard) {
        let Run {
            quiet,
            started,
            events,
            revisions,
            ..
        } = run;
        let Some(quiet) = quiet else { return };
        if revisions == 0 {
            drop(quiet);
            self.record_heard(heard);
            return;
        }
        let snapshot = self.writer.current();
        quiet.publish(Arc::clone(&snapshot), || {
            self.record_heard(heard);
            self.record_published(&snapshot, Some((events, revisions)));
        });
        self.persist_maybe(&snapshot);
        // Each revision of the run took its share of the run's time.
        let each = started.elapsed().as_secs_f64() / revisions as f64;
        for _ in 0..revisions {
            self.metrics.apply_seconds.observe(each);
        }
    }

    /// Updates status and metrics once `snapshot` is current, before waiters and
    /// subscribers are woken, so that whoever sees it sees a status at least as new.
    /// `applied`: the events and revisions it applied.
    fn record_published(
        &mut self,
        snapshot: &Arc<super::snapshot::Snapshot<T>>,
        applied: Option<(u64, u64)>,
    ) {
        let revision = snapshot.revision();
        let keys = snapshot.len();
        self.metrics.revision.set(revision);
        if let Some((events, revisions)) = applied {
            self.metrics.events_applied.inc_by(events);
            self.metrics.revisions_applied.inc_by(revisions);
        }
        let new_failures = self.writer.take_new_failures();
        if new_failures > 0 {
            self.metrics.decode_errors.inc_by(new_failures);
        }
        let max = self.config.max_reported_decode_failures;
        let count = self.writer.failure_count();
        self.status.send_if_modified(|s| {
            s.revision = revision;
            s.keys = keys;
            s.last_event_at = Some(SystemTime::now());
            self.metrics.lag.set(s.lag());
            // The reported list changes with a new failure or with a key that
            // recovered (or vanished); only then is it rebuilt and receivers woken.
            let changed = new_failures > 0 || count != s.decode_failure_count;
            if changed {
                s.decode_failures = self.writer.failures().take(max).cloned().collect();
                s.decode_failure_count = count;
            }
            changed
        });
    }

    /// Starts a snapshot file write if one is due and none is running.
    fn persist_maybe(&mut self, snapshot: &Arc<super::snapshot::Snapshot<T>>) {
        let Some(p) = &mut self.persist else { return };
        if let Some(h) = &p.in_flight {
            if !h.is_finished() {
                return;
            }
            if let Some(Some(written)) = p.in_flight.take().map(futures::FutureExt::now_or_never)
                && record_write(&self.metrics, &p.path, written).is_err()
            {
                // Write it again when next due.
                p.written_revision = 0;
            }
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
        // Ready is declared once the stream has caught up (and its boundary held).
        let mut settled = false;
        // Whether the watch replays history, so its boundary must be re-checked.
        let mut replays = false;
        let mut last_message = Instant::now();
        let mut progress_due = last_message + self.config.progress_interval;
        // The revisions of a reply (kept for its capacity).
        let mut revisions = Vec::new();
        loop {
            let stall_at = last_message + self.config.stall_timeout;
            if !settled && check.is_caught_up(Instant::now()) {
                if let Some(end) = self.settle(applied, replays, stall_at, &endpoint).await {
                    return end;
                }
                settled = true;
                *ever_ready = true;
            }
            let mut wake = progress_due.min(stall_at);
            if let Some(t) = self.persist_due() {
                wake = wake.min(t);
            }
            if !settled && let Some(t) = check.catch_up_deadline() {
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
                    last_message = Instant::now();
                    progress_due = last_message + self.config.progress_interval;
                    // A block, so that the run (which may hold the hub's lock) is
                    // gone before anything awaits.
                    let next = {
                        let hub = Arc::clone(&self.hub);
                        let mut run = Run::new(&hub, last_message);
                        let mut msg = msg;
                        let mut heard = Heard::default();
                        let next = loop {
                            let resp = match msg {
                                Ok(Some(resp)) => resp,
                                Ok(None) => break Next::Closed,
                                Err(e) => break Next::Failed(e),
                            };
                            let header_revision = resp.header.as_ref().map_or(0, |h| h.revision);
                            let checked = check.on_message(resp, last_message, &mut revisions);
                            heard.server_revision = heard.server_revision.max(header_revision);
                            if matches!(&checked, Ok(out) if out.untrusted_progress) {
                                heard.untrusted_progress += 1;
                            }
                            // In a quiet run, recorded once the run is published (not
                            // under the hub's lock).
                            if run.quiet.is_none() {
                                self.record_heard(std::mem::take(&mut heard));
                            }
                            let out = match checked {
                                Ok(out) => out,
                                Err(end) => break Next::End(end),
                            };
                            if let Err(e) = self.apply(&mut revisions, &mut run) {
                                break Next::Invalid(e);
                            }
                            if out.created || out.untrusted_progress || out.bookmark.is_some() {
                                break Next::Out(out);
                            }
                            if run.is_full() {
                                break Next::Nothing;
                            }
                            // Cancel-safe (as `select!` needs too): if nothing is ready,
                            // nothing is lost. Outside Tokio's task budget, which would
                            // end runs early: the run's bounds limit the work instead.
                            match tokio::task::unconstrained(stream.message()).now_or_never() {
                                Some(m) => msg = m,
                                None => break Next::Nothing,
                            }
                        };
                        // What came before a bad or final reply was valid: it is
                        // published first, as if each reply had been handled alone.
                        self.finish(run, heard);
                        next
                    };
                    let out = match next {
                        Next::Out(out) => out,
                        Next::Nothing => continue,
                        Next::Invalid(Invalid(reason)) => {
                            tracing::warn!(%endpoint, %reason, "rejected watch event");
                            self.reject("event");
                            return WatchEnd::Relist(ResyncReason::Validation);
                        }
                        Next::Closed => return reconnect(ReconnectCause::StreamClosed, format!("{endpoint}: stream closed by the server"), None),
                        Next::Failed(e) => return reconnect(ReconnectCause::StreamError, e.to_string(), Some(e)),
                        Next::End(StreamEnd::Compacted(at)) => {
                            tracing::warn!(compact_revision = at, from = applied + 1, "watch start revision compacted");
                            return WatchEnd::Relist(ResyncReason::Compacted);
                        }
                        Next::End(StreamEnd::Canceled(reason)) => return reconnect(ReconnectCause::Canceled, format!("{endpoint}: {reason}"), None),
                        Next::End(StreamEnd::Invalid { reason, relist }) => {
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
                        self.status.send_modify(|s| {
                            s.failing = None;
                            s.last_error = None;
                            s.endpoint = Some(endpoint.clone());
                        });
                        replays = check.replays_history();
                        // Before reading on: nothing from this stream is applied
                        // unless the boundary holds.
                        if replays && let Some(end) = self.check_boundary(applied, stall_at, &endpoint).await {
                            return end;
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
                        let mut message = format!("{endpoint}: nothing received for {:?}", self.config.stall_timeout);
                        if let Some(sent) = check.progress_unanswered().filter(|_| created) {
                            message.push_str(&self.record_unanswered_progress(sent));
                        }
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

    /// Counts a stall on a stream whose creation was answered but none of its `sent`
    /// progress requests, and explains the likely cause, for the stall's message.
    fn record_unanswered_progress(&self, sent: u64) -> String {
        self.metrics.unanswered_progress_stalls.inc();
        self.status.send_if_modified(|s| {
            s.unanswered_progress_stalls += 1;
            false
        });
        format!(
            " (the watch's creation was answered, none of {sent} progress requests: etcd 3.4's \
             grpc-proxy ignores them, and behind it etcd needs \
             --experimental-watch-progress-notify-interval below the stall timeout)"
        )
    }

    /// The stream has caught up: re-checks the boundary if it replayed history,
    /// then declares the mirror Ready. Returns how the stream ends if it must.
    async fn settle(
        &self,
        applied: i64,
        replays: bool,
        stall_at: Instant,
        endpoint: &str,
    ) -> Option<WatchEnd> {
        if replays && let Some(end) = self.check_boundary(applied, stall_at, endpoint).await {
            return Some(end);
        }
        self.status.send_modify(|s| s.state = State::Ready);
        None
    }

    /// Runs [`boundary_compacted`](Self::boundary_compacted) on a created stream:
    /// `None` if the boundary holds, else how the stream ends.
    async fn check_boundary(
        &self,
        applied: i64,
        stall_at: Instant,
        endpoint: &str,
    ) -> Option<WatchEnd> {
        match self.boundary_compacted(applied, stall_at, endpoint).await {
            Ok(false) => None,
            Ok(true) => Some(WatchEnd::Relist(ResyncReason::Compacted)),
            Err(e) => Some(WatchEnd::Reconnect {
                cause: ReconnectCause::StreamError,
                message: e.to_string(),
                error: Some(e),
                created: true,
            }),
        }
    }

    /// Whether compaction has reached the watch's start revision `applied + 1`,
    /// from a count-only range at `applied` (which fails as compacted exactly when
    /// the compaction revision is above `applied`).
    ///
    /// etcd lets a watch start *at* the compaction revision C, but compacting at C
    /// removes the tombstones of revision C: such a watch silently misses the
    /// deletes at C (and delivers half of a txn that put and deleted at C). So a
    /// watch that replays history is trusted only if this check passes twice:
    ///
    /// 1. right after the created reply, before anything from the stream is
    ///    applied: the watcher exists on the server, so any compaction that could
    ///    have cost it an event either came before this check (and fails it), or
    ///    comes later, while etcd is still reading the history for the watcher;
    /// 2. once the stream has caught up, i.e. etcd has read that history (the
    ///    stream delivered events up to its creation revision, or
    ///    `catch_up_grace` passed: etcd reads lagging watchers every 100 ms): any
    ///    compaction that could have raced those reads came before this check and
    ///    fails it (compaction revisions only grow). Compactions after it cannot
    ///    touch the stream, whose events now come live, not from history.
    ///
    /// A failed check relists (cause: compaction), whose resync batch holds the
    /// exact difference. A compaction above `applied` that missed the watch's
    /// history relists needlessly; that is the price of never missing one. Not
    /// covered: etcd replays at most 1000 revisions per pass, so a catch-up of
    /// more than that (counting only revisions that touch the prefix) is read in
    /// several passes; a compaction at exactly the first revision of a later pass,
    /// landing after check 2, is invisible to a client of etcd 3.4.
    async fn boundary_compacted(
        &self,
        applied: i64,
        deadline: Instant,
        endpoint: &str,
    ) -> Result<bool, Error> {
        let started = Instant::now();
        let req = RangeRequest {
            key: self.range.key.clone(),
            range_end: self.range.range_end.clone(),
            revision: applied,
            count_only: true,
            limit: 1,
            ..RangeRequest::default()
        };
        match tokio::time::timeout_at(deadline.into(), self.source.range(req)).await {
            Ok(Ok(resp)) => {
                if let Some(h) = &resp.header {
                    self.saw_server_revision(h.revision);
                }
                Ok(false)
            }
            Ok(Err(e)) if e.is_compacted() => {
                tracing::warn!(
                    from = applied + 1,
                    "compaction reached the watch start revision; its deletes may be lost"
                );
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                endpoint: endpoint.into(),
                after: deadline.saturating_duration_since(started),
            }),
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
