//! Reading the active tree straight from etcd, without a mirror.

use std::collections::BTreeMap;

use bytes::Bytes;
use etcd_proto::key_range::KeyRange;
use revwatch::client::{Client, RangeRequest};

use super::PublishError;
use crate::layout::{Listing, Tree, TreeFile, resolve};

/// Keys per page when listing the prefix.
const PAGE: i64 = 1000;

/// The active tree under `prefix` as etcd holds it now (one consistent read,
/// paginated at the first page's revision), e.g. to diff a directory against it.
pub async fn read_active_tree(client: &Client, prefix: &[u8]) -> Result<Tree, PublishError> {
    read_tree_at(client, prefix, 0).await
}

/// The active tree under `prefix` as it was at `revision` (0: now), by the same
/// layout rules, e.g. to replay a decision made at that revision. A compacted
/// revision fails with [`PublishError::Etcd`] holding an error whose
/// [`is_compacted`](revwatch::client::Error::is_compacted) is true.
pub async fn read_tree_at(
    client: &Client,
    prefix: &[u8],
    revision: i64,
) -> Result<Tree, PublishError> {
    let span = KeyRange::prefix(prefix);
    let mut listing = Listing {
        revision,
        kvs: BTreeMap::new(),
    };
    let mut from = span.key().to_vec();
    loop {
        let resp = client
            .range(RangeRequest {
                key: from,
                range_end: span.range_end().to_vec(),
                limit: PAGE,
                revision: listing.revision,
                ..Default::default()
            })
            .await?;
        if listing.revision == 0 {
            listing.revision = resp.header.as_ref().map_or(0, |h| h.revision);
        }
        let Some(last) = resp.kvs.last().map(|kv| kv.key.clone()) else {
            break;
        };
        let more = resp.more;
        for kv in resp.kvs {
            let file = TreeFile {
                value: Bytes::from(kv.value),
                mod_revision: kv.mod_revision,
            };
            listing.kvs.insert(kv.key, file);
        }
        if !more {
            break;
        }
        from = last;
        from.push(0);
    }
    Ok(resolve(&listing, prefix)?)
}
