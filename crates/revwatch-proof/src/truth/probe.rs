//! Finding etcd's compaction revision from outside, for runs in which etcd
//! compacts on its own: a Range at revision `r` fails as compacted exactly
//! when `r` is below the compaction revision, so a binary search between the
//! last one found and the current revision finds the current one.

use std::time::Duration;

use etcd_proto::etcdserverpb::RangeRequest;
use etcd_proto::etcdserverpb::kv_client::KvClient;
use tonic::transport::Channel;

use super::Compaction;
use crate::etcd::connect;

/// How often the compaction revision is looked up.
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A key nobody writes: the probe's ranges read no data.
const PROBE_KEY: &[u8] = b"\0revwatch-proof-compaction-probe";

/// Follows etcd's compaction revision at `endpoint`; `found` gets each new
/// compaction. Runs until aborted; a failed lookup is retried at the next tick.
pub(super) async fn follow(endpoint: String, found: impl Fn(Compaction)) {
    let mut tracker = Tracker::default();
    let mut kv: Option<KvClient<Channel>> = None;
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        if kv.is_none() {
            kv = connect(&endpoint).await.ok().map(KvClient::new);
        }
        let Some(client) = kv.as_mut() else { continue };
        match lookup(client, tracker.revision).await {
            Ok((revision, head)) => {
                if let Some(c) = tracker.observe(revision, head) {
                    found(c);
                }
            }
            Err(e) => {
                tracing::debug!("compaction probe: {e}");
                kv = None;
            }
        }
    }
}

/// What the probe knows between lookups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracker {
    /// The last compaction revision found (1: none).
    revision: i64,
    /// etcd's revision at the last lookup.
    head: i64,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            revision: 1,
            head: 1,
        }
    }
}

impl Tracker {
    /// Records a lookup that found compaction `revision` while etcd was at
    /// `head`; a new compaction was made after the previous lookup, so etcd
    /// had then reached at least the previous lookup's revision.
    fn observe(&mut self, revision: i64, head: i64) -> Option<Compaction> {
        let new = (revision > self.revision).then(|| Compaction {
            revision,
            not_before: revision.max(self.head),
        });
        self.revision = self.revision.max(revision);
        self.head = self.head.max(head);
        new
    }
}

/// The compaction revision (at least `known`) and etcd's current revision.
async fn lookup(kv: &mut KvClient<Channel>, known: i64) -> Result<(i64, i64), tonic::Status> {
    let head = read_at(kv, 0).await?.unwrap_or(0);
    let mut search = Search::new(known, head);
    while let Some(r) = search.next() {
        let readable = read_at(kv, r).await?.is_some();
        search.answer(r, readable);
    }
    Ok((search.result(), head))
}

/// Reads the probe key at `revision` (0: current): the header's revision, or
/// `None` if that revision was compacted.
async fn read_at(kv: &mut KvClient<Channel>, revision: i64) -> Result<Option<i64>, tonic::Status> {
    let req = RangeRequest {
        key: PROBE_KEY.to_vec(),
        revision,
        count_only: true,
        ..Default::default()
    };
    match kv.range(req).await {
        Ok(resp) => Ok(Some(resp.into_inner().header.map_or(0, |h| h.revision))),
        Err(s) if s.message().contains("compacted") => Ok(None),
        Err(s) => Err(s),
    }
}

/// A binary search for the smallest readable revision in `lo..=hi`, given
/// that `hi` (the current revision) is readable and that readability only
/// grows with the revision. `lo` is asked first: it is usually the answer.
#[derive(Debug, Clone, Copy)]
struct Search {
    /// Highest revision known unreadable (or `lo - 1` before asking `lo`).
    below: i64,
    /// Lowest revision known readable.
    readable: i64,
    asked_lo: bool,
}

impl Search {
    fn new(lo: i64, hi: i64) -> Self {
        let lo = lo.max(1);
        Self {
            below: lo - 1,
            readable: hi.max(lo),
            asked_lo: false,
        }
    }

    /// The next revision to ask about, if the answer is not known yet.
    fn next(&self) -> Option<i64> {
        if self.readable - self.below <= 1 {
            None
        } else if !self.asked_lo {
            Some(self.below + 1)
        } else {
            Some(self.below + (self.readable - self.below) / 2)
        }
    }

    /// Whether `revision` was readable.
    fn answer(&mut self, revision: i64, readable: bool) {
        self.asked_lo = true;
        if readable {
            self.readable = self.readable.min(revision);
        } else {
            self.below = self.below.max(revision);
        }
    }

    /// The compaction revision: the smallest readable one.
    fn result(&self) -> i64 {
        self.readable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(lo: i64, hi: i64, compacted_below: i64) -> i64 {
        let mut s = Search::new(lo, hi);
        let mut asked = 0;
        while let Some(r) = s.next() {
            assert!((lo..=hi).contains(&r), "asked {r} outside {lo}..={hi}");
            s.answer(r, r >= compacted_below);
            asked += 1;
        }
        assert!(asked <= 2 + 64, "a binary search");
        s.result()
    }

    #[test]
    fn the_search_finds_the_compaction_revision() {
        assert_eq!(search(1, 100, 1), 1, "nothing compacted");
        assert_eq!(search(1, 100, 37), 37);
        assert_eq!(search(1, 100, 100), 100);
        assert_eq!(search(37, 100, 37), 37, "unchanged since the last lookup");
        assert_eq!(search(37, 100, 38), 38);
    }

    #[test]
    fn a_compaction_is_dated_after_the_previous_lookup() {
        let mut t = Tracker::default();
        assert_eq!(t.observe(1, 50), None);
        assert_eq!(
            t.observe(40, 90),
            Some(Compaction {
                revision: 40,
                not_before: 50
            })
        );
        assert_eq!(t.observe(40, 120), None);
        assert_eq!(
            t.observe(110, 130),
            Some(Compaction {
                revision: 110,
                not_before: 120
            })
        );
    }
}
