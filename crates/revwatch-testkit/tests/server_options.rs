//! Options that change etcd's own behaviour: periodic auto-compaction and
//! watch progress notifications.

use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::watch_client::WatchClient;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use revwatch_testkit::etcd::{ClusterOptions, CompactionMode, EtcdCluster};
use tokio::time::timeout;
use tonic::Code;

#[tokio::test]
async fn periodic_auto_compaction_compacts_by_itself() {
    let cluster = EtcdCluster::start(ClusterOptions {
        auto_compaction_retention: Some("1s".into()),
        auto_compaction_mode: CompactionMode::Periodic,
        ..Default::default()
    })
    .await
    .expect("start etcd");
    let mut kv = KvClient::new(cluster.channel(0).await.expect("channel"));
    let mut first = 0;
    for i in 0..3 {
        let rev = kv
            .put(PutRequest {
                key: b"/auto".to_vec(),
                value: vec![i],
                ..Default::default()
            })
            .await
            .expect("put")
            .into_inner()
            .header
            .expect("header")
            .revision;
        if i == 0 {
            first = rev;
        }
    }
    // Keep writing so the compactor has newer revisions to compact up to.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        kv.put(PutRequest {
            key: b"/auto".to_vec(),
            value: b"tick".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put");
        let old = kv
            .range(RangeRequest {
                key: b"/auto".to_vec(),
                revision: first,
                ..Default::default()
            })
            .await;
        match old {
            Err(status) if status.code() == Code::OutOfRange => {
                assert!(status.message().contains("compacted"), "{status}");
                break;
            }
            Err(status) => panic!("unexpected error: {status}"),
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(_) => panic!("revision {first} still readable after 20s of 1s auto-compaction"),
        }
    }
}

#[tokio::test]
async fn progress_notify_interval_reaches_idle_watchers() {
    let cluster = EtcdCluster::start(ClusterOptions {
        progress_notify_interval: Some(Duration::from_millis(500)),
        ..Default::default()
    })
    .await
    .expect("start etcd");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"/idle".to_vec(),
            progress_notify: true,
            ..Default::default()
        })),
    })
    .await
    .expect("queue create");
    let mut stream = WatchClient::new(cluster.channel(0).await.expect("channel"))
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let created = stream.message().await.expect("created").expect("reply");
    assert!(created.created);
    let progress = timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a progress notification within 10s")
        .expect("stream ok")
        .expect("reply");
    assert!(
        !progress.created && progress.events.is_empty(),
        "{progress:?}"
    );
    assert_eq!(progress.watch_id, created.watch_id);
    assert!(progress.header.is_some_and(|h| h.revision >= 1));
    drop(tx);
}
