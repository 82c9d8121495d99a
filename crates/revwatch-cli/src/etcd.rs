//! `revwatch etcd`: the embedded single-node etcd-compatible server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use revwatch_server::{AutoCompaction, Server, ServerConfig};

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
    /// Keep this many revisions and compact the older ones every 5 minutes, like etcd's
    /// `--auto-compaction-mode=revision`; 0 turns it off. Without it, history stays until
    /// a client compacts; the server holds it in memory.
    #[arg(long, value_name = "REVISIONS")]
    pub auto_compaction_retention: Option<u64>,
}

impl EtcdArgs {
    pub fn config(&self) -> ServerConfig {
        let mut config = ServerConfig::new(&self.data_dir);
        config.checkpoint_interval = Duration::from_millis(self.checkpoint_interval_ms);
        config.auto_compaction = self
            .auto_compaction_retention
            .map(AutoCompaction::revisions);
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn config(args: &[&str]) -> Result<ServerConfig, clap::Error> {
        let argv = std::iter::once("etcd").chain(args.iter().copied());
        Cmd::try_parse_from(argv).map(|c| c.etcd.config())
    }

    #[test]
    fn flags_reach_the_server_config() {
        let defaults = config(&[]).expect("defaults");
        assert_eq!(defaults.checkpoint_interval, Duration::from_millis(100));
        assert_eq!(defaults.auto_compaction, None);
        let set = config(&[
            "--checkpoint-interval-ms",
            "250",
            "--auto-compaction-retention",
            "1000",
        ])
        .expect("flags");
        assert_eq!(set.checkpoint_interval, Duration::from_millis(250));
        assert_eq!(set.auto_compaction, Some(AutoCompaction::revisions(1000)));
        assert!(config(&["--auto-compaction-retention", "-1"]).is_err());
    }
}
