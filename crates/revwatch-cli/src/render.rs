//! How `tail` prints a delivered batch: one human-readable block, or one JSON line.

use base64::Engine;
use revwatch::mirror::{Batch, ChangeKind, Snapshot};
use serde_json::{Value, json};

/// Bytes as a JSON string when they are UTF-8, else `{"base64": "..."}`.
pub fn bytes_json(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => json!({ "base64": base64::engine::general_purpose::STANDARD.encode(b) }),
    }
}

/// Bytes for a terminal: quoted UTF-8 cut to `max` characters, or `base64:...`.
pub fn bytes_human(b: &[u8], max: usize) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().count() > max => {
            format!("{:?}…", s.chars().take(max).collect::<String>())
        }
        Ok(s) => format!("{s:?}"),
        Err(_) => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        ),
    }
}

/// One printable change, shared by both formats.
struct Line<'a> {
    key: &'a [u8],
    put: Option<(&'a [u8], i64, i64, i64)>, // value, create, mod, version
}

fn batch_lines<T>(batch: &Batch<T>) -> impl Iterator<Item = Line<'_>> {
    batch.changes.iter().map(|c| Line {
        key: &c.key,
        put: match &c.kind {
            ChangeKind::Put { entry, .. } => Some((
                &entry.raw[..],
                entry.create_revision,
                entry.mod_revision,
                entry.version,
            )),
            ChangeKind::Delete { .. } => None,
        },
    })
}

fn snapshot_lines<T>(snap: &Snapshot<T>) -> impl Iterator<Item = Line<'_>> {
    snap.iter().map(|(k, e)| Line {
        key: k,
        put: Some((&e.raw[..], e.create_revision, e.mod_revision, e.version)),
    })
}

fn json_line<'a>(revision: i64, resync: bool, lines: impl Iterator<Item = Line<'a>>) -> String {
    let changes: Vec<Value> = lines
        .map(|l| match l.put {
            Some((value, create, modr, version)) => json!({
                "key": bytes_json(l.key), "type": "put", "value": bytes_json(value),
                "create_revision": create, "mod_revision": modr, "version": version,
            }),
            None => json!({
                "key": bytes_json(l.key), "type": "delete", "value": Value::Null,
                "create_revision": 0, "mod_revision": revision, "version": 0,
            }),
        })
        .collect();
    json!({ "revision": revision, "resync": resync, "changes": changes }).to_string()
}

fn human<'a>(
    revision: i64,
    header: Option<String>,
    lines: impl Iterator<Item = Line<'a>>,
) -> String {
    let mut out = String::new();
    if let Some(h) = header {
        out.push_str(&format!("=== resync at revision {revision}: {h} ===\n"));
    }
    for l in lines {
        match l.put {
            Some((value, _, _, version)) => out.push_str(&format!(
                "{revision:>8}  PUT  {} = {}  (v{version})\n",
                bytes_human(l.key, 200),
                bytes_human(value, 60)
            )),
            None => out.push_str(&format!(
                "{revision:>8}  DEL  {}\n",
                bytes_human(l.key, 200)
            )),
        }
    }
    out
}

/// A batch in the chosen format (each line ends with a newline).
pub fn batch<T>(b: &Batch<T>, as_json: bool) -> String {
    if as_json {
        return json_line(b.revision, b.is_resync(), batch_lines(b)) + "\n";
    }
    let header = b
        .resync
        .map(|r| format!("{} ({} changes)", r.as_str(), b.changes.len()));
    human(b.revision, header, batch_lines(b))
}

/// The state a subscription starts from, printed as a resync of every key.
pub fn snapshot<T>(s: &Snapshot<T>, as_json: bool) -> String {
    if as_json {
        return json_line(s.revision(), true, snapshot_lines(s)) + "\n";
    }
    human(
        s.revision(),
        Some(format!("current state ({} keys)", s.len())),
        snapshot_lines(s),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_is_a_string_and_binary_is_marked_base64() {
        assert_eq!(bytes_json(b"/a"), json!("/a"));
        assert_eq!(bytes_json(&[0xff, 0x00]), json!({ "base64": "/wA=" }));
        assert_eq!(bytes_human(&[0xff], 10), "base64:/w==");
        assert_eq!(bytes_human(b"abcdef", 3), "\"abc\"…");
    }
}
