//! Bookmarks from progress replies that are not ordered with the watch's events
//! ([`ProgressTrust::Confirmed`](crate::mirror::ProgressTrust::Confirmed)).
//!
//! etcd before 3.4.31 / 3.5.13 answers a progress request from a channel of its
//! own, with the store's revision R, while events at or below R may still be
//! queued behind it, or not yet read from history for a watcher that is catching
//! up (etcd#15220). Taking such a reply for a bookmark would publish the state at
//! the applied revision A as the state at R. So a reply is only a candidate, and
//! becomes a bookmark once one read at R shows that the range is exactly as it
//! was at A:
//!
//! 1. no key in the range at R was modified after A: the read filters with
//!    `min_mod_revision = A + 1` and returns no key (etcd applies that filter to
//!    the keys it returns, never to `count`);
//! 2. the range holds at R as many keys as the mirror holds at A (its `count`),
//!    so no key was deleted either: with 1, the keys at R are a subset of those
//!    at A, unchanged, and as many.
//!
//! The read is linearizable and costs the server a scan of the range at R, so
//! it runs when a reader waits for a revision (it asked for progress within the
//! last [`DEMAND_WINDOW`]), and otherwise at most once per
//! [`MirrorConfig::progress_verify_interval`](crate::mirror::MirrorConfig::progress_verify_interval),
//! which keeps the revision, lag and resume point of a quiet range fresh.
//!
//! What a state check cannot see: a key created and deleted again between A and
//! R leaves the range as it was. If those two events are still on their way,
//! they arrive after the bookmark, fail validation, and the mirror relists (an
//! empty resync): the published state was right at every revision, only the
//! history loses the key's short life.

use std::time::{Duration, Instant};

use super::stream::Candidate;
use super::{KeyRange, Runner, Watch, probe_timeout};
use crate::client::{RangeRequest, RangeResponse};
use crate::mirror::WAIT_PROGRESS_INTERVAL;
use crate::mirror::metrics::Verification;
use crate::mirror::source::Source;

/// How long a reader's request for progress counts as a reader waiting. One
/// that waits asks again every [`WAIT_PROGRESS_INTERVAL`]; an older request is
/// from a reader since served, which must not make later replies cost a read.
pub(super) const DEMAND_WINDOW: Duration = WAIT_PROGRESS_INTERVAL.saturating_mul(10);

/// The read that verifies `candidate`: the range at its revision, keys only,
/// filtered to keys modified after its base, at most one of them.
pub(super) fn verify_request(range: &KeyRange, candidate: Candidate) -> RangeRequest {
    RangeRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        revision: candidate.revision,
        min_mod_revision: candidate.base + 1,
        keys_only: true,
        limit: 1,
        ..RangeRequest::default()
    }
}

/// Whether the answer to [`verify_request`] shows the range unchanged from a
/// state of `keys_at_base` keys.
pub(super) fn unchanged(resp: &RangeResponse, keys_at_base: usize) -> bool {
    resp.kvs.is_empty() && usize::try_from(resp.count).is_ok_and(|count| count == keys_at_base)
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    /// Verifies the stream's progress candidate, if it has one and a
    /// verification is due, and publishes the bookmark it earns. A read that
    /// fails or does not answer within the probe timeout verifies nothing; the
    /// stream goes on either way.
    pub(super) async fn verify_progress(&mut self, w: &mut Watch<S::Watch>) {
        let Some(candidate) = w.check.candidate() else {
            return;
        };
        let now = Instant::now();
        let waited_for = w
            .progress_wanted_at
            .is_some_and(|at| now.saturating_duration_since(at) < DEMAND_WINDOW);
        if !waited_for && now < w.verify_due {
            return;
        }
        w.verify_due = now + self.config.progress_verify_interval;
        let keys_at_base = self.out.writer.raw_key_count();
        let req = verify_request(&self.range, candidate);
        let after = probe_timeout(self.config.stall_timeout);
        let read = tokio::time::timeout(after, self.source.range(req)).await;
        let verdict = match read {
            Ok(Ok(resp)) => Some(unchanged(&resp, keys_at_base)),
            Ok(Err(error)) => {
                tracing::debug!(%error, revision = candidate.revision, "progress verification failed");
                None
            }
            Err(_) => None,
        };
        let bookmark = w.check.verified(candidate, verdict == Some(true)).bookmark;
        tracing::debug!(?candidate, ?verdict, ?bookmark, "progress reply verified");
        self.out
            .reporter
            .progress_verified(match (bookmark, verdict) {
                (Some(_), _) => Verification::Bookmark,
                (None, Some(_)) => Verification::Changed,
                (None, None) => Verification::Failed,
            });
        if let Some(revision) = bookmark {
            self.out.bookmark(revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_proto::mvccpb::KeyValue;

    #[test]
    fn the_read_is_the_range_at_the_candidate_filtered_above_its_base() {
        let range = KeyRange::prefix(b"p/");
        let req = verify_request(
            &range,
            Candidate {
                base: 10,
                revision: 14,
            },
        );
        assert_eq!((req.key, req.range_end), (b"p/".to_vec(), b"p0".to_vec()));
        assert_eq!((req.revision, req.min_mod_revision), (14, 11));
        assert!(req.keys_only && req.limit == 1 && !req.count_only && !req.serializable);
    }

    #[test]
    fn unchanged_means_no_key_modified_and_none_deleted() {
        let resp = |count: i64, modified: bool| RangeResponse {
            count,
            kvs: if modified {
                vec![KeyValue::default()]
            } else {
                Vec::new()
            },
            ..RangeResponse::default()
        };
        assert!(unchanged(&resp(3, false), 3));
        assert!(
            !unchanged(&resp(3, true), 3),
            "a key was put after the base"
        );
        assert!(!unchanged(&resp(2, false), 3), "a key was deleted");
        assert!(!unchanged(&resp(4, false), 3), "a key appeared");
        assert!(unchanged(&resp(0, false), 0));
    }
}
