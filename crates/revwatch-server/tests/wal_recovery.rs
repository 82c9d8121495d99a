//! Recovery from the write-ahead log: the server runs as a child process with checkpoints
//! held off (a one-hour interval), takes concurrent writes, and is killed with SIGKILL
//! right after the last one is acknowledged, so that those writes exist only in the log.
//! After a restart every acknowledged write must be there, with its revision, its lease
//! and its history, and the revision must continue right after the last acknowledged one.
//! A second round does the same with the default checkpoint interval, so that the
//! restart finds part of the writes checkpointed and part only in the log.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use common::process::ServerProcess;
use common::{Clients, connect};
use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::request_op::Request as OpReq;
use etcd_proto::etcdserverpb::{
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseTimeToLiveRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};

const WRITERS: usize = 8;
const OPS_PER_WRITER: usize = 40;
const KEYS_PER_WRITER: usize = 5;

/// A key as it must be: value, mod revision, lease.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    value: Vec<u8>,
    mod_revision: i64,
    lease: i64,
}

/// What the acknowledged writes say the server holds.
#[derive(Debug, Default)]
struct Model {
    keys: BTreeMap<Vec<u8>, Held>,
    /// Every acknowledged put: (key, value, revision), for reads in the past.
    puts: Vec<(Vec<u8>, Vec<u8>, i64)>,
    /// Acknowledged leases and the keys that must be attached to them.
    leases: BTreeMap<i64, Vec<Vec<u8>>>,
    /// The highest acknowledged revision.
    last: i64,
}

impl Model {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>, lease: i64, rev: i64) {
        self.puts.push((key.clone(), value.clone(), rev));
        self.keys.insert(
            key,
            Held {
                value,
                mod_revision: rev,
                lease,
            },
        );
        self.last = self.last.max(rev);
    }

    fn expected_leases(&self) -> BTreeMap<i64, Vec<Vec<u8>>> {
        let mut out: BTreeMap<i64, Vec<Vec<u8>>> =
            self.leases.keys().map(|id| (*id, Vec::new())).collect();
        for (key, held) in &self.keys {
            if let Some(keys) = out.get_mut(&held.lease) {
                keys.push(key.clone());
            }
        }
        out
    }
}

/// One writer's acknowledged writes, in order. Each writer of each round owns its keys,
/// so its model is exact and the models merge by union.
async fn write(endpoint: String, round: usize, w: usize) -> Result<Model> {
    let mut c = connect(&endpoint).await?;
    let mut m = Model::default();
    let key = |i: usize| format!("r/{round}/w{w}/k{}", i % KEYS_PER_WRITER).into_bytes();
    let mut lease = 0;
    for i in 0..OPS_PER_WRITER {
        let value = format!("round{round}-w{w}-op{i}").into_bytes();
        match i % 8 {
            // A delete of a key the writer holds.
            3 if m.keys.contains_key(&key(i)) => {
                let resp =
                    c.kv.delete_range(DeleteRangeRequest {
                        key: key(i),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                ensure!(resp.deleted == 1, "delete of a held key deleted nothing");
                m.keys.remove(&key(i));
                m.last = m.last.max(rev_of(resp.header)?);
            }
            // A txn: put one key and delete another if the first has the expected value.
            5 => {
                let (put_key, del_key) = (key(i), key(i + 1));
                let expect = m.keys.get(&put_key).map(|h| h.value.clone());
                let compare = Compare {
                    key: put_key.clone(),
                    target: CompareTarget::Version as i32,
                    result: if expect.is_some() {
                        CompareResult::Greater
                    } else {
                        CompareResult::Equal
                    } as i32,
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                };
                let ops = vec![
                    RequestOp {
                        request: Some(OpReq::RequestPut(PutRequest {
                            key: put_key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    },
                    RequestOp {
                        request: Some(OpReq::RequestDeleteRange(DeleteRangeRequest {
                            key: del_key.clone(),
                            ..Default::default()
                        })),
                    },
                ];
                let resp =
                    c.kv.txn(TxnRequest {
                        compare: vec![compare],
                        success: ops,
                        failure: Vec::new(),
                    })
                    .await?
                    .into_inner();
                ensure!(
                    resp.succeeded,
                    "txn compare failed against the writer's own key"
                );
                let rev = rev_of(resp.header)?;
                m.put(put_key, value, 0, rev);
                m.keys.remove(&del_key);
            }
            // A lease grant (no revision), then puts attached to it.
            6 => {
                let id = 1 + (round * 1000 + w * 100 + i) as i64;
                let resp = c
                    .lease
                    .lease_grant(LeaseGrantRequest { id, ttl: 3600 })
                    .await?
                    .into_inner();
                ensure!(resp.id == id, "granted {} instead of {id}", resp.id);
                m.leases.insert(id, Vec::new());
                lease = id;
            }
            _ => {
                let resp =
                    c.kv.put(PutRequest {
                        key: key(i),
                        value: value.clone(),
                        lease,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                m.put(key(i), value, lease, rev_of(resp.header)?);
            }
        }
    }
    Ok(m)
}

fn rev_of(header: Option<etcd_proto::etcdserverpb::ResponseHeader>) -> Result<i64> {
    let rev = header.context("response without header")?.revision;
    ensure!(rev > 0, "response without revision");
    Ok(rev)
}

/// Concurrent writers; adds what they had acknowledged to `into`.
async fn write_round(endpoint: &str, round: usize, into: &mut Model) -> Result<()> {
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(write(endpoint.to_owned(), round, w)))
        .collect();
    for t in tasks {
        let m = t.await??;
        into.keys.extend(m.keys);
        into.puts.extend(m.puts);
        into.leases.extend(m.leases);
        into.last = into.last.max(m.last);
    }
    Ok(())
}

async fn current_revision(c: &mut Clients) -> Result<i64> {
    let resp =
        c.kv.range(RangeRequest {
            key: b"none".to_vec(),
            count_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    rev_of(resp.header)
}

/// Checks the restarted server against everything acknowledged.
async fn check(c: &mut Clients, m: &Model, compacted: i64) -> Result<()> {
    let current = current_revision(c).await?;
    ensure!(
        current == m.last,
        "current revision {current} after restart, last acknowledged {}",
        m.last
    );
    let resp =
        c.kv.range(RangeRequest {
            key: b"r/".to_vec(),
            range_end: b"r0".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let seen: BTreeMap<Vec<u8>, Held> = resp
        .kvs
        .into_iter()
        .map(|kv| {
            let held = Held {
                value: kv.value,
                mod_revision: kv.mod_revision,
                lease: kv.lease,
            };
            (kv.key, held)
        })
        .collect();
    ensure!(
        seen == m.keys,
        "keys after restart differ from the acknowledged ones:\nseen {seen:?}\nexpected {:?}",
        m.keys
    );
    for (id, expected) in m.expected_leases() {
        let ttl = c
            .lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true })
            .await?
            .into_inner();
        ensure!(ttl.ttl > 0, "lease {id} lost");
        let mut keys = ttl.keys;
        keys.sort();
        ensure!(
            keys == expected,
            "lease {id}: keys {keys:?}, expected {expected:?}"
        );
    }
    // History: every acknowledged put that is not compacted away reads back at its revision.
    for (key, value, rev) in &m.puts {
        if *rev < compacted {
            continue;
        }
        let resp =
            c.kv.range(RangeRequest {
                key: key.clone(),
                revision: *rev,
                ..Default::default()
            })
            .await?
            .into_inner();
        let got = resp
            .kvs
            .first()
            .map(|kv| (kv.value.clone(), kv.mod_revision));
        ensure!(
            got == Some((value.clone(), *rev)),
            "{} at revision {rev}: {got:?}",
            String::from_utf8_lossy(key)
        );
    }
    Ok(())
}

async fn next_put_revision(c: &mut Clients, round: usize) -> Result<i64> {
    let resp =
        c.kv.put(PutRequest {
            key: format!("after/{round}").into_bytes(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    rev_of(resp.header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_acknowledged_writes_recovers_them_from_the_log() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut model = Model::default();
    // Checkpoints held off: a one-hour interval.
    let hour = ["--checkpoint-interval-ms".to_owned(), "3600000".to_owned()];

    // Round 0: everything is only in the log when the server dies.
    let server = ServerProcess::start(dir.path(), &hour).await?;
    write_round(&server.endpoint, 0, &mut model).await?;
    server.kill9().await?;
    let wal = dir.path().join("wal");
    ensure!(
        std::fs::read_dir(&wal).map(|d| d.count()).unwrap_or(0) > 0,
        "no log segments in {}",
        wal.display()
    );
    let server = ServerProcess::start(dir.path(), &hour).await?;
    let mut c = connect(&server.endpoint).await?;
    check(&mut c, &model, 0).await?;
    let next = next_put_revision(&mut c, 0).await?;
    ensure!(
        next == model.last + 1,
        "revision after restart {next}, expected {}",
        model.last + 1
    );
    model.last = next;

    // Round 1, with a compaction: part checkpointed, part only in the log.
    server.kill9().await?;
    let server = ServerProcess::start(dir.path(), &[]).await?;
    let mut c = connect(&server.endpoint).await?;
    check(&mut c, &model, 0).await?;
    let compacted = model.last;
    c.kv.compact(CompactionRequest {
        revision: compacted,
        physical: false,
    })
    .await?;
    write_round(&server.endpoint, 1, &mut model).await?;
    server.kill9().await?;
    let server = ServerProcess::start(dir.path(), &[]).await?;
    let mut c = connect(&server.endpoint).await?;
    check(&mut c, &model, compacted).await?;
    let err =
        c.kv.range(RangeRequest {
            key: b"r/".to_vec(),
            revision: compacted - 1,
            ..Default::default()
        })
        .await
        .err()
        .context("a read below the compacted revision succeeded after restart")?;
    ensure!(
        err.message().contains("compacted"),
        "unexpected error {err}"
    );
    let next = next_put_revision(&mut c, 1).await?;
    ensure!(
        next == model.last + 1,
        "revision after restart {next}, expected {}",
        model.last + 1
    );
    server.kill9().await?;
    Ok(())
}
