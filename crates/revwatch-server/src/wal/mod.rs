//! The write-ahead log: every group commit is one record, written and `fdatasync`ed before
//! its writes are acknowledged. Checkpoints copy the log into the backend off that path
//! (see `checkpoint.rs`), after which the covered segments are deleted.
//!
//! Records carry a sequence number, one per record with no gaps, that says what a
//! checkpoint covers: some batches (lease grants) do not move the revision, so the
//! revision cannot. On open, the records after the checkpoint are replayed. A crash can
//! only tear the record being written, at the end of the last segment: that tail is
//! zeroed so that new records never follow garbage. Damage anywhere else is an error.
//!
//! All file I/O goes through [`Storage`], so that tests can run the log (and the database)
//! on a disk that loses what was not synced at a power loss (`sim.rs`, `power_loss.rs`).

mod codec;
mod segment;
#[cfg(test)]
pub(crate) mod sim;
mod storage;

use std::io;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::backend::Batch;
use crate::error::ServerError;

pub(crate) use storage::{Disk, Storage, StorageFile};

/// Segment size: large enough that rolling over is rare, small enough that preallocating
/// one (in the background) is quick.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// The append buffer is dropped after a record larger than this, rather than kept.
const KEEP_BUFFER_BYTES: usize = 4 << 20;

/// A sync the log can be made to leave out, so that the power-loss test can show it
/// catches the loss (see `power_loss.rs`).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mutation {
    /// Acknowledge an append without its `fdatasync`.
    SkipAppendSync,
    /// Roll over to a new segment without syncing the directory that names it.
    SkipRollDirSync,
}

pub(crate) struct Wal<S: Storage = Disk> {
    fs: S,
    dir: PathBuf,
    file: S::File,
    /// Where the next record goes in `file`.
    offset: u64,
    /// Bytes the current segment may hold before the log rolls over to a new one.
    capacity: u64,
    next_seq: u64,
    segment_bytes: u64,
    buf: Vec<u8>,
    /// The next segment, being preallocated.
    prepared: Option<JoinHandle<io::Result<S::File>>>,
    #[cfg(test)]
    pub(crate) mutation: Option<Mutation>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ServerError + '_ {
    move |source| ServerError::Wal {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, offset: usize, reason: String) -> ServerError {
    ServerError::WalCorrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        reason,
    }
}

#[cfg(test)]
impl Wal {
    /// [`Wal::open_in`] on the real file system.
    pub fn open(
        dir: &Path,
        checkpointed: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Vec<(u64, Batch)>), ServerError> {
        Self::open_in(Disk, dir, checkpointed, segment_bytes)
    }
}

impl<S: Storage> Wal<S> {
    /// Opens the log in `dir` (created if missing) and returns the records after
    /// `checkpointed`, in order.
    pub fn open_in(
        fs: S,
        dir: &Path,
        checkpointed: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Vec<(u64, Batch)>), ServerError> {
        fs.create_dir_all(dir).map_err(io_error(dir))?;
        // The directory's own entry, for a log created just now: without it the whole log
        // may vanish at a power loss.
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(io_error(parent))?;
        }
        let preparing = dir.join(segment::PREPARING);
        match fs.remove_file(&preparing) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&preparing)(e)),
            _ => {}
        }
        let segments = segment::list(&fs, dir).map_err(io_error(dir))?;
        // Saturating arithmetic throughout: a damaged name or checkpoint must give an
        // error, not an overflow.
        let needed = checkpointed.saturating_add(1);
        let mut replay = Vec::new();
        // Sequence number after the previous segment's last record.
        let mut prev_next = None;
        // The last segment: path, end of its intact records, size, next sequence number.
        let mut tail = None;
        for (i, (first, path)) in segments.iter().enumerate() {
            let is_last = i + 1 == segments.len();
            // Segments before the checkpoint may have gaps (their deletion is not
            // ordered); from there on the records must follow each other.
            if *first > needed && prev_next.is_none_or(|n| n != *first) {
                let after = prev_next.unwrap_or(needed);
                let reason = format!("records {after} to {} are missing", first - 1);
                return Err(corrupt(path, 0, reason));
            }
            let bytes = fs.read(path).map_err(io_error(path))?;
            let scan = segment::scan(&bytes, *first).map_err(|(at, why)| corrupt(path, at, why))?;
            if let Some(garbage_end) = scan.garbage_end {
                if !is_last {
                    let reason = "damaged record in a segment that is not the last".to_owned();
                    return Err(corrupt(path, scan.end, reason));
                }
                tracing::warn!(
                    segment = %path.display(),
                    offset = scan.end,
                    "write-ahead log ends with a torn record; discarding it"
                );
                zero(&fs, path, scan.end, garbage_end).map_err(io_error(path))?;
            }
            for (seq, payload) in &scan.records {
                if *seq > checkpointed {
                    let batch = codec::decode(&bytes[payload.clone()]).map_err(|why| {
                        corrupt(
                            path,
                            payload.start - segment::HEADER,
                            format!("record {seq}: {why}"),
                        )
                    })?;
                    replay.push((*seq, batch));
                }
            }
            let next = first.saturating_add(scan.records.len() as u64);
            prev_next = Some(next);
            if is_last {
                tail = Some((path, scan.end, bytes.len(), next));
            }
        }
        let (file, offset, size, next_seq) = match tail {
            Some((path, end, size, next)) => {
                if next <= checkpointed {
                    let reason = format!(
                        "the log ends at record {}, before the checkpoint at {checkpointed}",
                        next.saturating_sub(1)
                    );
                    return Err(corrupt(path, end, reason));
                }
                let file = fs.open(path).map_err(io_error(path))?;
                (file, end as u64, size as u64, next)
            }
            None if checkpointed == 0 => {
                let file = segment::prepare(&fs, dir, segment_bytes).map_err(io_error(dir))?;
                segment::install(&fs, dir, 1).map_err(io_error(dir))?;
                (file, 0, segment_bytes, 1)
            }
            None => {
                let reason =
                    format!("no log segments, but the checkpoint is at record {checkpointed}");
                return Err(corrupt(dir, 0, reason));
            }
        };
        let wal = Self {
            fs,
            dir: dir.to_path_buf(),
            file,
            offset,
            capacity: size.max(segment_bytes),
            next_seq,
            segment_bytes,
            buf: Vec::new(),
            prepared: None,
            #[cfg(test)]
            mutation: None,
        };
        Ok((wal, replay))
    }

    /// Appends `batch` as the next record and makes it durable. Returns its sequence
    /// number and size in bytes. After an error the log must not be appended to again:
    /// the record may be half written.
    pub fn append(&mut self, batch: &Batch) -> io::Result<(u64, usize)> {
        let seq = self.next_seq;
        self.buf.clear();
        segment::frame(&mut self.buf, seq, |b| codec::encode(batch, b))?;
        let len = self.buf.len();
        if self.offset > 0 && self.offset + len as u64 > self.capacity {
            self.roll()?;
        }
        self.file.write_all_at(&self.buf, self.offset)?;
        #[cfg(test)]
        let skip_sync = self.mutation == Some(Mutation::SkipAppendSync);
        #[cfg(not(test))]
        let skip_sync = false;
        if !skip_sync {
            self.file.sync_data()?;
        }
        self.offset += len as u64;
        self.next_seq += 1;
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            self.buf = Vec::new();
        }
        if self.prepared.is_none() && self.offset * 2 > self.capacity {
            let (fs, dir, size) = (self.fs.clone(), self.dir.clone(), self.segment_bytes);
            self.prepared = Some(
                std::thread::Builder::new()
                    .name("revwatch-wal-prep".into())
                    .spawn(move || segment::prepare(&fs, &dir, size))?,
            );
        }
        Ok((seq, len))
    }

    /// Continues in a new segment that starts with the next record.
    fn roll(&mut self) -> io::Result<()> {
        let file = match self.prepared.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| io::Error::other("segment preparation panicked"))??,
            None => segment::prepare(&self.fs, &self.dir, self.segment_bytes)?,
        };
        #[cfg(test)]
        let skip_dir_sync = self.mutation == Some(Mutation::SkipRollDirSync);
        #[cfg(not(test))]
        let skip_dir_sync = false;
        if skip_dir_sync {
            segment::name_prepared(&self.fs, &self.dir, self.next_seq)?;
        } else {
            segment::install(&self.fs, &self.dir, self.next_seq)?;
        }
        self.file = file;
        self.offset = 0;
        self.capacity = self.segment_bytes;
        Ok(())
    }
}

impl<S: Storage> Drop for Wal<S> {
    fn drop(&mut self) {
        // A preparation left running could race the next open of this directory.
        if let Some(handle) = self.prepared.take() {
            let _ = handle.join();
        }
    }
}

/// Zeroes `[from, to)` of a segment durably, so that appends there never follow garbage.
fn zero<S: Storage>(fs: &S, path: &Path, from: usize, to: usize) -> io::Result<()> {
    let file = fs.open(path)?;
    file.write_all_at(&vec![0; to - from], from as u64)?;
    file.sync_data()
}

/// Deletes the segments whose records are all at or below `checkpointed`, oldest first.
/// The last segment always stays: it is where the log continues.
pub(crate) fn remove_covered<S: Storage>(
    fs: &S,
    dir: &Path,
    checkpointed: u64,
) -> io::Result<usize> {
    let segments = segment::list(fs, dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let [(_, path), (next_first, _)] = pair else {
            break;
        };
        if *next_first > checkpointed.saturating_add(1) {
            break;
        }
        fs.remove_file(path)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod power_loss;
#[cfg(test)]
mod tests;
