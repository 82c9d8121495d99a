//! `revwatch etcd`: the embedded single-node etcd-compatible server.

use anyhow::Context;
use clap::Args;
use revwatch_server::Server;
use revwatch_server::standalone::ServerArgs;

/// Run the embedded single-node etcd v3-compatible server (no etcd install needed).
///
/// It is single-node by design: for high availability and scale-out use a real etcd
/// cluster.
#[derive(Debug, Args)]
pub struct EtcdArgs {
    #[command(flatten)]
    pub server: ServerArgs,
}

pub async fn run(EtcdArgs { server: args }: EtcdArgs) -> anyhow::Result<()> {
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
    use std::time::Duration;

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    /// The flags are the server's own (parsed and tested there): one of them
    /// reaching the config shows they are flattened in.
    #[test]
    fn the_servers_flags_are_revwatch_etcds() {
        let argv = ["etcd", "--checkpoint-interval-ms", "250"];
        let etcd = Cmd::try_parse_from(argv).expect("flags").etcd;
        let config = etcd.server.config().expect("config");
        assert_eq!(config.checkpoint_interval, Duration::from_millis(250));
        assert!(Cmd::try_parse_from(["etcd", "--auto-compaction-mode", "hourly"]).is_err());
    }
}
