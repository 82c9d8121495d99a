//! A key-value state with an incrementally maintained [`StateHash`].

use std::collections::BTreeMap;

use crate::hash::{StateHash, entry_hash};
use crate::history::{Change, Entry, Op};
use crate::keys::KeyRange;

/// Keys in order with their entries, and the state's hash kept up to date in
/// O(1) per change.
///
/// ```
/// use revwatch_proof::history::{Change, Entry};
/// use revwatch_proof::state::State;
/// let e = Entry { value: b"v".to_vec(), create_revision: 2, mod_revision: 2, version: 1, lease: 0 };
/// let mut s = State::default();
/// s.apply(&Change::put("k", e.clone()));
/// let same: State = [(b"k".to_vec(), e)].into_iter().collect();
/// assert_eq!(s.hash(), same.hash());
/// s.apply(&Change::delete("k"));
/// assert!(s.is_empty());
/// assert_eq!(s.hash(), 0);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    entries: BTreeMap<Vec<u8>, Entry>,
    hash: StateHash,
}

impl State {
    /// The entry of `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// All entries in key order.
    pub fn entries(&self) -> &BTreeMap<Vec<u8>, Entry> {
        &self.entries
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The order-independent hash of all entries (see [`crate::hash`]).
    pub fn hash(&self) -> u64 {
        self.hash.value()
    }

    /// Entries whose keys lie in `range`, in key order.
    pub fn range<'a>(&'a self, range: &'a KeyRange) -> impl Iterator<Item = (&'a [u8], &'a Entry)> {
        self.entries
            .range(range.key().to_vec()..)
            .map(|(k, e)| (k.as_slice(), e))
            .take_while(|(k, _)| range.contains(k))
    }

    /// Sets `key` to `entry`.
    pub fn insert(&mut self, key: Vec<u8>, entry: Entry) {
        self.hash.add(entry_hash(&key, &entry));
        if let Some(old) = self.entries.get(&key) {
            self.hash.remove(entry_hash(&key, old));
        }
        self.entries.insert(key, entry);
    }

    /// Removes `key`, returning its entry.
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        self.hash.remove(entry_hash(key, &old));
        Some(old)
    }

    /// Applies one change.
    pub fn apply(&mut self, change: &Change) {
        match &change.op {
            Op::Put(e) => self.insert(change.key.clone(), e.clone()),
            Op::Delete => {
                self.remove(&change.key);
            }
        }
    }

    /// Applies changes in order.
    pub fn apply_all<'a>(&mut self, changes: impl IntoIterator<Item = &'a Change>) {
        for c in changes {
            self.apply(c);
        }
    }

    /// The changes that turn `self` into `target`, in key order: puts for
    /// new and changed keys, deletes for vanished keys. This is exactly what
    /// a resync batch must hold.
    pub fn diff(&self, target: &State) -> Vec<Change> {
        let mut out = Vec::new();
        let mut ours = self.entries.iter().peekable();
        let mut theirs = target.entries.iter().peekable();
        loop {
            match (ours.peek(), theirs.peek()) {
                (None, None) => break,
                (Some((k, _)), None) => {
                    out.push(Change::delete(k.to_vec()));
                    ours.next();
                }
                (None, Some((k, e))) => {
                    out.push(Change::put(k.to_vec(), (*e).clone()));
                    theirs.next();
                }
                (Some((ka, ea)), Some((kb, eb))) => match ka.cmp(kb) {
                    std::cmp::Ordering::Less => {
                        out.push(Change::delete(ka.to_vec()));
                        ours.next();
                    }
                    std::cmp::Ordering::Greater => {
                        out.push(Change::put(kb.to_vec(), (*eb).clone()));
                        theirs.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ea != eb {
                            out.push(Change::put(kb.to_vec(), (*eb).clone()));
                        }
                        ours.next();
                        theirs.next();
                    }
                },
            }
        }
        out
    }

    /// The part of this state inside `range`.
    pub fn restricted_to(&self, range: &KeyRange) -> State {
        self.range(range)
            .map(|(k, e)| (k.to_vec(), e.clone()))
            .collect()
    }
}

impl FromIterator<(Vec<u8>, Entry)> for State {
    fn from_iter<I: IntoIterator<Item = (Vec<u8>, Entry)>>(iter: I) -> Self {
        let mut s = State::default();
        for (k, e) in iter {
            s.insert(k, e);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(v: &str, rev: i64) -> Entry {
        Entry {
            value: v.into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn diff_applied_gives_target() {
        let a: State = [
            (b"a".to_vec(), e("1", 2)),
            (b"b".to_vec(), e("2", 3)),
            (b"c".to_vec(), e("3", 4)),
        ]
        .into_iter()
        .collect();
        let b: State = [
            (b"b".to_vec(), e("2", 3)),
            (b"c".to_vec(), e("x", 5)),
            (b"d".to_vec(), e("4", 6)),
        ]
        .into_iter()
        .collect();
        let d = a.diff(&b);
        assert_eq!(
            d,
            vec![
                Change::delete("a"),
                Change::put("c", e("x", 5)),
                Change::put("d", e("4", 6))
            ]
        );
        let mut s = a.clone();
        s.apply_all(&d);
        assert_eq!(s, b);
        assert_eq!(s.hash(), b.hash());
        assert!(b.diff(&b).is_empty());
    }

    #[test]
    fn hash_follows_overwrites() {
        let mut s = State::default();
        s.insert(b"k".to_vec(), e("1", 2));
        s.insert(b"k".to_vec(), e("2", 3));
        let fresh: State = [(b"k".to_vec(), e("2", 3))].into_iter().collect();
        assert_eq!(s.hash(), fresh.hash());
    }

    #[test]
    fn range_respects_bounds() {
        let s: State = [
            (b"/a/1".to_vec(), e("1", 2)),
            (b"/a/2".to_vec(), e("2", 3)),
            (b"/b".to_vec(), e("3", 4)),
        ]
        .into_iter()
        .collect();
        let r = KeyRange::prefix(b"/a/");
        assert_eq!(s.range(&r).count(), 2);
        assert_eq!(s.restricted_to(&r).len(), 2);
    }
}
