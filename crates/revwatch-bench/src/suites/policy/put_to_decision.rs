//! End to end: a policy change acknowledged by the server, then a decision that
//! reflects it, against the embedded server and against etcd 3.4.
//!
//! A [`Policies`] (Cedar, default configuration) follows a mirror of a prefix holding
//! two files; each step puts the one that flips a decision (permit ↔ forbid of the
//! same request). From the put's acknowledgement, `decide` (default consistency) is
//! asked again at each change of the policy status (the active set is swapped before
//! the status is published, so no activation is missed and nothing spins) until the
//! decision flips; the decision must then be at the put's revision or later.
//!
//! The baseline, from the same puts: a raw watch on its own connection, receiving the
//! put's event. Both are timed from the put's send as well, since a raw event often
//! arrives before the acknowledgement; the per-put difference (event → decision) is
//! the cost of the mirror and the policy layer (debounce window, compile, swap).

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_proto::etcdserverpb::PutRequest;
use revwatch::client::{Client, WatchCreateRequest};
use revwatch::mirror::{ClientSource, Mirror, source::prefix_range_end};
use revwatch_policy::{Backend, Effect, Policies, PolicyConfig, Request};
use revwatch_testkit::etcd::EtcdCluster;
use tokio::{sync::mpsc, task::JoinSet};

use crate::{
    report::Report,
    stats::{Samples, quantile, ratio},
    suites::{embedded::EmbeddedChild, load},
};

const PREFIX: &str = "/bench/put-to-decision/";
const BASE_FILE: &str = "base.cedar";
const BASE: &str = r#"@id("base") permit(principal == User::"alice", action, resource);"#;
/// The file each step rewrites, and its two versions.
const FLIP_FILE: &str = "flip.cedar";
const ALLOW: &str =
    r#"@id("flip") permit(principal == User::"bob", action == Action::"write", resource);"#;
const DENY: &str =
    r#"@id("flip") forbid(principal == User::"bob", action == Action::"write", resource);"#;
/// Steps before measuring, to warm up connections, server and compiler caches.
const WARM_UP: usize = 10;
/// Longest wait for one event or decision before the run is declared broken.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Puts the figures of both targets into `report`; the headline
/// `put_to_decision_p50_us` / `_p99_us` are etcd's.
pub async fn measure(quick: bool, report: &mut Report) -> anyhow::Result<()> {
    let steps = if quick { 200 } else { 1_000 };
    let default_config = PolicyConfig::new(Backend::Cedar);
    let debounce = default_config.debounce;

    let embedded = EmbeddedChild::start().await?;
    let on_embedded = steps_on(&embedded.endpoint(), default_config.clone(), steps).await?;
    drop(embedded);
    let etcd = EtcdCluster::single().await.context("starting etcd")?;
    let on_etcd = steps_on(&etcd.endpoint(0), default_config, steps).await?;
    // The same against etcd without a debounce window: how much of the latency it is.
    let no_debounce = PolicyConfig::new(Backend::Cedar).debounce(Duration::ZERO);
    let on_etcd_undebounced = steps_on(&etcd.endpoint(0), no_debounce, steps).await?;

    for (target, steps) in [
        ("embedded", &on_embedded),
        ("etcd", &on_etcd),
        ("etcd_no_debounce", &on_etcd_undebounced),
    ] {
        steps.report(report, target);
    }
    report.figure("put_to_decision_p50_us", on_etcd.from_ack.p50());
    report.figure("put_to_decision_p99_us", on_etcd.from_ack.p99());
    report.figure("put_to_decision_debounce_ms", debounce.as_secs_f64() * 1e3);
    report.figure("put_to_decision_samples", steps as f64);
    Ok(())
}

/// The latencies of one target's steps.
struct Steps {
    /// Put acknowledged → decision reflects it.
    from_ack: Samples,
    /// Put sent → decision reflects it.
    from_send: Samples,
    /// Put sent → raw watch event received.
    raw: Samples,
    /// Per put, decision minus raw event, in µs.
    extra_us: Vec<f64>,
}

impl Steps {
    fn report(&self, report: &mut Report, target: &str) {
        let name = |figure: &str| format!("put_to_decision_{target}_{figure}");
        report.figure(&name("p50_us"), self.from_ack.p50());
        report.figure(&name("p99_us"), self.from_ack.p99());
        report.figure(&name("from_send_p50_us"), self.from_send.p50());
        report.figure(&name("from_send_p99_us"), self.from_send.p99());
        report.figure(&format!("raw_watch_{target}_p50_us"), self.raw.p50());
        report.figure(&format!("raw_watch_{target}_p99_us"), self.raw.p99());
        // Ours over the baseline, both from the put's send.
        report.figure(
            &name("vs_raw_watch_p50_ratio"),
            ratio(self.from_send.p50(), self.raw.p50()),
        );
        report.figure(
            &format!("policy_layer_{target}_p50_us"),
            quantile(&self.extra_us, 0.5),
        );
        report.figure(
            &format!("policy_layer_{target}_p99_us"),
            quantile(&self.extra_us, 0.99),
        );
    }
}

/// `steps` measured flips (after [`WARM_UP`]) on the server at `endpoint`.
async fn steps_on(endpoint: &str, config: PolicyConfig, steps: usize) -> anyhow::Result<Steps> {
    let writer = load::connect(endpoint).await?;
    put(&writer, BASE_FILE, BASE).await?;
    put(&writer, FLIP_FILE, DENY).await?;

    // Each reader on its own connection, as in separate processes.
    let mirror = Mirror::builder(PREFIX)
        .start(ClientSource::new(load::connect(endpoint).await?))
        .await?;
    let policies = Policies::start(mirror.clone(), PREFIX, config);
    policies
        .wait_active(STEP_TIMEOUT)
        .await
        .context("no policy set active in time")?;
    let mut readers = JoinSet::new();
    let mut raw = raw_arrivals(endpoint, &mut readers).await?;

    let question = Request::new(r#"User::"bob""#, r#"Action::"write""#, r#"Doc::"plan""#);
    let mut status = policies.status_changes();
    let mut out = Steps {
        from_ack: Samples::with_capacity(steps),
        from_send: Samples::with_capacity(steps),
        raw: Samples::with_capacity(steps),
        extra_us: Vec::with_capacity(steps),
    };
    // The set starts with the forbid: each step flips the decision.
    for step in 0..WARM_UP + steps {
        let (text, effect) = if step % 2 == 0 {
            (ALLOW, Effect::Allow)
        } else {
            (DENY, Effect::Deny)
        };
        let sent = Instant::now();
        let revision = put(&writer, FLIP_FILE, text).await?;
        let acked = Instant::now();
        let deadline = acked + STEP_TIMEOUT;
        let decided = loop {
            // Marked seen before deciding: an activation after this wakes the wait.
            status.borrow_and_update();
            let decision = policies
                .decide(&question)
                .map_err(|e| anyhow::anyhow!("deciding at step {step}: {e}"))?;
            if decision.effect == effect {
                let at = Instant::now();
                anyhow::ensure!(
                    decision.revision >= revision,
                    "decided {effect:?} at revision {} before the put of revision {revision}",
                    decision.revision
                );
                break at;
            }
            tokio::time::timeout_at(deadline.into(), status.changed())
                .await
                .with_context(|| format!("revision {revision} not decided in time"))?
                .context("the policy pipeline stopped")?;
        };
        let raw_at = match arrival(&mut raw, revision).await {
            Ok(at) => at,
            // A reader that stopped knows why better than its empty channel.
            Err(e) => match readers.try_join_next() {
                Some(Ok(Err(cause))) => return Err(cause.context(e)),
                _ => return Err(e),
            },
        };
        if step >= WARM_UP {
            out.from_ack.push(decided.saturating_duration_since(acked));
            out.from_send.push(decided.saturating_duration_since(sent));
            out.raw.push(raw_at.saturating_duration_since(sent));
            let extra = match decided.checked_duration_since(raw_at) {
                Some(later) => later.as_secs_f64(),
                None => -raw_at.duration_since(decided).as_secs_f64(),
            };
            out.extra_us.push(extra * 1e6);
        }
    }
    readers.shutdown().await;
    drop(policies);
    mirror.shutdown().await.context("stopping the mirror")?;
    Ok(out)
}

/// Puts `PREFIX + file`: the revision of the write.
async fn put(client: &Client, file: &str, text: &str) -> anyhow::Result<i64> {
    let response = client
        .put(PutRequest {
            key: format!("{PREFIX}{file}").into_bytes(),
            value: text.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("putting {file}"))?;
    Ok(response.header.context("put without header")?.revision)
}

/// A raw watch on the prefix from now on, on its own connection, stamping each
/// event's arrival in a task of `readers`.
async fn raw_arrivals(
    endpoint: &str,
    readers: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<mpsc::UnboundedReceiver<(i64, Instant)>> {
    let client = load::connect(endpoint).await?;
    let mut watch = client
        .watch(WatchCreateRequest {
            key: PREFIX.into(),
            range_end: prefix_range_end(PREFIX.as_bytes()),
            ..Default::default()
        })
        .await?;
    let created = watch
        .message()
        .await?
        .context("watch closed before created")?;
    anyhow::ensure!(created.created, "first watch reply was not `created`");
    let (tx, rx) = mpsc::unbounded_channel();
    readers.spawn(async move {
        // Owns the client, so the connection lives as long as the watch.
        let _client = client;
        while let Some(msg) = watch.message().await? {
            let at = Instant::now();
            for kv in msg.events.iter().filter_map(|e| e.kv.as_ref()) {
                let _ = tx.send((kv.mod_revision, at));
            }
        }
        anyhow::bail!("raw watch closed")
    });
    Ok(rx)
}

/// When `revision` arrived at the raw watch: skips anything older, fails on a gap.
async fn arrival(
    rx: &mut mpsc::UnboundedReceiver<(i64, Instant)>,
    revision: i64,
) -> anyhow::Result<Instant> {
    loop {
        let (rev, at) = tokio::time::timeout(STEP_TIMEOUT, rx.recv())
            .await
            .with_context(|| format!("revision {revision} not seen in time"))?
            .context("raw watch reader stopped")?;
        anyhow::ensure!(rev <= revision, "saw {rev} while waiting for {revision}");
        if rev == revision {
            return Ok(at);
        }
    }
}
