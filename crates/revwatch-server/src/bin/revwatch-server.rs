//! Standalone embedded server:
//! `revwatch-server --data-dir DIR [--listen ADDR] [--checkpoint-interval-ms N]
//! [--auto-compaction-mode periodic|revision] [--auto-compaction-retention VALUE]`.
//!
//! Prints `listening on ADDR` once it accepts connections, and stops on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use revwatch_server::{AutoCompaction, Server, ServerConfig};

const USAGE: &str = "usage: revwatch-server --data-dir DIR [--listen ADDR (default 127.0.0.1:2379)] \
     [--checkpoint-interval-ms N (default 100)] \
     [--auto-compaction-mode periodic|revision (default periodic)] \
     [--auto-compaction-retention VALUE (periodic: hours or a duration such as 30m; \
     revision: a revision count; default 0: off)]";

struct Args {
    data_dir: String,
    listen: SocketAddr,
    checkpoint_interval: Option<Duration>,
    auto_compaction: Option<AutoCompaction>,
}

/// The value of `flag`, a whole number.
fn number(flag: &str, value: Option<String>) -> Result<u64, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|e| format!("bad {flag} {value:?}: {e}"))
}

fn parse() -> Result<Args, String> {
    let mut data_dir = None;
    let mut listen = "127.0.0.1:2379".to_owned();
    let mut checkpoint_interval = None;
    let mut auto_compaction_mode = AutoCompaction::DEFAULT_MODE.to_owned();
    let mut auto_compaction_retention = AutoCompaction::DEFAULT_RETENTION.to_owned();
    let mut args = std::env::args().skip(1);
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

/// The allocator `revwatch etcd` uses (see the README's Benchmarks).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    let result = async {
        let mut config = ServerConfig::new(args.data_dir);
        if let Some(interval) = args.checkpoint_interval {
            config.checkpoint_interval = interval;
        }
        config.auto_compaction = args.auto_compaction;
        let server = Server::open(config)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(revwatch_server::ServerError::Listen)?;
        let addr = listener
            .local_addr()
            .map_err(revwatch_server::ServerError::Listen)?;
        println!("listening on {addr}");
        server.serve(listener, terminated()).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("revwatch-server: {e}");
            ExitCode::FAILURE
        }
    }
}
