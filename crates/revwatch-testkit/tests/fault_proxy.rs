//! The TCP fault proxy, against a local echo server (exact byte-level
//! checks) and against real etcd (what a gRPC client sees).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::watch_client::WatchClient;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest, WatchCreateRequest, WatchRequest};
use revwatch_testkit::etcd::EtcdCluster;
use revwatch_testkit::proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::transport::Channel;

/// An echo server on a free port; aborted when the handle drops.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Echo { addr, task }
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[tokio::test]
async fn forwards_bytes_and_counts_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    assert_eq!(proxy.upstream(), echo.addr);
    assert_eq!(proxy.endpoint(), format!("http://{}", proxy.addr()));
    assert_eq!(proxy.fault(), Fault::None);
    let mut a = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut b = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut a, b"hello").await.expect("echo"), b"hello");
    assert_eq!(round_trip(&mut b, b"world").await.expect("echo"), b"world");
    assert_eq!(proxy.accepted_connections(), 2);
    assert_eq!(proxy.active_connections(), 2);

    // A clean close on one side is a clean close through the proxy.
    a.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).await.expect("EOF, not an error");
    assert!(rest.is_empty());
}

#[tokio::test]
async fn blackhole_holds_bytes_both_ways_until_healed() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(
        round_trip(&mut s, b"before").await.expect("echo"),
        b"before"
    );

    proxy.set(Fault::Blackhole);
    assert_eq!(proxy.fault(), Fault::Blackhole);
    let stalled = timeout(Duration::from_millis(500), round_trip(&mut s, b"during")).await;
    assert!(stalled.is_err(), "bytes passed a blackhole: {stalled:?}");
    // New connections are accepted but get nothing either.
    let mut fresh = TcpStream::connect(proxy.addr()).await.expect("connect");
    let stalled = timeout(Duration::from_millis(300), round_trip(&mut fresh, b"new")).await;
    assert!(
        stalled.is_err(),
        "bytes passed a blackhole on a new connection"
    );

    proxy.heal();
    // The held bytes arrive after healing; the connections survived.
    let mut buf = [0u8; 6];
    timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("held bytes delivered after heal")
        .expect("read");
    assert_eq!(&buf, b"during");
    assert_eq!(round_trip(&mut s, b"after").await.expect("echo"), b"after");
}

#[tokio::test]
async fn reset_all_sends_rst_and_new_connections_work() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    assert_eq!(round_trip(&mut s, b"ping").await.expect("echo"), b"ping");

    assert_eq!(proxy.reset_all(), 1);
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the reset arrives");
    let err = read.expect_err("a reset, not EOF or data");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");

    let mut s = TcpStream::connect(proxy.addr()).await.expect("reconnect");
    assert_eq!(round_trip(&mut s, b"again").await.expect("echo"), b"again");
    assert_eq!(proxy.accepted_connections(), 2);
}

#[tokio::test]
async fn latency_delays_each_direction() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    proxy.set(Fault::Latency(Duration::from_millis(200)));
    let started = Instant::now();
    round_trip(&mut s, b"slow").await.expect("echo");
    let took = started.elapsed();
    // 200 ms each way.
    assert!(
        took >= Duration::from_millis(400),
        "round trip took only {took:?}"
    );
}

#[tokio::test]
async fn bandwidth_limits_throughput() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    proxy.set(Fault::Bandwidth {
        bytes_per_sec: 64 * 1024,
    });
    let payload = vec![7u8; 64 * 1024];
    let started = Instant::now();
    let back = round_trip(&mut s, &payload).await.expect("echo");
    let took = started.elapsed();
    assert_eq!(back, payload);
    // 64 KiB at 64 KiB/s needs about a second (the directions overlap).
    assert!(
        took >= Duration::from_millis(900),
        "64 KiB took only {took:?}"
    );
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    // A port that was free a moment ago: nothing listens there.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let proxy = FaultProxy::start(addr).await.expect("proxy");
    let mut s = TcpStream::connect(proxy.addr()).await.expect("connect");
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the proxy gives up on the upstream");
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{read:?}"
    );
}

#[tokio::test]
async fn dropping_the_proxy_closes_connections() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo.addr).await.expect("proxy");
    let addr = proxy.addr();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    assert_eq!(round_trip(&mut s, b"x").await.expect("echo"), b"x");
    drop(proxy);
    let mut buf = [0u8; 1];
    let read = timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the connection closes");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
}

fn range() -> RangeRequest {
    RangeRequest {
        key: b"/p".to_vec(),
        ..Default::default()
    }
}

#[tokio::test]
async fn etcd_behind_a_blackhole_times_out_and_recovers() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let proxy = FaultProxy::start(cluster.client_addr(0))
        .await
        .expect("proxy");
    let channel = Channel::from_shared(proxy.endpoint())
        .expect("url")
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect through the proxy");
    let mut kv = KvClient::new(channel);
    kv.put(PutRequest {
        key: b"/p".to_vec(),
        value: b"1".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put through the proxy");

    proxy.set(Fault::Blackhole);
    let err = kv.range(range()).await.expect_err("blackholed");
    assert_eq!(
        err.code(),
        tonic::Code::Cancelled,
        "expected a timeout: {err}"
    );

    proxy.heal();
    let resp = kv.range(range()).await.expect("range after heal");
    assert_eq!(resp.into_inner().kvs.len(), 1);
}

#[tokio::test]
async fn reset_all_breaks_an_etcd_watch() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let proxy = FaultProxy::start(cluster.client_addr(0))
        .await
        .expect("proxy");
    let channel = Channel::from_shared(proxy.endpoint())
        .expect("url")
        .connect()
        .await
        .expect("connect through the proxy");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: b"/w".to_vec(),
            ..Default::default()
        })),
    })
    .await
    .expect("queue create");
    let mut stream = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("watch")
        .into_inner();
    let created = stream.message().await.expect("created reply");
    assert!(created.is_some_and(|r| r.created));

    assert_eq!(proxy.reset_all(), 1);
    let next = timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the watch notices the reset");
    assert!(next.is_err(), "a reset watch must fail, got {next:?}");
    drop(tx);
}

#[test]
fn harness_types_can_be_shared_across_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FaultProxy>();
    send_sync::<EtcdCluster>();
    send_sync::<revwatch_testkit::TestkitError>();
}
