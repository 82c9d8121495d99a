//! End to end, no faults: the mirror's subscriber history, published
//! snapshots and final state pass the checker against truth from real etcd.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use revwatch::client::ClientConfig;
use revwatch::mirror::{ClientSource, Mirror};
use revwatch_proof::adapter::{MirrorAdapter, state_of};
use revwatch_proof::checker::{Checker, RunContext, check_convergence};
use revwatch_proof::etcd::{connect, range_at};
use revwatch_proof::history::FullSnapshot;
use revwatch_proof::keys::KeyRange;
use revwatch_proof::truth::recorder::TruthRecorder;
use revwatch_proof::workload::{self, WorkloadConfig};
use revwatch_testkit::etcd::EtcdCluster;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_without_faults_passes_the_checker() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let endpoints = cluster.endpoints();
    let config = WorkloadConfig {
        seed: 7,
        duration: Duration::from_secs(3),
        max_ops: 300,
        ..WorkloadConfig::default()
    };
    let prefix = KeyRange::prefix(&config.prefix);
    let recorder = TruthRecorder::start(endpoints.clone());

    let source = ClientSource::lazy(ClientConfig::new(endpoints.clone())).expect("source");
    let mirror = Mirror::builder(config.prefix.clone())
        .start(source)
        .await
        .expect("mirror");
    tokio::time::timeout(WAIT, mirror.wait_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let mut sub = mirror.subscribe();
    // The collector stops once it has seen `target` (set at the end).
    let target = Arc::new(AtomicI64::new(i64::MAX));
    let collector = {
        let target = Arc::clone(&target);
        tokio::spawn(async move {
            let mut adapter = MirrorAdapter::new();
            let mut reached = 0;
            while reached < target.load(Ordering::SeqCst) {
                match tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
                    Ok(Some(update)) => {
                        reached = update.revision();
                        adapter.push(&update);
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
            }
            adapter
        })
    };

    let out = workload::run(&config, &endpoints).await.expect("workload");
    tokio::time::sleep(Duration::from_secs(config.lease_ttl as u64 + 3)).await;
    let channel = connect(&endpoints[0]).await.expect("connect");
    let etcd_prefix = range_at(channel, &prefix, 0).await.expect("range");
    let last = etcd_prefix.revision;
    let snapshot = mirror
        .snapshot_at_least(last, WAIT)
        .await
        .expect("mirror catches up");
    assert_eq!(snapshot.revision(), last, "no writes after the workload");
    target.store(last, Ordering::SeqCst);
    let mut adapter = tokio::time::timeout(WAIT, collector)
        .await
        .expect("collector ends")
        .expect("collector");
    adapter.push_full_snapshot(&snapshot);

    let truth = recorder.finish(last, WAIT).await.expect("truth");
    truth
        .verify_records(&out.records, &out.leases)
        .expect("records explain truth");
    let mut history = adapter.into_history();
    history.expect_through = Some(last);
    let ctx = RunContext {
        seed: config.seed,
        schedule: None,
    };
    let summary = Checker::new(&truth, prefix.clone())
        .with_context(ctx.clone())
        .check(&history)
        .unwrap_or_else(|v| panic!("{v}"));
    println!("{summary:?}");
    assert!(summary.revisions_checked > 50, "{summary:?}");
    assert!(summary.snapshot_hashes > 50, "{summary:?}");
    let mirror_final = FullSnapshot {
        revision: snapshot.revision(),
        state: state_of(&snapshot),
    };
    check_convergence(&mirror_final, &etcd_prefix, &ctx).unwrap_or_else(|v| panic!("{v}"));
}
