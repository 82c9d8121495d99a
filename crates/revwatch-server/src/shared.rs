//! What every service shares: the server's [`Core`] state and the shutdown signal.
//!
//! Kept apart from `server.rs` so that the services and watch streams depend on this
//! state, not on the server that builds them.

use std::sync::{Arc, Mutex, PoisonError};

use etcd_proto::etcdserverpb::{AlarmMember, ResponseHeader};
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::faults::Faults;
use crate::store::Store;
use crate::watch_hub::WatchHub;

/// State shared by every service.
pub(crate) struct Core {
    /// Shared with the fault controller, as are `hub` and `faults`.
    pub store: Arc<Store>,
    pub hub: Arc<WatchHub>,
    pub faults: Arc<Faults>,
    pub config: ServerConfig,
    pub alarms: Mutex<Vec<AlarmMember>>,
    pub client_urls: Mutex<Vec<String>>,
}

impl Core {
    /// A full response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let id = self.store.identity();
        Some(ResponseHeader {
            cluster_id: id.cluster_id,
            member_id: id.member_id,
            revision,
            raft_term: id.raft_term,
        })
    }

    /// Completes a header built by the store: identity, term, and the current revision when
    /// none was set (like etcd's `header.fill`).
    pub fn fill(&self, header: &mut Option<ResponseHeader>) {
        let rev = header
            .map(|h| h.revision)
            .filter(|r| *r != 0)
            .unwrap_or_else(|| self.store.read_rev());
        *header = self.header(rev);
    }

    pub fn alarms(&self) -> std::sync::MutexGuard<'_, Vec<AlarmMember>> {
        self.alarms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await in the caller.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}
