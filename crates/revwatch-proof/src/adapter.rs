//! From the mirror's subscriber updates to the checker's neutral history.
//!
//! The adapter only renames fields: what is checked is what the mirror
//! delivered. It follows the subscriber's state so that a full
//! [`Update::Snapshot`] (which a subscriber receives first) becomes the
//! resync batch it amounts to: the diff from what the subscriber had.

use revwatch::mirror::{
    Batch as MirrorBatch, ChangeKind, Entry as MirrorEntry, ResyncReason, Snapshot, Update,
};

use crate::history::{
    Batch, Change, Delivery, Entry, FullSnapshot, History, Resync, SnapshotObservation,
};
use crate::state::State;

/// Builds a [`History`] from a subscription's updates.
#[derive(Debug, Default)]
pub struct MirrorAdapter {
    state: State,
    history: History,
    /// The highest revision delivered (batch or progress).
    known: i64,
}

/// The raw state of a mirror snapshot.
pub fn state_of<T>(snapshot: &Snapshot<T>) -> State {
    snapshot
        .iter()
        .map(|(k, e)| (k.to_vec(), entry_of(e)))
        .collect()
}

fn entry_of<T>(e: &MirrorEntry<T>) -> Entry {
    Entry {
        value: e.raw.to_vec(),
        create_revision: e.create_revision,
        mod_revision: e.mod_revision,
        version: e.version,
        lease: e.lease,
    }
}

impl MirrorAdapter {
    /// An adapter for a subscriber that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one update as a delivery, and the snapshot published with a
    /// batch as a snapshot observation (its hash costs O(keys)).
    pub fn push<T>(&mut self, update: &Update<T>) {
        let delivery = match update {
            Update::Snapshot(s) => {
                let target = state_of(s);
                let changes = self.state.diff(&target);
                // An empty first state at the subscriber's revision (a mirror
                // that has not listed yet) tells it nothing: not a delivery.
                if s.revision() == self.known && changes.is_empty() {
                    return;
                }
                self.state = target;
                Delivery::Batch(Batch {
                    revision: s.revision(),
                    resync: Some(Resync::Subscribed),
                    changes,
                })
            }
            Update::Batch(b) => {
                let batch = convert(b);
                self.state.apply_all(&batch.changes);
                let snapshot = b.snapshot();
                self.history.snapshots.push(SnapshotObservation {
                    revision: snapshot.revision(),
                    hash: state_of(&snapshot).hash(),
                });
                Delivery::Batch(batch)
            }
            Update::Progress(r) => Delivery::Progress { revision: *r },
        };
        self.known = self.known.max(update.revision());
        self.history.deliveries.push(delivery);
    }

    /// Marks that the mirror reconnected to etcd: what follows must continue
    /// exactly where it was, or be an explained resync.
    pub fn reconnected(&mut self) {
        self.history.deliveries.push(Delivery::Reconnected);
    }

    /// Marks that the subscriber moved to a new subscription of a restarted
    /// mirror, given a snapshot file at `file` (`None`: no file): it starts
    /// over from an empty state.
    pub fn restarted(&mut self, file: Option<i64>) {
        self.state = State::default();
        self.known = 0;
        self.history.restarts.push((
            self.history.snapshots.len(),
            self.history.full_snapshots.len(),
        ));
        self.history.deliveries.push(Delivery::Restarted { file });
    }

    /// The highest revision delivered so far.
    pub fn known(&self) -> i64 {
        self.known
    }

    /// Records a full published snapshot for comparison with truth.
    pub fn push_full_snapshot<T>(&mut self, snapshot: &Snapshot<T>) {
        self.history.full_snapshots.push(FullSnapshot {
            revision: snapshot.revision(),
            state: state_of(snapshot),
        });
    }

    /// The history so far.
    pub fn into_history(self) -> History {
        self.history
    }
}

fn convert<T>(b: &MirrorBatch<T>) -> Batch {
    let changes = b
        .changes
        .iter()
        .map(|c| match &c.kind {
            ChangeKind::Put { entry, .. } => Change::put(c.key.to_vec(), entry_of(entry)),
            ChangeKind::Delete { .. } => Change::delete(c.key.to_vec()),
        })
        .collect();
    Batch {
        revision: b.revision,
        resync: b.resync.map(|r| match r {
            ResyncReason::InitialList => Resync::InitialList,
            ResyncReason::Compacted => Resync::Compacted,
            ResyncReason::Validation => Resync::Validation,
            ResyncReason::SubscriberLagged => Resync::Lagged,
        }),
        changes,
    }
}
