//! Leases against a real single-member etcd: grant, keepalive, expiry, loss notification.

mod client_support;

use std::time::{Duration, Instant};

use client_support::{bounded, connect, get};
use revwatch::client::{Client, LeaseKeeper, LeaseLost, LeaseState, PutRequest};
use revwatch_testkit::etcd::EtcdCluster;

const LIMIT: Duration = Duration::from_secs(90);
/// Short, but above etcd's minimum TTL for the harness's election timeout.
const TTL: i64 = 3;

async fn put_with_lease(client: &Client, key: &str, lease: i64) {
    client
        .put(PutRequest {
            key: key.into(),
            value: "v".into(),
            lease,
            ..Default::default()
        })
        .await
        .expect("put with lease");
}

/// Polls until `key` is gone; returns how long that took.
async fn wait_gone(client: &Client, key: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    while get(client, key).await.is_some() {
        assert!(
            start.elapsed() < limit,
            "{key} still present after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn grant_time_to_live_and_revoke() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let grant = client.lease_grant(60).await.expect("grant");
        assert!(grant.id != 0 && grant.ttl == 60, "{grant:?}");
        put_with_lease(&client, "/lease/a", grant.id).await;

        let ttl = client
            .lease_time_to_live(grant.id, true)
            .await
            .expect("ttl");
        assert_eq!(ttl.granted_ttl, 60);
        assert!(ttl.ttl > 50 && ttl.ttl <= 60, "{ttl:?}");
        assert_eq!(ttl.keys, [b"/lease/a".to_vec()]);

        client.lease_revoke(grant.id).await.expect("revoke");
        assert_eq!(
            get(&client, "/lease/a").await,
            None,
            "revoke deletes attached keys"
        );
        let ttl = client
            .lease_time_to_live(grant.id, false)
            .await
            .expect("ttl");
        assert_eq!(ttl.ttl, -1, "unknown lease");
    })
    .await;
}

#[tokio::test]
async fn keeper_keeps_key_alive_beyond_ttl_then_expiry_deletes_it() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let keeper = LeaseKeeper::start(&client, TTL).await.expect("keeper");
        put_with_lease(&client, "/keep/k", keeper.id()).await;

        // Three TTLs later the key is still there because the keeper renewed it.
        tokio::time::sleep(Duration::from_secs(3 * TTL as u64)).await;
        assert!(
            get(&client, "/keep/k").await.is_some(),
            "key expired despite keepalive"
        );
        assert!(
            matches!(keeper.state(), LeaseState::Alive { ttl } if ttl > 0),
            "{:?}",
            keeper.state()
        );
        let ttl = client
            .lease_time_to_live(keeper.id(), false)
            .await
            .expect("ttl");
        assert!(ttl.ttl > 0, "{ttl:?}");

        // Stop renewing: the server expires the lease and deletes the key.
        keeper.stop();
        let took = wait_gone(&client, "/keep/k", Duration::from_secs(3 * TTL as u64)).await;
        println!("key vanished {took:?} after the keeper stopped");
    })
    .await;
}

#[tokio::test]
async fn keeper_revoke_deletes_keys_at_once() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let keeper = LeaseKeeper::start(&client, 30).await.expect("keeper");
        put_with_lease(&client, "/rev/k", keeper.id()).await;
        keeper.revoke().await.expect("revoke");
        assert_eq!(get(&client, "/rev/k").await, None);
    })
    .await;
}

#[tokio::test]
async fn owner_is_told_when_the_lease_is_revoked_elsewhere() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let mut keeper = LeaseKeeper::start(&client, TTL).await.expect("keeper");
        let mut events = keeper.subscribe();
        put_with_lease(&client, "/lost/k", keeper.id()).await;

        // Someone else revokes the lease: the next keepalive reply has TTL 0.
        client.lease_revoke(keeper.id()).await.expect("revoke");
        let started = Instant::now();
        let why = keeper.lost().await;
        assert_eq!(why, LeaseLost::Gone);
        // The next renewal is due within about TTL/3.
        assert!(
            started.elapsed() < Duration::from_secs(TTL as u64),
            "{:?}",
            started.elapsed()
        );
        events
            .wait_for(|s| *s == LeaseState::Lost(LeaseLost::Gone))
            .await
            .expect("subscriber sees the loss");
        assert_eq!(get(&client, "/lost/k").await, None);
    })
    .await;
}

#[tokio::test]
async fn owner_is_told_when_renewal_is_impossible() {
    bounded(LIMIT, async {
        let mut cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let mut keeper = LeaseKeeper::start(&client, TTL).await.expect("keeper");
        // With the only member down nothing can renew the lease; the keeper must
        // say so once the TTL has run out rather than retry silently forever.
        cluster.kill(0).expect("kill");
        let started = Instant::now();
        let why = keeper.lost().await;
        assert!(matches!(why, LeaseLost::NotRenewedInTime { .. }), "{why:?}");
        let waited = started.elapsed();
        assert!(waited <= Duration::from_secs(TTL as u64 + 1), "{waited:?}");
        println!("loss reported {waited:?} after the member died: {why:?}");
    })
    .await;
}
