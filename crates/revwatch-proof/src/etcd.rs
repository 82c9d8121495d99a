//! Raw etcd access for the proof: the generated gRPC stubs and nothing from
//! revwatch, so that what the proof reads does not depend on the code under
//! test.

use std::time::Duration;

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::{RangeRequest, RangeResponse};
use etcd_proto::mvccpb::KeyValue;
use tonic::transport::{Channel, Endpoint};

use crate::history::{Entry, FullSnapshot};
use crate::keys::KeyRange;
use crate::state::State;

/// Keys per Range page.
const PAGE: i64 = 1000;

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The endpoint URL is invalid or nothing answered.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// etcd answered with an error.
    #[error("{call} failed: {status}")]
    Rpc {
        /// The call.
        call: &'static str,
        /// etcd's status.
        status: tonic::Status,
    },
    /// A response without its header.
    #[error("{0} response without a header")]
    NoHeader(&'static str),
}

/// An endpoint for `url` with bounded connects and HTTP/2 keepalives etcd
/// accepts (no more often than its 5 s minimum).
pub fn endpoint(url: &str, connect_timeout: Duration) -> Result<Endpoint, EtcdError> {
    Endpoint::from_shared(url.to_owned())
        .map(|e| {
            e.connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|source| EtcdError::Connect {
            endpoint: url.to_owned(),
            source,
        })
}

/// Connects to `url`.
pub async fn connect(url: &str) -> Result<Channel, EtcdError> {
    endpoint(url, Duration::from_secs(3))?
        .connect()
        .await
        .map_err(|source| EtcdError::Connect {
            endpoint: url.to_owned(),
            source,
        })
}

/// The member's current revision, from the header of a linearizable count
/// of one key (so it fails on a member that has no leader).
pub async fn current_revision(channel: Channel) -> Result<i64, EtcdError> {
    let request = RangeRequest {
        key: b"\0".to_vec(),
        count_only: true,
        ..Default::default()
    };
    let resp = range(&mut KvClient::new(channel), request).await?;
    Ok(resp.header.ok_or(EtcdError::NoHeader("Range"))?.revision)
}

/// One Range call, its failure as an [`EtcdError`].
async fn range(
    kv: &mut KvClient<Channel>,
    request: RangeRequest,
) -> Result<RangeResponse, EtcdError> {
    kv.range(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| EtcdError::Rpc {
            call: "Range",
            status,
        })
}

/// An etcd `KeyValue` as a key and [`Entry`].
pub fn entry_of(kv: KeyValue) -> (Vec<u8>, Entry) {
    (
        kv.key,
        Entry {
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        },
    )
}

/// etcd's state of `keys` at `revision` (0 for the current revision), read
/// page by page at that one revision.
pub async fn range_at(
    channel: Channel,
    keys: &KeyRange,
    revision: i64,
) -> Result<FullSnapshot, EtcdError> {
    let mut kv = KvClient::new(channel);
    let mut state = State::default();
    let mut start = keys.key().to_vec();
    let mut at = revision;
    loop {
        let request = RangeRequest {
            key: start.clone(),
            range_end: keys.range_end().to_vec(),
            revision: at,
            limit: PAGE,
            ..Default::default()
        };
        let resp = range(&mut kv, request).await?;
        if at == 0 {
            // Pin the remaining pages to the first page's revision.
            at = resp.header.ok_or(EtcdError::NoHeader("Range"))?.revision;
        }
        let Some(last) = resp.kvs.last().map(|kv| kv.key.clone()) else {
            break;
        };
        for kv in resp.kvs {
            let (k, e) = entry_of(kv);
            state.insert(k, e);
        }
        if !resp.more {
            break;
        }
        start = last;
        start.push(0);
    }
    Ok(FullSnapshot {
        revision: at,
        state,
    })
}
