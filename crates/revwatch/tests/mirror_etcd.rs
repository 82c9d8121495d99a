//! The mirror against real etcd 3.4 (testkit): each test ends by comparing the
//! mirror's snapshot with etcd's own range at the same revision, and checks every
//! subscriber update it collected (order, atomic batches, replay = snapshot).
//!
//! The scenarios shared with the embedded server live in
//! `mirror_support::scenarios`; the ones only a real etcd can play (a frozen
//! process, a 3-member cluster) are here.

mod mirror_support;

use std::time::{Duration, Instant};

use mirror_support::Replay;
use mirror_support::etcd::{self, run_on_etcd};
use mirror_support::scenarios::scenario_tests;
use mirror_support::setup::{
    P, WAIT, assert_converged, bounded, mirror_config, put, put_op, source, start, txn, writer,
};
use revwatch::client::{Client, PutRequest, RangeRequest};
use revwatch::mirror::source::prefix_range_end;
use revwatch::mirror::{Mirror, MirrorConfig, ReconnectCause, State};
use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};
use revwatch_testkit::grpc_proxy::GrpcProxy;
use revwatch_testkit::proxy::{Fault, FaultProxy};

scenario_tests! {
    target: etcd::single().await;
    initial_list_across_pages_while_writes_continue(90);
    txns_and_lease_expiry_arrive_atomically(90);
    kill_and_restart_resumes_without_relist(120);
    compaction_while_disconnected_relists_with_exact_diff(120);
    restart_from_persisted_snapshot_and_start_with_etcd_down(150);
    bad_value_is_isolated(90);
    slow_subscriber_is_resynced(90);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_member_is_detected_within_the_bound() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        put(&etcd, &format!("{P}a"), "1").await;
        // Default stall bound (10 s).
        let config = MirrorConfig::default().with_retry_backoff(mirror_config().retry_backoff);
        let mirror = start(cluster.endpoints(), config).await;
        mirror.wait_ready().await.unwrap();
        cluster.freeze(0).unwrap();
        let frozen_at = Instant::now();
        loop {
            let st = mirror.status();
            if st.reconnects.contains_key(&ReconnectCause::Stall)
                || st.reconnects.contains_key(&ReconnectCause::StreamError)
            {
                break;
            }
            assert!(
                frozen_at.elapsed() < Duration::from_secs(15),
                "freeze not detected within 15 s: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(mirror.status().state, State::Ready);
        cluster.thaw(0).unwrap();
        let etcd = writer(cluster.endpoints()).await;
        let r = put(&etcd, &format!("{P}b"), "2").await;
        mirror.snapshot_at_least(r, WAIT).await.unwrap();
        assert!(mirror.status().relists.is_empty());
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// etcd 3.4 may answer a progress request ahead of events (etcd#15220), so the
/// mirror takes such a reply for a bookmark only once a read at its revision shows
/// the prefix unchanged. That read relies on etcd filtering the keys it returns by
/// `min_mod_revision` while `count` still covers the whole range: shown here, then
/// a quiet revision reached that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_revisions_are_reached_through_verified_progress() {
    run_on_etcd(Duration::from_secs(90), async |cluster, etcd| {
        put(&etcd, &format!("{P}a"), "1").await;
        let base = put(&etcd, &format!("{P}b"), "1").await;
        let changed = put(&etcd, &format!("{P}a"), "2").await;
        let read = |revision: i64, since: i64| RangeRequest {
            key: P.into(),
            range_end: prefix_range_end(P.as_bytes()),
            revision,
            min_mod_revision: since + 1,
            keys_only: true,
            limit: 1,
            ..RangeRequest::default()
        };
        let resp = etcd.range(read(changed, base)).await.unwrap();
        assert_eq!((resp.kvs.len(), resp.count), (1, 2), "{resp:?}");
        let resp = etcd.range(read(changed, changed)).await.unwrap();
        assert_eq!((resp.kvs.len(), resp.count), (0, 2), "{resp:?}");

        let mirror = start(cluster.endpoints(), mirror_config()).await;
        mirror.wait_ready().await.unwrap();
        let quiet = put(&etcd, "elsewhere/x", "y").await;
        let snap = mirror.snapshot_at_least(quiet, WAIT).await.unwrap();
        assert!(snap.revision() >= quiet);
        let st = mirror.status();
        assert!(
            st.untrusted_progress >= 1,
            "reached through a verified reply: {st:?}"
        );
        assert!(st.relists.is_empty(), "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// etcd#15220 on a real etcd 3.4: a mirror resumes from its snapshot file with a
/// long history to catch up on, and a reader asks for the newest revision all
/// along. etcd answers the progress requests at the newest revision while it is
/// still reading that history for the watcher. With the catch-up taken for done
/// at once, only the verification read stands between such an answer and a
/// bookmark that would claim a stale state (and whose late events would then
/// fail validation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_answered_ahead_of_a_catch_up_is_never_a_bookmark() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        let dir = tempfile::tempdir().unwrap();
        let config = mirror_config()
            .with_snapshot_file(dir.path().join("mirror.snapshot"))
            .with_catch_up_grace(Duration::from_millis(1));
        put(&etcd, &format!("{P}a"), "1").await;
        let mirror = start(cluster.endpoints(), config.clone()).await;
        mirror.wait_ready().await.unwrap();
        let saved = mirror.snapshot().revision();
        mirror.shutdown().await.unwrap();
        // The history: 50 revisions of 100 puts each, every one in the prefix.
        let value = "v".repeat(500);
        let mut head = saved;
        for t in 0..50 {
            let ops = (0..100)
                .map(|k| put_op(&format!("{P}{t}/{k}"), &value))
                .collect();
            head = txn(&etcd, ops).await;
        }

        let (mirror, mut subs) = Mirror::builder(P)
            .config(config)
            .start_subscribed(source(cluster.endpoints()), 1)
            .await
            .unwrap();
        assert_eq!(
            mirror.status().loaded_snapshot.map(|f| f.revision),
            Some(saved)
        );
        let snap = mirror.snapshot_at_least(head, WAIT).await.unwrap();
        assert_eq!(snap.revision(), head);
        let mut replay = Replay::default();
        replay.follow_until(&mut subs[0], head, WAIT).await;
        assert_eq!(replay.batches.len(), 50, "{:?}", replay.batches);
        assert_eq!(replay.resyncs, 0);
        assert!(replay.bookmarks.is_empty(), "{:?}", replay.bookmarks);
        let st = mirror.status();
        assert!(st.relists.is_empty(), "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_losing_its_leader() {
    bounded(Duration::from_secs(180), async {
        let mut cluster = EtcdCluster::three().await.unwrap();
        let etcd = writer(cluster.endpoints()).await;
        put(&etcd, &format!("{P}a"), "1").await;
        let leader = cluster.leader().await.unwrap();
        // Watch through the leader, so losing it breaks the mirror's stream.
        let mut endpoints = cluster.endpoints();
        endpoints.swap(0, leader);
        let mirror = start(endpoints, mirror_config()).await;
        mirror.wait_ready().await.unwrap();
        let mut sub = mirror.subscribe();
        let r0 = put(&etcd, &format!("{P}b"), "1").await;
        let mut replay = Replay::default();
        replay.follow_until(&mut sub, r0, WAIT).await;
        cluster.kill(leader).unwrap();
        cluster.wait_for_leader(WAIT).await.unwrap();
        let mut last = 0;
        for i in 0..20 {
            // Writes may fail while the cluster elects; the mirror must see the ones
            // that succeed.
            if let Ok(resp) = etcd
                .put(PutRequest {
                    key: format!("{P}k{i}").into(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })
                .await
            {
                last = resp.header.unwrap().revision;
            }
        }
        assert!(last > 0, "no write succeeded after the election");
        replay.follow_until(&mut sub, last, WAIT).await;
        assert_eq!(replay.resyncs, 0);
        assert!(mirror.status().relists.is_empty());
        assert_converged(&mirror, &etcd).await;
        cluster.restart(leader).await.unwrap();
    })
    .await;
}

/// A single member sending periodic progress notifications every `notify` (if any), a
/// grpc-proxy in front of it, a writer talking to the member, and a mirror behind the
/// proxy that has applied one put.
async fn mirror_behind_grpc_proxy(
    notify: Option<Duration>,
) -> (EtcdCluster, GrpcProxy, Client, Mirror) {
    let cluster = EtcdCluster::start(ClusterOptions {
        progress_notify_interval: notify,
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = GrpcProxy::start(&cluster.endpoints()).await.unwrap();
    let w = writer(cluster.endpoints()).await;
    let mirror = start(vec![proxy.endpoint()], mirror_config()).await;
    let r = put(&w, &format!("{P}a"), "1").await;
    mirror.snapshot_at_least(r, WAIT).await.unwrap();
    (cluster, proxy, w, mirror)
}

/// Behind etcd 3.4's grpc-proxy, which ignores progress requests, the mirror reaches
/// revisions outside its prefix through etcd's periodic progress notifications (which
/// the proxy passes on), without a stall reconnect: the reason the README asks for
/// `--experimental-watch-progress-notify-interval` below the stall timeout there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_revisions_through_grpc_proxy_come_from_progress_notifications() {
    bounded(Duration::from_secs(90), async {
        let notify = Some(Duration::from_secs(1));
        let (_cluster, _proxy, w, mirror) = mirror_behind_grpc_proxy(notify).await;
        for _ in 0..3 {
            let quiet = put(&w, "elsewhere/x", "y").await;
            let snap = mirror.snapshot_at_least(quiet, WAIT).await.unwrap();
            assert!(snap.revision() >= quiet);
        }
        let st = mirror.status();
        assert!(st.reconnects.is_empty(), "{st:?}");
        assert_eq!(st.unanswered_progress_stalls, 0);
        assert_converged(&mirror, &w).await;
    })
    .await;
}

/// Without etcd's progress notifications, a quiet stream behind the grpc-proxy stalls:
/// the stall is counted as one whose progress requests went unanswered, and its message
/// names the cause and the etcd flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_progress_behind_grpc_proxy_is_explained() {
    bounded(Duration::from_secs(90), async {
        let (_cluster, _proxy, w, mirror) = mirror_behind_grpc_proxy(None).await;
        // The stall's error lasts until the next stream is created: watch for it.
        let mut changes = mirror.status_changes();
        let explained = |st: &revwatch::mirror::Status| {
            st.last_error.as_ref().is_some_and(|e| {
                e.message.contains("grpc-proxy")
                    && e.message
                        .contains("--experimental-watch-progress-notify-interval")
            })
        };
        let st = tokio::time::timeout(WAIT, changes.wait_for(explained))
            .await
            .unwrap_or_else(|_| panic!("no explained stall: {:?}", mirror.status()))
            .unwrap()
            .clone();
        assert!(st.unanswered_progress_stalls >= 1, "{st:?}");
        // Still correct, just not told about quiet revisions: changes in the prefix flow.
        let r = put(&w, &format!("{P}b"), "2").await;
        mirror.snapshot_at_least(r, WAIT).await.unwrap();
        assert_converged(&mirror, &w).await;
    })
    .await;
}

/// A direct connection to etcd that goes silent right after the watch was created
/// answers no progress request either, like a grpc-proxy; but the stall's probe read
/// on the same connection goes unanswered too, so the message says the connection
/// went silent, names no proxy, and the stall is not counted as one of ignored
/// progress requests. Once the network is back, the mirror converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_direct_connection_is_not_blamed_on_grpc_proxy() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        put(&etcd, &format!("{P}a"), "1").await;
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        // The first progress request goes out 2 s after the last reply: the
        // blackhole below comes long before, so none of them is answered.
        let config = mirror_config()
            .with_progress_interval(Duration::from_secs(2))
            .with_stall_timeout(Duration::from_secs(4));
        let mirror = start(vec![proxy.endpoint()], config).await;
        mirror.wait_ready().await.unwrap();
        let r = put(&etcd, &format!("{P}b"), "2").await;
        mirror.snapshot_at_least(r, WAIT).await.unwrap();
        let mut changes = mirror.status_changes();
        proxy.set(Fault::Blackhole);

        // The stall's error lasts until the next attempt fails: watch for it.
        let stalled = |st: &revwatch::mirror::Status| {
            st.last_error
                .as_ref()
                .is_some_and(|e| e.message.contains("nothing received"))
        };
        let st = tokio::time::timeout(WAIT, changes.wait_for(stalled))
            .await
            .unwrap_or_else(|_| panic!("no stall: {:?}", mirror.status()))
            .unwrap()
            .clone();
        let message = &st.last_error.as_ref().unwrap().message;
        assert!(!message.contains("grpc-proxy"), "{message}");
        assert!(!message.contains("--experimental"), "{message}");
        assert!(message.contains("progress request"), "{message}");
        assert!(message.contains("went silent"), "{message}");
        assert!(st.reconnects.contains_key(&ReconnectCause::Stall), "{st:?}");
        assert_eq!(st.unanswered_progress_stalls, 0, "{st:?}");

        proxy.heal();
        let r = put(&etcd, &format!("{P}c"), "3").await;
        mirror.snapshot_at_least(r, WAIT).await.unwrap();
        assert_eq!(mirror.status().unanswered_progress_stalls, 0);
        assert!(mirror.status().relists.is_empty());
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}
