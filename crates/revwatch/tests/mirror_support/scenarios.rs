//! The mirror's integration scenarios, written once against a [`Target`]: a real
//! etcd (testkit) or the embedded server. Every scenario ends by comparing the
//! mirror's snapshot with the server's own range at the same revision, and checks
//! every subscriber update it collected (order, atomic batches, replay = snapshot).

use std::time::{Duration, Instant};

use revwatch::mirror::{ClientSource, DecodePolicy, FailureKind, ResyncReason, State};
use revwatch_testkit::proxy::{Fault, FaultProxy};

use super::setup::{
    P, Target, WAIT, assert_converged, assert_converged_utf8, assert_not_ready, delete, delete_op,
    mirror_config, put, put_bytes, put_lease, put_op, source, start, start_with, txn, writer,
};
use super::{Replay, truth};

/// One `#[tokio::test]` per scenario, each on a fresh target made by `target:`
/// and bounded by its limit in seconds. `name(secs);` runs the scenario `name`;
/// `name(secs) = scenario;` runs `scenario` under the test name `name`.
#[allow(unused_macros)] // Only the test crates that run scenarios use it.
macro_rules! scenario_tests {
    (target: $target:expr; $($name:ident($secs:literal) $(= $scenario:ident)?;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let limit = std::time::Duration::from_secs($secs);
                $crate::mirror_support::setup::bounded(limit, async {
                    #[allow(unused_mut)]
                    let mut target = $target;
                    $crate::mirror_support::scenarios::scenario_tests!(
                        @run target, $name $(, $scenario)?
                    );
                })
                .await;
            }
        )*
    };
    (@run $target:ident, $name:ident) => {
        $crate::mirror_support::scenarios::$name(&mut $target).await
    };
    (@run $target:ident, $name:ident, $scenario:ident) => {
        $crate::mirror_support::scenarios::$scenario(&mut $target).await
    };
}
#[allow(unused_imports)]
pub(crate) use scenario_tests;

/// The initial list spans several pages at one pinned revision while writes go on;
/// the watch then delivers every later write.
pub async fn initial_list_across_pages_while_writes_continue(target: &impl Target) {
    let etcd = writer(target.endpoints()).await;
    for i in 0..50 {
        put(&etcd, &format!("{P}{i:03}"), "initial").await;
    }
    let bg = {
        let etcd = etcd.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                put(&etcd, &format!("{P}{:03}", i % 60), &format!("w{i}")).await;
                if i % 7 == 0 {
                    put(&etcd, "other/x", "outside").await;
                }
            }
        })
    };
    let mirror = start(target.endpoints(), mirror_config()).await;
    let mut sub = mirror.subscribe();
    mirror.wait_ready().await.unwrap();
    bg.await.unwrap();
    let last = put(&etcd, &format!("{P}last"), "x").await;
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, last, WAIT).await;
    assert!(replay.batches.iter().filter(|(_, resync)| *resync).count() == 1);
    assert_converged(&mirror, &etcd).await;
}

/// A multi-key txn, and a lease expiry deleting several keys, each arrive as one
/// batch at one revision.
pub async fn txns_and_lease_expiry_arrive_atomically(target: &impl Target) {
    let etcd = writer(target.endpoints()).await;
    let mirror = start(target.endpoints(), mirror_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    let lease = etcd.lease_grant(2).await.unwrap().id;
    for i in 0..5 {
        put_lease(&etcd, &format!("{P}leased/{i}"), "l", lease).await;
    }
    let txn_rev = txn(
        &etcd,
        vec![
            put_op(&format!("{P}t/a"), "t"),
            put_op(&format!("{P}t/b"), "t"),
            put_op("other/t", "t"),
            delete_op(&format!("{P}leased/0")),
        ],
    )
    .await;
    let mut replay = Replay::keeping_snapshots();
    replay.follow_until(&mut sub, txn_rev, WAIT).await;
    // Lease expiry deletes the 4 remaining keys in one revision.
    let deadline = Instant::now() + WAIT;
    while mirror
        .snapshot()
        .with_prefix(format!("{P}leased/").as_bytes())
        .count()
        > 0
    {
        assert!(Instant::now() < deadline, "lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expiry_rev = mirror.snapshot().revision();
    replay.follow_until(&mut sub, expiry_rev, WAIT).await;
    let (_, state_at_txn) = replay
        .snapshots
        .iter()
        .find(|(r, _)| *r == txn_rev)
        .unwrap();
    assert!(state_at_txn.contains_key(format!("{P}t/a").as_bytes()));
    assert!(!state_at_txn.contains_key(format!("{P}leased/0").as_bytes()));
    let expiry_batch = replay.batches.last().unwrap();
    assert_eq!(*expiry_batch, (expiry_rev, false));
    assert_converged(&mirror, &etcd).await;
}

/// The server goes away and comes back on the same address and data: the watch
/// resumes at the next revision, without a relist.
pub async fn kill_and_restart_resumes_without_relist(target: &mut impl Target) {
    let etcd = writer(target.endpoints()).await;
    put(&etcd, &format!("{P}a"), "1").await;
    let mirror = start(target.endpoints(), mirror_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    target.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    target.restart().await;
    let etcd = writer(target.endpoints()).await;
    let r1 = put(&etcd, &format!("{P}b"), "2").await;
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, r1, WAIT).await;
    assert_eq!(replay.resyncs, 0);
    let st = mirror.status();
    assert!(st.relists.is_empty(), "{st:?}");
    assert!(st.reconnects.values().sum::<u64>() >= 1, "{st:?}");
    assert_converged(&mirror, &etcd).await;
}

/// While the mirror is cut off (through a fault proxy), keys change and history is
/// compacted past its revision: it relists once, with the exact diff.
pub async fn compaction_while_disconnected_relists_with_exact_diff(target: &impl Target) {
    let etcd = writer(target.endpoints()).await;
    for k in ["keep", "change", "gone"] {
        put(&etcd, &format!("{P}{k}"), "1").await;
    }
    let proxy = FaultProxy::start(target.client_addr()).await.unwrap();
    let mirror = start(vec![proxy.endpoint()], mirror_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    // Cut the mirror off: existing connections reset, new ones hang.
    proxy.set(Fault::Blackhole);
    proxy.reset_all();
    put(&etcd, &format!("{P}change"), "2").await;
    delete(&etcd, &format!("{P}gone")).await;
    let last = put(&etcd, &format!("{P}new"), "3").await;
    put(&etcd, "other/after", "x").await;
    target.compact(last + 1).await;
    proxy.heal();
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, last, WAIT).await;
    assert_eq!(replay.resyncs, 1, "{:?}", replay.batches);
    assert!(mirror.status().relists[&ResyncReason::Compacted] >= 1);
    assert_converged(&mirror, &etcd).await;
}

/// A mirror restarted with its snapshot file resumes from it without a relist; one
/// started while the server is down serves the file as Stale until it comes back.
pub async fn restart_from_persisted_snapshot_and_start_with_etcd_down(target: &mut impl Target) {
    let dir = tempfile::tempdir().unwrap();
    let config = mirror_config()
        .with_snapshot_file(dir.path().join("m.snap"))
        .with_snapshot_interval(Duration::from_millis(100));
    let etcd = writer(target.endpoints()).await;
    for i in 0..20 {
        put(&etcd, &format!("{P}{i}"), "v").await;
    }
    let saved = {
        let mirror = start(target.endpoints(), config.clone()).await;
        mirror.wait_ready().await.unwrap();
        let rev = mirror.snapshot().revision();
        // Let the rate-bounded writer catch up, then stop this mirror.
        tokio::time::sleep(Duration::from_millis(600)).await;
        rev
    };
    // Restart with the server up: resumes from the file, no relist. The server is
    // reached through a proxy that holds every byte until the file's revision has
    // been seen: on a fast server the watch would otherwise deliver `after` first.
    let after = put(&etcd, &format!("{P}after"), "x").await;
    {
        let proxy = FaultProxy::start(target.client_addr()).await.unwrap();
        proxy.set(Fault::Blackhole);
        let mirror = start(vec![proxy.endpoint()], config.clone()).await;
        assert_eq!(
            mirror.snapshot().revision(),
            saved,
            "served from the file at once"
        );
        let mut sub = mirror.subscribe();
        proxy.heal();
        let mut replay = Replay::default();
        replay.follow_until(&mut sub, after, WAIT).await;
        assert_eq!(replay.batches, vec![(after, false)]);
        assert!(mirror.status().relists.is_empty());
        assert_converged(&mirror, &etcd).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // Start with the server down: the file is served, Stale.
    target.stop().await;
    let mirror = start(target.endpoints(), config.clone()).await;
    assert_not_ready(&mirror, FailureKind::Unreachable).await;
    let st = mirror.status();
    assert_eq!(st.state, State::Stale);
    assert_eq!(st.revision, after);
    assert_eq!(st.loaded_snapshot.map(|f| f.revision), Some(after));
    assert_eq!(mirror.snapshot().len(), 21);
    target.restart().await;
    let etcd = writer(target.endpoints()).await;
    tokio::time::timeout(WAIT, async {
        while mirror.status().state != State::Ready {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert!(mirror.status().relists.is_empty());
    assert_converged(&mirror, &etcd).await;
}

/// A value that fails to decode is isolated (last good value kept, failure
/// reported) and the watch goes on.
pub async fn bad_value_is_isolated(target: &impl Target) {
    let etcd = writer(target.endpoints()).await;
    put(&etcd, &format!("{P}good"), "1").await;
    put(&etcd, &format!("{P}bad"), "2").await;
    let mirror = start_with(
        source(target.endpoints()),
        mirror_config().with_decode_policy(DecodePolicy::KeepLastGood),
        |b| b.decoder(|_k: &[u8], v: &[u8]| String::from_utf8(v.to_vec())),
    )
    .await;
    mirror.wait_ready().await.unwrap();
    let bad_rev = put_bytes(&etcd, &format!("{P}bad"), &[0xff, 0xfe]).await;
    let r = put(&etcd, &format!("{P}later"), "3").await;
    let snap = mirror.snapshot_at_least(r, WAIT).await.unwrap();
    assert_eq!(snap.get(format!("{P}bad").as_bytes()).unwrap().value, "2");
    assert_eq!(snap.get(format!("{P}later").as_bytes()).unwrap().value, "3");
    let st = mirror.status();
    assert_eq!(st.decode_failures.len(), 1);
    assert_eq!(st.decode_failures[0].revision, bad_rev);
    assert_eq!(st.state, State::Ready);
    // Apart from the isolated key, the mirror equals etcd.
    assert_converged_utf8(&mirror, &etcd, &[format!("{P}bad")]).await;
}

/// A subscriber that does not keep up is marked lagging and later receives one
/// resync diff, within its bounded buffer.
pub async fn slow_subscriber_is_resynced(target: &impl Target) {
    let etcd = writer(target.endpoints()).await;
    let mirror = start(
        target.endpoints(),
        mirror_config().with_subscriber_buffer(8),
    )
    .await;
    mirror.wait_ready().await.unwrap();
    let mut slow = mirror.subscribe();
    let mut last = 0;
    for i in 0..100 {
        last = put(&etcd, &format!("{P}{}", i % 9), &i.to_string()).await;
    }
    mirror.snapshot_at_least(last, WAIT).await.unwrap();
    assert!(slow.is_lagging());
    let mut replay = Replay::default();
    replay.follow_until(&mut slow, last, WAIT).await;
    assert_eq!(replay.resyncs, 1);
    assert!(replay.batches.len() <= 8 + 1);
    assert_eq!(
        replay.state,
        truth(&ClientSource::new(etcd.clone()), P.as_bytes(), last).await
    );
    assert_converged(&mirror, &etcd).await;
}
