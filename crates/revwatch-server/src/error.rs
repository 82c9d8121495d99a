//! Errors: the public [`ServerError`], and [`EtcdError`], the request-level errors whose gRPC
//! codes and messages are exactly etcd's.

use tonic::{Code, Status};

/// Failure to open or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created or used.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The embedded database failed.
    #[error("storage: {0}")]
    Storage(#[from] redb::Error),
    /// The database holds a record this version cannot read.
    #[error("corrupt record in storage: {0}")]
    Corrupt(String),
    /// The write-ahead log could not be read or written.
    #[error("write-ahead log {path}: {source}")]
    Wal {
        /// The segment or directory.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The write-ahead log is damaged somewhere a crash cannot explain (anywhere but the
    /// end of its last segment), or records it needs are missing.
    #[error("corrupt write-ahead log {path} at byte {offset}: {reason}")]
    WalCorrupt {
        /// The segment or directory.
        path: std::path::PathBuf,
        /// Where in the segment.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Binding or accepting on the listen address failed.
    #[error("listen: {0}")]
    Listen(std::io::Error),
    /// The gRPC transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A request-level error. [`EtcdError::to_status`] gives etcd's exact gRPC code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdError {
    /// The requested revision was compacted away.
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    /// The requested revision is above the current one.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRev,
    /// A request needed a key but had none.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// `ignore_value`/`ignore_lease` on a missing key.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// A value was given together with `ignore_value`.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A lease was given together with `ignore_lease`.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A txn branch or compare list exceeded the op limit.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A txn puts and deletes (or puts twice) the same key.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// The request exceeded the request-size limit.
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    /// A put's value exceeded the value-size limit.
    #[error("etcdserver: value is too large")]
    ValueTooLarge,
    /// The lease does not exist.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant named an id that is already in use.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// The TTL exceeds etcd's maximum (9,000,000,000 s).
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// The server is shutting down, or its storage failed and it stopped taking writes.
    #[error("etcdserver: server stopped")]
    Stopped,
}

impl EtcdError {
    /// The gRPC status etcd returns for this error.
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::Compacted | Self::FutureRev | Self::LeaseTtlTooLarge => Code::OutOfRange,
            Self::LeaseNotFound => Code::NotFound,
            Self::LeaseExists => Code::FailedPrecondition,
            Self::Stopped => Code::Unavailable,
            Self::EmptyKey
            | Self::KeyNotFound
            | Self::ValueProvided
            | Self::LeaseProvided
            | Self::TooManyOps
            | Self::DuplicateKey
            | Self::RequestTooLarge
            | Self::ValueTooLarge => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

impl From<EtcdError> for Status {
    fn from(e: EtcdError) -> Self {
        e.to_status()
    }
}
