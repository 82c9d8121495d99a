//! The compaction boundary: whether compaction has reached a watch's start
//! revision `applied + 1`, from a count-only range at `applied` (which fails as
//! compacted exactly when the compaction revision is above `applied`).
//!
//! etcd lets a watch start *at* the compaction revision C, but compacting at C
//! removes the tombstones of revision C: such a watch silently misses the
//! deletes at C (and delivers half of a txn that put and deleted at C). So a
//! watch that replays history is trusted only if this check passes twice:
//!
//! 1. right after the created reply, before anything from the stream is
//!    applied: the watcher exists on the server, so any compaction that could
//!    have cost it an event either came before this check (and fails it), or
//!    comes later, while etcd is still reading the history for the watcher;
//! 2. once the stream has caught up, i.e. etcd has read that history (the
//!    stream delivered events up to its creation revision, or
//!    `catch_up_grace` passed: etcd reads lagging watchers every 100 ms): any
//!    compaction that could have raced those reads came before this check and
//!    fails it (compaction revisions only grow). Compactions after it cannot
//!    touch the stream, whose events now come live, not from history.
//!
//! A failed check relists (cause: compaction), whose resync batch holds the
//! exact difference. A compaction above `applied` that missed the watch's
//! history relists needlessly; that is the price of never missing one. Not
//! covered: etcd replays at most 1000 revisions per pass, so a catch-up of
//! more than that (counting only revisions that touch the prefix) is read in
//! several passes; a compaction at exactly the first revision of a later pass,
//! landing after check 2, is invisible to a client of etcd 3.4.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::{KeyRange, Runner, WatchEnd};
use crate::client::{Error, RangeRequest, RangeResponse};
use crate::mirror::batch::ResyncReason;
use crate::mirror::source::Source;

/// What the boundary check found.
#[derive(Debug)]
pub(super) enum Boundary {
    /// Compaction is below the start revision; the server was at this revision
    /// (if its reply said).
    Holds { server_revision: Option<i64> },
    /// Compaction reached the start revision: relist.
    Compacted,
    /// The check could not be made.
    Unknown(Error),
}

/// The count-only range at `applied` that fails as compacted exactly when the
/// compaction revision is above `applied`.
pub(super) fn boundary_request(range: &KeyRange, applied: i64) -> RangeRequest {
    RangeRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        revision: applied,
        count_only: true,
        limit: 1,
        ..RangeRequest::default()
    }
}

/// Reads the outcome of [`boundary_request`]: `None` if it did not answer
/// within `waited` on `endpoint`.
pub(super) fn boundary(
    read: Option<Result<RangeResponse, Error>>,
    endpoint: &str,
    waited: Duration,
) -> Boundary {
    match read {
        Some(Ok(resp)) => Boundary::Holds {
            server_revision: resp.header.map(|h| h.revision),
        },
        Some(Err(e)) if e.is_compacted() => Boundary::Compacted,
        Some(Err(e)) => Boundary::Unknown(e),
        None => Boundary::Unknown(Error::Timeout {
            endpoint: endpoint.into(),
            after: waited,
        }),
    }
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    /// The stream has caught up: re-checks the boundary if it replayed history,
    /// then declares the mirror Ready.
    pub(super) async fn settle(
        &self,
        applied: i64,
        replays: bool,
        stall_at: Instant,
        endpoint: &str,
    ) -> ControlFlow<WatchEnd> {
        if replays {
            self.check_boundary(applied, stall_at, endpoint).await?;
        }
        self.out.reporter.ready();
        ControlFlow::Continue(())
    }

    /// Checks the boundary of a created stream that started at `applied + 1`,
    /// by `deadline`; breaks with how the stream ends unless it holds.
    pub(super) async fn check_boundary(
        &self,
        applied: i64,
        deadline: Instant,
        endpoint: &str,
    ) -> ControlFlow<WatchEnd> {
        let started = Instant::now();
        let req = boundary_request(&self.range, applied);
        let read = tokio::time::timeout_at(deadline.into(), self.source.range(req))
            .await
            .ok();
        match boundary(read, endpoint, deadline.saturating_duration_since(started)) {
            Boundary::Holds { server_revision } => {
                if let Some(revision) = server_revision {
                    self.out.reporter.server_revision(revision);
                }
                ControlFlow::Continue(())
            }
            Boundary::Compacted => {
                tracing::warn!(
                    from = applied + 1,
                    "compaction reached the watch start revision; its deletes may be lost"
                );
                ControlFlow::Break(WatchEnd::Relist(ResyncReason::Compacted))
            }
            Boundary::Unknown(e) => ControlFlow::Break(WatchEnd::stream_error(e, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_proto::etcdserverpb::ResponseHeader;

    #[test]
    fn the_check_is_a_count_only_range_just_below_the_start() {
        let range = KeyRange::prefix(b"p/");
        let req = boundary_request(&range, 41);
        assert_eq!((req.revision, req.count_only, req.limit), (41, true, 1));
        assert_eq!((req.key, req.range_end), (b"p/".to_vec(), b"p0".to_vec()));
    }

    #[test]
    fn a_compacted_range_relists_and_any_other_failure_resumes() {
        let ok = RangeResponse {
            header: Some(ResponseHeader {
                revision: 50,
                ..ResponseHeader::default()
            }),
            ..RangeResponse::default()
        };
        let waited = Duration::from_secs(1);
        assert!(matches!(
            boundary(Some(Ok(ok)), "e:1", waited),
            Boundary::Holds {
                server_revision: Some(50)
            }
        ));
        let compacted = Error::Compacted {
            compact_revision: None,
            endpoint: "e:1".into(),
        };
        assert!(matches!(
            boundary(Some(Err(compacted)), "e:1", waited),
            Boundary::Compacted
        ));
        let other = Error::FutureRevision {
            endpoint: "e:1".into(),
        };
        assert!(matches!(
            boundary(Some(Err(other)), "e:1", waited),
            Boundary::Unknown(Error::FutureRevision { .. })
        ));
        // No answer by the stall deadline: the stream is as good as stalled.
        assert!(matches!(
            boundary(None, "e:1", waited),
            Boundary::Unknown(Error::Timeout { endpoint, after }) if endpoint == "e:1" && after == waited
        ));
    }
}
