//! A stable digest of a prefix's content, so that a mirror can be compared with
//! etcd (or another mirror) by one short value.
//!
//! The digest covers, for every key in key order, what an etcd range reports of
//! it: key, value, create_revision, mod_revision, version and lease. It does not
//! cover the revision the state was read at (two reads of an unchanged prefix
//! have the same digest); report that beside it.
//!
//! It is SHA3-256 over this encoding (version 1; integers little-endian):
//!
//! ```text
//! "revwatch-digest-v1" |
//! per key: key_len u64 | key | value_len u64 | value |
//!          create_revision i64 | mod_revision i64 | version i64 | lease i64 |
//! count u64
//! ```
//!
//! The same digest comes from a [`Snapshot`] ([`Snapshot::digest`]) and from
//! the pages of an etcd range read at the snapshot's revision
//! ([`DigestBuilder::push_kv`]), so the two are comparable:
//!
//! ```
//! use revwatch::mirror::{DigestBuilder, Snapshot};
//!
//! let empty = Snapshot::<Vec<u8>>::empty(7);
//! let from_etcd = DigestBuilder::new().finish(); // an empty range
//! assert_eq!(empty.digest(), from_etcd);
//! assert_eq!(from_etcd.to_string().len(), 64);
//! ```

use std::fmt;

use etcd_proto::mvccpb::KeyValue;
use sha3::{Digest as _, Sha3_256};

use super::snapshot::{Entry, Snapshot};

/// Domain separation: a digest of this encoding is never equal to a hash of
/// anything else, and a future encoding gets another tag.
const TAG: &[u8] = b"revwatch-digest-v1";

/// The SHA3-256 digest of a prefix's content: every key's key, value, create and
/// mod revisions, version and lease, in key order (not the revision it was read at).
/// Displays as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of a state holding only `entry`: a digest of one key, comparable
    /// across sources like any other.
    pub fn of_entry(entry: DigestEntry<'_>) -> Digest {
        let mut builder = DigestBuilder::new();
        // One entry is always in order.
        builder.push_unchecked(entry);
        builder.finish()
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// What the digest covers of one key, borrowed from a snapshot entry or an etcd
/// `KeyValue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestEntry<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value's bytes as stored in etcd.
    pub value: &'a [u8],
    /// Revision of the key's creation.
    pub create_revision: i64,
    /// Revision of the key's last modification.
    pub mod_revision: i64,
    /// Number of modifications since creation.
    pub version: i64,
    /// Attached lease; 0 for none.
    pub lease: i64,
}

impl<'a> From<&'a KeyValue> for DigestEntry<'a> {
    fn from(kv: &'a KeyValue) -> Self {
        DigestEntry {
            key: &kv.key,
            value: &kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

impl<'a> DigestEntry<'a> {
    /// The entry of `key` in a snapshot, with its raw (undecoded) value.
    pub fn of_snapshot_entry<T>(key: &'a [u8], entry: &'a Entry<T>) -> Self {
        DigestEntry {
            key,
            value: &entry.raw,
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
            version: entry.version,
            lease: entry.lease,
        }
    }
}

/// Why an entry was refused by a [`DigestBuilder`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestError {
    /// Entries must come in strictly ascending key order (etcd's default range
    /// order), so that equal contents give equal digests.
    #[error(
        "key {key:?} does not come after {previous:?}: entries must be in ascending key order without repeats"
    )]
    OutOfOrder {
        /// The key pushed before (lossy UTF-8).
        previous: String,
        /// The refused key (lossy UTF-8).
        key: String,
    },
}

/// Computes a [`Digest`] from entries pushed in ascending key order, e.g. page by
/// page from an etcd range.
#[derive(Clone)]
pub struct DigestBuilder {
    hasher: Sha3_256,
    count: u64,
    /// The last key pushed; `None` before the first. Reused, so pushing does not
    /// allocate once it has grown to the longest key.
    last_key: Option<Vec<u8>>,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for DigestBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestBuilder")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl DigestBuilder {
    /// A builder that has seen no entry (its digest is that of an empty prefix).
    pub fn new() -> Self {
        let mut hasher = Sha3_256::new();
        hasher.update(TAG);
        DigestBuilder {
            hasher,
            count: 0,
            last_key: None,
        }
    }

    /// Adds the next entry. Fails, leaving the builder unchanged, when its key
    /// does not come strictly after the previous one.
    pub fn push(&mut self, entry: DigestEntry<'_>) -> Result<(), DigestError> {
        match &mut self.last_key {
            Some(last) if entry.key <= last.as_slice() => {
                return Err(DigestError::OutOfOrder {
                    previous: String::from_utf8_lossy(last).into_owned(),
                    key: String::from_utf8_lossy(entry.key).into_owned(),
                });
            }
            Some(last) => {
                last.clear();
                last.extend_from_slice(entry.key);
            }
            None => self.last_key = Some(entry.key.to_vec()),
        }
        self.push_unchecked(entry);
        Ok(())
    }

    /// Adds the next `KeyValue` of an etcd range (see [`push`](Self::push)).
    pub fn push_kv(&mut self, kv: &KeyValue) -> Result<(), DigestError> {
        self.push(kv.into())
    }

    /// For entries known to be in order (a snapshot's).
    fn push_unchecked(&mut self, e: DigestEntry<'_>) {
        let h = &mut self.hasher;
        h.update((e.key.len() as u64).to_le_bytes());
        h.update(e.key);
        h.update((e.value.len() as u64).to_le_bytes());
        h.update(e.value);
        for n in [e.create_revision, e.mod_revision, e.version, e.lease] {
            h.update(n.to_le_bytes());
        }
        self.count += 1;
    }

    /// How many entries were pushed.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The digest of the entries pushed.
    pub fn finish(self) -> Digest {
        let mut h = self.hasher;
        h.update(self.count.to_le_bytes());
        Digest(h.finalize().into())
    }
}

impl<T> Snapshot<T> {
    /// The [`Digest`] of the snapshot's content: equal to that of an etcd range of
    /// the prefix read at [`revision`](Self::revision) when the mirror holds
    /// exactly etcd's state. Values count as their raw bytes, whatever the decoder.
    pub fn digest(&self) -> Digest {
        let mut builder = DigestBuilder::new();
        // A snapshot iterates in strictly ascending key order.
        for (key, entry) in self.iter() {
            builder.push_unchecked(DigestEntry::of_snapshot_entry(key, entry));
        }
        builder.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::mirror::batch::ResyncReason;
    use crate::mirror::decode::{DecodePolicy, RawBytes};
    use crate::mirror::store::Writer;

    fn kv(key: &str, value: &str, create: i64, modr: i64, version: i64, lease: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: modr,
            version,
            lease,
        }
    }

    fn digest_of(kvs: &[KeyValue]) -> Digest {
        let mut b = DigestBuilder::new();
        for kv in kvs {
            b.push_kv(kv).unwrap();
        }
        b.finish()
    }

    fn snapshot(kvs: Vec<KeyValue>, revision: i64) -> Arc<Snapshot<bytes::Bytes>> {
        let mut w = Writer::new(
            &Snapshot::empty(0),
            Arc::new(RawBytes),
            DecodePolicy::DropKey,
        );
        let mut l = w.relist(revision, ResyncReason::InitialList);
        l.page(kvs).unwrap();
        l.finish().snapshot
    }

    fn sample() -> Vec<KeyValue> {
        vec![
            kv("p/a", "1", 2, 5, 3, 0),
            kv("p/b", "two", 4, 4, 1, 0x77),
            kv("p/c", "", 6, 6, 1, 0),
        ]
    }

    #[test]
    fn a_snapshot_and_the_range_it_mirrors_have_the_same_digest() {
        let kvs = sample();
        let snap = snapshot(kvs.clone(), 9);
        assert_eq!(snap.digest(), digest_of(&kvs));
        // Content only: the revision it was read at is reported beside it.
        assert_eq!(snapshot(kvs.clone(), 12).digest(), digest_of(&kvs));
        assert_eq!(Snapshot::<bytes::Bytes>::empty(3).digest(), digest_of(&[]));
    }

    #[test]
    fn the_digest_is_stable_across_builds_and_runs() {
        // Pinned to the documented encoding (values computed independently with
        // another SHA3-256 implementation): a new encoding needs a new tag.
        assert_eq!(
            digest_of(&[]).to_string(),
            "6ad5059ae86e4c92bc62203290f9de7bb9d1b8078b0d5eacf6091188bcf390b3"
        );
        let d = digest_of(&sample());
        assert_eq!(
            d.to_string(),
            "725be8849eedf3f09003d567e33438cf4cf9d37cab098563c724cade613e49d8"
        );
        assert_eq!(format!("{d:?}"), format!("Digest({d})"));
        assert_eq!(d.as_bytes().len(), 32);
    }

    #[test]
    fn every_covered_field_changes_the_digest() {
        let base = digest_of(&sample());
        let changes: [fn(&mut KeyValue); 6] = [
            |kv| kv.key = b"p/bb".to_vec(),
            |kv| kv.value = b"tw0".to_vec(),
            |kv| kv.create_revision += 1,
            |kv| kv.mod_revision += 1,
            |kv| kv.version += 1,
            |kv| kv.lease = 0,
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut kvs = sample();
            change(&mut kvs[1]);
            assert_ne!(digest_of(&kvs), base, "change {i} not covered");
        }
        // A missing key and an extra one, too.
        assert_ne!(digest_of(&sample()[..2]), base);
        let mut more = sample();
        more.push(kv("p/d", "", 7, 7, 1, 0));
        assert_ne!(digest_of(&more), base);
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        // The same bytes split differently between key and value.
        let a = digest_of(&[kv("p/ab", "c", 1, 1, 1, 0)]);
        let b = digest_of(&[kv("p/a", "bc", 1, 1, 1, 0)]);
        assert_ne!(a, b);
    }

    #[test]
    fn keys_out_of_order_or_repeated_are_refused_without_effect() {
        let mut b = DigestBuilder::new();
        b.push_kv(&kv("p/b", "1", 1, 1, 1, 0)).unwrap();
        for bad in ["p/a", "p/b"] {
            let err = b.push_kv(&kv(bad, "1", 1, 1, 1, 0)).unwrap_err();
            assert_eq!(
                err,
                DigestError::OutOfOrder {
                    previous: "p/b".into(),
                    key: bad.into()
                }
            );
        }
        assert_eq!(b.count(), 1);
        b.push_kv(&kv("p/c", "2", 2, 2, 1, 0)).unwrap();
        assert_eq!(
            b.finish(),
            digest_of(&[kv("p/b", "1", 1, 1, 1, 0), kv("p/c", "2", 2, 2, 1, 0)])
        );
    }

    #[test]
    fn one_entrys_digest_is_that_of_a_state_holding_only_it() {
        let kv = KeyValue {
            key: b"p/a".to_vec(),
            value: b"1".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            lease: 0,
        };
        let mut builder = DigestBuilder::new();
        builder.push_kv(&kv).unwrap();
        assert_eq!(Digest::of_entry((&kv).into()), builder.finish());
    }
}
