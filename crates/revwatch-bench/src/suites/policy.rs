//! `policy`: decision latency of revwatch's indexed Cedar and casbin backends against the
//! plain engines (`cedar_policy::Authorizer` on the whole set, `casbin::Enforcer`), on the
//! same RBAC workload and the same queries: 1,000 users in 100 roles, 10,000 grants
//! (role, resource, action), about a quarter of the queries allowed. Single thread, medians.
//! It also runs the indexes' differential proof at a million requests per backend, and
//! times reloads of the same set as a tree of keys (one file per role) through the
//! activation pipeline a user runs (a mirror of the embedded server feeding `Policies`):
//! a fresh start, and a one-key change.
//! Last, the end-to-end latency from a policy change to a decision that reflects it
//! ([`put_to_decision`]).

mod put_to_decision;

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use cedar_policy::{Context, Decision, Entities, EntityUid, PolicySet, Request};
use etcd_proto::etcdserverpb::PutRequest;
use rand::{Rng, SeedableRng, rngs::StdRng};
use revwatch::mirror::{ClientSource, Mirror};
use revwatch_policy::index::casbin::{CasbinIndex, Row, plain_enforcer};
use revwatch_policy::index::cedar::CedarIndex;
use revwatch_policy::index::{differential_casbin, differential_cedar};
use revwatch_policy::layout::Tree;
use revwatch_policy::{Backend, LoadOutcome, Policies, PolicyConfig};
use serde_json::json;

use crate::{
    report::Report,
    stats::{Samples, median, ratio},
    suites::{embedded::EmbeddedChild, load},
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
    let embedded = EmbeddedChild::start().await?;
    let cedar_reload = Reload::measure(
        &workload,
        Backend::Cedar,
        reload_rounds,
        &embedded.endpoint(),
    )
    .await?;
    let casbin_reload = Reload::measure(
        &workload,
        Backend::Casbin,
        reload_rounds,
        &embedded.endpoint(),
    )
    .await?;
    drop(embedded);

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
    put_to_decision::measure(quick, &mut report).await?;
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

/// Median load times of the workload's tree through the activation pipeline a user runs
/// (`Policies` following a mirror of the embedded server), in milliseconds: each is the
/// pipeline's own [`LoadReport`](revwatch_policy::LoadReport) duration, from reading the
/// mirror's new snapshot (the active tree) through compiling to the set being active.
struct Reload {
    /// The first load of a freshly started `Policies` (empty caches).
    full_ms: f64,
    /// A load after one key changed (a role file gained a grant, or lost it again); the
    /// previous set stays alive, as the active set does during a reload.
    incremental_ms: f64,
}

impl Reload {
    async fn measure(
        workload: &Workload,
        backend: Backend,
        rounds: usize,
        endpoint: &str,
    ) -> anyhow::Result<Reload> {
        const WAIT: Duration = Duration::from_secs(60);
        let prefix = format!("bench-reload-{backend:?}/");
        let writer = load::connect(endpoint).await?;
        let put = |path: String, value: Bytes| {
            let writer = &writer;
            let key = format!("{prefix}{path}").into_bytes();
            async move {
                let response = writer
                    .put(PutRequest {
                        key,
                        value: value.to_vec(),
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("putting {path}"))?;
                anyhow::Ok(response.header.context("put without header")?.revision)
            }
        };
        let tree = workload.tree(backend)?;
        let mut written = 0;
        for (path, file) in &tree.files {
            written = put(path.clone(), file.value.clone()).await?;
        }
        let mut full = Vec::with_capacity(rounds);
        let mut incremental = Vec::with_capacity(2 * rounds);
        for round in 0..rounds {
            let mirror = Mirror::builder(prefix.as_str())
                .start(ClientSource::new(load::connect(endpoint).await?))
                .await
                .context("starting the mirror")?;
            let config = PolicyConfig::new(backend).debounce(Duration::from_millis(1));
            let policies = Policies::start(mirror.clone(), prefix.as_str(), config);
            let load_at = |revision: i64, count: usize| {
                let policies = &policies;
                async move {
                    let active = policies
                        .wait_for_revision(revision, WAIT)
                        .await
                        .map_err(|e| anyhow::anyhow!("{backend:?}: no set at {revision}: {e}"))?;
                    anyhow::ensure!(active.policy_count == count, "{backend:?}: set size");
                    let load = policies
                        .status()
                        .last_load
                        .context("an active set was loaded")?;
                    anyhow::ensure!(
                        load.outcome == LoadOutcome::Activated && load.revision >= revision,
                        "{backend:?}: the last load is not the activation at {revision}"
                    );
                    anyhow::Ok(load.duration.as_secs_f64() * 1e3)
                }
            };
            full.push(load_at(written, GRANTS).await?);

            let role = round * 7 % ROLES;
            let path = reload_file(backend, role);
            let original = tree
                .files
                .get(&path)
                .context("the changed file is in the tree")?
                .value
                .clone();
            let mut text = String::from_utf8(original.to_vec())?;
            // A resource no grant uses, so the grant is new.
            let grant = (role, RESOURCES + round, 0);
            text.push_str(&match backend {
                Backend::Cedar => cedar_grant(grant),
                Backend::Casbin => casbin_grant(grant),
            });
            let changed = put(path.clone(), Bytes::from(text)).await?;
            incremental.push(load_at(changed, GRANTS + 1).await?);
            written = put(path, original).await?;
            incremental.push(load_at(written, GRANTS).await?);
            drop(policies);
            mirror.shutdown().await.context("stopping the mirror")?;
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
