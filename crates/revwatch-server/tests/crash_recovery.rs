//! Crash recovery: the server runs as a child process, is killed with SIGKILL in the middle
//! of concurrent writes, and restarted on the same data directory. Repeated over seeds,
//! with several kills each.
//!
//! The writes mix puts, deletes, multi-key txns, lease grants and puts attached to
//! leases. Each writer owns its keys and keeps a model of them built from its
//! acknowledged operations; only its last operation, cut off by the kill, may or may not
//! have landed. After each restart:
//! - every writer's keys hold exactly its model's values, revisions and leases (with
//!   or without that last operation);
//! - every acknowledged lease exists, with exactly the keys attached to it;
//! - the history replayed by a watch from revision 1 has one or more events at every
//!   revision up to the current one, and each acknowledged operation's events at its
//!   revision, with nothing else;
//! - new writes continue at the next revision.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::process::ServerProcess;
use common::{Clients, WatchConn, connect};
use etcd_proto::etcdserverpb::request_op::Request as OpReq;
use etcd_proto::etcdserverpb::{
    DeleteRangeRequest, LeaseGrantRequest, LeaseTimeToLiveRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest,
};
use etcd_proto::mvccpb::event::EventType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const WRITERS: usize = 8;
const KILLS_PER_SEED: usize = 3;
/// Keys per writer: few, so that deletes and overwrites are common.
const KEYS_PER_WRITER: usize = 6;
/// Long enough that no lease expires during the test.
const LEASE_TTL: i64 = 600;
const TIMEOUT: Duration = Duration::from_secs(20);

type Key = Vec<u8>;

/// One write; all but `Grant` make exactly one revision.
#[derive(Debug, Clone)]
enum Op {
    Put {
        key: Key,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: Key,
    },
    /// A put and a delete of another key in one txn.
    Txn {
        put: Key,
        value: Vec<u8>,
        delete: Key,
    },
    Grant {
        id: i64,
    },
}

/// What one revision must hold: (key, value) for puts, (key, None) for deletes.
type Events = Vec<(Key, Option<Vec<u8>>)>;

impl Op {
    fn events(&self) -> Events {
        match self {
            Op::Put { key, value, .. } => vec![(key.clone(), Some(value.clone()))],
            Op::Delete { key } => vec![(key.clone(), None)],
            Op::Txn { put, value, delete } => {
                vec![(put.clone(), Some(value.clone())), (delete.clone(), None)]
            }
            Op::Grant { .. } => Vec::new(),
        }
    }
}

/// A key as the model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    value: Vec<u8>,
    lease: i64,
    mod_revision: i64,
}

/// One writer's keys and leases, from its acknowledged operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    keys: BTreeMap<Key, Held>,
    leases: BTreeSet<i64>,
}

impl Model {
    fn apply(&mut self, op: &Op, revision: i64) {
        match op {
            Op::Put { key, value, lease } => {
                let held = Held {
                    value: value.clone(),
                    lease: *lease,
                    mod_revision: revision,
                };
                self.keys.insert(key.clone(), held);
            }
            Op::Delete { key } => {
                self.keys.remove(key);
            }
            Op::Txn { put, value, delete } => {
                self.apply(
                    &Op::Put {
                        key: put.clone(),
                        value: value.clone(),
                        lease: 0,
                    },
                    revision,
                );
                self.keys.remove(delete);
            }
            Op::Grant { id } => {
                self.leases.insert(*id);
            }
        }
    }
}

/// One writer: its key space, its model, and what it did in the current round.
struct Writer {
    id: usize,
    model: Model,
    /// Acknowledged this round: each operation with its revision.
    acked: Vec<(Op, i64)>,
    /// The operation the kill cut off, if any.
    pending: Option<Op>,
    /// A lease granted (acknowledged) whose put has not been sent yet.
    lease_to_use: Option<i64>,
}

impl Writer {
    fn key(&self, n: usize) -> Key {
        format!("w{}/k{n}", self.id).into_bytes()
    }

    fn next_op(&mut self, rng: &mut StdRng, round: usize, n: u64) -> Op {
        let value = format!("r{round}-n{n}").into_bytes();
        if let Some(lease) = self.lease_to_use.take() {
            let key = self.key(rng.random_range(0..KEYS_PER_WRITER));
            return Op::Put { key, value, lease };
        }
        let present: Vec<Key> = self.model.keys.keys().cloned().collect();
        match rng.random_range(0..10) {
            0..=3 => Op::Put {
                key: self.key(rng.random_range(0..KEYS_PER_WRITER)),
                value,
                lease: 0,
            },
            // Only present keys: deleting a missing key makes no revision.
            4..=5 if !present.is_empty() => Op::Delete {
                key: present[rng.random_range(0..present.len())].clone(),
            },
            6..=7 if !present.is_empty() => {
                let delete = present[rng.random_range(0..present.len())].clone();
                let put = (0..KEYS_PER_WRITER)
                    .map(|i| self.key(i))
                    .find(|k| *k != delete)
                    .unwrap_or_default();
                Op::Txn { put, value, delete }
            }
            8..=9 => Op::Grant {
                // Unique across writers, rounds and writes.
                id: 1 + (self.id as i64) * 1_000_000 + (round as i64) * 100_000 + n as i64,
            },
            _ => Op::Put {
                key: self.key(rng.random_range(0..KEYS_PER_WRITER)),
                value,
                lease: 0,
            },
        }
    }
}

/// Sends `op`; its revision once acknowledged (the header's, for a grant).
async fn send(c: &mut Clients, op: &Op) -> Result<i64, tonic::Status> {
    let header = match op.clone() {
        Op::Put { key, value, lease } => {
            let req = PutRequest {
                key,
                value,
                lease,
                ..Default::default()
            };
            c.kv.put(req).await?.into_inner().header
        }
        Op::Delete { key } => {
            let req = DeleteRangeRequest {
                key,
                ..Default::default()
            };
            c.kv.delete_range(req).await?.into_inner().header
        }
        Op::Txn { put, value, delete } => {
            let success = vec![
                RequestOp {
                    request: Some(OpReq::RequestPut(PutRequest {
                        key: put,
                        value,
                        ..Default::default()
                    })),
                },
                RequestOp {
                    request: Some(OpReq::RequestDeleteRange(DeleteRangeRequest {
                        key: delete,
                        ..Default::default()
                    })),
                },
            ];
            let req = TxnRequest {
                success,
                ..Default::default()
            };
            c.kv.txn(req).await?.into_inner().header
        }
        Op::Grant { id } => {
            let req = LeaseGrantRequest { id, ttl: LEASE_TTL };
            c.lease.lease_grant(req).await?.into_inner().header
        }
    };
    Ok(header.map_or(0, |h| h.revision))
}

/// Writes until the server dies: the writer's first failed operation is left pending.
async fn write_until_killed(endpoint: String, mut w: Writer, seed: u64, round: usize) -> Writer {
    let mut rng = StdRng::seed_from_u64(seed * 10_000 + round as u64 * 100 + w.id as u64);
    let Ok(mut c) = connect(&endpoint).await else {
        return w;
    };
    for n in 0u64.. {
        let op = w.next_op(&mut rng, round, n);
        match send(&mut c, &op).await {
            Ok(revision) => {
                w.model.apply(&op, revision);
                if let Op::Grant { id } = op {
                    w.lease_to_use = Some(id);
                }
                w.acked.push((op, revision));
            }
            // The kill: this one may or may not have landed.
            Err(_) => {
                w.pending = Some(op);
                break;
            }
        }
    }
    w
}

/// The server's view of one writer's keys, and which of the leases in `candidates`
/// exist; each must have exactly the keys that name it attached.
async fn observe(c: &mut Clients, w: &Writer, candidates: &Model) -> Result<Model> {
    let prefix = format!("w{}/", w.id).into_bytes();
    let mut range_end = prefix.clone();
    if let Some(last) = range_end.last_mut() {
        *last += 1;
    }
    let resp =
        c.kv.range(RangeRequest {
            key: prefix,
            range_end,
            ..Default::default()
        })
        .await?
        .into_inner();
    let keys: BTreeMap<Key, Held> = resp
        .kvs
        .into_iter()
        .map(|kv| {
            let held = Held {
                value: kv.value,
                lease: kv.lease,
                mod_revision: kv.mod_revision,
            };
            (kv.key, held)
        })
        .collect();
    // Which of the leases the writer may have granted exist.
    let mut leases = BTreeSet::new();
    for &id in &candidates.leases {
        let ttl = c
            .lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await?
            .into_inner();
        if ttl.ttl > 0 {
            leases.insert(id);
            let mut attached = ttl.keys;
            attached.sort();
            let expected: Vec<Key> = keys
                .iter()
                .filter(|(_, h)| h.lease == id)
                .map(|(k, _)| k.clone())
                .collect();
            ensure!(
                attached == expected,
                "lease {id}: attached keys {attached:?}, expected {expected:?}"
            );
        }
    }
    Ok(Model { keys, leases })
}

/// Checks one writer after a restart and folds its cut-off operation into its model if
/// it landed; returns that operation's revision then.
async fn settle(c: &mut Clients, w: &mut Writer) -> Result<Option<(Op, i64)>> {
    let pending = w.pending.take();
    // Leases the writer may have: its model's plus a cut-off grant.
    let mut candidates = w.model.clone();
    if let Some(Op::Grant { id }) = &pending {
        candidates.leases.insert(*id);
    }
    let seen = observe(c, w, &candidates).await?;
    if seen == w.model {
        return Ok(None);
    }
    let Some(op) = pending else {
        bail!(
            "writer {}: state after restart {seen:?}, acknowledged {:?}",
            w.id,
            w.model
        );
    };
    // It landed: at the revision its put carries (a delete-only op has none to read,
    // and a grant none at all).
    let revision = match &op {
        Op::Put { key, .. } | Op::Txn { put: key, .. } => {
            seen.keys.get(key).map_or(0, |h| h.mod_revision)
        }
        Op::Delete { .. } | Op::Grant { .. } => 0,
    };
    let mut landed = w.model.clone();
    landed.apply(&op, revision);
    ensure!(
        seen == landed,
        "writer {}: state after restart {seen:?} is neither the acknowledged {:?} nor that plus the cut-off {op:?}",
        w.id,
        w.model
    );
    w.model = landed;
    Ok(Some((op, revision)))
}

/// The whole history from revision 1, by revision: (key, value or None for a delete).
async fn history(c: &mut Clients, current: i64) -> Result<BTreeMap<i64, Events>> {
    let mut conn = WatchConn::open(&mut c.watch).await?;
    conn.create(WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        start_revision: 1,
        ..Default::default()
    })
    .await?;
    let mut by_rev: BTreeMap<i64, Events> = BTreeMap::new();
    let mut last = 1;
    while last < current {
        let reply = conn.expect(TIMEOUT).await?;
        ensure!(!reply.canceled, "history watch canceled: {reply:?}");
        for ev in reply.events {
            let kv = ev.kv.context("event without kv")?;
            ensure!(
                kv.mod_revision >= last,
                "history goes back at {}",
                kv.mod_revision
            );
            last = kv.mod_revision;
            let value = (ev.r#type == EventType::Put as i32).then_some(kv.value);
            by_rev
                .entry(kv.mod_revision)
                .or_default()
                .push((kv.key, value));
        }
    }
    Ok(by_rev)
}

async fn run_seed(seed: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut writers: Vec<Writer> = (0..WRITERS)
        .map(|id| Writer {
            id,
            model: Model::default(),
            acked: Vec::new(),
            pending: None,
            lease_to_use: None,
        })
        .collect();
    // Every revision's expected events, from acknowledged (or landed) operations.
    let mut expected: BTreeMap<i64, Events> = BTreeMap::new();
    let mut server = ServerProcess::start(dir.path(), &[]).await?;
    for round in 0..KILLS_PER_SEED {
        let tasks: Vec<_> = writers
            .drain(..)
            .map(|w| tokio::spawn(write_until_killed(server.endpoint.clone(), w, seed, round)))
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1200))).await;
        server.kill9().await?;
        for t in tasks {
            writers.push(t.await?);
        }
        server = ServerProcess::start(dir.path(), &[]).await?;
        let mut c = connect(&server.endpoint).await?;

        let mut acked_now = 0;
        // Keys of cut-off deletes that landed: their revisions are not read from state.
        let mut deletes_cut_off: Vec<Key> = Vec::new();
        for w in &mut writers {
            for (op, rev) in w.acked.drain(..) {
                acked_now += 1;
                let events = op.events();
                if !events.is_empty() {
                    ensure!(
                        expected.insert(rev, events).is_none(),
                        "two acknowledged operations at revision {rev}"
                    );
                }
            }
            match settle(&mut c, w).await? {
                Some((Op::Delete { key }, _)) => deletes_cut_off.push(key),
                Some((Op::Grant { .. }, _)) | None => {}
                Some((op, rev)) => {
                    ensure!(rev > 0, "cut-off {op:?} landed without a revision");
                    expected.insert(rev, op.events());
                }
            }
        }

        let current =
            c.kv.range(RangeRequest {
                key: b"none".to_vec(),
                count_only: true,
                ..Default::default()
            })
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.revision);
        let history = history(&mut c, current).await?;
        // No hole: every revision after the first has events.
        let revs: Vec<i64> = history.keys().copied().collect();
        ensure!(
            revs == (2..=current).collect::<Vec<_>>(),
            "seed {seed} round {round}: history has holes (current {current})"
        );
        // Every acknowledged operation is in it, and nothing unaccounted for but the
        // cut-off deletes that landed, one revision each.
        for (rev, events) in &expected {
            ensure!(
                history.get(rev) == Some(events),
                "seed {seed} round {round}: revision {rev}: expected {events:?}, history has {:?}",
                history.get(rev)
            );
        }
        let unaccounted: Vec<(i64, Events)> = history
            .into_iter()
            .filter(|(rev, _)| !expected.contains_key(rev))
            .collect();
        for (rev, events) in unaccounted {
            let cut_off = match events.as_slice() {
                [(key, None)] => deletes_cut_off.iter().position(|k| k == key),
                _ => None,
            };
            let Some(i) = cut_off else {
                bail!(
                    "seed {seed} round {round}: revision {rev} holds {events:?}, which no acknowledged operation made"
                );
            };
            deletes_cut_off.swap_remove(i);
            expected.insert(rev, events);
        }
        ensure!(
            deletes_cut_off.is_empty(),
            "seed {seed} round {round}: cut-off deletes applied but not in the history: {deletes_cut_off:?}"
        );

        // Revisions continue right after the recovered history.
        let after = Op::Put {
            key: format!("after/{round}").into_bytes(),
            value: b"x".to_vec(),
            lease: 0,
        };
        let next = send(&mut c, &after).await?;
        ensure!(
            next == current + 1,
            "revision after restart {next}, expected {}",
            current + 1
        );
        expected.insert(next, after.events());
        if acked_now == 0 {
            bail!("seed {seed} round {round}: no write was acknowledged");
        }
        eprintln!(
            "seed {seed} round {round}: {acked_now} acknowledged operations survived, revision {next}"
        );
    }
    server.kill9().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_concurrent_writes_loses_no_acknowledged_write() -> Result<()> {
    for seed in 1..=3 {
        run_seed(seed).await?;
    }
    Ok(())
}
