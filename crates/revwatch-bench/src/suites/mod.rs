//! One module per suite; each returns a [`crate::report::Report`].

pub mod client;
pub mod embedded;
pub mod load;
pub mod mirror;
pub mod policy;
pub mod server;
pub mod sidecar;
