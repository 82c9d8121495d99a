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
//! dropped and its first copy moves to the back. Row numbers reported are positions in the
//! caller's row list (the last copy of a repeated row).

mod matcher;
mod roles;

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, Model};
use smallvec::SmallVec;
use thiserror::Error;

use self::matcher::{RoleTerm, Shape};
use self::roles::{Holder, RoleGraph};

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

/// A casbin model and its rows prepared for fast decisions.
#[derive(Debug, Clone)]
pub struct CasbinIndex {
    request_len: usize,
    effect: EffectRule,
    shape: Shape,
    /// The policy fields rows are filed by: the role field first (if any), then the equated
    /// fields, each once.
    key_fields: Vec<usize>,
    /// For each key field, the request fields it must equal.
    key_sources: Vec<SmallVec<[usize; 1]>>,
    names: foldhash::HashMap<Box<str>, u32>,
    rows: foldhash::HashMap<Box<[u32]>, Vec<u32>>,
    /// Load position -> position in the caller's row list.
    origin: Vec<usize>,
    effects: Vec<RowEffect>,
    /// `(domain, user)` -> roles granted, restricted to names used as a row's role field.
    roles: foldhash::HashMap<Holder, Box<[u32]>>,
}

impl CasbinIndex {
    /// Prepares `model_text` with `rows`. `None` when the model is not one the index decides
    /// exactly (the caller then uses `casbin::Enforcer`): an unrecognised matcher or effect,
    /// several `p`/`g` definitions, or rows casbin would reject (wrong field counts).
    pub fn build(model_text: &str, rows: &[Row]) -> Option<CasbinIndex> {
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
        let eft_field = policy.tokens.iter().position(|t| t == "p_eft");
        let loaded = LoadedRows::load(rows);
        let mut index = CasbinIndex {
            request_len: request.tokens.len(),
            effect,
            key_fields: Vec::new(),
            key_sources: Vec::new(),
            names: foldhash::HashMap::default(),
            rows: foldhash::HashMap::default(),
            origin: Vec::new(),
            effects: Vec::new(),
            roles: foldhash::HashMap::default(),
            shape,
        };
        index.plan_keys();

        let mut graph = RoleGraph::default();
        for &at in &loaded.g {
            let values = &rows[at].values;
            if values.len() < role_arity {
                return None;
            }
            let domain = match role_arity {
                3 => Some(index.intern(&values[2])),
                _ => None,
            };
            let (user, role) = (index.intern(&values[0]), index.intern(&values[1]));
            graph.add_link(user, role, domain);
        }
        let mut role_values: foldhash::HashSet<u32> = foldhash::HashSet::default();
        for (position, &at) in loaded.p.iter().enumerate() {
            let values = &rows[at].values;
            if values.len() != policy.tokens.len() {
                return None;
            }
            let key: Box<[u32]> = index
                .key_fields
                .clone()
                .into_iter()
                .map(|field| index.intern(&values[field]))
                .collect();
            if index.shape.role.is_some() {
                role_values.insert(key[0]);
            }
            index
                .rows
                .entry(key)
                .or_default()
                .push(u32::try_from(position).ok()?);
            index.origin.push(at);
            index
                .effects
                .push(match eft_field.map(|f| values[f].as_str()) {
                    None | Some("allow") => RowEffect::Allow,
                    Some("deny") => RowEffect::Deny,
                    Some(_) => RowEffect::Indeterminate,
                });
        }
        if loaded.p.is_empty() {
            // Without rows casbin checks the role against an empty policy field.
            let empty = index.intern("");
            role_values.insert(empty);
        }
        let names_by_id = index.names_by_id();
        let name_of = |id: u32| names_by_id[id as usize].to_string();
        for (key, roles) in graph.closures(&name_of, &|id| role_values.contains(&id)) {
            index.roles.insert(key, roles.into_boxed_slice());
        }
        Some(index)
    }

    /// casbin's decision for `request` (one value per field of the model's `r` definition).
    pub fn enforce(&self, request: &[&str]) -> Result<CasbinDecision, RequestArityError> {
        if request.len() != self.request_len {
            return Err(RequestArityError {
                expected: self.request_len,
                got: request.len(),
            });
        }
        if self.origin.is_empty() {
            return Ok(self.enforce_without_rows(request));
        }
        let mut matched: SmallVec<[u32; 16]> = SmallVec::new();
        self.visit_matching(request, |rows| matched.extend_from_slice(rows));
        matched.sort_unstable();
        Ok(self.replay_effects(&matched))
    }

    /// Visits the row lists whose key the request satisfies.
    fn visit_matching(&self, request: &[&str], mut visit: impl FnMut(&[u32])) {
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
        if let Some(roles) = self.roles.get(&(self.domain_of(role, request), subject)) {
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
    fn replay_effects(&self, matched: &[u32]) -> CasbinDecision {
        let mut explain: SmallVec<[usize; 2]> = SmallVec::new();
        let mut allowed = self.effect == EffectRule::DenyOverride;
        for &position in matched {
            let effect = self.effects[position as usize];
            let row = self.origin[position as usize];
            match (self.effect, effect) {
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
        CasbinDecision { allowed, explain }
    }

    /// With no `p` rows casbin evaluates the matcher once with every policy field empty, and
    /// explains nothing.
    fn enforce_without_rows(&self, request: &[&str]) -> CasbinDecision {
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
                                    .get(&(self.domain_of(role, request), subject))
                                    .is_some_and(|roles| roles.contains(&empty))
                            })
                    })
            });
        let allowed = match self.effect {
            EffectRule::DenyOverride => true,
            _ => empty_matches,
        };
        CasbinDecision {
            allowed,
            explain: SmallVec::new(),
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
        let next = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        *self.names.entry(name.into()).or_insert(next)
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
        self.origin.len()
    }
}

/// Row positions per assertion, in casbin's load order.
struct LoadedRows {
    p: Vec<usize>,
    g: Vec<usize>,
}

impl LoadedRows {
    /// Emulates casbin's adapters: a row goes into its type's `LinkedHashSet`, where inserting
    /// a repeat moves the kept copy to the back.
    fn load(rows: &[Row]) -> LoadedRows {
        let mut last: foldhash::HashMap<(&str, &[String]), usize> = foldhash::HashMap::default();
        for (at, row) in rows.iter().enumerate() {
            last.insert((row.ptype.as_str(), &row.values), at);
        }
        let mut loaded = LoadedRows {
            p: Vec::new(),
            g: Vec::new(),
        };
        for (at, row) in rows.iter().enumerate() {
            if last.get(&(row.ptype.as_str(), &row.values[..])) != Some(&at) {
                continue;
            }
            match row.ptype.as_str() {
                "p" => loaded.p.push(at),
                "g" => loaded.g.push(at),
                _ => {}
            }
        }
        loaded
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
