//! An embedded, single-member etcd v3-compatible server.
//!
//! It serves etcd's v3 gRPC API with etcd 3.4's semantics, so etcd clients (etcdctl, the Go
//! client, revwatch itself) work against it unchanged:
//!
//! - **KV**: Range (revision, limit, count/keys only, sorting, revision filters), Put,
//!   DeleteRange, Txn (every compare target and result, nested txns), Compact;
//! - **Watch**: per-stream ids, start revisions (including compacted ones), prev_kv,
//!   filters, fragmenting, progress requests and periodic progress notification;
//! - **Lease**: Grant, Revoke, KeepAlive, TimeToLive, Leases, with expiry;
//! - **Maintenance**: Status, Alarm, HashKV; **Cluster**: MemberList.
//!
//! Everything else answers Unimplemented. Every acknowledged write has been fsynced; writes
//! from concurrent clients share group commits. It is single-node by design: for
//! replication and high availability, run a real etcd cluster.
//!
//! With the `fault-injection` feature, `Server::faults` gives tests deterministic faults
//! that a real etcd cannot produce on cue (stalled streams, late progress replies, lagging
//! reads, ...).
//!
//! ```no_run
//! # async fn demo() -> Result<(), revwatch_server::ServerError> {
//! use revwatch_server::{Server, ServerConfig};
//! let running = Server::start(ServerConfig::new("/tmp/revwatch-data")).await?;
//! // Point any etcd v3 client at running.endpoint().
//! running.shutdown().await?;
//! # Ok(()) }
//! ```

mod authority;
mod backend;
mod checkpoint;
mod compactor;
mod config;
mod error;
#[cfg(feature = "fault-injection")]
mod fault_controller;
mod faults;
mod hash;
mod lease;
mod mvcc;
mod server;
mod service;
mod shared;
#[cfg(feature = "cli")]
pub mod standalone;
mod store;
mod validate;
mod wal;
mod watch;
mod watch_hub;

pub use config::{AutoCompaction, AutoCompactionError, Limits, ServerConfig};
pub use error::{EtcdError, ServerError};
#[cfg(feature = "fault-injection")]
pub use fault_controller::{FaultController, WatchStreamInfo};
pub use server::{RunningServer, Server};
