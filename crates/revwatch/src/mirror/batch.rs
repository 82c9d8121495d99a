//! What subscribers receive, and the diff between two snapshots that a resync
//! delivers.

use std::sync::{Arc, Mutex, MutexGuard};

use super::key::Key;
use super::snapshot::{Entry, Map, Slot, Snapshot};

/// One key's change.
#[derive(Debug)]
pub struct Change<T> {
    /// The key.
    pub key: Key,
    /// What happened to it.
    pub kind: ChangeKind<T>,
}

impl<T> Clone for Change<T> {
    fn clone(&self) -> Self {
        Change {
            key: self.key.clone(),
            kind: self.kind.clone(),
        }
    }
}

/// A put or a delete, with the previous entry when the mirror held one.
#[derive(Debug)]
pub enum ChangeKind<T> {
    /// The key was created or updated (or, in a resync, differs from before).
    Put {
        /// The new entry.
        entry: Arc<Entry<T>>,
        /// The entry it replaces, if the key was present.
        prev: Option<Arc<Entry<T>>>,
    },
    /// The key was deleted (or, in a resync, has vanished).
    Delete {
        /// The entry it removes, if the key was present.
        prev: Option<Arc<Entry<T>>>,
    },
}

impl<T> Clone for ChangeKind<T> {
    fn clone(&self) -> Self {
        match self {
            ChangeKind::Put { entry, prev } => ChangeKind::Put {
                entry: Arc::clone(entry),
                prev: prev.clone(),
            },
            ChangeKind::Delete { prev } => ChangeKind::Delete { prev: prev.clone() },
        }
    }
}

impl<T> ChangeKind<T> {
    /// True for a put.
    pub fn is_put(&self) -> bool {
        matches!(self, ChangeKind::Put { .. })
    }
}

/// Why a batch is a resync rather than one etcd revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResyncReason {
    /// The first list of the prefix (from an empty state, or from a loaded snapshot file).
    InitialList,
    /// The mirror relisted because the revision it needed was compacted.
    Compacted,
    /// The mirror relisted because a response failed validation.
    Validation,
    /// This subscriber fell behind and its buffer overflowed; the batch brings it
    /// from the last state it received to the current one.
    SubscriberLagged,
}

impl ResyncReason {
    /// A short lowercase name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::InitialList => "initial_list",
            ResyncReason::Compacted => "compacted",
            ResyncReason::Validation => "validation",
            ResyncReason::SubscriberLagged => "subscriber_lagged",
        }
    }
}

/// The changes of one etcd revision, or a resync: applied to the state the
/// subscriber held before, they give exactly [`snapshot`](Self::snapshot).
///
/// The snapshot is built when first asked for, then kept. A mirror with live
/// subscriptions applies the revisions it has already received in a row and
/// makes only the state after the last one current (itself built only when
/// asked for, or every 1,024 revisions); each batch keeps a link to the state
/// before it, and [`snapshot`](Self::snapshot) replays the changes from the
/// nearest state already built. A subscriber that reads only `changes` (as
/// `revwatch tail` does) never pays for a snapshot per revision; one that reads
/// every batch's snapshot pays one step of replay per batch: a copy of the path
/// to each changed key, as publishing every snapshot did. One that reads only
/// the newest batch's snapshot now and then replays the changes since its last
/// read.
pub struct Batch<T> {
    /// The revision the batch brings the subscriber to.
    pub revision: i64,
    /// `Some` for a resync (a diff between two states, possibly spanning many
    /// revisions); `None` for the events of exactly one revision.
    pub resync: Option<ResyncReason>,
    /// The changes, in etcd's order for a revision, in key order for a resync.
    /// A key appears at most once.
    pub changes: Vec<Change<T>>,
    /// The state after this batch, or how to build it.
    after: Mutex<After<T>>,
}

/// How a batch's snapshot is had.
enum After<T> {
    /// Built (or given).
    Built(Arc<Snapshot<T>>),
    /// Not built yet: the batch's changes applied to this state.
    Replay(State<T>),
    /// Only while the batch is being dropped (see its `Drop`).
    Unlinked,
}

/// A state a batch applies to, or a subscriber is at: a snapshot, or the state
/// after a batch (whose snapshot may not be built yet).
pub(crate) enum State<T> {
    At(Arc<Snapshot<T>>),
    After(Arc<Batch<T>>),
}

impl<T> Clone for State<T> {
    fn clone(&self) -> Self {
        match self {
            State::At(s) => State::At(Arc::clone(s)),
            State::After(b) => State::After(Arc::clone(b)),
        }
    }
}

impl<T> State<T> {
    /// The state as a snapshot, built if needed.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot<T>> {
        match self {
            State::At(s) => Arc::clone(s),
            State::After(b) => b.snapshot(),
        }
    }

    /// The revision the state is at.
    pub(crate) fn revision(&self) -> i64 {
        match self {
            State::At(s) => s.revision(),
            State::After(b) => b.revision,
        }
    }
}

/// Locks a mutex, ignoring poisoning: a batch's state is replaced in one step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T> Batch<T> {
    /// A batch whose snapshot is known.
    pub(crate) fn new(
        revision: i64,
        resync: Option<ResyncReason>,
        changes: Vec<Change<T>>,
        snapshot: Arc<Snapshot<T>>,
    ) -> Self {
        Batch {
            revision,
            resync,
            changes,
            after: Mutex::new(After::Built(snapshot)),
        }
    }

    /// The events of one revision, applied to `before`; the snapshot is built
    /// when asked for.
    pub(crate) fn replayed(revision: i64, changes: Vec<Change<T>>, before: State<T>) -> Self {
        Batch {
            revision,
            resync: None,
            changes,
            after: Mutex::new(After::Replay(before)),
        }
    }

    /// Gives the batch its snapshot, built elsewhere (the state published after
    /// it): a later [`snapshot`](Self::snapshot) replays nothing.
    pub(crate) fn set_snapshot(&self, snapshot: Arc<Snapshot<T>>) {
        debug_assert_eq!(snapshot.revision(), self.revision);
        let mut after = lock(&self.after);
        let before = std::mem::replace(&mut *after, After::Built(snapshot));
        drop(after);
        drop(before);
    }

    /// True for a resync batch.
    pub fn is_resync(&self) -> bool {
        self.resync.is_some()
    }

    /// The state after this batch, at [`revision`](Self::revision). Built on the
    /// first call (from the nearest earlier state already built), then shared:
    /// every call returns the same `Arc`.
    pub fn snapshot(&self) -> Arc<Snapshot<T>> {
        let mut link = match self.built_or_before() {
            Ok(built) => return built,
            Err(before) => before,
        };
        // Walk back to a built state, then replay forward.
        let mut pending = Vec::new();
        let base = loop {
            let batch = match link {
                State::At(s) => break s,
                State::After(b) => b,
            };
            link = match batch.built_or_before() {
                Ok(built) => break built,
                Err(before) => before,
            };
            pending.push(batch);
        };
        let mut entries = base.entries.clone();
        for batch in pending.iter().rev() {
            replay(&mut entries, &batch.changes);
        }
        replay(&mut entries, &self.changes);
        let built = Arc::new(Snapshot {
            revision: self.revision,
            entries,
        });
        let mut after = lock(&self.after);
        if let After::Built(s) = &*after {
            // Built by another caller meanwhile: theirs is the one shared.
            return Arc::clone(s);
        }
        // The link to the state before goes: earlier batches are freed with
        // their last holder.
        let before = std::mem::replace(&mut *after, After::Built(Arc::clone(&built)));
        drop(after);
        drop(before);
        built
    }
}

impl<T> Batch<T> {
    /// The snapshot if built, else the state this batch applies to.
    fn built_or_before(&self) -> Result<Arc<Snapshot<T>>, State<T>> {
        match &*lock(&self.after) {
            After::Built(s) => Ok(Arc::clone(s)),
            After::Replay(before) => Err(before.clone()),
            After::Unlinked => unreachable!("a batch is unlinked only while dropped"),
        }
    }
}

/// Applies `changes` to `entries`, as the writer applied them.
fn replay<T>(entries: &mut Map<T>, changes: &[Change<T>]) {
    for change in changes {
        match &change.kind {
            ChangeKind::Put { entry, .. } => {
                entries.insert(change.key.clone(), Slot(Arc::clone(entry)));
            }
            ChangeKind::Delete { .. } => {
                entries.remove(&change.key[..]);
            }
        }
    }
}

impl<T> Drop for Batch<T> {
    /// Frees a chain of unbuilt batches one at a time: dropped recursively, a
    /// long run of them could overflow the stack.
    fn drop(&mut self) {
        let mut next = unlink(self.after.get_mut().unwrap_or_else(|e| e.into_inner()));
        while let Some(batch) = next {
            next = match Arc::try_unwrap(batch) {
                Ok(mut batch) => unlink(batch.after.get_mut().unwrap_or_else(|e| e.into_inner())),
                Err(_) => None,
            };
        }
    }
}

/// Takes the batch `after` replays from, if it is one; what else it held goes.
fn unlink<T>(after: &mut After<T>) -> Option<Arc<Batch<T>>> {
    match std::mem::replace(after, After::Unlinked) {
        After::Replay(State::After(batch)) => Some(batch),
        After::Built(_) | After::Replay(State::At(_)) | After::Unlinked => None,
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let built = matches!(&*lock(&self.after), After::Built(_));
        f.debug_struct("Batch")
            .field("revision", &self.revision)
            .field("resync", &self.resync)
            .field("changes", &self.changes)
            .field("snapshot_built", &built)
            .finish()
    }
}

/// One delivery to a [`Subscription`](super::Subscription).
#[derive(Debug)]
pub enum Update<T> {
    /// The first delivery: the state when the subscription was made. Every later
    /// batch applies on top of it.
    Snapshot(Arc<Snapshot<T>>),
    /// The changes of one revision, or a resync.
    Batch(Arc<Batch<T>>),
    /// A bookmark: etcd confirmed there is no change in the prefix up to this
    /// revision beyond those already delivered. Nothing at or below it follows.
    Progress(i64),
}

impl<T> Clone for Update<T> {
    fn clone(&self) -> Self {
        match self {
            Update::Snapshot(s) => Update::Snapshot(Arc::clone(s)),
            Update::Batch(b) => Update::Batch(Arc::clone(b)),
            Update::Progress(r) => Update::Progress(*r),
        }
    }
}

impl<T> Update<T> {
    /// The state the subscriber is at after this update: the first snapshot, or
    /// the batch's (built if needed); `None` for a bookmark, which changes no key.
    pub fn snapshot(&self) -> Option<Arc<Snapshot<T>>> {
        match self {
            Update::Snapshot(s) => Some(Arc::clone(s)),
            Update::Batch(b) => Some(b.snapshot()),
            Update::Progress(_) => None,
        }
    }

    /// The revision the subscriber is at after this update.
    pub fn revision(&self) -> i64 {
        match self {
            Update::Snapshot(s) => s.revision(),
            Update::Batch(b) => b.revision,
            Update::Progress(r) => *r,
        }
    }
}

/// The changes that turn `old` into `new`: puts for new and changed keys (changed
/// meaning another etcd key version), deletes for vanished keys, in key order.
/// Shared subtrees are skipped, so the cost follows the difference, not the size.
pub fn diff<T>(old: &Snapshot<T>, new: &Snapshot<T>) -> Vec<Change<T>> {
    use imbl::ordmap::DiffItem;
    old.entries
        .diff(&new.entries)
        .map(|item| match item {
            DiffItem::Add(k, v) => Change {
                key: k.clone(),
                kind: ChangeKind::Put {
                    entry: Arc::clone(&v.0),
                    prev: None,
                },
            },
            DiffItem::Update { old, new } => Change {
                key: new.0.clone(),
                kind: ChangeKind::Put {
                    entry: Arc::clone(&new.1.0),
                    prev: Some(Arc::clone(&old.1.0)),
                },
            },
            DiffItem::Remove(k, v) => Change {
                key: k.clone(),
                kind: ChangeKind::Delete {
                    prev: Some(Arc::clone(&v.0)),
                },
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use etcd_proto::mvccpb::{self, event::EventType};
    use proptest::prelude::*;

    use super::*;
    use crate::mirror::decode::{DecodeError, DecodePolicy, Decoder};
    use crate::mirror::store::Writer;

    /// Decodes UTF-8; anything else fails, so that decode failures are replayed too.
    fn utf8() -> Arc<dyn Decoder<String>> {
        Arc::new(|_key: &[u8], value: &[u8]| -> Result<String, DecodeError> {
            Ok(std::str::from_utf8(value)?.to_owned())
        })
    }

    /// One event: a put of `value` (invalid UTF-8 when `None`) or a delete.
    #[derive(Debug, Clone)]
    enum Op {
        Put(u8, Option<u8>),
        Delete(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..6u8, proptest::option::weighted(0.8, any::<u8>())).prop_map(|(k, v)| Op::Put(k, v)),
            1 => (0..6u8).prop_map(Op::Delete),
        ]
    }

    fn event(op: &Op, revision: i64) -> mvccpb::Event {
        let (kind, key, value) = match op {
            Op::Put(k, Some(v)) => (EventType::Put, *k, format!("v{v}").into_bytes()),
            Op::Put(k, None) => (EventType::Put, *k, vec![0xff]),
            Op::Delete(k) => (EventType::Delete, *k, Vec::new()),
        };
        mvccpb::Event {
            r#type: kind as i32,
            kv: Some(mvccpb::KeyValue {
                key: format!("k{key}").into_bytes(),
                value,
                create_revision: revision,
                mod_revision: revision,
                version: 1,
                lease: 0,
            }),
            prev_kv: None,
        }
    }

    /// A snapshot's content, comparable.
    fn content(s: &Snapshot<String>) -> (i64, Vec<(Vec<u8>, String, i64)>) {
        let entries = s
            .iter()
            .map(|(k, e)| (k.to_vec(), e.value.clone(), e.mod_revision))
            .collect();
        (s.revision(), entries)
    }

    /// A run's batches, and the writer's exact state after each one (the truth).
    struct Run {
        batches: Vec<Arc<Batch<String>>>,
        truth: Vec<Arc<Snapshot<String>>>,
    }

    /// Applies `revisions` as one run.
    fn run(policy: DecodePolicy, revisions: &[Vec<Op>]) -> Run {
        let mut w = Writer::new(&Snapshot::empty(1), utf8(), policy);
        let mut before = State::At(w.current());
        let (mut batches, mut truth) = (Vec::new(), Vec::new());
        for (n, ops) in revisions.iter().enumerate() {
            let revision = n as i64 + 2;
            let events = ops.iter().map(|op| event(op, revision)).collect();
            let batch = w.apply_revision(revision, events, before.clone()).unwrap();
            before = State::After(Arc::clone(&batch));
            batches.push(batch);
            truth.push(w.current());
        }
        Run { batches, truth }
    }

    proptest! {
        /// Whatever the order batches are asked for (and whichever never are),
        /// each builds exactly the writer's state after it, and keeps it.
        #[test]
        fn a_batch_builds_the_state_after_it_in_any_order(
            revisions in proptest::collection::vec(proptest::collection::vec(op(), 0..4), 1..40),
            asked in proptest::collection::vec(any::<prop::sample::Index>(), 0..60),
            keep_last_good in any::<bool>(),
        ) {
            let policy = if keep_last_good { DecodePolicy::KeepLastGood } else { DecodePolicy::DropKey };
            let Run { batches, truth } = run(policy, &revisions);
            for index in asked {
                let i = index.index(batches.len());
                let built = batches[i].snapshot();
                prop_assert_eq!(content(&built), content(&truth[i]));
                prop_assert!(Arc::ptr_eq(&built, &batches[i].snapshot()), "built once, then shared");
            }
            // Replaying each batch's changes on the state before gives the truth too.
            let last = batches.len() - 1;
            prop_assert_eq!(content(&batches[last].snapshot()), content(&truth[last]));
        }
    }

    #[test]
    fn an_updates_snapshot_is_the_state_after_it_and_a_bookmark_has_none() {
        let Run { batches, truth } = run(DecodePolicy::DropKey, &[vec![Op::Put(1, Some(7))]]);
        let first = Arc::new(Snapshot::<String>::empty(1));
        let got = Update::Snapshot(Arc::clone(&first)).snapshot();
        assert!(got.is_some_and(|s| Arc::ptr_eq(&s, &first)));
        let got = Update::Batch(Arc::clone(&batches[0])).snapshot();
        assert_eq!(got.map(|s| content(&s)), Some(content(&truth[0])));
        assert!(Update::<String>::Progress(5).snapshot().is_none());
    }

    #[test]
    fn threads_asking_for_the_same_batches_get_one_shared_exact_snapshot_each() {
        let revisions: Vec<Vec<Op>> = (0..400u32)
            .map(|n| {
                vec![match n % 7 {
                    0 => Op::Delete((n % 6) as u8),
                    3 => Op::Put((n % 6) as u8, None),
                    _ => Op::Put((n % 6) as u8, Some(n as u8)),
                }]
            })
            .collect();
        let Run { batches, truth } = run(DecodePolicy::DropKey, &revisions);
        let built: Vec<Vec<Arc<Snapshot<String>>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|t| {
                    let batches = &batches;
                    // Each thread walks the batches from another starting point.
                    s.spawn(move || {
                        let n = batches.len();
                        let mut got: Vec<_> = (0..n)
                            .map(|i| (i * 7 + t * 101) % n)
                            .map(|i| (i, batches[i].snapshot()))
                            .collect();
                        got.sort_by_key(|(i, _)| *i);
                        got.into_iter().map(|(_, s)| s).collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for (i, want) in truth.iter().enumerate() {
            assert_eq!(content(&built[0][i]), content(want), "revision {}", i + 2);
            for other in &built[1..] {
                assert!(
                    Arc::ptr_eq(&built[0][i], &other[i]),
                    "one snapshot per batch"
                );
            }
        }
    }

    #[test]
    fn a_long_chain_of_unbuilt_batches_is_freed_without_deep_recursion() {
        // On a small stack: dropped recursively, this chain would overflow it.
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(|| {
                let base = State::At(Arc::new(Snapshot::<String>::empty(1)));
                let mut last = Arc::new(Batch::replayed(2, Vec::new(), base));
                for revision in 3..200_000 {
                    let before = State::After(last);
                    last = Arc::new(Batch::replayed(revision, Vec::new(), before));
                }
                assert_eq!(last.snapshot().revision(), 199_999);
                // Built: the link is gone, and what it held is freed now.
                drop(last);

                let base = State::At(Arc::new(Snapshot::<String>::empty(1)));
                let mut last = Arc::new(Batch::replayed(2, Vec::new(), base));
                for revision in 3..200_000 {
                    last = Arc::new(Batch::replayed(revision, Vec::new(), State::After(last)));
                }
                drop(last);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
