//! Lease: Grant, Revoke, KeepAlive, TimeToLive, Leases.

use std::sync::Arc;

use etcd_proto::etcdserverpb::lease_server::Lease;
use etcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::shared::Core;
use crate::validate;

pub(crate) struct LeaseService {
    core: Arc<Core>,
    stop: watch::Receiver<bool>,
}

impl LeaseService {
    pub fn new(core: Arc<Core>, stop: watch::Receiver<bool>) -> Self {
        Self { core, stop }
    }
}

type KeepAliveReply = Result<LeaseKeepAliveResponse, Status>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = req.into_inner();
        validate::check_size(&req, &self.core.config.limits)?;
        let mut resp = self.core.store.lease_grant(req).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let mut resp = self.core.store.lease_revoke(req.into_inner().id).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    type LeaseKeepAliveStream = ReceiverStream<KeepAliveReply>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let core = self.core.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    msg = inbound.message() => msg,
                    () = crate::shared::stopped(&mut stop) => break,
                };
                let Ok(Some(req)) = msg else { break };
                // An unknown (or expired) lease is answered with TTL 0, as etcd does.
                let ttl = core.store.keep_alive(req.id).unwrap_or(0);
                let resp = LeaseKeepAliveResponse {
                    header: core.header(core.store.read_rev()),
                    id: req.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = req.into_inner();
        let header = self.core.header(self.core.store.read_rev());
        let resp = match self.core.store.lease_info(req.id) {
            Some(info) => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: info.remaining,
                granted_ttl: info.granted,
                keys: if req.keys { info.keys } else { Vec::new() },
            },
            // etcd reports an unknown lease as TTL -1 rather than an error.
            None => LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                ..Default::default()
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        _req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let leases = self
            .core
            .store
            .lease_ids()
            .into_iter()
            .map(|id| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.core.header(self.core.store.read_rev()),
            leases,
        }))
    }
}
