//! The quick fault matrix: the real mirror against real etcd under every
//! fault type, on a single member and on 3 members, directly and through
//! `etcd grpc-proxy`, with and without auto-compaction; and against the
//! embedded server (`revwatch-server` as a child process, killed with
//! SIGKILL and restarted on its data dir, frozen, compacting on its own or
//! not) under every single-member fault. Every subscriber's
//! history, every published snapshot and the final state must pass the
//! checker against independently recorded truth.
//!
//! Seeds are fixed. To replay one case with another seed (for example one a
//! soak reported): `REVWATCH_SEED=123 cargo nextest run -p revwatch-proof
//! --test fault_matrix three_members`.

use std::time::Duration;

use revwatch_proof::run::{self, AUTO_COMPACTION_TYPES, RunConfig};
use revwatch_proof::schedule::FaultType;
use revwatch_testkit::etcd::EmbeddedServer;

fn seed_or(fixed: u64) -> u64 {
    std::env::var("REVWATCH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(fixed)
}

/// Runs `config`, panicking with seed, schedule and window on failure, and
/// checks that the schedule covered `expected` types.
async fn check(config: RunConfig, expected: &[FaultType]) {
    let schedule = config.schedule();
    println!("{schedule}");
    let types = schedule.types();
    for t in expected {
        assert!(
            types.contains(t),
            "the schedule of seed {} lacks {}: lengthen the run",
            config.seed,
            t.name()
        );
    }
    match run::run(&config).await {
        Ok(report) => {
            println!(
                "seed {}: {} faults, last revision {}, checks {:?}, relists {:?}, reconnects {:?}, lagged resyncs {}, {:?}",
                config.seed,
                report.faults.len(),
                report.last_revision,
                report.checks,
                report.relists,
                report.reconnects,
                report.lagged_resyncs,
                report.elapsed
            );
            for f in &report.faults {
                println!("  {} recovered in {:?}", f.fault.name(), f.recovery);
            }
            assert_eq!(report.faults.len(), schedule.faults.len());
            // Directly on 3 members, the mirror watches a member's proxy:
            // each peer partition cuts that member off, and the mirror must
            // have left it for the majority before the heal.
            if config.members == 3 && !config.grpc_proxy {
                for f in &report.faults {
                    assert!(
                        f.fault != FaultType::PeerPartition || f.left_minority,
                        "a peer partition that did not cut off the watched member: {:?}",
                        report.faults
                    );
                }
            }
            assert!(
                report.checks.iter().all(|c| c.revisions_checked > 20),
                "{:?}",
                report.checks
            );
        }
        Err(failure) => panic!(
            "{failure}\nreplay: REVWATCH_SEED={} cargo nextest run -p revwatch-proof --test fault_matrix",
            config.seed
        ),
    }
}

fn single_member_types() -> Vec<FaultType> {
    FaultType::ALL
        .into_iter()
        .filter(|t| !t.needs_cluster())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_every_fault() {
    let config = RunConfig::new(seed_or(11), 1, Duration::from_secs(32));
    check(config, &single_member_types()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_every_fault() {
    let config = RunConfig::new(seed_or(12), 3, Duration::from_secs(48));
    check(config, &FaultType::ALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_grpc_proxy() {
    let mut config = RunConfig::new(seed_or(13), 1, Duration::from_secs(32));
    config.grpc_proxy = true;
    check(config, &single_member_types()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auto_compaction() {
    let mut config = RunConfig::new(seed_or(14), 1, Duration::from_secs(22));
    config.auto_compaction = true;
    config.types = AUTO_COMPACTION_TYPES.to_vec();
    // Disconnections longer than the retention, so history the mirror
    // needs is compacted by etcd itself.
    config.fault_length = (Duration::from_millis(1500), Duration::from_secs(3));
    check(config, &AUTO_COMPACTION_TYPES).await;
}

/// The embedded server as the proof's soak runs it: this crate's binary as
/// `embedded-server`.
fn embedded_server() -> EmbeddedServer {
    EmbeddedServer {
        program: env!("CARGO_BIN_EXE_revwatch-proof").into(),
        args: vec!["embedded-server".into()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_every_fault() {
    let mut config = RunConfig::new(seed_or(15), 1, Duration::from_secs(32));
    config.embedded = Some(embedded_server());
    check(config, &single_member_types()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_server_with_auto_compaction() {
    let mut config = RunConfig::new(seed_or(16), 1, Duration::from_secs(22));
    config.embedded = Some(embedded_server());
    config.auto_compaction = true;
    config.types = AUTO_COMPACTION_TYPES.to_vec();
    config.fault_length = (Duration::from_millis(1500), Duration::from_secs(3));
    check(config, &AUTO_COMPACTION_TYPES).await;
}
