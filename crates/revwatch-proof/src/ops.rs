//! Writes as a writer issues them, and their exact effect under etcd's
//! semantics.
//!
//! [`WriteOp::evaluate`] is the reference model of etcd's KV store: given the
//! state just before a write and the revision the write would create, it
//! returns whether a txn's compares held and the exact changes (with
//! create_revision, mod_revision and version as etcd sets them). An empty
//! change list means the write does not create a revision. The workload uses
//! these types to issue requests; the truth verifier uses the model to check
//! that every acknowledged write appears in etcd's history with the right
//! effect.

use std::collections::BTreeMap;

use crate::history::{Change, Entry, Op};
use crate::keys::KeyRange;
use crate::state::State;

/// A put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Lease id, 0 for none.
    pub lease: i64,
}

/// One step of a txn branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnStep {
    /// A put.
    Put(Put),
    /// A delete of every key in the range.
    DeleteRange(KeyRange),
}

/// What a compare looks at, and the operand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 if absent).
    Version(i64),
    /// The key's create_revision (0 if absent).
    CreateRevision(i64),
    /// The key's mod_revision (0 if absent).
    ModRevision(i64),
    /// The key's value; never holds for an absent key, whatever the operator.
    Value(Vec<u8>),
    /// The key's lease (0 if absent or none).
    Lease(i64),
}

/// A compare operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `>`
    Greater,
    /// `<`
    Less,
}

/// A single-key compare of a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// The operator.
    pub result: CompareResult,
    /// What is compared, and with what.
    pub target: CompareTarget,
}

/// A txn: if every compare holds, `success` runs, else `failure`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Compares, all of which must hold.
    pub compares: Vec<Compare>,
    /// Steps when they hold.
    pub success: Vec<TxnStep>,
    /// Steps when they do not.
    pub failure: Vec<TxnStep>,
}

/// A write a writer issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// A put.
    Put(Put),
    /// A delete of every key in the range.
    DeleteRange(KeyRange),
    /// A txn.
    Txn(Txn),
    /// Revoking a lease deletes every key attached to it.
    LeaseRevoke {
        /// The lease id.
        lease: i64,
    },
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    /// For a txn, whether the compares held; true for other writes.
    pub succeeded: bool,
    /// The changes, in etcd's order; empty if no revision is created.
    pub changes: Vec<Change>,
}

impl Compare {
    /// Whether the compare holds in `state`, as etcd evaluates it.
    pub fn holds(&self, state: &State) -> bool {
        let entry = state.get(&self.key);
        let ord = match (&self.target, entry) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(e)) => e.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(x), e) => e.map_or(0, |e| e.version).cmp(x),
            (CompareTarget::CreateRevision(x), e) => e.map_or(0, |e| e.create_revision).cmp(x),
            (CompareTarget::ModRevision(x), e) => e.map_or(0, |e| e.mod_revision).cmp(x),
            (CompareTarget::Lease(x), e) => e.map_or(0, |e| e.lease).cmp(x),
        };
        match self.result {
            CompareResult::Equal => ord.is_eq(),
            CompareResult::NotEqual => ord.is_ne(),
            CompareResult::Greater => ord.is_gt(),
            CompareResult::Less => ord.is_lt(),
        }
    }
}

/// Pending changes of one write on top of a base state.
struct Overlay<'a> {
    base: &'a State,
    pending: BTreeMap<Vec<u8>, Option<Entry>>,
    changes: Vec<Change>,
    revision: i64,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a State, revision: i64) -> Self {
        Self {
            base,
            pending: BTreeMap::new(),
            changes: Vec::new(),
            revision,
        }
    }

    fn get(&self, key: &[u8]) -> Option<&Entry> {
        match self.pending.get(key) {
            Some(e) => e.as_ref(),
            None => self.base.get(key),
        }
    }

    fn put(&mut self, p: &Put) {
        let entry = match self.get(&p.key) {
            Some(old) => Entry {
                value: p.value.clone(),
                create_revision: old.create_revision,
                mod_revision: self.revision,
                version: old.version + 1,
                lease: p.lease,
            },
            None => Entry {
                value: p.value.clone(),
                create_revision: self.revision,
                mod_revision: self.revision,
                version: 1,
                lease: p.lease,
            },
        };
        self.pending.insert(p.key.clone(), Some(entry.clone()));
        self.changes.push(Change::put(p.key.clone(), entry));
    }

    /// Deletes the live keys selected by `select`, in key order.
    fn delete_where(&mut self, select: impl Fn(&[u8], &Entry) -> bool) {
        let base_keys = self.base.entries().iter().map(|(k, e)| (k, Some(e)));
        let mut live: BTreeMap<&Vec<u8>, Option<&Entry>> = base_keys.collect();
        for (k, e) in &self.pending {
            live.insert(k, e.as_ref());
        }
        let doomed: Vec<Vec<u8>> = live
            .into_iter()
            .filter_map(|(k, e)| e.filter(|e| select(k, e)).map(|_| k.clone()))
            .collect();
        for k in doomed {
            self.pending.insert(k.clone(), None);
            self.changes.push(Change::delete(k));
        }
    }

    fn step(&mut self, step: &TxnStep) {
        match step {
            TxnStep::Put(p) => self.put(p),
            TxnStep::DeleteRange(r) => self.delete_where(|k, _| r.contains(k)),
        }
    }
}

impl WriteOp {
    /// The write's effect on `state` if it created `revision`.
    ///
    /// ```
    /// use revwatch_proof::ops::{Put, WriteOp};
    /// use revwatch_proof::history::Op;
    /// use revwatch_proof::state::State;
    /// let put = WriteOp::Put(Put { key: b"k".to_vec(), value: b"v".to_vec(), lease: 0 });
    /// let effect = put.evaluate(&State::default(), 2);
    /// let Op::Put(e) = &effect.changes[0].op else { unreachable!() };
    /// assert_eq!((e.create_revision, e.mod_revision, e.version), (2, 2, 1));
    /// ```
    pub fn evaluate(&self, state: &State, revision: i64) -> Effect {
        let mut o = Overlay::new(state, revision);
        let mut succeeded = true;
        match self {
            WriteOp::Put(p) => o.put(p),
            WriteOp::DeleteRange(r) => o.step(&TxnStep::DeleteRange(r.clone())),
            WriteOp::Txn(t) => {
                succeeded = t.compares.iter().all(|c| c.holds(state));
                let branch = if succeeded { &t.success } else { &t.failure };
                for s in branch {
                    o.step(s);
                }
            }
            WriteOp::LeaseRevoke { lease } => o.delete_where(|_, e| e.lease == *lease),
        }
        Effect {
            succeeded,
            changes: o.changes,
        }
    }

    /// Every value this write may put; the workload makes values unique, so
    /// finding one in etcd's history locates the write.
    pub fn put_values(&self) -> Vec<(&[u8], &[u8])> {
        fn from_steps(steps: &[TxnStep]) -> Vec<(&[u8], &[u8])> {
            steps
                .iter()
                .filter_map(|s| match s {
                    TxnStep::Put(p) => Some((p.key.as_slice(), p.value.as_slice())),
                    TxnStep::DeleteRange(_) => None,
                })
                .collect()
        }
        match self {
            WriteOp::Put(p) => vec![(p.key.as_slice(), p.value.as_slice())],
            WriteOp::Txn(t) => {
                let mut v = from_steps(&t.success);
                v.extend(from_steps(&t.failure));
                v
            }
            WriteOp::DeleteRange(_) | WriteOp::LeaseRevoke { .. } => Vec::new(),
        }
    }
}

/// Whether every change in `changes` is a delete.
pub(crate) fn all_deletes(changes: &[Change]) -> bool {
    changes.iter().all(|c| c.op == Op::Delete)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str, lease: i64) -> Put {
        Put {
            key: k.into(),
            value: v.into(),
            lease,
        }
    }

    fn state_with(ops: &[WriteOp]) -> State {
        let mut s = State::default();
        for (i, op) in ops.iter().enumerate() {
            let eff = op.evaluate(&s, 2 + i as i64);
            s.apply_all(&eff.changes);
        }
        s
    }

    #[test]
    fn overwrite_keeps_create_and_bumps_version() {
        let s = state_with(&[
            WriteOp::Put(put("k", "1", 0)),
            WriteOp::Put(put("k", "2", 7)),
        ]);
        let e = s.get(b"k").expect("present");
        assert_eq!((e.create_revision, e.mod_revision, e.version), (2, 3, 2));
        assert_eq!(e.lease, 7);
    }

    #[test]
    fn delete_restarts_life() {
        let s = state_with(&[
            WriteOp::Put(put("k", "1", 0)),
            WriteOp::DeleteRange(KeyRange::single(b"k")),
            WriteOp::Put(put("k", "2", 0)),
        ]);
        let e = s.get(b"k").expect("present");
        assert_eq!((e.create_revision, e.version), (4, 1));
    }

    #[test]
    fn delete_of_nothing_changes_nothing() {
        let op = WriteOp::DeleteRange(KeyRange::new(b"a", b"z"));
        assert!(op.evaluate(&State::default(), 2).changes.is_empty());
    }

    #[test]
    fn failed_compare_with_empty_failure_changes_nothing() {
        let s = state_with(&[WriteOp::Put(put("k", "1", 0))]);
        let txn = WriteOp::Txn(Txn {
            compares: vec![Compare {
                key: b"k".to_vec(),
                result: CompareResult::Equal,
                target: CompareTarget::Version(5),
            }],
            success: vec![TxnStep::Put(put("a", "x", 0))],
            failure: vec![],
        });
        let eff = txn.evaluate(&s, 3);
        assert!(!eff.succeeded);
        assert!(eff.changes.is_empty());
    }

    #[test]
    fn value_compare_on_missing_key_never_holds() {
        let c = Compare {
            key: b"missing".to_vec(),
            result: CompareResult::NotEqual,
            target: CompareTarget::Value(b"x".to_vec()),
        };
        assert!(!c.holds(&State::default()));
        let v = Compare {
            key: b"missing".to_vec(),
            result: CompareResult::Equal,
            target: CompareTarget::Version(0),
        };
        assert!(v.holds(&State::default()));
    }

    #[test]
    fn revoke_deletes_all_attached_keys_in_key_order() {
        let s = state_with(&[
            WriteOp::Put(put("b", "1", 9)),
            WriteOp::Put(put("a", "1", 9)),
            WriteOp::Put(put("c", "1", 0)),
        ]);
        let eff = WriteOp::LeaseRevoke { lease: 9 }.evaluate(&s, 5);
        assert_eq!(eff.changes, vec![Change::delete("a"), Change::delete("b")]);
    }

    #[test]
    fn txn_success_branch_puts_and_deletes_in_one_revision() {
        let s = state_with(&[WriteOp::Put(put("c", "1", 0))]);
        let txn = WriteOp::Txn(Txn {
            compares: vec![Compare {
                key: b"c".to_vec(),
                result: CompareResult::Equal,
                target: CompareTarget::Value(b"1".to_vec()),
            }],
            success: vec![
                TxnStep::Put(put("a", "x", 0)),
                TxnStep::DeleteRange(KeyRange::single(b"c")),
            ],
            failure: vec![],
        });
        let eff = txn.evaluate(&s, 3);
        assert!(eff.succeeded);
        assert_eq!(eff.changes.len(), 2);
        assert!(eff.changes.iter().all(|c| match &c.op {
            Op::Put(e) => e.mod_revision == 3,
            Op::Delete => true,
        }));
    }
}
