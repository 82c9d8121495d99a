//! Real partitions: 3-member clusters whose peer traffic runs through per-link
//! fault proxies. A member cut off from its peers keeps serving clients but
//! loses (or gives up) leadership; the majority goes on; healing rejoins it.

use std::time::Duration;

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
use revwatch_testkit::etcd::{EtcdCluster, PeerCut};
use revwatch_testkit::proxy::Fault;
use tokio::time::{Instant, sleep};

/// Bound on every wait below: elections take 1-2 election timeouts (1 s).
const WAIT: Duration = Duration::from_secs(20);

async fn put(cluster: &EtcdCluster, member: usize, key: &str) -> i64 {
    let mut kv = KvClient::new(cluster.channel(member).await.expect("channel"));
    let resp = tokio::time::timeout(
        WAIT,
        kv.put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("put answered in time")
    .expect("put");
    resp.into_inner().header.expect("header").revision
}

/// The key's mod revision in member `i`'s own store (a serializable read,
/// which needs no leader), or `None`.
async fn local_mod_revision(cluster: &EtcdCluster, i: usize, key: &str) -> Option<i64> {
    let mut kv = KvClient::new(cluster.channel(i).await.expect("channel"));
    let resp = kv
        .range(RangeRequest {
            key: key.as_bytes().to_vec(),
            serializable: true,
            ..Default::default()
        })
        .await
        .expect("serializable range")
        .into_inner();
    resp.kvs.first().map(|kv| kv.mod_revision)
}

/// Polls `check` every 100 ms until it holds, failing the test after [`WAIT`].
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut check: F) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        sleep(Duration::from_millis(100)).await;
    }
}

/// The leader member `i` believes in (0: none), from its own Status.
async fn seen_leader(cluster: &EtcdCluster, i: usize) -> u64 {
    cluster.status(i).await.expect("status").leader
}

#[tokio::test]
async fn peers_reach_each_other_only_through_their_links() {
    let cluster = EtcdCluster::three_partitionable()
        .await
        .expect("start 3 members with peer links");
    let rev = put(&cluster, 0, "/k").await;
    for i in 0..3 {
        eventually("the write replicates", async || {
            local_mod_revision(&cluster, i, "/k").await == Some(rev)
        })
        .await;
    }
    for from in 0..3 {
        for to in (0..3).filter(|&to| to != from) {
            let n = cluster.peer_link_connections(from, to).expect("link");
            assert!(n > 0, "member {from} never dialed {to} through its link");
            assert_eq!(cluster.peer_link(from, to).expect("link"), Fault::None);
        }
    }
    assert!(cluster.set_peer_link(0, 3, Fault::Blackhole).is_err());

    // Without peer links, there is nothing to fault.
    let plain = EtcdCluster::single().await.expect("single member");
    assert!(plain.isolate(0, PeerCut::Blackhole).is_err());
}

#[tokio::test]
async fn an_isolated_follower_loses_its_leader_but_serves_clients_and_rejoins() {
    let cluster = EtcdCluster::three_partitionable()
        .await
        .expect("start 3 members with peer links");
    let leader = cluster.wait_for_leader(WAIT).await.expect("leader");
    let follower = (leader + 1) % 3;
    let before = put(&cluster, leader, "/before").await;
    eventually("the follower has the first write", async || {
        local_mod_revision(&cluster, follower, "/before").await == Some(before)
    })
    .await;

    cluster
        .isolate(follower, PeerCut::Blackhole)
        .expect("isolate");
    eventually("the isolated follower sees no leader", async || {
        seen_leader(&cluster, follower).await == 0
    })
    .await;
    // The majority goes on; the isolated member still answers its clients,
    // from a store that no longer moves.
    let during = put(&cluster, leader, "/during").await;
    let third = 3 - leader - follower;
    eventually("the other follower has the write", async || {
        local_mod_revision(&cluster, third, "/during").await == Some(during)
    })
    .await;
    assert_eq!(
        local_mod_revision(&cluster, follower, "/during").await,
        None
    );
    assert_eq!(
        local_mod_revision(&cluster, follower, "/before").await,
        Some(before)
    );

    cluster.heal_peers().expect("heal");
    eventually("the healed member catches up", async || {
        local_mod_revision(&cluster, follower, "/during").await == Some(during)
    })
    .await;
    eventually("the healed member follows a leader", async || {
        seen_leader(&cluster, follower).await != 0
    })
    .await;
}

#[tokio::test]
async fn an_isolated_leader_steps_down_and_the_majority_elects_another() {
    let cluster = EtcdCluster::three_partitionable()
        .await
        .expect("start 3 members with peer links");
    // Whoever leads first, member 2 leads when the partition starts.
    let old = 2;
    cluster
        .move_leader(old, WAIT)
        .await
        .expect("move the leader");
    assert_eq!(cluster.leader().await.expect("leader"), old);
    let old_id = cluster.member_id(old);

    cluster.isolate(old, PeerCut::Reset).expect("isolate");
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let mut new = None;
    eventually("the majority elects another leader", async || {
        for &i in &others {
            let status = cluster.status(i).await.expect("status");
            let own = status.header.expect("header").member_id;
            if status.leader == own {
                new = Some(i);
                return true;
            }
        }
        false
    })
    .await;
    let new = new.expect("a new leader");
    // Check-quorum: the cut-off leader gives up leadership by itself.
    eventually("the isolated leader steps down", async || {
        seen_leader(&cluster, old).await != old_id
    })
    .await;
    let during = put(&cluster, new, "/during").await;
    assert_eq!(local_mod_revision(&cluster, old, "/during").await, None);

    cluster.heal_peers().expect("heal");
    eventually("the old leader catches up", async || {
        local_mod_revision(&cluster, old, "/during").await == Some(during)
    })
    .await;
    let leader = cluster.wait_for_leader(WAIT).await.expect("leader");
    eventually("the old leader follows the current leader", async || {
        seen_leader(&cluster, old).await == cluster.member_id(leader)
    })
    .await;
}

#[tokio::test]
async fn cutting_the_followers_apart_leaves_the_cluster_whole() {
    let cluster = EtcdCluster::three_partitionable()
        .await
        .expect("start 3 members with peer links");
    let leader = cluster.wait_for_leader(WAIT).await.expect("leader");
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    // Followers never need each other: with both links between them cut,
    // the leader still replicates to both and nobody calls an election.
    cluster.set_peer_link(a, b, Fault::Blackhole).expect("cut");
    cluster.set_peer_link(b, a, Fault::Blackhole).expect("cut");
    assert_eq!(cluster.peer_link(a, leader).expect("link"), Fault::None);
    let term = cluster.status(leader).await.expect("status").raft_term;
    let rev = put(&cluster, leader, "/cut").await;
    for i in [a, b] {
        eventually("both followers receive the write", async || {
            local_mod_revision(&cluster, i, "/cut").await == Some(rev)
        })
        .await;
    }
    let status = cluster.status(leader).await.expect("status");
    assert_eq!(status.leader, cluster.member_id(leader));
    assert_eq!(status.raft_term, term);
    cluster.heal_peers().expect("heal");
    assert_eq!(cluster.peer_link(a, b).expect("link"), Fault::None);
}
