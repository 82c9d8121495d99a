//! The server-wide view of watches: open streams, their watchers, and the watcher count
//! the `max_watchers` limit is checked against. Each stream's own work is in
//! `watch/stream.rs`; this bookkeeping is state the whole server shares, so it is a leaf
//! beside the streams rather than under them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// `(watch_id, key, range_end)` of each watcher of one stream.
pub(crate) type WatcherList = Vec<(i64, Vec<u8>, Vec<u8>)>;

/// Server-wide watch bookkeeping.
#[derive(Debug)]
pub(crate) struct WatchHub {
    next_stream: AtomicU64,
    watchers: AtomicUsize,
    max_watchers: usize,
    streams: Mutex<HashMap<u64, WatcherList>>,
}

impl WatchHub {
    pub fn new(max_watchers: usize) -> Self {
        Self {
            next_stream: AtomicU64::new(1),
            watchers: AtomicUsize::new(0),
            max_watchers,
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn streams_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, WatcherList>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn open_stream(&self) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.streams_lock().insert(id, Vec::new());
        id
    }

    pub fn close_stream(&self, id: u64) {
        if let Some(list) = self.streams_lock().remove(&id) {
            self.watchers.fetch_sub(list.len(), Ordering::AcqRel);
        }
    }

    /// Counts a new watcher unless the limit is reached.
    pub fn add_watcher(&self, stream: u64, watch_id: i64, key: &[u8], range_end: &[u8]) -> bool {
        let reserved = self
            .watchers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_watchers).then_some(n + 1)
            })
            .is_ok();
        if reserved && let Some(list) = self.streams_lock().get_mut(&stream) {
            list.push((watch_id, key.to_vec(), range_end.to_vec()));
        }
        reserved
    }

    pub fn remove_watcher(&self, stream: u64, watch_id: i64) {
        if let Some(list) = self.streams_lock().get_mut(&stream) {
            let before = list.len();
            list.retain(|(id, ..)| *id != watch_id);
            self.watchers
                .fetch_sub(before - list.len(), Ordering::AcqRel);
        }
    }

    /// Open streams and their watchers, by stream id.
    #[cfg(feature = "fault-injection")]
    pub fn streams(&self) -> Vec<(u64, WatcherList)> {
        let mut out: Vec<_> = self
            .streams_lock()
            .iter()
            .map(|(id, list)| (*id, list.clone()))
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }
}
