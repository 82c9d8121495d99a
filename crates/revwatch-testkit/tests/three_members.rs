//! A real 3-member etcd cluster: leader loss, re-election and rejoin.

use std::time::Duration;

use etcd_proto::etcdserverpb::PutRequest;
use etcd_proto::etcdserverpb::kv_client::KvClient;
use revwatch_testkit::etcd::EtcdCluster;

#[tokio::test]
async fn killing_the_leader_elects_another_and_it_rejoins() {
    let mut cluster = EtcdCluster::three().await.expect("start 3 members");
    assert_eq!(cluster.len(), 3);
    let ids: Vec<u64> = (0..3).map(|i| cluster.member_id(i)).collect();
    assert!(ids.iter().all(|&id| id != 0), "{ids:x?}");
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

    let old = cluster.leader().await.expect("leader");
    // Every member agrees on who leads.
    for i in 0..3 {
        let status = cluster.status(i).await.expect("status");
        assert_eq!(status.leader, ids[old], "member {i}");
    }

    cluster.kill(old).expect("kill leader");
    let new = cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .expect("a new leader within 15s");
    assert_ne!(new, old);

    // The survivors have a quorum: writes go through a follower too.
    let follower = (0..3)
        .find(|&i| i != old && i != new)
        .expect("a third member");
    let mut kv = KvClient::new(cluster.channel(follower).await.expect("channel"));
    let rev = kv
        .put(PutRequest {
            key: b"/after-failover".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put with 2 of 3 members")
        .into_inner()
        .header
        .expect("header")
        .revision;

    cluster.restart(old).await.expect("restart the old leader");
    cluster
        .wait_healthy(Duration::from_secs(15))
        .await
        .expect("all 3 healthy");
    assert_eq!(cluster.member_id(old), ids[old], "same data dir, same id");
    // The rejoined member has caught up with the write it missed.
    let mut kv = KvClient::new(cluster.channel(old).await.expect("channel"));
    let resp = kv
        .range(etcd_proto::etcdserverpb::RangeRequest {
            key: b"/after-failover".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range on the rejoined member")
        .into_inner();
    assert_eq!(resp.kvs.len(), 1);
    assert_eq!(resp.kvs[0].mod_revision, rev);
}

#[tokio::test]
async fn a_frozen_leader_is_replaced() {
    let mut cluster = EtcdCluster::three().await.expect("start 3 members");
    let old = cluster.leader().await.expect("leader");
    cluster.freeze(old).expect("freeze leader");
    let new = cluster
        .wait_for_leader(Duration::from_secs(15))
        .await
        .expect("a new leader within 15s");
    assert_ne!(new, old);
    cluster.thaw(old).expect("thaw");
    cluster
        .wait_healthy(Duration::from_secs(15))
        .await
        .expect("the thawed member rejoins");
    // The thawed ex-leader learns the new term and steps down.
    let leader = cluster
        .wait_for_leader(Duration::from_secs(5))
        .await
        .expect("leader");
    let status = cluster.status(old).await.expect("status");
    assert_eq!(status.leader, cluster.member_id(leader));
}
