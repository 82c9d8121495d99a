//! Txn: compares evaluated on the state the txn starts from, pre-checks of the chosen
//! branch, then the ops in order, like etcd 3.4's applier.

use etcd_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use etcd_proto::etcdserverpb::request_op::Request;
use etcd_proto::etcdserverpb::response_op::Response;
use etcd_proto::etcdserverpb::{
    Compare, RangeRequest, RequestOp, ResponseHeader, ResponseOp, TxnRequest, TxnResponse,
};
use etcd_proto::key_range::KeyRange;
use etcd_proto::mvccpb::KeyValue;

use super::ops::{apply_delete, apply_put, check_put_against};
use super::{MvccState, WriteTxn, range};
use crate::error::EtcdError;

/// True when no branch, at any depth, puts or deletes.
pub(crate) fn is_read_only(req: &TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestPut(_) | Request::RequestDeleteRange(_)) => false,
            Some(Request::RequestTxn(t)) => is_read_only(t),
            _ => true,
        })
}

/// Which branch each txn in the tree takes, in the pre-order etcd uses (`compareToPath`).
fn path(state: &MvccState, at: i64, req: &TxnRequest, out: &mut Vec<bool>) {
    let ok = req.compare.iter().all(|c| compare(state, at, c));
    out.push(ok);
    for op in branch(req, ok) {
        if let Some(Request::RequestTxn(t)) = &op.request {
            path(state, at, t, out);
        }
    }
}

fn branch(req: &TxnRequest, ok: bool) -> &[RequestOp] {
    if ok { &req.success } else { &req.failure }
}

fn compare(state: &MvccState, at: i64, c: &Compare) -> bool {
    let range = KeyRange::new(&c.key, &c.range_end);
    let mut matched = state.visit_at(&range, at).peekable();
    if matched.peek().is_none() {
        // A value compare on missing keys always fails: a missing value is not "".
        return c.target != CompareTarget::Value as i32 && compare_kv(c, &KeyValue::default());
    }
    matched.all(|r| compare_kv(c, &r.to_kv()))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    // A target union of the wrong kind compares against zero, as in etcd.
    let ord = match CompareTarget::try_from(c.target) {
        Ok(CompareTarget::Value) => {
            let want: &[u8] = match &c.target_union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
        Ok(CompareTarget::Create) => kv.create_revision.cmp(&match c.target_union {
            Some(TargetUnion::CreateRevision(v)) => v,
            _ => 0,
        }),
        Ok(CompareTarget::Mod) => kv.mod_revision.cmp(&match c.target_union {
            Some(TargetUnion::ModRevision(v)) => v,
            _ => 0,
        }),
        Ok(CompareTarget::Version) => kv.version.cmp(&match c.target_union {
            Some(TargetUnion::Version(v)) => v,
            _ => 0,
        }),
        Ok(CompareTarget::Lease) => kv.lease.cmp(&match c.target_union {
            Some(TargetUnion::Lease(v)) => v,
            _ => 0,
        }),
        Err(_) => std::cmp::Ordering::Equal,
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// Walks the chosen branches, calling `f` on every non-txn op.
fn walk_chosen<'r>(
    req: &'r TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
    f: &mut impl FnMut(&'r Request) -> Result<(), EtcdError>,
) -> Result<(), EtcdError> {
    let ok = path.next().copied().unwrap_or(false);
    for op in branch(req, ok) {
        match &op.request {
            Some(Request::RequestTxn(t)) => walk_chosen(t, path, f)?,
            Some(r) => f(r)?,
            None => {}
        }
    }
    Ok(())
}

/// Evaluates the compares and checks the chosen branches against the state the txn starts
/// from (puts first, then range revisions, like etcd). Returns the branch path.
pub(crate) fn check_txn(
    state: &MvccState,
    req: &TxnRequest,
    at: i64,
) -> Result<Vec<bool>, EtcdError> {
    let mut p = Vec::new();
    path(state, at, req, &mut p);
    if !is_read_only(req) {
        walk_chosen(req, &mut p.iter(), &mut |r| match r {
            Request::RequestPut(put) => check_put_against(state, put, at),
            _ => Ok(()),
        })?;
    }
    walk_chosen(req, &mut p.iter(), &mut |r| match r {
        Request::RequestRange(RangeRequest { revision, .. }) if *revision != 0 => {
            if *revision > at {
                Err(EtcdError::FutureRev)
            } else if *revision < state.compacted() {
                Err(EtcdError::Compacted)
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    })?;
    Ok(p)
}

/// Applies a checked txn along `path` (from [`check_txn`]).
pub(crate) fn apply_txn(
    w: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &[bool],
) -> Result<TxnResponse, EtcdError> {
    let mut iter = path.iter();
    let mut resp = apply_level(w, req, &mut iter)?;
    resp.header = Some(ResponseHeader {
        revision: w.read_rev(),
        ..Default::default()
    });
    Ok(resp)
}

fn apply_level(
    w: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
) -> Result<TxnResponse, EtcdError> {
    let ok = path.next().copied().unwrap_or(false);
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => {
                Some(Response::ResponseRange(range(w.state(), r, w.read_rev())?))
            }
            Some(Request::RequestPut(p)) => Some(Response::ResponsePut(apply_put(w, p)?)),
            Some(Request::RequestDeleteRange(d)) => {
                Some(Response::ResponseDeleteRange(apply_delete(w, d)))
            }
            Some(Request::RequestTxn(t)) => {
                // etcd leaves nested txn headers empty.
                let mut nested = apply_level(w, t, path)?;
                nested.header = Some(ResponseHeader::default());
                Some(Response::ResponseTxn(nested))
            }
            None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// Runs a txn without puts or deletes at revision `cur`, without a write request.
pub(crate) fn read_only_txn(
    state: &MvccState,
    req: &TxnRequest,
    cur: i64,
) -> Result<TxnResponse, EtcdError> {
    let path = check_txn(state, req, cur)?;
    let mut resp = read_level(state, req, cur, &mut path.iter())?;
    resp.header = Some(ResponseHeader {
        revision: cur,
        ..Default::default()
    });
    Ok(resp)
}

fn read_level(
    state: &MvccState,
    req: &TxnRequest,
    cur: i64,
    path: &mut std::slice::Iter<'_, bool>,
) -> Result<TxnResponse, EtcdError> {
    let ok = path.next().copied().unwrap_or(false);
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Some(Response::ResponseRange(range(state, r, cur)?)),
            Some(Request::RequestTxn(t)) => {
                let mut nested = read_level(state, t, cur, path)?;
                nested.header = Some(ResponseHeader::default());
                Some(Response::ResponseTxn(nested))
            }
            // Callers only pass txns for which `is_read_only` holds.
            Some(Request::RequestPut(_) | Request::RequestDeleteRange(_)) | None => None,
        };
        responses.push(ResponseOp { response });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}
