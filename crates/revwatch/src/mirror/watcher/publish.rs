//! The writer's side of the watcher: the state, where it is published, and what
//! is reported and persisted with each publication.
//!
//! Every publication makes the state current, then reports it (status and
//! metrics), then wakes waiters and subscribers (the hub calls back in between):
//! whoever has waited for a revision sees a status at least as new.

use std::sync::Arc;

use crate::mirror::batch::{State, Update};
use crate::mirror::hub::Hub;
use crate::mirror::persist::{PersistError, Persister};
use crate::mirror::report::{Published, Reporter};
use crate::mirror::snapshot::Snapshot;
use crate::mirror::store::{Applied, Writer};

pub(crate) struct Publisher<T> {
    pub(crate) writer: Writer<T>,
    pub(crate) hub: Arc<Hub<T>>,
    pub(crate) reporter: Reporter,
    pub(crate) persister: Option<Persister>,
    /// Most failing keys listed in status.
    pub(crate) max_reported_decode_failures: usize,
    /// Revisions published as an unbuilt batch since the writer last built a
    /// snapshot (see [`run`](super::run)).
    pub(crate) unbuilt: u64,
}

impl<T: Send + Sync + 'static> Publisher<T> {
    /// Publishes `snapshot` and the `update` that leads to it, then maybe writes
    /// the snapshot file.
    fn publish(&mut self, snapshot: Arc<Snapshot<T>>, update: Update<T>) {
        let max = self.max_reported_decode_failures;
        let (reporter, writer) = (&self.reporter, &mut self.writer);
        self.hub.publish(State::At(snapshot), &[update], || {
            report_published(reporter, writer, max, None);
        });
        self.unbuilt = 0;
        self.persist_maybe();
    }

    /// Publishes a list's result.
    pub(crate) fn listed(&mut self, applied: Applied<T>) {
        let Applied { snapshot, batch } = applied;
        self.publish(snapshot, Update::Batch(batch));
    }

    /// Publishes a bookmark: nothing changed up to `revision`.
    pub(crate) fn bookmark(&mut self, revision: i64) {
        let snapshot = self.writer.advance(revision);
        self.publish(snapshot, Update::Progress(revision));
    }

    /// Starts a write of the published state to the snapshot file if one is
    /// due and none is running. Only then is its snapshot built, if it is not.
    pub(crate) fn persist_maybe(&mut self) {
        if let Some(p) = &mut self.persister {
            p.maybe_write(self.writer.revision(), || self.hub.snapshot());
        }
    }

    /// When the snapshot file should next be written, if it lags behind.
    pub(crate) fn persist_due(&self) -> Option<std::time::Instant> {
        self.persister.as_ref()?.due(self.writer.revision())
    }

    /// Writes the published snapshot to the file, if configured and newer than
    /// the last write.
    pub(crate) async fn flush(&mut self) -> Result<(), PersistError> {
        let snapshot = self.hub.snapshot();
        match &mut self.persister {
            Some(p) => p.flush(snapshot).await,
            None => Ok(()),
        }
    }
}

/// Reports the writer's state as published, with the decode failures it holds.
/// `applied`: the events and revisions it applied.
pub(super) fn report_published<T: Send + Sync + 'static>(
    reporter: &Reporter,
    writer: &mut Writer<T>,
    max_reported_decode_failures: usize,
    applied: Option<(u64, u64)>,
) {
    let published = Published {
        revision: writer.revision(),
        keys: writer.len(),
        applied,
        new_decode_failures: writer.take_new_failures(),
        decode_failure_count: writer.failure_count(),
    };
    reporter.published(published, || {
        writer
            .failures()
            .take(max_reported_decode_failures)
            .cloned()
            .collect()
    });
}
