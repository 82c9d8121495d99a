//! What [`Status`] reports, and how the mirror treats a lagging member and a
//! panicking decoder: against real etcd 3.4 where a user would look, and against
//! the embedded server (fault injection) for the faults only it produces on cue: a
//! stalled stream, a member serving old reads, a stream dropped at a chosen moment.
//! A list's progress is checked against both: their `count` must agree.

mod mirror_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mirror_support::embedded::{Embedded, run_on_embedded};
use mirror_support::etcd::run_on_etcd;
use mirror_support::eventually;
use mirror_support::metrics::scrape;
use mirror_support::setup::{
    P, Target, WAIT, assert_converged, assert_not_ready, followed_mirror, followed_mirror_with,
    mirror_config, put, put_bytes, put_op, source, start, start_with, txn,
};
use prometheus_client::registry::Registry;
use revwatch::client::{
    Client, Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse, WatchStream,
};
use revwatch::mirror::{
    ClientSource, FailureKind, ListProgress, Mirror, MirrorConfig, MirrorError, ReconnectCause,
    ResyncReason, Source, State, Status, WatchHandle,
};
use revwatch_testkit::proxy::{Fault, FaultProxy};
use tokio::sync::watch;

/// The status once it reports `revision`.
async fn status_at<T: Send + Sync + 'static>(mirror: &Mirror<T>, revision: i64) -> Status {
    eventually(&format!("status at revision {revision}"), || {
        let st = mirror.status();
        (st.revision == revision).then_some(st)
    })
    .await
}

/// The error of `consistent_snapshot(timeout)`, which must fail within a second
/// of its bound.
async fn consistent_snapshot_error(mirror: &Mirror, timeout: Duration) -> MirrorError {
    let started = Instant::now();
    let err = mirror.consistent_snapshot(timeout).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    err
}

/// Records every revision the mirror's snapshot shows, until stopped; the
/// recording must never go down.
struct RevisionRecorder {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<i64>>,
}

impl RevisionRecorder {
    fn start<T: Send + Sync + 'static>(mirror: &Mirror<T>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (mirror, flag) = (mirror.clone(), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            let mut seen = vec![mirror.snapshot().revision()];
            while !flag.load(Ordering::Relaxed) {
                let r = mirror.snapshot().revision();
                if Some(&r) != seen.last() {
                    seen.push(r);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let r = mirror.snapshot().revision();
            if Some(&r) != seen.last() {
                seen.push(r);
            }
            seen
        });
        RevisionRecorder { stop, task }
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.task.await.unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "published revisions went back: {seen:?}"
        );
        seen
    }
}

/// The value of one `revwatch_mirror_*` sample, 0 when absent.
fn metric(registry: &Registry, sample: &str) -> i64 {
    scrape(registry).int_or_zero(sample)
}

fn embedded_config() -> MirrorConfig {
    mirror_config()
        // Generous, so that nothing here is taken for a stall.
        .with_stall_timeout(Duration::from_secs(10))
}

// ---------------------------------------------------------------------------
// Against real etcd.

/// A user's view: Syncing (with the cause) until etcd is reached; then Ready,
/// revisions and event time following each write; a write outside the prefix is
/// seen as lag until a reader waits and a read verifies a progress reply, which
/// turns it into a bookmark that also counts as activity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_revisions_lag_and_event_time_against_etcd() {
    run_on_etcd(Duration::from_secs(120), async |cluster, etcd| {
        put(&etcd, &format!("{P}a"), "1").await;
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        proxy.set(Fault::Blackhole);
        let mirror = start(
            vec![proxy.endpoint()],
            mirror_config()
                .with_progress_interval(Duration::from_secs(1))
                .with_stall_timeout(Duration::from_secs(4))
                // Replies are verified only when a reader waits.
                .with_progress_verify_interval(Duration::from_secs(3600)),
        )
        .await;
        // etcd unreachable: Syncing, nothing served, and wait_ready says why.
        assert_not_ready(&mirror, FailureKind::Unreachable).await;
        let st = mirror.status();
        assert_eq!(st.state, State::Syncing, "{st:?}");
        assert_eq!((st.revision, st.server_revision, st.lag()), (0, 0, 0));
        assert_eq!(st.last_event_at, None);
        assert!(st.failing.is_some() && st.last_error.is_some(), "{st:?}");
        assert_eq!(st.keys, 0);
        assert_eq!(mirror.snapshot().revision(), 0);

        let before_list = SystemTime::now();
        proxy.heal();
        ready(&mirror).await;
        let st = mirror.status();
        let r0 = cluster.current_revision().await.unwrap();
        assert_eq!((st.revision, st.server_revision, st.lag()), (r0, r0, 0));
        assert_eq!(st.keys, 1);
        assert!(st.failing.is_none() && st.last_error.is_none(), "{st:?}");
        assert_eq!(st.endpoint, Some(proxy.addr().to_string()));
        let t0 = st.last_event_at.expect("the initial list is an event");
        assert!(t0 >= before_list, "{st:?}");

        // Each write in the prefix moves revision, server revision and event time.
        let mut last_at = t0;
        for i in 0..3 {
            let before = SystemTime::now();
            let r = put(&etcd, &format!("{P}k{i}"), "v").await;
            mirror.snapshot_at_least(r, WAIT).await.unwrap();
            let st = status_at(&mirror, r).await;
            assert_eq!((st.revision, st.server_revision, st.lag()), (r, r, 0));
            let at = st.last_event_at.unwrap();
            assert!(at >= before && at > last_at, "{st:?}");
            last_at = at;
        }

        // Outside the prefix: known from a progress reply before it is trusted.
        let r = mirror.snapshot().revision();
        let h = put(&etcd, "other/x", "y").await;
        let st = eventually("the server revision", || {
            let st = mirror.status();
            (st.server_revision == h).then_some(st)
        })
        .await;
        assert_eq!((st.revision, st.lag()), (r, h - r), "{st:?}");
        assert_eq!(st.state, State::Ready);
        assert_eq!(st.last_event_at, Some(last_at), "nothing applied yet");
        assert!(st.untrusted_progress >= 1, "{st:?}");
        // A reader waits: verified, a bookmark, published, with its time.
        // (`Duration::MAX`: no deadline.)
        mirror.snapshot_at_least(h, Duration::MAX).await.unwrap();
        let st = status_at(&mirror, h).await;
        assert_eq!((st.revision, st.server_revision, st.lag()), (h, h, 0));
        assert!(st.last_event_at.unwrap() > last_at, "{st:?}");
        assert_eq!(st.rejected_responses, 0);
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// etcd cut off: `consistent_snapshot` cannot learn etcd's revision and fails
/// with a timeout within its bound, reporting where the mirror stands; reads go
/// on from the last snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_snapshot_times_out_when_etcd_is_cut_off() {
    run_on_etcd(Duration::from_secs(90), async |cluster, etcd| {
        let r = put(&etcd, &format!("{P}a"), "1").await;
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        let mirror = start(vec![proxy.endpoint()], mirror_config()).await;
        mirror.wait_ready().await.unwrap();
        mirror.snapshot_at_least(r, WAIT).await.unwrap();
        proxy.set(Fault::Blackhole);
        proxy.reset_all();
        let timeout = Duration::from_millis(800);
        let err = consistent_snapshot_error(&mirror, timeout).await;
        match &err {
            MirrorError::Timeout { reached, after, .. } => {
                assert_eq!((*reached, *after), (r, timeout), "{err}");
            }
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(
            err.to_string().starts_with("timed out after 800ms"),
            "{err}"
        );
        assert_eq!(mirror.snapshot().revision(), r);
        proxy.heal();
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

async fn ready<T: Send + Sync + 'static>(mirror: &Mirror<T>) {
    let deadline = Instant::now() + WAIT;
    // wait_ready reports each failed attempt; wait for the one that succeeds.
    while let Err(e) = mirror.wait_ready().await {
        assert!(Instant::now() < deadline, "never ready: {e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Against the embedded server.

/// Connections refused: Syncing with the cause and nothing served; then Ready with
/// the first list's revision, server revision and event time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncing_until_the_first_list_succeeds() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let mut r = 0;
        for i in 0..3 {
            r = put(&etcd, &format!("{P}{i}"), "v").await;
        }
        server.faults().refuse_connections(true);
        let mirror = start(server.endpoints(), embedded_config()).await;
        assert_not_ready(&mirror, FailureKind::Unreachable).await;
        let st = mirror.status();
        assert_eq!(st.state, State::Syncing, "{st:?}");
        assert_eq!((st.revision, st.server_revision, st.lag()), (0, 0, 0));
        assert_eq!(
            (st.last_event_at, st.keys, st.endpoint.clone()),
            (None, 0, None)
        );
        assert_eq!(
            st.failing.as_ref().map(|f| f.kind),
            Some(FailureKind::Unreachable)
        );
        assert!(mirror.snapshot().is_empty());

        server.faults().refuse_connections(false);
        ready(&mirror).await;
        let st = mirror.status();
        assert_eq!(st.state, State::Ready);
        assert_eq!((st.revision, st.server_revision, st.lag()), (r, r, 0));
        assert_eq!(st.keys, 3);
        assert!(st.last_event_at.is_some() && st.failing.is_none(), "{st:?}");
        assert!(st.endpoint.is_some());
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// Writes outside the prefix while the mirror's stream is down: the resumed watch
/// is created at the server's revision, which status reports (server_revision
/// ahead, lag) while the mirror is Reconnecting and catching up; a bookmark then
/// closes the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_reported_while_a_resumed_watch_catches_up() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let config = mirror_config()
            .with_progress_interval(Duration::from_secs(1))
            .with_stall_timeout(Duration::from_secs(5))
            .with_catch_up_grace(Duration::from_secs(3))
            .with_progress_verify_interval(Duration::from_secs(1));
        let (mirror, mut sub, mut replay) = followed_mirror(server.endpoints(), config).await;
        let r = put(&etcd, &format!("{P}a"), "1").await;
        replay.follow_until(&mut sub, r, WAIT).await;
        let t0 = status_at(&mirror, r).await.last_event_at.unwrap();
        let mut h = 0;
        for i in 0..3 {
            h = put(&etcd, &format!("other/{i}"), "x").await;
        }
        server.faults().drop_watch_streams();
        let st = eventually("the resumed watch", || {
            let st = mirror.status();
            (st.server_revision == h).then_some(st)
        })
        .await;
        assert_eq!(st.state, State::Reconnecting, "{st:?}");
        assert_eq!((st.revision, st.lag()), (r, 3), "{st:?}");
        assert_eq!(st.last_event_at, Some(t0));
        assert!(st.reconnects[&ReconnectCause::StreamError] >= 1, "{st:?}");
        // Caught up: the bookmark is published and the lag closed.
        replay.follow_until(&mut sub, h, WAIT).await;
        assert_eq!(replay.bookmarks.last(), Some(&h));
        let st = eventually("Ready at the bookmark", || {
            let st = mirror.status();
            (st.state == State::Ready && st.revision == h).then_some(st)
        })
        .await;
        assert_eq!((st.revision, st.server_revision, st.lag()), (h, h, 0));
        assert!(st.last_event_at.unwrap() > t0);
        assert!(st.relists.is_empty(), "{st:?}");
        assert_eq!(replay.resyncs, 0);
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// A mirror whose stream is held back: ready on a fresh embedded server with
/// `{P}a` written at revision `r`, then its stream stalled for 3 s while five more
/// puts take the server to revision `h`.
struct Stalled {
    mirror: Mirror,
    r: i64,
    h: i64,
}

async fn stalled_mirror(server: &Embedded, etcd: &Client) -> Stalled {
    let mirror = start(server.endpoints(), embedded_config()).await;
    mirror.wait_ready().await.unwrap();
    let r = put(etcd, &format!("{P}a"), "1").await;
    mirror.snapshot_at_least(r, WAIT).await.unwrap();
    status_at(&mirror, r).await;
    let stream = server.mirror_stream(None).await;
    server
        .faults()
        .stall_watch_stream(stream, Duration::from_secs(3));
    let mut h = 0;
    for i in 0..5 {
        h = put(etcd, &format!("{P}during/{i}"), "v").await;
    }
    Stalled { mirror, r, h }
}

/// The mirror's stream is stalled (held back, connection up) while writes go on:
/// `snapshot_at_least` and `consistent_snapshot` with a short timeout fail with a
/// clear timeout error naming the revision etcd is at and the one the mirror
/// reached, within their bound; once the stream flows again the mirror catches up
/// on the same stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_snapshot_times_out_while_the_stream_is_stalled() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let Stalled { mirror, r, h } = stalled_mirror(server, &etcd).await;

        let timeout = Duration::from_millis(500);
        let err = consistent_snapshot_error(&mirror, timeout).await;
        assert!(
            matches!(err, MirrorError::Timeout { wanted, reached, after }
                if wanted == Some(h) && reached == r && after == timeout),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("timed out after 500ms waiting for revision {h} (mirror at {r})")
        );
        let err = mirror
            .snapshot_at_least(h, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(err, MirrorError::Timeout { wanted, reached, .. } if wanted == Some(h) && reached == r),
            "{err:?}"
        );
        let st = mirror.status();
        assert_eq!(st.revision, r, "{st:?}");
        assert_eq!(st.state, State::Ready, "a stall under the bound: {st:?}");

        // The held-back replies arrive: caught up, without a reconnect.
        let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
        assert!(snap.revision() >= h);
        let st = status_at(&mirror, snap.revision()).await;
        assert!(st.reconnects.is_empty() && st.relists.is_empty(), "{st:?}");
        assert_eq!((st.server_revision, st.lag()), (h, 0), "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// The mirror learns etcd's revision from `consistent_snapshot` while its stream
/// is stalled: the status must show it as behind (server revision above its
/// revision, lag > 0), not as caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_stream_shows_lag_once_the_server_revision_is_known() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let Stalled { mirror, r, h } = stalled_mirror(server, &etcd).await;
        let err = mirror
            .consistent_snapshot(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, MirrorError::Timeout { .. }), "{err:?}");
        let st = mirror.status();
        assert_eq!((st.revision, st.server_revision), (r, h), "{st:?}");
        assert_eq!(st.lag(), h - r);
        let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
        assert_eq!(status_at(&mirror, snap.revision()).await.lag(), 0);
    })
    .await;
}

/// The server is gone (connections refused): `consistent_snapshot` cannot learn
/// etcd's revision and fails with a timeout within its bound, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_snapshot_times_out_when_the_server_is_gone() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let r = put(&etcd, &format!("{P}a"), "1").await;
        let mirror = start(server.endpoints(), embedded_config()).await;
        mirror.wait_ready().await.unwrap();
        server.stop().await;
        let timeout = Duration::from_secs(1);
        let err = consistent_snapshot_error(&mirror, timeout).await;
        assert!(
            matches!(err, MirrorError::Timeout { reached, after, .. } if reached == r && after == timeout),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("timed out after 1s"), "{err}");
        assert_eq!(mirror.snapshot().revision(), r);
        assert_ne!(mirror.status().state, State::Ready);
    })
    .await;
}

/// A member serving reads from behind the mirror's revision (lag_reads) answers
/// the resumed watch: its created reply is rejected and counted, the watch goes
/// elsewhere (here: tries again), and the published revision never goes back.
/// While it lags but is no longer behind, the mirror follows it only as far as it
/// serves; once it catches up, the mirror does too, without a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_watch_is_rejected_and_counted() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        let mut registry = Registry::default();
        let (mirror, mut sub, mut replay) =
            followed_mirror_with(source(server.endpoints()), embedded_config(), |b| {
                b.register_metrics(&mut registry)
            })
            .await;
        let mut r = 0;
        for i in 0..5 {
            r = put(&etcd, &format!("{P}{i}"), "v").await;
        }
        replay.follow_until(&mut sub, r, WAIT).await;
        let recorder = RevisionRecorder::start(&mirror);

        server.faults().lag_reads(2);
        server.faults().drop_watch_streams();
        let st = eventually("rejected created replies", || {
            let st = mirror.status();
            (st.reconnects.get(&ReconnectCause::Validation) >= Some(&2)).then_some(st)
        })
        .await;
        assert!(
            st.rejected_responses >= st.reconnects[&ReconnectCause::Validation],
            "{st:?}"
        );
        assert_eq!(st.revision, r);
        assert_ne!(st.state, State::Ready, "{st:?}");
        assert!(st.relists.is_empty(), "{st:?}");
        let last = st.last_error.as_ref().unwrap().message.clone();
        assert!(
            last.contains(&format!("behind the applied revision {r}")),
            "{last}"
        );
        assert!(metric(&registry, "rejected_responses_total{cause=\"header\"}") >= 2);
        assert!(
            metric(&registry, "reconnects_total{cause=\"validation\"}") >= 2,
            "counted by cause in metrics too"
        );
        assert!(sub.try_recv().is_none(), "nothing published meanwhile");

        // Writes go on: the member, still 2 behind, is no longer behind the
        // mirror, which follows it exactly as far as it serves.
        let mut w = 0;
        for i in 0..4 {
            w = put(&etcd, &format!("{P}late/{i}"), "v").await;
        }
        replay.follow_until(&mut sub, w - 2, WAIT).await;
        let err = mirror
            .snapshot_at_least(w, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(
            matches!(err, MirrorError::Timeout { reached, .. } if reached == w - 2),
            "{err:?}"
        );

        server.faults().lag_reads(0);
        replay.follow_until(&mut sub, w, WAIT).await;
        let seen = recorder.finish().await;
        assert!(
            seen.contains(&(w - 2)) && seen.last() == Some(&w),
            "{seen:?}"
        );
        assert_eq!(replay.resyncs, 0);
        let st = mirror.status();
        assert!(st.relists.is_empty(), "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// A source that can replay the last events response of the current stream,
/// as a misbehaving proxy might: the mirror must reject it (a repeated revision)
/// and relist.
#[derive(Clone)]
struct Replaying {
    inner: ClientSource,
    replay: Arc<watch::Sender<u64>>,
}

struct ReplayingWatch {
    inner: WatchStream,
    replay: watch::Receiver<u64>,
    last_events: Option<WatchResponse>,
}

impl Source for Replaying {
    type Watch = ReplayingWatch;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.inner.range(req).await
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<ReplayingWatch, Error> {
        let inner = self.inner.watch(req).await?;
        Ok(ReplayingWatch {
            inner,
            replay: self.replay.subscribe(),
            last_events: None,
        })
    }
}

impl WatchHandle for ReplayingWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        loop {
            tokio::select! {
                msg = self.inner.message() => {
                    if let Ok(Some(resp)) = &msg && !resp.events.is_empty() {
                        self.last_events = Some(resp.clone());
                    }
                    return msg;
                }
                Ok(()) = self.replay.changed() => {
                    if let Some(resp) = self.last_events.clone() {
                        return Ok(Some(resp));
                    }
                }
            }
        }
    }

    async fn request_progress(&mut self) -> Result<(), Error> {
        self.inner.request_progress().await
    }

    fn endpoint(&self) -> String {
        WatchHandle::endpoint(&self.inner)
    }

    async fn probe(&mut self, req: RangeRequest) -> Result<(), Error> {
        WatchHandle::probe(&mut self.inner, req).await
    }
}

/// A relist lands on a member serving reads from behind the published revision:
/// the list is rejected and counted, never applied, and tried again until the
/// member has caught up; the relist then publishes one resync batch at or above
/// the published revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_against_a_lagging_member_is_rejected_until_it_catches_up() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        for i in 0..5 {
            put(&etcd, &format!("{P}{i}"), "v").await;
        }
        let source = Replaying {
            inner: source(server.endpoints()),
            replay: Arc::new(watch::channel(0).0),
        };
        let mut registry = Registry::default();
        let (mirror, mut sub, mut replay) =
            followed_mirror_with(source.clone(), embedded_config(), |b| {
                b.register_metrics(&mut registry)
            })
            .await;
        let r = put(&etcd, &format!("{P}x"), "1").await;
        replay.follow_until(&mut sub, r, WAIT).await;
        let recorder = RevisionRecorder::start(&mirror);

        server.faults().lag_reads(2);
        source.replay.send_modify(|n| *n += 1);
        let st = eventually("rejected lists", || {
            let st = mirror.status();
            (st.rejected_responses >= 3).then_some(st)
        })
        .await;
        // One relist (the repeated event), retried at the lagging member.
        assert_eq!(
            st.relists.get(&ResyncReason::Validation),
            Some(&1),
            "{st:?}"
        );
        assert_eq!(st.revision, r);
        assert_eq!(st.state, State::Reconnecting, "{st:?}");
        let failing = st.failing.as_ref().expect("the failing list is reported");
        assert!(
            failing.message.contains(&format!(
                "list at revision {} is behind the published revision {r}",
                r - 2
            )),
            "{failing:?}"
        );
        assert_eq!(
            metric(&registry, "rejected_responses_total{cause=\"event\"}"),
            1
        );
        assert!(metric(&registry, "rejected_responses_total{cause=\"list\"}") >= 2);
        assert_eq!(metric(&registry, "relists_total{cause=\"validation\"}"), 1);
        assert_eq!(metric(&registry, "revision"), r);
        assert!(sub.try_recv().is_none(), "nothing published meanwhile");

        server.faults().lag_reads(0);
        ready(&mirror).await;
        let r2 = put(&etcd, &format!("{P}y"), "2").await;
        replay.follow_until(&mut sub, r2, WAIT).await;
        // The relist at the caught-up member: one resync at r, then the watch.
        assert_eq!(replay.batches, [(r, false), (r, true), (r2, false)]);
        let seen = recorder.finish().await;
        assert_eq!(seen.last(), Some(&r2));
        let st = mirror.status();
        assert_eq!(st.relists.get(&ResyncReason::Validation), Some(&1));
        assert!(st.failing.is_none(), "{st:?}");
        assert_converged(&mirror, &etcd).await;
    })
    .await;
}

/// A decoder that panics, on a listed key and on a watched one, is isolated like
/// one that returns an error: the key is reported with its revision and the panic
/// message, counted in metrics, handled by the decode policy, and the mirror goes
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_decoder_is_isolated() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        put(&etcd, &format!("{P}good"), "1").await;
        let listed_rev = put(&etcd, &format!("{P}listed"), "panic:list").await;
        let mut registry = Registry::default();
        let decoder = |_k: &[u8], v: &[u8]| -> Result<String, std::string::FromUtf8Error> {
            if let Some(rest) = v.strip_prefix(b"panic:") {
                panic!("decoder bug on {}", String::from_utf8_lossy(rest));
            }
            String::from_utf8(v.to_vec())
        };
        let mirror = start_with(source(server.endpoints()), embedded_config(), |b| {
            b.register_metrics(&mut registry).decoder(decoder)
        })
        .await;
        mirror.wait_ready().await.unwrap();
        let snap = mirror.snapshot();
        assert!(snap.get(format!("{P}listed").as_bytes()).is_none());
        assert_eq!(snap.get(format!("{P}good").as_bytes()).unwrap().value, "1");

        let watched_rev = put(&etcd, &format!("{P}good"), "panic:watch").await;
        let r = put(&etcd, &format!("{P}later"), "2").await;
        let snap = mirror.snapshot_at_least(r, WAIT).await.unwrap();
        // DropKey: the key whose new value panicked is gone until a good value.
        assert!(snap.get(format!("{P}good").as_bytes()).is_none());
        assert_eq!(snap.get(format!("{P}later").as_bytes()).unwrap().value, "2");
        let st = status_at(&mirror, r).await;
        assert_eq!(st.state, State::Ready);
        assert_eq!(st.decode_failure_count, 2);
        let reported: Vec<(Vec<u8>, i64, String)> = st
            .decode_failures
            .iter()
            .map(|f| (f.key.to_vec(), f.revision, f.error.clone()))
            .collect();
        assert_eq!(
            reported,
            [
                (
                    format!("{P}good").into_bytes(),
                    watched_rev,
                    "decoder panicked: decoder bug on watch".to_string()
                ),
                (
                    format!("{P}listed").into_bytes(),
                    listed_rev,
                    "decoder panicked: decoder bug on list".to_string()
                ),
            ]
        );
        assert_eq!(metric(&registry, "decode_errors_total"), 2);

        // The mirror is alive: a good value brings the key back.
        let fixed = put(&etcd, &format!("{P}good"), "3").await;
        let snap = mirror.snapshot_at_least(fixed, WAIT).await.unwrap();
        assert_eq!(snap.get(format!("{P}good").as_bytes()).unwrap().value, "3");
        assert_eq!(mirror.status().state, State::Ready);
        let snap = mirror.consistent_snapshot(WAIT).await.unwrap();
        assert!(snap.revision() >= fixed);
    })
    .await;
}

/// Of two keys failing to decode, one gets a good value: status must then list
/// only the other (`decode_failures` is "keys whose current value failed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_failures_shrink_when_one_of_several_keys_recovers() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        let mirror = start_with(source(server.endpoints()), embedded_config(), |b| {
            b.decoder(|_k: &[u8], v: &[u8]| String::from_utf8(v.to_vec()))
        })
        .await;
        mirror.wait_ready().await.unwrap();
        put_bytes(&etcd, &format!("{P}a"), &[0xff]).await;
        let rb = put_bytes(&etcd, &format!("{P}b"), &[0xff]).await;
        mirror.snapshot_at_least(rb, WAIT).await.unwrap();
        assert_eq!(status_at(&mirror, rb).await.decode_failure_count, 2);
        let fixed = put(&etcd, &format!("{P}a"), "ok").await;
        mirror.snapshot_at_least(fixed, WAIT).await.unwrap();
        let st = status_at(&mirror, fixed).await;
        assert_eq!(st.decode_failure_count, 1, "{st:?}");
        assert_eq!(st.decode_failures.len(), 1, "{st:?}");
        assert_eq!(st.decode_failures[0].key, format!("{P}b").as_bytes());
        assert_eq!(st.decode_failures[0].revision, rb);
    })
    .await;
}

/// The status is updated before anyone learns of a new revision: a waiter woken by
/// `snapshot_at_least`, a subscriber that received the batch, and a reader that
/// saw the status all find the status (or the snapshot) at least as new. Both with
/// a live subscriber (one publication per revision) and without one (runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_never_behind_what_was_published() {
    run_on_embedded(Duration::from_secs(90), async |server, etcd| {
        let mirror = start(server.endpoints(), embedded_config()).await;
        mirror.wait_ready().await.unwrap();
        // A reader comparing the other way round, all along.
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (mirror, stop) = (mirror.clone(), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut checks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let st = mirror.status().revision;
                    let snap = mirror.snapshot().revision();
                    assert!(snap >= st, "status at {st}, snapshot at {snap}");
                    checks += 1;
                    tokio::task::yield_now().await;
                }
                checks
            })
        };
        let mut sub = mirror.subscribe();
        for i in 0..150 {
            let r = put(&etcd, &format!("{P}s/{i}"), "v").await;
            loop {
                let u = tokio::time::timeout(WAIT, sub.recv())
                    .await
                    .unwrap()
                    .unwrap();
                let st = mirror.status().revision;
                assert!(
                    st >= u.revision(),
                    "received {}, status at {st}",
                    u.revision()
                );
                if u.revision() >= r {
                    break;
                }
            }
        }
        drop(sub);
        for i in 0..150 {
            let r = put(&etcd, &format!("{P}q/{i}"), "v").await;
            mirror.snapshot_at_least(r, WAIT).await.unwrap();
            let st = mirror.status().revision;
            assert!(st >= r, "waited for {r}, status at {st}");
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.await.unwrap() > 0);
    })
    .await;
}

// ---------------------------------------------------------------------------
// List progress.

/// A source whose range requests each wait for a permit, and can be told to fail
/// its next page as compacted: the test steps a list page by page.
#[derive(Clone)]
struct Stepped {
    inner: ClientSource,
    permits: Arc<tokio::sync::Semaphore>,
    fail_next: Arc<AtomicBool>,
}

impl Source for Stepped {
    type Watch = WatchStream;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.permits.acquire().await.unwrap().forget();
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(Error::Compacted {
                compact_revision: None,
                endpoint: "stepped".into(),
            });
        }
        self.inner.range(req).await
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<WatchStream, Error> {
        self.inner.watch(req).await
    }
}

/// The list in progress once `status` reports it after `pages` pages.
async fn listing_after(status: &mut watch::Receiver<Status>, pages: u32) -> ListProgress {
    let waited = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.listing.is_some_and(|l| l.pages == pages)),
    )
    .await
    .map(|st| st.unwrap().listing);
    match waited {
        Ok(listing) => listing.unwrap(),
        Err(_) => panic!("no list progress at page {pages}: {:?}", status.borrow()),
    }
}

/// The first list, page by page (7 keys each): a status subscriber sees the list's
/// revision, the total the first page counted (the server's `count` covers the
/// whole prefix, whatever the limit) and the keys received so far, rising page by
/// page; a page that fails clears the progress, and the list begins again; once
/// listed and Ready the progress is gone.
async fn list_progress_page_by_page(endpoints: Vec<String>, etcd: &Client) {
    const KEYS: usize = 40;
    let ops = (0..KEYS)
        .map(|i| put_op(&format!("{P}{i:03}"), "v"))
        .collect();
    txn(etcd, ops).await;
    let r = put(etcd, "other/x", "outside the prefix").await;
    let stepped = Stepped {
        inner: source(endpoints),
        permits: Arc::new(tokio::sync::Semaphore::new(0)),
        fail_next: Arc::new(AtomicBool::new(false)),
    };
    let mirror = start_with(stepped.clone(), embedded_config(), |b| b).await;
    let mut status = mirror.status_changes();
    assert_eq!(status.borrow_and_update().listing, None, "no page yet");

    // Two pages, then a failing one.
    stepped.permits.add_permits(1);
    let first = listing_after(&mut status, 1).await;
    assert_eq!(
        (first.reason, first.revision, first.total, first.keys_listed),
        (ResyncReason::InitialList, r, KEYS as u64, 7)
    );
    assert!(first.started_at <= SystemTime::now());
    stepped.permits.add_permits(1);
    assert_eq!(listing_after(&mut status, 2).await.keys_listed, 14);
    stepped.fail_next.store(true, Ordering::SeqCst);
    stepped.permits.add_permits(1);
    let failed = tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.listing.is_none() && s.failing.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    assert_eq!(failed.state, State::Syncing, "{failed:?}");

    // The list again, from its first page, to the one before the last (the last
    // is published at once, its progress cleared).
    let pages = KEYS.div_ceil(7) as u32;
    let mut seen = Vec::new();
    for page in 1..pages {
        stepped.permits.add_permits(1);
        let l = listing_after(&mut status, page).await;
        assert_eq!((l.revision, l.total), (r, KEYS as u64), "{l:?}");
        assert!(l.started_at > first.started_at, "a new list: {l:?}");
        seen.push(l.keys_listed);
    }
    assert_eq!(seen, [7, 14, 21, 28, 35]);
    // The last page, the watch, and whatever else, run freely.
    stepped.permits.add_permits(1_000);
    ready(&mirror).await;
    let st = mirror.status();
    assert_eq!(
        (st.listing, st.keys, st.revision),
        (None, KEYS, r),
        "{st:?}"
    );
    assert_converged(&mirror, etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_progress_is_reported_page_by_page_against_etcd() {
    run_on_etcd(Duration::from_secs(60), async |cluster, etcd| {
        list_progress_page_by_page(cluster.endpoints(), &etcd).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_progress_is_reported_page_by_page_against_the_embedded_server() {
    run_on_embedded(Duration::from_secs(60), async |server, etcd| {
        list_progress_page_by_page(server.endpoints(), &etcd).await;
    })
    .await;
}
