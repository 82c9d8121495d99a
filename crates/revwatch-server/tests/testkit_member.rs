//! The testkit runs the embedded server as it runs an etcd member
//! (`ClusterOptions::embedded`), which is how the proof's soak puts it under
//! faults: a kill -9 and a restart on the same data dir keep every
//! acknowledged write, a frozen server answers nothing until thawed, and the
//! auto-compaction flags reach it.

use std::time::Duration;

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest, RangeResponse};
use revwatch_testkit::etcd::{ClusterOptions, CompactionMode, EmbeddedServer, EtcdCluster};

fn options() -> ClusterOptions {
    ClusterOptions {
        embedded: Some(EmbeddedServer {
            program: env!("CARGO_BIN_EXE_revwatch-server").into(),
            args: Vec::new(),
        }),
        ..ClusterOptions::default()
    }
}

async fn kv(cluster: &EtcdCluster) -> KvClient<tonic::transport::Channel> {
    KvClient::new(cluster.channel(0).await.expect("channel"))
}

async fn get(
    cluster: &EtcdCluster,
    key: &str,
    revision: i64,
) -> Result<RangeResponse, tonic::Status> {
    let request = RangeRequest {
        key: key.into(),
        revision,
        ..Default::default()
    };
    kv(cluster)
        .await
        .range(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn killed_frozen_and_restarted_like_an_etcd_member() {
    let mut cluster = EtcdCluster::start(options()).await.expect("start");
    let put = kv(&cluster)
        .await
        .put(PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .into_inner();
    let acked = put.header.expect("header").revision;

    cluster.kill(0).expect("kill -9");
    assert!(!cluster.is_running(0));
    cluster
        .restart(0)
        .await
        .expect("restart on the same data dir");
    let after = get(&cluster, "k", 0).await.expect("range after restart");
    assert_eq!(after.kvs.len(), 1, "the acknowledged put survived");
    assert_eq!(after.kvs[0].value, b"v");
    assert_eq!(after.kvs[0].mod_revision, acked);

    cluster.freeze(0).expect("freeze");
    let frozen = tokio::time::timeout(Duration::from_millis(500), get(&cluster, "k", 0)).await;
    assert!(frozen.is_err(), "a frozen server answered: {frozen:?}");
    cluster.thaw(0).expect("thaw");
    cluster
        .wait_healthy(Duration::from_secs(10))
        .await
        .expect("answers once thawed");
}

#[tokio::test]
async fn auto_compaction_flags_reach_the_server() {
    let cluster = EtcdCluster::start(ClusterOptions {
        auto_compaction_mode: CompactionMode::Periodic,
        auto_compaction_retention: Some("1s".into()),
        ..options()
    })
    .await
    .expect("start");
    let mut client = kv(&cluster).await;
    let put = |key: &str| PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let first = client.put(put("k0")).await.expect("put").into_inner();
    let first = first.header.expect("header").revision;
    // Periodic compaction with a 1 s retention compacts past the first put
    // within a few seconds; the old revision then reads as compacted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match get(&cluster, "k0", first).await {
            Err(status) if status.message().contains("compacted") => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "revision {first} still readable: {other:?}"
            ),
        }
        // Keep the revision moving, as the periodic compactor samples it.
        client.put(put("tick")).await.expect("put");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
