//! Relist: a mirror that already holds a populated prefix relists it after a
//! compaction, against a raw paginated range of the same keys with the same page
//! size.
//!
//! Each measurement runs in a child process of this binary (hidden argument
//! [`CHILD_ARG`]), because peak RSS (`VmHWM`) is process-wide.
//!
//! The **raw** child connects, then reads the pages exactly as the mirror does (the
//! first page at the current revision, the others pinned to it, each starting just
//! after the previous page's last key) and keeps the key-values: `raw_range_s` is
//! first request to last page, its peak RSS is the whole child's.
//!
//! The **mirror** child forces a relist the way it happens in production:
//!
//! 1. Its mirror reaches etcd through a [`FaultProxy`] and lists the prefix until
//!    ready. After [`SETTLE`], `VmRSS` is the steady RSS (`steady_rss_mb`): the
//!    process holding the mirrored state.
//! 2. The proxy is blackholed and its connections reset: the mirror's watch breaks
//!    and its retries hang. The child waits until the mirror reports the disconnect.
//! 3. With a direct client it changes [`CHANGED_KEYS`] keys (updates, deletes and
//!    creates; the key count stays the same) and compacts etcd physically at the
//!    last revision, past the mirror's.
//! 4. It resets `VmHWM` (writes `5` to `/proc/self/clear_refs`) and heals the
//!    proxy. The mirror's resumed watch is refused as compacted and it relists
//!    (cause: compaction).
//! 5. `relist_s` runs from the relist's start (the mirror counts it in its status
//!    just before sending the first page request, on a connection that is already
//!    up) until a subscriber receives the resync batch. That is the raw range's span
//!    (connected beforehand, first request to last page) plus what the mirror does
//!    beyond it: decoding, diffing against the held state, publishing. Heal to
//!    resync (`relist_from_heal_s`) is reported too, but it adds the watch's
//!    reconnection and retry backoff, so it is not the one compared.
//! 6. `VmHWM` read on receipt of the resync batch is the relist's peak
//!    (`relist_peak_rss_mb`): the held state plus whatever the relist needed on top.
//!
//! The resync batch must hold exactly the changed keys (puts with the new values
//! for updated and created keys, deletes for deleted ones), and the mirror the same
//! number of keys as before.

use std::any::Any;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RequestOp, TxnRequest, request_op::Request,
};
use etcd_proto::mvccpb::KeyValue;
use revwatch::client::{Client, ClientConfig, CompactionRequest, RangeRequest};
use revwatch::mirror::{
    Batch, ChangeKind, ClientSource, Mirror, MirrorConfig, ResyncReason, State, Status, Update,
    source::prefix_range_end,
};
use revwatch_testkit::proxy::{Fault, FaultProxy};
use serde::{Deserialize, Serialize};

use crate::stats::median;
use crate::suites::load;

/// Hidden subcommand: `__mirror-relist MODE ENDPOINT PREFIX PAGE_SIZE KEYS ROUND`.
pub const CHILD_ARG: &str = "__mirror-relist";
const PREFIX: &str = "/bench/relist/";
const PAGE_SIZE: i64 = 1000;
const VALUE_LEN: usize = 100;
/// Concurrent writers loading the keys.
const LOADERS: usize = 4;
/// Wait after the list before reading the steady RSS, for transients to be freed.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest one child may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the mirror to notice the disconnect (its stall timeout is 10 s).
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A physical compaction of a million keys takes etcd longer than a client's default
/// request timeout.
const COMPACT_TIMEOUT: Duration = Duration::from_secs(120);
/// Existing keys each mirror child updates while the mirror is cut off.
const UPDATED: usize = 500;
/// Existing keys each mirror child deletes, and new keys it creates.
const DELETED: usize = 250;
/// Keys the resync batch of one mirror child holds.
pub const CHANGED_KEYS: usize = UPDATED + 2 * DELETED;
/// Operations per txn of the changes (distinct keys, one revision each).
const PER_TXN: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A listed mirror relisting after a compaction.
    Mirror,
    /// A raw paginated range, keeping the key-values.
    Raw,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Raw => "raw",
        }
    }
}

/// What a child prints, as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    /// Relist start → resync batch (mirror); first page request → last page (raw).
    seconds: f64,
    keys: usize,
    /// After the (first) list and [`SETTLE`].
    steady_rss_mb: f64,
    /// During the relist alone (mirror); since the child started (raw).
    peak_rss_mb: f64,
    /// Mirror only: proxy healed → resync batch.
    #[serde(default)]
    from_heal_s: Option<f64>,
    /// Mirror only: the fresh mirror's first list, start → ready.
    #[serde(default)]
    initial_list_s: Option<f64>,
}

/// Medians over the rounds.
pub struct Comparison {
    pub mirror_s: f64,
    pub raw_s: f64,
    pub mirror_peak_mb: f64,
    pub mirror_steady_mb: f64,
    pub raw_peak_mb: f64,
    pub mirror_from_heal_s: f64,
    pub mirror_initial_list_s: f64,
}

/// Loads `keys` keys, then alternates raw and mirror children for `rounds` rounds.
pub async fn compare(endpoint: &str, keys: usize, rounds: usize) -> anyhow::Result<Comparison> {
    // Each mirror child updates and deletes its own loaded keys (see `changes`).
    anyhow::ensure!(
        rounds * (UPDATED + DELETED) <= keys,
        "{rounds} relist rounds need at least {} keys, got {keys}",
        rounds * (UPDATED + DELETED)
    );
    load::load_keys_concurrently(endpoint, PREFIX, keys, VALUE_LEN, LOADERS).await?;
    let (mut mirror, mut raw) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate who goes first, so neither always follows the other.
        let order = if round % 2 == 0 {
            [Mode::Raw, Mode::Mirror]
        } else {
            [Mode::Mirror, Mode::Raw]
        };
        for mode in order {
            let m = spawn_child(mode, endpoint, keys, round).await?;
            anyhow::ensure!(
                m.keys == keys,
                "{} child saw {} keys, expected {keys}",
                mode.as_str(),
                m.keys
            );
            match mode {
                Mode::Mirror => mirror.push(m),
                Mode::Raw => raw.push(m),
            }
        }
    }
    let med =
        |v: &[Measured], f: fn(&Measured) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    Ok(Comparison {
        mirror_s: med(&mirror, |m| m.seconds),
        raw_s: med(&raw, |m| m.seconds),
        mirror_peak_mb: med(&mirror, |m| m.peak_rss_mb),
        mirror_steady_mb: med(&mirror, |m| m.steady_rss_mb),
        raw_peak_mb: med(&raw, |m| m.peak_rss_mb),
        mirror_from_heal_s: med(&mirror, |m| m.from_heal_s.unwrap_or(f64::NAN)),
        mirror_initial_list_s: med(&mirror, |m| m.initial_list_s.unwrap_or(f64::NAN)),
    })
}

async fn spawn_child(
    mode: Mode,
    endpoint: &str,
    keys: usize,
    round: usize,
) -> anyhow::Result<Measured> {
    let child = tokio::process::Command::new(this_binary()?)
        .args([
            CHILD_ARG,
            mode.as_str(),
            endpoint,
            PREFIX,
            &PAGE_SIZE.to_string(),
            &keys.to_string(),
            &round.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawning the relist child")?;
    let out = tokio::time::timeout(CHILD_TIMEOUT, child.wait_with_output())
        .await
        .context("relist child timed out")??;
    anyhow::ensure!(
        out.status.success(),
        "relist child ({}) failed: {}",
        mode.as_str(),
        out.status
    );
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("relist child printed {line:?}"))
}

/// This very binary. Through /proc where it exists: that link still works when the
/// file was rebuilt (replaced) while the suite runs.
fn this_binary() -> std::io::Result<PathBuf> {
    let link = Path::new("/proc/self/exe");
    if link.exists() {
        Ok(link.to_path_buf())
    } else {
        std::env::current_exe()
    }
}

/// The child's body: measure one list or relist, print [`Measured`] as JSON.
pub async fn child_main(args: &[String]) -> anyhow::Result<()> {
    let [mode, endpoint, prefix, page_size, keys, round] = args else {
        anyhow::bail!("usage: {CHILD_ARG} mirror|raw ENDPOINT PREFIX PAGE_SIZE KEYS ROUND");
    };
    let page_size: i64 = page_size.parse().context("PAGE_SIZE")?;
    let expected: usize = keys.parse().context("KEYS")?;
    let round: usize = round.parse().context("ROUND")?;
    let measured = match mode.as_str() {
        "mirror" => {
            let plan = RelistPlan {
                endpoint,
                prefix,
                page_size,
                keys: expected,
                round,
            };
            tokio::time::timeout(CHILD_TIMEOUT, mirror_relist(plan))
                .await
                .context("mirror relist timed out")??
        }
        "raw" => raw_child(endpoint, prefix, page_size, expected).await?,
        other => anyhow::bail!("unknown mode {other:?}"),
    };
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// One raw paginated range of the prefix.
async fn raw_child(
    endpoint: &str,
    prefix: &str,
    page_size: i64,
    expected: usize,
) -> anyhow::Result<Measured> {
    let client = load::connect(endpoint).await?;
    let started = Instant::now();
    let kvs = raw_list(&client, prefix.as_bytes(), page_size).await?;
    let seconds = started.elapsed().as_secs_f64();
    let keys = kvs.len();
    anyhow::ensure!(keys == expected, "listed {keys} keys, expected {expected}");
    // What was listed stays alive until the steady RSS is read.
    let _held: Box<dyn Any> = Box::new(kvs);
    tokio::time::sleep(SETTLE).await;
    let me = std::process::id();
    Ok(Measured {
        seconds,
        keys,
        steady_rss_mb: load::rss_mb(me)?,
        peak_rss_mb: load::peak_rss_mb(me)?,
        from_heal_s: None,
        initial_list_s: None,
    })
}

/// What the mirror child works on.
struct RelistPlan<'a> {
    endpoint: &'a str,
    prefix: &'a str,
    page_size: i64,
    /// Keys under the prefix, before and after the changes.
    keys: usize,
    /// Which round this is: picks keys no earlier round touched.
    round: usize,
}

/// The changes of one round, key → new value (`None`: deleted). Round `r` updates
/// loaded keys from the bottom, deletes loaded keys from the top, and creates keys
/// of its own, so no two rounds touch the same key and the count stays the same.
fn planned_changes(plan: &RelistPlan<'_>) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let (prefix, r, n) = (plan.prefix, plan.round, plan.keys);
    let value = format!("{:-<VALUE_LEN$}", format!("relist-round-{r}-")).into_bytes();
    let loaded = |i: usize| format!("{prefix}{i:08}").into_bytes();
    let updated = (r * UPDATED..(r + 1) * UPDATED).map(|i| (loaded(i), Some(value.clone())));
    let deleted = (r * DELETED..(r + 1) * DELETED).map(|i| (loaded(n - 1 - i), None));
    let created = (0..DELETED).map(|i| {
        let key = format!("{prefix}new-{r:04}-{i:05}").into_bytes();
        (key, Some(value.clone()))
    });
    updated.chain(deleted).chain(created).collect()
}

/// Applies `changes` in txns of [`PER_TXN`]; returns the last revision.
async fn apply_changes(
    client: &Client,
    changes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> anyhow::Result<i64> {
    let ops: Vec<RequestOp> = changes
        .iter()
        .map(|(key, value)| RequestOp {
            request: Some(match value {
                Some(value) => Request::RequestPut(PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                }),
                None => Request::RequestDeleteRange(DeleteRangeRequest {
                    key: key.clone(),
                    ..Default::default()
                }),
            }),
        })
        .collect();
    let mut revision = 0;
    for chunk in ops.chunks(PER_TXN) {
        let resp = client
            .txn(TxnRequest {
                success: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .context("changing keys")?;
        revision = resp.header.context("txn without header")?.revision;
    }
    Ok(revision)
}

/// The mirror child: list, cut off, change and compact, heal, measure the relist.
async fn mirror_relist(plan: RelistPlan<'_>) -> anyhow::Result<Measured> {
    let upstream: SocketAddr = plan
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("etcd endpoint {:?} is not http://IP:PORT", plan.endpoint))?;
    let direct_config =
        ClientConfig::new([plan.endpoint.to_owned()]).with_request_timeout(COMPACT_TIMEOUT);
    let direct = Client::connect(direct_config)
        .await
        .with_context(|| format!("connecting to {}", plan.endpoint))?;
    let proxy = FaultProxy::start(upstream)
        .await
        .context("starting the fault proxy")?;
    let client = load::connect(&proxy.endpoint()).await?;
    let config = MirrorConfig::default().with_page_size(plan.page_size);

    // 1. The first list; the steady state.
    let started = Instant::now();
    let mirror = Mirror::builder(plan.prefix.as_bytes())
        .config(config)
        .start(ClientSource::new(client))
        .await?;
    mirror.wait_ready().await.context("mirror not ready")?;
    let initial_list_s = started.elapsed().as_secs_f64();
    let listed = mirror.snapshot().len();
    anyhow::ensure!(
        listed == plan.keys,
        "listed {listed} keys, expected {}",
        plan.keys
    );
    let mut sub = mirror.subscribe();
    // The first delivery is the current snapshot: nothing to keep.
    match sub.recv().await.context("subscription ended")? {
        Update::Snapshot(_) => {}
        other => anyhow::bail!("first delivery at {} was not a snapshot", other.revision()),
    }
    let listed_revision = mirror.snapshot().revision();
    tokio::time::sleep(SETTLE).await;
    let me = std::process::id();
    let steady_rss_mb = load::rss_mb(me)?;

    // 2. Cut the mirror off: existing connections reset, new ones hang.
    let mut status = mirror.status_changes();
    proxy.set(Fault::Blackhole);
    proxy.reset_all();
    tokio::time::timeout(
        DISCONNECT_TIMEOUT,
        status.wait_for(|s| s.state != State::Ready),
    )
    .await
    .context("the mirror did not notice the disconnect")?
    .context("mirror stopped")?;

    // 3. Change keys behind its back, and compact past its revision.
    let changes = planned_changes(&plan);
    let last = apply_changes(&direct, &changes).await?;
    direct
        .compact(CompactionRequest {
            revision: last,
            // Wait until etcd is done, so that it does not compact during the relist.
            physical: true,
        })
        .await
        .context("compacting")?;
    anyhow::ensure!(
        mirror.snapshot().revision() == listed_revision,
        "the mirror moved to {} while cut off",
        mirror.snapshot().revision()
    );

    // 4. Heal; the mirror relists.
    let relists_before = relists(&status.borrow_and_update());
    clear_peak_rss()?;
    let healed = Instant::now();
    proxy.heal();
    let mut relist_started = None;
    let (batch, received) = loop {
        tokio::select! {
            // Status first: the relist is counted before its first page is requested.
            biased;
            changed = status.changed(), if relist_started.is_none() => {
                changed.context("mirror stopped")?;
                if relists(&status.borrow_and_update()) > relists_before {
                    relist_started = Some(Instant::now());
                }
            }
            update = sub.recv() => match update.context("subscription ended")? {
                Update::Batch(batch) => break (batch, Instant::now()),
                Update::Progress(_) => {}
                Update::Snapshot(s) => anyhow::bail!("second snapshot at {}", s.revision()),
            },
        }
    };
    // 5.-6. Read the peak before anything else allocates.
    let peak_rss_mb = load::peak_rss_mb(me)?;
    let relist_started = relist_started.context("resync batch before the relist was counted")?;
    let seconds = received
        .saturating_duration_since(relist_started)
        .as_secs_f64();
    let from_heal_s = received.saturating_duration_since(healed).as_secs_f64();

    anyhow::ensure!(
        batch.resync == Some(ResyncReason::Compacted),
        "first batch after healing (revision {}) is {:?}, not a resync for compaction",
        batch.revision,
        batch.resync
    );
    anyhow::ensure!(
        batch.revision >= last,
        "resync at {} is below the last change {last}",
        batch.revision
    );
    check_resync(&batch, &changes)?;
    let compacted = mirror
        .status()
        .relists
        .get(&ResyncReason::Compacted)
        .copied()
        .unwrap_or(0);
    anyhow::ensure!(compacted >= 1, "no relist counted for compaction");
    let keys = mirror.snapshot().len();
    anyhow::ensure!(
        keys == plan.keys,
        "relisted {keys} keys, expected {}",
        plan.keys
    );
    Ok(Measured {
        seconds,
        keys,
        steady_rss_mb,
        peak_rss_mb,
        from_heal_s: Some(from_heal_s),
        initial_list_s: Some(initial_list_s),
    })
}

/// Relists so far, by any cause.
fn relists(status: &Status) -> u64 {
    status.relists.values().sum()
}

/// The resync batch holds exactly `changes`: a put with the new value for each
/// updated or created key, a delete for each deleted one, nothing else.
fn check_resync(
    batch: &Batch<bytes::Bytes>,
    changes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        batch.changes.len() == changes.len(),
        "resync holds {} changes, expected {}",
        batch.changes.len(),
        changes.len()
    );
    for change in &batch.changes {
        let key = String::from_utf8_lossy(&change.key);
        let expected = changes
            .get(change.key.as_ref())
            .with_context(|| format!("resync changes {key}, which was not changed"))?;
        match (&change.kind, expected) {
            (ChangeKind::Put { entry, .. }, Some(value)) => anyhow::ensure!(
                entry.raw.as_ref() == value.as_slice(),
                "resync puts a stale value for {key}"
            ),
            (ChangeKind::Delete { .. }, None) => {}
            (ChangeKind::Put { .. }, None) => anyhow::bail!("resync puts {key}, which was deleted"),
            (ChangeKind::Delete { .. }, Some(_)) => {
                anyhow::bail!("resync deletes {key}, which was put")
            }
        }
    }
    Ok(())
}

/// Resets this process's peak RSS (`VmHWM`) to its current RSS (Linux).
fn clear_peak_rss() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting VmHWM via /proc/self/clear_refs")
}

/// Every key under `prefix`, paginated like the mirror's list.
async fn raw_list(client: &Client, prefix: &[u8], page_size: i64) -> anyhow::Result<Vec<KeyValue>> {
    let range_end = prefix_range_end(prefix);
    let mut kvs = Vec::new();
    let mut key = prefix.to_vec();
    let mut revision = 0;
    loop {
        let page = client
            .range(RangeRequest {
                key,
                range_end: range_end.clone(),
                limit: page_size,
                revision,
                ..Default::default()
            })
            .await?;
        if revision == 0 {
            revision = page.header.context("range without header")?.revision;
        }
        let more = page.more;
        kvs.extend(page.kvs);
        let Some(last) = kvs.last().filter(|_| more) else {
            return Ok(kvs);
        };
        // The smallest key after the last one listed.
        key = last.key.clone();
        key.push(0);
    }
}
