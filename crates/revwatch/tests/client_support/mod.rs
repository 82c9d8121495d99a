//! Shared helpers for the client tests against real etcd.

#![allow(dead_code)] // Each test binary uses a different subset.

use revwatch::client::{Client, ClientConfig, PutRequest, RangeRequest, TlsConfig};
use revwatch_testkit::etcd::EtcdCluster;

#[path = "../common/mod.rs"]
mod common;
pub use common::bounded;

/// A configuration matching the cluster's endpoints, TLS files and root credentials.
pub fn config_for(cluster: &EtcdCluster) -> ClientConfig {
    let mut cfg = ClientConfig::new(cluster.endpoints());
    if let Some(files) = cluster.tls_files() {
        cfg = cfg.with_tls(TlsConfig::from_files(&files.ca, &files.cert, &files.key));
    }
    if let Some((user, password)) = cluster.credentials() {
        cfg = cfg.with_credentials(user.clone(), password.clone());
    }
    cfg
}

pub async fn connect(cluster: &EtcdCluster) -> Client {
    Client::connect(config_for(cluster)).await.expect("connect")
}

pub async fn put(client: &Client, key: &str, value: &str) -> i64 {
    let resp = client
        .put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .expect("put");
    resp.header.expect("header").revision
}

pub async fn get(client: &Client, key: &str) -> Option<Vec<u8>> {
    let resp = client
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .expect("range");
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

/// Fails unless every endpoint is in rotation (probes work with this cluster's settings).
pub fn assert_all_healthy(client: &Client) {
    let health = client.endpoint_health();
    assert!(health.iter().all(|h| h.healthy), "{health:?}");
}
