//! Range requests: revision checks, limit, count, keys-only, sort and revision filters,
//! in the order etcd 3.4 applies them.

use std::cmp::Ordering;

use etcd_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use etcd_proto::etcdserverpb::{RangeRequest, RangeResponse, ResponseHeader};
use etcd_proto::key_range::KeyRange;
use etcd_proto::mvccpb::KeyValue;

use super::MvccState;
use crate::error::EtcdError;

/// Serves `req` with `cur` as the current revision. The header carries only the revision.
pub(crate) fn range(
    state: &MvccState,
    req: &RangeRequest,
    cur: i64,
) -> Result<RangeResponse, EtcdError> {
    if req.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    let at = state.check_read_rev(req.revision, cur)?;
    let keys = KeyRange::new(&req.key, &req.range_end);
    let header = Some(ResponseHeader {
        revision: cur,
        ..Default::default()
    });
    let matching = state.visit_at(&keys, at);
    if req.count_only {
        return Ok(RangeResponse {
            header,
            kvs: Vec::new(),
            more: false,
            count: matching.count() as i64,
        });
    }
    let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let filtered = req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    // Like etcd: without sorting or filtering only limit + 1 records are materialised (the
    // extra one sets `more`), but `count` always covers the whole range.
    let fetch = if sort_order == SortOrder::None && !filtered && req.limit > 0 {
        usize::try_from(req.limit).map_or(usize::MAX, |l| l.saturating_add(1))
    } else {
        usize::MAX
    };
    let mut count = 0i64;
    let mut kvs: Vec<KeyValue> = Vec::new();
    for rec in matching {
        count += 1;
        if kvs.len() < fetch {
            kvs.push(rec.to_kv());
        }
    }
    kvs.retain(|kv| {
        !(req.max_mod_revision != 0 && kv.mod_revision > req.max_mod_revision
            || req.min_mod_revision != 0 && kv.mod_revision < req.min_mod_revision
            || req.max_create_revision != 0 && kv.create_revision > req.max_create_revision
            || req.min_create_revision != 0 && kv.create_revision < req.min_create_revision)
    });
    sort(&mut kvs, sort_order, sort_target);
    let mut more = false;
    if let Ok(limit) = usize::try_from(req.limit)
        && limit > 0
        && kvs.len() > limit
    {
        kvs.truncate(limit);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResponse {
        header,
        kvs,
        more,
        count,
    })
}

fn sort(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    // etcd sorts ascending when a non-key target is given without an order; results are
    // already in ascending key order otherwise.
    let order = match (order, target) {
        (SortOrder::None, SortTarget::Key) => return,
        (SortOrder::None, _) => SortOrder::Ascend,
        (o, _) => o,
    };
    let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    // Stable sorts keep ties in key order, as Go's sort.Sort happens to for small inputs.
    match order {
        SortOrder::Descend => kvs.sort_by(|a, b| cmp(b, a)),
        _ => kvs.sort_by(cmp),
    }
}
