//! `revwatch etcd`: the embedded single-node etcd-compatible server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use revwatch_server::{Server, ServerConfig};

/// Run the embedded single-node etcd v3-compatible server (no etcd install needed).
///
/// It is single-node by design: for high availability and scale-out use a real etcd
/// cluster.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// Directory for the data (created if missing).
    #[arg(long, default_value = "revwatch-data")]
    pub data_dir: PathBuf,
    /// Address to serve the etcd v3 gRPC API on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub listen: SocketAddr,
    /// How long logged writes may wait before they are copied into the database file, in
    /// milliseconds. A write is durable once its log record is fsynced; this only bounds
    /// how much log a restart replays.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_interval_ms: u64,
}

impl EtcdArgs {
    pub fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(&self.data_dir);
        config.checkpoint_interval = Duration::from_millis(self.checkpoint_interval_ms);
        config
    }
}

pub async fn run(args: EtcdArgs) -> anyhow::Result<()> {
    // Before anything else, so a Ctrl-C during start-up still stops us cleanly.
    let mut signals = crate::shutdown::Signals::install();
    let server = Server::open(args.config())
        .with_context(|| format!("opening data dir {}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "revwatch etcd: serving http://{} (data in {}, revision {})",
        listener.local_addr().unwrap_or(args.listen),
        args.data_dir.display(),
        server.revision()
    );
    server
        .serve(listener, async move { signals.recv().await })
        .await?;
    eprintln!("revwatch etcd: stopped");
    Ok(())
}
