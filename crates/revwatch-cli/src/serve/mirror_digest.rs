//! `GET /v1/mirror/digest`: the state of serve's mirror as `revwatch verify --url`
//! compares it with etcd: its revision, its digest ([`revwatch::mirror::digest`]),
//! and with `?keys=true` each key's fields and digest, so that drift can name the
//! keys. Values are never sent, only their sizes and digests.
//!
//! The body's types serve both ends: serve writes them, verify reads them.

use base64::Engine;
use revwatch::mirror::{DigestBuilder, DigestEntry, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::ApiError;
use crate::render;

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

/// One key of a [`MirrorDigest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDigest {
    /// A string when the key is UTF-8, else `{"base64": "..."}`.
    pub key: Value,
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

/// The digest of one key alone (the digest of a state holding only it), as 64
/// lowercase hex digits.
pub fn key_digest(entry: DigestEntry<'_>) -> String {
    let mut builder = DigestBuilder::new();
    // Only a key after another can be out of order: the first one never is.
    match builder.push(entry) {
        Ok(()) => builder.finish().to_string(),
        Err(e) => unreachable!("the first key of a digest was refused: {e}"),
    }
}

/// Whether `text` reads as a digest: 64 lowercase hex digits.
pub fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The key of a [`KeyDigest`] as bytes (the inverse of [`render::bytes_json`]).
pub fn key_bytes(key: &Value) -> Option<Vec<u8>> {
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
            .map(|(key, entry)| KeyDigest {
                key: render::bytes_json(key),
                value_bytes: entry.raw.len() as u64,
                create_revision: entry.create_revision,
                mod_revision: entry.mod_revision,
                version: entry.version,
                lease: entry.lease,
                digest: key_digest(DigestEntry::of_snapshot_entry(key, entry)),
            })
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

    #[test]
    fn keys_read_back_from_their_json() {
        for key in [&b"/p/a"[..], b"", b"\xff\x00k"] {
            assert_eq!(key_bytes(&render::bytes_json(key)).as_deref(), Some(key));
        }
        assert_eq!(key_bytes(&serde_json::json!({"base64": "!"})), None);
        assert_eq!(key_bytes(&serde_json::json!(7)), None);
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
