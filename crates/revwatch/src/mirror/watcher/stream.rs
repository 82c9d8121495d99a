//! Validation of one watch stream's responses, fragment reassembly, grouping of
//! events by revision, and the bookmark (progress) rules: which replies are
//! bookmarks at once, and which are candidates that a read must verify first
//! ([`super::verify`]). Pure: no I/O, so every rule is unit-tested.

use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::WatchResponse;
use etcd_proto::mvccpb::Event;

use crate::mirror::config::ProgressTrust;

/// The watch id of progress replies to progress requests.
const PROGRESS_REPLY_ID: i64 = -1;

/// How a stream ends, from its responses' point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEnd {
    /// Canceled because the start revision was compacted: relist.
    Compacted(i64),
    /// Canceled for another reason: resume.
    Canceled(String),
    /// A response failed validation. `relist` when it may have corrupted what the
    /// stream delivers (events out of order), otherwise resuming is enough.
    Invalid { reason: String, relist: bool },
}

/// What one response yields besides its revisions (see
/// [`StreamCheck::on_message`]).
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Output {
    /// True for the created reply.
    pub(crate) created: bool,
    /// A trusted bookmark above the last applied revision.
    pub(crate) bookmark: Option<i64>,
    /// A progress reply that was not used as a bookmark.
    pub(crate) untrusted_progress: bool,
}

/// Per-stream validation state.
#[derive(Debug)]
pub(crate) struct StreamCheck {
    start: i64,
    /// Last applied revision (events or bookmarks); everything must be above it.
    applied: i64,
    watch_id: Option<i64>,
    created: Option<(i64, Instant)>,
    caught_up: bool,
    fragments: Vec<Event>,
    trust: ProgressTrust,
    grace: Duration,
    progress_sent: u64,
    progress_replies: u64,
    /// The highest progress revision awaiting verification.
    candidate: Option<i64>,
}

/// A progress reply's revision that may become a bookmark once a read at it
/// shows the range as it was at `base` (see [`super::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// The applied revision the range must be unchanged from.
    pub(crate) base: i64,
    /// The reply's revision.
    pub(crate) revision: i64,
}

fn invalid(reason: String, relist: bool) -> StreamEnd {
    StreamEnd::Invalid { reason, relist }
}

impl StreamCheck {
    /// A stream opened at `start` (= `applied + 1`).
    pub(crate) fn new(applied: i64, trust: ProgressTrust, grace: Duration) -> Self {
        StreamCheck {
            start: applied + 1,
            applied,
            watch_id: None,
            created: None,
            caught_up: false,
            fragments: Vec::new(),
            trust,
            grace,
            progress_sent: 0,
            progress_replies: 0,
            candidate: None,
        }
    }

    /// Records that a progress request was sent.
    pub(crate) fn progress_requested(&mut self) {
        self.progress_sent += 1;
    }

    /// How many progress requests went out, if none was answered.
    pub(crate) fn progress_unanswered(&self) -> Option<u64> {
        (self.progress_sent > 0 && self.progress_replies == 0).then_some(self.progress_sent)
    }

    /// The revision up to which everything has been applied.
    #[cfg(test)]
    pub(crate) fn applied(&self) -> i64 {
        self.applied
    }

    /// Whether the watch has replayed the history between its start and the
    /// revision at creation: it reached that revision with events, or the grace
    /// period since creation has passed (etcd syncs lagging watchers every 100 ms).
    /// False before the created reply.
    pub(crate) fn is_caught_up(&self, now: Instant) -> bool {
        self.caught_up
            || self
                .created
                .is_some_and(|(_, at)| now.saturating_duration_since(at) >= self.grace)
    }

    /// Whether the watch starts at or below the revision at its creation, so etcd
    /// replays history for it (from its store, not live). False before the
    /// created reply.
    pub(crate) fn replays_history(&self) -> bool {
        self.created.is_some_and(|(rev, _)| self.start <= rev)
    }

    /// When [`is_caught_up`](Self::is_caught_up) turns true at the latest (the end
    /// of the grace period); `None` before the created reply.
    pub(crate) fn catch_up_deadline(&self) -> Option<Instant> {
        self.created.map(|(_, at)| at + self.grace)
    }

    /// Validates `resp` and says what to apply: the complete revisions it ends
    /// are appended to `revisions` (in increasing order, above any already
    /// there), the rest is returned. Nothing from a response that fails
    /// validation is appended or returned.
    pub(crate) fn on_message(
        &mut self,
        resp: WatchResponse,
        now: Instant,
        revisions: &mut Vec<(i64, Vec<Event>)>,
    ) -> Result<Output, StreamEnd> {
        if resp.canceled {
            if resp.compact_revision > 0 {
                return Err(StreamEnd::Compacted(resp.compact_revision));
            }
            return Err(StreamEnd::Canceled(if resp.cancel_reason.is_empty() {
                "watch canceled by the server".into()
            } else {
                resp.cancel_reason
            }));
        }
        let header_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if header_rev <= 0 {
            return Err(invalid("response without a header revision".into(), false));
        }
        if resp.created {
            return self.on_created(&resp, header_rev, now);
        }
        let Some(id) = self.watch_id else {
            return Err(invalid("response before the created reply".into(), false));
        };
        if resp.events.is_empty() && !resp.fragment && self.fragments.is_empty() {
            return Ok(self.on_progress(resp.watch_id, id, header_rev, now));
        }
        if resp.watch_id != id {
            return Err(invalid(
                format!("events for unknown watch id {}", resp.watch_id),
                true,
            ));
        }
        if resp.fragment {
            self.fragments.extend(resp.events);
            return Ok(Output::default());
        }
        let events = if self.fragments.is_empty() {
            resp.events
        } else {
            let mut events = std::mem::take(&mut self.fragments);
            events.extend(resp.events);
            events
        };
        self.on_events(events, header_rev, revisions)
    }

    fn on_created(
        &mut self,
        resp: &WatchResponse,
        header_rev: i64,
        now: Instant,
    ) -> Result<Output, StreamEnd> {
        if self.watch_id.is_some() {
            return Err(invalid("second created reply".into(), false));
        }
        if !resp.events.is_empty() {
            return Err(invalid("created reply carries events".into(), false));
        }
        // A member behind what we already applied (e.g. just restarted, or cut off)
        // would serve an old view: go elsewhere.
        if header_rev < self.applied {
            return Err(invalid(
                format!(
                    "member at revision {header_rev} is behind the applied revision {}",
                    self.applied
                ),
                false,
            ));
        }
        self.watch_id = Some(resp.watch_id);
        self.created = Some((header_rev, now));
        // etcd puts a watcher starting above its current revision straight into
        // its synced set: there is no history to catch up on.
        self.caught_up = self.start > header_rev;
        Ok(Output {
            created: true,
            ..Output::default()
        })
    }

    fn on_progress(&mut self, reply_id: i64, own_id: i64, header_rev: i64, now: Instant) -> Output {
        let untrusted = Output {
            untrusted_progress: true,
            ..Output::default()
        };
        if reply_id == PROGRESS_REPLY_ID {
            self.progress_replies += 1;
        } else if reply_id != own_id {
            return untrusted;
        }
        // etcd 3.4 can answer with a revision below events still in flight.
        if header_rev < self.applied {
            return untrusted;
        }
        let trusted_now = self.trust == ProgressTrust::Immediate
            // Periodic notifies go through the watcher's own ordered channel, and
            // only to watchers that are synced.
            || reply_id == own_id;
        if trusted_now || header_rev == self.applied {
            // At the applied revision it tells nothing new: no bookmark, and
            // nothing to verify either.
            return self.bookmark(header_rev);
        }
        // Above the applied revision, from a channel of its own (etcd#15220):
        // events up to it may still be queued, or not yet read for a watcher
        // that is catching up. Kept for verification once the watch has caught up.
        if self.is_caught_up(now) {
            self.candidate = Some(self.candidate.map_or(header_rev, |c| c.max(header_rev)));
        }
        untrusted
    }

    /// The progress revision to verify, if any is above the applied revision.
    pub(crate) fn candidate(&self) -> Option<Candidate> {
        self.candidate
            .filter(|&revision| revision > self.applied)
            .map(|revision| Candidate {
                base: self.applied,
                revision,
            })
    }

    /// The verification of `candidate` ended: `unchanged` when a read at its
    /// revision showed the range as it was at its base. The candidate is spent
    /// either way: a failed one means events are on their way, and a later
    /// reply brings a new one. A bookmark only if nothing was applied since.
    pub(crate) fn verified(&mut self, candidate: Candidate, unchanged: bool) -> Output {
        if self.candidate == Some(candidate.revision) {
            self.candidate = None;
        }
        if unchanged && candidate.base == self.applied {
            self.bookmark(candidate.revision)
        } else {
            Output::default()
        }
    }

    fn bookmark(&mut self, rev: i64) -> Output {
        if rev <= self.applied {
            return Output::default();
        }
        self.applied = rev;
        // Everything up to the creation revision has been delivered.
        if self
            .created
            .is_some_and(|(created_rev, _)| rev >= created_rev)
        {
            self.caught_up = true;
        }
        Output {
            bookmark: Some(rev),
            ..Output::default()
        }
    }

    fn on_events(
        &mut self,
        events: Vec<Event>,
        header_rev: i64,
        revisions: &mut Vec<(i64, Vec<Event>)>,
    ) -> Result<Output, StreamEnd> {
        // Validate first, counting the revisions.
        let mut last = self.applied;
        let mut count = 0;
        for ev in &events {
            let Some(rev) = ev.kv.as_ref().map(|kv| kv.mod_revision) else {
                return Err(invalid("event without a key-value".into(), true));
            };
            if rev > header_rev {
                return Err(invalid(
                    format!("event at revision {rev} above the header revision {header_rev}"),
                    true,
                ));
            }
            if count > 0 && rev == last {
                continue;
            }
            if rev <= last {
                return Err(invalid(
                    format!(
                        "event at revision {rev} does not move past revision {last}: \
                         repeated or out of order"
                    ),
                    true,
                ));
            }
            last = rev;
            count += 1;
        }
        // Then group: a reply usually carries one revision, kept as it came.
        if count == 1 {
            revisions.push((last, events));
        } else if count > 1 {
            revisions.reserve(count);
            for ev in events {
                let rev = ev.kv.as_ref().map_or(0, |kv| kv.mod_revision);
                match revisions.last_mut() {
                    Some((r, evs)) if *r == rev => evs.push(ev),
                    _ => revisions.push((rev, vec![ev])),
                }
            }
        }
        self.applied = last;
        if let Some((created_rev, _)) = self.created
            && last >= created_rev
        {
            self.caught_up = true;
        }
        if self.candidate.is_some_and(|rev| rev <= last) {
            // Superseded by events: nothing left to confirm.
            self.candidate = None;
        }
        Ok(Output::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_proto::etcdserverpb::ResponseHeader;
    use etcd_proto::mvccpb::{KeyValue, event::EventType};

    fn hdr(rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: rev,
            ..Default::default()
        })
    }

    fn put(key: &str, rev: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: key.into(),
                mod_revision: rev,
                create_revision: rev,
                version: 1,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn created(rev: i64) -> WatchResponse {
        WatchResponse {
            header: hdr(rev),
            created: true,
            ..Default::default()
        }
    }

    fn events(header: i64, evs: Vec<Event>) -> WatchResponse {
        WatchResponse {
            header: hdr(header),
            events: evs,
            ..Default::default()
        }
    }

    fn progress(rev: i64) -> WatchResponse {
        WatchResponse {
            header: hdr(rev),
            watch_id: -1,
            ..Default::default()
        }
    }

    /// What one response yields, revisions included.
    #[derive(Debug, PartialEq)]
    struct Out {
        created: bool,
        revisions: Vec<(i64, Vec<Event>)>,
        bookmark: Option<i64>,
        untrusted_progress: bool,
    }

    impl StreamCheck {
        fn on(&mut self, resp: WatchResponse, now: Instant) -> Result<Out, StreamEnd> {
            let mut revisions = Vec::new();
            let out = self.on_message(resp, now, &mut revisions)?;
            Ok(Out {
                created: out.created,
                revisions,
                bookmark: out.bookmark,
                untrusted_progress: out.untrusted_progress,
            })
        }
    }

    fn check(applied: i64, trust: ProgressTrust) -> StreamCheck {
        StreamCheck::new(applied, trust, Duration::from_secs(1))
    }

    #[test]
    fn groups_catch_up_events_by_revision() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Immediate);
        assert!(c.on(created(20), now).unwrap().created);
        let out = c
            .on(
                events(20, vec![put("a", 11), put("b", 11), put("a", 15)]),
                now,
            )
            .unwrap();
        let revs: Vec<(i64, usize)> = out.revisions.iter().map(|(r, e)| (*r, e.len())).collect();
        assert_eq!(revs, [(11, 2), (15, 1)]);
        assert_eq!(c.applied(), 15);
    }

    #[test]
    fn repeated_or_backward_revisions_are_rejected_without_output() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Immediate);
        c.on(created(12), now).unwrap();
        c.on(events(12, vec![put("a", 12)]), now).unwrap();
        let err = c.on(events(13, vec![put("b", 12)]), now).unwrap_err();
        assert!(
            matches!(err, StreamEnd::Invalid { relist: true, .. }),
            "{err:?}"
        );
        let mut c = check(10, ProgressTrust::Immediate);
        c.on(created(12), now).unwrap();
        let err = c
            .on(events(12, vec![put("a", 12), put("b", 11)]), now)
            .unwrap_err();
        assert!(matches!(err, StreamEnd::Invalid { relist: true, .. }));
        assert_eq!(c.applied(), 10, "nothing from a rejected response counts");
    }

    #[test]
    fn events_above_header_or_at_start_minus_one_are_rejected() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Immediate);
        c.on(created(12), now).unwrap();
        assert!(c.on(events(12, vec![put("a", 13)]), now).is_err());
        let mut c = check(10, ProgressTrust::Immediate);
        c.on(created(12), now).unwrap();
        // A resume at revision + 0 would redeliver revision 10.
        assert!(c.on(events(12, vec![put("a", 10)]), now).is_err());
    }

    #[test]
    fn created_reply_behind_applied_is_rejected_without_relist() {
        let mut c = check(10, ProgressTrust::Immediate);
        let err = c.on(created(9), Instant::now()).unwrap_err();
        assert!(matches!(err, StreamEnd::Invalid { relist: false, .. }));
    }

    #[test]
    fn fragments_are_reassembled_before_applying() {
        let now = Instant::now();
        let mut c = check(1, ProgressTrust::Immediate);
        c.on(created(1), now).unwrap();
        let mut first = events(2, vec![put("a", 2)]);
        first.fragment = true;
        assert!(c.on(first, now).unwrap().revisions.is_empty());
        let out = c.on(events(2, vec![put("b", 2)]), now).unwrap();
        assert_eq!(out.revisions.len(), 1);
        assert_eq!(out.revisions[0].1.len(), 2);
    }

    #[test]
    fn compaction_cancel_asks_for_relist() {
        let now = Instant::now();
        let mut c = check(1, ProgressTrust::Immediate);
        c.on(created(50), now).unwrap();
        let resp = WatchResponse {
            canceled: true,
            compact_revision: 40,
            ..Default::default()
        };
        assert_eq!(c.on(resp, now), Err(StreamEnd::Compacted(40)));
    }

    #[test]
    fn immediate_trust_bookmarks_at_or_above_applied_only() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Immediate);
        c.on(created(10), now).unwrap();
        let out = c.on(progress(9), now).unwrap();
        assert!(out.untrusted_progress && out.bookmark.is_none());
        assert_eq!(c.on(progress(14), now).unwrap().bookmark, Some(14));
        // Nothing at or below a bookmark may follow.
        assert!(c.on(events(15, vec![put("a", 14)]), now).is_err());
    }

    fn candidate(base: i64, revision: i64) -> Candidate {
        Candidate { base, revision }
    }

    #[test]
    fn confirmed_trust_bookmarks_only_a_verified_candidate() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Confirmed);
        // Start above the server revision: synced at creation.
        c.on(created(10), now).unwrap();
        let out = c.on(progress(14), now).unwrap();
        assert!(out.untrusted_progress && out.bookmark.is_none());
        assert_eq!(c.candidate(), Some(candidate(10, 14)));
        // The highest reply is the one to verify.
        c.on(progress(16), now).unwrap();
        c.on(progress(15), now).unwrap();
        assert_eq!(c.candidate(), Some(candidate(10, 16)));
        let out = c.verified(candidate(10, 16), true);
        assert_eq!(out.bookmark, Some(16));
        assert_eq!((c.applied(), c.candidate()), (16, None));
        // Nothing at or below a bookmark may follow.
        assert!(c.on(events(17, vec![put("a", 16)]), now).is_err());
    }

    #[test]
    fn a_failed_verification_spends_the_candidate_and_events_follow() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Confirmed);
        c.on(created(10), now).unwrap();
        c.on(progress(14), now).unwrap();
        // The server had event 13 queued when it answered 14 (etcd#15220).
        let out = c.verified(candidate(10, 14), false);
        assert_eq!((out.bookmark, c.candidate()), (None, None));
        let out = c.on(events(14, vec![put("a", 13)]), now).unwrap();
        assert_eq!(out.revisions.len(), 1);
        // A later reply is verified against what is applied now.
        c.on(progress(14), now).unwrap();
        assert_eq!(c.candidate(), Some(candidate(13, 14)));
    }

    #[test]
    fn events_supersede_a_candidate_or_move_its_base() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Confirmed);
        c.on(created(10), now).unwrap();
        c.on(progress(14), now).unwrap();
        c.on(events(14, vec![put("a", 12)]), now).unwrap();
        assert_eq!(c.candidate(), Some(candidate(12, 14)));
        // A verification against the old base proves nothing about revision 12.
        let out = c.verified(candidate(10, 14), true);
        assert_eq!((out.bookmark, c.applied()), (None, 12));
        c.on(progress(15), now).unwrap();
        c.on(events(16, vec![put("a", 16)]), now).unwrap();
        assert_eq!(c.candidate(), None, "superseded by events");
        // A reply at the applied revision tells nothing new, and is no candidate.
        let out = c.on(progress(16), now).unwrap();
        assert_eq!(
            out,
            Out {
                created: false,
                revisions: vec![],
                bookmark: None,
                untrusted_progress: false
            }
        );
        assert_eq!(c.candidate(), None);
    }

    #[test]
    fn confirmed_trust_takes_its_own_notifies_at_once() {
        let now = Instant::now();
        let mut c = check(10, ProgressTrust::Confirmed);
        c.on(created(10), now).unwrap();
        // Periodic notifies carry the watch's id and come in order with events.
        let notify = WatchResponse {
            watch_id: 0,
            ..progress(14)
        };
        assert_eq!(c.on(notify, now).unwrap().bookmark, Some(14));
    }

    #[test]
    fn confirmed_trust_waits_for_catch_up() {
        let t0 = Instant::now();
        let mut c = check(5, ProgressTrust::Confirmed);
        // History to catch up on: 6..=20.
        c.on(created(20), t0).unwrap();
        assert!(c.on(progress(20), t0).unwrap().untrusted_progress);
        assert_eq!(c.candidate(), None, "not while catching up");
        // After the grace period the watcher counts as caught up.
        let later = t0 + Duration::from_secs(2);
        assert!(c.on(progress(20), later).unwrap().untrusted_progress);
        assert_eq!(c.candidate(), Some(candidate(5, 20)));
    }

    #[test]
    fn catch_up_is_known_from_events_bookmarks_or_grace() {
        let t0 = Instant::now();
        // Starting above the creation revision: nothing to replay.
        let mut c = check(10, ProgressTrust::Immediate);
        assert!(!c.is_caught_up(t0) && c.catch_up_deadline().is_none());
        c.on(created(10), t0).unwrap();
        assert!(!c.replays_history() && c.is_caught_up(t0));
        // History 6..=20: caught up by a bookmark at 20, not by an event below it.
        let mut c = check(5, ProgressTrust::Immediate);
        c.on(created(20), t0).unwrap();
        assert!(c.replays_history() && !c.is_caught_up(t0));
        c.on(events(20, vec![put("a", 12)]), t0).unwrap();
        assert!(!c.is_caught_up(t0));
        assert_eq!(c.on(progress(20), t0).unwrap().bookmark, Some(20));
        assert!(c.is_caught_up(t0));
        // By an event at the creation revision.
        let mut c = check(5, ProgressTrust::Confirmed);
        c.on(created(20), t0).unwrap();
        c.on(events(21, vec![put("a", 20)]), t0).unwrap();
        assert!(c.is_caught_up(t0));
        // Or by the grace period.
        let mut c = check(5, ProgressTrust::Confirmed);
        c.on(created(20), t0).unwrap();
        assert_eq!(c.catch_up_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(c.is_caught_up(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn events_before_created_are_rejected() {
        let mut c = check(1, ProgressTrust::Immediate);
        assert!(c.on(events(2, vec![put("a", 2)]), Instant::now()).is_err());
    }
}
