//! The backends without a server: compiling trees (read offline, so keys are
//! named by path) and deciding, for the cases the pipeline tests do not cover.

use revwatch_policy::layout::Tree;
use revwatch_policy::{Backend, DecideError, Engine, Limits, Request};
use serde_json::json;
use std::sync::Arc;

fn compile(
    backend: Backend,
    files: &[(&str, &str)],
) -> Result<Arc<dyn Engine>, revwatch_policy::Rejection> {
    let tree = Tree::from_files(files.iter().map(|(p, v)| (p.to_string(), v.to_string()))).unwrap();
    backend.compiler(Limits::default()).compile(&tree, "p/")
}

#[test]
fn cedar_policy_ids_are_the_id_annotation_else_path_and_position() {
    let engine = compile(
        Backend::Cedar,
        &[
            ("a.cedar", "permit(principal, action, resource);\n@id(\"named\") permit(principal, action, resource);\npermit(principal, action, resource);"),
        ],
    )
    .unwrap();
    let v = engine
        .decide(&Request::new(
            r#"User::"u""#,
            r#"Action::"a""#,
            r#"Doc::"d""#,
        ))
        .unwrap();
    assert!(v.allowed);
    assert_eq!(v.policy_ids, ["a.cedar#0", "a.cedar#2", "named"]);
}

#[test]
fn cedar_duplicate_ids_are_rejected_naming_both_keys() {
    let err = compile(
        Backend::Cedar,
        &[
            ("a.cedar", "@id(\"x\") permit(principal, action, resource);"),
            ("b.cedar", "@id(\"x\") forbid(principal, action, resource);"),
        ],
    )
    .err()
    .unwrap();
    assert_eq!(err.key, "p/b.cedar");
    assert!(err.message.contains("p/a.cedar"), "{}", err.message);
}

#[test]
fn cedar_context_is_parsed_with_the_schema() {
    let schema = r#"
        entity User; entity Doc;
        action read appliesTo { principal: [User], resource: [Doc], context: { ip: ipaddr } };
    "#;
    let policy = r#"@id("lan") permit(principal, action == Action::"read", resource)
        when { context.ip.isInRange(ip("10.0.0.0/8")) };"#;
    let engine = compile(
        Backend::Cedar,
        &[("schema.cedarschema", schema), ("p.cedar", policy)],
    )
    .unwrap();
    let request =
        |ctx| Request::new(r#"User::"u""#, r#"Action::"read""#, r#"Doc::"d""#).with_context(ctx);
    // A plain string works for the extension type: the schema says it is an ip.
    let v = engine.decide(&request(json!({"ip": "10.1.2.3"}))).unwrap();
    assert!(v.allowed);
    assert_eq!(v.policy_ids, ["lan"]);
    assert!(
        !engine
            .decide(&request(json!({"ip": "192.168.0.1"})))
            .unwrap()
            .allowed
    );
    // A missing context, or an empty one, lacks the attribute the schema requires.
    let bare = Request::new(r#"User::"u""#, r#"Action::"read""#, r#"Doc::"d""#);
    for missing in [engine.decide(&bare), engine.decide(&request(json!({})))] {
        assert!(
            matches!(missing, Err(DecideError::BadRequest { .. })),
            "{missing:?}"
        );
    }
    // Context of the wrong type: an error for this request only.
    assert!(matches!(
        engine.decide(&request(json!({"ip": 5}))),
        Err(DecideError::BadRequest {
            field: "context",
            ..
        })
    ));
    assert!(matches!(
        engine.decide(&Request::new(r#"User::"u""#, "read", r#"Doc::"d""#)),
        Err(DecideError::BadRequest {
            field: "action",
            ..
        })
    ));
}

const MODEL: &str = "[request_definition]
r = sub, obj, act
[policy_definition]
p = sub, obj, act, eft
[role_definition]
g = _, _
[policy_effect]
e = some(where (p.eft == allow)) && !some(where (p.eft == deny))
[matchers]
m = g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act
";

#[test]
fn casbin_reports_the_matched_rule_and_deny_overrides() {
    let rows = "# roles\ng, alice, reader\ng, bob, reader\n\np, reader, doc, read, allow\np, bob, doc, read, deny\n";
    let engine = compile(
        Backend::Casbin,
        &[("model.conf", MODEL), ("rules/a.csv", rows)],
    )
    .unwrap();
    assert_eq!(engine.policy_count(), 2);
    let v = engine
        .decide(&Request::new("alice", "read", "doc"))
        .unwrap();
    assert!(v.allowed);
    assert_eq!(v.policy_ids, ["rules/a.csv:5"]);
    let v = engine.decide(&Request::new("bob", "read", "doc")).unwrap();
    assert!(!v.allowed);
    // As casbin's `enforce_ex` explains it: the rows that matched up to the deny.
    assert_eq!(v.policy_ids, ["rules/a.csv:5", "rules/a.csv:6"]);
    assert!(
        !engine
            .decide(&Request::new("carol", "read", "doc"))
            .unwrap()
            .allowed
    );
}

#[test]
fn casbin_rows_are_checked_against_the_model() {
    for (rows, needle) in [
        ("g, alice\n", "`g` row has 1 fields"),
        ("p, alice, doc, read\n", "`p` row has 3 fields"),
        (
            "p2, alice, doc, read, allow\n",
            "row type `p2` is not defined",
        ),
    ] {
        let err = compile(Backend::Casbin, &[("model.conf", MODEL), ("r.csv", rows)])
            .err()
            .unwrap();
        assert_eq!(err.key, "p/r.csv");
        assert!(err.message.contains(needle), "{rows:?}: {}", err.message);
    }
    let err = compile(Backend::Casbin, &[("r.csv", "p, a, b, c, allow")])
        .err()
        .unwrap();
    assert_eq!(err.key, "p/model.conf");
    let outside = format!("x = 1\n{MODEL}");
    let err = compile(Backend::Casbin, &[("model.conf", outside.as_str())])
        .err()
        .unwrap();
    assert!(
        err.message.contains("outside any section"),
        "{}",
        err.message
    );
}

/// Rows that casbin-rs would compile into an invalid regex (and panic on at every
/// decision reaching them) are rejected before activation, for every matching
/// function that compiles its pattern, naming the file and the function.
#[test]
fn casbin_rows_casbin_would_panic_on_are_rejected_before_activation() {
    for (function, row) in [
        ("regexMatch", "p, alice, /a/(b, read, allow\n"),
        ("keyMatch2", "p, alice, /a/:id/(b, read, allow\n"),
        ("keyMatch3", "p, alice, /a/{id}/[, read, allow\n"),
        ("keyMatch4", "p, alice, /a/{id}?, read, allow\n"),
        ("keyMatch5", "p, alice, /a/{id}/(, read, allow\n"),
    ] {
        let model = MODEL.replace("r.obj == p.obj", &format!("{function}(r.obj, p.obj)"));
        let err = compile(Backend::Casbin, &[("model.conf", &model), ("r.csv", row)])
            .err()
            .unwrap_or_else(|| panic!("{function}: {row:?} accepted"));
        assert_eq!(err.key, "p/r.csv");
        assert!(
            err.message.contains(function),
            "{function}: {}",
            err.message
        );
        // The same function with a sound pattern activates and decides.
        let good = compile(
            Backend::Casbin,
            &[
                ("model.conf", &model),
                ("r.csv", "p, alice, /a/b, read, allow\n"),
            ],
        )
        .unwrap();
        assert!(
            good.decide(&Request::new("alice", "read", "/a/b"))
                .unwrap()
                .allowed
        );
    }
}

#[test]
fn casbin_panics_on_request_patterns_are_contained() {
    // The pattern comes from the request: it cannot be checked before activation.
    let model = MODEL.replace("r.obj == p.obj", "regexMatch(p.obj, r.obj)");
    let engine = compile(
        Backend::Casbin,
        &[
            ("model.conf", model.as_str()),
            ("r.csv", "p, alice, doc, read, allow\n"),
        ],
    )
    .unwrap();
    assert!(
        engine
            .decide(&Request::new("alice", "read", "d.c"))
            .unwrap()
            .allowed
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        revwatch_policy::engine::decide_contained(&*engine, &Request::new("alice", "read", "(("))
    }))
    .expect("the panic is contained");
    assert!(matches!(result, Err(DecideError::Engine(_))), "{result:?}");
    // The engine still works afterwards.
    assert!(
        engine
            .decide(&Request::new("alice", "read", "doc"))
            .unwrap()
            .allowed
    );
}

#[test]
fn casbin_request_tokens_come_from_context_then_principal_resource_action() {
    let model = MODEL
        .replace("r = sub, obj, act", "r = sub, obj, act, dom")
        .replace("r.act == p.act", "r.act == p.act && r.dom == \"t1\"");
    let engine = compile(
        Backend::Casbin,
        &[
            ("model.conf", model.as_str()),
            ("r.csv", "p, alice, doc, read, allow\n"),
        ],
    )
    .unwrap();
    let req = Request::new("alice", "read", "doc");
    assert!(matches!(
        engine.decide(&req),
        Err(DecideError::BadRequest {
            field: "context",
            ..
        })
    ));
    assert!(
        engine
            .decide(&req.clone().with_context(json!({"dom": "t1"})))
            .unwrap()
            .allowed
    );
    assert!(matches!(
        engine.decide(&req.with_context(json!({"dom": 1}))),
        Err(DecideError::BadRequest {
            field: "context",
            ..
        })
    ));
}

/// The matched rule of a repeated row is its last copy (casbin keeps one copy, at
/// the place of the last), whether the index (RBAC) or the enforcer decides.
#[test]
fn casbin_repeated_rows_report_the_last_copy_on_both_paths() {
    let rows = "p, alice, doc, read, allow\np, bob, doc, read, allow\np, alice, doc, read, allow\n";
    let regex_model = MODEL.replace("r.obj == p.obj", "regexMatch(r.obj, p.obj)");
    for model in [MODEL, regex_model.as_str()] {
        let engine = compile(Backend::Casbin, &[("model.conf", model), ("a.csv", rows)]).unwrap();
        assert_eq!(engine.policy_count(), 2);
        let v = engine
            .decide(&Request::new("alice", "read", "doc"))
            .unwrap();
        assert!(v.allowed);
        assert_eq!(v.policy_ids, ["a.csv:3"], "{model}");
    }
}
