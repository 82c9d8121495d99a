//! A seeded workload of concurrent writers on raw etcd gRPC.
//!
//! Each writer draws its steps from the seed ([`plan::Planner`]): puts of new
//! and existing keys, single and range deletes, multi-key txns whose compares
//! sometimes fail (some with an empty failure branch, some spanning the
//! prefix boundary), and keys attached to short leases that are revoked or
//! left to expire. Writes go under the mirrored prefix and outside it. Every
//! write is recorded with its outcome ([`WriteRecord`]); acknowledged ones
//! carry their response's revision. The writers use the generated stubs
//! directly, not revwatch's client.

mod exec;
pub mod plan;

use std::time::Duration;

use tokio::time::Instant;

use self::exec::Stubs;
use self::plan::{Planned, Planner};
use crate::etcd::{EtcdError, connect, endpoint};
use crate::ops::{Put, WriteOp};
use crate::record::{Outcome, WriteRecord};

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Seed of every writer's plan.
    pub seed: u64,
    /// Concurrent writers.
    pub writers: usize,
    /// The mirrored prefix.
    pub prefix: Vec<u8>,
    /// A prefix outside it, also written.
    pub outside: Vec<u8>,
    /// Keys per prefix (small, so writers collide).
    pub keys: usize,
    /// Steps per writer at most.
    pub max_ops: usize,
    /// Time the writers run at most.
    pub duration: Duration,
    /// Bound on one call; a call past it has an unknown outcome.
    pub op_timeout: Duration,
    /// Pause between one writer's steps.
    pub pause: Duration,
    /// Lease TTL in seconds (etcd raises values below its minimum).
    pub lease_ttl: i64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            writers: 3,
            prefix: b"/mirror/".to_vec(),
            outside: b"/other/".to_vec(),
            keys: 24,
            max_ops: 1_000,
            duration: Duration::from_secs(5),
            op_timeout: Duration::from_secs(3),
            pause: Duration::from_millis(5),
            lease_ttl: 2,
        }
    }
}

/// Everything the writers did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadOutput {
    /// Every write, by writer and then in issue order.
    pub records: Vec<WriteRecord>,
    /// Every lease granted (their expiries explain revisions no write made).
    pub leases: Vec<i64>,
}

impl WorkloadOutput {
    /// Number of acknowledged writes.
    pub fn acked(&self) -> usize {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Acked { .. }))
            .count()
    }
}

/// Why the workload could not run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// No endpoints were given.
    #[error("no endpoints")]
    NoEndpoints,
    /// An endpoint URL is invalid.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A writer task panicked or was cancelled.
    #[error("writer task failed: {0}")]
    Writer(String),
}

/// Runs the writers against `endpoints` until each has done `max_ops`
/// steps or `duration` has passed.
pub async fn run(
    config: &WorkloadConfig,
    endpoints: &[String],
) -> Result<WorkloadOutput, WorkloadError> {
    if endpoints.is_empty() {
        return Err(WorkloadError::NoEndpoints);
    }
    let mut eps = Vec::with_capacity(endpoints.len());
    for url in endpoints {
        eps.push(endpoint(url, config.op_timeout)?.timeout(config.op_timeout));
    }
    let deadline = Instant::now() + config.duration;
    let mut tasks = Vec::with_capacity(config.writers);
    for w in 0..config.writers {
        // Each writer starts on a different member and fails over to others.
        let mut mine = eps.clone();
        mine.rotate_left(w % eps.len());
        let channel = tonic::transport::Channel::balance_list(mine.into_iter());
        let writer = Writer {
            planner: Planner::new(config, w),
            stubs: Stubs::new(channel),
            writer: w,
            lease: None,
            config: config.clone(),
            out: WorkloadOutput::default(),
        };
        tasks.push(tokio::spawn(writer.run(deadline)));
    }
    let mut out = WorkloadOutput::default();
    for t in tasks {
        let part = t.await.map_err(|e| WorkloadError::Writer(e.to_string()))?;
        out.records.extend(part.records);
        out.leases.extend(part.leases);
    }
    Ok(out)
}

/// Writes one last key under the prefix (writer number `config.writers`),
/// so that etcd's last revision touches the prefix and a watcher of it gets
/// there by events alone, without progress requests (which `etcd
/// grpc-proxy` 3.4 does not answer). Returns its record.
pub async fn fence(config: &WorkloadConfig, url: &str) -> Result<WriteRecord, WorkloadError> {
    let mut stubs = Stubs::new(connect(url).await?);
    let mut key = config.prefix.clone();
    key.extend_from_slice(b"fence");
    let op = WriteOp::Put(Put {
        key,
        value: format!("fence-{}", config.seed).into_bytes(),
        lease: 0,
    });
    let outcome = stubs.write(&op).await;
    Ok(WriteRecord {
        writer: config.writers,
        seq: 0,
        op,
        outcome,
    })
}

struct Writer {
    planner: Planner,
    stubs: Stubs,
    writer: usize,
    lease: Option<i64>,
    config: WorkloadConfig,
    out: WorkloadOutput,
}

impl Writer {
    async fn run(mut self, deadline: Instant) -> WorkloadOutput {
        for seq in 0..self.config.max_ops as u64 {
            if Instant::now() >= deadline {
                break;
            }
            let op = match self.planner.next_step() {
                Planned::Write(op) => Some(op),
                Planned::Grant => {
                    let ttl = self.config.lease_ttl;
                    self.lease = self.bounded(self.stubs.clone().grant(ttl)).await.flatten();
                    self.out.leases.extend(self.lease);
                    None
                }
                Planned::LeasedPut { key, value } => self
                    .lease
                    .map(|lease| WriteOp::Put(Put { key, value, lease })),
                Planned::Revoke => self
                    .lease
                    .take()
                    .map(|lease| WriteOp::LeaseRevoke { lease }),
            };
            if let Some(op) = op {
                let mut stubs = self.stubs.clone();
                let call = async { stubs.write(&op).await };
                let outcome = self
                    .bounded(call)
                    .await
                    .unwrap_or_else(|| Outcome::Unknown("timed out".into()));
                self.out.records.push(WriteRecord {
                    writer: self.writer,
                    seq,
                    op,
                    outcome,
                });
            }
            tokio::time::sleep(self.config.pause).await;
        }
        self.out
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::time::timeout(self.config.op_timeout, f).await.ok()
    }
}
