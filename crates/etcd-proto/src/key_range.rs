//! etcd's key ranges: which keys a request's `key` and `range_end` name.
//!
//! etcd reads the pair the same way in Range, DeleteRange, Txn compares and Watch:
//!
//! * an empty `range_end` names the single key `key`;
//! * `range_end == "\0"` names every key `>= key`;
//! * otherwise it is the half-open range `[key, range_end)`, empty when
//!   `key >= range_end`.
//!
//! A prefix is the range from the prefix to its [`prefix_end`]. The server, the
//! mirror and the proof all read ranges through this one type, so the rules
//! live in one place; the proof stays an independent check through its own
//! literal test vectors, not through a second copy of the code.

use std::fmt;
use std::ops::Bound;

/// A key range as etcd reads `key` and `range_end` (see the [module docs](self)).
///
/// ```
/// use etcd_proto::key_range::KeyRange;
/// let r = KeyRange::prefix(b"/app/");
/// assert!(r.contains(b"/app/x"));
/// assert!(!r.contains(b"/app0"));
/// assert_eq!((r.key(), r.range_end()), (&b"/app/"[..], &b"/app0"[..]));
/// assert!(KeyRange::all().contains(b"anything"));
/// assert!(KeyRange::single(b"k").contains(b"k"));
/// assert!(KeyRange::new(b"b", b"a").is_empty());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyRange {
    key: Vec<u8>,
    range_end: Vec<u8>,
}

/// Bounds for a `BTreeMap` range over keys, from [`KeyRange::bounds`].
pub type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

impl KeyRange {
    /// The range etcd reads from `key` and `range_end`.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        Self {
            key: key.to_vec(),
            range_end: range_end.to_vec(),
        }
    }

    /// The single key `key` (an empty `range_end`).
    pub fn single(key: &[u8]) -> Self {
        Self::new(key, b"")
    }

    /// Every key starting with `prefix`; the empty prefix means every key.
    pub fn prefix(prefix: &[u8]) -> Self {
        if prefix.is_empty() {
            return Self::all();
        }
        Self {
            key: prefix.to_vec(),
            range_end: prefix_end(prefix),
        }
    }

    /// Every key: `key = "\0"`, `range_end = "\0"`, as etcd clients send it (etcd
    /// refuses an empty `key`).
    pub fn all() -> Self {
        Self::new(b"\0", b"\0")
    }

    /// etcd's `key`: the first key of the range.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// etcd's `range_end`, as given.
    pub fn range_end(&self) -> &[u8] {
        &self.range_end
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self.range_end.as_slice() {
            [] => key == self.key,
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        }
    }

    /// Whether the range names no key at all (`key >= range_end`, with a
    /// `range_end` other than `""` and `"\0"`).
    pub fn is_empty(&self) -> bool {
        self.bounds().is_none()
    }

    /// The range as bounds over ordered keys; `None` when it [is
    /// empty](Self::is_empty) (a `BTreeMap` range would panic on such bounds).
    pub fn bounds(&self) -> Option<KeyBounds<'_>> {
        let key = Bound::Included(self.key.as_slice());
        match self.range_end.as_slice() {
            [] => Some((key, key)),
            [0] => Some((key, Bound::Unbounded)),
            end if self.key.as_slice() < end => Some((key, Bound::Excluded(end))),
            _ => None,
        }
    }
}

/// The `range_end` that covers every key starting with `prefix`: the prefix with
/// trailing 0xff bytes dropped and its last byte incremented; `"\0"` (no upper
/// bound) for an empty or all-0xff prefix.
///
/// ```
/// use etcd_proto::key_range::prefix_end;
/// assert_eq!(prefix_end(b"a/"), b"a0");
/// assert_eq!(prefix_end(b"a\xff"), b"b");
/// assert_eq!(prefix_end(b"\xff\xff"), b"\0");
/// assert_eq!(prefix_end(b""), b"\0");
/// ```
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `[key, range_end)`, bytes escaped and cut to 64 each.
impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", Escaped(&self.key), Escaped(&self.range_end))
    }
}

/// Bytes as ASCII with escapes, cut to 64 bytes.
struct Escaped<'a>(&'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 64;
        let cut = &self.0[..self.0.len().min(MAX)];
        write!(f, "{}", cut.escape_ascii())?;
        if self.0.len() > MAX {
            f.write_str("…")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_etcd() {
        let single = KeyRange::single(b"k");
        assert!(single.contains(b"k") && !single.contains(b"k2") && !single.contains(b"j"));
        let from = KeyRange::new(b"b", b"\0");
        assert!(from.contains(b"zzz") && from.contains(b"b") && !from.contains(b"a"));
        let r = KeyRange::new(b"b", b"d");
        assert!(r.contains(b"b") && r.contains(b"c") && !r.contains(b"d"));
        assert!(KeyRange::prefix(b"\xff").contains(b"\xff\x01"));
        assert_eq!(KeyRange::prefix(b""), KeyRange::all());
        let backwards = KeyRange::new(b"b", b"a");
        assert!(!backwards.contains(b"b") && !backwards.contains(b"a"));
    }

    #[test]
    fn bounds_match_contains() {
        use Bound::{Excluded, Included, Unbounded};
        let k: &[u8] = b"k";
        assert_eq!(
            KeyRange::single(k).bounds(),
            Some((Included(k), Included(k)))
        );
        assert_eq!(
            KeyRange::new(k, b"\0").bounds(),
            Some((Included(k), Unbounded))
        );
        let end: &[u8] = b"m";
        assert_eq!(
            KeyRange::new(k, end).bounds(),
            Some((Included(k), Excluded(end)))
        );
        for empty in [KeyRange::new(k, k), KeyRange::new(k, b"a")] {
            assert!(empty.is_empty(), "{empty:?}");
        }
        assert!(!KeyRange::single(b"").is_empty() && !KeyRange::all().is_empty());
    }

    #[test]
    fn debug_shows_the_pair_escaped() {
        let r = KeyRange::new(b"/a\xff", b"\0");
        assert_eq!(format!("{r:?}"), r"[/a\xff, \x00)");
        let long = KeyRange::single(&[b'x'; 70]);
        assert_eq!(format!("{long:?}"), format!("[{}…, )", "x".repeat(64)));
    }
}
