//! Reading the protocol's keys, and checking a publisher's expectation against them.

use etcd_proto::mvccpb::KeyValue;
use revwatch::client::{Client, TxnRequest};

use super::ops::{self, Span};
use super::{Expect, PublishError};
use crate::layout::{Layout, escape, prefix_end};

/// One key as read: value and `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Read {
    pub(crate) value: Vec<u8>,
    pub(crate) mod_revision: i64,
}

/// The pointer and the previous generation at one revision.
#[derive(Debug, Clone)]
pub(crate) struct Pointers {
    pub(crate) revision: i64,
    pub(crate) active: Option<Read>,
    pub(crate) previous: Option<Read>,
}

impl Pointers {
    /// The pointer's `mod_revision`; 0 when absent (etcd's value for a missing key).
    pub(crate) fn active_mod(&self) -> i64 {
        self.active.as_ref().map_or(0, |r| r.mod_revision)
    }

    /// The previous pointer's `mod_revision`; 0 when absent.
    pub(crate) fn previous_mod(&self) -> i64 {
        self.previous.as_ref().map_or(0, |r| r.mod_revision)
    }
}

fn read_of(kvs: &[KeyValue]) -> Option<Read> {
    kvs.first().map(|kv| Read {
        value: kv.value.clone(),
        mod_revision: kv.mod_revision,
    })
}

/// Reads the pointer and the previous pointer at one revision.
pub(crate) async fn read_pointers(
    client: &Client,
    layout: &Layout,
) -> Result<Pointers, PublishError> {
    let resp = client
        .txn(TxnRequest {
            success: vec![ops::get(&layout.pointer()), ops::get(&layout.previous())],
            ..Default::default()
        })
        .await?;
    Ok(Pointers {
        revision: resp.header.as_ref().map_or(0, |h| h.revision),
        active: read_of(ops::range_kvs(&resp, 0)),
        previous: read_of(ops::range_kvs(&resp, 1)),
    })
}

/// The key ranges that make up the active tree when the pointer holds `active`:
/// the generation's keys, or (direct mode) the prefix minus the reserved subtree.
pub(crate) fn active_spans(layout: &Layout, active: Option<&Read>) -> Vec<Span> {
    match active {
        Some(pointer) => vec![Span::prefix(&layout.generation(&pointer.value))],
        None => {
            let reserved = layout.reserved();
            let after = Span::prefix(layout.prefix());
            let reserved_end = prefix_end(&reserved);
            let mut spans = vec![Span::between(layout.prefix().to_vec(), reserved.clone())];
            // Nothing sorts after the reserved subtree when its end is "to the end".
            if !reserved_end.is_empty() {
                spans.push(Span::between(reserved_end, after.end));
            }
            spans
        }
    }
}

/// What the final txn must still find unchanged.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    /// The revision the caller expects the active set at.
    pub(crate) expected: i64,
    /// The active set's key ranges, unchanged since the start read (empty for
    /// [`Expect::Any`]).
    pub(crate) spans: Vec<Span>,
}

/// Checks `expect` against the state read at `start`, and returns what the final
/// txn must guard.
pub(crate) async fn check_expect(
    client: &Client,
    layout: &Layout,
    start: &Pointers,
    expect: Expect,
) -> Result<Guard, PublishError> {
    let spans = active_spans(layout, start.active.as_ref());
    let expected = match expect {
        Expect::Any => {
            return Ok(Guard {
                expected: start.revision,
                spans: Vec::new(),
            });
        }
        Expect::Current => start.revision,
        // A revision above what etcd served us says nothing more than "now".
        Expect::Revision(r) => r.min(start.revision),
    };
    let conflict = |actual, key: &[u8]| PublishError::Conflict {
        expected,
        actual,
        key: escape(key),
    };
    if start.active_mod() > expected {
        return Err(conflict(start.active_mod(), &layout.pointer()));
    }
    if expected == start.revision {
        return Ok(Guard { expected, spans });
    }
    for span in &spans {
        let mut newest = ops::newest_in(span);
        newest.revision = start.revision;
        let resp = client.range(newest).await?;
        if let Some(kv) = resp.kvs.first().filter(|kv| kv.mod_revision > expected) {
            return Err(conflict(kv.mod_revision, &kv.key));
        }
    }
    // No key changed after `expected`; a deletion shows as a smaller count (every
    // key counted now already existed then). The pointer counts too: deleting it
    // switches to direct mode.
    let pointer = Span::between(layout.pointer(), Vec::new());
    for span in spans.iter().chain([&pointer]) {
        let then = client
            .range(ops::count_in(span, expected))
            .await
            .map_err(|source| {
                if source.is_compacted() {
                    PublishError::ExpectCompacted { expected, source }
                } else {
                    PublishError::Etcd(source)
                }
            })?;
        let now = client.range(ops::count_in(span, start.revision)).await?;
        if then.count != now.count {
            return Err(conflict(start.revision, &span.key));
        }
    }
    Ok(Guard { expected, spans })
}
