//! Policy files of the tests: a valid Cedar set (with a schema) and a valid casbin
//! set (RBAC with domains and `regexMatch`), and one bad input per trap.

use serde_json::json;

use revwatch_policy::Request;

pub const CEDAR_SCHEMA: &str = r#"
entity Group;
entity User in [Group];
entity Doc;
action read appliesTo { principal: [User], resource: [Doc] };
"#;

pub const CEDAR_POLICY: &str = r#"
@id("admins-read")
permit(principal in Group::"admins", action == Action::"read", resource);
"#;

pub const CEDAR_ENTITIES: &str = r#"[
  {"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Group", "id": "admins"}]},
  {"uid": {"type": "Group", "id": "admins"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Doc", "id": "d1"}, "attrs": {}, "parents": []}
]"#;

/// The valid Cedar tree: (path, content).
pub fn cedar_tree() -> Vec<(&'static str, &'static str)> {
    vec![
        ("schema.cedarschema", CEDAR_SCHEMA),
        ("policies/main.cedar", CEDAR_POLICY),
        ("entities/users.entities.json", CEDAR_ENTITIES),
    ]
}

pub fn cedar_request() -> Request {
    Request::new(r#"User::"alice""#, r#"Action::"read""#, r#"Doc::"d1""#)
}

/// Bad Cedar inputs: (what, path, value). Each is rejected alone.
pub fn cedar_bad_inputs(size_limit: usize) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "malformed policy",
            "policies/bad.cedar",
            b"permit(principal ==, action, resource);".to_vec(),
        ),
        (
            "schema violation",
            "policies/bad.cedar",
            b"permit(principal, action == Action::\"read\", resource) when { resource.nosuch == 1 };"
                .to_vec(),
        ),
        ("invalid UTF-8", "policies/bad.cedar", vec![b'/', b'/', 0xff, 0xfe]),
        ("value over the size limit", "policies/big.cedar", {
            let mut v = b"// ".to_vec();
            v.resize(size_limit + 1, b'x');
            v
        }),
        (
            "entity with an unknown parent",
            "entities/bad.entities.json",
            json!([{"uid": {"type": "User", "id": "bob"}, "attrs": {},
                    "parents": [{"type": "Group", "id": "nosuch"}]}])
            .to_string()
            .into_bytes(),
        ),
    ]
}

pub const CASBIN_MODEL: &str = "[request_definition]
r = sub, dom, obj, act

[policy_definition]
p = sub, dom, obj, act

[role_definition]
g = _, _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.sub, r.dom) && r.dom == p.dom && regexMatch(r.obj, p.obj) && r.act == p.act
";

pub const CASBIN_ROWS: &str = "p, admin, t1, ^/docs/.*, read
g, alice, admin, t1
";

pub fn casbin_tree() -> Vec<(&'static str, &'static str)> {
    vec![("model.conf", CASBIN_MODEL), ("rows/main.csv", CASBIN_ROWS)]
}

pub fn casbin_request() -> Request {
    Request::new("alice", "read", "/docs/a").with_context(json!({"dom": "t1"}))
}

/// Bad casbin inputs: (what, path, value). Each is rejected alone.
pub fn casbin_bad_inputs(size_limit: usize) -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "row of the wrong arity",
            "rows/bad.csv",
            b"p, bob, t1, /x\n".to_vec(),
        ),
        (
            "unknown section in model.conf",
            "model.conf",
            format!("{CASBIN_MODEL}\n[nosuch_section]\nx = 1\n").into_bytes(),
        ),
        (
            "invalid regex in a regexMatch row",
            "rows/bad.csv",
            b"p, bob, t1, /x(, read\n".to_vec(),
        ),
        (
            "unknown effect expression",
            "model.conf",
            CASBIN_MODEL
                .replace(
                    "e = some(where (p.eft == allow))",
                    "e = some(where (p.eft == allow)) || some(where (p.eft == deny))",
                )
                .into_bytes(),
        ),
        ("invalid UTF-8", "rows/bad.csv", vec![b'p', b',', 0xff]),
        ("value over the size limit", "rows/big.csv", {
            let mut v = b"# ".to_vec();
            v.resize(size_limit + 1, b'x');
            v
        }),
    ]
}
