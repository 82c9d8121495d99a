//! The activation pipeline: mirror updates in, compiled sets out.
//!
//! One task per [`Policies`](crate::Policies) follows a mirror subscription. It
//! debounces updates (a fixed window from the first one, so a steady stream of
//! writes cannot starve it), reads the active tree of the newest snapshot,
//! compiles it on a blocking thread (a compiler keeps its parse cache across
//! candidates), and publishes the result with one `ArcSwap` store. A candidate
//! that fails keeps the last-known-good set and is reported in status. A revision
//! that does not change the tree (another key, a bookmark) re-stamps the active
//! set with that revision without compiling: the set is exact at it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use revwatch::mirror::{Mirror, Snapshot, State, Status, Subscription, Update};

use crate::engine::{Compiler, Engine, compile_contained};
use crate::layout::{self, Tree};
use crate::service::{ActiveSet, Shared};
use crate::status::{LoadOutcome, LoadReport, PolicyStatus, Rejection};

/// What the task knows about the newest evaluated candidate.
struct Candidate {
    /// Its tree (shared with the compile thread).
    tree: Arc<Tree>,
    /// True if it was activated.
    accepted: bool,
}

pub(crate) struct Pipeline {
    shared: Arc<Shared>,
    mirror: Mirror,
    prefix: String,
    /// `None` only while a compile runs on the blocking pool.
    compiler: Option<Box<dyn Compiler>>,
    /// The newest state received (a first snapshot or a batch, never a
    /// bookmark), and the newest revision (bookmarks included).
    latest: Option<Update<bytes::Bytes>>,
    latest_revision: i64,
    /// The snapshot the last evaluation read.
    evaluated: Option<Arc<Snapshot<bytes::Bytes>>>,
    candidate: Option<Candidate>,
}

impl Pipeline {
    pub(crate) fn new(
        shared: Arc<Shared>,
        mirror: Mirror,
        prefix: String,
        compiler: Box<dyn Compiler>,
    ) -> Self {
        Pipeline {
            shared,
            mirror,
            prefix,
            compiler: Some(compiler),
            latest: None,
            latest_revision: 0,
            evaluated: None,
            candidate: None,
        }
    }

    /// Runs until the mirror shuts down.
    pub(crate) async fn run(mut self) {
        let mut updates = self.mirror.subscribe();
        let mut mirror_status = self.mirror.status_changes();
        self.observe_mirror(&mirror_status.borrow_and_update().clone());
        loop {
            tokio::select! {
                update = updates.recv() => {
                    let Some(update) = update else { break };
                    self.absorb(update);
                    if !self.debounce(&mut updates).await {
                        break;
                    }
                    self.evaluate().await;
                }
                changed = mirror_status.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let status = mirror_status.borrow_and_update().clone();
                    self.observe_mirror(&status);
                }
            }
        }
    }

    fn absorb(&mut self, update: Update<bytes::Bytes>) {
        self.latest_revision = self.latest_revision.max(update.revision());
        // A batch's snapshot is built only when evaluated: of a burst within
        // the debounce window, only the last one's is.
        if !matches!(update, Update::Progress(_)) {
            self.latest = Some(update);
        }
    }

    /// Collects the updates arriving within the debounce window. False once the
    /// subscription has ended.
    async fn debounce(&mut self, updates: &mut Subscription<bytes::Bytes>) -> bool {
        let deadline = tokio::time::Instant::now() + self.shared.config.debounce;
        loop {
            match tokio::time::timeout_at(deadline, updates.recv()).await {
                Ok(Some(update)) => self.absorb(update),
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    async fn evaluate(&mut self) {
        let Some(snapshot) = self.latest.as_ref().and_then(Update::snapshot) else {
            return;
        };
        let revision = self.latest_revision.max(snapshot.revision());
        let same_snapshot = self
            .evaluated
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, &snapshot));
        self.evaluated = Some(Arc::clone(&snapshot));
        let started = Instant::now();
        if !same_snapshot {
            match layout::active_tree(&snapshot, self.prefix.as_bytes()) {
                Ok(tree) => {
                    if !self.unchanged(&tree) {
                        self.compile(tree, revision, started).await;
                        return;
                    }
                }
                Err(e) => {
                    let rejection = Rejection {
                        key: e.key().map_or_else(|| self.prefix.clone(), str::to_owned),
                        revision: snapshot.revision(),
                        key_revision: e.mod_revision(),
                        message: e.to_string(),
                    };
                    self.candidate = None;
                    self.reject(rejection, revision, started);
                    return;
                }
            }
        }
        // The tree is what was evaluated last: only the revision moves.
        match &self.candidate {
            Some(c) if c.accepted => self.restamp(revision),
            _ => self.shared.status.send_modify(|s| {
                s.evaluated_revision = s.evaluated_revision.max(revision);
            }),
        }
    }

    /// True when `tree` has the same generation and file versions as the last
    /// candidate.
    fn unchanged(&self, tree: &Tree) -> bool {
        let Some(c) = &self.candidate else {
            return false;
        };
        c.tree.generation == tree.generation
            && c.tree.files.len() == tree.files.len()
            && c.tree
                .files
                .iter()
                .zip(&tree.files)
                .all(|((p1, f1), (p2, f2))| p1 == p2 && f1.mod_revision == f2.mod_revision)
    }

    async fn compile(&mut self, tree: Tree, revision: i64, started: Instant) {
        let tree = Arc::new(tree);
        let Some(mut compiler) = self.compiler.take() else {
            return;
        };
        let job_tree = Arc::clone(&tree);
        let prefix = self.prefix.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let (result, panicked) = compile_contained(&mut *compiler, &job_tree, &prefix);
            (compiler, result, panicked)
        })
        .await;
        let result = match joined {
            Ok((compiler, result, panicked)) => {
                // A compile that panicked may have left its cache inconsistent.
                self.compiler = Some(if panicked {
                    self.shared
                        .config
                        .backend
                        .compiler(self.shared.config.limits)
                } else {
                    compiler
                });
                result
            }
            Err(join_error) => {
                self.compiler = Some(
                    self.shared
                        .config
                        .backend
                        .compiler(self.shared.config.limits),
                );
                Err(Rejection {
                    key: self.prefix.clone(),
                    revision: tree.revision,
                    key_revision: None,
                    message: format!("the compile task failed: {join_error}"),
                })
            }
        };
        match result {
            Ok(engine) => {
                self.activate(&tree, engine, revision, started);
                self.candidate = Some(Candidate {
                    tree,
                    accepted: true,
                });
            }
            Err(rejection) => {
                self.candidate = Some(Candidate {
                    tree,
                    accepted: false,
                });
                self.reject(rejection, revision, started);
            }
        }
    }

    /// Reports a load: in status, and to every load-report receiver.
    fn report_load(&self, revision: i64, started: Instant, outcome: LoadOutcome) -> LoadReport {
        let sequence = {
            let status = self.shared.status.borrow();
            status.activations + status.rejections + 1
        };
        let report = LoadReport {
            sequence,
            revision,
            duration: started.elapsed(),
            outcome,
        };
        // No receiver is fine: nobody is counting.
        let _ = self.shared.loads.send(report.clone());
        report
    }

    fn activate(&self, tree: &Tree, engine: Arc<dyn Engine>, revision: i64, started: Instant) {
        let now = SystemTime::now();
        let set = ActiveSet {
            revision,
            compiled_revision: tree.revision,
            generation: tree.generation.clone(),
            policy_count: engine.policy_count(),
            engine,
            activated_at: now,
        };
        tracing::info!(
            revision,
            policies = set.policy_count,
            generation = ?set.generation,
            "policy set activated"
        );
        let policy_count = set.policy_count;
        // The one store that makes the set visible to deciders.
        self.shared.active.store(Some(Arc::new(set)));
        let load = self.report_load(revision, started, LoadOutcome::Activated);
        self.shared.status.send_modify(|s| {
            s.last_load = Some(load);
            s.active_revision = revision;
            s.compiled_revision = tree.revision;
            s.generation = tree.generation.clone();
            s.policy_count = policy_count;
            s.stray_keys = tree.stray.clone();
            s.evaluated_revision = s.evaluated_revision.max(revision);
            s.last_rejection = None;
            s.activations += 1;
            s.activated_at = Some(now);
        });
    }

    fn reject(&self, rejection: Rejection, revision: i64, started: Instant) {
        tracing::warn!(%rejection, "policy candidate rejected; keeping the last-known-good set");
        let load = self.report_load(revision, started, LoadOutcome::Rejected(rejection.clone()));
        self.shared.status.send_modify(|s| {
            s.last_load = Some(load);
            s.evaluated_revision = s.evaluated_revision.max(revision);
            s.last_rejection = Some(rejection);
            s.rejections += 1;
        });
    }

    /// The active set is exact at `revision` too.
    fn restamp(&self, revision: i64) {
        let Some(current) = self.shared.active.load_full() else {
            return;
        };
        if current.revision >= revision {
            return;
        }
        self.shared
            .active
            .store(Some(Arc::new(current.at(revision))));
        self.shared.status.send_modify(|s| {
            s.active_revision = revision;
            s.evaluated_revision = s.evaluated_revision.max(revision);
        });
    }

    /// Tracks since when the mirror has not been ready (for staleness).
    fn observe_mirror(&self, status: &Status) {
        let ready = status.state == State::Ready;
        let since = &self.shared.not_ready_since;
        if ready {
            since.store(0, Ordering::SeqCst);
        } else if since.load(Ordering::SeqCst) == 0 {
            since.store(
                self.shared.nanos_since_base(Instant::now()),
                Ordering::SeqCst,
            );
        }
        let state = status.state.to_string();
        self.shared.status.send_modify(|s: &mut PolicyStatus| {
            s.mirror_state = state;
            if ready {
                s.mirror_not_ready_since = None;
            } else if s.mirror_not_ready_since.is_none() {
                s.mirror_not_ready_since = Some(SystemTime::now());
            }
        });
    }
}
