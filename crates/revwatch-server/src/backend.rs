//! The checkpoint store in redb: one table of records keyed by revision (like etcd's `key`
//! bucket), one of leases, one of metadata. The write-ahead log makes writes durable; a
//! checkpoint copies the log's records into redb in one fsynced transaction together with
//! the sequence number of the last one, so replay starts after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use etcd_proto::mvccpb::KeyValue;
use prost::Message;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::ServerError;
use crate::mvcc::{Record, Revision};
use crate::wal::Storage;

const RECORDS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("records");
const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_CLUSTER_ID: &str = "cluster_id";
const META_MEMBER_ID: &str = "member_id";
const META_RAFT_TERM: &str = "raft_term";
const META_CURRENT: &str = "current_revision";
/// Stored as `compacted + 1` so that etcd's initial -1 fits an unsigned column.
const META_COMPACTED: &str = "compacted_revision_plus_one";
/// The last write-ahead log record this database holds (absent: none).
const META_WAL_SEQ: &str = "wal_seq";

const TOMBSTONE: u8 = 1;
/// redb's page cache. The whole state is in memory and the database is read only at
/// open, so the cache serves checkpoints alone; redb's default (1 GiB) would hold a
/// second copy of the data.
const CACHE_BYTES: usize = 16 << 20;
const DB_FILE: &str = "revwatch-server.redb";

/// Identity of this single-member "cluster", stable across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
    pub raft_term: u64,
}

/// Everything read back on open.
pub(crate) struct Loaded {
    pub records: Vec<Record>,
    pub current: i64,
    pub compacted: i64,
    pub leases: Vec<(i64, i64)>,
}

/// The durable effects of one group commit: one write-ahead log record.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub records: Vec<Arc<Record>>,
    pub removed: Vec<Revision>,
    pub lease_put: Vec<(i64, i64)>,
    pub lease_del: Vec<i64>,
    pub compacted: Option<i64>,
    pub current: i64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
            && self.removed.is_empty()
            && self.lease_put.is_empty()
            && self.lease_del.is_empty()
            && self.compacted.is_none()
    }
}

pub(crate) struct Backend {
    db: Database,
    path: PathBuf,
}

fn rev_key(rev: Revision) -> (u64, u64) {
    (rev.main as u64, rev.sub as u64)
}

fn encode(rec: &Record, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(u8::from(rec.tombstone) * TOMBSTONE);
    let kv = KeyValue {
        key: rec.key.to_vec(),
        create_revision: rec.create_revision,
        mod_revision: rec.rev.main,
        version: rec.version,
        value: rec.value.clone(),
        lease: rec.lease,
    };
    // Encoding into a Vec cannot fail: it grows as needed.
    let _ = kv.encode(buf);
}

fn decode(key: (u64, u64), bytes: &[u8]) -> Result<Record, ServerError> {
    let (flag, body) = bytes
        .split_first()
        .ok_or_else(|| ServerError::Corrupt(format!("empty record at {key:?}")))?;
    let kv = KeyValue::decode(body)
        .map_err(|e| ServerError::Corrupt(format!("record at {key:?}: {e}")))?;
    Ok(Record {
        key: kv.key.into(),
        rev: Revision {
            main: key.0 as i64,
            sub: key.1 as i64,
        },
        create_revision: kv.create_revision,
        version: kv.version,
        lease: kv.lease,
        value: kv.value,
        tombstone: *flag == TOMBSTONE,
    })
}

fn random_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

impl Backend {
    /// Opens (or creates) the database in `dir` and bumps the term.
    pub fn open<S: Storage>(storage: &S, dir: &Path) -> Result<(Self, Identity), ServerError> {
        storage
            .create_dir_all(dir)
            .map_err(|source| ServerError::DataDir {
                path: dir.to_path_buf(),
                source,
            })?;
        // The data directory's own entry, for one created just now: without it the
        // whole directory may vanish at a power loss.
        if let Some(parent) = dir.parent() {
            storage
                .sync_dir(parent)
                .map_err(|source| ServerError::DataDir {
                    path: parent.to_path_buf(),
                    source,
                })?;
        }
        let path = dir.join(DB_FILE);
        let db = storage
            .database(Database::builder().set_cache_size(CACHE_BYTES), &path)
            .map_err(redb::Error::from)?;
        let backend = Self { db, path };
        let identity = backend.init_identity()?;
        Ok((backend, identity))
    }

    /// The last write-ahead log record the database holds (0: none).
    pub fn checkpointed(&self) -> Result<u64, redb::Error> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get(META_WAL_SEQ)?.map_or(0, |v| v.value()))
    }

    fn init_identity(&self) -> Result<Identity, redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let identity = {
            let mut meta = tx.open_table(META)?;
            let mut get_or = |name: &str, init: u64| -> Result<u64, redb::Error> {
                let existing = meta.get(name)?.map(|v| v.value());
                match existing {
                    Some(v) => Ok(v),
                    None => {
                        meta.insert(name, init)?;
                        Ok(init)
                    }
                }
            };
            let cluster_id = get_or(META_CLUSTER_ID, random_id())?;
            let member_id = get_or(META_MEMBER_ID, random_id())?;
            // A restart is a new election on a real member: the term moves on.
            let raft_term = get_or(META_RAFT_TERM, 1)? + 1;
            meta.insert(META_RAFT_TERM, raft_term)?;
            tx.open_table(RECORDS)?;
            tx.open_table(LEASES)?;
            Identity {
                cluster_id,
                member_id,
                raft_term,
            }
        };
        tx.commit()?;
        Ok(identity)
    }

    /// Reads everything back.
    pub fn load(&self) -> Result<Loaded, ServerError> {
        let tx = self.db.begin_read().map_err(redb::Error::from)?;
        let meta = tx.open_table(META).map_err(redb::Error::from)?;
        let get = |name: &str| -> Result<Option<u64>, ServerError> {
            Ok(meta
                .get(name)
                .map_err(redb::Error::from)?
                .map(|v| v.value()))
        };
        let current = get(META_CURRENT)?.map_or(1, |v| v as i64);
        let compacted = get(META_COMPACTED)?.map_or(-1, |v| v as i64 - 1);
        let table = tx.open_table(RECORDS).map_err(redb::Error::from)?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(redb::Error::from)? {
            let (k, v) = entry.map_err(redb::Error::from)?;
            records.push(decode(k.value(), v.value())?);
        }
        let leases_table = tx.open_table(LEASES).map_err(redb::Error::from)?;
        let mut leases = Vec::new();
        for entry in leases_table.iter().map_err(redb::Error::from)? {
            let (k, v) = entry.map_err(redb::Error::from)?;
            leases.push((k.value(), v.value()));
        }
        Ok(Loaded {
            records,
            current,
            compacted,
            leases,
        })
    }

    /// Applies `batches` in order, with `wal_seq` as the last log record they cover, in
    /// one transaction, and fsyncs it.
    pub fn checkpoint<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a Batch>,
        wal_seq: u64,
    ) -> Result<(), redb::Error> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut records = tx.open_table(RECORDS)?;
            let mut leases = tx.open_table(LEASES)?;
            let mut meta = tx.open_table(META)?;
            let mut buf = Vec::new();
            for batch in batches {
                for rec in &batch.records {
                    encode(rec, &mut buf);
                    records.insert(rev_key(rec.rev), buf.as_slice())?;
                }
                for rev in &batch.removed {
                    records.remove(rev_key(*rev))?;
                }
                for (id, ttl) in &batch.lease_put {
                    leases.insert(*id, *ttl)?;
                }
                for id in &batch.lease_del {
                    leases.remove(*id)?;
                }
                meta.insert(META_CURRENT, batch.current as u64)?;
                if let Some(c) = batch.compacted {
                    meta.insert(META_COMPACTED, (c + 1) as u64)?;
                }
            }
            meta.insert(META_WAL_SEQ, wal_seq)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
