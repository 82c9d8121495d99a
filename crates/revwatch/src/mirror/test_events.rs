//! Watch events for the mirror's unit tests.

use etcd_proto::mvccpb::{Event, KeyValue, event::EventType};

/// A put of `key` creating it at `revision` with `value`.
pub(crate) fn put_created(key: &str, value: &[u8], revision: i64) -> Event {
    Event {
        r#type: EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
        }),
        prev_kv: None,
    }
}
