//! Durability ordering: a write is acknowledged only after its log record is synced.
//!
//! The store runs on [`SimFs`], a disk that keeps only what was synced (see `sim.rs`).
//! Concurrent writers drive puts, deletes, txns, lease grants and compactions through the
//! store's API while its log rolls over to new segments and checkpoints delete covered ones.
//! The power goes at a random disk operation, or during a random log write (which it tears),
//! and the real recovery code opens what the disk kept. Every acknowledged write must be
//! there, at its revision and with its content; every other change must be some writer's
//! last write, the one whose answer was an error, applied whole or not at all.
//!
//! The old disk fails every operation after the loss, so a write acknowledged at any time,
//! even after the loss, had its sync before it: every acknowledgement counts.
//!
//! The database (redb) runs on the same disk. Its commits sync before they return, and a
//! checkpoint copies only records the log already synced, so it adds nothing to check; it
//! is modelled anyway, so that a crash in the middle of a checkpoint is one of the cases.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::request_op::Request;
use etcd_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RequestOp, TxnRequest,
};
use etcd_proto::key_range::KeyRange;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Mutation;
use super::sim::{At, Image, Plan, SimFs, Stats};
use crate::checkpoint::Policy;
use crate::error::EtcdError;
use crate::faults::Faults;
use crate::store::{Layout, Store, StoreOptions};

const WRITERS: usize = 4;
const KEYS: usize = 5;
const OPS_PER_WRITER: usize = 100;
/// Small segments, so that a run rolls over many times.
const SEGMENT_BYTES: u64 = 4096;
/// Roughly the disk operations of a whole run, for picking where the power goes.
const RUN_OPS: u64 = 700;

/// One request of a writer. Each writer has its own keys, so it knows their state exactly.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    /// If `guard` has version `version`: put both `puts`, delete `delete`.
    Txn {
        guard: Vec<u8>,
        version: i64,
        puts: [(Vec<u8>, Vec<u8>); 2],
        delete: Vec<u8>,
    },
    Grant {
        id: i64,
    },
    Compact {
        rev: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyState {
    value: Vec<u8>,
    version: i64,
    create: i64,
    modified: i64,
}

/// One change at a revision, as the recovered store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    key: Vec<u8>,
    /// None for a delete.
    value: Option<Vec<u8>>,
    version: i64,
    create: i64,
}

type Model = BTreeMap<Vec<u8>, KeyState>;

/// Applies `op` at revision `rev` and returns the changes it makes there, in order.
fn apply(model: &mut Model, op: &Op, rev: i64) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut put = |model: &mut Model, key: &[u8], value: &[u8]| {
        let (version, create) = model
            .get(key)
            .map_or((1, rev), |s| (s.version + 1, s.create));
        model.insert(
            key.to_vec(),
            KeyState {
                value: value.to_vec(),
                version,
                create,
                modified: rev,
            },
        );
        changes.push(Change {
            key: key.to_vec(),
            value: Some(value.to_vec()),
            version,
            create,
        });
    };
    let mut tombstones = Vec::new();
    match op {
        Op::Put { key, value } => put(model, key, value),
        Op::Delete { key } => tombstones.push(key.clone()),
        Op::Txn { puts, delete, .. } => {
            for (key, value) in puts {
                put(model, key, value);
            }
            tombstones.push(delete.clone());
        }
        Op::Grant { .. } | Op::Compact { .. } => {}
    }
    for key in tombstones {
        if model.remove(&key).is_some() {
            changes.push(Change {
                key,
                value: None,
                version: 0,
                create: 0,
            });
        }
    }
    changes
}

/// What came of one request.
#[derive(Debug)]
enum Answer {
    /// Acknowledged, at this revision (the header's, for requests that make none).
    Ok(i64),
    /// An error: the request may or may not have been applied.
    Failed,
    /// An answer that contradicts the writer's own keys.
    Wrong(String),
}

#[derive(Debug)]
struct Done {
    op: Op,
    answer: Answer,
}

/// Each writer's requests in order; only the last one can have failed.
type Log = Vec<Vec<Done>>;

fn key(w: usize, k: usize) -> Vec<u8> {
    format!("w{w}/k{k}").into_bytes()
}

fn pick(rng: &mut StdRng, w: usize, i: usize, model: &Model, last_rev: i64, compacted: i64) -> Op {
    let value = |rng: &mut StdRng| {
        let mut v = format!("w{w} op{i} ").into_bytes();
        // Record sizes vary, so that segments fill at different points.
        v.resize(v.len() + rng.random_range(0..300), b'.');
        v
    };
    let existing: Vec<&Vec<u8>> = model.keys().collect();
    match rng.random_range(0..100) {
        0..45 => Op::Put {
            key: key(w, rng.random_range(0..KEYS)),
            value: value(rng),
        },
        45..60 if !existing.is_empty() => Op::Delete {
            key: existing[rng.random_range(0..existing.len())].clone(),
        },
        60..90 => {
            let mut ks: Vec<usize> = (0..KEYS).collect();
            let mut take = || ks.swap_remove(rng.random_range(0..ks.len()));
            let (a, b, c) = (take(), take(), take());
            let guard = key(w, a);
            let version = model.get(&guard).map_or(0, |s| s.version);
            Op::Txn {
                guard,
                version,
                puts: [(key(w, a), value(rng)), (key(w, b), value(rng))],
                delete: key(w, c),
            }
        }
        90..95 => Op::Grant {
            id: (w as i64 + 1) * 1_000_000 + i as i64,
        },
        // Writer 0 compacts now and then, well behind the newest revision.
        95.. if w == 0 && last_rev - 40 > compacted.max(1) => Op::Compact { rev: last_rev - 40 },
        _ => Op::Put {
            key: key(w, rng.random_range(0..KEYS)),
            value: value(rng),
        },
    }
}

fn put_op(key: &[u8], value: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })),
    }
}

/// Sends `op`; Ok is the revision of the answer's header, or an answer that cannot be right.
async fn send(store: &Store, op: &Op) -> Result<Result<i64, String>, EtcdError> {
    let rev = |h: Option<etcd_proto::etcdserverpb::ResponseHeader>| h.map_or(0, |h| h.revision);
    Ok(Ok(match op {
        Op::Put { key, value } => {
            let req = PutRequest {
                key: key.clone(),
                value: value.clone(),
                ..Default::default()
            };
            rev(store.put(req).await?.header)
        }
        Op::Delete { key } => {
            let req = DeleteRangeRequest {
                key: key.clone(),
                ..Default::default()
            };
            let resp = store.delete_range(req).await?;
            if resp.deleted != 1 {
                return Ok(Err(format!("deleted {} of 1 live key", resp.deleted)));
            }
            rev(resp.header)
        }
        Op::Txn {
            guard,
            version,
            puts,
            delete,
        } => {
            let req = TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: guard.clone(),
                    target_union: Some(TargetUnion::Version(*version)),
                    ..Default::default()
                }],
                success: vec![
                    put_op(&puts[0].0, &puts[0].1),
                    put_op(&puts[1].0, &puts[1].1),
                    RequestOp {
                        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                            key: delete.clone(),
                            ..Default::default()
                        })),
                    },
                ],
                failure: Vec::new(),
            };
            let resp = store.txn(req).await?;
            if !resp.succeeded {
                return Ok(Err(format!("the guard's version is not {version}")));
            }
            rev(resp.header)
        }
        Op::Grant { id } => {
            let req = LeaseGrantRequest { ttl: 600, id: *id };
            rev(store.lease_grant(req).await?.header)
        }
        Op::Compact { rev: at } => {
            store.compact(*at).await?;
            *at
        }
    }))
}

/// One writer: sequential requests on its own keys, until one fails.
async fn writer(store: Arc<Store>, w: usize, seed: u64) -> Vec<Done> {
    let mut rng = StdRng::seed_from_u64(seed * 1000 + w as u64);
    let (mut model, mut last_rev, mut compacted) = (Model::new(), 0, -1);
    let mut done = Vec::new();
    for i in 0..OPS_PER_WRITER {
        let op = pick(&mut rng, w, i, &model, last_rev, compacted);
        let answer = match send(&store, &op).await {
            Ok(Ok(rev)) => {
                match op {
                    Op::Compact { rev } => compacted = rev,
                    Op::Grant { .. } => {}
                    _ => {
                        apply(&mut model, &op, rev);
                    }
                }
                last_rev = last_rev.max(rev);
                Answer::Ok(rev)
            }
            Ok(Err(why)) => Answer::Wrong(why),
            Err(_) => Answer::Failed,
        };
        let stop = !matches!(answer, Answer::Ok(_));
        done.push(Done { op, answer });
        if stop {
            break;
        }
    }
    done
}

/// What the recovered store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recovered {
    committed: i64,
    compacted: i64,
    /// The changes at each revision above the compacted one.
    history: BTreeMap<i64, Vec<Change>>,
    keys: Model,
    leases: Vec<i64>,
}

impl Recovered {
    fn read(store: &Store) -> Self {
        let committed = store.committed();
        let st = store.state();
        let compacted = st.compacted();
        let history = st
            .log_between(compacted + 1, committed)
            .map(|(rev, recs)| {
                let changes = recs
                    .iter()
                    .map(|r| Change {
                        key: r.key.to_vec(),
                        value: (!r.tombstone).then(|| r.value.clone()),
                        version: r.version,
                        create: r.create_revision,
                    })
                    .collect();
                (rev, changes)
            })
            .collect();
        let keys = st
            .visit_at(&KeyRange::all(), committed)
            .map(|r| {
                let state = KeyState {
                    value: r.value.clone(),
                    version: r.version,
                    create: r.create_revision,
                    modified: r.rev.main,
                };
                (r.key.to_vec(), state)
            })
            .collect();
        drop(st);
        Self {
            committed,
            compacted,
            history,
            keys,
            leases: store.lease_ids(),
        }
    }
}

/// Everything wrong with `rec` as the outcome of `log`; empty when all is well.
fn check(log: &Log, rec: &Recovered) -> Vec<String> {
    let mut bad = Vec::new();
    // Revisions the acknowledged writes account for.
    let mut claimed = HashSet::new();
    let mut granted = HashSet::new();
    // Each writer's state after its acknowledged writes, and its failed write if any.
    let mut acked: Vec<Model> = Vec::new();
    let mut failed: Vec<Option<&Op>> = Vec::new();
    for (w, done) in log.iter().enumerate() {
        let mut model = Model::new();
        let mut last_failed = None;
        for d in done {
            if let Op::Grant { id } = d.op {
                granted.insert(id);
            }
            let rev = match &d.answer {
                Answer::Ok(rev) => *rev,
                Answer::Failed => {
                    last_failed = Some(&d.op);
                    continue;
                }
                Answer::Wrong(why) => {
                    bad.push(format!("writer {w}: {:?}: {why}", d.op));
                    continue;
                }
            };
            match d.op {
                Op::Grant { id } => {
                    if !rec.leases.contains(&id) {
                        bad.push(format!("acknowledged lease {id} lost"));
                    }
                }
                Op::Compact { rev } => {
                    if rec.compacted < rev {
                        let c = rec.compacted;
                        bad.push(format!("acknowledged compaction at {rev} lost (at {c})"));
                    }
                }
                _ => {
                    let expected = apply(&mut model, &d.op, rev);
                    if rev > rec.committed {
                        let c = rec.committed;
                        bad.push(format!(
                            "acknowledged revision {rev} lost: recovered to {c}"
                        ));
                    } else if rev > rec.compacted {
                        claimed.insert(rev);
                        match rec.history.get(&rev) {
                            Some(found) if *found == expected => {}
                            found => bad.push(format!(
                                "acknowledged revision {rev}: expected {expected:?}, found {found:?}"
                            )),
                        }
                    }
                }
            }
        }
        acked.push(model);
        failed.push(last_failed);
    }
    for rev in rec.compacted.max(1) + 1..=rec.committed {
        if !rec.history.contains_key(&rev) {
            bad.push(format!("revision {rev} has no changes"));
        }
    }
    // Where each writer's failed write shows up, if it does.
    let mut failed_at: Vec<Option<i64>> = vec![None; log.len()];
    for (rev, found) in &rec.history {
        if claimed.contains(rev) {
            continue;
        }
        let explained = (0..log.len()).find(|&w| {
            failed_at[w].is_none()
                && failed[w].is_some_and(|op| apply(&mut acked[w].clone(), op, *rev) == *found)
        });
        match explained {
            Some(w) => failed_at[w] = Some(*rev),
            None => bad.push(format!(
                "revision {rev} is no write's, or half of one: {found:?}"
            )),
        }
    }
    for (w, model) in acked.iter().enumerate() {
        let prefix = format!("w{w}/").into_bytes();
        let found: Model = rec
            .keys
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        if found == *model {
            continue;
        }
        // Otherwise it must be the failed write, applied whole.
        let whole = failed[w].is_some_and(|op| {
            let mut after = model.clone();
            apply(&mut after, op, failed_at[w].unwrap_or(0));
            match failed_at[w] {
                Some(_) => after == found,
                // Its revision was compacted away: compare what is left of it.
                None => {
                    let content = |m: &Model| -> Vec<(Vec<u8>, Vec<u8>, i64)> {
                        m.iter()
                            .map(|(k, s)| (k.clone(), s.value.clone(), s.version))
                            .collect()
                    };
                    content(&after) == content(&found)
                }
            }
        });
        if !whole {
            bad.push(format!(
                "writer {w}: keys are {found:?}, acknowledged writes left {model:?}"
            ));
        }
    }
    for id in &rec.leases {
        if !granted.contains(id) {
            bad.push(format!("lease {id} was never granted"));
        }
    }
    bad
}

/// The store's durable configuration for a run.
#[derive(Debug, Clone, Copy)]
struct Setup {
    segment_bytes: u64,
    /// Checkpoint (and delete covered segments) every so many log bytes; None: never.
    checkpoint_bytes: Option<usize>,
    mutation: Option<Mutation>,
}

const NORMAL: Setup = Setup {
    segment_bytes: SEGMENT_BYTES,
    checkpoint_bytes: Some(8 << 10),
    mutation: None,
};

fn open(fs: &SimFs, dir: &Path, setup: Setup) -> Result<Store, crate::ServerError> {
    let opts = StoreOptions {
        min_lease_ttl: 2,
        lease_check_interval: Duration::from_secs(3600),
        checkpoint_interval: Duration::from_secs(3600),
        auto_compaction: None,
    };
    let layout = Layout {
        storage: fs.clone(),
        segment_bytes: setup.segment_bytes,
        checkpoints: Policy {
            interval: Duration::from_secs(3600),
            max_bytes: setup.checkpoint_bytes.unwrap_or(usize::MAX),
        },
        mutation: setup.mutation,
    };
    Store::open_with(dir, opts, Arc::new(Faults::default()), layout)
}

/// What one run found.
struct Outcome {
    violations: Vec<String>,
    acknowledged: usize,
    before: Stats,
    torn: Option<PathBuf>,
}

/// Runs the writers on a fresh disk until the power goes as `plan` says (or they finish,
/// and then it goes), recovers, checks, and checks again after one more write and a clean
/// restart.
async fn run(plan: Plan, setup: Setup) -> Outcome {
    let dir = PathBuf::from("data");
    let fs = SimFs::new(&dir);
    let store = Arc::new(open(&fs, &dir, setup).expect("open a fresh store"));
    fs.plan(plan);
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(store.clone(), w, plan.seed)))
        .collect();
    let mut log = Log::new();
    for task in tasks {
        log.push(task.await.expect("writer task"));
    }
    fs.power_loss_now();
    // Its threads end on the dead disk.
    drop(store);
    let Image { fs, before, torn } = fs.take_image().expect("the power went");
    let acknowledged = log
        .iter()
        .flatten()
        .filter(|d| matches!(d.answer, Answer::Ok(_)))
        .count();
    let outcome = |violations| Outcome {
        violations,
        acknowledged,
        before,
        torn: torn.clone(),
    };
    let store = match open(&fs, &dir, setup) {
        Ok(s) => s,
        // The acknowledged writes are not served either.
        Err(e) => {
            return outcome(vec![format!(
                "acknowledged writes lost: recovery failed: {e}"
            )]);
        }
    };
    let rec = Recovered::read(&store);
    let violations = check(&log, &rec);
    if !violations.is_empty() {
        return outcome(violations);
    }
    // The log goes on after what recovery cut, and a clean restart changes nothing.
    let req = PutRequest {
        key: b"after".to_vec(),
        value: b"recovery".to_vec(),
        ..Default::default()
    };
    let header = store.put(req).await.expect("put after recovery").header;
    assert_eq!(header.map(|h| h.revision), Some(rec.committed + 1));
    drop(store);
    let store = open(&fs, &dir, setup).expect("reopen after recovery");
    let mut expected = rec.clone();
    expected.committed += 1;
    let after = Change {
        key: b"after".to_vec(),
        value: Some(b"recovery".to_vec()),
        version: 1,
        create: expected.committed,
    };
    expected.history.insert(expected.committed, vec![after]);
    let state = KeyState {
        value: b"recovery".to_vec(),
        version: 1,
        create: expected.committed,
        modified: expected.committed,
    };
    expected.keys.insert(b"after".to_vec(), state);
    assert_eq!(Recovered::read(&store), expected, "after a clean restart");
    outcome(Vec::new())
}

/// A plan per seed: the power goes at a random operation or during a random log write,
/// with unsynced changes all lost or partly kept.
fn plan(seed: u64) -> Plan {
    let mut rng = StdRng::seed_from_u64(seed);
    let at = match seed % 4 {
        0 | 1 => At::Op(rng.random_range(1..=RUN_OPS)),
        _ => At::LogWrite(rng.random_range(1..=60)),
    };
    Plan {
        at,
        keep_unsynced: seed % 2 == 1,
        seed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_power_loss() {
    let mut totals = Stats::default();
    let mut torn_logs = 0;
    for seed in 0..64 {
        let plan = plan(seed);
        let out = run(plan, NORMAL).await;
        assert!(
            out.violations.is_empty(),
            "seed {seed}, {plan:?}: {:#?}",
            out.violations
        );
        assert!(out.acknowledged > 0, "seed {seed}: nothing acknowledged");
        if let At::LogWrite(_) = plan.at {
            // The plan tears a log record; recovery must have dropped it.
            assert!(out.torn.is_some(), "seed {seed}: no log write was torn");
        }
        torn_logs += usize::from(
            out.torn
                .is_some_and(|p| p.extension().is_some_and(|e| e == "wal")),
        );
        totals.segments_named += out.before.segments_named;
        totals.segments_removed += out.before.segments_removed;
        totals.db_syncs += out.before.db_syncs;
    }
    // The runs did roll segments over, checkpoint and delete covered segments.
    assert!(totals.segments_named > 64, "{totals:?}");
    assert!(totals.segments_removed > 0, "{totals:?}");
    assert!(torn_logs >= 32, "torn log records: {torn_logs}");
}

/// The mutations run with checkpoints off, so that only the log holds the acknowledged
/// writes, and the power goes after the writers are done.
async fn mutated(mutation: Mutation, segment_bytes: u64) -> Vec<Outcome> {
    let setup = Setup {
        segment_bytes,
        checkpoint_bytes: None,
        mutation: Some(mutation),
    };
    let mut outcomes = Vec::new();
    for seed in 0..3 {
        let plan = Plan {
            at: At::Never,
            keep_unsynced: false,
            seed,
        };
        outcomes.push(run(plan, setup).await);
    }
    outcomes
}

fn reports_a_lost_acknowledged_write(out: &Outcome) -> bool {
    out.violations
        .iter()
        .any(|v| v.starts_with("acknowledged revision") && v.contains("lost"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_append_sync_is_caught() {
    // One segment for the whole run: the log is intact but empty after the loss, so the
    // loss shows as lost revisions rather than as a log recovery refuses.
    for out in mutated(Mutation::SkipAppendSync, 1 << 20).await {
        assert_eq!(out.before.segments_named, 1, "{:?}", out.before);
        assert!(
            reports_a_lost_acknowledged_write(&out),
            "{:#?}",
            out.violations
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_directory_sync_on_roll_over_is_caught() {
    for out in mutated(Mutation::SkipRollDirSync, SEGMENT_BYTES).await {
        assert!(out.before.segments_named > 1, "{:?}", out.before);
        assert!(
            reports_a_lost_acknowledged_write(&out),
            "{:#?}",
            out.violations
        );
    }
}

/// The same mutation under the main test's own plans and checkpoints: caught there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_append_sync_is_caught_by_the_main_plans() {
    let setup = Setup {
        mutation: Some(Mutation::SkipAppendSync),
        ..NORMAL
    };
    let mut caught = 0;
    for seed in 0..8 {
        let out = run(plan(seed), setup).await;
        caught += usize::from(!out.violations.is_empty());
    }
    assert!(caught >= 6, "caught in {caught} of 8 runs");
}

#[test]
fn the_checker_flags_a_half_applied_txn() {
    let txn = Op::Txn {
        guard: key(0, 0),
        version: 0,
        puts: [(key(0, 0), b"a".to_vec()), (key(0, 1), b"b".to_vec())],
        delete: key(0, 2),
    };
    let log = vec![vec![Done {
        op: txn.clone(),
        answer: Answer::Failed,
    }]];
    let mut whole = Model::new();
    let changes = apply(&mut whole, &txn, 2);
    let rec = Recovered {
        committed: 2,
        compacted: -1,
        history: BTreeMap::from([(2, changes.clone())]),
        keys: whole.clone(),
        leases: Vec::new(),
    };
    assert_eq!(check(&log, &rec), Vec::<String>::new());
    // Half of it: one put at the revision, one key.
    let mut half = rec.clone();
    half.history.insert(2, changes[..1].to_vec());
    half.keys.remove(&key(0, 1));
    assert_eq!(check(&log, &half).len(), 2, "{:?}", check(&log, &half));
    // Acknowledged but gone.
    let log = vec![vec![Done {
        op: txn,
        answer: Answer::Ok(2),
    }]];
    let empty = Recovered {
        committed: 1,
        compacted: -1,
        history: BTreeMap::new(),
        keys: Model::new(),
        leases: Vec::new(),
    };
    let found = check(&log, &empty);
    assert!(
        found[0].starts_with("acknowledged revision 2 lost"),
        "{found:?}"
    );
}
