//! What the activation pipeline reports about itself: [`PolicyStatus`].

use std::time::{Duration, SystemTime};

/// A candidate policy set that was not activated, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The etcd key at fault (the prefix itself when no single key is).
    pub key: String,
    /// The candidate's revision (the mirror snapshot it was read from).
    pub revision: i64,
    /// The `mod_revision` of the key at fault, when it is a key of the tree.
    pub key_revision: Option<i64>,
    /// What is wrong, in the engine's words.
    pub message: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at revision {}", self.key, self.revision)?;
        if let Some(r) = self.key_revision {
            write!(f, " (key written at {r})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One load of a candidate set: reading its tree and compiling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Which load it is, from 1: [`PolicyStatus::activations`] +
    /// [`PolicyStatus::rejections`] once it is counted. A receiver that starts
    /// from a status skips the reports it already counted by this.
    pub sequence: u64,
    /// The revision the candidate was evaluated at.
    pub revision: i64,
    /// How long reading the tree and compiling it took.
    pub duration: Duration,
    /// Whether it was activated.
    pub outcome: LoadOutcome,
}

/// How a load ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The candidate is the active set.
    Activated,
    /// The candidate was rejected; the last-known-good set stays active.
    Rejected(Rejection),
}

/// Why the service is degraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DegradedReason {
    /// The newest candidate was rejected; the last-known-good set is served.
    NewestRejected(Rejection),
    /// The mirror is not watching etcd (reconnecting, stale, degraded); the set
    /// may be behind etcd.
    MirrorNotReady {
        /// The mirror's state, as text.
        state: String,
        /// Since when the mirror has not been ready.
        since: SystemTime,
    },
    /// The mirror has not been ready for longer than the maximum staleness:
    /// decisions fail closed (deny).
    FailClosed {
        /// The reason given with each denial.
        reason: String,
    },
}

impl std::fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DegradedReason::NewestRejected(r) => write!(f, "newest revision rejected: {r}"),
            DegradedReason::MirrorNotReady { state, .. } => write!(f, "mirror is {state}"),
            DegradedReason::FailClosed { reason } => write!(f, "failing closed: {reason}"),
        }
    }
}

/// The service's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyState {
    /// No set has been activated yet (never loaded, or every candidate so far was
    /// rejected).
    NotReady,
    /// A set is active, it is the newest candidate, and the mirror follows etcd.
    Ready,
    /// A set is active but something is wrong; see the reasons.
    Degraded(Vec<DegradedReason>),
}

/// A point-in-time report, from [`Policies::status`](crate::Policies::status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    /// The state.
    pub state: PolicyState,
    /// Revision of the active set (0 when none): the newest mirror revision it is
    /// known to equal.
    pub active_revision: i64,
    /// Revision at which the active set was compiled (its policies last changed).
    pub compiled_revision: i64,
    /// Generation of the active set (published mode), if any.
    pub generation: Option<String>,
    /// Number of policies (Cedar) or `p` rows (casbin) in the active set.
    pub policy_count: usize,
    /// Keys under the prefix ignored because a generation is active.
    pub stray_keys: Vec<String>,
    /// The newest mirror revision the pipeline has evaluated.
    pub evaluated_revision: i64,
    /// The last candidate rejected, kept until a later candidate is activated.
    pub last_rejection: Option<Rejection>,
    /// Candidates activated so far (loads that succeeded; monotonic).
    pub activations: u64,
    /// Candidates rejected so far (loads that failed; monotonic).
    pub rejections: u64,
    /// The newest load (activation or rejection). Status changes can coalesce;
    /// [`Policies::load_reports`](crate::Policies::load_reports) sees every load.
    pub last_load: Option<LoadReport>,
    /// When the active set was activated.
    pub activated_at: Option<SystemTime>,
    /// The mirror's state, as text (`ready`, `reconnecting`, ...).
    pub mirror_state: String,
    /// Since when the mirror has not been ready; `None` while it is.
    pub mirror_not_ready_since: Option<SystemTime>,
}

impl PolicyStatus {
    pub(crate) fn new() -> Self {
        PolicyStatus {
            state: PolicyState::NotReady,
            active_revision: 0,
            compiled_revision: 0,
            generation: None,
            policy_count: 0,
            stray_keys: Vec::new(),
            evaluated_revision: 0,
            last_rejection: None,
            activations: 0,
            rejections: 0,
            last_load: None,
            activated_at: None,
            mirror_state: String::new(),
            mirror_not_ready_since: None,
        }
    }

    /// The rejection that keeps the active set below the evaluated revision, if any.
    pub fn newest_rejected(&self) -> Option<&Rejection> {
        self.last_rejection
            .as_ref()
            .filter(|r| r.revision > self.active_revision)
    }
}
