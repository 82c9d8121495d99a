//! From the mirror's subscriber updates to the checker's neutral history.
//!
//! The adapter only renames fields: what is checked is what the mirror
//! delivered. It follows the subscriber's state so that a full
//! [`Update::Snapshot`] (which a subscriber receives first) becomes the
//! resync batch it amounts to: the diff from what the subscriber had.

use revwatch::mirror::{Batch as MirrorBatch, ChangeKind, Entry as MirrorEntry, Snapshot, Update};

use crate::history::{Batch, Change, Delivery, Entry, FullSnapshot, History, SnapshotObservation};
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
                // A new subscription (after a mirror restart) starting where
                // the subscriber already is tells it nothing: not a delivery.
                if s.revision() == self.known && changes.is_empty() {
                    return;
                }
                self.state = target;
                Delivery::Batch(Batch {
                    revision: s.revision(),
                    resync: true,
                    changes,
                })
            }
            Update::Batch(b) => {
                let batch = convert(b);
                self.state.apply_all(&batch.changes);
                self.history.snapshots.push(SnapshotObservation {
                    revision: b.snapshot.revision(),
                    hash: state_of(&b.snapshot).hash(),
                });
                Delivery::Batch(batch)
            }
            Update::Progress(r) => Delivery::Progress { revision: *r },
        };
        self.known = self.known.max(update.revision());
        self.history.deliveries.push(delivery);
    }

    /// Marks that the subscriber moved to a new subscription (for example of
    /// a mirror restarted from its snapshot file): what follows must continue
    /// exactly where it was, or be a resync.
    pub fn reconnected(&mut self) {
        self.history.deliveries.push(Delivery::Reconnected);
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
        resync: b.is_resync(),
        changes,
    }
}
