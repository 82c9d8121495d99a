//! Watches. Each gRPC watch stream runs one task ([`stream`]) that owns its watchers and
//! reads events from the store's revision log whenever the committed revision moves. The
//! hub (`watch_hub.rs`) only keeps the server-wide view: open streams and the watcher
//! count.

mod fragment;
pub(crate) mod stream;
