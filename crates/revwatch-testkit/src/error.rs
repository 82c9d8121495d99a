//! The one error type of the testkit.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while running etcd processes or the fault proxy.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// The etcd binary is not installed where we look for it.
    #[error(
        "etcd not found at {}: install it with `apt-get install -y etcd-server etcd-client` (or run ./scripts/setup)",
        path.display()
    )]
    EtcdNotFound {
        /// Where the binary was expected.
        path: PathBuf,
    },
    /// The [`ClusterOptions`](crate::etcd::ClusterOptions) cannot describe a cluster.
    #[error("invalid cluster options: {0}")]
    InvalidOptions(String),
    /// A file, socket or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the testkit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A member process exited on its own (during start-up or while waiting for health).
    #[error("etcd member {member} exited ({status}); last lines of its log:\n{log_tail}")]
    MemberExited {
        /// Index of the member.
        member: usize,
        /// Its exit status.
        status: String,
        /// The end of its log file.
        log_tail: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {what} (last error: {last_error})")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
        /// The last failure seen while polling.
        last_error: String,
    },
    /// A gRPC call to etcd failed.
    #[error("{what} failed: {status}")]
    Rpc {
        /// Which call, on which member.
        what: String,
        /// The status etcd (or the transport) returned.
        status: Box<tonic::Status>,
    },
    /// A gRPC channel could not be set up.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint URL.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A member index beyond the cluster size.
    #[error("no member {index}: the cluster has {len}")]
    NoSuchMember {
        /// The index asked for.
        index: usize,
        /// The cluster size.
        len: usize,
    },
    /// The operation needs a running member, and this one is killed.
    #[error("member {index} is not running")]
    NotRunning {
        /// Index of the member.
        index: usize,
    },
    /// No reachable member claims leadership.
    #[error("no reachable member is leader{detail}")]
    NoLeader {
        /// What the members said, if anything.
        detail: String,
    },
    /// Generating TLS material failed.
    #[error("generating TLS certificates: {0}")]
    Tls(#[from] rcgen::Error),
    /// Sending a signal to a member failed.
    #[error("sending {signal} to member {index}: {source}")]
    Signal {
        /// Index of the member.
        index: usize,
        /// The signal's name.
        signal: &'static str,
        /// The OS error.
        #[source]
        source: nix::errno::Errno,
    },
}

impl TestkitError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn rpc(what: impl Into<String>, status: tonic::Status) -> Self {
        Self::Rpc {
            what: what.into(),
            status: Box::new(status),
        }
    }
}
