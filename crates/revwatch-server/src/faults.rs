//! Fault injection for tests.
//!
//! The server consults [`Faults`] at a few points (accepting connections, serving reads,
//! sending watch replies). Without the `fault-injection` feature every hook is a constant
//! and the controller that flips them does not exist, so production builds cannot reach
//! them by accident.

#[cfg(feature = "fault-injection")]
pub use controller::{FaultController, WatchStreamInfo};

#[cfg(not(feature = "fault-injection"))]
use std::time::{Duration, Instant};

/// The hooks, as the server sees them.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    #[cfg(feature = "fault-injection")]
    state: state::FaultState,
}

/// Resolves when all watch streams must be dropped.
pub(crate) struct DropSignal {
    #[cfg(feature = "fault-injection")]
    rx: tokio::sync::watch::Receiver<u64>,
}

impl DropSignal {
    /// Waits for the next drop request (forever, without fault injection).
    pub async fn wait(&mut self) {
        #[cfg(feature = "fault-injection")]
        if self.rx.changed().await.is_ok() {
            return;
        }
        std::future::pending::<()>().await;
    }
}

#[cfg(not(feature = "fault-injection"))]
impl Faults {
    pub fn read_lag(&self) -> i64 {
        0
    }
    pub fn refuse_connections(&self) -> bool {
        false
    }
    pub fn progress_delay(&self) -> Option<Duration> {
        None
    }
    pub fn stalled_until(&self, _stream: u64) -> Option<Instant> {
        None
    }
    pub fn drop_signal(&self) -> DropSignal {
        DropSignal {}
    }
}

#[cfg(feature = "fault-injection")]
mod state {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use super::{DropSignal, Faults};

    #[derive(Debug)]
    pub(crate) struct FaultState {
        pub read_lag: AtomicI64,
        pub refuse: AtomicBool,
        /// Milliseconds; 0 = off.
        pub progress_delay_ms: AtomicU64,
        pub drops: tokio::sync::watch::Sender<u64>,
        pub stalls: Mutex<HashMap<u64, Instant>>,
    }

    impl Default for FaultState {
        fn default() -> Self {
            Self {
                read_lag: AtomicI64::new(0),
                refuse: AtomicBool::new(false),
                progress_delay_ms: AtomicU64::new(0),
                drops: tokio::sync::watch::channel(0).0,
                stalls: Mutex::new(HashMap::new()),
            }
        }
    }

    impl Faults {
        pub(crate) fn state(&self) -> &FaultState {
            &self.state
        }
        pub fn read_lag(&self) -> i64 {
            self.state.read_lag.load(Ordering::Relaxed)
        }
        pub fn refuse_connections(&self) -> bool {
            self.state.refuse.load(Ordering::Relaxed)
        }
        pub fn progress_delay(&self) -> Option<Duration> {
            match self.state.progress_delay_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            }
        }
        pub fn stalled_until(&self, stream: u64) -> Option<Instant> {
            let stalls = self
                .state
                .stalls
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            stalls
                .get(&stream)
                .copied()
                .filter(|until| *until > Instant::now())
        }
        pub fn drop_signal(&self) -> DropSignal {
            DropSignal {
                rx: self.state.drops.subscribe(),
            }
        }
    }
}

#[cfg(feature = "fault-injection")]
mod controller {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use crate::error::EtcdError;
    use crate::server::Core;

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
        pub(crate) core: Arc<Core>,
    }

    impl FaultController {
        /// Ends every open watch stream with `Unavailable`, as a crashing proxy or member would.
        pub fn drop_watch_streams(&self) {
            self.core.faults.state().drops.send_modify(|n| *n += 1);
        }

        /// Lists open watch streams and their watchers.
        pub fn watch_streams(&self) -> Vec<WatchStreamInfo> {
            self.core.hub.streams()
        }

        /// Holds back every reply of stream `stream_id` for `duration`; the replies are sent,
        /// in order, afterwards.
        pub fn stall_watch_stream(&self, stream_id: u64, duration: Duration) {
            let mut stalls = self
                .core
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
            self.core
                .faults
                .state()
                .progress_delay_ms
                .store(ms, Ordering::Relaxed);
        }

        /// While on, new TCP connections are accepted and closed at once.
        pub fn refuse_connections(&self, refuse: bool) {
            self.core
                .faults
                .state()
                .refuse
                .store(refuse, Ordering::Relaxed);
        }

        /// Compacts at `revision` (the current revision when `None`) without a client
        /// request. Returns the compacted revision.
        pub async fn force_compaction(&self, revision: Option<i64>) -> Result<i64, EtcdError> {
            self.core.store.force_compact(revision).await
        }

        /// Serves reads and watches as a member `revisions` behind would: ranges default to
        /// and are bounded by the lagging revision, and watchers only see events up to it.
        /// Writes still apply. 0 turns it off.
        pub fn lag_reads(&self, revisions: i64) {
            self.core
                .faults
                .state()
                .read_lag
                .store(revisions.max(0), Ordering::Relaxed);
            self.core.store.renotify();
        }
    }
}
