//! Sound pre-filters so a decision evaluates only the rules that can match.
//!
//! Each backend's index returns exactly what its engine returns on the whole rule set (decision,
//! determining rules, errors); it only skips rules that provably cannot match the request, and
//! hands everything it cannot decide by equality or membership to the engine itself.
//! [`differential`] checks that claim on random rule sets against the unindexed engines.

pub mod casbin;
pub mod cedar;
pub mod differential;

pub use self::differential::{Mismatch, Mismatches, differential_casbin, differential_cedar};
