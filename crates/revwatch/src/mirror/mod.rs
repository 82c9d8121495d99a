//! A loss-free, revision-exact local mirror of an etcd key prefix.
//!
//! A [`Mirror`] lists a prefix, watches it, and publishes immutable [`Snapshot`]s
//! that readers load without locks, plus a stream of [`Update`]s for subscribers.
//!
//! ```no_run
//! use std::time::Duration;
//! use revwatch::client::ClientConfig;
//! use revwatch::mirror::{ClientSource, Mirror, Update};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let source = ClientSource::lazy(ClientConfig::new(["http://127.0.0.1:2379"]))?;
//! let mirror = Mirror::builder("config/").start(source).await?;
//! mirror.wait_ready().await?;
//!
//! // Lock-free reads.
//! let snap = mirror.snapshot();
//! if let Some(entry) = snap.get(b"config/feature-x") {
//!     println!("feature-x = {:?} at revision {}", entry.value, entry.mod_revision);
//! }
//!
//! // Read-your-writes: wait until the mirror has etcd's current state.
//! let snap = mirror.consistent_snapshot(Duration::from_secs(5)).await?;
//! println!("{} keys at revision {}", snap.len(), snap.revision());
//!
//! // Every change, in order.
//! let mut sub = mirror.subscribe();
//! while let Some(update) = sub.recv().await {
//!     match update {
//!         Update::Snapshot(s) => println!("start from {} keys at {}", s.len(), s.revision()),
//!         Update::Batch(b) => println!("revision {}: {} changes", b.revision, b.changes.len()),
//!         Update::Progress(r) => println!("nothing new up to {r}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # The contract
//!
//! 1. **Snapshots.** A snapshot published at revision R equals etcd's state of the
//!    prefix at R: keys, values, create_revision, mod_revision, version and lease.
//!    The only exception are keys whose value failed to decode (point 9), which
//!    are listed in [`Status::decode_failures`].
//! 2. **Monotonic revisions.** Published revisions never decrease, across
//!    reconnects, relists and lagging members. Every response header and event is
//!    validated: a created reply from a member behind the applied revision, an
//!    event that repeats or goes back from the applied revision (or a bookmark), an
//!    event above its header revision, or a list older than the published state is
//!    rejected, counted ([`Status::rejected_responses`]), never applied, and ends
//!    the stream: a bad header resumes elsewhere, a bad event relists.
//! 3. **Delivery.** Subscribers receive updates that are *ordered* (revisions only
//!    increase), *unique* (no (key, revision) twice), *atomic* (all events of one
//!    revision, such as one txn or one lease expiry, in one [`Batch`]; fragmented
//!    replies are reassembled first; no snapshot shows part of a revision),
//!    *reliable* (no gaps) and *resumable* (after a reconnect, delivery continues at
//!    exactly the next revision). *Bookmarkable:* after [`Update::Progress`] at R,
//!    nothing at or below R follows.
//! 4. **Listing.** The initial list is paginated ([`MirrorConfig::page_size`]),
//!    every page read at the first page's revision; the watch then starts at that
//!    revision + 1. Revision 0 is never used to mean "resume".
//! 5. **Resume and relist.** After a disconnect or stall the watch resumes at the
//!    last revision + 1 on any healthy endpoint, without relisting. The mirror
//!    relists only when etcd says the revision was compacted, or when an event
//!    fails validation. A relist publishes one atomic [`Batch`] marked as a resync
//!    holding exactly the difference: puts for new and changed keys, deletes for
//!    vanished keys. etcd accepts a watch starting *at* the compaction revision C
//!    but has dropped the deletes of revision C by then (it would deliver half of
//!    a txn); so a watch that replays history is checked with a count-only range
//!    at its start revision − 1, after its created reply and again once it has
//!    caught up, and relists (cause: compaction) if that range is compacted.
//! 6. **Stall detection.** While watching, a progress request is sent after
//!    [`MirrorConfig::progress_interval`] of silence; after
//!    [`MirrorConfig::stall_timeout`] (10 s by default) without any response the
//!    stream is dropped and the watch resumes. Progress replies are bookmarks: they
//!    advance the revision and are published as [`Update::Progress`]. Because
//!    etcd before 3.4.31 / 3.5.13 may answer a progress request before delivering
//!    events up to its revision, by default ([`ProgressTrust::Confirmed`]) a reply
//!    becomes a bookmark only once a read at its revision shows the range as the
//!    mirror holds it (when a reader waits, or every
//!    [`MirrorConfig::progress_verify_interval`]); replies not used as bookmarks
//!    are counted ([`Status::untrusted_progress`]), without reconnecting: they are
//!    harmless once ignored.
//! 7. **Readiness and status.** The state is [`State::Ready`] once a watch has
//!    caught up with the server revision at its creation: it delivered events or a
//!    bookmark up to that revision, or [`MirrorConfig::catch_up_grace`] passed.
//!    [`Mirror::wait_ready`] returns once Ready, or an error with the cause
//!    (permission denied, no endpoint reachable, ...) instead of hanging.
//!    [`Mirror::status`] reports the [`State`], revisions, lag, last event time,
//!    last error, reconnects and relists by cause, and decode failures. It is
//!    updated as each revision is published, before waiters and subscribers are
//!    woken: whoever has seen revision R (a snapshot, a batch, a returned
//!    `snapshot_at_least`) gets a status at R or later, and the snapshot is never
//!    older than the status.
//! 8. **Consistent reads.** [`Mirror::snapshot_at_least`] waits for a revision;
//!    [`Mirror::consistent_snapshot`] asks etcd for its current revision (a
//!    count-only range on the prefix) and waits for it, requesting progress while
//!    waiting. Both time out with [`MirrorError::Timeout`].
//! 9. **Typed decoding.** `Mirror<T>` decodes values with a [`Decoder`]; raw
//!    [`Bytes`] by default. A value that fails to decode is reported with key,
//!    revision and error (status and metrics) and handled by [`DecodePolicy`]:
//!    drop the key or keep its last good value. The watch never stops for it.
//! 10. **Persistence.** With [`MirrorConfig::snapshot_file`], the raw state is
//!     written atomically with a checksum, at most every
//!     [`MirrorConfig::snapshot_interval`]. At start the file is loaded and the
//!     watch resumes from its revision (no relist unless compacted).
//!     [`Mirror::shutdown`] writes a final file, so a clean restart resumes from
//!     the last published revision. While etcd is
//!     unreachable the loaded snapshot is served in [`State::Stale`]. A corrupt or
//!     foreign file is reported and ignored.
//! 11. **Readers and subscribers.** Readers load an `Arc<Snapshot>` without locks
//!     and get/range/iterate in key order. Publishing costs O(changed keys × log n)
//!     (a persistent map shares all unchanged structure; keys of up to 30 bytes are
//!     stored inline in its nodes, see [`Key`]). Readers (and
//!     [`Mirror::snapshot_at_least`]) may skip revisions: when replies are already
//!     waiting, the mirror applies them in a row (a run, bounded to a few
//!     milliseconds of work) and publishes the snapshot after the last one only,
//!     which spares a snapshot per revision; a skipped revision is never visible
//!     in part. Every applied revision still counts in metrics and status. A
//!     [`Subscription`] made at any time first receives the current snapshot,
//!     then every later update (one batch per revision, queued when its run is
//!     published), with no race; one made during a run with no other
//!     subscription live waits for the run to be published and starts from it.
//!     A batch's [`snapshot`](Batch::snapshot) is the exact state after it, built
//!     when first asked for (by replaying the run's changes on the state before
//!     it), so subscribers that read only the changes never pay for one. So is
//!     the current snapshot while subscriptions are live: the first
//!     [`Mirror::snapshot`] after new revisions builds it (replaying at most
//!     1,024 of them), and the readers after it load it; the mirror builds one
//!     itself every 1,024 revisions. Its map is thus not copied for snapshots
//!     nobody reads. A subscription's buffer is bounded: a slow subscriber never
//!     blocks the mirror; it is marked lagging and later receives one resync
//!     diff from the last state it received.
//! 12. **Metrics.** [`MirrorBuilder::register_metrics`] registers Prometheus
//!     metrics (streams opened, reconnects and relists by cause, events applied,
//!     revision, server revision, lag, apply latency, decode errors, subscriber lag
//!     and resyncs). Tracing spans `list` and `watch` cover listing and watching.

mod batch;
mod config;
mod decode;
mod digest;
mod error;
mod hub;
mod key;
mod metrics;
mod persist;
mod report;
pub mod snapshot;
pub mod source;
mod status;
mod store;
#[cfg(test)]
mod test_events;
mod watcher;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, watch};

pub use batch::{Batch, Change, ChangeKind, ResyncReason, Update, diff};
pub use config::{MirrorConfig, ProgressTrust};
pub use decode::{DecodeError, DecodeFailure, DecodePolicy, Decoder, RawBytes};
pub use digest::{Digest, DigestBuilder, DigestEntry, DigestError};
pub use error::{FailureKind, MirrorError};
pub use hub::Subscription;
pub use key::Key;
pub use persist::PersistError;
pub use snapshot::{Entry, Snapshot};
pub use source::{ClientSource, Source, WatchHandle};
#[cfg(feature = "test-util")]
pub use source::{MemoryOp, MemorySource};
pub use status::{LastError, ListProgress, LoadedSnapshot, ReconnectCause, State, Status};

use crate::client::{Error, RangeRequest};
use hub::Hub;
use metrics::Metrics;
use persist::{Persister, Restored};
use report::Reporter;
use store::Writer;
use watcher::{KeyRange, Publisher, Runner};

/// How often waiters re-request progress while waiting for a revision.
pub(crate) const WAIT_PROGRESS_INTERVAL: Duration = Duration::from_millis(25);

/// Configures and starts a [`Mirror`]; from [`Mirror::builder`].
pub struct MirrorBuilder<T> {
    prefix: Vec<u8>,
    config: MirrorConfig,
    decoder: Arc<dyn Decoder<T>>,
    metrics: Metrics,
}

impl<T> std::fmt::Debug for MirrorBuilder<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorBuilder")
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: Send + Sync + 'static> MirrorBuilder<T> {
    /// Replaces the configuration.
    pub fn config(mut self, config: MirrorConfig) -> Self {
        self.config = config;
        self
    }

    /// Decodes values with `decoder`, making a `Mirror<U>`.
    pub fn decoder<U: Send + Sync + 'static>(self, decoder: impl Decoder<U>) -> MirrorBuilder<U> {
        MirrorBuilder {
            prefix: self.prefix,
            config: self.config,
            decoder: Arc::new(decoder),
            metrics: self.metrics,
        }
    }

    /// Registers the mirror's metrics (prefixed `revwatch_mirror_`) in `registry`.
    pub fn register_metrics(self, registry: &mut Registry) -> Self {
        self.metrics.register(registry);
        self
    }

    /// Loads the snapshot file if configured, then starts mirroring from `source`
    /// on the current Tokio runtime. Fails only on an invalid configuration; a
    /// corrupt snapshot file is logged, reported in status and ignored.
    pub async fn start<S: Source>(self, source: S) -> Result<Mirror<T>, MirrorError> {
        let (mirror, _) = self.start_subscribed(source, 0).await?;
        Ok(mirror)
    }

    /// Like [`start`](Self::start), and also returns `subscribers` subscriptions
    /// made before the mirror's task runs: each first receives the state the
    /// mirror starts from (a loaded snapshot file's, or the empty state before the
    /// first list), then every update after it. With a snapshot file, that shows
    /// exactly where the mirror resumed; [`Mirror::subscribe`] after `start` may
    /// begin at a later state.
    ///
    /// ```no_run
    /// use std::path::PathBuf;
    /// use revwatch::client::ClientConfig;
    /// use revwatch::mirror::{ClientSource, Mirror, MirrorConfig, Update};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let source = ClientSource::lazy(ClientConfig::new(["http://127.0.0.1:2379"]))?;
    /// let config = MirrorConfig::default().with_snapshot_file(PathBuf::from("config.snapshot"));
    /// let (mirror, mut subs) = Mirror::builder("config/")
    ///     .config(config)
    ///     .start_subscribed(source, 1)
    ///     .await?;
    /// if let Some(Update::Snapshot(first)) = subs[0].recv().await {
    ///     // The file's state (revision 0 without one), then every change after it.
    ///     assert_eq!(first.revision(), mirror.status().loaded_snapshot.map_or(0, |f| f.revision));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start_subscribed<S: Source>(
        self,
        source: S,
        subscribers: usize,
    ) -> Result<(Mirror<T>, Vec<Subscription<T>>), MirrorError> {
        self.config.validate()?;
        let empty = Writer::new(
            &Snapshot::empty(0),
            Arc::clone(&self.decoder),
            self.config.decode_policy,
        );
        let restored =
            persist::restore(empty, self.config.snapshot_file.as_deref(), &self.prefix).await;
        Ok(self.spawn(source, restored, subscribers))
    }

    /// Starts the mirror's task from the `restored` state, with `subscribers`
    /// subscriptions made first.
    fn spawn<S: Source>(
        self,
        source: S,
        restored: Restored<T>,
        subscribers: usize,
    ) -> (Mirror<T>, Vec<Subscription<T>>) {
        let Restored {
            writer,
            status,
            loaded,
        } = restored;
        let reporter = Reporter::new(status, self.metrics);
        let hub = Arc::new(Hub::new(
            writer.current(),
            self.config.subscriber_buffer,
            reporter.metrics().clone(),
        ));
        let persister = self.config.snapshot_file.clone().map(|path| {
            Persister::new(
                path,
                self.prefix.clone(),
                self.config.snapshot_interval,
                loaded,
                reporter.clone(),
            )
        });
        let range = KeyRange::prefix(&self.prefix);
        let progress_wanted = Arc::new(Notify::new());
        let current_revision = current_revision_fn(source.clone(), range.clone());
        let (stop, stop_rx) = watch::channel(false);
        let (stopped_tx, stopped) = watch::channel(None);
        let runner = Runner {
            source,
            range,
            out: Publisher {
                writer,
                hub: Arc::clone(&hub),
                reporter: reporter.clone(),
                persister,
                max_reported_decode_failures: self.config.max_reported_decode_failures,
                unbuilt: 0,
            },
            config: self.config,
            progress_wanted: Arc::clone(&progress_wanted),
            loaded: loaded.is_some(),
            stop: stop_rx,
            stopped: stopped_tx,
        };
        let subscriptions = (0..subscribers).map(|_| hub.subscribe()).collect();
        let task = tokio::spawn(runner.run());
        let mirror = Mirror {
            shared: Arc::new(Shared {
                hub,
                reporter,
                progress_wanted,
                current_revision,
                task,
                stop,
                stopped,
            }),
        };
        (mirror, subscriptions)
    }
}

type RevisionFuture = futures::future::BoxFuture<'static, Result<i64, Error>>;
type RevisionFn = Box<dyn Fn() -> RevisionFuture + Send + Sync>;

/// etcd's current revision, from a count-only range on the prefix.
fn current_revision_fn<S: Source>(source: S, range: KeyRange) -> RevisionFn {
    Box::new(move || {
        let source = source.clone();
        let req = RangeRequest {
            key: range.key().to_vec(),
            range_end: range.range_end().to_vec(),
            count_only: true,
            ..RangeRequest::default()
        };
        Box::pin(async move {
            let resp = source.range(req).await?;
            Ok(resp.header.map_or(0, |h| h.revision))
        })
    })
}

/// A running mirror of one prefix. Cheap to clone; the mirror stops when the last
/// clone is dropped (subscriptions then end).
pub struct Mirror<T = Bytes> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Mirror<T> {
    fn clone(&self) -> Self {
        Mirror {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T> std::fmt::Debug for Mirror<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("status", &self.shared.reporter.status())
            .finish_non_exhaustive()
    }
}

struct Shared<T> {
    hub: Arc<Hub<T>>,
    reporter: Reporter,
    progress_wanted: Arc<Notify>,
    current_revision: RevisionFn,
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<Option<Result<(), MirrorError>>>,
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mirror<Bytes> {
    /// A builder for a mirror of `prefix` with raw values; see
    /// [`MirrorBuilder::decoder`] for typed values.
    pub fn builder(prefix: impl Into<Vec<u8>>) -> MirrorBuilder<Bytes> {
        MirrorBuilder {
            prefix: prefix.into(),
            config: MirrorConfig::default(),
            decoder: Arc::new(RawBytes),
            metrics: Metrics::new(),
        }
    }
}

impl<T: Send + Sync + 'static> Mirror<T> {
    /// The current snapshot. Lock-free: it never waits for the mirror. While
    /// subscriptions are live, the first call after new revisions may build it,
    /// by replaying their changes (at most 1,024 revisions); the calls after it
    /// return the same `Arc`.
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        self.shared.hub.snapshot()
    }

    /// A subscription: the current snapshot first, then every later update.
    ///
    /// While the mirror applies a run of replies without publishing each
    /// revision (only possible while no subscription is live, see point 11 of
    /// the contract), this waits until the run is published: at most a few
    /// milliseconds.
    pub fn subscribe(&self) -> Subscription<T> {
        self.shared.hub.subscribe()
    }

    /// Stops the mirror, for every clone of this handle: ends the watch, writes a
    /// final snapshot file if one is configured (so that a restart resumes from
    /// the last published revision, not from the last timed write), and ends
    /// subscriptions. Reads keep working on the last snapshot; waits return
    /// [`MirrorError::Closed`]. Dropping the last handle instead stops the mirror
    /// without the final write.
    ///
    /// Fails with [`MirrorError::Persist`] if the final write fails (a second call,
    /// from another clone, reports the same outcome).
    pub async fn shutdown(self) -> Result<(), MirrorError> {
        self.shared.stop.send_replace(true);
        let mut stopped = self.shared.stopped.clone();
        let outcome = match stopped.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Err(MirrorError::Closed)),
            // The task ended without reporting: it panicked.
            Err(_) => Err(MirrorError::Closed),
        };
        self.shared.hub.close();
        outcome
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.shared.reporter.status()
    }

    /// A receiver notified on state changes, relists, reconnects and errors (not on
    /// every revision; [`status`](Self::status) has the live figures).
    pub fn status_changes(&self) -> watch::Receiver<Status> {
        self.shared.reporter.subscribe()
    }

    /// Waits until the mirror watches etcd and has caught up with it (state
    /// [`State::Ready`]). Returns
    /// [`MirrorError::NotReady`] with the cause as soon as an attempt to list or
    /// watch fails (the mirror keeps retrying; call again to wait for the next
    /// outcome). Wrap in `tokio::time::timeout` to bound the wait.
    pub async fn wait_ready(&self) -> Result<(), MirrorError> {
        let mut rx = self.shared.reporter.subscribe();
        loop {
            {
                let s = rx.borrow_and_update();
                if s.state == State::Ready {
                    return Ok(());
                }
                if let Some(f) = &s.failing {
                    return Err(MirrorError::NotReady {
                        kind: f.kind,
                        message: f.message.clone(),
                    });
                }
            }
            if self.shared.task.is_finished() || rx.changed().await.is_err() {
                return Err(MirrorError::Closed);
            }
        }
    }

    /// A snapshot at `revision` or later, waiting up to `timeout` for the mirror to
    /// get there (requesting progress from etcd meanwhile, so that a revision
    /// without changes in the prefix is reached too). `Duration::MAX` waits without a
    /// deadline.
    pub async fn snapshot_at_least(
        &self,
        revision: i64,
        timeout: Duration,
    ) -> Result<Arc<Snapshot<T>>, MirrorError> {
        // `None`: a timeout too long for the clock (`Duration::MAX`) waits for ever.
        let deadline = Instant::now().checked_add(timeout);
        let mut rx = self.shared.hub.revision_watch();
        loop {
            if *rx.borrow_and_update() >= revision {
                return Ok(self.snapshot());
            }
            if self.shared.task.is_finished() {
                return Err(MirrorError::Closed);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(MirrorError::Timeout {
                    wanted: Some(revision),
                    reached: self.snapshot().revision(),
                    after: timeout,
                });
            }
            self.shared.progress_wanted.notify_one();
            let left = deadline.map_or(WAIT_PROGRESS_INTERVAL, |d| d - now);
            let wait = left.min(WAIT_PROGRESS_INTERVAL);
            // A timeout here only means "ask for progress again".
            let _ = tokio::time::timeout(wait, rx.changed()).await;
        }
    }

    /// A snapshot at least as new as etcd's current revision (read-your-writes for
    /// anything acknowledged before the call), waiting up to `timeout`.
    pub async fn consistent_snapshot(
        &self,
        timeout: Duration,
    ) -> Result<Arc<Snapshot<T>>, MirrorError> {
        let started = Instant::now();
        let revision = tokio::time::timeout(timeout, (self.shared.current_revision)())
            .await
            .map_err(|_| MirrorError::Timeout {
                wanted: None,
                reached: self.snapshot().revision(),
                after: timeout,
            })?
            .map_err(|e| MirrorError::Source(Arc::new(e)))?;
        // What etcd just said counts as seen: a stalled mirror now shows its lag.
        self.shared.reporter.server_revision(revision);
        self.snapshot_at_least(revision, timeout.saturating_sub(started.elapsed()))
            .await
            .map_err(|e| match e {
                MirrorError::Timeout {
                    wanted, reached, ..
                } => MirrorError::Timeout {
                    wanted,
                    reached,
                    after: timeout,
                },
                other => other,
            })
    }
}

impl<T> Drop for Mirror<T> {
    fn drop(&mut self) {
        // The last handle: end subscriptions (the task is aborted by `Shared`).
        if Arc::strong_count(&self.shared) == 1 {
            self.shared.hub.close();
        }
    }
}
