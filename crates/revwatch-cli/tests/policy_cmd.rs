//! `revwatch policy ...` run as a user would: `check` offline (exit codes, file
//! and line in each diagnostic), and `push`, `show`, `diff`, `explain` against
//! real etcd 3.4.

mod common;
mod serve_support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::etcdctl;
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
const PREFIX: &str = "/authz/";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/policy")
}

/// Runs `revwatch policy ARGS`.
fn policy(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("policy")
        .args(args)
        .env_remove("REVWATCH_PASSWORD")
        .output()
        .expect("run revwatch policy")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `revwatch policy ARGS` against etcd at `endpoint` under [`PREFIX`].
fn policy_at(endpoint: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--endpoints", endpoint, "--prefix", PREFIX]);
    policy(&all)
}

/// Pushes `dir` (with `extra` flags) to etcd at `endpoint`; the new revision.
fn push_ok(endpoint: &str, dir: &str, extra: &[&str]) -> i64 {
    let mut args = vec!["push", dir];
    args.extend_from_slice(extra);
    let out = policy_at(endpoint, &args);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("generation "), "{}", stdout(&out));
    revision_in(&stdout(&out))
}

fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// A copy of an example's tree in a fresh temporary directory.
fn example_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    copy_dir(&examples().join(name).join("tree"), &tree);
    (dir, tree)
}

/// Real etcd 3.4, its endpoint, and a copy of the Cedar multi-tenant example.
async fn etcd_and_example() -> (EtcdCluster, String, tempfile::TempDir, PathBuf) {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let (copy, tree) = example_copy("cedar-rbac-tenants");
    (etcd, ep, copy, tree)
}

/// The revision in "... at revision R ..." of `text`.
fn revision_in(text: &str) -> i64 {
    let (_, rest) = text.split_once("at revision ").expect("a revision");
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|r| r.parse().ok())
        .expect("a revision number")
}

#[test]
fn check_accepts_every_example() {
    for entry in std::fs::read_dir(examples()).expect("examples") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_dir() {
            continue;
        }
        let backend = name.split('-').next().expect("backend prefix");
        let tree = entry.path().join("tree");
        let out = policy(&["check", tree.to_str().expect("utf-8"), "--backend", backend]);
        assert_exit(&out, 0);
        assert!(stdout(&out).contains("valid"), "{name}: {}", stdout(&out));
    }
}

#[test]
fn check_names_file_line_and_column_of_a_cedar_parse_error() {
    let (_dir, tree) = example_copy("cedar-rbac-tenants");
    let file = tree.join("policies/acme.cedar");
    std::fs::write(
        &file,
        "@id(\"ok\")\npermit(principal, action, resource);\n\n  permit(principal, action,, resource);\n",
    )
    .expect("write");
    let out = policy(&["check", tree.to_str().expect("utf-8")]);
    assert_exit(&out, 1);
    let expected = format!("{}:4:", file.display());
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid policy"), "{}", stderr(&out));
}

#[test]
fn check_names_the_line_of_a_schema_violation() {
    let (_dir, tree) = example_copy("cedar-rbac-tenants");
    let file = tree.join("policies/acme.cedar");
    let mut text = std::fs::read_to_string(&file).expect("read");
    // After a blank line and the annotation: the permit, whose action is unknown.
    let line = text.lines().count() + 3;
    text.push_str("\n@id(\"typo\")\npermit(principal, action == Action::\"delete\", resource);\n");
    std::fs::write(&file, text).expect("write");
    let out = policy(&["check", tree.to_str().expect("utf-8")]);
    assert_exit(&out, 1);
    let expected = format!("{}:{line}:29:", file.display());
    assert!(
        stderr(&out).contains(&expected),
        "{expected}: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("schema violation"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_names_the_file_of_a_broken_casbin_model_and_of_a_broken_schema() {
    let (_dir, tree) = example_copy("casbin-rbac-domains");
    std::fs::write(
        tree.join("model.conf"),
        "[request_definition]\nr = sub, obj\n",
    )
    .expect("write");
    let out = policy(&[
        "check",
        tree.to_str().expect("utf-8"),
        "--backend",
        "casbin",
    ]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("model.conf"), "{}", stderr(&out));

    let (_dir, tree) = example_copy("cedar-rbac-tenants");
    let schema = tree.join("schema.cedarschema");
    std::fs::write(&schema, "entity User;\nentity Doc in [;\n").expect("write");
    let out = policy(&["check", tree.to_str().expect("utf-8")]);
    assert_exit(&out, 1);
    let expected = format!("{}:2:", schema.display());
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
}

#[test]
fn check_usage_errors_exit_2_and_missing_or_empty_directories_exit_1() {
    assert_exit(&policy(&["check"]), 2);
    let tree = examples().join("cedar-abac/tree");
    let out = policy(&["check", tree.to_str().expect("utf-8"), "--backend", "opa"]);
    assert_exit(&out, 2);
    let empty = tempfile::tempdir().expect("tempdir");
    let out = policy(&["check", empty.path().to_str().expect("utf-8")]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("no files"), "{}", stderr(&out));
    let out = policy(&["check", empty.path().join("none").to_str().expect("utf-8")]);
    assert_exit(&out, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_show_then_diff() {
    let (_etcd, ep, _copy, tree) = etcd_and_example().await;
    let dir = tree.to_str().expect("utf-8");

    let pushed = push_ok(&ep, dir, &[]);

    let out = policy_at(&ep, &["show"]);
    assert_exit(&out, 0);
    let shown = stdout(&out);
    assert_eq!(revision_in(&shown), pushed, "{shown}");
    for file in [
        "schema.cedarschema",
        "policies/acme.cedar",
        "entities/users.entities.json",
    ] {
        assert!(shown.contains(file), "{file}: {shown}");
    }

    let out = policy_at(&ep, &["diff", dir]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("0 added, 0 changed, 0 removed"),
        "{}",
        stdout(&out)
    );

    std::fs::write(
        tree.join("policies/new.cedar"),
        "forbid(principal, action, resource);\n",
    )
    .expect("write");
    std::fs::remove_file(tree.join("policies/globex.cedar")).expect("remove");
    let acme = tree.join("policies/acme.cedar");
    let text = std::fs::read_to_string(&acme).expect("read");
    std::fs::write(&acme, format!("{text}\n// reviewed\n")).expect("write");
    let out = policy_at(&ep, &["diff", dir]);
    assert_exit(&out, 0);
    let listed = stdout(&out);
    for line in [
        "+ policies/new.cedar",
        "~ policies/acme.cedar",
        "- policies/globex.cedar",
        "1 added, 1 changed, 1 removed",
    ] {
        assert!(
            listed.lines().any(|l| l.starts_with(line)),
            "{line}: {listed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_refuses_an_invalid_tree_and_a_stale_expected_revision() {
    let (_etcd, ep, _copy, tree) = etcd_and_example().await;
    let dir = tree.to_str().expect("utf-8");

    let first = push_ok(&ep, dir, &[]);
    let first_arg = first.to_string();
    let second = push_ok(&ep, dir, &["--expect-revision", &first_arg]);
    assert!(second > first);

    // Someone else published at `second`: a push that only saw `first` is refused.
    let out = policy_at(&ep, &["push", dir, "--expect-revision", &first_arg]);
    assert_exit(&out, 1);
    let refusal = stderr(&out);
    assert!(refusal.contains("refused"), "{refusal}");
    assert!(refusal.contains(&format!("revision {second}")), "{refusal}");
    assert!(
        refusal.contains(&format!("expected revision {first}")),
        "{refusal}"
    );
    assert_eq!(revision_in(&stdout(&policy_at(&ep, &["show"]))), second);

    // A broken tree is never published.
    std::fs::write(tree.join("policies/acme.cedar"), "permit(").expect("write");
    let out = policy_at(&ep, &["push", dir]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("acme.cedar:1:"), "{}", stderr(&out));
    assert_eq!(revision_in(&stdout(&policy_at(&ep, &["show"]))), second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_replays_at_an_old_revision_and_refuses_a_compacted_one() {
    let (_etcd, ep, _copy, tree) = etcd_and_example().await;
    let dir = tree.to_str().expect("utf-8");
    let granted = push_ok(&ep, dir, &[]);

    // Revoke acme's editors.
    let acme = tree.join("policies/acme.cedar");
    let text = std::fs::read_to_string(&acme).expect("read");
    let revoked = text.replace("Action::\"read\", Action::\"write\"", "Action::\"read\"");
    assert_ne!(text, revoked);
    std::fs::write(&acme, revoked).expect("write");
    let denied = push_ok(&ep, dir, &[]);

    let request = r#"{"principal": "User::\"alice\"", "action": "Action::\"write\"", "resource": "Doc::\"acme/plan\""}"#;
    let explain = |revision: i64| {
        let revision = revision.to_string();
        policy_at(&ep, &["explain", "--revision", &revision, request])
    };
    let out = explain(granted);
    assert_exit(&out, 0);
    let answer: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(answer["decision"], "allow", "{answer}");
    assert_eq!(answer["policy_ids"], serde_json::json!(["acme-editors"]));
    assert_eq!(answer["revision"], granted);

    let out = explain(denied);
    assert_exit(&out, 0);
    let answer: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(answer["decision"], "deny", "{answer}");
    assert_eq!(answer["revision"], denied);

    // A decision-log line carries its own revision.
    let line = format!(
        r#"{{"decision_id":"d1","revision":{granted},"path":"/v1/authorize","input":{request},"result":{{"decision":"allow","policy_ids":["acme-editors"]}}}}"#
    );
    let out = policy_at(&ep, &["explain", &line]);
    assert_exit(&out, 0);
    let answer: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(
        (&answer["decision"], &answer["revision"]),
        (&Value::from("allow"), &Value::from(granted))
    );

    etcdctl(&ep, &["compact", &denied.to_string()]);
    let out = explain(granted);
    assert_exit(&out, 1);
    let expected =
        format!("revision {granted} has been compacted; the oldest available is {denied}");
    assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    assert_exit(&explain(denied), 0);
}
