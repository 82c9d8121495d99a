//! The publish protocol against the embedded server (`revwatch-server`).
//! Scenarios in `publish_support`, shared with real etcd.

mod publish_support;

use revwatch_server::{RunningServer, Server, ServerConfig};
use tempfile::TempDir;

/// A fresh server on its own data directory.
async fn store() -> ((RunningServer, TempDir), Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(ServerConfig::new(dir.path())).await.unwrap();
    let endpoints = vec![format!("http://{}", server.local_addr())];
    ((server, dir), endpoints)
}

publish_support::scenario_tests!(store);
