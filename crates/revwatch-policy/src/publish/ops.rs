//! Builders for the compares and operations of the protocol's txns.

use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use etcd_proto::etcdserverpb::request_op::Request;
use etcd_proto::etcdserverpb::response_op::Response;
use etcd_proto::key_range::KeyRange;
use etcd_proto::mvccpb::KeyValue;
use revwatch::client::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnResponse,
};

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
pub(crate) fn span_mod_below(span: &KeyRange, revision: i64) -> Compare {
    compare(
        span.key(),
        span.range_end(),
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

pub(crate) fn delete(span: &KeyRange) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key: span.key().to_vec(),
            range_end: span.range_end().to_vec(),
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
pub(crate) fn newest_in(span: &KeyRange) -> RangeRequest {
    RangeRequest {
        key: span.key().to_vec(),
        range_end: span.range_end().to_vec(),
        limit: 1,
        keys_only: true,
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Mod as i32,
        ..Default::default()
    }
}

/// Counts the keys of `span` at `revision` (0 = current).
pub(crate) fn count_in(span: &KeyRange, revision: i64) -> RangeRequest {
    RangeRequest {
        key: span.key().to_vec(),
        range_end: span.range_end().to_vec(),
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
