//! One watch stream: create, cancel and progress requests in, replies out.
//!
//! Every watcher remembers the next revision it owes the client. Whenever the committed
//! revision moves (or a request needs it), the task brings every watcher up to the visible
//! revision by reading the store's revision log: catch-up in replies of up to 1000
//! revisions, live events one reply per revision. Because a progress reply is only sent
//! after that, it never claims a revision whose events are still on their way.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_proto::etcdserverpb::watch_create_request::FilterType;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse};
use etcd_proto::key_range::KeyRange;
use etcd_proto::mvccpb::{Event, event::EventType};
use tokio::sync::{mpsc, watch};
use tonic::{Status, Streaming};

use super::fragment::fragments;
use crate::mvcc::{MvccState, Record};
use crate::shared::Core;

/// Most revisions per catch-up reply (etcd's `watchBatchMaxRevs`).
const MAX_REVS_PER_REPLY: usize = 1000;
/// etcd lets replies exceed the request limit by this much gRPC overhead before fragmenting.
const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

pub(crate) type Reply = Result<WatchResponse, Status>;

/// The client went away; the stream task ends.
struct Closed;

struct Watcher {
    range: KeyRange,
    /// First revision not yet delivered.
    next_rev: i64,
    /// Caught up at least once: from then on, one reply per revision.
    synced: bool,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
    /// Events went out since the last periodic progress tick.
    sent_since_tick: bool,
    /// Canceled for compaction. Like etcd, the watcher keeps its id (so a later cancel is
    /// answered and automatic ids skip it) but delivers nothing more.
    compacted: bool,
}

pub(crate) struct WatchStream {
    core: Arc<Core>,
    id: u64,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    out: mpsc::Sender<Reply>,
}

impl WatchStream {
    pub fn new(core: Arc<Core>, out: mpsc::Sender<Reply>) -> Self {
        let id = core.hub.open_stream();
        Self {
            core,
            id,
            watchers: BTreeMap::new(),
            next_id: 0,
            out,
        }
    }

    /// Serves the stream until the client leaves, the server stops, or a fault drops it.
    pub async fn run(
        mut self,
        mut inbound: Streaming<WatchRequest>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut revs = self.core.store.subscribe();
        let mut drops = self.core.faults.drop_signal();
        let period = self.core.config.progress_notify_interval;
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.handle(req).await,
                    Ok(None) | Err(_) => break,
                },
                changed = revs.changed() => match changed {
                    Ok(()) => self.deliver().await.map(|_| ()),
                    Err(_) => break,
                },
                _ = ticker.tick() => self.periodic_progress().await,
                () = drops.wait() => {
                    let status = Status::unavailable("revwatch: watch stream dropped by fault injection");
                    let _ = self.out.send(Err(status)).await;
                    break;
                }
                () = crate::shared::stopped(&mut stop) => break,
                () = self.out.closed() => break,
            };
            if step.is_err() {
                break;
            }
        }
        self.core.hub.close_stream(self.id);
    }

    async fn handle(&mut self, req: WatchRequest) -> Result<(), Closed> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create).await,
            Some(RequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    self.core.hub.remove_watcher(self.id, cancel.watch_id);
                    let reply = WatchResponse {
                        header: self.core.header(self.core.store.read_rev()),
                        watch_id: cancel.watch_id,
                        canceled: true,
                        ..Default::default()
                    };
                    self.send(reply).await?;
                }
                // Cancelling an unknown id gets no reply, as in etcd.
                Ok(())
            }
            Some(RequestUnion::ProgressRequest(_)) => {
                let rev = self.deliver().await?;
                let reply = WatchResponse {
                    header: self.core.header(rev),
                    watch_id: -1,
                    ..Default::default()
                };
                self.send_progress(reply).await
            }
            None => Ok(()),
        }
    }

    async fn create(&mut self, req: WatchCreateRequest) -> Result<(), Closed> {
        let cur = self.core.store.read_rev();
        let refuse = |reason: &str| WatchResponse {
            header: self.core.header(cur),
            watch_id: -1,
            created: true,
            canceled: true,
            cancel_reason: reason.to_owned(),
            ..Default::default()
        };
        let range = KeyRange::new(&req.key, &req.range_end);
        if range.is_empty() {
            return self.send(refuse("mvcc: watcher range is empty")).await;
        }
        // 0 asks for an automatic id: the next one not in use on this stream.
        let id = if req.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watchers.contains_key(&req.watch_id) {
            return self
                .send(refuse(
                    "mvcc: duplicate watch ID provided on the WatchStream",
                ))
                .await;
        } else {
            req.watch_id
        };
        if !self
            .core
            .hub
            .add_watcher(self.id, id, &req.key, &req.range_end)
        {
            return self.send(refuse("etcdserver: too many watchers")).await;
        }
        let next_rev = if req.start_revision == 0 {
            cur + 1
        } else {
            req.start_revision
        };
        let filters = |f: FilterType| req.filters.contains(&(f as i32));
        self.watchers.insert(
            id,
            Watcher {
                range,
                next_rev,
                synced: next_rev > cur,
                prev_kv: req.prev_kv,
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                progress_notify: req.progress_notify,
                fragment: req.fragment,
                sent_since_tick: false,
                compacted: false,
            },
        );
        let created = WatchResponse {
            header: self.core.header(cur),
            watch_id: id,
            created: true,
            ..Default::default()
        };
        self.send(created).await?;
        self.deliver_one(id, self.core.store.read_rev()).await
    }

    /// Brings every watcher up to the visible revision, which it returns.
    async fn deliver(&mut self) -> Result<i64, Closed> {
        let target = self.core.store.read_rev();
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.deliver_one(id, target).await?;
        }
        Ok(target)
    }

    async fn deliver_one(&mut self, id: i64, target: i64) -> Result<(), Closed> {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            if w.compacted || w.next_rev > target {
                return Ok(());
            }
            let chunk = {
                let state = self.core.store.state();
                collect(&state, w, target)
            };
            let (revs, next_rev) = match chunk {
                Chunk::Compacted(compacted) => {
                    if let Some(w) = self.watchers.get_mut(&id) {
                        w.compacted = true;
                    }
                    // etcd sends this with header revision 0.
                    let reply = WatchResponse {
                        header: self.core.header(0),
                        watch_id: id,
                        canceled: true,
                        compact_revision: compacted,
                        ..Default::default()
                    };
                    return self.send(reply).await;
                }
                Chunk::Events { revs, next_rev } => (revs, next_rev),
            };
            let (synced, fragment) = match self.watchers.get_mut(&id) {
                Some(w) => {
                    w.next_rev = next_rev;
                    (w.synced, w.fragment)
                }
                None => return Ok(()),
            };
            let mut replies = Vec::new();
            if synced {
                for (rev, events) in revs {
                    replies.push((rev, events));
                }
            } else {
                let events: Vec<Event> = revs.into_iter().flat_map(|(_, evs)| evs).collect();
                replies.push((target, events));
            }
            for (rev, events) in replies {
                if events.is_empty() {
                    continue;
                }
                let reply = WatchResponse {
                    header: self.core.header(rev),
                    watch_id: id,
                    events,
                    ..Default::default()
                };
                if let Some(w) = self.watchers.get_mut(&id) {
                    w.sent_since_tick = true;
                }
                if fragment {
                    let limit = self.core.config.limits.max_request_bytes + GRPC_OVERHEAD_BYTES;
                    for piece in fragments(reply, limit) {
                        self.send(piece).await?;
                    }
                } else {
                    self.send(reply).await?;
                }
            }
            if next_rev > target
                && let Some(w) = self.watchers.get_mut(&id)
            {
                w.synced = true;
            }
        }
    }

    async fn periodic_progress(&mut self) -> Result<(), Closed> {
        let rev = self.deliver().await?;
        let due: Vec<i64> = self
            .watchers
            .iter_mut()
            .filter_map(|(id, w)| {
                let due = w.progress_notify && !w.sent_since_tick && !w.compacted;
                w.sent_since_tick = false;
                due.then_some(*id)
            })
            .collect();
        for id in due {
            let reply = WatchResponse {
                header: self.core.header(rev),
                watch_id: id,
                ..Default::default()
            };
            self.send_progress(reply).await?;
        }
        Ok(())
    }

    /// Sends a progress reply, late if a fault asks for it (events keep flowing meanwhile).
    async fn send_progress(&mut self, reply: WatchResponse) -> Result<(), Closed> {
        match self.core.faults.progress_delay() {
            None => self.send(reply).await,
            Some(delay) => {
                let out = self.out.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = out.send(Ok(reply)).await;
                });
                Ok(())
            }
        }
    }

    async fn send(&mut self, reply: WatchResponse) -> Result<(), Closed> {
        if let Some(until) = self.core.faults.stalled_until(self.id) {
            tokio::time::sleep_until(until.into()).await;
        }
        self.out.send(Ok(reply)).await.map_err(|_| Closed)
    }
}

enum Chunk {
    /// The watcher's next revision was compacted away.
    Compacted(i64),
    /// Events per revision (possibly empty after filtering), and the next revision owed.
    Events {
        revs: Vec<(i64, Vec<Event>)>,
        next_rev: i64,
    },
}

/// Reads the next batch for `w` from the log: up to [`MAX_REVS_PER_REPLY`] revisions with
/// matching changes, at most up to `target`.
fn collect(state: &MvccState, w: &Watcher, target: i64) -> Chunk {
    if w.next_rev < state.compacted() {
        return Chunk::Compacted(state.compacted());
    }
    let mut revs = Vec::new();
    let mut next_rev = target + 1;
    for (rev, records) in state.log_between(w.next_rev, target) {
        let matching: Vec<&Arc<Record>> = records
            .iter()
            .filter(|r| w.range.contains(&r.key))
            .collect();
        if matching.is_empty() {
            continue;
        }
        if revs.len() == MAX_REVS_PER_REPLY {
            next_rev = rev;
            break;
        }
        let events = matching
            .into_iter()
            .filter(|r| !(r.tombstone && w.no_delete || !r.tombstone && w.no_put))
            .map(|r| event(state, r, w.prev_kv))
            .collect();
        revs.push((rev, events));
    }
    Chunk::Events { revs, next_rev }
}

fn event(state: &MvccState, rec: &Record, with_prev: bool) -> Event {
    let mut ev = rec.to_event();
    if with_prev {
        // etcd reads the key at mod_revision - 1, which fails once that is compacted.
        let at = rec.rev.main - 1;
        if at >= state.compacted() {
            ev.prev_kv = state.get_at(&rec.key, at).map(|p| p.to_kv());
        }
    }
    debug_assert!(
        ev.r#type == EventType::Put as i32 || ev.kv.as_ref().is_some_and(|kv| kv.version == 0)
    );
    ev
}
