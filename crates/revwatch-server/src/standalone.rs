//! The standalone server's command line, shared by the `revwatch-server` binary and by
//! programs that run the server as a child process of their own (the proof's soak does,
//! so that it can `kill -9`, freeze and restart it on the same data directory):
//!
//! `--data-dir DIR [--listen ADDR] [--checkpoint-interval-ms N]
//! [--auto-compaction-mode periodic|revision] [--auto-compaction-retention VALUE]`.
//!
//! [`main`] prints `listening on ADDR` once it accepts connections, and stops on Ctrl-C
//! or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::{AutoCompaction, Server, ServerConfig, ServerError};

/// The usage line, printed for `--help` and after a bad argument.
pub const USAGE: &str = "usage: revwatch-server --data-dir DIR [--listen ADDR (default 127.0.0.1:2379)] \
     [--checkpoint-interval-ms N (default 100)] \
     [--auto-compaction-mode periodic|revision (default periodic)] \
     [--auto-compaction-retention VALUE (periodic: hours or a duration such as 30m; \
     revision: a revision count; default 0: off)]";

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    /// `--data-dir`.
    pub data_dir: String,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--checkpoint-interval-ms`, if given.
    pub checkpoint_interval: Option<Duration>,
    /// The auto-compaction flags, read as etcd reads them.
    pub auto_compaction: Option<AutoCompaction>,
}

/// The value of `flag`, a whole number.
fn number(flag: &str, value: Option<String>) -> Result<u64, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|e| format!("bad {flag} {value:?}: {e}"))
}

/// Parses the arguments after the program name; the error is the message to print
/// (the usage, for `--help`).
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut data_dir = None;
    let mut listen = "127.0.0.1:2379".to_owned();
    let mut checkpoint_interval = None;
    let mut auto_compaction_mode = AutoCompaction::DEFAULT_MODE.to_owned();
    let mut auto_compaction_retention = AutoCompaction::DEFAULT_RETENTION.to_owned();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--data-dir" => data_dir = args.next(),
            "--listen" => listen = args.next().ok_or("--listen needs a value")?,
            "--checkpoint-interval-ms" => {
                let ms = number(&arg, args.next())?;
                checkpoint_interval = Some(Duration::from_millis(ms));
            }
            "--auto-compaction-mode" => {
                auto_compaction_mode = args.next().ok_or("--auto-compaction-mode needs a value")?;
            }
            "--auto-compaction-retention" => {
                auto_compaction_retention = args
                    .next()
                    .ok_or("--auto-compaction-retention needs a value")?;
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let data_dir = data_dir.ok_or_else(|| USAGE.to_owned())?;
    let listen = listen
        .parse()
        .map_err(|e| format!("bad --listen {listen:?}: {e}"))?;
    let auto_compaction =
        AutoCompaction::from_etcd_flags(&auto_compaction_mode, &auto_compaction_retention)
            .map_err(|e| e.to_string())?;
    Ok(Args {
        data_dir,
        listen,
        checkpoint_interval,
        auto_compaction,
    })
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

/// Opens the data directory and serves until SIGTERM or Ctrl-C.
pub async fn run(args: Args) -> Result<(), ServerError> {
    let mut config = ServerConfig::new(args.data_dir);
    if let Some(interval) = args.checkpoint_interval {
        config.checkpoint_interval = interval;
    }
    config.auto_compaction = args.auto_compaction;
    let server = Server::open(config)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(ServerError::Listen)?;
    let addr = listener.local_addr().map_err(ServerError::Listen)?;
    println!("listening on {addr}");
    server.serve(listener, terminated()).await
}

/// The whole program on the arguments after its name: exit code 2 for a bad command
/// line, 1 when the server fails.
pub async fn main(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match parse(args) {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
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

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn flags_are_read_and_bad_ones_explained() {
        let a = args(&[
            "--data-dir",
            "d",
            "--listen",
            "127.0.0.1:0",
            "--checkpoint-interval-ms",
            "50",
            "--auto-compaction-mode",
            "periodic",
            "--auto-compaction-retention",
            "1s",
        ])
        .expect("valid flags");
        assert_eq!(a.data_dir, "d");
        assert_eq!(a.listen, SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(a.checkpoint_interval, Some(Duration::from_millis(50)));
        assert_eq!(
            a.auto_compaction,
            Some(AutoCompaction::periodic(Duration::from_secs(1)))
        );
        let defaults = args(&["--data-dir", "d"]).expect("defaults");
        assert_eq!(defaults.listen, SocketAddr::from(([127, 0, 0, 1], 2379)));
        assert_eq!(defaults.auto_compaction, None);
        assert_eq!(args(&[]), Err(USAGE.to_owned()));
        assert_eq!(args(&["--help"]), Err(USAGE.to_owned()));
        let unknown = args(&["--data-dir", "d", "--bogus"]).unwrap_err();
        assert!(unknown.contains("\"--bogus\""), "{unknown}");
        let bad = args(&["--data-dir", "d", "--listen", "nowhere"]).unwrap_err();
        assert!(bad.contains("bad --listen"), "{bad}");
        let bad = args(&["--data-dir", "d", "--checkpoint-interval-ms", "x"]).unwrap_err();
        assert!(bad.contains("bad --checkpoint-interval-ms"), "{bad}");
        assert!(args(&["--data-dir", "d", "--auto-compaction-mode", "sometimes"]).is_err());
    }
}
