//! The policy pipeline against the embedded server (`revwatch-server`).

mod policy_support;

use std::time::Duration;

use policy_support::{WAIT, bounded, fixtures, scenarios};
use revwatch_policy::Backend;
use revwatch_server::{RunningServer, Server, ServerConfig};
use tempfile::TempDir;

async fn embedded() -> (TempDir, RunningServer, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let running = Server::start(ServerConfig::new(dir.path())).await.unwrap();
    let endpoints = vec![format!("http://{}", running.local_addr())];
    (dir, running, endpoints)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_and_consistency() {
    bounded(Duration::from_secs(90), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::activation_and_consistency(endpoints).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_decisions() {
    bounded(Duration::from_secs(90), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::batch_decisions(endpoints).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reports() {
    bounded(Duration::from_secs(90), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::load_reports(endpoints).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_good_cedar() {
    bounded(Duration::from_secs(90), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::last_known_good(endpoints, Backend::Cedar).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_good_casbin() {
    bounded(Duration::from_secs(90), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::last_known_good(endpoints, Backend::Casbin).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_publish_with_concurrent_reader() {
    bounded(Duration::from_secs(120), async {
        let (_dir, _server, endpoints) = embedded().await;
        scenarios::atomic_publish_with_concurrent_reader(endpoints).await;
    })
    .await;
}

/// With a maximum staleness, decisions deny (with the reason) once the mirror
/// has been cut off from the server for longer; they allow again after it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_after_max_staleness() {
    bounded(Duration::from_secs(90), async {
        let (dir, server, endpoints) = embedded().await;
        let addr = server.local_addr();
        let stop = async {
            tokio::time::timeout(WAIT, server.shutdown())
                .await
                .unwrap()
                .unwrap();
        };
        let policies = scenarios::fails_closed_after_max_staleness(endpoints, stop).await;

        // Back online: decisions are made again.
        let server = Server::open(ServerConfig::new(dir.path())).unwrap();
        let _running = server.start_on(addr).await.unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let d = policies.decide(&fixtures::cedar_request()).unwrap();
            if d.is_allowed() {
                assert_eq!(d.fail_closed, None);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                policies.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}
