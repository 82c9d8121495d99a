//! The replay behind [`Checker::check`]: the subscriber's position and state, advanced one
//! delivery at a time, each checked against truth. Every rule of the table in the
//! [module docs](super) except `Snapshot` and `Convergence` is enforced here.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{CheckSummary, Checker, Kind};
use crate::history::{Batch, Change, Delivery, History, Op, Resync};
use crate::keys::show;
use crate::state::State;
use crate::truth::Cursor;

/// A violation found during replay, before its window is rendered.
pub(super) struct Found {
    pub kind: Kind,
    pub at: usize,
    /// Earliest delivery the window must show (the one it conflicts with).
    pub since: usize,
    pub revision: i64,
    pub detail: String,
}

impl Found {
    /// A violation whose window starts at the offending delivery itself.
    fn here(kind: Kind, at: usize, revision: i64, detail: String) -> Self {
        Self {
            kind,
            at,
            since: at,
            revision,
            detail,
        }
    }
}

/// The subscriber's position while replaying a history.
pub(super) struct Replay<'c, 'a> {
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
    /// What the subscriber knew when the mirror's current watch began (at a
    /// reconnect, a resync or a subscription): a compaction explains a relist
    /// only if it is above this.
    stream_from: i64,
    /// No batch yet since the subscription began.
    fresh: bool,
    /// A restart marker not yet followed by a batch: its index and file.
    restart: Option<(usize, Option<i64>)>,
    /// The highest revision counted in `revisions_checked` (or covered by a
    /// first list), over every subscription: nothing is counted twice.
    counted_through: i64,
    pub summary: CheckSummary,
}

impl<'c, 'a> Replay<'c, 'a> {
    pub fn new(checker: &'c Checker<'a>, history: &'c History) -> Self {
        Self {
            checker,
            history,
            truth: checker.truth.cursor(checker.range.clone()),
            state: State::default(),
            applied: (0, None),
            bookmark: (0, None),
            reconnected: None,
            delivered: HashMap::new(),
            stream_from: 0,
            fresh: true,
            restart: None,
            counted_through: 0,
            summary: CheckSummary::default(),
        }
    }

    fn known(&self) -> i64 {
        self.applied.0.max(self.bookmark.0)
    }

    pub fn delivery(&mut self, at: usize, d: &Delivery) -> Result<(), Found> {
        self.summary.deliveries += 1;
        match d {
            Delivery::Reconnected => {
                self.reconnected = Some(at);
                self.stream_from = self.known();
                Ok(())
            }
            Delivery::Restarted { file } => {
                // A new mirror process: the subscriber starts over.
                self.state = State::default();
                self.truth = self.checker.truth.cursor(self.checker.range.clone());
                self.applied = (0, None);
                self.bookmark = (0, None);
                self.delivered.clear();
                self.reconnected = None;
                self.stream_from = 0;
                self.fresh = true;
                self.restart = Some((at, *file));
                self.summary.restarts += 1;
                Ok(())
            }
            Delivery::Progress { revision } => {
                self.summary.progress += 1;
                if let Some((marker, Some(file))) = self.restart {
                    return Err(Found {
                        kind: Kind::Resumable,
                        at,
                        since: marker,
                        revision: *revision,
                        detail: format!(
                            "after a restart from a snapshot file at {file}, progress at {revision} came before the file's state"
                        ),
                    });
                }
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
                // A bookmark vouches that everything up to it was delivered:
                // what it came ahead of arrives late, or never.
                if let Some(missed) = self.checker.truth.first_touching(
                    &self.checker.range,
                    self.known() + 1,
                    *revision,
                ) {
                    let late = self.history.deliveries[at + 1..]
                        .iter()
                        .any(|d| matches!(d, Delivery::Batch(b) if b.revision == missed));
                    let (kind, detail) = if late {
                        (
                            Kind::Bookmarkable,
                            format!(
                                "progress at {revision} came before revision {missed}, delivered later"
                            ),
                        )
                    } else {
                        (
                            Kind::Reliable,
                            format!(
                                "revision {missed} was never delivered, yet progress at {revision} vouched for it"
                            ),
                        )
                    };
                    return Err(Found {
                        kind,
                        at,
                        since: self.bookmark.1.max(self.applied.1).unwrap_or(at),
                        revision: missed,
                        detail,
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
            return Err(Found::here(
                Kind::Future,
                at,
                revision,
                format!("revision {revision} is beyond truth's last revision {through}"),
            ));
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
        // After a restart with a good file, the new mirror's first state is
        // the file's, and what follows resumes right after it.
        let resumes_file = match self.restart.take() {
            Some((marker, Some(file))) => {
                if b.resync != Some(Resync::Subscribed) || r != file {
                    return Err(Found {
                        kind: Kind::Resumable,
                        at,
                        since: marker,
                        revision: r,
                        detail: format!(
                            "after a restart from a snapshot file at {file}, the first delivery is {} at {r}, not the file's state",
                            b.resync.map_or("a batch", |c| c.name())
                        ),
                    });
                }
                Some(marker)
            }
            _ => None,
        };
        let mut keys = HashSet::new();
        if let Some(dup) = b.changes.iter().find(|c| !keys.insert(c.key.as_slice())) {
            return Err(Found::here(
                Kind::Unique,
                at,
                r,
                format!("key {} appears twice in one batch", show(&dup.key, 64)),
            ));
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
        if r < mark || (r == mark && !(b.resync.is_some() && b.changes.is_empty())) {
            return Err(Found {
                kind: Kind::Bookmarkable,
                at,
                since: mark_at.unwrap_or(at),
                revision: r,
                detail: format!("batch at {r} after a progress mark at {mark}"),
            });
        }
        match b.resync {
            Some(cause) => {
                self.explain(at, b, cause)?;
                self.resync(at, b, cause)?;
            }
            None => self.incremental(at, b)?,
        }
        self.state.apply_all(&b.changes);
        self.applied = (r, Some(at));
        self.delivered.insert(r, at);
        self.reconnected = resumes_file;
        self.fresh = false;
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

    /// Whether something explains a resync (rule `Relist`): a subscription
    /// begins with one; the mirror's first list comes before anything else;
    /// a subscriber that lagged is brought up to date; and a relist for
    /// compaction needs a compaction in truth above the revision the watch
    /// resumed after, made before the list. Nothing explains a relist for
    /// validation.
    fn explain(&mut self, at: usize, b: &Batch, cause: Resync) -> Result<(), Found> {
        let r = b.revision;
        let why = match cause {
            Resync::Lagged => return Ok(()),
            Resync::Subscribed if self.fresh => return Ok(()),
            Resync::Subscribed => "a subscription's first state in the middle of it".to_owned(),
            Resync::InitialList if self.known() == 0 => return Ok(()),
            Resync::InitialList => {
                format!("a first list after revision {} was delivered", self.known())
            }
            Resync::Compacted => {
                if let Some(c) = self
                    .checker
                    .truth
                    .compaction_explaining(self.stream_from, r)
                {
                    tracing::debug!(
                        "relist at {r} explained by the compaction at {}",
                        c.revision
                    );
                    self.summary.relists += 1;
                    return Ok(());
                }
                format!(
                    "a relist for compaction, but truth has no compaction above {} made before {r} (compactions: {})",
                    self.stream_from,
                    compactions(self.checker.truth.compactions())
                )
            }
            Resync::Validation => {
                "a relist because a response failed validation: nothing in truth explains it"
                    .to_owned()
            }
        };
        let since = self.reconnected.or(self.applied.1).unwrap_or(at);
        Err(Found {
            kind: Kind::Relist,
            at,
            since,
            revision: r,
            detail: format!("resync at {r} unexplained: {why}"),
        })
    }

    /// A resync may jump, but must hold exactly the diff to truth at its
    /// revision. The revisions it covers count as checked, except those a
    /// subscription's first state covers.
    fn resync(&mut self, at: usize, b: &Batch, cause: Resync) -> Result<(), Found> {
        let before = self.counted_through.max(self.applied.0);
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
        if !matches!(cause, Resync::Subscribed | Resync::InitialList) {
            self.summary.revisions_checked += self.touching(before + 1, b.revision);
        }
        self.counted_through = self.counted_through.max(b.revision);
        if cause != Resync::Lagged {
            // A list (or a subscription) is followed by a watch from it; a
            // lagging subscriber's catch-up leaves the mirror's watch as it was.
            self.stream_from = b.revision;
        }
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
                    return Err(Found::here(
                        Kind::Atomic,
                        at,
                        r,
                        format!(
                            "batch at {r} holds {} of the revision's {} changes; missing {c}",
                            b.changes.len(),
                            want.len()
                        ),
                    ));
                }
                Some(op) if **op != c.op => {
                    return Err(Found::here(
                        Kind::Content,
                        at,
                        r,
                        format!("at {r}, truth has {c}"),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = b
            .changes
            .iter()
            .find(|c| !want.iter().any(|w| w.key == c.key))
        {
            return Err(Found::here(
                Kind::Content,
                at,
                r,
                format!("{extra} did not happen at {r}"),
            ));
        }
        if !want.is_empty() && r > self.counted_through {
            self.summary.revisions_checked += 1;
            self.counted_through = r;
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

    /// Nothing `expect_through` vouches for may be missing (each bookmark was
    /// checked when it came).
    pub fn end(&mut self) -> Result<(), Found> {
        let Some(expected) = self.history.expect_through else {
            return Ok(());
        };
        if let Some(missed) =
            self.checker
                .truth
                .first_touching(&self.checker.range, self.known() + 1, expected)
        {
            let at = self.history.deliveries.len().saturating_sub(1);
            return Err(Found {
                kind: Kind::Reliable,
                at,
                since: self.applied.1.or(self.bookmark.1).unwrap_or(at),
                revision: missed,
                detail: format!(
                    "revision {missed} was never delivered, yet the history was to reach {expected}"
                ),
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

/// Compactions, briefly.
fn compactions(cs: &[crate::truth::Compaction]) -> String {
    if cs.is_empty() {
        return "none".into();
    }
    let list: Vec<String> = cs
        .iter()
        .map(|c| format!("{} (made at or after {})", c.revision, c.not_before))
        .collect();
    list.join(", ")
}
