//! A run of replies: one that arrived, then those already received after it,
//! handled in a row and applied, and how a run that stops the stream ends it.
//!
//! While no subscription is live, a run's revisions are applied without a batch
//! or a snapshot each, and only the state after the last one is published:
//! readers and waiters skip the revisions in between (they never see part of
//! one), and nobody else could see them. That spares a snapshot per revision,
//! and with it the copy of the map's path to each changed key (and freeing it
//! again). A subscription made during the run waits until it is published and
//! starts from there. With a live subscription, every revision is published on
//! its own, with its batch, as it is applied.
//!
//! Such a quiet run holds the hub's lock from start to end, so [`drain`] is not
//! async: it cannot await while holding it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_proto::mvccpb::Event;

use super::WatchEnd;
use super::publish::{Publisher, report_published};
use super::stream::{Output, StreamCheck, StreamEnd};
use crate::client::{Error, WatchResponse};
use crate::mirror::batch::{ResyncReason, Update};
use crate::mirror::hub::{Hub, Quiet};
use crate::mirror::report::{Heard, Rejected};
use crate::mirror::status::ReconnectCause;
use crate::mirror::store::{Applied, Invalid};

/// Bounds of a run: events, and time (checked every [`RUN_TIME_CHECK`] events).
/// They bound how long a revision applied in a run waits to be visible, how long
/// a subscription made meanwhile waits, and how long the task goes without
/// yielding.
const MAX_RUN_EVENTS: u64 = 16_384;
const MAX_RUN_TIME: Duration = Duration::from_millis(2);
const RUN_TIME_CHECK: u64 = 64;

/// One reply as the stream yields it.
pub(super) type Reply = Result<Option<WatchResponse>, Error>;

/// Replies handled in a row, as long as they carry only events (see the module
/// docs).
pub(super) struct Run<'a, T> {
    /// Held while no subscription is live.
    quiet: Option<Quiet<'a, T>>,
    started: Instant,
    events: u64,
    revisions: u64,
    /// `events` at the last time check.
    checked: u64,
}

impl<'a, T> Run<'a, T> {
    fn new(hub: &'a Hub<T>, started: Instant) -> Self {
        Run {
            quiet: hub.quiet(),
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
        // In a quiet run, recorded once the run is published (not under the
        // hub's lock).
        if run.quiet.is_none() {
            out.reporter.heard(std::mem::take(&mut heard));
        }
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
    /// stream check) as part of `run`: unpublished while the run is quiet,
    /// otherwise each published with its batch. Stops at a revision that fails
    /// to apply, which leaves the state as it was before it.
    fn apply(
        &mut self,
        revisions: &mut Vec<(i64, Vec<Event>)>,
        run: &mut Run<'_, T>,
    ) -> Result<(), Invalid> {
        for (revision, events) in revisions.drain(..) {
            let n = events.len() as u64;
            if run.quiet.is_some() {
                self.writer.apply_unpublished(revision, events)?;
            } else {
                let started = Instant::now();
                let Applied { snapshot, batch } = self.writer.apply_revision(revision, events)?;
                self.publish(snapshot, Update::Batch(batch), Some(n));
                self.reporter.applied_in(started.elapsed(), 1);
            }
            run.events += n;
            run.revisions += 1;
        }
        Ok(())
    }

    /// Ends `run`: publishes what a quiet run applied and records what its
    /// replies told about the server (once the hub's lock is released).
    fn finish(&mut self, run: Run<'_, T>, heard: Heard) {
        let Run {
            quiet,
            started,
            events,
            revisions,
            ..
        } = run;
        let Some(quiet) = quiet else { return };
        if revisions == 0 {
            drop(quiet);
            self.reporter.heard(heard);
            return;
        }
        let snapshot = self.writer.current();
        let max = self.max_reported_decode_failures;
        let (reporter, writer) = (&self.reporter, &mut self.writer);
        quiet.publish(Arc::clone(&snapshot), || {
            reporter.heard(heard);
            report_published(reporter, writer, max, &snapshot, Some((events, revisions)));
        });
        self.persist_maybe(&snapshot);
        // Each revision of the run took its share of the run's time.
        self.reporter.applied_in(started.elapsed(), revisions);
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
