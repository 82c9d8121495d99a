//! A subscriber that records what it receives, can be told to stop reading
//! for a while (a slow subscriber), and follows the mirror across restarts.
//! The mirror's watch reconnects, read from its status, are recorded as
//! reconnect markers in the history, so that every resume is checked.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use revwatch::mirror::{Mirror, ResyncReason, Status, Subscription, Update};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::adapter::MirrorAdapter;

/// Every this many batches, the published snapshot is also kept whole.
const FULL_SNAPSHOT_EVERY: u64 = 64;
/// How often a paused or idle collector looks at its controls.
const POLL: Duration = Duration::from_millis(100);

/// Handle to a collector task.
#[derive(Debug)]
pub(super) struct Collector {
    /// New subscriptions (after a mirror restart) go here.
    subscriptions: mpsc::UnboundedSender<Feed>,
    paused: watch::Sender<bool>,
    target: watch::Sender<i64>,
    reached: watch::Receiver<i64>,
    counters: Arc<Counters>,
    task: JoinHandle<MirrorAdapter>,
}

/// One subscription and what goes with it.
#[derive(Debug)]
pub(super) struct Feed {
    sub: Subscription<Bytes>,
    /// The mirror's status, for its reconnects.
    status: watch::Receiver<Status>,
    /// For the subscription of a restarted mirror: the revision of the file it
    /// was given (`None`: no file). Unused for the first subscription.
    file: Option<i64>,
}

impl Feed {
    /// A new subscription of a running `mirror`.
    pub(super) fn new(mirror: &Mirror) -> Self {
        // Status first: a reconnect after it is then seen as a change.
        let status = mirror.status_changes();
        Self {
            sub: mirror.subscribe(),
            status,
            file: None,
        }
    }

    /// `sub`, made before a restarted `mirror`'s task ran, given a snapshot file
    /// at `file` (`None`: no file).
    pub(super) fn restarted(mirror: &Mirror, sub: Subscription<Bytes>, file: Option<i64>) -> Self {
        Self {
            sub,
            status: mirror.status_changes(),
            file,
        }
    }
}

/// What a collector has received, by kind.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Updates received.
    pub(super) updates: AtomicU64,
    /// Resyncs because this subscriber lagged.
    pub(super) lagged_resyncs: AtomicU64,
}

impl Collector {
    /// Starts collecting from `first`.
    pub(super) fn start(first: Feed) -> Self {
        let (subscriptions, subs_rx) = mpsc::unbounded_channel();
        // Cannot fail: the receiver is alive.
        let _ = subscriptions.send(first);
        let (paused, paused_rx) = watch::channel(false);
        let (target, target_rx) = watch::channel(i64::MAX);
        let (reached_tx, reached) = watch::channel(0);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(collect(
            subs_rx,
            paused_rx,
            target_rx,
            reached_tx,
            Arc::clone(&counters),
        ));
        Self {
            subscriptions,
            paused,
            target,
            reached,
            counters,
            task,
        }
    }

    /// Continues on `feed` once the current subscription ends.
    pub(super) fn resubscribe(&self, feed: Feed) {
        // Fails only if the task ended, which `finish` reports.
        let _ = self.subscriptions.send(feed);
    }

    pub(super) fn pause(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub(super) fn reached(&self) -> i64 {
        *self.reached.borrow()
    }

    pub(super) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Waits until the subscriber has reached `revision`.
    pub(super) async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.reached.clone();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|&r| r >= revision)).await,
            Ok(Ok(_))
        )
    }

    /// Stops once `revision` is reached and returns what was recorded.
    pub(super) async fn finish(
        self,
        revision: i64,
        timeout: Duration,
    ) -> Result<MirrorAdapter, String> {
        self.target.send_replace(revision);
        self.paused.send_replace(false);
        let abort = self.task.abort_handle();
        match tokio::time::timeout(timeout, self.task).await {
            Ok(Ok(adapter)) if adapter.known() >= revision => Ok(adapter),
            Ok(Ok(adapter)) => Err(format!(
                "the subscription ended at revision {}, before {revision}",
                adapter.known()
            )),
            Ok(Err(e)) => Err(format!("collector task failed: {e}")),
            Err(_) => {
                abort.abort();
                Err(format!(
                    "the subscriber did not reach revision {revision} within {timeout:?} (at {})",
                    *self.reached.borrow()
                ))
            }
        }
    }
}

/// Total watch reconnects in `status`.
fn reconnects(status: &Status) -> u64 {
    status.reconnects.values().sum()
}

async fn collect(
    mut subs: mpsc::UnboundedReceiver<Feed>,
    mut paused: watch::Receiver<bool>,
    target: watch::Receiver<i64>,
    reached: watch::Sender<i64>,
    counters: Arc<Counters>,
) -> MirrorAdapter {
    let mut adapter = MirrorAdapter::new();
    let mut batches = 0u64;
    let Some(Feed {
        mut sub,
        mut status,
        ..
    }) = subs.recv().await
    else {
        return adapter;
    };
    let mut seen = reconnects(&status.borrow_and_update());
    while adapter.known() < *target.borrow() {
        if *paused.borrow() {
            // A slow subscriber: not reading lets its queue overflow.
            let _ = tokio::time::timeout(POLL, paused.changed()).await;
            continue;
        }
        let update = match tokio::time::timeout(POLL, sub.recv()).await {
            Err(_) => continue,
            Ok(Some(update)) => update,
            Ok(None) => {
                // The mirror stopped (a restart): go on with the new one.
                match subs.recv().await {
                    Some(next) => {
                        sub = next.sub;
                        status = next.status;
                        seen = reconnects(&status.borrow_and_update());
                        adapter.restarted(next.file);
                        continue;
                    }
                    None => break,
                }
            }
        };
        // The mirror counts a reconnect before it publishes anything from the
        // new stream, so the marker comes before every batch of that stream
        // (and maybe before a few of the previous one, which is harmless:
        // they too must follow on exactly).
        if status.has_changed().unwrap_or(false) {
            let now = reconnects(&status.borrow_and_update());
            if now > seen {
                adapter.reconnected();
            }
            seen = now;
        }
        counters.updates.fetch_add(1, Ordering::Relaxed);
        if let Update::Batch(b) = &update {
            if b.resync == Some(ResyncReason::SubscriberLagged) {
                counters.lagged_resyncs.fetch_add(1, Ordering::Relaxed);
            }
            batches += 1;
            if batches.is_multiple_of(FULL_SNAPSHOT_EVERY) {
                adapter.push_full_snapshot(&b.snapshot());
            }
        }
        adapter.push(&update);
        reached.send_replace(adapter.known());
    }
    adapter
}
