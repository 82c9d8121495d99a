//! Watch streams.

use std::sync::Arc;

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::watch_client::WatchClient;
use etcd_proto::etcdserverpb::watch_request::RequestUnion;
use etcd_proto::etcdserverpb::{
    RangeRequest, RangeResponse, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest,
    WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::metadata::MetadataValue;

use super::endpoints::Endpoint;
use super::error::Error;
use super::handle::{Client, MAX_RESPONSE_BYTES};
use super::retry::Retry;

/// Requests queued for the server before `send` waits.
const REQUEST_BUFFER: usize = 64;

/// gRPC metadata asking etcd to fail the watch when the member loses its leader,
/// instead of leaving it silently stalled on a partitioned member.
const REQUIRE_LEADER_KEY: &str = "hasleader";

impl Client {
    /// Opens a Watch stream on a healthy endpoint and sends `req` as its first
    /// create request. Opening is retried across endpoints like an idempotent call.
    ///
    /// The stream carries `hasleader=true` metadata, and is subject to the HTTP/2
    /// keepalive, so a partitioned or frozen member ends it with an error.
    pub async fn watch(&self, req: WatchCreateRequest) -> Result<WatchStream, Error> {
        let (tx, inbound, endpoint) = self
            .retrier()
            .execute("watch", Retry::Idempotent, req, |ep, r| async move {
                let (metadata, extensions, create) = r.into_parts();
                let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
                let first = WatchRequest {
                    request_union: Some(RequestUnion::CreateRequest(create)),
                };
                // Cannot fail: the receiver is alive and the buffer is empty.
                let _ = tx.try_send(first);
                let mut request =
                    tonic::Request::from_parts(metadata, extensions, ReceiverStream::new(rx));
                request
                    .metadata_mut()
                    .insert(REQUIRE_LEADER_KEY, MetadataValue::from_static("true"));
                let resp = WatchClient::new(ep.channel.clone())
                    .max_decoding_message_size(MAX_RESPONSE_BYTES)
                    .watch(request)
                    .await?;
                Ok(resp.map(|inbound| (tx, inbound, ep)))
            })
            .await?;
        Ok(WatchStream {
            client: self.clone(),
            sender: WatchSender {
                tx,
                endpoint: endpoint.name.clone(),
            },
            endpoint,
            inbound,
        })
    }
}

/// One gRPC Watch stream on one endpoint. It may carry several watches (see
/// [`WatchSender::create`]). Dropping it closes the stream.
#[derive(Debug)]
pub struct WatchStream {
    /// For the auth token and request timeout of [`probe`](Self::probe).
    client: Client,
    endpoint: Arc<Endpoint>,
    sender: WatchSender,
    inbound: Streaming<WatchResponse>,
}

impl WatchStream {
    /// The endpoint (`host:port`) serving this stream.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.name
    }

    /// Sends a WatchProgressRequest; the reply arrives through [`message`](Self::message).
    pub async fn request_progress(&self) -> Result<(), Error> {
        self.sender.request_progress().await
    }

    /// KV.Range on this stream's own endpoint and connection, once (no retry, no
    /// failover), bounded by the client's request timeout: tells whether the
    /// endpoint still answers when the stream has gone quiet. A transport failure
    /// or `Unavailable` also takes the endpoint out of the client's rotation.
    pub async fn probe(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        let retrier = self.client.retrier();
        let mut request = tonic::Request::new(req);
        retrier.auth.apply(&mut request)?;
        let mut kv = KvClient::new(self.endpoint.channel.clone());
        match tokio::time::timeout(retrier.timeout, kv.range(request)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(self.endpoint.failed(status)),
            Err(_) => Err(Error::Timeout {
                endpoint: self.endpoint.name.clone(),
                after: retrier.timeout,
            }),
        }
    }

    /// A cloneable handle for sending requests on this stream from another task.
    pub fn progress_sender(&self) -> WatchSender {
        self.sender.clone()
    }

    /// The next raw response, including created, canceled and progress replies.
    /// `Ok(None)` means the server closed the stream cleanly. A transport failure or
    /// `Unavailable` (e.g. "etcdserver: no leader") also takes the endpoint out of
    /// the client's rotation.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        match self.inbound.message().await {
            Ok(msg) => Ok(msg),
            Err(status) => Err(self.endpoint.failed(status)),
        }
    }
}

/// Sends requests on a [`WatchStream`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct WatchSender {
    tx: mpsc::Sender<WatchRequest>,
    endpoint: String,
}

impl WatchSender {
    /// Asks the server for a progress notification on this stream.
    pub async fn request_progress(&self) -> Result<(), Error> {
        self.send(RequestUnion::ProgressRequest(WatchProgressRequest {}))
            .await
    }

    /// Adds another watch to the stream.
    pub async fn create(&self, req: WatchCreateRequest) -> Result<(), Error> {
        self.send(RequestUnion::CreateRequest(req)).await
    }

    /// Cancels a watch on this stream by id.
    pub async fn cancel(&self, watch_id: i64) -> Result<(), Error> {
        self.send(RequestUnion::CancelRequest(WatchCancelRequest { watch_id }))
            .await
    }

    async fn send(&self, req: RequestUnion) -> Result<(), Error> {
        let req = WatchRequest {
            request_union: Some(req),
        };
        self.tx.send(req).await.map_err(|_| Error::WatchClosed {
            endpoint: self.endpoint.clone(),
        })
    }
}
