//! The public server: open a data directory, serve gRPC on a listener until shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_proto::etcdserverpb::cluster_server::ClusterServer;
use etcd_proto::etcdserverpb::kv_server::KvServer;
use etcd_proto::etcdserverpb::lease_server::LeaseServer;
use etcd_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use etcd_proto::etcdserverpb::watch_server::WatchServer;
use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::authority::AuthorityFix;
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::faults::Faults;
use crate::service::{ClusterService, KvService, LeaseService, MaintenanceService, WatchService};
use crate::shared::Core;
use crate::store::{Store, StoreOptions};
use crate::watch_hub::WatchHub;

/// Extra room etcd allows above the request limit for gRPC framing.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

/// An embedded single-member etcd v3 server.
///
/// It stores its data under [`ServerConfig::data_dir`] and speaks etcd's v3 gRPC API (KV,
/// Watch, Lease, Maintenance status/alarm/hash-kv, Cluster member list). Single-node by
/// design: for replication and high availability use a real etcd cluster.
///
/// ```no_run
/// # async fn demo() -> Result<(), revwatch_server::ServerError> {
/// use revwatch_server::{Server, ServerConfig};
/// let server = Server::open(ServerConfig::new("/tmp/revwatch-data"))?;
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:2379").await.map_err(revwatch_server::ServerError::Listen)?;
/// server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    core: Arc<Core>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("data_dir", &self.core.config.data_dir)
            .field("revision", &self.core.store.committed())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens (or creates) the data directory and recovers every acknowledged write.
    pub fn open(config: ServerConfig) -> Result<Self, ServerError> {
        let config = config.with_timers_in_range();
        let faults = Arc::new(Faults::default());
        let store = Store::open(
            &config.data_dir,
            StoreOptions {
                min_lease_ttl: config.min_lease_ttl,
                lease_check_interval: config.lease_check_interval,
                checkpoint_interval: config.checkpoint_interval,
                auto_compaction: config.auto_compaction,
            },
            faults.clone(),
        )?;
        let hub = WatchHub::new(config.limits.max_watchers);
        Ok(Self {
            core: Arc::new(Core {
                store: Arc::new(store),
                hub: Arc::new(hub),
                faults,
                config,
                alarms: Mutex::new(Vec::new()),
                client_urls: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The cluster id in every response header (stable across restarts).
    pub fn cluster_id(&self) -> u64 {
        self.core.store.identity().cluster_id
    }

    /// The member id in every response header (stable across restarts).
    pub fn member_id(&self) -> u64 {
        self.core.store.identity().member_id
    }

    /// The latest durable revision.
    pub fn revision(&self) -> i64 {
        self.core.store.committed()
    }

    /// Durable commits (each one fsync) since the server was opened. Concurrent writers
    /// share commits, so under load this grows slower than the revision.
    pub fn commits(&self) -> u64 {
        self.core.store.commits()
    }

    /// Fault hooks for tests.
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> crate::fault_controller::FaultController {
        let core = &self.core;
        let (faults, store, hub) = (core.faults.clone(), core.store.clone(), core.hub.clone());
        crate::fault_controller::FaultController::new(faults, store, hub)
    }

    /// Serves on `listener` until `shutdown` resolves; then open streams are ended and the
    /// call returns once connections have closed.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        if let Ok(addr) = listener.local_addr() {
            self.core
                .client_urls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(format!("http://{addr}"));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let max_msg = self.core.config.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
        let core = &self.core;
        let router = tonic::transport::Server::builder()
            .add_service(
                KvServer::new(KvService::new(core.clone())).max_decoding_message_size(max_msg),
            )
            .add_service(
                WatchServer::new(WatchService::new(core.clone(), stop_rx.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                LeaseServer::new(LeaseService::new(core.clone(), stop_rx))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(MaintenanceServer::new(MaintenanceService::new(
                core.clone(),
            )))
            .add_service(ClusterServer::new(ClusterService::new(core.clone())));
        let signal = async move {
            shutdown.await;
            // Watch and keep-alive streams never end by themselves; end them so the
            // graceful shutdown can finish.
            let _ = stop_tx.send(true);
        };
        router
            .serve_with_incoming_shutdown(incoming(listener, self.core.faults.clone()), signal)
            .await?;
        Ok(())
    }

    /// Binds `addr` and serves until `shutdown` resolves.
    pub async fn serve_addr(
        &self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let listener = TcpListener::bind(addr).await.map_err(ServerError::Listen)?;
        self.serve(listener, shutdown).await
    }

    /// Opens `config` and serves it on an ephemeral 127.0.0.1 port in the background: the
    /// quickest way to get an etcd-compatible endpoint in a test.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), revwatch_server::ServerError> {
    /// use revwatch_server::{Server, ServerConfig};
    /// let dir = std::env::temp_dir().join("revwatch-doc");
    /// let running = Server::start(ServerConfig::new(dir)).await?;
    /// println!("etcd endpoint: {}", running.endpoint());
    /// running.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
        let server = Self::open(config)?;
        server.start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Serves this server on `addr` in the background.
    pub async fn start_on(self, addr: SocketAddr) -> Result<RunningServer, ServerError> {
        let listener = TcpListener::bind(addr).await.map_err(ServerError::Listen)?;
        let local_addr = listener.local_addr().map_err(ServerError::Listen)?;
        let (tx, rx) = oneshot::channel::<()>();
        let server = self.clone();
        let task = tokio::spawn(async move {
            server
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await
        });
        Ok(RunningServer {
            server: self,
            local_addr,
            stop: Some(tx),
            task: Some(task),
        })
    }
}

/// A server running in the background, from [`Server::start`].
///
/// Dropping it stops serving without waiting; [`RunningServer::shutdown`] waits.
#[derive(Debug)]
pub struct RunningServer {
    server: Server,
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RunningServer {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`, as etcd clients expect an endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The server being run.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops serving and waits until every connection is closed. The data directory can be
    /// opened again once the returned future resolves and the [`Server`] handles are gone.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Accepted connections, minus those a fault refuses, each behind [`AuthorityFix`] so that
/// etcd 3.4's per-endpoint clients are served. Accept errors (such as running out of file
/// descriptors) are logged and retried rather than ending the server.
fn incoming(
    listener: TcpListener,
    faults: Arc<Faults>,
) -> impl Stream<Item = Result<AuthorityFix<TcpStream>, std::io::Error>> {
    futures::stream::unfold(listener, move |listener| {
        let faults = faults.clone();
        async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        if faults.refuse_connections() {
                            drop(stream);
                            continue;
                        }
                        // Watch latency matters more than packet count.
                        let _ = stream.set_nodelay(true);
                        return Some((Ok(AuthorityFix::new(stream)), listener));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    })
}
