//! What cluster to start, and the etcd command line that follows from it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::TlsFiles;
use super::peers::ADVERTISED_PEER_HOST;
use crate::TestkitError;

/// etcd's `--auto-compaction-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompactionMode {
    /// Keep the last N revisions (checked every 5 minutes by etcd 3.4).
    #[default]
    Revision,
    /// Keep the history of the last retention period.
    Periodic,
}

/// Where the etcd binary is, unless `REVWATCH_ETCD_BIN` says otherwise.
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";
/// Where etcdctl is, unless `REVWATCH_ETCDCTL_BIN` says otherwise.
pub const DEFAULT_ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// What cluster to start. `ClusterOptions { members: 3, ..Default::default() }`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of members: 1 or 3.
    pub members: usize,
    /// Serve clients over TLS with client-certificate auth (see [`TlsFiles`]).
    /// Peers talk plain HTTP: tests only fault the client side.
    pub tls: bool,
    /// Root user name and password. When set, the user is created with the
    /// root role and auth is enabled before [`EtcdCluster::start`](super::EtcdCluster::start) returns.
    pub auth: Option<(String, String)>,
    /// `--auto-compaction-retention`: a revision count such as `"100"` in
    /// [`CompactionMode::Revision`], a duration such as `"2s"` in
    /// [`CompactionMode::Periodic`].
    pub auto_compaction_retention: Option<String>,
    /// How `auto_compaction_retention` is read. Note that etcd 3.4's
    /// revision-mode compactor only runs every 5 minutes; periodic mode with
    /// a retention under an hour compacts every retention period.
    pub auto_compaction_mode: CompactionMode,
    /// `--experimental-watch-progress-notify-interval`.
    pub progress_notify_interval: Option<Duration>,
    /// Raft heartbeat interval (etcd's default: 100 ms).
    pub heartbeat_interval: Duration,
    /// Raft election timeout (etcd's default: 1 s). Followers notice a dead
    /// leader after 1-2x this, so it bounds leader-loss test time. Much lower
    /// values cause spurious elections on a busy 2-core machine.
    pub election_timeout: Duration,
    /// Route peer (raft) traffic through one fault proxy per ordered pair of
    /// members, so that [`EtcdCluster::isolate`](super::EtcdCluster::isolate)
    /// and [`EtcdCluster::set_peer_link`](super::EtcdCluster::set_peer_link)
    /// can partition members while clients still reach them. Members then
    /// advertise an unroutable peer address (see the `etcd` module docs).
    pub peer_links: bool,
    /// Further etcd flags, appended last.
    pub extra_args: Vec<String>,
    /// The etcd binary; `None` means `$REVWATCH_ETCD_BIN`, else [`DEFAULT_ETCD_BIN`].
    pub etcd_bin: Option<PathBuf>,
    /// Run this etcd-compatible single-node server instead of etcd: one
    /// member, with the same kill -9, freeze and restart on its data dir.
    /// TLS, auth, peer links and progress notification are etcd's only.
    pub embedded: Option<EmbeddedServer>,
}

/// A command that runs revwatch's embedded server, `revwatch-server` or a
/// program that runs it the same way; the cluster appends `--data-dir DIR
/// --listen ADDR` and the auto-compaction flags to `args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedServer {
    /// The program.
    pub program: PathBuf,
    /// Its first arguments (for example a subcommand).
    pub args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            members: 1,
            tls: false,
            auth: None,
            auto_compaction_retention: None,
            auto_compaction_mode: CompactionMode::Revision,
            progress_notify_interval: None,
            heartbeat_interval: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            peer_links: false,
            extra_args: Vec::new(),
            etcd_bin: None,
            embedded: None,
        }
    }
}

/// The etcd binary to use: `explicit`, else `$REVWATCH_ETCD_BIN`, else
/// [`DEFAULT_ETCD_BIN`]; an error naming the install command if it is missing.
pub fn etcd_binary(explicit: Option<&Path>) -> Result<PathBuf, TestkitError> {
    let path = explicit
        .map(Path::to_owned)
        .or_else(|| std::env::var_os("REVWATCH_ETCD_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ETCD_BIN));
    if path.is_file() {
        Ok(path)
    } else {
        Err(TestkitError::EtcdNotFound { path })
    }
}

pub(crate) fn cluster_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "revwatch-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Formats a duration the way etcd's flags (Go's time.ParseDuration) read it.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

/// The full command line of member `i`. `ports` holds a client and a peer
/// port per member, in that order.
pub(crate) fn member_args(
    opts: &ClusterOptions,
    dir: &Path,
    ports: &[u16],
    token: &str,
    tls: Option<&TlsFiles>,
    i: usize,
) -> Vec<String> {
    if let Some(embedded) = &opts.embedded {
        return embedded_args(embedded, opts, dir, ports[2 * i]);
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    // With peer links, peers are reached through SOCKS routers that map the
    // advertised (unroutable) address's port to the loopback listener.
    let peer_host = if opts.peer_links {
        ADVERTISED_PEER_HOST
    } else {
        "127.0.0.1"
    };
    let peer_url = |i: usize| format!("http://{peer_host}:{}", ports[2 * i + 1]);
    let listen_peer_url = format!("http://127.0.0.1:{}", ports[2 * i + 1]);
    let initial_cluster = (0..opts.members)
        .map(|i| format!("m{i}={}", peer_url(i)))
        .collect::<Vec<_>>()
        .join(",");
    let client_url = format!("{scheme}://127.0.0.1:{}", ports[2 * i]);
    let mut args = vec![
        format!("--name=m{i}"),
        format!("--data-dir={}", dir.join(format!("m{i}.etcd")).display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={listen_peer_url}"),
        format!("--initial-advertise-peer-urls={}", peer_url(i)),
        format!("--initial-cluster={initial_cluster}"),
        "--initial-cluster-state=new".into(),
        format!("--initial-cluster-token={token}"),
        format!(
            "--heartbeat-interval={}",
            opts.heartbeat_interval.as_millis()
        ),
        format!("--election-timeout={}", opts.election_timeout.as_millis()),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ];
    if let Some(files) = tls {
        args.extend([
            format!("--cert-file={}", files.server_cert.display()),
            format!("--key-file={}", files.server_key.display()),
            format!("--trusted-ca-file={}", files.ca.display()),
            "--client-cert-auth".into(),
        ]);
    }
    args.extend(
        auto_compaction_flags(opts)
            .into_iter()
            .map(|(flag, value)| format!("{flag}={value}")),
    );
    if let Some(interval) = opts.progress_notify_interval {
        args.push(format!(
            "--experimental-watch-progress-notify-interval={}",
            go_duration(interval)
        ));
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

/// The auto-compaction flags and their values, which etcd and the embedded server
/// share.
fn auto_compaction_flags(opts: &ClusterOptions) -> Vec<(&'static str, String)> {
    let Some(retention) = &opts.auto_compaction_retention else {
        return Vec::new();
    };
    let mode = match opts.auto_compaction_mode {
        CompactionMode::Revision => "revision",
        CompactionMode::Periodic => "periodic",
    };
    vec![
        ("--auto-compaction-mode", mode.to_owned()),
        ("--auto-compaction-retention", retention.clone()),
    ]
}

/// The embedded server's command line (its flags take separate values).
fn embedded_args(
    embedded: &EmbeddedServer,
    opts: &ClusterOptions,
    dir: &Path,
    client_port: u16,
) -> Vec<String> {
    let mut args = embedded.args.clone();
    args.extend([
        "--data-dir".into(),
        dir.join("m0.data").display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{client_port}"),
    ]);
    for (flag, value) in auto_compaction_flags(opts) {
        args.extend([flag.to_owned(), value]);
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

/// Why `opts` cannot be started, if it cannot.
pub(crate) fn check(opts: &ClusterOptions) -> Result<(), TestkitError> {
    if opts.members != 1 && opts.members != 3 {
        return Err(TestkitError::InvalidOptions(format!(
            "members must be 1 or 3, not {}",
            opts.members
        )));
    }
    if opts.embedded.is_some() {
        let etcd_only = [
            (opts.members != 1, "more than one member"),
            (opts.tls, "TLS"),
            (opts.auth.is_some(), "auth"),
            (opts.peer_links, "peer links"),
            (
                opts.progress_notify_interval.is_some(),
                "a progress notify interval",
            ),
        ];
        if let Some((_, what)) = etcd_only.iter().find(|(set, _)| *set) {
            return Err(TestkitError::InvalidOptions(format!(
                "the embedded server does not take {what}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_reflects_the_options() {
        let opts = ClusterOptions {
            members: 3,
            auto_compaction_retention: Some("2s".into()),
            auto_compaction_mode: CompactionMode::Periodic,
            progress_notify_interval: Some(Duration::from_millis(1500)),
            extra_args: vec!["--quota-backend-bytes=1000000".into()],
            ..Default::default()
        };
        let ports = [10, 11, 20, 21, 30, 31];
        let args = member_args(&opts, Path::new("/d"), &ports, "tok", None, 1);
        for expected in [
            "--name=m1",
            "--data-dir=/d/m1.etcd",
            "--listen-client-urls=http://127.0.0.1:20",
            "--listen-peer-urls=http://127.0.0.1:21",
            "--initial-cluster=m0=http://127.0.0.1:11,m1=http://127.0.0.1:21,m2=http://127.0.0.1:31",
            "--initial-cluster-token=tok",
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            "--auto-compaction-mode=periodic",
            "--auto-compaction-retention=2s",
            "--experimental-watch-progress-notify-interval=1500ms",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} missing from {args:?}"
            );
        }
        assert_eq!(
            args.last().map(String::as_str),
            Some("--quota-backend-bytes=1000000")
        );
        assert!(!args.iter().any(|a| a.contains("cert")));
    }

    #[test]
    fn peer_links_advertise_the_unroutable_host_and_listen_on_loopback() {
        let opts = ClusterOptions {
            members: 3,
            peer_links: true,
            ..Default::default()
        };
        let ports = [10, 11, 20, 21, 30, 31];
        let args = member_args(&opts, Path::new("/d"), &ports, "tok", None, 2);
        for expected in [
            "--listen-peer-urls=http://127.0.0.1:31",
            "--initial-advertise-peer-urls=http://192.0.2.1:31",
            "--initial-cluster=m0=http://192.0.2.1:11,m1=http://192.0.2.1:21,m2=http://192.0.2.1:31",
            "--listen-client-urls=http://127.0.0.1:30",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} missing from {args:?}"
            );
        }
    }

    #[test]
    fn the_embedded_server_gets_its_own_flags_and_refuses_etcd_only_options() {
        let opts = ClusterOptions {
            embedded: Some(EmbeddedServer {
                program: "/bin/server".into(),
                args: vec!["embedded-server".into()],
            }),
            auto_compaction_retention: Some("1s".into()),
            auto_compaction_mode: CompactionMode::Periodic,
            ..Default::default()
        };
        assert!(check(&opts).is_ok());
        let args = member_args(&opts, Path::new("/d"), &[10, 11], "tok", None, 0);
        assert_eq!(
            args,
            [
                "embedded-server",
                "--data-dir",
                "/d/m0.data",
                "--listen",
                "127.0.0.1:10",
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                "1s"
            ]
        );
        for bad in [
            ClusterOptions {
                members: 3,
                ..opts.clone()
            },
            ClusterOptions {
                tls: true,
                ..opts.clone()
            },
            ClusterOptions {
                peer_links: true,
                ..opts.clone()
            },
        ] {
            assert!(
                matches!(check(&bad), Err(TestkitError::InvalidOptions(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tokens_are_unique() {
        assert_ne!(cluster_token(), cluster_token());
    }
}
