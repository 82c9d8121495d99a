//! Every example under `examples/policy/` compiles, and decides its
//! `requests.json` as documented in its README.

use std::path::{Path, PathBuf};

use revwatch_policy::layout::Tree;
use revwatch_policy::{Backend, Limits, Request};
use serde_json::Value;

fn examples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn examples_decide_as_documented() {
    let dirs = examples();
    assert_eq!(dirs.len(), 6, "{dirs:?}");
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let backend = if name.starts_with("cedar") {
            Backend::Cedar
        } else {
            Backend::Casbin
        };
        let tree = Tree::from_dir(dir.join("tree")).unwrap();
        let engine = backend
            .compiler(Limits::default())
            .compile(&tree, "authz/")
            .unwrap_or_else(|r| panic!("{name}: {r}"));
        let requests: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(dir.join("requests.json")).unwrap())
                .unwrap();
        assert!(!requests.is_empty());
        for r in requests {
            let request = Request::new(
                r["principal"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["resource"].as_str().unwrap(),
            )
            .with_context(r.get("context").cloned().unwrap_or(Value::Null));
            let verdict = engine
                .decide(&request)
                .unwrap_or_else(|e| panic!("{name}: {request:?}: {e}"));
            let expect_allow = r["expect"].as_str().unwrap() == "allow";
            let ids: Vec<String> = serde_json::from_value(r["policy_ids"].clone()).unwrap();
            assert_eq!(verdict.allowed, expect_allow, "{name}: {request:?}");
            assert_eq!(verdict.policy_ids, ids, "{name}: {request:?}");
        }
        let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
        for path in tree.files.keys() {
            assert!(
                readme.contains(&format!("authz/{path}")),
                "{name}: README lacks {path}"
            );
        }
    }
}
