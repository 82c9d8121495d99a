//! The proof that revwatch loses nothing: a seeded workload against real
//! etcd, ground truth read independently from etcd, reproducible fault
//! schedules, and a checker that verifies every delivered history.
//!
//! * [`history`]: what a subscriber observed, in plain types.
//! * [`truth`]: the exact change set of every revision, read from etcd by an
//!   independent raw watch and cross-checked against the writers' records.
//! * [`checker`]: Ordered, Unique, Atomic, Reliable, Resumable, Bookmarkable,
//!   resync diffs, snapshot hashes and final convergence.
//! * [`workload`]: seeded concurrent writers using raw etcd gRPC.
//! * [`schedule`]: seeded fault schedules.
//! * [`run`]: one seeded run under faults (etcd, fault proxies, the
//!   mirror, writers, the executor) checked end to end; soak figures.
//! * [`ops`], [`state`], [`hash`], [`keys`]: the reference model of etcd's
//!   key-value store that all of the above share.

#![warn(missing_docs)]

pub mod adapter;
pub mod checker;
pub mod etcd;
pub mod hash;
pub mod history;
pub mod keys;
pub mod ops;
pub mod record;
pub mod run;
pub mod schedule;
pub mod state;
pub mod truth;
pub mod workload;
