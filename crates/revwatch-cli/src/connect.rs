//! How commands reach etcd, shared by every subcommand: the TLS and auth flags, the
//! embedded server for the no-install default, and how far etcd compacted.

use std::{net::SocketAddr, path::Path, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Args;
use etcd_proto::key_range::KeyRange;
use revwatch::client::{Client, ClientConfig, Pem, TlsConfig, WatchCreateRequest};
use revwatch::mirror::ProgressTrust;
use revwatch_server::{AutoCompaction, RunningServer, Server, ServerConfig};

/// TLS and authentication flags for etcd endpoints.
#[derive(Debug, Args)]
pub struct EtcdAccessArgs {
    /// CA certificate (PEM) for TLS endpoints.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM), with --key.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM), with --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// etcd user; the password is read from REVWATCH_PASSWORD.
    #[arg(long)]
    pub user: Option<String>,
}

impl EtcdAccessArgs {
    /// A client configuration for `endpoints` with these flags.
    pub fn client_config(&self, endpoints: Vec<String>) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new(endpoints);
        if let Some(ca) = &self.cacert {
            let mut tls = TlsConfig::with_ca_file(ca);
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls.identity = Some((Pem::Path(cert.clone()), Pem::Path(key.clone())));
            }
            config = config.with_tls(tls);
        }
        if let Some(user) = &self.user {
            let password = std::env::var("REVWATCH_PASSWORD")
                .context("--user needs the password in REVWATCH_PASSWORD")?;
            config = config.with_credentials(user.clone(), password);
        }
        Ok(config)
    }
}

/// Opens the embedded server's data in `data_dir` and serves it on `listen`.
pub async fn start_embedded(
    data_dir: &Path,
    listen: SocketAddr,
    auto_compaction: Option<AutoCompaction>,
) -> anyhow::Result<RunningServer> {
    let config = ServerConfig::new(data_dir).with_auto_compaction(auto_compaction);
    let server =
        Server::open(config).with_context(|| format!("opening data dir {}", data_dir.display()))?;
    let running = server
        .start_on(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "revwatch: embedded etcd-compatible server at {} (data in {})",
        running.endpoint(),
        data_dir.display()
    );
    Ok(running)
}

/// `--progress-trust`: how far a mirror trusts progress replies as bookmarks.
#[derive(Debug, Args)]
pub struct ProgressTrustArgs {
    /// How far a progress reply from the server is trusted as a bookmark, which a
    /// quiet prefix needs to show that it is up to date (read-your-writes, fully
    /// consistent decisions). `immediate`: at once, for servers that answer only
    /// once the watch has caught up (etcd 3.4.31+, 3.5.13+, 3.6, the embedded
    /// server). `confirmed`: once a read shows the prefix unchanged, for older
    /// etcd, which may answer before the events it covers (etcd#15220).
    /// [default: immediate on the embedded server, confirmed otherwise]
    #[arg(long, value_enum, value_name = "TRUST")]
    pub progress_trust: Option<ProgressTrustArg>,
}

/// The values of `--progress-trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressTrustArg {
    Confirmed,
    Immediate,
}

impl ProgressTrustArgs {
    /// The trust for a mirror of the embedded server (`embedded`) or of an
    /// outside one. The flag's if given; else immediate for the embedded server,
    /// which answers a progress request only once the stream has caught up, and
    /// the library's default (safe for etcd 3.4) for any other.
    pub fn resolve(&self, embedded: bool) -> ProgressTrust {
        match (self.progress_trust, embedded) {
            (Some(ProgressTrustArg::Confirmed), _) => ProgressTrust::Confirmed,
            (Some(ProgressTrustArg::Immediate), _) | (None, true) => ProgressTrust::Immediate,
            (None, false) => ProgressTrust::default(),
        }
    }
}

/// How long the embedded server may take to close its connections at exit.
const EMBEDDED_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Stops the embedded server, waiting a bounded time for its connections to close.
pub async fn stop_embedded(server: RunningServer) {
    match tokio::time::timeout(EMBEDDED_STOP_TIMEOUT, server.shutdown()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("revwatch: stopping the embedded server: {e}"),
        Err(_) => eprintln!(
            "revwatch: the embedded server did not close its connections within {EMBEDDED_STOP_TIMEOUT:?}"
        ),
    }
}

/// How long to wait for etcd to name its compaction revision.
const COMPACTION_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The revision etcd compacted at, asked with a watch of `range` from `revision`
/// (etcd's range errors do not carry it; a watch's cancellation does). `None` when
/// etcd does not say in time.
pub async fn compacted_at(client: &Client, range: &KeyRange, revision: i64) -> Option<i64> {
    let request = WatchCreateRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        start_revision: revision,
        ..Default::default()
    };
    let query = async {
        let mut stream = client.watch(request).await.ok()?;
        loop {
            let message = stream.message().await.ok()??;
            if message.compact_revision > 0 {
                return Some(message.compact_revision);
            }
            if message.canceled || !message.events.is_empty() {
                return None;
            }
        }
    };
    tokio::time::timeout(COMPACTION_QUERY_TIMEOUT, query)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_trust_is_the_flags_else_immediate_only_on_the_embedded_server() {
        let args = |progress_trust| ProgressTrustArgs { progress_trust };
        for embedded in [false, true] {
            let confirmed = args(Some(ProgressTrustArg::Confirmed));
            assert_eq!(confirmed.resolve(embedded), ProgressTrust::Confirmed);
            let immediate = args(Some(ProgressTrustArg::Immediate));
            assert_eq!(immediate.resolve(embedded), ProgressTrust::Immediate);
        }
        assert_eq!(args(None).resolve(true), ProgressTrust::Immediate);
        assert_eq!(args(None).resolve(false), ProgressTrust::Confirmed);
    }
}
