//! KV service calls.

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::request_op::Request as Op;
use etcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::transport::Channel;

use super::endpoints::Endpoint;
use super::error::Error;
use super::handle::{Client, MAX_RESPONSE_BYTES};
use super::retry::Retry;

fn kv(ep: &Endpoint) -> KvClient<Channel> {
    KvClient::new(ep.channel.clone()).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

impl Client {
    /// KV.Range. Idempotent, so retried across endpoints on transport errors,
    /// timeouts and `Unavailable`.
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.retrier()
            .execute("range", Retry::Idempotent, req, |ep, r| async move {
                kv(&ep).range(r).await
            })
            .await
    }

    /// KV.Put. Not replayed once it may have reached a server: a failure after that
    /// point is returned ([`Error::Connection`] or [`Error::Timeout`]), and the put
    /// may or may not have been applied.
    pub async fn put(&self, req: PutRequest) -> Result<PutResponse, Error> {
        self.retrier()
            .execute("put", Retry::Once, req, |ep, r| async move {
                kv(&ep).put(r).await
            })
            .await
    }

    /// KV.DeleteRange. Not replayed once it may have reached a server (a replay
    /// could delete keys written in between).
    pub async fn delete_range(
        &self,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, Error> {
        self.retrier()
            .execute("delete_range", Retry::Once, req, |ep, r| async move {
                kv(&ep).delete_range(r).await
            })
            .await
    }

    /// KV.Txn. Retried like [`range`](Self::range) when every operation, in both
    /// branches and nested transactions, is a read; otherwise like [`put`](Self::put).
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, Error> {
        let retry = if txn_is_read_only(&req) {
            Retry::Idempotent
        } else {
            Retry::Once
        };
        self.retrier()
            .execute(
                "txn",
                retry,
                req,
                |ep, r| async move { kv(&ep).txn(r).await },
            )
            .await
    }

    /// KV.Compact. Not replayed once sent: a replay of a successful compaction
    /// fails with "compacted", which would hide the success.
    pub async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse, Error> {
        self.retrier()
            .execute("compact", Retry::Once, req, |ep, r| async move {
                kv(&ep).compact(r).await
            })
            .await
    }
}

/// True when a transaction only reads.
pub(crate) fn txn_is_read_only(txn: &TxnRequest) -> bool {
    txn.success
        .iter()
        .chain(&txn.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(_)) => true,
            Some(Op::RequestTxn(inner)) => txn_is_read_only(inner),
            Some(Op::RequestPut(_) | Op::RequestDeleteRange(_)) => false,
            // An empty op does nothing.
            None => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_proto::etcdserverpb::RequestOp;

    fn op(r: Op) -> RequestOp {
        RequestOp { request: Some(r) }
    }

    #[test]
    fn read_only_txn_detection_looks_into_nested_txns() {
        let read = op(Op::RequestRange(RangeRequest::default()));
        let write = op(Op::RequestPut(PutRequest::default()));
        let ro = TxnRequest {
            success: vec![read.clone()],
            failure: vec![read.clone()],
            ..Default::default()
        };
        assert!(txn_is_read_only(&ro));
        let nested_write = TxnRequest {
            success: vec![read.clone()],
            failure: vec![op(Op::RequestTxn(TxnRequest {
                success: vec![write.clone()],
                ..Default::default()
            }))],
            ..Default::default()
        };
        assert!(!txn_is_read_only(&nested_write));
        let del = TxnRequest {
            failure: vec![op(Op::RequestDeleteRange(DeleteRangeRequest::default()))],
            ..Default::default()
        };
        assert!(!txn_is_read_only(&del));
    }
}
