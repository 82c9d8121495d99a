//! Lease service calls. Keeping a lease alive is [`LeaseKeeper`](super::LeaseKeeper)'s job.

use etcd_proto::etcdserverpb::lease_client::LeaseClient;
use etcd_proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest};

use super::{
    Client, Error, LeaseGrantResponse, LeaseRevokeResponse, LeaseTimeToLiveResponse, Retry,
};

impl Client {
    /// Lease.LeaseGrant with a server-chosen id. Not replayed once sent: a replay
    /// would grant a second lease.
    pub async fn lease_grant(&self, ttl_secs: i64) -> Result<LeaseGrantResponse, Error> {
        let req = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        self.execute("lease_grant", Retry::Once, req, |ch, r| async move {
            LeaseClient::new(ch).lease_grant(r).await
        })
        .await
    }

    /// Lease.LeaseRevoke: deletes the lease and every key attached to it.
    /// Retried; a replay after a lost reply reports "requested lease not found".
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse, Error> {
        self.execute(
            "lease_revoke",
            Retry::Idempotent,
            LeaseRevokeRequest { id },
            |ch, r| async move { LeaseClient::new(ch).lease_revoke(r).await },
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
        self.execute(
            "lease_time_to_live",
            Retry::Idempotent,
            req,
            |ch, r| async move { LeaseClient::new(ch).lease_time_to_live(r).await },
        )
        .await
    }
}
