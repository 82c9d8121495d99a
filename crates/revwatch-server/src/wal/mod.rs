//! The write-ahead log: every group commit is one record, written and `fdatasync`ed before
//! its writes are acknowledged. Checkpoints copy the log into the backend off that path
//! (see `checkpoint.rs`), after which the covered segments are deleted.
//!
//! Records carry a sequence number, one per record with no gaps, that says what a
//! checkpoint covers: some batches (lease grants) do not move the revision, so the
//! revision cannot. On open, the records after the checkpoint are replayed. A crash can
//! only tear the record being written, at the end of the last segment: that tail is
//! zeroed so that new records never follow garbage. Damage anywhere else is an error.

mod codec;
mod segment;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::backend::Batch;
use crate::error::ServerError;

/// Segment size: large enough that rolling over is rare, small enough that preallocating
/// one (in the background) is quick.
pub(crate) const SEGMENT_BYTES: u64 = 16 << 20;
/// The append buffer is dropped after a record larger than this, rather than kept.
const KEEP_BUFFER_BYTES: usize = 4 << 20;

pub(crate) struct Wal {
    dir: PathBuf,
    file: File,
    /// Where the next record goes in `file`.
    offset: u64,
    /// Bytes the current segment may hold before the log rolls over to a new one.
    capacity: u64,
    next_seq: u64,
    segment_bytes: u64,
    buf: Vec<u8>,
    /// The next segment, being preallocated.
    prepared: Option<JoinHandle<io::Result<File>>>,
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

impl Wal {
    /// Opens the log in `dir` (created if missing) and returns the records after
    /// `checkpointed`, in order.
    pub fn open(
        dir: &Path,
        checkpointed: u64,
        segment_bytes: u64,
    ) -> Result<(Self, Vec<(u64, Batch)>), ServerError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let preparing = dir.join(segment::PREPARING);
        match fs::remove_file(&preparing) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_error(&preparing)(e)),
            _ => {}
        }
        let segments = segment::list(dir).map_err(io_error(dir))?;
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
            let bytes = fs::read(path).map_err(io_error(path))?;
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
                zero(path, scan.end, garbage_end).map_err(io_error(path))?;
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
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io_error(path))?;
                (file, end as u64, size as u64, next)
            }
            None if checkpointed == 0 => {
                let file = segment::prepare(dir, segment_bytes).map_err(io_error(dir))?;
                segment::install(dir, 1).map_err(io_error(dir))?;
                (file, 0, segment_bytes, 1)
            }
            None => {
                let reason =
                    format!("no log segments, but the checkpoint is at record {checkpointed}");
                return Err(corrupt(dir, 0, reason));
            }
        };
        let wal = Self {
            dir: dir.to_path_buf(),
            file,
            offset,
            capacity: size.max(segment_bytes),
            next_seq,
            segment_bytes,
            buf: Vec::new(),
            prepared: None,
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
        self.file.sync_data()?;
        self.offset += len as u64;
        self.next_seq += 1;
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            self.buf = Vec::new();
        }
        if self.prepared.is_none() && self.offset * 2 > self.capacity {
            let (dir, size) = (self.dir.clone(), self.segment_bytes);
            self.prepared = Some(
                std::thread::Builder::new()
                    .name("revwatch-wal-prep".into())
                    .spawn(move || segment::prepare(&dir, size))?,
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
            None => segment::prepare(&self.dir, self.segment_bytes)?,
        };
        segment::install(&self.dir, self.next_seq)?;
        self.file = file;
        self.offset = 0;
        self.capacity = self.segment_bytes;
        Ok(())
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // A preparation left running could race the next open of this directory.
        if let Some(handle) = self.prepared.take() {
            let _ = handle.join();
        }
    }
}

/// Zeroes `[from, to)` of a segment durably, so that appends there never follow garbage.
fn zero(path: &Path, from: usize, to: usize) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.write_all_at(&vec![0; to - from], from as u64)?;
    file.sync_data()
}

/// Deletes the segments whose records are all at or below `checkpointed`, oldest first.
/// The last segment always stays: it is where the log continues.
pub(crate) fn remove_covered(dir: &Path, checkpointed: u64) -> io::Result<usize> {
    let segments = segment::list(dir)?;
    let mut removed = 0;
    for pair in segments.windows(2) {
        let [(_, path), (next_first, _)] = pair else {
            break;
        };
        if *next_first > checkpointed.saturating_add(1) {
            break;
        }
        fs::remove_file(path)?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests;
