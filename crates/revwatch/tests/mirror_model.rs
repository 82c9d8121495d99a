//! Property test: random writes, deletes, txns, compactions, disconnects, stalls and
//! subscribers of random speed against the in-memory source; every delivered state
//! must equal the source's state at that revision, every per-revision batch must
//! hold exactly that revision's events, and the mirror must converge.

mod mirror_support;

use std::collections::BTreeMap;
use std::time::Duration;

use mirror_support::{Kvs, Replay, kvs_of, snap_kvs};
use proptest::prelude::*;
use revwatch::client::{Backoff, RangeRequest};
use revwatch::mirror::{MemoryOp, MemorySource, Mirror, MirrorConfig, ProgressTrust};

#[derive(Debug, Clone)]
enum Step {
    Txn(Vec<(u8, Option<u8>)>),
    Outside,
    Compact,
    Disconnect,
    Unreachable(bool),
    Settle,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec((0u8..6, prop::option::weighted(0.8, 0u8..4)), 1..4)
            .prop_map(Step::Txn),
        1 => Just(Step::Outside),
        1 => Just(Step::Compact),
        1 => Just(Step::Disconnect),
        1 => any::<bool>().prop_map(Step::Unreachable),
        1 => Just(Step::Settle),
    ]
}

/// Ground truth kept by the test: the prefix state after every revision, and the
/// keys changed at each revision.
#[derive(Default)]
struct Truth {
    states: BTreeMap<i64, Kvs>,
    changed: BTreeMap<i64, Vec<Vec<u8>>>,
}

impl Truth {
    fn at(&self, rev: i64) -> &Kvs {
        self.states
            .range(..=rev)
            .next_back()
            .map(|(_, s)| s)
            .expect("revision known")
    }
}

fn record(src: &MemorySource, truth: &mut Truth) {
    let rev = src.revision();
    let resp = src
        .range_unfaulted(&RangeRequest {
            key: b"p/".to_vec(),
            range_end: b"p0".to_vec(),
            ..Default::default()
        })
        .unwrap();
    let state = kvs_of(resp.kvs);
    let prev = truth.at(rev).clone();
    let mut changed: Vec<Vec<u8>> = state
        .iter()
        .filter(|(k, v)| prev.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(prev.keys().filter(|k| !state.contains_key(*k)).cloned())
        .collect();
    changed.sort();
    if !changed.is_empty() {
        truth.changed.insert(rev, changed);
    }
    truth.states.insert(rev, state);
}

fn run_case(steps: Vec<Step>, buffer: usize, confirmed: bool) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let src = MemorySource::new();
        let mut truth = Truth::default();
        truth.states.insert(1, Kvs::new());
        let config = MirrorConfig::default()
            .with_page_size(2)
            .with_progress_interval(Duration::from_millis(20))
            .with_stall_timeout(Duration::from_millis(200))
            .with_subscriber_buffer(buffer)
            .with_retry_backoff(Backoff {
                base: Duration::from_millis(1),
                max: Duration::from_millis(5),
            })
            .with_progress_trust(if confirmed {
                ProgressTrust::Confirmed
            } else {
                ProgressTrust::Immediate
            })
            .with_catch_up_grace(Duration::from_millis(10));
        let mirror = Mirror::builder("p/")
            .config(config)
            .start(src.clone())
            .await
            .unwrap();
        let early = mirror.subscribe();
        let mut late = None;
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Txn(ops) => {
                    let mut seen = std::collections::HashSet::new();
                    let ops = ops
                        .iter()
                        .filter(|(k, _)| seen.insert(*k))
                        .map(|(k, v)| {
                            let key = format!("p/{k}").into_bytes();
                            match v {
                                Some(v) => MemoryOp::Put(key, vec![b'a' + v], i64::from(*v)),
                                None => MemoryOp::Delete(key),
                            }
                        })
                        .collect();
                    src.txn(ops);
                }
                Step::Outside => {
                    src.put(b"q/x", b"1");
                }
                Step::Compact => src.compact(src.revision()),
                Step::Disconnect => src.disconnect_watches(),
                Step::Unreachable(u) => src.set_unreachable(*u),
                Step::Settle => tokio::time::sleep(Duration::from_millis(5)).await,
            }
            record(&src, &mut truth);
            if i == steps.len() / 2 {
                late = Some(mirror.subscribe());
            }
            tokio::task::yield_now().await;
        }
        src.set_unreachable(false);
        let last = src.revision();
        let snap = mirror
            .snapshot_at_least(last, Duration::from_secs(20))
            .await
            .map_err(|e| TestCaseError::fail(format!("no convergence: {e}")))?;
        prop_assert_eq!(&snap_kvs(&snap), truth.at(last));

        let mut subs = vec![early];
        subs.extend(late);
        for mut sub in subs {
            let mut replay = Replay::default();
            let mut last_seen = 0;
            while replay.revision < last {
                let u = tokio::time::timeout(Duration::from_secs(20), sub.recv())
                    .await
                    .map_err(|_| TestCaseError::fail("subscriber stuck"))?
                    .expect("open");
                replay.apply(&u);
                if replay.revision > 0 {
                    prop_assert_eq!(
                        &replay.state,
                        truth.at(replay.revision),
                        "state at {}",
                        replay.revision
                    );
                }
                if let revwatch::mirror::Update::Batch(b) = &u
                    && !b.is_resync()
                {
                    // Reliable and atomic: exactly the keys changed at this revision,
                    // and no revision with changes skipped since the last one.
                    let mut keys: Vec<Vec<u8>> = b.changes.iter().map(|c| c.key.to_vec()).collect();
                    keys.sort();
                    prop_assert_eq!(Some(&keys), truth.changed.get(&b.revision));
                    prop_assert!(
                        truth
                            .changed
                            .range(last_seen + 1..b.revision)
                            .next()
                            .is_none(),
                        "gap before {}",
                        b.revision
                    );
                }
                last_seen = replay.revision;
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mirror_matches_the_model(
        steps in prop::collection::vec(step(), 1..40),
        buffer in prop_oneof![Just(2usize), Just(1024usize)],
        confirmed in any::<bool>(),
    ) {
        run_case(steps, buffer, confirmed)?;
    }
}
