//! Publication: the current state for lock-free readers, and per-subscriber
//! bounded queues fed in publication order.
//!
//! Publication and subscription take the same lock, so a new subscriber gets the
//! snapshot current at that instant and then exactly the updates published after
//! it. A run of revisions is published in one critical section: the state after
//! the last one, and a batch for each, in order. A subscriber whose queue is full
//! is not waited for: it is marked lagging, only the newest state is remembered
//! for it, and its next receive yields one resync diff from the last state it was
//! sent. Memory per subscriber is therefore bounded by its queue capacity plus two
//! states (and the unbuilt batches they link to, which the writer bounds).
//!
//! The published state is a snapshot, or a run's last batch whose snapshot is not
//! built yet: the writer then keeps its map to itself, and does not copy the path
//! to each key it changes next (see [`Hub::snapshot`]). The first reader to ask
//! builds it, by replaying the unbuilt batches on the nearest built state, and
//! makes it current for the readers after it.
//!
//! While no subscription is live, the writer may hold that lock across a run of
//! revisions ([`Hub::quiet`]) and publish only the state after the last: nobody
//! needs the batches and snapshots in between, and whoever subscribes meanwhile
//! waits and starts from the published state.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures::Stream;
use futures::task::AtomicWaker;
use tokio::sync::watch;

use super::batch::{Batch, ResyncReason, State, Update, diff};
use super::metrics::Metrics;
use super::snapshot::Snapshot;

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data
/// consistent at each step, so a panic elsewhere cannot leave it half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Hub<T> {
    /// The published state (see the module docs).
    current: ArcSwap<State<T>>,
    subscribers: Mutex<Subscribers<T>>,
    revision: watch::Sender<i64>,
    capacity: usize,
    metrics: Metrics,
}

struct Subscribers<T> {
    slots: Vec<Arc<Slot<T>>>,
    closed: bool,
}

struct Slot<T> {
    state: Mutex<SlotState<T>>,
    /// The waiting consumer. A subscription is received from through `&mut`, so
    /// there is at most one.
    waker: AtomicWaker,
}

struct SlotState<T> {
    queue: VecDeque<Update<T>>,
    /// The state the subscriber has once it drained `queue`.
    base: State<T>,
    /// While lagging: the newest state, to resync to.
    lagging: Option<State<T>>,
    closed: bool,
    dropped: bool,
}

impl<T> Hub<T> {
    pub(crate) fn new(initial: Arc<Snapshot<T>>, capacity: usize, metrics: Metrics) -> Self {
        let (revision, _) = watch::channel(initial.revision());
        Hub {
            current: ArcSwap::from_pointee(State::At(initial)),
            subscribers: Mutex::new(Subscribers {
                slots: Vec::new(),
                closed: false,
            }),
            revision,
            capacity: capacity.max(1),
            metrics,
        }
    }

    /// Most updates queued for one subscriber.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The current snapshot, lock-free: the writer is never waited for.
    ///
    /// If the published state is a batch whose snapshot is not built yet, this
    /// builds it (replaying at most the revisions the writer leaves unbuilt),
    /// and makes it current for the readers after it, unless a newer state was
    /// published meanwhile.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot<T>> {
        let current = self.current.load();
        match &**current {
            State::At(snapshot) => Arc::clone(snapshot),
            State::After(batch) => {
                let built = batch.snapshot();
                let at = Arc::new(State::At(Arc::clone(&built)));
                let _ = self.current.compare_and_swap(&*current, at);
                built
            }
        }
    }

    /// The published state, which is the writer's between two publications.
    pub(crate) fn state(&self) -> State<T> {
        State::clone(&self.current.load())
    }

    /// The published revision, for waiters.
    pub(crate) fn revision_watch(&self) -> watch::Receiver<i64> {
        self.revision.subscribe()
    }

    /// Makes `state` current and queues `updates` (which lead to it, in
    /// order) for every subscriber, in one critical section. `made_current` runs
    /// once readers can see `state` and before any subscriber or waiter is
    /// woken.
    ///
    /// A subscriber whose queue fills up part-way gets the updates that fit; it
    /// lags from there, and its resync starts from the state after the last one.
    pub(crate) fn publish(
        &self,
        state: State<T>,
        updates: &[Update<T>],
        made_current: impl FnOnce(),
    ) {
        let revision = state.revision();
        let mut subs = lock(&self.subscribers);
        let old = self.current.swap(Arc::new(state.clone()));
        made_current();
        subs.slots.retain(|slot| {
            let mut st = lock(&slot.state);
            if st.dropped {
                return false;
            }
            if st.lagging.is_none() {
                let room = self.capacity.saturating_sub(st.queue.len());
                let fit = &updates[..room.min(updates.len())];
                st.queue.extend(fit.iter().cloned());
                if fit.len() == updates.len() {
                    st.base = state.clone();
                } else {
                    // A bookmark changes no key: only a batch moves the base.
                    if let Some(Update::Batch(last)) = fit.last() {
                        st.base = State::After(Arc::clone(last));
                    }
                    st.lagging = Some(state.clone());
                    self.metrics.subscriber_lagged.inc();
                }
            } else {
                st.lagging = Some(state.clone());
            }
            drop(st);
            slot.waker.wake();
            true
        });
        self.metrics.subscribers.set(subs.slots.len() as i64);
        drop(subs);
        drop(old);
        self.revision.send_replace(revision);
    }

    /// Holds off new subscriptions while none is live, so that revisions can be
    /// applied without a batch (or a snapshot) each: nobody needs them until
    /// [`Quiet::publish`] makes the result current, and whoever subscribes
    /// meanwhile waits for that and starts from it. `None` while a subscription
    /// is live: then every revision gets its batch.
    ///
    /// The caller must not block or await while holding it: it should only apply
    /// the revisions already received and publish.
    pub(crate) fn quiet(&self) -> Option<Quiet<'_, T>> {
        let mut subs = lock(&self.subscribers);
        if !subs.slots.is_empty() {
            subs.slots.retain(|slot| !lock(&slot.state).dropped);
            self.metrics.subscribers.set(subs.slots.len() as i64);
            if !subs.slots.is_empty() {
                return None;
            }
        }
        Some(Quiet {
            hub: self,
            _subs: subs,
        })
    }

    /// A new subscription whose first update is the current snapshot.
    pub(crate) fn subscribe(self: &Arc<Self>) -> Subscription<T> {
        // Built before the lock, so that publication never waits for a replay:
        // under it the snapshot is only loaded, unless a run was published in
        // between (then one run is replayed).
        let _ = self.snapshot();
        let mut subs = lock(&self.subscribers);
        // No publication can come in between: it takes the same lock.
        let snapshot = self.snapshot();
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                queue: VecDeque::from([Update::Snapshot(Arc::clone(&snapshot))]),
                base: State::At(snapshot),
                lagging: None,
                closed: subs.closed,
                dropped: false,
            }),
            waker: AtomicWaker::new(),
        });
        subs.slots.push(Arc::clone(&slot));
        self.metrics.subscribers.set(subs.slots.len() as i64);
        Subscription {
            slot,
            metrics: self.metrics.clone(),
        }
    }

    /// Ends every subscription once its queue is drained.
    pub(crate) fn close(&self) {
        let mut subs = lock(&self.subscribers);
        subs.closed = true;
        for slot in subs.slots.drain(..) {
            lock(&slot.state).closed = true;
            slot.waker.wake();
        }
        self.metrics.subscribers.set(0);
    }
}

/// Publication while no subscription is live; from [`Hub::quiet`].
pub(crate) struct Quiet<'a, T> {
    hub: &'a Hub<T>,
    /// Held until published: a subscription made meanwhile would miss the
    /// revisions applied without batches.
    _subs: MutexGuard<'a, Subscribers<T>>,
}

impl<T> Quiet<'_, T> {
    /// Makes `state` current for readers and waiters, then lets subscriptions
    /// in (they start from it). `made_current` runs once readers can see `state`
    /// and before waiters are woken.
    pub(crate) fn publish(self, state: State<T>, made_current: impl FnOnce()) {
        let revision = state.revision();
        let hub = self.hub;
        let old = hub.current.swap(Arc::new(state));
        drop(self);
        made_current();
        // Freeing what only the old snapshot held happens outside the lock.
        drop(old);
        hub.revision.send_replace(revision);
    }
}

/// A stream of [`Update`]s from a mirror: first the snapshot current when it was
/// made, then every later batch and bookmark, in order. Dropping it unsubscribes.
///
/// Its buffer is bounded ([`MirrorConfig::subscriber_buffer`](super::MirrorConfig));
/// if the consumer falls further behind, updates are not queued and the next
/// [`recv`](Self::recv) yields one resync batch
/// ([`ResyncReason::SubscriberLagged`]) from the last state it received to the
/// current one.
///
/// It is also a [`Stream`], which ends when the mirror has shut down and
/// everything queued was received, so stream combinators apply:
///
/// ```no_run
/// use futures::{StreamExt, future};
/// use revwatch::client::ClientConfig;
/// use revwatch::mirror::{ClientSource, Mirror, Update};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let source = ClientSource::lazy(ClientConfig::new(["http://127.0.0.1:2379"]))?;
/// let mirror = Mirror::builder("config/").start(source).await?;
/// // The batches only: no first snapshot, no bookmarks.
/// let mut batches = mirror.subscribe().filter_map(|update| {
///     future::ready(match update {
///         Update::Batch(batch) => Some(batch),
///         Update::Snapshot(_) | Update::Progress(_) => None,
///     })
/// });
/// while let Some(batch) = batches.next().await {
///     println!("revision {}: {} changes", batch.revision, batch.changes.len());
/// }
/// # Ok(()) }
/// ```
pub struct Subscription<T> {
    slot: Arc<Slot<T>>,
    metrics: Metrics,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = lock(&self.slot.state);
        f.debug_struct("Subscription")
            .field("queued", &st.queue.len())
            .field("lagging", &st.lagging.is_some())
            .finish()
    }
}

impl<T> Subscription<T> {
    /// The next update; `None` once the mirror has shut down and everything queued
    /// was received. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Update<T>> {
        std::future::poll_fn(|cx| self.poll_update(cx)).await
    }

    /// The next update if one is ready now, without waiting.
    pub fn try_recv(&mut self) -> Option<Update<T>> {
        match self.try_next() {
            Next::Ready(u) => Some(u),
            Next::Closed | Next::Empty => None,
        }
    }

    /// True while updates are being skipped for this subscriber (a resync follows).
    pub fn is_lagging(&self) -> bool {
        lock(&self.slot.state).lagging.is_some()
    }

    /// [`recv`](Self::recv) and [`Stream::poll_next`]: all state is in the slot,
    /// so dropping a pending call loses nothing.
    fn poll_update(&mut self, cx: &mut Context<'_>) -> Poll<Option<Update<T>>> {
        if let Some(ready) = self.try_next().ready() {
            return Poll::Ready(ready);
        }
        self.slot.waker.register(cx.waker());
        // Checked again once registered: an update queued in between woke nobody.
        match self.try_next().ready() {
            Some(ready) => Poll::Ready(ready),
            None => Poll::Pending,
        }
    }

    fn try_next(&mut self) -> Next<T> {
        let mut st = lock(&self.slot.state);
        if let Some(u) = st.queue.pop_front() {
            return Next::Ready(u);
        }
        if let Some(latest) = st.lagging.take() {
            let from = std::mem::replace(&mut st.base, latest.clone());
            drop(st);
            // Built and computed by the consumer, outside any lock the mirror takes.
            let latest = latest.snapshot();
            let changes = diff(&from.snapshot(), &latest);
            self.metrics.subscriber_resyncs.inc();
            return Next::Ready(Update::Batch(Arc::new(Batch::new(
                latest.revision(),
                Some(ResyncReason::SubscriberLagged),
                changes,
                latest,
            ))));
        }
        if st.closed { Next::Closed } else { Next::Empty }
    }
}

enum Next<T> {
    Ready(Update<T>),
    Empty,
    Closed,
}

impl<T> Next<T> {
    /// What a receive returns, if it need not wait.
    fn ready(self) -> Option<Option<Update<T>>> {
        match self {
            Next::Ready(u) => Some(Some(u)),
            Next::Closed => Some(None),
            Next::Empty => None,
        }
    }
}

impl<T> Stream for Subscription<T> {
    type Item = Update<T>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Update<T>>> {
        self.get_mut().poll_update(cx)
    }
}

impl<T> Drop for Subscription<T> {
    fn drop(&mut self) {
        let mut st = lock(&self.slot.state);
        st.dropped = true;
        st.queue.clear();
        st.lagging = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures::StreamExt;
    use futures::task::{ArcWake, waker};

    use super::*;

    fn at(revision: i64) -> Arc<Snapshot<()>> {
        Arc::new(Snapshot::empty(revision))
    }

    fn hub(capacity: usize) -> Arc<Hub<()>> {
        Arc::new(Hub::new(at(1), capacity, Metrics::new()))
    }

    /// A waker that records being woken.
    #[derive(Default)]
    struct Woken(AtomicBool);

    impl ArcWake for Woken {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.store(true, Ordering::SeqCst);
        }
    }

    impl Woken {
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn a_subscription_streams_every_update_then_ends_on_close() {
        let hub = hub(8);
        let sub = hub.subscribe();
        hub.publish(State::At(at(2)), &[Update::Progress(2)], || {});
        hub.publish(State::At(at(3)), &[Update::Progress(3)], || {});
        hub.close();
        let revisions: Vec<i64> = sub.map(|u| u.revision()).collect().await;
        assert_eq!(revisions, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_lagging_stream_yields_one_resync_to_the_newest_state() {
        // The first snapshot fills the queue: both publications are skipped.
        let hub = hub(1);
        let mut sub = hub.subscribe();
        hub.publish(State::At(at(2)), &[Update::Progress(2)], || {});
        hub.publish(State::At(at(3)), &[Update::Progress(3)], || {});
        assert!(matches!(sub.next().await, Some(Update::Snapshot(s)) if s.revision() == 1));
        match sub.next().await {
            Some(Update::Batch(b)) => {
                assert_eq!(b.revision, 3);
                assert_eq!(b.resync, Some(ResyncReason::SubscriberLagged));
            }
            other => panic!("expected a resync batch, got {other:?}"),
        }
        hub.close();
        assert!(sub.next().await.is_none());
    }

    #[test]
    fn a_run_that_overflows_a_queue_delivers_what_fits_then_a_resync_from_there() {
        use crate::mirror::batch::ChangeKind;
        use crate::mirror::decode::{DecodePolicy, RawBytes};
        use crate::mirror::store::Writer;
        use crate::mirror::test_events::put_created;

        let mut w = Writer::new(
            &Snapshot::empty(1),
            Arc::new(RawBytes),
            DecodePolicy::DropKey,
        );
        let hub = Arc::new(Hub::new(w.current(), 3, Metrics::new()));
        let mut sub = hub.subscribe();
        // Revisions 2..=6 put keys a..e, as one run of batches.
        let mut before = State::At(w.current());
        let mut run = Vec::new();
        for (revision, key) in (2..=6).zip(["a", "b", "c", "d", "e"]) {
            let put = put_created(key, b"v", revision);
            let batch = w
                .apply_revision(revision, vec![put], before.clone())
                .unwrap();
            before = State::After(Arc::clone(&batch));
            run.push(Update::Batch(batch));
        }
        // Published as the writer does between snapshots it builds: the last
        // batch, unbuilt. The first reader builds it, and makes it current.
        hub.publish(before, &run, || {});
        assert!(matches!(hub.state(), State::After(_)));
        let current = hub.snapshot();
        assert_eq!((current.revision(), current.len()), (6, 5));
        assert!(matches!(hub.state(), State::At(s) if Arc::ptr_eq(&s, &current)));

        // The first snapshot took one of 3 places: revisions 2 and 3 fit.
        assert!(matches!(sub.try_recv(), Some(Update::Snapshot(s)) if s.revision() == 1));
        for revision in [2, 3] {
            match sub.try_recv() {
                Some(Update::Batch(b)) if b.resync.is_none() => {
                    assert_eq!(b.revision, revision);
                    assert_eq!(b.snapshot().len(), revision as usize - 1);
                }
                other => panic!("expected revision {revision}, got {other:?}"),
            }
        }
        // Then one resync from the state after revision 3: exactly c, d and e.
        match sub.try_recv() {
            Some(Update::Batch(b)) => {
                assert_eq!(
                    (b.revision, b.resync),
                    (6, Some(ResyncReason::SubscriberLagged))
                );
                let keys: Vec<&[u8]> = b.changes.iter().map(|c| &c.key[..]).collect();
                assert_eq!(keys, [b"c", b"d", b"e"]);
                assert!(
                    b.changes
                        .iter()
                        .all(|c| matches!(c.kind, ChangeKind::Put { prev: None, .. }))
                );
                assert_eq!(b.snapshot().len(), 5);
            }
            other => panic!("expected a resync, got {other:?}"),
        }
        assert!(sub.try_recv().is_none());
    }

    #[test]
    fn a_waiting_stream_is_woken_by_publication_and_by_close() {
        let hub = hub(8);
        let mut sub = hub.subscribe();
        let woken = Arc::new(Woken::default());
        let waker = waker(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut poll = |sub: &mut Subscription<()>| Pin::new(sub).poll_next(&mut cx);

        assert!(matches!(
            poll(&mut sub),
            Poll::Ready(Some(Update::Snapshot(_)))
        ));
        assert!(poll(&mut sub).is_pending());
        hub.publish(State::At(at(2)), &[Update::Progress(2)], || {});
        assert!(woken.take());
        assert!(matches!(
            poll(&mut sub),
            Poll::Ready(Some(Update::Progress(2)))
        ));

        assert!(poll(&mut sub).is_pending());
        hub.close();
        assert!(woken.take());
        assert!(matches!(poll(&mut sub), Poll::Ready(None)));
    }
}
