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
//! every row value reaching the pattern argument of `regexMatch` is a valid regex.
//! A fresh enforcer is built for each candidate and swapped in whole.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, LazyLock};

use casbin::{CoreApi, DefaultModel, Enforcer, MemoryAdapter, Model};
use regex::Regex;

use crate::decision::{DecideError, Request};
use crate::engine::{Compiler, Engine as PolicyEngine, KeyNamer, Limits, ParseCache, Verdict};
use crate::index::casbin::{CasbinIndex, Row};
use crate::layout::Tree;
use crate::status::Rejection;

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
}

impl CasbinCompiler {
    /// A compiler with an empty cache.
    pub fn new(limits: Limits) -> Self {
        CasbinCompiler {
            limits,
            rows: ParseCache::default(),
        }
    }
}

impl Compiler for CasbinCompiler {
    fn compile(&mut self, tree: &Tree, prefix: &str) -> Result<Arc<dyn PolicyEngine>, Rejection> {
        let keys = KeyNamer::new(tree, prefix);
        let Some(model_file) = tree.files.get(MODEL_FILE) else {
            return Err(keys.reject(MODEL_FILE, None, "the model file is missing".into()));
        };
        let model_text = keys.text(MODEL_FILE, model_file, &self.limits)?;
        let reject_model = |m: String| keys.reject(MODEL_FILE, Some(model_file), m);
        check_sections(model_text).map_err(reject_model)?;
        let model = futures::executor::block_on(DefaultModel::from_str(model_text))
            .map_err(|e| reject_model(format!("invalid model: {e}")))?;
        let shape = ModelShape::of(&model).map_err(reject_model)?;
        let mut enforcer =
            futures::executor::block_on(Enforcer::new(model, MemoryAdapter::default()))
                .map_err(|e| reject_model(format!("invalid model: {e}")))?;

        self.rows.retain_paths(|p| tree.files.contains_key(p));
        // Every row in load order, with its source (file, line).
        let mut rows: Vec<Row> = Vec::new();
        let mut sources = Sources::default();
        for (path, file) in tree.files.iter().filter(|(p, _)| p.ends_with(ROWS_SUFFIX)) {
            let parsed = self.rows.get_or_parse(path, file.mod_revision, || {
                keys.text(path, file, &self.limits).map(parse_rows)
            })?;
            sources.files.push(path.clone());
            for row in parsed.iter() {
                shape.check(row).map_err(|m| {
                    keys.reject(path, Some(file), format!("line {}: {m}", row.line))
                })?;
                rows.push(Row::new(row.ptype.clone(), row.values.iter().cloned()));
                sources.rows.push((sources.files.len() - 1, row.line));
            }
        }
        let index = catch_unwind(AssertUnwindSafe(|| CasbinIndex::build(model_text, &rows)))
            .ok()
            .flatten();
        // casbin keeps one copy of a repeated row.
        let count = rows
            .iter()
            .filter(|r| r.ptype == "p")
            .map(|r| &r.values)
            .collect::<std::collections::HashSet<_>>()
            .len();
        // Without the index, the enforcer decides: give it the rows, and remember
        // each distinct `p` row's source for its explanations.
        let mut rule_sources: HashMap<Vec<String>, usize> = HashMap::new();
        if index.is_none() {
            for (at, row) in rows.into_iter().enumerate() {
                if row.ptype == "p" {
                    // casbin keeps one copy of a repeated row, at the place of the last.
                    rule_sources.insert(row.values.clone(), at);
                }
                let sec = &row.ptype[..1];
                enforcer
                    .get_mut_model()
                    .add_policy(sec, &row.ptype, row.values);
            }
            enforcer
                .build_role_links()
                .map_err(|e| keys.reject_set(format!("invalid role rows: {e}")))?;
        }
        Ok(Arc::new(CasbinEngine {
            enforcer,
            index,
            request_tokens: shape.request_tokens,
            count,
            rule_sources,
            sources,
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
    /// Fields (by row type and index) that are the pattern of a `regexMatch`.
    regex_fields: Vec<(String, usize)>,
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
        let mut regex_fields = Vec::new();
        for matcher in sections
            .get("m")
            .into_iter()
            .flatten()
            .map(|(_, m)| &m.value)
        {
            for pattern_arg in regex_match_patterns(matcher) {
                for (ptype, tokens) in &p_tokens {
                    if let Some(i) = tokens.iter().position(|t| *t == pattern_arg) {
                        regex_fields.push((ptype.clone(), i));
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
            regex_fields,
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
        for (ptype, i) in &self.regex_fields {
            if *ptype == row.ptype
                && let Err(e) = Regex::new(&row.values[*i])
            {
                return Err(format!(
                    "field {} is a regexMatch pattern and not a valid regex: {e}",
                    i + 1
                ));
            }
        }
        Ok(())
    }
}

/// The second (pattern) argument of each `regexMatch(...)` call of a matcher, as
/// written (e.g. `p_obj`).
fn regex_match_patterns(matcher: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = matcher;
    while let Some(at) = rest.find("regexMatch(") {
        rest = &rest[at + "regexMatch(".len()..];
        let mut depth = 0usize;
        let mut args = vec![String::new()];
        for c in rest.chars() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    args.push(String::new());
                    continue;
                }
                _ => {}
            }
            if let Some(last) = args.last_mut() {
                last.push(c);
            }
        }
        if let Some(pattern) = args.get(1) {
            found.push(pattern.trim().to_owned());
        }
    }
    found
}

/// casbin's own CSV splitting (its `parse_csv_line`), with line numbers.
fn parse_rows(text: &str) -> Vec<SourceRow> {
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
    enforcer: Enforcer,
    /// Decides standard RBAC (with or without domains) without walking every row.
    index: Option<CasbinIndex>,
    request_tokens: Vec<String>,
    /// Each distinct `p` row's position in `sources` (enforcer only).
    rule_sources: HashMap<Vec<String>, usize>,
    sources: Sources,
    count: usize,
}

/// Where each row of the set comes from.
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
        if let Some(index) = &self.index {
            let fields: Vec<&str> = values.iter().map(String::as_str).collect();
            let decision = index
                .enforce(&fields)
                .map_err(|e| DecideError::Engine(e.to_string()))?;
            let policy_ids = decision
                .explain
                .iter()
                .filter_map(|&row| self.sources.name(row))
                .collect();
            return Ok(Verdict {
                allowed: decision.allowed,
                policy_ids,
                errors: Vec::new(),
            });
        }
        let (allowed, rules) = self
            .enforcer
            .enforce_ex(values)
            .map_err(|e| DecideError::Engine(e.to_string()))?;
        let policy_ids = rules
            .iter()
            .map(|rule| {
                self.rule_sources
                    .get(rule)
                    .and_then(|&at| self.sources.name(at))
                    .unwrap_or_else(|| rule.join(", "))
            })
            .collect();
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
