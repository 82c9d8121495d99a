//! The multi-version key-value store, in memory.
//!
//! Like etcd's `mvcc` package: every change gets a [`Revision`] (main revision shared by one
//! write request, sub-revision per change inside it); a key index keeps each key's history
//! (create/mod revision, version, tombstones), and a revision log keeps the changes in
//! revision order for watchers. Durability is the backend's job: this module does no I/O.
//!
//! Reads and compaction are here; a write request's staging is in [`write`], and etcd's
//! requests on top of both in `ops` (Put, DeleteRange), `range` and `txn`. Key ranges
//! follow etcd's rules through [`KeyRange`], shared with the rest of the workspace.

mod ops;
mod range;
mod txn;
mod write;

pub(crate) use ops::{apply_delete, apply_put};
pub(crate) use range::range;
pub(crate) use txn::{apply_txn, check_txn, is_read_only, read_only_txn};
pub(crate) use write::WriteTxn;

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_proto::key_range::KeyRange;
use etcd_proto::mvccpb::{Event, KeyValue, event::EventType};

use crate::error::EtcdError;
use crate::lease::LeaseTable;

/// A point in the store's history: `main` is the write request's revision, `sub` orders
/// the changes made by that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Revision {
    pub main: i64,
    pub sub: i64,
}

/// One change to one key: a put or, with `tombstone`, a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// Shared by the key's index entry and all its records (see [`shared_key`]).
    pub key: Arc<[u8]>,
    pub rev: Revision,
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
    pub value: Vec<u8>,
    pub tombstone: bool,
}

impl Record {
    /// The key-value as clients see it. A tombstone carries only key and mod revision.
    pub fn to_kv(&self) -> KeyValue {
        if self.tombstone {
            return KeyValue {
                key: self.key.to_vec(),
                mod_revision: self.rev.main,
                ..Default::default()
            };
        }
        KeyValue {
            key: self.key.to_vec(),
            create_revision: self.create_revision,
            mod_revision: self.rev.main,
            version: self.version,
            value: self.value.clone(),
            lease: self.lease,
        }
    }

    /// The watch event for this change, without `prev_kv`.
    pub fn to_event(&self) -> Event {
        let ty = if self.tombstone {
            EventType::Delete
        } else {
            EventType::Put
        };
        Event {
            r#type: ty as i32,
            kv: Some(self.to_kv()),
            prev_kv: None,
        }
    }
}

/// The in-memory multi-version state.
#[derive(Debug)]
pub(crate) struct MvccState {
    /// Each key's retained history, oldest first; never an empty one.
    index: BTreeMap<Arc<[u8]>, Vec<Arc<Record>>>,
    /// Retained changes (main revision `>= compacted`) in revision order, for watchers.
    /// Revisions only grow, so a flat vector is ordered by construction: a pointer per
    /// change, where a map by revision cost a node entry and a vector per revision.
    log: Vec<Arc<Record>>,
    current: i64,
    /// etcd starts at -1: nothing compacted yet.
    compacted: i64,
    pub leases: LeaseTable,
}

impl MvccState {
    /// An empty store at revision 1, as a fresh etcd reports.
    pub fn new(leases: LeaseTable) -> Self {
        Self {
            index: BTreeMap::new(),
            log: Vec::new(),
            current: 1,
            compacted: -1,
            leases,
        }
    }

    /// Rebuilds from durable records given in revision order.
    pub fn restore(
        records: impl IntoIterator<Item = Record>,
        current: i64,
        compacted: i64,
        mut leases: LeaseTable,
    ) -> Self {
        let mut state = Self::new(LeaseTable::default());
        for mut rec in records {
            rec.key = shared_key(state.index.get(&*rec.key), &rec.key);
            let rec = Arc::new(rec);
            if rec.rev.main >= compacted {
                state.log.push(rec.clone());
            }
            push_history(&mut state.index, rec);
        }
        state.current = current.max(1);
        state.compacted = compacted;
        // Re-attach live keys to their leases; a key whose lease is gone keeps its lease id,
        // as etcd does after an unclean lease loss.
        for (key, hist) in &state.index {
            if let Some(last) = hist.last()
                && !last.tombstone
                && last.lease != 0
            {
                leases.attach(last.lease, key.to_vec());
            }
        }
        state.leases = leases;
        state
    }

    pub fn current(&self) -> i64 {
        self.current
    }

    pub fn compacted(&self) -> i64 {
        self.compacted
    }

    /// Checks that `rev` (0 = `cur`) can be read when the visible revision is `cur`.
    pub fn check_read_rev(&self, rev: i64, cur: i64) -> Result<i64, EtcdError> {
        if rev > cur {
            return Err(EtcdError::FutureRev);
        }
        let rev = if rev <= 0 { cur } else { rev };
        if rev < self.compacted {
            return Err(EtcdError::Compacted);
        }
        Ok(rev)
    }

    /// The live record of each key in `range` as of revision `at`, in key order.
    pub fn visit_at<'a>(
        &'a self,
        range: &KeyRange,
        at: i64,
    ) -> impl Iterator<Item = &'a Arc<Record>> + 'a {
        let iter = range.bounds().map(|b| self.index.range::<[u8], _>(b));
        iter.into_iter()
            .flatten()
            .filter_map(move |(_, hist)| latest_at(hist, at))
    }

    /// The live record of `key` at revision `at`.
    pub fn get_at(&self, key: &[u8], at: i64) -> Option<&Arc<Record>> {
        self.index.get(key).and_then(|hist| latest_at(hist, at))
    }

    /// Changes with main revision in `[from, to]`, grouped by revision, ascending.
    pub fn log_between(
        &self,
        from: i64,
        to: i64,
    ) -> impl Iterator<Item = (i64, &[Arc<Record>])> + '_ {
        let start = self.log.partition_point(|r| r.rev.main < from);
        let end = self.log.partition_point(|r| r.rev.main <= to).max(start);
        self.log[start..end]
            .chunk_by(|a, b| a.rev.main == b.rev.main)
            .map(|recs| (recs[0].rev.main, recs))
    }

    /// Compacts history at `rev` like etcd: per key, everything older than the last record at
    /// or below `rev` is dropped, and so is that record when it is a tombstone. `rev` may not
    /// exceed `newest`, the newest revision readers may be using.
    pub fn compact(&mut self, rev: i64, newest: i64) -> Result<Vec<Revision>, EtcdError> {
        if rev <= self.compacted {
            return Err(EtcdError::Compacted);
        }
        if rev > self.current.min(newest) {
            return Err(EtcdError::FutureRev);
        }
        let mut removed = Vec::new();
        self.index.retain(|_, hist| {
            let keep_from = match hist.iter().rposition(|r| r.rev.main <= rev) {
                None => 0,
                Some(i) if hist[i].tombstone => i + 1,
                Some(i) => i,
            };
            removed.extend(hist.drain(..keep_from).map(|r| r.rev));
            !hist.is_empty()
        });
        let below = self.log.partition_point(|r| r.rev.main < rev);
        let through = self.log.partition_point(|r| r.rev.main <= rev);
        // A tombstone at exactly `rev` is the last record at or below it, so it went.
        let at_rev: Vec<_> = self.log[below..through]
            .iter()
            .filter(|r| !r.tombstone)
            .cloned()
            .collect();
        self.log.splice(..through, at_rev);
        if self.log.capacity() > 4 * self.log.len() {
            self.log.shrink_to(2 * self.log.len());
        }
        self.compacted = rev;
        Ok(removed)
    }

    /// The records etcd 3.4's HashKV at `at` covers, in revision order: every retained
    /// record up to `at`, except that below the compacted revision + 1 only the "kept"
    /// ones count, meaning each key's latest record at or below `at` if it is not a
    /// tombstone (3.4 computes that set at the hashed revision, not at the compacted
    /// one), and all of them when that set is empty.
    pub fn hashed_records(&self, at: i64) -> Vec<&Arc<Record>> {
        let kept = |hist: &[Arc<Record>]| {
            let idx = hist.partition_point(|r| r.rev.main <= at);
            idx.checked_sub(1).filter(|&i| !hist[i].tombstone)
        };
        let any_kept = self.index.values().any(|h| kept(h).is_some());
        let lower = self.compacted + 1;
        let mut records: Vec<&Arc<Record>> = self
            .index
            .values()
            .flat_map(|hist| {
                let keep = kept(hist);
                hist.iter().enumerate().filter_map(move |(i, r)| {
                    let counted = r.rev.main >= lower || !any_kept || keep == Some(i);
                    (r.rev.main <= at && counted).then_some(r)
                })
            })
            .collect();
        records.sort_unstable_by_key(|r| (r.rev.main, r.rev.sub));
        records
    }
}

/// `key` as the one allocation its index entry and records share, given its history
/// (if any): a history of many revisions holds its key once, not once per record.
fn shared_key(hist: Option<&Vec<Arc<Record>>>, key: &[u8]) -> Arc<[u8]> {
    match hist.and_then(|h| h.last()) {
        Some(rec) => rec.key.clone(),
        None => Arc::from(key),
    }
}

/// Appends `rec` to its key's history.
fn push_history(index: &mut BTreeMap<Arc<[u8]>, Vec<Arc<Record>>>, rec: Arc<Record>) {
    match index.get_mut(&*rec.key) {
        Some(hist) => hist.push(rec),
        None => {
            index.insert(rec.key.clone(), vec![rec]);
        }
    }
}

fn latest_at(hist: &[Arc<Record>], at: i64) -> Option<&Arc<Record>> {
    let rec = match hist.last() {
        // Most reads, and every write, look at the newest record: skip the search, whose
        // every step is a cache miss on a long history.
        Some(last) if last.rev.main <= at => last,
        _ => {
            let idx = hist.partition_point(|r| r.rev.main <= at);
            hist.get(idx.checked_sub(1)?)?
        }
    };
    (!rec.tombstone).then_some(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MvccState {
        MvccState::new(LeaseTable::default())
    }

    #[test]
    fn put_update_delete_versions() {
        let mut s = store();
        let mut w = s.write();
        let r = w.put(b"a", b"1".to_vec(), 0);
        assert_eq!(w.finish().len(), 1);
        assert_eq!((r.create_revision, r.rev.main, r.version), (2, 2, 1));
        let mut w = s.write();
        let r = w.put(b"a", b"2".to_vec(), 0);
        w.finish();
        assert_eq!((r.create_revision, r.rev.main, r.version), (2, 3, 2));
        let mut w = s.write();
        assert_eq!(w.delete_range(&KeyRange::new(b"a", b"")), 1);
        w.finish();
        let mut w = s.write();
        let r = w.put(b"a", b"3".to_vec(), 0);
        w.finish();
        assert_eq!((r.create_revision, r.rev.main, r.version), (5, 5, 1));
        assert_eq!(
            s.get_at(b"a", 3).map(|r| r.value.clone()),
            Some(b"2".to_vec())
        );
        assert!(s.get_at(b"a", 4).is_none());
    }

    #[test]
    fn empty_delete_does_not_bump_revision() {
        let mut s = store();
        let mut w = s.write();
        assert_eq!(w.delete_range(&KeyRange::new(b"x", b"")), 0);
        assert!(w.finish().is_empty());
        assert_eq!(s.current(), 1);
    }

    #[test]
    fn compaction_keeps_latest_live_and_drops_tombstones() {
        let mut s = store();
        for v in ["1", "2"] {
            let mut w = s.write();
            w.put(b"a", v.as_bytes().to_vec(), 0);
            w.finish();
        }
        let mut w = s.write();
        w.put(b"b", b"x".to_vec(), 0);
        w.finish();
        let mut w = s.write();
        w.delete_range(&KeyRange::new(b"b", b""));
        w.finish(); // rev 5
        let removed = s.compact(5, 5).expect("compact");
        // a@2 superseded; b@4 and its tombstone @5 both go.
        assert_eq!(removed.len(), 3);
        assert_eq!(s.get_at(b"a", 5).map(|r| r.rev.main), Some(3));
        assert_eq!(s.log_between(0, 10).count(), 0);
        assert_eq!(s.compact(5, 5), Err(EtcdError::Compacted));
        assert_eq!(s.compact(6, 6), Err(EtcdError::FutureRev));
        assert_eq!(s.check_read_rev(4, 5), Err(EtcdError::Compacted));
        assert_eq!(s.check_read_rev(6, 5), Err(EtcdError::FutureRev));
    }

    #[test]
    fn the_log_groups_changes_by_revision_and_compacts_like_the_index() {
        let mut s = store();
        let mut w = s.write();
        w.put(b"a", b"1".to_vec(), 0);
        w.put(b"b", b"1".to_vec(), 0);
        w.finish(); // rev 2: two changes
        let mut w = s.write();
        w.put(b"c", b"1".to_vec(), 0);
        w.finish(); // rev 3
        let mut w = s.write();
        w.delete_range(&KeyRange::new(b"b", b""));
        w.put(b"a", b"2".to_vec(), 0);
        w.finish(); // rev 4: a tombstone and a put
        // Each revision with its changes as (key, tombstone).
        type Revs = Vec<(i64, Vec<(Vec<u8>, bool)>)>;
        let revs = |s: &MvccState, from, to| -> Revs {
            s.log_between(from, to)
                .map(|(rev, recs)| {
                    let recs = recs.iter().map(|r| (r.key.to_vec(), r.tombstone)).collect();
                    (rev, recs)
                })
                .collect()
        };
        let all = revs(&s, 0, 10);
        assert_eq!(
            all.iter().map(|(r, c)| (*r, c.len())).collect::<Vec<_>>(),
            [(2, 2), (3, 1), (4, 2)]
        );
        assert_eq!(revs(&s, 3, 3), vec![(3, vec![(b"c".to_vec(), false)])]);
        assert!(revs(&s, 4, 3).is_empty());
        // At 4, b's tombstone goes with b's history; the put at 4 stays.
        s.compact(4, 4).expect("compact");
        assert_eq!(revs(&s, 0, 10), vec![(4, vec![(b"a".to_vec(), false)])]);
        let mut w = s.write();
        w.put(b"d", b"1".to_vec(), 0);
        w.finish();
        assert_eq!(revs(&s, 5, 5), vec![(5, vec![(b"d".to_vec(), false)])]);
    }

    #[test]
    fn a_key_is_stored_once_for_its_whole_history() {
        let shared_once = |s: &MvccState| {
            let (key, hist) = s.index.get_key_value(&b"k"[..]).expect("k");
            assert_eq!(hist.len(), 3);
            assert!(hist.iter().all(|r| Arc::ptr_eq(&r.key, key)));
        };
        let mut s = store();
        for v in ["1", "2"] {
            let mut w = s.write();
            w.put(b"k", v.as_bytes().to_vec(), 0);
            w.finish();
        }
        let mut w = s.write();
        w.delete_range(&KeyRange::new(b"k", b""));
        w.finish();
        shared_once(&s);
        // Records loaded from disk each come with their own copy; restoring shares them.
        let loaded = s.index[&b"k"[..]].iter().map(|r| Record {
            key: Arc::from(&b"k"[..]),
            ..Record::clone(r)
        });
        shared_once(&MvccState::restore(loaded, 4, -1, LeaseTable::default()));
    }
}
