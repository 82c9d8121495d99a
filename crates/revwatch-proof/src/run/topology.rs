//! What a run talks to: etcd members (on 3 members, with their peer traffic
//! through per-link proxies that a peer partition cuts) or revwatch's
//! embedded server, one fault proxy per member between the mirror and the
//! server, and optionally `etcd grpc-proxy` in front of those.

use revwatch_testkit::etcd::{ClusterOptions, CompactionMode, EtcdCluster};
use revwatch_testkit::grpc_proxy::GrpcProxy;
use revwatch_testkit::proxy::FaultProxy;

use super::{RunConfig, RunError};

/// The processes and proxies of one run; dropping it stops them all.
#[derive(Debug)]
pub(super) struct Topology {
    // Field order matters: the grpc-proxy and fault proxies go before etcd.
    pub(super) grpc_proxy: Option<GrpcProxy>,
    pub(super) proxies: Vec<FaultProxy>,
    pub(super) cluster: EtcdCluster,
}

impl Topology {
    pub(super) async fn start(config: &RunConfig) -> Result<Self, RunError> {
        let mut opts = ClusterOptions {
            members: config.members,
            // Peer traffic through per-link proxies, so that a member can be
            // cut off from its peers (a real partition) while clients reach it.
            peer_links: config.members >= 3,
            embedded: config.embedded.clone(),
            ..ClusterOptions::default()
        };
        if config.grpc_proxy {
            // etcd 3.4's grpc-proxy ignores progress requests: behind it, the mirror
            // learns of revisions outside its prefix only from etcd's periodic progress
            // notifications, which must come well within the stall timeout.
            opts.progress_notify_interval = Some(config.stall_timeout / 3);
        }
        if config.auto_compaction {
            // Periodic mode compacts every retention period; revision mode
            // only runs every 5 minutes in etcd 3.4.
            opts.auto_compaction_mode = CompactionMode::Periodic;
            opts.auto_compaction_retention = Some("1s".into());
        }
        let cluster = EtcdCluster::start(opts).await.map_err(RunError::setup)?;
        let mut proxies = Vec::with_capacity(cluster.len());
        for i in 0..cluster.len() {
            proxies.push(
                FaultProxy::start(cluster.client_addr(i))
                    .await
                    .map_err(RunError::setup)?,
            );
        }
        let grpc_proxy = if config.grpc_proxy {
            let behind: Vec<String> = proxies.iter().map(FaultProxy::endpoint).collect();
            Some(GrpcProxy::start(&behind).await.map_err(RunError::setup)?)
        } else {
            None
        };
        Ok(Self {
            grpc_proxy,
            proxies,
            cluster,
        })
    }

    /// Where the mirror connects: the grpc-proxy, or the fault proxies.
    pub(super) fn mirror_endpoints(&self) -> Vec<String> {
        match &self.grpc_proxy {
            Some(g) => vec![g.endpoint()],
            None => self.proxies.iter().map(FaultProxy::endpoint).collect(),
        }
    }

    /// The members themselves, for the writers and the truth recorder.
    pub(super) fn member_endpoints(&self) -> Vec<String> {
        self.cluster.endpoints()
    }
}
