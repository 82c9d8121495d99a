//! Fault hooks (built with `--features fault-injection`): each fault does what it says, and
//! the server recovers when it is lifted.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{TestServer, WatchConn, connect};
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest};

const WAIT: Duration = Duration::from_secs(10);

fn put_req(key: &str) -> PutRequest {
    PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

fn watch_all() -> WatchCreateRequest {
    WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_watch_streams_ends_them_with_unavailable() -> Result<()> {
    let s = TestServer::start().await?;
    let mut c = connect(&s.endpoint()).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(watch_all()).await?;
    ensure!(w.expect(WAIT).await?.created);
    s.server().faults().drop_watch_streams();
    let err = w.expect(WAIT).await.expect_err("stream must fail");
    let status = err
        .downcast_ref::<tonic::Status>()
        .context("a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::Unavailable);
    // New streams work.
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(watch_all()).await?;
    ensure!(w.expect(WAIT).await?.created);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_holds_replies_then_delivers_in_order() -> Result<()> {
    let s = TestServer::start().await?;
    let mut c = connect(&s.endpoint()).await?;
    let mut stalled = WatchConn::open(&mut c.watch).await?;
    stalled.create(watch_all()).await?;
    ensure!(stalled.expect(WAIT).await?.created);
    let mut free = WatchConn::open(&mut c.watch).await?;
    free.create(watch_all()).await?;
    ensure!(free.expect(WAIT).await?.created);
    let streams = s.server().faults().watch_streams();
    ensure!(streams.len() == 2 && streams.iter().all(|s| s.watchers.len() == 1));
    s.server()
        .faults()
        .stall_watch_stream(streams[0].stream_id, Duration::from_millis(1500));
    for k in ["a", "b"] {
        c.kv.put(put_req(k)).await?;
    }
    // The other stream is unaffected.
    ensure!(free.expect(WAIT).await?.events.len() == 1);
    ensure!(
        stalled.next(Duration::from_millis(800)).await?.is_none(),
        "stalled stream sent"
    );
    let first = stalled.expect(WAIT).await?;
    let second = stalled.expect(WAIT).await?;
    let key = |m: &etcd_proto::etcdserverpb::WatchResponse| {
        m.events[0].kv.clone().unwrap_or_default().key
    };
    assert_eq!((key(&first), key(&second)), (b"a".to_vec(), b"b".to_vec()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_progress_arrives_after_later_events() -> Result<()> {
    let s = TestServer::start().await?;
    let mut c = connect(&s.endpoint()).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(watch_all()).await?;
    ensure!(w.expect(WAIT).await?.created);
    s.server()
        .faults()
        .delay_progress(Some(Duration::from_millis(800)));
    w.progress().await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.kv.put(put_req("k")).await?;
    let event = w.expect(WAIT).await?;
    ensure!(event.events.len() == 1, "event first: {event:?}");
    let progress = w.expect(WAIT).await?;
    ensure!(progress.watch_id == -1 && progress.events.is_empty());
    let (p, e) = (
        progress.header.context("header")?.revision,
        event.header.context("header")?.revision,
    );
    ensure!(p < e, "progress {p} should predate event {e}");
    s.server().faults().delay_progress(None);
    w.progress().await?;
    let m = w.expect(WAIT).await?;
    ensure!(m.watch_id == -1 && m.header.context("header")?.revision == e);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_recover() -> Result<()> {
    let s = TestServer::start().await?;
    let mut existing = connect(&s.endpoint()).await?;
    existing.kv.put(put_req("before")).await?;
    s.server().faults().refuse_connections(true);
    let refused = tokio::time::timeout(WAIT, async {
        match connect(&s.endpoint()).await {
            Err(_) => true,
            Ok(mut c) => c.kv.put(put_req("x")).await.is_err(),
        }
    })
    .await?;
    ensure!(refused, "a new connection got through");
    // Established connections keep working.
    existing.kv.put(put_req("during")).await?;
    s.server().faults().refuse_connections(false);
    let mut c = connect(&s.endpoint()).await?;
    c.kv.put(put_req("after")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_compaction_and_lagging_reads() -> Result<()> {
    let s = TestServer::start().await?;
    let mut c = connect(&s.endpoint()).await?;
    for k in ["a", "b", "c", "d"] {
        c.kv.put(put_req(k)).await?;
    }
    // Revision 5 now. Compact at 3 behind the clients' backs.
    let compacted = s.server().faults().force_compaction(Some(3)).await?;
    ensure!(compacted == 3);
    let err =
        c.kv.range(RangeRequest {
            key: b"a".to_vec(),
            revision: 2,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );

    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(watch_all()).await?;
    ensure!(w.expect(WAIT).await?.created);
    s.server().faults().lag_reads(2);
    c.kv.put(put_req("e")).await?; // revision 6, visible as 4
    let all = || RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    let r = c.kv.range(all()).await?.into_inner();
    ensure!(
        r.header.context("header")?.revision == 4 && r.kvs.len() == 3,
        "{r:?}"
    );
    ensure!(
        w.next(Duration::from_millis(500)).await?.is_none(),
        "lagging member sent an event"
    );
    s.server().faults().lag_reads(0);
    let m = w.expect(WAIT).await?;
    ensure!(m.events[0].kv.clone().unwrap_or_default().key == b"e");
    let r = c.kv.range(all()).await?.into_inner();
    ensure!(r.header.context("header")?.revision == 6 && r.kvs.len() == 5);
    Ok(())
}
