//! The checker catches broken histories, each with the right violation kind,
//! and passes correct ones.

use std::time::Duration;

use proptest::prelude::*;
use revwatch_proof::checker::{Checker, Kind, RunContext, check_convergence, reference_history};
use revwatch_proof::history::{
    Batch, Change, Delivery, FullSnapshot, History, Op, Resync, SnapshotObservation,
};
use revwatch_proof::keys::KeyRange;
use revwatch_proof::ops::{Compare, CompareResult, CompareTarget, Put, Txn, TxnStep, WriteOp};
use revwatch_proof::schedule::{Schedule, ScheduleConfig};
use revwatch_proof::state::State;
use revwatch_proof::truth::{Compaction, Truth};

const PREFIX: &[u8] = b"/p/";

fn prefix() -> KeyRange {
    KeyRange::prefix(PREFIX)
}

fn put(key: &str, value: &str, lease: i64) -> WriteOp {
    WriteOp::Put(Put {
        key: key.into(),
        value: value.into(),
        lease,
    })
}

/// A truth with every kind of change, inside and outside the prefix:
/// revisions 2..=13.
fn fixture() -> Truth {
    let ops = vec![
        put("/p/a", "1", 0), // 2
        put("/o/x", "1", 0), // 3 (outside)
        put("/p/b", "1", 7), // 4
        put("/p/a", "2", 0), // 5 overwrite
        WriteOp::Txn(Txn {
            // 6 multi-key, spans the boundary
            compares: vec![Compare {
                key: b"/p/a".to_vec(),
                result: CompareResult::Equal,
                target: CompareTarget::Version(2),
            }],
            success: vec![
                TxnStep::Put(Put {
                    key: b"/p/c".to_vec(),
                    value: b"t".to_vec(),
                    lease: 7,
                }),
                TxnStep::Put(Put {
                    key: b"/p/a".to_vec(),
                    value: b"t".to_vec(),
                    lease: 0,
                }),
                TxnStep::Put(Put {
                    key: b"/o/y".to_vec(),
                    value: b"t".to_vec(),
                    lease: 0,
                }),
            ],
            failure: vec![],
        }),
        WriteOp::LeaseRevoke { lease: 7 }, // 7 deletes /p/b and /p/c
        put("/p/d", "1", 0),               // 8
        put("/p/e", "1", 0),               // 9
        WriteOp::DeleteRange(KeyRange::new(b"/p/d", b"/p/f")), // 10 range delete
        put("/o/x", "2", 0),               // 11 (outside)
        put("/p/a", "3", 0),               // 12
        WriteOp::DeleteRange(KeyRange::single(b"/p/a")), // 13
    ];
    let truth = Truth::from_model(&ops);
    assert_eq!(truth.through(), 13);
    truth
}

fn check(truth: &Truth, history: &History) -> Result<(), Kind> {
    Checker::new(truth, prefix())
        .check(history)
        .map(|_| ())
        .map_err(|v| v.kind)
}

fn batch_index(h: &History, revision: i64) -> usize {
    h.deliveries
        .iter()
        .position(|d| matches!(d, Delivery::Batch(b) if b.revision == revision))
        .expect("batch present")
}

fn batch_mut(h: &mut History, revision: i64) -> &mut Batch {
    let i = batch_index(h, revision);
    match &mut h.deliveries[i] {
        Delivery::Batch(b) => b,
        _ => unreachable!("batch_index finds batches"),
    }
}

#[test]
fn the_correct_history_passes_and_covers_every_revision() {
    let truth = fixture();
    let h = reference_history(&truth, &prefix(), 1);
    let summary = Checker::new(&truth, prefix())
        .check(&h)
        .expect("correct history");
    // Revisions 3 and 11 touch only keys outside the prefix.
    assert_eq!(summary.revisions_checked, 10);
    assert_eq!(summary.last_revision, 13);
    // Joining late: the initial resync holds the state at 6, and the
    // revisions it covers are not counted as checked.
    let late = reference_history(&truth, &prefix(), 6);
    let summary = Checker::new(&truth, prefix())
        .check(&late)
        .expect("late join");
    assert_eq!(summary.revisions_checked, 6, "7, 8, 9, 10, 12 and 13");
}

#[test]
fn resume_at_revision_plus_zero_is_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    let i = batch_index(&h, 8);
    let again = h.deliveries[i].clone();
    h.deliveries.insert(i + 1, Delivery::Reconnected);
    h.deliveries.insert(i + 2, again.clone());
    assert_eq!(check(&truth, &h), Err(Kind::Resumable));
    // The same replay without a reconnect marker is a duplicate.
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.insert(i + 1, again);
    assert_eq!(check(&truth, &h), Err(Kind::Unique));
}

#[test]
fn resume_that_skips_a_revision_is_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    let i = batch_index(&h, 8);
    h.deliveries.insert(i + 1, Delivery::Reconnected);
    h.deliveries.remove(i + 2); // the batch at 9
    assert_eq!(check(&truth, &h), Err(Kind::Resumable));
    // A correct resume passes.
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.insert(i + 1, Delivery::Reconnected);
    check(&truth, &h).expect("exact resume");
}

#[test]
fn a_skipped_event_is_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.remove(batch_index(&h, 9));
    assert_eq!(check(&truth, &h), Err(Kind::Reliable));
    // Also the very last one: the final progress mark vouches for it.
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.remove(batch_index(&h, 13));
    assert_eq!(check(&truth, &h), Err(Kind::Reliable));
    // And without the progress mark, `expect_through` does.
    h.deliveries.pop();
    assert_eq!(check(&truth, &h), Err(Kind::Reliable));
}

#[test]
fn a_non_atomic_batch_is_flagged() {
    let truth = fixture();
    // Revision 6 changes /p/c and /p/a (and /o/y outside): split it.
    let mut h = reference_history(&truth, &prefix(), 1);
    let i = batch_index(&h, 6);
    let b = batch_mut(&mut h, 6);
    assert_eq!(b.changes.len(), 2);
    let second = Batch {
        revision: 6,
        resync: None,
        changes: vec![b.changes.pop().expect("two changes")],
    };
    h.deliveries.insert(i + 1, Delivery::Batch(second));
    assert_eq!(check(&truth, &h), Err(Kind::Atomic));
    // A lease revoke deletes two keys at once: half of it is flagged too.
    let mut h = reference_history(&truth, &prefix(), 1);
    batch_mut(&mut h, 7).changes.pop();
    assert_eq!(check(&truth, &h), Err(Kind::Atomic));
}

/// `fixture()` with a compaction at 8, made when etcd was at 9.
fn compacted_fixture() -> Truth {
    fixture().with_compactions(vec![Compaction {
        revision: 8,
        not_before: 9,
    }])
}

/// The subscriber misses revisions 6..=10 (compacted away while it was
/// disconnected) and relists at 10.
fn relist_at_10(truth: &Truth, changes: impl FnOnce(Vec<Change>) -> Vec<Change>) -> History {
    relist_at_10_for(truth, Resync::Compacted, changes)
}

fn relist_at_10_for(
    truth: &Truth,
    cause: Resync,
    changes: impl FnOnce(Vec<Change>) -> Vec<Change>,
) -> History {
    let mut h = reference_history(truth, &prefix(), 1);
    let from = batch_index(&h, 6);
    let to = batch_index(&h, 10);
    let before = truth.state_at(5, &prefix());
    let diff = before.diff(&truth.state_at(10, &prefix()));
    let resync = Delivery::Batch(Batch {
        revision: 10,
        resync: Some(cause),
        changes: changes(diff),
    });
    h.deliveries
        .splice(from..=to, [Delivery::Reconnected, resync]);
    h
}

#[test]
fn a_missed_compaction_is_flagged() {
    let truth = compacted_fixture();
    // The exact diff passes.
    check(&truth, &relist_at_10(&truth, |d| d)).expect("exact resync");
    // Replaying from a wrong base: the relist says nothing of keys it
    // thinks unchanged.
    let h = relist_at_10(&truth, |_| Vec::new());
    assert_eq!(check(&truth, &h), Err(Kind::Resync));
    // A relist that puts the new state but forgets to delete vanished keys.
    let before = truth.state_at(5, &prefix());
    let h = relist_at_10(&truth, |d| {
        d.into_iter().filter(|c| c.op != Op::Delete).collect()
    });
    let diff = before.diff(&truth.state_at(10, &prefix()));
    assert!(
        diff.iter().any(|c| c.op == Op::Delete),
        "the fixture deletes keys in 6..=10"
    );
    assert!(
        diff.iter().any(|c| c.op != Op::Delete),
        "and changes others"
    );
    assert_eq!(check(&truth, &h), Err(Kind::Resync));
    // Skipping the compacted revisions with no resync at all is a gap.
    let mut h = reference_history(&truth, &prefix(), 1);
    let from = batch_index(&h, 8);
    let to = batch_index(&h, 10);
    h.deliveries.drain(from..=to);
    assert_eq!(check(&truth, &h), Err(Kind::Reliable));
}

#[test]
fn a_relist_on_reconnect_without_compaction_is_flagged() {
    // The same exact relist, with nothing in truth to explain it.
    let h = relist_at_10(&fixture(), |d| d);
    assert_eq!(check(&fixture(), &h), Err(Kind::Relist));
    // A compaction the watch did not need (at or below the revision it
    // resumed after) explains nothing.
    let below = fixture().with_compactions(vec![Compaction {
        revision: 5,
        not_before: 5,
    }]);
    assert_eq!(check(&below, &h), Err(Kind::Relist));
    // Nor does one made after the list was read.
    let after = fixture().with_compactions(vec![Compaction {
        revision: 8,
        not_before: 11,
    }]);
    assert_eq!(check(&after, &h), Err(Kind::Relist));
    // A relist for validation is never explained, compaction or not.
    let h = relist_at_10_for(&compacted_fixture(), Resync::Validation, |d| d);
    assert_eq!(check(&compacted_fixture(), &h), Err(Kind::Relist));
    // A second first list, or a subscription's first state in the middle.
    for cause in [Resync::InitialList, Resync::Subscribed] {
        let h = relist_at_10_for(&fixture(), cause, |d| d);
        assert_eq!(check(&fixture(), &h), Err(Kind::Relist), "{cause:?}");
    }
    // A subscriber that lagged is brought up to date without a relist.
    let h = relist_at_10_for(&fixture(), Resync::Lagged, |d| d);
    check(&fixture(), &h).expect("a lagged subscriber's resync");
    // A lagging subscriber's catch-up does not move where the mirror's watch
    // resumed: a compaction above that still explains the relist after it.
    let mut h = reference_history(&fixture(), &prefix(), 1);
    let resync = |from: i64, to: i64, cause| {
        Delivery::Batch(Batch {
            revision: to,
            resync: Some(cause),
            changes: fixture()
                .state_at(from, &prefix())
                .diff(&fixture().state_at(to, &prefix())),
        })
    };
    let (from, to) = (batch_index(&h, 10), batch_index(&h, 12));
    h.deliveries
        .splice(from..=to, [resync(9, 12, Resync::Compacted)]);
    let (from, to) = (batch_index(&h, 6), batch_index(&h, 9));
    h.deliveries.splice(
        from..=to,
        [Delivery::Reconnected, resync(5, 9, Resync::Lagged)],
    );
    let at_7 = fixture().with_compactions(vec![Compaction {
        revision: 7,
        not_before: 8,
    }]);
    check(&at_7, &h).expect("a compaction above the resume revision");
    // The explained relist counts the revisions it covers (7, 8, 9, 10).
    let h = relist_at_10(&compacted_fixture(), |d| d);
    let summary = Checker::new(&compacted_fixture(), prefix())
        .check(&h)
        .expect("explained");
    assert_eq!((summary.relists, summary.revisions_checked), (1, 10));
}

/// A correct history up to revision `upto`, then a restart given a snapshot
/// file at `file`, then `after`.
fn restart_after(truth: &Truth, upto: i64, file: Option<i64>, after: Vec<Delivery>) -> History {
    let mut h = reference_history(truth, &prefix(), 1);
    h.deliveries.truncate(batch_index(&h, upto) + 1);
    h.deliveries.push(Delivery::Restarted { file });
    h.deliveries.extend(after);
    h
}

/// A subscription's first state at `revision` (from an empty state).
fn first_state(truth: &Truth, revision: i64, cause: Resync) -> Delivery {
    Delivery::Batch(Batch {
        revision,
        resync: Some(cause),
        changes: State::default().diff(&truth.state_at(revision, &prefix())),
    })
}

/// The reference history's deliveries after revision `after` (its final
/// progress mark included).
fn rest(truth: &Truth, after: i64) -> Vec<Delivery> {
    let h = reference_history(truth, &prefix(), 1);
    let from = h
        .deliveries
        .iter()
        .position(|d| match d {
            Delivery::Batch(b) => b.revision > after,
            Delivery::Progress { revision } => *revision >= after,
            _ => false,
        })
        .unwrap_or(h.deliveries.len());
    h.deliveries[from..].to_vec()
}

#[test]
fn a_restart_that_ignores_its_snapshot_file_is_flagged() {
    let truth = fixture();
    // The file (at 6) is loaded and the watch resumes right after it.
    let mut after = vec![first_state(&truth, 6, Resync::Subscribed)];
    after.extend(rest(&truth, 6));
    let good = restart_after(&truth, 9, Some(6), after);
    let summary = Checker::new(&truth, prefix())
        .check(&good)
        .expect("a resume from the file");
    assert_eq!(summary.restarts, 1);
    assert_eq!(summary.revisions_checked, 10, "7, 8 and 9 count once");
    // Ignoring the file: the new mirror lists afresh.
    let mut after = vec![first_state(&truth, 13, Resync::InitialList)];
    after.extend(rest(&truth, 13));
    let ignored = restart_after(&truth, 9, Some(6), after);
    assert_eq!(check(&truth, &ignored), Err(Kind::Resumable));
    // Loading the file, then relisting without a compaction.
    let relist = vec![
        first_state(&truth, 6, Resync::Subscribed),
        Delivery::Batch(Batch {
            revision: 13,
            resync: Some(Resync::Compacted),
            changes: truth
                .state_at(6, &prefix())
                .diff(&truth.state_at(13, &prefix())),
        }),
    ];
    let h = restart_after(&truth, 9, Some(6), relist.clone());
    assert_eq!(check(&truth, &h), Err(Kind::Relist));
    // ... which a compaction above the file's revision explains.
    let compacted = truth.clone().with_compactions(vec![Compaction {
        revision: 10,
        not_before: 11,
    }]);
    check(&compacted, &h).expect("a relist for a compaction past the file");
    // Loading the file, then skipping the revision after it.
    let mut after = vec![first_state(&truth, 6, Resync::Subscribed)];
    after.extend(rest(&truth, 7));
    let h = restart_after(&truth, 9, Some(6), after);
    assert_eq!(check(&truth, &h), Err(Kind::Resumable));
    // Starting from another state than the file's.
    let mut after = vec![first_state(&truth, 5, Resync::Subscribed)];
    after.extend(rest(&truth, 5));
    let h = restart_after(&truth, 9, Some(6), after);
    assert_eq!(check(&truth, &h), Err(Kind::Resumable));
    // With the file removed on purpose, a fresh first list is expected.
    let mut after = vec![first_state(&truth, 10, Resync::InitialList)];
    after.extend(rest(&truth, 10));
    let h = restart_after(&truth, 9, None, after);
    check(&truth, &h).expect("a first list without a file");
}

#[test]
fn an_out_of_order_delivery_is_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    let i = batch_index(&h, 8);
    h.deliveries.swap(i, i + 1);
    assert_eq!(check(&truth, &h), Err(Kind::Ordered));
    // A progress mark that goes back.
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries
        .insert(i + 1, Delivery::Progress { revision: 5 });
    assert_eq!(check(&truth, &h), Err(Kind::Ordered));
}

#[test]
fn a_bookmark_violation_is_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    // Progress at 9 arrives before the batch at 9.
    let i = batch_index(&h, 9);
    h.deliveries.insert(i, Delivery::Progress { revision: 9 });
    assert_eq!(check(&truth, &h), Err(Kind::Bookmarkable));
    // A bookmark ahead of revisions that never come is flagged when it comes,
    // even if what follows repairs the state: here a relist that compaction
    // explains, with the exact diff (a stale bookmark from etcd#15220).
    let compacted = compacted_fixture();
    let mut h = relist_at_10(&compacted, |d| d);
    check(&compacted, &h).expect("the relist alone is fine");
    let i = h
        .deliveries
        .iter()
        .position(|d| matches!(d, Delivery::Reconnected))
        .expect("a reconnect before the relist");
    h.deliveries.insert(i, Delivery::Progress { revision: 6 });
    assert_eq!(check(&compacted, &h), Err(Kind::Reliable));
    // Progress at 11 (which touched only other keys) right after 10 is fine.
    let mut h = reference_history(&truth, &prefix(), 1);
    let i = batch_index(&h, 10);
    h.deliveries
        .insert(i + 1, Delivery::Progress { revision: 11 });
    check(&truth, &h).expect("a correct bookmark");
}

#[test]
fn wrong_contents_are_flagged() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    match &mut batch_mut(&mut h, 5).changes[0].op {
        Op::Put(e) => e.version += 1,
        Op::Delete => unreachable!("revision 5 is a put"),
    }
    assert_eq!(check(&truth, &h), Err(Kind::Content));
    // A change of a key outside the prefix leaking into a batch.
    let mut h = reference_history(&truth, &prefix(), 1);
    batch_mut(&mut h, 6)
        .changes
        .push(truth.changes_at(6)[2].clone());
    assert_eq!(check(&truth, &h), Err(Kind::Content));
    // A revision beyond truth.
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.push(Delivery::Progress { revision: 99 });
    assert_eq!(check(&truth, &h), Err(Kind::Future));
}

#[test]
fn snapshots_are_compared_by_hash_and_in_full() {
    let truth = fixture();
    let mut h = reference_history(&truth, &prefix(), 1);
    h.snapshots = (1..=13)
        .map(|r| SnapshotObservation {
            revision: r,
            hash: truth.state_at(r, &prefix()).hash(),
        })
        .collect();
    h.full_snapshots = vec![FullSnapshot {
        revision: 9,
        state: truth.state_at(9, &prefix()),
    }];
    let summary = Checker::new(&truth, prefix())
        .check(&h)
        .expect("correct snapshots");
    assert_eq!((summary.snapshot_hashes, summary.full_snapshots), (13, 1));

    // A snapshot that shows half of revision 7 (one of two lease deletes).
    let mut half = truth.state_at(6, &prefix());
    half.remove(b"/p/b");
    let mut bad = h.clone();
    bad.snapshots[5].hash = half.hash();
    assert_eq!(check(&truth, &bad), Err(Kind::Snapshot));
    let mut bad = h.clone();
    bad.full_snapshots[0].state = half;
    assert_eq!(check(&truth, &bad), Err(Kind::Snapshot));
    // Published revisions going back.
    let mut bad = h.clone();
    bad.snapshots.swap(3, 4);
    assert_eq!(check(&truth, &bad), Err(Kind::Snapshot));
    // ... which a restarted mirror's snapshots may, from where they begin.
    let mut restarted = h;
    let again = restarted.snapshots[2..].to_vec();
    restarted.restarts.push((restarted.snapshots.len(), 1));
    restarted.snapshots.extend(again);
    restarted
        .full_snapshots
        .push(restarted.full_snapshots[0].clone());
    Checker::new(&truth, prefix())
        .check(&restarted)
        .expect("a restarted mirror's snapshots");
}

#[test]
fn convergence_compares_with_etcds_range() {
    let truth = fixture();
    let at = |r| FullSnapshot {
        revision: r,
        state: truth.state_at(r, &prefix()),
    };
    let ctx = RunContext::default();
    check_convergence(&at(12), &at(12), &ctx).expect("equal");
    let v = check_convergence(&at(12), &at(13), &ctx).expect_err("different revisions");
    assert_eq!(v.kind, Kind::Convergence);
    let mut stale = at(13);
    stale.state = truth.state_at(12, &prefix());
    let v = check_convergence(&stale, &at(13), &ctx).expect_err("different states");
    assert!(v.detail.contains("/p/a"), "{}", v.detail);
}

#[test]
fn a_violation_report_shows_seed_schedule_and_window() {
    let truth = fixture();
    let schedule = Schedule::generate(
        77,
        &ScheduleConfig {
            run_length: Duration::from_secs(20),
            ..ScheduleConfig::default()
        },
    );
    let mut h = reference_history(&truth, &prefix(), 1);
    h.deliveries.remove(batch_index(&h, 9));
    let v = Checker::new(&truth, prefix())
        .with_context(RunContext {
            seed: 77,
            schedule: Some(schedule.clone()),
        })
        .check(&h)
        .expect_err("a skipped event");
    let text = v.to_string();
    assert!(
        text.contains("violation: Reliable at revision 10"),
        "{text}"
    );
    assert!(text.contains("revision 9 was skipped"), "{text}");
    assert!(text.contains("seed: 77"), "{text}");
    assert!(text.contains(&schedule.to_string()), "{text}");
    // The window: the batch at 8 before the gap, the offending batch at 10.
    assert!(v.window.iter().any(|l| l.contains("batch rev=8")), "{text}");
    assert!(
        v.window
            .iter()
            .any(|l| l.starts_with("> ") && l.contains("batch rev=10")),
        "{text}"
    );
    assert!(v.window.len() <= 6, "{text}");
}

// ---- properties over random histories ----

#[derive(Debug, Clone)]
enum Spec {
    Put {
        inside: bool,
        key: u8,
        lease: u8,
    },
    Delete {
        inside: bool,
        key: u8,
    },
    Range {
        from: u8,
        len: u8,
    },
    Txn {
        a: (bool, u8),
        b: (bool, u8),
        version: u8,
    },
    Expire {
        lease: u8,
    },
}

fn key(inside: bool, k: u8) -> Vec<u8> {
    format!("{}{k}", if inside { "/p/" } else { "/o/" }).into_bytes()
}

fn to_ops(specs: &[Spec]) -> Vec<WriteOp> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let value = format!("v{i}").into_bytes();
            match *s {
                Spec::Put {
                    inside,
                    key: k,
                    lease,
                } => WriteOp::Put(Put {
                    key: key(inside, k),
                    value,
                    lease: i64::from(lease),
                }),
                Spec::Delete { inside, key: k } => {
                    WriteOp::DeleteRange(KeyRange::single(&key(inside, k)))
                }
                Spec::Range { from, len } => {
                    WriteOp::DeleteRange(KeyRange::new(&key(true, from), &key(true, from + len)))
                }
                Spec::Txn { a, b, version } => {
                    let b = if a == b { (!b.0, b.1) } else { b };
                    WriteOp::Txn(Txn {
                        compares: vec![Compare {
                            key: key(a.0, a.1),
                            result: CompareResult::Equal,
                            target: CompareTarget::Version(i64::from(version)),
                        }],
                        success: vec![
                            TxnStep::Put(Put {
                                key: key(a.0, a.1),
                                value: value.clone(),
                                lease: 0,
                            }),
                            TxnStep::Put(Put {
                                key: key(b.0, b.1),
                                value,
                                lease: 0,
                            }),
                        ],
                        failure: vec![TxnStep::DeleteRange(KeyRange::single(&key(b.0, b.1)))],
                    })
                }
                Spec::Expire { lease } => WriteOp::LeaseRevoke {
                    lease: i64::from(lease),
                },
            }
        })
        .collect()
}

fn spec() -> impl Strategy<Value = Spec> {
    let k = 0u8..6;
    prop_oneof![
        4 => (any::<bool>(), k.clone(), 0u8..3).prop_map(|(inside, key, lease)| Spec::Put { inside, key, lease }),
        1 => (any::<bool>(), k.clone()).prop_map(|(inside, key)| Spec::Delete { inside, key }),
        1 => (k.clone(), 1u8..4).prop_map(|(from, len)| Spec::Range { from, len }),
        2 => ((any::<bool>(), k.clone()), (any::<bool>(), k), 0u8..3).prop_map(|(a, b, version)| Spec::Txn { a, b, version }),
        1 => (1u8..3).prop_map(|lease| Spec::Expire { lease }),
    ]
}

/// A truth with at least a few revisions in the prefix.
fn truth_strategy() -> impl Strategy<Value = Truth> {
    prop::collection::vec(spec(), 8..40)
        .prop_map(|specs| Truth::from_model(&to_ops(&specs)))
        .prop_filter("needs revisions in the prefix", |t| {
            t.restricted_to(&prefix()).len() >= 4
        })
}

/// Indices of incremental batches in `h`.
fn batches(h: &History, pred: impl Fn(&Batch) -> bool) -> Vec<usize> {
    h.deliveries
        .iter()
        .enumerate()
        .filter_map(|(i, d)| match d {
            Delivery::Batch(b) if b.resync.is_none() && pred(b) => Some(i),
            _ => None,
        })
        .collect()
}

fn get_batch(h: &mut History, i: usize) -> &mut Batch {
    match &mut h.deliveries[i] {
        Delivery::Batch(b) => b,
        _ => unreachable!("index from `batches`"),
    }
}

/// Applies mutation `m` at a position drawn from `pick`; `None` if the
/// history has no place for it. Returns the kinds it may be flagged as.
fn mutate(truth: &Truth, h: &mut History, m: u8, pick: usize) -> Option<Vec<Kind>> {
    let all = batches(h, |_| true);
    let choose = |v: &[usize]| (!v.is_empty()).then(|| v[pick % v.len()]);
    match m {
        // Duplicate a batch, with or without a reconnect in between.
        0 | 1 => {
            let i = choose(&all)?;
            let copy = h.deliveries[i].clone();
            if m == 1 {
                h.deliveries.insert(i + 1, Delivery::Reconnected);
                h.deliveries.insert(i + 2, copy);
                Some(vec![Kind::Resumable])
            } else {
                h.deliveries.insert(i + 1, copy);
                Some(vec![Kind::Unique])
            }
        }
        // Lose a batch.
        2 => {
            let i = choose(&all)?;
            h.deliveries.remove(i);
            Some(vec![Kind::Reliable])
        }
        // Split a revision over two batches.
        3 => {
            let i = choose(&batches(h, |b| b.changes.len() >= 2))?;
            let b = get_batch(h, i);
            let tail = Batch {
                revision: b.revision,
                resync: None,
                changes: vec![b.changes.pop()?],
            };
            h.deliveries.insert(i + 1, Delivery::Batch(tail));
            Some(vec![Kind::Atomic])
        }
        // Swap two adjacent batches.
        4 => {
            let pairs: Vec<usize> = all
                .windows(2)
                .filter(|w| w[1] == w[0] + 1)
                .map(|w| w[0])
                .collect();
            let i = choose(&pairs)?;
            h.deliveries.swap(i, i + 1);
            Some(vec![Kind::Ordered])
        }
        // A progress mark ahead of a batch it vouches for.
        5 => {
            let i = choose(&all)?;
            let r = get_batch(h, i).revision;
            h.deliveries.insert(i, Delivery::Progress { revision: r });
            Some(vec![Kind::Bookmarkable])
        }
        // Corrupt one change.
        6 => {
            let i = choose(&all)?;
            let b = get_batch(h, i);
            let (n, revision) = (b.changes.len(), b.revision);
            let c = &mut b.changes[pick % n];
            c.op = match &c.op {
                Op::Put(e) => Op::Put(revwatch_proof::history::Entry {
                    value: b"corrupt".to_vec(),
                    ..e.clone()
                }),
                Op::Delete => Op::Put(revwatch_proof::history::Entry {
                    value: b"corrupt".to_vec(),
                    create_revision: revision,
                    mod_revision: revision,
                    version: 1,
                    lease: 0,
                }),
            };
            Some(vec![Kind::Content])
        }
        // Resync (of a lagging subscriber) missing one change.
        7 => {
            let i = choose(&all)?;
            let r = get_batch(h, i).revision;
            let before = replay_state(h, i);
            let mut diff = before.diff(&truth.state_at(r, &prefix()));
            if diff.is_empty() {
                return None;
            }
            diff.remove(pick % diff.len());
            h.deliveries[i] = Delivery::Batch(Batch {
                revision: r,
                resync: Some(Resync::Lagged),
                changes: diff,
            });
            Some(vec![Kind::Resync])
        }
        // A progress mark going back.
        8 => {
            let i = choose(&all)?;
            let r = get_batch(h, i).revision;
            h.deliveries
                .insert(i + 1, Delivery::Progress { revision: r - 1 });
            Some(vec![Kind::Ordered])
        }
        // Relist on reconnect, exactly, with no compaction in truth.
        9 => {
            let i = choose(&all)?;
            let r = get_batch(h, i).revision;
            let diff = replay_state(h, i).diff(&truth.state_at(r, &prefix()));
            h.deliveries[i] = Delivery::Batch(Batch {
                revision: r,
                resync: Some(Resync::Compacted),
                changes: diff,
            });
            h.deliveries.insert(i, Delivery::Reconnected);
            Some(vec![Kind::Relist])
        }
        // Restart with a file at a batch's revision, and ignore it.
        10 => {
            let i = choose(&all)?;
            let r = get_batch(h, i).revision;
            let last = truth.through();
            h.deliveries.truncate(i + 1);
            h.deliveries.push(Delivery::Restarted { file: Some(r) });
            h.deliveries.push(Delivery::Batch(Batch {
                revision: last,
                resync: Some(Resync::InitialList),
                changes: State::default().diff(&truth.state_at(last, &prefix())),
            }));
            h.deliveries.push(Delivery::Progress { revision: last });
            Some(vec![Kind::Resumable])
        }
        _ => None,
    }
}

/// The subscriber's state after deliveries `..i` of a correct history.
fn replay_state(h: &History, i: usize) -> State {
    let mut s = State::default();
    for d in &h.deliveries[..i] {
        if let Delivery::Batch(b) = d {
            s.apply_all(&b.changes);
        }
    }
    s
}

/// Changes a correct history into another correct one: bookmarks at the
/// current revision, reconnect markers, runs of batches compressed into one
/// exact resync after a compaction (returned, for the truth), and restarts
/// from a snapshot file.
fn vary(truth: &Truth, h: &mut History, what: u8, pick: usize) -> Option<Compaction> {
    let all = batches(h, |_| true);
    if all.is_empty() {
        return None;
    }
    let i = all[pick % all.len()];
    match what {
        0 => {
            let r = get_batch(h, i).revision;
            h.deliveries
                .insert(i + 1, Delivery::Progress { revision: r });
        }
        1 => h.deliveries.insert(i, Delivery::Reconnected),
        2 => {
            let r = get_batch(h, i).revision;
            h.deliveries.splice(
                i + 1..i + 1,
                [
                    Delivery::Restarted { file: Some(r) },
                    first_state(truth, r, Resync::Subscribed),
                ],
            );
        }
        _ => {
            let j = all[(pick / 7 % all.len()).max(all.iter().position(|&x| x == i).unwrap_or(0))];
            let r = get_batch(h, j).revision;
            let before = replay_state(h, i);
            let diff = before.diff(&truth.state_at(r, &prefix()));
            h.deliveries.splice(
                i..=j,
                [
                    Delivery::Reconnected,
                    Delivery::Batch(Batch {
                        revision: r,
                        resync: Some(Resync::Compacted),
                        changes: diff,
                    }),
                ],
            );
            return Some(Compaction {
                revision: r,
                not_before: r,
            });
        }
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn correct_histories_pass(truth in truth_strategy(), start in 1i64..6, edits in prop::collection::vec((0u8..4, any::<usize>()), 0..4)) {
        let mut h = reference_history(&truth, &prefix(), start.min(truth.through()));
        let mut compactions = Vec::new();
        for (what, pick) in edits {
            compactions.extend(vary(&truth, &mut h, what, pick));
        }
        let truth = truth.with_compactions(compactions);
        let result = Checker::new(&truth, prefix()).check(&h);
        prop_assert!(result.is_ok(), "{}", result.err().map(|v| v.to_string()).unwrap_or_default());
    }

    #[test]
    fn every_single_mutation_is_flagged(truth in truth_strategy(), m in 0u8..11, pick in any::<usize>()) {
        let mut h = reference_history(&truth, &prefix(), 1);
        let expected = mutate(&truth, &mut h, m, pick);
        prop_assume!(expected.is_some());
        let expected = expected.unwrap_or_default();
        match Checker::new(&truth, prefix()).check(&h) {
            Ok(_) => prop_assert!(false, "mutation {m} not flagged: {h:?}"),
            Err(v) => prop_assert!(expected.contains(&v.kind), "mutation {m}: expected {expected:?}, got\n{v}"),
        }
    }
}
