//! Apply throughput from an in-process feed, with no network.
//!
//! The feed is a [`Source`] serving synthetic responses: a prefix of [`KEYS`] keys
//! listed at one revision, then a watch whose replies each carry one put of one
//! revision to a pseudo-random key (the live shape: etcd sends each revision as it
//! commits). Each reply is built when the mirror asks for it, with fresh key and value
//! buffers, as the gRPC decoder makes them on the live path: so the timed path is
//! the mirror's own per revision (validating the reply, grouping events, the
//! persistent-map update, building the snapshot and batch, publishing to the hub,
//! revision watch, status and metrics, and dropping the reply) plus the decoder's
//! allocations, and not the cache misses of freeing replies built long before (a
//! feed built up front made the figure fall with the number of events).
//!
//! The mirror runs alone on a current-thread runtime in its own OS thread: one core.
//! The clock stops when the round's task runs again after the mirror asked for the
//! reply after the last one: the mirror may ask while a run of replies is still
//! being published, but on this runtime the round's task runs only once the
//! mirror's task has finished that and waits for more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use etcd_proto::etcdserverpb::ResponseHeader;
use etcd_proto::mvccpb::{Event, KeyValue, event::EventType};
use revwatch::client::{Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse};
use revwatch::mirror::{Entry, Mirror, MirrorConfig, Source, WatchHandle};
use tokio::sync::{oneshot, watch};

/// Keys in the mirrored prefix.
pub const KEYS: usize = 10_000;
const PREFIX: &str = "/bench/apply/";
const VALUE_LEN: usize = 64;
/// Longest a round may take before it is declared broken.
const ROUND_TIMEOUT: Duration = Duration::from_secs(60);

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
        if let Some((n, put)) = self.puts.next() {
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
}

/// Events per second through a mirror fed `events` single-put revisions.
pub async fn mirror_events_per_s(events: usize) -> anyhow::Result<f64> {
    let feed = Feed::new(events);
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("mirror-apply".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building the apply runtime")
                .and_then(|rt| rt.block_on(mirror_round(feed)));
            let _ = done_tx.send(outcome);
        })?;
    done_rx.await.context("apply thread died")?
}

async fn mirror_round(feed: Feed) -> anyhow::Result<f64> {
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
    };
    // No progress requests or stall handling during a round.
    let config = MirrorConfig::default()
        .with_progress_interval(ROUND_TIMEOUT)
        .with_stall_timeout(2 * ROUND_TIMEOUT);
    let mirror = Mirror::builder(PREFIX).config(config).start(source).await?;
    mirror.wait_ready().await?;
    anyhow::ensure!(mirror.snapshot().len() == KEYS, "initial list incomplete");

    let started = Instant::now();
    gate_tx.send_replace(true);
    tokio::time::timeout(ROUND_TIMEOUT, drained_rx)
        .await
        .context("the mirror did not drain the feed in time")?
        .context("feed dropped")?;
    let elapsed = started.elapsed();
    let snap = mirror.snapshot();
    anyhow::ensure!(
        snap.revision() == last && snap.len() == KEYS,
        "mirror at revision {} with {} keys, expected {last} with {KEYS}",
        snap.revision(),
        snap.len()
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
