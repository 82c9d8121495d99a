//! Listing: the prefix page by page, every page read at the first page's
//! revision, published as one resync batch holding exactly the difference from
//! the current state. Its progress is reported at every page (see
//! [`ListProgress`]).

use std::time::SystemTime;

use super::{KeyRange, Runner};
use crate::client::{Error, RangeRequest, RangeResponse};
use crate::mirror::batch::ResyncReason;
use crate::mirror::error::FailureKind;
use crate::mirror::report::{Rejected, Reporter};
use crate::mirror::source::Source;
use crate::mirror::status::ListProgress;
use crate::mirror::store::Invalid;

/// Why a list attempt failed.
#[derive(Debug)]
pub(super) enum ListError {
    Source(Error),
    Invalid(Invalid),
}

impl ListError {
    /// A page read at a pinned revision that got compacted meanwhile: list
    /// again at once, without backing off.
    pub(super) fn is_compacted(&self) -> bool {
        matches!(self, ListError::Source(e) if e.is_compacted())
    }
}

/// The first page: at the server's current revision, which pins the others.
pub(super) fn first_page(range: &KeyRange, page_size: i64) -> RangeRequest {
    RangeRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        limit: page_size,
        ..RangeRequest::default()
    }
}

/// The page after the one that ended with `last_key`, at `revision`.
pub(super) fn next_page(
    range: &KeyRange,
    last_key: Option<Vec<u8>>,
    revision: i64,
    page_size: i64,
) -> Result<RangeRequest, Invalid> {
    let Some(mut key) = last_key else {
        return Err(Invalid("page says more keys follow but holds none".into()));
    };
    // The smallest key after the last one listed.
    key.push(0);
    Ok(RangeRequest {
        key,
        range_end: range.range_end().to_vec(),
        limit: page_size,
        revision,
        ..RangeRequest::default()
    })
}

/// A list must not go back from the `published` revision (a lagging member).
pub(super) fn check_list_revision(revision: i64, published: i64) -> Result<(), Invalid> {
    if revision < published || revision <= 0 {
        return Err(Invalid(format!(
            "list at revision {revision} is behind the published revision {published}"
        )));
    }
    Ok(())
}

/// The progress of a list for `reason` begun at `started_at`, from its first page:
/// etcd counts every key of the range in `count`, whatever the limit.
pub(super) fn progress(
    reason: ResyncReason,
    first: &RangeResponse,
    revision: i64,
    started_at: SystemTime,
) -> ListProgress {
    let total = u64::try_from(first.count).unwrap_or(0);
    ListProgress::new(reason, revision, total, started_at)
}

/// Clears the reported list progress when the list ends, however it ends: with
/// its publication, an error, or the runner stopping mid-list.
struct Listing(Reporter);

impl Drop for Listing {
    fn drop(&mut self) {
        self.0.list_ended();
    }
}

impl<S: Source, T: Send + Sync + 'static> Runner<S, T> {
    /// Lists the prefix and publishes the difference from the current state as
    /// one resync batch.
    pub(super) async fn list(&mut self, reason: ResyncReason) -> Result<(), ListError> {
        let page_size = self.config.page_size;
        let started_at = SystemTime::now();
        let first = self
            .source
            .range(first_page(&self.range, page_size))
            .await
            .map_err(ListError::Source)?;
        let revision = first.header.as_ref().map_or(0, |h| h.revision);
        self.out.reporter.server_revision(revision);
        check_list_revision(revision, self.out.writer.revision()).map_err(ListError::Invalid)?;
        let listing = Listing(self.out.reporter.clone());
        listing
            .0
            .listing(progress(reason, &first, revision, started_at));
        let mut relist = self.out.writer.relist(revision, reason);
        let mut more = first.more;
        let mut last_key = first.kvs.last().map(|kv| kv.key.clone());
        let keys = first.kvs.len();
        relist.page(first.kvs).map_err(ListError::Invalid)?;
        listing.0.listed_page(keys);
        let mut pages = 1u32;
        while more {
            let req = next_page(&self.range, last_key.take(), revision, page_size)
                .map_err(ListError::Invalid)?;
            let page = self.source.range(req).await.map_err(ListError::Source)?;
            more = page.more;
            last_key = page.kvs.last().map(|kv| kv.key.clone());
            let keys = page.kvs.len();
            relist.page(page.kvs).map_err(ListError::Invalid)?;
            listing.0.listed_page(keys);
            pages += 1;
        }
        let applied = relist.finish();
        tracing::info!(
            revision,
            pages,
            keys = applied.snapshot.len(),
            changes = applied.batch.changes.len(),
            "listed"
        );
        // Published before the progress is cleared (`listing` dropped): a status
        // without it then shows the listed keys.
        self.out.listed(applied);
        drop(listing);
        Ok(())
    }

    /// Reports a failed list; a list blocks readiness.
    pub(super) fn list_failed(&self, e: &ListError, ever_ready: bool) {
        let (kind, message) = match e {
            ListError::Source(e) => (FailureKind::of(e), e.to_string()),
            ListError::Invalid(i) => (FailureKind::Other, i.to_string()),
        };
        tracing::warn!(error = %message, "list failed");
        if let ListError::Invalid(_) = e {
            self.out.reporter.rejected(Rejected::List);
        }
        self.failed(kind, message, ever_ready, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_page_is_unpinned_and_the_next_start_after_the_last_key() {
        let range = KeyRange::prefix(b"p/");
        let first = first_page(&range, 10);
        assert_eq!((first.revision, first.limit), (0, 10));
        assert_eq!(
            (first.key, first.range_end.clone()),
            (b"p/".to_vec(), b"p0".to_vec())
        );
        let next = next_page(&range, Some(b"p/k".to_vec()), 7, 10).unwrap();
        assert_eq!(
            (next.key, next.range_end),
            (b"p/k\0".to_vec(), b"p0".to_vec())
        );
        assert_eq!((next.revision, next.limit), (7, 10));
    }

    #[test]
    fn an_empty_page_that_promises_more_is_rejected() {
        let range = KeyRange::prefix(b"p/");
        assert!(next_page(&range, None, 7, 10).is_err());
    }

    #[test]
    fn a_list_behind_the_published_revision_is_rejected() {
        assert!(check_list_revision(5, 5).is_ok());
        assert!(check_list_revision(6, 5).is_ok());
        assert!(check_list_revision(4, 5).is_err());
        assert!(check_list_revision(0, 0).is_err(), "no header revision");
    }

    #[test]
    fn the_progress_counts_the_whole_range_from_the_first_page() {
        let at = SystemTime::now();
        let first = RangeResponse {
            count: 50_000,
            ..RangeResponse::default()
        };
        let p = progress(ResyncReason::Compacted, &first, 7, at);
        assert_eq!(
            (
                p.reason,
                p.revision,
                p.keys_listed,
                p.total,
                p.pages,
                p.started_at
            ),
            (ResyncReason::Compacted, 7, 0, 50_000, 0, at)
        );
        let odd = RangeResponse {
            count: -1,
            ..RangeResponse::default()
        };
        assert_eq!(progress(ResyncReason::InitialList, &odd, 7, at).total, 0);
    }

    #[test]
    fn only_a_compacted_source_error_skips_the_back_off() {
        let compacted = Error::Compacted {
            compact_revision: None,
            endpoint: "e:1".into(),
        };
        assert!(ListError::Source(compacted).is_compacted());
        assert!(!ListError::Invalid(Invalid("x".into())).is_compacted());
    }
}
