//! Unit tests of the Cedar compiler and engine.
use super::*;
use crate::layout::TreeFile;

fn tree(revision: i64, files: &[(&str, i64, &str)]) -> Tree {
    Tree {
        revision,
        files: files
            .iter()
            .map(|(path, rev, text)| {
                let file = TreeFile {
                    value: bytes::Bytes::copy_from_slice(text.as_bytes()),
                    mod_revision: *rev,
                };
                ((*path).to_owned(), file)
            })
            .collect(),
        ..Tree::default()
    }
}

#[test]
fn a_one_key_change_reparses_one_file() {
    let mut compiler = CedarCompiler::new(Limits::default());
    let files = [
        ("a.cedar", 1, "permit(principal, action, resource);"),
        ("b.cedar", 2, "permit(principal, action, resource);"),
        ("c.cedar", 3, "forbid(principal, action, resource);"),
    ];
    let engine = compiler.compile(&tree(3, &files), "p/").unwrap();
    assert_eq!(engine.policy_count(), 3);
    assert_eq!(compiler.policies.parses(), 3);
    let mut changed = files;
    changed[1] = (
        "b.cedar",
        4,
        "permit(principal, action, resource); permit(principal, action, resource);",
    );
    let engine = compiler.compile(&tree(4, &changed), "p/").unwrap();
    assert_eq!(engine.policy_count(), 4);
    assert_eq!(compiler.policies.parses(), 4);
    // A rejected candidate does not poison the cache.
    changed[2] = ("c.cedar", 5, "forbid(");
    assert!(compiler.compile(&tree(5, &changed), "p/").is_err());
    changed[2] = ("c.cedar", 3, "forbid(principal, action, resource);");
    assert!(compiler.compile(&tree(6, &changed), "p/").is_ok());
    assert_eq!(compiler.policies.parses(), 5);
}

#[test]
fn statement_parsing_matches_whole_file_parsing_and_reuses_unchanged_statements() {
    let text = "// a comment; with \"quotes\n\
        @id(\"semi;colon\") permit(principal, action, resource) when { context.s == \"a;b//c\\\"\" };\n\
        forbid(principal == User::\"x;y\", action, resource); // trailing; comment\n\
        permit(principal, action, resource)\n  unless { context.flag };\n// the end;\n";
    let whole = parse_policy_file("f.cedar", text).unwrap();
    let (pieces, statements) = parse_policy_statements("f.cedar", text, None).unwrap();
    let show = |ps: &[Policy]| -> Vec<String> {
        ps.iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p.id(),
                    p.to_string().replace(char::is_whitespace, "")
                )
            })
            .collect()
    };
    assert_eq!(show(&pieces), show(&whole));
    assert_eq!(statements.len(), 3);
    // One statement changed: the others are reused (the same parsed policies).
    let changed = text.replace("unless { context.flag }", "unless { !context.flag }");
    let (again, _) = parse_policy_statements("f.cedar", &changed, Some(&statements)).unwrap();
    assert_eq!(show(&again)[..2], show(&pieces)[..2]);
    assert_ne!(show(&again)[2], show(&pieces)[2]);
    // Faults are reported as the whole file's parse reports them.
    let template = "permit(principal == ?principal, action, resource);";
    for bad in [
        "permit(principal, action, resource)",
        "permit(",
        "template(?principal",
        template,
    ] {
        for previous in [None, Some(&statements)] {
            assert_eq!(
                parse_policy_statements("f.cedar", bad, previous).unwrap_err(),
                parse_policy_file("f.cedar", bad).unwrap_err()
            );
        }
    }
}

#[test]
fn policy_ids_read_as_cedar_displays_them() {
    for id in [
        "plain-id",
        "a.cedar#0",
        "with space",
        "quote\"d",
        "it's",
        "back\\slash",
        "tab\there",
        "new\nline",
        "ünïcode",
        "\u{301}combining",
        "",
    ] {
        let id = PolicyId::new(id);
        assert_eq!(policy_id_text(&id), id.to_string(), "{id:?}");
    }
}
