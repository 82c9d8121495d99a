//! `revwatch policy check`: offline validation of a directory tree with the
//! compiler the sidecar uses, each diagnostic naming the file and, where the
//! engine's parser gives one, the line and column.

use std::{fmt, path::Path, path::PathBuf, str::FromStr};

use clap::Args;
use revwatch_policy::{
    Backend, Limits, Rejection,
    cedar::{POLICY_SUFFIX, SCHEMA_FILE},
    layout::{LayoutError, Tree},
};

use super::backend_name;
use crate::serve::BackendArg;

/// Validate a policy tree offline, as `revwatch serve` would before activating it.
///
/// Prints one diagnostic per problem, as FILE: MESSAGE or FILE:LINE:COLUMN: MESSAGE,
/// and exits 1 when the tree is invalid, 0 when it is valid (for CI).
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The directory holding the policy files (hidden files are skipped).
    pub dir: PathBuf,
    /// The policy engine.
    #[arg(long, value_enum, default_value_t = BackendArg::Cedar)]
    pub backend: BackendArg,
}

pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let tree = checked_tree(&args.dir, args.backend)?;
    println!(
        "{}: valid {} policy tree ({} files)",
        args.dir.display(),
        backend_name(args.backend),
        tree.len()
    );
    Ok(())
}

/// The tree in `dir`, if the backend compiles it; else prints its diagnostics to
/// stderr and fails.
pub(super) fn checked_tree(dir: &Path, backend: BackendArg) -> anyhow::Result<Tree> {
    match check_dir(dir, backend) {
        Ok(tree) => Ok(tree),
        Err(diagnostic) => {
            eprintln!("{diagnostic}");
            anyhow::bail!(
                "{} is not a valid {} policy tree",
                dir.display(),
                backend_name(backend)
            )
        }
    }
}

/// One problem: the file at fault, where in it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Diagnostic {
    pub file: String,
    /// 1-based line and column, when the engine points at one.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Reads and compiles the tree in `dir`. The compiler stops at the first file
/// at fault, so there is one diagnostic.
pub(super) fn check_dir(dir: &Path, backend: BackendArg) -> Result<Tree, Diagnostic> {
    let tree = Tree::from_dir(dir).map_err(|e| layout_diagnostic(dir, &e))?;
    if tree.is_empty() {
        return Err(Diagnostic {
            file: dir.display().to_string(),
            position: None,
            message: "no files: an empty tree cannot be published".to_owned(),
        });
    }
    // With an empty prefix, a rejection's key is the file's path in the tree (or
    // empty when the set as a whole is at fault).
    let mut compiler = Backend::from(backend).compiler(Limits::default());
    match compiler.compile(&tree, "") {
        Ok(_) => Ok(tree),
        Err(rejection) => Err(rejection_diagnostic(dir, &tree, backend, rejection)),
    }
}

fn layout_diagnostic(dir: &Path, error: &LayoutError) -> Diagnostic {
    // The file-system errors name their path first: keep it out of the message.
    let (file, message) = match error {
        LayoutError::Io { path, source } => (path.display().to_string(), source.to_string()),
        LayoutError::FileTooLarge { path, size, limit } => (
            path.display().to_string(),
            format!("{size} bytes, more than the limit of {limit}"),
        ),
        LayoutError::SymlinkLoop { path } => {
            (path.display().to_string(), "symlink loop".to_owned())
        }
        other => {
            let file = other
                .key()
                .map_or_else(|| dir.to_path_buf(), |key| dir.join(key));
            (file.display().to_string(), other.to_string())
        }
    };
    Diagnostic {
        file,
        position: None,
        message,
    }
}

fn rejection_diagnostic(
    dir: &Path,
    tree: &Tree,
    backend: BackendArg,
    rejection: Rejection,
) -> Diagnostic {
    let path = rejection.key;
    let text = tree
        .get(&path)
        .and_then(|f| std::str::from_utf8(&f.value).ok());
    let position = match (backend, text) {
        (BackendArg::Cedar, Some(text)) => {
            cedar_offset(&path, text, tree).map(|offset| line_column(text, offset))
        }
        _ => None,
    };
    Diagnostic {
        file: if path.is_empty() {
            dir.display().to_string()
        } else {
            dir.join(&path).display().to_string()
        },
        position,
        message: rejection.message,
    }
}

/// The byte offset Cedar's parser (or strict validator) points at in the file
/// at `path`, whose text is `text`.
fn cedar_offset(path: &str, text: &str, tree: &Tree) -> Option<usize> {
    use cedar_policy::{PolicySet, Schema, ValidationMode, Validator};
    if path == SCHEMA_FILE {
        return Schema::from_cedarschema_str(text)
            .err()
            .and_then(|e| first_label(&e));
    }
    if !path.ends_with(POLICY_SUFFIX) {
        return None;
    }
    let set = match PolicySet::from_str(text) {
        Ok(set) => set,
        Err(e) => return first_label(&e),
    };
    // Parsed: the rejection came from strict validation against the schema.
    let schema_text = std::str::from_utf8(&tree.get(SCHEMA_FILE)?.value).ok()?;
    let (schema, _warnings) = Schema::from_cedarschema_str(schema_text).ok()?;
    let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
    result.validation_errors().find_map(|e| first_label(e))
}

fn first_label(diagnostic: &dyn miette::Diagnostic) -> Option<usize> {
    diagnostic.labels()?.next().map(|label| label.offset())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_map_to_one_based_lines_and_columns() {
        let text = "ab\ncdé\nf";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 2), (1, 3));
        assert_eq!(line_column(text, 3), (2, 1));
        assert_eq!(line_column(text, 7), (2, 4));
        assert_eq!(line_column(text, 8), (3, 1));
        assert_eq!(line_column(text, 99), (3, 2));
        // Inside a multi-byte character: its start.
        assert_eq!(line_column(text, 6), (2, 3));
    }
}
