//! An order-independent hash of a key-value state with O(1) updates.
//!
//! Each entry `(key, value, create_revision, mod_revision, version, lease)`
//! is hashed on its own with a keyed 64-bit hash; the state's hash is the
//! wrapping sum of its entries' hashes. Adding, removing or replacing one
//! entry is one addition or subtraction, so a checker can follow a state
//! revision by revision and compare it with a snapshot's hash at any point.
//! The hash is deterministic (same in every process and run), which keeps
//! failing runs replayable. It is not meant to resist adversarial inputs.

use crate::history::Entry;

/// Key of the hash (hex digits of pi): fixed, so hashes are reproducible.
const KEY: u64 = 0x243f_6a88_85a3_08d3;

/// The splitmix64 finalizer: a bijection with full avalanche.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A chained hash over 64-bit words: `h = mix(h ^ w) + KEY`.
struct Words(u64);

impl Words {
    fn word(&mut self, w: u64) {
        self.0 = mix(self.0 ^ w).wrapping_add(KEY);
    }

    /// Length first, so that `("ab", "c")` and `("a", "bc")` differ.
    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.word(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u64::from_le_bytes(w));
        }
    }
}

/// Hash of one key and its entry.
///
/// ```
/// use revwatch_proof::hash::entry_hash;
/// use revwatch_proof::history::Entry;
/// let e = Entry { value: b"v".to_vec(), create_revision: 2, mod_revision: 2, version: 1, lease: 0 };
/// let bumped = Entry { version: 2, ..e.clone() };
/// assert_ne!(entry_hash(b"k", &e), entry_hash(b"k", &bumped));
/// ```
pub fn entry_hash(key: &[u8], entry: &Entry) -> u64 {
    let mut h = Words(KEY);
    h.bytes(key);
    h.bytes(&entry.value);
    // Revisions, versions and lease ids are non-negative in etcd; the cast
    // only needs to be injective.
    h.word(entry.create_revision as u64);
    h.word(entry.mod_revision as u64);
    h.word(entry.version as u64);
    h.word(entry.lease as u64);
    mix(h.0)
}

/// The order-independent hash of a set of entries: the wrapping sum of
/// their [`entry_hash`]es. The empty state hashes to 0.
///
/// ```
/// use revwatch_proof::hash::StateHash;
/// let mut a = StateHash::default();
/// a.add(7);
/// a.add(9);
/// let mut b = StateHash::default();
/// b.add(9);
/// b.add(7);
/// assert_eq!(a, b);
/// b.remove(9);
/// b.remove(7);
/// assert_eq!(b.value(), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct StateHash(u64);

impl StateHash {
    /// Adds an entry's hash.
    pub fn add(&mut self, entry_hash: u64) {
        self.0 = self.0.wrapping_add(entry_hash);
    }

    /// Removes an entry's hash (which must have been added).
    pub fn remove(&mut self, entry_hash: u64) {
        self.0 = self.0.wrapping_sub(entry_hash);
    }

    /// The hash value.
    pub fn value(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: &[u8]) -> Entry {
        Entry {
            value: value.to_vec(),
            create_revision: 5,
            mod_revision: 6,
            version: 2,
            lease: 0,
        }
    }

    #[test]
    fn every_field_matters() {
        let base = entry(b"v");
        let h = entry_hash(b"k", &base);
        assert_ne!(h, entry_hash(b"k2", &base));
        assert_ne!(h, entry_hash(b"k", &entry(b"w")));
        for changed in [
            Entry {
                create_revision: 4,
                ..base.clone()
            },
            Entry {
                mod_revision: 7,
                ..base.clone()
            },
            Entry {
                version: 3,
                ..base.clone()
            },
            Entry {
                lease: 1,
                ..base.clone()
            },
        ] {
            assert_ne!(h, entry_hash(b"k", &changed));
        }
    }

    #[test]
    fn key_value_boundary_matters() {
        assert_ne!(
            entry_hash(b"ab", &entry(b"c")),
            entry_hash(b"a", &entry(b"bc"))
        );
        assert_ne!(
            entry_hash(b"k", &entry(b"")),
            entry_hash(b"k", &entry(b"\0"))
        );
    }
}
