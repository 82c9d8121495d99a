//! Typed client errors.

use std::fmt;
use std::time::Duration;

/// etcd's message for a read or watch below the compacted revision.
const COMPACTED_MSG: &str = "required revision has been compacted";
/// etcd's message for a read above the current revision.
const FUTURE_REV_MSG: &str = "required revision is a future revision";

/// Why one endpoint could not serve a request, e.g. `127.0.0.1:2379 (connection refused)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFailure {
    /// The endpoint as `host:port`.
    pub endpoint: String,
    /// A short human-readable reason.
    pub reason: String,
}

impl fmt::Display for EndpointFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.endpoint, self.reason)
    }
}

/// Joins failures as `a (x), b (y)` for [`Error::AllEndpointsUnreachable`].
fn join_failures(failures: &[EndpointFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything that can go wrong in [`Client`](super::Client) calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable (bad endpoint URL, too-short keepalive, ...).
    #[error("invalid client configuration: {0}")]
    InvalidConfig(String),

    /// TLS material could not be loaded or parsed.
    #[error("TLS configuration error: {0}")]
    Tls(String),

    /// The server rejected the credentials, or authentication is misconfigured.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// No endpoint could be reached; each endpoint's last failure is listed.
    #[error("all {} endpoints unreachable: {}", .0.len(), join_failures(.0))]
    AllEndpointsUnreachable(Vec<EndpointFailure>),

    /// The connection to an endpoint failed while a request that must not be
    /// replayed may already have been sent (e.g. a put), so it was not retried.
    #[error("{endpoint}: connection failed, request outcome unknown: {reason}")]
    Connection {
        /// The endpoint as `host:port`.
        endpoint: String,
        /// A short human-readable reason.
        reason: String,
    },

    /// An endpoint did not answer within the request timeout.
    #[error("{endpoint}: no response within {after:?}")]
    Timeout {
        /// The endpoint as `host:port`.
        endpoint: String,
        /// The timeout that expired.
        after: Duration,
    },

    /// The requested revision has been compacted away.
    #[error("{endpoint}: required revision has been compacted{}", fmt_compact_rev(*.compact_revision))]
    Compacted {
        /// The compaction revision, when the server reported it (watches do, ranges do not).
        compact_revision: Option<i64>,
        /// The endpoint as `host:port`.
        endpoint: String,
    },

    /// The requested revision is above the store's current revision.
    #[error("{endpoint}: required revision is a future revision")]
    FutureRevision {
        /// The endpoint as `host:port`.
        endpoint: String,
    },

    /// Any other gRPC status returned by the server.
    #[error("{endpoint}: {code:?}: {message}")]
    Grpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message, e.g. `etcdserver: no leader`.
        message: String,
        /// The endpoint as `host:port`.
        endpoint: String,
    },

    /// The watch stream's request side is closed (the stream ended or was dropped).
    #[error("{endpoint}: watch stream closed")]
    WatchClosed {
        /// The endpoint as `host:port`.
        endpoint: String,
    },
}

fn fmt_compact_rev(rev: Option<i64>) -> String {
    rev.map(|r| format!(" (compacted at {r})"))
        .unwrap_or_default()
}

impl Error {
    /// True when the requested revision has been compacted.
    pub fn is_compacted(&self) -> bool {
        matches!(self, Error::Compacted { .. })
    }

    /// True when the requested revision is in the future.
    pub fn is_future_revision(&self) -> bool {
        matches!(self, Error::FutureRevision { .. })
    }

    /// True when retrying the same request later may succeed: transport failures,
    /// timeouts and `Unavailable` (no leader, leader changed, server stopping, ...).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::AllEndpointsUnreachable(_) | Error::Timeout { .. } => true,
            Error::Connection { .. } | Error::WatchClosed { .. } => true,
            Error::Grpc { code, .. } => *code == tonic::Code::Unavailable,
            _ => false,
        }
    }

    /// True when the server refused the request for lack of permission.
    pub fn is_permission_denied(&self) -> bool {
        matches!(
            self,
            Error::Grpc {
                code: tonic::Code::PermissionDenied,
                ..
            }
        )
    }

    /// True for authentication failures (bad credentials or token problems).
    pub fn is_auth(&self) -> bool {
        matches!(self, Error::Auth(_))
            || matches!(
                self,
                Error::Grpc {
                    code: tonic::Code::Unauthenticated,
                    ..
                }
            )
    }

    /// True when the request timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// The gRPC status code, when the server returned one.
    pub fn grpc_code(&self) -> Option<tonic::Code> {
        match self {
            Error::Grpc { code, .. } => Some(*code),
            Error::Compacted { .. } | Error::FutureRevision { .. } => Some(tonic::Code::OutOfRange),
            _ => None,
        }
    }

    /// Converts a status the server sent into a typed error.
    pub(crate) fn from_server_status(status: &tonic::Status, endpoint: &str) -> Error {
        let endpoint = endpoint.to_string();
        let message = status.message();
        // etcd sends these as OutOfRange, but `etcd grpc-proxy` relays them as Unknown
        // with the same text: the text decides, or a compaction seen through a proxy
        // would pass for an ordinary error and never trigger a relist.
        if matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::Unknown
        ) {
            if message.contains(COMPACTED_MSG) {
                return Error::Compacted {
                    compact_revision: None,
                    endpoint,
                };
            }
            if message.contains(FUTURE_REV_MSG) {
                return Error::FutureRevision { endpoint };
            }
        }
        Error::Grpc {
            code: status.code(),
            message: message.to_string(),
            endpoint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_lists_every_endpoint() {
        let err = Error::AllEndpointsUnreachable(vec![
            EndpointFailure {
                endpoint: "127.0.0.1:2379".into(),
                reason: "connection refused".into(),
            },
            EndpointFailure {
                endpoint: "127.0.0.1:2380".into(),
                reason: "timed out".into(),
            },
        ]);
        assert_eq!(
            err.to_string(),
            "all 2 endpoints unreachable: 127.0.0.1:2379 (connection refused), 127.0.0.1:2380 (timed out)"
        );
        assert!(err.is_retryable());
    }

    #[test]
    fn out_of_range_statuses_are_typed() {
        let compacted =
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        assert!(Error::from_server_status(&compacted, "e:1").is_compacted());
        let future =
            tonic::Status::out_of_range("etcdserver: mvcc: required revision is a future revision");
        assert!(Error::from_server_status(&future, "e:1").is_future_revision());
        // As relayed by etcd grpc-proxy.
        let proxied =
            tonic::Status::unknown("etcdserver: mvcc: required revision has been compacted");
        assert!(Error::from_server_status(&proxied, "e:1").is_compacted());
        let denied = tonic::Status::permission_denied("etcdserver: permission denied");
        assert!(Error::from_server_status(&denied, "e:1").is_permission_denied());
    }
}
