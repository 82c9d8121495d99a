//! The mirror under test, restartable from its snapshot file.
//!
//! Restarts take turns (the first drawn from the run's seed): a crash (the mirror dropped without its final write,
//! so the file is the last timed one), a clean shutdown (the file holds the
//! last published revision), and a shutdown whose file is then removed (the
//! new mirror must list afresh). After each, the rig asserts from the new
//! mirror's status that it loaded the file, at which revision (or, with the
//! file removed, nothing), and hands the collectors subscriptions made before
//! the new mirror's task ran, so that the checker sees exactly the loaded state
//! and everything after it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use revwatch::client::ClientConfig;
use revwatch::mirror::{ClientSource, Mirror, MirrorConfig, Status, Subscription};
use tempfile::TempDir;
use tokio::time::Instant;

use super::RunError;
use super::collect::{Collector, Feed};
use crate::adapter::state_of;
use crate::history::FullSnapshot;

/// Longest wait for a (re)started mirror to be ready or caught up.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a stopped mirror's task to end.
const TASK_END_TIMEOUT: Duration = Duration::from_secs(10);

/// The mirror of one run: started, stopped and started again on the same
/// snapshot file, with its counters kept across instances.
pub(super) struct MirrorRig {
    mirror: Option<Mirror>,
    prefix: Vec<u8>,
    endpoints: Vec<String>,
    config: MirrorConfig,
    /// Relists by cause, over every instance.
    pub(super) relists: BTreeMap<String, u64>,
    /// Reconnects by cause, over every instance.
    pub(super) reconnects: BTreeMap<String, u64>,
    /// What each restarted instance loaded from the file, before any watch.
    pub(super) loaded: Vec<FullSnapshot>,
    /// Restarts so far, plus the seed's offset into the turns.
    restarts: u64,
    _dir: TempDir,
}

/// How a restart stops the old mirror and treats its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RestartKind {
    /// Dropped without a final write: the file is the last timed one.
    Crash,
    /// Shut down: the file holds the last published revision.
    Shutdown,
    /// Shut down (so that no write of the old mirror is still in flight),
    /// and its file removed.
    FileRemoved,
}

/// A stopped mirror, to restart.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stopped {
    kind: RestartKind,
    /// The revision the old mirror had published.
    reached: i64,
}

impl MirrorRig {
    /// Starts a mirror of `prefix` through `endpoints` and waits until ready;
    /// `seed` picks the first restart's turn.
    pub(super) async fn start(
        prefix: Vec<u8>,
        endpoints: Vec<String>,
        mut config: MirrorConfig,
        seed: u64,
    ) -> Result<Self, RunError> {
        let dir = tempfile::Builder::new()
            .prefix("revwatch-proof-")
            .tempdir()
            .map_err(RunError::setup)?;
        config.snapshot_file = Some(dir.path().join("mirror.snapshot"));
        let mut rig = Self {
            mirror: None,
            prefix,
            endpoints,
            config,
            relists: BTreeMap::new(),
            reconnects: BTreeMap::new(),
            loaded: Vec::new(),
            restarts: seed % 3,
            _dir: dir,
        };
        let (mirror, _) = rig.spawn(0).await.map_err(RunError::Setup)?;
        wait_ready(&mirror).await.map_err(RunError::Setup)?;
        rig.mirror = Some(mirror);
        Ok(rig)
    }

    /// Starts a mirror with `subscribers` subscriptions made before its task runs.
    async fn spawn(
        &self,
        subscribers: usize,
    ) -> Result<(Mirror, Vec<Subscription<Bytes>>), String> {
        let source = ClientSource::lazy(ClientConfig::new(self.endpoints.clone()))
            .map_err(|e| e.to_string())?;
        Mirror::builder(self.prefix.clone())
            .config(self.config.clone())
            .start_subscribed(source, subscribers)
            .await
            .map_err(|e| e.to_string())
    }

    /// The running mirror.
    pub(super) fn mirror(&self) -> Result<&Mirror, RunError> {
        self.mirror
            .as_ref()
            .ok_or_else(|| RunError::Setup("the mirror is not running".into()))
    }

    /// Stops the mirror (its subscriptions end), in the way this restart's
    /// turn says.
    pub(super) async fn stop(&mut self) -> Result<Stopped, String> {
        let mut kind = match self.restarts % 3 {
            0 => RestartKind::Crash,
            1 => RestartKind::Shutdown,
            _ => RestartKind::FileRemoved,
        };
        self.restarts += 1;
        let path = self.config.snapshot_file.clone().unwrap_or_default();
        if kind == RestartKind::Crash && !path.exists() {
            // Not written yet (a fresh list after a removal): a crash would
            // leave no file to prove anything with.
            kind = RestartKind::Shutdown;
        }
        let Some(mirror) = self.mirror.take() else {
            return Err("the mirror is not running".into());
        };
        // Read once the old mirror's task has ended: until then it may publish
        // (and, on a clean shutdown, persist) one more revision.
        let mut last = mirror.status_changes();
        tracing::info!(?kind, "stopping the mirror for a restart");
        match kind {
            RestartKind::Crash => drop(mirror),
            RestartKind::Shutdown => mirror
                .shutdown()
                .await
                .map_err(|e| format!("shutdown before a restart: {e}"))?,
            RestartKind::FileRemoved => {
                mirror
                    .shutdown()
                    .await
                    .map_err(|e| format!("shutdown before a restart: {e}"))?;
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("removing {}: {e}", path.display())),
                }
            }
        }
        // Every sender of the status is gone once the task has ended.
        let ended = tokio::time::timeout(TASK_END_TIMEOUT, async {
            while last.changed().await.is_ok() {}
        });
        if ended.await.is_err() {
            return Err(format!(
                "the stopped mirror's task did not end within {TASK_END_TIMEOUT:?}"
            ));
        }
        let last = last.borrow().clone();
        add_status(&mut self.relists, &mut self.reconnects, &last);
        tracing::info!(?kind, reached = last.revision, "mirror stopped");
        Ok(Stopped {
            kind,
            reached: last.revision,
        })
    }

    /// Starts a new mirror on the same snapshot file, asserts from its status
    /// that it loaded the file (or nothing, if the file was removed), records
    /// what it loaded, and hands each collector a subscription made before the
    /// new mirror's task ran (so that the checker sees its first state and
    /// everything after it).
    pub(super) async fn restart(
        &mut self,
        stopped: Stopped,
        collectors: [&Collector; 2],
    ) -> Result<(), String> {
        // One more subscription than collectors: its first update is the state
        // the new mirror starts from.
        let (mirror, mut subs) = self.spawn(collectors.len() + 1).await?;
        let started = subs
            .pop()
            .and_then(|mut sub| sub.try_recv())
            .and_then(|first| first.snapshot())
            .ok_or("a new subscription had no first snapshot")?;
        let status = mirror.status();
        let loaded = status.loaded_snapshot.map(|f| f.revision);
        let file = match (stopped.kind, loaded) {
            (RestartKind::FileRemoved, None) => None,
            (RestartKind::FileRemoved, Some(revision)) => {
                return Err(format!(
                    "its snapshot file was removed, yet it loaded one at revision {revision}"
                ));
            }
            (_, None) => return Err("it did not load its snapshot file".into()),
            (RestartKind::Shutdown, Some(revision)) if revision != stopped.reached => {
                return Err(format!(
                    "after a clean shutdown at {}, it loaded its file at {revision}",
                    stopped.reached
                ));
            }
            (_, Some(revision)) if revision <= 0 => {
                return Err(format!("it loaded a snapshot file at revision {revision}"));
            }
            (_, Some(revision)) if revision > stopped.reached => {
                return Err(format!(
                    "it loaded its file at {revision}, beyond the {} the old mirror reached",
                    stopped.reached
                ));
            }
            (_, Some(revision)) => Some(revision),
        };
        if started.revision() != file.unwrap_or(0) {
            return Err(format!(
                "it started from revision {}, not from its file's {file:?}",
                started.revision()
            ));
        }
        for (c, sub) in collectors.into_iter().zip(subs) {
            c.resubscribe(Feed::restarted(&mirror, sub, file));
        }
        tracing::info!(?file, "restarted mirror subscribed");
        if file.is_some() {
            self.loaded.push(FullSnapshot {
                revision: started.revision(),
                state: state_of(&started),
            });
        }
        self.mirror = Some(mirror);
        Ok(())
    }

    /// Relists and reconnects of every instance so far, the running one
    /// included.
    pub(super) fn counters(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
        let mut totals = (self.relists.clone(), self.reconnects.clone());
        if let Some(m) = &self.mirror {
            add_status(&mut totals.0, &mut totals.1, &m.status());
        }
        totals
    }
}

fn add_status(
    relists: &mut BTreeMap<String, u64>,
    reconnects: &mut BTreeMap<String, u64>,
    status: &Status,
) {
    for (cause, n) in &status.relists {
        *relists.entry(cause.as_str().to_owned()).or_default() += n;
    }
    for (cause, n) in &status.reconnects {
        *reconnects.entry(cause.as_str().to_owned()).or_default() += n;
    }
}

/// Waits until the mirror is ready; an attempt's failure is retried until
/// the deadline.
async fn wait_ready(mirror: &Mirror) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, mirror.wait_ready()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() < deadline => {
                tracing::debug!("mirror not ready yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => return Err(format!("mirror not ready: {e}")),
            Err(_) => return Err(format!("mirror not ready within {START_TIMEOUT:?}")),
        }
    }
}
