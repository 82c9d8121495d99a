//! What subscribers receive, and the diff between two snapshots that a resync
//! delivers.

use std::sync::Arc;

use super::key::Key;
use super::snapshot::{Entry, Snapshot};

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
/// subscriber held before, it gives exactly [`snapshot`](Self::snapshot).
#[derive(Debug)]
pub struct Batch<T> {
    /// The revision the batch brings the subscriber to.
    pub revision: i64,
    /// `Some` for a resync (a diff between two states, possibly spanning many
    /// revisions); `None` for the events of exactly one revision.
    pub resync: Option<ResyncReason>,
    /// The changes, in etcd's order for a revision, in key order for a resync.
    /// A key appears at most once.
    pub changes: Vec<Change<T>>,
    /// The state after this batch.
    pub snapshot: Arc<Snapshot<T>>,
}

impl<T> Batch<T> {
    /// True for a resync batch.
    pub fn is_resync(&self) -> bool {
        self.resync.is_some()
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
