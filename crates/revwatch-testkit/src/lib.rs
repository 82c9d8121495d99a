//! Test harness for revwatch: real etcd processes and a TCP fault proxy.
//!
//! * [`etcd::EtcdCluster`] runs `/usr/bin/etcd` (or `$REVWATCH_ETCD_BIN`) as a
//!   single member or a 3-member cluster on free loopback ports, optionally
//!   with TLS and auth, and can `kill -9`, freeze (SIGSTOP), thaw and restart
//!   members, find or move the leader and compact. With
//!   [`ClusterOptions::peer_links`](etcd::ClusterOptions::peer_links) peer
//!   traffic runs through per-link fault proxies, so a member can be cut off
//!   from its peers while clients still reach it ([`etcd::EtcdCluster::isolate`]).
//! * [`proxy::FaultProxy`] sits between a client and one member and injects
//!   blackholes, connection resets, latency and bandwidth limits at runtime.
//!
//! Nothing is left behind: dropping a cluster kills its processes and removes
//! its directories, also when the test panics.
//!
//! ```no_run
//! use std::time::Duration;
//! use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};
//!
//! # async fn demo() -> Result<(), revwatch_testkit::TestkitError> {
//! let mut cluster = EtcdCluster::start(ClusterOptions { members: 3, ..Default::default() }).await?;
//! println!("etcd at {:?}", cluster.endpoints());
//! let leader = cluster.leader().await?;
//! cluster.kill(leader)?;
//! let new_leader = cluster.wait_for_leader(Duration::from_secs(10)).await?;
//! assert_ne!(new_leader, leader);
//! cluster.restart(leader).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod error;
pub mod etcd;
pub mod grpc_proxy;
pub mod proxy;

pub use error::TestkitError;
