//! etcd key ranges (`key`, `range_end`) with etcd's conventions.

use std::fmt;

/// A key range as etcd reads `key` and `range_end`:
///
/// * an empty `end` means the single key `start`;
/// * `end == "\0"` means every key `>= start`;
/// * otherwise the half-open range `[start, end)`.
///
/// ```
/// use revwatch_proof::keys::KeyRange;
/// let r = KeyRange::prefix(b"/app/");
/// assert!(r.contains(b"/app/x"));
/// assert!(!r.contains(b"/app0"));
/// assert!(KeyRange::all().contains(b"anything"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct KeyRange {
    /// First key (etcd's `key`).
    pub start: Vec<u8>,
    /// etcd's `range_end`.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The single key `key`.
    pub fn single(key: &[u8]) -> Self {
        Self {
            start: key.to_vec(),
            end: Vec::new(),
        }
    }

    /// Every key starting with `prefix`; the empty prefix means every key.
    pub fn prefix(prefix: &[u8]) -> Self {
        if prefix.is_empty() {
            return Self::all();
        }
        Self {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Every key (etcd's `key = "\0", range_end = "\0"`).
    pub fn all() -> Self {
        Self {
            start: vec![0],
            end: vec![0],
        }
    }

    /// The half-open range `[start, end)`.
    pub fn between(start: &[u8], end: &[u8]) -> Self {
        Self {
            start: start.to_vec(),
            end: end.to_vec(),
        }
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.end.is_empty() {
            key == self.start.as_slice()
        } else if self.end == [0] {
            key >= self.start.as_slice()
        } else {
            key >= self.start.as_slice() && key < self.end.as_slice()
        }
    }
}

/// etcd's range end for a prefix: drop trailing 0xff bytes, then increment
/// the last byte. An all-0xff (or empty) prefix gives `"\0"` (no upper bound).
/// Kept apart from the mirror's own `prefix_range_end` on purpose: the ground
/// truth does not reuse the code it checks.
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

/// Renders bytes for humans: UTF-8 where printable, `\xNN` escapes otherwise,
/// cut to `max` bytes.
pub fn show(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s: String = cut.escape_ascii().to_string();
    if bytes.len() > max {
        s.push('…');
    }
    s
}

impl fmt::Debug for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", show(&self.start, 64), show(&self.end, 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"/a"), b"/b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn ranges_follow_etcd() {
        assert!(KeyRange::single(b"k").contains(b"k"));
        assert!(!KeyRange::single(b"k").contains(b"k2"));
        let from = KeyRange::between(b"b", b"\0");
        assert!(from.contains(b"zzz") && from.contains(b"b") && !from.contains(b"a"));
        let r = KeyRange::between(b"b", b"d");
        assert!(r.contains(b"c") && !r.contains(b"d"));
        assert!(KeyRange::prefix(b"\xff").contains(b"\xff\x01"));
    }
}
