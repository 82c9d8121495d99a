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
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use etcd_proto::key_range::{KeyBounds, KeyRange, prefix_end};
use revwatch::mirror::Snapshot;

pub use diff::{TreeDiff, diff};
pub use dir::MAX_FILE_BYTES;
pub use keys::{LOCK_NAME, Layout, MAX_GENERATION_LEN, RESERVED_DIR, check_generation};
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
    /// Keys within `bounds`, in key order, with value and `mod_revision`.
    fn range<'a>(
        &'a self,
        bounds: KeyBounds<'a>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a>;
}

struct SnapshotView<'s, T>(&'s Snapshot<T>);

impl<T> View for SnapshotView<'_, T> {
    fn revision(&self) -> i64 {
        self.0.revision()
    }

    fn range<'a>(
        &'a self,
        bounds: KeyBounds<'a>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a> {
        Box::new(
            self.0
                .range(bounds)
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
        bounds: KeyBounds<'a>,
    ) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a> {
        Box::new(
            self.kvs
                .range::<[u8], _>(bounds)
                .map(|(k, f)| (k.as_slice(), &f.value, f.mod_revision)),
        )
    }
}

/// The keys of `range`, from `view`.
fn keys_in<'a>(
    view: &'a dyn View,
    range: &'a KeyRange,
) -> Box<dyn Iterator<Item = (&'a [u8], &'a Bytes, i64)> + 'a> {
    match range.bounds() {
        Some(bounds) => view.range(bounds),
        None => Box::new(std::iter::empty()),
    }
}

pub(crate) fn resolve(view: &dyn View, prefix: &[u8]) -> Result<Tree, LayoutError> {
    let layout = Layout::new(prefix);
    let pointer_key = layout.pointer();
    let pointer_range = KeyRange::single(&pointer_key);
    let pointer = keys_in(view, &pointer_range).next();
    let mut tree = Tree {
        revision: view.revision(),
        ..Tree::default()
    };
    let whole = KeyRange::prefix(prefix);
    let Some((_, value, pointer_revision)) = pointer else {
        for (key, value, mod_revision) in keys_in(view, &whole) {
            let path = &key[prefix.len()..];
            if !path::is_reserved(path) {
                insert(&mut tree, key, path, value, mod_revision)?;
            }
        }
        return Ok(tree);
    };

    let generation = generation_id(&pointer_key, value, pointer_revision)?;
    let gen_prefix = layout.generation(&generation);
    let gen_range = KeyRange::prefix(&gen_prefix);
    for (key, value, mod_revision) in keys_in(view, &gen_range) {
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
    let before = KeyRange::new(whole.key(), &reserved);
    let after = KeyRange::new(&prefix_end(&reserved), whole.range_end());
    tree.stray = keys_in(view, &before)
        .chain(keys_in(view, &after))
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
mod tests;
