//! Publish scenarios shared by the real-etcd and embedded-server tests. Each one
//! takes the endpoints of a fresh, empty store.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use revwatch::client::{
    Client, ClientConfig, CompactionRequest, DeleteRangeRequest, PutRequest, RangeRequest,
};
use revwatch::mirror::{ClientSource, Mirror, Snapshot};
use revwatch_policy::layout::{Layout, Tree, active_tree};
use revwatch_policy::publish::{Expect, PublishError, Publisher, publish, read_active_tree};

/// The policy prefix.
pub const P: &str = "pol/";

/// Defines one test per scenario of this module, each on a fresh store from
/// `$store`: an async fn returning a guard that keeps the store running, and its
/// endpoints.
macro_rules! scenario_tests {
    ($store:ident) => {
        publish_support::scenario_tests!($store:
            large_publish_is_atomic,
            concurrent_publishers_exactly_one_wins,
            expectations_see_edits_deletions_and_direct_mode,
            crashed_publisher_leaves_active_tree_and_is_collected,
            lost_lock_fails_the_publish,
            single_key_edits_take_effect_in_both_modes,
        );
    };
    ($store:ident: $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                publish_support::bounded(std::time::Duration::from_secs(120), async {
                    let (_store, endpoints) = $store().await;
                    publish_support::$name(&endpoints).await;
                })
                .await;
            }
        )*
    };
}
pub(crate) use scenario_tests;

/// The longest a single wait may take.
pub const WAIT: Duration = Duration::from_secs(30);

pub async fn bounded(limit: Duration, body: impl Future<Output = ()>) {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}

pub async fn client(endpoints: &[String]) -> Client {
    Client::connect(ClientConfig::new(endpoints.to_vec()))
        .await
        .unwrap()
}

/// `n` files under `dir/`, each holding `tag` and its index.
pub fn tree(tag: &str, dir: &str, n: usize) -> Tree {
    Tree::from_files((0..n).map(|i| (format!("{dir}/f{i:04}.cedar"), format!("{tag}-{i}"))))
        .unwrap()
}

pub type Content = BTreeMap<String, Bytes>;

/// A tree's paths and values, without revisions.
pub fn content(tree: &Tree) -> Content {
    tree.files
        .iter()
        .map(|(p, f)| (p.clone(), f.value.clone()))
        .collect()
}

pub async fn put(c: &Client, key: &str, value: &str) -> i64 {
    let resp = c.put(PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    });
    resp.await.unwrap().header.unwrap().revision
}

pub async fn delete(c: &Client, key: &str) -> i64 {
    let resp = c.delete_range(DeleteRangeRequest {
        key: key.into(),
        ..Default::default()
    });
    resp.await.unwrap().header.unwrap().revision
}

/// The keys under `prefix`, now.
pub async fn keys_under(c: &Client, prefix: &[u8]) -> Vec<Vec<u8>> {
    let mut end = prefix.to_vec();
    *end.last_mut().unwrap() += 1;
    c.range(RangeRequest {
        key: prefix.to_vec(),
        range_end: end,
        keys_only: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .kvs
    .into_iter()
    .map(|kv| kv.key)
    .collect()
}

/// Polls `check` until it holds.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a subscriber saw: the active tree of every snapshot it was delivered.
#[derive(Debug)]
pub struct Seen {
    pub revision: i64,
    pub tree: Result<Tree, String>,
}

/// A mirror of `P` with a subscriber running throughout, computing the active
/// tree of every delivered snapshot.
pub struct Observer {
    pub mirror: Mirror,
    task: tokio::task::JoinHandle<Vec<Seen>>,
}

impl Observer {
    pub async fn start(endpoints: &[String]) -> Observer {
        let source = ClientSource::lazy(ClientConfig::new(endpoints.to_vec())).unwrap();
        let mirror = Mirror::builder(P).start(source).await.unwrap();
        mirror.wait_ready().await.unwrap();
        let mut sub = mirror.subscribe();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(update) = sub.recv().await {
                let Some(snapshot) = update.snapshot() else {
                    continue;
                };
                seen.push(observe(&snapshot));
            }
            seen
        });
        Observer { mirror, task }
    }

    /// The active tree once the mirror has reached `revision`.
    pub async fn tree_at(&self, revision: i64) -> Tree {
        let snap = self.mirror.snapshot_at_least(revision, WAIT).await.unwrap();
        active_tree(&snap, P.as_bytes()).unwrap()
    }

    /// Stops once the mirror has reached `revision`; returns everything seen.
    pub async fn finish(self, revision: i64) -> Vec<Seen> {
        self.mirror.snapshot_at_least(revision, WAIT).await.unwrap();
        self.mirror.shutdown().await.unwrap();
        self.task.await.unwrap()
    }
}

fn observe(snapshot: &Snapshot<Bytes>) -> Seen {
    Seen {
        revision: snapshot.revision(),
        tree: active_tree(snapshot, P.as_bytes()).map_err(|e| e.to_string()),
    }
}

/// Asserts that every seen tree is valid and one of `allowed` (never a mixture),
/// that they appear in the order given, and that each one after the first
/// appears first at the revision given with it.
pub fn assert_sequence(seen: &[Seen], allowed: &[(&Content, i64)]) {
    let mut at = 0;
    for s in seen {
        let tree = s
            .tree
            .as_ref()
            .unwrap_or_else(|e| panic!("revision {}: invalid active tree: {e}", s.revision));
        let c = content(tree);
        let Some(i) = allowed.iter().position(|(a, _)| **a == c) else {
            panic!(
                "revision {}: active tree of {} files is none of the published ones",
                s.revision,
                c.len()
            );
        };
        assert!(
            i >= at,
            "revision {}: went back from tree {at} to {i}",
            s.revision
        );
        if i > at {
            assert_eq!(i, at + 1, "revision {}: skipped a tree", s.revision);
            assert_eq!(
                s.revision, allowed[i].1,
                "tree {i} became active at another revision"
            );
            at = i;
        }
    }
    assert_eq!(at, allowed.len() - 1, "the last tree was never seen");
}

/// A publish of more than 128 files becomes active in one revision: a subscriber
/// running throughout sees the direct tree, then each published tree whole.
/// Generations beyond the previous one are collected.
pub async fn large_publish_is_atomic(endpoints: &[String]) {
    let c = client(endpoints).await;
    let direct = tree("direct", "d", 3);
    for (path, file) in &direct.files {
        put(
            &c,
            &format!("{P}{path}"),
            std::str::from_utf8(&file.value).unwrap(),
        )
        .await;
    }
    let observer = Observer::start(endpoints).await;
    let a = tree("a", "policies", 300);
    let b = tree("b", "rules", 257);
    let last = tree("c", "policies", 130);
    let pa = publish(&c, P.as_bytes(), &a, Expect::Current)
        .await
        .unwrap();
    let seen_a = observer.tree_at(pa.revision).await;
    assert_eq!(seen_a.generation.as_deref(), Some(pa.generation.as_str()));
    assert_eq!(
        seen_a.stray,
        vec!["d/f0000.cedar", "d/f0001.cedar", "d/f0002.cedar"]
    );
    let pb = publish(&c, P.as_bytes(), &b, Expect::Revision(pa.revision))
        .await
        .unwrap();
    assert!(
        pb.collected.is_empty(),
        "the previous generation is kept: {pb:?}"
    );
    let pc = publish(&c, P.as_bytes(), &last, Expect::Revision(pb.revision))
        .await
        .unwrap();
    assert_eq!(pc.collected, vec![pa.generation.clone()]);
    let layout = Layout::new(P);
    assert!(
        keys_under(&c, &layout.generation(&pa.generation))
            .await
            .is_empty()
    );
    assert!(
        !keys_under(&c, &layout.generation(&pb.generation))
            .await
            .is_empty()
    );

    let seen = observer.finish(pc.revision).await;
    assert_sequence(
        &seen,
        &[
            (&content(&direct), 0),
            (&content(&a), pa.revision),
            (&content(&b), pb.revision),
            (&content(&last), pc.revision),
        ],
    );
    // The files went in several txns, the pointer in one more.
    let read = read_active_tree(&c, P.as_bytes()).await.unwrap();
    assert_eq!(content(&read), content(&last));
    assert_eq!(read.generation.as_deref(), Some(pc.generation.as_str()));
    let mut file_revisions: Vec<i64> = read.files.values().map(|f| f.mod_revision).collect();
    file_revisions.dedup();
    assert_eq!(
        file_revisions.len(),
        2,
        "130 files take two txns of at most 100"
    );
    assert!(file_revisions.iter().all(|&r| r < pc.revision));
}

/// Two publishers expecting the same revision: the one that commits first wins,
/// the other gets a conflict naming the pointer and the winner's revision. First
/// with the loser still writing when the winner commits (the final compare-and-
/// swap decides), then with both started together.
pub async fn concurrent_publishers_exactly_one_wins(endpoints: &[String]) {
    let c = client(endpoints).await;
    let base = publish(&c, P.as_bytes(), &tree("base", "p", 5), Expect::Current)
        .await
        .unwrap();
    let r = base.revision;
    let slow = Publisher::new(&c, P).max_txn_ops(1);
    let slow_tree = tree("slow", "p", 150);
    let slow_task =
        tokio::spawn(async move { slow.publish(&slow_tree, Expect::Revision(r)).await });
    let generations = Layout::new(P).generations();
    // The slow publisher has passed its checks once its lock exists.
    eventually("the slow publisher's lock", || async {
        keys_under(&c, &generations)
            .await
            .iter()
            .any(|k| k.ends_with(b"/.lock"))
    })
    .await;
    let fast_tree = tree("fast", "p", 3);
    let fast = publish(&c, P.as_bytes(), &fast_tree, Expect::Revision(r))
        .await
        .unwrap();
    match slow_task.await.unwrap() {
        Err(PublishError::Conflict {
            expected,
            actual,
            key,
        }) => {
            assert_eq!((expected, actual), (r, fast.revision));
            assert_eq!(key, "pol/.revwatch/active");
        }
        other => panic!("the slow publisher should conflict: {other:?}"),
    }
    // The loser cleaned up after itself: only the active and previous generations remain.
    let layout = Layout::new(P);
    let mut left: Vec<Vec<u8>> = keys_under(&c, &generations)
        .await
        .iter()
        .filter_map(|k| layout.generation_of(k).map(<[u8]>::to_vec))
        .collect();
    left.dedup();
    assert_eq!(left.len(), 2, "{left:?}");
    assert_eq!(
        content(&read_active_tree(&c, P.as_bytes()).await.unwrap()),
        content(&fast_tree)
    );

    // Both at once, expecting the same revision.
    let r = fast.revision;
    let (x, y) = (tree("x", "p", 120), tree("y", "q", 140));
    let (rx, ry) = tokio::join!(
        publish(&c, P.as_bytes(), &x, Expect::Revision(r)),
        publish(&c, P.as_bytes(), &y, Expect::Revision(r)),
    );
    let (winner, loser, won_tree) = match (rx, ry) {
        (Ok(w), Err(l)) => (w, l, x),
        (Err(l), Ok(w)) => (w, l, y),
        other => panic!("exactly one publisher must win: {other:?}"),
    };
    match loser {
        PublishError::Conflict {
            expected, actual, ..
        } => assert_eq!((expected, actual), (r, winner.revision)),
        other => panic!("the loser should get a conflict: {other}"),
    }
    assert_eq!(
        content(&read_active_tree(&c, P.as_bytes()).await.unwrap()),
        content(&won_tree)
    );
}

/// `Expect::Revision(R)` fails when a key of the active tree was put or deleted
/// after R, and when R is compacted; `Expect::Any` always publishes.
pub async fn expectations_see_edits_deletions_and_direct_mode(endpoints: &[String]) {
    let c = client(endpoints).await;
    // Direct mode: a key added after R.
    let r0 = put(&c, &format!("{P}a.cedar"), "a").await;
    let added = put(&c, &format!("{P}b.cedar"), "b").await;
    let t = tree("t", "p", 3);
    match publish(&c, P.as_bytes(), &t, Expect::Revision(r0)).await {
        Err(PublishError::Conflict {
            expected,
            actual,
            key,
        }) => assert_eq!((expected, actual, key.as_str()), (r0, added, "pol/b.cedar")),
        other => panic!("{other:?}"),
    }
    let base = publish(&c, P.as_bytes(), &t, Expect::Revision(added))
        .await
        .unwrap();
    let g = Layout::new(P).generation(&base.generation);
    let g = std::str::from_utf8(&g).unwrap().to_owned();

    // Generation mode: a key edited after R.
    let edited = put(&c, &format!("{g}p/f0001.cedar"), "edited").await;
    match publish(&c, P.as_bytes(), &t, Expect::Revision(base.revision)).await {
        Err(PublishError::Conflict {
            expected,
            actual,
            key,
        }) => {
            assert_eq!((expected, actual), (base.revision, edited));
            assert_eq!(key, format!("{g}p/f0001.cedar"));
        }
        other => panic!("{other:?}"),
    }
    // A key deleted after R: found by counting.
    let deleted = delete(&c, &format!("{g}p/f0002.cedar")).await;
    match publish(&c, P.as_bytes(), &t, Expect::Revision(edited)).await {
        Err(PublishError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(expected, edited);
            assert!(actual >= deleted, "{actual} < {deleted}");
        }
        other => panic!("{other:?}"),
    }
    // Stray direct keys do not count in generation mode.
    let stray = put(&c, &format!("{P}z.cedar"), "stray").await;
    let edited_tree = tree("u", "p", 2);
    let p1 = publish(&c, P.as_bytes(), &edited_tree, Expect::Revision(deleted))
        .await
        .unwrap();
    assert!(p1.revision > stray);

    // A compacted expectation cannot be checked.
    let now = put(&c, &format!("{P}y.cedar"), "y").await;
    c.compact(CompactionRequest {
        revision: now,
        physical: true,
    })
    .await
    .unwrap();
    match publish(&c, P.as_bytes(), &t, Expect::Revision(p1.revision)).await {
        Err(PublishError::ExpectCompacted { expected, .. }) => assert_eq!(expected, p1.revision),
        other => panic!("{other:?}"),
    }
    // Any: no check.
    let p2 = publish(&c, P.as_bytes(), &t, Expect::Any).await.unwrap();
    let active = read_active_tree(&c, P.as_bytes()).await.unwrap();
    assert_eq!(active.generation.as_deref(), Some(p2.generation.as_str()));
    assert_eq!(content(&active), content(&t));
    // Nothing to publish.
    assert!(matches!(
        publish(&c, P.as_bytes(), &Tree::default(), Expect::Any).await,
        Err(PublishError::EmptyTree)
    ));
}

/// A publisher stopped halfway leaves the active tree unchanged; its generation
/// stays locked until its lease expires, and the next publish collects it.
pub async fn crashed_publisher_leaves_active_tree_and_is_collected(endpoints: &[String]) {
    let c = client(endpoints).await;
    let observer = Observer::start(endpoints).await;
    let base_tree = tree("base", "p", 10);
    let base = publish(&c, P.as_bytes(), &base_tree, Expect::Current)
        .await
        .unwrap();
    let layout = Layout::new(P);
    let generations = layout.generations();
    // One file per txn, so that it is stopped long before it could finish.
    let crashing = Publisher::new(&c, P).lease_ttl(2).max_txn_ops(1);
    let big = tree("crash", "p", 400);
    let task = tokio::spawn(async move { crashing.publish(&big, Expect::Current).await });
    // Stop it once it has written some batches, but not all.
    let base_gen = layout.generation(&base.generation);
    let deadline = Instant::now() + WAIT;
    let orphan = loop {
        let keys = keys_under(&c, &generations).await;
        let theirs: Vec<_> = keys.iter().filter(|k| !k.starts_with(&base_gen)).collect();
        if theirs.len() >= 50 {
            break layout.generation_of(theirs[0]).unwrap().to_vec();
        }
        assert!(
            Instant::now() < deadline,
            "the crashing publisher wrote {} keys",
            theirs.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    task.abort();
    assert!(
        task.await.unwrap_err().is_cancelled(),
        "it finished before the crash"
    );
    let orphan = String::from_utf8(orphan).unwrap();
    let orphan_prefix = layout.generation(&orphan);
    let written = keys_under(&c, &orphan_prefix).await.len();
    assert!(written > 1 && written < 401, "{written} keys written");
    assert_eq!(
        content(&read_active_tree(&c, P.as_bytes()).await.unwrap()),
        content(&base_tree)
    );
    // Locked: not collected yet.
    let publisher = Publisher::new(&c, P);
    assert!(publisher.collect_garbage().await.unwrap().is_empty());
    assert!(!keys_under(&c, &orphan_prefix).await.is_empty());
    // Once the lease expired, the next publish collects it.
    let lock = layout.lock(&orphan);
    eventually("the orphan's lock to expire", || async {
        keys_under(&c, &lock).await.is_empty()
    })
    .await;
    let next_tree = tree("next", "p", 20);
    let next = publisher
        .publish(&next_tree, Expect::Revision(base.revision))
        .await
        .unwrap();
    assert_eq!(next.collected, vec![orphan]);
    assert!(keys_under(&c, &orphan_prefix).await.is_empty());

    let seen = observer.finish(next.revision).await;
    assert_sequence(
        &seen,
        &[
            (&Content::new(), 0),
            (&content(&base_tree), base.revision),
            (&content(&next_tree), next.revision),
        ],
    );
}

/// A publisher whose lock vanishes while it writes (its lease lost) fails with
/// `LockLost`, changes nothing visible, and its files are collected later.
pub async fn lost_lock_fails_the_publish(endpoints: &[String]) {
    let c = client(endpoints).await;
    let base_tree = tree("base", "p", 4);
    let base = publish(&c, P.as_bytes(), &base_tree, Expect::Current)
        .await
        .unwrap();
    let slow = Publisher::new(&c, P).max_txn_ops(1);
    let slow_tree = tree("slow", "p", 300);
    let task = tokio::spawn(async move { slow.publish(&slow_tree, Expect::Current).await });
    let layout = Layout::new(P);
    let generations = layout.generations();
    let deadline = Instant::now() + WAIT;
    let lock = loop {
        let keys = keys_under(&c, &generations).await;
        if let Some(lock) = keys.iter().find(|k| k.ends_with(b"/.lock")) {
            break String::from_utf8(lock.clone()).unwrap();
        }
        assert!(Instant::now() < deadline, "no lock appeared");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    delete(&c, &lock).await;
    match task.await.unwrap() {
        Err(PublishError::LockLost { key, .. }) => assert_eq!(key, lock),
        other => panic!("the publish should have lost its lock: {other:?}"),
    }
    let active = read_active_tree(&c, P.as_bytes()).await.unwrap();
    assert_eq!(active.generation.as_deref(), Some(base.generation.as_str()));
    assert_eq!(content(&active), content(&base_tree));
    let orphan = layout.generation_of(lock.as_bytes()).unwrap().to_vec();
    let orphan = String::from_utf8(orphan).unwrap();
    let collected = Publisher::new(&c, P).collect_garbage().await.unwrap();
    assert_eq!(collected, vec![orphan]);
}

/// Single-key edits (what `etcdctl put`/`del` do) take effect in both modes, as
/// the layout docs describe; a rollback is one put of the pointer.
pub async fn single_key_edits_take_effect_in_both_modes(endpoints: &[String]) {
    let c = client(endpoints).await;
    let observer = Observer::start(endpoints).await;
    // Direct mode.
    let r = put(&c, "pol/policies/admin.cedar", "v1").await;
    let t = observer.tree_at(r).await;
    assert_eq!(t.generation, None);
    assert_eq!(t.get("policies/admin.cedar").unwrap().value, "v1");
    assert_eq!(t.get("policies/admin.cedar").unwrap().mod_revision, r);
    let r = delete(&c, "pol/policies/admin.cedar").await;
    assert!(observer.tree_at(r).await.is_empty());

    // Generation mode.
    let mut published = Vec::new();
    for tag in ["one", "two"] {
        let t = tree(tag, "policies", 2);
        published.push(
            publish(&c, P.as_bytes(), &t, Expect::Current)
                .await
                .unwrap(),
        );
    }
    let (first, published) = (&published[0], &published[1]);
    let g = published.generation.clone();
    let r = put(
        &c,
        &format!("pol/.revwatch/gen/{g}/policies/admin.cedar"),
        "v2",
    )
    .await;
    let t = observer.tree_at(r).await;
    assert_eq!(t.generation.as_deref(), Some(g.as_str()));
    assert_eq!(t.get("policies/admin.cedar").unwrap().value, "v2");
    assert_eq!(t.len(), 3);
    let r = delete(&c, &format!("pol/.revwatch/gen/{g}/policies/f0000.cedar")).await;
    let t = observer.tree_at(r).await;
    assert!(t.get("policies/f0000.cedar").is_none());
    // A direct key is now stray, not active.
    let r = put(&c, "pol/policies/admin.cedar", "ignored").await;
    let t = observer.tree_at(r).await;
    assert_eq!(t.get("policies/admin.cedar").unwrap().value, "v2");
    assert_eq!(t.stray, vec!["policies/admin.cedar"]);

    // Rollback: point at the previous generation.
    let previous = c
        .range(RangeRequest {
            key: b"pol/.revwatch/previous".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(previous.kvs[0].value, first.generation.as_bytes());
    let r = put(&c, "pol/.revwatch/active", &first.generation).await;
    let t = observer.tree_at(r).await;
    assert_eq!(content(&t), content(&tree("one", "policies", 2)));
    // Back to direct mode.
    let r = delete(&c, "pol/.revwatch/active").await;
    let t = observer.tree_at(r).await;
    assert_eq!((t.generation.as_deref(), t.len()), (None, 1));
    assert_eq!(t.get("policies/admin.cedar").unwrap().value, "ignored");
    observer.finish(r).await;
}
