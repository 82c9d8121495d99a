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

/// A small deterministic generator for the delta test.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

const USERS: usize = 4;
const GROUPS: usize = 2;
const ACTIONS: usize = 3;
const DOCS: usize = 4;

fn random_policy(rng: &mut Lcg) -> String {
    let effect = ["permit", "forbid", "permit"][rng.below(3)];
    let principal = match rng.below(4) {
        0 => "principal".to_owned(),
        1 => format!("principal == User::\"u{}\"", rng.below(USERS)),
        2 => format!("principal in Group::\"g{}\"", rng.below(GROUPS)),
        _ => "principal is User".to_owned(),
    };
    let action = match rng.below(3) {
        0 => "action".to_owned(),
        1 => format!("action == Action::\"a{}\"", rng.below(ACTIONS)),
        _ => format!(
            "action in [Action::\"a{}\", Action::\"a{}\"]",
            rng.below(ACTIONS),
            rng.below(ACTIONS)
        ),
    };
    let resource = match rng.below(3) {
        0 => "resource".to_owned(),
        _ => format!("resource == Doc::\"d{}\"", rng.below(DOCS)),
    };
    let condition = match rng.below(4) {
        0 => " when { context.flag }",
        // Errors for documents without an owner.
        1 => " when { resource.owner == principal }",
        _ => "",
    };
    // A few explicit ids, which may collide across files (a rejected candidate).
    let id = if rng.below(12) == 0 {
        format!("@id(\"named{}\") ", rng.below(3))
    } else {
        String::new()
    };
    format!("{id}{effect}({principal}, {action}, {resource}){condition};\n")
}

fn random_file(rng: &mut Lcg) -> String {
    if rng.below(20) == 0 {
        return "permit(".to_owned();
    }
    (0..rng.below(4)).map(|_| random_policy(rng)).collect()
}

fn random_entities(rng: &mut Lcg) -> String {
    let users = (0..USERS).map(|u| {
        serde_json::json!({"uid": {"type": "User", "id": format!("u{u}")}, "attrs": {},
            "parents": [{"type": "Group", "id": format!("g{}", rng.below(GROUPS))}]})
    });
    let users: Vec<_> = users.collect();
    let groups = (0..GROUPS).map(|g| {
        serde_json::json!({"uid": {"type": "Group", "id": format!("g{g}")}, "attrs": {}, "parents": []})
    });
    let docs = (0..DOCS).map(|d| {
        let attrs = if d % 2 == 0 {
            serde_json::json!({"owner": {"__entity": {"type": "User", "id": format!("u{}", d % USERS)}}})
        } else {
            serde_json::json!({})
        };
        serde_json::json!({"uid": {"type": "Doc", "id": format!("d{d}")}, "attrs": attrs, "parents": []})
    });
    serde_json::Value::Array(users.into_iter().chain(groups).chain(docs).collect()).to_string()
}

/// Every decision (or the rejection) of `engine`, errors sorted.
fn answers(engine: &Result<Arc<dyn Engine>, Rejection>) -> Result<Vec<String>, Rejection> {
    let engine = engine.as_ref().map_err(Clone::clone)?;
    let mut out = Vec::new();
    for user in 0..USERS {
        for action in 0..ACTIONS {
            for doc in 0..DOCS {
                for flag in [false, true] {
                    let request = Request {
                        principal: format!("User::\"u{user}\""),
                        action: format!("Action::\"a{action}\""),
                        resource: format!("Doc::\"d{doc}\""),
                        context: serde_json::json!({ "flag": flag }),
                    };
                    let answer = engine.decide(&request).map(|mut verdict| {
                        verdict.errors.sort();
                        verdict
                    });
                    out.push(format!("{answer:?}"));
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn a_delta_compile_decides_as_a_full_compile() {
    let mut rng = Lcg(17);
    let mut incremental = CedarCompiler::new(Limits::default());
    let paths: Vec<String> = (0..6).map(|n| format!("policies/f{n}.cedar")).collect();
    let mut files: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut revision = 1;
    files.insert(
        "entities.entities.json".into(),
        (revision, random_entities(&mut rng)),
    );
    for path in &paths {
        revision += 1;
        let text = (0..3).map(|_| random_policy(&mut rng)).collect();
        files.insert(path.clone(), (revision, text));
    }
    for step in 0..400 {
        revision += 1;
        let path = paths[rng.below(paths.len())].clone();
        match rng.below(12) {
            0 => {
                files.remove(&path);
            }
            1 => {
                let entities = random_entities(&mut rng);
                files.insert("entities.entities.json".into(), (revision, entities));
            }
            _ => {
                let text = random_file(&mut rng);
                files.insert(path, (revision, text));
            }
        }
        let listed: Vec<(&str, i64, &str)> = files
            .iter()
            .map(|(p, (rev, text))| (p.as_str(), *rev, text.as_str()))
            .collect();
        let tree = tree(revision, &listed);
        let delta = incremental.compile(&tree, "p/");
        let full = CedarCompiler::new(Limits::default()).compile(&tree, "p/");
        assert_eq!(answers(&delta), answers(&full), "step {step}");
        if let (Ok(delta), Ok(full)) = (&delta, &full) {
            assert_eq!(delta.policy_count(), full.policy_count(), "step {step}");
        }
    }
    let deltas = incremental.deltas;
    assert!(deltas > 200, "only {deltas} of 400 compiles were deltas");
}
