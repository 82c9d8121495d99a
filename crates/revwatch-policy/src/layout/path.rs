//! Which strings are file paths of a tree.

use super::keys::{LOCK_NAME, RESERVED_DIR};

/// Why a string is not a file path of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is empty (a key equal to the prefix or the generation prefix).
    #[error("empty path")]
    Empty,
    /// The path starts or ends with `/`, or holds `//`.
    #[error("empty path component (leading, trailing or doubled '/')")]
    EmptyComponent,
    /// A component is `.` or `..`.
    #[error("'.' or '..' component")]
    DotComponent,
    /// The path lies in the reserved `.revwatch/` subtree or is a generation's `.lock`.
    #[error("reserved name (.revwatch/ or .lock)")]
    Reserved,
}

/// Checks that `path` is a file path of a tree: `/`-separated, relative, without
/// empty, `.` or `..` components, and not reserved (first component `.revwatch`,
/// or the whole path `.lock`). Any other bytes are allowed, hidden names too.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if is_reserved(path.as_bytes()) || path == LOCK_NAME {
        return Err(PathError::Reserved);
    }
    for component in path.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent),
            "." | ".." => return Err(PathError::DotComponent),
            _ => {}
        }
    }
    Ok(())
}

/// True when a path (a key with the prefix stripped) lies in the reserved subtree:
/// its first component is `.revwatch`.
pub(crate) fn is_reserved(path: &[u8]) -> bool {
    path.strip_prefix(RESERVED_DIR.as_bytes())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_relative_slash_separated_paths() {
        for ok in [
            "a",
            "policies/admin.cedar",
            "a/b/c.csv",
            ".hidden",
            "a/.lock",
            "x..y",
            ".revwatchx",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn rejects_empty_and_malformed_paths() {
        assert_eq!(check_path(""), Err(PathError::Empty));
        for bad in ["/a", "a/", "a//b", "/"] {
            assert_eq!(check_path(bad), Err(PathError::EmptyComponent), "{bad}");
        }
        for bad in [".", "..", "a/./b", "a/..", "../a"] {
            assert_eq!(check_path(bad), Err(PathError::DotComponent), "{bad}");
        }
    }

    #[test]
    fn rejects_reserved_names() {
        for bad in [
            ".revwatch",
            ".revwatch/active",
            ".revwatch/gen/g/a",
            ".lock",
        ] {
            assert_eq!(check_path(bad), Err(PathError::Reserved), "{bad}");
        }
    }

    #[test]
    fn reserved_subtree_is_the_first_component_only() {
        assert!(is_reserved(b".revwatch"));
        assert!(is_reserved(b".revwatch/x"));
        assert!(!is_reserved(b".revwatchx"));
        assert!(!is_reserved(b"a/.revwatch/x"));
    }
}
