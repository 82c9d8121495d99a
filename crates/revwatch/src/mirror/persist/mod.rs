//! The snapshot file: its format ([`file`]), what the mirror starts from
//! ([`restore`]), and when the mirror writes it ([`Persister`]).
//!
//! Writes are rate-bounded ([`MirrorConfig::snapshot_interval`]), one at a time,
//! off the async threads; a failed write is made again when next due. At
//! shutdown [`Persister::flush`] writes the published state if it is newer than
//! the last write, after any write in flight (which must not land after it).
//!
//! [`MirrorConfig::snapshot_interval`]: super::MirrorConfig::snapshot_interval

pub(crate) mod file;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::task::{JoinError, JoinHandle};

use super::batch::ResyncReason;
use super::error::FailureKind;
use super::report::Reporter;
use super::snapshot::Snapshot;
use super::status::{LastError, LoadedSnapshot, State, Status};
use super::store::Writer;

pub use file::PersistError;

/// What the mirror starts from.
pub(crate) struct Restored<T> {
    pub(crate) writer: Writer<T>,
    pub(crate) status: Status,
    /// The revision of the loaded snapshot file, if one was loaded (the watch
    /// then resumes from it, and the file counts as written at it).
    pub(crate) loaded: Option<i64>,
}

/// Loads the snapshot file at `path` (if any) into `writer`, which holds the
/// empty state. A missing file starts from scratch; a corrupt or foreign one
/// (or one whose entries cannot be applied) is logged, reported in status and
/// ignored.
pub(crate) async fn restore<T: Send + Sync + 'static>(
    mut writer: Writer<T>,
    path: Option<&Path>,
    prefix: &[u8],
) -> Restored<T> {
    let mut status = Status::new(State::Syncing);
    let Some(path) = path else {
        return Restored {
            writer,
            status,
            loaded: None,
        };
    };
    let (p, pre) = (path.to_owned(), prefix.to_owned());
    let read = tokio::task::spawn_blocking(move || file::load(&p, &pre))
        .await
        .unwrap_or_else(|source| {
            Err(PersistError::Task {
                path: path.to_owned(),
                source,
            })
        });
    let file = match read {
        Ok(Some(file)) => Some(file),
        Ok(None) => None,
        Err(e) => {
            report_bad_file(&mut status, e.to_string());
            None
        }
    };
    let mut loaded = None;
    if let Some(file) = file {
        let mut relist = writer.relist(file.revision, ResyncReason::InitialList);
        match relist.page(file.kvs) {
            Ok(()) => {
                let keys = relist.finish().snapshot.len();
                tracing::info!(path = %path.display(), revision = file.revision, keys, "loaded snapshot file");
                loaded = Some(file.revision);
                status.state = State::Stale;
                status.revision = file.revision;
                status.keys = keys;
                status.loaded_snapshot = Some(LoadedSnapshot {
                    revision: file.revision,
                    written_at: file.written_at,
                });
            }
            Err(e) => {
                // The writer still holds the empty state (a list takes effect only
                // once finished); the ignored file's decode errors do not count.
                writer.take_new_failures();
                report_bad_file(&mut status, e.to_string());
            }
        }
    }
    Restored {
        writer,
        status,
        loaded,
    }
}

fn report_bad_file(status: &mut Status, message: String) {
    tracing::error!(error = %message, "ignoring the snapshot file");
    status.last_error = Some(LastError {
        kind: FailureKind::Other,
        message,
        at: SystemTime::now(),
    });
}

/// Rate-bounded snapshot file writes, one at a time, off the async threads.
pub(crate) struct Persister {
    path: PathBuf,
    prefix: Vec<u8>,
    interval: Duration,
    last_write: Option<Instant>,
    /// The revision of the last write started; `None` before the first, and
    /// after a failed one (write again when next due).
    written: Option<i64>,
    in_flight: Option<JoinHandle<io::Result<()>>>,
    reporter: Reporter,
}

impl Persister {
    /// Writes to `path`, at most every `interval`. `written`: the revision the
    /// file already holds (the loaded one).
    pub(crate) fn new(
        path: PathBuf,
        prefix: Vec<u8>,
        interval: Duration,
        written: Option<i64>,
        reporter: Reporter,
    ) -> Self {
        Persister {
            path,
            prefix,
            interval,
            last_write: None,
            written,
            in_flight: None,
            reporter,
        }
    }

    /// Whether the state at `revision` is newer than the file. The empty state
    /// at revision 0 (nothing listed yet) is never written.
    fn is_newer(&self, revision: i64) -> bool {
        revision > self.written.unwrap_or(0)
    }

    /// Whether a write of the state at `revision` should start at `now`.
    fn should_start(&self, revision: i64, now: Instant) -> bool {
        self.in_flight.is_none()
            && self
                .last_write
                .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
            && self.is_newer(revision)
    }

    /// When the file should next be written, if it lags behind `applied`.
    pub(crate) fn due(&self, applied: i64) -> Option<Instant> {
        if !self.is_newer(applied) {
            return None;
        }
        Some(
            self.last_write
                .map_or_else(Instant::now, |t| t + self.interval),
        )
    }

    /// Starts a write of the state at `revision` if one is due and none is
    /// running; `snapshot` gives that state, only then.
    pub(crate) fn maybe_write<T: Send + Sync + 'static>(
        &mut self,
        revision: i64,
        snapshot: impl FnOnce() -> Arc<Snapshot<T>>,
    ) {
        if self.in_flight.as_ref().is_some_and(JoinHandle::is_finished)
            && let Some(Some(written)) = self.in_flight.take().map(futures::FutureExt::now_or_never)
        {
            // A failure is reported, and the state written again when next due.
            let _ = self.finished(written);
        }
        let now = Instant::now();
        if !self.should_start(revision, now) {
            return;
        }
        let snapshot = snapshot();
        debug_assert_eq!(snapshot.revision(), revision);
        self.last_write = Some(now);
        self.written = Some(revision);
        let (path, prefix) = (self.path.clone(), self.prefix.clone());
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            file::write(&path, &prefix, &snapshot)
        }));
    }

    /// Writes `snapshot` if it is newer than the last write, after any write in
    /// flight.
    pub(crate) async fn flush<T: Send + Sync + 'static>(
        &mut self,
        snapshot: Arc<Snapshot<T>>,
    ) -> Result<(), PersistError> {
        if let Some(h) = self.in_flight.take() {
            // A failure is reported and the state written again below.
            let _ = self.finished(h.await);
        }
        let revision = snapshot.revision();
        if !self.is_newer(revision) {
            return Ok(());
        }
        let (path, prefix) = (self.path.clone(), self.prefix.clone());
        let written =
            tokio::task::spawn_blocking(move || file::write(&path, &prefix, &snapshot)).await;
        self.finished(written)?;
        self.written = Some(revision);
        tracing::info!(path = %self.path.display(), revision, "wrote the final snapshot file");
        Ok(())
    }

    /// Counts (and logs) a finished write; after a failure, the next write is due
    /// whatever the revision.
    fn finished(&mut self, written: Result<io::Result<()>, JoinError>) -> Result<(), PersistError> {
        let path = self.path.clone();
        let result = match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(PersistError::Io { path, source }),
            Err(source) => Err(PersistError::Task { path, source }),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "snapshot file write failed");
            self.written = None;
        }
        self.reporter.snapshot_written(result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::decode::{DecodePolicy, RawBytes};
    use crate::mirror::metrics::Metrics;
    use bytes::Bytes;
    use etcd_proto::mvccpb::KeyValue;

    const INTERVAL: Duration = Duration::from_secs(5);

    fn writer() -> Writer<Bytes> {
        Writer::new(
            &Snapshot::empty(0),
            Arc::new(RawBytes),
            DecodePolicy::DropKey,
        )
    }

    fn kv(key: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: b"v".to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    fn snapshot(kvs: Vec<KeyValue>, rev: i64) -> Arc<Snapshot<Bytes>> {
        let mut w = writer();
        let mut l = w.relist(rev, ResyncReason::InitialList);
        l.page(kvs).unwrap();
        l.finish().snapshot
    }

    fn persister(path: PathBuf, written: Option<i64>) -> Persister {
        let reporter = Reporter::new(Status::new(State::Syncing), Metrics::new());
        Persister::new(path, b"p/".to_vec(), INTERVAL, written, reporter)
    }

    #[test]
    fn a_write_starts_when_due_and_newer_than_the_file() {
        let t0 = Instant::now();
        let mut p = persister("unused".into(), None);
        assert!(!p.should_start(0, t0), "the empty state is never written");
        assert!(p.should_start(1, t0), "the first write is due at once");
        p.last_write = Some(t0);
        p.written = Some(4);
        assert!(
            !p.should_start(5, t0 + INTERVAL / 2),
            "not before the interval"
        );
        assert!(p.should_start(5, t0 + INTERVAL));
        assert!(!p.should_start(4, t0 + INTERVAL), "nothing newer");
        // After a failed write, the same revision is written again.
        p.written = None;
        assert!(p.should_start(4, t0 + INTERVAL));
    }

    #[test]
    fn the_next_write_is_due_only_while_the_file_lags() {
        let t0 = Instant::now();
        let mut p = persister("unused".into(), Some(7));
        assert_eq!(p.due(7), None);
        assert!(p.due(8).is_some_and(|t| t >= t0), "due now");
        p.last_write = Some(t0);
        assert_eq!(p.due(8), Some(t0 + INTERVAL));
    }

    #[tokio::test]
    async fn flush_waits_for_the_write_in_flight_and_writes_only_what_is_newer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let mut p = persister(path.clone(), None);
        let first = snapshot(vec![kv("p/a", 2)], 3);
        p.maybe_write(3, || Arc::clone(&first));
        assert!(p.in_flight.is_some());
        let second = snapshot(vec![kv("p/a", 2), kv("p/b", 4)], 4);
        // Not due yet: its snapshot is not even asked for; only the flush writes
        // it, after the first write landed.
        p.maybe_write(4, || -> Arc<Snapshot<Bytes>> {
            panic!("built though not due")
        });
        p.flush(Arc::clone(&second)).await.unwrap();
        let loaded = file::load(&path, b"p/").unwrap().unwrap();
        assert_eq!((loaded.revision, loaded.kvs.len()), (4, 2));
        assert_eq!(p.written, Some(4));
        // Nothing newer: no write.
        std::fs::remove_file(&path).unwrap();
        p.flush(second).await.unwrap();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_the_io_error_as_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = persister(dir.path().join("missing/snap"), None);
        let err = p.flush(snapshot(vec![], 2)).await.unwrap_err();
        assert!(
            matches!(&err, PersistError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert_eq!(p.written, None, "written again when next due");
    }

    #[tokio::test]
    async fn restore_loads_a_file_and_ignores_a_bad_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let r = restore(writer(), Some(&path), b"p/").await;
        assert_eq!((r.loaded, r.status.state), (None, State::Syncing));
        assert!(r.status.last_error.is_none(), "a missing file is no error");

        file::write(&path, b"p/", &snapshot(vec![kv("p/a", 2)], 6)).unwrap();
        let r = restore(writer(), Some(&path), b"p/").await;
        assert_eq!((r.loaded, r.status.state), (Some(6), State::Stale));
        assert_eq!((r.status.revision, r.status.keys), (6, 1));
        assert_eq!(r.status.loaded_snapshot.map(|f| f.revision), Some(6));
        assert_eq!(r.writer.revision(), 6);

        let r = restore(writer(), Some(&path), b"q/").await;
        assert_eq!((r.loaded, r.status.state), (None, State::Syncing));
        let message = r.status.last_error.map(|e| e.message);
        assert!(message.is_some_and(|m| m.contains("another prefix")));
        assert_eq!(r.writer.revision(), 0);
    }
}
