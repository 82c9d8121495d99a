//! Watch: one task per stream (see [`crate::watch::stream`]).

use std::sync::Arc;

use etcd_proto::etcdserverpb::WatchRequest;
use etcd_proto::etcdserverpb::watch_server::Watch;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::shared::Core;
use crate::watch::stream::{Reply, WatchStream};

/// Replies buffered per stream before the stream task waits for the client.
const OUT_BUFFER: usize = 64;

pub(crate) struct WatchService {
    core: Arc<Core>,
    stop: watch::Receiver<bool>,
}

impl WatchService {
    pub fn new(core: Arc<Core>, stop: watch::Receiver<bool>) -> Self {
        Self { core, stop }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Reply>;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(OUT_BUFFER);
        let stream = WatchStream::new(self.core.clone(), tx);
        tokio::spawn(stream.run(req.into_inner(), self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
