//! revwatch-policy: authorization policies kept in etcd, compiled from a revwatch mirror.
//!
//! ```text
//! mirror snapshot ─► layout (the active tree) ─► engine (Cedar | casbin) ─► index ─► decisions
//! ```
//!
//! [`Policies`] follows a [`Mirror`](revwatch::mirror::Mirror) of a prefix: each
//! revision's active tree ([`layout`]) is compiled off the decision path by the
//! chosen [`Backend`] and activated with one atomic swap; a candidate that fails
//! keeps the last-known-good set, and its [`Rejection`] (key, revision, message) is
//! in [`PolicyStatus`]. Decisions carry the active set's revision, the determining
//! policy ids and a decision id, and accept a [`Consistency`] requirement
//! (read-your-writes by revision, or one linearizable read);
//! [`Policies::decide_batch`] decides many requests on one set. Each load (read
//! and compile of a candidate) is reported with its outcome and duration
//! ([`LoadReport`]: the status's latest, and every one through
//! [`Policies::load_reports`]).
//!
//! # Files of each backend
//!
//! * **Cedar** ([`cedar`]): `*.cedar` policy files, an optional
//!   `schema.cedarschema` (with it: strict validation before activation, entities
//!   checked against it, request contexts parsed with it), and `*.entities.json`
//!   entity files. A policy's id is its `@id("...")` annotation, else
//!   `<path>#<position>`.
//! * **casbin** ([`casbin`]): `model.conf` and `*.csv` rows; a matched rule is
//!   reported as `<path>:<line>`. Each token of the model's request definition is
//!   read from the request context, else `sub`/`obj`/`act` are the principal,
//!   resource and action.
//!
//! Both engines' traps are checked before activation (see each module), and any
//! panic left is contained, at compile (a rejection) and at decide (an error for
//! that request).

pub mod index;
pub mod layout;
pub mod publish;

mod activation;
pub mod casbin;
pub mod cedar;
pub mod decision;
pub mod engine;
mod service;
pub mod status;

pub use decision::{Consistency, DecideError, Decision, Effect, Request};
pub use engine::{Backend, Compiler, Engine, Limits, Verdict};
pub use service::{ActiveSet, Policies, PolicyConfig};
pub use status::{DegradedReason, LoadOutcome, LoadReport, PolicyState, PolicyStatus, Rejection};
