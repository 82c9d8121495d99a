//! The active policy tree of a snapshot: which keys under the prefix make up the policy set.
//!
//! # Layout
//!
//! A policy set is a *tree* of files (`policies/admin.cedar`, `model.conf`, ...)
//! kept under a prefix `P` (the mirrored prefix, usually ending in `/`). A file
//! path maps one to one onto a key. The subtree `P.revwatch/` is reserved:
//!
//! | key | holds |
//! |---|---|
//! | `P.revwatch/active` | the pointer: the active generation id `G` |
//! | `P.revwatch/previous` | the generation the last publish replaced |
//! | `P.revwatch/gen/G/<path>` | file `<path>` of generation `G` |
//! | `P.revwatch/gen/G/.lock` | present, bound to a lease, while `G` is being written |
//! | `P<path>` | file `<path>` in direct mode |
//!
//! * **Generation mode** (the pointer exists): the active tree is the keys under
//!   `P.revwatch/gen/G/` with that prefix stripped. Keys directly under `P`
//!   (outside `.revwatch/`) are ignored and reported as [`Tree::stray`]. Other
//!   generations (being written, previous, abandoned) are invisible.
//! * **Direct mode** (no pointer): the active tree is the keys `P<path>` outside
//!   `.revwatch/`. Nothing but etcdctl is needed to manage it.
//!
//! Generations are written by [`publish`](crate::publish), which makes a tree of
//! any size active in one revision (see its docs for the protocol).
//!
//! A tree that breaks a rule is an error naming the key ([`LayoutError`]): a
//! non-UTF-8 or malformed path, a pointer that is not a valid generation id, or one
//! naming a generation without keys. Paths are `/`-separated and relative, without
//! empty, `.` or `..` components ([`check_path`]).
//!
//! # Editing one key with etcdctl
//!
//! Direct mode, with `P` = `authz/`:
//!
//! ```text
//! etcdctl put authz/policies/admin.cedar < admin.cedar     # add or replace a file
//! etcdctl del authz/policies/old.cedar                     # remove a file
//! ```
//!
//! Generation mode: edit the active generation in place.
//!
//! ```text
//! G=$(etcdctl get --print-value-only authz/.revwatch/active)
//! etcdctl put "authz/.revwatch/gen/$G/policies/admin.cedar" < admin.cedar
//! etcdctl del "authz/.revwatch/gen/$G/policies/old.cedar"
//! ```
//!
//! Every etcdctl write is its own revision and is activated on its own; change
//! several files together with a publish (or one `etcdctl txn`, at most 128
//! operations). Deleting the pointer (`etcdctl del authz/.revwatch/active`)
//! returns to direct mode; putting a generation id into it switches generations
//! (a rollback: `etcdctl put authz/.revwatch/active "$(etcdctl get
//! --print-value-only authz/.revwatch/previous)"`).

mod diff;
mod dir;
mod keys;
mod path;

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use revwatch::mirror::Snapshot;

pub use diff::{TreeDiff, diff};
pub use dir::MAX_FILE_BYTES;
pub use keys::{LOCK_NAME, Layout, MAX_GENERATION_LEN, RESERVED_DIR, check_generation, prefix_end};
pub use path::{PathError, check_path};

/// One file of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFile {
    /// The file's content (the key's value).
    pub value: Bytes,
    /// The key's `mod_revision`; 0 for a file not read from etcd.
    pub mod_revision: i64,
}

/// A policy set as a tree of files: the active tree of a snapshot, or a tree read
/// from a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// The revision of the snapshot it was read from; 0 when not read from etcd.
    pub revision: i64,
    /// The active generation id; `None` in direct mode or when not read from etcd.
    pub generation: Option<String>,
    /// The files by path, in path order.
    pub files: BTreeMap<String, TreeFile>,
    /// Keys directly under the prefix that generation mode ignores, as paths
    /// (prefix stripped; non-UTF-8 bytes escaped). Empty in direct mode.
    pub stray: Vec<String>,
}

impl Tree {
    /// A tree of `files` (path, content), with revision 0. Fails on an invalid path.
    pub fn from_files<P, V>(files: impl IntoIterator<Item = (P, V)>) -> Result<Tree, LayoutError>
    where
        P: Into<String>,
        V: Into<Bytes>,
    {
        let mut tree = Tree::default();
        for (path, value) in files {
            let path = path.into();
            check_path(&path).map_err(|reason| LayoutError::InvalidPath {
                key: path.clone(),
                mod_revision: 0,
                reason,
            })?;
            tree.files.insert(
                path,
                TreeFile {
                    value: value.into(),
                    mod_revision: 0,
                },
            );
        }
        Ok(tree)
    }

    /// The file at `path`.
    pub fn get(&self, path: &str) -> Option<&TreeFile> {
        self.files.get(path)
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when the tree holds no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Why a tree could not be read. Names the key (or file) at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// A key of the active tree is not UTF-8 after its prefix.
    #[error("key {key} (revision {mod_revision}): path is not UTF-8")]
    NonUtf8Key {
        /// The key, non-UTF-8 bytes escaped.
        key: String,
        /// The key's `mod_revision`.
        mod_revision: i64,
    },
    /// A key or file of the tree does not have a valid path.
    #[error("key {key} (revision {mod_revision}): invalid path: {reason}")]
    InvalidPath {
        /// The key (or, offline, the path).
        key: String,
        /// The key's `mod_revision`; 0 offline.
        mod_revision: i64,
        /// What is wrong with it.
        reason: PathError,
    },
    /// The pointer does not hold a valid generation id.
    #[error(
        "pointer {key} (revision {mod_revision}) holds {value:?}: not a generation id: {reason}"
    )]
    InvalidGeneration {
        /// The pointer key.
        key: String,
        /// The pointer's `mod_revision`.
        mod_revision: i64,
        /// Its value, non-UTF-8 bytes escaped.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The pointer names a generation that holds no file (missing, deleted, or
    /// only a lock).
    #[error(
        "pointer {key} (revision {mod_revision}) names generation {generation}, which holds no file"
    )]
    MissingGeneration {
        /// The pointer key.
        key: String,
        /// The pointer's `mod_revision`.
        mod_revision: i64,
        /// The generation id.
        generation: String,
    },
    /// Reading a directory tree failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A file of a directory tree is larger than [`MAX_FILE_BYTES`].
    #[error("{}: {size} bytes, more than the limit of {limit}", path.display())]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A directory of a directory tree is reached again through a symlink.
    #[error("{}: symlink loop", path.display())]
    SymlinkLoop {
        /// The directory reached again.
        path: PathBuf,
    },
}

impl LayoutError {
    /// The key (or offline path) at fault, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            LayoutError::NonUtf8Key { key, .. }
            | LayoutError::InvalidPath { key, .. }
            | LayoutError::InvalidGeneration { key, .. }
            | LayoutError::MissingGeneration { key, .. } => Some(key),
            LayoutError::Io { .. }
            | LayoutError::FileTooLarge { .. }
            | LayoutError::SymlinkLoop { .. } => None,
        }
    }

    /// The `mod_revision` of the key at fault; `None` offline.
    pub fn mod_revision(&self) -> Option<i64> {
        match self {
            LayoutError::NonUtf8Key { mod_revision, .. }
            | LayoutError::InvalidPath { mod_revision, .. }
            | LayoutError::InvalidGeneration { mod_revision, .. }
            | LayoutError::MissingGeneration { mod_revision, .. } => {
                // Offline trees use 0; etcd revisions start at 1.
                (*mod_revision != 0).then_some(*mod_revision)
            }
            LayoutError::Io { .. }
            | LayoutError::FileTooLarge { .. }
            | LayoutError::SymlinkLoop { .. } => None,
        }
    }
}

/// The active tree of `snapshot` under `prefix` (see the [module docs](self)).
/// Reads the keys' stored bytes ([`Entry::raw`](revwatch::mirror::Entry::raw)),
/// whatever the mirror's decoder.
pub fn active_tree<T>(snapshot: &Snapshot<T>, prefix: &[u8]) -> Result<Tree, LayoutError> {
    resolve(&SnapshotView(snapshot), prefix)
}

/// An ordered key-value view at one revision: a snapshot, or a listing.
pub(crate) trait View {
    /// The revision the view is exact at.
    fn revision(&self) -> i64;
    /// Keys in `[start, end)` (`None`: to the end), in key order, with value and
    /// `mod_revision`.
    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: Option<&'a [u8]>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a>;
}

struct SnapshotView<'s, T>(&'s Snapshot<T>);

impl<T> View for SnapshotView<'_, T> {
    fn revision(&self) -> i64 {
        self.0.revision()
    }

    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: Option<&'a [u8]>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a> {
        let end = end.map_or(Bound::Unbounded, Bound::Excluded);
        Box::new(
            self.0
                .range((Bound::Included(start), end))
                .map(|(k, e)| (k.as_bytes(), &e.raw, e.mod_revision)),
        )
    }
}

/// Keys and values read from etcd at one revision (a listing of the prefix).
#[derive(Debug, Clone, Default)]
pub(crate) struct Listing {
    pub(crate) revision: i64,
    pub(crate) kvs: BTreeMap<Vec<u8>, TreeFile>,
}

impl View for Listing {
    fn revision(&self) -> i64 {
        self.revision
    }

    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: Option<&'a [u8]>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a> {
        let end = end.map_or(Bound::Unbounded, Bound::Excluded);
        Box::new(
            self.kvs
                .range::<[u8], _>((Bound::Included(start), end))
                .map(|(k, f)| (k.as_slice(), &f.value, f.mod_revision)),
        )
    }
}

/// Keys with the prefix `prefix`, from `view`.
fn with_prefix<'a>(
    view: &'a dyn View,
    prefix: &'a [u8],
    end: &'a [u8],
) -> impl Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a {
    view.range(prefix, (!end.is_empty()).then_some(end))
}

pub(crate) fn resolve(view: &dyn View, prefix: &[u8]) -> Result<Tree, LayoutError> {
    let layout = Layout::new(prefix);
    let pointer_key = layout.pointer();
    let pointer_end = prefix_end(&pointer_key);
    let pointer = with_prefix(view, &pointer_key, &pointer_end)
        .find(|(key, _, _)| *key == pointer_key.as_slice());
    let mut tree = Tree {
        revision: view.revision(),
        ..Tree::default()
    };
    let end = prefix_end(prefix);
    let Some((_, value, pointer_revision)) = pointer else {
        for (key, value, mod_revision) in with_prefix(view, prefix, &end) {
            let path = &key[prefix.len()..];
            if !path::is_reserved(path) {
                insert(&mut tree, key, path, value, mod_revision)?;
            }
        }
        return Ok(tree);
    };

    let generation = generation_id(&pointer_key, value, pointer_revision)?;
    let gen_prefix = layout.generation(&generation);
    let gen_end = prefix_end(&gen_prefix);
    for (key, value, mod_revision) in with_prefix(view, &gen_prefix, &gen_end) {
        let path = &key[gen_prefix.len()..];
        // The lock is the protocol's, not a file; the publish deletes it in the
        // same txn that activates the generation.
        if path != LOCK_NAME.as_bytes() {
            insert(&mut tree, key, path, value, mod_revision)?;
        }
    }
    if tree.files.is_empty() {
        return Err(LayoutError::MissingGeneration {
            key: escape(&pointer_key),
            mod_revision: pointer_revision,
            generation,
        });
    }
    tree.generation = Some(generation);
    // Stray keys: everything under the prefix outside the reserved subtree, which
    // is one contiguous key range.
    let reserved = layout.reserved();
    let reserved_end = prefix_end(&reserved);
    let before = view.range(prefix, Some(&reserved));
    let after = with_prefix(view, &reserved_end, &end);
    tree.stray = before
        .chain(after)
        .map(|(key, _, _)| &key[prefix.len()..])
        .filter(|path| !path::is_reserved(path))
        .map(escape)
        .collect();
    Ok(tree)
}

fn generation_id(
    pointer_key: &[u8],
    value: &[u8],
    mod_revision: i64,
) -> Result<String, LayoutError> {
    let invalid = |reason| LayoutError::InvalidGeneration {
        key: escape(pointer_key),
        mod_revision,
        value: escape(value),
        reason,
    };
    let id = std::str::from_utf8(value).map_err(|_| invalid("not UTF-8"))?;
    check_generation(id).map_err(invalid)?;
    Ok(id.to_owned())
}

fn insert(
    tree: &mut Tree,
    key: &[u8],
    path: &[u8],
    value: &Bytes,
    mod_revision: i64,
) -> Result<(), LayoutError> {
    let path = std::str::from_utf8(path).map_err(|_| LayoutError::NonUtf8Key {
        key: escape(key),
        mod_revision,
    })?;
    check_path(path).map_err(|reason| LayoutError::InvalidPath {
        key: escape(key),
        mod_revision,
        reason,
    })?;
    tree.files.insert(
        path.to_owned(),
        TreeFile {
            value: value.clone(),
            mod_revision,
        },
    );
    Ok(())
}

/// A key for messages: UTF-8 as is, other bytes escaped (`\xff`).
pub(crate) fn escape(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) => s.to_owned(),
        Err(_) => key.escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(revision: i64, kvs: &[(&str, &str, i64)]) -> Listing {
        listing_bytes(
            revision,
            &kvs.iter()
                .map(|(k, v, r)| (k.as_bytes(), *v, *r))
                .collect::<Vec<_>>(),
        )
    }

    fn listing_bytes(revision: i64, kvs: &[(&[u8], &str, i64)]) -> Listing {
        Listing {
            revision,
            kvs: kvs
                .iter()
                .map(|(k, v, r)| {
                    let file = TreeFile {
                        value: Bytes::copy_from_slice(v.as_bytes()),
                        mod_revision: *r,
                    };
                    (k.to_vec(), file)
                })
                .collect(),
        }
    }

    fn paths(tree: &Tree) -> Vec<(&str, &[u8], i64)> {
        tree.files
            .iter()
            .map(|(p, f)| (p.as_str(), &f.value[..], f.mod_revision))
            .collect()
    }

    #[test]
    fn direct_mode_takes_keys_under_the_prefix_outside_the_reserved_subtree() {
        let view = listing(
            9,
            &[
                ("other/x", "no", 1),
                ("p/.revwatch/gen/g1/a", "gen", 2),
                ("p/.revwatch/previous", "g0", 2),
                ("p/.revwatchx", "x", 3),
                ("p/a.cedar", "A", 4),
                ("p/dir/b.csv", "B", 5),
                ("q", "no", 6),
            ],
        );
        let tree = resolve(&view, b"p/").unwrap();
        assert_eq!(tree.revision, 9);
        assert_eq!(tree.generation, None);
        assert_eq!(
            paths(&tree),
            vec![
                (".revwatchx", &b"x"[..], 3),
                ("a.cedar", b"A", 4),
                ("dir/b.csv", b"B", 5)
            ]
        );
        assert!(tree.stray.is_empty());
    }

    #[test]
    fn empty_prefix_direct_mode_is_an_empty_tree() {
        let tree = resolve(&listing(3, &[]), b"p/").unwrap();
        assert!(tree.is_empty());
        assert_eq!(tree.revision, 3);
    }

    #[test]
    fn generation_mode_takes_the_active_generation_and_reports_strays() {
        let view = listing(
            20,
            &[
                ("p/.revwatch/active", "g2", 15),
                ("p/.revwatch/gen/g1/a.cedar", "old", 10),
                ("p/.revwatch/gen/g2/.lock", "", 14),
                ("p/.revwatch/gen/g2/a.cedar", "new", 12),
                ("p/.revwatch/gen/g2/dir/.lock", "a file", 12),
                ("p/.revwatch/gen/g20/a.cedar", "other", 13),
                ("p/.revwatch/previous", "g1", 15),
                ("p/.hidden", "s", 3),
                ("p/a.cedar", "stray", 4),
                ("p/z", "stray", 5),
            ],
        );
        let tree = resolve(&view, b"p/").unwrap();
        assert_eq!(tree.generation.as_deref(), Some("g2"));
        assert_eq!(
            paths(&tree),
            vec![("a.cedar", &b"new"[..], 12), ("dir/.lock", b"a file", 12)]
        );
        assert_eq!(tree.stray, vec![".hidden", "a.cedar", "z"]);
    }

    #[test]
    fn pointer_to_a_missing_or_lock_only_generation_is_an_error() {
        let missing = listing(5, &[("p/.revwatch/active", "g9", 4), ("p/a", "x", 2)]);
        let err = resolve(&missing, b"p/").unwrap_err();
        assert!(
            matches!(&err, LayoutError::MissingGeneration { generation, .. } if generation == "g9")
        );
        assert_eq!(err.key(), Some("p/.revwatch/active"));
        assert_eq!(err.mod_revision(), Some(4));
        let lock_only = listing(
            5,
            &[
                ("p/.revwatch/active", "g9", 4),
                ("p/.revwatch/gen/g9/.lock", "", 3),
            ],
        );
        assert!(matches!(
            resolve(&lock_only, b"p/"),
            Err(LayoutError::MissingGeneration { .. })
        ));
    }

    #[test]
    fn invalid_pointer_values_are_errors_naming_the_pointer() {
        for bad in ["", "a/b", ".x", "g 1"] {
            let view = listing(
                5,
                &[
                    ("p/.revwatch/active", bad, 4),
                    ("p/.revwatch/gen/x/a", "v", 2),
                ],
            );
            let err = resolve(&view, b"p/").unwrap_err();
            assert!(
                matches!(err, LayoutError::InvalidGeneration { .. }),
                "{bad:?}: {err}"
            );
            assert_eq!(err.key(), Some("p/.revwatch/active"));
        }
        let view = listing_bytes(5, &[(b"p/.revwatch/active", "\u{e9}", 4)]);
        assert!(matches!(
            resolve(&view, b"p/"),
            Err(LayoutError::InvalidGeneration { .. })
        ));
    }

    #[test]
    fn non_utf8_paths_are_errors_naming_the_key() {
        let view = listing_bytes(5, &[(b"p/a\xff", "v", 4)]);
        let err = resolve(&view, b"p/").unwrap_err();
        assert!(matches!(
            err,
            LayoutError::NonUtf8Key {
                mod_revision: 4,
                ..
            }
        ));
        assert_eq!(err.key(), Some("p/a\\xff"));
        let view = listing_bytes(
            5,
            &[
                (b"p/.revwatch/active", "g", 4),
                (b"p/.revwatch/gen/g/\xfe", "v", 3),
            ],
        );
        assert!(matches!(
            resolve(&view, b"p/"),
            Err(LayoutError::NonUtf8Key {
                mod_revision: 3,
                ..
            })
        ));
    }

    #[test]
    fn non_utf8_strays_are_reported_escaped_not_errors() {
        let view = listing_bytes(
            5,
            &[
                (b"p/.revwatch/active", "g", 4),
                (b"p/.revwatch/gen/g/a", "v", 3),
                (b"p/\xff", "s", 1),
            ],
        );
        assert_eq!(resolve(&view, b"p/").unwrap().stray, vec!["\\xff"]);
    }

    #[test]
    fn malformed_paths_are_errors_naming_the_key() {
        for (key, reason) in [
            ("p/", PathError::Empty),
            ("p//a", PathError::EmptyComponent),
            ("p/a/", PathError::EmptyComponent),
            ("p/a/../b", PathError::DotComponent),
            ("p/.lock", PathError::Reserved),
        ] {
            let err = resolve(&listing(5, &[(key, "v", 4)]), b"p/").unwrap_err();
            match err {
                LayoutError::InvalidPath {
                    key: k,
                    mod_revision: 4,
                    reason: r,
                } => {
                    assert_eq!((k.as_str(), r), (key, reason));
                }
                other => panic!("{key}: {other}"),
            }
        }
        let view = listing(
            5,
            &[
                ("p/.revwatch/active", "g", 4),
                ("p/.revwatch/gen/g/", "v", 3),
            ],
        );
        assert!(matches!(
            resolve(&view, b"p/"),
            Err(LayoutError::InvalidPath {
                reason: PathError::Empty,
                ..
            })
        ));
    }

    #[test]
    fn an_empty_prefix_mirrors_the_whole_keyspace() {
        let view = listing(
            5,
            &[
                (".revwatch/active", "g", 4),
                (".revwatch/gen/g/a", "v", 3),
                ("b", "s", 1),
                ("\u{ff}", "s", 1),
            ],
        );
        let tree = resolve(&view, b"").unwrap();
        assert_eq!(paths(&tree), vec![("a", &b"v"[..], 3)]);
        assert_eq!(tree.stray, vec!["b", "\u{ff}"]);
    }

    #[test]
    fn prefix_without_trailing_slash_is_a_plain_byte_prefix() {
        let view = listing(
            5,
            &[
                ("app.revwatch/active", "g", 4),
                ("app.revwatch/gen/g/x", "v", 3),
                ("appz", "s", 1),
            ],
        );
        let tree = resolve(&view, b"app").unwrap();
        assert_eq!(paths(&tree), vec![("x", &b"v"[..], 3)]);
        assert_eq!(tree.stray, vec!["z"]);
    }

    #[test]
    fn from_files_validates_paths() {
        let tree = Tree::from_files([("a.cedar", "x"), ("d/b.csv", "y")]).unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree.get("d/b.csv").map(|f| &f.value[..]), Some(&b"y"[..]));
        assert_eq!(tree.get("d/b.csv").map(|f| f.mod_revision), Some(0));
        let err = Tree::from_files([(".revwatch/active", "x")]).unwrap_err();
        assert!(matches!(
            err,
            LayoutError::InvalidPath {
                reason: PathError::Reserved,
                ..
            }
        ));
        assert_eq!(err.mod_revision(), None);
    }
}
