//! Differential proof of the indexes: random rule sets and requests, each decided by the index
//! and by the engine on the whole set, compared field by field.
//!
//! Both runs are deterministic in their seed. A run is split into worlds (a rule set and its
//! entities or role links) of [`REQUESTS_PER_WORLD`] requests each; a mismatch names the seed, the
//! world and the request, and carries the world's rules and both answers.

mod casbin;
mod cedar;
mod reload;
mod rng;

pub use self::casbin::differential_casbin;
pub use self::cedar::differential_cedar;
pub use self::reload::{ReloadRun, differential_casbin_reload, differential_cedar_reload};

/// Requests decided against one random rule set before the next is drawn.
pub const REQUESTS_PER_WORLD: usize = 250;

/// Mismatches kept with full detail (the rest are only counted).
pub const KEPT_MISMATCHES: usize = 16;

/// The outcome of a differential run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mismatches {
    /// Requests decided by both sides.
    pub requests: usize,
    /// Rule sets drawn.
    pub worlds: usize,
    /// Rule sets the index declined (decided by the engine alone, as the caller would).
    pub fallback_worlds: usize,
    /// Requests whose answers differed.
    pub count: usize,
    /// The first few mismatches, in full.
    pub examples: Vec<Mismatch>,
}

impl Mismatches {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn record(&mut self, mismatch: impl FnOnce() -> Mismatch) {
        self.count += 1;
        if self.examples.len() < KEPT_MISMATCHES {
            self.examples.push(mismatch());
        }
    }
}

/// One request on which the index and the engine disagreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub seed: u64,
    pub world: usize,
    pub request: usize,
    /// The request, as the engine saw it.
    pub input: String,
    pub indexed: String,
    pub engine: String,
    /// The world's rules (and entities or model), enough to replay the request.
    pub rules: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} world {} request {}: {}\n  indexed: {}\n  engine:  {}\n--- rules ---\n{}",
            self.seed, self.world, self.request, self.input, self.indexed, self.engine, self.rules
        )
    }
}

/// Splits `requests` into worlds: `(world number, requests in it)`.
fn worlds(requests: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..requests.div_ceil(REQUESTS_PER_WORLD)).map(move |world| {
        let start = world * REQUESTS_PER_WORLD;
        (world, REQUESTS_PER_WORLD.min(requests - start))
    })
}

/// A decision as the differential tests compare it: the effect, the determining ids
/// and the error messages, both sorted (their order carries no meaning).
fn outcome_line(allowed: bool, mut ids: Vec<String>, mut errors: Vec<String>) -> String {
    ids.sort();
    errors.sort();
    format!("{allowed} ids={ids:?} errors={errors:?}")
}

/// [`outcome_line`] of a Cedar response: everything an index must reproduce.
fn cedar_outcome(response: &cedar_policy::Response) -> String {
    let diagnostics = response.diagnostics();
    outcome_line(
        response.decision() == cedar_policy::Decision::Allow,
        diagnostics.reason().map(ToString::to_string).collect(),
        diagnostics.errors().map(ToString::to_string).collect(),
    )
}
