//! Reading the protocol's keys, and checking a publisher's expectation against them.

use etcd_proto::key_range::{KeyRange, prefix_end};
use etcd_proto::mvccpb::KeyValue;
use revwatch::client::{Client, TxnRequest};

use super::ops;
use super::{Expect, PublishError};
use crate::layout::{Layout, escape};

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
pub(crate) fn active_spans(layout: &Layout, active: Option<&Read>) -> Vec<KeyRange> {
    match active {
        Some(pointer) => vec![KeyRange::prefix(&layout.generation(&pointer.value))],
        None => {
            // The whole prefix starts at "\0" when it is empty (etcd refuses an
            // empty key); the reserved subtree ends in '/', so its end is a real key.
            let whole = KeyRange::prefix(layout.prefix());
            let reserved = layout.reserved();
            vec![
                KeyRange::new(whole.key(), &reserved),
                KeyRange::new(&prefix_end(&reserved), whole.range_end()),
            ]
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
    pub(crate) spans: Vec<KeyRange>,
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
    let pointer = KeyRange::single(&layout.pointer());
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
            return Err(conflict(start.revision, span.key()));
        }
    }
    Ok(Guard { expected, spans })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends(spans: &[KeyRange]) -> Vec<(&[u8], &[u8])> {
        spans.iter().map(|s| (s.key(), s.range_end())).collect()
    }

    #[test]
    fn direct_mode_spans_skip_the_reserved_subtree() {
        let spans = active_spans(&Layout::new("p/"), None);
        assert_eq!(
            ends(&spans),
            [(&b"p/"[..], &b"p/.revwatch/"[..]), (b"p/.revwatch0", b"p0")]
        );
        // The empty prefix starts at etcd's smallest key and runs to the end.
        let spans = active_spans(&Layout::new(""), None);
        assert_eq!(
            ends(&spans),
            [(&b"\0"[..], &b".revwatch/"[..]), (b".revwatch0", b"\0")]
        );
    }

    #[test]
    fn generation_mode_span_is_the_generation() {
        let pointer = Read {
            value: b"g1".to_vec(),
            mod_revision: 3,
        };
        let spans = active_spans(&Layout::new("p/"), Some(&pointer));
        assert_eq!(
            ends(&spans),
            [(&b"p/.revwatch/gen/g1/"[..], &b"p/.revwatch/gen/g10"[..])]
        );
    }
}
