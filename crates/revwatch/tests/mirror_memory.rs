//! Mirror behaviour over the in-memory source: listing, resume, relist, stalls,
//! validation, subscribers, decoding, persistence and readiness, each compared with
//! the source's own state.

mod mirror_support;

use std::time::Duration;

use bytes::Bytes;
use mirror_support::setup::assert_not_ready;
use mirror_support::{Replay, eventually, snap_kvs, truth};
use revwatch::client::{Backoff, ResponseHeader, WatchResponse};
use revwatch::mirror::{
    DecodePolicy, FailureKind, MemoryOp, MemorySource, Mirror, MirrorConfig, MirrorError,
    ProgressTrust, ReconnectCause, ResyncReason, State, Subscription, Update,
};

const P: &[u8] = b"p/";
const WAIT: Duration = Duration::from_secs(10);

fn fast_config() -> MirrorConfig {
    MirrorConfig::default()
        .with_page_size(3)
        .with_progress_interval(Duration::from_millis(50))
        .with_stall_timeout(Duration::from_millis(300))
        .with_retry_backoff(Backoff {
            base: Duration::from_millis(2),
            max: Duration::from_millis(20),
        })
        .with_progress_trust(ProgressTrust::Immediate)
}

async fn start(src: &MemorySource, config: MirrorConfig) -> Mirror {
    Mirror::builder(P)
        .config(config)
        .start(src.clone())
        .await
        .unwrap()
}

async fn assert_converged(mirror: &Mirror, src: &MemorySource) {
    let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
    assert_eq!(snap.revision(), src.revision());
    assert_eq!(snap_kvs(&snap), truth(src, P, snap.revision()).await);
}

#[tokio::test]
async fn lists_in_pages_then_follows_with_one_batch_per_revision() {
    let src = MemorySource::new();
    for i in 0..10 {
        src.put(format!("p/{i:02}").as_bytes(), b"v");
    }
    src.put(b"q/outside", b"x");
    let mirror = start(&src, fast_config()).await;
    let mut sub = mirror.subscribe();
    mirror.wait_ready().await.unwrap();
    assert_eq!(mirror.snapshot().len(), 10);

    let txn_rev = src.txn(vec![
        MemoryOp::Put(b"p/00".to_vec(), b"w".to_vec(), 0),
        MemoryOp::Delete(b"p/01".to_vec()),
        MemoryOp::Put(b"p/new".to_vec(), b"n".to_vec(), 5),
    ]);
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, txn_rev, WAIT).await;
    assert_eq!(
        replay.batches.first(),
        Some(&(12, true)),
        "initial list is one resync"
    );
    assert_eq!(replay.batches.last(), Some(&(txn_rev, false)));
    assert_converged(&mirror, &src).await;
    let e = mirror.snapshot().get_arc(b"p/00").unwrap();
    assert_eq!(
        (e.version, e.create_revision, e.mod_revision),
        (2, 2, txn_rev)
    );
    assert_eq!(mirror.snapshot().get(b"p/new").unwrap().lease, 5);
}

#[tokio::test]
async fn resumes_after_disconnect_without_relist() {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    src.disconnect_watches();
    let r1 = src.put(b"p/b", b"2");
    let r2 = src.delete(b"p/a");
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, r2, WAIT).await;
    assert_eq!(replay.batches, vec![(r1, false), (r2, false)]);
    let st = mirror.status();
    assert!(st.relists.is_empty(), "{st:?}");
    assert!(st.reconnects[&ReconnectCause::StreamError] >= 1);
    assert_converged(&mirror, &src).await;
}

/// Cuts the mirror off, makes the changes `change` returns the last revision of,
/// compacts history up to it, and lets the mirror back in; returns that revision.
fn compacted_while_cut_off(src: &MemorySource, change: impl FnOnce(&MemorySource) -> i64) -> i64 {
    src.set_unreachable(true);
    src.disconnect_watches();
    let last = change(src);
    src.compact(last);
    src.set_unreachable(false);
    last
}

#[tokio::test]
async fn compaction_while_disconnected_relists_with_an_exact_diff() {
    let src = MemorySource::new();
    src.put(b"p/keep", b"1");
    src.put(b"p/change", b"1");
    src.put(b"p/gone", b"1");
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    let last = compacted_while_cut_off(&src, |src| {
        src.put(b"p/change", b"2");
        src.delete(b"p/gone");
        src.put(b"p/added", b"3")
    });
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, last, WAIT).await;
    assert_eq!(replay.batches, vec![(last, true)]);
    assert_eq!(mirror.status().relists[&ResyncReason::Compacted], 1);
    assert_converged(&mirror, &src).await;
}

#[tokio::test]
async fn relist_batch_holds_exactly_the_difference() {
    let src = MemorySource::new();
    for k in ["p/a", "p/b", "p/c", "p/d"] {
        src.put(k.as_bytes(), b"1");
    }
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    assert!(matches!(sub.recv().await, Some(Update::Snapshot(_))));
    compacted_while_cut_off(&src, |src| {
        src.put(b"p/b", b"2");
        src.delete(b"p/c");
        src.put(b"p/e", b"1")
    });
    let Some(Update::Batch(b)) = tokio::time::timeout(WAIT, sub.recv()).await.unwrap() else {
        panic!("expected a batch");
    };
    assert_eq!(b.resync, Some(ResyncReason::Compacted));
    let summary: Vec<(String, bool)> = b
        .changes
        .iter()
        .map(|c| {
            (
                String::from_utf8_lossy(&c.key).into_owned(),
                c.kind.is_put(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("p/b".into(), true),
            ("p/c".into(), false),
            ("p/e".into(), true)
        ]
    );
}

#[tokio::test]
async fn frozen_stream_is_detected_and_resumed() {
    let src = MemorySource::new();
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    src.set_frozen(true);
    let rev = src.put(b"p/x", b"1");
    let started = std::time::Instant::now();
    // The stream delivers nothing while frozen; a new stream is frozen too, so
    // unfreeze once the stall was seen.
    while !mirror
        .status()
        .reconnects
        .contains_key(&ReconnectCause::Stall)
    {
        assert!(started.elapsed() < WAIT, "stall not detected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    src.set_frozen(false);
    mirror.snapshot_at_least(rev, WAIT).await.unwrap();
    assert_converged(&mirror, &src).await;
}

/// Streams that are created and then fail at once back off like failures to open:
/// the mirror never spins on a server (or proxy) that fails every watch.
#[tokio::test]
async fn streams_failing_right_after_creation_back_off() {
    let src = MemorySource::new();
    let config = fast_config().with_retry_backoff(Backoff {
        base: Duration::from_millis(10),
        max: Duration::from_millis(100),
    });
    let mirror = start(&src, config).await;
    mirror.wait_ready().await.unwrap();
    src.set_fail_after_created(true);
    src.disconnect_watches();
    let rev = src.put(b"p/x", b"1");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconnects: u64 = mirror.status().reconnects.values().sum();
    // Without backoff this would be tens of thousands; with it, about a dozen.
    assert!(
        (2..100).contains(&reconnects),
        "{reconnects} reconnects in 1 s"
    );
    src.set_fail_after_created(false);
    mirror.snapshot_at_least(rev, WAIT).await.unwrap();
    assert_converged(&mirror, &src).await;
}

fn injected(header: i64, key: &str, rev: i64) -> WatchResponse {
    use etcd_proto::mvccpb::{Event, KeyValue};
    WatchResponse {
        header: Some(ResponseHeader {
            revision: header,
            ..Default::default()
        }),
        events: vec![Event {
            r#type: 0,
            kv: Some(KeyValue {
                key: key.into(),
                value: b"bogus".to_vec(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                ..Default::default()
            }),
            prev_kv: None,
        }],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_backward_event_is_rejected_and_never_applied() {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let r = src.put(b"p/b", b"1");
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, r, WAIT).await;
    // A repeated revision, as a buggy server might send after a partition.
    src.inject(injected(r, "p/evil", r));
    let r2 = src.put(b"p/c", b"1");
    replay.follow_until(&mut sub, r2, WAIT).await;
    assert!(mirror.snapshot().get(b"p/evil").is_none());
    let st = mirror.status();
    assert_eq!(st.rejected_responses, 1);
    assert_eq!(st.relists[&ResyncReason::Validation], 1);
    assert_converged(&mirror, &src).await;
}

#[tokio::test]
async fn late_subscriber_gets_current_snapshot_then_every_batch() {
    let src = MemorySource::new();
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let writer = {
        let src = src.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                src.put(format!("p/{}", i % 17).as_bytes(), i.to_string().as_bytes());
                if i % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut subs = Vec::new();
    for _ in 0..5 {
        subs.push(mirror.subscribe());
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    let last = src.revision();
    for mut sub in subs {
        let mut replay = Replay::keeping_snapshots();
        replay.follow_until(&mut sub, last, WAIT).await;
        for (rev, kvs) in &replay.snapshots {
            if *rev > 0 {
                assert_eq!(*kvs, truth(&src, P, *rev).await, "state at {rev}");
            }
        }
        assert_eq!(replay.resyncs, 0);
    }
}

#[tokio::test]
async fn slow_subscriber_is_resynced_with_bounded_buffer() {
    let src = MemorySource::new();
    let config = fast_config().with_subscriber_buffer(4);
    let mirror = start(&src, config).await;
    mirror.wait_ready().await.unwrap();
    let mut slow = mirror.subscribe();
    let mut fast = mirror.subscribe();
    let fast_task = tokio::spawn(async move {
        let mut replay = Replay::default();
        while let Some(u) = fast.recv().await {
            replay.apply(&u);
        }
        replay
    });
    let mut last = 0;
    for i in 0..200 {
        last = src.put(format!("p/{}", i % 7).as_bytes(), i.to_string().as_bytes());
        if i == 100 {
            src.delete(b"p/3");
        }
        // Let the mirror and the fast subscriber keep up.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    mirror.snapshot_at_least(last, WAIT).await.unwrap();
    assert!(slow.is_lagging());
    let mut replay = Replay::default();
    replay.follow_until(&mut slow, last, WAIT).await;
    assert_eq!(replay.resyncs, 1);
    // The queue held 4 updates (the snapshot and 3 more), then one resync: it
    // never grew past its capacity.
    assert_eq!(replay.batches.len() + replay.bookmarks.len(), 3 + 1);
    assert_eq!(replay.state, truth(&src, P, last).await);
    drop(mirror);
    let fast_replay = tokio::time::timeout(WAIT, fast_task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fast_replay.resyncs, 0, "a fast subscriber is not affected");
    assert_eq!(fast_replay.revision, last);
}

#[tokio::test]
async fn bad_values_are_isolated_by_policy() {
    for policy in [DecodePolicy::DropKey, DecodePolicy::KeepLastGood] {
        let src = MemorySource::new();
        src.put(b"p/n", b"1");
        let mirror = Mirror::builder(P)
            .config(fast_config().with_decode_policy(policy))
            .decoder(
                |_k: &[u8], v: &[u8]| -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
                    Ok(std::str::from_utf8(v)?.parse::<u64>()?)
                },
            )
            .start(src.clone())
            .await
            .unwrap();
        mirror.wait_ready().await.unwrap();
        let bad = src.put(b"p/n", b"not a number");
        let other = src.put(b"p/m", b"7");
        let snap = mirror.snapshot_at_least(other, WAIT).await.unwrap();
        assert_eq!(snap.get(b"p/m").unwrap().value, 7);
        let st = mirror.status();
        assert_eq!(st.decode_failure_count, 1);
        assert_eq!(st.decode_failures[0].key, Bytes::from_static(b"p/n"));
        assert_eq!(st.decode_failures[0].revision, bad);
        match policy {
            DecodePolicy::DropKey => assert!(snap.get(b"p/n").is_none()),
            DecodePolicy::KeepLastGood => assert_eq!(snap.get(b"p/n").unwrap().value, 1),
        }
        let fixed = src.put(b"p/n", b"5");
        let snap = mirror.snapshot_at_least(fixed, WAIT).await.unwrap();
        assert_eq!(snap.get(b"p/n").unwrap().value, 5);
        assert_eq!(mirror.status().decode_failure_count, 0);
    }
}

#[tokio::test]
async fn wait_ready_reports_the_cause() {
    let src = MemorySource::new();
    src.set_permission_denied(true);
    let mirror = start(&src, fast_config()).await;
    assert_not_ready(&mirror, FailureKind::PermissionDenied).await;
    assert_eq!(mirror.status().state, State::Degraded);
    src.set_permission_denied(false);
    src.set_unreachable(true);
    let mirror = start(&src, fast_config()).await;
    assert_not_ready(&mirror, FailureKind::Unreachable).await;
    src.set_unreachable(false);
    // It keeps retrying and gets ready once the source is back.
    tokio::time::timeout(WAIT, async {
        while mirror.wait_ready().await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn snapshot_at_least_times_out_clearly() {
    let src = MemorySource::new();
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let err = mirror
        .snapshot_at_least(1000, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            MirrorError::Timeout {
                wanted: Some(1000),
                ..
            }
        ),
        "{err}"
    );
    // A revision with no change in the prefix is reached through a bookmark.
    let rev = src.put(b"elsewhere", b"1");
    let snap = mirror.snapshot_at_least(rev, WAIT).await.unwrap();
    assert_eq!(snap.revision(), rev);
}

#[tokio::test]
async fn confirmed_progress_trust_reaches_quiet_revisions() {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let mirror = start(
        &src,
        fast_config().with_progress_trust(ProgressTrust::Confirmed),
    )
    .await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    let rev = src.put(b"elsewhere", b"1");
    let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
    assert!(snap.revision() >= rev);
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, rev, WAIT).await;
    assert!(replay.bookmarks.contains(&snap.revision()));
}

/// With no reader waiting, a progress reply is verified when
/// `progress_verify_interval` says, not only when something else wakes the
/// watch: here the next progress request would come 3 s after that.
#[tokio::test]
async fn a_due_verification_runs_without_waiting_for_the_next_progress_request() {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let opened = tokio::time::Instant::now();
    let config = fast_config()
        .with_progress_trust(ProgressTrust::Confirmed)
        .with_progress_interval(Duration::from_secs(4))
        .with_progress_verify_interval(Duration::from_secs(5))
        .with_stall_timeout(Duration::from_secs(60));
    let mirror = start(&src, config).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    // Outside the prefix: only a bookmark moves the mirror there. The progress
    // reply at 4 s is a candidate, due for verification at 5 s; the next
    // request would be at 8 s.
    let rev = src.put(b"elsewhere", b"1");
    let bookmark = async {
        loop {
            match sub.recv().await {
                Some(Update::Progress(at)) if at >= rev => return at,
                Some(_) => continue,
                None => panic!("subscription ended"),
            }
        }
    };
    let at = tokio::time::timeout_at(opened + Duration::from_secs(7), bookmark)
        .await
        .expect("no bookmark by 7 s: the due verification waited for the next request");
    assert_eq!(mirror.snapshot().revision(), at);
}

/// A mirror trusting progress as for etcd 3.4, ready, with a subscriber.
async fn confirmed_mirror(src: &MemorySource) -> (Mirror, Subscription<Bytes>) {
    let mirror = start(
        src,
        fast_config().with_progress_trust(ProgressTrust::Confirmed),
    )
    .await;
    mirror.wait_ready().await.unwrap();
    let sub = mirror.subscribe();
    (mirror, sub)
}

/// etcd#15220: progress is answered at the revision of `change` while its events
/// wait. No bookmark may claim the range unchanged there; once the events come,
/// they are applied in order, without a relist.
async fn early_progress_is_no_bookmark(change: impl FnOnce(&MemorySource) -> i64) {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    src.put(b"p/b", b"1");
    let (mirror, mut sub) = confirmed_mirror(&src).await;
    let before = mirror.snapshot().revision();
    src.set_events_held(true);
    let rev = change(&src);
    let early = mirror
        .snapshot_at_least(rev, Duration::from_millis(500))
        .await;
    assert!(
        matches!(early, Err(MirrorError::Timeout { reached, .. }) if reached == before),
        "a bookmark at {rev} would claim the range unchanged: {early:?}"
    );
    assert!(mirror.status().untrusted_progress >= 1);

    src.set_events_held(false);
    let snap = mirror.snapshot_at_least(rev, WAIT).await.unwrap();
    assert_eq!(snap_kvs(&snap), truth(&src, P, snap.revision()).await);
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, rev, WAIT).await;
    assert_eq!(replay.batches, [(rev, false)]);
    assert!(replay.bookmarks.iter().all(|&b| b < rev), "{replay:?}");
    assert!(mirror.status().relists.is_empty());
}

#[tokio::test]
async fn an_early_progress_reply_is_no_bookmark_over_a_new_key() {
    early_progress_is_no_bookmark(|src| src.put(b"p/c", b"2")).await;
}

#[tokio::test]
async fn an_early_progress_reply_is_no_bookmark_over_a_changed_key() {
    early_progress_is_no_bookmark(|src| src.put(b"p/a", b"2")).await;
}

#[tokio::test]
async fn an_early_progress_reply_is_no_bookmark_over_a_deleted_key() {
    early_progress_is_no_bookmark(|src| src.delete(b"p/a")).await;
}

#[tokio::test]
async fn a_key_created_and_deleted_behind_an_early_reply_costs_a_relist_not_a_wrong_state() {
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let (mirror, _sub) = confirmed_mirror(&src).await;
    src.set_events_held(true);
    src.put(b"p/x", b"short-lived");
    let gone = src.delete(b"p/x");
    // The range at `gone` is as it was: a read cannot tell, so this is a bookmark,
    // and the state it claims is right.
    let snap = mirror.snapshot_at_least(gone, WAIT).await.unwrap();
    assert_eq!(snap.revision(), gone);
    assert_eq!(snap_kvs(&snap), truth(&src, P, gone).await);
    // The key's events then come below the bookmark: rejected, and relisted.
    src.set_events_held(false);
    let relists = eventually("a relist", || {
        Some(mirror.status().relists).filter(|r| !r.is_empty())
    })
    .await;
    assert_eq!(relists[&ResyncReason::Validation], 1, "{relists:?}");
    assert_converged(&mirror, &src).await;
}

#[tokio::test]
async fn fragmented_replies_are_applied_whole() {
    let src = MemorySource::new();
    src.set_fragment(Some(2));
    let mirror = start(&src, fast_config()).await;
    mirror.wait_ready().await.unwrap();
    let mut sub = mirror.subscribe();
    let ops = (0..7)
        .map(|i| MemoryOp::Put(format!("p/{i}").into_bytes(), b"v".to_vec(), 0))
        .collect();
    let rev = src.txn(ops);
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, rev, WAIT).await;
    assert_eq!(replay.batches, vec![(rev, false)]);
    assert_eq!(replay.state.len(), 7);
}

#[tokio::test]
async fn persisted_snapshot_is_resumed_and_served_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.snap");
    let config = fast_config()
        .with_snapshot_file(file.clone())
        .with_snapshot_interval(Duration::from_millis(10));
    let src = MemorySource::new();
    for i in 0..5 {
        src.put(format!("p/{i}").as_bytes(), b"v");
    }
    let saved_rev = {
        let mirror = start(&src, config.clone()).await;
        mirror.wait_ready().await.unwrap();
        let rev = src.put(b"p/last", b"x");
        mirror.snapshot_at_least(rev, WAIT).await.unwrap();
        // Written at a bounded rate: wait for the file to catch up.
        tokio::time::timeout(WAIT, async {
            loop {
                let m = start(
                    &MemorySource::new(),
                    config
                        .clone()
                        .with_snapshot_interval(Duration::from_secs(3600)),
                )
                .await;
                if m.snapshot().revision() == rev {
                    break;
                }
                drop(m);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap();
        rev
    };
    let later = src.put(b"p/after", b"y");

    // etcd unreachable: the loaded snapshot is served, Stale.
    src.set_unreachable(true);
    let mirror = start(&src, config.clone()).await;
    assert_eq!(mirror.snapshot().revision(), saved_rev);
    assert_eq!(mirror.snapshot().len(), 6);
    assert!(mirror.wait_ready().await.is_err());
    let st = mirror.status();
    assert_eq!(st.state, State::Stale);
    assert_eq!(st.loaded_snapshot.map(|f| f.revision), Some(saved_rev));

    // Reachable again: resumes from the file's revision, no relist.
    let mut sub = mirror.subscribe();
    src.set_unreachable(false);
    let mut replay = Replay::default();
    replay.follow_until(&mut sub, later, WAIT).await;
    assert_eq!(replay.batches, vec![(later, false)]);
    assert!(mirror.status().relists.is_empty());
    assert_converged(&mirror, &src).await;

    // Subscribed before the task runs: each subscription starts at exactly the
    // file's state, whatever the mirror does next.
    mirror.shutdown().await.unwrap();
    let next = src.put(b"p/next", b"z");
    let (mirror, subs) = Mirror::builder(P)
        .config(config)
        .start_subscribed(src.clone(), 2)
        .await
        .unwrap();
    assert_eq!(
        mirror.status().loaded_snapshot.map(|f| f.revision),
        Some(later)
    );
    assert_eq!(subs.len(), 2);
    for mut sub in subs {
        let first = sub.recv().await.unwrap();
        assert!(
            matches!(&first, Update::Snapshot(s) if s.revision() == later),
            "{first:?}"
        );
        let mut replay = Replay::default();
        replay.apply(&first);
        replay.follow_until(&mut sub, next, WAIT).await;
        assert_eq!(replay.batches, vec![(next, false)]);
    }
}

#[tokio::test]
async fn corrupt_snapshot_file_is_reported_and_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mirror.snap");
    std::fs::write(&file, b"RWSNAP01 definitely not a snapshot").unwrap();
    let src = MemorySource::new();
    src.put(b"p/a", b"1");
    let mirror = start(&src, fast_config().with_snapshot_file(file)).await;
    let err = mirror.status().last_error.expect("reported");
    assert!(err.message.contains("corrupt"), "{}", err.message);
    mirror.wait_ready().await.unwrap();
    assert_converged(&mirror, &src).await;
}

/// Queues `n` writes in the prefix (puts, deletes and multi-key txns, each one
/// revision) while the stream is frozen, then lets them through at once.
fn backlog(src: &MemorySource, n: usize) {
    src.set_frozen(true);
    let mut written = 0;
    let mut i = 0usize;
    while written < n {
        let key = format!("p/{:02}", i % 30).into_bytes();
        let before = src.revision();
        match i % 7 {
            0 => {
                src.delete(&key);
            }
            1 => {
                src.txn(vec![
                    MemoryOp::Put(key, format!("t{i}").into_bytes(), 0),
                    MemoryOp::Delete(format!("p/{:02}", (i + 1) % 30).into_bytes()),
                    MemoryOp::Put(
                        format!("p/{:02}", (i + 2) % 30).into_bytes(),
                        b"t".to_vec(),
                        0,
                    ),
                ]);
            }
            _ => {
                src.put(&key, format!("v{i}").as_bytes());
            }
        }
        written += usize::from(src.revision() > before);
        i += 1;
    }
    // Outside the prefix: no event, but a revision.
    src.put(b"q/outside", b"x");
    src.set_frozen(false);
}

/// For a backlog: no progress request or stall while it drains.
fn backlog_config() -> MirrorConfig {
    fast_config()
        .with_progress_interval(Duration::from_secs(10))
        .with_stall_timeout(Duration::from_secs(30))
}

/// A ready mirror for a backlog whose subscribers read only at the end: a
/// buffer none of them overflows.
async fn backlog_mirror(src: &MemorySource) -> Mirror {
    let mirror = start(src, backlog_config().with_subscriber_buffer(10_000)).await;
    mirror.wait_ready().await.unwrap();
    mirror
}

/// Scrapes one sample of a registry.
fn sample(registry: &prometheus_client::registry::Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
}

/// Replies already received while no subscription is live are applied as runs:
/// readers see exact states (never part of a revision), and every revision still
/// counts in metrics and status.
#[tokio::test]
async fn backlog_without_subscribers_is_published_exactly() {
    let src = MemorySource::new();
    for i in 0..30 {
        src.put(format!("p/{i:02}").as_bytes(), b"v");
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let mirror = Mirror::builder(P)
        .config(backlog_config())
        .register_metrics(&mut registry)
        .start(src.clone())
        .await
        .unwrap();
    mirror.wait_ready().await.unwrap();
    let listed = mirror.snapshot().revision();
    let mut revisions = 0;
    for round in 0..3 {
        backlog(&src, 500);
        let last = src.revision() - 1;
        // Readers only ever see whole revisions, whichever they land on.
        let mut seen = 0;
        while seen < last {
            let snap = mirror.snapshot();
            if snap.revision() != seen {
                seen = snap.revision();
                assert_eq!(snap_kvs(&snap), truth(&src, P, seen).await, "round {round}");
            }
            tokio::task::yield_now().await;
        }
        revisions += 500;
        let status = mirror.status();
        assert_eq!(status.revision, last);
        assert_eq!(status.keys, mirror.snapshot().len());
        assert!(status.server_revision >= last);
        assert_eq!(
            sample(&registry, "revwatch_mirror_revisions_applied_total"),
            revisions as f64
        );
        assert_eq!(
            sample(&registry, "revwatch_mirror_apply_seconds_count"),
            revisions as f64
        );
        assert_eq!(sample(&registry, "revwatch_mirror_revision"), last as f64);
    }
    assert!(listed < mirror.snapshot().revision());
    // A subscription made now gets every later revision as its own batch.
    let mut sub = mirror.subscribe();
    let mut replay = Replay::keeping_snapshots();
    let from = src.revision();
    backlog(&src, 200);
    replay
        .follow_until(&mut sub, src.revision() - 1, WAIT)
        .await;
    let batches: Vec<i64> = replay.batches.iter().map(|(r, _)| *r).collect();
    assert_eq!(batches, ((from + 1)..src.revision()).collect::<Vec<_>>());
    for (rev, state) in &replay.snapshots[1..] {
        assert_eq!(state, &truth(&src, P, *rev).await, "at {rev}");
    }
    assert_converged(&mirror, &src).await;
}

/// Subscriptions made (on other threads) while a backlog is applied in runs each
/// start from a whole state and then get every later revision, one batch each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_made_while_a_backlog_drains_miss_nothing() {
    let src = MemorySource::new();
    let mirror = backlog_mirror(&src).await;
    // Only the first subscription of a round can meet a run (the others turn
    // runs off): several rounds, each subscribing a bit later.
    for round in 0..10u64 {
        backlog(&src, 2_000);
        let last = src.revision() - 1;
        tokio::time::sleep(Duration::from_micros(100 * round)).await;
        let mut subs = vec![mirror.subscribe()];
        while mirror.snapshot().revision() < last && subs.len() < 20 {
            tokio::time::sleep(Duration::from_micros(200)).await;
            subs.push(mirror.subscribe());
        }
        for mut sub in subs {
            let mut replay = Replay::default();
            let first = sub.try_recv().expect("the snapshot comes at once");
            assert!(matches!(first, Update::Snapshot(_)));
            replay.apply(&first);
            assert_eq!(replay.state, truth(&src, P, replay.revision).await);
            let from = replay.revision;
            replay.follow_until(&mut sub, last, WAIT).await;
            let expected: Vec<(i64, bool)> = ((from + 1)..=last).map(|r| (r, false)).collect();
            assert_eq!(replay.batches, expected, "round {round}, from {from}");
            assert_eq!(replay.state, truth(&src, P, last).await);
        }
    }
    assert_converged(&mirror, &src).await;
}

/// With a subscriber live that reads only changes (so each run's state is left
/// unbuilt for the first reader), readers on other threads build those states
/// concurrently: each snapshot they get is a whole revision, exactly, over more
/// revisions than the mirror leaves unbuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_build_unbuilt_states_exactly_while_a_subscriber_reads_only_changes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    let src = MemorySource::new();
    let mirror = backlog_mirror(&src).await;
    let mut sub = mirror.subscribe();
    assert!(matches!(sub.try_recv(), Some(Update::Snapshot(_))));
    // The subscriber reads every batch's changes, never a snapshot.
    let subscriber = tokio::spawn(async move {
        let mut revisions = Vec::new();
        while let Ok(Some(update)) = tokio::time::timeout(WAIT, sub.recv()).await {
            if let Update::Batch(batch) = update {
                assert!(batch.resync.is_none());
                revisions.push(batch.revision);
            }
        }
        revisions
    });
    let last = Arc::new(AtomicI64::new(i64::MAX));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (mirror, last) = (mirror.clone(), Arc::clone(&last));
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + WAIT;
                let mut seen = Vec::new();
                while std::time::Instant::now() < deadline {
                    let snap = mirror.snapshot();
                    let revision = snap.revision();
                    if seen.last().is_none_or(|(r, _)| *r != revision) {
                        seen.push((revision, snap_kvs(&snap)));
                    }
                    if revision >= last.load(Ordering::SeqCst) {
                        break;
                    }
                }
                seen
            })
        })
        .collect();
    // Runs of 50 revisions, arriving while the readers read.
    let first = src.revision() + 1;
    for _ in 0..60 {
        backlog(&src, 50);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let end = src.revision() - 1;
    last.store(end, Ordering::SeqCst);
    let mut seen_revisions = 0;
    for reader in readers {
        let seen = reader.join().expect("a reader panicked");
        assert_eq!(seen.last().map(|(r, _)| *r), Some(end));
        seen_revisions += seen.len();
        for (revision, kvs) in seen {
            assert_eq!(kvs, truth(&src, P, revision).await, "at {revision}");
        }
    }
    // Readers landed on many states, not only on the last.
    assert!(seen_revisions > 20, "readers saw {seen_revisions} states");
    // Built once, then loaded: the same state for every reader.
    assert!(Arc::ptr_eq(&mirror.snapshot(), &mirror.snapshot()));
    mirror.shutdown().await.unwrap();
    let revisions = subscriber.await.unwrap();
    // Every revision but the final one outside the prefix, each as its own batch.
    let expected: Vec<i64> = (first..=end).filter(|r| (r - first) % 51 != 50).collect();
    assert_eq!(revisions, expected);
    assert!(end - first > 1_024 * 2);
}
