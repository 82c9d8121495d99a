//! Write requests: [`WriteTxn`] stages one request's changes on the state, with lease
//! bookkeeping, and either assigns them the next revision or undoes them.

use std::sync::Arc;

use etcd_proto::key_range::KeyRange;

use super::{MvccState, Record, Revision, latest_at, push_history, shared_key};

impl MvccState {
    /// Starts a write request at revision `current + 1`.
    pub fn write(&mut self) -> WriteTxn<'_> {
        let rev = self.current + 1;
        WriteTxn {
            state: self,
            rev,
            records: Vec::new(),
        }
    }
}

/// One write request in progress. Changes are visible to ranges inside the same request at
/// [`WriteTxn::read_rev`]; [`WriteTxn::finish`] assigns the revision only if something changed.
pub(crate) struct WriteTxn<'a> {
    state: &'a mut MvccState,
    rev: i64,
    records: Vec<Arc<Record>>,
}

impl WriteTxn<'_> {
    pub fn state(&self) -> &MvccState {
        self.state
    }

    /// The revision reads inside this request see: the new one once something changed.
    pub fn read_rev(&self) -> i64 {
        if self.records.is_empty() {
            self.rev - 1
        } else {
            self.rev
        }
    }

    /// The revision this request's changes get.
    pub fn rev(&self) -> i64 {
        self.rev
    }

    fn next_rev(&self) -> Revision {
        Revision {
            main: self.rev,
            sub: self.records.len() as i64,
        }
    }

    /// Puts `key`, returning the new record. Lease bookkeeping follows the key.
    pub fn put(&mut self, key: &[u8], value: Vec<u8>, lease: i64) -> Arc<Record> {
        let rev = self.next_rev();
        // One lookup for both the live record and the key's shared allocation.
        let hist = self.state.index.get(key);
        let prev = hist.and_then(|h| latest_at(h, self.rev)).cloned();
        let shared = shared_key(hist, key);
        let (create_revision, version) = match &prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (rev.main, 1),
        };
        if let Some(p) = &prev
            && p.lease != 0
            && p.lease != lease
        {
            self.state.leases.detach(p.lease, key);
        }
        if lease != 0 {
            self.state.leases.attach(lease, key.to_vec());
        }
        self.push(Record {
            key: shared,
            rev,
            create_revision,
            version,
            lease,
            value,
            tombstone: false,
        })
    }

    /// Deletes every live key in `range`; returns how many.
    pub fn delete_range(&mut self, range: &KeyRange) -> i64 {
        let victims: Vec<(Arc<[u8]>, i64)> = self
            .state
            .visit_at(range, self.rev)
            .map(|r| (r.key.clone(), r.lease))
            .collect();
        let n = victims.len() as i64;
        for (key, lease) in victims {
            self.delete(key, lease);
        }
        n
    }

    /// Deletes `key`, already shared (it comes from the key's own records).
    fn delete(&mut self, key: Arc<[u8]>, lease: i64) {
        if lease != 0 {
            self.state.leases.detach(lease, &key);
        }
        let rev = self.next_rev();
        self.push(Record {
            key,
            rev,
            create_revision: 0,
            version: 0,
            lease: 0,
            value: Vec::new(),
            tombstone: true,
        });
    }

    fn push(&mut self, rec: Record) -> Arc<Record> {
        let rec = Arc::new(rec);
        push_history(&mut self.state.index, rec.clone());
        self.records.push(rec.clone());
        rec
    }

    /// Undoes every change of this request, lease attachments included.
    pub fn abort(self) {
        let before = self.rev - 1;
        for rec in self.records.iter().rev() {
            if let Some(hist) = self.state.index.get_mut(&rec.key) {
                hist.pop();
                if hist.is_empty() {
                    self.state.index.remove(&rec.key);
                }
            }
            if !rec.tombstone && rec.lease != 0 {
                self.state.leases.detach(rec.lease, &rec.key);
            }
            if let Some(lease) = self
                .state
                .get_at(&rec.key, before)
                .map(|p| p.lease)
                .filter(|l| *l != 0)
            {
                self.state.leases.attach(lease, rec.key.to_vec());
            }
        }
    }

    /// Ends the request; the changes, if any, become revision `rev()`.
    pub fn finish(self) -> Vec<Arc<Record>> {
        if !self.records.is_empty() {
            self.state.current = self.rev;
            self.state.log.extend(self.records.iter().cloned());
        }
        self.records
    }
}
