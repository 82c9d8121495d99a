//! Mirror errors.

use std::time::Duration;

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
        /// The revision waited for; 0 when etcd's current revision could not be read
        /// in time (by [`Mirror::consistent_snapshot`](super::Mirror::consistent_snapshot)).
        wanted: i64,
        /// The mirror's revision when the wait ended.
        reached: i64,
        /// The time waited.
        after: Duration,
    },

    /// Asking etcd for its current revision failed.
    #[error("could not read the current revision from etcd: {0}")]
    Source(String),

    /// Writing the snapshot file at shutdown failed.
    #[error("could not write the final snapshot file: {0}")]
    Persist(String),

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

fn wanted_text(wanted: i64) -> String {
    if wanted == 0 {
        "etcd's current revision".into()
    } else {
        format!("revision {wanted}")
    }
}
