//! `revwatch etcd`: the embedded single-node etcd-compatible server.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use revwatch_server::{AutoCompaction, AutoCompactionError, Server, ServerConfig};

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
    #[command(flatten)]
    pub auto_compaction: AutoCompactionArgs,
}

/// etcd's auto-compaction flags, for every command that runs the embedded server.
#[derive(Debug, Default, Args)]
pub struct AutoCompactionArgs {
    /// How --auto-compaction-retention is read, as in etcd: `periodic` (the default)
    /// keeps a span of time, `revision` a number of revisions.
    #[arg(long, value_name = "MODE", value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: Option<String>,
    /// History the server keeps when it compacts by itself, as etcd reads it: in
    /// periodic mode hours (`1`) or a duration (`30m`, `1h30m`), compacting every
    /// retention (at most hourly); in revision mode a revision count, compacting every
    /// 5 minutes. 0, the default, turns it off: history then stays until a client
    /// compacts, and the server holds it in memory.
    #[arg(long, value_name = "VALUE")]
    pub auto_compaction_retention: Option<String>,
}

impl AutoCompactionArgs {
    /// Whether either flag was given.
    pub fn is_set(&self) -> bool {
        self.auto_compaction_mode.is_some() || self.auto_compaction_retention.is_some()
    }

    /// The setting the flags ask for (`None`: off).
    pub fn setting(&self) -> Result<Option<AutoCompaction>, AutoCompactionError> {
        AutoCompaction::from_etcd_flags(
            (self.auto_compaction_mode.as_deref()).unwrap_or(AutoCompaction::DEFAULT_MODE),
            (self.auto_compaction_retention.as_deref())
                .unwrap_or(AutoCompaction::DEFAULT_RETENTION),
        )
    }
}

impl EtcdArgs {
    pub fn config(&self) -> Result<ServerConfig, AutoCompactionError> {
        let mut config = ServerConfig::new(&self.data_dir);
        config.checkpoint_interval = Duration::from_millis(self.checkpoint_interval_ms);
        config.auto_compaction = self.auto_compaction.setting()?;
        Ok(config)
    }
}

pub async fn run(args: EtcdArgs) -> anyhow::Result<()> {
    // Before anything else, so a Ctrl-C during start-up still stops us cleanly.
    let mut signals = crate::shutdown::Signals::install();
    let server = Server::open(args.config()?)
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

    fn config(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let argv = std::iter::once("etcd").chain(args.iter().copied());
        Ok(Cmd::try_parse_from(argv)?.etcd.config()?)
    }

    #[test]
    fn flags_reach_the_server_config() {
        let defaults = config(&[]).expect("defaults");
        assert_eq!(defaults.checkpoint_interval, Duration::from_millis(100));
        assert_eq!(defaults.auto_compaction, None);
        let set = config(&[
            "--checkpoint-interval-ms",
            "250",
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1000",
        ])
        .expect("flags");
        assert_eq!(set.checkpoint_interval, Duration::from_millis(250));
        assert_eq!(set.auto_compaction, Some(AutoCompaction::revisions(1000)));
        // etcd's default mode is periodic, where a bare number is hours.
        let hours = config(&["--auto-compaction-retention", "2"]).expect("flags");
        let two_hours = AutoCompaction::periodic(Duration::from_secs(2 * 3600));
        assert_eq!(hours.auto_compaction, Some(two_hours));
        let span = config(&["--auto-compaction-retention", "1h30m"]).expect("flags");
        let ninety_minutes = AutoCompaction::periodic(Duration::from_secs(90 * 60));
        assert_eq!(span.auto_compaction, Some(ninety_minutes));
        for bad in [
            &["--auto-compaction-retention", "-1"][..],
            &[
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                "1h",
            ],
            &["--auto-compaction-mode", "hourly"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} accepted");
        }
    }
}
