//! The mirror's Prometheus metrics (contract point 12) against real etcd 3.4: one
//! typed mirror registered in a `prometheus_client` registry is driven through
//! puts, a txn, a bad value, a slow subscriber, a reconnect, a bookmark that
//! closes a lag, and a compaction-triggered relist; after each step the registry is
//! encoded in the text format and every metric is checked against what happened.

mod mirror_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mirror_support::etcd::run_on_etcd;
use mirror_support::eventually;
use mirror_support::metrics::{Scrape, scrape};
use mirror_support::setup::{
    P, WAIT, assert_converged_utf8, delete, mirror_config, put, put_bytes, put_op, source,
    start_with, txn,
};
use prometheus_client::registry::Registry;
use revwatch::mirror::{ResyncReason, State, Update};
use revwatch_testkit::proxy::{Fault, FaultProxy};

/// A status count by cause, keyed by the cause's metric label.
fn by_label<C>(
    counts: &BTreeMap<C, u64>,
    label: impl Fn(&C) -> &'static str,
) -> BTreeMap<String, u64> {
    counts
        .iter()
        .map(|(c, n)| (label(c).to_string(), *n))
        .collect()
}

/// Scrapes once the mirror's metrics account for publishing `revision`: they are
/// updated as the snapshot is published, the apply latency right after.
async fn scrape_at(registry: &Registry, revision: i64) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(registry);
        if m.int("revision") == revision
            && m.int("apply_seconds_count") == m.int("revisions_applied_total")
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never reached revision {revision}:\n{}",
            m.text
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    eventually(what, || done().then_some(())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_real_traffic() {
    run_on_etcd(Duration::from_secs(150), async |cluster, etcd| {
        for k in ["a", "b", "c", "d", "e"] {
            put(&etcd, &format!("{P}{k}"), "v0").await;
        }
        // The mirror reaches etcd through a proxy, to reset and cut it off.
        let proxy = FaultProxy::start(cluster.client_addr(0)).await.unwrap();
        let mut registry = Registry::default();
        let config = mirror_config()
            .with_subscriber_buffer(4)
            // Wide enough to watch the lag a progress reply reveals before a
            // read verifies it as a bookmark, which happens only when a reader
            // waits.
            .with_progress_interval(Duration::from_secs(1))
            .with_stall_timeout(Duration::from_secs(4))
            .with_progress_verify_interval(Duration::from_secs(3600));
        let mirror = start_with(source(vec![proxy.endpoint()]), config, |b| {
            b.register_metrics(&mut registry)
                .decoder(|_k: &[u8], v: &[u8]| String::from_utf8(v.to_vec()))
        })
        .await;
        mirror.wait_ready().await.unwrap();

        // After the initial list: one stream, nothing applied from the watch yet,
        // the initial list not counted as a relist.
        let r0 = mirror.snapshot().revision();
        let m = scrape(&registry);
        m.assert_described();
        assert_eq!(m.int("watch_streams_opened_total"), 1);
        assert_eq!(m.int("events_applied_total"), 0);
        assert_eq!(m.int("revisions_applied_total"), 0);
        assert_eq!(m.int("apply_seconds_count"), 0);
        assert_eq!(m.int("revision"), r0);
        assert_eq!(m.int("server_revision"), r0);
        assert_eq!(m.int("lag_revisions"), 0);
        assert_eq!(m.int("decode_errors_total"), 0);
        assert_eq!(m.int("subscribers"), 0);
        // Every known cause is exposed, at 0, before it first happens.
        let zeros = |causes: &[&str]| {
            causes
                .iter()
                .map(|c| (c.to_string(), 0))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            m.causes("reconnects"),
            zeros(&[
                "canceled",
                "stall",
                "stream_closed",
                "stream_error",
                "validation"
            ]),
            "{}",
            m.text
        );
        assert_eq!(m.causes("relists"), zeros(&["compacted", "validation"]));
        assert_eq!(
            m.causes("rejected_responses"),
            zeros(&["event", "header", "list", "untrusted_progress"])
        );
        assert_eq!(m.causes("snapshot_file_writes"), zeros(&["error", "ok"]));
        assert_eq!(
            m.causes("progress_verifications"),
            zeros(&["bookmark", "changed", "failed"])
        );

        // Puts, a txn (3 events in the prefix, one revision), a bad value, a good
        // one; a subscriber with a 4-update buffer that reads nothing meanwhile.
        let mut slow = mirror.subscribe();
        assert_eq!(scrape(&registry).int("subscribers"), 1);
        for i in 0..10 {
            put(&etcd, &format!("{P}k{i}"), "v").await;
        }
        txn(
            &etcd,
            vec![
                put_op(&format!("{P}t/1"), "t"),
                put_op(&format!("{P}t/2"), "t"),
                put_op(&format!("{P}t/3"), "t"),
                put_op("other/t", "t"),
            ],
        )
        .await;
        let bad_rev = put_bytes(&etcd, &format!("{P}bad"), &[0xff, 0xfe]).await;
        let r1 = put(&etcd, &format!("{P}after"), "x").await;
        mirror.snapshot_at_least(r1, WAIT).await.unwrap();
        let m = scrape_at(&registry, r1).await;
        assert_eq!(m.int("events_applied_total"), 10 + 3 + 1 + 1);
        assert_eq!(m.int("revisions_applied_total"), 10 + 1 + 1 + 1);
        assert_eq!(m.int("apply_seconds_count"), 13);
        assert!(m.get("apply_seconds_sum") > 0.0, "{}", m.text);
        assert_eq!(
            m.get("apply_seconds_bucket{le=\"+Inf\"}") as i64,
            13,
            "{}",
            m.text
        );
        assert_eq!(m.int("decode_errors_total"), 1);
        let st = mirror.status();
        assert_eq!(st.decode_failures.len(), 1, "{st:?}");
        assert_eq!(st.decode_failures[0].key, format!("{P}bad").as_bytes());
        assert_eq!(st.decode_failures[0].revision, bad_rev);
        assert_eq!(m.int("revision"), r1);
        assert_eq!(m.int("server_revision"), r1);
        assert_eq!(m.int("lag_revisions"), 0);
        // The snapshot and 3 batches filled the buffer; the 4th batch made it lag.
        assert!(slow.is_lagging());
        assert_eq!(m.int("subscriber_lagged_total"), 1);
        assert_eq!(m.int("subscriber_resyncs_total"), 0);
        let mut received = Vec::new();
        loop {
            let u = tokio::time::timeout(WAIT, slow.recv())
                .await
                .unwrap()
                .unwrap();
            let (rev, resync) = match &u {
                Update::Snapshot(s) => (s.revision(), None),
                Update::Batch(b) => (b.revision, b.resync),
                Update::Progress(r) => (*r, None),
            };
            received.push((rev, resync));
            if rev >= r1 {
                break;
            }
        }
        assert_eq!(received.len(), 5, "{received:?}");
        assert_eq!(
            received.last(),
            Some(&(r1, Some(ResyncReason::SubscriberLagged)))
        );
        assert_eq!(scrape(&registry).int("subscriber_resyncs_total"), 1);
        drop(slow);

        // Mend the bad value (so the relist below has nothing to re-report).
        let r2 = put(&etcd, &format!("{P}bad"), "fixed").await;
        mirror.snapshot_at_least(r2, WAIT).await.unwrap();
        // Status follows the publication.
        wait_for("the mended value in status", || {
            let st = mirror.status();
            st.revision == r2 && st.decode_failures.is_empty()
        })
        .await;

        // A reconnect: the mirror's connection resets; the watch resumes.
        proxy.reset_all();
        wait_for("a reconnect", || {
            let st = mirror.status();
            // A new stream, opened after the old one was counted as lost.
            !st.reconnects.is_empty()
                && st.state == State::Ready
                && scrape(&registry).int("watch_streams_opened_total") >= 2
        })
        .await;
        let m = scrape(&registry);
        assert!(m.int("watch_streams_opened_total") >= 2, "{}", m.text);
        let reconnects = m.happened("reconnects");
        assert!(reconnects.values().sum::<u64>() >= 1, "{}", m.text);

        // A write outside the prefix: a progress reply reveals the server revision
        // (lag 1) before a read, once a reader waits, verifies it as a bookmark
        // (lag 0).
        let h = put(&etcd, "other/lag", "x").await;
        assert_eq!(h, r2 + 1);
        let lagging = eventually("the server revision", || {
            let m = scrape(&registry);
            (m.int("server_revision") == h).then_some(m)
        })
        .await;
        // Not yet a bookmark: nobody waits for it.
        assert_eq!(lagging.int("revision"), r2, "{}", lagging.text);
        assert_eq!(lagging.int("lag_revisions"), 1, "{}", lagging.text);
        assert_eq!(
            lagging.by_cause("progress_verifications", "bookmark"),
            0,
            "{}",
            lagging.text
        );
        mirror.snapshot_at_least(h, WAIT).await.unwrap();
        let m = scrape_at(&registry, h).await;
        assert_eq!(m.int("revision"), h);
        assert_eq!(m.int("lag_revisions"), 0);
        assert_eq!(
            m.by_cause("progress_verifications", "bookmark"),
            1,
            "{}",
            m.text
        );
        assert!(
            m.by_cause("rejected_responses", "untrusted_progress") >= 1,
            "{}",
            m.text
        );
        // A bookmark applies no event.
        assert_eq!(m.int("events_applied_total"), 16);

        // A compaction-triggered relist: cut the mirror off, change the prefix,
        // compact past the mirror's revision, heal.
        proxy.set(Fault::Blackhole);
        proxy.reset_all();
        put(&etcd, &format!("{P}a"), "v1").await;
        delete(&etcd, &format!("{P}b")).await;
        put(&etcd, &format!("{P}new"), "n").await;
        let compacted = put(&etcd, "other/compact", "x").await;
        cluster.compact(compacted).await.unwrap();
        proxy.heal();
        wait_for("a relist", || {
            let st = mirror.status();
            st.relists.contains_key(&ResyncReason::Compacted) && st.state == State::Ready
        })
        .await;
        let r3 = put(&etcd, &format!("{P}final"), "f").await;
        mirror.snapshot_at_least(r3, WAIT).await.unwrap();

        // Everything, against the status and what was done.
        let m = scrape_at(&registry, r3).await;
        let st = mirror.status();
        m.assert_described();
        // Only watch events count: 15, the mended value, the final put; the relist
        // applies its changes as one resync batch, not as events.
        assert_eq!(m.int("events_applied_total"), 17);
        assert_eq!(m.int("revisions_applied_total"), 15);
        assert_eq!(m.int("apply_seconds_count"), 15);
        assert_eq!(m.int("decode_errors_total"), 1);
        let reconnects = m.happened("reconnects");
        let relists = m.happened("relists");
        let reported = by_label(&st.reconnects, |c| c.as_str());
        assert_eq!(reconnects, reported, "{}", m.text);
        let reported = by_label(&st.relists, |c| c.as_str());
        assert_eq!(relists, reported, "{}", m.text);
        assert!(m.by_cause("relists", "compacted") >= 1, "{}", m.text);
        assert_eq!(m.by_cause("relists", "validation"), 0, "{}", m.text);
        // Cut off and reset twice: at least two resumes.
        assert!(reconnects.values().sum::<u64>() >= 2, "{}", m.text);
        // Every stream opened ended in a reconnect or a relist, but the current one;
        // at least: the first, after the reset, after the relist.
        let opened = m.int("watch_streams_opened_total") as u64;
        assert!(opened >= 3, "{}", m.text);
        assert!(
            opened <= 1 + reconnects.values().sum::<u64>() + relists.values().sum::<u64>(),
            "{}",
            m.text
        );
        assert_eq!(m.int("revision"), r3);
        assert_eq!(m.int("revision"), st.revision);
        assert_eq!(m.int("server_revision"), r3);
        assert_eq!(m.int("server_revision"), st.server_revision);
        assert_eq!(m.int("lag_revisions"), st.lag());
        assert_eq!(m.int("lag_revisions"), 0);
        assert_eq!(m.int("subscriber_lagged_total"), 1);
        assert_eq!(m.int("subscriber_resyncs_total"), 1);
        // The slow subscriber was dropped; later publications noticed.
        assert_eq!(m.int("subscribers"), 0);
        // Nothing was rejected but progress replies not yet confirmable; no
        // snapshot file is configured.
        assert!(m.happened("snapshot_file_writes").is_empty(), "{}", m.text);
        let rejected = m.happened("rejected_responses");
        assert_eq!(
            rejected.keys().collect::<Vec<_>>(),
            ["untrusted_progress"],
            "{}",
            m.text
        );
        assert_eq!(
            rejected["untrusted_progress"], st.untrusted_progress,
            "{}",
            m.text
        );
        assert_eq!(st.rejected_responses, 0);

        // And the mirror equals etcd, every value decoded from its bytes.
        assert_converged_utf8(&mirror, &etcd, &[]).await;
    })
    .await;
}
