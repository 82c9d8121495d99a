//! Index for casbin RBAC models.
//!
//! casbin walks every `p` row through the matcher, in load order, feeding each result to the
//! effect expression. For the matchers the `matcher` module recognises (field equalities and one role
//! check: standard RBAC and RBAC with domains) a row matches exactly when its equated fields
//! equal the request's and its role field is the request subject or a role `has_link` grants it.
//! The index files rows under those fields, so a request visits only the rows that match, and
//! replays casbin's effect stream over them in load order (the same decision and the same
//! `explain` rows).
//!
//! Load order is casbin's: rows of a type go into a `LinkedHashSet`, where a repeated row is
//! dropped and its first copy moves to the back. Rows given as one list are numbered by their
//! position in it (the last copy of a repeated row); rows of files by file and line, files in
//! path order. Each distinct row remembers all its occurrences, so a file change moves only the
//! rows it touches ([`CasbinIndex::with_file_changes`]).

mod matcher;
mod roles;

use std::sync::Arc;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, Model};
use smallvec::SmallVec;
use thiserror::Error;

use self::matcher::{RoleTerm, Shape};
use self::roles::{Holder, RoleGraph};
use super::PersistentMap;

/// One policy line: its type (`p`, `g`, `p2`, ...) and its fields, as in a casbin policy file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Row {
    pub ptype: String,
    pub values: Vec<String>,
}

impl Row {
    pub fn new(
        ptype: impl Into<String>,
        values: impl IntoIterator<Item = impl Into<String>>,
    ) -> Row {
        Row {
            ptype: ptype.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }
}

/// A request with a different number of fields than the model's `r` definition (casbin's
/// enforcer fails it too).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("request has {got} fields, the model's request definition has {expected}")]
pub struct RequestArityError {
    pub expected: usize,
    pub got: usize,
}

/// A casbin decision: what `Enforcer::enforce` returns, and the rows `enforce_ex` explains it
/// with, as positions in the row list the index was built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasbinDecision {
    pub allowed: bool,
    /// casbin's `explain` list: for `some(where (p.eft == allow)) && !some(where (p.eft ==
    /// deny))` every allowing row before the first denying one, then that one; otherwise the
    /// single deciding row; empty for a default decision.
    pub explain: SmallVec<[usize; 2]>,
}

impl CasbinDecision {
    /// The row that decided: the first allowing row of an allow, the denying row of a deny.
    pub fn determining_row(&self) -> Option<usize> {
        if self.allowed {
            self.explain.first().copied()
        } else {
            self.explain.last().copied()
        }
    }
}

/// The effect expressions casbin 2.20 knows (it panics on any other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EffectRule {
    AllowOverride,
    DenyOverride,
    AllowAndDeny,
    Priority,
}

impl EffectRule {
    fn parse(escaped: &str) -> Option<EffectRule> {
        Some(match escaped {
            "some(where (p_eft == allow))" => EffectRule::AllowOverride,
            "!some(where (p_eft == deny))" => EffectRule::DenyOverride,
            "some(where (p_eft == allow)) && !some(where (p_eft == deny))" => {
                EffectRule::AllowAndDeny
            }
            "priority(p_eft) || deny" => EffectRule::Priority,
            _ => return None,
        })
    }
}

/// What a matching row contributes (casbin's `EffectKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowEffect {
    Allow,
    Deny,
    Indeterminate,
}

/// Where a row is: its file and line. Load order is file (path) order, then line order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowAt {
    /// The row's file (empty for rows given as one list to [`CasbinIndex::build`]).
    pub file: Arc<str>,
    /// Its line in the file (its position in the list for [`CasbinIndex::build`]).
    pub line: usize,
}

impl Ord for RowAt {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let files = if Arc::ptr_eq(&self.file, &other.file) {
            std::cmp::Ordering::Equal
        } else {
            self.file.cmp(&other.file)
        };
        files.then(self.line.cmp(&other.line))
    }
}

impl PartialOrd for RowAt {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One row of a file, for [`CasbinIndex::with_file_changes`].
#[derive(Debug, Clone, Copy)]
pub struct FileRow<'r> {
    /// `p`, `g`, ...
    pub ptype: &'r str,
    /// The fields after the type.
    pub values: &'r [String],
    /// The row's line in its file (one row per line).
    pub line: usize,
}

/// A row file's rows before and after a change (an added file has none before, a removed one
/// none after).
#[derive(Debug, Clone)]
pub struct FileChange<'r> {
    /// The file's path, which orders it among the files.
    pub path: &'r str,
    pub before: Vec<FileRow<'r>>,
    pub after: Vec<FileRow<'r>>,
}

/// The occurrences of one distinct row, in load order; casbin keeps the last one.
type Occurrences = SmallVec<[RowAt; 1]>;

/// A distinct `p` row where casbin keeps it, and what it contributes when it matches.
#[derive(Debug, Clone)]
struct Filed {
    at: RowAt,
    effect: RowEffect,
}

/// Which roles each `(domain, user)` holds, and the role names the closures were restricted to.
#[derive(Debug, Default)]
struct Roles {
    closures: foldhash::HashMap<Holder, Box<[u32]>>,
    kept: foldhash::HashSet<u32>,
}

/// A casbin model and its rows prepared for fast decisions.
///
/// The index is persistent: [`CasbinIndex::with_file_changes`] shares every unchanged row with
/// the index it starts from, so changing one file of a large set costs O(changed rows), plus a
/// recomputation of the role closures when `g` rows changed.
#[derive(Debug, Clone)]
pub struct CasbinIndex {
    request_len: usize,
    effect: EffectRule,
    shape: Shape,
    /// The number of fields of a `p` row, and of the role definition (0: none).
    policy_len: usize,
    role_arity: usize,
    eft_field: Option<usize>,
    /// The policy fields rows are filed by: the role field first (if any), then the equated
    /// fields, each once.
    key_fields: Vec<usize>,
    /// For each key field, the request fields it must equal.
    key_sources: Vec<SmallVec<[usize; 1]>>,
    /// Interned names (never forgotten: a stale name files nothing).
    names: PersistentMap<Box<str>, u32>,
    /// Bucket key -> the distinct `p` rows filed there, where casbin keeps them, in load order.
    rows: PersistentMap<Box<[u32]>, Arc<[Filed]>>,
    /// Each distinct `p` row (interned fields) -> its occurrences.
    p_rows: PersistentMap<Box<[u32]>, Occurrences>,
    /// Each distinct `g` row -> its occurrences.
    g_rows: PersistentMap<Box<[u32]>, Occurrences>,
    /// Distinct `p` rows per role field value (role models only).
    role_values: PersistentMap<u32, u32>,
    /// `(domain, user)` -> roles granted, restricted to names used as a row's role field.
    roles: Arc<Roles>,
    /// Whether a `g` row casbin keeps moved since `roles` was computed.
    roles_dirty: bool,
}

impl CasbinIndex {
    /// Prepares `model_text` with `rows`. `None` when the model is not one the index decides
    /// exactly (the caller then uses `casbin::Enforcer`): an unrecognised matcher or effect,
    /// several `p`/`g` definitions, or rows casbin would reject (wrong field counts).
    /// Decisions explain rows by their position in `rows`.
    pub fn build(model_text: &str, rows: &[Row]) -> Option<CasbinIndex> {
        let mut index = CasbinIndex::new(model_text)?;
        let file: Arc<str> = Arc::from("");
        for (line, row) in rows.iter().enumerate() {
            index.change(&file, &row.ptype, &row.values, line, true)?;
        }
        index.finish();
        Some(index)
    }

    /// An index of `model_text` without rows. `None` when the model is not one the index
    /// decides exactly.
    pub fn new(model_text: &str) -> Option<CasbinIndex> {
        let model = futures::executor::block_on(DefaultModel::from_str(model_text)).ok()?;
        let sections = model.get_model();
        let single = |sec: &str| {
            sections
                .get(sec)
                .filter(|map| map.len() == 1)
                .and_then(|map| map.get(sec))
        };
        let request = single("r")?;
        let policy = single("p")?;
        let effect = EffectRule::parse(&single("e")?.value)?;
        let matcher = &single("m")?.value;
        let role_arity = match sections.get("g") {
            None => 0,
            Some(map) if map.len() == 1 => map.get("g")?.value.matches('_').count(),
            Some(_) => return None,
        };
        let identifier = |t: &String| t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !request.tokens.iter().chain(&policy.tokens).all(identifier) {
            return None;
        }
        let shape = matcher::recognise(matcher, &request.tokens, &policy.tokens, role_arity)?;
        match (shape.role, role_arity) {
            (None, 0) | (Some(_), 2 | 3) => {}
            // An unused role definition still loads (and may reject) its rows: not worth it.
            _ => return None,
        }
        let mut index = CasbinIndex {
            request_len: request.tokens.len(),
            effect,
            policy_len: policy.tokens.len(),
            role_arity,
            eft_field: policy.tokens.iter().position(|t| t == "p_eft"),
            key_fields: Vec::new(),
            key_sources: Vec::new(),
            names: PersistentMap::default(),
            rows: PersistentMap::default(),
            p_rows: PersistentMap::default(),
            g_rows: PersistentMap::default(),
            role_values: PersistentMap::default(),
            roles: Arc::default(),
            roles_dirty: false,
            shape,
        };
        index.plan_keys();
        index.finish();
        Some(index)
    }

    /// This index with `changes` applied to its row files: the same decisions as an index
    /// built from the changed files (in path order, then line order). Unchanged rows are shared
    /// with this index. `None` when a row has the wrong number of fields, or a removed row is
    /// not in the index (the caller then builds from scratch).
    pub fn with_file_changes<'r>(
        &self,
        changes: impl IntoIterator<Item = FileChange<'r>>,
    ) -> Option<CasbinIndex> {
        let mut index = self.clone();
        for change in changes {
            let file: Arc<str> = Arc::from(change.path);
            // A row on the same line before and after stays where it is: appending a row
            // to a large file moves one row.
            let same = |a: &FileRow<'_>, b: &FileRow<'_>| {
                a.line == b.line && a.ptype == b.ptype && a.values == b.values
            };
            let before: foldhash::HashMap<usize, &FileRow<'_>> =
                change.before.iter().map(|r| (r.line, r)).collect();
            let after: foldhash::HashMap<usize, &FileRow<'_>> =
                change.after.iter().map(|r| (r.line, r)).collect();
            for row in &change.before {
                if !after.get(&row.line).is_some_and(|a| same(a, row)) {
                    index.change(&file, row.ptype, row.values, row.line, false)?;
                }
            }
            for row in &change.after {
                if !before.get(&row.line).is_some_and(|b| same(b, row)) {
                    index.change(&file, row.ptype, row.values, row.line, true)?;
                }
            }
        }
        index.finish();
        Some(index)
    }

    /// Adds (or removes) one occurrence of a row, and refiles the row if the occurrence casbin
    /// keeps (the last) moved.
    fn change(
        &mut self,
        file: &Arc<str>,
        ptype: &str,
        values: &[String],
        line: usize,
        insert: bool,
    ) -> Option<()> {
        let is_p = match ptype {
            "p" if values.len() == self.policy_len => true,
            "g" if values.len() >= self.role_arity => false,
            "p" | "g" => return None,
            // casbin loads other types into assertions the model does not use.
            _ => return Some(()),
        };
        let content: Box<[u32]> = values.iter().map(|v| self.intern(v)).collect();
        let table = if is_p {
            &mut self.p_rows
        } else {
            &mut self.g_rows
        };
        let mut occurrences = table.get(&content).cloned().unwrap_or_default();
        let kept_before = occurrences.last().cloned();
        let at = RowAt {
            file: Arc::clone(file),
            line,
        };
        let slot = occurrences.binary_search(&at);
        match (insert, slot) {
            (true, Err(slot)) => occurrences.insert(slot, at),
            (false, Ok(slot)) => {
                occurrences.remove(slot);
            }
            // The same line twice, or a row that is not there: the caller's view is not ours.
            _ => return None,
        }
        let kept_after = occurrences.last().cloned();
        if occurrences.is_empty() {
            table.remove(&content);
        } else {
            table.insert(content.clone(), occurrences);
        }
        if kept_before == kept_after {
            return Some(());
        }
        if !is_p {
            self.roles_dirty = true;
            return Some(());
        }
        let key: Box<[u32]> = self.key_fields.iter().map(|&f| content[f]).collect();
        let mut filed: Vec<Filed> = self
            .rows
            .get(&key)
            .map(|list| list.to_vec())
            .unwrap_or_default();
        if let Some(before) = &kept_before {
            filed.retain(|f| f.at != *before);
        }
        if let Some(after) = kept_after.clone() {
            let effect = match self.eft_field.map(|f| values[f].as_str()) {
                None | Some("allow") => RowEffect::Allow,
                Some("deny") => RowEffect::Deny,
                Some(_) => RowEffect::Indeterminate,
            };
            let slot = filed.partition_point(|f| f.at < after);
            filed.insert(slot, Filed { at: after, effect });
        }
        if filed.is_empty() {
            self.rows.remove(&key);
        } else {
            self.rows.insert(key.clone(), filed.into());
        }
        if self.shape.role.is_some() {
            let role = key[0];
            let count = self.role_values.get(&role).copied().unwrap_or(0);
            match (kept_before.is_some(), kept_after.is_some()) {
                (false, true) => {
                    self.role_values.insert(role, count + 1);
                }
                (true, false) if count <= 1 => {
                    self.role_values.remove(&role);
                }
                (true, false) => {
                    self.role_values.insert(role, count - 1);
                }
                _ => {}
            }
        }
        Some(())
    }

    /// Recomputes the role closures when the `g` rows changed, or when they miss a role name
    /// the `p` rows now use (a superset is harmless: it files nothing).
    fn finish(&mut self) {
        let empty = self.p_rows.is_empty().then(|| self.intern(""));
        let missing = self
            .role_values
            .keys()
            .chain(empty.as_ref())
            .any(|r| !self.roles.kept.contains(r));
        if self.roles_dirty || missing {
            self.roles = Arc::new(self.compute_roles(empty));
            self.roles_dirty = false;
        }
    }

    /// The closures of the `g` rows casbin keeps, fed in its load order.
    fn compute_roles(&self, empty: Option<u32>) -> Roles {
        let mut kept: foldhash::HashSet<u32> = self.role_values.keys().copied().collect();
        kept.extend(empty);
        if self.shape.role.is_none() {
            return Roles {
                closures: foldhash::HashMap::default(),
                kept,
            };
        }
        let mut links: Vec<(&RowAt, &[u32])> = self
            .g_rows
            .iter()
            .filter_map(|(content, at)| Some((at.last()?, &content[..])))
            .collect();
        links.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut graph = RoleGraph::default();
        for (_, content) in links {
            let domain = (self.role_arity == 3).then(|| content[2]);
            graph.add_link(content[0], content[1], domain);
        }
        let names_by_id = self.names_by_id();
        let name_of = |id: u32| names_by_id[id as usize].to_string();
        let closures = graph
            .closures(&name_of, &|id| kept.contains(&id))
            .into_iter()
            .map(|(holder, roles)| (holder, roles.into_boxed_slice()))
            .collect();
        Roles { closures, kept }
    }

    /// casbin's decision for `request` (one value per field of the model's `r` definition).
    pub fn enforce(&self, request: &[&str]) -> Result<CasbinDecision, RequestArityError> {
        let (allowed, rows) = self.enforce_rows(request)?;
        Ok(CasbinDecision {
            allowed,
            explain: rows.iter().map(|at| at.line).collect(),
        })
    }

    /// casbin's decision for `request`, and its `explain` rows by file and line (see
    /// [`CasbinDecision::explain`]).
    pub fn enforce_rows(
        &self,
        request: &[&str],
    ) -> Result<(bool, SmallVec<[&RowAt; 2]>), RequestArityError> {
        if request.len() != self.request_len {
            return Err(RequestArityError {
                expected: self.request_len,
                got: request.len(),
            });
        }
        if self.p_rows.is_empty() {
            return Ok((self.enforce_without_rows(request), SmallVec::new()));
        }
        let mut matched: SmallVec<[&Filed; 16]> = SmallVec::new();
        self.visit_matching(request, |rows| matched.extend(rows.iter()));
        if matched.len() > 1 {
            matched.sort_unstable_by(|a, b| a.at.cmp(&b.at));
        }
        Ok(self.replay_effects(&matched))
    }

    /// Visits the row lists whose key the request satisfies.
    fn visit_matching<'s>(&'s self, request: &[&str], mut visit: impl FnMut(&'s [Filed])) {
        let mut key: SmallVec<[u32; 4]> = SmallVec::new();
        // Each key field must have the one value its request fields agree on. The role field
        // (first, when there is one) may have no such field: `None` then.
        let mut required_role = None;
        for (at, sources) in self.key_sources.iter().enumerate() {
            let Some((&first, rest)) = sources.split_first() else {
                key.push(0);
                continue;
            };
            let value = request[first];
            if rest.iter().any(|&s| request[s] != value) {
                return;
            }
            let Some(&id) = self.names.get(value) else {
                return;
            };
            if at == 0 && self.shape.role.is_some() {
                required_role = Some(id);
            }
            key.push(id);
        }
        let Some(role) = self.shape.role else {
            if let Some(rows) = self.rows.get(&key[..]) {
                visit(rows);
            }
            return;
        };
        // `has_link(user, user)` holds even for names without links.
        let Some(&subject) = self.names.get(request[role.subject]) else {
            return;
        };
        let mut try_role = |candidate: u32| {
            if required_role.is_some_and(|r| r != candidate) {
                return;
            }
            key[0] = candidate;
            if let Some(rows) = self.rows.get(&key[..]) {
                visit(rows);
            }
        };
        try_role(subject);
        if let Some(roles) = self
            .roles
            .closures
            .get(&(self.domain_of(role, request), subject))
        {
            for &granted in roles.iter() {
                try_role(granted);
            }
        }
    }

    fn domain_of(&self, role: RoleTerm, request: &[&str]) -> Option<u32> {
        // An unknown domain has no links; `u32::MAX` names no interned domain.
        role.domain
            .map(|field| self.names.get(request[field]).copied().unwrap_or(u32::MAX))
    }

    /// casbin's effect stream over the matching rows, in load order.
    fn replay_effects<'s>(&self, matched: &[&'s Filed]) -> (bool, SmallVec<[&'s RowAt; 2]>) {
        let mut explain: SmallVec<[&RowAt; 2]> = SmallVec::new();
        let mut allowed = self.effect == EffectRule::DenyOverride;
        for filed in matched {
            let row = &filed.at;
            match (self.effect, filed.effect) {
                (_, RowEffect::Indeterminate) => {}
                (EffectRule::AllowOverride, RowEffect::Allow) => {
                    explain.push(row);
                    allowed = true;
                    break;
                }
                (EffectRule::AllowOverride, RowEffect::Deny)
                | (EffectRule::DenyOverride, RowEffect::Allow) => {}
                (EffectRule::DenyOverride, RowEffect::Deny)
                | (EffectRule::AllowAndDeny, RowEffect::Deny) => {
                    explain.push(row);
                    allowed = false;
                    break;
                }
                (EffectRule::AllowAndDeny, RowEffect::Allow) => {
                    explain.push(row);
                    allowed = true;
                }
                (EffectRule::Priority, decided) => {
                    explain.push(row);
                    allowed = decided == RowEffect::Allow;
                    break;
                }
            }
        }
        (allowed, explain)
    }

    /// With no `p` rows casbin evaluates the matcher once with every policy field empty, and
    /// explains nothing.
    fn enforce_without_rows(&self, request: &[&str]) -> bool {
        let empty_matches = self
            .shape
            .equalities
            .iter()
            .all(|&(r, _)| request[r].is_empty())
            && self.shape.role.is_none_or(|role| {
                request[role.subject].is_empty()
                    || self.names.get("").is_some_and(|&empty| {
                        self.names
                            .get(request[role.subject])
                            .is_some_and(|&subject| {
                                self.roles
                                    .closures
                                    .get(&(self.domain_of(role, request), subject))
                                    .is_some_and(|roles| roles.contains(&empty))
                            })
                    })
            });
        match self.effect {
            EffectRule::DenyOverride => true,
            _ => empty_matches,
        }
    }

    /// Decides which policy fields rows are filed by, and which request fields feed them.
    fn plan_keys(&mut self) {
        let mut fields: Vec<usize> = Vec::new();
        if let Some(role) = self.shape.role {
            fields.push(role.role);
        }
        for &(_, p) in &self.shape.equalities {
            if !fields.contains(&p) {
                fields.push(p);
            }
        }
        self.key_sources = fields
            .iter()
            .map(|&field| {
                self.shape
                    .equalities
                    .iter()
                    .filter(|(_, p)| *p == field)
                    .map(|&(r, _)| r)
                    .collect()
            })
            .collect();
        self.key_fields = fields;
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let next = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.insert(name.into(), next);
        next
    }

    fn names_by_id(&self) -> Vec<Box<str>> {
        let mut names = vec![Box::<str>::from(""); self.names.len()];
        for (name, &id) in &self.names {
            names[id as usize] = name.clone();
        }
        names
    }

    /// Number of `p` rows casbin keeps (repeats dropped).
    pub fn policy_rows(&self) -> usize {
        self.p_rows.len()
    }
}

/// The unindexed engine: a `casbin::Enforcer` for `model_text` with `rows` loaded the way the
/// index assumes (through casbin's `MemoryAdapter`, in order).
pub async fn plain_enforcer(model_text: &str, rows: &[Row]) -> casbin::Result<Enforcer> {
    let model = DefaultModel::from_str(model_text).await?;
    let mut adapter = MemoryAdapter::default();
    for row in rows {
        let Some(sec) = row.ptype.get(..1) else {
            continue;
        };
        casbin::Adapter::add_policy(&mut adapter, sec, &row.ptype, row.values.clone()).await?;
    }
    Enforcer::new(model, adapter).await
}
