//! Applying a fault schedule: each fault is injected at its time, healed
//! after its duration, and followed until the mirror has caught up.

use std::time::Duration;

use revwatch::mirror::Mirror;
use revwatch_testkit::etcd::PeerCut;
use revwatch_testkit::proxy::Fault as ProxyFault;
use tokio::time::Instant;

use super::collect::Collector;
use super::rig::{MirrorRig, Stopped};
use super::topology::Topology;
use super::{FaultOutcome, RunError};
use crate::etcd::{connect, current_revision};
use crate::schedule::{Fault, Schedule, ScheduledFault};
use crate::truth::Compaction;
use crate::truth::recorder::TruthRecorder;

/// Longest wait for the mirror (or a subscriber) to catch up after healing.
pub(super) const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the truth recorder before a compaction.
const RECORDER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a leadership move before a peer partition.
const LEADER_MOVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait, once a peer partition has lasted its time, for the mirror
/// to reach the majority's revision while the member is still cut off.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a revision query waits on one member before asking the next: a
/// member without a leader answers only after etcd's request timeout.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// Heal the peer links of `member`, cut off from its peers while the
    /// mirror watched it (`watched`) or not.
    Peers {
        member: usize,
        watched: bool,
    },
    MirrorStart(Stopped),
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
            Fault::PeerPartition { leader, cut } => {
                let member = self.peer_partition(f, leader, cut).await?;
                Undo::Peers {
                    member,
                    // Asked after the leadership move, just after the cut.
                    watched: self.watched_member() == Some(member),
                }
            }
            Fault::CompactWhileDisconnected => {
                self.compact_while_disconnected(f).await?;
                Undo::Proxies((0..self.topo.proxies.len()).collect())
            }
            Fault::MirrorRestart => {
                Undo::MirrorStart(self.rig.stop().await.map_err(|detail| RunError::Fault {
                    fault: f.fault.to_string(),
                    detail,
                })?)
            }
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

    /// Cuts the member the mirror watches (or, when that is not known, as
    /// behind `etcd grpc-proxy`, member 0) off from its peers, after making
    /// it the leader or a follower as drawn. Returns the member.
    async fn peer_partition(
        &self,
        f: &ScheduledFault,
        leader: bool,
        cut: PeerCut,
    ) -> Result<usize, RunError> {
        let cluster = &self.topo.cluster;
        let mut member = self.settled_watched_member().await.unwrap_or(0);
        // A leadership move may make the mirror reconnect elsewhere: then
        // the role is given to the member it moved to, a few times at most.
        for attempt in 0..3 {
            let current = cluster
                .wait_for_leader(LEADER_MOVE_TIMEOUT)
                .await
                .map_err(RunError::fault(f))?;
            let to = match (leader, current == member) {
                (true, false) => Some(member),
                (false, true) => Some((member + 1) % cluster.len()),
                _ => None,
            };
            if let Some(to) = to {
                cluster
                    .move_leader(to, LEADER_MOVE_TIMEOUT)
                    .await
                    .map_err(RunError::fault(f))?;
            }
            match self.settled_watched_member().await {
                Some(m) if m != member && attempt < 2 => member = m,
                _ => break,
            }
        }
        tracing::info!(
            member,
            watched = ?self.watched_member(),
            "cutting a member off from its peers"
        );
        cluster.isolate(member, cut).map_err(RunError::fault(f))?;
        Ok(member)
    }

    /// The member the mirror watches, once its status names the same one
    /// twice in a row (a heal may end while the mirror relists, before its
    /// watch is open); `None` if it does not settle within a few seconds.
    async fn settled_watched_member(&self) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut previous = None;
        while Instant::now() < deadline {
            let now = self.watched_member();
            if now.is_some() && now == previous {
                return now;
            }
            previous = now;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// The member whose fault proxy the mirror's watch stream is on.
    fn watched_member(&self) -> Option<usize> {
        let endpoint = self.rig.mirror().ok()?.status().endpoint?;
        // The status names the endpoint without its scheme.
        let addr = endpoint
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        self.topo
            .proxies
            .iter()
            .position(|p| p.addr().to_string() == addr)
    }

    /// While `member` is still cut off, the mirror reaches the revision of
    /// the majority: a mirror left on the minority member (a watch without
    /// require-leader) would stay behind until the heal. Behind `etcd
    /// grpc-proxy` the mirror does not choose the member, so nothing is
    /// asserted there (returns false; true once asserted).
    async fn check_left_minority(
        &self,
        f: &ScheduledFault,
        member: usize,
    ) -> Result<bool, RunError> {
        if self.topo.grpc_proxy.is_some() {
            return Ok(false);
        }
        let revision = self.revision_avoiding(Some(member), f).await?;
        let mirror = self.rig.mirror()?;
        mirror
            .snapshot_at_least(revision, DETECTION_TIMEOUT)
            .await
            .map_err(|e| RunError::NoRecovery {
                fault: f.fault.to_string(),
                detail: format!(
                    "while member {member} was cut off, the mirror did not reach the majority's revision {revision}: {e}; status: {:?}",
                    mirror.status()
                ),
            })?;
        Ok(true)
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
        let revision = self.revision_avoiding(None, f).await?;
        self.recorder
            .wait_through(revision, RECORDER_TIMEOUT)
            .await
            .map_err(RunError::Truth)?;
        // Recorded first: a compaction that fails may still have been made.
        self.recorder.compacted(Compaction {
            revision,
            not_before: revision,
        });
        cluster
            .compact(revision)
            .await
            .map_err(RunError::fault(f))?;
        Ok(())
    }

    /// Heals, then measures how long until the mirror (and for a slow
    /// subscriber, that subscriber) reaches etcd's revision at healing time;
    /// for a mirror restart, from the start of the new mirror.
    async fn heal(&mut self, f: &ScheduledFault, undo: Undo) -> Result<FaultOutcome, RunError> {
        let left_minority = match undo {
            Undo::Peers { member, watched } => {
                self.check_left_minority(f, member).await? && watched
            }
            _ => false,
        };
        let cluster = &mut self.topo.cluster;
        match &undo {
            Undo::Nothing | Undo::Resume { .. } | Undo::MirrorStart { .. } => {}
            Undo::Peers { .. } => {
                cluster.heal_peers().map_err(RunError::fault(f))?;
                // The healed member may call an election with its higher term.
                cluster
                    .wait_healthy(RECOVERY_TIMEOUT)
                    .await
                    .map_err(RunError::fault(f))?;
            }
            Undo::Proxies(members) => members.iter().for_each(|&m| self.topo.proxies[m].heal()),
            Undo::Restart(m) => cluster.restart(*m).await.map_err(RunError::fault(f))?,
            Undo::Thaw(m) => cluster.thaw(*m).map_err(RunError::fault(f))?,
        }
        let healed = Instant::now();
        if let Undo::MirrorStart(stopped) = undo {
            self.rig
                .restart(stopped, [self.steady, self.slow])
                .await
                .map_err(|detail| RunError::Restart {
                    fault: f.fault.to_string(),
                    detail,
                })?;
        }
        if matches!(undo, Undo::Resume { .. }) {
            self.slow.pause(false);
        }
        let revision = self.revision_avoiding(None, f).await?;
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
            left_minority,
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

    /// etcd's current revision (a linearizable read), asked of each running
    /// member but `skip` in turn, each for at most [`ASK_TIMEOUT`], until one
    /// answers: a member without a leader (cut off, or in an election after
    /// a restart) must not stall the run for etcd's request timeout.
    async fn revision_avoiding(
        &self,
        skip: Option<usize>,
        f: &ScheduledFault,
    ) -> Result<i64, RunError> {
        let cluster = &self.topo.cluster;
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        let mut last_error = String::from("no member to ask");
        for i in (0..cluster.len()).cycle() {
            if Instant::now() >= deadline {
                break;
            }
            if Some(i) == skip || !cluster.is_running(i) || cluster.is_frozen(i) {
                // Yields, so that a cluster with nobody to ask still times out.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let ask = async {
                let channel = connect(&cluster.endpoint(i)).await?;
                current_revision(channel).await
            };
            match tokio::time::timeout(ASK_TIMEOUT, ask).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => last_error = format!("member {i}: {e}"),
                Err(_) => last_error = format!("member {i}: no answer within {ASK_TIMEOUT:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(RunError::Fault {
            fault: f.fault.to_string(),
            detail: format!(
                "no member told the current revision within {RECOVERY_TIMEOUT:?}: {last_error}"
            ),
        })
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;
