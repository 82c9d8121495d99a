//! What a subscriber observed, in plain types independent of the mirror's.
//!
//! A [`History`] is the sequence of [`Delivery`]s one subscriber received,
//! plus what the mirror published on the side: [`SnapshotObservation`]s
//! (revision and state hash) and occasional [`FullSnapshot`]s. A subscriber
//! starts empty at revision 0, so its first delivery is normally a resync
//! batch holding the whole initial snapshot.
//!
//! Everything here is a plain public struct or enum, so an adapter from any
//! delivery type is a few lines.

use std::fmt;

use crate::keys::show;
use crate::state::State;

/// A key's state in etcd (an etcd `KeyValue` without the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the put that created this life of the key.
    pub create_revision: i64,
    /// Revision of the last put.
    pub mod_revision: i64,
    /// Number of puts in this life of the key (1 for a new key).
    pub version: i64,
    /// Attached lease id, 0 for none.
    pub lease: i64,
}

/// What happened to one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// The key now holds this entry.
    Put(Entry),
    /// The key was deleted.
    Delete,
}

/// One key's change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Change {
    /// The key.
    pub key: Vec<u8>,
    /// What happened to it.
    pub op: Op,
}

impl Change {
    /// A put of `entry` at `key`.
    pub fn put(key: impl Into<Vec<u8>>, entry: Entry) -> Self {
        Self {
            key: key.into(),
            op: Op::Put(entry),
        }
    }

    /// A delete of `key`.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            op: Op::Delete,
        }
    }
}

/// Why a batch is a resync: the mirror's `ResyncReason`, plus the first
/// state of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resync {
    /// The first state of a subscription (the mirror's snapshot when
    /// subscribing).
    Subscribed,
    /// The mirror's first list of the prefix.
    InitialList,
    /// The mirror relisted because the revision it needed was compacted.
    Compacted,
    /// The mirror relisted because a response from etcd failed validation.
    Validation,
    /// The subscriber fell behind and was brought up to date.
    Lagged,
}

impl Resync {
    /// Short name, as in reports.
    pub fn name(self) -> &'static str {
        match self {
            Resync::Subscribed => "subscribed",
            Resync::InitialList => "initial_list",
            Resync::Compacted => "compacted",
            Resync::Validation => "validation",
            Resync::Lagged => "lagged",
        }
    }
}

/// A batch of changes delivered at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The revision the subscriber is at after applying the batch.
    pub revision: i64,
    /// For a resync (relist) batch, why: the batch is then the diff from the
    /// subscriber's previous state to the state at `revision`, rather than
    /// the events of one revision.
    pub resync: Option<Resync>,
    /// The changes, each key at most once.
    pub changes: Vec<Change>,
}

/// One thing a subscriber received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Changes at one revision (or a resync up to it).
    Batch(Batch),
    /// A bookmark: the subscriber has everything up to `revision`.
    Progress {
        /// The revision vouched for.
        revision: i64,
    },
    /// The mirror reconnected to etcd; the next batch must continue at
    /// exactly the next revision that touches the prefix.
    Reconnected,
    /// The mirror process was restarted and the subscriber starts over with
    /// the new one: its state is empty again and its next delivery is the new
    /// mirror's first state.
    Restarted {
        /// The revision of the snapshot file the new mirror was given (its
        /// first state must be that file's, and what follows must resume
        /// right after it); `None` when the file was deliberately removed,
        /// so that the new mirror lists afresh.
        file: Option<i64>,
    },
}

/// The mirror's published snapshot hash at a revision (see [`crate::hash`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotObservation {
    /// The published revision.
    pub revision: i64,
    /// [`State::hash`] of the published snapshot.
    pub hash: u64,
}

/// A complete published snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FullSnapshot {
    /// The published revision.
    pub revision: i64,
    /// Its contents.
    pub state: State,
}

/// Everything one subscriber and its mirror were seen to do in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Deliveries in the order received.
    pub deliveries: Vec<Delivery>,
    /// Snapshot hashes in the order published.
    pub snapshots: Vec<SnapshotObservation>,
    /// Sampled full snapshots, in the order published.
    pub full_snapshots: Vec<FullSnapshot>,
    /// Indices into `snapshots` and into `full_snapshots` at which those of a
    /// restarted mirror begin: they may start below the revisions before.
    pub restarts: Vec<(usize, usize)>,
    /// The revision the subscriber must have reached at the end (for example
    /// etcd's final revision after the writers stopped). Every change up to
    /// it must have been delivered.
    pub expect_through: Option<i64>,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} (c={} m={} v={} l={})",
            show(&self.value, 24),
            self.create_revision,
            self.mod_revision,
            self.version,
            self.lease
        )
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            Op::Put(e) => write!(f, "put {}={e}", show(&self.key, 48)),
            Op::Delete => write!(f, "del {}", show(&self.key, 48)),
        }
    }
}

/// Writes changes as `[a, b, …]`, eliding the middle of long lists.
pub(crate) fn fmt_changes(f: &mut fmt::Formatter<'_>, changes: &[Change]) -> fmt::Result {
    const MAX: usize = 6;
    f.write_str("[")?;
    for (i, c) in changes.iter().enumerate() {
        if changes.len() > MAX && i == MAX - 1 {
            write!(f, "… {} more", changes.len() - i)?;
            break;
        }
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("]")
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Delivery::Batch(b) => {
                match b.resync {
                    Some(r) => write!(f, "resync ({}) rev={} ", r.name(), b.revision)?,
                    None => write!(f, "batch rev={} ", b.revision)?,
                }
                fmt_changes(f, &b.changes)
            }
            Delivery::Progress { revision } => write!(f, "progress rev={revision}"),
            Delivery::Reconnected => f.write_str("reconnected"),
            Delivery::Restarted { file: Some(r) } => {
                write!(f, "restarted from a snapshot file at {r}")
            }
            Delivery::Restarted { file: None } => f.write_str("restarted without a snapshot file"),
        }
    }
}
