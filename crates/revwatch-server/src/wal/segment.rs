//! Segment files and the record framing inside them.
//!
//! A segment is named after the sequence number of its first record
//! (`0000000000000001.wal`) and preallocated with zeros, so that appending to it changes
//! no file size and `fdatasync` has no metadata to flush. Each record is a frame:
//!
//! ```text
//! len: u32 LE | crc: u32 LE | seq: u64 LE | payload (len bytes) | zero padding to 8 bytes
//! ```
//!
//! `crc` is CRC-32 over `len`, `seq` and the payload. A zero `len` is where the written
//! part ends. Frames start at multiples of 8, so that recovery can look for intact frames
//! behind a damaged one without trying every byte offset.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::storage::{Storage, StorageFile};

pub(crate) const HEADER: usize = 16;
const EXT: &str = "wal";
/// The segment being preallocated; never replayed, removed on open.
pub(crate) const PREPARING: &str = "next.tmp";

/// Appends the frame of record `seq` to `buf`; `payload` writes the payload. Fails if the
/// payload does not fit a frame (4 GiB).
pub(crate) fn frame(
    buf: &mut Vec<u8>,
    seq: u64,
    payload: impl FnOnce(&mut Vec<u8>),
) -> std::io::Result<()> {
    let start = buf.len();
    buf.resize(start + HEADER, 0);
    payload(buf);
    let len = buf.len() - start - HEADER;
    buf.resize(start + HEADER + len.next_multiple_of(8), 0);
    let Ok(len) = u32::try_from(len) else {
        buf.truncate(start);
        let msg = format!("a log record of {len} bytes exceeds the frame limit");
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    };
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 8..start + 16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc(
        &buf[start..start + 4],
        &buf[start + 8..start + HEADER + len as usize],
    );
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

fn crc(len: &[u8], rest: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(rest);
    h.finalize()
}

/// The intact frame at `pos`: `(seq, payload range, next frame position)`.
fn frame_at(bytes: &[u8], pos: usize) -> Option<(u64, Range<usize>, usize)> {
    let header = bytes.get(pos..pos.checked_add(HEADER)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    if len == 0 {
        return None;
    }
    let stored = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let payload = pos + HEADER..pos + HEADER + len;
    let body = bytes.get(pos + 8..payload.end)?;
    if crc(&header[0..4], body) != stored {
        return None;
    }
    let next = pos + HEADER + len.next_multiple_of(8);
    Some((seq, payload, next))
}

/// What a segment holds.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Each intact record: its sequence number and payload.
    pub records: Vec<(u64, Range<usize>)>,
    /// Where the intact records end: the next append goes here.
    pub end: usize,
    /// Non-zero bytes after `end` (a write cut off by a crash) end here.
    pub garbage_end: Option<usize>,
}

/// Reads the frames of a segment whose first record is `first_seq`. Err is
/// `(offset, reason)` when the segment is damaged somewhere a torn write cannot explain:
/// a frame out of sequence, or intact frames behind a damaged one.
pub(crate) fn scan(bytes: &[u8], first_seq: u64) -> Result<Scan, (usize, String)> {
    let mut records = Vec::new();
    let mut pos = 0;
    let mut expected = first_seq;
    while let Some((seq, payload, next)) = frame_at(bytes, pos) {
        if seq != expected {
            return Err((pos, format!("record {seq} where {expected} was expected")));
        }
        records.push((seq, payload));
        pos = next;
        expected = expected.saturating_add(1);
    }
    let garbage_end = bytes[pos..]
        .iter()
        .rposition(|b| *b != 0)
        .map(|i| pos + i + 1);
    if let Some(g) = garbage_end {
        // A crash tears at most the one write in flight, with nothing intact after it.
        let later = (pos + 8..g).step_by(8).find(|&at| {
            frame_at(bytes, at).is_some_and(|(seq, ..)| seq >= expected && seq - expected < 1 << 32)
        });
        if let Some(at) = later {
            return Err((
                pos,
                format!("record {expected} is damaged but an intact record follows at {at}"),
            ));
        }
    }
    Ok(Scan {
        records,
        end: pos,
        garbage_end,
    })
}

pub(crate) fn name(first_seq: u64) -> String {
    format!("{first_seq:016x}.{EXT}")
}

/// Segment files in `dir`, by first sequence number.
pub(crate) fn list<S: Storage>(fs: &S, dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for file_name in fs.list(dir)? {
        let Some(s) = file_name.to_str() else {
            continue;
        };
        if let Some(seq) = s
            .strip_suffix(EXT)
            .and_then(|s| s.strip_suffix('.'))
            .filter(|s| s.len() == 16)
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        {
            out.push((seq, dir.join(s)));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Makes a zero-filled segment of `size` bytes under [`PREPARING`], durable.
pub(crate) fn prepare<S: Storage>(fs: &S, dir: &Path, size: u64) -> io::Result<S::File> {
    let file = fs.create(&dir.join(PREPARING))?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(file)
}

/// Gives the prepared segment its name, durably: records written to it must not vanish
/// with a lost rename.
pub(crate) fn install<S: Storage>(fs: &S, dir: &Path, first_seq: u64) -> io::Result<PathBuf> {
    let path = name_prepared(fs, dir, first_seq)?;
    fs.sync_dir(dir)?;
    Ok(path)
}

/// Renames the prepared segment to its name, not durably yet.
pub(crate) fn name_prepared<S: Storage>(fs: &S, dir: &Path, first_seq: u64) -> io::Result<PathBuf> {
    let path = dir.join(name(first_seq));
    fs.rename(&dir.join(PREPARING), &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::super::storage::Disk;
    use super::*;

    fn log(seqs: Range<u64>) -> Vec<u8> {
        let mut buf = Vec::new();
        for seq in seqs {
            frame(&mut buf, seq, |b| b.extend_from_slice(&[seq as u8; 13])).expect("frame");
        }
        buf
    }

    #[test]
    fn frames_are_aligned_and_scan_back() {
        let mut bytes = log(5..8);
        assert_eq!(bytes.len() % 8, 0);
        bytes.resize(bytes.len() + 64, 0);
        let scan = scan(&bytes, 5).expect("intact");
        assert_eq!(scan.records.len(), 3);
        assert_eq!(scan.records[2].0, 7);
        assert_eq!(&bytes[scan.records[2].1.clone()], &[7u8; 13]);
        assert_eq!(scan.end, bytes.len() - 64);
        assert_eq!(scan.garbage_end, None);
    }

    #[test]
    fn torn_last_frame_is_garbage_not_an_error() {
        let bytes = log(1..4);
        let whole = bytes.len();
        let two = scan(&log(1..3), 1).expect("intact").end;
        // Cuts inside the last frame's padding leave it whole.
        for cut in two + 1..two + HEADER + 13 {
            let mut torn = bytes[..cut].to_vec();
            torn.resize(whole + 32, 0);
            let s = scan(&torn, 1).expect("a torn tail is no error");
            assert_eq!((s.records.len(), s.end), (2, two), "cut at {cut}");
        }
        // Its header lost but its payload written: still the tail.
        let mut torn = bytes.clone();
        torn[two..two + HEADER].fill(0);
        let s = scan(&torn, 1).expect("a torn tail is no error");
        assert_eq!(
            (s.records.len(), s.garbage_end),
            (2, Some(two + HEADER + 13))
        );
    }

    #[test]
    fn damage_before_intact_frames_is_an_error() {
        let mut bytes = log(1..4);
        let one = scan(&log(1..2), 1).expect("intact").end;
        bytes[one + HEADER + 3] ^= 1;
        let (at, _) = scan(&bytes, 1).expect_err("damage in the middle");
        assert_eq!(at, one);
        // A zeroed header in the middle hides the rest: also an error.
        let mut bytes = log(1..4);
        bytes[one..one + 4].fill(0);
        assert!(scan(&bytes, 1).is_err());
        // Out of sequence.
        assert!(scan(&log(1..4), 2).is_err());
    }

    #[test]
    fn names_sort_by_sequence() {
        assert_eq!(name(255), "00000000000000ff.wal");
        let dir = tempfile::tempdir().expect("tempdir");
        for seq in [300, 2, 17] {
            File::create(dir.path().join(name(seq))).expect("create");
        }
        File::create(dir.path().join(PREPARING)).expect("create");
        let seqs: Vec<u64> = list(&Disk, dir.path())
            .expect("list")
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, vec![2, 17, 300]);
    }
}
