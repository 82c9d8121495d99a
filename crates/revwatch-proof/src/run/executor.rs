//! Applying a fault schedule: each fault is injected at its time, healed
//! after its duration, and followed until the mirror has caught up.

use std::time::Duration;

use revwatch::mirror::Mirror;
use revwatch_testkit::proxy::Fault as ProxyFault;
use tokio::time::Instant;

use super::collect::Collector;
use super::rig::MirrorRig;
use super::topology::Topology;
use super::{FaultOutcome, RunError};
use crate::schedule::{Fault, Schedule, ScheduledFault};
use crate::truth::recorder::TruthRecorder;

/// Longest wait for the mirror (or a subscriber) to catch up after healing.
pub(super) const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the truth recorder before a compaction.
const RECORDER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the executor drives.
pub(super) struct Executor<'a> {
    pub(super) topo: &'a mut Topology,
    pub(super) recorder: &'a TruthRecorder,
    pub(super) rig: &'a mut MirrorRig,
    pub(super) steady: &'a Collector,
    pub(super) slow: &'a Collector,
    /// The subscriber buffer, to tell when a paused subscriber overflowed.
    pub(super) buffer: usize,
}

/// What is undone when a fault is healed.
enum Undo {
    Nothing,
    Proxies(Vec<usize>),
    Restart(usize),
    Thaw(usize),
    MirrorStart {
        reached: i64,
    },
    Resume {
        updates_before: u64,
        lagged_before: u64,
    },
}

impl Executor<'_> {
    /// Runs every fault of `schedule` in order, from `start`.
    pub(super) async fn run(
        &mut self,
        schedule: &Schedule,
        start: Instant,
    ) -> Result<Vec<FaultOutcome>, RunError> {
        let mut outcomes = Vec::with_capacity(schedule.faults.len());
        for (i, f) in schedule.faults.iter().enumerate() {
            // A slow recovery delays later faults; their order is kept.
            tokio::time::sleep_until(start + f.at).await;
            tracing::info!(fault = %f.fault, "injecting fault {i}");
            let undo = self.inject(f).await?;
            tokio::time::sleep(f.duration).await;
            self.heal(f, undo).await.map(|o| outcomes.push(o))?;
        }
        Ok(outcomes)
    }

    async fn inject(&mut self, f: &ScheduledFault) -> Result<Undo, RunError> {
        let proxy = |topo: &Topology, m: usize, fault: ProxyFault| {
            topo.proxies[m].set(fault);
            Undo::Proxies(vec![m])
        };
        let cluster = &mut self.topo.cluster;
        Ok(match f.fault {
            Fault::Blackhole { member } | Fault::Partition { member } => {
                proxy(self.topo, member, ProxyFault::Blackhole)
            }
            Fault::Reset { member } => {
                self.topo.proxies[member].reset_all();
                Undo::Nothing
            }
            Fault::Latency { member, delay } => {
                proxy(self.topo, member, ProxyFault::Latency(delay))
            }
            Fault::Bandwidth {
                member,
                bytes_per_sec,
            } => proxy(self.topo, member, ProxyFault::Bandwidth { bytes_per_sec }),
            Fault::KillRestart { member } => {
                cluster.kill(member).map_err(RunError::fault(f))?;
                Undo::Restart(member)
            }
            Fault::Freeze { member } => {
                cluster.freeze(member).map_err(RunError::fault(f))?;
                Undo::Thaw(member)
            }
            Fault::LeaderKill => {
                let leader = cluster.leader().await.map_err(RunError::fault(f))?;
                cluster.kill(leader).map_err(RunError::fault(f))?;
                Undo::Restart(leader)
            }
            Fault::CompactWhileDisconnected => {
                self.compact_while_disconnected(f).await?;
                Undo::Proxies((0..self.topo.proxies.len()).collect())
            }
            Fault::MirrorRestart => Undo::MirrorStart {
                reached: self.rig.stop(),
            },
            Fault::SlowSubscriber => {
                let c = self.slow.counters();
                let undo = Undo::Resume {
                    updates_before: self.steady.counters().updates.load(RELAXED),
                    lagged_before: c.lagged_resyncs.load(RELAXED),
                };
                self.slow.pause(true);
                undo
            }
        })
    }

    /// Cuts the mirror off (blackhole and reset every proxy), lets the
    /// writers go on for part of the fault, then compacts to etcd's current
    /// revision once the truth recorder has read it. The rest of the fault's
    /// time is spent disconnected.
    async fn compact_while_disconnected(&mut self, f: &ScheduledFault) -> Result<(), RunError> {
        for p in &self.topo.proxies {
            p.set(ProxyFault::Blackhole);
            p.reset_all();
        }
        tokio::time::sleep(f.duration / 2).await;
        let cluster = &self.topo.cluster;
        let revision = cluster
            .current_revision()
            .await
            .map_err(RunError::fault(f))?;
        self.recorder
            .wait_through(revision, RECORDER_TIMEOUT)
            .await
            .map_err(RunError::Truth)?;
        cluster
            .compact(revision)
            .await
            .map_err(RunError::fault(f))?;
        Ok(())
    }

    /// Heals, then measures how long until the mirror (and for a slow
    /// subscriber, that subscriber) reaches etcd's revision at healing time.
    async fn heal(&mut self, f: &ScheduledFault, undo: Undo) -> Result<FaultOutcome, RunError> {
        let cluster = &mut self.topo.cluster;
        match &undo {
            Undo::Nothing | Undo::Resume { .. } | Undo::MirrorStart { .. } => {}
            Undo::Proxies(members) => members.iter().for_each(|&m| self.topo.proxies[m].heal()),
            Undo::Restart(m) => cluster.restart(*m).await.map_err(RunError::fault(f))?,
            Undo::Thaw(m) => cluster.thaw(*m).map_err(RunError::fault(f))?,
        }
        if let Undo::MirrorStart { reached } = undo {
            self.rig
                .restart(reached, [self.steady, self.slow])
                .await
                .map_err(|e| RunError::NoRecovery {
                    fault: f.fault.to_string(),
                    detail: e,
                })?;
        }
        if matches!(undo, Undo::Resume { .. }) {
            self.slow.pause(false);
        }
        let healed = Instant::now();
        let revision = self.current_revision(f).await?;
        let mirror: &Mirror = self.rig.mirror()?;
        mirror
            .snapshot_at_least(revision, RECOVERY_TIMEOUT)
            .await
            .map_err(|e| RunError::NoRecovery {
                fault: f.fault.to_string(),
                detail: format!("{e}; status: {:?}", mirror.status()),
            })?;
        if let Undo::Resume {
            updates_before,
            lagged_before,
        } = undo
        {
            self.check_slow_subscriber(f, revision, updates_before, lagged_before)
                .await?;
        }
        Ok(FaultOutcome {
            fault: f.fault.fault_type(),
            recovery: healed.elapsed(),
        })
    }

    /// The paused subscriber catches up with exactly one resync if its
    /// buffer overflowed, and never with more than one.
    async fn check_slow_subscriber(
        &self,
        f: &ScheduledFault,
        revision: i64,
        updates_before: u64,
        lagged_before: u64,
    ) -> Result<(), RunError> {
        if !self.slow.wait_for(revision, RECOVERY_TIMEOUT).await {
            return Err(RunError::NoRecovery {
                fault: f.fault.to_string(),
                detail: format!(
                    "the slow subscriber is at {}, not {revision}",
                    self.slow.reached()
                ),
            });
        }
        let published = self.steady.counters().updates.load(RELAXED) - updates_before;
        let resyncs = self.slow.counters().lagged_resyncs.load(RELAXED) - lagged_before;
        // The steady subscriber saw every update published meanwhile; well
        // past the buffer, the slow one must have overflowed.
        let overflowed = published > 2 * self.buffer as u64;
        if resyncs > 1 || (overflowed && resyncs != 1) {
            return Err(RunError::SlowSubscriber {
                detail: format!(
                    "{resyncs} lagged resyncs after missing {published} updates with a buffer of {}",
                    self.buffer
                ),
            });
        }
        Ok(())
    }

    /// etcd's current revision, retried while a restarted member settles.
    async fn current_revision(&self, f: &ScheduledFault) -> Result<i64, RunError> {
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        loop {
            match self.topo.cluster.current_revision().await {
                Ok(r) => return Ok(r),
                Err(e) if Instant::now() >= deadline => return Err(RunError::fault(f)(e)),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;
