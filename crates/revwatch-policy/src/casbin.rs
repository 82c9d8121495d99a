//! The casbin backend.
//!
//! Files of the tree: `model.conf` (casbin's model) and `*.csv` policy files
//! (`p, ...` and `g, ...` lines, as casbin's policy files; `#` starts a comment
//! line). Other files are ignored. Rows are loaded in path order, then line order;
//! a matched rule is reported as `<path>:<line>`.
//!
//! Checked before activation, because casbin-rs would fail or panic later: the
//! model's sections are the five known ones; its effect is one of casbin's four;
//! every row names a type the model defines and has exactly its number of fields;
//! every row value reaching the pattern argument of `regexMatch`, `keyMatch2` to
//! `keyMatch5` or `keyGet3` compiles as casbin compiles it (see the `patterns` module).
//! A model the index decides (standard RBAC, with or without domains) needs no
//! enforcer: a candidate after an accepted one under the same model moves only the
//! changed files' rows in the persistent index (O(changed rows); changed `g` rows
//! recompute the role closures). Any other model gets a fresh enforcer for each
//! candidate, swapped in whole (never `load_policy` on a live one).

mod patterns;

use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock};

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, Model};
use regex::Regex;

use crate::decision::{DecideError, Request};
use crate::engine::{Compiler, Engine as PolicyEngine, KeyNamer, Limits, ParseCache, Verdict};
use crate::index::casbin::{CasbinIndex, FileChange, FileRow};
use crate::layout::{Tree, TreeFile};
use crate::status::Rejection;
use patterns::{PatternFn, pattern_args};

/// The model file's path in the tree.
pub const MODEL_FILE: &str = "model.conf";
/// Suffix of policy row files.
pub const ROWS_SUFFIX: &str = ".csv";

const SECTIONS: [&str; 5] = [
    "request_definition",
    "policy_definition",
    "role_definition",
    "policy_effect",
    "matchers",
];

/// casbin-rs's known effects, as it compares them (after `p.eft` → `p_eft`).
const EFFECTS: [&str; 4] = [
    "some(where (p_eft == allow))",
    "!some(where (p_eft == deny))",
    "some(where (p_eft == allow)) && !some(where (p_eft == deny))",
    "priority(p_eft) || deny",
];

/// One policy line of a `.csv` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRow {
    /// The row type: `p`, `g`, `p2`, ...
    pub ptype: String,
    /// The values after the type.
    pub values: Vec<String>,
    /// Line number in its file, from 1.
    pub line: usize,
}

/// Compiles casbin trees, re-parsing only files whose `mod_revision` changed.
pub struct CasbinCompiler {
    limits: Limits,
    rows: ParseCache<Vec<SourceRow>>,
    /// The last indexed set built, for the next compile's delta.
    last: Option<LastIndexed>,
    /// Compiles done by a delta, for tests.
    deltas: u64,
}

/// An indexed set a compiler built: its model (by `mod_revision`, > 0), the row files it
/// holds (by path: `mod_revision`, > 0, and rows) and its index.
struct LastIndexed {
    model_revision: i64,
    shape: Arc<ModelShape>,
    files: BTreeMap<String, (i64, Arc<Vec<SourceRow>>)>,
    index: Arc<CasbinIndex>,
}

/// A row file's parsed rows, if it exists.
type FileRows = Option<Arc<Vec<SourceRow>>>;

/// A delta touching more than this share of the row files (1/n) is compiled from scratch.
const DELTA_MAX_SHARE: usize = 4;

impl CasbinCompiler {
    /// A compiler with an empty cache.
    pub fn new(limits: Limits) -> Self {
        CasbinCompiler {
            limits,
            rows: ParseCache::default(),
            last: None,
            deltas: 0,
        }
    }

    /// Compiles done by a delta.
    pub(crate) fn deltas(&self) -> u64 {
        self.deltas
    }

    /// The rows of the row file at `path`, parsed (cached) and checked against `shape`.
    fn row_file(
        &mut self,
        shape: &ModelShape,
        path: &str,
        file: &TreeFile,
        keys: &KeyNamer<'_>,
    ) -> Result<Arc<Vec<SourceRow>>, Rejection> {
        let parsed = self.rows.get_or_parse(path, file.mod_revision, || {
            keys.text(path, file, &self.limits).map(parse_rows)
        })?;
        for row in parsed.iter() {
            shape
                .check(row)
                .map_err(|m| keys.reject(path, Some(file), format!("line {}: {m}", row.line)))?;
        }
        Ok(parsed)
    }

    /// Applies the changed row files of `tree` to the last indexed set: only their rows are
    /// checked and moved in the (persistent) index. `None` (compile in full) unless the
    /// model is the same, every row file was read from etcd, few files changed, and each
    /// changed file parses and checks.
    fn compile_delta(
        &mut self,
        last: &LastIndexed,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Option<(LastIndexed, Arc<dyn PolicyEngine>)> {
        let model = tree.files.get(MODEL_FILE)?;
        if model.mod_revision <= 0 || model.mod_revision != last.model_revision {
            return None;
        }
        let row_files: Vec<(&String, &TreeFile)> = tree
            .files
            .iter()
            .filter(|(p, _)| p.ends_with(ROWS_SUFFIX))
            .collect();
        if row_files.iter().any(|(_, f)| f.mod_revision <= 0) {
            return None;
        }
        let changed: Vec<&String> = row_files
            .iter()
            .filter(|(p, f)| last.files.get(*p).map(|(rev, _)| *rev) != Some(f.mod_revision))
            .map(|(p, _)| *p)
            .chain(
                last.files
                    .keys()
                    .filter(|p| !tree.files.contains_key(p.as_str())),
            )
            .collect();
        if changed.len() * DELTA_MAX_SHARE > row_files.len().max(DELTA_MAX_SHARE) {
            return None;
        }
        let mut files = last.files.clone();
        // Each changed file with its rows before and after.
        let mut changes: Vec<(&String, FileRows, FileRows)> = Vec::with_capacity(changed.len());
        for path in changed {
            let before = files.remove(path.as_str()).map(|(_, rows)| rows);
            let after = match tree.files.get(path.as_str()) {
                Some(file) => {
                    let rows = self.row_file(&last.shape, path, file, keys).ok()?;
                    files.insert(path.clone(), (file.mod_revision, Arc::clone(&rows)));
                    Some(rows)
                }
                None => None,
            };
            changes.push((path, before, after));
        }
        let index = last
            .index
            .with_file_changes(changes.iter().map(|(path, before, after)| FileChange {
                path,
                before: file_rows(before.as_deref()),
                after: file_rows(after.as_deref()),
            }))?;
        let index = Arc::new(index);
        let engine = CasbinEngine {
            decider: Decider::Index(Arc::clone(&index)),
            request_tokens: last.shape.request_tokens.clone(),
            count: index.policy_rows(),
        };
        let next = LastIndexed {
            model_revision: last.model_revision,
            shape: Arc::clone(&last.shape),
            files,
            index,
        };
        Some((next, Arc::new(engine)))
    }
}

impl Compiler for CasbinCompiler {
    fn compile(&mut self, tree: &Tree, prefix: &str) -> Result<Arc<dyn PolicyEngine>, Rejection> {
        let keys = KeyNamer::new(tree, prefix);
        self.rows.retain_paths(|p| tree.files.contains_key(p));
        if let Some(last) = self.last.take() {
            if let Some((next, engine)) = self.compile_delta(&last, tree, &keys) {
                self.last = Some(next);
                self.deltas += 1;
                return Ok(engine);
            }
            // The full compile decides, and names the fault if there is one.
            self.last = Some(last);
        }
        // A rejected candidate keeps the last indexed set: the next may be a delta from it.
        self.compile_full(tree, &keys)
    }
}

/// A file's rows as the index takes them.
fn file_rows(rows: Option<&Vec<SourceRow>>) -> Vec<FileRow<'_>> {
    rows.into_iter()
        .flatten()
        .map(|row| FileRow {
            ptype: &row.ptype,
            values: &row.values,
            line: row.line,
        })
        .collect()
}

impl CasbinCompiler {
    /// Checks and loads every file of `tree` (parses come from the cache). A fresh enforcer
    /// is built only for a model the index cannot decide.
    fn compile_full(
        &mut self,
        tree: &Tree,
        keys: &KeyNamer<'_>,
    ) -> Result<Arc<dyn PolicyEngine>, Rejection> {
        let Some(model_file) = tree.files.get(MODEL_FILE) else {
            return Err(keys.reject(MODEL_FILE, None, "the model file is missing".into()));
        };
        let model_text = keys.text(MODEL_FILE, model_file, &self.limits)?;
        let reject_model = |m: String| keys.reject(MODEL_FILE, Some(model_file), m);
        check_sections(model_text).map_err(reject_model)?;
        let model = futures::executor::block_on(DefaultModel::from_str(model_text))
            .map_err(|e| reject_model(format!("invalid model: {e}")))?;
        let shape = Arc::new(ModelShape::of(&model).map_err(reject_model)?);

        let mut files: BTreeMap<String, (i64, Arc<Vec<SourceRow>>)> = BTreeMap::new();
        for (path, file) in tree.files.iter().filter(|(p, _)| p.ends_with(ROWS_SUFFIX)) {
            let rows = self.row_file(&shape, path, file, keys)?;
            files.insert(path.clone(), (file.mod_revision, rows));
        }
        let index = catch_unwind(AssertUnwindSafe(|| {
            let empty = CasbinIndex::new(model_text)?;
            empty.with_file_changes(files.iter().map(|(path, (_, rows))| {
                FileChange {
                    path,
                    before: Vec::new(),
                    after: rows
                        .iter()
                        .map(|row| FileRow {
                            ptype: &row.ptype,
                            values: &row.values,
                            line: row.line,
                        })
                        .collect(),
                }
            }))
        }))
        .ok()
        .flatten();
        if let Some(index) = index {
            let index = Arc::new(index);
            let read_from_etcd =
                model_file.mod_revision > 0 && files.values().all(|(rev, _)| *rev > 0);
            self.last = read_from_etcd.then(|| LastIndexed {
                model_revision: model_file.mod_revision,
                shape: Arc::clone(&shape),
                files,
                index: Arc::clone(&index),
            });
            return Ok(Arc::new(CasbinEngine {
                count: index.policy_rows(),
                decider: Decider::Index(index),
                request_tokens: shape.request_tokens.clone(),
            }));
        }
        self.last = None;

        // The enforcer decides: a fresh one, given every row, remembering each distinct
        // `p` row's source for its explanations.
        let mut enforcer =
            futures::executor::block_on(Enforcer::new(model, MemoryAdapter::default()))
                .map_err(|e| reject_model(format!("invalid model: {e}")))?;
        let mut sources = Sources::default();
        let mut rule_sources: HashMap<Vec<String>, usize> = HashMap::new();
        for (path, (_, rows)) in &files {
            sources.files.push(path.clone());
            for row in rows.iter() {
                if row.ptype == "p" {
                    // casbin keeps one copy of a repeated row, at the place of the last.
                    rule_sources.insert(row.values.clone(), sources.rows.len());
                }
                sources.rows.push((sources.files.len() - 1, row.line));
                let sec = &row.ptype[..1];
                enforcer
                    .get_mut_model()
                    .add_policy(sec, &row.ptype, row.values.clone());
            }
        }
        enforcer
            .build_role_links()
            .map_err(|e| keys.reject_set(format!("invalid role rows: {e}")))?;
        Ok(Arc::new(CasbinEngine {
            count: rule_sources.len(),
            decider: Decider::Enforcer {
                enforcer: Box::new(enforcer),
                rule_sources,
                sources,
            },
            request_tokens: shape.request_tokens.clone(),
        }))
    }
}

/// Rejects sections casbin would silently ignore, and definitions outside any.
fn check_sections(text: &str) -> Result<(), String> {
    let mut section: Option<&str> = None;
    let mut continued = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            let name = &line[1..line.len() - 1];
            if !SECTIONS.contains(&name) {
                return Err(format!(
                    "line {}: unknown section [{name}] (known: {})",
                    n + 1,
                    SECTIONS.join(", ")
                ));
            }
            section = Some(name);
        } else if section.is_none() && !continued {
            return Err(format!("line {}: a definition outside any section", n + 1));
        }
        continued = line.ends_with('\\');
    }
    Ok(())
}

/// What rows and requests must look like for a model.
struct ModelShape {
    /// Field count by row type (`p`, `p2`: the definition's tokens; `g`: its `_`s).
    arity: HashMap<String, usize>,
    /// Fields (by row type and index) that are the pattern of a function casbin
    /// compiles to a regex, and which function.
    pattern_fields: Vec<(String, usize, PatternFn)>,
    /// The request definition's token names (`sub`, `obj`, `act`, ...).
    request_tokens: Vec<String>,
}

impl ModelShape {
    fn of(model: &DefaultModel) -> Result<Self, String> {
        let sections = model.get_model();
        for (sec, name) in [
            ("r", "request_definition"),
            ("p", "policy_definition"),
            ("e", "policy_effect"),
            ("m", "matchers"),
        ] {
            if sections.get(sec).is_none_or(|s| s.is_empty()) {
                return Err(format!("the [{name}] section is missing"));
            }
        }
        for (key, effect) in sections.get("e").into_iter().flatten() {
            if !EFFECTS.contains(&effect.value.as_str()) {
                return Err(format!(
                    "unsupported effect `{key} = {}`: casbin knows only {}",
                    effect.value.replace("p_eft", "p.eft"),
                    EFFECTS
                        .map(|e| format!("`{}`", e.replace("p_eft", "p.eft")))
                        .join(", ")
                ));
            }
        }
        let mut arity = HashMap::new();
        let mut p_tokens: HashMap<String, Vec<String>> = HashMap::new();
        for (key, def) in sections.get("p").into_iter().flatten() {
            arity.insert(key.clone(), def.tokens.len());
            p_tokens.insert(key.clone(), def.tokens.clone());
        }
        for (key, def) in sections.get("g").into_iter().flatten() {
            arity.insert(key.clone(), def.value.matches('_').count());
        }
        let mut pattern_fields = Vec::new();
        for matcher in sections
            .get("m")
            .into_iter()
            .flatten()
            .map(|(_, m)| &m.value)
        {
            for (function, pattern_arg) in pattern_args(matcher) {
                for (ptype, tokens) in &p_tokens {
                    if let Some(i) = tokens.iter().position(|t| *t == pattern_arg) {
                        pattern_fields.push((ptype.clone(), i, function));
                    }
                }
            }
        }
        let request_tokens = sections
            .get("r")
            .and_then(|r| r.get("r"))
            .map(|r| {
                r.tokens
                    .iter()
                    .map(|t| t.strip_prefix("r_").unwrap_or(t).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        Ok(ModelShape {
            arity,
            pattern_fields,
            request_tokens,
        })
    }

    fn check(&self, row: &SourceRow) -> Result<(), String> {
        let Some(&want) = self.arity.get(&row.ptype) else {
            return Err(format!(
                "row type `{}` is not defined in the model",
                row.ptype
            ));
        };
        if row.values.len() != want {
            return Err(format!(
                "`{}` row has {} fields, the model defines {want}",
                row.ptype,
                row.values.len()
            ));
        }
        for (ptype, i, function) in &self.pattern_fields {
            if *ptype == row.ptype
                && let Err(e) = function.check(&row.values[*i])
            {
                return Err(format!("field {}: {e}", i + 1));
            }
        }
        Ok(())
    }
}

/// casbin's own CSV splitting (its `parse_csv_line`), with line numbers.
pub(crate) fn parse_rows(text: &str) -> Vec<SourceRow> {
    static FIELD: LazyLock<Regex> = LazyLock::new(|| {
        #[allow(clippy::unwrap_used)] // A constant pattern.
        Regex::new(r#"(\s*"[^"]*"?|\s*[^,]*)"#).unwrap()
    });
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = FIELD.find_iter(line).map(|m| {
            let col = m.as_str().trim();
            if col.len() >= 2 && col.starts_with('"') && col.ends_with('"') {
                col[1..col.len() - 1].to_owned()
            } else {
                col.to_owned()
            }
        });
        let Some(ptype) = fields.next() else { continue };
        rows.push(SourceRow {
            ptype,
            values: fields.collect(),
            line: n + 1,
        });
    }
    rows
}

/// A compiled casbin set.
struct CasbinEngine {
    decider: Decider,
    request_tokens: Vec<String>,
    /// Distinct `p` rows.
    count: usize,
}

enum Decider {
    /// Standard RBAC (with or without domains), decided without walking every row.
    Index(Arc<CasbinIndex>),
    /// Any other model: casbin's own enforcer, built for this set alone.
    Enforcer {
        enforcer: Box<Enforcer>,
        /// Each distinct `p` row's position in `sources`.
        rule_sources: HashMap<Vec<String>, usize>,
        sources: Sources,
    },
}

/// Where each row of the set comes from (enforcer only).
#[derive(Default)]
struct Sources {
    /// The row files, in load order.
    files: Vec<String>,
    /// For each row, in load order: its file (index into `files`) and line.
    rows: Vec<(usize, usize)>,
}

impl Sources {
    /// `<path>:<line>` of the row at `position`.
    fn name(&self, position: usize) -> Option<String> {
        let (file, line) = self.rows.get(position)?;
        Some(format!("{}:{line}", self.files.get(*file)?))
    }
}

impl CasbinEngine {
    fn request_values(&self, r: &Request) -> Result<Vec<String>, DecideError> {
        let bad = |message: String| DecideError::BadRequest {
            field: "context",
            message,
        };
        let context = match &r.context {
            serde_json::Value::Null => None,
            serde_json::Value::Object(map) => Some(map),
            other => return Err(bad(format!("must be an object, got {other}"))),
        };
        self.request_tokens
            .iter()
            .map(|token| match context.and_then(|c| c.get(token)) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(bad(format!("`{token}` must be a string, got {other}"))),
                None => match token.as_str() {
                    "sub" => Ok(r.principal.clone()),
                    "obj" => Ok(r.resource.clone()),
                    "act" => Ok(r.action.clone()),
                    _ => Err(bad(format!("the model's request needs `{token}`"))),
                },
            })
            .collect()
    }
}

impl PolicyEngine for CasbinEngine {
    fn decide(&self, request: &Request) -> Result<Verdict, DecideError> {
        let values = self.request_values(request)?;
        let (allowed, policy_ids) = match &self.decider {
            Decider::Index(index) => {
                let fields: Vec<&str> = values.iter().map(String::as_str).collect();
                let (allowed, rows) = index
                    .enforce_rows(&fields)
                    .map_err(|e| DecideError::Engine(e.to_string()))?;
                let ids = rows
                    .iter()
                    .map(|at| format!("{}:{}", at.file, at.line))
                    .collect();
                (allowed, ids)
            }
            Decider::Enforcer {
                enforcer,
                rule_sources,
                sources,
            } => {
                let (allowed, rules) = enforcer
                    .enforce_ex(values)
                    .map_err(|e| DecideError::Engine(e.to_string()))?;
                let ids = rules
                    .iter()
                    .map(|rule| {
                        rule_sources
                            .get(rule)
                            .and_then(|&at| sources.name(at))
                            .unwrap_or_else(|| rule.join(", "))
                    })
                    .collect();
                (allowed, ids)
            }
        };
        Ok(Verdict {
            allowed,
            policy_ids,
            errors: Vec::new(),
        })
    }

    fn policy_count(&self) -> usize {
        self.count
    }
}
