//! Fault injection for tests.
//!
//! The server consults [`Faults`] at a few points (accepting connections, serving reads,
//! sending watch replies). Without the `fault-injection` feature every hook is a constant
//! and the controller that flips them (`fault_controller.rs`) does not exist, so
//! production builds cannot reach them by accident. This module is a leaf: the store, the
//! watch streams and the server read the hooks, and only the controller writes them.

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
