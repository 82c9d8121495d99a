//! Typed client errors.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::endpoint_url::InvalidEndpoint;
use super::tls::TlsError;

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
    InvalidConfig(#[from] ConfigError),

    /// TLS material could not be loaded or parsed.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] TlsError),

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
        /// A short human-readable reason, e.g. `connection refused`.
        reason: String,
        /// The transport's error, when there was one (a stream that simply ended
        /// has none).
        #[source]
        source: Option<Arc<tonic::Status>>,
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

/// What is wrong with a [`ClientConfig`](super::ClientConfig).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The endpoint list is empty.
    #[error("no endpoints given")]
    NoEndpoints,
    /// An endpoint URL is unusable.
    #[error(transparent)]
    Endpoint(#[from] InvalidEndpoint),
    /// Two endpoints name the same `host:port`.
    #[error("duplicate endpoint {0}")]
    DuplicateEndpoint(String),
    /// The keepalive interval is below what etcd tolerates.
    #[error(
        "keepalive_interval {interval:?} is below {min:?}: etcd closes connections that ping this often"
    )]
    KeepaliveTooFrequent {
        /// The configured interval.
        interval: Duration,
        /// The shortest accepted interval.
        min: Duration,
    },
    /// A timeout is zero.
    #[error("{setting} must be positive")]
    NotPositive {
        /// The setting's field name.
        setting: &'static str,
    },
    /// A timeout or interval is longer than any useful value.
    #[error("{setting} {value:?} is above the maximum of {max:?}")]
    TooLong {
        /// The setting's field name.
        setting: &'static str,
        /// The configured value.
        value: Duration,
        /// The longest accepted value.
        max: Duration,
    },
    /// Backoff bounds that are zero or inverted.
    #[error("{setting}: need 0 < base <= max, got base {base:?}, max {max:?}")]
    BackoffBounds {
        /// The setting's field name, e.g. `retry.backoff`.
        setting: &'static str,
        /// The configured first delay.
        base: Duration,
        /// The configured cap.
        max: Duration,
    },
    /// A backoff cap above [`Backoff::MAX_DELAY`](super::Backoff::MAX_DELAY).
    #[error("{setting}: max {max:?} is above the limit of {limit:?}")]
    BackoffTooLong {
        /// The setting's field name, e.g. `retry.backoff`.
        setting: &'static str,
        /// The configured cap.
        max: Duration,
        /// The largest accepted cap.
        limit: Duration,
    },
    /// `retry.max_attempts` is zero.
    #[error("retry.max_attempts must be at least 1")]
    NoAttempts,
    /// Credentials with an empty user name.
    #[error("credentials have an empty user name")]
    EmptyUser,
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
    fn tls_errors_keep_their_cause() {
        use crate::client::tls::{TlsConfig, load};
        let cfg = TlsConfig::with_ca_file("/nonexistent/ca.pem");
        let err = Error::from(load(&cfg).unwrap_err());
        assert!(
            err.to_string().starts_with(
                "TLS configuration error: cannot read CA certificate file /nonexistent/ca.pem: "
            ),
            "{err}"
        );
        let mut cur = std::error::Error::source(&err);
        let mut io = None;
        while let Some(e) = cur {
            io = io.or(e.downcast_ref::<std::io::Error>().map(|e| e.kind()));
            cur = e.source();
        }
        assert_eq!(io, Some(std::io::ErrorKind::NotFound), "{err:?}");
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
