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
//!
//! This module is the async shell; the rules live in its rooms:
//! [`stream`] validates one stream's replies, [`run`] applies a run of them,
//! [`compaction`] checks a watch's start against compaction, [`verify`] turns
//! unordered progress replies into bookmarks, [`list`] lists, and [`publish`]
//! publishes, reports and persists the state.

mod compaction;
mod list;
mod publish;
mod run;
mod stream;
mod verify;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_proto::mvccpb::Event;
use futures::FutureExt;
use tokio::sync::{Notify, watch};
use tokio::time::sleep_until;
use tracing::Instrument;

use super::batch::ResyncReason;
use super::config::MirrorConfig;
use super::error::{FailureKind, MirrorError};
use super::report::state_after_failure;
use super::source::{Source, WatchHandle};
use super::status::ReconnectCause;
use crate::client::{Error, RangeRequest, WatchCreateRequest};

pub(crate) use publish::Publisher;
use run::{Next, Reply};
use stream::StreamCheck;

/// The key range being mirrored: etcd's rules live in the protocol crate.
pub(crate) use etcd_proto::key_range::KeyRange;

/// How one watch attempt ended.
#[derive(Debug)]
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

impl WatchEnd {
    /// The stream failed (or could not be opened) with `error`: resume.
    fn stream_error(error: Error, created: bool) -> Self {
        WatchEnd::Reconnect {
            cause: ReconnectCause::StreamError,
            message: error.to_string(),
            error: Some(error),
            created,
        }
    }
}

pub(crate) struct Runner<S: Source, T> {
    pub(crate) source: S,
    pub(crate) range: KeyRange,
    pub(crate) config: MirrorConfig,
    pub(crate) out: Publisher<T>,
    pub(crate) progress_wanted: Arc<Notify>,
    /// Whether a snapshot file was loaded (then start by resuming).
    pub(crate) loaded: bool,
    /// Set to true to stop: the runner then writes a final snapshot file.
    pub(crate) stop: watch::Receiver<bool>,
    /// Where the runner reports how it stopped.
    pub(crate) stopped: watch::Sender<Option<Result<(), MirrorError>>>,
}

/// What the mirror loop carries from one attempt to the next.
#[derive(Debug, Default)]
struct Attempts {
    /// Whether the mirror was ever Ready.
    ever_ready: bool,
    /// Failed attempts in a row, for the back-off.
    failures: u32,
}

/// One open watch stream, and what is known about it.
struct Watch<W> {
    stream: W,
    endpoint: String,
    /// The revision applied when it was opened (it starts at the next one).
    applied: i64,
    check: StreamCheck,
    /// Whether the created reply came.
    created: bool,
    /// Whether it caught up (and its boundary held): Ready was declared.
    settled: bool,
    /// Whether it replays history, so its boundary must be re-checked.
    replays: bool,
    last_message: Instant,
    progress_due: Instant,
    /// When a reader last asked for progress.
    progress_wanted_at: Option<Instant>,
    /// When a verification is due that no reader asked for.
    verify_due: Instant,
    /// The revisions of a reply (kept for its capacity).
    revisions: Vec<(i64, Vec<Event>)>,
}

impl<W> Watch<W> {
    /// When the watch loop must wake up without a reply: to request progress,
    /// to declare a stall, to write the snapshot file, to end the catch-up, or
    /// to verify a progress candidate that no reader waits for.
    fn wake_at(&self, stall_at: Instant, persist_due: Option<Instant>) -> Instant {
        let catch_up = (!self.settled)
            .then(|| self.check.catch_up_deadline())
            .flatten();
        let verify = self.check.candidate().map(|_| self.verify_due);
        [persist_due, catch_up, verify]
            .into_iter()
            .flatten()
            .fold(self.progress_due.min(stall_at), Instant::min)
    }

    fn reconnect(&self, cause: ReconnectCause, message: String, error: Option<Error>) -> WatchEnd {
        WatchEnd::Reconnect {
            cause,
            error,
            message,
            created: self.created,
        }
    }
}

/// The create request of a watch that continues after `applied`.
fn watch_request(range: &KeyRange, applied: i64) -> WatchCreateRequest {
    WatchCreateRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        // Never 0: that would mean "from now" and skip what happened meanwhile.
        start_revision: applied + 1,
        progress_notify: true,
        fragment: true,
        ..WatchCreateRequest::default()
    }
}

/// Whether a stream that ended worked: it was created and then delivered
/// something (`advanced`) or lived a stall timeout. One that ends at once backs
/// off like a failure to open, or a server (or a proxy) that fails every new
/// watch would make the mirror spin.
fn stream_worked(created: bool, advanced: bool, lived: Duration, stall_timeout: Duration) -> bool {
    created && (advanced || lived >= stall_timeout)
}

/// The longest a stall's probe of its endpoint may wait, so that it delays the
/// reconnect little.
const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// How long a stall's probe may wait: a fifth of the stall timeout, at most
/// [`PROBE_LIMIT`].
fn probe_timeout(stall_timeout: Duration) -> Duration {
    (stall_timeout / 5).min(PROBE_LIMIT)
}

/// The probe read a stall sends to its stream's endpoint: one key, counted only,
/// linearizable so that it passes a proxy's cache and needs a working member.
fn probe_request(range: &KeyRange) -> RangeRequest {
    RangeRequest {
        key: range.key().to_vec(),
        limit: 1,
        count_only: true,
        ..RangeRequest::default()
    }
}

/// What a stall's probe of its stream's endpoint showed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Probe {
    /// The endpoint answered, even with an error of its own: it is alive, only
    /// the watch was silent.
    Answered,
    /// It did not (no answer in time, a connection failure, `Unavailable`): why.
    Silent(String),
}

impl Probe {
    fn of(result: Result<(), Error>) -> Probe {
        match result {
            Ok(()) => Probe::Answered,
            Err(e) if e.is_retryable() => Probe::Silent(e.to_string()),
            Err(_) => Probe::Answered,
        }
    }
}

/// Explains a stall on a stream whose creation was answered but none of its
/// `sent` progress requests, by what the probe showed; true when it counts as
/// an unanswered-progress stall. Only an endpoint shown alive is taken for etcd
/// 3.4's grpc-proxy, which ignores progress requests: a direct connection that
/// went silent right after the watch was created looks the same otherwise.
fn unanswered_progress_note(sent: u64, probe: &Probe) -> (String, bool) {
    match probe {
        Probe::Answered => (
            format!(
                " (the watch's creation and a read were answered, none of {sent} progress \
                 requests: etcd 3.4's grpc-proxy ignores them, and behind it etcd needs \
                 --experimental-watch-progress-notify-interval below the stall timeout)"
            ),
            true,
        ),
        Probe::Silent(why) => (
            format!(
                " (the watch's creation was answered, then neither its {sent} progress \
                 request(s) nor a read on the same endpoint ({why}): the connection or the \
                 member went silent)"
            ),
            false,
        ),
    }
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    /// Mirrors until asked to stop, then flushes the snapshot file.
    pub(crate) async fn run(mut self) {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = self.mirror() => {}
            // Cancels whatever is in flight: state changes only through
            // publications and runs of replies, which never await, so the
            // published state is whole.
            Ok(_) = stop.wait_for(|s| *s) => {}
        }
        let outcome = self
            .out
            .flush()
            .await
            .map_err(|e| MirrorError::Persist(Arc::new(e)));
        self.stopped.send_replace(Some(outcome));
    }

    async fn mirror(&mut self) {
        let mut attempts = Attempts::default();
        let mut need_list = (!self.loaded).then_some(ResyncReason::InitialList);
        loop {
            if let Some(reason) = need_list {
                let span = tracing::info_span!("list", reason = reason.as_str(), prefix = %String::from_utf8_lossy(self.range.key()));
                if let Err(e) = self.list(reason).instrument(span).await {
                    self.list_failed(&e, attempts.ever_ready);
                    if !e.is_compacted() {
                        self.back_off(&mut attempts).await;
                    }
                    continue;
                }
                attempts.failures = 0;
            }
            need_list = self.watch_once(&mut attempts).await;
        }
    }

    /// Runs one watch stream to its end; returns the reason to relist, if it
    /// must, after backing off if the stream did not work.
    async fn watch_once(&mut self, attempts: &mut Attempts) -> Option<ResyncReason> {
        let from = self.out.writer.revision();
        let opened = Instant::now();
        let span = tracing::info_span!("watch", from = from + 1);
        match self.watch(&mut attempts.ever_ready).instrument(span).await {
            WatchEnd::Relist(reason) => {
                self.out.reporter.relisting(reason);
                tracing::warn!(reason = reason.as_str(), "relisting");
                Some(reason)
            }
            WatchEnd::Reconnect {
                cause,
                error,
                message,
                created,
            } => {
                tracing::info!(cause = cause.as_str(), error = %message, "resuming watch");
                self.out.reporter.resuming(cause);
                let kind = error.as_ref().map_or(FailureKind::Other, FailureKind::of);
                // Only a failure to open the watch blocks readiness; a stream that
                // worked and then ended is an ordinary resume.
                self.failed(kind, message, attempts.ever_ready, !created);
                let advanced = self.out.writer.revision() > from;
                if stream_worked(
                    created,
                    advanced,
                    opened.elapsed(),
                    self.config.stall_timeout,
                ) {
                    attempts.failures = 0;
                } else {
                    self.back_off(attempts).await;
                }
                None
            }
        }
    }

    async fn back_off(&self, attempts: &mut Attempts) {
        let delay = self
            .config
            .retry_backoff
            .delay(attempts.failures, &mut rand::rng());
        attempts.failures = attempts.failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }

    /// Reports a failure and the state it leaves the mirror in. `blocking` marks
    /// a failure to list or open a watch, which `wait_ready` reports.
    fn failed(&self, kind: FailureKind, message: String, ever_ready: bool, blocking: bool) {
        let state = state_after_failure(kind, ever_ready, self.loaded);
        self.out.reporter.failed(kind, message, state, blocking);
    }

    /// One watch stream, from the current revision + 1 until it ends.
    async fn watch(&mut self, ever_ready: &mut bool) -> WatchEnd {
        let mut w = match self.open().await {
            Ok(w) => w,
            Err(end) => return end,
        };
        loop {
            let stall_at = w.last_message + self.config.stall_timeout;
            if !w.settled && w.check.is_caught_up(Instant::now()) {
                if let ControlFlow::Break(end) = self
                    .settle(w.applied, w.replays, stall_at, &w.endpoint)
                    .await
                {
                    return end;
                }
                w.settled = true;
                *ever_ready = true;
            }
            let wake = w.wake_at(stall_at, self.out.persist_due());
            let step = tokio::select! {
                reply = w.stream.message() => self.on_replies(&mut w, reply, stall_at).await,
                () = sleep_until(wake.into()) => self.on_timer(&mut w, stall_at).await,
                () = self.progress_wanted.notified() => {
                    if w.created {
                        w.progress_wanted_at = Some(Instant::now());
                        self.request_progress(&mut w, stall_at).await
                    } else {
                        ControlFlow::Continue(())
                    }
                }
            };
            if let ControlFlow::Break(end) = step {
                return end;
            }
            self.verify_progress(&mut w).await;
        }
    }

    /// Opens a watch stream after the applied revision.
    async fn open(&mut self) -> Result<Watch<S::Watch>, WatchEnd> {
        let applied = self.out.writer.revision();
        let stream = match self.source.watch(watch_request(&self.range, applied)).await {
            Ok(s) => s,
            Err(e) if e.is_compacted() => return Err(WatchEnd::Relist(ResyncReason::Compacted)),
            Err(e) => return Err(WatchEnd::stream_error(e, false)),
        };
        self.out.reporter.stream_opened();
        let endpoint = stream.endpoint();
        tracing::debug!(%endpoint, from = applied + 1, "watch stream opened");
        let now = Instant::now();
        Ok(Watch {
            stream,
            endpoint,
            applied,
            check: StreamCheck::new(
                applied,
                self.config.progress_trust,
                self.config.catch_up_grace,
            ),
            created: false,
            settled: false,
            replays: false,
            last_message: now,
            progress_due: now + self.config.progress_interval,
            progress_wanted_at: None,
            verify_due: now + self.config.progress_verify_interval,
            revisions: Vec::new(),
        })
    }

    /// A reply arrived: handles it and those already received after it (see
    /// [`run::drain`]), then what they asked for.
    async fn on_replies(
        &mut self,
        w: &mut Watch<S::Watch>,
        reply: Reply,
        stall_at: Instant,
    ) -> ControlFlow<WatchEnd> {
        w.last_message = Instant::now();
        w.progress_due = w.last_message + self.config.progress_interval;
        let Watch {
            stream,
            check,
            revisions,
            ..
        } = w;
        // Outside Tokio's task budget, which would end runs early: the run's
        // bounds limit the work instead.
        let ready = || tokio::task::unconstrained(stream.message()).now_or_never();
        let next = run::drain(
            &mut self.out,
            check,
            revisions,
            reply,
            ready,
            w.last_message,
        );
        let output = match next {
            Next::Nothing => return ControlFlow::Continue(()),
            Next::Out(output) => output,
            Next::Stop(stop) => {
                let (end, rejected) = run::ending(stop, &w.endpoint, w.created, w.applied + 1);
                if let Some(cause) = rejected {
                    self.out.reporter.rejected(cause);
                }
                return ControlFlow::Break(end);
            }
        };
        if output.created {
            w.created = true;
            self.out.reporter.watch_created(&w.endpoint);
            w.replays = w.check.replays_history();
            // Before reading on: nothing from this stream is applied unless the
            // boundary holds.
            if w.replays {
                self.check_boundary(w.applied, stall_at, &w.endpoint)
                    .await?;
            }
        }
        if let Some(revision) = output.bookmark {
            self.out.bookmark(revision);
        }
        ControlFlow::Continue(())
    }

    /// Nothing arrived in time: a stall, a progress request due, or a snapshot
    /// file write due.
    async fn on_timer(
        &mut self,
        w: &mut Watch<S::Watch>,
        stall_at: Instant,
    ) -> ControlFlow<WatchEnd> {
        let now = Instant::now();
        if now >= stall_at {
            let mut message = format!(
                "{}: nothing received for {:?}",
                w.endpoint, self.config.stall_timeout
            );
            if let Some(sent) = w.check.progress_unanswered().filter(|_| w.created) {
                let probe = self.probe(w).await;
                let (note, unanswered) = unanswered_progress_note(sent, &probe);
                if unanswered {
                    self.out.reporter.unanswered_progress_stall();
                }
                message.push_str(&note);
            }
            tracing::warn!(%message, "watch stalled");
            return ControlFlow::Break(w.reconnect(ReconnectCause::Stall, message, None));
        }
        if now >= w.progress_due {
            w.progress_due = now + self.config.progress_interval;
            self.request_progress(w, stall_at).await?;
        }
        self.out.persist_maybe();
        ControlFlow::Continue(())
    }

    /// Reads from the stream's own endpoint, bounded by [`probe_timeout`].
    async fn probe(&self, w: &mut Watch<S::Watch>) -> Probe {
        let after = probe_timeout(self.config.stall_timeout);
        let probing = tokio::time::timeout(after, w.stream.probe(probe_request(&self.range)));
        let result = probing.await.unwrap_or_else(|_| {
            Err(Error::Timeout {
                endpoint: w.endpoint.clone(),
                after,
            })
        });
        tracing::debug!(endpoint = %w.endpoint, ?result, "stalled stream's endpoint probed");
        Probe::of(result)
    }

    /// Sends a progress request, bounded by the stall deadline: a stuck send
    /// means a stuck stream.
    async fn request_progress(
        &self,
        w: &mut Watch<S::Watch>,
        stall_at: Instant,
    ) -> ControlFlow<WatchEnd> {
        let sending = tokio::time::timeout_at(stall_at.into(), w.stream.request_progress());
        let sent = sending.await.unwrap_or_else(|_| {
            Err(Error::Timeout {
                endpoint: w.stream.endpoint(),
                after: self.config.stall_timeout,
            })
        });
        match sent {
            Ok(()) => {
                w.check.progress_requested();
                ControlFlow::Continue(())
            }
            Err(e) => ControlFlow::Break(WatchEnd::stream_error(e, w.created)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_starts_right_after_the_applied_revision_never_at_zero() {
        let req = watch_request(&KeyRange::prefix(b"p/"), 0);
        assert_eq!(req.start_revision, 1);
        let req = watch_request(&KeyRange::prefix(b"p/"), 41);
        assert_eq!(req.start_revision, 42);
        assert!(req.progress_notify && req.fragment);
        assert_eq!((req.key, req.range_end), (b"p/".to_vec(), b"p0".to_vec()));
    }

    #[test]
    fn an_empty_prefix_covers_every_key() {
        let range = KeyRange::prefix(b"");
        assert_eq!((range.key(), range.range_end()), (&b"\0"[..], &b"\0"[..]));
    }

    #[test]
    fn a_stream_worked_if_created_and_it_delivered_or_lived_a_stall_timeout() {
        let stall = Duration::from_secs(10);
        let short = Duration::from_millis(5);
        assert!(stream_worked(true, true, short, stall));
        assert!(stream_worked(true, false, stall, stall));
        assert!(!stream_worked(true, false, short, stall), "ended at once");
        assert!(!stream_worked(false, true, stall, stall), "never created");
    }

    #[test]
    fn a_probe_waits_a_fifth_of_the_stall_timeout_and_at_most_two_seconds() {
        assert_eq!(
            probe_timeout(Duration::from_secs(3)),
            Duration::from_millis(600)
        );
        assert_eq!(
            probe_timeout(Duration::from_secs(10)),
            Duration::from_secs(2)
        );
        assert_eq!(probe_timeout(Duration::from_secs(60)), PROBE_LIMIT);
    }

    #[test]
    fn the_probe_reads_one_key_of_the_range_counted_and_linearizable() {
        let req = probe_request(&KeyRange::prefix(b"p/"));
        assert_eq!(req.key, b"p/");
        assert!(req.range_end.is_empty(), "one key, not the whole prefix");
        assert!(req.count_only && req.limit == 1 && !req.serializable);
    }

    #[test]
    fn any_answer_of_the_server_shows_the_endpoint_alive() {
        assert_eq!(Probe::of(Ok(())), Probe::Answered);
        let denied = Error::Grpc {
            code: tonic::Code::PermissionDenied,
            message: "etcdserver: permission denied".into(),
            endpoint: "e:1".into(),
        };
        assert_eq!(Probe::of(Err(denied)), Probe::Answered);
    }

    #[test]
    fn no_answer_a_broken_connection_or_no_leader_is_silence() {
        let timeout = Error::Timeout {
            endpoint: "e:1".into(),
            after: Duration::from_millis(600),
        };
        assert_eq!(
            Probe::of(Err(timeout)),
            Probe::Silent("e:1: no response within 600ms".into())
        );
        let broken = Error::Connection {
            endpoint: "e:1".into(),
            reason: "connection reset".into(),
            source: None,
        };
        assert!(
            matches!(Probe::of(Err(broken)), Probe::Silent(why) if why.contains("connection reset"))
        );
        let no_leader = Error::Grpc {
            code: tonic::Code::Unavailable,
            message: "etcdserver: no leader".into(),
            endpoint: "e:1".into(),
        };
        assert!(
            matches!(Probe::of(Err(no_leader)), Probe::Silent(why) if why.contains("no leader"))
        );
    }

    #[test]
    fn only_an_endpoint_shown_alive_is_taken_for_a_grpc_proxy() {
        let (note, counted) = unanswered_progress_note(4, &Probe::Answered);
        assert!(counted);
        assert!(note.contains("none of 4 progress requests"), "{note}");
        assert!(note.contains("grpc-proxy"), "{note}");
        assert!(
            note.contains("--experimental-watch-progress-notify-interval"),
            "{note}"
        );

        let silent = Probe::Silent("e:1: no response within 600ms".into());
        let (note, counted) = unanswered_progress_note(4, &silent);
        assert!(!counted);
        assert!(
            !note.contains("grpc-proxy") && !note.contains("--experimental"),
            "{note}"
        );
        assert!(note.contains("its 4 progress request(s)"), "{note}");
        assert!(note.contains("(e:1: no response within 600ms)"), "{note}");
        assert!(note.contains("went silent"), "{note}");
    }
}
