//! The mirror against the embedded server (`revwatch-server`): the scenarios it
//! shares with real etcd (`mirror_support::scenarios`), plus the faults only the
//! embedded server can produce on cue (a stalled stream, late progress replies,
//! dropped streams). Each test ends by comparing the mirror's snapshot with the
//! server's own range at the same revision.

mod mirror_support;

use std::time::{Duration, Instant};

use mirror_support::embedded::{Embedded, run_on_embedded};
use mirror_support::scenarios::scenario_tests;
use mirror_support::setup::{
    P, Target, WAIT, assert_converged, followed_mirror, mirror_config, put,
};
use revwatch::mirror::{ReconnectCause, State};

scenario_tests! {
    target: Embedded::start().await;
    initial_list_across_pages_while_writes_continue(90);
    txns_and_lease_expiry_arrive_atomically(90);
    restart_on_same_data_resumes_without_relist(120) = kill_and_restart_resumes_without_relist;
    compaction_while_disconnected_relists_with_exact_diff(120);
    restart_from_persisted_snapshot_and_start_with_server_down(150) =
        restart_from_persisted_snapshot_and_start_with_etcd_down;
    bad_value_is_isolated(90);
    slow_subscriber_is_resynced(90);
}

/// The mirror's stream stops answering (events and progress replies held back)
/// while the connection stays up: detected within the stall bound, and the watch
/// resumes on a new stream at the next revision, losing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watch_stream_is_detected_within_the_bound_and_resumed() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        let r0 = put(&etcd, &format!("{P}a"), "1").await;
        let config = mirror_config();
        let bound = config.stall_timeout;
        let (mirror, mut sub, mut replay) = followed_mirror(server.endpoints(), config).await;
        replay.follow_until(&mut sub, r0, WAIT).await;
        let stalled = server.mirror_stream(None).await;
        // Longer than the whole wait below: only a new stream can deliver.
        server
            .faults()
            .stall_watch_stream(stalled, Duration::from_secs(40));
        let stalled_at = Instant::now();
        let mut last = 0;
        for i in 0..10 {
            last = put(&etcd, &format!("{P}during/{i}"), "v").await;
        }
        loop {
            let st = mirror.status();
            if st.reconnects.contains_key(&ReconnectCause::Stall) {
                break;
            }
            assert!(
                stalled_at.elapsed() < bound + Duration::from_secs(2),
                "stall not detected within {bound:?}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replay.follow_until(&mut sub, last, WAIT).await;
        // The stalled stream is still held open on the server; the mirror left it.
        server.mirror_stream(Some(stalled)).await;
        assert_eq!(replay.resyncs, 0);
        let st = mirror.status();
        assert!(st.relists.is_empty(), "{st:?}");
        assert_eq!(st.state, State::Ready);
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// Progress replies arrive late (after later events): they never move the mirror
/// back, a delay within the stall bound is not a stall, and bookmarks still carry
/// the mirror past writes outside its prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_progress_replies_never_move_the_mirror_back() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        let (mirror, mut sub, mut replay) =
            followed_mirror(server.endpoints(), mirror_config()).await;
        // A third of the stall bound: replies come late, but well within it.
        server.faults().delay_progress(Some(Duration::from_secs(1)));
        for round in 0..5 {
            let mut last = 0;
            for i in 0..5 {
                last = put(&etcd, &format!("{P}{i}"), &format!("r{round}")).await;
            }
            put(&etcd, "other/x", "outside").await;
            replay.follow_until(&mut sub, last, WAIT).await;
            // Idle long enough for progress requests whose replies land after the
            // next round's events.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        // Only a bookmark can bring the mirror to a revision outside its prefix.
        let outside = put(&etcd, "other/final", "x").await;
        mirror.snapshot_at_least(outside, WAIT).await.unwrap();
        replay.follow_until(&mut sub, outside, WAIT).await;
        assert_eq!(replay.bookmarks.last(), Some(&outside));
        assert_eq!(replay.resyncs, 0);
        let st = mirror.status();
        assert!(st.reconnects.is_empty(), "{st:?}");
        assert!(st.relists.is_empty(), "{st:?}");
        assert_eq!(st.rejected_responses, 0, "{st:?}");
        server.faults().delay_progress(None);
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// Every watch stream is dropped again and again while writes go on and new
/// connections are refused: each time the watch resumes at the next revision on
/// the open connection, with no relist and nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_streams_resume_without_relist() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        let (mirror, mut sub, mut replay) =
            followed_mirror(server.endpoints(), mirror_config()).await;
        // The writer's connection is open before new ones are refused.
        put(&etcd, "other/x", "outside").await;
        server.faults().refuse_connections(true);
        let mut stream = server.mirror_stream(None).await;
        let mut last = 0;
        for round in 0..5 {
            server.faults().drop_watch_streams();
            for i in 0..10 {
                last = put(&etcd, &format!("{P}{}", (round * 10 + i) % 13), "v").await;
            }
            stream = server.mirror_stream(Some(stream)).await;
            replay.follow_until(&mut sub, last, WAIT).await;
        }
        server.faults().refuse_connections(false);
        assert_eq!(replay.resyncs, 0);
        let st = mirror.status();
        assert!(st.relists.is_empty(), "{st:?}");
        assert!(st.reconnects.values().sum::<u64>() >= 5, "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}
