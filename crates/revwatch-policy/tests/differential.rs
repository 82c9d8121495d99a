//! The decision indexes against their engines: a differential run over random rule sets per
//! backend, and one test per indexing rule.

use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityUid, PolicyId, PolicySet, Request, Response,
    SlotId,
};
use revwatch_policy::index::casbin::{CasbinIndex, Row, plain_enforcer};
use revwatch_policy::index::cedar::CedarIndex;
use revwatch_policy::index::{
    Mismatches, ReloadRun, differential_casbin, differential_casbin_reload, differential_cedar,
    differential_cedar_reload,
};
use serde_json::json;

const SEEDS: [u64; 4] = [1, 2, 3, 0x5EED_CAFE];
const REQUESTS_PER_SEED: usize = 5_000;

/// Runs `differential` over every seed, checks each request was decided, and returns the runs
/// after asserting none of them found a mismatch.
fn run_seeds(backend: &str, differential: fn(u64, usize) -> Mismatches) -> Vec<Mismatches> {
    let runs: Vec<Mismatches> = SEEDS
        .iter()
        .map(|&seed| differential(seed, REQUESTS_PER_SEED))
        .collect();
    let requests: usize = runs.iter().map(|r| r.requests).sum();
    assert_eq!(requests, SEEDS.len() * REQUESTS_PER_SEED);
    let mismatches: usize = runs.iter().map(|r| r.count).sum();
    let first = runs.iter().flat_map(|r| r.examples.first()).next();
    assert_eq!(
        mismatches,
        0,
        "{backend}: {mismatches} of {requests} requests differ; first:\n{}",
        first.map(ToString::to_string).unwrap_or_default()
    );
    runs
}

#[test]
fn cedar_index_matches_the_authorizer_on_random_sets() {
    let runs = run_seeds("cedar", differential_cedar);
    assert!(runs.iter().all(|r| r.fallback_worlds == 0));
}

#[test]
fn casbin_index_matches_the_enforcer_on_random_sets() {
    let runs = run_seeds("casbin", differential_casbin);
    // The declined matchers were drawn, and most worlds were indexed.
    let worlds: usize = runs.iter().map(|r| r.worlds).sum();
    let fallback: usize = runs.iter().map(|r| r.fallback_worlds).sum();
    assert!(
        fallback > 0 && fallback < worlds / 4,
        "{fallback} of {worlds}"
    );
}

#[test]
fn differential_runs_are_reproducible() {
    assert_eq!(differential_cedar(9, 300), differential_cedar(9, 300));
    assert_eq!(differential_casbin(9, 300), differential_casbin(9, 300));
}

// ---- Reloads: the delta path of activation ---------------------------------------------

const RELOAD_STEPS: usize = 250;

/// Asserts a reload run found no difference (delta against fresh compile, and against the
/// plain engine), and that it exercised deltas, full compiles and rejections.
fn check_reload(what: &str, run: &ReloadRun) {
    let first = run.mismatches.examples.first();
    assert_eq!(
        run.mismatches.count,
        0,
        "{what}: {} differences; first:\n{}",
        run.mismatches.count,
        first.map(ToString::to_string).unwrap_or_default()
    );
    assert_eq!(run.steps, RELOAD_STEPS, "{what}");
    let accepted = run.steps - run.rejected;
    assert!(
        run.deltas as usize > accepted / 2 && run.deltas < run.steps as u64,
        "{what}: {} deltas, {accepted} accepted of {} steps",
        run.deltas,
        run.steps
    );
    assert!(run.rejected > 0, "{what}: no candidate was rejected");
}

#[test]
fn cedar_one_key_reloads_match_a_fresh_compile_and_the_authorizer() {
    for seed in [1, 2] {
        check_reload(
            &format!("cedar seed {seed}"),
            &differential_cedar_reload(seed, RELOAD_STEPS, false),
        );
    }
}

#[test]
fn cedar_one_key_reloads_with_a_schema_match_a_fresh_compile_and_the_authorizer() {
    for seed in [1, 2] {
        check_reload(
            &format!("cedar with schema, seed {seed}"),
            &differential_cedar_reload(seed, RELOAD_STEPS, true),
        );
    }
}

#[test]
fn casbin_one_key_reloads_match_a_fresh_compile_and_the_enforcer() {
    // The seed modulo 3 picks the model: RBAC, RBAC with domains, one the index declines.
    for seed in [0, 1, 3, 4] {
        let run = differential_casbin_reload(seed, RELOAD_STEPS);
        check_reload(&format!("casbin seed {seed}"), &run);
    }
}

#[test]
fn casbin_reloads_of_a_declined_model_build_a_fresh_enforcer_each_time() {
    let run = differential_casbin_reload(2, RELOAD_STEPS);
    assert_eq!(
        run.mismatches.count,
        0,
        "{:?}",
        run.mismatches.examples.first()
    );
    assert_eq!(run.deltas, 0);
}

// ---- Cedar: one test per indexing rule --------------------------------------------------

struct CedarCase {
    set: PolicySet,
    entities: Entities,
}

impl CedarCase {
    fn new(policies: &str, entities: serde_json::Value) -> CedarCase {
        CedarCase {
            set: PolicySet::from_str(policies).expect("policies parse"),
            entities: Entities::from_json_value(entities, None).expect("entities parse"),
        }
    }

    /// Decides with the index, asserts the authorizer agrees in every detail, and returns the
    /// decision and its sorted reasons.
    fn decide(&self, principal: &str, action: &str, resource: &str) -> (Decision, Vec<String>) {
        let uid = |s: &str| EntityUid::from_str(s).expect("uid parses");
        let request = Request::new(
            uid(principal),
            uid(action),
            uid(resource),
            Context::from_json_value(json!({"hour": 10}), None).expect("context"),
            None,
        )
        .expect("request");
        let index = CedarIndex::build(&self.set);
        assert!(index.is_indexed());
        let indexed = index.is_authorized(&request, &self.entities);
        let engine = Authorizer::new().is_authorized(&request, &self.set, &self.entities);
        assert_eq!(
            details(&indexed),
            details(&engine),
            "{principal} {action} {resource}"
        );
        let (decision, reasons, _) = details(&indexed);
        (decision, reasons)
    }
}

fn details(response: &Response) -> (Decision, Vec<String>, Vec<String>) {
    let mut reasons: Vec<String> = response
        .diagnostics()
        .reason()
        .map(|id| id.to_string())
        .collect();
    reasons.sort();
    let mut errors: Vec<String> = response
        .diagnostics()
        .errors()
        .map(|e| e.to_string())
        .collect();
    errors.sort();
    (response.decision(), reasons, errors)
}

const ALICE: &str = r#"User::"alice""#;
const READ: &str = r#"Action::"read""#;
const DOC: &str = r#"Doc::"d""#;

fn hierarchy() -> serde_json::Value {
    json!([
        {"uid": {"type": "User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Group", "id": "staff"}]},
        {"uid": {"type": "Group", "id": "staff"}, "attrs": {}, "parents": [{"type": "Group", "id": "all"}]},
        {"uid": {"type": "Group", "id": "all"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Action", "id": "read"}, "attrs": {}, "parents": [{"type": "Action", "id": "view"}]},
        {"uid": {"type": "Action", "id": "view"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Doc", "id": "d"}, "attrs": {}, "parents": [{"type": "Folder", "id": "f"}]},
        {"uid": {"type": "Folder", "id": "f"}, "attrs": {}, "parents": []}
    ])
}

#[test]
fn cedar_equality_scopes_match_only_the_same_uid() {
    let case = CedarCase::new(
        r#"permit(principal == User::"alice", action == Action::"read", resource == Doc::"d");"#,
        hierarchy(),
    );
    assert_eq!(case.decide(ALICE, READ, DOC).0, Decision::Allow);
    // `==` on a group does not reach its members.
    let case = CedarCase::new(
        r#"permit(principal == Group::"staff", action, resource);"#,
        hierarchy(),
    );
    assert_eq!(case.decide(ALICE, READ, DOC).0, Decision::Deny);
}

#[test]
fn cedar_in_scopes_follow_transitive_ancestors() {
    let case = CedarCase::new(
        r#"permit(principal in Group::"all", action, resource in Folder::"f");"#,
        hierarchy(),
    );
    assert_eq!(case.decide(ALICE, READ, DOC).0, Decision::Allow);
    // `in` holds for the entity itself, even one missing from the store.
    let case = CedarCase::new(
        r#"permit(principal in User::"ghost", action, resource);"#,
        hierarchy(),
    );
    assert_eq!(
        case.decide(r#"User::"ghost""#, READ, DOC).0,
        Decision::Allow
    );
    // An entity missing from the store has no ancestors.
    let case = CedarCase::new(
        r#"permit(principal in Group::"all", action, resource);"#,
        hierarchy(),
    );
    assert_eq!(case.decide(r#"User::"ghost""#, READ, DOC).0, Decision::Deny);
}

#[test]
fn cedar_is_scopes_check_the_type() {
    let case = CedarCase::new(
        "permit(principal is User, action, resource is Doc);\n\
         permit(principal is Group, action, resource);",
        hierarchy(),
    );
    assert_eq!(
        case.decide(ALICE, READ, DOC),
        (Decision::Allow, vec!["policy0".to_string()])
    );
    assert_eq!(case.decide(ALICE, READ, r#"Folder::"f""#).0, Decision::Deny);
}

#[test]
fn cedar_is_in_scopes_check_type_and_ancestry() {
    let case = CedarCase::new(
        r#"permit(principal is User in Group::"all", action, resource is Doc in Folder::"f");"#,
        hierarchy(),
    );
    assert_eq!(case.decide(ALICE, READ, DOC).0, Decision::Allow);
    assert_eq!(
        case.decide(r#"Group::"staff""#, READ, DOC).0,
        Decision::Deny
    );
    assert_eq!(
        case.decide(ALICE, READ, r#"Doc::"elsewhere""#).0,
        Decision::Deny
    );
}

#[test]
fn cedar_action_lists_and_groups_come_from_the_entity_store() {
    let case = CedarCase::new(
        r#"permit(principal, action in [Action::"write", Action::"view"], resource);
           permit(principal, action in Action::"view", resource) when { context.hour > 5 };
           permit(principal, action in [Action::"read", Action::"view"], resource) when { context.hour > 5 };"#,
        hierarchy(),
    );
    let (decision, reasons) = case.decide(ALICE, READ, DOC);
    assert_eq!(decision, Decision::Allow);
    // The third policy is filed under two entities `read` reaches, and is reported once.
    assert_eq!(reasons, ["policy0", "policy1", "policy2"]);
    // Without the action entity there is no group membership.
    assert_eq!(
        case.decide(ALICE, r#"Action::"other""#, DOC).0,
        Decision::Deny
    );
}

#[test]
fn cedar_forbid_overrides_permit_and_is_the_only_reason() {
    let case = CedarCase::new(
        "permit(principal, action, resource);\n\
         forbid(principal in Group::\"staff\", action, resource);\n\
         forbid(principal, action, resource) when { context.hour > 5 };",
        hierarchy(),
    );
    assert_eq!(
        case.decide(ALICE, READ, DOC),
        (
            Decision::Deny,
            vec!["policy1".to_string(), "policy2".to_string()]
        )
    );
}

#[test]
fn cedar_erroring_policies_are_skipped_and_reported() {
    let case = CedarCase::new(
        "permit(principal, action, resource);\n\
         forbid(principal, action, resource) when { principal.level > 1 };",
        hierarchy(),
    );
    // The forbid errors (no `level`), so Cedar skips it and the permit allows.
    let index = CedarIndex::build(&case.set);
    let uid = |s: &str| EntityUid::from_str(s).expect("uid");
    let request =
        Request::new(uid(ALICE), uid(READ), uid(DOC), Context::empty(), None).expect("request");
    let response = index.is_authorized(&request, &case.entities);
    assert_eq!(response.decision(), Decision::Allow);
    let errored: Vec<&PolicyId> = response
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => e.policy_id(),
        })
        .collect();
    assert_eq!(errored, [&PolicyId::new("policy1")]);
    assert_eq!(case.decide(ALICE, READ, DOC).0, Decision::Allow);
}

#[test]
fn cedar_template_links_are_indexed_by_their_values() {
    let mut case = CedarCase::new(
        r#"permit(principal in ?principal, action, resource == ?resource) when { context.hour > 5 };
           forbid(principal == ?principal, action, resource);"#,
        hierarchy(),
    );
    let uid = |s: &str| EntityUid::from_str(s).expect("uid");
    let links = [
        ("policy0", "staff-d", r#"Group::"staff""#, Some(DOC)),
        ("policy1", "no-bob", r#"User::"bob""#, None),
    ];
    for (template, id, principal, resource) in links {
        let mut values = std::collections::HashMap::from([(SlotId::principal(), uid(principal))]);
        if let Some(resource) = resource {
            values.insert(SlotId::resource(), uid(resource));
        }
        case.set
            .link(PolicyId::new(template), PolicyId::new(id), values)
            .expect("link");
    }
    assert_eq!(
        case.decide(ALICE, READ, DOC),
        (Decision::Allow, vec!["staff-d".to_string()])
    );
    assert_eq!(
        case.decide(r#"User::"bob""#, READ, DOC),
        (Decision::Deny, vec!["no-bob".to_string()])
    );
}

#[test]
fn cedar_empty_set_denies_without_reasons() {
    let case = CedarCase::new("", hierarchy());
    assert_eq!(case.decide(ALICE, READ, DOC), (Decision::Deny, vec![]));
}

// ---- casbin: one test per indexing rule --------------------------------------------------

const RBAC: &str = "[request_definition]\nr = sub, obj, act\n[policy_definition]\np = sub, obj, act, eft\n\
[role_definition]\ng = _, _\n[policy_effect]\ne = EFFECT\n[matchers]\n\
m = g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act\n";

const DOMAINS: &str = "[request_definition]\nr = sub, dom, obj, act\n[policy_definition]\np = sub, dom, obj, act\n\
[role_definition]\ng = _, _, _\n[policy_effect]\ne = some(where (p.eft == allow))\n[matchers]\n\
m = g(r.sub, p.sub, r.dom) && r.dom == p.dom && r.obj == p.obj && r.act == p.act\n";

fn rbac(effect: &str) -> String {
    RBAC.replace("EFFECT", effect)
}

fn rows(text: &str) -> Vec<Row> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut fields = line.split(',').map(str::trim);
            let ptype = fields.next().unwrap_or_default();
            Row::new(ptype, fields)
        })
        .collect()
}

/// Decides with the index, asserts the enforcer agrees (decision and explained rows), and
/// returns the decision and the determining row.
fn casbin_decide(model: &str, rows: &[Row], request: &[&str]) -> (bool, Option<usize>) {
    let index = CasbinIndex::build(model, rows).expect("model is indexable");
    let decision = index.enforce(request).expect("request arity");
    let engine = futures::executor::block_on(plain_enforcer(model, rows)).expect("enforcer");
    let (allowed, explained) =
        casbin::CoreApi::enforce_ex(&engine, request.to_vec()).expect("enforce");
    let indexed_rows: Vec<Vec<String>> = decision
        .explain
        .iter()
        .map(|&at| rows[at].values.clone())
        .collect();
    assert_eq!(
        (decision.allowed, indexed_rows),
        (allowed, explained),
        "{request:?}"
    );
    (decision.allowed, decision.determining_row())
}

#[test]
fn casbin_roles_are_followed_transitively() {
    let model = rbac("some(where (p.eft == allow))");
    let rows = rows(
        "p, admin, doc, read, allow\n\
         g, alice, staff\n\
         g, staff, admin",
    );
    assert_eq!(
        casbin_decide(&model, &rows, &["alice", "doc", "read"]),
        (true, Some(0))
    );
    assert_eq!(
        casbin_decide(&model, &rows, &["admin", "doc", "read"]),
        (true, Some(0))
    );
    assert_eq!(
        casbin_decide(&model, &rows, &["bob", "doc", "read"]),
        (false, None)
    );
    assert_eq!(
        casbin_decide(&model, &rows, &["alice", "doc", "write"]),
        (false, None)
    );
}

#[test]
fn casbin_role_chains_stop_at_the_hierarchy_limit() {
    let model = rbac("some(where (p.eft == allow))");
    let mut text = String::from("p, c9, doc, read, allow\np, c10, doc, write, allow\n");
    for i in 0..12 {
        text.push_str(&format!("g, c{i}, c{}\n", i + 1));
    }
    let rows = rows(&text);
    // Nine links away is reached, ten is not: casbin's role manager stops there.
    assert!(casbin_decide(&model, &rows, &["c0", "doc", "read"]).0);
    assert!(!casbin_decide(&model, &rows, &["c0", "doc", "write"]).0);
    assert!(casbin_decide(&model, &rows, &["c1", "doc", "write"]).0);
}

#[test]
fn casbin_deny_rows_follow_each_effect() {
    let rows = rows(
        "p, alice, doc, read, allow\n\
         p, staff, doc, read, deny\n\
         g, alice, staff",
    );
    let request = ["alice", "doc", "read"];
    let allow_override = rbac("some(where (p.eft == allow))");
    assert_eq!(
        casbin_decide(&allow_override, &rows, &request),
        (true, Some(0))
    );
    let deny_override = rbac("!some(where (p.eft == deny))");
    assert_eq!(
        casbin_decide(&deny_override, &rows, &request),
        (false, Some(1))
    );
    let allow_and_deny = rbac("some(where (p.eft == allow)) && !some(where (p.eft == deny))");
    assert_eq!(
        casbin_decide(&allow_and_deny, &rows, &request),
        (false, Some(1))
    );
    let priority = rbac("priority(p.eft) || deny");
    assert_eq!(casbin_decide(&priority, &rows, &request), (true, Some(0)));
}

#[test]
fn casbin_repeated_rows_are_dropped_and_move_back() {
    // casbin keeps one copy and moves it behind the rows loaded since, so under
    // `priority` the deny row now comes first.
    let rows = rows(
        "p, alice, doc, read, allow\n\
         p, alice, doc, read, deny\n\
         p, alice, doc, read, allow",
    );
    let priority = rbac("priority(p.eft) || deny");
    assert_eq!(
        casbin_decide(&priority, &rows, &["alice", "doc", "read"]),
        (false, Some(1))
    );
    let index = CasbinIndex::build(&priority, &rows).expect("indexable");
    assert_eq!(index.policy_rows(), 2);
}

#[test]
fn casbin_domains_keep_roles_apart() {
    let rows = rows(
        "p, admin, d1, doc, read\n\
         p, admin, d2, doc, read\n\
         g, alice, admin, d1",
    );
    assert_eq!(
        casbin_decide(DOMAINS, &rows, &["alice", "d1", "doc", "read"]),
        (true, Some(0))
    );
    assert_eq!(
        casbin_decide(DOMAINS, &rows, &["alice", "d2", "doc", "read"]),
        (false, None)
    );
    assert_eq!(
        casbin_decide(DOMAINS, &rows, &["alice", "d3", "doc", "read"]),
        (false, None)
    );
}

#[test]
fn casbin_without_rows_matches_empty_fields() {
    let model = rbac("some(where (p.eft == allow))");
    let rows = rows("g, alice, staff");
    assert_eq!(casbin_decide(&model, &rows, &["", "", ""]), (true, None));
    assert_eq!(
        casbin_decide(&model, &rows, &["alice", "", ""]),
        (false, None)
    );
}

#[test]
fn casbin_requests_of_the_wrong_arity_fail() {
    let model = rbac("some(where (p.eft == allow))");
    let index = CasbinIndex::build(&model, &rows("p, a, b, c, allow")).expect("indexable");
    assert!(index.enforce(&["a", "b"]).is_err());
}

#[test]
fn casbin_declines_what_it_cannot_decide_exactly() {
    let keymatch = RBAC
        .replace("EFFECT", "some(where (p.eft == allow))")
        .replace("r.obj == p.obj", "keyMatch(r.obj, p.obj)");
    assert!(CasbinIndex::build(&keymatch, &[]).is_none());
    let unknown_effect = rbac("some(where (p.eft == allow)) || true");
    assert!(CasbinIndex::build(&unknown_effect, &[]).is_none());
    // A row with the wrong number of fields fails casbin at enforce time.
    let model = rbac("some(where (p.eft == allow))");
    assert!(CasbinIndex::build(&model, &rows("p, a, b")).is_none());
    assert!(CasbinIndex::build(&model, &rows("g, a")).is_none());
}
