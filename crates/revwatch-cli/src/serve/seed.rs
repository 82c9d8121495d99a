//! The example policy set `serve` writes into the embedded server on its first
//! start (nothing under the prefix yet), so that a new user gets decisions at once
//! and can change them with `etcdctl`.
//!
//! The files are written as direct keys (`<prefix><file>`, no published
//! generation), in one txn that only applies while the prefix is still empty.

use anyhow::Context;
use etcd_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request as Op,
};
use etcd_proto::key_range::KeyRange;
use revwatch::client::{Client, Compare, PutRequest, RequestOp, TxnRequest};
use revwatch_policy::Backend;

/// One backend's example: its files, a question to try, and a key whose put flips
/// that question's answer.
pub struct Example {
    pub files: &'static [(&'static str, &'static str)],
    /// A denied question, as the JSON body of `POST /v1/authorize`.
    pub question: &'static str,
    /// A file to add that allows it.
    pub grant: (&'static str, &'static str),
}

const CEDAR: Example = Example {
    files: &[
        (
            "example.cedar",
            r#"// Seeded by `revwatch serve` on its first start: edit it, or add *.cedar keys.
@id("viewers-read")
permit(principal in Role::"viewer", action == Action::"read", resource);

@id("editors-read-write")
permit(principal in Role::"editor", action in [Action::"read", Action::"write"], resource);
"#,
        ),
        (
            "users.entities.json",
            r#"[
  {"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Role", "id": "editor"}]},
  {"uid": {"type": "User", "id": "bob"}, "attrs": {}, "parents": [{"type": "Role", "id": "viewer"}]},
  {"uid": {"type": "Role", "id": "editor"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Role", "id": "viewer"}, "attrs": {}, "parents": []}
]
"#,
        ),
    ],
    question: r#"{"principal": "User::\"bob\"", "action": "Action::\"write\"", "resource": "Doc::\"plan\""}"#,
    grant: (
        "bob.cedar",
        r#"@id("bob-writes") permit(principal == User::"bob", action == Action::"write", resource);"#,
    ),
};

const CASBIN: Example = Example {
    files: &[
        (
            "model.conf",
            "# Seeded by `revwatch serve` on its first start: RBAC (casbin's basic model).
[request_definition]
r = sub, obj, act

[policy_definition]
p = sub, obj, act

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act
",
        ),
        (
            "policy.csv",
            "p, viewer, plan, read
p, editor, plan, read
p, editor, plan, write
g, alice, editor
g, bob, viewer
",
        ),
    ],
    question: r#"{"principal": "bob", "action": "write", "resource": "plan"}"#,
    grant: ("bob.csv", "p, bob, plan, write"),
};

pub fn example(backend: Backend) -> &'static Example {
    match backend {
        Backend::Cedar => &CEDAR,
        Backend::Casbin => &CASBIN,
    }
}

/// Writes `backend`'s example under `prefix` if nothing is there yet; the
/// revision of the write, or `None` when the prefix already had keys.
pub async fn seed_if_empty(
    client: &Client,
    prefix: &str,
    backend: Backend,
) -> anyhow::Result<Option<i64>> {
    // True iff no key has the prefix: a compare on a range holds for all its keys,
    // and compares an empty range with a zero version.
    let range = KeyRange::prefix(prefix.as_bytes());
    let empty = Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Version as i32,
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        target_union: Some(TargetUnion::Version(0)),
    };
    let puts = example(backend).files.iter().map(|(path, text)| RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: format!("{prefix}{path}").into_bytes(),
            value: text.as_bytes().to_vec(),
            ..Default::default()
        })),
    });
    let response = client
        .txn(TxnRequest {
            compare: vec![empty],
            success: puts.collect(),
            failure: Vec::new(),
        })
        .await
        .context("seeding the example policy set")?;
    Ok(response
        .succeeded
        .then(|| response.header.map_or(0, |h| h.revision)))
}

/// Shell-quotes `text` for the printed commands.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// What to run to try the service and change its policies.
pub fn instructions(backend: Backend, prefix: &str, etcd: &str, url: &str) -> String {
    let example = example(backend);
    let (grant_path, grant_text) = example.grant;
    let files: Vec<String> = example
        .files
        .iter()
        .map(|(path, _)| format!("{prefix}{path}"))
        .collect();
    format!(
        "revwatch serve: the example policy set is in keys {files}. Try:\n\
         \x20 curl -s {url}/v1/authorize -d {question}\n\
         \x20 ETCDCTL_API=3 etcdctl --endpoints {etcd} put {key} {grant}\n\
         \x20 curl -s {url}/v1/authorize -d {question}   # now allowed, at the put's revision",
        files = files.join(", "),
        question = quote(example.question),
        key = quote(&format!("{prefix}{grant_path}")),
        grant = quote(grant_text),
    )
}
