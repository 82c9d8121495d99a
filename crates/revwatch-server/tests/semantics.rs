//! Targeted checks of behaviours the random conformance run cannot pin down: timing-bound
//! ones (lease expiry, periodic progress), ones where this server deliberately differs from
//! etcd 3.4 (progress replies wait for catch-up), size-bound ones (fragmenting, limits),
//! and restart stability. Lease expiry is also compared with a real etcd.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Clients, TestServer, WatchConn, connect};
use etcd_proto::etcdserverpb::request_op::Request as Op;
use etcd_proto::etcdserverpb::{
    LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchResponse,
};
use etcd_proto::mvccpb::event::EventType;
use revwatch_server::{Server, ServerConfig};
use revwatch_testkit::etcd::{ClusterOptions, CompactionMode, EtcdCluster};

const WAIT: Duration = Duration::from_secs(10);

async fn put(c: &mut Clients, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
    let resp =
        c.kv.put(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp.header.context("header")?.revision)
}

async fn revision(c: &mut Clients) -> Result<i64> {
    let resp =
        c.kv.range(RangeRequest {
            key: b"any".to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp.header.context("header")?.revision)
}

/// Lease expiry deletes all attached keys in one revision, DELETE events sorted by key in
/// one reply; an expiring lease without keys leaves the revision alone (items 17, 21).
async fn lease_expiry(endpoint: &str) -> Result<Vec<WatchResponse>> {
    let mut c = connect(endpoint).await?;
    let granted = c
        .lease
        .lease_grant(LeaseGrantRequest { ttl: 1, id: 7001 })
        .await?
        .into_inner();
    ensure!(
        granted.ttl == 2,
        "TTL 1 raised to the minimum 2, got {}",
        granted.ttl
    );
    c.lease
        .lease_grant(LeaseGrantRequest { ttl: 2, id: 7002 })
        .await?;
    for key in ["c", "a", "b"] {
        put(&mut c, key, b"v".to_vec(), 7001).await?;
    }
    put(&mut c, "unleased", b"v".to_vec(), 0).await?;
    let before = revision(&mut c).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    })
    .await?;
    ensure!(w.expect(WAIT).await?.created, "created reply first");
    let expired = w.expect(WAIT).await?;
    // Both leases are gone well within a few seconds; only the one with keys moved the
    // revision.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = revision(&mut c).await?;
    ensure!(
        after == before + 1,
        "expiry took {} revisions",
        after - before
    );
    let ttl = c
        .lease
        .lease_time_to_live(etcd_proto::etcdserverpb::LeaseTimeToLiveRequest {
            id: 7002,
            keys: false,
        })
        .await?
        .into_inner();
    ensure!(ttl.ttl == -1, "lease without keys expired too");
    let mut replies = vec![expired];
    replies.extend(w.drain(Duration::from_millis(500)).await?);
    Ok(replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_matches_etcd() -> Result<()> {
    let etcd = EtcdCluster::single().await?;
    let ours = TestServer::start().await?;
    let (etcd_ep, our_ep) = (etcd.endpoint(0), ours.endpoint());
    let (want, got) = tokio::try_join!(lease_expiry(&etcd_ep), lease_expiry(&our_ep))?;
    let events = |r: &[WatchResponse]| -> Vec<(i32, Vec<u8>, i64)> {
        r.iter()
            .flat_map(|m| &m.events)
            .map(|e| {
                let kv = e.kv.clone().unwrap_or_default();
                (e.r#type, kv.key, kv.mod_revision)
            })
            .collect()
    };
    assert_eq!(got.len(), 1, "one reply: {got:?}");
    let evs = events(&got);
    let rev = evs[0].2;
    let delete = EventType::Delete as i32;
    assert_eq!(
        evs,
        vec![
            (delete, b"a".to_vec(), rev),
            (delete, b"b".to_vec(), rev),
            (delete, b"c".to_vec(), rev)
        ]
    );
    assert_eq!(events(&want), evs, "etcd and ours differ");
    Ok(())
}

/// Unlike etcd 3.4, a progress reply only comes once every watcher on the stream has been
/// sent everything up to its revision (item 18).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reply_waits_for_catch_up() -> Result<()> {
    let s = TestServer::start().await?;
    let mut c = connect(&s.endpoint()).await?;
    // 2500 revisions: the catch-up takes several replies of up to 1000 revisions.
    let mut tasks = Vec::new();
    for w in 0..10 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..250 {
                put(&mut c, &format!("k{w}/{n}"), b"v".to_vec(), 0).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let current = revision(&mut c).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: vec![0],
        range_end: vec![0],
        start_revision: 1,
        ..Default::default()
    })
    .await?;
    w.progress().await?;
    let mut last_event_rev = 0;
    let mut catch_up_replies = 0;
    loop {
        let m = w.expect(WAIT).await?;
        if m.created {
            continue;
        }
        if m.watch_id == -1 {
            let rev = m.header.context("header")?.revision;
            ensure!(rev == current, "progress at {rev}, current {current}");
            ensure!(
                last_event_rev == current,
                "progress at {rev} arrived after events up to only {last_event_rev}"
            );
            break;
        }
        catch_up_replies += 1;
        // Catch-up replies carry the current revision and at most 1000 revisions each.
        ensure!(m.header.context("header")?.revision == current);
        let first = m
            .events
            .first()
            .and_then(|e| e.kv.as_ref())
            .context("events")?
            .mod_revision;
        last_event_rev = m
            .events
            .last()
            .and_then(|e| e.kv.as_ref())
            .context("events")?
            .mod_revision;
        ensure!(
            last_event_rev - first < 1000,
            "reply spans {first}..={last_event_rev}"
        );
    }
    ensure!(catch_up_replies >= 3, "{catch_up_replies} catch-up replies");
    Ok(())
}

/// Periodic progress goes only to watchers created with progress_notify, with their id,
/// and is skipped for a watcher that got events in the interval (item 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_progress_notify() -> Result<()> {
    let s =
        TestServer::start_with(|c| c.progress_notify_interval = Duration::from_millis(400)).await?;
    let mut c = connect(&s.endpoint()).await?;
    put(&mut c, "x", b"1".to_vec(), 0).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    for (key, notify) in [("quiet", true), ("busy", true), ("plain", false)] {
        w.create(WatchCreateRequest {
            key: key.as_bytes().to_vec(),
            progress_notify: notify,
            ..Default::default()
        })
        .await?;
        ensure!(w.expect(WAIT).await?.created);
    }
    // Keep "busy" (id 1) fed for ~2 s while collecting.
    let feeder = {
        let mut c = c.clone();
        tokio::spawn(async move {
            for _ in 0..10 {
                put(&mut c, "busy", b"v".to_vec(), 0).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok(())
        })
    };
    let replies = w.collect_for(Duration::from_millis(2200)).await?;
    feeder.await??;
    let progress: Vec<&WatchResponse> = replies.iter().filter(|m| m.events.is_empty()).collect();
    ensure!(
        progress.len() >= 3,
        "few progress notifications: {replies:?}"
    );
    ensure!(
        progress.iter().all(|m| m.watch_id == 0 || m.watch_id == 1),
        "progress for a watcher without progress_notify: {progress:?}"
    );
    let quiet = progress.iter().filter(|m| m.watch_id == 0).count();
    let busy = progress.iter().filter(|m| m.watch_id == 1).count();
    ensure!(
        quiet > busy,
        "busy watcher got {busy} notifications, quiet {quiet}"
    );
    Ok(())
}

/// Fragmenting splits a reply over the size limit only when asked (item 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_catch_up_is_fragmented_on_request() -> Result<()> {
    // Replies above 64 KiB + 512 KiB of gRPC allowance are fragmented.
    let s = TestServer::start_with(|c| c.limits.max_request_bytes = 64 * 1024).await?;
    let mut c = connect(&s.endpoint()).await?;
    for n in 0..12 {
        put(&mut c, &format!("big/{n}"), vec![b'x'; 60 * 1024], 0).await?;
    }
    for fragment in [true, false] {
        let mut w = WatchConn::open(&mut c.watch).await?;
        w.create(WatchCreateRequest {
            key: b"big/".to_vec(),
            range_end: b"big0".to_vec(),
            start_revision: 1,
            fragment,
            ..Default::default()
        })
        .await?;
        ensure!(w.expect(WAIT).await?.created);
        let replies = w.drain(Duration::from_millis(500)).await?;
        let events: usize = replies.iter().map(|m| m.events.len()).sum();
        ensure!(events == 12, "{events} events");
        if fragment {
            ensure!(replies.len() > 1, "not fragmented");
            let (last, rest) = replies.split_last().context("replies")?;
            ensure!(rest.iter().all(|m| m.fragment) && !last.fragment);
        } else {
            ensure!(replies.len() == 1 && !replies[0].fragment);
        }
    }
    Ok(())
}

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })),
    }
}

/// Limits give etcd-style errors and leave the server serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_requests_cleanly() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.limits.max_request_bytes = 4096;
        c.limits.max_value_bytes = 1024;
        c.limits.max_txn_ops = 4;
        c.limits.max_watchers = 2;
    })
    .await?;
    let mut c = connect(&s.endpoint()).await?;
    let err =
        c.kv.put(PutRequest {
            key: b"k".to_vec(),
            value: vec![0; 2048],
            ..Default::default()
        })
        .await
        .expect_err("value over the limit");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "etcdserver: value is too large");
    let txn = TxnRequest {
        success: (0..5).map(|i| put_op(&format!("k{i}"))).collect(),
        ..Default::default()
    };
    let err = c.kv.txn(txn).await.expect_err("too many ops");
    assert_eq!(
        err.message(),
        "etcdserver: too many operations in txn request"
    );
    let txn = TxnRequest {
        success: (0..4)
            .map(|i| {
                let mut op = put_op(&format!("k{i}"));
                if let Some(Op::RequestPut(p)) = &mut op.request {
                    p.value = vec![0; 1024];
                }
                op
            })
            .collect(),
        ..Default::default()
    };
    let err = c.kv.txn(txn).await.expect_err("request too large");
    assert_eq!(err.message(), "etcdserver: request is too large");
    let mut w = WatchConn::open(&mut c.watch).await?;
    for i in 0..3 {
        w.create(WatchCreateRequest {
            key: format!("w{i}").into_bytes(),
            ..Default::default()
        })
        .await?;
    }
    let replies = [
        w.expect(WAIT).await?,
        w.expect(WAIT).await?,
        w.expect(WAIT).await?,
    ];
    assert!(replies[..2].iter().all(|m| m.created && !m.canceled));
    assert!(replies[2].created && replies[2].canceled && replies[2].watch_id == -1);
    assert_eq!(replies[2].cancel_reason, "etcdserver: too many watchers");
    // Still serving, and the stream still works: cancelling frees a slot.
    w.cancel(0).await?;
    ensure!(w.expect(WAIT).await?.canceled);
    w.create(WatchCreateRequest {
        key: b"w9".to_vec(),
        ..Default::default()
    })
    .await?;
    let m = w.expect(WAIT).await?;
    ensure!(m.created && !m.canceled, "{m:?}");
    put(&mut c, "still", b"ok".to_vec(), 0).await?;
    Ok(())
}

/// Identity and data survive a clean restart; the term moves on (item 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_ids_and_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig::new(dir.path());
    let running = Server::start(config.clone()).await?;
    let (cluster, member) = (running.server().cluster_id(), running.server().member_id());
    ensure!(cluster != 0 && member != 0);
    let mut c = connect(&running.endpoint()).await?;
    let rev = put(&mut c, "k", b"v".to_vec(), 0).await?;
    let header = c
        .maint
        .status(etcd_proto::etcdserverpb::StatusRequest {})
        .await?
        .into_inner();
    ensure!(header.leader == member);
    let term = header.raft_term;
    drop(c);
    running.shutdown().await?;
    let running = Server::start(config).await?;
    ensure!(running.server().cluster_id() == cluster && running.server().member_id() == member);
    let mut c = connect(&running.endpoint()).await?;
    let resp = c
        .maint
        .status(etcd_proto::etcdserverpb::StatusRequest {})
        .await?
        .into_inner();
    ensure!(resp.raft_term > term);
    ensure!(revision(&mut c).await? == rev);
    ensure!(put(&mut c, "k2", b"v".to_vec(), 0).await? == rev + 1);
    drop(c);
    running.shutdown().await?;
    Ok(())
}

/// Concurrent writers share fsynced commits (group commit), and every one of them is
/// acknowledged with its own revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_group_commits() -> Result<()> {
    const WRITERS: usize = 32;
    const EACH: usize = 20;
    let s = TestServer::start().await?;
    let c = connect(&s.endpoint()).await?;
    let before = s.server().commits();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..EACH {
                revs.push(put(&mut c, &format!("g/{w}/{i}"), b"v".to_vec(), 0).await?);
            }
            anyhow::Ok(revs)
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.extend(t.await??);
    }
    revs.sort_unstable();
    revs.dedup();
    ensure!(
        revs.len() == WRITERS * EACH,
        "each write has its own revision"
    );
    let commits = s.server().commits() - before;
    ensure!(commits > 0, "writes were committed");
    // One fsync per write would give WRITERS * EACH commits.
    ensure!(
        (commits as usize) < WRITERS * EACH / 2,
        "{commits} commits for {} concurrent writes: not grouped",
        WRITERS * EACH
    );
    Ok(())
}

/// Range at `rev`: `Ok(values)` or the gRPC error message.
async fn range_at(c: &mut Clients, rev: i64) -> Result<std::result::Result<Vec<Vec<u8>>, String>> {
    let req = RangeRequest {
        key: b"a".to_vec(),
        range_end: b"b".to_vec(),
        revision: rev,
        ..Default::default()
    };
    Ok(match c.kv.range(req).await {
        Ok(resp) => Ok(resp
            .into_inner()
            .kvs
            .into_iter()
            .map(|kv| kv.value)
            .collect()),
        Err(status) => Err(status.message().to_owned()),
    })
}

/// Auto-compaction in revision mode compacts by itself at the current revision minus the
/// retention, like etcd's revision compactor: older revisions fail to read and a watch
/// from before them is canceled with the compacted revision, while the kept ones read
/// as before. (etcd 3.4 compacts every 5 minutes in this mode, too slow to compare here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_keeps_the_retained_revisions() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.auto_compaction = Some(revwatch_server::AutoCompaction::Revision {
            retention: 5,
            interval: Duration::from_millis(100),
        });
    })
    .await?;
    let mut c = connect(&s.endpoint()).await?;
    let mut last = 0;
    for i in 0..20 {
        last = put(&mut c, "a", format!("v{i}").into_bytes(), 0).await?;
    }
    ensure!(last == 21, "puts ended at revision {last}");
    // Compactions may run while the puts go on; once they stop, the next one is at 21 - 5.
    let deadline = tokio::time::Instant::now() + WAIT;
    while range_at(&mut c, 15).await?.is_ok() {
        ensure!(tokio::time::Instant::now() < deadline, "no auto-compaction");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let compacted = "etcdserver: mvcc: required revision has been compacted";
    ensure!(range_at(&mut c, 15).await? == Err(compacted.to_owned()));
    // Revision 16 holds the put made at 16: v14.
    ensure!(range_at(&mut c, 16).await? == Ok(vec![b"v14".to_vec()]));
    ensure!(range_at(&mut c, 0).await? == Ok(vec![b"v19".to_vec()]));

    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: b"a".to_vec(),
        start_revision: 2,
        ..Default::default()
    })
    .await?;
    ensure!(w.expect(WAIT).await?.created);
    let canceled = w.expect(WAIT).await?;
    ensure!(
        canceled.canceled && canceled.compact_revision == 16,
        "{canceled:?}"
    );
    // Nothing left to compact: the revision kept stays readable.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(range_at(&mut c, 16).await? == Ok(vec![b"v14".to_vec()]));
    Ok(())
}

/// Timer settings at the extremes neither panic nor spin: a zero progress interval is
/// raised to 10 ms, and intervals of `Duration::MAX` (checkpoints, lease checks,
/// auto-compaction) just mean "not soon".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_timer_settings_are_clamped() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.progress_notify_interval = Duration::ZERO;
        c.checkpoint_interval = Duration::MAX;
        c.lease_check_interval = Duration::MAX;
        c.auto_compaction = Some(revwatch_server::AutoCompaction::Revision {
            retention: 1,
            interval: Duration::MAX,
        });
    })
    .await?;
    let mut c = connect(&s.endpoint()).await?;
    let rev = put(&mut c, "k", b"v".to_vec(), 0).await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: b"k".to_vec(),
        progress_notify: true,
        ..Default::default()
    })
    .await?;
    ensure!(w.expect(WAIT).await?.created);
    let progress = w.expect(WAIT).await?;
    ensure!(
        progress.events.is_empty() && progress.header.as_ref().map(|h| h.revision) == Some(rev),
        "{progress:?}"
    );
    ensure!(range_at(&mut c, 1).await?.is_ok(), "compacted too soon");
    Ok(())
}

/// Periodic auto-compaction keeps at least the last retention of history, on real etcd
/// (etcd's default mode) and on ours alike: with writes going on, a compaction comes by
/// itself, and the revision it compacted at was already current one retention before it
/// was seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_auto_compaction_keeps_the_last_retention_like_etcd() -> Result<()> {
    const RETENTION: Duration = Duration::from_secs(1);
    let etcd = EtcdCluster::start(ClusterOptions {
        auto_compaction_retention: Some("1s".into()),
        auto_compaction_mode: CompactionMode::Periodic,
        ..Default::default()
    })
    .await?;
    let ours = TestServer::start_with(|c| {
        c.auto_compaction = Some(revwatch_server::AutoCompaction::periodic(RETENTION));
    })
    .await?;
    for (name, endpoint) in [("etcd", etcd.endpoint(0)), ("ours", ours.endpoint())] {
        periodic_retention_holds(&endpoint, RETENTION)
            .await
            .with_context(|| format!("on {name}"))?;
    }
    Ok(())
}

async fn periodic_retention_holds(endpoint: &str, retention: Duration) -> Result<()> {
    let mut c = connect(endpoint).await?;
    // (when the put was sent, its revision): a revision current at time t was written
    // by a put sent before t.
    let mut sent: Vec<(tokio::time::Instant, i64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let at = tokio::time::Instant::now();
        let rev = put(&mut c, "p", b"v".to_vec(), 0).await?;
        sent.push((at, rev));
        if range_at(&mut c, sent[0].1).await?.is_err() {
            break;
        }
        ensure!(at < deadline, "no periodic compaction within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The compacted revision, from a watch that starts below it.
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: b"p".to_vec(),
        start_revision: 1,
        ..Default::default()
    })
    .await?;
    ensure!(w.expect(WAIT).await?.created);
    let canceled = w.expect(WAIT).await?;
    let seen = tokio::time::Instant::now();
    let compacted = canceled.compact_revision;
    ensure!(canceled.canceled && compacted > sent[0].1, "{canceled:?}");
    let kept_since = seen - retention;
    let newest_then = sent
        .iter()
        .filter(|(at, _)| *at < kept_since)
        .map(|(_, rev)| *rev)
        .max()
        .unwrap_or(0);
    ensure!(
        compacted <= newest_then,
        "compacted at {compacted}, but only revisions up to {newest_then} are older than the retention"
    );
    Ok(())
}

/// Retention 0 turns auto-compaction off, as etcd's `--auto-compaction-retention=0` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_with_retention_zero_is_off() -> Result<()> {
    let s = TestServer::start_with(|c| {
        c.auto_compaction = Some(revwatch_server::AutoCompaction::Revision {
            retention: 0,
            interval: Duration::ZERO,
        });
    })
    .await?;
    let mut c = connect(&s.endpoint()).await?;
    for i in 0..3 {
        put(&mut c, "a", format!("v{i}").into_bytes(), 0).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(range_at(&mut c, 2).await? == Ok(vec![b"v0".to_vec()]));
    Ok(())
}
