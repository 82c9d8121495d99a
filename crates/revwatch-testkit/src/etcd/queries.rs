//! Asking a running cluster things: health, leader, revision; compaction,
//! channels and etcdctl.

use std::time::{Duration, Instant};

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use etcd_proto::etcdserverpb::{
    CompactionRequest, MoveLeaderRequest, RangeRequest, StatusRequest, StatusResponse,
};
use tonic::transport::Channel;

use super::options::DEFAULT_ETCDCTL_BIN;
use super::rpc::{self, Conn};
use super::{EtcdCluster, POLL_INTERVAL};
use crate::TestkitError;

impl EtcdCluster {
    /// Waits until a KV Range succeeds on every running member. A frozen
    /// member is not healthy; a killed one is skipped.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), TestkitError> {
        let running = (0..self.len()).filter(|&i| self.is_running(i));
        self.wait_members_healthy(running, timeout, self.opts.auth.as_ref())
            .await
    }

    pub(super) async fn wait_members_healthy(
        &self,
        members: impl IntoIterator<Item = usize>,
        timeout: Duration,
        creds: Option<&(String, String)>,
    ) -> Result<(), TestkitError> {
        let deadline = Instant::now() + timeout;
        let mut pending: Vec<usize> = members.into_iter().collect();
        let mut last_error = String::from("none");
        while !pending.is_empty() {
            let mut still = Vec::new();
            for i in pending {
                let m = self.member(i)?;
                if let Some(status) = m.exit_status() {
                    return Err(TestkitError::MemberExited {
                        member: i,
                        status,
                        log_tail: m.log_tail(),
                    });
                }
                // A probe must not outlast the caller's deadline.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(POLL_INTERVAL);
                match tokio::time::timeout(left, self.range_probe(i, creds)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        last_error = format!("member {i}: {e}");
                        still.push(i);
                    }
                    Err(_) => {
                        last_error = format!("member {i}: no answer within {left:?}");
                        still.push(i);
                    }
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::Timeout {
                    what: format!("members {pending:?} to serve a KV Range"),
                    after: timeout,
                    last_error,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        Ok(())
    }

    async fn range_probe(
        &self,
        i: usize,
        creds: Option<&(String, String)>,
    ) -> Result<i64, TestkitError> {
        let conn = self.conn_with(i, creds).await?;
        let resp = KvClient::new(conn.channel.clone())
            .range(conn.request(RangeRequest {
                key: b"\0".to_vec(),
                count_only: true,
                ..Default::default()
            }))
            .await
            .map_err(|s| TestkitError::rpc(format!("Range on member {i}"), s))?;
        Ok(resp.into_inner().header.map(|h| h.revision).unwrap_or(0))
    }

    pub(super) async fn conn_with(
        &self,
        i: usize,
        creds: Option<&(String, String)>,
    ) -> Result<Conn, TestkitError> {
        self.member(i)?;
        let tls = self.tls.as_ref().map(|(_, c)| c);
        rpc::connect(&self.endpoint(i), tls, creds).await
    }

    pub(super) async fn status_with(
        &self,
        i: usize,
        creds: Option<&(String, String)>,
    ) -> Result<StatusResponse, TestkitError> {
        let conn = self.conn_with(i, creds).await?;
        let resp = MaintenanceClient::new(conn.channel.clone())
            .status(conn.request(StatusRequest {}))
            .await
            .map_err(|s| TestkitError::rpc(format!("Status on member {i}"), s))?;
        Ok(resp.into_inner())
    }

    /// A fresh, connected gRPC channel to member `i`, with the cluster's TLS
    /// settings. Connecting is bounded (3 s); calls are not, so watches can
    /// live on it. On a cluster with auth, add the token from
    /// [`auth_token`](Self::auth_token) as `token` metadata yourself.
    pub async fn channel(&self, i: usize) -> Result<Channel, TestkitError> {
        self.member(i)?;
        let tls = self.tls.as_ref().map(|(_, c)| c);
        rpc::channel(&self.endpoint(i), tls, None).await
    }

    /// Logs in at member `i` with the root credentials; `None` without auth.
    pub async fn auth_token(&self, i: usize) -> Result<Option<String>, TestkitError> {
        let conn = self.conn_with(i, self.opts.auth.as_ref()).await?;
        Ok(conn.token().map(str::to_owned))
    }

    /// Maintenance.Status of member `i`.
    pub async fn status(&self, i: usize) -> Result<StatusResponse, TestkitError> {
        self.status_with(i, self.opts.auth.as_ref()).await
    }

    /// Index of the current leader, asked via Maintenance.Status of every
    /// reachable member. Among members claiming leadership the one with the
    /// highest raft term wins (a thawed ex-leader may still claim an old term).
    pub async fn leader(&self) -> Result<usize, TestkitError> {
        let mut best: Option<(u64, usize)> = None;
        let mut seen = Vec::new();
        for i in 0..self.len() {
            if !self.is_running(i) || self.is_frozen(i) {
                continue;
            }
            match self.status(i).await {
                Ok(s) => {
                    let own = s.header.as_ref().map(|h| h.member_id).unwrap_or(0);
                    seen.push(format!("member {i} sees leader {:x}", s.leader));
                    if s.leader != 0 && s.leader == own && best.is_none_or(|(t, _)| s.raft_term > t)
                    {
                        best = Some((s.raft_term, i));
                    }
                }
                Err(e) => seen.push(format!("member {i}: {e}")),
            }
        }
        best.map(|(_, i)| i).ok_or_else(|| TestkitError::NoLeader {
            detail: if seen.is_empty() {
                String::new()
            } else {
                format!(" ({})", seen.join("; "))
            },
        })
    }

    /// Polls [`leader`](Self::leader) until some member leads.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<usize, TestkitError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.leader().await {
                Ok(i) => return Ok(i),
                Err(e) if Instant::now() >= deadline => {
                    return Err(TestkitError::Timeout {
                        what: "a leader".into(),
                        after: timeout,
                        last_error: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Hands leadership to member `to` (etcd's MoveLeader, sent to the
    /// current leader) and waits until every reachable member agrees that
    /// `to` leads. A no-op if it already does.
    pub async fn move_leader(&self, to: usize, timeout: Duration) -> Result<(), TestkitError> {
        let target_id = self.member(to)?.id;
        let deadline = Instant::now() + timeout;
        let leader = self.wait_for_leader(timeout).await?;
        if leader != to {
            let conn = self.conn_with(leader, self.opts.auth.as_ref()).await?;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut maintenance = MaintenanceClient::new(conn.channel.clone());
            let call = maintenance.move_leader(conn.request(MoveLeaderRequest { target_id }));
            tokio::time::timeout(left, call)
                .await
                .map_err(|_| TestkitError::Timeout {
                    what: format!("MoveLeader to member {to}"),
                    after: timeout,
                    last_error: "no answer".into(),
                })?
                .map_err(|s| TestkitError::rpc(format!("MoveLeader on member {leader}"), s))?;
        }
        // The others learn of the new term with its first heartbeat.
        loop {
            let mut disagree = String::new();
            for i in (0..self.len()).filter(|&i| self.is_running(i) && !self.is_frozen(i)) {
                match self.status(i).await {
                    Ok(s) if s.leader == target_id => {}
                    Ok(s) => disagree = format!("member {i} sees leader {:x}", s.leader),
                    Err(e) => disagree = format!("member {i}: {e}"),
                }
            }
            if disagree.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::Timeout {
                    what: format!("member {to} to lead"),
                    after: timeout,
                    last_error: disagree,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Runs `op` against each running, unfrozen member in turn until one
    /// succeeds or fails with an answer from etcd (not a connectivity problem).
    async fn on_any<T>(
        &self,
        what: &str,
        op: impl AsyncFn(usize) -> Result<T, TestkitError>,
    ) -> Result<T, TestkitError> {
        let mut last = TestkitError::NoLeader {
            detail: format!(": no running member to ask for {what}"),
        };
        for i in 0..self.len() {
            if !self.is_running(i) || self.is_frozen(i) {
                continue;
            }
            match op(i).await {
                Ok(v) => return Ok(v),
                Err(e) if is_unreachable(&e) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// The cluster's current revision (a linearizable read on any live member).
    pub async fn current_revision(&self) -> Result<i64, TestkitError> {
        self.on_any("the revision", async |i| {
            self.range_probe(i, self.opts.auth.as_ref()).await
        })
        .await
    }

    /// Compacts the key-value history up to `revision`, waiting until the
    /// compaction is applied (physical).
    pub async fn compact(&self, revision: i64) -> Result<(), TestkitError> {
        self.on_any("compaction", async |i| {
            let conn = self.conn_with(i, self.opts.auth.as_ref()).await?;
            KvClient::new(conn.channel.clone())
                .compact(conn.request(CompactionRequest {
                    revision,
                    physical: true,
                }))
                .await
                .map_err(|s| TestkitError::rpc(format!("Compact on member {i}"), s))?;
            Ok(())
        })
        .await
    }

    /// An `etcdctl` command (v3 API) aimed at all members, with the TLS and
    /// auth flags the cluster needs. Uses `REVWATCH_ETCDCTL_BIN` if set.
    pub fn etcdctl(&self) -> std::process::Command {
        let bin =
            std::env::var_os("REVWATCH_ETCDCTL_BIN").unwrap_or_else(|| DEFAULT_ETCDCTL_BIN.into());
        let mut cmd = std::process::Command::new(bin);
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")));
        if let Some(files) = self.tls_files() {
            cmd.arg(format!("--cacert={}", files.ca.display()))
                .arg(format!("--cert={}", files.cert.display()))
                .arg(format!("--key={}", files.key.display()));
        }
        if let Some((user, password)) = &self.opts.auth {
            cmd.arg(format!("--user={user}:{password}"));
        }
        cmd
    }
}

/// Whether `e` says the member could not be reached (or had no leader in
/// time), so another member may do better.
fn is_unreachable(e: &TestkitError) -> bool {
    match e {
        TestkitError::Rpc { status, .. } => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
        ),
        TestkitError::Connect { .. } | TestkitError::Timeout { .. } => true,
        _ => false,
    }
}
