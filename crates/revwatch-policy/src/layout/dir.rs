//! Reading a tree from a directory, for checking or publishing it offline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{LayoutError, Tree, TreeFile, check_path};

/// Largest file [`Tree::from_dir`] reads: 1 MiB, so that a file fits in one etcd
/// request (1.5 MiB by default, `--max-request-bytes`) with its key.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

impl Tree {
    /// Reads the files under directory `root` as a tree (revision 0, no
    /// generation). Paths are relative to `root`, `/`-separated, in any OS.
    ///
    /// * Hidden files and directories (name starting with `.`) are skipped, as
    ///   are special files (sockets, FIFOs, devices).
    /// * Symlinks are followed, to files and directories alike (as a Kubernetes
    ///   ConfigMap mount needs); a directory reached again through its own
    ///   ancestors is [`LayoutError::SymlinkLoop`], a dangling link an I/O error.
    /// * A file larger than [`MAX_FILE_BYTES`] is [`LayoutError::FileTooLarge`];
    ///   a name that is not UTF-8 is [`LayoutError::NonUtf8Key`].
    pub fn from_dir(root: impl AsRef<Path>) -> Result<Tree, LayoutError> {
        from_dir_limited(root.as_ref(), MAX_FILE_BYTES)
    }
}

fn from_dir_limited(root: &Path, limit: u64) -> Result<Tree, LayoutError> {
    let meta = std::fs::metadata(root).map_err(|e| io(root, e))?;
    if !meta.is_dir() {
        return Err(io(root, std::io::Error::other("not a directory")));
    }
    let mut tree = Tree::default();
    let mut ancestors = Vec::new();
    walk(root, "", limit, &mut ancestors, &mut tree)?;
    Ok(tree)
}

fn io(path: &Path, source: std::io::Error) -> LayoutError {
    LayoutError::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// Adds the files under `dir` (whose path in the tree is `rel`, empty or ending
/// in `/`). `ancestors` holds the canonical paths of the directories being walked.
fn walk(
    dir: &Path,
    rel: &str,
    limit: u64,
    ancestors: &mut Vec<PathBuf>,
    tree: &mut Tree,
) -> Result<(), LayoutError> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
    if ancestors.contains(&canonical) {
        return Err(LayoutError::SymlinkLoop {
            path: dir.to_path_buf(),
        });
    }
    ancestors.push(canonical);
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(LayoutError::NonUtf8Key {
                key: path.to_string_lossy().into_owned(),
                mod_revision: 0,
            });
        };
        if name.starts_with('.') {
            continue;
        }
        // Follows symlinks.
        let meta = std::fs::metadata(&path).map_err(|e| io(&path, e))?;
        let tree_path = format!("{rel}{name}");
        if meta.is_dir() {
            walk(&path, &format!("{tree_path}/"), limit, ancestors, tree)?;
        } else if meta.is_file() {
            let value = read_limited(&path, meta.len(), limit)?;
            check_path(&tree_path).map_err(|reason| LayoutError::InvalidPath {
                key: tree_path.clone(),
                mod_revision: 0,
                reason,
            })?;
            tree.files.insert(
                tree_path,
                TreeFile {
                    value,
                    mod_revision: 0,
                },
            );
        }
    }
    ancestors.pop();
    Ok(())
}

/// Reads at most `limit` bytes, failing if the file is (or grows) larger.
fn read_limited(path: &Path, size: u64, limit: u64) -> Result<Bytes, LayoutError> {
    let too_large = |size| LayoutError::FileTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if size > limit {
        return Err(too_large(size));
    }
    let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut buf = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io(path, e))?;
    if buf.len() as u64 > limit {
        return Err(too_large(buf.len() as u64));
    }
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    fn files(tree: &Tree) -> Vec<(&str, &[u8])> {
        tree.files
            .iter()
            .map(|(p, f)| (p.as_str(), &f.value[..]))
            .collect()
    }

    #[test]
    fn reads_nested_files_with_slash_paths_and_revision_zero() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "model.conf", "m");
        write(dir.path(), "policies/admin.cedar", "a");
        write(dir.path(), "policies/deep/x.csv", "x");
        let tree = Tree::from_dir(dir.path()).unwrap();
        assert_eq!(
            files(&tree),
            vec![
                ("model.conf", &b"m"[..]),
                ("policies/admin.cedar", b"a"),
                ("policies/deep/x.csv", b"x")
            ]
        );
        assert_eq!((tree.revision, tree.generation.as_deref()), (0, None));
        assert!(tree.files.values().all(|f| f.mod_revision == 0));
    }

    #[test]
    fn skips_hidden_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.cedar", "a");
        write(dir.path(), ".git/config", "g");
        write(dir.path(), ".revwatch/active", "g");
        write(dir.path(), "p/.swp", "s");
        write(dir.path(), ".lock", "l");
        assert_eq!(
            files(&Tree::from_dir(dir.path()).unwrap()),
            vec![("a.cedar", &b"a"[..])]
        );
    }

    #[test]
    fn empty_directory_is_an_empty_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(Tree::from_dir(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn files_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ok", "1234");
        assert_eq!(from_dir_limited(dir.path(), 4).unwrap().len(), 1);
        write(dir.path(), "big", "12345");
        let err = from_dir_limited(dir.path(), 4).unwrap_err();
        assert!(
            matches!(
                err,
                LayoutError::FileTooLarge {
                    size: 5,
                    limit: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("big"), "{err}");
    }

    #[test]
    fn root_must_be_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "f", "x");
        assert!(matches!(
            Tree::from_dir(dir.path().join("f")),
            Err(LayoutError::Io { .. })
        ));
        assert!(matches!(
            Tree::from_dir(dir.path().join("none")),
            Err(LayoutError::Io { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn follows_symlinks_and_refuses_loops() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        // A ConfigMap-style mount: visible links into a hidden directory.
        write(dir.path(), "..data/model.conf", "m");
        symlink(
            dir.path().join("..data/model.conf"),
            dir.path().join("model.conf"),
        )
        .unwrap();
        symlink(dir.path().join("..data"), dir.path().join("linked")).unwrap();
        assert_eq!(
            files(&Tree::from_dir(dir.path()).unwrap()),
            vec![("linked/model.conf", &b"m"[..]), ("model.conf", b"m")]
        );
        symlink(dir.path(), dir.path().join("..data/loop")).unwrap();
        assert!(matches!(
            Tree::from_dir(dir.path()),
            Err(LayoutError::SymlinkLoop { .. })
        ));
        let dangling = tempfile::tempdir().unwrap();
        symlink(dangling.path().join("missing"), dangling.path().join("x")).unwrap();
        assert!(matches!(
            Tree::from_dir(dangling.path()),
            Err(LayoutError::Io { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_names_are_errors() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xff");
        if std::fs::write(dir.path().join(name), "x").is_err() {
            return; // The file system refuses such names; nothing to read then.
        }
        assert!(matches!(
            Tree::from_dir(dir.path()),
            Err(LayoutError::NonUtf8Key { .. })
        ));
    }
}
