//! `mirror`: the mirror against the plain alternatives, in one run.
//!
//! * **Propagation.** One put at a time on a single-member etcd; from the put's
//!   acknowledgement (and, under `_from_send_` names, from its send), the time until
//!   a raw watch (its own connection) receives the event, and the time until the
//!   mirror's current snapshot holds the new revision, as seen by a subscriber that
//!   wakes on the batch and checks `Mirror::snapshot`. An arrival before the
//!   acknowledgement counts as 0. `visible_extra_*` is, per put, mirror arrival
//!   minus raw arrival: the mirror's own cost, whatever the clock's start.
//! * **Apply.** Events per second through the mirror from an in-process feed (see
//!   [`apply`]), on one core: with one subscriber consuming every batch (the
//!   headline), and quiet (no subscriber); against a persistent map published per
//!   revision behind an atomic pointer with a consumer reading every version, and a
//!   naive snapshotting map that clones a `HashMap` per revision.
//! * **Relist.** A mirror that holds a populated prefix, cut off through a fault
//!   proxy while keys change and etcd is compacted past its revision, then healed:
//!   the time from the relist's start until its resync batch (which must hold
//!   exactly the changed keys) reaches a subscriber, and the peak RSS of the relist
//!   alone against the steady RSS of the listed mirror; against a raw paginated
//!   range of the same keys with the same page size. Each side runs in a child
//!   process (see [`relist`]) so that its RSS is its own.

mod apply;
mod relist;

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_proto::etcdserverpb::PutRequest;
use revwatch::client::WatchCreateRequest;
use revwatch::mirror::{ClientSource, Mirror, Update, source::prefix_range_end};
use revwatch_testkit::etcd::EtcdCluster;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::load;
use crate::{
    report::Report,
    stats::{Samples, median, quantile, ratio},
};

pub use relist::{CHILD_ARG, child_main};

const PROPAGATION_PREFIX: &str = "/bench/prop/";
/// Puts before measuring, to warm up connections and etcd.
const WARM_UP: usize = 50;
/// Longest wait for one event or batch before the run is declared broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The apply target with a subscriber, per core.
const APPLY_TARGET_EVENTS_PER_S: f64 = 1_000_000.0;

/// Sizes of one run.
struct Plan {
    propagation_puts: usize,
    apply_rounds: usize,
    /// Events (one per revision) per apply round, on every path but the naive one.
    apply_events: usize,
    naive_revisions: usize,
    relist_keys: usize,
    relist_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                propagation_puts: 1_000,
                apply_rounds: 7,
                apply_events: 200_000,
                naive_revisions: 1_000,
                relist_keys: 100_000,
                relist_rounds: 3,
            }
        } else {
            Plan {
                propagation_puts: 10_000,
                apply_rounds: 9,
                apply_events: 1_000_000,
                naive_revisions: 3_000,
                relist_keys: 1_000_000,
                relist_rounds: 3,
            }
        }
    }
}

pub async fn run(quick: bool) -> anyhow::Result<Report> {
    let plan = Plan::new(quick);
    let etcd = EtcdCluster::single().await.context("starting etcd")?;
    let endpoint = etcd.endpoint(0);
    let mut report = Report::new("mirror");

    let prop = propagation(&endpoint, plan.propagation_puts).await?;
    let (visible, raw) = (&prop.mirror, &prop.raw);
    report.figure("mirror_visible_p50_us", visible.from_ack.p50());
    report.figure("mirror_visible_p99_us", visible.from_ack.p99());
    report.figure("raw_watch_p50_us", raw.from_ack.p50());
    report.figure("raw_watch_p99_us", raw.from_ack.p99());
    report.figure("mirror_visible_from_send_p50_us", visible.from_send.p50());
    report.figure("mirror_visible_from_send_p99_us", visible.from_send.p99());
    report.figure("raw_watch_from_send_p50_us", raw.from_send.p50());
    report.figure("raw_watch_from_send_p99_us", raw.from_send.p99());
    // From the send: from the acknowledgement the raw watch's time is often near 0
    // (its event may arrive first), which makes a ratio meaningless.
    let (visible, raw) = (&visible.from_send, &raw.from_send);
    report.figure("visible_p50_ratio", ratio(visible.p50(), raw.p50()));
    report.figure("visible_p99_ratio", ratio(visible.p99(), raw.p99()));
    report.figure("visible_extra_p50_us", quantile(&prop.extra_us, 0.5));
    report.figure("visible_extra_p99_us", quantile(&prop.extra_us, 0.99));
    report.figure("samples_propagation", visible.len() as f64);

    println!(
        "mirror apply conditions: {} keys, 1 put per revision, {} events per round, \
         one core (mirror and subscriber on one current-thread runtime), \
         subscribed path: 1 subscriber consuming every batch's changes, replies read {} \
         at a time; snapshot-reader path: the same, reading every batch's snapshot too; \
         quiet path: no subscriber; median of {} rounds",
        apply::KEYS,
        plan.apply_events,
        apply::REPLIES_PER_READ,
        plan.apply_rounds
    );
    let (mut ours, mut readers, mut quiet, mut persistent, mut naive) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..plan.apply_rounds {
        use apply::Path::{Quiet, SnapshotReader, Subscribed};
        ours.push(apply::mirror_events_per_s(plan.apply_events, Subscribed).await?);
        readers.push(apply::mirror_events_per_s(plan.apply_events, SnapshotReader).await?);
        quiet.push(apply::mirror_events_per_s(plan.apply_events, Quiet).await?);
        persistent.push(apply::persistent_events_per_s(plan.apply_events).await?);
        naive.push(apply::naive_clone_events_per_s(plan.naive_revisions).await?);
    }
    // The machine's speed drifts between rounds: the spread goes with the median.
    report.figure("apply_events_per_s_min", quantile(&ours, 0.0));
    report.figure("apply_events_per_s_max", quantile(&ours, 1.0));
    let ours = median(&ours);
    let persistent = median(&persistent);
    report.figure("apply_events_per_s", ours);
    report.figure("apply_quiet_events_per_s", median(&quiet));
    report.figure("persistent_apply_events_per_s", persistent);
    report.figure("apply_ratio", ratio(ours, persistent));
    let readers = median(&readers);
    report.figure("apply_snapshot_reader_events_per_s", readers);
    report.figure("apply_snapshot_reader_ratio", ratio(readers, persistent));
    report.figure(
        "apply_target_met",
        if ours >= APPLY_TARGET_EVENTS_PER_S {
            1.0
        } else {
            0.0
        },
    );
    let naive = median(&naive);
    report.figure("naive_clone_apply_events_per_s", naive);
    report.figure("apply_vs_naive_ratio", ratio(ours, naive));
    report.figure("apply_keys", apply::KEYS as f64);
    report.figure("apply_events_per_revision", 1.0);
    report.figure("apply_subscribers", 1.0);
    report.figure("apply_cores", 1.0);

    let relist = relist::compare(&endpoint, plan.relist_keys, plan.relist_rounds).await?;
    report.figure("relist_keys", plan.relist_keys as f64);
    report.figure("relist_s", relist.mirror_s);
    report.figure("raw_range_s", relist.raw_s);
    report.figure("relist_ratio", ratio(relist.mirror_s, relist.raw_s));
    report.figure("relist_peak_rss_mb", relist.mirror_peak_mb);
    report.figure("steady_rss_mb", relist.mirror_steady_mb);
    report.figure(
        "relist_peak_to_steady_ratio",
        ratio(relist.mirror_peak_mb, relist.mirror_steady_mb),
    );
    report.figure("raw_range_peak_rss_mb", relist.raw_peak_mb);
    report.figure("relist_changed_keys", relist::CHANGED_KEYS as f64);
    report.figure("relist_from_heal_s", relist.mirror_from_heal_s);
    report.figure("initial_list_s", relist.mirror_initial_list_s);
    Ok(report)
}

/// One reader's latencies, from the put's acknowledgement and from its send.
struct Latency {
    from_ack: Samples,
    from_send: Samples,
}

impl Latency {
    fn with_capacity(n: usize) -> Self {
        Latency {
            from_ack: Samples::with_capacity(n),
            from_send: Samples::with_capacity(n),
        }
    }

    /// An arrival before the acknowledgement counts as 0 from it.
    fn push(&mut self, sent: Instant, acked: Instant, at: Instant) {
        self.from_ack.push(at.saturating_duration_since(acked));
        self.from_send.push(at.saturating_duration_since(sent));
    }
}

/// Latencies from the same puts.
struct Propagation {
    /// Put → revision visible in the mirror's snapshot.
    mirror: Latency,
    /// Put → event received on a raw watch.
    raw: Latency,
    /// Per put, mirror minus raw arrival, in µs (negative when the mirror's
    /// connection happened to be read first): the mirror's own cost, without the
    /// noise both share.
    extra_us: Vec<f64>,
}

async fn propagation(endpoint: &str, n: usize) -> anyhow::Result<Propagation> {
    let writer = load::connect(endpoint).await?;
    // Each reader on its own connection, as in separate processes.
    let mirror = Mirror::builder(PROPAGATION_PREFIX)
        .start(ClientSource::new(load::connect(endpoint).await?))
        .await?;
    tokio::time::timeout(EVENT_TIMEOUT, mirror.wait_ready())
        .await
        .context("mirror not ready in time")??;
    let raw_client = load::connect(endpoint).await?;
    let mut raw = raw_client
        .watch(WatchCreateRequest {
            key: PROPAGATION_PREFIX.into(),
            range_end: prefix_range_end(PROPAGATION_PREFIX.as_bytes()),
            ..Default::default()
        })
        .await?;
    let created = raw
        .message()
        .await?
        .context("watch closed before created")?;
    anyhow::ensure!(created.created, "first watch reply was not `created`");

    // Each reader stamps arrivals in its own task, so neither waits for the other.
    // Dropping the set aborts both tasks, also on an early error return.
    let mut readers = JoinSet::<anyhow::Result<()>>::new();
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel();
    readers.spawn(async move {
        while let Some(msg) = raw.message().await? {
            let at = Instant::now();
            for kv in msg.events.iter().filter_map(|e| e.kv.as_ref()) {
                let _ = raw_tx.send((kv.mod_revision, at));
            }
        }
        anyhow::bail!("raw watch closed")
    });
    let (mirror_tx, mut mirror_rx) = mpsc::unbounded_channel();
    let mut sub = mirror.subscribe();
    let reader = mirror.clone();
    readers.spawn(async move {
        while let Some(update) = sub.recv().await {
            let Update::Batch(batch) = update else {
                continue;
            };
            // What a reader calling `snapshot()` now sees (this prefix only gets
            // puts, so a newer snapshot still shows at least this revision).
            let snap = reader.snapshot();
            let visible = batch.changes.iter().all(|c| {
                snap.get(&c.key)
                    .is_some_and(|e| e.mod_revision >= batch.revision)
            });
            let at = Instant::now();
            anyhow::ensure!(
                visible,
                "batch {} not visible in the snapshot",
                batch.revision
            );
            let _ = mirror_tx.send((batch.revision, at));
        }
        anyhow::bail!("subscription ended")
    });

    let mut out = Propagation {
        mirror: Latency::with_capacity(n),
        raw: Latency::with_capacity(n),
        extra_us: Vec::with_capacity(n),
    };
    let value = vec![b'x'; 128];
    for i in 0..WARM_UP + n {
        let sent = Instant::now();
        let resp = writer
            .put(PutRequest {
                key: format!("{PROPAGATION_PREFIX}{}", i % 100).into_bytes(),
                value: value.clone(),
                ..Default::default()
            })
            .await?;
        let acked = Instant::now();
        let revision = resp.header.context("put without header")?.revision;
        let arrived = async {
            let raw_at = arrival(&mut raw_rx, revision).await.context("raw watch")?;
            let mirror_at = arrival(&mut mirror_rx, revision).await.context("mirror")?;
            anyhow::Ok((raw_at, mirror_at))
        };
        let (raw_at, mirror_at) = match arrived.await {
            Ok(at) => at,
            // A reader that stopped knows why better than its empty channel.
            Err(e) => match readers.try_join_next() {
                Some(Ok(Err(cause))) => return Err(cause.context(e)),
                _ => return Err(e),
            },
        };
        if i >= WARM_UP {
            out.raw.push(sent, acked, raw_at);
            out.mirror.push(sent, acked, mirror_at);
            let extra = match mirror_at.checked_duration_since(raw_at) {
                Some(later) => later.as_secs_f64(),
                None => -raw_at.duration_since(mirror_at).as_secs_f64(),
            };
            out.extra_us.push(extra * 1e6);
        }
    }
    readers.shutdown().await;
    Ok(out)
}

/// When `revision` arrived at a reader: skips anything older, fails on a gap.
async fn arrival(
    rx: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
    revision: i64,
) -> anyhow::Result<Instant> {
    loop {
        let (rev, at) = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
            .await
            .with_context(|| format!("revision {revision} not seen in time"))?
            .context("reader stopped")?;
        anyhow::ensure!(rev <= revision, "saw {rev} while waiting for {revision}");
        if rev == revision {
            return Ok(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrival_before_the_acknowledgement_counts_as_zero_from_it() {
        let sent = Instant::now();
        let arrived = sent + Duration::from_micros(300);
        let acked = sent + Duration::from_micros(500);
        let mut l = Latency::with_capacity(2);
        l.push(sent, acked, arrived);
        l.push(sent, acked, acked + Duration::from_micros(100));
        let near = |got: f64, want: f64| assert!((got - want).abs() < 1e-6, "{got} != {want}");
        near(l.from_ack.quantile(0.0), 0.0);
        near(l.from_ack.quantile(1.0), 100.0);
        near(l.from_send.quantile(0.0), 300.0);
        near(l.from_send.quantile(1.0), 600.0);
    }
}
