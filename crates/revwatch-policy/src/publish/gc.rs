//! Garbage collection of generations that are neither active nor previous.

use etcd_proto::key_range::{KeyRange, prefix_end};
use revwatch::client::{Client, RangeRequest, TxnRequest};

use super::PublishError;
use super::ops;
use super::state::read_pointers;
use crate::layout::{Layout, escape};

/// Deletes every generation that is neither active nor previous and has no lock,
/// each in one txn that re-checks those three conditions; returns the ids
/// deleted. A generation being written (its lock alive) is left alone; an
/// abandoned one is collected once its lock's lease has expired.
pub(crate) async fn collect(client: &Client, layout: &Layout) -> Result<Vec<String>, PublishError> {
    let pointers = read_pointers(client, layout).await?;
    let keep: Vec<&[u8]> = [&pointers.active, &pointers.previous]
        .into_iter()
        .flatten()
        .map(|r| r.value.as_slice())
        .collect();
    let all = KeyRange::prefix(&layout.generations());
    let mut from = all.key().to_vec();
    let mut collected = Vec::new();
    // One key per generation: the first key at or after `from`, then skip past
    // that generation. Costs one small read per generation, not per file.
    loop {
        let resp = client
            .range(RangeRequest {
                key: from.clone(),
                range_end: all.range_end().to_vec(),
                limit: 1,
                keys_only: true,
                ..Default::default()
            })
            .await?;
        let Some(kv) = resp.kvs.first() else {
            break;
        };
        let Some(id) = layout.generation_of(&kv.key) else {
            // A key like `gen/x` outside any generation directory: not ours.
            from = kv.key.clone();
            from.push(0);
            continue;
        };
        let generation = KeyRange::prefix(&layout.generation(id));
        // The generation's prefix ends in '/', so its end is a real key, never
        // etcd's "to the end".
        from = prefix_end(generation.key());
        if keep.contains(&id) {
            continue;
        }
        let resp = client
            .txn(TxnRequest {
                compare: vec![
                    ops::created_at(&layout.lock(id), 0),
                    ops::mod_equals(&layout.pointer(), pointers.active_mod()),
                    ops::mod_equals(&layout.previous(), pointers.previous_mod()),
                ],
                success: vec![ops::delete(&generation)],
                ..Default::default()
            })
            .await?;
        if resp.succeeded {
            collected.push(escape(id));
        }
    }
    Ok(collected)
}
