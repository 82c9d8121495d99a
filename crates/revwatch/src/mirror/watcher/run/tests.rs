use std::collections::VecDeque;

use bytes::Bytes;
use etcd_proto::etcdserverpb::ResponseHeader;

use super::*;
use crate::mirror::config::ProgressTrust;
use crate::mirror::decode::{DecodePolicy, RawBytes};
use crate::mirror::metrics::Metrics;
use crate::mirror::report::Reporter;
use crate::mirror::snapshot::Snapshot;
use crate::mirror::status::{State, Status};
use crate::mirror::store::Writer;
use crate::mirror::test_events::put_created;

fn publisher() -> Publisher<Bytes> {
    let writer = Writer::new(
        &Snapshot::empty(1),
        Arc::new(RawBytes),
        DecodePolicy::DropKey,
    );
    let reporter = Reporter::new(Status::new(State::Syncing), Metrics::new());
    let hub = Arc::new(Hub::new(writer.current(), 16, reporter.metrics().clone()));
    Publisher {
        writer,
        hub,
        reporter,
        persister: None,
        max_reported_decode_failures: 10,
        unbuilt: 0,
    }
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..ResponseHeader::default()
    })
}

fn created(revision: i64) -> Reply {
    Ok(Some(WatchResponse {
        header: header(revision),
        created: true,
        ..WatchResponse::default()
    }))
}

/// One put of `key` at `revision`, in a reply with that header revision.
fn put(key: &str, revision: i64) -> Reply {
    Ok(Some(WatchResponse {
        header: header(revision),
        events: vec![put_created(key, b"v", revision)],
        ..WatchResponse::default()
    }))
}

fn progress(revision: i64) -> Reply {
    Ok(Some(WatchResponse {
        header: header(revision),
        watch_id: -1,
        ..WatchResponse::default()
    }))
}

/// A stream check past its created reply (the watch started after revision 1).
fn created_check(out: &mut Publisher<Bytes>, trust: ProgressTrust) -> StreamCheck {
    let mut check = StreamCheck::new(1, trust, Duration::from_secs(1));
    let next = drain_all(out, &mut check, vec![created(1)]);
    assert!(
        matches!(next, Next::Out(Output { created: true, .. })),
        "{next:?}"
    );
    check
}

/// Drains `replies` as a run: the first arrived, the others are ready.
fn drain_all(out: &mut Publisher<Bytes>, check: &mut StreamCheck, replies: Vec<Reply>) -> Next {
    let mut replies = VecDeque::from(replies);
    let first = replies.pop_front().expect("a first reply");
    drain(
        out,
        check,
        &mut Vec::new(),
        first,
        || replies.pop_front(),
        Instant::now(),
    )
}

fn keys(out: &Publisher<Bytes>) -> Vec<Vec<u8>> {
    out.hub.snapshot().iter().map(|(k, _)| k.to_vec()).collect()
}

#[test]
fn a_quiet_run_applies_every_ready_reply_and_publishes_the_last_state() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let mut revision = out.hub.revision_watch();
    revision.mark_unchanged();
    let next = drain_all(
        &mut out,
        &mut check,
        vec![put("a", 2), put("b", 3), put("c", 4)],
    );
    assert!(matches!(next, Next::Nothing), "{next:?}");
    assert_eq!(*revision.borrow_and_update(), 4);
    assert_eq!(keys(&out), [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    let status = out.reporter.status();
    assert_eq!(
        (status.revision, status.keys, status.server_revision),
        (4, 3, 4)
    );
    let metrics = out.reporter.metrics();
    assert_eq!(metrics.revisions_applied.get(), 3, "every revision counts");
    assert_eq!(metrics.events_applied.get(), 3);
}

#[test]
fn with_a_live_subscription_every_revision_gets_its_batch_and_the_last_state_is_published() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let mut sub = out.hub.subscribe();
    assert!(matches!(sub.try_recv(), Some(Update::Snapshot(_))));
    let mut revision = out.hub.revision_watch();
    revision.mark_unchanged();
    // A capacity of 16: runs of at most 4 revisions.
    drain_all(
        &mut out,
        &mut check,
        vec![put("a", 2), put("b", 3), put("c", 4)],
    );
    assert_eq!(*revision.borrow_and_update(), 4);
    assert_eq!(out.reporter.status().revision, 4);
    let (mut batches, mut last) = (Vec::new(), None);
    while let Some(update) = sub.try_recv() {
        match update {
            Update::Batch(b) => {
                last = Some(Arc::clone(&b));
                let keys: Vec<Vec<u8>> = b.snapshot().iter().map(|(k, _)| k.to_vec()).collect();
                batches.push((b.revision, b.changes.len(), keys.len()));
            }
            other => panic!("expected a batch, got {other:?}"),
        }
    }
    assert_eq!(batches, [(2, 1, 1), (3, 1, 2), (4, 1, 3)]);
    assert!(
        Arc::ptr_eq(&last.expect("a batch").snapshot(), &out.hub.snapshot()),
        "the run's last batch has the published snapshot"
    );
    let metrics = out.reporter.metrics();
    assert_eq!(metrics.revisions_applied.get(), 3);
}

#[test]
fn with_a_live_subscription_runs_publish_unbuilt_states_and_the_writer_builds_one_in_a_bound() {
    use crate::mirror::batch::State;
    use crate::mirror::watcher::run::MAX_UNBUILT_REVISIONS;

    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let mut sub = out.hub.subscribe();
    // Runs of 4 revisions (a quarter of 16), each putting one of 100 keys; the
    // subscriber reads only changes, and nobody reads a snapshot.
    let runs = MAX_UNBUILT_REVISIONS as i64 / 4 + 3;
    let mut built_at = Vec::new();
    for run in 0..runs {
        let from = 2 + 4 * run;
        let replies = (from..from + 4)
            .map(|r| put(&format!("k{:02}", r % 100), r))
            .collect();
        drain_all(&mut out, &mut check, replies);
        while sub.try_recv().is_some() {}
        let state = out.hub.state();
        assert_eq!(state.revision(), from + 3);
        assert_eq!(out.reporter.status().revision, from + 3);
        if matches!(state, State::At(_)) {
            built_at.push(from + 3);
        }
        assert!(out.unbuilt <= MAX_UNBUILT_REVISIONS);
    }
    // Built by the writer once, at the run that would have passed the bound.
    let bound = 1 + MAX_UNBUILT_REVISIONS as i64 + 4;
    assert_eq!(built_at, [bound]);

    // A reader builds the unbuilt state, exactly, and it becomes current.
    let last = 1 + 4 * runs;
    let snapshot = out.hub.snapshot();
    assert_eq!((snapshot.revision(), snapshot.len()), (last, 100));
    for (key, entry) in snapshot.iter() {
        let n: i64 = std::str::from_utf8(&key[1..]).unwrap().parse().unwrap();
        // The key's last put: the highest revision up to `last` that is n mod 100.
        assert_eq!(entry.mod_revision, last - (last - n).rem_euclid(100));
    }
    assert!(matches!(out.hub.state(), State::At(s) if Arc::ptr_eq(&s, &snapshot)));
    assert_eq!(out.reporter.status().keys, 100);
}

#[test]
fn with_a_live_subscription_a_run_holds_a_quarter_of_the_buffer() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let _sub = out.hub.subscribe();
    let replies = (2..=7).map(|r| put(&format!("k{r}"), r)).collect();
    let next = drain_all(&mut out, &mut check, replies);
    assert!(matches!(next, Next::Nothing), "{next:?}");
    // 16 / 4 = 4 revisions, then the run ends and is published.
    assert_eq!(out.hub.snapshot().revision(), 5);
}

#[test]
fn a_bad_reply_stops_the_run_after_what_came_before_is_published() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    // Revision 2 again: repeated.
    let next = drain_all(
        &mut out,
        &mut check,
        vec![put("a", 2), put("b", 2), put("c", 3)],
    );
    assert!(
        matches!(
            next,
            Next::Stop(Stop::End(StreamEnd::Invalid { relist: true, .. }))
        ),
        "{next:?}"
    );
    assert_eq!(out.hub.snapshot().revision(), 2);
    assert_eq!(keys(&out), [b"a".to_vec()]);
    assert_eq!(out.reporter.status().revision, 2);
}

#[test]
fn a_run_stops_at_a_reply_with_more_than_events() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let mut replies = VecDeque::from(vec![progress(5), put("b", 6)]);
    let next = drain(
        &mut out,
        &mut check,
        &mut Vec::new(),
        put("a", 2),
        || replies.pop_front(),
        Instant::now(),
    );
    assert!(
        matches!(
            next,
            Next::Out(Output {
                bookmark: Some(5),
                ..
            })
        ),
        "{next:?}"
    );
    assert_eq!(
        replies.len(),
        1,
        "the reply after the bookmark is left for later"
    );
    assert_eq!(
        out.hub.snapshot().revision(),
        2,
        "the bookmark is the caller's"
    );
}

#[test]
fn what_replies_told_is_recorded_with_the_run() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Confirmed);
    check.progress_requested();
    // An unconfirmed progress reply at 9: not a bookmark, counted.
    let next = drain_all(&mut out, &mut check, vec![put("a", 2), progress(9)]);
    assert!(
        matches!(
            next,
            Next::Out(Output {
                untrusted_progress: true,
                bookmark: None,
                ..
            })
        ),
        "{next:?}"
    );
    let status = out.reporter.status();
    assert_eq!((status.revision, status.server_revision), (2, 9));
    assert_eq!(status.untrusted_progress, 1);
    assert_eq!(status.lag(), 7);
}

#[test]
fn a_closed_or_failed_stream_stops_the_run() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    let next = drain_all(&mut out, &mut check, vec![put("a", 2), Ok(None)]);
    assert!(matches!(next, Next::Stop(Stop::Closed)), "{next:?}");
    assert_eq!(out.hub.snapshot().revision(), 2);
    let failed = Err(Error::WatchClosed {
        endpoint: "e:1".into(),
    });
    let next = drain_all(&mut out, &mut check, vec![failed]);
    assert!(matches!(next, Next::Stop(Stop::Failed(_))), "{next:?}");
}

#[test]
fn a_run_is_bounded_by_its_events_and_its_time() {
    let out = publisher();
    let mut run = Run::new(&out.hub, Instant::now());
    run.events = RUN_TIME_CHECK - 1;
    assert!(!run.is_full());
    run.events = MAX_RUN_EVENTS;
    assert!(run.is_full());
    drop(run);
    let long_ago = Instant::now() - MAX_RUN_TIME * 2;
    let mut run = Run::new(&out.hub, long_ago);
    run.events = RUN_TIME_CHECK - 1;
    assert!(
        !run.is_full(),
        "time is checked every {RUN_TIME_CHECK} events"
    );
    run.events = RUN_TIME_CHECK;
    assert!(run.is_full());
}

/// Holds the status (a read lock on it) while `publish` runs on another thread:
/// until the status is released, waiters must not have been woken.
fn assert_status_comes_before_waiters(
    out: &mut Publisher<Bytes>,
    to: i64,
    publish: impl FnOnce(&mut Publisher<Bytes>) + Send,
) {
    let status = out.reporter.subscribe();
    let revision = out.hub.revision_watch();
    let before = *revision.borrow();
    std::thread::scope(|s| {
        let held = status.borrow();
        let publishing = s.spawn(move || publish(out));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            *revision.borrow(),
            before,
            "waiters were woken before the status was published"
        );
        drop(held);
        publishing.join().expect("the publication");
    });
    assert_eq!(*revision.borrow(), to);
    assert_eq!(status.borrow().revision, to);
}

#[test]
fn status_is_published_before_waiters_are_woken() {
    let mut out = publisher();
    let mut check = created_check(&mut out, ProgressTrust::Immediate);
    // A quiet run.
    assert_status_comes_before_waiters(&mut out, 3, |out| {
        drain_all(out, &mut check, vec![put("a", 2), put("b", 3)]);
    });
    // A publication on its own (a bookmark, a list, a revision with a live
    // subscription).
    assert_status_comes_before_waiters(&mut out, 5, |out| out.bookmark(5));
}

#[test]
fn how_a_stopped_run_ends_the_watch() {
    let relist = |stop| ending(stop, "e:1", true, 3);
    let (end, rejected) = relist(Stop::Invalid(Invalid("bad".into())));
    assert!(matches!(end, WatchEnd::Relist(ResyncReason::Validation)));
    assert_eq!(rejected, Some(Rejected::Event));
    let (end, rejected) = relist(Stop::End(StreamEnd::Compacted(7)));
    assert!(matches!(end, WatchEnd::Relist(ResyncReason::Compacted)));
    assert_eq!(rejected, None);
    let (end, rejected) = relist(Stop::End(StreamEnd::Invalid {
        reason: "out of order".into(),
        relist: true,
    }));
    assert!(matches!(end, WatchEnd::Relist(ResyncReason::Validation)));
    assert_eq!(rejected, Some(Rejected::Event));

    let (end, rejected) = ending(
        Stop::End(StreamEnd::Invalid {
            reason: "behind".into(),
            relist: false,
        }),
        "e:1",
        false,
        3,
    );
    assert!(matches!(
        end,
        WatchEnd::Reconnect { cause: ReconnectCause::Validation, ref message, created: false, .. }
            if message == "e:1: behind"
    ));
    assert_eq!(rejected, Some(Rejected::Header));
    let (end, rejected) = ending(Stop::Closed, "e:1", true, 3);
    assert!(matches!(
        end,
        WatchEnd::Reconnect {
            cause: ReconnectCause::StreamClosed,
            error: None,
            created: true,
            ..
        }
    ));
    assert_eq!(rejected, None);
    let (end, _) = ending(
        Stop::End(StreamEnd::Canceled("gone".into())),
        "e:1",
        true,
        3,
    );
    assert!(matches!(
        end,
        WatchEnd::Reconnect { cause: ReconnectCause::Canceled, ref message, .. } if message == "e:1: gone"
    ));
    let failed = Stop::Failed(Error::WatchClosed {
        endpoint: "e:1".into(),
    });
    let (end, _) = ending(failed, "e:1", true, 3);
    assert!(matches!(
        end,
        WatchEnd::Reconnect {
            cause: ReconnectCause::StreamError,
            error: Some(_),
            ..
        }
    ));
}
