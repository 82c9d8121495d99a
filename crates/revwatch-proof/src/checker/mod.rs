//! The history checker: does what a subscriber saw match ground truth?
//!
//! [`Checker::check`] replays a [`History`] against a [`Truth`] restricted to
//! the mirrored key range, keeping the subscriber's state as it goes, and
//! stops at the first [`Violation`]. The guarantees checked are those etcd's
//! robustness suite validates for watches, plus the mirror's own:
//!
//! | [`Kind`] | Rule |
//! |---|---|
//! | `Ordered` | batch revisions strictly increase; no progress revision below one already known |
//! | `Unique` | no (key, revision) delivered twice |
//! | `Atomic` | the batch at R holds every change truth has at R in the range (a revision is never split) |
//! | `Content` | every change in a batch is exactly truth's change for that key at R |
//! | `Reliable` | no revision that touches the range is skipped between the first and the last delivery, or up to a bookmark (checked when the bookmark comes) or [`History::expect_through`] |
//! | `Resumable` | after [`Delivery::Reconnected`](crate::history::Delivery::Reconnected), the first batch is exactly the next revision that touches the range; after a restart marker with a file, the first delivery is the file's state and the next batch resumes right after it |
//! | `Relist` | a resync is explained: a subscription's first state, the mirror's first list, a lagging subscriber, or a relist for a compaction that truth shows above the revision the watch resumed after |
//! | `Bookmarkable` | nothing at or below a delivered progress revision arrives later (a bookmark ahead of a revision never delivered is `Reliable`), checked when the bookmark comes |
//! | `Resync` | a resync batch equals the true diff from the subscriber's state to truth's state at its revision |
//! | `Snapshot` | every published snapshot hash (and sampled full snapshot) equals truth's at its revision, and published revisions never decrease (except where a restarted mirror's begin) |
//! | `Convergence` | the mirror's final state equals etcd's range at the same revision ([`check_convergence`]) |
//! | `Future` | a revision beyond the end of truth |

mod reference;
mod replay;
mod report;

use std::fmt;

pub use self::reference::reference_history;
use self::replay::{Found, Replay};
use self::report::window;
use crate::history::{FullSnapshot, History, Op};
use crate::keys::{KeyRange, show};
use crate::schedule::Schedule;
use crate::state::State;
use crate::truth::Truth;

/// Which guarantee a history broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Revisions went backwards.
    Ordered,
    /// A (key, revision) arrived twice.
    Unique,
    /// A revision was split or partly delivered.
    Atomic,
    /// A change differs from truth.
    Content,
    /// A revision was skipped.
    Reliable,
    /// A reconnect (or a restart from a snapshot file) did not continue at
    /// exactly the next revision.
    Resumable,
    /// A resync that nothing explains.
    Relist,
    /// Something at or below a bookmark arrived after it.
    Bookmarkable,
    /// A resync batch is not the true diff.
    Resync,
    /// A published snapshot differs from truth.
    Snapshot,
    /// The final state differs from etcd's.
    Convergence,
    /// A revision beyond the end of truth.
    Future,
}

/// The run a history came from, printed with every violation so that it can
/// be replayed alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunContext {
    /// The run's seed.
    pub seed: u64,
    /// The fault schedule, if any.
    pub schedule: Option<Schedule>,
}

/// A broken guarantee, with the smallest window of history that shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub kind: Kind,
    /// Index of the offending delivery (or snapshot) in the history.
    pub index: Option<usize>,
    /// The revision concerned.
    pub revision: i64,
    /// What is wrong.
    pub detail: String,
    /// The deliveries (and truth) around it, one line each.
    pub window: Vec<String>,
    /// Seed and fault schedule.
    pub context: RunContext,
}

/// What a passing check covered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckSummary {
    /// Deliveries checked.
    pub deliveries: usize,
    /// Batches checked (resyncs included).
    pub batches: usize,
    /// Resync batches checked.
    pub resyncs: usize,
    /// Relists checked and explained by a compaction in truth.
    pub relists: usize,
    /// Mirror restarts the subscriber went through.
    pub restarts: usize,
    /// Progress deliveries checked.
    pub progress: usize,
    /// Changes checked.
    pub changes: usize,
    /// Truth revisions in the range that were verified delivered, or covered
    /// by a verified resync other than a subscription's first state; each
    /// counted once, even if delivered again after a restart.
    pub revisions_checked: usize,
    /// Snapshot hashes compared.
    pub snapshot_hashes: usize,
    /// Full snapshots compared.
    pub full_snapshots: usize,
    /// The last revision the subscriber reached.
    pub last_revision: i64,
}

/// Checks histories of one key range against one truth.
///
/// ```
/// use std::collections::BTreeMap;
/// use revwatch_proof::checker::{Checker, reference_history};
/// use revwatch_proof::history::{Change, Entry};
/// use revwatch_proof::keys::KeyRange;
/// use revwatch_proof::truth::Truth;
/// let e = Entry { value: b"v".to_vec(), create_revision: 2, mod_revision: 2, version: 1, lease: 0 };
/// let truth = Truth::new(BTreeMap::from([(2, vec![Change::put("/a/k", e)])]), 2).unwrap();
/// let range = KeyRange::prefix(b"/a/");
/// let checker = Checker::new(&truth, range.clone());
/// let history = reference_history(&truth, &range, 1);
/// assert!(checker.check(&history).is_ok());
/// ```
#[derive(Debug, Clone)]
pub struct Checker<'a> {
    truth: &'a Truth,
    range: KeyRange,
    context: RunContext,
}

impl<'a> Checker<'a> {
    /// A checker of histories of `range` against `truth`.
    pub fn new(truth: &'a Truth, range: KeyRange) -> Self {
        Self {
            truth,
            range,
            context: RunContext::default(),
        }
    }

    /// Attaches the run's seed and schedule to every violation.
    pub fn with_context(mut self, context: RunContext) -> Self {
        self.context = context;
        self
    }

    /// Checks deliveries, snapshot hashes, full snapshots and the final
    /// revision, stopping at the first violation.
    pub fn check(&self, history: &History) -> Result<CheckSummary, Box<Violation>> {
        let mut replay = Replay::new(self, history);
        for (i, d) in history.deliveries.iter().enumerate() {
            replay.delivery(i, d).map_err(|v| self.finish(v, history))?;
        }
        replay.end().map_err(|v| self.finish(v, history))?;
        let mut summary = replay.summary;
        summary.snapshot_hashes = self.check_snapshot_hashes(history)?;
        summary.full_snapshots = self.check_full_snapshots(history)?;
        Ok(summary)
    }

    fn finish(&self, f: Found, history: &History) -> Box<Violation> {
        Box::new(Violation {
            kind: f.kind,
            index: Some(f.at),
            revision: f.revision,
            window: window(history, self.truth, &self.range, f.since, f.at, f.revision),
            detail: f.detail,
            context: self.context.clone(),
        })
    }

    fn snapshot_violation(&self, index: usize, revision: i64, detail: String) -> Box<Violation> {
        Box::new(Violation {
            kind: Kind::Snapshot,
            index: Some(index),
            revision,
            detail,
            window: Vec::new(),
            context: self.context.clone(),
        })
    }

    fn check_snapshot_hashes(&self, history: &History) -> Result<usize, Box<Violation>> {
        let mut cursor = self.truth.cursor(self.range.clone());
        let mut last = i64::MIN;
        for (i, s) in history.snapshots.iter().enumerate() {
            if history.restarts.iter().any(|&(at, _)| at == i) {
                // A restarted mirror's own sequence begins.
                cursor = self.truth.cursor(self.range.clone());
                last = i64::MIN;
            }
            self.published(i, s.revision, &mut last)?;
            let want = cursor.advance_to(s.revision).hash();
            if s.hash != want {
                return Err(self.snapshot_violation(
                    i,
                    s.revision,
                    format!(
                        "snapshot hash {:#018x} at revision {} differs from truth's {want:#018x}",
                        s.hash, s.revision
                    ),
                ));
            }
        }
        Ok(history.snapshots.len())
    }

    fn check_full_snapshots(&self, history: &History) -> Result<usize, Box<Violation>> {
        let mut cursor = self.truth.cursor(self.range.clone());
        let mut last = i64::MIN;
        for (i, s) in history.full_snapshots.iter().enumerate() {
            if history.restarts.iter().any(|&(_, at)| at == i) {
                cursor = self.truth.cursor(self.range.clone());
                last = i64::MIN;
            }
            self.published(i, s.revision, &mut last)?;
            let want = cursor.advance_to(s.revision);
            if let Some(d) = first_difference(&s.state, want) {
                return Err(self.snapshot_violation(
                    i,
                    s.revision,
                    format!("full snapshot at revision {}: {d}", s.revision),
                ));
            }
        }
        Ok(history.full_snapshots.len())
    }

    /// Published revisions must exist in truth and never decrease.
    fn published(&self, i: usize, revision: i64, last: &mut i64) -> Result<(), Box<Violation>> {
        if revision > self.truth.through() {
            return Err(Box::new(Violation {
                kind: Kind::Future,
                index: Some(i),
                revision,
                detail: format!(
                    "snapshot published at {revision}, beyond truth's last revision {}",
                    self.truth.through()
                ),
                window: Vec::new(),
                context: self.context.clone(),
            }));
        }
        if revision < *last {
            return Err(self.snapshot_violation(
                i,
                revision,
                format!("snapshot published at {revision} after one at {last}"),
            ));
        }
        *last = revision;
        Ok(())
    }
}

/// Compares the mirror's final state with etcd's range at the same
/// revision; both must be at `revision`.
pub fn check_convergence(
    mirror: &FullSnapshot,
    etcd: &FullSnapshot,
    context: &RunContext,
) -> Result<(), Box<Violation>> {
    let detail = if mirror.revision != etcd.revision {
        Some(format!(
            "the mirror is at revision {}, etcd's range at {}",
            mirror.revision, etcd.revision
        ))
    } else {
        first_difference(&mirror.state, &etcd.state)
    };
    match detail {
        None => Ok(()),
        Some(detail) => Err(Box::new(Violation {
            kind: Kind::Convergence,
            index: None,
            revision: mirror.revision,
            detail,
            window: Vec::new(),
            context: context.clone(),
        })),
    }
}

/// The first key where `got` and `want` differ, described.
fn first_difference(got: &State, want: &State) -> Option<String> {
    if got.hash() == want.hash() && got == want {
        return None;
    }
    let diff = got.diff(want);
    let first = diff.first()?;
    let have = match got.get(&first.key) {
        Some(e) => e.to_string(),
        None => "absent".into(),
    };
    Some(format!(
        "{} keys differ; first {}: have {have}, truth {}",
        diff.len(),
        show(&first.key, 64),
        match &first.op {
            Op::Put(e) => e.to_string(),
            Op::Delete => "absent".into(),
        }
    ))
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
