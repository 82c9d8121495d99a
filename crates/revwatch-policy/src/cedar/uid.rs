//! Entity uids of requests, parsed without Cedar's full parser in the common case.
//!
//! Every decision parses three uids (principal, action, resource), and Cedar's
//! general parser costs more than the indexed decision itself. The canonical form
//! `Type::"id"` (an id without quotes or escapes) is split by hand, its type name
//! parsed once per thread and kept; anything else goes to Cedar's parser, so the
//! result and the errors are Cedar's.

use std::cell::RefCell;
use std::collections::HashMap;
use std::str::FromStr;

use cedar_policy::{EntityId, EntityTypeName, EntityUid, ParseErrors};

/// Type names kept per thread: a request names few, but they come from callers.
const MAX_KEPT_TYPES: usize = 256;

thread_local! {
    static TYPES: RefCell<HashMap<String, EntityTypeName>> = RefCell::new(HashMap::new());
}

/// `text` as an entity uid, as `EntityUid::from_str` reads it.
#[allow(
    clippy::result_large_err,
    reason = "the error of `EntityUid::from_str`, which this stands in for"
)]
pub(super) fn parse(text: &str) -> Result<EntityUid, ParseErrors> {
    match canonical(text) {
        Some(uid) => Ok(uid),
        None => EntityUid::from_str(text),
    }
}

/// The uid of a canonical `Type::"id"`, or `None` to leave it to Cedar's parser.
fn canonical(text: &str) -> Option<EntityUid> {
    let open = text.find('"')?;
    let type_name = text[..open].strip_suffix("::")?;
    let id = text[open + 1..].strip_suffix('"')?;
    if id.contains(['"', '\\']) {
        return None;
    }
    let type_name = TYPES.with(|types| {
        if let Some(known) = types.borrow().get(type_name) {
            return Some(known.clone());
        }
        let parsed = EntityTypeName::from_str(type_name).ok()?;
        let mut types = types.borrow_mut();
        if types.len() < MAX_KEPT_TYPES {
            types.insert(type_name.to_owned(), parsed.clone());
        }
        Some(parsed)
    })?;
    Some(EntityUid::from_type_name_and_id(
        type_name,
        EntityId::new(id),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input reads as Cedar's own parser reads it, or fails as it fails.
    #[test]
    fn reads_as_cedar_reads() {
        for text in [
            r#"User::"alice""#,
            r#"User::"""#,
            r#"Ns::Sub::User::"a b/c::d""#,
            r#"Action::"read""#,
            r#"User::"é 🙂""#,
            r#"User::"a\"b""#,
            r#"User::"a\\b""#,
            r#"User::"a\nb""#,
            r#"User :: "alice""#,
            r#" User::"alice""#,
            r#"User::"alice" "#,
            r#"User::alice"#,
            r#"User::"alice"#,
            r#"::"alice""#,
            r#"1User::"alice""#,
            r#"if::"alice""#,
            r#"User::"a"b""#,
            r#"User::"a""b""#,
            r#"User:"alice""#,
            r#"User::Sub::"x"::"y""#,
            "",
            r#"""#,
        ] {
            let ours = parse(text).map_err(|e| e.to_string());
            let cedars = EntityUid::from_str(text).map_err(|e| e.to_string());
            assert_eq!(ours, cedars, "{text:?}");
            // Twice: the second read takes the kept type name.
            assert_eq!(parse(text).map_err(|e| e.to_string()), cedars, "{text:?}");
        }
    }
}
