//! The Cedar backend.
//!
//! Files of the tree: `*.cedar` policy files (any number of policies each), an
//! optional `schema.cedarschema` (Cedar's human schema format; with it, every policy
//! is validated strictly before activation, entities must conform to it, and
//! request contexts are parsed with it), and `*.entities.json` entity files
//! (Cedar's entities JSON). Other files are ignored.
//!
//! A policy's id is its `@id("...")` annotation, else `<path>#<position>` (its
//! position in its file, from 0). Ids must be unique across the set.
//!
//! A compile after one that succeeded applies a per-file delta when only policy
//! files changed (same schema, same entity files, every file read from etcd): the
//! changed files' policies are removed from the previous set and index and their new
//! ones added and validated. Anything else, including a delta that fails, is compiled
//! in full, which names the fault.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Context, Decision as CedarDecision, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    Request as CedarRequest, Response, Schema, ValidationMode, Validator,
};

use crate::decision::{DecideError, Request};
use crate::engine::{Compiler, Engine, KeyNamer, Limits, ParseCache, Verdict};
use crate::index::cedar::CedarIndex;
use crate::layout::{Tree, TreeFile};
use crate::status::Rejection;

/// The schema file's path in the tree.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// Suffix of policy files.
pub const POLICY_SUFFIX: &str = ".cedar";
/// Suffix of entity files.
pub const ENTITIES_SUFFIX: &str = ".entities.json";

/// Compiles Cedar trees, re-parsing only files whose `mod_revision` changed.
pub struct CedarCompiler {
    limits: Limits,
    /// The schema and the `mod_revision` it was parsed at (0: none).
    schema: Option<(i64, Arc<Schema>)>,
    policies: ParseCache<Vec<Policy>>,
    /// Parsed with the schema: cleared when it changes.
    entities: ParseCache<Vec<Entity>>,
    /// Files that passed strict validation, by path: (file, schema) revisions.
    validated: HashMap<String, (i64, i64)>,
    /// The last set built, for the next compile's delta.
    assembled: Option<Assembled>,
    /// The policy file that failed in this compile (path, `mod_revision`, why), so a
    /// delta that gives up on it does not make the full compile parse it again.
    failed: Option<(String, i64, Rejection)>,
    /// Compiles done by a delta, for tests.
    deltas: u64,
}

impl CedarCompiler {
    /// A compiler with an empty cache.
    pub fn new(limits: Limits) -> Self {
        CedarCompiler {
            limits,
            schema: None,
            policies: ParseCache::default(),
            entities: ParseCache::default(),
            validated: HashMap::new(),
            assembled: None,
            failed: None,
            deltas: 0,
        }
    }

    fn load_schema(&mut self, tree: &Tree, keys: &KeyNamer<'_>) -> Result<(), Rejection> {
        let Some(file) = tree.files.get(SCHEMA_FILE) else {
            if self.schema.take().is_some() {
                self.entities.clear();
                self.validated.clear();
            }
            return Ok(());
        };
        if file.mod_revision > 0
            && self
                .schema
                .as_ref()
                .is_some_and(|(rev, _)| *rev == file.mod_revision)
        {
            return Ok(());
        }
        let text = keys.text(SCHEMA_FILE, file, &self.limits)?;
        let (schema, _warnings) = Schema::from_cedarschema_str(text)
            .map_err(|e| keys.reject(SCHEMA_FILE, Some(file), format!("invalid schema: {e}")))?;
        self.schema = Some((file.mod_revision, Arc::new(schema)));
        self.entities.clear();
        self.validated.clear();
        Ok(())
    }
}

impl Compiler for CedarCompiler {
    fn compile(&mut self, tree: &Tree, prefix: &str) -> Result<Arc<dyn Engine>, Rejection> {
        let keys = KeyNamer::new(tree, prefix);
        self.failed = None;
        self.load_schema(tree, &keys)?;
        self.policies.retain_paths(|p| tree.files.contains_key(p));
        self.entities.retain_paths(|p| tree.files.contains_key(p));
        self.validated.retain(|p, _| tree.files.contains_key(p));
        if let Some(previous) = self.assembled.take() {
            match self.compile_delta(&previous, tree, &keys) {
                Some((assembled, engine)) => {
                    self.assembled = Some(assembled);
                    self.deltas += 1;
                    return Ok(engine);
                }
                // The full compile decides, and names the fault if there is one.
                None => self.assembled = Some(previous),
            }
        }
        self.compile_full(tree, &keys)
    }
}

/// The last set a compiler built, kept so that the next compile of a tree whose policy
/// files changed (and nothing else) applies a per-file delta instead of rebuilding.
struct Assembled {
    /// The `mod_revision` of every policy and entity file it was built from (all > 0).
    revisions: BTreeMap<String, i64>,
    /// The schema's `mod_revision` (> 0), `None` without a schema.
    schema_revision: Option<i64>,
    /// Each policy file's policies.
    files: HashMap<String, Arc<Vec<Policy>>>,
    index: Arc<CedarIndex>,
    entities: Arc<Entities>,
}

/// A delta touching more than this share of the files (1/n) is compiled from scratch.
const DELTA_MAX_SHARE: usize = 4;

impl CedarCompiler {
    /// Compiles every file of `tree` (parses come from the cache).
    fn compile_full(
        &mut self,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Result<Arc<dyn Engine>, Rejection> {
        let schema = self.schema.as_ref().map(|(rev, s)| (*rev, Arc::clone(s)));
        let mut set = PolicySet::new();
        let mut owners: HashMap<String, &str> = HashMap::new();
        let mut files: HashMap<String, Arc<Vec<Policy>>> = HashMap::new();
        let mut entities: Vec<Entity> = Vec::new();
        let mut entity_owners: HashMap<EntityUid, &str> = HashMap::new();
        for (path, file) in &tree.files {
            if path.ends_with(POLICY_SUFFIX) {
                let policies = self.policy_file(path, file, keys)?;
                for policy in policies.iter() {
                    let id = policy.id().to_string();
                    if let Some(other) = owners.insert(id.clone(), path) {
                        return Err(keys.reject(
                            path,
                            Some(file),
                            format!("policy id `{id}` is also used in {}", keys.key(other)),
                        ));
                    }
                    set.add(policy.clone())
                        .map_err(|e| keys.reject(path, Some(file), e.to_string()))?;
                }
                files.insert(path.clone(), policies);
            } else if path.ends_with(ENTITIES_SUFFIX) {
                let schema = schema.as_ref().map(|(_, s)| &**s);
                let parsed = self.entities.get_or_parse(path, file.mod_revision, || {
                    parse_entities_file(keys.text(path, file, &self.limits)?, schema)
                        .map_err(|m| keys.reject(path, Some(file), m))
                })?;
                for entity in parsed.iter() {
                    if let Some(other) = entity_owners.insert(entity.uid(), path) {
                        return Err(keys.reject(
                            path,
                            Some(file),
                            format!(
                                "entity {} is also defined in {}",
                                entity.uid(),
                                keys.key(other)
                            ),
                        ));
                    }
                    entities.push(entity.clone());
                }
            }
        }
        let schema_revision = schema.as_ref().map(|(rev, _)| *rev);
        let schema = schema.map(|(_, s)| s);
        check_parents(&entities, &entity_owners, schema.as_deref(), keys, tree)?;
        let entities = Entities::from_entities(entities, schema.as_deref())
            .map_err(|e| keys.reject_set(format!("invalid entities: {e}")))?;
        let engine = CedarEngine {
            count: set.num_of_policies(),
            index: Arc::new(CedarIndex::build(&set)),
            entities: Arc::new(entities),
            schema,
        };
        let revisions = delta_revisions(tree);
        // Files read offline (revision 0) may change without a new revision: no delta.
        self.assembled = (revisions.values().all(|&r| r > 0)
            && schema_revision.is_none_or(|r| r > 0))
        .then(|| Assembled {
            revisions,
            schema_revision,
            files,
            index: Arc::clone(&engine.index),
            entities: Arc::clone(&engine.entities),
        });
        Ok(Arc::new(engine))
    }

    /// Applies the changed policy files of `tree` to `previous`: their old policies are
    /// removed from the set and the index and their new ones added, the rest is shared.
    /// `None` (compile in full) unless only policy files changed, each of them parses and
    /// validates, and ids stay unique.
    fn compile_delta(
        &mut self,
        previous: &Assembled,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Option<(Assembled, Arc<dyn Engine>)> {
        let schema = self.schema.as_ref().map(|(rev, s)| (*rev, Arc::clone(s)));
        if schema.as_ref().map(|(rev, _)| *rev) != previous.schema_revision {
            return None;
        }
        let revisions = delta_revisions(tree);
        if revisions.values().any(|&r| r <= 0) {
            return None;
        }
        let changed: Vec<&String> = revisions
            .iter()
            .filter(|(path, rev)| previous.revisions.get(*path) != Some(rev))
            .map(|(path, _)| path)
            .chain(
                previous
                    .revisions
                    .keys()
                    .filter(|path| !revisions.contains_key(*path)),
            )
            .collect();
        if changed.iter().any(|p| !p.ends_with(POLICY_SUFFIX))
            || changed.len() * DELTA_MAX_SHARE > revisions.len().max(DELTA_MAX_SHARE)
        {
            return None;
        }
        let mut set = previous.index.policy_set().clone();
        let mut files = previous.files.clone();
        let mut removed: Vec<PolicyId> = Vec::new();
        let mut added: Vec<Arc<Vec<Policy>>> = Vec::new();
        // Every old policy out first, so an id may move between changed files.
        for path in &changed {
            for policy in files.remove(path.as_str()).iter().flat_map(|p| p.iter()) {
                set.remove_static(policy.id().clone()).ok()?;
                removed.push(policy.id().clone());
            }
        }
        for path in changed {
            if let Some(file) = tree.files.get(path.as_str()) {
                let policies = self.policy_file(path, file, keys).ok()?;
                for policy in policies.iter() {
                    set.add(policy.clone()).ok()?;
                }
                files.insert(path.clone(), Arc::clone(&policies));
                added.push(policies);
            }
        }
        let count = set.num_of_policies();
        let index =
            previous
                .index
                .with_changes(set, &removed, added.iter().flat_map(|p| p.iter()))?;
        let engine = CedarEngine {
            count,
            index: Arc::new(index),
            entities: Arc::clone(&previous.entities),
            schema: schema.map(|(_, s)| s),
        };
        let assembled = Assembled {
            revisions,
            schema_revision: previous.schema_revision,
            files,
            index: Arc::clone(&engine.index),
            entities: Arc::clone(&engine.entities),
        };
        Some((assembled, Arc::new(engine)))
    }

    /// The policies of one file, parsed (cached) and, with a schema, validated (cached).
    fn policy_file(
        &mut self,
        path: &str,
        file: &TreeFile,
        keys: &KeyNamer<'_>,
    ) -> Result<Arc<Vec<Policy>>, Rejection> {
        if let Some((failed_path, rev, rejection)) = &self.failed
            && failed_path == path
            && *rev == file.mod_revision
        {
            return Err(rejection.clone());
        }
        let checked = self.parse_and_validate(path, file, keys);
        if let Err(rejection) = &checked {
            self.failed = Some((path.to_owned(), file.mod_revision, rejection.clone()));
        }
        checked
    }

    fn parse_and_validate(
        &mut self,
        path: &str,
        file: &TreeFile,
        keys: &KeyNamer<'_>,
    ) -> Result<Arc<Vec<Policy>>, Rejection> {
        let policies = self.policies.get_or_parse(path, file.mod_revision, || {
            parse_policy_file(path, keys.text(path, file, &self.limits)?)
                .map_err(|m| keys.reject(path, Some(file), m))
        })?;
        if let Some((schema_rev, schema)) = &self.schema {
            let done = self.validated.get(path) == Some(&(file.mod_revision, *schema_rev));
            if !done {
                validate(schema, &policies).map_err(|m| keys.reject(path, Some(file), m))?;
                if file.mod_revision > 0 {
                    self.validated
                        .insert(path.to_owned(), (file.mod_revision, *schema_rev));
                }
            }
        }
        Ok(policies)
    }
}

/// The `mod_revision` of each file a compile reads (policies and entities).
fn delta_revisions(tree: &Tree) -> BTreeMap<String, i64> {
    tree.files
        .iter()
        .filter(|(p, _)| p.ends_with(POLICY_SUFFIX) || p.ends_with(ENTITIES_SUFFIX))
        .map(|(p, f)| (p.clone(), f.mod_revision))
        .collect()
}

/// Parses one policy file and renames its policies (`@id`, else `<path>#<n>`).
fn parse_policy_file(path: &str, text: &str) -> Result<Vec<Policy>, String> {
    let parsed = PolicySet::from_str(text).map_err(|e| format!("invalid policy: {e}"))?;
    if parsed.num_of_templates() > 0 {
        return Err("templates are not supported: use static policies".to_owned());
    }
    // Cedar names policies `policy0`, `policy1`, ... in text order.
    let mut numbered: Vec<(usize, &Policy)> = parsed
        .policies()
        .map(|p| {
            let n = p
                .id()
                .to_string()
                .strip_prefix("policy")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            (n, p)
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    Ok(numbered
        .into_iter()
        .enumerate()
        .map(|(position, (_, policy))| {
            let id = match policy.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{path}#{position}"),
            };
            policy.new_id(PolicyId::new(id))
        })
        .collect())
}

/// Strict validation of one file's policies against the schema.
fn validate(schema: &Schema, policies: &[Policy]) -> Result<(), String> {
    let set = PolicySet::from_policies(policies.iter().cloned()).map_err(|e| e.to_string())?;
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if result.validation_passed() {
        return Ok(());
    }
    let errors: Vec<String> = result
        .validation_errors()
        .map(|e| format!("{}: {e}", e.policy_id()))
        .collect();
    Err(format!("schema violation: {}", errors.join("; ")))
}

/// Parses one entities file (with the schema when there is one), without the
/// schema's action entities (added once for the whole set).
fn parse_entities_file(text: &str, schema: Option<&Schema>) -> Result<Vec<Entity>, String> {
    let parsed =
        Entities::from_json_str(text, schema).map_err(|e| format!("invalid entities: {e}"))?;
    let actions: HashSet<&EntityUid> = schema.map(|s| s.actions().collect()).unwrap_or_default();
    Ok(parsed
        .iter()
        .filter(|e| !actions.contains(&e.uid()))
        .cloned()
        .collect())
}

/// Every parent of every entity must be an entity of the set (or an action of the
/// schema): a typo in a parent would silently grant nothing.
fn check_parents(
    entities: &[Entity],
    owners: &HashMap<EntityUid, &str>,
    schema: Option<&Schema>,
    keys: &KeyNamer<'_>,
    tree: &Tree,
) -> Result<(), Rejection> {
    let actions: HashSet<&EntityUid> = schema.map(|s| s.actions().collect()).unwrap_or_default();
    for entity in entities {
        let uid = entity.uid();
        let (_, _, parents) = entity.clone().into_inner();
        if let Some(parent) = parents
            .iter()
            .find(|p| !owners.contains_key(*p) && !actions.contains(p))
        {
            let path = owners.get(&uid).copied().unwrap_or_default();
            let file: Option<&TreeFile> = tree.files.get(path);
            return Err(keys.reject(
                path,
                file,
                format!("entity {uid} has parent {parent}, which is not defined"),
            ));
        }
    }
    Ok(())
}

/// A compiled Cedar set.
struct CedarEngine {
    /// The set, indexed by scope: same answers as Cedar's authorizer on the set.
    index: Arc<CedarIndex>,
    entities: Arc<Entities>,
    schema: Option<Arc<Schema>>,
    count: usize,
}

impl CedarEngine {
    fn request(&self, r: &Request) -> Result<CedarRequest, DecideError> {
        let bad = |field: &'static str| {
            move |e: &dyn std::fmt::Display| DecideError::BadRequest {
                field,
                message: e.to_string(),
            }
        };
        let principal = EntityUid::from_str(&r.principal).map_err(|e| bad("principal")(&e))?;
        let action = EntityUid::from_str(&r.action).map_err(|e| bad("action")(&e))?;
        let resource = EntityUid::from_str(&r.resource).map_err(|e| bad("resource")(&e))?;
        let context = match &r.context {
            serde_json::Value::Null => serde_json::json!({}),
            other => other.clone(),
        };
        let schema = self.schema.as_deref();
        let context = Context::from_json_value(context, schema.map(|s| (s, &action)))
            .map_err(|e| bad("context")(&e))?;
        CedarRequest::new(principal, action, resource, context, schema)
            .map_err(|e| bad("request")(&e))
    }

    fn authorize(&self, request: &CedarRequest) -> Response {
        self.index.is_authorized(request, &self.entities)
    }
}

impl Engine for CedarEngine {
    fn decide(&self, request: &Request) -> Result<Verdict, DecideError> {
        let request = self.request(request)?;
        let response = self.authorize(&request);
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(ToString::to_string)
            .collect();
        policy_ids.sort();
        Ok(Verdict {
            allowed: response.decision() == CedarDecision::Allow,
            policy_ids,
            errors: response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect(),
        })
    }

    fn policy_count(&self) -> usize {
        self.count
    }
}

#[cfg(test)]
mod tests;
