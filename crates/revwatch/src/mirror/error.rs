//! Mirror errors.

use std::sync::Arc;
use std::time::Duration;

use super::persist::PersistError;

/// Errors returned by [`Mirror`](super::Mirror) calls.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// The configuration is unusable.
    #[error("invalid mirror configuration: {0}")]
    InvalidConfig(String),

    /// The mirror cannot get ready; the cause is the last failure. The mirror keeps
    /// retrying in the background.
    #[error("mirror not ready ({kind}): {message}")]
    NotReady {
        /// The failure class.
        kind: FailureKind,
        /// The underlying error.
        message: String,
    },

    /// The mirror did not reach the revision in time.
    #[error("timed out after {after:?} waiting for {} (mirror at {reached})", wanted_text(*.wanted))]
    Timeout {
        /// The revision waited for; `None` when etcd's current revision could not
        /// be read in time (by [`Mirror::consistent_snapshot`](super::Mirror::consistent_snapshot)).
        wanted: Option<i64>,
        /// The mirror's revision when the wait ended.
        reached: i64,
        /// The time waited.
        after: Duration,
    },

    /// Asking etcd for its current revision failed.
    #[error("could not read the current revision from etcd: {0}")]
    Source(#[source] Arc<crate::client::Error>),

    /// Writing the snapshot file at shutdown failed.
    #[error("could not write the final snapshot file: {0}")]
    Persist(#[source] Arc<PersistError>),

    /// The mirror has shut down.
    #[error("the mirror has shut down")]
    Closed,
}

/// Classes of failure reported by status and [`MirrorError::NotReady`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The credentials lack read permission on the prefix.
    PermissionDenied,
    /// Authentication failed.
    Auth,
    /// No endpoint could be reached.
    Unreachable,
    /// Anything else (timeouts, no leader, ...).
    Other,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::PermissionDenied => "permission denied",
            FailureKind::Auth => "authentication failed",
            FailureKind::Unreachable => "no endpoint reachable",
            FailureKind::Other => "error",
        })
    }
}

impl FailureKind {
    pub(crate) fn of(e: &crate::client::Error) -> Self {
        use crate::client::Error;
        if e.is_permission_denied() {
            FailureKind::PermissionDenied
        } else if e.is_auth() {
            FailureKind::Auth
        } else if matches!(
            e,
            Error::AllEndpointsUnreachable(_) | Error::Connection { .. } | Error::Timeout { .. }
        ) {
            FailureKind::Unreachable
        } else {
            FailureKind::Other
        }
    }
}

fn wanted_text(wanted: Option<i64>) -> String {
    match wanted {
        Some(revision) => format!("revision {revision}"),
        None => "etcd's current revision".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn errors_keep_their_sources() {
        let io = std::io::Error::new(std::io::ErrorKind::StorageFull, "disk full");
        let err = MirrorError::Persist(Arc::new(PersistError::Io {
            path: "snap".into(),
            source: io,
        }));
        assert_eq!(
            err.to_string(),
            "could not write the final snapshot file: snapshot file snap: disk full"
        );
        let persist = err.source().expect("the persist error");
        assert!(persist.is::<Arc<PersistError>>(), "{persist:?}");
        let io = persist
            .source()
            .and_then(|e| e.downcast_ref::<std::io::Error>())
            .expect("the I/O error");
        assert_eq!(io.kind(), std::io::ErrorKind::StorageFull);

        let err = MirrorError::Source(Arc::new(crate::client::Error::Compacted {
            compact_revision: None,
            endpoint: "e:1".into(),
        }));
        let source = err.source().expect("the client error");
        assert!(source.to_string().contains("compacted"), "{source}");
    }

    #[test]
    fn a_timeout_names_what_it_waited_for() {
        let after = Duration::from_millis(500);
        let unknown = MirrorError::Timeout {
            wanted: None,
            reached: 3,
            after,
        };
        assert_eq!(
            unknown.to_string(),
            "timed out after 500ms waiting for etcd's current revision (mirror at 3)"
        );
        let known = MirrorError::Timeout {
            wanted: Some(9),
            reached: 3,
            after,
        };
        assert_eq!(
            known.to_string(),
            "timed out after 500ms waiting for revision 9 (mirror at 3)"
        );
    }
}
