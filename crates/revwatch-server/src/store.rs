//! The store: the in-memory MVCC state behind a lock, a single writer thread that applies
//! write requests and group-commits them to the write-ahead log, and the committed
//! revision that readers and watchers see.
//!
//! Writers queue closures; the writer thread takes everything queued, applies it in order
//! under one lock, appends the result to the log as one fsynced record, and only then
//! publishes the new revision and answers the callers. Readers read at the committed
//! revision, so they never observe a change that could still be lost. A checkpoint thread
//! copies logged records into redb in the background (see `checkpoint.rs`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseRevokeResponse, PutRequest, PutResponse, ResponseHeader, TxnRequest,
    TxnResponse,
};
use etcd_proto::key_range::KeyRange;
use tokio::sync::{oneshot, watch};

use crate::backend::{Backend, Batch, Identity};
use crate::checkpoint::{self, Feeder, Logged};
use crate::compactor::Compactor;
use crate::config::AutoCompaction;
use crate::error::{EtcdError, ServerError};
use crate::faults::Faults;
use crate::lease::{LeaseInfo, LeaseTable};
use crate::mvcc::{self, MvccState};
use crate::wal::{self, Disk, Storage, Wal};

/// The log's directory inside the data directory.
const WAL_DIR: &str = "wal";

/// Most write requests applied in one group commit.
const MAX_BATCH: usize = 4096;
/// A group stops taking requests once its keys and values reach this size, so that one
/// log record stays far below the 4 GiB a frame can hold.
const MAX_GROUP_BYTES: usize = 64 << 20;

type Ack = Box<dyn FnOnce(bool) + Send>;
type Job = Box<dyn FnOnce(&mut Apply<'_>) -> Ack + Send>;

/// State shared by readers and the writer thread.
struct Shared {
    state: RwLock<MvccState>,
    committed: AtomicI64,
    notify: watch::Sender<i64>,
    failed: AtomicBool,
    /// Durable commits (log fsyncs) so far: with concurrent writers, fewer than writes.
    commits: AtomicU64,
    faults: Arc<Faults>,
}

/// Settings the store needs from the server configuration, its timers in range
/// (`ServerConfig::with_timers_in_range`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreOptions {
    pub min_lease_ttl: i64,
    pub lease_check_interval: Duration,
    pub checkpoint_interval: Duration,
    pub auto_compaction: Option<AutoCompaction>,
}

/// Where and how the store keeps its durable state. [`Store::open`] uses the real disk and
/// the default sizes; tests swap the file system and shrink segments.
pub(crate) struct Layout<S> {
    pub storage: S,
    pub segment_bytes: u64,
    pub checkpoints: checkpoint::Policy,
    /// A sync for the log to leave out.
    #[cfg(test)]
    pub mutation: Option<wal::Mutation>,
}

pub(crate) struct Store {
    shared: Arc<Shared>,
    identity: Identity,
    /// The database file, whose size Status reports.
    db_path: std::path::PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

impl Store {
    pub fn open(
        dir: &std::path::Path,
        opts: StoreOptions,
        faults: Arc<Faults>,
    ) -> Result<Self, ServerError> {
        let layout = Layout {
            storage: Disk,
            segment_bytes: wal::SEGMENT_BYTES,
            checkpoints: checkpoint::Policy {
                interval: opts.checkpoint_interval,
                max_bytes: checkpoint::MAX_BACKLOG_BYTES,
            },
            #[cfg(test)]
            mutation: None,
        };
        Self::open_with(dir, opts, faults, layout)
    }

    /// [`Store::open`] with an explicit layout.
    pub(crate) fn open_with<S: Storage>(
        dir: &std::path::Path,
        opts: StoreOptions,
        faults: Arc<Faults>,
        layout: Layout<S>,
    ) -> Result<Self, ServerError> {
        let storage = layout.storage;
        let (backend, identity) = Backend::open(&storage, dir)?;
        let wal_dir = dir.join(WAL_DIR);
        let checkpointed = backend.checkpointed()?;
        // Opening the log also syncs the data directory, which makes the entry of a
        // database file created just above durable.
        let (wal, replay) = Wal::open_in(
            storage.clone(),
            &wal_dir,
            checkpointed,
            layout.segment_bytes,
        )?;
        #[cfg(test)]
        let wal = {
            let mut wal = wal;
            wal.mutation = layout.mutation;
            wal
        };
        // Checkpoint what the log adds right away: loading then reads one consistent state.
        if let Some((last, _)) = replay.last() {
            tracing::info!(records = replay.len(), "replaying the write-ahead log");
            backend.checkpoint(replay.iter().map(|(_, b)| b), *last)?;
            if let Err(e) = wal::remove_covered(&storage, &wal_dir, *last) {
                tracing::warn!(error = %e, "could not delete checkpointed log segments");
            }
        }
        drop(replay);
        let loaded = backend.load()?;
        let leases = LeaseTable::restore(loaded.leases, Instant::now());
        let state = MvccState::restore(loaded.records, loaded.current, loaded.compacted, leases);
        let current = state.current();
        let db_path = backend.path().to_path_buf();
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            committed: AtomicI64::new(current),
            notify: watch::channel(current).0,
            failed: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            faults,
        });
        let spawn_error = |source| ServerError::DataDir {
            path: dir.to_path_buf(),
            source,
        };
        let ckpt_shared = shared.clone();
        let on_error = move || ckpt_shared.failed.store(true, Ordering::Release);
        let (feeder, checkpointer) =
            checkpoint::spawn(backend, storage, wal_dir, layout.checkpoints, on_error)
                .map_err(spawn_error)?;
        let (tx, rx) = mpsc::channel();
        let writer_shared = shared.clone();
        let mut log = LogWriter {
            wal,
            checkpoints: feeder,
        };
        let writer = std::thread::Builder::new()
            .name("revwatch-writer".into())
            .spawn(move || run_writer(&writer_shared, &mut log, &rx, opts))
            .map_err(spawn_error)?;
        Ok(Self {
            shared,
            identity,
            db_path,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The latest durable revision.
    pub fn committed(&self) -> i64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Durable commits made since the store was opened.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// The revision reads and watchers see: the committed one, unless a lag fault holds
    /// them back.
    pub fn read_rev(&self) -> i64 {
        let committed = self.committed();
        match self.shared.faults.read_lag() {
            0 => committed,
            lag => (committed - lag).max(self.state().compacted()).max(1),
        }
    }

    /// Size of the database file in bytes, read when asked rather than after every commit.
    pub fn db_size(&self) -> i64 {
        std::fs::metadata(&self.db_path).map_or(0, |m| m.len() as i64)
    }

    /// Wakes watchers up with the current committed revision.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.shared.notify.subscribe()
    }

    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    /// Re-sends the committed revision, so watchers re-check what they may deliver.
    pub fn renotify(&self) {
        self.shared.notify.send_replace(self.committed());
    }

    /// Read access to the state. Callers must read at or below [`Store::read_rev`].
    pub fn state(&self) -> RwLockReadGuard<'_, MvccState> {
        self.shared
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, MvccState> {
        self.shared
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the writer thread and returns its result once it is durable.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Apply<'_>) -> Result<T, EtcdError> + Send + 'static,
    ) -> Result<T, EtcdError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(EtcdError::Stopped);
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ap| {
            let res = f(ap);
            Box::new(move |durable| {
                // The caller may have gone away; nothing to do then.
                let _ = tx.send(if durable {
                    res
                } else {
                    Err(EtcdError::Stopped)
                });
            })
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let sender = jobs.as_ref().ok_or(EtcdError::Stopped)?;
            sender.send(job).map_err(|_| EtcdError::Stopped)?;
        }
        rx.await.map_err(|_| EtcdError::Stopped)?
    }

    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, EtcdError> {
        self.write(move |ap| ap.put(&req)).await
    }

    pub async fn delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, EtcdError> {
        self.write(move |ap| Ok(ap.delete_range(&req))).await
    }

    /// Runs a txn. Read-only txns skip the writer; they read at the committed revision.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, EtcdError> {
        if mvcc::is_read_only(&req) {
            return self.read_only_txn(&req);
        }
        self.write(move |ap| ap.txn(&req)).await
    }

    fn read_only_txn(&self, req: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        // Everything is evaluated at the read revision, so changes the writer has applied
        // but not yet made durable stay invisible.
        let st = self.state();
        mvcc::read_only_txn(&st, req, self.read_rev())
    }

    pub async fn compact(&self, revision: i64) -> Result<CompactionResponse, EtcdError> {
        self.write(move |ap| ap.compact(revision)).await
    }

    /// Compacts at `revision`, or at the current revision. Returns the compacted revision.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub async fn force_compact(&self, revision: Option<i64>) -> Result<i64, EtcdError> {
        self.write(move |ap| {
            let rev = revision.unwrap_or(ap.committed);
            ap.compact(rev).map(|_| rev)
        })
        .await
    }

    pub async fn lease_grant(
        &self,
        req: LeaseGrantRequest,
    ) -> Result<LeaseGrantResponse, EtcdError> {
        self.write(move |ap| ap.lease_grant(&req)).await
    }

    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, EtcdError> {
        self.write(move |ap| {
            ap.lease_revoke(id)?;
            Ok(LeaseRevokeResponse {
                header: header(ap.state.current()),
            })
        })
        .await
    }

    /// Renews a lease in memory (keep-alives are not durable, as in etcd).
    pub fn keep_alive(&self, id: i64) -> Option<i64> {
        self.state_mut().leases.keep_alive(id, Instant::now())
    }

    pub fn lease_info(&self, id: i64) -> Option<LeaseInfo> {
        self.state().leases.info(id, Instant::now())
    }

    pub fn lease_ids(&self) -> Vec<i64> {
        self.state().leases.ids()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread once it has committed what it took.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        join(&self.writer, "writer");
        // The writer's end of the checkpoint queue is gone now: the checkpointer makes a
        // last checkpoint and ends, closing the database.
        join(&self.checkpointer, "checkpoint");
    }
}

/// Waits for a thread of the store to end, if it has not been waited for yet.
fn join(thread: &Mutex<Option<JoinHandle<()>>>, name: &str) {
    let handle = thread.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(handle) = handle
        && handle.join().is_err()
    {
        tracing::error!("{name} thread panicked");
    }
}

/// The writer thread's view while applying one group of requests.
pub(crate) struct Apply<'a> {
    pub state: &'a mut MvccState,
    batch: &'a mut Batch,
    now: Instant,
    min_lease_ttl: i64,
    /// The durable revision when this group started: readers may be reading at it, so a
    /// compaction must not go past it.
    committed: i64,
}

impl Apply<'_> {
    fn put(&mut self, req: &PutRequest) -> Result<PutResponse, EtcdError> {
        let mut w = self.state.write();
        let resp = mvcc::apply_put(&mut w, req)?;
        self.batch.records.extend(w.finish());
        Ok(resp)
    }

    fn delete_range(&mut self, req: &DeleteRangeRequest) -> DeleteRangeResponse {
        let mut w = self.state.write();
        let resp = mvcc::apply_delete(&mut w, req);
        self.batch.records.extend(w.finish());
        resp
    }

    fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, EtcdError> {
        let path = mvcc::check_txn(self.state, req, self.state.current())?;
        let mut w = self.state.write();
        match mvcc::apply_txn(&mut w, req, &path) {
            Ok(resp) => {
                self.batch.records.extend(w.finish());
                Ok(resp)
            }
            Err(e) => {
                // The checks above make this unreachable in practice; never persist half a txn.
                w.abort();
                Err(e)
            }
        }
    }

    fn compact(&mut self, revision: i64) -> Result<CompactionResponse, EtcdError> {
        let removed = self.state.compact(revision, self.committed)?;
        self.batch.removed.extend(removed);
        self.batch.compacted = Some(revision);
        Ok(CompactionResponse {
            header: header(self.state.current()),
        })
    }

    fn lease_grant(&mut self, req: &LeaseGrantRequest) -> Result<LeaseGrantResponse, EtcdError> {
        let (id, ttl) = self
            .state
            .leases
            .grant(req.id, req.ttl, self.min_lease_ttl, self.now)?;
        self.batch.lease_put.push((id, ttl));
        Ok(LeaseGrantResponse {
            header: header(self.state.current()),
            id,
            ttl,
            error: String::new(),
        })
    }

    /// Revokes a lease and deletes its keys in one revision, sorted by key.
    fn lease_revoke(&mut self, id: i64) -> Result<(), EtcdError> {
        let keys = self
            .state
            .leases
            .revoke(id)
            .ok_or(EtcdError::LeaseNotFound)?;
        let mut w = self.state.write();
        for key in keys {
            w.delete_range(&KeyRange::single(&key));
        }
        self.batch.records.extend(w.finish());
        self.batch.lease_del.push(id);
        Ok(())
    }
}

/// The writer thread's log: appends, then hands the records to the checkpointer.
struct LogWriter<S: Storage> {
    wal: Wal<S>,
    checkpoints: Feeder,
}

fn run_writer<S: Storage>(
    shared: &Shared,
    log: &mut LogWriter<S>,
    rx: &mpsc::Receiver<Job>,
    opts: StoreOptions,
) {
    let mut next_lease_check = Instant::now() + opts.lease_check_interval;
    let mut compactor = opts.auto_compaction.and_then(|auto| {
        Compactor::new(
            auto,
            Instant::now(),
            shared.committed.load(Ordering::Acquire),
        )
    });
    loop {
        let due = compactor
            .as_ref()
            .map_or(next_lease_check, |c| c.due().min(next_lease_check));
        let wait = due.saturating_duration_since(Instant::now());
        let mut jobs = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(job) => {
                jobs.push(job);
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let expire = now >= next_lease_check;
        if expire {
            next_lease_check = now + opts.lease_check_interval;
        }
        let mut jobs = jobs.into_iter().peekable();
        commit_group(shared, log, &mut jobs, expire, opts.min_lease_ttl);
        while jobs.peek().is_some() {
            commit_group(shared, log, &mut jobs, false, opts.min_lease_ttl);
        }
        if let Some(c) = compactor.as_mut()
            && now >= c.due()
            && let Some(rev) = c.tick(now, shared.committed.load(Ordering::Acquire))
        {
            let mut compact = std::iter::once(auto_compact(rev));
            commit_group(shared, log, &mut compact, false, opts.min_lease_ttl);
        }
    }
}

/// The job of one automatic compaction at `rev`, unless that is already compacted (which
/// etcd's compactors count as done).
fn auto_compact(rev: i64) -> Job {
    Box::new(move |ap| {
        if rev > ap.state.compacted() {
            tracing::info!(revision = rev, "auto-compaction");
            if let Err(e) = ap.compact(rev) {
                tracing::warn!(revision = rev, error = %e, "auto-compaction failed");
            }
        }
        Box::new(|_| {})
    })
}

/// Applies jobs from `jobs` (up to [`MAX_GROUP_BYTES`]), logs them as one record and
/// answers their callers.
fn commit_group<S: Storage>(
    shared: &Shared,
    log: &mut LogWriter<S>,
    jobs: &mut impl Iterator<Item = Job>,
    expire: bool,
    min_ttl: i64,
) {
    let mut batch = Batch::default();
    let mut acks = Vec::new();
    {
        let mut state = shared.state.write().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let mut ap = Apply {
            state: &mut state,
            batch: &mut batch,
            now,
            min_lease_ttl: min_ttl,
            committed: shared.committed.load(Ordering::Acquire),
        };
        if expire {
            for id in ap.state.leases.expired(now) {
                // Each expiry is its own revision, like etcd's revoke proposals.
                let _ = ap.lease_revoke(id);
            }
        }
        let mut bytes = 0;
        for job in jobs.by_ref() {
            let before = ap.batch.records.len();
            acks.push(job(&mut ap));
            bytes += ap.batch.records[before..]
                .iter()
                .map(|r| r.key.len() + r.value.len())
                .sum::<usize>();
            if bytes >= MAX_GROUP_BYTES {
                break;
            }
        }
        batch.current = state.current();
    }
    let current = batch.current;
    let changed = !batch.is_empty();
    let durable = if shared.failed.load(Ordering::Acquire) {
        false
    } else if !changed {
        true
    } else {
        match log.wal.append(&batch) {
            Ok((seq, bytes)) => {
                shared.commits.fetch_add(1, Ordering::Relaxed);
                log.checkpoints.push(Logged { seq, batch, bytes });
                true
            }
            Err(e) => {
                // Memory is now ahead of disk. Stop taking writes; reads stay at the last
                // durable revision, which is still correct.
                tracing::error!(error = %e, "log append failed; refusing further writes");
                shared.failed.store(true, Ordering::Release);
                false
            }
        }
    };
    if durable {
        if current != shared.committed.load(Ordering::Acquire) {
            shared.committed.store(current, Ordering::Release);
        }
        if changed {
            shared.notify.send_replace(current);
        }
    }
    for ack in acks {
        ack(durable);
    }
}
