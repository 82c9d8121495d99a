//! The test-side switchboard for the fault hooks in `faults.rs`; only built with the
//! `fault-injection` feature.
//!
//! It holds the three handles it acts on (the hooks, the store and the watch hub) rather
//! than the server's shared state, so the hooks stay a leaf module that everything else
//! can read without depending back on the server.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::EtcdError;
use crate::faults::Faults;
use crate::store::Store;
use crate::watch_hub::WatchHub;

/// One open watch stream, as [`FaultController::watch_streams`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchStreamInfo {
    /// Server-side stream id, for [`FaultController::stall_watch_stream`].
    pub stream_id: u64,
    /// `(watch_id, key, range_end)` of each watcher on the stream.
    pub watchers: Vec<(i64, Vec<u8>, Vec<u8>)>,
}

/// Flips the server's fault hooks. Get one from
/// [`Server::faults`](crate::Server::faults); only built with the `fault-injection`
/// feature.
#[derive(Clone)]
pub struct FaultController {
    faults: Arc<Faults>,
    store: Arc<Store>,
    hub: Arc<WatchHub>,
}

impl FaultController {
    pub(crate) fn new(faults: Arc<Faults>, store: Arc<Store>, hub: Arc<WatchHub>) -> Self {
        Self { faults, store, hub }
    }

    /// Ends every open watch stream with `Unavailable`, as a crashing proxy or member would.
    pub fn drop_watch_streams(&self) {
        self.faults.state().drops.send_modify(|n| *n += 1);
    }

    /// Lists open watch streams and their watchers, by stream id.
    pub fn watch_streams(&self) -> Vec<WatchStreamInfo> {
        self.hub
            .streams()
            .into_iter()
            .map(|(stream_id, watchers)| WatchStreamInfo {
                stream_id,
                watchers,
            })
            .collect()
    }

    /// Holds back every reply of stream `stream_id` for `duration`; the replies are sent,
    /// in order, afterwards.
    pub fn stall_watch_stream(&self, stream_id: u64, duration: Duration) {
        let mut stalls = self
            .faults
            .state()
            .stalls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stalls.insert(stream_id, Instant::now() + duration);
    }

    /// Delays every progress reply (requested and periodic) by `delay` while events keep
    /// flowing, so progress replies arrive late and out of order. `None` turns it off.
    pub fn delay_progress(&self, delay: Option<Duration>) {
        let ms = delay.map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        self.faults
            .state()
            .progress_delay_ms
            .store(ms, Ordering::Relaxed);
    }

    /// While on, new TCP connections are accepted and closed at once.
    pub fn refuse_connections(&self, refuse: bool) {
        self.faults.state().refuse.store(refuse, Ordering::Relaxed);
    }

    /// Compacts at `revision` (the current revision when `None`) without a client
    /// request. Returns the compacted revision.
    pub async fn force_compaction(&self, revision: Option<i64>) -> Result<i64, EtcdError> {
        self.store.force_compact(revision).await
    }

    /// Serves reads and watches as a member `revisions` behind would: ranges default to
    /// and are bounded by the lagging revision, and watchers only see events up to it.
    /// Writes still apply. 0 turns it off.
    pub fn lag_reads(&self, revisions: i64) {
        self.faults
            .state()
            .read_lag
            .store(revisions.max(0), Ordering::Relaxed);
        self.store.renotify();
    }
}
