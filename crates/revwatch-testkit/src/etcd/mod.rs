//! Real etcd processes: a single member or a 3-member cluster on free
//! loopback ports, with kill -9, freeze (SIGSTOP), thaw and restart. With
//! [`ClusterOptions::embedded`], the single member is revwatch's embedded
//! server instead, under the same process control.
//!
//! Every process is killed and every directory removed when the
//! [`EtcdCluster`] is dropped, also while a test panics. If the test process
//! itself dies without running destructors, the kernel kills the members
//! (they are spawned with a parent-death signal).
//!
//! # Partitions
//!
//! With [`ClusterOptions::peer_links`], member `i` reaches member `j` only
//! through link `(i, j)`, a fault proxy in the test process, so
//! [`EtcdCluster::isolate`] cuts a member (leader or follower) off from its
//! peers in both directions while its client port stays reachable, and
//! [`EtcdCluster::set_peer_link`] faults single links (one-way cuts, latency).
//! How: each member gets its own SOCKS5 proxy through `HTTP_PROXY`, which
//! etcd's peer transport honours, so the proxy knows the dialer; members
//! advertise peer URLs on the unroutable `192.0.2.1` with their real peer
//! port, so the proxy knows the target and nothing can bypass it (the
//! cluster would not form). Same-host source addresses are no alternative:
//! etcd cannot bind one, and all loopback connections come from `127.0.0.1`.

mod member;
mod options;
mod peers;
mod ports;
mod queries;
mod rpc;
mod spawn;
mod tls;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_proto::etcdserverpb::auth_client::AuthClient;
use etcd_proto::etcdserverpb::{AuthEnableRequest, AuthUserAddRequest, AuthUserGrantRoleRequest};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tonic::transport::ClientTlsConfig;

use self::member::Member;
pub use self::options::{
    ClusterOptions, CompactionMode, DEFAULT_ETCD_BIN, DEFAULT_ETCDCTL_BIN, EmbeddedServer,
    etcd_binary,
};
use self::options::{cluster_token, member_args};
pub use self::peers::PeerCut;
use self::peers::PeerNet;
pub use self::tls::TlsFiles;
use crate::TestkitError;

/// How long [`EtcdCluster::start`] and [`EtcdCluster::restart`] wait for health.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-cluster start attempts, for when a chosen port is taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// Pause between health polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A running etcd cluster owned by a test.
///
/// Members are addressed by index `0..len()`. Dropping the cluster kills
/// every member (resuming frozen ones first) and deletes the data dirs.
pub struct EtcdCluster {
    // Field order matters: members are killed before the directory goes.
    members: Vec<Member>,
    /// Routers of a cluster with peer links, dropped after the members.
    peer_net: Option<PeerNet>,
    opts: ClusterOptions,
    etcd_bin: PathBuf,
    tls: Option<(TlsFiles, ClientTlsConfig)>,
    dir: TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Starts a single member with default options.
    pub async fn single() -> Result<Self, TestkitError> {
        Self::start(ClusterOptions::default()).await
    }

    /// Starts a 3-member cluster with default options.
    pub async fn three() -> Result<Self, TestkitError> {
        Self::start(ClusterOptions {
            members: 3,
            ..ClusterOptions::default()
        })
        .await
    }

    /// Starts a 3-member cluster whose peer traffic runs through per-link proxies,
    /// so that [`isolate`](Self::isolate) can cut a member off from its peers.
    pub async fn three_partitionable() -> Result<Self, TestkitError> {
        Self::start(ClusterOptions {
            members: 3,
            peer_links: true,
            ..ClusterOptions::default()
        })
        .await
    }

    /// Starts a cluster and waits until a KV Range succeeds on every member.
    ///
    /// If a port chosen as free was taken before etcd bound it, the whole
    /// start is retried with new ports. Errors carry the tail of the failing
    /// member's log.
    pub async fn start(opts: ClusterOptions) -> Result<Self, TestkitError> {
        options::check(&opts)?;
        let etcd_bin = match &opts.embedded {
            Some(embedded) => embedded.program.clone(),
            None => etcd_binary(opts.etcd_bin.as_deref())?,
        };
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts, &etcd_bin).await {
                Ok(cluster) => return Ok(cluster),
                Err(e) if attempt < START_ATTEMPTS && is_port_clash(&e) => {
                    tracing::warn!(attempt, "etcd port clash, retrying with new ports: {e}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(opts: &ClusterOptions, etcd_bin: &Path) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new()
            .prefix("revwatch-etcd-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temporary directory", e))?;
        let tls = if opts.tls {
            let files = TlsFiles::generate(dir.path())?;
            let config = files.client_tls_config()?;
            Some((files, config))
        } else {
            None
        };
        let ports = ports::free_ports(2 * opts.members)?;
        let token = cluster_token();
        let peer_net = if opts.peer_links {
            let peer_ports: Vec<u16> = (0..opts.members).map(|i| ports[2 * i + 1]).collect();
            Some(PeerNet::start(&peer_ports).await?)
        } else {
            None
        };

        let mut members = Vec::with_capacity(opts.members);
        for i in 0..opts.members {
            let args = member_args(
                opts,
                dir.path(),
                &ports,
                &token,
                tls.as_ref().map(|(f, _)| f),
                i,
            );
            let log_path = dir.path().join(format!("m{i}.log"));
            members.push(Member::new(
                i,
                ports[2 * i],
                ports[2 * i + 1],
                log_path,
                args,
                peer_net
                    .as_ref()
                    .map(|net| net.member_env(i))
                    .unwrap_or_default(),
            ));
        }

        let mut cluster = Self {
            members,
            peer_net,
            opts: opts.clone(),
            etcd_bin: etcd_bin.to_owned(),
            tls,
            dir,
        };
        // Start all before waiting: a multi-member cluster needs a quorum.
        for m in &mut cluster.members {
            m.spawn(&cluster.etcd_bin)?;
        }
        // No credentials yet: auth is enabled below.
        cluster
            .wait_members_healthy(0..opts.members, START_TIMEOUT, None)
            .await?;
        for i in 0..opts.members {
            let status = cluster.status_with(i, None).await?;
            cluster.members[i].id = status.header.map(|h| h.member_id).unwrap_or(0);
        }
        if let Some(creds) = &opts.auth {
            cluster.enable_auth(creds).await?;
        }
        Ok(cluster)
    }

    async fn enable_auth(&self, (user, password): &(String, String)) -> Result<(), TestkitError> {
        let conn = self.conn_with(0, None).await?;
        let mut auth = AuthClient::new(conn.channel);
        auth.user_add(AuthUserAddRequest {
            name: user.clone(),
            password: password.clone(),
            options: Some(Default::default()),
        })
        .await
        .map_err(|s| TestkitError::rpc("UserAdd", s))?;
        auth.user_grant_role(AuthUserGrantRoleRequest {
            user: user.clone(),
            role: "root".into(),
        })
        .await
        .map_err(|s| TestkitError::rpc("UserGrantRole", s))?;
        auth.auth_enable(AuthEnableRequest {})
            .await
            .map_err(|s| TestkitError::rpc("AuthEnable", s))?;
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The options the cluster was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn member(&self, i: usize) -> Result<&Member, TestkitError> {
        let len = self.members.len();
        self.members
            .get(i)
            .ok_or(TestkitError::NoSuchMember { index: i, len })
    }

    fn member_mut(&mut self, i: usize) -> Result<&mut Member, TestkitError> {
        let len = self.members.len();
        self.members
            .get_mut(i)
            .ok_or(TestkitError::NoSuchMember { index: i, len })
    }

    /// Client URLs of all members, e.g. `http://127.0.0.1:40123`
    /// (`https://` for a TLS cluster).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Client URL of member `i`.
    ///
    /// # Panics
    /// If `i >= len()` (a bug in the test).
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://{}", self.scheme(), self.client_addr(i))
    }

    /// Client address of member `i`, e.g. for a [`FaultProxy`](crate::proxy::FaultProxy).
    ///
    /// # Panics
    /// If `i >= len()` (a bug in the test).
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].client_port))
    }

    /// Peer (raft) address of member `i`.
    ///
    /// # Panics
    /// If `i >= len()` (a bug in the test).
    pub fn peer_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].peer_port))
    }

    /// etcd's member id of member `i` (stable across restarts).
    ///
    /// # Panics
    /// If `i >= len()` (a bug in the test).
    pub fn member_id(&self, i: usize) -> u64 {
        self.members[i].id
    }

    /// Path of member `i`'s log file.
    ///
    /// # Panics
    /// If `i >= len()` (a bug in the test).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log_path
    }

    /// The TLS files, for a TLS cluster.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref().map(|(files, _)| files)
    }

    /// The root credentials, for a cluster with auth.
    pub fn credentials(&self) -> Option<&(String, String)> {
        self.opts.auth.as_ref()
    }

    /// Whether member `i`'s process exists (a frozen member is running).
    pub fn is_running(&self, i: usize) -> bool {
        self.members.get(i).is_some_and(Member::is_running)
    }

    /// Process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i).and_then(Member::pid)
    }

    /// The temporary directory holding data dirs, logs and TLS files.
    /// Removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether member `i` is frozen (SIGSTOPped).
    pub fn is_frozen(&self, i: usize) -> bool {
        self.members.get(i).is_some_and(|m| m.frozen)
    }

    /// `kill -9` member `i` and reap it. Its data dir stays for [`restart`](Self::restart).
    pub fn kill(&mut self, i: usize) -> Result<(), TestkitError> {
        self.member_mut(i)?.kill()
    }

    /// Freezes member `i` with SIGSTOP: its sockets stay open but it answers nothing.
    pub fn freeze(&mut self, i: usize) -> Result<(), TestkitError> {
        let m = self.member_mut(i)?;
        m.signal(Signal::SIGSTOP)?;
        m.frozen = true;
        Ok(())
    }

    /// Resumes a frozen member `i` with SIGCONT.
    pub fn thaw(&mut self, i: usize) -> Result<(), TestkitError> {
        let m = self.member_mut(i)?;
        m.signal(Signal::SIGCONT)?;
        m.frozen = false;
        Ok(())
    }

    /// Starts member `i` again on the same data dir and ports (killing it
    /// first if it still runs) and waits until it serves a linearizable read.
    pub async fn restart(&mut self, i: usize) -> Result<(), TestkitError> {
        let etcd_bin = self.etcd_bin.clone();
        let m = self.member_mut(i)?;
        if m.pid().is_some() {
            // Running, or exited on its own and not yet reaped.
            m.kill()?;
        }
        m.spawn(&etcd_bin)?;
        self.wait_members_healthy(i..i + 1, START_TIMEOUT, self.opts.auth.as_ref())
            .await
    }
}

/// Whether a start failure looks like a port taken between choosing and binding.
fn is_port_clash(e: &TestkitError) -> bool {
    // etcd logs "address already in use", the embedded server "Address ...".
    matches!(e, TestkitError::MemberExited { log_tail, .. }
        if log_tail.to_ascii_lowercase().contains("address already in use"))
}
