//! The snapshot file's format: the raw state of the prefix at one revision.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic "RWSNAP01" | prefix_len u32 | prefix | revision i64 | written_at_ms u64 |
//! count u64 | count × (key_len u32 | key | value_len u32 | value |
//!                      create_revision i64 | mod_revision i64 | version i64 | lease i64) |
//! crc32 u32 (of everything before it)
//! ```
//!
//! Written to a temporary file in the same directory, fsynced, renamed over the
//! target, and the directory fsynced, so a crash leaves the old or the new file.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_proto::mvccpb::KeyValue;

use crate::mirror::snapshot::Snapshot;

const MAGIC: &[u8; 8] = b"RWSNAP01";

/// Why a snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// Reading or writing failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is damaged or not a snapshot file.
    #[error("snapshot file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file mirrors another prefix.
    #[error("snapshot file {path} is for another prefix")]
    OtherPrefix {
        /// The file.
        path: PathBuf,
    },
    /// The task reading or writing the file panicked or was cancelled.
    #[error("snapshot file {path}: file task failed: {source}")]
    Task {
        /// The file.
        path: PathBuf,
        /// Why the task ended.
        source: tokio::task::JoinError,
    },
}

/// A loaded snapshot file.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) revision: i64,
    pub(crate) written_at: SystemTime,
    /// In key order.
    pub(crate) kvs: Vec<KeyValue>,
}

/// Writes `snapshot` to `path` atomically.
pub(crate) fn write<T>(path: &Path, prefix: &[u8], snapshot: &Snapshot<T>) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);

    let mut w = CrcWriter {
        inner: BufWriter::new(File::create(&tmp)?),
        crc: crc32fast::Hasher::new(),
    };
    let written_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    w.write_all(MAGIC)?;
    w.bytes(prefix)?;
    w.write_all(&snapshot.revision().to_le_bytes())?;
    w.write_all(&written_ms.to_le_bytes())?;
    w.write_all(&(snapshot.len() as u64).to_le_bytes())?;
    for (key, e) in snapshot.iter() {
        w.bytes(key)?;
        w.bytes(&e.raw)?;
        for n in [e.create_revision, e.mod_revision, e.version, e.lease] {
            w.write_all(&n.to_le_bytes())?;
        }
    }
    let crc = w.crc.clone().finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes())?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    File::open(&dir)?.sync_all()
}

struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<W> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        let len = u32::try_from(b.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "field over 4 GiB"))?;
        self.write_all(&len.to_le_bytes())?;
        self.write_all(b)
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Loads `path`; `Ok(None)` when it does not exist.
pub(crate) fn load(path: &Path, prefix: &[u8]) -> Result<Option<Loaded>, PersistError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let corrupt = |reason: &str| PersistError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_string(),
    };
    if data.len() < MAGIC.len() + 4 || &data[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not a revwatch snapshot file"));
    }
    let (body, crc) = data.split_at(data.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader {
        data: &body[MAGIC.len()..],
    };
    let parsed = (|| {
        let file_prefix = r.bytes()?;
        let revision = r.i64()?;
        let written_ms = r.i64()? as u64;
        let count = r.i64()? as u64;
        Some((file_prefix, revision, written_ms, count))
    })();
    let Some((file_prefix, revision, written_ms, count)) = parsed else {
        return Err(corrupt("truncated header"));
    };
    if file_prefix != prefix {
        return Err(PersistError::OtherPrefix {
            path: path.to_owned(),
        });
    }
    if revision <= 0 {
        return Err(corrupt("revision is not positive"));
    }
    // Each entry takes at least 40 bytes: never trust the count for allocation.
    let mut kvs = Vec::with_capacity(count.min(r.data.len() as u64 / 40) as usize);
    for _ in 0..count {
        let kv = (|| {
            Some(KeyValue {
                key: r.bytes()?.to_vec(),
                value: r.bytes()?.to_vec(),
                create_revision: r.i64()?,
                mod_revision: r.i64()?,
                version: r.i64()?,
                lease: r.i64()?,
            })
        })()
        .ok_or_else(|| corrupt("truncated entry"))?;
        if !kv.key.starts_with(prefix) {
            return Err(corrupt("key outside the prefix"));
        }
        if kvs.last().is_some_and(|p: &KeyValue| p.key >= kv.key) {
            return Err(corrupt("keys out of order"));
        }
        kvs.push(kv);
    }
    if !r.data.is_empty() {
        return Err(corrupt("trailing bytes"));
    }
    Ok(Some(Loaded {
        revision,
        written_at: UNIX_EPOCH + Duration::from_millis(written_ms),
        kvs,
    }))
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::batch::ResyncReason;
    use crate::mirror::decode::{DecodePolicy, RawBytes};
    use crate::mirror::store::Writer;
    use std::sync::Arc;

    fn kv(key: &str, value: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 7,
        }
    }

    fn snapshot(kvs: Vec<KeyValue>, rev: i64) -> Arc<Snapshot<bytes::Bytes>> {
        let mut w = Writer::new(
            &Snapshot::empty(0),
            Arc::new(RawBytes),
            DecodePolicy::DropKey,
        );
        let mut l = w.relist(rev, ResyncReason::InitialList);
        l.page(kvs).unwrap();
        l.finish().snapshot
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let snap = snapshot(vec![kv("p/a", "1", 3), kv("p/b", "2", 4)], 9);
        write(&path, b"p/", &snap).unwrap();
        let loaded = load(&path, b"p/").unwrap().unwrap();
        assert_eq!(loaded.revision, 9);
        assert_eq!(loaded.kvs, vec![kv("p/a", "1", 3), kv("p/b", "2", 4)]);
        assert!(matches!(
            load(&path, b"q/"),
            Err(PersistError::OtherPrefix { .. })
        ));
        assert!(load(&dir.path().join("missing"), b"p/").unwrap().is_none());
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        write(&path, b"p/", &snapshot(vec![kv("p/a", "1", 3)], 5)).unwrap();
        let good = fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            fs::write(&path, &bad).unwrap();
            assert!(load(&path, b"p/").is_err(), "flip at {i} not detected");
        }
        for n in 0..good.len() {
            fs::write(&path, &good[..n]).unwrap();
            assert!(
                load(&path, b"p/").is_err(),
                "truncation to {n} not detected"
            );
        }
    }
}
