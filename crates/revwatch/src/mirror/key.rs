//! The mirror's key type: short keys inline, longer ones shared.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use bytes::Bytes;

/// Longest key stored inline. With the length byte and the enum's tag this keeps a
/// [`Key`] at 32 bytes, the size of a `Bytes`.
const INLINE: usize = 30;

/// An etcd key in a [`Snapshot`](super::Snapshot), a [`Change`](super::Change) or a
/// [`DecodeFailure`](super::DecodeFailure): immutable bytes, cheap to clone.
///
/// Keys up to 30 bytes are stored inline, in the snapshot's tree nodes themselves,
/// so that looking one up compares bytes already in cache and copying a node to
/// publish a revision copies them with it; longer keys are shared behind a
/// reference count. Either way it compares, orders and hashes as its bytes, and
/// derefs to `[u8]`:
///
/// ```
/// use revwatch::mirror::Key;
///
/// let k = Key::from("config/feature-x");
/// assert_eq!(k, b"config/feature-x"[..]);
/// assert!(k.starts_with(b"config/"));
/// assert!(Key::from("a") < Key::from("b"));
/// ```
#[derive(Clone)]
pub struct Key(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Shared(Arc<[u8]>),
}

impl Key {
    /// A key holding a copy of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        if bytes.len() <= INLINE {
            let mut buf = [0; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Key(Repr::Inline {
                len: bytes.len() as u8,
                buf,
            })
        } else {
            Key(Repr::Shared(Arc::from(bytes)))
        }
    }

    /// The key's bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..*len as usize],
            Repr::Shared(b) => b,
        }
    }

    /// The key as `Bytes` (a copy).
    pub fn to_bytes(&self) -> Bytes {
        Bytes::copy_from_slice(self.as_bytes())
    }
}

impl Deref for Key {
    type Target = [u8];

    #[inline]
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for Key {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Consistent with `[u8]`'s order, equality and hash, so maps keyed by `Key` can be
/// searched with a byte slice.
impl Borrow<[u8]> for Key {
    #[inline]
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for Key {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    #[inline]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq<[u8]> for Key {
    fn eq(&self, other: &[u8]) -> bool {
        self.as_bytes() == other
    }
}

impl PartialEq<&[u8]> for Key {
    fn eq(&self, other: &&[u8]) -> bool {
        self.as_bytes() == *other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Key {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.as_bytes() == other
    }
}

impl PartialEq<Vec<u8>> for Key {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.as_bytes() == other.as_slice()
    }
}

impl PartialEq<Bytes> for Key {
    fn eq(&self, other: &Bytes) -> bool {
        self.as_bytes() == other.as_ref()
    }
}

impl PartialEq<str> for Key {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl From<&[u8]> for Key {
    fn from(bytes: &[u8]) -> Self {
        Key::new(bytes)
    }
}

impl From<Vec<u8>> for Key {
    fn from(bytes: Vec<u8>) -> Self {
        if bytes.len() <= INLINE {
            Key::new(&bytes)
        } else {
            Key(Repr::Shared(Arc::from(bytes)))
        }
    }
}

impl From<&str> for Key {
    fn from(s: &str) -> Self {
        Key::new(s.as_bytes())
    }
}

impl From<String> for Key {
    fn from(s: String) -> Self {
        Key::from(s.into_bytes())
    }
}

impl From<&Bytes> for Key {
    fn from(bytes: &Bytes) -> Self {
        Key::new(bytes)
    }
}

impl From<Bytes> for Key {
    fn from(bytes: Bytes) -> Self {
        Key::new(&bytes)
    }
}

impl From<Key> for Bytes {
    fn from(key: Key) -> Bytes {
        key.to_bytes()
    }
}

impl From<Key> for Vec<u8> {
    fn from(key: Key) -> Vec<u8> {
        key.as_bytes().to_vec()
    }
}

/// Exactly as `Bytes` prints: printable ASCII as is, other bytes escaped.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.to_bytes(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn inline_and_shared_keys_behave_as_their_bytes() {
        let lens = [0, 1, INLINE - 1, INLINE, INLINE + 1, 200];
        let mut keys: Vec<Vec<u8>> = lens
            .iter()
            .flat_map(|&n| [vec![b'a'; n], vec![0xff; n]])
            .collect();
        keys.sort();
        keys.dedup();
        for k in &keys {
            for made in [
                Key::new(k),
                Key::from(k.clone()),
                Key::from(Bytes::from(k.clone())),
            ] {
                assert_eq!(made.as_bytes(), k.as_slice());
                assert_eq!(made.to_bytes(), k.as_slice());
                assert_eq!(made.len(), k.len());
                assert_eq!(made, k.as_slice());
            }
        }
        // Order and equality across representations follow the bytes.
        let made: Vec<Key> = keys.iter().map(|k| Key::new(k)).collect();
        assert!(made.windows(2).all(|w| w[0] < w[1]));
        let map: BTreeMap<Key, usize> = made.iter().cloned().zip(0..).collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(map.get(k.as_slice()), Some(&i));
        }
    }

    #[test]
    fn stays_as_small_as_bytes() {
        assert_eq!(std::mem::size_of::<Key>(), std::mem::size_of::<Bytes>());
    }

    #[test]
    fn debug_escapes_like_bytes() {
        assert_eq!(format!("{:?}", Key::from(&b"a\x00\""[..])), r#"b"a\0\"""#);
        assert_eq!(
            format!("{:?}", Key::from(&b"a\x00\""[..])),
            format!("{:?}", Bytes::from_static(b"a\x00\""))
        );
    }
}
