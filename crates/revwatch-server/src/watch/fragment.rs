//! Splitting large watch replies, exactly as etcd's `sendFragments` does.

use etcd_proto::etcdserverpb::WatchResponse;
use prost::Message;

/// Splits `resp` into pieces of at most `max_bytes` (a piece always holds at least one
/// event). Replies under the limit or with fewer than two events are returned whole. Every
/// piece but the last has `fragment = true`.
pub(crate) fn fragments(resp: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < max_bytes || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut template = resp.clone();
    template.events = Vec::new();
    template.fragment = true;
    let mut out = Vec::new();
    let mut events = resp.events.into_iter().peekable();
    while events.peek().is_some() {
        let mut cur = template.clone();
        while let Some(ev) = events.peek() {
            cur.events.push(ev.clone());
            if cur.events.len() > 1 && cur.encoded_len() >= max_bytes {
                cur.events.pop();
                break;
            }
            events.next();
        }
        if events.peek().is_none() {
            cur.fragment = false;
        }
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_proto::mvccpb::{Event, KeyValue};

    fn ev(n: usize) -> Event {
        Event {
            kv: Some(KeyValue {
                key: format!("k{n}").into_bytes(),
                value: vec![b'x'; 100],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn splits_and_marks_all_but_last() {
        let resp = WatchResponse {
            events: (0..10).map(ev).collect(),
            ..Default::default()
        };
        let parts = fragments(resp.clone(), 300);
        assert!(parts.len() > 1);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.fragment));
        assert!(!parts[parts.len() - 1].fragment);
        let joined: Vec<Event> = parts.into_iter().flat_map(|p| p.events).collect();
        assert_eq!(joined, resp.events);
        assert_eq!(fragments(resp.clone(), 1 << 20).len(), 1);
    }
}
