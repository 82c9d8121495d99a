//! One seeded run under faults, checked end to end.
//!
//! [`run`] starts etcd (1 or 3 members), a [`FaultProxy`] per member between
//! the mirror and etcd (and optionally `etcd grpc-proxy` in front of those),
//! an independent truth recorder straight to the members, the mirror with
//! two subscribers (one steady, one that the slow-subscriber fault pauses),
//! and the seeded writers straight to the members. Meanwhile the executor
//! injects the seeded [`Schedule`], healing each fault and timing the
//! mirror's recovery. At the end it waits for leases to run out, writes a
//! last key under the prefix ([`workload::fence`]) and waits for the mirror
//! to reach that revision, then checks every subscriber's
//! history, every published snapshot hash, sampled full snapshots, what each
//! restarted mirror loaded from its file, and the final state against
//! etcd's range. The truth carries the compactions of the run (those the
//! executor makes, and with auto-compaction those a probe finds), which
//! alone explain a relist. A run that checked fewer acknowledged writes or
//! prefix revisions than its stated minimum fails.
//!
//! The same [`RunConfig`] (seed included) gives the same workload plan and
//! fault schedule, so a failing run can be replayed alone.
//!
//! [`FaultProxy`]: revwatch_testkit::proxy::FaultProxy

mod collect;
mod executor;
mod rig;
mod summary;
mod topology;

pub use self::summary::SoakSummary;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use revwatch::mirror::MirrorConfig;
use revwatch_testkit::etcd::EmbeddedServer;
use tokio::time::Instant;

use self::collect::{Collector, Feed};
use self::executor::{Executor, RECOVERY_TIMEOUT};
use self::rig::MirrorRig;
use self::topology::Topology;
use crate::adapter::state_of;
use crate::checker::{CheckSummary, Checker, RunContext, Violation, check_convergence};
use crate::etcd::{connect, range_at};
use crate::history::{FullSnapshot, History};
use crate::keys::KeyRange;
use crate::record::Outcome;
use crate::schedule::{FaultType, Schedule, ScheduleConfig, ScheduledFault};
use crate::truth::TruthError;
use crate::truth::recorder::TruthRecorder;
use crate::workload::{self, WorkloadConfig};

/// Updates a subscriber may have queued before it is marked lagging: small,
/// so that a slow subscriber overflows within a short pause.
const SUBSCRIBER_BUFFER: usize = 32;
/// Longest wait for the end of a run (collectors, truth, final catch-up).
const END_TIMEOUT: Duration = Duration::from_secs(60);
/// Acknowledged writes each second of a run must at least bring.
pub const MIN_WRITES_PER_SEC: u64 = 10;
/// Prefix revisions each second of a run must at least bring to be checked.
pub const MIN_REVISIONS_PER_SEC: u64 = 5;

/// What one run does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    /// Seed of the schedule and of the workload.
    pub seed: u64,
    /// etcd members: 1 or 3.
    pub members: usize,
    /// The mirror reaches etcd only through `etcd grpc-proxy`.
    pub grpc_proxy: bool,
    /// The server under test is revwatch's embedded server, run by this
    /// command as a child process on a data dir of its own (one member, no
    /// grpc-proxy), instead of etcd.
    pub embedded: Option<EmbeddedServer>,
    /// etcd compacts on its own (periodic, every second) throughout.
    pub auto_compaction: bool,
    /// Time during which faults are injected and the writers write.
    pub run_length: Duration,
    /// Fault types to draw from.
    pub types: Vec<FaultType>,
    /// Shortest and longest fault.
    pub fault_length: (Duration, Duration),
    /// Shortest and longest pause between faults.
    pub pause: (Duration, Duration),
    /// The mirror's stall timeout: short, so frozen members are left fast.
    pub stall_timeout: Duration,
    /// Acknowledged writes the run must check at least, or it fails.
    pub min_writes: usize,
    /// Prefix revisions the steady subscriber must have checked at least
    /// (`revisions_checked`), or the run fails.
    pub min_revisions: usize,
}

impl RunConfig {
    /// A run of `run_length` on `members` members with every fault type.
    pub fn new(seed: u64, members: usize, run_length: Duration) -> Self {
        Self {
            seed,
            members,
            grpc_proxy: false,
            embedded: None,
            auto_compaction: false,
            run_length,
            types: FaultType::ALL.to_vec(),
            fault_length: (Duration::from_millis(500), Duration::from_secs(3)),
            pause: (Duration::from_millis(300), Duration::from_millis(1500)),
            stall_timeout: Duration::from_secs(3),
            min_writes: per_sec(MIN_WRITES_PER_SEC, run_length),
            min_revisions: per_sec(MIN_REVISIONS_PER_SEC, run_length),
        }
    }

    /// The soak's run for `seed`: topology and options drawn from the seed,
    /// so that `replay` needs nothing but the seed and the length. Runs on
    /// one member may test the embedded server, run by `embedded`.
    pub fn for_soak(seed: u64, run_length: Duration, embedded: &EmbeddedServer) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_50a4);
        let members = if rng.random_bool(0.5) { 3 } else { 1 };
        let mut config = Self::new(seed, members, run_length);
        config.grpc_proxy = rng.random_bool(0.2);
        if !config.grpc_proxy && rng.random_bool(0.2) {
            config.auto_compaction = true;
            config.types = AUTO_COMPACTION_TYPES.to_vec();
        }
        // Drawn last, so that the draws above stay what they were for each seed.
        if members == 1 && !config.grpc_proxy && rng.random_bool(0.5) {
            config.embedded = Some(embedded.clone());
        }
        config
    }

    /// What the run's server is, for reports: `etcd` (with its member count
    /// and options) or `revwatch-server`.
    pub fn topology(&self) -> String {
        let mut t = match self.embedded {
            Some(_) => "revwatch-server".to_owned(),
            None => format!("etcd x{}", self.members),
        };
        if self.grpc_proxy {
            t.push_str(" via grpc-proxy");
        }
        if self.auto_compaction {
            t.push_str(" with auto-compaction");
        }
        t
    }

    /// The fault schedule this run applies.
    pub fn schedule(&self) -> Schedule {
        Schedule::generate(
            self.seed,
            &ScheduleConfig {
                run_length: self.run_length,
                members: self.members,
                types: self.types.clone(),
                fault_length: self.fault_length,
                pause: self.pause,
                grpc_proxy: self.grpc_proxy,
            },
        )
    }

    fn workload(&self) -> WorkloadConfig {
        WorkloadConfig {
            seed: self.seed,
            duration: self.run_length,
            max_ops: usize::MAX,
            ..WorkloadConfig::default()
        }
    }

    fn mirror(&self) -> MirrorConfig {
        MirrorConfig::default()
            .with_progress_interval(self.stall_timeout / 3)
            .with_stall_timeout(self.stall_timeout)
            .with_subscriber_buffer(SUBSCRIBER_BUFFER)
            .with_snapshot_interval(Duration::from_millis(200))
    }
}

/// `rate` per second over `length`.
fn per_sec(rate: u64, length: Duration) -> usize {
    usize::try_from(rate.saturating_mul(length.as_secs())).unwrap_or(usize::MAX)
}

/// With auto-compaction the truth recorder must never fall a second behind,
/// so members are not killed or frozen: only faults between the mirror and
/// etcd, and the mirror's own.
pub const AUTO_COMPACTION_TYPES: [FaultType; 7] = [
    FaultType::Blackhole,
    FaultType::Reset,
    FaultType::Latency,
    FaultType::Bandwidth,
    FaultType::CompactWhileDisconnected,
    FaultType::MirrorRestart,
    FaultType::SlowSubscriber,
];

/// One fault and how the mirror got over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultOutcome {
    /// The fault's type.
    pub fault: FaultType,
    /// From healed until the mirror reached etcd's revision at that moment.
    pub recovery: Duration,
    /// A peer partition of the member the mirror watched, which the mirror
    /// left for the majority (reaching its revision) while it was cut off.
    pub left_minority: bool,
}

/// What a passing run covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// The run's configuration.
    pub config: RunConfig,
    /// The schedule applied.
    pub schedule: Schedule,
    /// Each fault applied, in order, with its recovery time.
    pub faults: Vec<FaultOutcome>,
    /// Each subscriber's check (steady, then slow).
    pub checks: Vec<CheckSummary>,
    /// etcd's last revision.
    pub last_revision: i64,
    /// Writes issued.
    pub writes: usize,
    /// Writes etcd acknowledged, each found in truth with its effect.
    pub acked_writes: usize,
    /// Compactions in the truth (made by the run or found).
    pub compactions: usize,
    /// Relists by cause, over every mirror instance.
    pub relists: BTreeMap<String, u64>,
    /// Watch resumptions by cause, over every mirror instance.
    pub reconnects: BTreeMap<String, u64>,
    /// Resyncs the slow subscriber received because it lagged.
    pub lagged_resyncs: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Starting etcd, the proxies or the mirror failed.
    #[error("setup failed: {0}")]
    Setup(String),
    /// A fault could not be injected or healed.
    #[error("fault {fault} could not be applied: {detail}")]
    Fault {
        /// The fault.
        fault: String,
        /// What went wrong.
        detail: String,
    },
    /// The mirror did not catch up after a fault was healed.
    #[error("no recovery after {fault}: {detail}")]
    NoRecovery {
        /// The fault.
        fault: String,
        /// Where the mirror was.
        detail: String,
    },
    /// A restarted mirror did not load its snapshot file as it should.
    #[error("restart after {fault}: {detail}")]
    Restart {
        /// The fault.
        fault: String,
        /// What the new mirror's status showed.
        detail: String,
    },
    /// The run checked less than its stated minimum.
    #[error("too little checked: {0}")]
    TooLittle(String),
    /// A slow subscriber was not resynced exactly once.
    #[error("slow subscriber: {detail}")]
    SlowSubscriber {
        /// What it received.
        detail: String,
    },
    /// Ground truth could not be established.
    #[error("truth: {0}")]
    Truth(#[from] TruthError),
    /// A guarantee was broken.
    #[error("{0}")]
    Violation(Box<Violation>),
}

impl RunError {
    fn setup(e: impl fmt::Display) -> Self {
        RunError::Setup(e.to_string())
    }

    fn fault(f: &ScheduledFault) -> impl Fn(revwatch_testkit::TestkitError) -> RunError + '_ {
        move |e| RunError::Fault {
            fault: f.fault.to_string(),
            detail: e.to_string(),
        }
    }

    /// Whether the mirror broke a guarantee (rather than the run failing to
    /// set up or to establish the truth).
    pub fn is_violation(&self) -> bool {
        matches!(
            self,
            RunError::Violation(_)
                | RunError::NoRecovery { .. }
                | RunError::SlowSubscriber { .. }
                | RunError::Restart { .. }
        )
    }

    /// Whether the mirror relisted with nothing to explain it.
    pub fn is_unexplained_relist(&self) -> bool {
        matches!(self, RunError::Violation(v) if v.kind == crate::checker::Kind::Relist)
    }
}

/// A failed run, with what is needed to replay it.
#[derive(Debug)]
pub struct RunFailure {
    /// The run's configuration.
    pub config: RunConfig,
    /// Its schedule.
    pub schedule: Schedule,
    /// What went wrong.
    pub error: RunError,
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "run failed: {}", self.error)?;
        if !matches!(self.error, RunError::Violation(_)) {
            // A violation prints the seed and schedule itself.
            writeln!(f, "seed: {}", self.config.seed)?;
            write!(f, "fault schedule:\n{}", self.schedule)?;
        }
        write!(
            f,
            "run config: {}, {:?}",
            self.config.topology(),
            self.config.run_length
        )
    }
}

impl std::error::Error for RunFailure {}

/// Runs `config` and checks everything it delivered.
pub async fn run(config: &RunConfig) -> Result<RunReport, Box<RunFailure>> {
    let schedule = config.schedule();
    run_schedule(config, &schedule).await.map_err(|error| {
        Box::new(RunFailure {
            config: config.clone(),
            schedule,
            error,
        })
    })
}

async fn run_schedule(config: &RunConfig, schedule: &Schedule) -> Result<RunReport, RunError> {
    let began = Instant::now();
    let workload_config = config.workload();
    let prefix = KeyRange::prefix(&workload_config.prefix);
    let mut topo = Topology::start(config).await?;
    let members = topo.member_endpoints();
    let mut recorder = TruthRecorder::start(members.clone());
    if config.auto_compaction {
        recorder.follow_compactions(members[0].clone());
    }
    let mut rig = MirrorRig::start(
        workload_config.prefix.clone(),
        topo.mirror_endpoints(),
        config.mirror(),
        config.seed,
    )
    .await?;
    let steady = Collector::start(Feed::new(rig.mirror()?));
    let slow = Collector::start(Feed::new(rig.mirror()?));

    let start = Instant::now();
    let writers = {
        let (c, m) = (workload_config.clone(), members.clone());
        tokio::spawn(async move { workload::run(&c, &m).await })
    };
    let faults = Executor {
        topo: &mut topo,
        recorder: &recorder,
        rig: &mut rig,
        steady: &steady,
        slow: &slow,
        buffer: SUBSCRIBER_BUFFER,
    }
    .run(schedule, start)
    .await;
    let mut out = writers
        .await
        .map_err(|e| RunError::Setup(format!("writers: {e}")))?
        .map_err(RunError::setup)?;
    let faults = faults?;
    // Let every lease run out, so that expiries are part of the history.
    tokio::time::sleep(Duration::from_secs(workload_config.lease_ttl as u64 + 3)).await;

    let fence = workload::fence(&workload_config, &members[0])
        .await
        .map_err(RunError::setup)?;
    let Outcome::Acked { revision: last, .. } = fence.outcome else {
        return Err(RunError::Setup(format!("the final write failed: {fence}")));
    };
    out.records.push(fence);
    let channel = connect(&members[0]).await.map_err(RunError::setup)?;
    let etcd_final = range_at(channel, &prefix, last)
        .await
        .map_err(RunError::setup)?;
    let mirror = rig.mirror()?;
    let snapshot = mirror
        .snapshot_at_least(last, RECOVERY_TIMEOUT)
        .await
        .map_err(|e| RunError::NoRecovery {
            fault: "the end of the run".into(),
            detail: format!("{e}; status {:?}", mirror.status()),
        })?;
    let mirror_final = FullSnapshot {
        revision: snapshot.revision(),
        state: state_of(&snapshot),
    };
    let lagged_resyncs = slow
        .counters()
        .lagged_resyncs
        .load(std::sync::atomic::Ordering::Relaxed);
    let histories = [
        steady.finish(last, END_TIMEOUT).await,
        slow.finish(last, END_TIMEOUT).await,
    ];
    let truth = recorder.finish(last, END_TIMEOUT).await?;
    let attribution = truth.verify_records(&out.records, &out.leases)?;

    let ctx = RunContext {
        seed: config.seed,
        schedule: Some(schedule.clone()),
    };
    let checker = Checker::new(&truth, prefix).with_context(ctx.clone());
    let mut checks = Vec::with_capacity(histories.len());
    for (i, adapter) in histories.into_iter().enumerate() {
        let mut adapter = adapter.map_err(|detail| RunError::NoRecovery {
            fault: format!("the end of the run (subscriber {i})"),
            detail,
        })?;
        if i == 0 {
            adapter.push_full_snapshot(&snapshot);
        }
        let mut history = adapter.into_history();
        history.expect_through = Some(last);
        checks.push(checker.check(&history).map_err(RunError::Violation)?);
    }
    // Each restart loaded its own file: their revisions need not increase.
    let full_snapshots = std::mem::take(&mut rig.loaded);
    let loaded = History {
        restarts: (0..full_snapshots.len()).map(|i| (0, i)).collect(),
        full_snapshots,
        ..History::default()
    };
    checker.check(&loaded).map_err(RunError::Violation)?;
    check_convergence(&mirror_final, &etcd_final, &ctx).map_err(RunError::Violation)?;
    let revisions_checked = checks.first().map_or(0, |c| c.revisions_checked);
    if attribution.acked < config.min_writes || revisions_checked < config.min_revisions {
        return Err(RunError::TooLittle(format!(
            "{} acknowledged writes and {revisions_checked} prefix revisions, below the minimum of {} and {}",
            attribution.acked, config.min_writes, config.min_revisions
        )));
    }

    let (relists, reconnects) = rig.counters();
    Ok(RunReport {
        config: config.clone(),
        schedule: schedule.clone(),
        faults,
        checks,
        last_revision: last,
        writes: out.records.len(),
        acked_writes: attribution.acked,
        compactions: truth.compactions().len(),
        relists,
        reconnects,
        lagged_resyncs,
        elapsed: began.elapsed(),
    })
}
