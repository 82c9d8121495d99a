//! Ground truth: the exact change set of every revision.
//!
//! # Design, and why it is independent of the code under test
//!
//! Truth comes from etcd itself, read by a [`recorder::TruthRecorder`]: a
//! watch of the *whole keyspace* from revision 1, opened with the raw
//! generated gRPC stubs (no revwatch code), connected straight to the
//! members (never through the fault proxies). Because every etcd revision
//! changes at least one key, a whole-keyspace history must hold every
//! revision from 2 to the last one: [`Truth::require_contiguous`] checks
//! that nothing is missing. [`Truth::new`] checks etcd's key-version rules on
//! every change (create_revision, mod_revision and version, deletes only of
//! live keys).
//!
//! That history is then cross-checked against what the writers did
//! ([`Truth::verify_records`]): every acknowledged write must appear at its
//! response's revision with exactly the effect the reference model
//! ([`crate::ops`]) predicts from the state just before, writes whose outcome
//! is unknown are located by their unique values, lease expiries are
//! recognised by shape (every key of one lease deleted in one revision), and
//! any revision no write explains is an error. So the truth is derived from
//! the writers' records and confirmed by etcd's history, with neither source
//! trusted alone, and the mirror's client, watch code and data structures
//! take no part in it.

mod cursor;
mod probe;
pub mod recorder;
mod verify;

use std::collections::{BTreeMap, BTreeSet};

pub use self::cursor::Cursor;
pub use self::verify::Attribution;
use crate::history::{Change, Entry, Op};
use crate::keys::KeyRange;
use crate::ops::WriteOp;
use crate::state::State;

/// Why a truth could not be built or confirmed.
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    /// A revision outside `2..=through`.
    #[error("revision {revision} is outside the truth's range 2..={through}")]
    OutOfRange {
        /// The revision.
        revision: i64,
        /// The last revision of the truth.
        through: i64,
    },
    /// A revision without changes.
    #[error("revision {0} has no changes")]
    EmptyRevision(i64),
    /// A key changed twice in one revision.
    #[error("key {key} changes twice at revision {revision}")]
    DuplicateKey {
        /// The revision.
        revision: i64,
        /// The key, escaped.
        key: String,
    },
    /// A change that breaks etcd's key-version rules.
    #[error("revision {revision}: {change} breaks etcd's version rules: {problem}")]
    VersionRules {
        /// The revision.
        revision: i64,
        /// The change.
        change: String,
        /// What is wrong.
        problem: String,
    },
    /// A whole-keyspace history is missing a revision.
    #[error("revision {0} is missing from the history")]
    Missing(i64),
    /// A writer's record disagrees with etcd's history.
    #[error("{record}: {problem}")]
    Record {
        /// The record.
        record: String,
        /// What is wrong.
        problem: String,
    },
    /// A revision that no write and no lease expiry explains.
    #[error("revision {revision} ({changes}) is explained by no write or lease expiry")]
    Unexplained {
        /// The revision.
        revision: i64,
        /// Its changes.
        changes: String,
    },
    /// The recorder's watch was compacted away.
    #[error(
        "history from revision {requested} was compacted (compact revision {compact_revision})"
    )]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// etcd's compaction revision.
        compact_revision: i64,
    },
    /// The recorder did not reach a revision in time.
    #[error(
        "the truth recorder reached revision {reached}, not {wanted}, within {after:?} (last error: {last_error})"
    )]
    Timeout {
        /// The revision waited for.
        wanted: i64,
        /// Where the recorder was.
        reached: i64,
        /// How long it waited.
        after: std::time::Duration,
        /// The recorder's last stream error.
        last_error: String,
    },
    /// The recorder's task ended unexpectedly.
    #[error("the truth recorder stopped: {0}")]
    RecorderStopped(String),
}

/// A compaction of etcd's history, as the run made it or found it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// The compaction revision: history below it is gone.
    pub revision: i64,
    /// A revision etcd had certainly reached when the compaction was made (at
    /// least `revision`): a list read at a lower revision came before it.
    pub not_before: i64,
}

/// Every change, revision by revision, from revision 2 up to `through`, and
/// the compactions made meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truth {
    revisions: BTreeMap<i64, Vec<Change>>,
    through: i64,
    compactions: Vec<Compaction>,
}

impl Truth {
    /// Builds a truth from per-revision change sets (in etcd's order within a
    /// revision), complete up to `through`, checking etcd's key-version rules
    /// on every change: the history must start at revision 1 (an empty store)
    /// for these checks to hold.
    pub fn new(revisions: BTreeMap<i64, Vec<Change>>, through: i64) -> Result<Self, TruthError> {
        let mut state = State::default();
        for (&revision, changes) in &revisions {
            if revision < 2 || revision > through {
                return Err(TruthError::OutOfRange { revision, through });
            }
            if changes.is_empty() {
                return Err(TruthError::EmptyRevision(revision));
            }
            let mut seen = BTreeSet::new();
            for c in changes {
                if !seen.insert(c.key.as_slice()) {
                    return Err(TruthError::DuplicateKey {
                        revision,
                        key: crate::keys::show(&c.key, 64),
                    });
                }
                check_version_rules(&state, revision, c)?;
            }
            state.apply_all(changes);
        }
        Ok(Self {
            revisions,
            through,
            compactions: Vec::new(),
        })
    }

    /// The same truth, with the compactions made while it was recorded.
    pub fn with_compactions(mut self, mut compactions: Vec<Compaction>) -> Self {
        compactions.sort_by_key(|c| (c.revision, c.not_before));
        self.compactions = compactions;
        self
    }

    /// The compactions made while the truth was recorded, by revision.
    pub fn compactions(&self) -> &[Compaction] {
        &self.compactions
    }

    /// A compaction that explains a relist read at `list_revision` by a watch
    /// that resumed after `resumed_after`: its revision is above
    /// `resumed_after` (so it removed history the watch needed) and it was
    /// made before etcd passed `list_revision`.
    pub fn compaction_explaining(
        &self,
        resumed_after: i64,
        list_revision: i64,
    ) -> Option<Compaction> {
        self.compactions
            .iter()
            .find(|c| c.revision > resumed_after && c.not_before <= list_revision)
            .copied()
    }

    /// The truth that `ops`, run one at a time on an empty etcd, would
    /// produce according to the reference model (a revoke stands in for a
    /// lease expiry). For tests of the checker.
    pub fn from_model<'o>(ops: impl IntoIterator<Item = &'o WriteOp>) -> Truth {
        let mut state = State::default();
        let mut revisions = BTreeMap::new();
        let mut revision = 1;
        for op in ops {
            let effect = op.evaluate(&state, revision + 1);
            if !effect.changes.is_empty() {
                revision += 1;
                state.apply_all(&effect.changes);
                revisions.insert(revision, effect.changes);
            }
        }
        // The model follows etcd's rules by construction, so `new` would
        // accept this; skip the second pass.
        Truth {
            revisions,
            through: revision,
            compactions: Vec::new(),
        }
    }

    /// The last revision the truth is complete up to.
    pub fn through(&self) -> i64 {
        self.through
    }

    /// The changes at `revision` (empty if it changed nothing recorded here).
    pub fn changes_at(&self, revision: i64) -> &[Change] {
        self.revisions.get(&revision).map_or(&[], Vec::as_slice)
    }

    /// Revisions with their changes, in order.
    pub fn revisions(&self) -> impl Iterator<Item = (i64, &[Change])> {
        self.revisions.iter().map(|(r, c)| (*r, c.as_slice()))
    }

    /// Number of revisions with changes.
    pub fn len(&self) -> usize {
        self.revisions.len()
    }

    /// Whether no revision has changes.
    pub fn is_empty(&self) -> bool {
        self.revisions.is_empty()
    }

    /// Checks that every revision in `2..=through` is present, as it must be
    /// in a history of the whole keyspace.
    pub fn require_contiguous(&self) -> Result<(), TruthError> {
        let mut expected = 2;
        for &r in self.revisions.keys() {
            if r != expected {
                return Err(TruthError::Missing(expected));
            }
            expected += 1;
        }
        if expected != self.through + 1 && self.through >= 2 {
            return Err(TruthError::Missing(expected));
        }
        Ok(())
    }

    /// A forward-only walk over the states of `range`, starting at revision 1.
    pub fn cursor(&self, range: KeyRange) -> Cursor<'_> {
        Cursor::new(self, range)
    }

    /// The state of `range` at `revision`.
    pub fn state_at(&self, revision: i64, range: &KeyRange) -> State {
        let mut c = self.cursor(range.clone());
        c.advance_to(revision);
        c.into_state()
    }

    /// The changes in `range` at `revision`.
    pub fn changes_in(&self, revision: i64, range: &KeyRange) -> Vec<Change> {
        self.changes_at(revision)
            .iter()
            .filter(|c| range.contains(&c.key))
            .cloned()
            .collect()
    }

    /// The first revision in `from..=to` that changes a key in `range`.
    pub fn first_touching(&self, range: &KeyRange, from: i64, to: i64) -> Option<i64> {
        if from > to {
            return None;
        }
        self.revisions
            .range(from..=to)
            .find(|(_, cs)| cs.iter().any(|c| range.contains(&c.key)))
            .map(|(r, _)| *r)
    }

    /// The same truth restricted to `range` (revisions without changes in
    /// it disappear).
    pub fn restricted_to(&self, range: &KeyRange) -> Truth {
        let revisions = self
            .revisions
            .iter()
            .filter_map(|(r, cs)| {
                let kept: Vec<Change> = cs
                    .iter()
                    .filter(|c| range.contains(&c.key))
                    .cloned()
                    .collect();
                (!kept.is_empty()).then_some((*r, kept))
            })
            .collect();
        Truth {
            revisions,
            through: self.through,
            compactions: self.compactions.clone(),
        }
    }
}

/// etcd's rules for one change at `revision` given the state before it.
fn check_version_rules(state: &State, revision: i64, c: &Change) -> Result<(), TruthError> {
    let fail = |problem: String| TruthError::VersionRules {
        revision,
        change: c.to_string(),
        problem,
    };
    match (&c.op, state.get(&c.key)) {
        (Op::Delete, None) => Err(fail("the key does not exist".into())),
        (Op::Delete, Some(_)) => Ok(()),
        (Op::Put(e), old) => {
            let want = expected_put(old, revision, e);
            if *e == want {
                Ok(())
            } else {
                Err(fail(format!("expected {want}")))
            }
        }
    }
}

/// The entry etcd stores for a put at `revision` over `old`, with the value
/// and lease of `put`.
fn expected_put(old: Option<&Entry>, revision: i64, put: &Entry) -> Entry {
    Entry {
        value: put.value.clone(),
        create_revision: old.map_or(revision, |o| o.create_revision),
        mod_revision: revision,
        version: old.map_or(1, |o| o.version + 1),
        lease: put.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &str, c: i64, m: i64, ver: i64) -> Entry {
        Entry {
            value: v.into(),
            create_revision: c,
            mod_revision: m,
            version: ver,
            lease: 0,
        }
    }

    #[test]
    fn accepts_a_valid_history() {
        let revs = BTreeMap::from([
            (2, vec![Change::put("a", e("1", 2, 2, 1))]),
            (3, vec![Change::put("a", e("2", 2, 3, 2))]),
            (4, vec![Change::delete("a")]),
            (5, vec![Change::put("a", e("3", 5, 5, 1))]),
        ]);
        let t = Truth::new(revs, 5).expect("valid");
        t.require_contiguous().expect("contiguous");
        assert_eq!(
            t.state_at(3, &KeyRange::all()).get(b"a"),
            Some(&e("2", 2, 3, 2))
        );
        assert!(t.state_at(4, &KeyRange::all()).is_empty());
        assert_eq!(t.first_touching(&KeyRange::prefix(b"a"), 3, 5), Some(3));
    }

    #[test]
    fn rejects_broken_histories() {
        let bad_version = BTreeMap::from([
            (2, vec![Change::put("a", e("1", 2, 2, 1))]),
            (3, vec![Change::put("a", e("2", 2, 3, 1))]),
        ]);
        assert!(matches!(
            Truth::new(bad_version, 3),
            Err(TruthError::VersionRules { revision: 3, .. })
        ));
        let phantom_delete = BTreeMap::from([(2, vec![Change::delete("a")])]);
        assert!(matches!(
            Truth::new(phantom_delete, 2),
            Err(TruthError::VersionRules { .. })
        ));
        let gap = BTreeMap::from([(3, vec![Change::put("a", e("1", 3, 3, 1))])]);
        let t = Truth::new(gap, 3).expect("rules hold");
        assert!(matches!(
            t.require_contiguous(),
            Err(TruthError::Missing(2))
        ));
        let short = BTreeMap::from([(2, vec![Change::put("a", e("1", 2, 2, 1))])]);
        let t = Truth::new(short, 3).expect("rules hold");
        assert!(matches!(
            t.require_contiguous(),
            Err(TruthError::Missing(3))
        ));
    }
}
