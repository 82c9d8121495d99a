//! The client against a real 3-member etcd cluster whose members die or freeze.

mod client_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use client_support::{bounded, config_for, connect, put};
use revwatch::client::{
    Client, Error, PutRequest, RangeRequest, RetryPolicy, WatchCreateRequest, WatchStream,
};
use revwatch_testkit::etcd::EtcdCluster;

/// `host:port` of member `i`, as the client names endpoints.
fn name(cluster: &EtcdCluster, i: usize) -> String {
    cluster.client_addr(i).to_string()
}

fn is_healthy(client: &Client, endpoint: &str) -> bool {
    client
        .endpoint_health()
        .iter()
        .find(|h| h.endpoint == endpoint)
        .is_some_and(|h| h.healthy)
}

/// Polls until `endpoint`'s health is `healthy`; returns how long it took.
async fn wait_health(client: &Client, endpoint: &str, healthy: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    while is_healthy(client, endpoint) != healthy {
        assert!(
            start.elapsed() < limit,
            "{endpoint} not {} within {limit:?}: {:?}",
            if healthy { "healthy" } else { "unhealthy" },
            client.endpoint_health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// One request of the steady read loop.
struct Sample {
    at: Instant,
    result: Result<(), String>,
}

/// Reads `key` back to back until `stop` is set.
async fn read_loop(client: Client, stop: Arc<AtomicBool>) -> Vec<Sample> {
    let mut samples = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let req = RangeRequest {
            key: "/steady".into(),
            ..Default::default()
        };
        let result = client
            .range(req)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        samples.push(Sample {
            at: Instant::now(),
            result,
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    samples
}

#[tokio::test]
async fn killed_member_leaves_rotation_and_no_read_fails_after() {
    bounded(Duration::from_secs(120), async {
        let mut cluster = EtcdCluster::three().await.expect("start cluster");
        let client = connect(&cluster).await;
        put(&client, "/steady", "v").await;

        let stop = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_loop(client.clone(), Arc::clone(&stop)));
        tokio::time::sleep(Duration::from_secs(1)).await;

        // Kill the leader: the hardest case, as the survivors must also elect a new one.
        let victim = cluster.leader().await.expect("leader");
        let victim_name = name(&cluster, victim);
        let killed_at = Instant::now();
        cluster.kill(victim).expect("kill");
        let detection = wait_health(&client, &victim_name, false, Duration::from_secs(15)).await;
        let detected_at = killed_at + detection;

        // Keep reading well past detection and the new election.
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.store(true, Ordering::Relaxed);
        let samples = reader.await.expect("reader task");

        let in_window: Vec<_> = samples
            .iter()
            .filter(|s| s.at >= killed_at && s.at < detected_at)
            .collect();
        let after: Vec<_> = samples.iter().filter(|s| s.at >= detected_at).collect();
        let failed_in_window: Vec<_> = in_window.iter().filter_map(|s| s.result.as_ref().err()).collect();
        let failed_after: Vec<_> = after.iter().filter_map(|s| s.result.as_ref().err()).collect();
        let failed_before = samples
            .iter()
            .filter(|s| s.at < killed_at && s.result.is_err())
            .count();
        println!(
            "killed member {victim} ({victim_name}); marked dead after {detection:?}; \
             detection window: {} requests, {} failed {:?}; after detection: {} requests, {} failed",
            in_window.len(),
            failed_in_window.len(),
            failed_in_window,
            after.len(),
            failed_after.len(),
        );
        assert_eq!(failed_before, 0, "reads failed before any fault");
        assert!(failed_after.is_empty(), "reads failed after detection: {failed_after:?}");
        assert!(after.len() > 50, "too few reads after detection to mean anything: {}", after.len());

        // The restarted member is re-probed and put back into rotation.
        cluster.restart(victim).await.expect("restart");
        let back = wait_health(&client, &victim_name, true, Duration::from_secs(30)).await;
        println!("restarted member back in rotation after {back:?}");
    })
    .await;
}

/// Opens watches on `/{prefix}/` until one lands on `target`; round robin gets there
/// within a few tries.
async fn watch_on(client: &Client, prefix: &str, target: &str) -> WatchStream {
    for _ in 0..10 {
        let mut stream = client
            .watch(WatchCreateRequest {
                key: format!("/{prefix}/").into(),
                range_end: format!("/{prefix}0").into(),
                ..Default::default()
            })
            .await
            .expect("watch");
        if stream.endpoint() == target {
            let created = stream.message().await.expect("created").expect("open");
            assert!(created.created);
            return stream;
        }
    }
    panic!("no watch landed on {target}");
}

#[tokio::test]
async fn frozen_member_fails_open_requests_in_bounded_time() {
    bounded(Duration::from_secs(150), async {
        let mut cluster = EtcdCluster::three().await.expect("start cluster");
        // Default keepalive (10 s interval, 10 s timeout) and request timeout (10 s).
        let client = connect(&cluster).await;
        let leader = cluster.leader().await.expect("leader");
        let victim = (leader + 1) % 3;
        let victim_name = name(&cluster, victim);
        let victim_id = cluster.member_id(victim);

        let mut stream = watch_on(&client, "frozen", &victim_name).await;
        cluster.freeze(victim).expect("freeze");
        let frozen_at = Instant::now();

        // The open watch must fail by itself: keepalive pings go unanswered.
        let watch_result = tokio::spawn(async move {
            let res = stream.message().await;
            (res, frozen_at.elapsed())
        });

        // Puts go round robin, so one of the next three lands on the frozen member.
        // A put is not replayed, so that one must fail with a timeout, not hang.
        let mut put_failure = None;
        for i in 0..3 {
            let started = Instant::now();
            let res = client
                .put(PutRequest {
                    key: format!("/frozen/{i}").into(),
                    value: "v".into(),
                    ..Default::default()
                })
                .await;
            let took = started.elapsed();
            match res {
                Ok(r) => assert_ne!(r.header.expect("header").member_id, victim_id),
                Err(e) => {
                    assert!(
                        took < Duration::from_secs(15),
                        "put failed only after {took:?}"
                    );
                    put_failure = Some((e, took));
                    break;
                }
            }
        }
        let (err, took) = put_failure.expect("no put was routed to the frozen member");
        println!("put on the frozen member failed after {took:?}: {err}");
        assert!(
            matches!(&err, Error::Timeout { endpoint, .. } if *endpoint == victim_name),
            "{err}"
        );
        assert!(
            !is_healthy(&client, &victim_name),
            "frozen member still in rotation"
        );

        // The next requests go to live members and succeed.
        for i in 0..6 {
            let started = Instant::now();
            let r = client
                .put(PutRequest {
                    key: format!("/frozen/after-{i}").into(),
                    value: "v".into(),
                    ..Default::default()
                })
                .await
                .expect("put after detection");
            assert_ne!(r.header.expect("header").member_id, victim_id);
            assert!(started.elapsed() < Duration::from_secs(5));
        }

        let (res, after) = watch_result.await.expect("watch task");
        println!("watch on the frozen member ended after {after:?}: {res:?}");
        let err = res.expect_err("watch on a frozen member must fail, not end cleanly");
        assert!(err.is_retryable(), "{err}");
        // The keepalive kills the connection: a transport error from that endpoint.
        assert!(
            matches!(&err, Error::Connection { endpoint, .. } if *endpoint == victim_name),
            "{err}"
        );
        // The default keepalive pings within 10 s of the last frame read and gives up
        // 10 s later: about 20 s, well inside the 30 s the issue allows.
        let cfg = client.config();
        assert!(cfg.keepalive_interval + cfg.keepalive_timeout <= Duration::from_secs(20));
        assert!(
            after < Duration::from_secs(30),
            "watch failed only after {after:?}"
        );

        // A new watch opens on a live member and sees new writes.
        let mut stream = client
            .watch(WatchCreateRequest {
                key: "/frozen/".into(),
                range_end: "/frozen0".into(),
                ..Default::default()
            })
            .await
            .expect("new watch");
        assert_ne!(stream.endpoint(), victim_name);
        assert!(
            stream
                .message()
                .await
                .expect("created")
                .expect("open")
                .created
        );
        let rev = put(&client, "/frozen/late", "v").await;
        let resp = stream.message().await.expect("event").expect("open");
        assert_eq!(resp.events[0].kv.as_ref().expect("kv").mod_revision, rev);
    })
    .await;
}

#[tokio::test]
async fn in_flight_read_on_frozen_member_fails_over() {
    bounded(Duration::from_secs(120), async {
        let mut cluster = EtcdCluster::three().await.expect("start cluster");
        let client = connect(&cluster).await;
        put(&client, "/steady", "v").await;
        let leader = cluster.leader().await.expect("leader");
        let victim = (leader + 1) % 3;
        cluster.freeze(victim).expect("freeze");

        // Reads are idempotent: the one routed to the frozen member times out and is
        // retried on a live member, so every read succeeds within about one timeout.
        let timeout = client.config().request_timeout;
        for _ in 0..6 {
            let started = Instant::now();
            let resp = client
                .range(RangeRequest {
                    key: "/steady".into(),
                    ..Default::default()
                })
                .await
                .expect("read during freeze");
            assert_eq!(resp.kvs[0].value, b"v");
            assert_ne!(
                resp.header.expect("header").member_id,
                cluster.member_id(victim)
            );
            assert!(
                started.elapsed() < timeout + Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        }
        assert!(!is_healthy(&client, &name(&cluster, victim)));

        cluster.thaw(victim).expect("thaw");
        let back = wait_health(
            &client,
            &name(&cluster, victim),
            true,
            Duration::from_secs(30),
        )
        .await;
        println!("thawed member back in rotation after {back:?}");
    })
    .await;
}

/// Asserts `err` is etcd's require-leader refusal, as served by `endpoint`.
fn assert_no_leader(err: &Error, endpoint: &str) {
    match err {
        Error::Grpc {
            code: tonic::Code::Unavailable,
            message,
            endpoint: served_by,
        } => {
            assert!(message.contains("no leader"), "{err}");
            assert_eq!(served_by, endpoint, "{err}");
        }
        other => panic!("expected Unavailable \"etcdserver: no leader\", got {other:?}"),
    }
    assert!(err.is_retryable(), "{err}");
}

#[tokio::test]
async fn watch_on_member_that_loses_its_leader_fails_with_no_leader() {
    bounded(Duration::from_secs(120), async {
        let mut cluster = EtcdCluster::three().await.expect("start cluster");
        let client = connect(&cluster).await;
        let leader = cluster.leader().await.expect("leader");
        let survivor = (leader + 1) % 3;
        let survivor_name = name(&cluster, survivor);

        let mut stream = watch_on(&client, "noleader", &survivor_name).await;
        // Without the other two the survivor has no quorum, so no leader. The process
        // is alive and answers pings: only require-leader can end this watch.
        for i in (0..3).filter(|&i| i != survivor) {
            cluster.kill(i).expect("kill");
        }
        let killed_at = Instant::now();

        let res = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("watch still open 30 s after its member lost its leader");
        let after = killed_at.elapsed();
        println!("watch on the leaderless member ended after {after:?}: {res:?}");
        let err = res.expect_err("the watch must fail, not end cleanly or deliver a message");
        assert_no_leader(&err, &survivor_name);
        assert!(
            !is_healthy(&client, &survivor_name),
            "leaderless member still in rotation"
        );

        // A new watch is refused at once: etcd checks require-leader when the stream
        // opens. A client of that member alone, with a short retry budget, gets the
        // same typed error rather than a hang.
        let cfg = config_for(&cluster)
            .with_endpoints([cluster.endpoint(survivor)])
            .with_retry(RetryPolicy {
                max_elapsed: Duration::from_secs(2),
                ..RetryPolicy::default()
            });
        let lone = Client::connect(cfg)
            .await
            .expect("connect: the member still answers Status");
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            lone.watch(WatchCreateRequest {
                key: "/noleader/".into(),
                range_end: "/noleader0".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("opening a watch on a leaderless member hung")
        .expect_err("a require-leader watch opened on a leaderless member");
        println!("new watch on the leaderless member: {err}");
        assert_no_leader(&err, &survivor_name);
    })
    .await;
}
