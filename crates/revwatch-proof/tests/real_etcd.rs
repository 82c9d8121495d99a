//! Against a real etcd: the seeded workload's records are all explained by
//! the truth read from an independent whole-keyspace watch, that truth
//! equals etcd's own range at the last revision, and an independent raw
//! prefix watch passes the checker.

use std::time::Duration;

use revwatch_proof::checker::{Checker, RunContext, check_convergence};
use revwatch_proof::etcd::{connect, range_at};
use revwatch_proof::history::{Batch, Delivery, FullSnapshot, History};
use revwatch_proof::keys::KeyRange;
use revwatch_proof::truth::recorder::TruthRecorder;
use revwatch_proof::workload::{self, WorkloadConfig};
use revwatch_testkit::etcd::EtcdCluster;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_truth_matches_etcd_and_a_raw_watch_passes_the_checker() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let endpoints = cluster.endpoints();
    let config = WorkloadConfig {
        seed: 20240611,
        duration: Duration::from_secs(4),
        max_ops: 400,
        ..WorkloadConfig::default()
    };
    let prefix = KeyRange::prefix(&config.prefix);

    let truth_recorder = TruthRecorder::start(endpoints.clone());
    let prefix_watch = TruthRecorder::start_range(endpoints.clone(), prefix.clone());
    let out = workload::run(&config, &endpoints).await.expect("workload");
    // Let every lease run out, so expiries are part of the history.
    tokio::time::sleep(Duration::from_secs(config.lease_ttl as u64 + 3)).await;
    let channel = connect(&endpoints[0]).await.expect("connect");
    let etcd_all = range_at(channel.clone(), &KeyRange::all(), 0)
        .await
        .expect("range");
    let last = etcd_all.revision;

    let truth = truth_recorder.finish(last, WAIT).await.expect("truth");
    let att = truth
        .verify_records(&out.records, &out.leases)
        .expect("records explain truth");
    println!(
        "{} records, last revision {last}: {att:?}",
        out.records.len()
    );
    assert!(att.acked > 100, "{att:?}");
    assert!(att.failed_compares > 0, "some txn compares fail: {att:?}");
    assert!(att.lease_expiries > 0, "some leases expire: {att:?}");
    assert_eq!(
        att.revisions as i64,
        last - 1,
        "every revision explained: {att:?}"
    );
    assert_eq!(truth.len() as i64, last - 1);

    // Truth at the last revision is etcd's state, for all keys and the prefix.
    let ctx = RunContext {
        seed: config.seed,
        schedule: None,
    };
    let truth_all = FullSnapshot {
        revision: last,
        state: truth.state_at(last, &KeyRange::all()),
    };
    check_convergence(&truth_all, &etcd_all, &ctx).expect("truth equals etcd's range");
    let etcd_prefix = range_at(channel, &prefix, last)
        .await
        .expect("prefix range");
    assert!(
        !etcd_prefix.state.is_empty(),
        "the prefix holds keys at the end"
    );
    let truth_prefix = FullSnapshot {
        revision: last,
        state: truth.state_at(last, &prefix),
    };
    check_convergence(&truth_prefix, &etcd_prefix, &ctx).expect("prefix equals etcd's range");

    // etcd's own prefix watch, read independently, passes the checker.
    let watched = prefix_watch
        .finish_raw(last, WAIT)
        .await
        .expect("prefix watch");
    let mut history = History {
        expect_through: Some(last),
        ..History::default()
    };
    history.deliveries = watched
        .into_iter()
        .map(|(revision, changes)| {
            Delivery::Batch(Batch {
                revision,
                resync: None,
                changes,
            })
        })
        .collect();
    history.full_snapshots.push(etcd_prefix.clone());
    let summary = Checker::new(&truth, prefix.clone())
        .with_context(ctx)
        .check(&history)
        .expect("etcd's own watch passes");
    assert_eq!(
        summary.revisions_checked,
        truth.restricted_to(&prefix).len()
    );
    assert!(
        summary.revisions_checked < truth.len(),
        "some writes fall outside the prefix"
    );
}
