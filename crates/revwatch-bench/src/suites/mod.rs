//! One module per suite; each returns a [`crate::report::Report`].

pub mod client;
