//! Endpoints: one gRPC channel per endpoint, and health tracking.
//!
//! An endpoint that fails at the transport level (or answers `Unavailable`) leaves the
//! rotation at once. A background prober re-checks it with exponential backoff using
//! Maintenance.Status and puts it back when it answers and knows a leader.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::StatusRequest;
use etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::transport::Channel;

use super::backoff::Backoff;
use super::error::Error;
use super::failure::{Failure, classify, connection_error, short_reason};

/// A snapshot of one endpoint's health, for status pages and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHealth {
    /// The endpoint as `host:port`.
    pub endpoint: String,
    /// Whether requests are currently routed to it.
    pub healthy: bool,
    /// Failures since it last succeeded.
    pub consecutive_failures: u32,
    /// The most recent failure reason, if any.
    pub last_error: Option<String>,
}

/// Health state machine of one endpoint. Time is passed in so it can be unit tested.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    healthy: bool,
    consecutive_failures: u32,
    last_error: Option<String>,
    next_probe: Option<Instant>,
    /// A probe is in flight; do not start another.
    probing: bool,
}

impl Health {
    fn new() -> Self {
        Health {
            healthy: true,
            consecutive_failures: 0,
            last_error: None,
            next_probe: None,
            probing: false,
        }
    }

    /// A request or probe succeeded: back into the rotation.
    pub(crate) fn on_success(&mut self) {
        self.healthy = true;
        self.consecutive_failures = 0;
        self.next_probe = None;
    }

    /// A request or probe failed: out of the rotation, next probe after a backoff
    /// that grows with each consecutive failure.
    pub(crate) fn on_failure(&mut self, reason: String, now: Instant, backoff: &Backoff) {
        let delay = backoff.delay(self.consecutive_failures, &mut rand::rng());
        self.healthy = false;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.last_error = Some(reason);
        // Validated backoffs are at most an hour; never panic on an absurd one.
        self.next_probe = Some(
            now.checked_add(delay)
                .or_else(|| now.checked_add(Backoff::MAX_DELAY))
                .unwrap_or(now),
        );
    }

    /// Whether the prober should check this endpoint now.
    pub(crate) fn probe_due(&self, now: Instant) -> bool {
        !self.healthy && !self.probing && self.next_probe.is_none_or(|t| t <= now)
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy
    }
}

/// One etcd endpoint: its lazily (re)connecting channel and its health.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub name: String,
    pub channel: Channel,
    health: Mutex<Health>,
    probe_backoff: Backoff,
}

impl Endpoint {
    /// An endpoint that starts out healthy; `channel` connects lazily.
    pub(crate) fn new(name: String, channel: Channel, probe_backoff: Backoff) -> Endpoint {
        Endpoint {
            name,
            channel,
            health: Mutex::new(Health::new()),
            probe_backoff,
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.health().is_healthy()
    }

    pub(crate) fn mark_success(&self) {
        let mut h = self.health();
        if !h.is_healthy() {
            tracing::info!(endpoint = %self.name, "endpoint back in rotation");
        }
        h.on_success();
    }

    pub(crate) fn mark_failure(&self, reason: &str) {
        let mut h = self.health();
        if h.is_healthy() {
            tracing::warn!(endpoint = %self.name, %reason, "endpoint left rotation");
        }
        h.on_failure(reason.to_string(), Instant::now(), &self.probe_backoff);
    }

    /// The error for a call on this endpoint that failed outside the retry loop
    /// (single-endpoint calls and streams). A transport failure or `Unavailable`
    /// takes the endpoint out of the rotation.
    pub(crate) fn failed(&self, status: tonic::Status) -> Error {
        match classify(status, &self.name) {
            Failure::Transport { reason, status, .. } => {
                self.mark_failure(&reason);
                connection_error(&self.name, reason, status)
            }
            Failure::Unavailable(e) => {
                self.mark_failure(&e.to_string());
                e
            }
            Failure::InvalidToken(e) | Failure::Fatal(e) => e,
        }
    }

    pub(crate) fn snapshot(&self) -> EndpointHealth {
        let h = self.health();
        EndpointHealth {
            endpoint: self.name.clone(),
            healthy: h.healthy,
            consecutive_failures: h.consecutive_failures,
            last_error: h.last_error.clone(),
        }
    }

    /// Maintenance.Status without auth (etcd serves it to anyone). Healthy means it
    /// answered and knows a leader; a member cut off from its cluster does not.
    pub(crate) async fn probe(&self, timeout: Duration) -> Result<(), ProbeFailure> {
        let mut client = MaintenanceClient::new(self.channel.clone());
        match tokio::time::timeout(timeout, client.status(StatusRequest {})).await {
            Err(_) => Err(ProbeFailure::Unreachable(format!(
                "timed out after {timeout:?}"
            ))),
            Ok(Err(status))
                if status.code() == tonic::Code::Unavailable || status.source().is_some() =>
            {
                Err(ProbeFailure::Unreachable(short_reason(&status)))
            }
            Ok(Err(status)) => Err(ProbeFailure::Unhealthy(format!(
                "status: {:?}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(resp)) if resp.get_ref().leader == 0 => {
                Err(ProbeFailure::Unhealthy("member has no leader".into()))
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Probes and records the result.
    pub(crate) async fn probe_and_mark(&self, timeout: Duration) -> Result<(), ProbeFailure> {
        let res = self.probe(timeout).await;
        match &res {
            Ok(()) => self.mark_success(),
            Err(f) => self.mark_failure(f.reason()),
        }
        self.health().probing = false;
        res
    }
}

/// Why a probe failed.
#[derive(Debug, Clone)]
pub(crate) enum ProbeFailure {
    /// No answer at all (refused, TLS failure, timeout, ...).
    Unreachable(String),
    /// It answered, but cannot serve (no leader, error status).
    Unhealthy(String),
}

impl ProbeFailure {
    pub(crate) fn reason(&self) -> &str {
        match self {
            ProbeFailure::Unreachable(r) | ProbeFailure::Unhealthy(r) => r,
        }
    }
}

/// All endpoints of a client, with round-robin selection over the healthy ones.
#[derive(Debug)]
pub(crate) struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl EndpointSet {
    pub(crate) fn new(endpoints: Vec<Arc<Endpoint>>) -> EndpointSet {
        EndpointSet {
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn all(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Picks the next endpoint for an attempt, skipping those in `tried`.
    pub(crate) fn pick(&self, tried: &[bool]) -> Option<usize> {
        let healthy: Vec<bool> = self.endpoints.iter().map(|e| e.is_healthy()).collect();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        choose(&healthy, tried, start)
    }

    /// Starts a probe task for each endpoint whose probe is due. Each endpoint has at
    /// most one probe in flight, so a frozen endpoint cannot delay the others.
    pub(crate) fn spawn_due_probes(&self, timeout: Duration) {
        let now = Instant::now();
        for ep in &self.endpoints {
            let mut h = ep.health();
            if h.probe_due(now) {
                h.probing = true;
                drop(h);
                let ep = Arc::clone(ep);
                tokio::spawn(async move { ep.probe_and_mark(timeout).await });
            }
        }
    }
}

/// Round-robin choice: the first healthy, untried endpoint from `start`. When no
/// endpoint is healthy at all, untried unhealthy ones are tried too (the cluster may
/// have recovered before the prober noticed). `None` ends the round.
pub(crate) fn choose(healthy: &[bool], tried: &[bool], start: usize) -> Option<usize> {
    let n = healthy.len();
    let any_healthy = healthy.iter().any(|h| *h);
    (0..n)
        .map(|i| (start + i) % n)
        .filter(|i| !tried.get(*i).copied().unwrap_or(false))
        .find(|i| healthy[*i] || !any_healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }

    #[test]
    fn failure_removes_from_rotation_and_schedules_probe_with_backoff() {
        let mut h = Health::new();
        let t0 = Instant::now();
        assert!(h.is_healthy());
        assert!(!h.probe_due(t0), "healthy endpoints are not probed");

        h.on_failure("connection refused".into(), t0, &backoff());
        assert!(!h.is_healthy());
        assert!(!h.probe_due(t0), "first probe waits for the backoff");
        assert!(h.probe_due(t0 + Duration::from_millis(100)));
        h.probing = true;
        assert!(
            !h.probe_due(t0 + Duration::from_millis(100)),
            "one probe at a time"
        );
        h.probing = false;

        // Repeated failures push the next probe further out, up to the cap.
        for _ in 0..10 {
            h.on_failure("connection refused".into(), t0, &backoff());
        }
        assert!(!h.probe_due(t0 + Duration::from_millis(499)));
        assert!(h.probe_due(t0 + Duration::from_secs(1)));
        assert_eq!(h.consecutive_failures, 11);

        h.on_success();
        assert!(h.is_healthy());
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(h.last_error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn absurd_probe_backoff_does_not_panic() {
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        let mut h = Health::new();
        let t0 = Instant::now();
        h.on_failure("connection refused".into(), t0, &huge);
        assert!(!h.is_healthy());
        assert!(!h.probe_due(t0), "the probe still waits");
    }

    #[test]
    fn choose_round_robins_over_healthy_untried() {
        let healthy = [true, false, true];
        assert_eq!(choose(&healthy, &[false; 3], 0), Some(0));
        assert_eq!(choose(&healthy, &[false; 3], 1), Some(2));
        assert_eq!(choose(&healthy, &[true, false, false], 0), Some(2));
        // Healthy ones exhausted: the round ends rather than trying the dead one.
        assert_eq!(choose(&healthy, &[true, false, true], 0), None);
    }

    #[test]
    fn choose_tries_unhealthy_when_none_is_healthy() {
        let healthy = [false, false];
        assert_eq!(choose(&healthy, &[false, false], 1), Some(1));
        assert_eq!(choose(&healthy, &[false, true], 1), Some(0));
        assert_eq!(choose(&healthy, &[true, true], 0), None);
    }
}
