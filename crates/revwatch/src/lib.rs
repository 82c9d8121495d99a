//! revwatch: a loss-free, revision-exact local mirror of an etcd key prefix.
//!
//! Data flows one way through this crate:
//!
//! ```text
//! etcd ─► client ─► mirror (watch state machine ─► snapshots ─► subscribers)
//! ```
//!
//! * [`client`]: a resilient etcd v3 client (endpoint health, keepalive, retries,
//!   TLS, auth, lease keeper).
//! * [`mirror`]: the mirror itself, built on the client.

pub mod client;
pub mod mirror;
