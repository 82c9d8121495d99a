//! Cluster: MemberList reports this single member; membership changes are unsupported.

use std::sync::{Arc, PoisonError};

use etcd_proto::etcdserverpb::cluster_server::Cluster;
use etcd_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use crate::shared::Core;

const SINGLE_NODE: &str = "single-member server: membership cannot change";

pub(crate) struct ClusterService {
    core: Arc<Core>,
}

impl ClusterService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(Status::unimplemented(SINGLE_NODE))
    }

    async fn member_remove(
        &self,
        _req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Status::unimplemented(SINGLE_NODE))
    }

    async fn member_update(
        &self,
        _req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(SINGLE_NODE))
    }

    async fn member_list(
        &self,
        _req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let client_urls = self
            .core
            .client_urls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let member = Member {
            id: self.core.store.identity().member_id,
            name: self.core.config.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: client_urls,
            is_learner: false,
        };
        Ok(Response::new(MemberListResponse {
            // Like etcd's cluster service: identity and term, but no revision.
            header: self.core.header(0),
            members: vec![member],
        }))
    }

    async fn member_promote(
        &self,
        _req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Status::unimplemented(SINGLE_NODE))
    }
}
