//! The mirror under test, restartable from its snapshot file.

use std::collections::BTreeMap;
use std::time::Duration;

use revwatch::client::ClientConfig;
use revwatch::mirror::{ClientSource, Mirror, MirrorConfig, Status};
use tempfile::TempDir;
use tokio::time::Instant;

use super::RunError;
use super::collect::Collector;
use crate::adapter::state_of;
use crate::history::FullSnapshot;

/// Longest wait for a (re)started mirror to be ready or caught up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

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
    _dir: TempDir,
}

impl MirrorRig {
    /// Starts a mirror of `prefix` through `endpoints` and waits until ready.
    pub(super) async fn start(
        prefix: Vec<u8>,
        endpoints: Vec<String>,
        mut config: MirrorConfig,
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
            _dir: dir,
        };
        let mirror = rig.spawn().await.map_err(RunError::Setup)?;
        wait_ready(&mirror).await.map_err(RunError::Setup)?;
        rig.mirror = Some(mirror);
        Ok(rig)
    }

    async fn spawn(&self) -> Result<Mirror, String> {
        let source = ClientSource::lazy(ClientConfig::new(self.endpoints.clone()))
            .map_err(|e| e.to_string())?;
        Mirror::builder(self.prefix.clone())
            .config(self.config.clone())
            .start(source)
            .await
            .map_err(|e| e.to_string())
    }

    /// The running mirror.
    pub(super) fn mirror(&self) -> Result<&Mirror, RunError> {
        self.mirror
            .as_ref()
            .ok_or_else(|| RunError::Setup("the mirror is not running".into()))
    }

    /// Stops the mirror (its subscriptions end) and returns the revision it
    /// had published.
    pub(super) fn stop(&mut self) -> i64 {
        let Some(mirror) = self.mirror.take() else {
            return 0;
        };
        self.add_counters(&mirror);
        mirror.snapshot().revision()
    }

    /// Starts a new mirror on the same snapshot file, records what it
    /// loaded, waits until it is back at `reached` (a new process would not
    /// serve subscribers an older state than the one they had), and hands a
    /// new subscription to each collector.
    pub(super) async fn restart(
        &mut self,
        reached: i64,
        collectors: [&Collector; 2],
    ) -> Result<(), String> {
        let mirror = self.spawn().await?;
        if mirror.status().loaded_snapshot_written_at.is_some() {
            let loaded = mirror.snapshot();
            self.loaded.push(FullSnapshot {
                revision: loaded.revision(),
                state: state_of(&loaded),
            });
        }
        mirror
            .snapshot_at_least(reached, START_TIMEOUT)
            .await
            .map_err(|e| format!("restarted mirror: {e}; status {:?}", mirror.status()))?;
        for c in collectors {
            c.resubscribe(mirror.subscribe());
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

    fn add_counters(&mut self, mirror: &Mirror) {
        add_status(&mut self.relists, &mut self.reconnects, &mirror.status());
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
