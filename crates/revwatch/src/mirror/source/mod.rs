//! Where the mirror reads from: paginated ranges at a pinned revision, and watch
//! streams. [`ClientSource`] reads from etcd. With the `test-util` feature,
//! `MemorySource` is an in-process etcd-like store for tests and benchmarks; it
//! is not compiled otherwise, as no user needs a third MVCC in their build.

mod client;
#[cfg(feature = "test-util")]
mod memory;

use std::future::Future;

use crate::client::{Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse};

pub use client::ClientSource;
#[cfg(feature = "test-util")]
pub use memory::{MemorySource, MemoryWatch, Op as MemoryOp};

/// A store the mirror can list and watch. Errors are the client's, so that
/// `is_compacted`, `is_permission_denied` and `is_retryable` classify them.
pub trait Source: Clone + Send + Sync + 'static {
    /// The watch stream type.
    type Watch: WatchHandle;

    /// KV.Range, retried as the source sees fit.
    fn range(&self, req: RangeRequest)
    -> impl Future<Output = Result<RangeResponse, Error>> + Send;

    /// Opens a watch stream and sends `req` as its create request.
    fn watch(
        &self,
        req: WatchCreateRequest,
    ) -> impl Future<Output = Result<Self::Watch, Error>> + Send;
}

/// One open watch stream.
pub trait WatchHandle: Send + 'static {
    /// The next raw response (created, events, progress, canceled); `Ok(None)` when
    /// the server closed the stream. Must be cancel-safe: the mirror drops a
    /// pending call to send progress requests.
    fn message(&mut self) -> impl Future<Output = Result<Option<WatchResponse>, Error>> + Send;

    /// Sends a progress request on the stream.
    fn request_progress(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// Where the stream is connected, for status and logs.
    fn endpoint(&self) -> String;

    /// Sends `req` once to the endpoint this stream is on, on its connection: a
    /// stalled stream's way to tell an endpoint that went silent (a transport
    /// error, `Unavailable`, or no answer: the caller bounds the wait) from one
    /// that answers reads but ignores progress requests (any other answer, even
    /// an error the server sent). Required: only the stream knows its connection,
    /// and a made-up answer would blame the wrong cause in the stall's message.
    fn probe(&mut self, req: RangeRequest) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The `range_end` that covers every key starting with `prefix`: the prefix with
/// trailing 0xff bytes dropped and its last byte incremented; `"\0"` (every key)
/// for an empty or all-0xff prefix. etcd's rule, kept with the others in
/// [`etcd_proto::key_range`].
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    etcd_proto::key_range::prefix_end(prefix)
}

#[cfg(test)]
mod tests {
    use super::prefix_range_end;

    #[test]
    fn prefix_range_end_follows_etcd() {
        assert_eq!(prefix_range_end(b"a/"), b"a0");
        assert_eq!(prefix_range_end(b"a\xff"), b"b");
        assert_eq!(prefix_range_end(b"\xff\xff"), b"\0");
        assert_eq!(prefix_range_end(b""), b"\0");
    }
}
