//! Apply throughput from an in-process feed, with no network.
//!
//! The feed is a [`Source`] serving synthetic responses: a prefix of [`KEYS`] keys
//! listed at one revision, then a watch whose replies each carry one put of one
//! revision to a pseudo-random key (the live shape: etcd sends each revision as it
//! commits). Each reply is built when the mirror asks for it, with fresh key and value
//! buffers, as the gRPC decoder makes them on the live path: so the timed path is
//! the mirror's own per revision (validating the reply, grouping events, the
//! persistent-map update, building the batch, publishing to the hub, revision
//! watch, status and metrics, and dropping the reply) plus the decoder's
//! allocations, and not the cache misses of freeing replies built long before (a
//! feed built up front made the figure fall with the number of events).
//!
//! Three paths are measured ([`Path`]):
//!
//! * **Subscribed** (the headline): one live subscriber, a task consuming every
//!   batch's changes as `tail` does, so every revision is delivered as its own
//!   batch. Replies arrive in reads of [`REPLIES_PER_READ`]: after each, the feed
//!   yields once, as a socket with no more buffered data would, and the
//!   subscriber runs (without that, nothing would stop the mirror from applying
//!   the whole feed before the subscriber ever ran, and the subscriber would only
//!   see one resync).
//! * **Snapshot reader**: the same, and the subscriber also reads every batch's
//!   snapshot (as the soak's checker does), so each one is built.
//! * **Quiet**: no subscriber, and replies always ready, so the mirror publishes
//!   once per run of up to 16,384 events.
//!
//! The mirror and its subscriber share a current-thread runtime in one OS thread:
//! one core. The clock stops when the mirror has asked for the reply after the last
//! one and, when subscribed, the subscriber has consumed the last revision.
//!
//! The baseline ([`persistent_events_per_s`]) is what a user would write with the
//! same parts as the mirror: a persistent `imbl::OrdMap` updated per revision and
//! published behind an `arc_swap::ArcSwap`, with its changes, and a consumer that
//! reads every published version and does the subscriber's work on it, on one core.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use etcd_proto::etcdserverpb::ResponseHeader;
use etcd_proto::mvccpb::{Event, KeyValue, event::EventType};
use revwatch::client::{Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse};
use revwatch::mirror::{
    ChangeKind, Entry, Mirror, MirrorConfig, Source, Subscription, Update, WatchHandle,
};
use tokio::sync::{oneshot, watch};

/// Keys in the mirrored prefix.
pub const KEYS: usize = 10_000;
const PREFIX: &str = "/bench/apply/";
const VALUE_LEN: usize = 64;
/// Longest a round may take before it is declared broken.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// Replies per read on the subscribed path: well under the subscriber's default
/// buffer of 1,024 updates, so that a subscriber keeping up never lags.
pub const REPLIES_PER_READ: usize = 256;

/// Which of the mirror's publication paths a round measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// One live subscriber consuming every batch's changes: a batch per revision.
    Subscribed,
    /// One live subscriber consuming every batch and reading its snapshot: a
    /// batch and a snapshot per revision.
    SnapshotReader,
    /// No subscriber: one publication per run of replies.
    Quiet,
}

/// The synthetic history: the listed state, then one put per revision.
struct Feed {
    /// The prefix at `listed_at`, in key order.
    listed: Vec<KeyValue>,
    listed_at: i64,
    /// Every key, by index.
    keys: Arc<Vec<Vec<u8>>>,
    /// The revisions after `listed_at`, in order.
    puts: Vec<Put>,
}

/// One revision's put: which key, at which version.
#[derive(Clone, Copy)]
struct Put {
    key: u32,
    version: i64,
}

impl Feed {
    /// [`KEYS`] keys created at revisions 2.., then `revisions` single-put revisions.
    fn new(revisions: usize) -> Self {
        let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();
        let listed: Vec<KeyValue> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| KeyValue {
                key: key.clone(),
                create_revision: i as i64 + 2,
                mod_revision: i as i64 + 2,
                version: 1,
                value: vec![b'v'; VALUE_LEN],
                lease: 0,
            })
            .collect();
        let mut versions = vec![1i64; KEYS];
        // xorshift64: a fixed, uniform-enough key sequence without a dependency.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let puts = (0..revisions)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let i = (x % KEYS as u64) as usize;
                versions[i] += 1;
                Put {
                    key: i as u32,
                    version: versions[i],
                }
            })
            .collect();
        Feed {
            listed,
            listed_at: KEYS as i64 + 1,
            keys: Arc::new(keys),
            puts,
        }
    }

    fn last_revision(&self) -> i64 {
        self.listed_at + self.puts.len() as i64
    }
}

/// The watch reply for the `n`-th put (from 0) after `listed_at`, built like a
/// decoder builds it: fresh buffers for the key and the value.
fn reply(keys: &[Vec<u8>], listed_at: i64, n: usize, put: Put) -> WatchResponse {
    let i = put.key as usize;
    let revision = listed_at + 1 + n as i64;
    WatchResponse {
        header: header(revision),
        events: vec![Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: keys[i].clone(),
                create_revision: i as i64 + 2,
                mod_revision: revision,
                version: put.version,
                value: vec![b'v'; VALUE_LEN],
                lease: 0,
            }),
            prev_kv: None,
        }],
        ..Default::default()
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("{PREFIX}{i:08}").into_bytes()
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

/// Serves a [`Feed`]: ranges of its listed state, and one watch stream with its
/// replies, released when the gate opens.
#[derive(Clone)]
struct FeedSource {
    listed: Arc<Vec<KeyValue>>,
    listed_at: i64,
    keys: Arc<Vec<Vec<u8>>>,
    puts: Arc<Mutex<Option<Vec<Put>>>>,
    gate: watch::Receiver<bool>,
    drained: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    /// Replies per read, or `None` for replies always ready.
    read: Option<usize>,
}

impl Source for FeedSource {
    type Watch = FeedWatch;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        // Only what the mirror asks: key order from `req.key` to the prefix's end.
        let from = self.listed.partition_point(|kv| kv.key < req.key);
        let rest = &self.listed[from..];
        let limit = if req.limit > 0 {
            (req.limit as usize).min(rest.len())
        } else {
            rest.len()
        };
        Ok(RangeResponse {
            header: header(self.listed_at),
            kvs: rest[..limit].to_vec(),
            more: limit < rest.len(),
            count: rest.len() as i64,
        })
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<FeedWatch, Error> {
        let puts = if req.start_revision == self.listed_at + 1 {
            lock(&self.puts).take().unwrap_or_default()
        } else {
            // Not the resume this feed was built for: serve nothing, and the round
            // times out instead of measuring something else.
            Vec::new()
        };
        Ok(FeedWatch {
            created: Some(self.listed_at),
            listed_at: self.listed_at,
            keys: Arc::clone(&self.keys),
            puts: puts.into_iter().enumerate(),
            gate: self.gate.clone(),
            open: false,
            drained: lock(&self.drained).take(),
            read: self.read,
            yield_due: false,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct FeedWatch {
    /// The created reply's revision, until it is sent.
    created: Option<i64>,
    listed_at: i64,
    keys: Arc<Vec<Vec<u8>>>,
    puts: std::iter::Enumerate<std::vec::IntoIter<Put>>,
    gate: watch::Receiver<bool>,
    open: bool,
    drained: Option<oneshot::Sender<()>>,
    read: Option<usize>,
    /// A read ended: yield once before the next reply.
    yield_due: bool,
}

impl WatchHandle for FeedWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        if let Some(revision) = self.created.take() {
            return Ok(Some(WatchResponse {
                header: header(revision),
                created: true,
                ..Default::default()
            }));
        }
        // Cancel-safe: waiting on a watch channel, then no await until returning.
        // Once open it stays open: not checked again, so that the feed's own cost
        // per reply is only building it.
        if !self.open {
            if self.gate.wait_for(|open| *open).await.is_err() {
                std::future::pending::<()>().await;
            }
            self.open = true;
        }
        if self.yield_due {
            // Cancel-safe: dropped while pending, the yield is still due.
            tokio::task::yield_now().await;
            self.yield_due = false;
        }
        if let Some((n, put)) = self.puts.next() {
            self.yield_due = self.read.is_some_and(|read| (n + 1) % read == 0);
            return Ok(Some(reply(&self.keys, self.listed_at, n, put)));
        }
        // Asked again after the last reply: everything is applied.
        if let Some(drained) = self.drained.take() {
            let _ = drained.send(());
        }
        std::future::pending().await
    }

    async fn request_progress(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn endpoint(&self) -> String {
        "feed".into()
    }

    /// The feed is in this process: it always answers.
    async fn probe(&mut self, _req: RangeRequest) -> Result<(), Error> {
        Ok(())
    }
}

/// Events per second through a mirror fed `events` single-put revisions, on `path`.
pub async fn mirror_events_per_s(events: usize, path: Path) -> anyhow::Result<f64> {
    let feed = Feed::new(events);
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("mirror-apply".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the apply runtime")
                .and_then(|rt| rt.block_on(mirror_round(feed, path)));
            let _ = done_tx.send(outcome);
        })?;
    done_rx.await.context("apply thread died")?
}

async fn mirror_round(feed: Feed, path: Path) -> anyhow::Result<f64> {
    let last = feed.last_revision();
    let events = feed.puts.len();
    let (gate_tx, gate_rx) = watch::channel(false);
    let (drained_tx, drained_rx) = oneshot::channel();
    let source = FeedSource {
        listed: Arc::new(feed.listed),
        listed_at: feed.listed_at,
        keys: Arc::clone(&feed.keys),
        puts: Arc::new(Mutex::new(Some(feed.puts))),
        gate: gate_rx,
        drained: Arc::new(Mutex::new(Some(drained_tx))),
        read: (path != Path::Quiet).then_some(REPLIES_PER_READ),
    };
    // No progress requests or stall handling during a round.
    let config = MirrorConfig::default()
        .with_progress_interval(ROUND_TIMEOUT)
        .with_stall_timeout(2 * ROUND_TIMEOUT);
    let mirror = Mirror::builder(PREFIX).config(config).start(source).await?;
    mirror.wait_ready().await?;
    anyhow::ensure!(mirror.snapshot().len() == KEYS, "initial list incomplete");
    // On this runtime, so on the mirror's core.
    let consumer = match path {
        Path::Quiet => None,
        Path::Subscribed => Some(tokio::spawn(consume(mirror.subscribe(), last, false))),
        Path::SnapshotReader => Some(tokio::spawn(consume(mirror.subscribe(), last, true))),
    };

    let started = Instant::now();
    gate_tx.send_replace(true);
    let consumed = async {
        drained_rx.await.context("feed dropped")?;
        match consumer {
            Some(task) => task.await.context("subscriber panicked")?.map(Some),
            None => Ok(None),
        }
    };
    let consumed = tokio::time::timeout(ROUND_TIMEOUT, consumed)
        .await
        .context("the mirror did not drain the feed in time")??;
    let elapsed = started.elapsed();
    if let Some(consumed) = consumed {
        anyhow::ensure!(
            consumed.batches == events && consumed.events == events,
            "subscriber consumed {} batches of {} events, expected {events} of one",
            consumed.batches,
            consumed.events
        );
        black_box(consumed.digest);
    }
    let snap = mirror.snapshot();
    anyhow::ensure!(
        snap.revision() == last && snap.len() == KEYS,
        "mirror at revision {} with {} keys, expected {last} with {KEYS}",
        snap.revision(),
        snap.len()
    );
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// What a subscriber consumed.
struct Consumed {
    batches: usize,
    events: usize,
    /// Folds what was read, so that reading it is not optimized away.
    digest: u64,
}

/// A subscriber's work per change: read its key and entry, as a consumer would.
fn digest(key: &[u8], entry: Option<&Entry<Bytes>>) -> u64 {
    let entry = entry.map_or(0, |e| e.value.len() as u64 ^ e.mod_revision as u64);
    (key.len() as u64).wrapping_mul(31) ^ entry
}

/// Consumes every update until revision `last`, demanding one batch per revision in
/// order: a resync (the subscriber lagged) means the round did not measure the
/// per-revision path. `snapshots`: also read each batch's snapshot.
async fn consume(
    mut sub: Subscription<Bytes>,
    last: i64,
    snapshots: bool,
) -> anyhow::Result<Consumed> {
    let mut out = Consumed {
        batches: 0,
        events: 0,
        digest: 0,
    };
    let mut next = None;
    while let Some(update) = sub.recv().await {
        let batch = match update {
            Update::Snapshot(snap) => {
                next = Some(snap.revision() + 1);
                continue;
            }
            Update::Progress(_) => continue,
            Update::Batch(batch) => batch,
        };
        anyhow::ensure!(
            batch.resync.is_none(),
            "subscriber got a resync ({:?}) at {}",
            batch.resync,
            batch.revision
        );
        anyhow::ensure!(
            Some(batch.revision) == next,
            "subscriber got revision {} instead of {next:?}",
            batch.revision
        );
        next = Some(batch.revision + 1);
        out.batches += 1;
        if snapshots {
            // Every put is to a listed key: the prefix keeps its size.
            let snapshot = batch.snapshot();
            anyhow::ensure!(
                snapshot.revision() == batch.revision && snapshot.len() == KEYS,
                "batch {} built a snapshot at {} with {} keys",
                batch.revision,
                snapshot.revision(),
                snapshot.len()
            );
            out.digest = out.digest.wrapping_add(snapshot.len() as u64);
        }
        for change in &batch.changes {
            let entry = match &change.kind {
                ChangeKind::Put { entry, .. } => Some(&**entry),
                ChangeKind::Delete { .. } => None,
            };
            out.events += 1;
            out.digest = out.digest.wrapping_add(digest(&change.key, entry));
        }
        if batch.revision == last {
            return Ok(out);
        }
    }
    anyhow::bail!("subscription ended before revision {last}")
}

/// One version the persistent baseline publishes: the map after a revision, and
/// that revision's changes with their previous entries (what a batch carries).
struct Version {
    revision: i64,
    map: imbl::OrdMap<Bytes, Arc<Entry<Bytes>>>,
    changes: Vec<Changed>,
}

/// One key's change in a [`Version`]: the new entry (none for a delete) and the
/// one it replaced.
struct Changed {
    key: Bytes,
    entry: Option<Arc<Entry<Bytes>>>,
    _prev: Option<Arc<Entry<Bytes>>>,
}

/// Events per second through the persistent baseline for `revisions` revisions of
/// the same feed shape, on the calling core (writer and consumer take turns in one
/// synchronous loop, with no wake-ups: the cheapest way to read every version).
pub async fn persistent_events_per_s(revisions: usize) -> anyhow::Result<f64> {
    let feed = Feed::new(revisions);
    tokio::task::spawn_blocking(move || persistent_round(feed))
        .await
        .context("persistent apply panicked")?
}

fn persistent_round(feed: Feed) -> anyhow::Result<f64> {
    let mut map: imbl::OrdMap<Bytes, Arc<Entry<Bytes>>> =
        feed.listed.into_iter().map(entry).collect();
    let published = ArcSwap::from_pointee(Version {
        revision: feed.listed_at,
        map: map.clone(),
        changes: Vec::new(),
    });
    let (mut events, mut consumed, mut sum) = (0usize, 0usize, 0u64);
    let started = Instant::now();
    for (n, put) in feed.puts.iter().enumerate() {
        // Writer: apply the revision's events, publish the new version.
        let reply = reply(&feed.keys, feed.listed_at, n, *put);
        let revision = reply.header.as_ref().map_or(0, |h| h.revision);
        let mut changes = Vec::with_capacity(reply.events.len());
        for ev in reply.events {
            let kv = ev.kv.context("event without kv")?;
            if ev.r#type == EventType::Delete as i32 {
                let prev = map.remove(kv.key.as_slice());
                changes.push(Changed {
                    key: Bytes::from(kv.key),
                    entry: None,
                    _prev: prev,
                });
            } else {
                let (k, e) = entry(kv);
                let prev = map.insert(k.clone(), Arc::clone(&e));
                changes.push(Changed {
                    key: k,
                    entry: Some(e),
                    _prev: prev,
                });
            }
            events += 1;
        }
        published.store(Arc::new(Version {
            revision,
            map: map.clone(),
            changes,
        }));
        // Consumer: read the version just published, as the subscriber does a batch.
        let version = published.load_full();
        anyhow::ensure!(version.revision == revision, "consumer missed {revision}");
        sum = sum.wrapping_add(version.map.len() as u64);
        for change in &version.changes {
            sum = sum.wrapping_add(digest(&change.key, change.entry.as_deref()));
            consumed += 1;
        }
    }
    let elapsed = started.elapsed();
    black_box(sum);
    anyhow::ensure!(
        map.len() == KEYS && consumed == events,
        "persistent baseline lost keys or events"
    );
    Ok(events as f64 / elapsed.as_secs_f64())
}

/// A naive snapshotting map: readers share an `Arc<HashMap>`, so each revision
/// clones the whole map, applies its events, and publishes the clone.
type NaiveMap = HashMap<Bytes, Arc<Entry<Bytes>>>;

/// Events per second through [`NaiveMap`] for `revisions` revisions of the same
/// feed shape, on the calling core (the loop is synchronous).
pub async fn naive_clone_events_per_s(revisions: usize) -> anyhow::Result<f64> {
    let feed = Feed::new(revisions);
    tokio::task::spawn_blocking(move || naive_round(feed))
        .await
        .context("naive apply panicked")?
}

fn naive_round(feed: Feed) -> anyhow::Result<f64> {
    let mut published: Arc<NaiveMap> = Arc::new(feed.listed.into_iter().map(entry).collect());
    let mut events = 0usize;
    let started = Instant::now();
    for (n, put) in feed.puts.iter().enumerate() {
        let reply = reply(&feed.keys, feed.listed_at, n, *put);
        // The feed has one revision per reply.
        let mut next = NaiveMap::clone(&published);
        for ev in reply.events {
            let kv = ev.kv.context("event without kv")?;
            if ev.r#type == EventType::Delete as i32 {
                next.remove(kv.key.as_slice());
            } else {
                let (k, e) = entry(kv);
                next.insert(k, e);
            }
            events += 1;
        }
        published = Arc::new(next);
    }
    let elapsed = started.elapsed();
    anyhow::ensure!(published.len() == KEYS, "naive map lost keys");
    Ok(events as f64 / elapsed.as_secs_f64())
}

fn entry(kv: KeyValue) -> (Bytes, Arc<Entry<Bytes>>) {
    let raw = Bytes::from(kv.value);
    let entry = Entry {
        value: raw.clone(),
        raw,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    };
    (Bytes::from(kv.key), Arc::new(entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More revisions than the subscriber's buffer holds, in several reads and a
    /// partial one: the round fails unless the subscriber ran between reads and got
    /// every revision as its own batch, in order, and the mirror ended at the last.
    #[tokio::test]
    async fn a_subscribed_round_delivers_every_revision_as_its_own_batch() {
        let buffer = MirrorConfig::default().subscriber_buffer;
        let events = buffer + 3 * REPLIES_PER_READ + 7;
        let rate = mirror_events_per_s(events, Path::Subscribed).await.unwrap();
        assert!(rate > 0.0);
    }

    #[tokio::test]
    async fn a_snapshot_reading_round_builds_every_batch_snapshot() {
        let events = 3 * REPLIES_PER_READ + 7;
        let rate = mirror_events_per_s(events, Path::SnapshotReader)
            .await
            .unwrap();
        assert!(rate > 0.0);
    }

    #[tokio::test]
    async fn a_quiet_round_applies_the_whole_feed() {
        let rate = mirror_events_per_s(2_000, Path::Quiet).await.unwrap();
        assert!(rate > 0.0);
    }

    #[test]
    fn the_persistent_baseline_consumes_every_version() {
        assert!(persistent_round(Feed::new(2_000)).unwrap() > 0.0);
    }

    #[test]
    fn the_feed_ends_a_read_every_replies_per_read_replies() {
        let feed = Feed::new(2 * REPLIES_PER_READ);
        let (_gate_tx, gate) = watch::channel(true);
        let mut w = FeedWatch {
            created: None,
            listed_at: feed.listed_at,
            keys: Arc::clone(&feed.keys),
            puts: feed.puts.into_iter().enumerate(),
            gate,
            open: true,
            drained: None,
            read: Some(REPLIES_PER_READ),
            yield_due: false,
        };
        let mut ready = || {
            let mut n = 0;
            while let Some(reply) = futures::FutureExt::now_or_never(w.message()) {
                assert!(reply.unwrap().is_some());
                n += 1;
            }
            n
        };
        assert_eq!(ready(), REPLIES_PER_READ);
        // Dropped while pending, the yield is still due: the next call waits too.
        assert!(futures::FutureExt::now_or_never(w.message()).is_none());
        // Polled again after yielding, it goes on with the next read.
        let next = futures::executor::block_on(w.message()).unwrap().unwrap();
        assert_eq!(
            next.header.unwrap().revision,
            w.listed_at + 1 + REPLIES_PER_READ as i64
        );
        let mut ready = || {
            let mut n = 0;
            while let Some(reply) = futures::FutureExt::now_or_never(w.message()) {
                assert!(reply.unwrap().is_some());
                n += 1;
            }
            n
        };
        assert_eq!(ready(), REPLIES_PER_READ - 1);
    }
}
