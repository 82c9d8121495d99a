//! Cross-checking etcd's history against the writers' records.

use std::collections::{BTreeMap, HashMap};

use crate::history::{Change, Op};
use crate::keys::KeyRange;
use crate::ops::{TxnStep, WriteOp, all_deletes};
use crate::record::{Outcome, WriteRecord};
use crate::state::State;

use super::{Truth, TruthError};

/// How the writers' records explain a truth (see [`Truth::verify_records`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attribution {
    /// Acknowledged writes, all found with the right effect.
    pub acked: usize,
    /// Acknowledged writes that changed nothing (a failed compare with no
    /// writes, a delete of nothing, a revoke of a lease without keys).
    pub acked_without_change: usize,
    /// Acknowledged txns whose compares failed.
    pub failed_compares: usize,
    /// Writes refused by etcd (and absent from its history).
    pub refused: usize,
    /// Writes with unknown outcome found in the history.
    pub unknown_applied: usize,
    /// Writes with unknown outcome not found (not applied, or applied
    /// without effect).
    pub unknown_absent: usize,
    /// Revisions explained as a lease expiring.
    pub lease_expiries: usize,
    /// Revisions explained in total.
    pub revisions: usize,
}

/// Who explains a revision.
#[derive(Debug, Clone, Copy)]
enum Claim {
    Record(usize),
    Expiry(i64),
}

impl Truth {
    /// Checks the truth against every writer's records, and that every
    /// revision is explained by a write or by a lease in `leases` expiring.
    ///
    /// * An acknowledged write must be found at its response's revision with
    ///   exactly the changes the model predicts from the state before it, and
    ///   the same txn outcome and delete count; one that changed nothing must
    ///   change nothing in the state at its revision.
    /// * A refused write must not be found.
    /// * A write with unknown outcome is found by its unique put values, or
    ///   else may explain a revision nothing else explains.
    /// * Any other revision must delete, at once, exactly the keys attached
    ///   to one granted lease: a lease expiry, whose revision no writer knows.
    pub fn verify_records(
        &self,
        records: &[WriteRecord],
        leases: &[i64],
    ) -> Result<Attribution, TruthError> {
        let mut att = Attribution::default();
        let puts = self.put_index();
        let locate = |r: &WriteRecord| -> Option<i64> {
            r.op.put_values()
                .iter()
                .find_map(|kv| puts.get(kv).copied())
        };
        let fail = |r: &WriteRecord, problem: String| TruthError::Record {
            record: r.to_string(),
            problem,
        };

        // Writes to check at a known revision, and unknowns to try later.
        let mut at: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        let mut pending = Vec::new();
        for (i, r) in records.iter().enumerate() {
            match &r.outcome {
                Outcome::Acked { revision, .. } => at.entry(*revision).or_default().push(i),
                Outcome::Failed(_) => {
                    if let Some(rev) = locate(r) {
                        return Err(fail(r, format!("refused, but its value is at {rev}")));
                    }
                    att.refused += 1;
                }
                Outcome::Unknown(_) => match locate(r) {
                    Some(rev) => at.entry(rev).or_default().push(i),
                    None => pending.push(i),
                },
            }
        }

        let mut claims: BTreeMap<i64, Claim> = BTreeMap::new();
        let mut cursor = self.cursor(KeyRange::all());
        for (&rev, group) in &at {
            // Writes that say they created a revision claim it before a
            // revoke, whose response cannot say: a revoke acked at the same
            // revision as a delete of its keys came after that delete.
            let mut group = group.clone();
            group.sort_by_key(|&i| creates_revision(&records[i]).is_none());
            // Writes that created `rev` ran on the state at rev - 1 ...
            let mut later = Vec::new();
            for &i in &group {
                let r = &records[i];
                let pre = cursor.advance_to(rev - 1);
                match creates_revision(r) {
                    Some(true) => {
                        self.check_created(r, pre, rev)?;
                        if let Some(prev) = claims.insert(rev, Claim::Record(i)) {
                            let other = match prev {
                                Claim::Record(j) => records[j].to_string(),
                                Claim::Expiry(lease) => format!("lease {lease} expiring"),
                            };
                            return Err(fail(r, format!("revision {rev} is also {other}")));
                        }
                        count_created(&mut att, r);
                    }
                    Some(false) => later.push(i),
                    // A revoke's response does not say whether keys went.
                    None => {
                        let created =
                            !claims.contains_key(&rev) && self.check_created(r, pre, rev).is_ok();
                        if created {
                            claims.insert(rev, Claim::Record(i));
                            count_created(&mut att, r);
                        } else {
                            later.push(i);
                        }
                    }
                }
            }
            // ... writes that created nothing ran on the state at rev.
            let now = cursor.advance_to(rev);
            for i in later {
                let r = &records[i];
                let eff = r.op.evaluate(now, rev + 1);
                if !eff.changes.is_empty() {
                    return Err(fail(
                        r,
                        format!(
                            "created no revision, yet would change {} keys at {rev}",
                            eff.changes.len()
                        ),
                    ));
                }
                check_ack(r, eff.succeeded, 0)?;
                att.acked += 1;
                att.acked_without_change += 1;
                if !eff.succeeded {
                    att.failed_compares += 1;
                }
            }
        }

        // Every other revision: a lease expiry, or an unknown write.
        let mut cursor = self.cursor(KeyRange::all());
        let mut used = vec![false; pending.len()];
        for (rev, changes) in self.revisions() {
            if claims.contains_key(&rev) {
                continue;
            }
            let pre = cursor.advance_to(rev - 1);
            if let Some(lease) = expired_lease(pre, changes, leases) {
                claims.insert(rev, Claim::Expiry(lease));
                att.lease_expiries += 1;
                continue;
            }
            let found = pending.iter().enumerate().find(|&(j, &i)| {
                !used[j] && same_changes(&records[i].op.evaluate(pre, rev).changes, changes)
            });
            match found {
                Some((j, &i)) => {
                    used[j] = true;
                    claims.insert(rev, Claim::Record(i));
                    att.unknown_applied += 1;
                }
                None => {
                    return Err(TruthError::Unexplained {
                        revision: rev,
                        changes: changes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
            }
        }
        att.unknown_absent += used.iter().filter(|u| !**u).count();
        att.revisions = claims.len();
        Ok(att)
    }

    /// Where each `(key, value)` was put.
    fn put_index(&self) -> HashMap<(&[u8], &[u8]), i64> {
        let mut idx = HashMap::new();
        for (rev, changes) in self.revisions() {
            for c in changes {
                if let Op::Put(e) = &c.op {
                    idx.insert((c.key.as_slice(), e.value.as_slice()), rev);
                }
            }
        }
        idx
    }

    /// Checks that `r`, run on `pre`, created revision `rev` as etcd recorded.
    fn check_created(&self, r: &WriteRecord, pre: &State, rev: i64) -> Result<(), TruthError> {
        let eff = r.op.evaluate(pre, rev);
        let actual = self.changes_at(rev);
        if !same_changes(&eff.changes, actual) {
            return Err(TruthError::Record {
                record: r.to_string(),
                problem: format!(
                    "expected [{}] at {rev}, etcd has [{}]",
                    join(&eff.changes),
                    join(actual)
                ),
            });
        }
        let deleted = eff.changes.iter().filter(|c| c.op == Op::Delete).count() as i64;
        check_ack(r, eff.succeeded, deleted)
    }
}

/// Whether an acknowledged write says it created a revision; `None` when
/// its response cannot tell (a revoke). Located unknown writes did.
fn creates_revision(r: &WriteRecord) -> Option<bool> {
    let Outcome::Acked {
        succeeded, deleted, ..
    } = &r.outcome
    else {
        return Some(true);
    };
    let has_put = |steps: &[TxnStep]| steps.iter().any(|s| matches!(s, TxnStep::Put(_)));
    match &r.op {
        WriteOp::Put(_) => Some(true),
        WriteOp::DeleteRange(_) => Some(*deleted > 0),
        WriteOp::Txn(t) => {
            let branch = if *succeeded { &t.success } else { &t.failure };
            Some(has_put(branch) || *deleted > 0)
        }
        WriteOp::LeaseRevoke { .. } => None,
    }
}

/// An acknowledged write's txn outcome and delete count must match the model.
fn check_ack(r: &WriteRecord, succeeded: bool, deleted: i64) -> Result<(), TruthError> {
    let Outcome::Acked {
        succeeded: acked_succeeded,
        deleted: acked_deleted,
        ..
    } = &r.outcome
    else {
        return Ok(());
    };
    let revoke = matches!(r.op, WriteOp::LeaseRevoke { .. });
    if *acked_succeeded != succeeded || (!revoke && *acked_deleted != deleted) {
        return Err(TruthError::Record {
            record: r.to_string(),
            problem: format!("the model says succeeded={succeeded}, deleted={deleted}"),
        });
    }
    Ok(())
}

fn count_created(att: &mut Attribution, r: &WriteRecord) {
    match r.outcome {
        Outcome::Acked { succeeded, .. } => {
            att.acked += 1;
            if !succeeded {
                att.failed_compares += 1;
            }
        }
        _ => att.unknown_applied += 1,
    }
}

/// The lease whose expiry `changes` are: deletes of exactly the keys that
/// carried one granted lease in `pre`.
fn expired_lease(pre: &State, changes: &[Change], leases: &[i64]) -> Option<i64> {
    if !all_deletes(changes) {
        return None;
    }
    let first = pre.get(&changes.first()?.key)?.lease;
    if first == 0 || !leases.contains(&first) {
        return None;
    }
    let attached = pre.entries().values().filter(|e| e.lease == first).count();
    let all_of_it = changes
        .iter()
        .all(|c| pre.get(&c.key).is_some_and(|e| e.lease == first));
    (all_of_it && attached == changes.len()).then_some(first)
}

/// Equal as sets of changes (order within a revision is not compared).
fn same_changes(a: &[Change], b: &[Change]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut a: Vec<&Change> = a.iter().collect();
    let mut b: Vec<&Change> = b.iter().collect();
    a.sort_by(|x, y| x.key.cmp(&y.key));
    b.sort_by(|x, y| x.key.cmp(&y.key));
    a == b
}

fn join(changes: &[Change]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Compare, CompareResult, CompareTarget, Put, Txn};

    fn put(k: &str, v: &str, lease: i64) -> WriteOp {
        WriteOp::Put(Put {
            key: k.into(),
            value: v.into(),
            lease,
        })
    }

    fn acked(
        writer: usize,
        op: WriteOp,
        revision: i64,
        succeeded: bool,
        deleted: i64,
    ) -> WriteRecord {
        WriteRecord {
            writer,
            seq: 0,
            op,
            outcome: Outcome::Acked {
                revision,
                succeeded,
                deleted,
            },
        }
    }

    #[test]
    fn explains_acked_writes_and_expiry() {
        let failing_txn = WriteOp::Txn(Txn {
            compares: vec![Compare {
                key: b"a".to_vec(),
                result: CompareResult::Equal,
                target: CompareTarget::Version(9),
            }],
            success: vec![TxnStep::Put(Put {
                key: b"z".to_vec(),
                value: b"never".to_vec(),
                lease: 0,
            })],
            failure: vec![],
        });
        // a@2, b(lease 5)@3, c(lease 5)@4, expiry of 5 @5, failing txn, a@6.
        let ops = vec![
            put("a", "1", 0),
            put("b", "2", 5),
            put("c", "3", 5),
            failing_txn.clone(),
            put("a", "4", 0),
        ];
        // The lease expires between the third and fourth write.
        let mut etcd_did = ops.clone();
        etcd_did.insert(3, WriteOp::LeaseRevoke { lease: 5 });
        let truth = Truth::from_model(&etcd_did);
        assert_eq!(truth.through(), 6);
        let records = vec![
            acked(0, ops[0].clone(), 2, true, 0),
            acked(1, ops[1].clone(), 3, true, 0),
            acked(0, ops[2].clone(), 4, true, 0),
            acked(1, failing_txn, 5, false, 0),
            acked(0, ops[4].clone(), 6, true, 0),
        ];
        let att = truth.verify_records(&records, &[5]).expect("explained");
        assert_eq!(att.acked, 5);
        assert_eq!(att.lease_expiries, 1);
        assert_eq!(att.failed_compares, 1);
        assert_eq!(att.revisions, 5);
        // Without the lease grant on record, revision 5 is unexplained.
        assert!(matches!(
            truth.verify_records(&records, &[]),
            Err(TruthError::Unexplained { revision: 5, .. })
        ));
    }

    #[test]
    fn a_revoke_acked_with_the_delete_of_its_keys_came_after_it() {
        // b carries lease 5; writer 1 deletes b at 3; writer 0 then revokes
        // lease 5, which has no keys left: no revision, header revision 3.
        let ops = vec![
            put("b", "1", 5),
            WriteOp::DeleteRange(KeyRange::single(b"b")),
        ];
        let truth = Truth::from_model(&ops);
        // The revoke is listed first (writer 0), yet the delete explains 3.
        let records = vec![
            acked(0, WriteOp::LeaseRevoke { lease: 5 }, 3, true, 0),
            acked(0, ops[0].clone(), 2, true, 0),
            acked(1, ops[1].clone(), 3, true, 1),
        ];
        let att = truth.verify_records(&records, &[5]).expect("explained");
        assert_eq!(att.acked, 3);
        assert_eq!(att.acked_without_change, 1);
        assert_eq!(att.revisions, 2);
    }

    #[test]
    fn flags_a_wrong_revision_and_a_lost_write() {
        let ops = vec![put("a", "1", 0), put("b", "2", 0)];
        let truth = Truth::from_model(&ops);
        let shifted = vec![
            acked(0, ops[0].clone(), 3, true, 0),
            acked(0, ops[1].clone(), 2, true, 0),
        ];
        assert!(matches!(
            truth.verify_records(&shifted, &[]),
            Err(TruthError::Record { .. })
        ));
        let mut lost = vec![
            acked(0, ops[0].clone(), 2, true, 0),
            acked(0, ops[1].clone(), 3, true, 0),
        ];
        lost.push(acked(1, put("c", "3", 0), 4, true, 0));
        assert!(truth.verify_records(&lost, &[]).is_err());
        let refused = WriteRecord {
            writer: 2,
            seq: 0,
            op: ops[1].clone(),
            outcome: Outcome::Failed("refused".into()),
        };
        let with_refused = vec![acked(0, ops[0].clone(), 2, true, 0), refused];
        assert!(truth.verify_records(&with_refused, &[]).is_err());
    }

    #[test]
    fn resolves_unknown_outcomes() {
        let ops = vec![
            put("a", "1", 0),
            WriteOp::DeleteRange(KeyRange::single(b"a")),
        ];
        let truth = Truth::from_model(&ops);
        let unknown = |op: WriteOp| WriteRecord {
            writer: 0,
            seq: 0,
            op,
            outcome: Outcome::Unknown("timeout".into()),
        };
        let records = vec![
            unknown(ops[0].clone()),
            unknown(ops[1].clone()),
            unknown(put("x", "lost", 0)),
        ];
        let att = truth.verify_records(&records, &[]).expect("explained");
        assert_eq!(att.unknown_applied, 2);
        assert_eq!(att.unknown_absent, 1);
    }
}
