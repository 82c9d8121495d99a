//! Unit tests of the layout: resolving the active tree of a view.

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
