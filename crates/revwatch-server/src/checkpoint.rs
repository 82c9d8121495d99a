//! Checkpoints: a background thread copies durable log records into the backend, like
//! etcd's backend batch commits, so that acknowledging a write costs one log append and
//! the database's page writes are amortized over many groups.
//!
//! Records arrive here only after their log append was fsynced. A checkpoint applies
//! everything received since the last one in one fsynced redb transaction that also stores
//! the last record's sequence number, and only then deletes the log segments it covers. A
//! crash before the transaction commits replays those records from the log; after it,
//! replay skips them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Batch};
use crate::wal::{self, Storage};

/// Log bytes that trigger a checkpoint before the interval is up.
pub(crate) const MAX_BACKLOG_BYTES: usize = 64 << 20;

/// When to checkpoint: `interval` after the oldest record not yet checkpointed, or once
/// `max_bytes` of log have accumulated, whichever comes first.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub interval: Duration,
    pub max_bytes: usize,
}

/// A record made durable in the log.
pub(crate) struct Logged {
    pub seq: u64,
    pub batch: Batch,
    pub bytes: usize,
}

/// The writer's end: hands over logged records without waking the checkpoint thread,
/// which sleeps until its interval is up (or `max_bytes` have piled up). Dropping it makes
/// the thread checkpoint what is left and end.
pub(crate) struct Feeder {
    tx: Option<mpsc::Sender<Logged>>,
    /// Log bytes handed over and not yet checkpointed.
    backlog: Arc<AtomicUsize>,
    max_bytes: usize,
    thread: Thread,
}

impl Feeder {
    pub fn push(&self, logged: Logged) {
        let bytes = logged.bytes;
        // Only a stopped checkpointer drops records; the log still has them.
        if let Some(tx) = &self.tx {
            let _ = tx.send(logged);
        }
        let before = self.backlog.fetch_add(bytes, Ordering::Relaxed);
        if before < self.max_bytes && before + bytes >= self.max_bytes {
            self.thread.unpark();
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        // Close the queue first, so that the woken thread sees it closed.
        self.tx = None;
        self.thread.unpark();
    }
}

/// Starts the checkpoint thread. `on_error` is called when a checkpoint fails; the thread
/// stops then, and the log keeps every record.
pub(crate) fn spawn<S: Storage>(
    backend: Backend,
    storage: S,
    wal_dir: PathBuf,
    policy: Policy,
    on_error: impl Fn() + Send + 'static,
) -> std::io::Result<(Feeder, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let thread_backlog = backlog.clone();
    let handle = std::thread::Builder::new()
        .name("revwatch-checkpoint".into())
        .spawn(move || {
            let mut ckpt = Checkpointer {
                backend,
                storage,
                wal_dir,
                backlog: thread_backlog,
                pending: Vec::new(),
                last_seq: 0,
                bytes: 0,
            };
            if ckpt.run(&rx, policy).is_err() {
                on_error();
            }
        })?;
    let feeder = Feeder {
        tx: Some(tx),
        backlog,
        max_bytes: policy.max_bytes,
        thread: handle.thread().clone(),
    };
    Ok((feeder, handle))
}

struct Checkpointer<S> {
    backend: Backend,
    storage: S,
    wal_dir: PathBuf,
    backlog: Arc<AtomicUsize>,
    pending: Vec<Batch>,
    last_seq: u64,
    bytes: usize,
}

impl<S: Storage> Checkpointer<S> {
    /// Checkpoints until the queue closes, then once more so that a clean shutdown leaves
    /// nothing to replay.
    fn run(&mut self, rx: &mpsc::Receiver<Logged>, policy: Policy) -> Result<(), ()> {
        // When the oldest record not yet checkpointed is due.
        let mut deadline = None;
        loop {
            let closed = loop {
                match rx.try_recv() {
                    Ok(logged) => self.take(logged),
                    Err(TryRecvError::Empty) => break false,
                    Err(TryRecvError::Disconnected) => break true,
                }
            };
            if !self.pending.is_empty() {
                let due = deadline.get_or_insert_with(|| Instant::now() + policy.interval);
                if closed || Instant::now() >= *due || self.bytes >= policy.max_bytes {
                    self.checkpoint()?;
                    deadline = None;
                }
            }
            if closed {
                return Ok(());
            }
            match deadline {
                // Idle: the next record wakes us (once, not once per record).
                None => match rx.recv() {
                    Ok(logged) => self.take(logged),
                    Err(_) => continue,
                },
                Some(due) => {
                    std::thread::park_timeout(due.saturating_duration_since(Instant::now()))
                }
            }
        }
    }

    fn take(&mut self, logged: Logged) {
        self.last_seq = logged.seq;
        self.bytes += logged.bytes;
        self.pending.push(logged.batch);
    }

    fn checkpoint(&mut self) -> Result<(), ()> {
        if let Err(e) = self.backend.checkpoint(&self.pending, self.last_seq) {
            tracing::error!(error = %e, "checkpoint failed; refusing further writes");
            return Err(());
        }
        self.pending.clear();
        self.backlog.fetch_sub(self.bytes, Ordering::Relaxed);
        self.bytes = 0;
        if let Err(e) = wal::remove_covered(&self.storage, &self.wal_dir, self.last_seq) {
            // Harmless for correctness: replay skips checkpointed records.
            tracing::warn!(error = %e, "could not delete checkpointed log segments");
        }
        Ok(())
    }
}
