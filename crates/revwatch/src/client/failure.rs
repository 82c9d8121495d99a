//! What a failed call means: the classification of a gRPC status into transport
//! failures (the endpoint is suspect), `Unavailable`, a rejected token, or a
//! definitive answer.

use std::error::Error as StdError;
use std::sync::Arc;

use super::error::Error;

/// What a failed attempt means for the endpoint and for retrying.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection failed or broke: the endpoint is suspect. `maybe_sent` is false
    /// only when the request provably never left the client (connect failed).
    Transport {
        /// A short reason, e.g. `connection refused`.
        reason: String,
        maybe_sent: bool,
        /// The status the client library made, with the transport error as its source.
        status: Arc<tonic::Status>,
    },
    /// The server answered `Unavailable` (no leader, leader changed, stopping, ...).
    Unavailable(Error),
    /// The server rejected our auth token; re-authenticate and try again.
    InvalidToken(Error),
    /// A definitive answer: return it.
    Fatal(Error),
}

/// Classifies a failed call. Statuses created by the client library carry a source
/// error (transport, h2, connect); statuses sent by the server do not.
pub(crate) fn classify(status: tonic::Status, endpoint: &str) -> Failure {
    // The generated stubs turn a failed readiness check into a source-less Unknown.
    let not_ready = status.message().starts_with("Service was not ready");
    if status.source().is_some() || not_ready {
        let maybe_sent = !not_ready && !source_chain_has::<tonic::ConnectError>(&status);
        return Failure::Transport {
            reason: short_reason(&status),
            maybe_sent,
            status: Arc::new(status),
        };
    }
    match status.code() {
        tonic::Code::Unavailable => {
            Failure::Unavailable(Error::from_server_status(&status, endpoint))
        }
        tonic::Code::Unauthenticated if status.message().contains("invalid auth token") => {
            Failure::InvalidToken(Error::from_server_status(&status, endpoint))
        }
        _ => Failure::Fatal(Error::from_server_status(&status, endpoint)),
    }
}

/// The error for a transport failure on `endpoint`.
pub(crate) fn connection_error(
    endpoint: &str,
    reason: String,
    status: Arc<tonic::Status>,
) -> Error {
    Error::Connection {
        endpoint: endpoint.to_string(),
        reason,
        source: Some(status),
    }
}

fn source_chain_has<E: StdError + 'static>(status: &tonic::Status) -> bool {
    let mut cur = status.source();
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A short reason for an endpoint failure: the innermost I/O error when there is
/// one ("connection refused"), else the deepest error message in the chain.
pub(crate) fn short_reason(status: &tonic::Status) -> String {
    let mut deepest = status.message().to_string();
    let mut cur = status.source();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // The connect timeout surfaces as a TimedOut wrapping tokio's "deadline
            // has elapsed", which does not say what timed out.
            if io.kind() == std::io::ErrorKind::TimedOut {
                let what = if source_chain_has::<tonic::ConnectError>(status) {
                    "connect timed out"
                } else {
                    "timed out"
                };
                return what.to_string();
            }
            // OS errors read best as their kind ("connection refused"); wrapped
            // errors (e.g. rustls's "invalid peer certificate") by their message.
            return match io.get_ref() {
                Some(inner) => inner.to_string(),
                None => io.kind().to_string(),
            };
        }
        deepest = e.to_string();
        cur = e.source();
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_statuses_are_classified() {
        let s = tonic::Status::unavailable("etcdserver: no leader");
        assert!(matches!(classify(s, "e:1"), Failure::Unavailable(_)));
        let s = tonic::Status::unauthenticated("etcdserver: invalid auth token");
        assert!(matches!(classify(s, "e:1"), Failure::InvalidToken(_)));
        let s = tonic::Status::invalid_argument("etcdserver: key is not provided");
        assert!(matches!(
            classify(s, "e:1"),
            Failure::Fatal(Error::Grpc { .. })
        ));
    }

    #[test]
    fn not_ready_counts_as_not_sent() {
        let s = tonic::Status::unknown("Service was not ready: transport error");
        assert!(matches!(
            classify(s, "e:1"),
            Failure::Transport {
                maybe_sent: false,
                ..
            }
        ));
    }

    #[test]
    fn connect_failures_are_known_unsent_and_keep_their_cause() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let s = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        match classify(s, "e:1") {
            Failure::Transport {
                reason,
                maybe_sent,
                status,
            } => {
                assert_eq!(reason, "connection refused");
                assert!(!maybe_sent);
                let err = connection_error("e:1", reason, status);
                assert_eq!(
                    err.to_string(),
                    "e:1: connection failed, request outcome unknown: connection refused"
                );
                // The chain reaches the I/O error.
                let mut cur = err.source();
                let mut found = false;
                while let Some(e) = cur {
                    found |= e.downcast_ref::<std::io::Error>().is_some();
                    cur = e.source();
                }
                assert!(found, "{err:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_timeouts_say_so() {
        // What hyper-util's connector returns when its connect timeout fires.
        let elapsed = std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline has elapsed");
        let s = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(elapsed))));
        match classify(s, "e:1") {
            Failure::Transport {
                reason, maybe_sent, ..
            } => {
                assert_eq!(reason, "connect timed out");
                assert!(!maybe_sent);
            }
            other => panic!("{other:?}"),
        }
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let s = tonic::Status::from_error(Box::new(timed_out));
        assert_eq!(short_reason(&s), "timed out");
    }

    #[test]
    fn broken_connections_may_have_sent_the_request() {
        let broken = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let s = tonic::Status::from_error(Box::new(broken));
        assert!(matches!(
            classify(s, "e:1"),
            Failure::Transport {
                maybe_sent: true,
                ..
            }
        ));
    }
}
