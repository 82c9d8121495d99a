//! Random reloads: sequences of one-key changes to a policy tree (policies, rows, entities,
//! role links, now and then the schema or model), each compiled by a compiler that keeps its
//! state across the sequence (the delta path of activation), by a fresh compiler, and checked
//! against the plain engine (Cedar's `Authorizer`, `casbin::Enforcer`) on the whole set.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;

use casbin::CoreApi;
use cedar_policy::{
    Authorizer, Context, Entities, EntityUid, PolicySet, Request as CedarRequest, Schema,
};
use serde_json::{Value, json};

use super::rng::Rng;
use super::{Mismatch, Mismatches, cedar_outcome, outcome_line};
use crate::casbin::CasbinCompiler;
use crate::cedar::CedarCompiler;
use crate::decision::Request;
use crate::engine::{Compiler, Engine, Limits};
use crate::index::casbin::{Row, plain_enforcer};
use crate::layout::{Tree, TreeFile};
use crate::status::Rejection;

/// The outcome of a reload run.
#[derive(Debug, Clone, Default)]
pub struct ReloadRun {
    /// Requests compared (delta against fresh, and against the plain engine when the set
    /// was accepted), and every difference.
    pub mismatches: Mismatches,
    /// Candidates compiled.
    pub steps: usize,
    /// Candidates the keeping compiler compiled by a delta.
    pub deltas: u64,
    /// Candidates rejected (by both compilers alike, or it is a mismatch).
    pub rejected: usize,
}

const PREFIX: &str = "reload/";

/// A tree of `(path, (mod_revision, text))`.
type Files = BTreeMap<String, (i64, String)>;

fn tree(revision: i64, files: &Files) -> Tree {
    Tree {
        revision,
        files: files
            .iter()
            .map(|(path, (rev, text))| {
                let file = TreeFile {
                    value: bytes::Bytes::copy_from_slice(text.as_bytes()),
                    mod_revision: *rev,
                };
                (path.clone(), file)
            })
            .collect(),
        ..Tree::default()
    }
}

fn describe(files: &Files) -> String {
    let mut text = String::new();
    for (path, (rev, body)) in files {
        let _ = writeln!(text, "--- {path} @{rev}\n{body}");
    }
    text
}

/// Each request's answer (errors sorted), or the rejection.
fn answers(
    engine: &Result<Arc<dyn Engine>, Rejection>,
    requests: &[Request],
) -> Result<Vec<String>, String> {
    let engine = engine.as_ref().map_err(ToString::to_string)?;
    Ok(requests
        .iter()
        .map(|request| {
            let answer = engine.decide(request).map(|mut verdict| {
                verdict.errors.sort();
                verdict.policy_ids.sort();
                verdict
            });
            format!("{answer:?}")
        })
        .collect())
}

/// One step of a run: its files at their revision, for mismatch reports.
struct Step<'a> {
    seed: u64,
    step: usize,
    revision: i64,
    files: &'a Files,
}

impl Step<'_> {
    /// Records a mismatch of this step.
    fn mismatch(
        &self,
        out: &mut ReloadRun,
        request: usize,
        input: String,
        ours: String,
        theirs: String,
    ) {
        out.mismatches.record(|| Mismatch {
            seed: self.seed,
            world: self.step,
            request,
            input,
            indexed: ours,
            engine: theirs,
            rules: describe(self.files),
        });
    }

    /// Compiles the step's tree with the keeping compiler and a fresh `C`, compares
    /// their answers, and returns the set when both accepted the candidate (to
    /// compare with the plain engine).
    fn compare_compiles<C: Compiler>(
        &self,
        out: &mut ReloadRun,
        keeping: &mut C,
        mut fresh: C,
        requests: &[Request],
    ) -> Option<Arc<dyn Engine>> {
        let tree = tree(self.revision, self.files);
        let delta = keeping.compile(&tree, PREFIX);
        let full = fresh.compile(&tree, PREFIX);
        out.steps += 1;
        let (delta_answers, full_answers) = (answers(&delta, requests), answers(&full, requests));
        out.mismatches.requests += requests.len();
        if delta_answers != full_answers {
            let input = "every request of the step".into();
            self.mismatch(
                out,
                0,
                input,
                format!("{delta_answers:?}"),
                format!("{full_answers:?}"),
            );
            return None;
        }
        match (delta, full) {
            (Ok(delta), Ok(full)) if delta.policy_count() == full.policy_count() => Some(delta),
            (Ok(delta), Ok(full)) => {
                let (ours, theirs) = (delta.policy_count(), full.policy_count());
                self.mismatch(
                    out,
                    0,
                    "policy count".into(),
                    ours.to_string(),
                    theirs.to_string(),
                );
                None
            }
            _ => {
                out.rejected += 1;
                None
            }
        }
    }

    /// Compares each request's answer from the compiled set with the plain engine's
    /// (`answer` gives both, ours first).
    fn compare_with_plain(
        &self,
        out: &mut ReloadRun,
        requests: &[Request],
        mut answer: impl FnMut(&Request) -> (String, String),
    ) {
        for (n, request) in requests.iter().enumerate() {
            out.mismatches.requests += 1;
            let (ours, theirs) = answer(request);
            if ours != theirs {
                self.mismatch(out, n, format!("{request:?}"), ours, theirs);
            }
        }
    }
}

// ---------------------------------------------------------------- Cedar

const USERS: usize = 4;
const GROUPS: usize = 2;
const ACTIONS: usize = 3;
const DOCS: usize = 4;

const CEDAR_SCHEMAS: [&str; 2] = [
    "entity Group; entity User in [Group]; entity Doc { owner?: User };\n\
     action a0, a1, a2 appliesTo { principal: User, resource: Doc, context: { flag: Bool } };",
    // The same rules written differently: a new schema revalidates everything.
    "entity Group;\nentity User in [Group];\nentity Doc { owner?: User };\n\
     action a0, a1, a2 appliesTo {\n  principal: [User],\n  resource: [Doc],\n  \
     context: { flag: Bool }\n};\n",
];

fn cedar_policy(rng: &mut Rng, schema: bool) -> String {
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
    let condition = match (rng.below(5), schema) {
        (0, _) => " when { context.flag }",
        // Errors for documents without an owner; a schema makes the check explicit.
        (1, false) => " when { resource.owner == principal }",
        (1, true) => " when { resource has owner && resource.owner == principal }",
        // Fails strict validation (and evaluates to an error without a schema).
        (2, _) if rng.chance(15) => " when { context.missing }",
        _ => "",
    };
    // A few explicit ids, which may collide across files (a rejected candidate).
    let id = if rng.chance(8) {
        format!("@id(\"named{}\") ", rng.below(3))
    } else {
        String::new()
    };
    format!("{id}{effect}({principal}, {action}, {resource}){condition};\n")
}

fn cedar_file(rng: &mut Rng, schema: bool) -> String {
    if rng.chance(4) {
        return "permit(".to_owned();
    }
    (0..rng.below(4))
        .map(|_| cedar_policy(rng, schema))
        .collect()
}

fn cedar_entities(rng: &mut Rng) -> String {
    let users = (0..USERS).map(|u| {
        let parents: Vec<Value> = (0..rng.below(3))
            .map(|_| json!({"type": "Group", "id": format!("g{}", rng.below(GROUPS))}))
            .collect();
        json!({"uid": {"type": "User", "id": format!("u{u}")}, "attrs": {}, "parents": parents})
    });
    let users: Vec<Value> = users.collect();
    let groups = (0..GROUPS).map(
        |g| json!({"uid": {"type": "Group", "id": format!("g{g}")}, "attrs": {}, "parents": []}),
    );
    let docs: Vec<Value> = (0..DOCS)
        .map(|d| {
            let attrs = if rng.chance(60) {
                json!({"owner": {"__entity": {"type": "User", "id": format!("u{}", rng.below(USERS))}}})
            } else {
                json!({})
            };
            json!({"uid": {"type": "Doc", "id": format!("d{d}")}, "attrs": attrs, "parents": []})
        })
        .collect();
    Value::Array(users.into_iter().chain(groups).chain(docs).collect()).to_string()
}

fn cedar_requests() -> Vec<Request> {
    let mut requests = Vec::new();
    for user in 0..USERS {
        for action in 0..ACTIONS {
            for doc in 0..DOCS {
                for flag in [false, true] {
                    requests.push(Request {
                        principal: format!("User::\"u{user}\""),
                        action: format!("Action::\"a{action}\""),
                        resource: format!("Doc::\"d{doc}\""),
                        context: json!({ "flag": flag }),
                    });
                }
            }
        }
    }
    requests
}

/// The set of `files` as plain Cedar sees it: every policy file's policies (named as the
/// compiler names them), the entities, the schema.
fn plain_cedar(files: &Files) -> Option<(PolicySet, Entities, Option<Schema>)> {
    let schema = match files.get(crate::cedar::SCHEMA_FILE) {
        Some((_, text)) => Some(Schema::from_cedarschema_str(text).ok()?.0),
        None => None,
    };
    let mut set = PolicySet::new();
    let mut entities = Vec::new();
    for (path, (_, text)) in files {
        if path.ends_with(crate::cedar::POLICY_SUFFIX) {
            for policy in crate::cedar::parse_policy_file(path, text).ok()? {
                set.add(policy).ok()?;
            }
        } else if path.ends_with(crate::cedar::ENTITIES_SUFFIX) {
            entities.extend(crate::cedar::parse_entities_file(text, schema.as_ref()).ok()?);
        }
    }
    let entities = Entities::from_entities(entities, schema.as_ref()).ok()?;
    Some((set, entities, schema))
}

fn plain_cedar_answer(
    (set, entities, schema): &(PolicySet, Entities, Option<Schema>),
    request: &Request,
) -> String {
    let uid = |text: &str| EntityUid::from_str(text).ok();
    let (Some(principal), Some(action), Some(resource)) = (
        uid(&request.principal),
        uid(&request.action),
        uid(&request.resource),
    ) else {
        return "bad request".into();
    };
    let Ok(context) = Context::from_json_value(
        request.context.clone(),
        schema.as_ref().map(|s| (s, &action)),
    ) else {
        return "bad context".into();
    };
    let Ok(request) = CedarRequest::new(principal, action, resource, context, schema.as_ref())
    else {
        return "bad request".into();
    };
    cedar_outcome(&Authorizer::new().is_authorized(&request, set, entities))
}

fn engine_answer(engine: &dyn Engine, request: &Request) -> String {
    match engine.decide(request) {
        Ok(verdict) => outcome_line(verdict.allowed, verdict.policy_ids, verdict.errors),
        Err(e) => format!("error {e}"),
    }
}

/// `steps` random one-key changes to a Cedar tree of six policy files and an entity file
/// (with `with_schema`, also a schema, rewritten now and then).
pub fn differential_cedar_reload(seed: u64, steps: usize, with_schema: bool) -> ReloadRun {
    let mut rng = Rng::derive(seed, 0xCEDA + u64::from(with_schema));
    let mut out = ReloadRun::default();
    let mut keeping = CedarCompiler::new(Limits::default());
    let requests = cedar_requests();
    let paths: Vec<String> = (0..6).map(|n| format!("policies/f{n}.cedar")).collect();
    let mut files = Files::new();
    let mut revision = 1;
    if with_schema {
        files.insert(
            crate::cedar::SCHEMA_FILE.into(),
            (revision, CEDAR_SCHEMAS[0].into()),
        );
    }
    files.insert(
        "entities.entities.json".into(),
        (revision, cedar_entities(&mut rng)),
    );
    for path in &paths {
        revision += 1;
        let text = (0..3)
            .map(|_| cedar_policy(&mut rng, with_schema))
            .collect();
        files.insert(path.clone(), (revision, text));
    }
    for step in 0..steps {
        revision += 1;
        let path = rng.pick(&paths).clone();
        match rng.below(24) {
            0 | 1 => {
                files.remove(&path);
            }
            2 | 3 => {
                let entities = cedar_entities(&mut rng);
                files.insert("entities.entities.json".into(), (revision, entities));
            }
            4 if with_schema => {
                let schema = CEDAR_SCHEMAS[rng.below(2)].to_owned();
                files.insert(crate::cedar::SCHEMA_FILE.into(), (revision, schema));
            }
            5..=13 => {
                // One policy of the file edited, added or removed; the others unchanged
                // (each policy is one line).
                let text = files.get(&path).map(|(_, t)| t.clone()).unwrap_or_default();
                let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                let at = rng.below(lines.len() + 1);
                match rng.below(3) {
                    0 if at < lines.len() => {
                        lines.remove(at);
                    }
                    1 if at < lines.len() => lines[at] = cedar_policy(&mut rng, with_schema),
                    _ => lines.insert(at, cedar_policy(&mut rng, with_schema)),
                }
                let text = lines
                    .iter()
                    .map(|l| format!("{}\n", l.trim_end()))
                    .collect();
                files.insert(path, (revision, text));
            }
            _ => {
                let text = cedar_file(&mut rng, with_schema);
                files.insert(path, (revision, text));
            }
        }
        let at = Step {
            seed,
            step,
            revision,
            files: &files,
        };
        let fresh = CedarCompiler::new(Limits::default());
        let Some(engine) = at.compare_compiles(&mut out, &mut keeping, fresh, &requests) else {
            continue;
        };
        let Some(plain) = plain_cedar(&files) else {
            let input = "plain Cedar did not load an accepted set".into();
            at.mismatch(&mut out, 0, input, String::new(), String::new());
            continue;
        };
        at.compare_with_plain(&mut out, &requests, |request| {
            (
                engine_answer(&*engine, request),
                plain_cedar_answer(&plain, request),
            )
        });
    }
    out.deltas = keeping.deltas();
    out
}

// ---------------------------------------------------------------- casbin

const CASBIN_EFFECTS: [&str; 4] = [
    "some(where (p.eft == allow))",
    "!some(where (p.eft == deny))",
    "some(where (p.eft == allow)) && !some(where (p.eft == deny))",
    "priority(p.eft) || deny",
];

fn pick_effect(rng: &mut Rng) -> &'static str {
    CASBIN_EFFECTS[rng.below(CASBIN_EFFECTS.len())]
}

/// The model kinds: RBAC, RBAC with domains, and one the index declines (the enforcer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModelKind {
    Rbac,
    Domains,
    Declined,
}

fn casbin_model(kind: ModelKind, effect: &str) -> String {
    let (request, role, matcher) = match kind {
        ModelKind::Rbac => (
            "sub, obj, act",
            "_, _",
            "g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act",
        ),
        ModelKind::Domains => (
            "sub, dom, obj, act",
            "_, _, _",
            "g(r.sub, p.sub, r.dom) && r.dom == p.dom && r.obj == p.obj && r.act == p.act",
        ),
        ModelKind::Declined => (
            "sub, obj, act",
            "_, _",
            "g(r.sub, p.sub) && keyMatch(r.obj, p.obj) && r.act == p.act",
        ),
    };
    format!(
        "[request_definition]\nr = {request}\n[policy_definition]\np = {request}, eft\n\
         [role_definition]\ng = {role}\n[policy_effect]\ne = {effect}\n[matchers]\nm = {matcher}\n"
    )
}

const SUBJECTS: [&str; 7] = ["u0", "u1", "u2", "r0", "r1", "r2", "ghost"];
const OBJECTS: [&str; 3] = ["o0", "o1", "o2"];
const VERBS: [&str; 2] = ["read", "write"];
const DOMAINS: [&str; 2] = ["d0", "d1"];

fn casbin_p_row(rng: &mut Rng, kind: ModelKind) -> String {
    let mut fields = vec![format!("r{}", rng.below(3))];
    if rng.chance(20) {
        fields[0] = format!("u{}", rng.below(3));
    }
    if kind == ModelKind::Domains {
        fields.push(rng.pick(&DOMAINS).to_string());
    }
    fields.push(rng.pick(&OBJECTS).to_string());
    fields.push(rng.pick(&VERBS).to_string());
    fields.push(["allow", "allow", "deny", "maybe"][rng.below(4)].to_string());
    format!("p, {}", fields.join(", "))
}

fn casbin_g_row(rng: &mut Rng, kind: ModelKind) -> String {
    let user = if rng.chance(30) {
        format!("r{}", rng.below(3))
    } else {
        format!("u{}", rng.below(3))
    };
    let mut row = format!("g, {user}, r{}", rng.below(3));
    if kind == ModelKind::Domains {
        row.push_str(&format!(", {}", rng.pick(&DOMAINS)));
    }
    row
}

/// A row file: `p` rows, some `g` rows, now and then a repeat of a row of another file or a
/// row of the wrong arity.
fn casbin_file(rng: &mut Rng, kind: ModelKind, others: &Files) -> String {
    let mut lines = Vec::new();
    for _ in 0..rng.below(6) {
        let line = match rng.below(12) {
            0 => casbin_g_row(rng, kind),
            1 => {
                let pool: Vec<&str> = others
                    .values()
                    .flat_map(|(_, text)| text.lines())
                    .filter(|l| l.starts_with("p,") || l.starts_with("g,"))
                    .collect();
                match pool.is_empty() {
                    true => casbin_p_row(rng, kind),
                    false => rng.pick(&pool).to_string(),
                }
            }
            2 if rng.chance(10) => "p, r0, o0".to_owned(),
            3 => "# a comment".to_owned(),
            _ => casbin_p_row(rng, kind),
        };
        lines.push(line);
    }
    lines.join("\n")
}

fn casbin_requests(kind: ModelKind) -> Vec<Request> {
    let mut requests = Vec::new();
    for subject in SUBJECTS {
        for object in OBJECTS {
            for verb in VERBS {
                for domain in DOMAINS {
                    let context = match kind {
                        ModelKind::Domains => json!({ "dom": domain }),
                        _ => Value::Null,
                    };
                    requests.push(Request {
                        principal: subject.into(),
                        action: verb.into(),
                        resource: object.into(),
                        context,
                    });
                    if kind != ModelKind::Domains {
                        break;
                    }
                }
            }
        }
    }
    requests
}

/// Every row of `files` in load order, and each row's values by `<path>:<line>`.
fn casbin_rows(files: &Files) -> (Vec<Row>, HashMap<String, Vec<String>>) {
    let mut rows = Vec::new();
    let mut by_name = HashMap::new();
    for (path, (_, text)) in files {
        if !path.ends_with(crate::casbin::ROWS_SUFFIX) {
            continue;
        }
        for row in crate::casbin::parse_rows(text) {
            by_name.insert(format!("{path}:{}", row.line), row.values.clone());
            rows.push(Row::new(row.ptype, row.values));
        }
    }
    (rows, by_name)
}

/// `steps` random one-key changes to a casbin tree (a model, a role file and five row
/// files). The model kind and effect come from the seed; now and then the model is
/// rewritten (its effect changes).
pub fn differential_casbin_reload(seed: u64, steps: usize) -> ReloadRun {
    let mut rng = Rng::derive(seed, 0xCA5B);
    let kind = [ModelKind::Rbac, ModelKind::Domains, ModelKind::Declined][seed as usize % 3];
    let mut out = ReloadRun::default();
    let mut keeping = CasbinCompiler::new(Limits::default());
    let requests = casbin_requests(kind);
    let paths: Vec<String> = (0..5)
        .map(|n| format!("policies/f{n}.csv"))
        .chain(["roles.csv".to_owned()])
        .collect();
    let mut files = Files::new();
    let mut revision = 1;
    let mut model = casbin_model(kind, pick_effect(&mut rng));
    files.insert(crate::casbin::MODEL_FILE.into(), (revision, model.clone()));
    for path in &paths {
        revision += 1;
        let text = casbin_file(&mut rng, kind, &files);
        files.insert(path.clone(), (revision, text));
    }
    for step in 0..steps {
        revision += 1;
        let path = rng.pick(&paths).clone();
        match rng.below(40) {
            0..=3 => {
                files.remove(&path);
            }
            4 => {
                model = casbin_model(kind, pick_effect(&mut rng));
                files.insert(crate::casbin::MODEL_FILE.into(), (revision, model.clone()));
            }
            10..=19 => {
                // One row of the file edited, added or removed; the others unchanged.
                let text = files.get(&path).map(|(_, t)| t.clone()).unwrap_or_default();
                let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
                let at = rng.below(lines.len() + 1);
                let row = match rng.below(4) {
                    0 => casbin_g_row(&mut rng, kind),
                    _ => casbin_p_row(&mut rng, kind),
                };
                match rng.below(3) {
                    0 if at < lines.len() => {
                        lines.remove(at);
                    }
                    1 if at < lines.len() => lines[at] = row,
                    _ => lines.insert(at, row),
                }
                files.insert(path, (revision, lines.join("\n")));
            }
            5..=9 => {
                let roles: Vec<String> = (0..rng.below(8))
                    .map(|_| casbin_g_row(&mut rng, kind))
                    .collect();
                files.insert("roles.csv".into(), (revision, roles.join("\n")));
            }
            _ => {
                let text = casbin_file(&mut rng, kind, &files);
                files.insert(path, (revision, text));
            }
        }
        let at = Step {
            seed,
            step,
            revision,
            files: &files,
        };
        let fresh = CasbinCompiler::new(Limits::default());
        let Some(engine) = at.compare_compiles(&mut out, &mut keeping, fresh, &requests) else {
            continue;
        };
        let (rows, by_name) = casbin_rows(&files);
        let plain = match futures::executor::block_on(plain_enforcer(&model, &rows)) {
            Ok(plain) => plain,
            Err(error) => {
                let input = "the plain enforcer did not load an accepted set".into();
                at.mismatch(&mut out, 0, input, String::new(), error.to_string());
                continue;
            }
        };
        at.compare_with_plain(&mut out, &requests, |request| {
            let mut fields = vec![request.principal.clone()];
            if kind == ModelKind::Domains {
                fields.push(request.context["dom"].as_str().unwrap_or_default().into());
            }
            fields.push(request.resource.clone());
            fields.push(request.action.clone());
            let theirs = match plain.enforce_ex(fields) {
                Ok((allowed, rules)) => format!("{allowed} {rules:?}"),
                Err(e) => format!("error {e}"),
            };
            let ours = match engine.decide(request) {
                Ok(verdict) => {
                    let rules: Vec<Vec<String>> = verdict
                        .policy_ids
                        .iter()
                        .map(|id| by_name.get(id).cloned().unwrap_or_else(|| vec![id.clone()]))
                        .collect();
                    format!("{} {rules:?}", verdict.allowed)
                }
                Err(e) => format!("error {e}"),
            };
            (ours, theirs)
        });
    }
    out.deltas = keeping.deltas();
    out
}
