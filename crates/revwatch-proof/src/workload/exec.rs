//! Issuing planned writes over raw etcd gRPC and recording their outcomes.

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::lease_client::LeaseClient;
use etcd_proto::etcdserverpb::{
    self as pb, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RequestOp,
    TxnRequest, compare, request_op, response_op,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::keys::KeyRange;
use crate::ops::{Compare, CompareResult, CompareTarget, Put, Txn, TxnStep, WriteOp};
use crate::record::Outcome;

/// The KV and Lease stubs of one writer.
#[derive(Debug, Clone)]
pub(super) struct Stubs {
    kv: KvClient<Channel>,
    lease: LeaseClient<Channel>,
}

impl Stubs {
    pub(super) fn new(channel: Channel) -> Self {
        Self {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        }
    }

    /// Issues `op` and says how it ended.
    pub(super) async fn write(&mut self, op: &WriteOp) -> Outcome {
        let result = match op {
            WriteOp::Put(p) => self
                .kv
                .put(put_request(p))
                .await
                .map(|r| acked(r.into_inner().header, true, 0)),
            WriteOp::DeleteRange(r) => self.kv.delete_range(delete_request(r)).await.map(|r| {
                let r = r.into_inner();
                acked(r.header, true, r.deleted)
            }),
            WriteOp::Txn(t) => self.kv.txn(txn_request(t)).await.map(|r| {
                let r = r.into_inner();
                let deleted = r
                    .responses
                    .iter()
                    .filter_map(|op| match &op.response {
                        Some(response_op::Response::ResponseDeleteRange(d)) => Some(d.deleted),
                        _ => None,
                    })
                    .sum();
                acked(r.header, r.succeeded, deleted)
            }),
            WriteOp::LeaseRevoke { lease } => self
                .lease
                .lease_revoke(LeaseRevokeRequest { id: *lease })
                .await
                .map(|r| acked(r.into_inner().header, true, 0)),
        };
        result.unwrap_or_else(|status| failure(&status))
    }

    /// Grants a lease of `ttl` seconds; `None` if that failed.
    pub(super) async fn grant(&mut self, ttl: i64) -> Option<i64> {
        let resp = self
            .lease
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .ok()?
            .into_inner();
        (resp.error.is_empty() && resp.id != 0).then_some(resp.id)
    }
}

fn acked(header: Option<pb::ResponseHeader>, succeeded: bool, deleted: i64) -> Outcome {
    match header {
        Some(h) => Outcome::Acked {
            revision: h.revision,
            succeeded,
            deleted,
        },
        None => Outcome::Unknown("response without a header".into()),
    }
}

/// A refusal by etcd means the write did not happen; anything else (a
/// timeout, a lost connection) leaves it unknown.
pub(super) fn failure(status: &Status) -> Outcome {
    let definite = matches!(
        status.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::OutOfRange
            | Code::AlreadyExists
            | Code::Unauthenticated
    );
    let text = format!("{:?}: {}", status.code(), status.message());
    if definite {
        Outcome::Failed(text)
    } else {
        Outcome::Unknown(text)
    }
}

fn put_request(p: &Put) -> PutRequest {
    PutRequest {
        key: p.key.clone(),
        value: p.value.clone(),
        lease: p.lease,
        ..Default::default()
    }
}

fn delete_request(r: &KeyRange) -> DeleteRangeRequest {
    DeleteRangeRequest {
        key: r.key().to_vec(),
        range_end: r.range_end().to_vec(),
        prev_kv: false,
    }
}

fn step_request(s: &TxnStep) -> RequestOp {
    let request = match s {
        TxnStep::Put(p) => request_op::Request::RequestPut(put_request(p)),
        TxnStep::DeleteRange(r) => request_op::Request::RequestDeleteRange(delete_request(r)),
    };
    RequestOp {
        request: Some(request),
    }
}

fn compare_request(c: &Compare) -> pb::Compare {
    let result = match c.result {
        CompareResult::Equal => compare::CompareResult::Equal,
        CompareResult::NotEqual => compare::CompareResult::NotEqual,
        CompareResult::Greater => compare::CompareResult::Greater,
        CompareResult::Less => compare::CompareResult::Less,
    };
    let (target, operand) = match &c.target {
        CompareTarget::Version(v) => (
            compare::CompareTarget::Version,
            compare::TargetUnion::Version(*v),
        ),
        CompareTarget::CreateRevision(v) => (
            compare::CompareTarget::Create,
            compare::TargetUnion::CreateRevision(*v),
        ),
        CompareTarget::ModRevision(v) => (
            compare::CompareTarget::Mod,
            compare::TargetUnion::ModRevision(*v),
        ),
        CompareTarget::Value(v) => (
            compare::CompareTarget::Value,
            compare::TargetUnion::Value(v.clone()),
        ),
        CompareTarget::Lease(v) => (
            compare::CompareTarget::Lease,
            compare::TargetUnion::Lease(*v),
        ),
    };
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: c.key.clone(),
        range_end: Vec::new(),
        target_union: Some(operand),
    }
}

fn txn_request(t: &Txn) -> TxnRequest {
    TxnRequest {
        compare: t.compares.iter().map(compare_request).collect(),
        success: t.success.iter().map(step_request).collect(),
        failure: t.failure.iter().map(step_request).collect(),
    }
}
