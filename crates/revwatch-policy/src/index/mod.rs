//! Sound pre-filters so a decision evaluates only the rules that can match.
//!
//! Each backend's index returns exactly what its engine returns on the whole rule set (decision,
//! determining rules, errors); it only skips rules that provably cannot match the request, and
//! hands everything it cannot decide by equality or membership to the engine itself.
//! [`differential`] checks that claim on random rule sets against the unindexed engines.

pub mod casbin;
pub mod cedar;
pub mod differential;

pub use self::differential::{
    Mismatch, Mismatches, ReloadRun, differential_casbin, differential_casbin_reload,
    differential_cedar, differential_cedar_reload,
};

/// A persistent hash map (structure shared between versions, so a copy is O(1) and a change
/// O(log n)) with the index's fast hasher: what lets one activation change a few rules without
/// copying the other ten thousand.
pub(crate) type PersistentMap<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;
