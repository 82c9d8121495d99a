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
use super::error::Error;
use super::handle::Client;
use super::retry::Retry;

/// Shortest pause between keepalives, whatever the TTL.
const MIN_RENEW_INTERVAL: Duration = Duration::from_millis(500);

/// The longest TTL taken at face value: etcd's own limit on lease TTLs
/// (`MaxLeaseTTL`, about 285 years). A larger TTL from a broken or hostile server
/// is clamped to it, so deadlines computed from it cannot overflow `Instant`.
const MAX_TTL_SECS: i64 = 9_000_000_000;

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
        let (grant, endpoint) = client.lease_grant_on(ttl_secs).await?;
        if !grant.error.is_empty() {
            return Err(Error::Grpc {
                code: tonic::Code::Unknown,
                message: grant.error,
                endpoint: endpoint.name.clone(),
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
    let mut expires_at = after(granted_at, secs(ttl));
    let mut next = after(granted_at, renew_interval(ttl));
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
                expires_at = after(now, secs(reply_ttl));
                next = after(now, renew_interval(reply_ttl));
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
        next = after(Instant::now(), backoff.delay(failures, &mut rand::rng()));
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
        Err(status) => Err(s.endpoint.failed(status)),
    }
}

fn stream_closed(endpoint: &Endpoint) -> Error {
    Error::Connection {
        endpoint: endpoint.name.clone(),
        reason: "lease keepalive stream closed".into(),
        source: None,
    }
}

/// Opens a LeaseKeepAlive stream whose first message is a keepalive for `id`.
/// It must be queued before the call: etcd sends no response headers until it has
/// a request to answer.
async fn open(client: &Client, id: i64) -> Result<KeepAliveStream, Error> {
    let (tx, inbound, endpoint) = client
        .retrier()
        .execute(
            "lease_keep_alive",
            Retry::Idempotent,
            (),
            |ep, r| async move {
                let (tx, rx) = mpsc::channel(1);
                // Cannot fail: the receiver is alive and the buffer is empty.
                let _ = tx.try_send(LeaseKeepAliveRequest { id });
                let request = r.map(|()| ReceiverStream::new(rx));
                let resp = LeaseClient::new(ep.channel.clone())
                    .lease_keep_alive(request)
                    .await?;
                Ok(resp.map(|inbound| (tx, inbound, ep)))
            },
        )
        .await?;
    Ok(KeepAliveStream {
        tx,
        inbound,
        endpoint,
    })
}

/// A TTL in seconds as a duration: negative counts as zero, and anything above
/// [`MAX_TTL_SECS`] as that.
fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s.min(MAX_TTL_SECS)).unwrap_or(0))
}

/// `t + d`, saturating instead of panicking when the sum does not fit an `Instant`
/// (possible only for absurd durations; the clamped TTL keeps sums far from it).
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .or_else(|| t.checked_add(secs(MAX_TTL_SECS)))
        .unwrap_or(t)
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
    use crate::client::ClientConfig;
    use etcd_proto::etcdserverpb::lease_server::{Lease, LeaseServer};
    use etcd_proto::etcdserverpb::maintenance_server::{Maintenance, MaintenanceServer};
    use etcd_proto::etcdserverpb::*;
    use tonic::{Request, Response, Status};

    /// A hostile etcd: grants whatever TTL is asked, and answers every keepalive
    /// with TTL `i64::MAX`.
    struct Hostile;

    type Reply<T> = Result<Response<T>, Status>;

    #[tonic::async_trait]
    impl Lease for Hostile {
        async fn lease_grant(&self, r: Request<LeaseGrantRequest>) -> Reply<LeaseGrantResponse> {
            Ok(Response::new(LeaseGrantResponse {
                id: 7,
                ttl: r.into_inner().ttl,
                ..Default::default()
            }))
        }
        async fn lease_revoke(&self, _: Request<LeaseRevokeRequest>) -> Reply<LeaseRevokeResponse> {
            Err(Status::unimplemented("revoke"))
        }
        type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;
        async fn lease_keep_alive(
            &self,
            r: Request<tonic::Streaming<LeaseKeepAliveRequest>>,
        ) -> Reply<Self::LeaseKeepAliveStream> {
            let mut inbound = r.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(req)) = inbound.message().await {
                    let reply = LeaseKeepAliveResponse {
                        id: req.id,
                        ttl: i64::MAX,
                        ..Default::default()
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }
        async fn lease_time_to_live(
            &self,
            _: Request<LeaseTimeToLiveRequest>,
        ) -> Reply<LeaseTimeToLiveResponse> {
            Err(Status::unimplemented("ttl"))
        }
        async fn lease_leases(&self, _: Request<LeaseLeasesRequest>) -> Reply<LeaseLeasesResponse> {
            Err(Status::unimplemented("leases"))
        }
    }

    #[tonic::async_trait]
    impl Maintenance for Hostile {
        async fn alarm(&self, _: Request<AlarmRequest>) -> Reply<AlarmResponse> {
            Err(Status::unimplemented("alarm"))
        }
        async fn status(&self, _: Request<StatusRequest>) -> Reply<StatusResponse> {
            // A leader, so the client's health probe accepts this endpoint.
            Ok(Response::new(StatusResponse {
                leader: 1,
                ..Default::default()
            }))
        }
        async fn defragment(&self, _: Request<DefragmentRequest>) -> Reply<DefragmentResponse> {
            Err(Status::unimplemented("defragment"))
        }
        async fn hash(&self, _: Request<HashRequest>) -> Reply<HashResponse> {
            Err(Status::unimplemented("hash"))
        }
        async fn hash_kv(&self, _: Request<HashKvRequest>) -> Reply<HashKvResponse> {
            Err(Status::unimplemented("hash_kv"))
        }
        type SnapshotStream = ReceiverStream<Result<SnapshotResponse, Status>>;
        async fn snapshot(&self, _: Request<SnapshotRequest>) -> Reply<Self::SnapshotStream> {
            Err(Status::unimplemented("snapshot"))
        }
        async fn move_leader(&self, _: Request<MoveLeaderRequest>) -> Reply<MoveLeaderResponse> {
            Err(Status::unimplemented("move_leader"))
        }
    }

    async fn hostile_client() -> Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LeaseServer::new(Hostile))
                .add_service(MaintenanceServer::new(Hostile))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Client::connect(ClientConfig::new([addr.to_string()]))
            .await
            .unwrap()
    }

    /// The keeper task must survive a server that reports absurd TTLs: before the
    /// clamp, `Instant + secs(i64::MAX)` panicked inside it.
    #[tokio::test]
    async fn hostile_ttls_do_not_panic_the_keeper() {
        let client = hostile_client().await;

        // A granted TTL of i64::MAX.
        let keeper = LeaseKeeper::start(&client, i64::MAX).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!keeper.task.is_finished(), "keeper task died");
        assert_eq!(keeper.state(), LeaseState::Alive { ttl: i64::MAX });

        // A sane grant, then a keepalive reply (after ~0.5 s) of i64::MAX.
        let keeper = LeaseKeeper::start(&client, 1).await.unwrap();
        let mut state = keeper.subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| *s == LeaseState::Alive { ttl: i64::MAX }),
        )
        .await
        .expect("no keepalive reply within 10 s")
        .expect("keeper task died");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!keeper.task.is_finished(), "keeper task died");
        assert_eq!(keeper.state(), LeaseState::Alive { ttl: i64::MAX });
    }

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

    #[test]
    fn hostile_ttls_are_clamped_and_do_not_overflow() {
        let now = Instant::now();
        for ttl in [
            i64::MAX,
            i64::MAX / 2,
            MAX_TTL_SECS + 1,
            u32::MAX as i64 * 10,
        ] {
            assert_eq!(secs(ttl), Duration::from_secs(9_000_000_000), "{ttl}");
            // The keeper's deadline arithmetic for such a reply must not panic.
            let expires_at = after(now, secs(ttl));
            let next = after(now, renew_interval(ttl));
            assert!(expires_at > now && next > now && next < expires_at);
        }
        assert_eq!(secs(i64::MIN), Duration::ZERO);
        assert_eq!(secs(30), Duration::from_secs(30));
        // Durations that cannot be added at all saturate instead of panicking.
        assert!(after(now, Duration::MAX) >= now);
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
