//! Request checks made before anything is applied, with etcd's errors: required keys,
//! conflicting flags, txn op counts and overlapping writes, and the size limits.

use etcd_proto::etcdserverpb::request_op::Request;
use etcd_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use prost::Message;

use crate::config::Limits;
use crate::error::EtcdError;

/// Rejects requests larger than the request-size limit.
pub(crate) fn check_size(req: &impl Message, limits: &Limits) -> Result<(), EtcdError> {
    if req.encoded_len() > limits.max_request_bytes {
        return Err(EtcdError::RequestTooLarge);
    }
    Ok(())
}

pub(crate) fn check_range(req: &RangeRequest) -> Result<(), EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub(crate) fn check_put(req: &PutRequest, limits: &Limits) -> Result<(), EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    if req.value.len() > limits.max_value_bytes {
        return Err(EtcdError::ValueTooLarge);
    }
    Ok(())
}

pub(crate) fn check_delete(req: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` followed by `checkIntervals` on both branches.
pub(crate) fn check_txn(req: &TxnRequest, limits: &Limits) -> Result<(), EtcdError> {
    check_txn_ops(req, limits.max_txn_ops, limits)?;
    check_intervals(&req.success)?;
    check_intervals(&req.failure)?;
    Ok(())
}

fn check_txn_ops(req: &TxnRequest, max_ops: usize, limits: &Limits) -> Result<(), EtcdError> {
    // The limit applies to the longest of the three lists, not their sum; nested txns get
    // what is left of it.
    let opc = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len());
    if opc > max_ops {
        return Err(EtcdError::TooManyOps);
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        return Err(EtcdError::EmptyKey);
    }
    for op in req.success.iter().chain(&req.failure) {
        check_op(op, max_ops - opc, limits)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_ops: usize, limits: &Limits) -> Result<(), EtcdError> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(p)) => check_put(p, limits),
        Some(Request::RequestDeleteRange(d)) => check_delete(d),
        Some(Request::RequestTxn(t)) => check_txn_ops(t, max_ops, limits),
        // etcd answers an empty op this way.
        None => Err(EtcdError::KeyNotFound),
    }
}

/// A deleted interval `[key, end)`, or the single key when `end` is empty.
struct Deleted {
    key: Vec<u8>,
    end: Vec<u8>,
}

impl Deleted {
    fn contains(&self, k: &[u8]) -> bool {
        if self.end.is_empty() {
            k == self.key.as_slice()
        } else {
            self.key.as_slice() <= k && k < self.end.as_slice()
        }
    }
}

fn intersects(dels: &[Deleted], k: &[u8]) -> bool {
    dels.iter().any(|d| d.contains(k))
}

/// Returns the keys put and the intervals deleted at this level and below.
fn check_intervals(
    reqs: &[RequestOp],
) -> Result<(std::collections::HashSet<Vec<u8>>, Vec<Deleted>), EtcdError> {
    use std::collections::HashSet;
    let mut dels: Vec<Deleted> = reqs
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(Deleted {
                key: d.key.clone(),
                end: d.range_end.clone(),
            }),
            _ => None,
        })
        .collect();
    let mut puts: HashSet<Vec<u8>> = HashSet::new();
    for op in reqs {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // Then and else are exclusive, so the same key in both is fine.
            if puts.contains(k) && !puts_then.contains(k) || intersects(&dels, k) {
                return Err(EtcdError::DuplicateKey);
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in reqs {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        if puts.contains(&p.key) || intersects(&dels, &p.key) {
            return Err(EtcdError::DuplicateKey);
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.into(),
                ..Default::default()
            })),
        }
    }

    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn txn(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            success,
            ..Default::default()
        }
    }

    #[test]
    fn overlapping_writes_are_rejected() {
        let l = Limits::default();
        assert_eq!(
            check_txn(&txn(vec![put("a"), put("a")]), &l),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![put("b"), del("a", "c")]), &l),
            Err(EtcdError::DuplicateKey)
        );
        assert_eq!(
            check_txn(&txn(vec![del("a", "c"), del("b", "")]), &l),
            Ok(())
        );
        assert_eq!(check_txn(&txn(vec![put("a"), del("b", "")]), &l), Ok(()));
    }

    #[test]
    fn op_limit_is_per_list() {
        let l = Limits::default();
        let ops: Vec<RequestOp> = (0..128).map(|i| put(&format!("k{i}"))).collect();
        assert_eq!(check_txn(&txn(ops.clone()), &l), Ok(()));
        let mut more = ops;
        more.push(put("x"));
        assert_eq!(check_txn(&txn(more), &l), Err(EtcdError::TooManyOps));
    }
}
