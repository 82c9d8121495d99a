//! The publish protocol against real etcd 3.4 (testkit). Scenarios in
//! `publish_support`, shared with the embedded server.

mod publish_support;

use revwatch_testkit::etcd::EtcdCluster;

/// A fresh single-member cluster.
async fn store() -> (EtcdCluster, Vec<String>) {
    let cluster = EtcdCluster::single().await.unwrap();
    let endpoints = cluster.endpoints();
    (cluster, endpoints)
}

publish_support::scenario_tests!(store);
