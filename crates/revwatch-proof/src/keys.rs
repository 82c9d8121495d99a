//! etcd key ranges (`key`, `range_end`) with etcd's conventions, and rendering keys
//! for humans.
//!
//! [`KeyRange`] is the protocol crate's, the one the server and the mirror read ranges
//! with: the proof checks the mirror's deliveries, not etcd's range rules, and keeps
//! those rules honest with the literal expectations below instead of a second copy.
//!
//! ```
//! use revwatch_proof::keys::KeyRange;
//! let r = KeyRange::prefix(b"/app/");
//! assert!(r.contains(b"/app/x"));
//! assert!(!r.contains(b"/app0"));
//! assert!(KeyRange::all().contains(b"anything"));
//! ```

pub use etcd_proto::key_range::KeyRange;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix ranges the mirror and the truth recorder watch, as etcd spells them:
    /// written out here so the proof does not take the shared code's word for it.
    #[test]
    fn prefix_ranges_follow_etcd() {
        let pair = |p: &[u8]| {
            let r = KeyRange::prefix(p);
            (r.key().to_vec(), r.range_end().to_vec())
        };
        assert_eq!(pair(b"/a"), (b"/a".to_vec(), b"/b".to_vec()));
        assert_eq!(pair(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(pair(b"\xff\xff"), (b"\xff\xff".to_vec(), b"\0".to_vec()));
        assert_eq!(pair(b""), (b"\0".to_vec(), b"\0".to_vec()));
    }

    #[test]
    fn show_escapes_and_cuts() {
        assert_eq!(show(b"/a\xff", 8), "/a\\xff");
        assert_eq!(show(b"abcdef", 3), "abc…");
    }
}
