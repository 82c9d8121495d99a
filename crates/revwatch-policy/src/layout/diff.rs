//! What changes between two trees.

use super::Tree;

/// The paths that differ between two trees, each list in path order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TreeDiff {
    /// In the new tree only.
    pub added: Vec<String>,
    /// In both, with different content.
    pub changed: Vec<String>,
    /// In the old tree only.
    pub removed: Vec<String>,
}

impl TreeDiff {
    /// True when the trees hold the same files with the same content.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// The paths added, changed (by content, not revision) and removed from `old` to
/// `new`.
pub fn diff(old: &Tree, new: &Tree) -> TreeDiff {
    let mut out = TreeDiff::default();
    for (path, file) in &new.files {
        match old.files.get(path) {
            None => out.added.push(path.clone()),
            Some(before) if before.value != file.value => out.changed.push(path.clone()),
            Some(_) => {}
        }
    }
    out.removed = old
        .files
        .keys()
        .filter(|path| !new.files.contains_key(*path))
        .cloned()
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_added_changed_and_removed_paths_by_content() {
        let mut old = Tree::from_files([("a", "1"), ("b", "2"), ("c", "3")]).unwrap();
        let new = Tree::from_files([("b", "2"), ("c", "4"), ("d", "5")]).unwrap();
        // Another revision with the same content is no change.
        old.files.get_mut("b").unwrap().mod_revision = 7;
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.changed, vec!["c"]);
        assert_eq!(d.removed, vec!["a"]);
        assert!(!d.is_empty());
        assert!(diff(&new, &new).is_empty());
    }
}
