//! `revwatch serve`: a policy decision point over HTTP, following a prefix of etcd
//! (or of the embedded server).

pub(crate) mod api;
mod decision_log;
mod errors;
mod http;
mod metrics;
pub(crate) mod mirror_digest;
mod register;
mod report;
mod seed;
mod startup;
mod unix_socket;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, ValueEnum};
use revwatch::mirror::{ClientSource, Mirror, MirrorConfig};
use revwatch_policy::{Backend, Policies, PolicyConfig};
use revwatch_server::AutoCompaction;
use revwatch_server::standalone::AutoCompactionArgs;

use crate::{
    connect::{EtcdAccessArgs, ProgressTrustArgs, start_embedded, stop_embedded},
    shutdown::Signals,
};

/// Revisions the embedded server keeps when no auto-compaction flag is given: enough
/// to replay months of policy changes at human rates, while its in-memory history
/// stays bounded however fast keys are written.
const EMBEDDED_RETENTION_REVISIONS: u64 = 10_000;

/// Serve authorization decisions over HTTP from policies kept in etcd.
///
/// Without --endpoints, it starts the embedded etcd-compatible server (data in
/// --data-dir, clients on --etcd-listen, so etcdctl works) with auto-compaction
/// keeping the last 10000 revisions (override with --auto-compaction-*), and on
/// first start (nothing under the prefix) writes an example policy set.
///
/// API: POST /v1/authorize, POST /v1/authorize/batch, GET /v1/status,
/// GET /v1/mirror/digest (for `revwatch verify --url`), GET /health/live,
/// GET /health/ready, GET /metrics. With a token (--token-file or REVWATCH_TOKEN),
/// /v1/* and /metrics need `Authorization: Bearer TOKEN`.
///
/// Each instance registers itself for `revwatch fleet` under PREFIX.revwatch/fleet/
/// with a 10 s lease (a killed instance leaves the list within 10 s).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// etcd endpoints, comma-separated. Without them, the embedded server is used.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    /// The key prefix holding the policy files (a file `a.cedar` is the key PREFIXa.cedar).
    #[arg(long, default_value = "/revwatch/policies/")]
    pub prefix: String,
    /// The policy engine.
    #[arg(long, value_enum, default_value_t = BackendArg::Cedar)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub access: EtcdAccessArgs,
    #[command(flatten)]
    pub progress: ProgressTrustArgs,
    /// Address of the HTTP API.
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub listen: SocketAddr,
    /// Also serve the HTTP API on this Unix socket (a stale socket there is replaced;
    /// the socket is removed at exit).
    #[arg(long, value_name = "PATH")]
    pub unix_socket: Option<PathBuf>,
    /// File holding the bearer token clients must send (else REVWATCH_TOKEN, else none).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Listen on a non-loopback --listen address without a token.
    #[arg(long)]
    pub allow_unauthenticated_remote: bool,
    /// Persist the mirror here, so a restart serves the last policies before etcd answers.
    #[arg(long)]
    pub snapshot_file: Option<PathBuf>,
    /// Deny every request (fail closed) once the mirror has been out of sync with etcd
    /// this long (e.g. 30s, 5m). Default: never.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_staleness: Option<Duration>,
    /// How long a request with min_revision or fully_consistent waits for a fresh set.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub fresh_wait: Duration,
    /// Log each decision as a JSON line to this file, or to stdout with `-`.
    #[arg(long, value_name = "PATH|-")]
    pub decision_log: Option<String>,
    /// Share of decisions logged, from 0 to 1.
    #[arg(long, default_value_t = 1.0, requires = "decision_log")]
    pub decision_log_sample: f64,
    /// Largest accepted request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Without --endpoints: where the embedded server keeps its data.
    #[arg(long, default_value = "revwatch-data", conflicts_with = "endpoints")]
    pub data_dir: PathBuf,
    /// Without --endpoints: the embedded server's address, for etcdctl and other clients.
    #[arg(long, default_value = "127.0.0.1:2379", conflicts_with = "endpoints")]
    pub etcd_listen: SocketAddr,
    /// Without --endpoints: the embedded server's compaction.
    #[command(flatten)]
    pub auto_compaction: AutoCompactionArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BackendArg {
    Cedar,
    Casbin,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Cedar => Backend::Cedar,
            BackendArg::Casbin => Backend::Casbin,
        }
    }
}

impl ServeArgs {
    fn embedded(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The embedded server's compaction: the flags', else the serve default.
    fn compaction(&self) -> anyhow::Result<Option<AutoCompaction>> {
        if self.auto_compaction.is_set() {
            Ok(self.auto_compaction.setting()?)
        } else {
            Ok(Some(AutoCompaction::revisions(
                EMBEDDED_RETENTION_REVISIONS,
            )))
        }
    }
}

/// The bearer token: from `token_file` (--token-file), else REVWATCH_TOKEN, else
/// none. `serve` requires it of clients; `verify --url` sends it.
pub(crate) fn read_token(token_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let (token, from) = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            (text, "--token-file")
        }
        None => match std::env::var("REVWATCH_TOKEN") {
            Ok(text) => (text, "REVWATCH_TOKEN"),
            Err(_) => return Ok(None),
        },
    };
    let token = token.trim();
    anyhow::ensure!(!token.is_empty(), "the token in {from} is empty");
    anyhow::ensure!(
        token.bytes().all(|b| b.is_ascii_graphic()),
        "the token in {from} must be printable ASCII without spaces"
    );
    Ok(Some(token.to_owned()))
}

/// What the embedded server keeps of its history.
fn history(compaction: Option<AutoCompaction>) -> String {
    match compaction {
        None => "keeps all history (auto-compaction off)".to_owned(),
        Some(AutoCompaction::Revision {
            retention,
            interval,
        }) => {
            format!("keeps the last {retention} revisions (compacting every {interval:?})")
        }
        Some(AutoCompaction::Periodic { retention }) => {
            format!("keeps about {retention:?} of history")
        }
    }
}

/// How long start-up waits for a first policy set before serving without one.
const FIRST_SET_WAIT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything else, so a Ctrl-C during start-up still stops us cleanly.
    let mut signals = Signals::install();
    anyhow::ensure!(
        args.embedded() || !args.auto_compaction.is_set(),
        "--auto-compaction-mode and --auto-compaction-retention set the embedded server's \
         compaction: they cannot be used with --endpoints"
    );
    let token = read_token(args.token_file.as_deref())?;
    anyhow::ensure!(
        token.is_some() || args.listen.ip().is_loopback() || args.allow_unauthenticated_remote,
        "--listen {} is not a loopback address: set a token (--token-file or REVWATCH_TOKEN) \
         or pass --allow-unauthenticated-remote",
        args.listen
    );
    let backend = Backend::from(args.backend);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let url = format!("http://{}", listener.local_addr().unwrap_or(args.listen));
    let unix = match &args.unix_socket {
        Some(path) => Some(unix_socket::UnixSocket::bind(path)?),
        None => None,
    };

    let embedded = if args.embedded() {
        let compaction = args.compaction()?;
        let server = start_embedded(&args.data_dir, args.etcd_listen, compaction).await?;
        eprintln!(
            "revwatch serve: the embedded server {}",
            history(compaction)
        );
        Some(server)
    } else {
        None
    };
    let endpoints = match &embedded {
        Some(server) => vec![server.endpoint()],
        None => args.endpoints.clone(),
    };
    let client_config = args.access.client_config(endpoints.clone())?;
    if embedded.is_some() {
        startup::seed(&client_config, &args.prefix, backend, &endpoints[0], &url).await?;
    }

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    // Field by field: `MirrorConfig` may become non-exhaustive, ruling out a literal.
    #[allow(clippy::field_reassign_with_default)]
    let mirror_config = {
        let mut config = MirrorConfig::default();
        config.snapshot_file = args.snapshot_file.clone();
        config.progress_trust = args.progress.resolve(embedded.is_some());
        config
    };
    let mirror = Mirror::builder(args.prefix.as_bytes())
        .config(mirror_config)
        .register_metrics(&mut registry)
        .start(ClientSource::lazy(client_config.clone())?)
        .await?;
    let mut policy_config = PolicyConfig::new(backend).fresh_wait(args.fresh_wait);
    if let Some(max) = args.max_staleness {
        policy_config = policy_config.max_staleness(max);
    }
    let policies = Policies::start(mirror.clone(), args.prefix.clone(), policy_config);
    let follower = tokio::spawn(startup::follow_status(policies.clone(), metrics.clone()));
    let fleet_metrics = register::register_metrics(&mut registry, mirror.clone(), &args.prefix);
    let log = match &args.decision_log {
        Some(target) => Some(decision_log::DecisionLog::open(
            target,
            args.decision_log_sample,
            decision_log::Labels {
                backend: report::backend_name(backend),
                prefix: args.prefix.clone(),
            },
            metrics.clone(),
        )?),
        None => None,
    };
    eprintln!(
        "revwatch serve: backend {}, prefix {}, etcd {}",
        report::backend_name(backend),
        args.prefix,
        endpoints.join(",")
    );

    let app = Arc::new(http::App {
        policies: policies.clone(),
        mirror: mirror.clone(),
        backend,
        prefix: args.prefix.clone(),
        registry,
        metrics,
        log: log.clone(),
        token,
    });
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let router = http::router(app, args.max_body_bytes);
    let (unix_listener, unix_socket) = match unix {
        Some(unix) => {
            let (listener, socket) = unix.split();
            (Some(listener), Some(socket))
        }
        None => (None, None),
    };
    let tcp_server = startup::serve(listener, router.clone(), stopped.clone());
    let server = tokio::spawn(async move {
        match unix_listener {
            Some(unix) => {
                tokio::try_join!(tcp_server, startup::serve(unix, router, stopped)).map(|_| ())
            }
            None => tcp_server.await,
        }
    });
    let also = match &unix_socket {
        Some(socket) => format!(" and unix:{}", socket.path().display()),
        None => String::new(),
    };
    eprintln!(
        "revwatch serve: listening on {url}{also} (POST /v1/authorize, /v1/authorize/batch; \
         GET /v1/status, /v1/mirror/digest, /health/live, /health/ready, /metrics)"
    );
    // Registered once the first set is in (or the wait is over): the registration is
    // a write under the prefix, which must not move the revision start-up reports.
    let registrar = tokio::select! {
        () = startup::report_first_set(&policies, &mirror, FIRST_SET_WAIT) => Some(
            register::Registrar::start(
                client_config,
                &args.prefix,
                &url,
                policies.clone(),
                mirror.clone(),
            ),
        ),
        () = signals.recv() => None,
    };
    if registrar.is_some() {
        signals.recv().await;
    }

    eprintln!("revwatch serve: stopping (draining in-flight requests)");
    let _ = stop.send(true);
    tokio::select! {
        drained = tokio::time::timeout(DRAIN_TIMEOUT, server) => match drained {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("revwatch serve: HTTP server: {e}"),
            Ok(Err(e)) => eprintln!("revwatch serve: HTTP server task: {e}"),
            Err(_) => eprintln!("revwatch serve: requests still in flight after {DRAIN_TIMEOUT:?}"),
        },
        () = signals.recv() => eprintln!("revwatch serve: interrupted again: not draining"),
    }
    drop(unix_socket);
    follower.abort();
    fleet_metrics.abort();
    if let Some(registrar) = registrar {
        registrar.stop().await;
    }
    if let Some(log) = log {
        log.close(Duration::from_secs(2)).await;
    }
    drop(policies);
    // Its final snapshot file write lets a restart resume from the last revision.
    let stopped = mirror.shutdown().await.context("stopping the mirror");
    if let Some(server) = embedded {
        stop_embedded(server).await;
    }
    eprintln!("revwatch serve: stopped");
    stopped
}
