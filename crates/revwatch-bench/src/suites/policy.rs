//! `policy`: decision latency of revwatch's indexed Cedar and casbin backends against the
//! plain engines (`cedar_policy::Authorizer` on the whole set, `casbin::Enforcer`), on the
//! same RBAC workload and the same queries: 1,000 users in 100 roles, 10,000 grants
//! (role, resource, action), about a quarter of the queries allowed. Single thread, medians.
//! It also runs the indexes' differential proof at a million requests per backend, and
//! times reloads of the same set as a tree of files (one file per role) through the
//! activation pipeline's [`Compiler`]: from scratch, and after one key changed.

use std::str::FromStr;
use std::time::Instant;

use anyhow::Context as _;
use cedar_policy::{Context, Decision, Entities, EntityUid, PolicySet, Request};
use rand::{Rng, SeedableRng, rngs::StdRng};
use revwatch_policy::index::casbin::{CasbinIndex, Row, plain_enforcer};
use revwatch_policy::index::cedar::CedarIndex;
use revwatch_policy::index::{differential_casbin, differential_cedar};
use revwatch_policy::layout::{Tree, TreeFile};
use revwatch_policy::{Backend, Compiler, Limits};
use serde_json::json;

use crate::{
    report::Report,
    stats::{Samples, median, ratio},
};

const USERS: usize = 1_000;
const ROLES: usize = 100;
const GRANTS: usize = 10_000;
const RESOURCES: usize = 1_000;
const ACTIONS: usize = 10;
/// Share of queries drawn from the asker's own grants; random ones add about 2% more.
const TARGETED_PERCENT: u32 = 23;
const SEED: u64 = 17;

const CASBIN_MODEL: &str = "[request_definition]\nr = sub, obj, act\n\
[policy_definition]\np = sub, obj, act\n[role_definition]\ng = _, _\n\
[policy_effect]\ne = some(where (p.eft == allow))\n\
[matchers]\nm = g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act\n";

pub async fn run(quick: bool) -> anyhow::Result<Report> {
    let (plain_queries, indexed_queries, differential) = if quick {
        (100, 20_000, 100_000)
    } else {
        (1_000, 200_000, 1_000_000)
    };
    let workload = Workload::draw();
    let queries = workload.queries(indexed_queries);

    let cedar = CedarSide::build(&workload)?;
    let casbin_rows = workload.casbin_rows();
    let casbin_plain = plain_enforcer(CASBIN_MODEL, &casbin_rows)
        .await
        .context("loading the casbin enforcer")?;
    let casbin_index =
        CasbinIndex::build(CASBIN_MODEL, &casbin_rows).context("the RBAC model is indexable")?;

    let mut cedar_plain = Samples::with_capacity(plain_queries);
    let mut casbin_plain_samples = Samples::with_capacity(plain_queries);
    for query in &queries[..plain_queries] {
        let request = cedar.request(query)?;
        let t = Instant::now();
        let plain =
            cedar
                .authorizer
                .is_authorized(&request, cedar.index.policy_set(), &cedar.entities);
        cedar_plain.push(t.elapsed());
        let fields = query.casbin();
        let fields = fields.each_ref().map(String::as_str);
        let args = fields.to_vec();
        let t = Instant::now();
        let allowed = casbin::CoreApi::enforce(&casbin_plain, args)?;
        casbin_plain_samples.push(t.elapsed());
        // Every side must give the same answer, or the figures compare different work.
        let indexed = cedar.index.is_authorized(&request, &cedar.entities);
        anyhow::ensure!(
            plain.decision() == indexed.decision()
                && allowed == (plain.decision() == Decision::Allow)
                && allowed == casbin_index.enforce(&fields)?.allowed,
            "the sides disagree on {query:?}"
        );
    }

    let mut cedar_indexed = Samples::with_capacity(queries.len());
    let mut casbin_indexed = Samples::with_capacity(queries.len());
    let mut allowed = 0usize;
    for query in &queries {
        let request = cedar.request(query)?;
        let t = Instant::now();
        let response = cedar.index.is_authorized(&request, &cedar.entities);
        cedar_indexed.push(t.elapsed());
        let fields = query.casbin();
        let fields = fields.each_ref().map(String::as_str);
        let t = Instant::now();
        let decision = casbin_index.enforce(&fields)?;
        casbin_indexed.push(t.elapsed());
        anyhow::ensure!(
            decision.allowed == (response.decision() == Decision::Allow),
            "the indexes disagree on {query:?}"
        );
        allowed += usize::from(decision.allowed);
    }

    let reload_rounds = if quick { 5 } else { 15 };
    let reloads = [Backend::Cedar, Backend::Casbin]
        .map(|backend| Reload::measure(&workload, backend, reload_rounds));
    let [cedar_reload, casbin_reload] = reloads;
    let (cedar_reload, casbin_reload) = (cedar_reload?, casbin_reload?);

    let cedar_run = differential_cedar(SEED, differential);
    let casbin_run = differential_casbin(SEED, differential);

    let mut report = Report::new("policy");
    report.figure("casbin_plain_p50_us", casbin_plain_samples.p50());
    report.figure("cedar_plain_p50_us", cedar_plain.p50());
    report.figure("revwatch_casbin_p50_us", casbin_indexed.p50());
    report.figure("revwatch_cedar_p50_us", cedar_indexed.p50());
    report.figure("revwatch_casbin_p99_us", casbin_indexed.p99());
    report.figure("revwatch_cedar_p99_us", cedar_indexed.p99());
    report.figure(
        "casbin_speedup",
        ratio(casbin_plain_samples.p50(), casbin_indexed.p50()),
    );
    report.figure(
        "cedar_speedup",
        ratio(cedar_plain.p50(), cedar_indexed.p50()),
    );
    for (name, reload) in [("cedar", &cedar_reload), ("casbin", &casbin_reload)] {
        report.figure(&format!("{name}_full_reload_ms"), reload.full_ms);
        report.figure(
            &format!("{name}_incremental_reload_ms"),
            reload.incremental_ms,
        );
    }
    // The headline figures: the slower backend's.
    report.figure(
        "full_reload_ms",
        cedar_reload.full_ms.max(casbin_reload.full_ms),
    );
    report.figure(
        "incremental_reload_ms",
        cedar_reload
            .incremental_ms
            .max(casbin_reload.incremental_ms),
    );
    report.figure("reload_rounds", reload_rounds as f64);
    report.figure("allowed_fraction", allowed as f64 / queries.len() as f64);
    report.figure(
        "differential_mismatches",
        (cedar_run.count + casbin_run.count) as f64,
    );
    report.figure(
        "differential_requests",
        (cedar_run.requests + casbin_run.requests) as f64,
    );
    report.figure("samples_plain", plain_queries as f64);
    report.figure("samples_indexed", queries.len() as f64);
    for example in cedar_run
        .examples
        .iter()
        .chain(&casbin_run.examples)
        .take(3)
    {
        eprintln!("differential mismatch: {example}");
    }
    Ok(report)
}

#[derive(Debug, Clone, Copy)]
struct Query {
    user: usize,
    resource: usize,
    action: usize,
}

impl Query {
    fn casbin(&self) -> [String; 3] {
        [
            format!("u{}", self.user),
            format!("res{}", self.resource),
            format!("act{}", self.action),
        ]
    }
}

/// The RBAC workload both engines decide.
struct Workload {
    /// Roles of each user.
    memberships: Vec<Vec<usize>>,
    /// `(role, resource, action)`, distinct.
    grants: Vec<(usize, usize, usize)>,
    /// Grant positions of each role.
    grants_of: Vec<Vec<usize>>,
}

impl Workload {
    fn draw() -> Workload {
        let mut rng = StdRng::seed_from_u64(SEED);
        let memberships = (0..USERS)
            .map(|_| {
                let mut roles: Vec<usize> = (0..rng.random_range(1..=3))
                    .map(|_| rng.random_range(0..ROLES))
                    .collect();
                roles.sort_unstable();
                roles.dedup();
                roles
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let mut grants = Vec::with_capacity(GRANTS);
        let mut grants_of = vec![Vec::new(); ROLES];
        while grants.len() < GRANTS {
            let role = grants.len() % ROLES;
            let grant = (
                role,
                rng.random_range(0..RESOURCES),
                rng.random_range(0..ACTIONS),
            );
            if seen.insert(grant) {
                grants_of[role].push(grants.len());
                grants.push(grant);
            }
        }
        Workload {
            memberships,
            grants,
            grants_of,
        }
    }

    fn queries(&self, count: usize) -> Vec<Query> {
        let mut rng = StdRng::seed_from_u64(SEED + 1);
        (0..count)
            .map(|_| {
                let user = rng.random_range(0..USERS);
                if rng.random_range(0..100) < TARGETED_PERCENT {
                    let roles = &self.memberships[user];
                    let role = roles[rng.random_range(0..roles.len())];
                    let grants = &self.grants_of[role];
                    let (_, resource, action) =
                        self.grants[grants[rng.random_range(0..grants.len())]];
                    Query {
                        user,
                        resource,
                        action,
                    }
                } else {
                    Query {
                        user,
                        resource: rng.random_range(0..RESOURCES),
                        action: rng.random_range(0..ACTIONS),
                    }
                }
            })
            .collect()
    }

    fn casbin_rows(&self) -> Vec<Row> {
        let grants = self.grants.iter().map(|&(role, resource, action)| {
            Row::new(
                "p",
                [
                    format!("r{role}"),
                    format!("res{resource}"),
                    format!("act{action}"),
                ],
            )
        });
        let links = self
            .memberships
            .iter()
            .enumerate()
            .flat_map(|(user, roles)| {
                roles
                    .iter()
                    .map(move |role| Row::new("g", [format!("u{user}"), format!("r{role}")]))
            });
        grants.chain(links).collect()
    }

    fn cedar_policies(&self) -> String {
        self.grants
            .iter()
            .map(|&grant| cedar_grant(grant))
            .collect()
    }

    /// The set as a tree of files, one per role, as `backend` reads it; every file at its
    /// own `mod_revision`.
    fn tree(&self, backend: Backend) -> anyhow::Result<Tree> {
        let mut files: Vec<(String, String)> = Vec::new();
        match backend {
            Backend::Cedar => {
                files.push((
                    "entities/users.entities.json".into(),
                    self.cedar_entities().to_string(),
                ));
                for role in 0..ROLES {
                    let text = self.grants_of[role]
                        .iter()
                        .map(|&g| cedar_grant(self.grants[g]))
                        .collect();
                    files.push((reload_file(backend, role), text));
                }
            }
            Backend::Casbin => {
                files.push(("model.conf".into(), CASBIN_MODEL.into()));
                let links = self
                    .memberships
                    .iter()
                    .enumerate()
                    .flat_map(|(user, roles)| {
                        roles.iter().map(move |r| format!("g, u{user}, r{r}\n"))
                    })
                    .collect();
                files.push(("roles.csv".into(), links));
                for role in 0..ROLES {
                    let text = self.grants_of[role]
                        .iter()
                        .map(|&g| casbin_grant(self.grants[g]))
                        .collect();
                    files.push((reload_file(backend, role), text));
                }
            }
        }
        let mut tree = Tree::from_files(files).context("the reload tree")?;
        for (n, file) in tree.files.values_mut().enumerate() {
            file.mod_revision = n as i64 + 1;
        }
        tree.revision = tree.files.len() as i64;
        Ok(tree)
    }

    fn cedar_entities(&self) -> serde_json::Value {
        let users = self.memberships.iter().enumerate().map(|(user, roles)| {
            let parents: Vec<_> = roles
                .iter()
                .map(|role| json!({"type": "Role", "id": format!("r{role}")}))
                .collect();
            json!({"uid": {"type": "User", "id": format!("u{user}")}, "attrs": {}, "parents": parents})
        });
        let roles = (0..ROLES).map(|role| {
            json!({"uid": {"type": "Role", "id": format!("r{role}")}, "attrs": {}, "parents": []})
        });
        serde_json::Value::Array(users.chain(roles).collect())
    }
}

fn cedar_grant((role, resource, action): (usize, usize, usize)) -> String {
    format!(
        "permit(principal in Role::\"r{role}\", action == Action::\"act{action}\", \
         resource == Res::\"res{resource}\");\n"
    )
}

fn casbin_grant((role, resource, action): (usize, usize, usize)) -> String {
    format!("p, r{role}, res{resource}, act{action}\n")
}

/// The file holding `role`'s grants.
fn reload_file(backend: Backend, role: usize) -> String {
    match backend {
        Backend::Cedar => format!("policies/r{role}.cedar"),
        Backend::Casbin => format!("policies/r{role}.csv"),
    }
}

/// Median compile times of the workload's tree, in milliseconds.
struct Reload {
    /// A fresh compiler (empty caches), as after a start or a panic.
    full_ms: f64,
    /// The compiler that compiled the tree, after one role file gained a grant; the
    /// previous set stays alive, as the active set does during a reload.
    incremental_ms: f64,
}

impl Reload {
    fn measure(workload: &Workload, backend: Backend, rounds: usize) -> anyhow::Result<Reload> {
        const PREFIX: &str = "bench/";
        let tree = workload.tree(backend)?;
        let mut full = Vec::with_capacity(rounds);
        let mut incremental = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut compiler: Box<dyn Compiler> = backend.compiler(Limits::default());
            let t = Instant::now();
            let before = compiler
                .compile(&tree, PREFIX)
                .map_err(|r| anyhow::anyhow!("{backend:?} full compile: {r}"))?;
            full.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                before.policy_count() == GRANTS,
                "{backend:?}: full set size"
            );

            let role = round * 7 % ROLES;
            let mut changed = tree.clone();
            let path = reload_file(backend, role);
            let file = changed
                .files
                .get_mut(&path)
                .context("the changed file is in the tree")?;
            let mut text = String::from_utf8(file.value.to_vec())?;
            // A resource no grant uses, so the grant is new.
            let grant = (role, RESOURCES + round, 0);
            text.push_str(&match backend {
                Backend::Cedar => cedar_grant(grant),
                Backend::Casbin => casbin_grant(grant),
            });
            changed.revision += 1;
            *file = TreeFile {
                value: text.into(),
                mod_revision: changed.revision,
            };
            let t = Instant::now();
            let after = compiler
                .compile(&changed, PREFIX)
                .map_err(|r| anyhow::anyhow!("{backend:?} incremental compile: {r}"))?;
            incremental.push(t.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(
                after.policy_count() == GRANTS + 1,
                "{backend:?}: the changed set's size"
            );
            drop(before);
        }
        Ok(Reload {
            full_ms: median(&full),
            incremental_ms: median(&incremental),
        })
    }
}

struct CedarSide {
    index: CedarIndex,
    entities: Entities,
    authorizer: cedar_policy::Authorizer,
}

impl CedarSide {
    fn build(workload: &Workload) -> anyhow::Result<CedarSide> {
        let set = PolicySet::from_str(&workload.cedar_policies()).context("parsing the grants")?;
        let entities = Entities::from_json_value(workload.cedar_entities(), None)
            .context("building the entities")?;
        Ok(CedarSide {
            index: CedarIndex::build(&set),
            entities,
            authorizer: cedar_policy::Authorizer::new(),
        })
    }

    fn request(&self, query: &Query) -> anyhow::Result<Request> {
        let uid = |text: String| EntityUid::from_str(&text).context("entity uid");
        Request::new(
            uid(format!("User::\"u{}\"", query.user))?,
            uid(format!("Action::\"act{}\"", query.action))?,
            uid(format!("Res::\"res{}\"", query.resource))?,
            Context::empty(),
            None,
        )
        .context("building a request")
    }
}
