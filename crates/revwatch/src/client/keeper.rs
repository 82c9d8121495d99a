//! Lease keeper: grant a lease, keep it alive, tell the owner when it is lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::LeaseKeepAliveRequest;
use etcd_proto::etcdserverpb::LeaseKeepAliveResponse;
use etcd_proto::etcdserverpb::lease_client::LeaseClient;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;

use super::endpoints::Endpoint;
use super::retry::classify;
use super::{Client, Error, Retry, failure_error};

/// Shortest pause between keepalives, whatever the TTL.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(500);

/// Why a kept lease is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseLost {
    /// The server no longer knows the lease (a keepalive reply had TTL <= 0): it
    /// expired, or someone revoked it.
    Gone,
    /// No keepalive succeeded before the TTL ran out, so the server expires it.
    NotRenewedInTime {
        /// The last renewal failure, if any.
        last_error: Option<String>,
    },
}

/// The state of a kept lease, as published to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Renewed; `ttl` is the TTL in seconds the server last reported.
    Alive {
        /// Seconds.
        ttl: i64,
    },
    /// Lost for good; the keeper has stopped.
    Lost(LeaseLost),
}

/// Grants a lease and renews it at about a third of its TTL (with jitter) until it
/// is dropped, stopped or revoked.
///
/// The owner learns of a loss through [`lost`](Self::lost) or [`subscribe`](Self::subscribe):
/// the server reporting the lease gone, or renewal failing until the TTL (counted
/// from when the last successful keepalive was sent) has run out. Dropping the
/// keeper stops renewals; the lease then expires after its TTL.
///
/// ```no_run
/// # async fn demo(client: revwatch::client::Client) -> Result<(), revwatch::client::Error> {
/// use revwatch::client::{LeaseKeeper, PutRequest};
/// let mut keeper = LeaseKeeper::start(&client, 10).await?;
/// client
///     .put(PutRequest { key: b"me".to_vec(), lease: keeper.id(), ..Default::default() })
///     .await?;
/// let why = keeper.lost().await; // resolves only when the lease is gone
/// eprintln!("lease lost: {why:?}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    granted_ttl: i64,
    client: Client,
    state: watch::Receiver<LeaseState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LeaseKeeper {
    /// Grants a lease of `ttl_secs` and starts keeping it alive.
    pub async fn start(client: &Client, ttl_secs: i64) -> Result<LeaseKeeper, Error> {
        let granted_at = Instant::now();
        let grant = client.lease_grant(ttl_secs).await?;
        if !grant.error.is_empty() {
            return Err(Error::Grpc {
                code: tonic::Code::Unknown,
                message: grant.error,
                endpoint: String::new(),
            });
        }
        let (tx, state) = watch::channel(LeaseState::Alive { ttl: grant.ttl });
        let task = tokio::spawn(keep_alive(
            client.clone(),
            grant.id,
            grant.ttl,
            granted_at,
            tx,
        ));
        Ok(LeaseKeeper {
            id: grant.id,
            granted_ttl: grant.ttl,
            client: client.clone(),
            state,
            task,
        })
    }

    /// The lease id, for attaching keys.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL the server granted, in seconds.
    pub fn granted_ttl(&self) -> i64 {
        self.granted_ttl
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes, for `select!` loops. Its sender goes away when
    /// the keeper is dropped.
    pub fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Waits until the lease is lost, and says why.
    pub async fn lost(&mut self) -> LeaseLost {
        let res = self
            .state
            .wait_for(|s| matches!(s, LeaseState::Lost(_)))
            .await
            .map(|s| s.clone());
        match res {
            Ok(LeaseState::Lost(why)) => why,
            // The task always publishes Lost before it ends; it only stops early when
            // the runtime shuts down.
            _ => LeaseLost::NotRenewedInTime {
                last_error: Some("keepalive task ended".into()),
            },
        }
    }

    /// Stops renewing. The lease and its keys expire after the TTL.
    pub fn stop(self) {
        drop(self);
    }

    /// Stops renewing and revokes the lease, deleting its keys now.
    pub async fn revoke(self) -> Result<(), Error> {
        self.task.abort();
        self.client.lease_revoke(self.id).await.map(|_| ())
    }
}

/// An open LeaseKeepAlive stream.
struct KeepAliveStream {
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    inbound: Streaming<LeaseKeepAliveResponse>,
    endpoint: Arc<Endpoint>,
}

async fn keep_alive(
    client: Client,
    id: i64,
    ttl: i64,
    granted_at: Instant,
    state: watch::Sender<LeaseState>,
) {
    let request_timeout = client.config().request_timeout;
    let backoff = client.config().retry.backoff;
    let mut expires_at = granted_at + secs(ttl);
    let mut next = granted_at + renew_interval(ttl);
    let mut stream: Option<KeepAliveStream> = None;
    let mut failures = 0u32;
    let mut last_error: Option<String> = None;
    loop {
        tokio::time::sleep_until(next.min(expires_at).into()).await;
        let now = Instant::now();
        let Some(left) = expires_at
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            tracing::warn!(
                lease = id,
                ?last_error,
                "lease not renewed before its TTL ran out"
            );
            state.send_replace(LeaseState::Lost(LeaseLost::NotRenewedInTime { last_error }));
            return;
        };
        let budget = request_timeout.min(left);
        match tokio::time::timeout(budget, renew(&client, &mut stream, id)).await {
            Ok(Ok(reply_ttl)) if reply_ttl > 0 => {
                expires_at = now + secs(reply_ttl);
                next = now + renew_interval(reply_ttl);
                failures = 0;
                state.send_replace(LeaseState::Alive { ttl: reply_ttl });
                continue;
            }
            Ok(Ok(_)) => {
                tracing::warn!(lease = id, "server reports the lease gone");
                state.send_replace(LeaseState::Lost(LeaseLost::Gone));
                return;
            }
            Ok(Err(e)) => last_error = Some(e.to_string()),
            Err(_) => {
                let reason = format!("keepalive timed out after {budget:?}");
                if let Some(s) = &stream {
                    s.endpoint.mark_failure(&reason);
                }
                last_error = Some(reason);
            }
        }
        // The stream failed: reopen (on a healthy endpoint) after a short backoff.
        stream = None;
        next = Instant::now() + backoff.delay(failures, &mut rand::rng());
        failures = failures.saturating_add(1);
    }
}

/// Sends one keepalive and returns the TTL in the reply, opening a stream if needed.
async fn renew(
    client: &Client,
    stream: &mut Option<KeepAliveStream>,
    id: i64,
) -> Result<i64, Error> {
    let s = match stream {
        Some(s) => {
            if s.tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                return Err(stream_closed(&s.endpoint));
            }
            s
        }
        // A new stream carries its first keepalive already.
        None => stream.insert(open(client, id).await?),
    };
    match s.inbound.message().await {
        Ok(Some(reply)) => Ok(reply.ttl),
        Ok(None) => Err(stream_closed(&s.endpoint)),
        Err(status) => Err(failure_error(
            classify(&status, &s.endpoint.name),
            &s.endpoint,
        )),
    }
}

fn stream_closed(endpoint: &Endpoint) -> Error {
    Error::Connection {
        endpoint: endpoint.name.clone(),
        reason: "lease keepalive stream closed".into(),
    }
}

/// Opens a LeaseKeepAlive stream whose first message is a keepalive for `id`.
/// It must be queued before the call: etcd sends no response headers until it has
/// a request to answer.
async fn open(client: &Client, id: i64) -> Result<KeepAliveStream, Error> {
    let ((tx, inbound), endpoint) = client
        .execute_on(
            "lease_keep_alive",
            Retry::Idempotent,
            (),
            |ch, r| async move {
                let (tx, rx) = mpsc::channel(1);
                // Cannot fail: the receiver is alive and the buffer is empty.
                let _ = tx.try_send(LeaseKeepAliveRequest { id });
                let request = r.map(|()| ReceiverStream::new(rx));
                let resp = LeaseClient::new(ch).lease_keep_alive(request).await?;
                Ok(resp.map(|inbound| (tx, inbound)))
            },
        )
        .await?;
    Ok(KeepAliveStream {
        tx,
        inbound,
        endpoint,
    })
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

/// About a third of the TTL, with +/-10% jitter so many keepers do not renew in step.
fn renew_interval(ttl: i64) -> Duration {
    let third = secs(ttl).div_f64(3.0);
    third
        .mul_f64(rand::rng().random_range(0.9..=1.1))
        .max(MIN_RENEW_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_about_a_third_of_the_ttl() {
        for _ in 0..100 {
            let d = renew_interval(30);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        assert_eq!(renew_interval(0), MIN_RENEW_INTERVAL);
        assert_eq!(renew_interval(-5), MIN_RENEW_INTERVAL);
    }
}
