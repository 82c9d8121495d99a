//! The binary form of a [`Batch`] inside a WAL record: fixed-width little-endian integers
//! and length-prefixed byte strings, led by a format byte so a later version can change it.

use std::sync::Arc;

use crate::backend::Batch;
use crate::mvcc::{Record, Revision};

const FORMAT: u8 = 1;
const TOMBSTONE: u8 = 1;

/// Appends the encoding of `batch` to `out`.
pub(crate) fn encode(batch: &Batch, out: &mut Vec<u8>) {
    out.push(FORMAT);
    put_i64(out, batch.current);
    match batch.compacted {
        Some(rev) => {
            out.push(1);
            put_i64(out, rev);
        }
        None => out.push(0),
    }
    put_len(out, batch.records.len());
    for rec in &batch.records {
        out.push(if rec.tombstone { TOMBSTONE } else { 0 });
        for v in [
            rec.rev.main,
            rec.rev.sub,
            rec.create_revision,
            rec.version,
            rec.lease,
        ] {
            put_i64(out, v);
        }
        put_bytes(out, &rec.key);
        put_bytes(out, &rec.value);
    }
    put_len(out, batch.removed.len());
    for rev in &batch.removed {
        put_i64(out, rev.main);
        put_i64(out, rev.sub);
    }
    put_len(out, batch.lease_put.len());
    for (id, ttl) in &batch.lease_put {
        put_i64(out, *id);
        put_i64(out, *ttl);
    }
    put_len(out, batch.lease_del.len());
    for id in &batch.lease_del {
        put_i64(out, *id);
    }
}

/// Decodes a batch encoded by [`encode`]; the error says what is wrong.
pub(crate) fn decode(bytes: &[u8]) -> Result<Batch, String> {
    let mut r = Reader { bytes, pos: 0 };
    let format = r.u8()?;
    if format != FORMAT {
        return Err(format!("unknown batch format {format}"));
    }
    let current = r.i64()?;
    let compacted = match r.u8()? {
        0 => None,
        1 => Some(r.i64()?),
        other => return Err(format!("bad compaction flag {other}")),
    };
    // Flag, five integers and two lengths.
    let n = r.len(49)?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        let tombstone = match r.u8()? {
            0 => false,
            TOMBSTONE => true,
            other => return Err(format!("bad record flag {other}")),
        };
        let main = r.i64()?;
        let sub = r.i64()?;
        let create_revision = r.i64()?;
        let version = r.i64()?;
        let lease = r.i64()?;
        let key = r.bytes()?.into();
        let value = r.bytes()?.to_vec();
        records.push(Arc::new(Record {
            key,
            rev: Revision { main, sub },
            create_revision,
            version,
            lease,
            value,
            tombstone,
        }));
    }
    let n = r.len(16)?;
    let mut removed = Vec::with_capacity(n);
    for _ in 0..n {
        let main = r.i64()?;
        let sub = r.i64()?;
        removed.push(Revision { main, sub });
    }
    let n = r.len(16)?;
    let mut lease_put = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.i64()?;
        let ttl = r.i64()?;
        lease_put.push((id, ttl));
    }
    let n = r.len(8)?;
    let mut lease_del = Vec::with_capacity(n);
    for _ in 0..n {
        lease_del.push(r.i64()?);
    }
    if r.pos != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - r.pos));
    }
    Ok(Batch {
        records,
        removed,
        lease_put,
        lease_del,
        compacted,
        current,
    })
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    // Keys and values are bounded by the request limits, far below 4 GiB.
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or_else(|| format!("truncated at byte {}", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn i64(&mut self) -> Result<i64, String> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(b))
    }

    /// A count of items at least `min_size` bytes each: checked against what is left, so
    /// a damaged count cannot make us allocate gigabytes.
    fn len(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_size) > self.bytes.len() - self.pos {
            return Err(format!("count {n} exceeds the record at byte {}", self.pos));
        }
        Ok(n)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Batch {
        let rec = |key: &str, main, sub, tombstone| {
            Arc::new(Record {
                key: key.as_bytes().into(),
                rev: Revision { main, sub },
                create_revision: if tombstone { 0 } else { 2 },
                version: if tombstone { 0 } else { 3 },
                lease: if tombstone { 0 } else { 77 },
                value: if tombstone {
                    Vec::new()
                } else {
                    vec![0, 1, 2, 255]
                },
                tombstone,
            })
        };
        Batch {
            records: vec![rec("a", 5, 0, false), rec("b", 5, 1, true)],
            removed: vec![Revision { main: 2, sub: 0 }],
            lease_put: vec![(77, 30)],
            lease_del: vec![12],
            compacted: Some(3),
            current: 5,
        }
    }

    #[test]
    fn round_trip() {
        let batch = sample();
        let mut buf = Vec::new();
        encode(&batch, &mut buf);
        let back = decode(&buf).expect("decodes");
        assert_eq!(format!("{back:?}"), format!("{batch:?}"));
    }

    #[test]
    fn damaged_input_is_an_error() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        for cut in 0..buf.len() {
            assert!(
                decode(&buf[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        buf.push(0);
        assert!(decode(&buf).is_err(), "trailing byte accepted");
    }
}
