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

mod auth;
mod config;
mod endpoints;
mod error;
mod keeper;
mod kv;
mod lease;
mod retry;
mod tls;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::StatusRequest;
use etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

pub use config::{Backoff, ClientConfig, Credentials, MIN_KEEPALIVE_INTERVAL, Pem, TlsConfig};
pub use endpoints::EndpointHealth;
pub use error::{EndpointFailure, Error};
pub use keeper::{LeaseKeeper, LeaseLost, LeaseState};
pub use retry::RetryPolicy;
pub use watch::{WatchSender, WatchStream};

/// The etcd v3 request and response types used by this client.
pub use etcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, Compare, DeleteRangeRequest, DeleteRangeResponse,
    LeaseGrantResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, ResponseHeader, ResponseOp, StatusResponse, TxnRequest,
    TxnResponse, WatchCreateRequest, WatchResponse,
};

use endpoints::{Endpoint, EndpointSet, ProbeFailure};
use retry::{Failure, classify};

/// How often the prober looks for endpoints whose re-probe is due.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// Largest response accepted; etcd's own client allows this much.
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A resilient etcd v3 client. Cheap to clone; clones share connections and health.
///
/// ```no_run
/// use revwatch::client::{Client, ClientConfig, PutRequest, RangeRequest};
///
/// # async fn demo() -> Result<(), revwatch::client::Error> {
/// let client = Client::connect(ClientConfig::new([
///     "http://127.0.0.1:2379",
///     "http://127.0.0.1:22379",
///     "http://127.0.0.1:32379",
/// ]))
/// .await?;
/// client
///     .put(PutRequest { key: b"greeting".to_vec(), value: b"hello".to_vec(), ..Default::default() })
///     .await?;
/// let resp = client
///     .range(RangeRequest { key: b"greeting".to_vec(), ..Default::default() })
///     .await?;
/// assert_eq!(resp.kvs[0].value, b"hello");
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Arc<EndpointSet>,
    config: ClientConfig,
    auth: auth::Auth,
    prober: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoints", &self.endpoint_health())
            .finish_non_exhaustive()
    }
}

/// Whether a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Safe to replay (reads, revoke, ...).
    Idempotent,
    /// Replayed only if it provably never left the client.
    Once,
}

impl Client {
    /// Validates `config`, loads TLS material, checks that at least one endpoint
    /// answers, and authenticates when credentials are configured.
    ///
    /// Every failure is reported rather than waited out: a bad URL or TLS file is
    /// [`Error::InvalidConfig`] / [`Error::Tls`], unreachable endpoints give
    /// [`Error::AllEndpointsUnreachable`], wrong credentials [`Error::Auth`].
    pub async fn connect(config: ClientConfig) -> Result<Client, Error> {
        config.validate()?;
        let tls = config.tls.as_ref().map(tls::load).transpose()?;
        let endpoints = Arc::new(EndpointSet::new(&config, tls.as_ref())?);

        let probe_timeout = config.request_timeout;
        let results = futures::future::join_all(
            endpoints
                .all()
                .iter()
                .map(|e| e.probe_and_mark(probe_timeout)),
        )
        .await;
        let unreachable: Vec<EndpointFailure> = endpoints
            .all()
            .iter()
            .zip(&results)
            .filter_map(|(e, r)| match r {
                Err(ProbeFailure::Unreachable(reason)) => Some(EndpointFailure {
                    endpoint: e.name.clone(),
                    reason: reason.clone(),
                }),
                _ => None,
            })
            .collect();
        if unreachable.len() == endpoints.len() {
            return Err(Error::AllEndpointsUnreachable(unreachable));
        }

        let prober = tokio::spawn(probe_loop(Arc::clone(&endpoints), probe_timeout));
        let client = Client {
            inner: Arc::new(Inner {
                auth: auth::Auth::new(config.credentials.clone()),
                endpoints,
                config,
                prober,
            }),
        };
        if client.inner.auth.enabled() {
            client.authenticate().await?;
        }
        Ok(client)
    }

    /// Initial authentication: the first endpoint that can answer decides.
    async fn authenticate(&self) -> Result<(), Error> {
        let timeout = self.inner.config.request_timeout;
        let mut failures = Vec::new();
        for ep in self.inner.endpoints.all() {
            match self.inner.auth.refresh(ep, None, timeout).await {
                Ok(()) => return Ok(()),
                Err(Error::Connection { endpoint, reason }) => {
                    failures.push(EndpointFailure { endpoint, reason })
                }
                Err(Error::Timeout { endpoint, after }) => failures.push(EndpointFailure {
                    endpoint,
                    reason: format!("timed out after {after:?}"),
                }),
                // e.g. "no leader": another member may be able to answer.
                Err(Error::Grpc {
                    code: tonic::Code::Unavailable,
                    message,
                    endpoint,
                }) => failures.push(EndpointFailure {
                    endpoint,
                    reason: message,
                }),
                Err(e) => return Err(e),
            }
        }
        Err(Error::AllEndpointsUnreachable(failures))
    }

    /// Health of every endpoint, in configuration order.
    pub fn endpoint_health(&self) -> Vec<EndpointHealth> {
        self.inner
            .endpoints
            .all()
            .iter()
            .map(|e| e.snapshot())
            .collect()
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Maintenance.Status of whichever healthy endpoint serves the call.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        self.execute(
            "status",
            Retry::Idempotent,
            StatusRequest {},
            |ch, req| async move { MaintenanceClient::new(ch).status(req).await },
        )
        .await
    }

    /// Maintenance.Status of every endpoint, in configuration order, each with its
    /// own result (no retries, no failover).
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        let timeout = self.inner.config.request_timeout;
        let calls = self.inner.endpoints.all().iter().map(|ep| async move {
            let mut req = tonic::Request::new(StatusRequest {});
            let res = match self.inner.auth.apply(&mut req) {
                Ok(()) => {
                    let mut client = MaintenanceClient::new(ep.channel.clone());
                    match tokio::time::timeout(timeout, client.status(req)).await {
                        Ok(Ok(resp)) => Ok(resp.into_inner()),
                        Ok(Err(status)) => Err(failure_error(classify(&status, &ep.name), ep)),
                        Err(_) => Err(Error::Timeout {
                            endpoint: ep.name.clone(),
                            after: timeout,
                        }),
                    }
                }
                Err(e) => Err(e),
            };
            (ep.name.clone(), res)
        });
        futures::future::join_all(calls).await
    }

    /// Runs one unary call with failover and retries; see [`Retry`].
    pub(crate) async fn execute<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        req: Req,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.execute_on(op, retry, req, call)
            .await
            .map(|(resp, _)| resp)
    }

    /// Like [`execute`](Self::execute), also returning the endpoint that answered.
    pub(crate) async fn execute_on<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        req: Req,
        call: F,
    ) -> Result<(Resp, Arc<Endpoint>), Error>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let inner = &*self.inner;
        let policy = &inner.config.retry;
        let timeout = inner.config.request_timeout;
        let all = inner.endpoints.all();
        let started = Instant::now();
        let mut tried = vec![false; all.len()];
        // The latest transport failure per endpoint, for AllEndpointsUnreachable.
        let mut unreachable: Vec<Option<String>> = vec![None; all.len()];
        let mut last_err: Option<Error> = None;
        let mut attempts = 0u32;
        let mut round = 0u32;
        let mut reauthenticated = false;

        loop {
            let Some(i) = inner.endpoints.pick(&tried) else {
                let delay = policy.backoff.delay(round, &mut rand::rng());
                round += 1;
                if started.elapsed() + delay > policy.max_elapsed {
                    return Err(give_up(all, unreachable, last_err));
                }
                tokio::time::sleep(delay).await;
                tried.fill(false);
                continue;
            };
            tried[i] = true;
            attempts += 1;
            let ep = &all[i];
            let token = inner.auth.token();
            let mut request = tonic::Request::new(req.clone());
            inner.auth.apply(&mut request)?;

            let outcome = tokio::time::timeout(timeout, call(ep.channel.clone(), request)).await;
            let (err, transport_reason, replayable) = match outcome {
                Ok(Ok(resp)) => {
                    ep.mark_success();
                    return Ok((resp.into_inner(), Arc::clone(ep)));
                }
                Err(_) => {
                    let reason = format!("timed out after {timeout:?}");
                    let err = Error::Timeout {
                        endpoint: ep.name.clone(),
                        after: timeout,
                    };
                    (err, Some(reason), retry == Retry::Idempotent)
                }
                Ok(Err(status)) => match classify(&status, &ep.name) {
                    Failure::Transport { reason, maybe_sent } => {
                        let err = Error::Connection {
                            endpoint: ep.name.clone(),
                            reason: reason.clone(),
                        };
                        (err, Some(reason), retry == Retry::Idempotent || !maybe_sent)
                    }
                    Failure::Unavailable(err) => {
                        ep.mark_failure(&err.to_string());
                        (err, None, retry == Retry::Idempotent)
                    }
                    Failure::InvalidToken(err) => {
                        if reauthenticated || !inner.auth.enabled() {
                            return Err(err);
                        }
                        // The server rejected the request before running it, so a
                        // replay is safe whatever the request is.
                        reauthenticated = true;
                        inner.auth.refresh(ep, token.as_ref(), timeout).await?;
                        tried[i] = false;
                        continue;
                    }
                    Failure::Fatal(err) => return Err(err),
                },
            };
            if let Some(reason) = transport_reason {
                ep.mark_failure(&reason);
                unreachable[i] = Some(reason);
            }
            tracing::debug!(op, endpoint = %ep.name, attempt = attempts, error = %err, "attempt failed");
            if !replayable {
                return Err(err);
            }
            last_err = Some(err);
            if attempts >= policy.max_attempts || started.elapsed() >= policy.max_elapsed {
                return Err(give_up(all, unreachable, last_err));
            }
        }
    }
}

/// The error for a call that ran out of attempts: every endpoint's transport failure
/// when none could be reached, otherwise the last error.
fn give_up(all: &[Arc<Endpoint>], unreachable: Vec<Option<String>>, last: Option<Error>) -> Error {
    let last_was_transport = matches!(
        last,
        None | Some(Error::Connection { .. } | Error::Timeout { .. })
    );
    if last_was_transport && unreachable.iter().all(Option::is_some) {
        let failures = all
            .iter()
            .zip(unreachable)
            .map(|(e, r)| EndpointFailure {
                endpoint: e.name.clone(),
                reason: r.unwrap_or_default(),
            })
            .collect();
        return Error::AllEndpointsUnreachable(failures);
    }
    last.unwrap_or_else(|| Error::AllEndpointsUnreachable(Vec::new()))
}

/// The error for a failure outside the retry loop (single-endpoint calls).
pub(crate) fn failure_error(failure: Failure, ep: &Endpoint) -> Error {
    match failure {
        Failure::Transport { reason, .. } => {
            ep.mark_failure(&reason);
            Error::Connection {
                endpoint: ep.name.clone(),
                reason,
            }
        }
        Failure::Unavailable(e) => {
            ep.mark_failure(&e.to_string());
            e
        }
        Failure::InvalidToken(e) | Failure::Fatal(e) => e,
    }
}

/// Re-probes endpoints that left the rotation, until the client is dropped.
async fn probe_loop(endpoints: Arc<EndpointSet>, timeout: Duration) {
    loop {
        tokio::time::sleep(PROBE_TICK).await;
        endpoints.spawn_due_probes(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<Client>();
        send_sync::<WatchSender>();
        send::<WatchStream>();
        send_sync::<LeaseKeeper>();
        send_sync::<Error>();
    }
}
