//! KV: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use etcd_proto::etcdserverpb::kv_server::Kv;
use etcd_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

use crate::mvcc;
use crate::shared::Core;
use crate::validate;

pub(crate) struct KvService {
    core: Arc<Core>,
}

impl KvService {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let req = req.into_inner();
        validate::check_range(&req)?;
        let cur = self.core.store.read_rev();
        let mut resp = {
            let state = self.core.store.state();
            mvcc::range(&state, &req, cur)?
        };
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = req.into_inner();
        let limits = &self.core.config.limits;
        validate::check_put(&req, limits)?;
        validate::check_size(&req, limits)?;
        let mut resp = self.core.store.put(req).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = req.into_inner();
        validate::check_delete(&req)?;
        validate::check_size(&req, &self.core.config.limits)?;
        let mut resp = self.core.store.delete_range(req).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = req.into_inner();
        let limits = &self.core.config.limits;
        validate::check_txn(&req, limits)?;
        validate::check_size(&req, limits)?;
        let mut resp = self.core.store.txn(req).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let mut resp = self.core.store.compact(req.into_inner().revision).await?;
        self.core.fill(&mut resp.header);
        Ok(Response::new(resp))
    }
}
