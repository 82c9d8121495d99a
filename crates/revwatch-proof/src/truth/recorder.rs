//! Recording etcd's whole history with an independent raw watch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_proto::etcdserverpb::watch_client::WatchClient;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use etcd_proto::mvccpb::event::EventType;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{Compaction, Truth, TruthError, probe};
use crate::etcd::{connect, entry_of};
use crate::history::{Change, Op};
use crate::keys::KeyRange;

/// Pause before reconnecting after a stream error.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How often a range watch asks for progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(300);

/// Watches the whole keyspace (or one range) from revision 1 on raw gRPC,
/// straight to the members, reconnecting (at the next revision, on the next
/// member) after errors, and collects every revision's changes.
///
/// On the whole keyspace every revision has events, so the events alone say
/// how far the record is complete. A range watch also asks for progress
/// marks to know that.
///
/// It fails if etcd compacted history it has not read yet, or if etcd's
/// stream itself goes back in time or repeats a revision: the truth must
/// not depend on the behaviour it is used to judge.
#[derive(Debug)]
pub struct TruthRecorder {
    shared: Arc<Mutex<Recorded>>,
    reached: watch::Receiver<i64>,
    task: JoinHandle<()>,
    probe: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Recorded {
    revisions: BTreeMap<i64, Vec<Change>>,
    compactions: Vec<Compaction>,
    last: i64,
    fatal: Option<TruthError>,
    last_error: String,
}

/// How one watch stream ended.
enum StreamEnd {
    Retry(String),
    Fatal(TruthError),
}

impl TruthRecorder {
    /// Starts recording the whole keyspace from revision 1. Must be called
    /// inside a tokio runtime.
    pub fn start(endpoints: Vec<String>) -> Self {
        Self::start_range(endpoints, KeyRange::all())
    }

    /// Starts recording `range` from revision 1.
    pub fn start_range(endpoints: Vec<String>, range: KeyRange) -> Self {
        let shared = Arc::new(Mutex::new(Recorded {
            last: 1,
            ..Recorded::default()
        }));
        let (tx, reached) = watch::channel(1);
        let task = tokio::spawn(run(endpoints, range, Arc::clone(&shared), tx));
        Self {
            shared,
            reached,
            task,
            probe: None,
        }
    }

    /// Records a compaction the run makes itself; call it before asking etcd,
    /// so that no relist can come before the record of its cause.
    pub fn compacted(&self, compaction: Compaction) {
        self.lock().compactions.push(compaction);
    }

    /// Also follows the compaction revision at `endpoint` (for etcd
    /// compacting on its own), recording each compaction found.
    pub fn follow_compactions(&mut self, endpoint: String) {
        let shared = Arc::clone(&self.shared);
        let found = move |c: Compaction| {
            let mut rec = shared.lock().unwrap_or_else(PoisonError::into_inner);
            rec.compactions.push(c);
        };
        if let Some(old) = self
            .probe
            .replace(tokio::spawn(probe::follow(endpoint, found)))
        {
            old.abort();
        }
    }

    /// The last revision recorded completely.
    pub fn reached(&self) -> i64 {
        *self.reached.borrow()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        // A poisoned lock only means a panic elsewhere; the data is whole.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every revision up to `revision` is recorded.
    pub async fn wait_through(&self, revision: i64, timeout: Duration) -> Result<(), TruthError> {
        let mut rx = self.reached.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|&r| r >= revision)).await;
        if let Some(e) = self.lock().fatal.take() {
            return Err(e);
        }
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(TruthError::RecorderStopped(self.lock().last_error.clone())),
            Err(_) => Err(TruthError::Timeout {
                wanted: revision,
                reached: self.reached(),
                after: timeout,
                last_error: self.lock().last_error.clone(),
            }),
        }
    }

    /// Waits for `through`, stops, and returns the truth up to it, checked
    /// for etcd's version rules and for missing revisions.
    /// Only meaningful for a recorder of the whole keyspace.
    pub async fn finish(self, through: i64, timeout: Duration) -> Result<Truth, TruthError> {
        self.wait_through(through, timeout).await?;
        let compactions = self.lock().compactions.clone();
        let revisions = self.finish_raw(through, timeout).await?;
        let truth = Truth::new(revisions, through)?.with_compactions(compactions);
        truth.require_contiguous()?;
        Ok(truth)
    }

    /// Waits for `through`, stops, and returns what was recorded up to it,
    /// unchecked (for a range watch used as a subscriber).
    pub async fn finish_raw(
        self,
        through: i64,
        timeout: Duration,
    ) -> Result<BTreeMap<i64, Vec<Change>>, TruthError> {
        self.wait_through(through, timeout).await?;
        self.task.abort();
        if let Some(p) = &self.probe {
            p.abort();
        }
        let mut revisions = std::mem::take(&mut self.lock().revisions);
        revisions.retain(|r, _| *r <= through);
        Ok(revisions)
    }
}

impl Drop for TruthRecorder {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.probe {
            p.abort();
        }
    }
}

async fn run(
    endpoints: Vec<String>,
    range: KeyRange,
    shared: Arc<Mutex<Recorded>>,
    reached: watch::Sender<i64>,
) {
    let lock = || shared.lock().unwrap_or_else(PoisonError::into_inner);
    for endpoint in endpoints.iter().cycle() {
        match watch_once(endpoint, &range, &shared, &reached).await {
            StreamEnd::Fatal(e) => {
                lock().fatal = Some(e);
                return;
            }
            StreamEnd::Retry(e) => lock().last_error = format!("{endpoint}: {e}"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    lock().fatal = Some(TruthError::RecorderStopped("no endpoints".into()));
}

/// One watch stream, from the revision after the last recorded one.
async fn watch_once(
    endpoint: &str,
    range: &KeyRange,
    shared: &Mutex<Recorded>,
    reached: &watch::Sender<i64>,
) -> StreamEnd {
    let lock = || shared.lock().unwrap_or_else(PoisonError::into_inner);
    let channel = match connect(endpoint).await {
        Ok(c) => c,
        Err(e) => return StreamEnd::Retry(e.to_string()),
    };
    let next = lock().last + 1;
    let (tx, rx) = mpsc::channel(4);
    let create = RequestUnion::CreateRequest(WatchCreateRequest {
        key: range.key().to_vec(),
        range_end: range.range_end().to_vec(),
        start_revision: next,
        ..Default::default()
    });
    // Cannot fail: the receiver is alive and the buffer empty.
    let _ = tx.try_send(WatchRequest {
        request_union: Some(create),
    });
    // The request stream stays open while `tx` lives: closing it would end
    // the watch.
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut request = tonic::Request::new(requests);
    // Without it, a member cut off from its cluster hangs instead of failing.
    request.metadata_mut().insert(
        "hasleader",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = match WatchClient::new(channel).watch(request).await {
        Ok(s) => s.into_inner(),
        Err(status) => return StreamEnd::Retry(status.to_string()),
    };
    let wants_progress = *range != KeyRange::all();
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    // etcd before 3.4.31 may answer a progress request before it sent events
    // at or below the reply's revision (etcd#15220). A reply only vouches
    // for its revision once a reply to a request sent after it arrived.
    // Replies come in request order, and a request may go unanswered (while
    // the watcher is unsynced), so counting replies errs on the safe side.
    let mut unconfirmed: Option<(i64, u64)> = None;
    let (mut asked, mut answered) = (0u64, 0u64);
    loop {
        let message = tokio::select! {
            m = stream.message() => m,
            _ = tick.tick(), if wants_progress => {
                let progress = RequestUnion::ProgressRequest(WatchProgressRequest {});
                if tx.send(WatchRequest { request_union: Some(progress) }).await.is_err() {
                    return StreamEnd::Retry("request stream closed".into());
                }
                asked += 1;
                continue;
            }
        };
        match message {
            Ok(Some(resp)) => {
                if resp.canceled {
                    if resp.compact_revision > 0 {
                        return StreamEnd::Fatal(TruthError::Compacted {
                            requested: lock().last + 1,
                            compact_revision: resp.compact_revision,
                        });
                    }
                    return StreamEnd::Retry(format!("watch canceled: {}", resp.cancel_reason));
                }
                let mut rec = lock();
                // A progress mark: nothing more below its revision (the
                // created reply's revision vouches for nothing).
                if !resp.created && resp.events.is_empty() {
                    let revision = resp.header.as_ref().map_or(0, |h| h.revision);
                    answered += 1;
                    if let Some((earlier, asked_then)) = unconfirmed
                        && answered > asked_then
                    {
                        rec.last = rec.last.max(earlier);
                    }
                    unconfirmed = Some((revision, asked));
                } else if let Err(e) = record(&mut rec, resp) {
                    return StreamEnd::Fatal(e);
                }
                reached.send_replace(rec.last);
            }
            Ok(None) => return StreamEnd::Retry("stream closed".into()),
            Err(status) => return StreamEnd::Retry(status.to_string()),
        }
    }
}

/// Adds one response's events. Revisions must move strictly forward across
/// responses: a revision is never split over responses without `fragment`.
fn record(rec: &mut Recorded, resp: WatchResponse) -> Result<(), TruthError> {
    let anomaly = |detail: String| TruthError::Record {
        record: "etcd's watch stream".into(),
        problem: detail,
    };
    let floor = rec.last;
    for ev in resp.events {
        let kv = ev
            .kv
            .ok_or_else(|| anomaly("an event without a key-value".into()))?;
        let revision = kv.mod_revision;
        if revision <= floor || revision < rec.last {
            return Err(anomaly(format!(
                "event at revision {revision} after revision {} was complete",
                rec.last
            )));
        }
        let (key, entry) = entry_of(kv);
        let op = if ev.r#type == EventType::Delete as i32 {
            Op::Delete
        } else {
            Op::Put(entry)
        };
        rec.revisions
            .entry(revision)
            .or_default()
            .push(Change { key, op });
        rec.last = revision;
    }
    Ok(())
}
