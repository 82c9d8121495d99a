//! Shared helpers for the integration tests: start the server, connect etcd clients, drive
//! watch streams.
#![allow(dead_code)]

pub mod process;

use std::time::Duration;

use anyhow::{Context, Result};
use etcd_proto::etcdserverpb::cluster_client::ClusterClient;
use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::lease_client::LeaseClient;
use etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_proto::etcdserverpb::watch_client::WatchClient;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use revwatch_server::{RunningServer, Server, ServerConfig};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// A server on an ephemeral port with its own data directory (removed on drop, after the
/// server: field order).
pub struct TestServer {
    pub running: RunningServer,
    pub dir: TempDir,
}

impl TestServer {
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServerConfig)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = ServerConfig::new(dir.path().join("data"));
        tweak(&mut config);
        let running = Server::start(config).await?;
        Ok(Self { running, dir })
    }

    pub fn endpoint(&self) -> String {
        self.running.endpoint()
    }

    pub fn server(&self) -> &Server {
        self.running.server()
    }
}

/// Clients for every service on one channel.
#[derive(Clone)]
pub struct Clients {
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
    pub maint: MaintenanceClient<Channel>,
    pub cluster: ClusterClient<Channel>,
}

pub async fn connect(endpoint: &str) -> Result<Clients> {
    let channel = Channel::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(Clients {
        kv: KvClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        watch: WatchClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        lease: LeaseClient::new(channel.clone()),
        maint: MaintenanceClient::new(channel.clone()),
        cluster: ClusterClient::new(channel),
    })
}

/// One bidirectional watch stream.
pub struct WatchConn {
    tx: mpsc::Sender<WatchRequest>,
    rx: mpsc::Receiver<Result<WatchResponse, tonic::Status>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WatchConn {
    /// Opens the stream. The call runs in a task because grpc-go servers (etcd) send
    /// response headers only with the first reply.
    pub async fn open(client: &mut WatchClient<Channel>) -> Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        let (out_tx, out_rx) = mpsc::channel(1024);
        let mut client = client.clone();
        let task = tokio::spawn(async move {
            let mut stream: Streaming<WatchResponse> =
                match client.watch(ReceiverStream::new(rx)).await {
                    Ok(resp) => resp.into_inner(),
                    Err(status) => {
                        let _ = out_tx.send(Err(status)).await;
                        return;
                    }
                };
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if out_tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(status) => {
                        let _ = out_tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Self {
            tx,
            rx: out_rx,
            task,
        })
    }

    pub async fn send(&self, req: RequestUnion) -> Result<()> {
        self.tx
            .send(WatchRequest {
                request_union: Some(req),
            })
            .await
            .context("watch stream closed")
    }

    pub async fn create(&self, req: WatchCreateRequest) -> Result<()> {
        self.send(RequestUnion::CreateRequest(req)).await
    }

    pub async fn cancel(&self, watch_id: i64) -> Result<()> {
        self.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id }))
            .await
    }

    pub async fn progress(&self) -> Result<()> {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
            .await
    }

    /// The next reply, `Ok(None)` on timeout; an error if the stream failed or ended.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<WatchResponse>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(Some(Ok(m))) => Ok(Some(m)),
            Ok(None) => anyhow::bail!("watch stream ended"),
            Ok(Some(Err(status))) => Err(status.into()),
        }
    }

    /// The next reply, which must come within `timeout`.
    pub async fn expect(&mut self, timeout: Duration) -> Result<WatchResponse> {
        self.next(timeout)
            .await?
            .context("no watch reply within timeout")
    }

    /// Every reply arriving within `window`.
    pub async fn collect_for(&mut self, window: Duration) -> Result<Vec<WatchResponse>> {
        let deadline = tokio::time::Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(out);
            }
            if let Some(m) = self.next(left).await? {
                out.push(m);
            }
        }
    }

    /// Every reply until `idle` passes without one.
    pub async fn drain(&mut self, idle: Duration) -> Result<Vec<WatchResponse>> {
        let mut out = Vec::new();
        while let Some(m) = self.next(idle).await? {
            out.push(m);
        }
        Ok(out)
    }
}
