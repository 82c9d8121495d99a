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
//! A compile after one that succeeded applies a per-file delta when only policy and
//! entity files changed (same schema, every file read from etcd): the changed policy
//! files' policies leave the persistent index and their new ones are validated and
//! join it, sharing every unchanged policy (no copy of the set: O(changed)); a changed
//! entity file rebuilds the entities and keeps the index. Anything else (a schema
//! change revalidates everything), including a delta that fails, is compiled in full,
//! which names the fault.

mod uid;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    Context, Decision as CedarDecision, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    Request as CedarRequest, Response, Schema, ValidationMode, Validator,
};

use crate::decision::{DecideError, Request};
use crate::engine::{Compiler, Engine, KeyNamer, Limits, ParseCache, Verdict};
use crate::index::PersistentMap;
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
    /// Each policy file's statements as last parsed (text -> policy, before renaming), so
    /// that a change to a file parses only its new statements.
    statements: HashMap<String, Statements>,
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
            statements: HashMap::new(),
            entities: ParseCache::default(),
            validated: HashMap::new(),
            assembled: None,
            failed: None,
            deltas: 0,
        }
    }

    /// Compiles done by a delta.
    pub(crate) fn deltas(&self) -> u64 {
        self.deltas
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
        self.statements.retain(|p, _| tree.files.contains_key(p));
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

/// The last set a compiler built, kept so that the next compile of a tree whose policy or
/// entity files changed (and nothing else) applies a per-file delta instead of rebuilding.
struct Assembled {
    /// The `mod_revision` of every policy and entity file it was built from (all > 0).
    revisions: BTreeMap<String, i64>,
    /// The schema's `mod_revision` (> 0), `None` without a schema.
    schema_revision: Option<i64>,
    /// Each policy file's policies (persistent: a delta copies nothing else).
    files: PersistentMap<String, Arc<Vec<Policy>>>,
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
        let mut set = PolicySet::new();
        let mut owners: HashMap<String, &str> = HashMap::new();
        let mut files: PersistentMap<String, Arc<Vec<Policy>>> = PersistentMap::default();
        for (path, file) in &tree.files {
            if !path.ends_with(POLICY_SUFFIX) {
                continue;
            }
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
        }
        let entities = Arc::new(self.assemble_entities(tree, keys)?);
        let schema_revision = self.schema.as_ref().map(|(rev, _)| *rev);
        let engine = CedarEngine {
            // The set is dropped here, on the full compile's path, not by a later activation.
            index: Arc::new(CedarIndex::from_set(set).without_set()),
            entities,
            schema: self.schema.as_ref().map(|(_, s)| Arc::clone(s)),
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

    /// The entities of every entity file of `tree` (parsed with the schema, cached by file),
    /// each defined once, every parent defined.
    fn assemble_entities(
        &mut self,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Result<Entities, Rejection> {
        let schema = self.schema.as_ref().map(|(_, s)| Arc::clone(s));
        let mut entities: Vec<Entity> = Vec::new();
        let mut owners: HashMap<EntityUid, &str> = HashMap::new();
        for (path, file) in &tree.files {
            if !path.ends_with(ENTITIES_SUFFIX) {
                continue;
            }
            let parsed = self.entities.get_or_parse(path, file.mod_revision, || {
                parse_entities_file(keys.text(path, file, &self.limits)?, schema.as_deref())
                    .map_err(|m| keys.reject(path, Some(file), m))
            })?;
            for entity in parsed.iter() {
                if let Some(other) = owners.insert(entity.uid(), path) {
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
        check_parents(&entities, &owners, schema.as_deref(), keys, tree)?;
        Entities::from_entities(entities, schema.as_deref())
            .map_err(|e| keys.reject_set(format!("invalid entities: {e}")))
    }

    /// Applies the changed files of `tree` to `previous`: changed policy files' old
    /// policies leave the index and their new ones join it, sharing every other policy
    /// (O(changed)); changed entity files rebuild the entities (which their transitive
    /// closure needs) and keep the index. `None` (compile in full) unless only policy and
    /// entity files changed under the same schema, each changed policy file parses and
    /// validates, ids stay unique and the entities assemble.
    fn compile_delta(
        &mut self,
        previous: &Assembled,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Option<(Assembled, Arc<dyn Engine>)> {
        let schema_revision = self.schema.as_ref().map(|(rev, _)| *rev);
        if schema_revision != previous.schema_revision {
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
        if changed.len() * DELTA_MAX_SHARE > revisions.len().max(DELTA_MAX_SHARE) {
            return None;
        }
        let (policy_files, entity_files): (Vec<&String>, Vec<&String>) = changed
            .into_iter()
            .partition(|p| p.ends_with(POLICY_SUFFIX));
        let entities = if entity_files.is_empty() {
            Arc::clone(&previous.entities)
        } else {
            Arc::new(self.assemble_entities(tree, keys).ok()?)
        };
        let mut files = previous.files.clone();
        let mut removed: Vec<Arc<Vec<Policy>>> = Vec::new();
        let mut added: Vec<Arc<Vec<Policy>>> = Vec::new();
        // Every old policy out first, so an id may move between changed files.
        for path in &policy_files {
            removed.extend(files.remove(path.as_str()));
        }
        for path in policy_files {
            if let Some(file) = tree.files.get(path.as_str()) {
                let policies = self.policy_file(path, file, keys).ok()?;
                files.insert(path.clone(), Arc::clone(&policies));
                added.push(policies);
            }
        }
        // A policy that is in a changed file before and after, under the same id and
        // unchanged, keeps its place in the index: editing one policy of a large file
        // moves one policy.
        let before: HashMap<&PolicyId, &Policy> = removed
            .iter()
            .flat_map(|p| p.iter())
            .map(|p| (p.id(), p))
            .collect();
        let after: HashMap<&PolicyId, &Policy> = added
            .iter()
            .flat_map(|p| p.iter())
            .map(|p| (p.id(), p))
            .collect();
        let kept = |id: &PolicyId, other: &HashMap<&PolicyId, &Policy>, policy: &Policy| {
            other.get(id).is_some_and(|o| *o == policy)
        };
        let gone: Vec<&PolicyId> = before
            .iter()
            .filter(|(id, p)| !kept(id, &after, p))
            .map(|(id, _)| *id)
            .collect();
        // In file order, so that an id repeated in the new files is refused as in a full
        // compile.
        let new: Vec<&Policy> = added
            .iter()
            .flat_map(|p| p.iter())
            .filter(|p| !kept(p.id(), &before, p))
            .collect();
        if after.len() != added.iter().map(|p| p.len()).sum::<usize>() {
            // An id used twice among the changed files: the full compile names it.
            return None;
        }
        let index = if gone.is_empty() && new.is_empty() {
            Arc::clone(&previous.index)
        } else {
            Arc::new(previous.index.with_changes(gone, new)?)
        };
        let engine = CedarEngine {
            index: Arc::clone(&index),
            entities: Arc::clone(&entities),
            schema: self.schema.as_ref().map(|(_, s)| Arc::clone(s)),
        };
        let assembled = Assembled {
            revisions,
            schema_revision,
            files,
            index,
            entities,
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
        let mut statements = None;
        let previous = self.statements.get(path);
        let policies = self.policies.get_or_parse(path, file.mod_revision, || {
            let text = keys.text(path, file, &self.limits)?;
            let (policies, parsed) = parse_policy_statements(path, text, previous)
                .map_err(|m| keys.reject(path, Some(file), m))?;
            statements = Some(parsed);
            Ok(policies)
        })?;
        if let Some(parsed) = statements {
            self.statements.insert(path.to_owned(), parsed);
        }
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

/// A policy file's statements, by text (from the first token to the `;`), parsed alone.
type Statements = HashMap<Box<str>, Policy>;

/// Parses one policy file as [`parse_policy_file`] does, statement by statement, reusing
/// the statements of `previous` (the file's last parse) whose text is unchanged: a change
/// of one policy in a large file parses that policy only. Falls back to parsing the whole
/// file (which names the fault) when a statement does not parse alone.
pub(crate) fn parse_policy_statements(
    path: &str,
    text: &str,
    previous: Option<&Statements>,
) -> Result<(Vec<Policy>, Statements), String> {
    let whole = || parse_policy_file(path, text).map(|p| (p, Statements::new()));
    let Some(pieces) = split_statements(text) else {
        return whole();
    };
    let Some(previous) = previous.filter(|p| !p.is_empty()) else {
        // A first parse: the whole file at once (Cedar parses one large text faster than
        // many small ones), its statements remembered in text order.
        let policies = parse_policy_file(path, text)?;
        let parsed = if policies.len() == pieces.len() {
            pieces
                .into_iter()
                .map(Box::from)
                .zip(policies.iter().cloned())
                .collect()
        } else {
            Statements::new()
        };
        return Ok((policies, parsed));
    };
    let mut parsed = Statements::with_capacity(pieces.len());
    let mut policies = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let policy = match previous.get(piece) {
            Some(policy) => policy.clone(),
            None => match Policy::from_str(piece) {
                Ok(policy) => policy,
                Err(_) => return whole(),
            },
        };
        parsed.insert(piece.into(), policy.clone());
        policies.push(policy);
    }
    Ok((name_policies(path, policies), parsed))
}

/// The statements of Cedar policy text, each up to and including its `;` (Cedar's only
/// use of `;` outside strings and `//` comments). `None` when something other than blanks
/// and comments follows the last one.
fn split_statements(text: &str) -> Option<Vec<&str>> {
    let mut pieces = Vec::new();
    let (mut start, mut content) = (0, false);
    let (mut in_string, mut escaped, mut in_comment) = (false, false, false);
    for (i, c) in text.char_indices() {
        if in_comment {
            in_comment = c != '\n';
        } else if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '/' && text[i + 1..].starts_with('/') {
            in_comment = true;
        } else if c == ';' {
            pieces.push(&text[start..=i]);
            content = false;
        } else if !c.is_whitespace() {
            if !content {
                // A statement starts at its first token, as Cedar's own text of it does.
                start = i;
            }
            in_string = c == '"';
            content = true;
        }
    }
    (!content && !in_string).then_some(pieces)
}

/// Names policies in text order: `@id`, else `<path>#<position>`.
fn name_policies(path: &str, policies: Vec<Policy>) -> Vec<Policy> {
    policies
        .into_iter()
        .enumerate()
        .map(|(position, policy)| {
            let id = match policy.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{path}#{position}"),
            };
            policy.new_id(PolicyId::new(id))
        })
        .collect()
}

/// Parses one policy file and renames its policies (`@id`, else `<path>#<n>`).
pub(crate) fn parse_policy_file(path: &str, text: &str) -> Result<Vec<Policy>, String> {
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
    Ok(name_policies(
        path,
        numbered.into_iter().map(|(_, p)| p.clone()).collect(),
    ))
}

/// Strict validation of one file's policies against the schema.
fn validate(schema: &Schema, policies: &[Policy]) -> Result<(), String> {
    let set = PolicySet::from_policies(policies.iter().cloned()).map_err(|e| e.to_string())?;
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if result.validation_passed() {
        return Ok(());
    }
    let mut errors: Vec<String> = result
        .validation_errors()
        .map(|e| format!("{}: {e}", e.policy_id()))
        .collect();
    // The validator's order varies between runs; the message should not.
    errors.sort();
    Err(format!("schema violation: {}", errors.join("; ")))
}

/// Parses one entities file (with the schema when there is one), without the
/// schema's action entities (added once for the whole set).
pub(crate) fn parse_entities_file(
    text: &str,
    schema: Option<&Schema>,
) -> Result<Vec<Entity>, String> {
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
}

impl CedarEngine {
    fn request(&self, r: &Request) -> Result<CedarRequest, DecideError> {
        let bad = |field: &'static str| {
            move |e: &dyn std::fmt::Display| DecideError::BadRequest {
                field,
                message: e.to_string(),
            }
        };
        let principal = uid::parse(&r.principal).map_err(|e| bad("principal")(&e))?;
        let action = uid::parse(&r.action).map_err(|e| bad("action")(&e))?;
        let resource = uid::parse(&r.resource).map_err(|e| bad("resource")(&e))?;
        let schema = self.schema.as_deref();
        let context = match &r.context {
            // Most requests carry none: skip the JSON parser, which costs about a
            // tenth of a decision even for `{}`. `CedarRequest::new` still checks an
            // empty context against the schema.
            serde_json::Value::Null => Context::empty(),
            serde_json::Value::Object(o) if o.is_empty() => Context::empty(),
            other => Context::from_json_value(other.clone(), schema.map(|s| (s, &action)))
                .map_err(|e| bad("context")(&e))?,
        };
        CedarRequest::new(principal, action, resource, context, schema)
            .map_err(|e| bad("request")(&e))
    }

    fn authorize(&self, request: &CedarRequest) -> Response {
        self.index.is_authorized(request, &self.entities)
    }
}

/// `id.to_string()`, without Cedar's escaping pass over the id (`str::escape_debug`)
/// when the id has nothing it would escape: ids are written per decision.
fn policy_id_text(id: &PolicyId) -> String {
    let text: &str = id.as_ref();
    let plain = text
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\'' | b'\\'));
    if plain {
        text.to_owned()
    } else {
        id.to_string()
    }
}

impl Engine for CedarEngine {
    fn decide(&self, request: &Request) -> Result<Verdict, DecideError> {
        let request = self.request(request)?;
        let response = self.authorize(&request);
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(policy_id_text)
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
        self.index.len()
    }
}

#[cfg(test)]
mod tests;
