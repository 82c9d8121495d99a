//! Shared set-up of the policy integration tests: servers, writes, waits.
#![allow(dead_code)] // Each test binary uses a different part.

pub mod fixtures;
pub mod scenarios;

use std::future::Future;
use std::time::Duration;

use revwatch::client::{Backoff, Client, ClientConfig, DeleteRangeRequest, PutRequest};
use revwatch::mirror::{ClientSource, Mirror, MirrorConfig};
use revwatch_policy::{Policies, PolicyConfig, Rejection};

/// How long any single wait may take.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn client_config(endpoints: Vec<String>) -> ClientConfig {
    let mut cfg = ClientConfig::new(endpoints);
    cfg.request_timeout = Duration::from_secs(3);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg
}

// Set field by field: the config may become `#[non_exhaustive]`.
#[allow(clippy::field_reassign_with_default)]
pub fn mirror_config() -> MirrorConfig {
    let mut cfg = MirrorConfig::default();
    cfg.progress_interval = Duration::from_millis(500);
    cfg.stall_timeout = Duration::from_secs(3);
    cfg.retry_backoff = Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    cfg
}

pub async fn writer(endpoints: Vec<String>) -> Client {
    Client::connect(client_config(endpoints)).await.unwrap()
}

/// A mirror of `prefix` and the policies compiled from it.
pub async fn start(endpoints: Vec<String>, prefix: &str, config: PolicyConfig) -> Policies {
    let source = ClientSource::lazy(client_config(endpoints)).unwrap();
    let mirror = Mirror::builder(prefix)
        .config(mirror_config())
        .start(source)
        .await
        .unwrap();
    Policies::start(mirror, prefix, config)
}

/// The revision a write was acknowledged at.
fn acknowledged_at(header: Option<etcd_proto::etcdserverpb::ResponseHeader>) -> i64 {
    header
        .expect("etcd answers every write with a header")
        .revision
}

pub async fn put(c: &Client, key: &str, value: impl Into<Vec<u8>>) -> i64 {
    let req = PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    };
    acknowledged_at(c.put(req).await.unwrap().header)
}

pub async fn del(c: &Client, key: &str) -> i64 {
    let req = DeleteRangeRequest {
        key: key.into(),
        ..Default::default()
    };
    acknowledged_at(c.delete_range(req).await.unwrap().header)
}

/// Waits for a rejection of a candidate at `revision` or later.
pub async fn rejection_at(policies: &Policies, revision: i64) -> Rejection {
    let mut changes = policies.status_changes();
    let found = tokio::time::timeout(
        WAIT,
        changes.wait_for(|s| {
            s.last_rejection
                .as_ref()
                .is_some_and(|r| r.revision >= revision)
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("no rejection at {revision}: {:?}", policies.status()))
    .unwrap();
    found.last_rejection.clone().unwrap()
}

/// Waits until the policies are Ready (a set active, the mirror caught up).
pub async fn wait_ready(policies: &Policies) {
    let deadline = std::time::Instant::now() + WAIT;
    while policies.status().state != revwatch_policy::PolicyState::Ready {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready: {:?}",
            policies.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `body` with test logging, failing if it takes longer than `limit`.
pub async fn bounded(limit: Duration, body: impl Future<Output = ()>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "revwatch=info,revwatch_policy=info".into()),
        )
        .with_test_writer()
        .try_init();
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}
