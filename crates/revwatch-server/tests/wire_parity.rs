//! Wire-level behaviours that the random conformance run exempts or cannot see, each
//! checked on real etcd 3.4 and on our server in the same way: watch ids per stream
//! (item 8), one reply per live revision (14), filtered-out replies never sent (16),
//! response headers on every RPC (22), Alarm / Unimplemented (23), and periodic
//! progress notifications (what they carry, and that events suppress them). Item numbers
//! refer to the shared list of etcd semantics.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{Clients, TestServer, WatchConn, connect};
use etcd_proto::etcdserverpb::request_op::Request as Op;
use etcd_proto::etcdserverpb::watch_create_request::FilterType;
use etcd_proto::etcdserverpb::{
    AlarmRequest, CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, LeaseLeasesRequest,
    LeaseRevokeRequest, LeaseTimeToLiveRequest, MemberListRequest, PutRequest, RangeRequest,
    RequestOp, ResponseHeader, StatusRequest, TxnRequest, WatchCreateRequest, WatchResponse,
    alarm_request::AlarmAction,
};
use etcd_proto::mvccpb::event::EventType;
use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};

const WAIT: Duration = Duration::from_secs(10);
/// How long a stream must stay silent to show that nothing more is coming.
const QUIET: Duration = Duration::from_millis(700);

async fn put(c: &mut Clients, key: &str, value: &str) -> Result<i64> {
    let resp =
        c.kv.put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(resp.header.context("header")?.revision)
}

fn put_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.into(),
            value: b"t".to_vec(),
            ..Default::default()
        })),
    }
}

/// Runs `check` against a fresh real etcd and a fresh server of ours, concurrently.
async fn on_both<F, Fut, T>(check: F) -> Result<(T, T)>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let etcd = EtcdCluster::single().await?;
    let ours = TestServer::start().await?;
    let (want, got) = tokio::try_join!(
        async { check(etcd.endpoint(0)).await.context("on etcd") },
        async { check(ours.endpoint()).await.context("on ours") },
    )?;
    Ok((want, got))
}

/// Creates watches on one stream and returns the ids they got.
async fn create_ids(w: &mut WatchConn, explicit: &[i64]) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for &id in explicit {
        w.create(WatchCreateRequest {
            key: format!("k{}", ids.len()).into_bytes(),
            watch_id: id,
            ..Default::default()
        })
        .await?;
        let reply = w.expect(WAIT).await?;
        ensure!(reply.created && !reply.canceled, "not created: {reply:?}");
        ids.push(reply.watch_id);
    }
    Ok(ids)
}

/// Item 8: ids are per stream, start at 0, and skip explicitly chosen ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_ids_are_per_stream_and_skip_explicit_ones() -> Result<()> {
    let (want, got) = on_both(|ep| async move {
        let mut c = connect(&ep).await?;
        let mut first = WatchConn::open(&mut c.watch).await?;
        let mut second = WatchConn::open(&mut c.watch).await?;
        // 0 asks for an automatic id; 1 is explicit.
        let a = create_ids(&mut first, &[0, 0]).await?;
        let b = create_ids(&mut second, &[1, 0, 0]).await?;
        Ok((a, b))
    })
    .await?;
    assert_eq!(got, (vec![0, 1], vec![1, 0, 2]));
    assert_eq!(got, want, "ours differs from etcd");
    Ok(())
}

/// Item 14: live events come one reply per revision; a txn's events share one reply, in
/// operation order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_come_one_reply_per_revision() -> Result<()> {
    const PUTS: usize = 30;
    let shape = |replies: &[WatchResponse]| -> Vec<Vec<(Vec<u8>, i64)>> {
        replies
            .iter()
            .map(|m| {
                m.events
                    .iter()
                    .map(|e| {
                        let kv = e.kv.clone().unwrap_or_default();
                        (kv.key, kv.mod_revision)
                    })
                    .collect()
            })
            .collect()
    };
    let (want, got) = on_both(|ep| async move {
        let mut c = connect(&ep).await?;
        let mut w = WatchConn::open(&mut c.watch).await?;
        w.create(WatchCreateRequest {
            key: b"live/".to_vec(),
            range_end: b"live0".to_vec(),
            ..Default::default()
        })
        .await?;
        ensure!(w.expect(WAIT).await?.created);
        // Back-to-back writers so that revisions pile up while replies are sent.
        let mut writers = Vec::new();
        for n in 0..3 {
            let mut c = c.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..PUTS / 3 {
                    put(&mut c, &format!("live/{n}/{i}"), "v").await?;
                }
                anyhow::Ok(())
            }));
        }
        for wr in writers {
            wr.await??;
        }
        c.kv.txn(TxnRequest {
            success: vec![put_op("live/t/c"), put_op("live/t/a"), put_op("live/t/b")],
            ..Default::default()
        })
        .await?;
        let mut replies = Vec::new();
        while replies
            .iter()
            .map(|m: &WatchResponse| m.events.len())
            .sum::<usize>()
            < PUTS + 3
        {
            replies.push(w.expect(WAIT).await?);
        }
        replies.extend(w.drain(QUIET).await?);
        Ok(replies)
    })
    .await?;
    for (side, replies) in [("etcd", &want), ("ours", &got)] {
        let shape = shape(replies);
        assert_eq!(
            shape.len(),
            PUTS + 1,
            "{side}: one reply per revision: {shape:?}"
        );
        for reply in &shape {
            assert!(
                reply.iter().all(|(_, rev)| *rev == reply[0].1),
                "{side}: a reply spans revisions: {reply:?}"
            );
        }
        let revs: Vec<i64> = shape.iter().map(|r| r[0].1).collect();
        assert!(
            revs.windows(2).all(|w| w[1] == w[0] + 1),
            "{side}: {revs:?}"
        );
        let txn: Vec<&[u8]> = shape[PUTS].iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(txn, [&b"live/t/c"[..], b"live/t/a", b"live/t/b"], "{side}");
    }
    Ok(())
}

/// Item 16: with NOPUT, a revision that only puts sends nothing at all; a mixed txn sends
/// only its deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filtered_out_replies_are_not_sent() -> Result<()> {
    let (want, got) = on_both(|ep| async move {
        let mut c = connect(&ep).await?;
        put(&mut c, "f/gone", "v").await?;
        let mut w = WatchConn::open(&mut c.watch).await?;
        w.create(WatchCreateRequest {
            key: b"f/".to_vec(),
            range_end: b"f0".to_vec(),
            filters: vec![FilterType::Noput as i32],
            ..Default::default()
        })
        .await?;
        ensure!(w.expect(WAIT).await?.created);
        put(&mut c, "f/a", "1").await?;
        put(&mut c, "f/b", "2").await?;
        c.kv.txn(TxnRequest {
            success: vec![
                put_op("f/c"),
                RequestOp {
                    request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                        key: b"f/gone".to_vec(),
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        })
        .await?;
        put(&mut c, "f/d", "3").await?;
        let replies = w.drain(QUIET).await?;
        Ok(replies
            .iter()
            .map(|m| {
                m.events
                    .iter()
                    .map(|e| (e.r#type, e.kv.clone().unwrap_or_default().key))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>())
    })
    .await?;
    assert_eq!(
        got,
        vec![vec![(EventType::Delete as i32, b"f/gone".to_vec())]],
        "exactly one reply, with the delete alone"
    );
    assert_eq!(got, want, "ours differs from etcd");
    Ok(())
}

/// Which header fields are set (non-zero) on one RPC's response; `present` is false
/// when there is no header at all (etcd 3.4's Alarm reply has none).
#[derive(Debug, PartialEq, Eq)]
struct HeaderShape {
    rpc: &'static str,
    present: bool,
    cluster_id: bool,
    member_id: bool,
    raft_term: bool,
    revision: bool,
}

fn shape(rpc: &'static str, h: Option<ResponseHeader>) -> Result<HeaderShape> {
    let present = h.is_some();
    let h = h.unwrap_or_default();
    Ok(HeaderShape {
        rpc,
        present,
        cluster_id: h.cluster_id != 0,
        member_id: h.member_id != 0,
        raft_term: h.raft_term != 0,
        revision: h.revision != 0,
    })
}

/// Item 22: every response carries the header fields etcd sets for that RPC: cluster and
/// member ids and the raft term everywhere, the revision wherever etcd sets it. (etcd
/// 3.4's Alarm reply has no header at all; ours must match that too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_etcds_header_fields() -> Result<()> {
    let (want, got) = on_both(|ep| async move {
        let mut c = connect(&ep).await?;
        let mut out = Vec::new();
        let r = c.kv.put(PutRequest {
            key: b"h".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        });
        out.push(shape("put", r.await?.into_inner().header)?);
        let r = c.kv.range(RangeRequest {
            key: b"h".to_vec(),
            ..Default::default()
        });
        out.push(shape("range", r.await?.into_inner().header)?);
        let r = c.kv.txn(TxnRequest {
            success: vec![put_op("h2")],
            ..Default::default()
        });
        out.push(shape("txn", r.await?.into_inner().header)?);
        let r = c.kv.delete_range(DeleteRangeRequest {
            key: b"h2".to_vec(),
            ..Default::default()
        });
        out.push(shape("delete_range", r.await?.into_inner().header)?);
        let r = c.kv.compact(CompactionRequest {
            revision: 2,
            physical: true,
        });
        out.push(shape("compact", r.await?.into_inner().header)?);
        let r = c.lease.lease_grant(LeaseGrantRequest { ttl: 60, id: 0 });
        let granted = r.await?.into_inner();
        let id = granted.id;
        out.push(shape("lease_grant", granted.header)?);
        let r = c
            .lease
            .lease_time_to_live(LeaseTimeToLiveRequest { id, keys: true });
        out.push(shape("lease_time_to_live", r.await?.into_inner().header)?);
        let r = c.lease.lease_leases(LeaseLeasesRequest {});
        out.push(shape("lease_leases", r.await?.into_inner().header)?);
        let r = c.lease.lease_revoke(LeaseRevokeRequest { id });
        out.push(shape("lease_revoke", r.await?.into_inner().header)?);
        let r = c.maint.status(StatusRequest {});
        out.push(shape("status", r.await?.into_inner().header)?);
        let r = c.maint.alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            ..Default::default()
        });
        out.push(shape("alarm", r.await?.into_inner().header)?);
        let r = c.cluster.member_list(MemberListRequest {});
        out.push(shape("member_list", r.await?.into_inner().header)?);
        let mut w = WatchConn::open(&mut c.watch).await?;
        w.create(WatchCreateRequest {
            key: b"h".to_vec(),
            ..Default::default()
        })
        .await?;
        out.push(shape("watch_created", w.expect(WAIT).await?.header)?);
        put(&mut c, "h", "2").await?;
        out.push(shape("watch_event", w.expect(WAIT).await?.header)?);
        Ok(out)
    })
    .await?;
    for h in got.iter().filter(|h| h.present) {
        assert!(h.cluster_id && h.member_id && h.raft_term, "ours: {h:?}");
    }
    assert!(
        got.iter().filter(|h| h.present).count() >= got.len() - 1,
        "{got:?}"
    );
    assert_eq!(got, want, "ours differs from etcd");
    Ok(())
}

/// Item 23: Alarm lists no alarm on a healthy node; what we do not support answers
/// Unimplemented (and never hangs or breaks the connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_is_empty_and_unsupported_rpcs_are_unimplemented() -> Result<()> {
    let (want, got) = on_both(|ep| async move {
        let mut c = connect(&ep).await?;
        let r = c.maint.alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            ..Default::default()
        });
        Ok(r.await?.into_inner().alarms.len())
    })
    .await?;
    assert_eq!((want, got), (0, 0));

    let ours = TestServer::start().await?;
    let mut c = connect(&ours.endpoint()).await?;
    let channel = tonic::transport::Channel::from_shared(ours.endpoint())?
        .connect()
        .await?;
    let mut auth = etcd_proto::etcdserverpb::auth_client::AuthClient::new(channel);
    let err = auth
        .authenticate(etcd_proto::etcdserverpb::AuthenticateRequest {
            name: "root".into(),
            password: "x".into(),
        })
        .await
        .expect_err("auth is not served");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let err = c
        .maint
        .defragment(etcd_proto::etcdserverpb::DefragmentRequest {})
        .await
        .expect_err("defragment is not supported");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let err = c
        .cluster
        .member_add(etcd_proto::etcdserverpb::MemberAddRequest::default())
        .await
        .expect_err("single node");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    // The connection still serves.
    put(&mut c, "after", "ok").await?;
    Ok(())
}

/// The revisions of the progress notifications one side sent in each phase of
/// [`progress_phases`], and the replies that should not have been sent.
#[derive(Debug)]
struct Notifies {
    quiet: Vec<i64>,
    after_outside_write: Vec<i64>,
    busy: Vec<i64>,
    /// Replies to the watch that did not ask for notifications (beyond created).
    to_other_watch: usize,
    /// Event-less replies other than a plain notification for that watch (another
    /// id, created, canceled).
    malformed: usize,
}

const NOTIFY_INTERVAL: Duration = Duration::from_millis(300);

/// Two watches on one stream, one with `progress_notify`; then a quiet phase, a phase
/// after a write outside both, and a phase with writes into the watched range every
/// 60 ms (more often than the interval).
async fn progress_phases(endpoint: String) -> Result<(i64, Notifies)> {
    let mut c = connect(&endpoint).await?;
    let first = put(&mut c, "k", "v").await?;
    let mut w = WatchConn::open(&mut c.watch).await?;
    w.create(WatchCreateRequest {
        key: b"p/".to_vec(),
        range_end: b"p0".to_vec(),
        progress_notify: true,
        ..Default::default()
    })
    .await?;
    let notified = w.expect(WAIT).await?.watch_id;
    w.create(WatchCreateRequest {
        key: b"q".to_vec(),
        ..Default::default()
    })
    .await?;
    let other = w.expect(WAIT).await?.watch_id;
    let (mut to_other_watch, mut malformed) = (0, 0);
    // The revisions of the notifications among `replies`, counting strays.
    let mut notifications = |replies: Vec<WatchResponse>| -> Vec<i64> {
        let mut revisions = Vec::new();
        for r in replies {
            if r.watch_id == other {
                to_other_watch += 1;
            } else if r.events.is_empty() {
                if r.watch_id != notified || r.created || r.canceled {
                    malformed += 1;
                }
                revisions.push(r.header.map_or(0, |h| h.revision));
            }
        }
        revisions
    };
    // Phases of 5.5 intervals, so that no tick falls on a phase's end.
    let phase = NOTIFY_INTERVAL * 11 / 2;
    let quiet = notifications(w.collect_for(phase).await?);
    put(&mut c, "zz", "outside").await?;
    // A notification sent just before the put was applied may still arrive now.
    let settle = w.collect_for(Duration::from_millis(100)).await?;
    ensure!(
        settle
            .iter()
            .all(|r| r.events.is_empty() && r.watch_id == notified),
        "unexpected replies after the outside write: {settle:?}"
    );
    let after_outside_write = notifications(w.collect_for(phase).await?);
    let mut writer = c.kv.clone();
    let busy = tokio::spawn(async move {
        for i in 0..25 {
            let req = PutRequest {
                key: format!("p/{i}").into_bytes(),
                value: b"v".to_vec(),
                ..Default::default()
            };
            if writer.put(req).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    });
    let replies = w.collect_for(phase).await?;
    busy.await?;
    let busy = notifications(replies);
    let n = Notifies {
        quiet,
        after_outside_write,
        busy,
        to_other_watch,
        malformed,
    };
    Ok((first, n))
}

/// etcd 3.4 (`--experimental-watch-progress-notify-interval`) and our server at the
/// same interval: notifications go only to watches that asked, carry no events and the
/// current revision (moved by writes outside the watched range too), come every
/// interval while the watch is idle, and stop while events flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_progress_notifies_match_etcd() -> Result<()> {
    let etcd = EtcdCluster::start(ClusterOptions {
        progress_notify_interval: Some(NOTIFY_INTERVAL),
        ..ClusterOptions::default()
    })
    .await?;
    let ours = TestServer::start_with(|c| c.progress_notify_interval = NOTIFY_INTERVAL).await?;
    let (want, got) = tokio::try_join!(
        async { progress_phases(etcd.endpoint(0)).await.context("on etcd") },
        async { progress_phases(ours.endpoint()).await.context("on ours") },
    )?;
    for (side, (first, n)) in [("etcd", &want), ("ours", &got)] {
        ensure!(n.malformed == 0 && n.to_other_watch == 0, "{side}: {n:?}");
        // Five or six ticks per phase; scheduling may cost one or two.
        ensure!(
            n.quiet.len() >= 3,
            "{side}: too few notifications when idle: {n:?}"
        );
        ensure!(n.quiet.iter().all(|r| r == first), "{side}: {n:?}");
        ensure!(n.after_outside_write.len() >= 3, "{side}: {n:?}");
        ensure!(
            n.after_outside_write.iter().all(|r| *r == first + 1),
            "{side}: the outside write did not move the notified revision: {n:?}"
        );
        // Events every 60 ms leave no idle interval; a slow put may leave one.
        ensure!(
            n.busy.len() <= 1,
            "{side}: notified while events flowed: {n:?}"
        );
    }
    eprintln!("etcd: {want:?}\nours: {got:?}");
    Ok(())
}
