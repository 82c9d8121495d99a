//! `revwatch tail`: mirror a prefix and print every delivered batch.

use std::{io::Write, net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::Args;
use revwatch::{
    client::{ClientConfig, Credentials, Pem, TlsConfig},
    mirror::{ClientSource, Mirror, MirrorConfig, Status, Update},
};
use revwatch_server::{RunningServer, Server, ServerConfig};

use crate::render;

/// Mirror an etcd prefix and print every delivered batch (state changes go to stderr).
#[derive(Debug, Args)]
pub struct TailArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, value_delimiter = ',', required_unless_present = "embedded")]
    pub endpoints: Vec<String>,
    /// The key prefix to mirror ("" or "/" for a whole tree).
    #[arg(long)]
    pub prefix: String,
    /// One JSON object per line instead of human-readable text.
    #[arg(long)]
    pub json: bool,
    /// Persist the mirror here, so a restart resumes without relisting.
    #[arg(long)]
    pub snapshot_file: Option<PathBuf>,
    /// Start the embedded etcd-compatible server and mirror it (no etcd needed).
    #[arg(long, conflicts_with = "endpoints")]
    pub embedded: bool,
    /// With --embedded: where the server keeps its data.
    #[arg(long, default_value = "revwatch-data", requires = "embedded")]
    pub data_dir: PathBuf,
    /// With --embedded: the address it serves on, for etcdctl and other clients.
    #[arg(long, default_value = "127.0.0.1:2379", requires = "embedded")]
    pub listen: SocketAddr,
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

impl TailArgs {
    fn client_config(&self, endpoints: Vec<String>) -> anyhow::Result<ClientConfig> {
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
            config.credentials = Some(Credentials {
                user: user.clone(),
                password,
            });
        }
        Ok(config)
    }
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    // Keep the embedded server alive for as long as we tail it.
    let (endpoints, _embedded) = if args.embedded {
        let server = start_embedded(&args).await?;
        (vec![server.endpoint()], Some(server))
    } else {
        (args.endpoints.clone(), None)
    };

    let config = MirrorConfig {
        snapshot_file: args.snapshot_file.clone(),
        ..MirrorConfig::default()
    };
    let source = ClientSource::lazy(args.client_config(endpoints)?)?;
    let mirror = Mirror::builder(args.prefix.as_bytes())
        .config(config)
        .start(source)
        .await?;

    tokio::select! {
        r = follow(&mirror, args.json) => r,
        () = crate::shutdown::signal() => Ok(()),
    }
}

async fn start_embedded(args: &TailArgs) -> anyhow::Result<RunningServer> {
    let server = Server::open(ServerConfig::new(&args.data_dir))
        .with_context(|| format!("opening data dir {}", args.data_dir.display()))?;
    let running = server
        .start_on(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    eprintln!(
        "revwatch: embedded etcd-compatible server at {} (data in {})",
        running.endpoint(),
        args.data_dir.display()
    );
    Ok(running)
}

/// Prints deliveries and status changes until the mirror stops or stdout closes.
async fn follow(mirror: &Mirror, as_json: bool) -> anyhow::Result<()> {
    let mut updates = mirror.subscribe();
    let mut status = mirror.status_changes();
    let mut last = status.borrow_and_update().clone();
    let mut out = std::io::stdout().lock();
    loop {
        tokio::select! {
            update = updates.recv() => {
                let text = match update {
                    None => return Ok(()),
                    // The empty state before the first list has nothing to show.
                    Some(Update::Snapshot(s)) if s.is_empty() => continue,
                    Some(Update::Snapshot(s)) => render::snapshot(&s, as_json),
                    Some(Update::Batch(b)) => render::batch(&b, as_json),
                    Some(Update::Progress(_)) => continue,
                };
                // A closed pipe (e.g. `| head`) ends the command quietly.
                if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
                    return Ok(());
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = status.borrow_and_update().clone();
                report_status(&last, &now);
                last = now;
            }
        }
    }
}

/// State changes, relists and new errors, on stderr.
fn report_status(before: &Status, now: &Status) {
    if now.state != before.state {
        eprintln!("revwatch: {} at revision {}", now.state, now.revision);
    }
    for (cause, n) in &now.relists {
        if before.relists.get(cause) != Some(n) {
            eprintln!(
                "revwatch: relist ({}) at revision {}",
                cause.as_str(),
                now.revision
            );
        }
    }
    for (cause, n) in &now.reconnects {
        if before.reconnects.get(cause) != Some(n) {
            eprintln!(
                "revwatch: reconnecting ({}) from revision {}",
                cause.as_str(),
                now.revision
            );
        }
    }
    if let Some(e) = &now.failing
        && before.failing.as_ref().map(|b| &b.message) != Some(&e.message)
    {
        eprintln!("revwatch: {}: {}", e.kind, e.message);
    }
}
