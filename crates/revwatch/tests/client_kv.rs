//! The client against a real single-member etcd: KV, txn, compaction, watch.

mod client_support;

use std::time::Duration;

use client_support::{bounded, connect, get, put};
use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::request_op::Request as Op;
use etcd_proto::etcdserverpb::response_op::Response as OpResponse;
use etcd_proto::mvccpb::event::EventType;
use revwatch::client::{
    Client, ClientConfig, CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest,
    RequestOp, TxnRequest, WatchCreateRequest,
};
use revwatch_testkit::etcd::EtcdCluster;
use revwatch_testkit::grpc_proxy::GrpcProxy;

const LIMIT: Duration = Duration::from_secs(60);

/// The range end that selects every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Test prefixes are ASCII, so the last byte is never 0xff.
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

#[tokio::test]
async fn put_get_and_delete_range() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;

        let r1 = put(&client, "/kv/a", "1").await;
        let r2 = put(&client, "/kv/a", "2").await;
        assert_eq!(r2, r1 + 1);
        assert_eq!(get(&client, "/kv/a").await.as_deref(), Some(&b"2"[..]));
        assert_eq!(get(&client, "/kv/missing").await, None);

        // A put with prev_kv returns the old value.
        let resp = client
            .put(PutRequest {
                key: "/kv/a".into(),
                value: "3".into(),
                prev_kv: true,
                ..Default::default()
            })
            .await
            .expect("put");
        assert_eq!(resp.prev_kv.expect("prev_kv").value, b"2");

        put(&client, "/kv/b", "x").await;
        put(&client, "/kv/c", "y").await;
        put(&client, "/other", "z").await;
        let del = client
            .delete_range(DeleteRangeRequest {
                key: "/kv/".into(),
                range_end: prefix_end("/kv/"),
                prev_kv: true,
            })
            .await
            .expect("delete_range");
        assert_eq!(del.deleted, 3);
        let deleted: Vec<_> = del.prev_kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(
            deleted,
            [b"/kv/a".to_vec(), b"/kv/b".to_vec(), b"/kv/c".to_vec()]
        );
        assert_eq!(get(&client, "/kv/b").await, None);
        assert_eq!(get(&client, "/other").await.as_deref(), Some(&b"z"[..]));
    })
    .await;
}

#[tokio::test]
async fn paginated_range_follows_more() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let keys: Vec<String> = (0..25).map(|i| format!("/page/{i:03}")).collect();
        for k in &keys {
            put(&client, k, "v").await;
        }
        // A write after the pages start must not show up: pages are read at a pinned revision.
        let end = prefix_end("/page/");
        let mut next_key = b"/page/".to_vec();
        let mut revision = 0;
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let resp = client
                .range(RangeRequest {
                    key: next_key.clone(),
                    range_end: end.clone(),
                    limit: 10,
                    revision,
                    ..Default::default()
                })
                .await
                .expect("range page");
            pages += 1;
            if revision == 0 {
                revision = resp.header.expect("header").revision;
                put(&client, "/page/999-late", "v").await;
            }
            assert!(resp.kvs.len() <= 10);
            seen.extend(
                resp.kvs
                    .iter()
                    .map(|kv| String::from_utf8_lossy(&kv.key).into_owned()),
            );
            if !resp.more {
                break;
            }
            // Continue right after the last key of this page.
            next_key = resp
                .kvs
                .last()
                .expect("a page with more has keys")
                .key
                .clone();
            next_key.push(0);
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, keys);
    })
    .await;
}

#[tokio::test]
async fn txn_takes_success_and_failure_branches() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let rev = put(&client, "/txn/k", "v1").await;

        let txn = |expected_mod: i64| TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: "/txn/k".into(),
                target_union: Some(TargetUnion::ModRevision(expected_mod)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: "/txn/k".into(),
                    value: format!("after-{expected_mod}").into(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(Op::RequestRange(RangeRequest {
                    key: "/txn/k".into(),
                    ..Default::default()
                })),
            }],
        };

        let ok = client.txn(txn(rev)).await.expect("txn");
        assert!(ok.succeeded);
        assert_eq!(ok.header.expect("header").revision, rev + 1);
        assert!(matches!(
            ok.responses[0].response,
            Some(OpResponse::ResponsePut(_))
        ));

        // The key moved on, so the same compare now fails and the read runs instead.
        let failed = client.txn(txn(rev)).await.expect("txn");
        assert!(!failed.succeeded);
        assert_eq!(failed.header.expect("header").revision, rev + 1);
        let Some(OpResponse::ResponseRange(range)) = &failed.responses[0].response else {
            panic!("expected a range response, got {:?}", failed.responses);
        };
        assert_eq!(range.kvs[0].value, format!("after-{rev}").as_bytes());
    })
    .await;
}

#[tokio::test]
async fn compaction_makes_old_revisions_unreadable() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        compaction_errors_are_typed(&connect(&cluster).await).await;
    })
    .await;
}

/// etcd grpc-proxy relays etcd's errors with other gRPC codes; they must still be
/// recognised, or a mirror behind a proxy could never see that it must relist.
#[tokio::test]
async fn compaction_errors_are_typed_through_grpc_proxy() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let proxy = GrpcProxy::start(&cluster.endpoints())
            .await
            .expect("start grpc-proxy");
        let client = Client::connect(ClientConfig::new([proxy.endpoint()]))
            .await
            .expect("connect through the proxy");
        compaction_errors_are_typed(&client).await;
    })
    .await;
}

async fn compaction_errors_are_typed(client: &Client) {
    let old = put(client, "/c/k", "old").await;
    let newer = put(client, "/c/k", "new").await;

    let at = |revision| RangeRequest {
        key: "/c/k".into(),
        revision,
        ..Default::default()
    };
    let before = client.range(at(old)).await.expect("range at old revision");
    assert_eq!(before.kvs[0].value, b"old");

    client
        .compact(CompactionRequest {
            revision: newer,
            physical: true,
        })
        .await
        .expect("compact");

    let err = client
        .range(at(old))
        .await
        .expect_err("old revision is compacted");
    assert!(err.is_compacted(), "{err:?}");
    assert!(!err.is_retryable());
    let current = client
        .range(at(newer))
        .await
        .expect("compaction revision itself");
    assert_eq!(current.kvs[0].value, b"new");

    let err = client
        .range(at(newer + 100))
        .await
        .expect_err("future revision");
    assert!(err.is_future_revision(), "{err:?}");

    // Compacting again at or below the compaction revision is refused.
    let err = client
        .compact(CompactionRequest {
            revision: newer,
            physical: false,
        })
        .await
        .expect_err("second compaction");
    assert!(err.is_compacted(), "{err:?}");
}

#[tokio::test]
async fn watch_receives_a_put() {
    bounded(LIMIT, async {
        let cluster = EtcdCluster::single().await.expect("start etcd");
        let client = connect(&cluster).await;
        let mut stream = client
            .watch(WatchCreateRequest {
                key: "/w/".into(),
                range_end: prefix_end("/w/"),
                ..Default::default()
            })
            .await
            .expect("watch");
        assert_eq!(
            stream.endpoint(),
            cluster.endpoint(0).trim_start_matches("http://")
        );

        let created = stream
            .message()
            .await
            .expect("created")
            .expect("open stream");
        assert!(created.created && !created.canceled, "{created:?}");
        let watch_id = created.watch_id;

        let rev = put(&client, "/w/key", "hello").await;
        put(&client, "/outside", "ignored").await;
        let resp = stream.message().await.expect("event").expect("open stream");
        assert_eq!(resp.watch_id, watch_id);
        assert_eq!(resp.events.len(), 1);
        let ev = &resp.events[0];
        assert_eq!(ev.r#type, EventType::Put as i32);
        let kv = ev.kv.as_ref().expect("kv");
        assert_eq!(
            (kv.key.as_slice(), kv.value.as_slice(), kv.mod_revision),
            (&b"/w/key"[..], &b"hello"[..], rev)
        );

        // Progress requests are answered on the same stream, also from a cloned sender.
        stream
            .progress_sender()
            .request_progress()
            .await
            .expect("progress request");
        let progress = stream
            .message()
            .await
            .expect("progress")
            .expect("open stream");
        assert_eq!(progress.watch_id, -1, "{progress:?}");
        assert!(progress.events.is_empty());
        assert_eq!(progress.header.expect("header").revision, rev + 1);
    })
    .await;
}
