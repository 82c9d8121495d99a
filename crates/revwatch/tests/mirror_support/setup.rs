//! The set-up every mirror test against a server shares: the target (real etcd
//! or the embedded server), a writer, a mirror of `P` started, ready or followed
//! by a subscriber, and the final check that it equals the server's own range.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_proto::etcdserverpb::request_op::Request as Op;
use revwatch::client::{
    Backoff, Client, ClientConfig, DeleteRangeRequest, PutRequest, RequestOp, TxnRequest,
};
use revwatch::mirror::{
    ClientSource, FailureKind, Mirror, MirrorBuilder, MirrorConfig, MirrorError, Snapshot, Source,
    Subscription,
};

pub use super::common::bounded;
use super::{Replay, snap_kvs, truth};

/// The mirrored prefix.
pub const P: &str = "m/";
/// How long any single wait in a scenario may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// The server a scenario runs against.
pub trait Target {
    /// Client endpoints of every member.
    fn endpoints(&self) -> Vec<String>;
    /// The first member's client address, to put a fault proxy in front of it.
    fn client_addr(&self) -> SocketAddr;
    /// Stops the (first) member; its connections drop.
    fn stop(&mut self) -> impl Future<Output = ()>;
    /// Starts it again on the same address and data.
    fn restart(&mut self) -> impl Future<Output = ()>;
    /// Compacts history up to `revision` (physically: done when this returns).
    fn compact(&self, revision: i64) -> impl Future<Output = ()>;
}

pub fn client_config(endpoints: Vec<String>) -> ClientConfig {
    ClientConfig::new(endpoints)
        .with_request_timeout(Duration::from_secs(3))
        .with_connect_timeout(Duration::from_secs(2))
}

pub fn mirror_config() -> MirrorConfig {
    MirrorConfig::default()
        .with_page_size(7)
        .with_progress_interval(Duration::from_millis(500))
        .with_stall_timeout(Duration::from_secs(3))
        .with_retry_backoff(Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(500),
        })
}

/// A lazily connecting source on `endpoints`, with the tests' client timeouts.
pub fn source(endpoints: Vec<String>) -> ClientSource {
    ClientSource::lazy(client_config(endpoints)).unwrap()
}

/// Starts a mirror of `P` on `endpoints` (not waiting for it to be ready).
pub async fn start(endpoints: Vec<String>, config: MirrorConfig) -> Mirror {
    start_with(source(endpoints), config, |b| b).await
}

/// Starts a mirror of `P` from `source`, its builder finished by `build` (a
/// decoder, metrics), not waiting for it to be ready.
pub async fn start_with<T: Send + Sync + 'static>(
    source: impl Source,
    config: MirrorConfig,
    build: impl FnOnce(MirrorBuilder<Bytes>) -> MirrorBuilder<T>,
) -> Mirror<T> {
    build(Mirror::builder(P).config(config))
        .start(source)
        .await
        .unwrap()
}

/// A ready mirror of `P` on `endpoints`, a subscription taken once it is ready,
/// and a [`Replay`] to check what that subscription delivers.
pub async fn followed_mirror(
    endpoints: Vec<String>,
    config: MirrorConfig,
) -> (Mirror, Subscription<Bytes>, Replay) {
    followed_mirror_with(source(endpoints), config, |b| b).await
}

/// [`followed_mirror`] from `source`, its builder finished by `build`.
pub async fn followed_mirror_with(
    source: impl Source,
    config: MirrorConfig,
    build: impl FnOnce(MirrorBuilder<Bytes>) -> MirrorBuilder<Bytes>,
) -> (Mirror, Subscription<Bytes>, Replay) {
    let mirror = start_with(source, config, build).await;
    mirror.wait_ready().await.unwrap();
    let sub = mirror.subscribe();
    (mirror, sub, Replay::default())
}

/// `wait_ready` fails, with a failure of `kind`.
pub async fn assert_not_ready<T: Send + Sync + 'static>(mirror: &Mirror<T>, kind: FailureKind) {
    let err = mirror.wait_ready().await.unwrap_err();
    assert!(
        matches!(&err, MirrorError::NotReady { kind: k, .. } if *k == kind),
        "{err}"
    );
}

pub async fn writer(endpoints: Vec<String>) -> Client {
    Client::connect(client_config(endpoints)).await.unwrap()
}

pub async fn put(c: &Client, key: &str, value: &str) -> i64 {
    put_lease(c, key, value, 0).await
}

pub async fn put_lease(c: &Client, key: &str, value: &str, lease: i64) -> i64 {
    put_raw(c, key, value.as_bytes(), lease).await
}

/// Puts a value that need not be UTF-8; returns the revision.
pub async fn put_bytes(c: &Client, key: &str, value: &[u8]) -> i64 {
    put_raw(c, key, value, 0).await
}

async fn put_raw(c: &Client, key: &str, value: &[u8], lease: i64) -> i64 {
    c.put(PutRequest {
        key: key.into(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    })
    .await
    .unwrap()
    .header
    .unwrap()
    .revision
}

/// Runs `ops` as one txn, at one revision; returns it.
pub async fn txn(c: &Client, ops: Vec<RequestOp>) -> i64 {
    let resp = c
        .txn(TxnRequest {
            success: ops,
            ..Default::default()
        })
        .await
        .unwrap();
    resp.header.unwrap().revision
}

/// A txn operation that puts `value` at `key`.
pub fn put_op(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })),
    }
}

/// A txn operation that deletes `key`.
pub fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

/// Deletes `key`; returns the revision.
pub async fn delete(c: &Client, key: &str) -> i64 {
    let deleted = c
        .delete_range(DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    deleted.header.unwrap().revision
}

/// The mirror's consistent snapshot equals the server's range at its revision;
/// returns that snapshot.
pub async fn assert_converged<T: Send + Sync + 'static>(
    mirror: &Mirror<T>,
    etcd: &Client,
) -> Arc<Snapshot<T>> {
    assert_converged_except(mirror, etcd, &[]).await
}

/// [`assert_converged`] but for the keys in `except` (whose values failed to
/// decode, so that the mirror keeps or drops them by its decode policy).
pub async fn assert_converged_except<T: Send + Sync + 'static>(
    mirror: &Mirror<T>,
    etcd: &Client,
    except: &[String],
) -> Arc<Snapshot<T>> {
    let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
    let mut expected = truth(
        &ClientSource::new(etcd.clone()),
        P.as_bytes(),
        snap.revision(),
    )
    .await;
    let mut got = snap_kvs(&snap);
    for key in except {
        expected.remove(key.as_bytes());
        got.remove(key.as_bytes());
    }
    assert_eq!(
        got,
        expected,
        "mirror differs from etcd at {}",
        snap.revision()
    );
    snap
}

/// A mirror decoding UTF-8 values into `String`s has converged (but for
/// `except`), and every value it holds decodes its raw bytes.
pub async fn assert_converged_utf8(mirror: &Mirror<String>, etcd: &Client, except: &[String]) {
    let snap = assert_converged_except(mirror, etcd, except).await;
    for (k, e) in snap.iter() {
        if !except.iter().any(|x| x.as_bytes() == &k[..]) {
            assert_eq!(e.value.as_bytes(), &e.raw[..], "{k:?}");
        }
    }
}

/// Runs `body` on the target `target` makes and a writer connected to it, with
/// test logging, failing if it all takes longer than `limit`. The target lives
/// until `body` is done.
pub async fn run_on<T: Target>(
    limit: Duration,
    target: impl Future<Output = T>,
    body: impl AsyncFnOnce(&mut T, Client),
) {
    bounded(limit, async {
        let mut target = target.await;
        let etcd = writer(target.endpoints()).await;
        body(&mut target, etcd).await;
    })
    .await;
}
