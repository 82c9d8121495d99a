//! A real etcd 3.4 (testkit) as a [`Target`].

use std::net::SocketAddr;
use std::time::Duration;

use revwatch::client::Client;
use revwatch_testkit::etcd::EtcdCluster;

use super::setup::{Target, run_on};

/// A single-member cluster: stopping means `kill -9`.
impl Target for EtcdCluster {
    fn endpoints(&self) -> Vec<String> {
        EtcdCluster::endpoints(self)
    }

    fn client_addr(&self) -> SocketAddr {
        EtcdCluster::client_addr(self, 0)
    }

    async fn stop(&mut self) {
        self.kill(0).unwrap();
    }

    async fn restart(&mut self) {
        EtcdCluster::restart(self, 0).await.unwrap();
    }

    async fn compact(&self, revision: i64) {
        EtcdCluster::compact(self, revision).await.unwrap();
    }
}

/// A fresh single-member cluster.
pub async fn single() -> EtcdCluster {
    EtcdCluster::single().await.unwrap()
}

/// Runs `body` on a fresh single-member cluster and a writer connected to it (see
/// [`run_on`]).
pub async fn run_on_etcd(limit: Duration, body: impl AsyncFnOnce(&mut EtcdCluster, Client)) {
    run_on(limit, single(), body).await;
}
