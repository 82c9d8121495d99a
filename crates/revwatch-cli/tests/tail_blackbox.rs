//! `revwatch tail --json` as a black box: the CLI process follows real etcd 3.4
//! through a TCP fault proxy while the network resets and goes silent, etcd freezes,
//! is killed and restarted, history is compacted while tail is cut off, and tail
//! itself is killed and restarted from its snapshot file. Every line it prints is
//! checked against the truth: the test is etcd's only writer, so the revision of each
//! acknowledged write and what it changed is known exactly.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::Process;
use etcd_proto::etcdserverpb::request_op::Request as Op;
use nix::sys::signal::Signal;
use revwatch::client::{
    Client, ClientConfig, CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest,
};
use revwatch_testkit::{
    etcd::EtcdCluster,
    proxy::{Fault, FaultProxy},
};
use serde_json::Value;

const PREFIX: &str = "/bb/";
const KEYS: u64 = 12;
/// The mirror's default stall timeout, which the silent network must outlast.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A key's state as tail prints it: value, create, mod revision, version.
type Entry = (String, i64, i64, i64);
type State = BTreeMap<String, Entry>;

/// One change at a revision: the key and its new value (`None`: deleted).
type Change = (String, Option<String>);

/// Every acknowledged write, by revision, and the compactions.
#[derive(Default)]
struct Truth {
    writes: BTreeMap<i64, Vec<Change>>,
    compacted: i64,
}

impl Truth {
    /// The prefix's state after `revision`.
    fn state_at(&self, revision: i64) -> State {
        let mut state = State::new();
        for (&r, changes) in self.writes.range(..=revision) {
            for (key, value) in changes {
                match value {
                    Some(v) => {
                        let (create, version) = match state.get(key) {
                            Some((_, c, _, ver)) => (*c, ver + 1),
                            None => (r, 1),
                        };
                        state.insert(key.clone(), (v.clone(), create, r, version));
                    }
                    None => {
                        state.remove(key);
                    }
                }
            }
        }
        state
    }

    /// Revisions of the prefix strictly between `after` and `before`.
    fn between(&self, after: i64, before: i64) -> Vec<i64> {
        if before <= after + 1 {
            return Vec::new();
        }
        self.writes
            .range(after + 1..before)
            .map(|(r, _)| *r)
            .collect()
    }
}

/// What tail printed, checked line by line.
#[derive(Default)]
struct Printed {
    state: State,
    /// The revision of the last line of the current tail process (0: none yet).
    last: i64,
    /// The highest revision printed by any tail process.
    high: i64,
    lines: usize,
    resyncs: usize,
    repeats: usize,
    /// The revision each process after the first started at.
    restarts: Vec<i64>,
}

impl Printed {
    /// Checks one line against the truth; `first` for a process's first line.
    fn check(&mut self, line: &Value, first: bool, truth: &Truth) {
        let revision = line["revision"].as_i64().expect("revision");
        let resync = line["resync"].as_bool().expect("resync");
        let changes = line["changes"].as_array().expect("changes");
        self.lines += 1;
        if first {
            // The snapshot, loaded or listed: the whole state at its revision.
            assert!(resync, "a process starts with its snapshot: {line}");
            if self.lines > 1 {
                self.restarts.push(revision);
            }
            self.state = changes.iter().map(entry).collect();
        } else {
            assert!(
                revision > self.last,
                "out of order after {}: {line}",
                self.last
            );
            if resync {
                // Only compaction of the revisions it missed explains a relist.
                assert!(
                    truth.compacted > self.last,
                    "a resync after {} without compaction past it (compacted {}): {line}",
                    self.last,
                    truth.compacted
                );
                self.resyncs += 1;
            } else {
                let skipped = truth.between(self.last, revision);
                assert!(
                    skipped.is_empty(),
                    "revisions {skipped:?} lost before {line}"
                );
                let printed: Vec<Change> = changes.iter().map(change).collect();
                let wrote = truth.writes.get(&revision).cloned().unwrap_or_default();
                assert_eq!(
                    sorted(printed),
                    sorted(wrote),
                    "not what revision {revision} wrote: {line}"
                );
            }
            for c in changes {
                let key = c["key"].as_str().expect("key").to_owned();
                if c["type"] == "delete" {
                    self.state.remove(&key);
                } else {
                    self.state.insert(key, entry(c).1);
                }
            }
        }
        assert_eq!(
            self.state,
            truth.state_at(revision),
            "the printed state differs from etcd's at {revision}: {line}"
        );
        if revision <= self.high && !first {
            self.repeats += 1;
        }
        self.high = self.high.max(revision);
        self.last = revision;
    }
}

fn entry(c: &Value) -> (String, Entry) {
    let n = |f: &str| c[f].as_i64().expect("a revision field");
    (
        c["key"].as_str().expect("key").to_owned(),
        (
            c["value"].as_str().expect("value").to_owned(),
            n("create_revision"),
            n("mod_revision"),
            n("version"),
        ),
    )
}

fn change(c: &Value) -> Change {
    let key = c["key"].as_str().expect("key").to_owned();
    match c["type"].as_str() {
        Some("put") => (key, Some(c["value"].as_str().expect("value").to_owned())),
        _ => (key, None),
    }
}

fn sorted(mut changes: Vec<Change>) -> Vec<Change> {
    changes.sort();
    changes
}

/// The only writer: puts, deletes and two-key transactions on a few keys.
struct Writer {
    client: Client,
    seed: u64,
    truth: Truth,
}

impl Writer {
    fn next(&mut self) -> u64 {
        // A 64-bit LCG: deterministic, and good enough to pick keys and operations.
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.seed >> 33
    }

    fn key(&mut self) -> String {
        format!("{PREFIX}k{:02}", self.next() % KEYS)
    }

    /// One write; its revision.
    async fn write(&mut self) -> i64 {
        let current = self.truth.state_at(i64::MAX);
        let key = self.key();
        let value = format!("v{}", self.next() % 1000);
        let (revision, changes) = match self.next() % 4 {
            0 if current.contains_key(&key) => {
                let resp = self
                    .client
                    .delete_range(DeleteRangeRequest {
                        key: key.clone().into(),
                        ..Default::default()
                    })
                    .await
                    .expect("delete");
                (resp.header, vec![(key, None)])
            }
            1 => {
                // Two keys at one revision: a put and, if there is one, a delete.
                let other = self.key();
                let mut ops = vec![(key.clone(), Some(value.clone()))];
                if other != key && current.contains_key(&other) {
                    ops.push((other, None));
                }
                let success = ops
                    .iter()
                    .map(|(k, v)| RequestOp {
                        request: Some(match v {
                            Some(v) => Op::RequestPut(PutRequest {
                                key: k.clone().into(),
                                value: v.clone().into(),
                                ..Default::default()
                            }),
                            None => Op::RequestDeleteRange(DeleteRangeRequest {
                                key: k.clone().into(),
                                ..Default::default()
                            }),
                        }),
                    })
                    .collect();
                let resp = self
                    .client
                    .txn(TxnRequest {
                        success,
                        ..Default::default()
                    })
                    .await
                    .expect("txn");
                (resp.header, ops)
            }
            _ => {
                let resp = self
                    .client
                    .put(PutRequest {
                        key: key.clone().into(),
                        value: value.clone().into(),
                        ..Default::default()
                    })
                    .await
                    .expect("put");
                (resp.header, vec![(key, Some(value))])
            }
        };
        let revision = revision.expect("header").revision;
        self.truth.writes.insert(revision, changes);
        revision
    }

    async fn writes(&mut self, n: usize) -> i64 {
        let mut last = 0;
        for _ in 0..n {
            last = self.write().await;
        }
        last
    }

    /// Compacts etcd's history up to the newest revision.
    async fn compact(&mut self) {
        let revision = *self.truth.writes.keys().next_back().expect("writes");
        self.client
            .compact(CompactionRequest {
                revision,
                physical: true,
            })
            .await
            .expect("compact");
        self.truth.compacted = revision;
    }
}

/// A `tail` process and what it printed.
struct Tail {
    process: Process,
    args: Vec<String>,
    fresh: bool,
}

impl Tail {
    fn start(args: Vec<String>) -> Tail {
        let process = Process::revwatch(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Tail {
            process,
            args,
            fresh: true,
        }
    }

    /// Reads and checks lines until one at `revision` or later.
    fn through(&mut self, revision: i64, printed: &mut Printed, truth: &Truth) {
        loop {
            let line = self.process.next_json();
            printed.check(&line, std::mem::take(&mut self.fresh), truth);
            if printed.last >= revision {
                return;
            }
        }
    }

    /// The stderr lines so far.
    fn stderr(&self) -> Vec<String> {
        self.process.stderr.try_iter().collect()
    }

    fn kill_and_restart(self) -> Tail {
        let args = self.args.clone();
        let (status, _) = self.process.stop(Signal::SIGKILL);
        assert!(!status.success());
        Tail::start(args)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_tail_prints_is_the_truth_through_faults() {
    let mut etcd = EtcdCluster::single().await.expect("etcd");
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.expect("proxy");
    let client = Client::connect(ClientConfig::new([etcd.endpoint(0)]))
        .await
        .expect("client");
    let mut w = Writer {
        client,
        seed: 7,
        truth: Truth::default(),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("tail.snap");
    let args: Vec<String> = [
        "tail",
        "--endpoints",
        &proxy.endpoint(),
        "--prefix",
        PREFIX,
        "--json",
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
        "--persist-every-batch",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut printed = Printed::default();

    w.writes(10).await;
    let mut tail = Tail::start(args);
    let r = w.writes(10).await;
    tail.through(r, &mut printed, &w.truth);

    // Connections reset.
    proxy.reset_all();
    let r = w.writes(10).await;
    tail.through(r, &mut printed, &w.truth);

    // Silence past the stall timeout, on a direct connection: the stall is blamed on
    // the silence, not on a grpc-proxy.
    proxy.set(Fault::Blackhole);
    let r = w.writes(10).await;
    tokio::time::sleep(STALL_TIMEOUT + Duration::from_secs(3)).await;
    proxy.heal();
    tail.through(r, &mut printed, &w.truth);
    let stderr = tail.stderr();
    assert!(
        !stderr.iter().any(|l| l.contains("grpc-proxy")),
        "a silent network blamed on grpc-proxy: {stderr:#?}"
    );

    // etcd frozen, then killed and restarted on its data.
    etcd.freeze(0).expect("freeze");
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.thaw(0).expect("thaw");
    let r = w.writes(10).await;
    tail.through(r, &mut printed, &w.truth);
    etcd.kill(0).expect("kill etcd");
    etcd.restart(0).await.expect("restart etcd");
    let r = w.writes(10).await;
    tail.through(r, &mut printed, &w.truth);

    // Compaction while tail is cut off: it must relist, once, with an exact diff.
    proxy.set(Fault::Blackhole);
    proxy.reset_all();
    w.writes(15).await;
    w.compact().await;
    let r = w.writes(5).await;
    proxy.heal();
    tail.through(r, &mut printed, &w.truth);
    assert_eq!(printed.resyncs, 1, "one relist, for the compaction");

    // tail killed, writes meanwhile, restarted from its file. The pause lets the
    // file write of the last batch finish (well under the 5 s default interval, so
    // only --persist-every-batch can have written it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = printed.high;
    let mut tail = tail.kill_and_restart();
    let r = w.writes(10).await;
    tail.through(r, &mut printed, &w.truth);
    assert_eq!(
        printed.restarts,
        [before],
        "resumed at the last printed revision"
    );
    assert_eq!(printed.repeats, 0, "nothing printed twice");

    // The end: tail's state is etcd's, read directly.
    let fence = w.writes(1).await;
    tail.through(fence, &mut printed, &w.truth);
    let etcd_now = w
        .client
        .range(RangeRequest {
            key: PREFIX.into(),
            range_end: etcd_proto::key_range::prefix_end(PREFIX.as_bytes()),
            ..Default::default()
        })
        .await
        .expect("range");
    let listed: State = etcd_now
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                (
                    String::from_utf8_lossy(&kv.value).into_owned(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                ),
            )
        })
        .collect();
    assert_eq!(printed.state, listed);
    assert!(
        printed.lines >= 50,
        "too few lines checked: {}",
        printed.lines
    );
    tail.process.terminate();
}
