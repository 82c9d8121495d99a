//! The server's command line, one definition for every program that runs it: the
//! `revwatch-server` binary, `revwatch etcd` (which flattens [`ServerArgs`] into its
//! own command line), and programs that run the server as a child process of their own
//! (the proof's soak does, so that it can `kill -9`, freeze and restart it on the same
//! data directory):
//!
//! `[--data-dir DIR] [--listen ADDR] [--checkpoint-interval-ms N]
//! [--auto-compaction-mode periodic|revision] [--auto-compaction-retention VALUE]`.
//!
//! [`main`] prints `listening on ADDR` once it accepts connections, and stops on Ctrl-C
//! or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser};

use crate::{AutoCompaction, AutoCompactionError, Server, ServerConfig, ServerError};

/// The embedded server's flags.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Directory for the data (created if missing).
    #[arg(long, default_value = "revwatch-data")]
    pub data_dir: PathBuf,
    /// Address to serve the etcd v3 gRPC API on.
    #[arg(long, default_value = "127.0.0.1:2379")]
    pub listen: SocketAddr,
    /// How long logged writes may wait before they are copied into the database file, in
    /// milliseconds. A write is durable once its log record is fsynced; this only bounds
    /// how much log a restart replays.
    // Negative numbers are read as values, so that `-1` is refused as one.
    #[arg(long, default_value_t = 100, allow_negative_numbers = true)]
    pub checkpoint_interval_ms: u64,
    #[command(flatten)]
    pub auto_compaction: AutoCompactionArgs,
}

impl ServerArgs {
    /// The server's configuration; an error for auto-compaction flags etcd would refuse.
    pub fn config(&self) -> Result<ServerConfig, AutoCompactionError> {
        let mut config = ServerConfig::new(&self.data_dir);
        config.checkpoint_interval = Duration::from_millis(self.checkpoint_interval_ms);
        config.auto_compaction = self.auto_compaction.setting()?;
        Ok(config)
    }
}

/// etcd's auto-compaction flags, for every command that runs the embedded server.
#[derive(Debug, Default, Clone, Args)]
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

/// Embedded single-node etcd v3-compatible server (`revwatch etcd` runs the same).
#[derive(Debug, Parser)]
#[command(name = "revwatch-server", version)]
struct Command {
    #[command(flatten)]
    server: ServerArgs,
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<ServerArgs, clap::Error> {
    let argv = std::iter::once("revwatch-server".to_owned()).chain(args);
    Command::try_parse_from(argv).map(|c| c.server)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Opens the data directory and serves on `listen` until SIGTERM or Ctrl-C.
pub async fn run(config: ServerConfig, listen: SocketAddr) -> Result<(), ServerError> {
    let server = Server::open(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(ServerError::Listen)?;
    let addr = listener.local_addr().map_err(ServerError::Listen)?;
    println!("listening on {addr}");
    server.serve(listener, terminated()).await
}

/// The whole program on the arguments after its name: exit code 2 for a bad command
/// line (0 for `--help` and `--version`), 1 when the server fails.
pub async fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match parse(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and version go to stdout, errors with the usage to stderr.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("revwatch-server: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config, args.listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("revwatch-server: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(list: &[&str]) -> Result<(ServerArgs, ServerConfig), String> {
        let args = parse(list.iter().map(|s| (*s).to_owned())).map_err(|e| e.to_string())?;
        let config = args.config().map_err(|e| e.to_string())?;
        Ok((args, config))
    }

    #[test]
    fn flags_reach_the_server_config_and_bad_ones_are_explained() {
        let (args, set) = config(&[
            "--data-dir",
            "d",
            "--listen",
            "127.0.0.1:0",
            "--checkpoint-interval-ms",
            "250",
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1000",
        ])
        .expect("valid flags");
        assert_eq!(args.data_dir, PathBuf::from("d"));
        assert_eq!(args.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(set.checkpoint_interval, Duration::from_millis(250));
        assert_eq!(set.auto_compaction, Some(AutoCompaction::revisions(1000)));

        let (args, defaults) = config(&[]).expect("defaults");
        assert_eq!(args.data_dir, PathBuf::from("revwatch-data"));
        assert_eq!(args.listen, SocketAddr::from(([127, 0, 0, 1], 2379)));
        assert_eq!(defaults.checkpoint_interval, Duration::from_millis(100));
        assert_eq!(defaults.auto_compaction, None);

        // etcd's default mode is periodic, where a bare number is hours.
        let (_, hours) = config(&["--auto-compaction-retention", "2"]).expect("flags");
        let two_hours = AutoCompaction::periodic(Duration::from_secs(2 * 3600));
        assert_eq!(hours.auto_compaction, Some(two_hours));
        let (_, span) = config(&["--auto-compaction-retention", "1h30m"]).expect("flags");
        let ninety_minutes = AutoCompaction::periodic(Duration::from_secs(90 * 60));
        assert_eq!(span.auto_compaction, Some(ninety_minutes));

        for (bad, says) in [
            (&["--bogus"][..], "--bogus"),
            (&["--listen", "nowhere"], "--listen"),
            (
                &["--checkpoint-interval-ms", "x"],
                "--checkpoint-interval-ms",
            ),
            (&["--auto-compaction-mode", "hourly"], "hourly"),
            (&["--auto-compaction-retention", "-1"], "-1"),
            (
                &[
                    "--auto-compaction-mode",
                    "revision",
                    "--auto-compaction-retention",
                    "1h",
                ],
                "1h",
            ),
        ] {
            let error = config(bad).expect_err(&format!("{bad:?} accepted"));
            assert!(error.contains(says), "{bad:?}: {error}");
        }
        let help = parse(["--help".to_owned()]).expect_err("help");
        assert!(!help.use_stderr(), "help goes to stdout and exits 0");
    }
}
