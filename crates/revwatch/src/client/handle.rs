//! The client handle: connecting, health, and the entry point of every call.

use std::sync::Arc;
use std::time::Duration;

use etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_proto::etcdserverpb::{StatusRequest, StatusResponse};
use tonic::transport::ClientTlsConfig;

use super::auth::Auth;
use super::config::ClientConfig;
use super::endpoint_url::{EndpointProblem, InvalidEndpoint, parse_endpoint};
use super::endpoints::{Endpoint, EndpointHealth, EndpointSet, ProbeFailure};
use super::error::{ConfigError, EndpointFailure, Error};
use super::retry::{Retrier, Retry};
use super::tls;

/// How often the prober looks for endpoints whose re-probe is due.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// Largest response accepted; etcd's own client allows this much.
pub(crate) const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

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
    auth: Auth,
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
        let endpoints = Arc::new(EndpointSet::new(build_endpoints(&config, tls.as_ref())?));

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
                auth: Auth::new(config.credentials.clone()),
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
                Err(Error::Connection {
                    endpoint, reason, ..
                }) => failures.push(EndpointFailure { endpoint, reason }),
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
        self.retrier()
            .execute(
                "status",
                Retry::Idempotent,
                StatusRequest {},
                |ep, req| async move { MaintenanceClient::new(ep.channel.clone()).status(req).await },
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
                        Ok(Err(status)) => Err(ep.failed(status)),
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

    /// The retry engine, for one call.
    pub(crate) fn retrier(&self) -> Retrier<'_> {
        let inner = &*self.inner;
        Retrier {
            endpoints: &inner.endpoints,
            auth: &inner.auth,
            policy: &inner.config.retry,
            timeout: inner.config.request_timeout,
        }
    }
}

/// One lazily connecting endpoint per configured URL. Nothing touches the network yet.
fn build_endpoints(
    config: &ClientConfig,
    tls: Option<&ClientTlsConfig>,
) -> Result<Vec<Arc<Endpoint>>, Error> {
    let mut endpoints = Vec::with_capacity(config.endpoints.len());
    for raw in &config.endpoints {
        // Duplicates were rejected by `ClientConfig::validate`.
        let parsed = parse_endpoint(raw, tls.is_some()).map_err(ConfigError::from)?;
        let mut ep = tonic::transport::Endpoint::from_shared(parsed.uri)
            .map_err(|e| {
                ConfigError::from(InvalidEndpoint {
                    raw: raw.clone(),
                    problem: EndpointProblem::Unparsable(Arc::new(e)),
                })
            })?
            .connect_timeout(config.connect_timeout)
            .http2_keep_alive_interval(config.keepalive_interval)
            .keep_alive_timeout(config.keepalive_timeout)
            // etcd enforces PermitWithoutStream=false: pinging idle connections
            // gets them closed with "too many pings". Idle connections need no
            // pings: every request has its own timeout.
            .keep_alive_while_idle(false)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            ep = tls::apply(ep, tls, &parsed.name)?;
        }
        endpoints.push(Arc::new(Endpoint::new(
            parsed.name,
            ep.connect_lazy(),
            config.probe_backoff,
        )));
    }
    Ok(endpoints)
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
    use crate::client::{LeaseKeeper, WatchSender, WatchStream};

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
