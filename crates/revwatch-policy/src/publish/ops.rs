//! Builders for the compares and operations of the protocol's txns.

use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use etcd_proto::etcdserverpb::request_op::Request;
use etcd_proto::etcdserverpb::response_op::Response;
use etcd_proto::mvccpb::KeyValue;
use revwatch::client::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnResponse,
};

/// A key range `[key, end)`; an empty `end` means the single key `key`, `[0]`
/// (etcd's convention) every key from `key` on. etcd refuses an empty `key`, so
/// the smallest key `[0]` stands in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) key: Vec<u8>,
    pub(crate) end: Vec<u8>,
}

impl Span {
    /// Every key starting with `prefix`.
    pub(crate) fn prefix(prefix: &[u8]) -> Span {
        let end = crate::layout::prefix_end(prefix);
        // etcd: range_end "\0" = all keys >= key.
        let end = if end.is_empty() { vec![0] } else { end };
        Span::between(prefix.to_vec(), end)
    }

    /// Keys in `[key, end)`.
    pub(crate) fn between(key: Vec<u8>, end: Vec<u8>) -> Span {
        let key = if key.is_empty() { vec![0] } else { key };
        Span { key, end }
    }
}

/// `mod_revision(key) == revision` (0 = the key is absent).
pub(crate) fn mod_equals(key: &[u8], revision: i64) -> Compare {
    compare(
        key,
        &[],
        CompareTarget::Mod,
        CompareResult::Equal,
        TargetUnion::ModRevision(revision),
    )
}

/// Every key in `span` has `mod_revision < revision` (true for an empty span).
pub(crate) fn span_mod_below(span: &Span, revision: i64) -> Compare {
    compare(
        &span.key,
        &span.end,
        CompareTarget::Mod,
        CompareResult::Less,
        TargetUnion::ModRevision(revision),
    )
}

/// `create_revision(key) == revision` (0 = the key is absent).
pub(crate) fn created_at(key: &[u8], revision: i64) -> Compare {
    compare(
        key,
        &[],
        CompareTarget::Create,
        CompareResult::Equal,
        TargetUnion::CreateRevision(revision),
    )
}

fn compare(
    key: &[u8],
    end: &[u8],
    target: CompareTarget,
    result: CompareResult,
    union: TargetUnion,
) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: key.to_vec(),
        range_end: end.to_vec(),
        target_union: Some(union),
    }
}

pub(crate) fn put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub(crate) fn delete(span: &Span) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: span.key.clone(),
            range_end: span.end.clone(),
            ..Default::default()
        })),
    }
}

/// Reads one key.
pub(crate) fn get(key: &[u8]) -> RequestOp {
    range_op(RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
}

pub(crate) fn range_op(req: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(req)),
    }
}

/// The key of `span` modified last (keys only).
pub(crate) fn newest_in(span: &Span) -> RangeRequest {
    RangeRequest {
        key: span.key.clone(),
        range_end: span.end.clone(),
        limit: 1,
        keys_only: true,
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Mod as i32,
        ..Default::default()
    }
}

/// Counts the keys of `span` at `revision` (0 = current).
pub(crate) fn count_in(span: &Span, revision: i64) -> RangeRequest {
    RangeRequest {
        key: span.key.clone(),
        range_end: span.end.clone(),
        count_only: true,
        revision,
        ..Default::default()
    }
}

/// The key-values of the `index`-th response of a txn, when it was a range.
pub(crate) fn range_kvs(resp: &TxnResponse, index: usize) -> &[KeyValue] {
    match resp.responses.get(index).and_then(|r| r.response.as_ref()) {
        Some(Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}
