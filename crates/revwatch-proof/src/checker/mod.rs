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
//! | `Reliable` | no revision that touches the range is skipped between the first and the last delivery, or up to a bookmark or [`History::expect_through`] |
//! | `Resumable` | after [`Delivery::Reconnected`], the first batch is exactly the next revision that touches the range |
//! | `Bookmarkable` | nothing at or below a delivered progress revision arrives later |
//! | `Resync` | a resync batch equals the true diff from the subscriber's state to truth's state at its revision |
//! | `Snapshot` | every published snapshot hash (and sampled full snapshot) equals truth's at its revision, and published revisions never decrease |
//! | `Convergence` | the mirror's final state equals etcd's range at the same revision ([`check_convergence`]) |
//! | `Future` | a revision beyond the end of truth |

mod reference;
mod report;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

pub use self::reference::reference_history;
use self::report::window;
use crate::history::{Batch, Change, Delivery, FullSnapshot, History, Op};
use crate::keys::{KeyRange, show};
use crate::schedule::Schedule;
use crate::state::State;
use crate::truth::{Cursor, Truth};

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
    /// A reconnect did not continue at exactly the next revision.
    Resumable,
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
    /// Progress deliveries checked.
    pub progress: usize,
    /// Changes checked.
    pub changes: usize,
    /// Truth revisions in the range that were verified delivered (or covered
    /// by a verified resync).
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

/// A violation found during replay, before its window is rendered.
struct Found {
    kind: Kind,
    at: usize,
    /// Earliest delivery the window must show (the one it conflicts with).
    since: usize,
    revision: i64,
    detail: String,
}

/// The subscriber's position while replaying a history.
struct Replay<'c, 'a> {
    checker: &'c Checker<'a>,
    history: &'c History,
    truth: Cursor<'a>,
    state: State,
    /// Last batch revision and its delivery index.
    applied: (i64, Option<usize>),
    /// Highest progress revision and its delivery index.
    bookmark: (i64, Option<usize>),
    /// Index of the reconnect marker the next batch follows, if any.
    reconnected: Option<usize>,
    /// Delivery index of each batch revision.
    delivered: HashMap<i64, usize>,
    summary: CheckSummary,
}

impl<'c, 'a> Replay<'c, 'a> {
    fn new(checker: &'c Checker<'a>, history: &'c History) -> Self {
        Self {
            checker,
            history,
            truth: checker.truth.cursor(checker.range.clone()),
            state: State::default(),
            applied: (0, None),
            bookmark: (0, None),
            reconnected: None,
            delivered: HashMap::new(),
            summary: CheckSummary::default(),
        }
    }

    fn known(&self) -> i64 {
        self.applied.0.max(self.bookmark.0)
    }

    fn delivery(&mut self, at: usize, d: &Delivery) -> Result<(), Found> {
        self.summary.deliveries += 1;
        match d {
            Delivery::Reconnected => {
                self.reconnected = Some(at);
                Ok(())
            }
            Delivery::Progress { revision } => {
                self.summary.progress += 1;
                self.future(at, *revision)?;
                if *revision < self.known() {
                    let since = self.bookmark.1.max(self.applied.1).unwrap_or(at);
                    return Err(Found {
                        kind: Kind::Ordered,
                        at,
                        since,
                        revision: *revision,
                        detail: format!(
                            "progress at {revision} after revision {} was already known",
                            self.known()
                        ),
                    });
                }
                self.bookmark = (*revision, Some(at));
                Ok(())
            }
            Delivery::Batch(b) => self.batch(at, b),
        }
    }

    fn future(&self, at: usize, revision: i64) -> Result<(), Found> {
        let through = self.checker.truth.through();
        if revision > through {
            return Err(Found {
                kind: Kind::Future,
                at,
                since: at,
                revision,
                detail: format!("revision {revision} is beyond truth's last revision {through}"),
            });
        }
        Ok(())
    }

    /// Reports a sequencing fault, as `Resumable` right after a reconnect.
    fn sequencing(
        &self,
        kind: Kind,
        at: usize,
        since: Option<usize>,
        revision: i64,
        detail: String,
    ) -> Found {
        match self.reconnected {
            Some(marker) => Found {
                kind: Kind::Resumable,
                at,
                since: since.unwrap_or(marker).min(marker),
                revision,
                detail: format!("after reconnecting: {detail}"),
            },
            None => Found {
                kind,
                at,
                since: since.unwrap_or(at),
                revision,
                detail,
            },
        }
    }

    fn batch(&mut self, at: usize, b: &Batch) -> Result<(), Found> {
        let r = b.revision;
        self.future(at, r)?;
        let mut keys = HashSet::new();
        if let Some(dup) = b.changes.iter().find(|c| !keys.insert(c.key.as_slice())) {
            return Err(Found {
                kind: Kind::Unique,
                at,
                since: at,
                revision: r,
                detail: format!("key {} appears twice in one batch", show(&dup.key, 64)),
            });
        }
        if let Some(&earlier) = self.delivered.get(&r) {
            let shared = self
                .batch_at(earlier)
                .is_some_and(|e| e.changes.iter().any(|c| keys.contains(c.key.as_slice())));
            let (kind, what) = if shared {
                (Kind::Unique, "delivered again")
            } else {
                (Kind::Atomic, "split: more of it arrived later")
            };
            return Err(self.sequencing(
                kind,
                at,
                Some(earlier),
                r,
                format!("revision {r} {what}"),
            ));
        }
        let (last, last_at) = self.applied;
        if r <= last {
            return Err(self.sequencing(
                Kind::Ordered,
                at,
                last_at,
                r,
                format!("batch at {r} after batch at {last}"),
            ));
        }
        let (mark, mark_at) = self.bookmark;
        if r < mark || (r == mark && !(b.resync && b.changes.is_empty())) {
            return Err(Found {
                kind: Kind::Bookmarkable,
                at,
                since: mark_at.unwrap_or(at),
                revision: r,
                detail: format!("batch at {r} after a progress mark at {mark}"),
            });
        }
        if b.resync {
            self.resync(at, b)?;
        } else {
            self.incremental(at, b)?;
        }
        self.state.apply_all(&b.changes);
        self.applied = (r, Some(at));
        self.delivered.insert(r, at);
        self.reconnected = None;
        self.summary.batches += 1;
        self.summary.changes += b.changes.len();
        self.summary.last_revision = r;
        Ok(())
    }

    fn batch_at(&self, i: usize) -> Option<&'c Batch> {
        match self.history.deliveries.get(i) {
            Some(Delivery::Batch(b)) => Some(b),
            _ => None,
        }
    }

    /// A resync may jump, but must hold exactly the diff to truth at its revision.
    fn resync(&mut self, at: usize, b: &Batch) -> Result<(), Found> {
        let before = self.truth.revision();
        let want = self.state.diff(self.truth.advance_to(b.revision));
        if let Some(detail) = mismatch(&b.changes, &want) {
            return Err(Found {
                kind: Kind::Resync,
                at,
                since: self.applied.1.unwrap_or(at),
                revision: b.revision,
                detail: format!("resync at {} is not the true diff: {detail}", b.revision),
            });
        }
        self.summary.resyncs += 1;
        self.summary.revisions_checked += self.touching(before + 1, b.revision);
        Ok(())
    }

    /// An ordinary batch: nothing skipped before it, and exactly truth's
    /// changes at its revision.
    fn incremental(&mut self, at: usize, b: &Batch) -> Result<(), Found> {
        let r = b.revision;
        let range = &self.checker.range;
        if let Some(missed) = self
            .checker
            .truth
            .first_touching(range, self.applied.0 + 1, r - 1)
        {
            // A revision that still comes later is out of order, not lost.
            let later = self.history.deliveries[at..]
                .iter()
                .any(|d| matches!(d, Delivery::Batch(b) if b.revision == missed));
            let (kind, detail) = if later {
                (
                    Kind::Ordered,
                    format!("batch at {r} before revision {missed}, which arrives later"),
                )
            } else {
                (
                    Kind::Reliable,
                    format!("revision {missed} was skipped (next delivered: {r})"),
                )
            };
            return Err(self.sequencing(kind, at, self.applied.1, r, detail));
        }
        self.truth.advance_to(r);
        let want = self.checker.truth.changes_in(r, range);
        let got: BTreeMap<&[u8], &Op> = b
            .changes
            .iter()
            .map(|c| (c.key.as_slice(), &c.op))
            .collect();
        for c in &want {
            match got.get(c.key.as_slice()) {
                None => {
                    return Err(Found {
                        kind: Kind::Atomic,
                        at,
                        since: at,
                        revision: r,
                        detail: format!(
                            "batch at {r} holds {} of the revision's {} changes; missing {c}",
                            b.changes.len(),
                            want.len()
                        ),
                    });
                }
                Some(op) if **op != c.op => {
                    return Err(Found {
                        kind: Kind::Content,
                        at,
                        since: at,
                        revision: r,
                        detail: format!("at {r}, truth has {c}"),
                    });
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = b
            .changes
            .iter()
            .find(|c| !want.iter().any(|w| w.key == c.key))
        {
            return Err(Found {
                kind: Kind::Content,
                at,
                since: at,
                revision: r,
                detail: format!("{extra} did not happen at {r}"),
            });
        }
        if !want.is_empty() {
            self.summary.revisions_checked += 1;
        }
        Ok(())
    }

    /// Truth revisions touching the range in `from..=to`.
    fn touching(&self, from: i64, to: i64) -> usize {
        if from > to {
            return 0;
        }
        self.checker
            .truth
            .revisions()
            .skip_while(|(r, _)| *r < from)
            .take_while(|(r, _)| *r <= to)
            .filter(|(_, cs)| cs.iter().any(|c| self.checker.range.contains(&c.key)))
            .count()
    }

    /// Nothing vouched for by a bookmark or by `expect_through` may be missing.
    fn end(&mut self) -> Result<(), Found> {
        let expected = self.history.expect_through.unwrap_or(0);
        let through = self.bookmark.0.max(expected);
        let (last, last_at) = self.applied;
        if let Some(missed) =
            self.checker
                .truth
                .first_touching(&self.checker.range, last + 1, through)
        {
            let at = self.history.deliveries.len().saturating_sub(1);
            let vouched = if expected > self.bookmark.0 {
                format!("the history was to reach {expected}")
            } else {
                format!("a progress mark vouched for {}", self.bookmark.0)
            };
            return Err(Found {
                kind: Kind::Reliable,
                at,
                since: last_at.or(self.bookmark.1).unwrap_or(at),
                revision: missed,
                detail: format!("revision {missed} was never delivered, yet {vouched}"),
            });
        }
        Ok(())
    }
}

/// How `got` differs from `want`, as a set of changes.
fn mismatch(got: &[Change], want: &[Change]) -> Option<String> {
    let got_map: BTreeMap<&[u8], &Op> = got.iter().map(|c| (c.key.as_slice(), &c.op)).collect();
    let want_map: BTreeMap<&[u8], &Op> = want.iter().map(|c| (c.key.as_slice(), &c.op)).collect();
    if got_map.len() != got.len() {
        return Some("a key appears twice".into());
    }
    for c in want {
        match got_map.get(c.key.as_slice()) {
            None => return Some(format!("missing {c}")),
            Some(op) if **op != c.op => return Some(format!("wrong change for key, expected {c}")),
            Some(_) => {}
        }
    }
    got.iter()
        .find(|c| !want_map.contains_key(c.key.as_slice()))
        .map(|c| format!("unexpected {c}"))
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
