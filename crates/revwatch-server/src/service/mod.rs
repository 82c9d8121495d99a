//! The tonic services. Each is a thin layer: validate, call the store, complete headers.

mod cluster;
mod kv;
mod lease;
mod maintenance;
mod watch;

pub(crate) use cluster::ClusterService;
pub(crate) use kv::KvService;
pub(crate) use lease::LeaseService;
pub(crate) use maintenance::MaintenanceService;
pub(crate) use watch::WatchService;

/// The API version this server implements, reported by Status.
pub(crate) const COMPAT_VERSION: &str = "3.4.0";
