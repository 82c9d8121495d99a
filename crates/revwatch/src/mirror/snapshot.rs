//! Immutable snapshots of the mirrored prefix.

use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_proto::mvccpb::KeyValue;
use imbl::OrdMap;

use super::key::Key;
use super::persist::{PersistError, file};

/// One key's state at a snapshot's revision, as etcd reports it.
#[derive(Debug)]
pub struct Entry<T> {
    /// The decoded value.
    pub value: T,
    /// The value's bytes as stored in etcd (what the snapshot file persists).
    pub raw: bytes::Bytes,
    /// Revision of the key's creation (since its last deletion).
    pub create_revision: i64,
    /// Revision of the key's last modification.
    pub mod_revision: i64,
    /// Number of modifications since creation; 1 for a new key.
    pub version: i64,
    /// Lease attached to the key; 0 for none.
    pub lease: i64,
}

impl<T> Entry<T> {
    /// True when both describe the same etcd key version. A `(create, mod)` revision
    /// pair identifies one write of one key, whatever the decoded value.
    pub fn same_version(&self, other: &Entry<T>) -> bool {
        self.mod_revision == other.mod_revision && self.create_revision == other.create_revision
    }
}

/// The map's value: shared, and equal when it is the same etcd key version, so
/// that `OrdMap::diff` compares versions and skips shared subtrees.
#[derive(Debug)]
pub(crate) struct Slot<T>(pub(crate) Arc<Entry<T>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot(Arc::clone(&self.0))
    }
}

impl<T> PartialEq for Slot<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.same_version(&other.0)
    }
}

pub(crate) type Map<T> = OrdMap<Key, Slot<T>>;

/// The mirrored prefix at one revision. Immutable and cheap to share: readers get an
/// `Arc<Snapshot<T>>` and read it without locks; consecutive snapshots share all
/// unchanged structure.
#[derive(Debug)]
pub struct Snapshot<T> {
    pub(crate) revision: i64,
    pub(crate) entries: Map<T>,
}

impl<T> Clone for Snapshot<T> {
    fn clone(&self) -> Self {
        Snapshot {
            revision: self.revision,
            entries: self.entries.clone(),
        }
    }
}

impl<T> Snapshot<T> {
    /// An empty snapshot at `revision` (0 means "nothing synced yet").
    pub fn empty(revision: i64) -> Self {
        Snapshot {
            revision,
            entries: OrdMap::new(),
        }
    }

    /// The etcd revision this snapshot is exact at.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the prefix holds no key.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry for `key`.
    pub fn get(&self, key: &[u8]) -> Option<&Entry<T>> {
        self.entries.get(key).map(|s| &*s.0)
    }

    /// The shared entry for `key` (cheap to keep beyond the snapshot).
    pub fn get_arc(&self, key: &[u8]) -> Option<Arc<Entry<T>>> {
        self.entries.get(key).map(|s| Arc::clone(&s.0))
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Entry<T>)> + '_ {
        self.entries.iter().map(|(k, s)| (k, &*s.0))
    }

    /// The entries whose keys fall in `range`, in key order, e.g.
    /// `snap.range((Bound::Included(&b"a/"[..]), Bound::Excluded(&b"a/m"[..])))`.
    pub fn range<'a, R>(&'a self, range: R) -> impl Iterator<Item = (&'a Key, &'a Entry<T>)> + 'a
    where
        R: RangeBounds<[u8]> + 'a,
    {
        self.entries.range(range).map(|(k, s)| (k, &*s.0))
    }

    /// The entries whose keys start with `prefix`, in key order.
    pub fn with_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a Key, &'a Entry<T>)> + 'a {
        self.entries
            .range::<_, [u8]>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, s)| (k, &*s.0))
    }
}

/// A snapshot file as written by a mirror with
/// [`MirrorConfig::snapshot_file`](super::MirrorConfig::snapshot_file), read
/// without starting a mirror (e.g. to check it against etcd).
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotFile {
    /// The revision the state is exact at.
    pub revision: i64,
    /// When the mirror wrote it.
    pub written_at: SystemTime,
    /// The raw state of the prefix, in ascending key order, as an etcd range at
    /// `revision` would return it.
    pub kvs: Vec<KeyValue>,
}

impl SnapshotFile {
    /// Reads and checks the snapshot file at `path`, written by a mirror of
    /// `prefix`. A missing, damaged or foreign file (another prefix, bad checksum,
    /// keys out of order) is an error.
    pub fn read(path: &Path, prefix: &[u8]) -> Result<SnapshotFile, PersistError> {
        let loaded = file::load(path, prefix)?.ok_or_else(|| PersistError::Io {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        })?;
        Ok(SnapshotFile {
            revision: loaded.revision,
            written_at: loaded.written_at,
            kvs: loaded.kvs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::batch::ResyncReason;
    use crate::mirror::decode::{DecodePolicy, RawBytes};
    use crate::mirror::store::Writer;

    #[test]
    fn a_snapshot_file_reads_back_as_written_and_a_missing_one_is_an_error() {
        let kvs = vec![KeyValue {
            key: b"p/a".to_vec(),
            value: b"1".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            lease: 5,
        }];
        let mut w = Writer::new(
            &Snapshot::empty(0),
            Arc::new(RawBytes),
            DecodePolicy::DropKey,
        );
        let mut l = w.relist(4, ResyncReason::InitialList);
        l.page(kvs.clone()).unwrap();
        let snap = l.finish().snapshot;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        file::write(&path, b"p/", &snap).unwrap();

        let read = SnapshotFile::read(&path, b"p/").unwrap();
        assert_eq!((read.revision, read.kvs), (4, kvs));
        assert!(matches!(
            SnapshotFile::read(&path, b"q/"),
            Err(PersistError::OtherPrefix { .. })
        ));
        let missing = SnapshotFile::read(&dir.path().join("none"), b"p/").unwrap_err();
        assert!(
            matches!(&missing, PersistError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound),
            "{missing}"
        );
    }
}
