//! [`Policies`]: the handle deciders use.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use revwatch::mirror::{Mirror, MirrorError};
use tokio::sync::{broadcast, watch};

use crate::activation::Pipeline;
use crate::decision::{Consistency, DecideError, Decision, Effect, Request, next_decision_id};
use crate::engine::{Backend, Engine, Limits, decide_contained};
use crate::status::{DegradedReason, LoadReport, PolicyState, PolicyStatus};

/// Settings of [`Policies`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// The engine compiling the tree.
    pub backend: Backend,
    /// Bounds on the tree's values.
    pub limits: Limits,
    /// How long the pipeline collects updates before compiling. Default 5 ms.
    pub debounce: Duration,
    /// How long [`Consistency::MinRevision`] and [`Consistency::FullyConsistent`]
    /// wait for a fresh enough set. Default 5 s.
    pub fresh_wait: Duration,
    /// When set, decisions fail closed (deny, with the reason) once the mirror has
    /// not been in sync with etcd for longer than this. Default none.
    pub max_staleness: Option<Duration>,
}

impl PolicyConfig {
    /// Defaults for `backend`.
    pub fn new(backend: Backend) -> Self {
        PolicyConfig {
            backend,
            limits: Limits::default(),
            debounce: Duration::from_millis(5),
            fresh_wait: Duration::from_secs(5),
            max_staleness: None,
        }
    }

    /// With `limits`.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With a debounce window of `debounce`.
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// With a bounded wait of `wait` for fresh sets.
    pub fn fresh_wait(mut self, wait: Duration) -> Self {
        self.fresh_wait = wait;
        self
    }

    /// Failing closed after `max` without a mirror in sync.
    pub fn max_staleness(mut self, max: Duration) -> Self {
        self.max_staleness = Some(max);
        self
    }
}

/// The compiled set in use: one engine, exact at one revision.
pub struct ActiveSet {
    /// The newest mirror revision the set is known to equal.
    pub revision: i64,
    /// The revision it was compiled at (its files last changed at or before it).
    pub compiled_revision: i64,
    /// Its generation (published mode), if any.
    pub generation: Option<String>,
    /// Number of policies (Cedar) or `p` rows (casbin).
    pub policy_count: usize,
    /// When it was activated.
    pub activated_at: SystemTime,
    pub(crate) engine: Arc<dyn Engine>,
}

impl ActiveSet {
    /// The same set, known to be exact at `revision` too.
    pub(crate) fn at(&self, revision: i64) -> ActiveSet {
        ActiveSet {
            revision,
            compiled_revision: self.compiled_revision,
            generation: self.generation.clone(),
            policy_count: self.policy_count,
            activated_at: self.activated_at,
            engine: Arc::clone(&self.engine),
        }
    }
}

impl std::fmt::Debug for ActiveSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveSet")
            .field("revision", &self.revision)
            .field("compiled_revision", &self.compiled_revision)
            .field("generation", &self.generation)
            .field("policy_count", &self.policy_count)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub config: PolicyConfig,
    pub active: ArcSwapOption<ActiveSet>,
    pub status: watch::Sender<PolicyStatus>,
    /// Every load, for receivers that must not miss one (metrics).
    pub loads: broadcast::Sender<LoadReport>,
    /// Nanoseconds after `base` + 1 since the mirror is not ready; 0 while it is.
    pub not_ready_since: AtomicU64,
    base: Instant,
}

impl Shared {
    pub fn nanos_since_base(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
            + 1
    }

    /// How long the mirror has not been ready, if it is not.
    fn not_ready_for(&self) -> Option<Duration> {
        match self.not_ready_since.load(Ordering::SeqCst) {
            0 => None,
            n => Some((self.base + Duration::from_nanos(n - 1)).elapsed()),
        }
    }

    fn fail_closed_reason(&self) -> Option<String> {
        let max = self.config.max_staleness?;
        let age = self.not_ready_for()?;
        (age > max).then(|| {
            format!(
                "the mirror has not been in sync with etcd for {age:.1?}, more than the maximum staleness of {max:?}"
            )
        })
    }
}

/// Load reports kept for a receiver that falls behind; a slower one skips the
/// oldest (and learns how many from the channel).
const LOAD_REPORTS_BUFFERED: usize = 256;

/// Aborts the activation task when the last handle goes.
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hot-reloaded authorization over a mirrored prefix: the active policy set,
/// decisions stamped with its revision, and its status. Cheap to clone; the
/// activation task stops when the last clone is dropped.
///
/// ```no_run
/// use revwatch::client::ClientConfig;
/// use revwatch::mirror::{ClientSource, Mirror};
/// use revwatch_policy::{Backend, Consistency, PolicyConfig, Policies, Request};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let source = ClientSource::lazy(ClientConfig::new(["http://127.0.0.1:2379"]))?;
/// let mirror = Mirror::builder("authz/").start(source).await?;
/// let policies = Policies::start(mirror, "authz/", PolicyConfig::new(Backend::Cedar));
/// policies.wait_active(std::time::Duration::from_secs(5)).await?;
///
/// let request = Request::new(r#"User::"alice""#, r#"Action::"read""#, r#"Doc::"d1""#)
///     .with_context(serde_json::json!({"ip": "10.0.0.1"}));
/// let decision = policies.decide(&request)?;
/// println!("{:?} by {:?} at revision {}", decision.effect, decision.policy_ids, decision.revision);
///
/// // Read-your-writes: a decision on a set at least as new as revision 42.
/// let decision = policies.decide_with(&request, Consistency::MinRevision(42)).await?;
/// # let _ = decision;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Policies {
    shared: Arc<Shared>,
    mirror: Mirror,
    _task: Arc<TaskGuard>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Policies {
    /// Starts the activation pipeline on `mirror`, whose prefix is `prefix`. Must be
    /// called within a Tokio runtime.
    pub fn start(mirror: Mirror, prefix: impl Into<String>, config: PolicyConfig) -> Policies {
        let compiler = config.backend.compiler(config.limits);
        let base = Instant::now();
        let shared = Arc::new(Shared {
            config,
            active: ArcSwapOption::empty(),
            status: watch::Sender::new(PolicyStatus::new()),
            loads: broadcast::Sender::new(LOAD_REPORTS_BUFFERED),
            // Not ready until the pipeline has seen the mirror's state.
            not_ready_since: AtomicU64::new(1),
            base,
        });
        let pipeline = Pipeline::new(Arc::clone(&shared), mirror.clone(), prefix.into(), compiler);
        let task = tokio::spawn(pipeline.run());
        Policies {
            shared,
            mirror,
            _task: Arc::new(TaskGuard(task)),
        }
    }

    /// The active set, if one has been activated. Lock-free.
    pub fn active(&self) -> Option<Arc<ActiveSet>> {
        self.shared.active.load_full()
    }

    /// Decides on the active set ([`Consistency::Default`]). Lock-free; never waits.
    pub fn decide(&self, request: &Request) -> Result<Decision, DecideError> {
        let guard = self.shared.active.load();
        match &*guard {
            Some(set) => self.decide_on(set, request, self.shared.fail_closed_reason()),
            None => Err(self.not_ready()),
        }
    }

    fn not_ready(&self) -> DecideError {
        DecideError::NotReady {
            rejected: self.shared.status.borrow().last_rejection.clone(),
        }
    }

    /// Decides with a consistency requirement.
    ///
    /// `MinRevision(R)` waits up to [`PolicyConfig::fresh_wait`] for an active set at
    /// `R` or later, else fails with [`DecideError::NotFreshEnough`]; it never
    /// decides on an older set. The rule for rejected revisions: once the pipeline
    /// has evaluated a revision ≥ `R` and rejected it (the active set is still
    /// below `R`), the call fails at once, with the rejection, rather than waiting:
    /// the set can only reach `R` after a corrected write. (Revisions that arrive
    /// within one debounce window are evaluated together, at the newest of them.)
    ///
    /// `FullyConsistent` asks etcd for its current revision (one linearizable
    /// read, through the mirror) and then acts as `MinRevision` with it.
    pub async fn decide_with(
        &self,
        request: &Request,
        consistency: Consistency,
    ) -> Result<Decision, DecideError> {
        if consistency == Consistency::Default {
            return self.decide(request);
        }
        let set = self.set_for(consistency).await?;
        self.decide_on(&set, request, self.shared.fail_closed_reason())
    }

    /// Decides every request on one set, chosen once as
    /// [`decide_with`](Self::decide_with) chooses it (with [`Consistency::Default`]:
    /// the active set, without waiting), so all decisions carry the same revision
    /// and the same fail-closed verdict. Returns that revision and, in request
    /// order, each request's decision or its own error (a bad request, an engine
    /// error); the whole batch fails only when no set meets `consistency`.
    pub async fn decide_batch<'r>(
        &self,
        requests: impl IntoIterator<Item = &'r Request>,
        consistency: Consistency,
    ) -> Result<(i64, Vec<Result<Decision, DecideError>>), DecideError> {
        let set = self.set_for(consistency).await?;
        let fail_closed = self.shared.fail_closed_reason();
        let decisions = requests
            .into_iter()
            .map(|request| self.decide_on(&set, request, fail_closed.clone()))
            .collect();
        Ok((set.revision, decisions))
    }

    /// The set a decision with `consistency` is made on (see
    /// [`decide_with`](Self::decide_with)).
    async fn set_for(&self, consistency: Consistency) -> Result<Arc<ActiveSet>, DecideError> {
        let started = Instant::now();
        let wanted = match consistency {
            Consistency::Default => return self.active().ok_or_else(|| self.not_ready()),
            Consistency::MinRevision(r) => r,
            Consistency::FullyConsistent => {
                let wait = self.shared.config.fresh_wait;
                match self.mirror.consistent_snapshot(wait).await {
                    Ok(snapshot) => snapshot.revision(),
                    Err(MirrorError::Timeout {
                        wanted: Some(wanted),
                        ..
                    }) => {
                        return Err(self.not_fresh_enough(wanted, started));
                    }
                    Err(e) => return Err(DecideError::Consistency(Arc::new(e))),
                }
            }
        };
        let left = self
            .shared
            .config
            .fresh_wait
            .saturating_sub(started.elapsed());
        self.wait_for(wanted, left, started).await
    }

    /// Waits up to `timeout` for an active set at `revision` or later, with the
    /// same rule for rejected revisions as [`decide_with`](Self::decide_with).
    pub async fn wait_for_revision(
        &self,
        revision: i64,
        timeout: Duration,
    ) -> Result<Arc<ActiveSet>, DecideError> {
        self.wait_for(revision, timeout, Instant::now()).await
    }

    /// Waits up to `timeout` for a first set to be activated.
    pub async fn wait_active(&self, timeout: Duration) -> Result<Arc<ActiveSet>, DecideError> {
        self.wait_for(1, timeout, Instant::now()).await
    }

    async fn wait_for(
        &self,
        revision: i64,
        timeout: Duration,
        started: Instant,
    ) -> Result<Arc<ActiveSet>, DecideError> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.shared.status.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(set) = self.active().filter(|s| s.revision >= revision) {
                return Ok(set);
            }
            let final_rejection = {
                let st = self.shared.status.borrow();
                (st.evaluated_revision >= revision)
                    .then(|| st.newest_rejected().cloned())
                    .flatten()
            };
            if final_rejection.is_some() || Instant::now() >= deadline {
                return Err(DecideError::NotFreshEnough {
                    wanted: revision,
                    active: self.active().map_or(0, |s| s.revision),
                    rejected: final_rejection,
                    waited: started.elapsed(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Err(_)) = tokio::time::timeout(left, changes.changed()).await {
                // The pipeline is gone: nothing will change.
                return Err(self.not_fresh_enough(revision, started));
            }
        }
    }

    fn not_fresh_enough(&self, wanted: i64, started: Instant) -> DecideError {
        DecideError::NotFreshEnough {
            wanted,
            active: self.active().map_or(0, |s| s.revision),
            rejected: self.shared.status.borrow().newest_rejected().cloned(),
            waited: started.elapsed(),
        }
    }

    /// Decides `request` on `set`; with a `fail_closed` reason, denies with it.
    fn decide_on(
        &self,
        set: &ActiveSet,
        request: &Request,
        fail_closed: Option<String>,
    ) -> Result<Decision, DecideError> {
        if let Some(reason) = fail_closed {
            return Ok(Decision {
                effect: Effect::Deny,
                policy_ids: Vec::new(),
                revision: set.revision,
                decision_id: next_decision_id(),
                fail_closed: Some(reason),
                errors: Vec::new(),
            });
        }
        let verdict = decide_contained(&*set.engine, request)?;
        Ok(Decision {
            effect: if verdict.allowed {
                Effect::Allow
            } else {
                Effect::Deny
            },
            policy_ids: verdict.policy_ids,
            revision: set.revision,
            decision_id: next_decision_id(),
            fail_closed: None,
            errors: verdict.errors,
        })
    }

    /// The current status, its state computed now (staleness is a matter of time).
    pub fn status(&self) -> PolicyStatus {
        let mut status = self.shared.status.borrow().clone();
        let mut reasons = Vec::new();
        if let Some(rejection) = status.newest_rejected() {
            reasons.push(DegradedReason::NewestRejected(rejection.clone()));
        }
        if let Some(since) = status.mirror_not_ready_since {
            reasons.push(DegradedReason::MirrorNotReady {
                state: status.mirror_state.clone(),
                since,
            });
        }
        if let Some(reason) = self.shared.fail_closed_reason() {
            reasons.push(DegradedReason::FailClosed { reason });
        }
        status.state = if status.active_revision == 0 {
            PolicyState::NotReady
        } else if reasons.is_empty() {
            PolicyState::Ready
        } else {
            PolicyState::Degraded(reasons)
        };
        status
    }

    /// A receiver of every load from now on (activation or rejection, with its
    /// duration), e.g. for a load-duration histogram and per-key rejection
    /// counts. Unlike [`status_changes`](Self::status_changes) nothing coalesces;
    /// a receiver more than 256 loads behind loses the oldest ones and is told how many.
    pub fn load_reports(&self) -> broadcast::Receiver<LoadReport> {
        self.shared.loads.subscribe()
    }

    /// A receiver notified whenever the status changes (activations, rejections,
    /// new revisions, mirror state). Its `state` field is not computed: call
    /// [`status`](Self::status) for that.
    pub fn status_changes(&self) -> watch::Receiver<PolicyStatus> {
        self.shared.status.subscribe()
    }
}
