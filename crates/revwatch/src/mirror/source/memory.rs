//! An in-process, etcd-like store: revisions, history, compaction and watches with
//! etcd's reply shapes, plus switches to inject faults. For tests and benchmarks
//! that need a synthetic feed without a network.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use etcd_proto::etcdserverpb::ResponseHeader;
use etcd_proto::mvccpb::{Event, KeyValue, event::EventType};
use tokio::sync::{mpsc, watch};

use super::{Source, WatchHandle};
use crate::client::{
    EndpointFailure, Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse,
};

/// Endpoint name reported by memory streams and errors.
const ENDPOINT: &str = "memory";
/// Most revisions per catch-up reply, like etcd.
const CATCH_UP_REVISIONS: usize = 1000;

/// One operation of [`MemorySource::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value (with a lease id, 0 for none).
    Put(Vec<u8>, Vec<u8>, i64),
    /// Delete one key (nothing if absent).
    Delete(Vec<u8>),
}

/// An in-process etcd-like source. Clones share the store.
///
/// ```
/// use revwatch::mirror::MemorySource;
///
/// let src = MemorySource::new();
/// assert_eq!(src.revision(), 1);
/// assert_eq!(src.put(b"a/1", b"x"), 2);
/// ```
#[derive(Clone, Debug)]
pub struct MemorySource {
    inner: Arc<Mutex<State>>,
    frozen: Arc<watch::Sender<bool>>,
}

#[derive(Debug, Default)]
struct State {
    revision: i64,
    compacted: i64,
    /// Every version of every key, oldest first; `None` marks a deletion.
    versions: BTreeMap<Vec<u8>, Vec<(i64, Option<KeyValue>)>>,
    /// Events per revision above `compacted`.
    history: Vec<(i64, Vec<Event>)>,
    watchers: Vec<Watcher>,
    unreachable: bool,
    permission_denied: bool,
    /// New watches send their created reply, then fail.
    fail_after_created: bool,
    /// Split event replies into pieces of at most this many events (`fragment=true`).
    fragment: Option<usize>,
    /// While `Some`, revisions whose events open watches have not been sent yet.
    held: Option<Vec<(i64, Vec<Event>)>>,
}

#[derive(Debug)]
struct Watcher {
    key: Vec<u8>,
    range_end: Vec<u8>,
    id: i64,
    fragment: bool,
    tx: mpsc::UnboundedSender<Result<WatchResponse, Error>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        cluster_id: 1,
        member_id: 1,
        revision,
        raft_term: 1,
    })
}

fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    if end.is_empty() {
        key == start
    } else if end == [0] {
        key >= start
    } else {
        key >= start && key < end
    }
}

impl Default for MemorySource {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySource {
    /// An empty store at revision 1, like a fresh etcd.
    pub fn new() -> Self {
        MemorySource {
            inner: Arc::new(Mutex::new(State {
                revision: 1,
                ..State::default()
            })),
            frozen: Arc::new(watch::channel(false).0),
        }
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        lock(&self.inner).revision
    }

    /// Puts one key; returns the new revision.
    pub fn put(&self, key: &[u8], value: &[u8]) -> i64 {
        self.txn(vec![Op::Put(key.to_vec(), value.to_vec(), 0)])
    }

    /// Deletes one key; returns the new revision, or the current one if it was absent.
    pub fn delete(&self, key: &[u8]) -> i64 {
        self.txn(vec![Op::Delete(key.to_vec())])
    }

    /// Applies `ops` as one revision (if any changes something); returns the revision.
    pub fn txn(&self, ops: Vec<Op>) -> i64 {
        let mut st = lock(&self.inner);
        let rev = st.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put(key, value, lease) => {
                    let (create_revision, version) = match st.latest(&key) {
                        Some(kv) => (kv.create_revision, kv.version + 1),
                        None => (rev, 1),
                    };
                    let kv = KeyValue {
                        key: key.clone(),
                        create_revision,
                        mod_revision: rev,
                        version,
                        value,
                        lease,
                    };
                    st.versions
                        .entry(key)
                        .or_default()
                        .push((rev, Some(kv.clone())));
                    events.push(Event {
                        r#type: EventType::Put as i32,
                        kv: Some(kv),
                        prev_kv: None,
                    });
                }
                Op::Delete(key) => {
                    if st.latest(&key).is_none() {
                        continue;
                    }
                    st.versions
                        .entry(key.clone())
                        .or_default()
                        .push((rev, None));
                    events.push(Event {
                        r#type: EventType::Delete as i32,
                        kv: Some(KeyValue {
                            key,
                            mod_revision: rev,
                            ..KeyValue::default()
                        }),
                        prev_kv: None,
                    });
                }
            }
        }
        if events.is_empty() {
            return st.revision;
        }
        st.revision = rev;
        st.notify(rev, &events);
        st.history.push((rev, events));
        rev
    }

    /// Compacts history up to `revision` (reads and watches below it fail). Like
    /// etcd 3.4, it also drops the deletes *at* `revision` from what a watch
    /// starting there replays.
    pub fn compact(&self, revision: i64) {
        let mut st = lock(&self.inner);
        let revision = revision.min(st.revision);
        if revision <= st.compacted {
            return;
        }
        st.compacted = revision;
        // Like etcd, reads and watches at the compaction revision itself still work,
        // but its tombstones are gone: a watch from there misses those deletes.
        st.history.retain_mut(|(r, events)| {
            if *r == revision {
                events.retain(|e| e.r#type != EventType::Delete as i32);
            }
            *r >= revision && !events.is_empty()
        });
        st.versions.retain(|_, vs| {
            // Keep the newest version at or below the compaction point, and later ones.
            let keep_from = vs.iter().rposition(|(r, _)| *r <= revision).unwrap_or(0);
            vs.drain(..keep_from);
            !matches!(vs.as_slice(), [(_, None)])
        });
    }

    /// Ends every open watch stream with a connection error.
    pub fn disconnect_watches(&self) {
        let mut st = lock(&self.inner);
        for w in st.watchers.drain(..) {
            let _ = w.tx.send(Err(Error::Connection {
                endpoint: ENDPOINT.into(),
                reason: "disconnected by test".into(),
                source: None,
            }));
        }
    }

    /// While set, ranges and new watches fail as if no endpoint were reachable.
    pub fn set_unreachable(&self, unreachable: bool) {
        lock(&self.inner).unreachable = unreachable;
    }

    /// While set, every new watch stream sends its created reply and then fails with
    /// a connection error, as a proxy that cannot serve the watch may.
    pub fn set_fail_after_created(&self, fail: bool) {
        lock(&self.inner).fail_after_created = fail;
    }

    /// While set, ranges and new watches fail with PermissionDenied.
    pub fn set_permission_denied(&self, denied: bool) {
        lock(&self.inner).permission_denied = denied;
    }

    /// While set, open streams deliver nothing (like a SIGSTOPped member); what they
    /// would have delivered is held until unfrozen.
    pub fn set_frozen(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// While set, events for open watches are held back, in order, and sent when it is
    /// cleared; progress requests are still answered at once with the store's
    /// revision. That is how etcd before 3.4.31 answers them (etcd#15220): ahead of
    /// events it has not sent yet. A watch opened meanwhile replays history as usual
    /// and would get a held revision again: do not reconnect while set.
    pub fn set_events_held(&self, held: bool) {
        let mut st = lock(&self.inner);
        match (held, st.held.take()) {
            (true, pending) => st.held = Some(pending.unwrap_or_default()),
            (false, Some(pending)) => {
                for (rev, events) in pending {
                    st.notify(rev, &events);
                }
            }
            (false, None) => {}
        }
    }

    /// Splits event replies of watches created with `fragment=true` into pieces of
    /// at most `events` events.
    pub fn set_fragment(&self, events: Option<usize>) {
        lock(&self.inner).fragment = events;
    }

    /// Sends `resp` as-is on every open watch stream (to test validation).
    pub fn inject(&self, resp: WatchResponse) {
        let st = lock(&self.inner);
        for w in &st.watchers {
            let _ = w.tx.send(Ok(resp.clone()));
        }
    }

    /// Number of open watch streams.
    pub fn watchers(&self) -> usize {
        let mut st = lock(&self.inner);
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    fn check_reachable(st: &State) -> Result<(), Error> {
        if st.unreachable {
            return Err(Error::AllEndpointsUnreachable(vec![EndpointFailure {
                endpoint: ENDPOINT.into(),
                reason: "unreachable (test)".into(),
            }]));
        }
        if st.permission_denied {
            return Err(Error::Grpc {
                code: tonic::Code::PermissionDenied,
                message: "etcdserver: permission denied".into(),
                endpoint: ENDPOINT.into(),
            });
        }
        Ok(())
    }

    /// KV.Range as the store sees it, ignoring the fault switches: ground truth for
    /// tests.
    pub fn range_unfaulted(&self, req: &RangeRequest) -> Result<RangeResponse, Error> {
        self.range_now(req, false)
    }

    fn range_now(&self, req: &RangeRequest, faults: bool) -> Result<RangeResponse, Error> {
        let st = lock(&self.inner);
        if faults {
            Self::check_reachable(&st)?;
        }
        let at = if req.revision > 0 {
            req.revision
        } else {
            st.revision
        };
        if at > st.revision {
            return Err(Error::FutureRevision {
                endpoint: ENDPOINT.into(),
            });
        }
        if at < st.compacted {
            return Err(Error::Compacted {
                compact_revision: None,
                endpoint: ENDPOINT.into(),
            });
        }
        let upper = if req.range_end.is_empty() {
            Bound::Included(req.key.clone())
        } else if req.range_end == [0] {
            Bound::Unbounded
        } else {
            Bound::Excluded(req.range_end.clone())
        };
        let mut kvs = Vec::new();
        let mut count = 0i64;
        // Like etcd, `min_mod_revision` filters the keys returned, never `count`.
        let mut returnable = 0i64;
        for (_, versions) in st.versions.range((Bound::Included(req.key.clone()), upper)) {
            let Some(kv) = versions
                .iter()
                .rev()
                .find(|(r, _)| *r <= at)
                .and_then(|(_, kv)| kv.as_ref())
            else {
                continue;
            };
            count += 1;
            if req.count_only || kv.mod_revision < req.min_mod_revision {
                continue;
            }
            returnable += 1;
            if req.limit <= 0 || (kvs.len() as i64) < req.limit {
                let mut kv = kv.clone();
                if req.keys_only {
                    kv.value.clear();
                }
                kvs.push(kv);
            }
        }
        let more = req.limit > 0 && returnable > req.limit;
        Ok(RangeResponse {
            header: header(st.revision),
            kvs,
            more,
            count,
        })
    }

    fn watch_now(&self, req: WatchCreateRequest) -> Result<MemoryWatch, Error> {
        let mut st = lock(&self.inner);
        Self::check_reachable(&st)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let progress_tx = tx.clone();
        let created = WatchResponse {
            header: header(st.revision),
            watch_id: 0,
            created: true,
            ..WatchResponse::default()
        };
        let _ = tx.send(Ok(created));
        if st.fail_after_created {
            let _ = tx.send(Err(Error::Connection {
                endpoint: ENDPOINT.into(),
                reason: "watch failed after its created reply (test)".into(),
                source: None,
            }));
        }
        let start = if req.start_revision > 0 {
            req.start_revision
        } else {
            st.revision + 1
        };
        let watcher = Watcher {
            key: req.key,
            range_end: req.range_end,
            id: 0,
            fragment: req.fragment,
            tx,
        };
        if start < st.compacted {
            let _ = watcher.tx.send(Ok(WatchResponse {
                header: header(0),
                watch_id: 0,
                canceled: true,
                compact_revision: st.compacted,
                ..WatchResponse::default()
            }));
        } else {
            // Catch-up, at most CATCH_UP_REVISIONS revisions per reply.
            let from = st.history.partition_point(|(r, _)| *r < start);
            let mut pending = Vec::new();
            let mut revs = 0;
            for (_, events) in &st.history[from..] {
                let matching: Vec<Event> = events
                    .iter()
                    .filter(|e| watcher.matches(e))
                    .cloned()
                    .collect();
                if matching.is_empty() {
                    continue;
                }
                pending.extend(matching);
                revs += 1;
                if revs == CATCH_UP_REVISIONS {
                    watcher.send_events(st.revision, std::mem::take(&mut pending), st.fragment);
                    revs = 0;
                }
            }
            if !pending.is_empty() {
                watcher.send_events(st.revision, pending, st.fragment);
            }
            st.watchers.push(watcher);
        }
        Ok(MemoryWatch {
            rx,
            tx: progress_tx,
            source: self.clone(),
            frozen: self.frozen.subscribe(),
        })
    }
}

impl State {
    fn latest(&self, key: &[u8]) -> Option<&KeyValue> {
        self.versions
            .get(key)
            .and_then(|v| v.last())
            .and_then(|(_, kv)| kv.as_ref())
    }

    fn notify(&mut self, rev: i64, events: &[Event]) {
        if let Some(held) = &mut self.held {
            held.push((rev, events.to_vec()));
            return;
        }
        let fragment = self.fragment;
        self.watchers.retain(|w| {
            let matching: Vec<Event> = events.iter().filter(|e| w.matches(e)).cloned().collect();
            if matching.is_empty() {
                return !w.tx.is_closed();
            }
            w.send_events(rev, matching, fragment)
        });
    }
}

impl Watcher {
    fn matches(&self, e: &Event) -> bool {
        e.kv.as_ref()
            .is_some_and(|kv| in_range(&kv.key, &self.key, &self.range_end))
    }

    /// Sends one reply, or fragments of it; false once the stream is gone.
    fn send_events(&self, revision: i64, events: Vec<Event>, fragment: Option<usize>) -> bool {
        let piece = match fragment {
            Some(n) if self.fragment && n > 0 && events.len() > n => n,
            _ => events.len().max(1),
        };
        let pieces: Vec<Vec<Event>> = events.chunks(piece).map(<[Event]>::to_vec).collect();
        let last = pieces.len().saturating_sub(1);
        for (i, events) in pieces.into_iter().enumerate() {
            let resp = WatchResponse {
                header: header(revision),
                watch_id: self.id,
                fragment: i < last,
                events,
                ..WatchResponse::default()
            };
            if self.tx.send(Ok(resp)).is_err() {
                return false;
            }
        }
        true
    }
}

/// A watch stream on a [`MemorySource`].
#[derive(Debug)]
pub struct MemoryWatch {
    rx: mpsc::UnboundedReceiver<Result<WatchResponse, Error>>,
    /// For progress replies, which go through the same queue as events.
    tx: mpsc::UnboundedSender<Result<WatchResponse, Error>>,
    source: MemorySource,
    frozen: watch::Receiver<bool>,
}

impl Source for MemorySource {
    type Watch = MemoryWatch;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.range_now(&req, true)
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<MemoryWatch, Error> {
        self.watch_now(req)
    }
}

impl WatchHandle for MemoryWatch {
    async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        // A frozen source delivers nothing; waiting here keeps this cancel-safe.
        if self.frozen.wait_for(|f| !*f).await.is_err() {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Ok(resp)) => Ok(Some(resp)),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    async fn request_progress(&mut self) -> Result<(), Error> {
        // Under the store lock, so every event reply up to the current revision is
        // already queued ahead: the reply is an exact bookmark (like a fixed etcd),
        // unless events are held (`set_events_held`).
        let st = lock(&self.source.inner);
        let _ = self.tx.send(Ok(WatchResponse {
            header: header(st.revision),
            watch_id: -1,
            ..WatchResponse::default()
        }));
        Ok(())
    }

    fn endpoint(&self) -> String {
        ENDPOINT.into()
    }

    async fn probe(&mut self, req: RangeRequest) -> Result<(), Error> {
        // A frozen store answers nothing, like a SIGSTOPped member: the caller's
        // bound ends the wait.
        if self.frozen.wait_for(|f| !*f).await.is_err() {
            return Err(Error::WatchClosed {
                endpoint: ENDPOINT.into(),
            });
        }
        self.source.range_now(&req, true).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    fn probe_request() -> RangeRequest {
        RangeRequest {
            key: b"a/".to_vec(),
            limit: 1,
            count_only: true,
            ..RangeRequest::default()
        }
    }

    #[tokio::test]
    async fn a_probe_answers_unless_the_store_is_frozen_or_unreachable() {
        let src = MemorySource::new();
        let mut w = src.watch(WatchCreateRequest::default()).await.unwrap();
        assert!(w.probe(probe_request()).await.is_ok());

        // Frozen like a stopped member: no answer until thawed.
        src.set_frozen(true);
        assert!(w.probe(probe_request()).now_or_never().is_none());
        src.set_frozen(false);
        assert!(w.probe(probe_request()).await.is_ok());

        src.set_unreachable(true);
        let err = w.probe(probe_request()).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        src.set_unreachable(false);

        // A refusal is still an answer.
        src.set_permission_denied(true);
        let err = w.probe(probe_request()).await.unwrap_err();
        assert!(err.is_permission_denied(), "{err}");
    }
}
