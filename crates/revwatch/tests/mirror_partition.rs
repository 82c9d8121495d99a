//! The mirror on a member that a real partition cuts off from its peers (the
//! testkit routes peer traffic through per-link proxies), while its client
//! port stays reachable. The require-leader watch must fail there and the
//! mirror move to the majority; every delivered update is compared with
//! etcd's own history: no loss, no repeat, no relist.

mod mirror_support;

use std::time::{Duration, Instant};

use mirror_support::setup::{
    P, WAIT, assert_converged, bounded, client_config, followed_mirror, mirror_config, put, writer,
};
use mirror_support::{Kvs, Replay, truth};
use revwatch::client::{Client, PutRequest};
use revwatch::mirror::{ClientSource, Mirror, ReconnectCause};
use revwatch_testkit::etcd::{EtcdCluster, PeerCut};

/// The cut-off member's role when the partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Follower,
    Leader,
}

/// How long the isolated member may keep the mirror: etcd cancels
/// require-leader watches after 3 election timeouts without a leader (3-4 s
/// here), then the mirror resumes elsewhere.
const DETECTION_BOUND: Duration = Duration::from_secs(30);

/// Index of the member whose client endpoint is `endpoint`.
fn member_of(cluster: &EtcdCluster, endpoint: &str) -> usize {
    (0..cluster.len())
        .find(|&i| endpoint.contains(&cluster.client_addr(i).to_string()))
        .unwrap_or_else(|| panic!("{endpoint} is no member's client endpoint"))
}

/// The member the mirror's watch stream is on.
fn watched_member(cluster: &EtcdCluster, mirror: &Mirror) -> Option<usize> {
    let endpoint = mirror.status().endpoint?;
    Some(member_of(cluster, &endpoint))
}

/// A put that may fail (elections under way): its outcome is unknown, so the
/// checks below rely on etcd's history, not on what was acknowledged.
async fn try_put(c: &Client, key: String) -> Option<i64> {
    let resp = c
        .put(PutRequest {
            key: key.into_bytes(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .ok()?;
    Some(resp.header?.revision)
}

/// Puts until one is acknowledged (elections may fail some, whose outcome is
/// then unknown); returns its revision.
async fn put_retrying(c: &Client, key: String) -> i64 {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(revision) = try_put(c, key.clone()).await {
            return revision;
        }
        assert!(Instant::now() < deadline, "no put on {key} succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every delivered state equals etcd's at its revision, and the batches are
/// exactly the revisions in `(from, to]` at which the prefix changed.
async fn assert_exact_history(replay: &Replay, truth_src: &ClientSource, from: i64, to: i64) {
    for (revision, state) in &replay.snapshots {
        assert_eq!(
            *state,
            truth(truth_src, P.as_bytes(), *revision).await,
            "delivered state differs from etcd at {revision}"
        );
    }
    let mut changes = Vec::new();
    let mut previous: Kvs = truth(truth_src, P.as_bytes(), from).await;
    for revision in from + 1..=to {
        let state = truth(truth_src, P.as_bytes(), revision).await;
        if state != previous {
            changes.push((revision, false));
        }
        previous = state;
    }
    assert!(!changes.is_empty());
    let delivered: Vec<(i64, bool)> = replay
        .batches
        .iter()
        .copied()
        .filter(|&(r, _)| r <= to)
        .collect();
    assert_eq!(
        delivered, changes,
        "batches (revision, resync) differ from etcd's history"
    );
}

async fn mirror_leaves_a_partitioned_member(role: Role) {
    let cluster = EtcdCluster::three_partitionable()
        .await
        .expect("start 3 members with peer links");
    let all = writer(cluster.endpoints()).await;
    for i in 0..5 {
        put(&all, &format!("{P}seed/{i}"), "s").await;
    }
    let (mirror, mut sub, _) = followed_mirror(cluster.endpoints(), mirror_config()).await;
    let mut replay = Replay::keeping_snapshots();
    let x = watched_member(&cluster, &mirror).expect("a ready mirror watches some member");

    // Give the watched member the role under test.
    let leader = cluster.wait_for_leader(WAIT).await.unwrap();
    match role {
        Role::Leader => cluster.move_leader(x, WAIT).await.unwrap(),
        Role::Follower if leader == x => cluster.move_leader((x + 1) % 3, WAIT).await.unwrap(),
        Role::Follower => {}
    }
    let r = put(&all, &format!("{P}before"), "b").await;
    replay.follow_until(&mut sub, r, WAIT).await;
    let from = replay
        .snapshots
        .first()
        .map(|(rev, _)| *rev)
        .expect("the subscription starts with a snapshot");
    assert_eq!(
        watched_member(&cluster, &mirror),
        Some(x),
        "the leadership move kept the watch where it was"
    );

    // Writers and truth reach the majority only.
    let majority: Vec<String> = (0..3)
        .filter(|&i| i != x)
        .map(|i| cluster.endpoint(i))
        .collect();
    let w = Client::connect(client_config(majority)).await.unwrap();
    cluster.isolate(x, PeerCut::Blackhole).unwrap();

    // Writes go on through the majority (once it has a leader) until the
    // mirror's watch has left the cut-off member.
    let cut_at = Instant::now();
    let mut i = 0;
    while watched_member(&cluster, &mirror).is_none_or(|m| m == x) {
        assert!(
            cut_at.elapsed() < DETECTION_BOUND,
            "the mirror stayed on the partitioned member: {:?}",
            mirror.status()
        );
        try_put(&w, format!("{P}during/{}", i % 7)).await;
        if i % 3 == 0 {
            try_put(&w, format!("other/{i}")).await;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = mirror.status();
    let detected = [
        ReconnectCause::Canceled,
        ReconnectCause::StreamError,
        ReconnectCause::StreamClosed,
        ReconnectCause::Stall,
    ];
    assert!(
        detected.iter().any(|c| st.reconnects.contains_key(c)),
        "moved without a recorded reconnect: {st:?}"
    );

    // On the majority, the mirror follows new writes while X is still cut off.
    let mut last = 0;
    for j in 0..10 {
        last = put_retrying(&w, format!("{P}after/{j}")).await;
    }
    replay.follow_until(&mut sub, last, WAIT).await;
    let truth_src = ClientSource::new(w.clone());
    assert_exact_history(&replay, &truth_src, from, last).await;
    assert_eq!(replay.resyncs, 0);
    assert!(mirror.status().relists.is_empty(), "{:?}", mirror.status());
    assert_converged(&mirror, &w).await;

    // Healed, the cluster is whole again and the mirror still exact.
    cluster.heal_peers().unwrap();
    cluster.wait_healthy(WAIT).await.unwrap();
    // The healed member's term may force an election: retry through it.
    let healed = put_retrying(&all, format!("{P}healed")).await;
    replay.follow_until(&mut sub, healed, WAIT).await;
    assert_exact_history(&replay, &truth_src, from, healed).await;
    assert!(mirror.status().relists.is_empty(), "{:?}", mirror.status());
    assert_converged(&mirror, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_leaves_a_partitioned_follower() {
    bounded(
        Duration::from_secs(150),
        mirror_leaves_a_partitioned_member(Role::Follower),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_leaves_a_partitioned_leader() {
    bounded(
        Duration::from_secs(150),
        mirror_leaves_a_partitioned_member(Role::Leader),
    )
    .await;
}
