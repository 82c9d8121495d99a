//! The embedded server (`revwatch-server`) as a [`Target`], with its fault hooks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use revwatch::client::Client;
use revwatch_server::{FaultController, RunningServer, Server, ServerConfig};
use tempfile::TempDir;

use super::setup::{P, Target, WAIT, run_on};

/// The embedded server on a fixed loopback address, restartable on its data dir.
pub struct Embedded {
    dir: TempDir,
    addr: SocketAddr,
    running: Option<RunningServer>,
}

impl Embedded {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let running = Server::start(ServerConfig::new(dir.path())).await.unwrap();
        Embedded {
            dir,
            addr: running.local_addr(),
            running: Some(running),
        }
    }

    pub fn faults(&self) -> FaultController {
        self.running
            .as_ref()
            .expect("the server is running")
            .server()
            .faults()
    }

    /// The server-side id of the mirror's watch stream (the one watching `P`), once
    /// one other than `old` is open.
    pub async fn mirror_stream(&self, old: Option<u64>) -> u64 {
        let faults = self.faults();
        let deadline = Instant::now() + WAIT;
        loop {
            let found = faults.watch_streams().into_iter().find(|s| {
                Some(s.stream_id) != old
                    && s.watchers
                        .iter()
                        .any(|(_, key, _)| key.as_slice() == P.as_bytes())
            });
            if let Some(stream) = found {
                return stream.stream_id;
            }
            assert!(
                Instant::now() < deadline,
                "the mirror opened no watch stream besides {old:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `body` on a fresh server and a writer connected to it (see [`run_on`]).
pub async fn run_on_embedded(limit: Duration, body: impl AsyncFnOnce(&mut Embedded, Client)) {
    run_on(limit, Embedded::start(), body).await;
}

impl Target for Embedded {
    fn endpoints(&self) -> Vec<String> {
        vec![format!("http://{}", self.addr)]
    }

    fn client_addr(&self) -> SocketAddr {
        self.addr
    }

    async fn stop(&mut self) {
        let running = self.running.take().expect("the server is running");
        tokio::time::timeout(WAIT, running.shutdown())
            .await
            .expect("shutdown finishes")
            .unwrap();
    }

    async fn restart(&mut self) {
        let server = Server::open(ServerConfig::new(self.dir.path())).unwrap();
        self.running = Some(server.start_on(self.addr).await.unwrap());
    }

    async fn compact(&self, revision: i64) {
        let compacted = self
            .faults()
            .force_compaction(Some(revision))
            .await
            .unwrap();
        assert_eq!(compacted, revision);
    }
}
