//! Resilient etcd v3 client.
//!
//! * Several endpoints, one gRPC channel each, with health tracking: an endpoint that
//!   fails leaves the rotation at once and a background prober re-checks it with
//!   backoff.
//! * HTTP/2 keepalive on open streams (default every 10 s, 10 s timeout) so a frozen
//!   member is detected; connect and per-request timeouts.
//! * Idempotent requests are retried across endpoints with exponential backoff and
//!   jitter; requests that must not be replayed are retried only when they provably
//!   never left the client.
//! * Watches carry `hasleader=true`, so a member cut off from its cluster fails them.
//! * TLS (rustls) and username/password auth with token refresh.
//! * [`LeaseKeeper`]: keeps a lease alive and tells its owner when it is lost.
//!
//! Module layout, each depending only on those listed before it:
//! `endpoint_url` and `tls` (leaves), `error`, `backoff`, `failure` (what a failed
//! call means), `endpoints` (channels and health), `auth`, `retry` (policy and
//! engine), `config`, `handle` (the [`Client`]), then the calls: `kv`, `lease`,
//! `watch`, `keeper`.

mod auth;
mod backoff;
mod config;
mod endpoint_url;
mod endpoints;
mod error;
mod failure;
mod handle;
mod keeper;
mod kv;
mod lease;
mod retry;
mod tls;
mod watch;

pub use auth::Credentials;
pub use backoff::Backoff;
pub use config::{ClientConfig, MIN_KEEPALIVE_INTERVAL};
pub use endpoint_url::{EndpointProblem, InvalidEndpoint};
pub use endpoints::EndpointHealth;
pub use error::{ConfigError, EndpointFailure, Error};
pub use handle::Client;
pub use keeper::{LeaseKeeper, LeaseLost, LeaseState};
pub use retry::RetryPolicy;
pub use tls::{Pem, PemOrigin, PemRole, TlsConfig, TlsError};
pub use watch::{WatchSender, WatchStream};

/// The etcd v3 request and response types used by this client.
pub use etcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, StatusResponse, TxnRequest,
    TxnResponse, WatchCreateRequest, WatchResponse,
};
