//! `GET /v1/mirror/digest`: the state of serve's mirror as `revwatch verify --url`
//! compares it with etcd: its revision, its digest ([`revwatch::mirror::Digest`]),
//! and with `?keys=true` each key's fields and digest, so that drift can name the
//! keys. Values are never sent, only their sizes and digests.
//!
//! The body's types serve both ends: serve writes them, verify reads them.

use base64::Engine;
use revwatch::mirror::{Digest, DigestEntry, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::ApiError;

/// The body of `GET /v1/mirror/digest`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorDigest {
    /// The key prefix mirrored.
    pub prefix: String,
    /// The revision of the state described.
    pub revision: i64,
    /// The mirror's state (`ready`, `stale`, ...), for the record.
    pub state: String,
    /// How many keys the state holds.
    pub keys: usize,
    /// The digest of the state: 64 lowercase hex digits.
    pub digest: String,
    /// Every key, in key order; only when asked for (`?keys=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<KeyDigest>>,
}

/// One key of a [`MirrorDigest`], and of whatever `verify` compares with etcd: the
/// key's fields, and of its value only the size and the key's digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDigest {
    /// In JSON, a string when the key is UTF-8, else `{"base64": "..."}`.
    #[serde(with = "key_json")]
    pub key: Vec<u8>,
    /// The size of the value, in bytes.
    pub value_bytes: u64,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
    /// [`key_digest`] of the key: with its fields above, tells whether a value of
    /// the same key elsewhere is equal to this one.
    pub digest: String,
}

impl KeyDigest {
    /// The description of `entry`.
    pub fn of(entry: DigestEntry<'_>) -> KeyDigest {
        KeyDigest {
            key: entry.key.to_vec(),
            value_bytes: entry.value.len() as u64,
            create_revision: entry.create_revision,
            mod_revision: entry.mod_revision,
            version: entry.version,
            lease: entry.lease,
            digest: key_digest(entry),
        }
    }

    /// Whether `value` is this key's value: the same size, and this key's digest
    /// when `value` takes the place of its own.
    pub fn has_value(&self, value: &[u8]) -> bool {
        self.value_bytes == value.len() as u64
            && key_digest(DigestEntry {
                key: &self.key,
                value,
                create_revision: self.create_revision,
                mod_revision: self.mod_revision,
                version: self.version,
                lease: self.lease,
            }) == self.digest
    }
}

/// A key in JSON as [`crate::render::bytes_json`] writes it.
mod key_json {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    use crate::render;

    pub fn serialize<S: Serializer>(key: &[u8], s: S) -> Result<S::Ok, S::Error> {
        render::bytes_json(key).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let json = Value::deserialize(d)?;
        super::key_bytes(&json)
            .ok_or_else(|| D::Error::custom("a key is a string or {\"base64\": \"...\"}"))
    }
}

/// The digest of one key alone (the digest of a state holding only it), as 64
/// lowercase hex digits.
pub fn key_digest(entry: DigestEntry<'_>) -> String {
    Digest::of_entry(entry).to_string()
}

/// Whether `text` reads as a digest: 64 lowercase hex digits.
pub fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A key's bytes from its JSON (the inverse of [`crate::render::bytes_json`]).
fn key_bytes(key: &Value) -> Option<Vec<u8>> {
    match key {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Object(o) if o.len() == 1 => {
            let text = o.get("base64")?.as_str()?;
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        }
        _ => None,
    }
}

/// Whether the query string asks for the keys: none, `keys=true` or `keys=false`.
pub fn wants_keys(query: Option<&str>) -> Result<bool, ApiError> {
    let mut keys = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        keys = match pair {
            "keys=true" => true,
            "keys=false" => false,
            _ => {
                return Err(ApiError::malformed(format!(
                    "unknown query parameter {pair:?}: the only one is keys=true|false"
                )));
            }
        };
    }
    Ok(keys)
}

/// The body describing `snapshot`, a state of `prefix`, with its keys if `with_keys`.
pub fn describe<T>(
    snapshot: &Snapshot<T>,
    prefix: &str,
    state: String,
    with_keys: bool,
) -> MirrorDigest {
    let entries = with_keys.then(|| {
        snapshot
            .iter()
            .map(|(key, entry)| KeyDigest::of(DigestEntry::of_snapshot_entry(key, entry)))
            .collect()
    });
    MirrorDigest {
        prefix: prefix.to_owned(),
        revision: snapshot.revision(),
        state,
        keys: snapshot.len(),
        digest: snapshot.digest().to_string(),
        entries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render;
    use revwatch::mirror::DigestBuilder;

    #[test]
    fn keys_read_back_from_their_json() {
        for key in [&b"/p/a"[..], b"", b"\xff\x00k"] {
            assert_eq!(key_bytes(&render::bytes_json(key)).as_deref(), Some(key));
        }
        assert_eq!(key_bytes(&serde_json::json!({"base64": "!"})), None);
        assert_eq!(key_bytes(&serde_json::json!(7)), None);
    }

    #[test]
    fn a_key_digest_reads_back_from_its_json_and_a_bad_key_is_refused() {
        for key in [&b"/p/a"[..], b"\xff\x00k"] {
            let entry = DigestEntry {
                key,
                value: b"v",
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                lease: 0,
            };
            let described = KeyDigest::of(entry);
            let json = serde_json::to_value(&described).expect("serializable");
            assert_eq!(json["key"], render::bytes_json(key));
            let read: KeyDigest = serde_json::from_value(json).expect("reads back");
            assert_eq!(read, described);
            assert!(read.has_value(b"v") && !read.has_value(b"w"));
        }
        let mut json = serde_json::to_value(KeyDigest::of(DigestEntry {
            key: b"k",
            value: b"",
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        }))
        .expect("serializable");
        json["key"] = serde_json::json!(7);
        let refused = serde_json::from_value::<KeyDigest>(json).expect_err("a number key");
        assert!(
            refused.to_string().contains("a key is a string"),
            "{refused}"
        );
    }

    #[test]
    fn the_query_asks_for_keys_or_is_refused() {
        assert_eq!(wants_keys(None).ok(), Some(false));
        assert_eq!(wants_keys(Some("keys=true")).ok(), Some(true));
        assert_eq!(wants_keys(Some("keys=false")).ok(), Some(false));
        for bad in ["keys=1", "key=true", "keys=true&x=y"] {
            let e = wants_keys(Some(bad)).expect_err(bad);
            assert_eq!((e.status.as_u16(), e.error), (400, "malformed_request"));
        }
    }

    #[test]
    fn a_key_digest_is_the_digest_of_a_state_of_that_key_alone() {
        let entry = DigestEntry {
            key: b"/p/a",
            value: b"v",
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            lease: 0,
        };
        let mut builder = DigestBuilder::new();
        builder.push(entry).expect("in order");
        let digest = key_digest(entry);
        assert_eq!(digest, builder.finish().to_string());
        assert!(is_digest(&digest));
        assert!(!is_digest(&digest.to_uppercase()));
        assert!(!is_digest(&digest[1..]));
    }
}
