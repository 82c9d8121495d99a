//! A run of replies: one that arrived, then those already received after it,
//! handled in a row and applied, and how a run that stops the stream ends it.
//!
//! A run's revisions are applied to the writer's map in place, and only the
//! state after the last one is made current: readers and waiters skip the
//! revisions in between (they never see part of one). That spares a snapshot per
//! revision, and with it the copy of the map's path to each changed key (and
//! freeing it again).
//!
//! - While no subscription is live, the run is *quiet*: no batch is made, and
//!   the hub's lock is held from start to end, so a subscription made meanwhile
//!   waits until the run is published and starts from there. That is why
//!   [`drain`] is not async: it cannot await while holding it.
//! - With a live subscription, each revision gets its batch, which builds its
//!   snapshot only if asked for (see [`Batch`](crate::mirror::Batch)); the
//!   batches are queued together with the state after the last one, so every
//!   subscriber still gets one batch per revision, in order. Such a run is also
//!   bounded to a quarter of a subscriber's buffer, so that batching never makes
//!   a subscriber that keeps up between runs lag.
//!
//!   The state published after it is its last batch, unbuilt: a snapshot taken
//!   per run would share the writer's map, and the next run would copy the path
//!   to each key it changes (and free the old one), most of the cost of a
//!   revision when the keys changed are spread out. The first reader to ask
//!   builds the snapshot instead (see [`Hub::snapshot`]), and the writer keeps
//!   its map to itself. Every [`MAX_UNBUILT_REVISIONS`] revisions the writer
//!   builds one: that bounds how many revisions a reader replays and how many
//!   unbuilt batches stay linked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_proto::mvccpb::Event;

use super::WatchEnd;
use super::publish::{Publisher, report_published};
use super::stream::{Output, StreamCheck, StreamEnd};
use crate::client::{Error, WatchResponse};
use crate::mirror::batch::{ResyncReason, State, Update};
use crate::mirror::hub::{Hub, Quiet};
use crate::mirror::report::{Heard, Rejected};
use crate::mirror::status::ReconnectCause;
use crate::mirror::store::Invalid;

/// Bounds of a run: events, and time (checked every [`RUN_TIME_CHECK`] events).
/// They bound how long a revision applied in a run waits to be visible, how long
/// a subscription made meanwhile waits, and how long the task goes without
/// yielding.
const MAX_RUN_EVENTS: u64 = 16_384;
const MAX_RUN_TIME: Duration = Duration::from_millis(2);
const RUN_TIME_CHECK: u64 = 64;

/// Most revisions published since the writer last built a snapshot: a fraction
/// of a millisecond's replay, at most, for the first reader after them. Fewer
/// would copy more of the map per revision; more measured no faster (the
/// unbuilt batches keep the entries they replaced alive, and memory grows).
pub(super) const MAX_UNBUILT_REVISIONS: u64 = 1024;

/// One reply as the stream yields it.
pub(super) type Reply = Result<Option<WatchResponse>, Error>;

/// Replies handled in a row, as long as they carry only events (see the module
/// docs).
pub(super) struct Run<'a, T> {
    mode: Mode<'a, T>,
    started: Instant,
    events: u64,
    revisions: u64,
    /// `events` at the last time check.
    checked: u64,
}

/// How a run publishes what it applied.
enum Mode<'a, T> {
    /// No subscription is live: no batches, and the hub's lock is held.
    Quiet(Quiet<'a, T>),
    /// One batch per revision, queued when the run ends.
    Batched {
        batches: Vec<Update<T>>,
        /// Most revisions in the run.
        max_revisions: u64,
    },
}

impl<'a, T> Run<'a, T> {
    fn new(hub: &'a Hub<T>, started: Instant) -> Self {
        let mode = match hub.quiet() {
            Some(quiet) => Mode::Quiet(quiet),
            None => Mode::Batched {
                batches: Vec::new(),
                max_revisions: (hub.capacity() / 4).max(1) as u64,
            },
        };
        Run {
            mode,
            started,
            events: 0,
            revisions: 0,
            checked: 0,
        }
    }

    /// Whether the run has reached its bounds.
    fn is_full(&mut self) -> bool {
        if self.events >= MAX_RUN_EVENTS {
            return true;
        }
        if let Mode::Batched { max_revisions, .. } = self.mode
            && self.revisions >= max_revisions
        {
            return true;
        }
        if self.events - self.checked < RUN_TIME_CHECK {
            return false;
        }
        self.checked = self.events;
        self.started.elapsed() >= MAX_RUN_TIME
    }
}

/// What ended a run of replies.
#[derive(Debug)]
pub(super) enum Next {
    /// Nothing: no further reply is ready, or the run is full.
    Nothing,
    /// A reply with more than events (created, progress), handled after the run.
    Out(Output),
    /// The stream must end.
    Stop(Stop),
}

/// Why a run ends the stream.
#[derive(Debug)]
pub(super) enum Stop {
    /// A reply failed validation, or canceled the watch.
    End(StreamEnd),
    /// An event could not be applied.
    Invalid(Invalid),
    /// The server closed the stream.
    Closed,
    Failed(Error),
}

/// Handles a run of replies: `first`, which arrived at `now`, then those that
/// `ready` yields without waiting (it must be cancel-safe: if nothing is ready,
/// nothing is lost). Validates them with `check`, applies their revisions
/// (through `revisions`, kept for its capacity) and publishes them.
///
/// What came before a bad or final reply was valid: it is published first, as
/// if each reply had been handled alone.
pub(super) fn drain<T: Send + Sync + 'static>(
    out: &mut Publisher<T>,
    check: &mut StreamCheck,
    revisions: &mut Vec<(i64, Vec<Event>)>,
    first: Reply,
    mut ready: impl FnMut() -> Option<Reply>,
    now: Instant,
) -> Next {
    let hub = Arc::clone(&out.hub);
    let mut run = Run::new(&hub, now);
    let mut heard = Heard::default();
    let mut reply = first;
    let next = loop {
        let resp = match reply {
            Ok(Some(resp)) => resp,
            Ok(None) => break Next::Stop(Stop::Closed),
            Err(e) => break Next::Stop(Stop::Failed(e)),
        };
        let header_revision = resp.header.as_ref().map_or(0, |h| h.revision);
        let checked = check.on_message(resp, now, revisions);
        heard.add(
            header_revision,
            matches!(&checked, Ok(out) if out.untrusted_progress),
        );
        let output = match checked {
            Ok(output) => output,
            Err(end) => break Next::Stop(Stop::End(end)),
        };
        if let Err(e) = out.apply(revisions, &mut run) {
            break Next::Stop(Stop::Invalid(e));
        }
        if output.created || output.untrusted_progress || output.bookmark.is_some() {
            break Next::Out(output);
        }
        if run.is_full() {
            break Next::Nothing;
        }
        match ready() {
            Some(r) => reply = r,
            None => break Next::Nothing,
        }
    };
    out.finish(run, heard);
    next
}

impl<T: Send + Sync + 'static> Publisher<T> {
    /// Applies `revisions` (draining it; in increasing order, validated by the
    /// stream check) as part of `run`, with a batch each unless the run is
    /// quiet. Stops at a revision that fails to apply, which leaves the state as
    /// it was before it.
    fn apply(
        &mut self,
        revisions: &mut Vec<(i64, Vec<Event>)>,
        run: &mut Run<'_, T>,
    ) -> Result<(), Invalid> {
        for (revision, events) in revisions.drain(..) {
            let n = events.len() as u64;
            match &mut run.mode {
                Mode::Quiet(_) => self.writer.apply_unpublished(revision, events)?,
                Mode::Batched { batches, .. } => {
                    // The state before: the run's last batch, or (first in the
                    // run) the published state, which is the writer's.
                    let before = match batches.last() {
                        Some(Update::Batch(last)) => State::After(Arc::clone(last)),
                        _ => self.hub.state(),
                    };
                    let batch = self.writer.apply_revision(revision, events, before)?;
                    batches.push(Update::Batch(batch));
                }
            }
            run.events += n;
            run.revisions += 1;
        }
        Ok(())
    }

    /// Ends `run`: publishes the state after its last revision, with its
    /// batches, and records what its replies told about the server (in a quiet
    /// run, once the hub's lock is released).
    fn finish(&mut self, run: Run<'_, T>, heard: Heard) {
        let Run {
            mode,
            started,
            events,
            revisions,
            ..
        } = run;
        if revisions == 0 {
            drop(mode);
            self.reporter.heard(heard);
            return;
        }
        let state = self.published_state(&mode, revisions);
        let max = self.max_reported_decode_failures;
        let (reporter, writer) = (&self.reporter, &mut self.writer);
        let made_current = || {
            reporter.heard(heard);
            report_published(reporter, writer, max, Some((events, revisions)));
        };
        match mode {
            Mode::Quiet(quiet) => quiet.publish(state, made_current),
            Mode::Batched { batches, .. } => self.hub.publish(state, &batches, made_current),
        }
        self.persist_maybe();
        // Each revision of the run took its share of the run's time.
        self.reporter.applied_in(started.elapsed(), revisions);
    }

    /// The state a run of `revisions` publishes: with batches, the last one,
    /// unbuilt, unless that would leave more than [`MAX_UNBUILT_REVISIONS`]
    /// unbuilt; otherwise the snapshot, built now.
    fn published_state(&mut self, mode: &Mode<'_, T>, revisions: u64) -> State<T> {
        let last = match mode {
            Mode::Batched { batches, .. } => match batches.last() {
                Some(Update::Batch(last)) => Some(last),
                _ => None,
            },
            Mode::Quiet(_) => None,
        };
        if let Some(last) = last
            && self.unbuilt + revisions <= MAX_UNBUILT_REVISIONS
        {
            self.unbuilt += revisions;
            return State::After(Arc::clone(last));
        }
        self.unbuilt = 0;
        let snapshot = self.writer.current();
        if let Some(last) = last {
            // Whoever reads only the newest batch's snapshot replays nothing.
            last.set_snapshot(Arc::clone(&snapshot));
        }
        State::At(snapshot)
    }
}

/// How the watch ends after a run stopped it on `endpoint`, and the rejected
/// response to count, if any. `created`: whether the stream was created; `from`:
/// its start revision.
pub(super) fn ending(
    stop: Stop,
    endpoint: &str,
    created: bool,
    from: i64,
) -> (WatchEnd, Option<Rejected>) {
    let reconnect = |cause, message: String, error| WatchEnd::Reconnect {
        cause,
        error,
        message,
        created,
    };
    match stop {
        Stop::Invalid(Invalid(reason)) => {
            tracing::warn!(%endpoint, %reason, "rejected watch event");
            (
                WatchEnd::Relist(ResyncReason::Validation),
                Some(Rejected::Event),
            )
        }
        Stop::Closed => (
            reconnect(
                ReconnectCause::StreamClosed,
                format!("{endpoint}: stream closed by the server"),
                None,
            ),
            None,
        ),
        Stop::Failed(e) => (WatchEnd::stream_error(e, created), None),
        Stop::End(StreamEnd::Compacted(at)) => {
            tracing::warn!(
                compact_revision = at,
                from,
                "watch start revision compacted"
            );
            (WatchEnd::Relist(ResyncReason::Compacted), None)
        }
        Stop::End(StreamEnd::Canceled(reason)) => (
            reconnect(
                ReconnectCause::Canceled,
                format!("{endpoint}: {reason}"),
                None,
            ),
            None,
        ),
        Stop::End(StreamEnd::Invalid { reason, relist }) => {
            tracing::warn!(%endpoint, %reason, relist, "rejected watch response");
            if relist {
                (
                    WatchEnd::Relist(ResyncReason::Validation),
                    Some(Rejected::Event),
                )
            } else {
                (
                    reconnect(
                        ReconnectCause::Validation,
                        format!("{endpoint}: {reason}"),
                        None,
                    ),
                    Some(Rejected::Header),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests;
