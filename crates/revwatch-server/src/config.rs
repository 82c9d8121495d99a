//! Server configuration and limits.

use std::path::PathBuf;
use std::time::Duration;

/// Limits that protect the server from oversized or abusive requests.
///
/// Hitting any of them yields an etcd-style error for that request only; the server keeps
/// serving everyone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request, in bytes (etcd's `--max-request-bytes`, default 1.5 MiB).
    /// Larger requests fail with InvalidArgument "etcdserver: request is too large".
    pub max_request_bytes: usize,
    /// Most operations in one txn branch (etcd's `--max-txn-ops`, default 128).
    pub max_txn_ops: usize,
    /// Largest accepted value in a put, in bytes. etcd has no separate value limit, so the
    /// default equals `max_request_bytes`.
    pub max_value_bytes: usize,
    /// Most watchers open at once across all streams. A create beyond it is refused in-band
    /// (created and canceled, with a cancel reason), like etcd's other create errors.
    pub max_watchers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        const MAX_REQUEST_BYTES: usize = 1536 * 1024;
        Self {
            max_request_bytes: MAX_REQUEST_BYTES,
            max_txn_ops: 128,
            max_value_bytes: MAX_REQUEST_BYTES,
            max_watchers: 100_000,
        }
    }
}

/// Compaction the server does by itself, like etcd's `--auto-compaction-mode=revision`.
///
/// The server keeps its whole history in memory until a compaction, so a long-running
/// server that nobody compacts grows without bound; this bounds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoCompaction {
    /// Revisions kept: every `interval`, the server compacts at the current revision
    /// minus this (etcd's `--auto-compaction-retention` in revision mode). 0 turns
    /// auto-compaction off, as in etcd.
    pub retention: u64,
    /// How often to compact (etcd 3.4's revision mode: every 5 minutes); at least 10 ms.
    pub interval: Duration,
}

impl AutoCompaction {
    /// Keeps `retention` revisions, compacting every 5 minutes as etcd 3.4 does.
    pub fn revisions(retention: u64) -> Self {
        Self {
            retention,
            interval: Duration::from_secs(300),
        }
    }
}

/// Everything [`Server::open`](crate::Server::open) needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory holding the database file. Created if missing.
    pub data_dir: PathBuf,
    /// Member name reported by MemberList (etcd's `--name`, default "default").
    pub name: String,
    /// Request limits.
    pub limits: Limits,
    /// Interval of the periodic progress notification sent to watchers created with
    /// `progress_notify` (etcd's `--experimental-watch-progress-notify-interval`, default 10 min).
    pub progress_notify_interval: Duration,
    /// Minimum lease TTL in seconds; shorter grants are raised to it (etcd's default is 2).
    pub min_lease_ttl: i64,
    /// How often expired leases are looked for.
    pub lease_check_interval: Duration,
    /// How long logged writes may wait before they are copied into the database file
    /// (etcd's backend batch interval, 100 ms). Durability never waits for it: a write
    /// is acknowledged once its log record is fsynced.
    pub checkpoint_interval: Duration,
    /// Compaction without a client asking for it; none by default, as in etcd.
    pub auto_compaction: Option<AutoCompaction>,
}

impl ServerConfig {
    /// A configuration with etcd's defaults, storing data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            name: "default".to_owned(),
            limits: Limits::default(),
            progress_notify_interval: Duration::from_secs(600),
            min_lease_ttl: 2,
            lease_check_interval: Duration::from_millis(250),
            checkpoint_interval: Duration::from_millis(100),
            auto_compaction: None,
        }
    }
}
