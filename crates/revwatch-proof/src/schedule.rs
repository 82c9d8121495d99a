//! Fault schedules: which fault, when, for how long, all from one seed.
//!
//! [`Schedule::generate`] draws faults one after another (each healed before
//! the next starts, with a pause between; every allowed type once before any
//! twice), so the same seed and
//! [`ScheduleConfig`] always give the same schedule and a failing run can be
//! replayed alone. The schedule is data only; applying it is the executor's
//! job.

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use revwatch_testkit::etcd::PeerCut;

/// A fault type, without parameters (for coverage counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultType {
    /// Proxy drops all traffic both ways.
    Blackhole,
    /// Proxy resets every connection.
    Reset,
    /// Proxy adds latency.
    Latency,
    /// Proxy squeezes bandwidth.
    Bandwidth,
    /// `kill -9` a member, then restart it.
    KillRestart,
    /// SIGSTOP a member, then SIGCONT.
    Freeze,
    /// Kill the leader of a 3-member cluster, then restart it.
    LeaderKill,
    /// Blackhole one member's client proxy in a 3-member cluster (the
    /// members still reach each other): [`FaultType::Blackhole`] again, in
    /// another topology, so it counts once in coverage.
    Partition,
    /// Cut one member of a 3-member cluster off from its peers (every peer
    /// link through its proxy), while clients still reach it.
    PeerPartition,
    /// Cut the client off, compact past its revision, reconnect.
    CompactWhileDisconnected,
    /// Restart the mirror from its persisted snapshot.
    MirrorRestart,
    /// Stop a subscriber from reading for a while.
    SlowSubscriber,
}

impl FaultType {
    /// Every fault type.
    pub const ALL: [FaultType; 12] = [
        FaultType::Blackhole,
        FaultType::Reset,
        FaultType::Latency,
        FaultType::Bandwidth,
        FaultType::KillRestart,
        FaultType::Freeze,
        FaultType::LeaderKill,
        FaultType::Partition,
        FaultType::PeerPartition,
        FaultType::CompactWhileDisconnected,
        FaultType::MirrorRestart,
        FaultType::SlowSubscriber,
    ];

    /// The distinct fault this type is, for coverage counts: a blackhole of
    /// one member's client proxy is the same fault in any cluster.
    pub fn distinct(self) -> FaultType {
        match self {
            FaultType::Partition => FaultType::Blackhole,
            other => other,
        }
    }

    /// Whether the fault needs a 3-member cluster.
    pub fn needs_cluster(self) -> bool {
        matches!(
            self,
            FaultType::LeaderKill | FaultType::Partition | FaultType::PeerPartition
        )
    }

    /// Short name, as used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            FaultType::Blackhole => "blackhole",
            FaultType::Reset => "reset",
            FaultType::Latency => "latency",
            FaultType::Bandwidth => "bandwidth",
            FaultType::KillRestart => "kill-restart",
            FaultType::Freeze => "freeze",
            FaultType::LeaderKill => "leader-kill",
            FaultType::Partition => "blackhole-in-cluster",
            FaultType::PeerPartition => "peer-partition",
            FaultType::CompactWhileDisconnected => "compact-while-disconnected",
            FaultType::MirrorRestart => "mirror-restart",
            FaultType::SlowSubscriber => "slow-subscriber",
        }
    }
}

/// A fault with its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Proxy to `member` drops all traffic both ways.
    Blackhole {
        /// Member index.
        member: usize,
    },
    /// Proxy to `member` resets every connection (once, at the start).
    Reset {
        /// Member index.
        member: usize,
    },
    /// Proxy to `member` delays each direction by `delay`.
    Latency {
        /// Member index.
        member: usize,
        /// Added one-way delay.
        delay: Duration,
    },
    /// Proxy to `member` passes at most `bytes_per_sec`.
    Bandwidth {
        /// Member index.
        member: usize,
        /// Rate limit.
        bytes_per_sec: u64,
    },
    /// `kill -9` `member`, restart it when healed.
    KillRestart {
        /// Member index.
        member: usize,
    },
    /// SIGSTOP `member`, SIGCONT when healed.
    Freeze {
        /// Member index.
        member: usize,
    },
    /// Kill whichever member leads when the fault starts; restart when healed.
    LeaderKill,
    /// Blackhole the proxy of `member` only; the others stay reachable.
    Partition {
        /// Member index.
        member: usize,
    },
    /// Cut the member the mirror watches off from its peers, after making it
    /// the leader (`leader`) or a follower; heal the peer links when healed.
    PeerPartition {
        /// Whether the cut-off member leads when the cut starts.
        leader: bool,
        /// How its peer links are cut.
        cut: PeerCut,
    },
    /// Blackhole every proxy, write, compact to the current revision, heal.
    CompactWhileDisconnected,
    /// Stop the mirror; when healed, start it from its snapshot file.
    MirrorRestart,
    /// A subscriber stops reading until healed.
    SlowSubscriber,
}

impl Fault {
    /// The fault's type.
    pub fn fault_type(&self) -> FaultType {
        match self {
            Fault::Blackhole { .. } => FaultType::Blackhole,
            Fault::Reset { .. } => FaultType::Reset,
            Fault::Latency { .. } => FaultType::Latency,
            Fault::Bandwidth { .. } => FaultType::Bandwidth,
            Fault::KillRestart { .. } => FaultType::KillRestart,
            Fault::Freeze { .. } => FaultType::Freeze,
            Fault::LeaderKill => FaultType::LeaderKill,
            Fault::Partition { .. } => FaultType::Partition,
            Fault::PeerPartition { .. } => FaultType::PeerPartition,
            Fault::CompactWhileDisconnected => FaultType::CompactWhileDisconnected,
            Fault::MirrorRestart => FaultType::MirrorRestart,
            Fault::SlowSubscriber => FaultType::SlowSubscriber,
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduledFault {
    /// When it starts, from the start of the run.
    pub at: Duration,
    /// What it is.
    pub fault: Fault,
    /// How long until it is healed.
    pub duration: Duration,
}

/// What a schedule may contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// Length of the run; no fault starts or lasts beyond it.
    pub run_length: Duration,
    /// Cluster size: types that need 3 members are skipped for 1.
    pub members: usize,
    /// Types to draw from (those the cluster size allows).
    pub types: Vec<FaultType>,
    /// Shortest and longest fault.
    pub fault_length: (Duration, Duration),
    /// Shortest and longest pause after a fault is healed.
    pub pause: (Duration, Duration),
    /// The client reaches etcd only through `etcd grpc-proxy`.
    pub grpc_proxy: bool,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            run_length: Duration::from_secs(30),
            members: 1,
            types: FaultType::ALL.to_vec(),
            fault_length: (Duration::from_millis(500), Duration::from_secs(4)),
            pause: (Duration::from_millis(500), Duration::from_secs(2)),
            grpc_proxy: false,
        }
    }
}

/// How long a peer partition lasts, whatever the config's fault length: etcd
/// ends the cut-off member's require-leader watches only after about 3
/// election timeouts, and the mirror must be seen to move before the heal.
pub const PEER_PARTITION_LENGTH: (Duration, Duration) =
    (Duration::from_secs(6), Duration::from_secs(9));

/// A reproducible fault schedule.
///
/// ```
/// use revwatch_proof::schedule::{Schedule, ScheduleConfig};
/// let config = ScheduleConfig::default();
/// let a = Schedule::generate(42, &config);
/// assert_eq!(a, Schedule::generate(42, &config));
/// assert!(!a.faults.is_empty());
/// println!("{a}");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// The seed it came from.
    pub seed: u64,
    /// Cluster size.
    pub members: usize,
    /// Whether the client goes through `etcd grpc-proxy`.
    pub grpc_proxy: bool,
    /// Faults in start order; they do not overlap.
    pub faults: Vec<ScheduledFault>,
}

impl Schedule {
    /// Draws a schedule from `seed`. The same seed and config always give
    /// the same schedule (with the same version of `rand`).
    pub fn generate(seed: u64, config: &ScheduleConfig) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let members = config.members.max(1);
        let types: Vec<FaultType> = config
            .types
            .iter()
            .copied()
            .filter(|t| members >= 3 || !t.needs_cluster())
            .collect();
        let mut faults = Vec::new();
        let mut now = between(&mut rng, config.pause);
        // Types come from a shuffled bag, refilled when empty: every type
        // appears once before any appears twice, so short runs cover all.
        let mut bag: Vec<FaultType> = Vec::new();
        loop {
            if bag.is_empty() {
                bag = types.clone();
                bag.shuffle(&mut rng);
            }
            let Some(kind) = bag.pop() else { break };
            let duration = if kind == FaultType::PeerPartition {
                between(&mut rng, PEER_PARTITION_LENGTH)
            } else {
                between(&mut rng, config.fault_length)
            };
            if now + duration > config.run_length {
                break;
            }
            let member = rng.random_range(0..members);
            let fault = match kind {
                FaultType::Blackhole => Fault::Blackhole { member },
                FaultType::Reset => Fault::Reset { member },
                FaultType::Latency => Fault::Latency {
                    member,
                    delay: Duration::from_millis(rng.random_range(20..=400)),
                },
                FaultType::Bandwidth => Fault::Bandwidth {
                    member,
                    bytes_per_sec: rng.random_range(2_000..=64_000),
                },
                FaultType::KillRestart => Fault::KillRestart { member },
                FaultType::Freeze => Fault::Freeze { member },
                FaultType::LeaderKill => Fault::LeaderKill,
                FaultType::Partition => Fault::Partition { member },
                FaultType::PeerPartition => Fault::PeerPartition {
                    leader: rng.random_bool(0.5),
                    cut: if rng.random_bool(0.5) {
                        PeerCut::Blackhole
                    } else {
                        PeerCut::Reset
                    },
                },
                FaultType::CompactWhileDisconnected => Fault::CompactWhileDisconnected,
                FaultType::MirrorRestart => Fault::MirrorRestart,
                FaultType::SlowSubscriber => Fault::SlowSubscriber,
            };
            faults.push(ScheduledFault {
                at: now,
                fault,
                duration,
            });
            now += duration + between(&mut rng, config.pause);
        }
        Self {
            seed,
            members,
            grpc_proxy: config.grpc_proxy,
            faults,
        }
    }

    /// The distinct fault types in the schedule.
    pub fn types(&self) -> Vec<FaultType> {
        let mut t: Vec<FaultType> = self.faults.iter().map(|f| f.fault.fault_type()).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// A uniformly drawn duration in `lo..=hi` (millisecond resolution).
fn between(rng: &mut StdRng, (lo, hi): (Duration, Duration)) -> Duration {
    let lo_ms = lo.as_millis() as u64;
    let hi_ms = (hi.as_millis() as u64).max(lo_ms);
    Duration::from_millis(rng.random_range(lo_ms..=hi_ms))
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.fault_type().name();
        match self {
            Fault::Blackhole { member }
            | Fault::Reset { member }
            | Fault::KillRestart { member }
            | Fault::Freeze { member }
            | Fault::Partition { member } => write!(f, "{name} member {member}"),
            Fault::Latency { member, delay } => write!(f, "{name} member {member} +{delay:?}"),
            Fault::PeerPartition { leader, cut } => write!(
                f,
                "{name} of the watched member as {} ({})",
                if *leader { "leader" } else { "follower" },
                match cut {
                    PeerCut::Blackhole => "blackhole",
                    PeerCut::Reset => "reset",
                }
            ),
            Fault::Bandwidth {
                member,
                bytes_per_sec,
            } => write!(f, "{name} member {member} {bytes_per_sec} B/s"),
            Fault::LeaderKill
            | Fault::CompactWhileDisconnected
            | Fault::MirrorRestart
            | Fault::SlowSubscriber => f.write_str(name),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  seed {} · {} member(s){} · {} faults",
            self.seed,
            self.members,
            if self.grpc_proxy {
                " via grpc-proxy"
            } else {
                ""
            },
            self.faults.len()
        )?;
        for s in &self.faults {
            writeln!(
                f,
                "  t=+{:>8.3}s {} for {:.3}s",
                s.at.as_secs_f64(),
                s.fault,
                s.duration.as_secs_f64()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let config = ScheduleConfig {
            run_length: Duration::from_secs(120),
            members: 3,
            ..ScheduleConfig::default()
        };
        let a = Schedule::generate(7, &config);
        assert_eq!(a, Schedule::generate(7, &config));
        assert_ne!(a, Schedule::generate(8, &config));
        assert_eq!(a.to_string(), Schedule::generate(7, &config).to_string());
    }

    #[test]
    fn faults_fit_the_run_do_not_overlap_and_respect_cluster_size() {
        let config = ScheduleConfig {
            run_length: Duration::from_secs(300),
            ..ScheduleConfig::default()
        };
        for seed in 0..20 {
            let s = Schedule::generate(seed, &config);
            let mut end = Duration::ZERO;
            for f in &s.faults {
                assert!(f.at >= end, "overlap in seed {seed}");
                end = f.at + f.duration;
                assert!(end <= config.run_length);
                assert!(
                    !f.fault.fault_type().needs_cluster(),
                    "single member, seed {seed}"
                );
                let (lo, hi) = if f.fault.fault_type() == FaultType::PeerPartition {
                    PEER_PARTITION_LENGTH
                } else {
                    config.fault_length
                };
                assert!(f.duration >= lo && f.duration <= hi);
            }
        }
    }

    #[test]
    fn every_type_comes_once_before_any_comes_twice() {
        let config = ScheduleConfig {
            run_length: Duration::from_secs(600),
            members: 3,
            ..ScheduleConfig::default()
        };
        for seed in 0..10 {
            let s = Schedule::generate(seed, &config);
            let first: Vec<FaultType> = s
                .faults
                .iter()
                .take(FaultType::ALL.len())
                .map(|f| f.fault.fault_type())
                .collect();
            let mut sorted = first.clone();
            sorted.sort();
            assert_eq!(sorted, FaultType::ALL.to_vec(), "seed {seed}: {first:?}");
        }
    }

    #[test]
    fn peer_partitions_last_long_enough_and_draw_every_role_and_cut() {
        let config = ScheduleConfig {
            run_length: Duration::from_secs(300),
            members: 3,
            ..ScheduleConfig::default()
        };
        let mut drawn = Vec::new();
        for seed in 0..20 {
            for f in Schedule::generate(seed, &config).faults {
                if let Fault::PeerPartition { leader, cut } = f.fault {
                    assert!(f.duration >= PEER_PARTITION_LENGTH.0, "seed {seed}: {f:?}");
                    assert!(f.duration <= PEER_PARTITION_LENGTH.1, "seed {seed}: {f:?}");
                    drawn.push((leader, cut == PeerCut::Reset));
                }
            }
        }
        drawn.sort();
        drawn.dedup();
        assert_eq!(
            drawn,
            vec![(false, false), (false, true), (true, false), (true, true)]
        );
    }

    #[test]
    fn a_long_run_covers_every_type() {
        let config = ScheduleConfig {
            run_length: Duration::from_secs(600),
            members: 3,
            ..ScheduleConfig::default()
        };
        let s = Schedule::generate(1, &config);
        assert_eq!(s.types(), FaultType::ALL.to_vec());
    }
}
