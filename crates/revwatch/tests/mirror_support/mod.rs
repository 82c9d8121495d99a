//! Shared checks for the mirror tests: ground truth from a source's own range, and
//! a replay of a subscription that verifies ordering, atomic per-revision batches
//! and that replayed changes equal the published snapshots.

#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;
pub mod embedded;
pub mod etcd;
pub mod metrics;
pub mod scenarios;
pub mod setup;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_proto::mvccpb::KeyValue;
use revwatch::client::RangeRequest;
use revwatch::mirror::source::prefix_range_end;
use revwatch::mirror::{ChangeKind, Snapshot, Source, Subscription, Update};

/// key -> (value, create_revision, mod_revision, version, lease)
pub type Kvs = BTreeMap<Vec<u8>, (Vec<u8>, i64, i64, i64, i64)>;

/// The raw state of any snapshot, typed or not.
pub fn snap_kvs<T>(s: &Snapshot<T>) -> Kvs {
    s.iter()
        .map(|(k, e)| {
            (
                k.to_vec(),
                (
                    e.raw.to_vec(),
                    e.create_revision,
                    e.mod_revision,
                    e.version,
                    e.lease,
                ),
            )
        })
        .collect()
}

/// Polls `f` until it returns `Some`, for at most [`setup::WAIT`].
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + setup::WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The source's own view of the prefix at `revision`.
pub async fn truth<S: Source>(src: &S, prefix: &[u8], revision: i64) -> Kvs {
    let resp = src
        .range(RangeRequest {
            key: prefix.to_vec(),
            range_end: prefix_range_end(prefix),
            revision,
            ..Default::default()
        })
        .await
        .expect("ground-truth range");
    kvs_of(resp.kvs)
}

/// The raw state of a range response's key-values.
pub fn kvs_of(kvs: Vec<KeyValue>) -> Kvs {
    kvs.into_iter()
        .map(|kv| {
            (
                kv.key,
                (
                    kv.value,
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                    kv.lease,
                ),
            )
        })
        .collect()
}

/// A subscriber's view, rebuilt from its updates.
#[derive(Debug, Default)]
pub struct Replay {
    pub state: Kvs,
    pub revision: i64,
    /// (revision, resync?) of every batch.
    pub batches: Vec<(i64, bool)>,
    pub bookmarks: Vec<i64>,
    pub resyncs: usize,
    /// Revisions whose snapshot was seen (for ground-truth comparison).
    pub snapshots: Vec<(i64, Kvs)>,
    pub keep_snapshots: bool,
}

impl Replay {
    pub fn keeping_snapshots() -> Self {
        Replay {
            keep_snapshots: true,
            ..Replay::default()
        }
    }

    /// Applies one update, checking the delivery guarantees.
    pub fn apply(&mut self, u: &Update<Bytes>) {
        match u {
            Update::Snapshot(s) => {
                assert!(
                    self.batches.is_empty() && self.revision == 0,
                    "snapshot must come first"
                );
                self.state = snap_kvs(s);
                self.revision = s.revision();
            }
            Update::Progress(r) => {
                assert!(
                    *r > self.revision,
                    "bookmark {r} not above {}",
                    self.revision
                );
                self.revision = *r;
                self.bookmarks.push(*r);
            }
            Update::Batch(b) => {
                if b.is_resync() {
                    assert!(
                        b.revision >= self.revision,
                        "resync at {} goes back from {}",
                        b.revision,
                        self.revision
                    );
                    self.resyncs += 1;
                } else {
                    assert!(
                        b.revision > self.revision,
                        "batch {} not above {}",
                        b.revision,
                        self.revision
                    );
                }
                let mut keys = std::collections::HashSet::new();
                for c in &b.changes {
                    assert!(
                        keys.insert(c.key.clone()),
                        "key {:?} twice in batch {}",
                        c.key,
                        b.revision
                    );
                    match &c.kind {
                        ChangeKind::Put { entry, .. } => {
                            if !b.is_resync() {
                                assert_eq!(
                                    entry.mod_revision, b.revision,
                                    "event split across batches"
                                );
                            }
                            self.state.insert(
                                c.key.to_vec(),
                                (
                                    entry.raw.to_vec(),
                                    entry.create_revision,
                                    entry.mod_revision,
                                    entry.version,
                                    entry.lease,
                                ),
                            );
                        }
                        ChangeKind::Delete { .. } => {
                            self.state.remove(&c.key[..]);
                        }
                    }
                }
                self.revision = b.revision;
                self.batches.push((b.revision, b.is_resync()));
                assert_eq!(
                    self.state,
                    snap_kvs(&b.snapshot()),
                    "replayed changes differ from the batch snapshot at {}",
                    b.revision
                );
            }
        }
        if self.keep_snapshots {
            self.snapshots.push((self.revision, self.state.clone()));
        }
    }

    /// Receives and applies updates until the replayed revision reaches `rev`.
    pub async fn follow_until(
        &mut self,
        sub: &mut Subscription<Bytes>,
        rev: i64,
        within: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        while self.revision < rev {
            let u = tokio::time::timeout_at(deadline, sub.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("subscriber stuck at {} waiting for {rev}", self.revision)
                })
                .expect("subscription ended");
            self.apply(&u);
        }
    }
}
