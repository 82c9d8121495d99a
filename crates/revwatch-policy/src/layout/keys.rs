//! The etcd keys of the layout, built from the mirrored prefix.

/// Name of the reserved subtree directly under the prefix.
pub const RESERVED_DIR: &str = ".revwatch";

/// Name of a generation's lock key, directly under the generation.
pub const LOCK_NAME: &str = ".lock";

/// Longest generation id accepted in the pointer.
pub const MAX_GENERATION_LEN: usize = 64;

/// The keys of the layout under one prefix `P`:
///
/// | key | holds |
/// |---|---|
/// | `P.revwatch/active` | the active generation id (the pointer) |
/// | `P.revwatch/previous` | the generation active before it (kept by garbage collection) |
/// | `P.revwatch/gen/G/.lock` | present (with a lease) while generation `G` is being written |
/// | `P.revwatch/gen/G/<path>` | file `<path>` of generation `G` |
/// | `P<path>` | file `<path>` when there is no pointer (direct mode) |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: Vec<u8>,
}

impl Layout {
    /// The layout under `prefix` (usually ending in `/`).
    pub fn new(prefix: impl Into<Vec<u8>>) -> Self {
        Layout {
            prefix: prefix.into(),
        }
    }

    /// The prefix `P`.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }

    /// `P.revwatch/`: every key of the protocol starts with it.
    pub fn reserved(&self) -> Vec<u8> {
        self.key(&[RESERVED_DIR.as_bytes(), b"/"])
    }

    /// `P.revwatch/active`, the pointer to the active generation.
    pub fn pointer(&self) -> Vec<u8> {
        self.key(&[RESERVED_DIR.as_bytes(), b"/active"])
    }

    /// `P.revwatch/previous`, the generation the last publish replaced.
    pub fn previous(&self) -> Vec<u8> {
        self.key(&[RESERVED_DIR.as_bytes(), b"/previous"])
    }

    /// `P.revwatch/gen/`, under which every generation lives.
    pub fn generations(&self) -> Vec<u8> {
        self.key(&[RESERVED_DIR.as_bytes(), b"/gen/"])
    }

    /// `P.revwatch/gen/G/`.
    pub fn generation(&self, id: impl AsRef<[u8]>) -> Vec<u8> {
        self.key(&[RESERVED_DIR.as_bytes(), b"/gen/", id.as_ref(), b"/"])
    }

    /// `P.revwatch/gen/G/.lock`.
    pub fn lock(&self, id: impl AsRef<[u8]>) -> Vec<u8> {
        let mut key = self.generation(id);
        key.extend_from_slice(LOCK_NAME.as_bytes());
        key
    }

    /// The key of file `path`: in generation `id`, or directly under the prefix.
    pub fn file(&self, generation: Option<&str>, path: &str) -> Vec<u8> {
        let mut key = match generation {
            Some(id) => self.generation(id),
            None => self.prefix.clone(),
        };
        key.extend_from_slice(path.as_bytes());
        key
    }

    /// The generation id of a key under [`generations`](Self::generations), if any.
    pub fn generation_of<'k>(&self, key: &'k [u8]) -> Option<&'k [u8]> {
        let rest = key.strip_prefix(self.generations().as_slice())?;
        let end = rest.iter().position(|&b| b == b'/')?;
        Some(&rest[..end])
    }
}

/// Checks a generation id: 1 to [`MAX_GENERATION_LEN`] ASCII letters, digits,
/// `-`, `_` or `.`, not starting with `.`. Returns why not.
pub fn check_generation(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty");
    }
    if id.len() > MAX_GENERATION_LEN {
        return Err("longer than 64 bytes");
    }
    if id.starts_with('.') {
        return Err("starts with '.'");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_the_layout() {
        let l = Layout::new("p/");
        assert_eq!(l.reserved(), b"p/.revwatch/");
        assert_eq!(l.pointer(), b"p/.revwatch/active");
        assert_eq!(l.previous(), b"p/.revwatch/previous");
        assert_eq!(l.generations(), b"p/.revwatch/gen/");
        assert_eq!(l.generation("g1"), b"p/.revwatch/gen/g1/");
        assert_eq!(l.lock("g1"), b"p/.revwatch/gen/g1/.lock");
        assert_eq!(
            l.file(Some("g1"), "a/b.cedar"),
            b"p/.revwatch/gen/g1/a/b.cedar"
        );
        assert_eq!(l.file(None, "a/b.cedar"), b"p/a/b.cedar");
    }

    #[test]
    fn generation_of_a_key() {
        let l = Layout::new("p/");
        assert_eq!(l.generation_of(b"p/.revwatch/gen/g1/a"), Some(&b"g1"[..]));
        assert_eq!(
            l.generation_of(b"p/.revwatch/gen/g1/.lock"),
            Some(&b"g1"[..])
        );
        assert_eq!(l.generation_of(b"p/.revwatch/gen/g1"), None);
        assert_eq!(l.generation_of(b"p/.revwatch/active"), None);
        assert_eq!(l.generation_of(b"q/.revwatch/gen/g1/a"), None);
    }

    #[test]
    fn generation_ids() {
        assert!(check_generation("18c2f0a1b2c-7a3f").is_ok());
        assert!(check_generation("v1.2_x").is_ok());
        assert_eq!(check_generation(""), Err("empty"));
        assert!(check_generation(".hidden").is_err());
        assert!(check_generation("a/b").is_err());
        assert!(check_generation("a b").is_err());
        assert!(check_generation("é").is_err());
        assert!(check_generation(&"x".repeat(65)).is_err());
        assert!(check_generation(&"x".repeat(64)).is_ok());
    }
}
