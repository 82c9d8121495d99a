//! Lease service calls. Keeping a lease alive is [`LeaseKeeper`](super::LeaseKeeper)'s job.

use std::sync::Arc;

use etcd_proto::etcdserverpb::lease_client::LeaseClient;
use etcd_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};

use super::endpoints::Endpoint;
use super::error::Error;
use super::handle::Client;
use super::retry::Retry;

impl Client {
    /// Lease.LeaseGrant with a server-chosen id. Not replayed once sent: a replay
    /// would grant a second lease.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseGrantResponse, Error> {
        self.lease_grant_on(ttl_secs).await.map(|(resp, _)| resp)
    }

    /// Like [`lease_grant`](Self::lease_grant), also returning the endpoint that
    /// answered.
    pub(crate) async fn lease_grant_on(
        &self,
        ttl_secs: i64,
    ) -> Result<(LeaseGrantResponse, Arc<Endpoint>), Error> {
        let req = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        self.retrier()
            .execute("lease_grant", Retry::Once, req, |ep, r| async move {
                let resp = LeaseClient::new(ep.channel.clone()).lease_grant(r).await?;
                Ok(resp.map(|grant| (grant, ep)))
            })
            .await
    }

    /// Lease.LeaseRevoke: deletes the lease and every key attached to it.
    /// Retried; a replay after a lost reply reports "requested lease not found".
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        self.retrier()
            .execute(
                "lease_revoke",
                Retry::Idempotent,
                LeaseRevokeRequest { id },
                |ep, r| async move { LeaseClient::new(ep.channel.clone()).lease_revoke(r).await },
            )
            .await
    }

    /// Lease.LeaseTimeToLive; `keys` also lists the attached keys. An unknown or
    /// expired lease gives `ttl == -1`.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse, Error> {
        let req = LeaseTimeToLiveRequest { id, keys };
        self.retrier()
            .execute(
                "lease_time_to_live",
                Retry::Idempotent,
                req,
                |ep, r| async move {
                    LeaseClient::new(ep.channel.clone())
                        .lease_time_to_live(r)
                        .await
                },
            )
            .await
    }
}
