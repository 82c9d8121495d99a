//! The engine trait both backends implement, and what compiling a tree needs.
//!
//! A [`Compiler`] turns a [`Tree`] (the files of one revision) into an immutable
//! [`Engine`]; it keeps a parse cache keyed by path and `mod_revision`, so a change
//! of one key re-parses one file (a Cedar file: only its changed statements). Both
//! compilers also keep the last set they built: when only policy, entity or row files
//! changed (same schema or model), the changed files' rules leave and join a persistent
//! index that shares every other rule with the previous set, so a one-key change costs
//! O(changed), not O(set). An engine answers requests and is shared by every decider
//! until the next activation replaces it whole.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::decision::{DecideError, Request};
use crate::layout::{Layout, Tree, TreeFile};
use crate::status::Rejection;

/// Which engine compiles the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Cedar: `*.cedar` policies, optional `schema.cedarschema`, `*.entities.json`.
    Cedar,
    /// casbin: `model.conf` and `*.csv` rows.
    Casbin,
}

impl Backend {
    /// A fresh compiler (with an empty parse cache) for this backend.
    pub fn compiler(self, limits: Limits) -> Box<dyn Compiler> {
        match self {
            Backend::Cedar => Box::new(crate::cedar::CedarCompiler::new(limits)),
            Backend::Casbin => Box::new(crate::casbin::CasbinCompiler::new(limits)),
        }
    }
}

/// Bounds on what a tree may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted value of one key, in bytes. Default 1 MiB.
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 1 << 20,
        }
    }
}

/// A backend's answer, before it is stamped with a revision and an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// True to allow.
    pub allowed: bool,
    /// The determining policies (Cedar) or matched rules (casbin).
    pub policy_ids: Vec<String>,
    /// Policies that failed to evaluate and were skipped.
    pub errors: Vec<String>,
}

/// A compiled, immutable policy set.
pub trait Engine: Send + Sync + 'static {
    /// Decides one request. Errors are for this request only.
    fn decide(&self, request: &Request) -> Result<Verdict, DecideError>;
    /// Number of policies (Cedar) or `p` rows (casbin).
    fn policy_count(&self) -> usize;
}

/// Compiles trees into engines, caching what it parsed.
pub trait Compiler: Send + 'static {
    /// Compiles `tree`; `prefix` is the mirrored prefix, to name keys in
    /// rejections. Must not panic (callers contain panics anyway).
    fn compile(&mut self, tree: &Tree, prefix: &str) -> Result<Arc<dyn Engine>, Rejection>;
}

/// Runs `compile`, turning a panic into a rejection at the tree's prefix. The flag
/// is true after a panic: the compiler's cache may be inconsistent, drop it.
pub(crate) fn compile_contained(
    compiler: &mut dyn Compiler,
    tree: &Tree,
    prefix: &str,
) -> (Result<Arc<dyn Engine>, Rejection>, bool) {
    match catch_unwind(AssertUnwindSafe(|| compiler.compile(tree, prefix))) {
        Ok(result) => (result, false),
        Err(panic) => (
            Err(Rejection {
                key: prefix.to_owned(),
                revision: tree.revision,
                key_revision: None,
                message: format!("the engine panicked: {}", panic_message(&panic)),
            }),
            true,
        ),
    }
}

/// Runs `decide`, turning a panic into an engine error for this request.
pub fn decide_contained(engine: &dyn Engine, request: &Request) -> Result<Verdict, DecideError> {
    catch_unwind(AssertUnwindSafe(|| engine.decide(request))).unwrap_or_else(|panic| {
        Err(DecideError::Engine(format!(
            "the engine panicked: {}",
            panic_message(&panic)
        )))
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Names the keys of one tree in rejections.
#[derive(Debug, Clone)]
pub(crate) struct KeyNamer<'a> {
    pub prefix: &'a str,
    pub generation: Option<&'a str>,
    pub revision: i64,
}

impl<'a> KeyNamer<'a> {
    pub fn new(tree: &'a Tree, prefix: &'a str) -> Self {
        KeyNamer {
            prefix,
            generation: tree.generation.as_deref(),
            revision: tree.revision,
        }
    }

    /// The etcd key holding `path`.
    pub fn key(&self, path: &str) -> String {
        let key = Layout::new(self.prefix).file(self.generation, path);
        String::from_utf8_lossy(&key).into_owned()
    }

    /// A rejection of the file at `path`.
    pub fn reject(&self, path: &str, file: Option<&TreeFile>, message: String) -> Rejection {
        Rejection {
            key: self.key(path),
            revision: self.revision,
            key_revision: file.map(|f| f.mod_revision),
            message,
        }
    }

    /// A rejection of the set as a whole (no single file at fault).
    pub fn reject_set(&self, message: String) -> Rejection {
        Rejection {
            key: self.prefix.to_owned(),
            revision: self.revision,
            key_revision: None,
            message,
        }
    }

    /// The text of a file: within the size limit and valid UTF-8.
    pub fn text<'f>(
        &self,
        path: &str,
        file: &'f TreeFile,
        limits: &Limits,
    ) -> Result<&'f str, Rejection> {
        let bytes: &[u8] = &file.value;
        if bytes.len() > limits.max_value_bytes {
            return Err(self.reject(
                path,
                Some(file),
                format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    bytes.len(),
                    limits.max_value_bytes
                ),
            ));
        }
        std::str::from_utf8(bytes)
            .map_err(|e| self.reject(path, Some(file), format!("value is not valid UTF-8: {e}")))
    }
}

/// A per-file parse cache: a file is parsed again only when its `mod_revision`
/// changes (files read offline, with `mod_revision` 0, are never cached).
#[derive(Debug)]
pub(crate) struct ParseCache<T> {
    entries: std::collections::HashMap<String, (i64, Arc<T>)>,
    /// Parses done (cache misses), for tests of incremental compiles.
    parses: u64,
}

impl<T> Default for ParseCache<T> {
    fn default() -> Self {
        ParseCache {
            entries: std::collections::HashMap::new(),
            parses: 0,
        }
    }
}

impl<T> ParseCache<T> {
    /// The cached parse of `path` at `mod_revision`, or `parse()`'s result (cached
    /// on success).
    pub fn get_or_parse<E>(
        &mut self,
        path: &str,
        mod_revision: i64,
        parse: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        if mod_revision > 0
            && let Some((rev, parsed)) = self.entries.get(path)
            && *rev == mod_revision
        {
            return Ok(Arc::clone(parsed));
        }
        self.parses += 1;
        let parsed = Arc::new(parse()?);
        if mod_revision > 0 {
            self.entries
                .insert(path.to_owned(), (mod_revision, Arc::clone(&parsed)));
        }
        Ok(parsed)
    }

    /// Drops entries for paths not in `keep` (deleted files).
    pub fn retain_paths<'k>(&mut self, keep: impl Fn(&str) -> bool + 'k) {
        self.entries.retain(|path, _| keep(path));
    }

    /// Forgets everything (after a dependency of every parse changed).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// Parses done so far.
    #[cfg(test)]
    pub fn parses(&self) -> u64 {
        self.parses
    }
}
