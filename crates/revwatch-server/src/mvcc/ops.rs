//! Put and DeleteRange applied to a write request, with etcd's response headers.

use etcd_proto::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, ResponseHeader,
};
use etcd_proto::key_range::KeyRange;

use super::WriteTxn;
use crate::error::EtcdError;

fn header(revision: i64) -> Option<ResponseHeader> {
    Some(ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// Applies a put. `ignore_value`/`ignore_lease` need the key to exist; a lease must exist.
pub(crate) fn apply_put(w: &mut WriteTxn<'_>, req: &PutRequest) -> Result<PutResponse, EtcdError> {
    // etcd checks the requested lease before looking at the key.
    if req.lease != 0 && !w.state().leases.contains(req.lease) {
        return Err(EtcdError::LeaseNotFound);
    }
    let prev = w.state().get_at(&req.key, w.read_rev()).cloned();
    if (req.ignore_value || req.ignore_lease) && prev.is_none() {
        return Err(EtcdError::KeyNotFound);
    }
    let (value, lease) = match &prev {
        Some(p) if req.ignore_value || req.ignore_lease => (
            if req.ignore_value {
                p.value.clone()
            } else {
                req.value.clone()
            },
            if req.ignore_lease { p.lease } else { req.lease },
        ),
        _ => (req.value.clone(), req.lease),
    };
    w.put(&req.key, value, lease);
    Ok(PutResponse {
        header: header(w.rev()),
        prev_kv: prev.filter(|_| req.prev_kv).map(|p| p.to_kv()),
    })
}

/// Applies a delete-range; the header revision only moves if something was deleted (or the
/// enclosing txn already changed something).
pub(crate) fn apply_delete(w: &mut WriteTxn<'_>, req: &DeleteRangeRequest) -> DeleteRangeResponse {
    let range = KeyRange::new(&req.key, &req.range_end);
    let prev_kvs = if req.prev_kv {
        w.state()
            .visit_at(&range, w.read_rev())
            .map(|r| r.to_kv())
            .collect()
    } else {
        Vec::new()
    };
    let deleted = w.delete_range(&range);
    DeleteRangeResponse {
        header: header(w.read_rev()),
        deleted,
        prev_kvs,
    }
}

/// The checks etcd makes on a txn's puts before applying anything, against the state the
/// txn starts from.
pub(crate) fn check_put_against(
    state: &super::MvccState,
    req: &PutRequest,
    at: i64,
) -> Result<(), EtcdError> {
    if (req.ignore_value || req.ignore_lease) && state.get_at(&req.key, at).is_none() {
        return Err(EtcdError::KeyNotFound);
    }
    if req.lease != 0 && !state.leases.contains(req.lease) {
        return Err(EtcdError::LeaseNotFound);
    }
    Ok(())
}
