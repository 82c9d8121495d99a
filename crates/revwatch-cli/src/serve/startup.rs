//! The steps of `serve` around the HTTP API: seeding the embedded server, the HTTP
//! server with graceful shutdown, and the policy events told on stderr.

use std::time::Duration;

use anyhow::Context;
use axum::Router;
use revwatch::client::{Client, ClientConfig};
use revwatch::mirror::Mirror;
use revwatch_policy::{Backend, Policies, PolicyStatus};
use tokio::sync::{broadcast::error::RecvError, watch};

use super::{metrics::Metrics, seed};
use crate::progress;

/// Writes the example set if the prefix is empty, and tells how to use it.
pub async fn seed(
    config: &ClientConfig,
    prefix: &str,
    backend: Backend,
    etcd: &str,
    url: &str,
) -> anyhow::Result<()> {
    let client = Client::connect(config.clone())
        .await
        .context("connecting to the embedded server")?;
    if let Some(revision) = seed::seed_if_empty(&client, prefix, backend).await? {
        eprintln!(
            "revwatch serve: first start: wrote an example policy set at revision {revision}"
        );
        eprintln!("{}", seed::instructions(backend, prefix, etcd, url));
    }
    Ok(())
}

/// Serves `router` on `listener` until `stop` turns true, then lets in-flight
/// requests finish.
pub async fn serve<L>(
    listener: L,
    router: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            // An error means the sender is gone: stop as well.
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Waits up to `wait` for a first active set and says which, or why there is none;
/// meanwhile a long first list of `mirror` draws a progress bar on a terminal.
pub async fn report_first_set(policies: &Policies, mirror: &Mirror, wait: Duration) {
    let first = policies.wait_active(wait);
    match progress::while_running(mirror.status_changes(), first).await {
        Ok(set) => eprintln!(
            "revwatch serve: ready: policy set at revision {} ({} policies)",
            set.revision, set.policy_count
        ),
        Err(e) => eprintln!(
            "revwatch serve: not ready after {wait:?}: {e}; /health/ready answers 503 until a policy set is active"
        ),
    }
}

/// Follows the policy status: metrics, and a stderr line for each activation,
/// rejection and mirror state change.
pub async fn follow_status(policies: Policies, metrics: Metrics) {
    // Loads are followed from before the status is read, so each is timed once:
    // those the status already counts are skipped by their sequence number.
    let mut loads = policies.load_reports();
    let mut changes = policies.status_changes();
    let mut before = changes.borrow_and_update().clone();
    let counted = before.activations + before.rejections;
    // Count what happened before this task first looked, too.
    let mut start = before.clone();
    (start.activations, start.rejections) = (0, 0);
    metrics.observe(&start, &before);
    metrics.rejected_earlier(&before);
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = changes.borrow_and_update().clone();
                metrics.observe(&before, &now);
                progress::suspend(|| {
                    for line in event_lines(&before, &now) {
                        eprintln!("{line}");
                    }
                });
                before = now;
            }
            report = loads.recv() => match report {
                Ok(report) if report.sequence > counted => metrics.loaded(&report),
                // Counted by the status already; a lagging receiver loses only
                // durations and keys, the status still counts every load.
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => break,
            },
        }
    }
}

fn event_lines(before: &PolicyStatus, now: &PolicyStatus) -> Vec<String> {
    let mut lines = Vec::new();
    if now.activations > before.activations {
        lines.push(format!(
            "revwatch serve: activated the policy set of revision {} ({} policies)",
            now.compiled_revision, now.policy_count
        ));
    }
    if now.rejections > before.rejections
        && let Some(r) = &now.last_rejection
    {
        let kept = match now.active_revision {
            0 => "no policy set is active yet".to_owned(),
            _ => format!("the set of revision {} stays active", now.compiled_revision),
        };
        lines.push(format!("revwatch serve: rejected {r}; {kept}"));
    }
    if now.mirror_state != before.mirror_state && !now.mirror_state.is_empty() {
        lines.push(format!(
            "revwatch serve: mirror {} at revision {}",
            now.mirror_state, now.evaluated_revision
        ));
    }
    lines
}
