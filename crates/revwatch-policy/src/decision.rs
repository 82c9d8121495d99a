//! What callers send ([`Request`], [`Consistency`]) and get back ([`Decision`],
//! [`DecideError`]).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::status::Rejection;

/// One authorization question.
///
/// For Cedar, `principal`, `action` and `resource` are entity uids in Cedar syntax
/// (`User::"alice"`, `Action::"read"`) and `context` is the request context (a JSON
/// object, parsed with the schema when the set has one). For casbin, each token of
/// the model's `request_definition` is taken from `context[token]` (a string) when
/// present, else `sub` is the principal, `obj` the resource and `act` the action.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Who asks.
    pub principal: String,
    /// What they want to do.
    pub action: String,
    /// What they want to do it to.
    pub resource: String,
    /// Request attributes; `Value::Null` means none.
    pub context: serde_json::Value,
}

impl Request {
    /// A request without context attributes.
    pub fn new(
        principal: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        Request {
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            context: serde_json::Value::Null,
        }
    }

    /// The same request with `context`.
    pub fn with_context(mut self, context: serde_json::Value) -> Self {
        self.context = context;
        self
    }
}

/// How fresh the policy set deciding a request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Consistency {
    /// The active set, as fresh as the mirror is.
    #[default]
    Default,
    /// An active set at revision `R` or later (read-your-writes: pass the revision
    /// etcd returned for your write). Waits a bounded time, else
    /// [`DecideError::NotFreshEnough`]; never decides on an older set.
    MinRevision(i64),
    /// One linearizable etcd read for the current revision, then as
    /// [`MinRevision`](Self::MinRevision) with it.
    FullyConsistent,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// The request is permitted.
    Allow,
    /// The request is not permitted.
    Deny,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub effect: Effect,
    /// The determining policies: Cedar's `reason` (the `@id` annotation, else
    /// `<path>#<position>`), or casbin's matched rules as its `enforce_ex` explains
    /// them (`<path>:<line>`).
    pub policy_ids: Vec<String>,
    /// The revision of the active set that decided.
    pub revision: i64,
    /// Unique within the process (and, with high probability, across processes).
    pub decision_id: String,
    /// Why the set denied without evaluating policies (fail-closed), if it did.
    pub fail_closed: Option<String>,
    /// Policies whose evaluation failed and were skipped (Cedar), as text.
    pub errors: Vec<String>,
}

impl Decision {
    /// True for [`Effect::Allow`].
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
}

/// Why no decision was made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecideError {
    /// The request itself is invalid (unparseable principal or resource, context of
    /// the wrong type); only this request fails.
    #[error("bad request: {field}: {message}")]
    BadRequest {
        /// The offending part: `principal`, `action`, `resource`, `context` or `request`.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// No policy set has been activated yet.
    #[error("no policy set is active yet{}", rejected_suffix(.rejected))]
    NotReady {
        /// The last candidate that was rejected, if any.
        rejected: Option<Rejection>,
    },
    /// The active set is older than the revision asked for.
    #[error(
        "not fresh enough: wanted revision {wanted}, active set is at {active}{}",
        rejected_suffix(.rejected)
    )]
    NotFreshEnough {
        /// The revision asked for.
        wanted: i64,
        /// The active set's revision (0 when none is active).
        active: i64,
        /// Set when the answer is final: the pipeline has already seen a revision ≥
        /// `wanted` and rejected it, so the active set cannot get there until a
        /// corrected set is written.
        rejected: Option<Rejection>,
        /// How long the call waited.
        waited: Duration,
    },
    /// The linearizable read of `FullyConsistent` failed.
    #[error("consistent read failed: {0}")]
    Consistency(#[source] std::sync::Arc<revwatch::mirror::MirrorError>),
    /// The engine failed (a contained panic, an internal engine error).
    #[error("engine error: {0}")]
    Engine(String),
}

fn rejected_suffix(rejected: &Option<Rejection>) -> String {
    match rejected {
        Some(r) => format!(" (newest revision rejected: {r})"),
        None => String::new(),
    }
}

/// Process-unique decision ids: a per-process random part and a counter, as
/// `{random:016x}-{counter:x}`.
pub(crate) fn next_decision_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // The random part with its dash, formatted once: ids are made per decision.
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // `RandomState` is seeded from the OS: a random value without a dependency.
        let random = std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            nanos,
        );
        format!("{:016x}-", random ^ (u64::from(std::process::id()) << 32))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(prefix.len() + 16);
    id.push_str(prefix);
    // Writing into a String cannot fail.
    let _ = write!(id, "{n:x}");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_unique() {
        let a = next_decision_id();
        let b = next_decision_id();
        assert_ne!(a, b);
        assert_eq!(a.split('-').next(), b.split('-').next());
        // `{random:016x}-{counter:x}`, the counter growing (other tests decide
        // meanwhile, so not necessarily by one).
        let parts = |id: &str| {
            let (random, counter) = id.split_once('-').expect("a dash");
            assert_eq!(random.len(), 16, "{id}");
            let hex = |t: &str| t.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
            assert!(hex(random) && hex(counter), "{id}");
            u64::from_str_radix(counter, 16).expect("a hex counter")
        };
        assert!(parts(&b) > parts(&a), "{a} then {b}");
    }
}
