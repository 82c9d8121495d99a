//! The compaction boundary, a clean shutdown, and readiness after catch-up.
//!
//! etcd accepts a watch that starts *at* the compaction revision C, but compacting
//! at C has already removed C's tombstones: the watch silently misses the deletes
//! at C. The first test shows it on etcd itself; the others check that the mirror
//! notices and relists instead.

mod mirror_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use etcd_proto::mvccpb::event::EventType;
use mirror_support::etcd::run_on_etcd;
use mirror_support::setup::{
    P, WAIT, assert_converged, delete_op, mirror_config, put, put_op, source, start, start_with,
    txn,
};
use mirror_support::{Replay, snap_kvs, truth};
use revwatch::client::{
    Client, CompactionRequest, Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchStream,
};
use revwatch::mirror::{
    ChangeKind, ClientSource, MemoryOp, MemorySource, Mirror, ResyncReason, Source, State,
    Subscription, Update,
};
use revwatch_testkit::proxy::{Fault, FaultProxy};

/// One revision that puts `{P}t` and deletes `{P}k`; returns it.
async fn put_t_delete_k(etcd: &Client) -> i64 {
    let ops = vec![put_op(&format!("{P}t"), "t"), delete_op(&format!("{P}k"))];
    txn(etcd, ops).await
}

async fn compact(etcd: &Client, revision: i64) {
    etcd.compact(CompactionRequest {
        revision,
        physical: true,
    })
    .await
    .unwrap();
}

/// The key and type of every event, in order.
fn events_of(resp: &etcd_proto::etcdserverpb::WatchResponse) -> Vec<(String, i32, i64)> {
    resp.events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                e.r#type,
                kv.mod_revision,
            )
        })
        .collect()
}

/// etcd 3.4: after compacting at C, a watch from C is accepted, and delivers the
/// put of a txn at C without its delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_from_the_compaction_revision_misses_its_deletes() {
    run_on_etcd(Duration::from_secs(60), async |_cluster, etcd| {
        put(&etcd, &format!("{P}k"), "1").await;
        let c = put_t_delete_k(&etcd).await;
        compact(&etcd, c).await;
        let after = put(&etcd, &format!("{P}z"), "1").await;
        let mut w = etcd
            .watch(WatchCreateRequest {
                key: P.into(),
                range_end: revwatch::mirror::source::prefix_range_end(P.as_bytes()),
                start_revision: c,
                ..Default::default()
            })
            .await
            .unwrap();
        let created = w.message().await.unwrap().unwrap();
        assert!(created.created && !created.canceled, "{created:?}");
        let mut seen = Vec::new();
        while seen.last().is_none_or(|(_, _, r)| *r < after) {
            let resp = tokio::time::timeout(WAIT, w.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(!resp.canceled, "{resp:?}");
            seen.extend(events_of(&resp));
        }
        let put_type = EventType::Put as i32;
        assert_eq!(
            seen,
            [
                (format!("{P}t"), put_type, c),
                (format!("{P}z"), put_type, after)
            ],
            "the delete of {P}k at {c} is gone"
        );
        // What the mirror checks instead: a range just below C is compacted.
        let below = etcd
            .range(RangeRequest {
                key: P.into(),
                revision: c - 1,
                count_only: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(below.is_compacted(), "{below}");
    })
    .await;
}

/// Cuts the mirror off through `proxy` when it holds etcd's current revision;
/// returns that revision.
async fn cut_off_in_sync(mirror: &Mirror, etcd: &Client, proxy: &FaultProxy) -> i64 {
    let last = mirror.consistent_snapshot(WAIT).await.unwrap().revision();
    proxy.set(Fault::Blackhole);
    proxy.reset_all();
    let current = etcd
        .range(RangeRequest {
            key: P.into(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .header
        .unwrap()
        .revision;
    assert_eq!(current, last, "a write slipped in before the cut");
    last
}

/// Follows `sub` up to a resync at or above `revision`, and checks that `{P}k` is
/// gone, that the subscriber's state equals etcd's, and that the mirror relisted
/// because of compaction.
async fn assert_resynced_without_k(
    mirror: &Mirror,
    sub: &mut Subscription<Bytes>,
    etcd: &Client,
    revision: i64,
) {
    let mut replay = Replay::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    while replay.resyncs == 0 || replay.revision < revision {
        let u = tokio::time::timeout_at(deadline, sub.recv())
            .await
            .unwrap_or_else(|_| panic!("no resync; batches {:?}", replay.batches))
            .expect("subscription ended");
        replay.apply(&u);
    }
    assert_eq!(replay.resyncs, 1, "{:?}", replay.batches);
    assert!(!replay.state.contains_key(format!("{P}k").as_bytes()));
    assert_eq!(
        replay.state,
        truth(&ClientSource::new(etcd.clone()), P.as_bytes(), revision).await
    );
    let st = mirror.status();
    assert!(
        st.relists
            .get(&ResyncReason::Compacted)
            .copied()
            .unwrap_or(0)
            >= 1,
        "{st:?}"
    );
    assert_converged(mirror, etcd).await;
}

/// The mirror is cut off at C − 1; a txn at C puts one key and deletes another,
/// and history is compacted at exactly C. Resuming at C would miss the delete: the
/// mirror relists instead, and ends equal to etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_at_the_compaction_revision_relists() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        put(&etcd, &format!("{P}k"), "1").await;
        put(&etcd, &format!("{P}keep"), "1").await;
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        let mirror = start(vec![proxy.endpoint()], mirror_config()).await;
        mirror.wait_ready().await.unwrap();
        let mut sub = mirror.subscribe();
        let last = cut_off_in_sync(&mirror, &etcd, &proxy).await;
        let c = put_t_delete_k(&etcd).await;
        assert_eq!(c, last + 1);
        compact(&etcd, c).await;
        proxy.heal();
        assert_resynced_without_k(&mirror, &mut sub, &etcd, c).await;
    })
    .await;
}

/// A source that compacts at a set revision right after the mirror's first
/// compaction check (a count-only range at a past revision) passed: the race a
/// single check before reading the stream cannot see.
#[derive(Clone)]
struct CompactAfterCheck {
    inner: ClientSource,
    admin: Client,
    at: Arc<Mutex<Option<i64>>>,
}

impl Source for CompactAfterCheck {
    type Watch = WatchStream;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        let is_check = req.count_only && req.revision > 0;
        let resp = self.inner.range(req).await;
        let armed = is_check && resp.is_ok();
        let at = if armed {
            self.at.lock().unwrap().take()
        } else {
            None
        };
        if let Some(at) = at {
            compact(&self.admin, at).await;
        }
        resp
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<WatchStream, Error> {
        self.inner.watch(req).await
    }
}

/// As above, but compaction at C lands after the first check passed, while etcd
/// may still be reading history for the new watch: the check once caught up
/// relists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_racing_the_catch_up_relists() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        put(&etcd, &format!("{P}k"), "1").await;
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        let at = Arc::new(Mutex::new(None));
        let source = CompactAfterCheck {
            inner: source(vec![proxy.endpoint()]),
            admin: etcd.clone(),
            at: Arc::clone(&at),
        };
        let mirror = start_with(source, mirror_config(), |b| b).await;
        mirror.wait_ready().await.unwrap();
        let mut sub = mirror.subscribe();
        let last = cut_off_in_sync(&mirror, &etcd, &proxy).await;
        let c = put_t_delete_k(&etcd).await;
        assert_eq!(c, last + 1);
        *at.lock().unwrap() = Some(c);
        proxy.heal();
        assert_resynced_without_k(&mirror, &mut sub, &etcd, c).await;
        assert!(at.lock().unwrap().is_none(), "the compaction never ran");
    })
    .await;
}

/// The same edge on the in-process source, which drops tombstones like etcd.
#[tokio::test]
async fn memory_resume_at_the_compaction_revision_relists() {
    let src = MemorySource::new();
    src.put(format!("{P}k").as_bytes(), b"1");
    let mirror = start_with(src.clone(), mirror_config(), |b| b).await;
    mirror.wait_ready().await.unwrap();
    let last = src.revision();
    mirror.snapshot_at_least(last, WAIT).await.unwrap();
    let mut sub = mirror.subscribe();
    src.set_unreachable(true);
    src.disconnect_watches();
    let c = src.txn(vec![
        MemoryOp::Put(format!("{P}t").into(), b"t".to_vec(), 0),
        MemoryOp::Delete(format!("{P}k").into()),
    ]);
    src.compact(c);
    src.set_unreachable(false);
    let snap = mirror.snapshot_at_least(c, WAIT).await.unwrap();
    assert_eq!(snap_kvs(&snap), truth(&src, P.as_bytes(), c).await);
    let mut batches = Vec::new();
    while batches.last().is_none_or(|(r, _)| *r < c) {
        let update = tokio::time::timeout(WAIT, sub.recv()).await.unwrap();
        if let Update::Batch(b) = update.expect("subscription ended") {
            let deleted_k = b.changes.iter().any(|ch| {
                ch.key == format!("{P}k").as_bytes() && matches!(ch.kind, ChangeKind::Delete { .. })
            });
            batches.push((b.revision, (b.resync, deleted_k)));
        }
    }
    assert_eq!(
        batches,
        [(c, (Some(ResyncReason::Compacted), true))],
        "one resync batch deleting {P}k"
    );
    assert_eq!(mirror.status().relists[&ResyncReason::Compacted], 1);
}

/// After `shutdown`, the snapshot file holds the last published revision even when
/// the timed writes lag behind: a restart resumes from it without a relist, even
/// though history was compacted up to it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_writes_the_final_snapshot() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        let dir = tempfile::tempdir().unwrap();
        let config = mirror_config()
            .with_snapshot_file(dir.path().join("m.snap"))
            // Only the first publish is written on the timer.
            .with_snapshot_interval(Duration::from_secs(3600));
        put(&etcd, &format!("{P}a"), "1").await;
        let first = start(cluster.endpoints(), config.clone()).await;
        first.wait_ready().await.unwrap();
        let mut last = 0;
        for i in 0..10 {
            last = put(&etcd, &format!("{P}{i}"), "v").await;
        }
        let published = first.snapshot_at_least(last, WAIT).await.unwrap();
        let mut sub = first.subscribe();
        first.shutdown().await.unwrap();
        // Subscriptions end at shutdown.
        while sub.recv().await.is_some() {}
        // The file's revision is all that is left: an older one would need a relist.
        compact(&etcd, last).await;
        let after = put(&etcd, &format!("{P}after"), "x").await;

        let second = start(cluster.endpoints(), config).await;
        assert_eq!(second.snapshot().revision(), last, "served from the file");
        assert_eq!(snap_kvs(&second.snapshot()), snap_kvs(&published));
        let mut sub = second.subscribe();
        let mut replay = Replay::default();
        replay.follow_until(&mut sub, after, WAIT).await;
        assert_eq!(replay.batches, [(after, false)]);
        second.wait_ready().await.unwrap();
        let st = second.status();
        assert!(st.relists.is_empty(), "{st:?}");
        assert_converged(&second, &etcd).await;
    })
    .await;
}

/// A resumed watch whose history holds nothing for the prefix is not Ready at its
/// created reply, only once it is known to have caught up (here: an event at or
/// above its creation revision; the grace period is set out of reach).
#[tokio::test]
async fn ready_only_once_caught_up() {
    let src = MemorySource::new();
    src.put(format!("{P}a").as_bytes(), b"1");
    let config = mirror_config().with_catch_up_grace(Duration::from_secs(3600));
    let mirror = start_with(src.clone(), config, |b| b).await;
    mirror.wait_ready().await.unwrap();
    let mut status = mirror.status_changes();
    src.set_unreachable(true);
    src.disconnect_watches();
    status
        .wait_for(|s| s.state == State::Reconnecting)
        .await
        .unwrap();
    for i in 0..3 {
        src.put(format!("other/{i}").as_bytes(), b"x");
    }
    src.set_unreachable(false);
    // The stream is open again (created reply seen) ...
    let st = tokio::time::timeout(WAIT, status.wait_for(|s| s.endpoint.is_some()))
        .await
        .unwrap()
        .unwrap()
        .clone();
    // ... but has not shown that it caught up.
    assert_eq!(st.state, State::Reconnecting, "{st:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mirror.status().state, State::Reconnecting);
    let r = src.put(format!("{P}b").as_bytes(), b"2");
    tokio::time::timeout(WAIT, mirror.wait_ready())
        .await
        .unwrap()
        .unwrap();
    assert!(mirror.snapshot().revision() >= r);
}
