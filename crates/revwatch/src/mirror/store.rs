//! The writer's side of the mirror: applies one revision, a list, or a bookmark to
//! the persistent map and yields what to publish: a batch per revision, a list's
//! snapshot and resync batch, the current snapshot.
//!
//! Each operation costs O(changed keys × log n): the map is persistent, so a
//! snapshot shares every untouched node with the writer's map, and the writer
//! copies a node only the first time it changes one after a snapshot was taken.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;
use etcd_proto::mvccpb::{self, event::EventType};

use super::batch::{Batch, Change, ChangeKind, ResyncReason, State};
use super::decode::{DecodeError, DecodeFailure, DecodePolicy, Decoder, guard};
use super::key::Key;
use super::snapshot::{Entry, Map, Slot, Snapshot};

/// An event or listed key that cannot be applied: the response is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Invalid(pub(crate) String);

pub(crate) struct Writer<T> {
    map: Map<T>,
    revision: i64,
    decoder: Arc<dyn Decoder<T>>,
    policy: DecodePolicy,
    /// Keys whose current etcd value failed to decode.
    failures: BTreeMap<Key, DecodeFailure>,
    /// Decode errors since the last [`take_new_failures`](Self::take_new_failures).
    new_failures: u64,
}

/// The outcome of applying something: the snapshot to make current and the batch
/// that leads to it.
pub(crate) struct Applied<T> {
    pub(crate) snapshot: Arc<Snapshot<T>>,
    pub(crate) batch: Arc<Batch<T>>,
}

impl<T: Send + Sync + 'static> Writer<T> {
    pub(crate) fn new(
        initial: &Snapshot<T>,
        decoder: Arc<dyn Decoder<T>>,
        policy: DecodePolicy,
    ) -> Self {
        Writer {
            map: initial.entries.clone(),
            revision: initial.revision,
            decoder,
            policy,
            failures: BTreeMap::new(),
            new_failures: 0,
        }
    }

    /// The revision of the last published state.
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// Number of keys held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Keys whose current value failed to decode.
    pub(crate) fn failures(&self) -> impl Iterator<Item = &DecodeFailure> {
        self.failures.values()
    }

    /// Number of keys whose current value failed to decode.
    pub(crate) fn failure_count(&self) -> usize {
        self.failures.len()
    }

    /// Number of keys in the range, as etcd counts them: those held, and those
    /// dropped because their value fails to decode.
    pub(crate) fn raw_key_count(&self) -> usize {
        let dropped = self
            .failures
            .keys()
            .filter(|key| !self.map.contains_key(&key[..]))
            .count();
        self.map.len() + dropped
    }

    /// Number of decode errors since the last call.
    pub(crate) fn take_new_failures(&mut self) -> u64 {
        std::mem::take(&mut self.new_failures)
    }

    fn snapshot(&self) -> Arc<Snapshot<T>> {
        Arc::new(Snapshot {
            revision: self.revision,
            entries: self.map.clone(),
        })
    }

    /// A bookmark: the state is unchanged up to `revision`.
    pub(crate) fn advance(&mut self, revision: i64) -> Arc<Snapshot<T>> {
        debug_assert!(revision >= self.revision);
        self.revision = revision;
        self.snapshot()
    }

    /// The current state, as a snapshot to publish.
    pub(crate) fn current(&self) -> Arc<Snapshot<T>> {
        self.snapshot()
    }

    /// Applies every event of one revision, and yields its batch: the changes
    /// that lead from `before` (the state before this revision) to the state
    /// after it. The caller has checked that `revision` is above the current one
    /// and that every event carries it.
    ///
    /// No snapshot is taken: the map is updated in place (its nodes shared with
    /// a published snapshot are copied by the first change to them, and the next
    /// changes reuse the copies), and the batch builds its snapshot only if asked
    /// for, by replaying its changes on `before`. The state after the last of a
    /// run of revisions is published with [`current`](Self::current).
    pub(crate) fn apply_revision(
        &mut self,
        revision: i64,
        events: Vec<mvccpb::Event>,
        before: State<T>,
    ) -> Result<Arc<Batch<T>>, Invalid> {
        let mut changes = Vec::with_capacity(events.len());
        self.apply_events(revision, events, Some(&mut changes))?;
        Ok(Arc::new(Batch::replayed(revision, changes, before)))
    }

    /// Applies every event of one revision like [`apply_revision`](Self::apply_revision),
    /// but yields no batch: for revisions that no subscriber needs one by one,
    /// published later as part of a [`current`](Self::current) snapshot.
    pub(crate) fn apply_unpublished(
        &mut self,
        revision: i64,
        events: Vec<mvccpb::Event>,
    ) -> Result<(), Invalid> {
        self.apply_events(revision, events, None)
    }

    /// Validates and applies the events of one revision, recording their changes
    /// in `changes` if given. A bad event leaves the state untouched.
    fn apply_events(
        &mut self,
        revision: i64,
        events: Vec<mvccpb::Event>,
        mut changes: Option<&mut Vec<Change<T>>>,
    ) -> Result<(), Invalid> {
        // Validate everything first so a bad event leaves the map untouched.
        for ev in &events {
            let kv = ev
                .kv
                .as_ref()
                .ok_or_else(|| Invalid("event without a key-value".into()))?;
            if EventType::try_from(ev.r#type).is_err() {
                return Err(Invalid(format!("unknown event type {}", ev.r#type)));
            }
            if kv.mod_revision != revision {
                return Err(Invalid(format!(
                    "event for revision {} grouped under revision {revision}",
                    kv.mod_revision
                )));
            }
        }
        for ev in events {
            let Some(mut kv) = ev.kv else { continue };
            // Keys are looked up by their bytes: a key already present keeps its
            // stored `Key`, and changes name it by that.
            if ev.r#type == EventType::Delete as i32 {
                let removed = self.map.remove_with_key(&kv.key[..]);
                self.clear_failure(&kv.key);
                if let Some(changes) = changes.as_deref_mut() {
                    let (key, prev) = match removed {
                        Some((key, slot)) => (key, Some(slot.0)),
                        None => (Key::from(kv.key), None),
                    };
                    changes.push(Change {
                        key,
                        kind: ChangeKind::Delete { prev },
                    });
                }
                continue;
            }
            let key = std::mem::take(&mut kv.key);
            let entry = match self.decode_entry(&key, &mut kv) {
                Ok(entry) => entry,
                Err(error) => {
                    if let Some(change) = self.decode_failed(Key::from(key), revision, error)
                        && let Some(changes) = changes.as_deref_mut()
                    {
                        changes.push(change);
                    }
                    continue;
                }
            };
            self.clear_failure(&key);
            // One descent for a key already present: its entry is replaced in
            // place (in the nodes copied as needed).
            match (self.map.get_key_value_mut(&key[..]), changes.as_deref_mut()) {
                (Some((_, slot)), None) => slot.0 = entry,
                (Some((key, slot)), Some(changes)) => {
                    let prev = std::mem::replace(&mut slot.0, Arc::clone(&entry));
                    changes.push(Change {
                        key: key.clone(),
                        kind: ChangeKind::Put {
                            entry,
                            prev: Some(prev),
                        },
                    });
                }
                (None, None) => {
                    self.map.insert(Key::from(key), Slot(entry));
                }
                (None, Some(changes)) => {
                    let key = Key::from(key);
                    self.map.insert(key.clone(), Slot(Arc::clone(&entry)));
                    changes.push(Change {
                        key,
                        kind: ChangeKind::Put { entry, prev: None },
                    });
                }
            }
        }
        self.revision = revision;
        Ok(())
    }

    /// Forgets `key`'s decode failure, if any: it was deleted or decodes again.
    fn clear_failure(&mut self, key: &[u8]) {
        // Almost always empty: skip the lookup then, once per event.
        if !self.failures.is_empty() {
            self.failures.remove(key);
        }
    }

    /// Decodes `key`'s value, taken out of `kv`, into its entry. Guarded: a
    /// panicking decoder is one more bad value.
    fn decode_entry(
        &self,
        key: &[u8],
        kv: &mut mvccpb::KeyValue,
    ) -> Result<Arc<Entry<T>>, DecodeError> {
        let raw = Bytes::from(std::mem::take(&mut kv.value));
        let value = guard(|| self.decoder.decode(key, &raw))?;
        Ok(Arc::new(Entry {
            value,
            raw,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }))
    }

    /// Records a decode failure and applies the policy; returns the change
    /// subscribers must see, if any.
    fn decode_failed(&mut self, key: Key, revision: i64, error: DecodeError) -> Option<Change<T>> {
        note_failure(
            &mut self.failures,
            &mut self.new_failures,
            &key,
            revision,
            error,
        );
        match self.policy {
            DecodePolicy::DropKey => {
                let prev = self.map.remove(&key[..])?.0;
                Some(Change {
                    key,
                    kind: ChangeKind::Delete { prev: Some(prev) },
                })
            }
            DecodePolicy::KeepLastGood => None,
        }
    }

    /// Starts replacing the state with a fresh list at `revision`.
    pub(crate) fn relist(&mut self, revision: i64, reason: ResyncReason) -> Relist<'_, T> {
        Relist {
            old: self.map.clone(),
            new: self.map.clone(),
            failures: BTreeMap::new(),
            changes: Vec::new(),
            last_key: None,
            revision,
            reason,
            writer: self,
        }
    }
}

/// Records that `key`'s value at `revision` failed to decode, and counts it. The
/// report keeps the error's text.
fn note_failure(
    failures: &mut BTreeMap<Key, DecodeFailure>,
    new_failures: &mut u64,
    key: &Key,
    revision: i64,
    error: DecodeError,
) {
    let error = error.to_string();
    tracing::warn!(key = %String::from_utf8_lossy(key), revision, error, "value failed to decode");
    *new_failures += 1;
    let failure = DecodeFailure {
        key: key.clone(),
        revision,
        error,
    };
    failures.insert(key.clone(), failure);
}

/// A list in progress. Pages must come in key order; the old state stays published
/// until [`finish`](Self::finish), which yields one resync batch with exactly the
/// difference. Unchanged keys keep their entries, so memory grows with the
/// difference, not the size.
pub(crate) struct Relist<'a, T> {
    writer: &'a mut Writer<T>,
    old: Map<T>,
    new: Map<T>,
    failures: BTreeMap<Key, DecodeFailure>,
    changes: Vec<Change<T>>,
    last_key: Option<Key>,
    revision: i64,
    reason: ResyncReason,
}

impl<T: Send + Sync + 'static> Relist<'_, T> {
    /// Adds one page of listed keys.
    pub(crate) fn page(&mut self, kvs: Vec<mvccpb::KeyValue>) -> Result<(), Invalid> {
        for mut kv in kvs {
            if kv.mod_revision > self.revision || kv.create_revision > kv.mod_revision {
                return Err(Invalid(format!(
                    "listed key has create/mod revision {}/{} at list revision {}",
                    kv.create_revision, kv.mod_revision, self.revision
                )));
            }
            let key = Key::from(std::mem::take(&mut kv.key));
            if self.last_key.as_ref().is_some_and(|last| *last >= key) {
                return Err(Invalid(
                    "list pages are not in strictly increasing key order".into(),
                ));
            }
            self.delete_vanished(Bound::Included(&key[..]));
            let prev = self.old.get(&key).map(|s| Arc::clone(&s.0));
            // Unchanged: the version already held, or the one that already failed
            // to decode (it fails again: it keeps its failure record, and whatever
            // the policy left of it, and is not counted twice).
            let unchanged = match self.writer.failures.get(&key) {
                Some(failed) => failed.revision == kv.mod_revision,
                None => prev.as_ref().is_some_and(|p| {
                    p.mod_revision == kv.mod_revision && p.create_revision == kv.create_revision
                }),
            };
            if !unchanged {
                match self.writer.decode_entry(&key, &mut kv) {
                    Ok(entry) => {
                        self.new.insert(key.clone(), Slot(Arc::clone(&entry)));
                        self.changes.push(Change {
                            key: key.clone(),
                            kind: ChangeKind::Put { entry, prev },
                        });
                    }
                    Err(error) => {
                        note_failure(
                            &mut self.failures,
                            &mut self.writer.new_failures,
                            &key,
                            kv.mod_revision,
                            error,
                        );
                        if let (DecodePolicy::DropKey, Some(prev)) = (self.writer.policy, prev) {
                            self.new.remove(&key);
                            self.changes.push(Change {
                                key: key.clone(),
                                kind: ChangeKind::Delete { prev: Some(prev) },
                            });
                        }
                    }
                }
            } else if let Some(f) = self.writer.failures.get(&key) {
                self.failures.insert(key.clone(), f.clone());
            }
            self.last_key = Some(key);
        }
        Ok(())
    }

    /// Deletes old keys after the last listed key and before `upto`.
    fn delete_vanished(&mut self, upto: Bound<&[u8]>) {
        let from = match &self.last_key {
            Some(k) => Bound::Excluded(&k[..]),
            None => Bound::Unbounded,
        };
        let upto = match upto {
            Bound::Included(k) => Bound::Excluded(k),
            other => other,
        };
        for (key, slot) in self.old.range::<_, [u8]>((from, upto)) {
            self.new.remove(key);
            self.changes.push(Change {
                key: key.clone(),
                kind: ChangeKind::Delete {
                    prev: Some(Arc::clone(&slot.0)),
                },
            });
        }
    }

    /// Completes the list: deletes keys past the last listed one and makes the new
    /// state the writer's.
    pub(crate) fn finish(mut self) -> Applied<T> {
        self.delete_vanished(Bound::Unbounded);
        // A key still failing keeps its failure record (with its original revision);
        // keys that vanished or now decode lose theirs.
        self.writer.failures = self.failures;
        self.writer.map = self.new;
        self.writer.revision = self.revision;
        let snapshot = self.writer.snapshot();
        let batch = Arc::new(Batch::new(
            self.revision,
            Some(self.reason),
            self.changes,
            Arc::clone(&snapshot),
        ));
        Applied { snapshot, batch }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::decode::DecodeError;

    /// Decodes UTF-8; anything else fails.
    fn utf8() -> Arc<dyn Decoder<String>> {
        Arc::new(|_key: &[u8], value: &[u8]| -> Result<String, DecodeError> {
            Ok(std::str::from_utf8(value)?.to_owned())
        })
    }

    fn kv(key: &str, value: &[u8], create: i64, rev: i64) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: rev,
            version: rev - create + 1,
            lease: 0,
        }
    }

    fn put(kv: mvccpb::KeyValue) -> mvccpb::Event {
        mvccpb::Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: None,
        }
    }

    fn relist(w: &mut Writer<String>, at: i64, kvs: Vec<mvccpb::KeyValue>) -> Applied<String> {
        let mut r = w.relist(at, ResyncReason::Compacted);
        r.page(kvs).unwrap();
        r.finish()
    }

    #[test]
    fn the_raw_key_count_is_etcds_bad_values_included() {
        for policy in [DecodePolicy::DropKey, DecodePolicy::KeepLastGood] {
            let mut w = Writer::new(&Snapshot::empty(1), utf8(), policy);
            w.apply_unpublished(2, vec![put(kv("a", b"good", 2, 2))])
                .unwrap();
            // Bad from the start: held by neither policy, still a key in etcd.
            w.apply_unpublished(3, vec![put(kv("b", &[0xff], 3, 3))])
                .unwrap();
            // Bad after a good value: kept (once) or dropped.
            w.apply_unpublished(4, vec![put(kv("a", &[0xff], 2, 4))])
                .unwrap();
            let held = match policy {
                DecodePolicy::DropKey => 0,
                DecodePolicy::KeepLastGood => 1,
            };
            assert_eq!(
                (w.current().len(), w.raw_key_count()),
                (held, 2),
                "{policy:?}"
            );
        }
    }

    #[test]
    fn relists_count_a_value_that_still_fails_once() {
        for policy in [DecodePolicy::DropKey, DecodePolicy::KeepLastGood] {
            let mut w = Writer::new(&Snapshot::empty(1), utf8(), policy);
            w.apply_unpublished(2, vec![put(kv("k", b"good", 2, 2))])
                .unwrap();
            w.apply_unpublished(3, vec![put(kv("k", &[0xff], 2, 3))])
                .unwrap();
            assert_eq!(w.take_new_failures(), 1);
            let kept = w.current().get(b"k").map(|e| e.value.clone());
            let expected = match policy {
                DecodePolicy::DropKey => None,
                DecodePolicy::KeepLastGood => Some("good".to_string()),
            };
            assert_eq!(kept, expected, "{policy:?}");

            // The same failing version listed again: no new error, no change, and
            // the failure keeps its revision.
            let a = relist(&mut w, 5, vec![kv("k", &[0xff], 2, 3)]);
            assert_eq!(w.take_new_failures(), 0, "{policy:?}");
            assert!(a.batch.changes.is_empty(), "{policy:?}");
            assert_eq!(a.snapshot.get(b"k").map(|e| e.value.clone()), expected);
            let f: Vec<_> = w.failures().map(|f| f.revision).collect();
            assert_eq!(f, [3], "{policy:?}");

            // Another failing version is a new error.
            relist(&mut w, 7, vec![kv("k", &[0xfe], 2, 6)]);
            assert_eq!(w.take_new_failures(), 1, "{policy:?}");
            let f: Vec<_> = w.failures().map(|f| f.revision).collect();
            assert_eq!(f, [6], "{policy:?}");

            // Mended: the failure is gone and the value is back.
            let a = relist(&mut w, 9, vec![kv("k", b"fixed", 2, 8)]);
            assert_eq!(w.take_new_failures(), 0);
            assert_eq!(w.failure_count(), 0);
            assert_eq!(
                a.snapshot.get(b"k").map(|e| e.value.as_str()),
                Some("fixed")
            );
        }
    }
}
