//! What the support modules of every test crate here share: a time limit, with
//! test logging.

use std::future::Future;
use std::time::Duration;

/// Runs `body` with test logging, failing if it takes longer than `limit`, so a
/// hang fails instead of blocking CI.
pub async fn bounded(limit: Duration, body: impl Future<Output = ()>) {
    init_tracing();
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (by default
/// `revwatch=info`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "revwatch=info".into()),
        )
        .with_test_writer()
        .try_init();
}
