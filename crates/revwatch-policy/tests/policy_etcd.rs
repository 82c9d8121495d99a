//! The policy pipeline against real etcd 3.4 (testkit).

mod policy_support;

use std::time::Duration;

use policy_support::{bounded, scenarios};
use revwatch_policy::Backend;
use revwatch_testkit::etcd::EtcdCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_and_consistency() {
    bounded(Duration::from_secs(90), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::activation_and_consistency(cluster.endpoints()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_decisions() {
    bounded(Duration::from_secs(90), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::batch_decisions(cluster.endpoints()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports() {
    bounded(Duration::from_secs(90), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::load_reports(cluster.endpoints()).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_good_cedar() {
    bounded(Duration::from_secs(90), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::last_known_good(cluster.endpoints(), Backend::Cedar).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_good_casbin() {
    bounded(Duration::from_secs(90), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::last_known_good(cluster.endpoints(), Backend::Casbin).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_publish_with_concurrent_reader() {
    bounded(Duration::from_secs(120), async {
        let cluster = EtcdCluster::single().await.unwrap();
        scenarios::atomic_publish_with_concurrent_reader(cluster.endpoints()).await;
    })
    .await;
}

/// Killing etcd: decisions fail closed after the maximum staleness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_after_max_staleness() {
    bounded(Duration::from_secs(90), async {
        let mut cluster = EtcdCluster::single().await.unwrap();
        let endpoints = cluster.endpoints();
        let kill = async { cluster.kill(0).unwrap() };
        scenarios::fails_closed_after_max_staleness(endpoints, kill).await;
    })
    .await;
}
