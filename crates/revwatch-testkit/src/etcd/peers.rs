//! Peer (raft) traffic through one fault proxy per ordered pair of members,
//! so that a member can really be partitioned from its peers.
//!
//! # Why SOCKS, and why an unroutable advertised address
//!
//! etcd dials a peer at the peer URLs that peer advertised, and every member
//! must agree on them (the member ids and the cluster id are hashed from the
//! `--initial-cluster` URLs). So the URL cannot differ per dialer, and one
//! proxy per member's inbound port could not tell which peer is dialing: all
//! loopback connections come from `127.0.0.1`, and etcd has no flag to bind
//! a source address.
//!
//! What etcd 3.4 does have: its peer HTTP transport (`rafthttp`, also used for
//! version checks and lease forwarding) takes its proxy from the environment
//! (Go's `http.ProxyFromEnvironment`), and Go's transport speaks SOCKS5. So:
//!
//! * member `i` runs with `HTTP_PROXY=socks5://127.0.0.1:<router i>`, its own
//!   SOCKS5 router in the test process, which therefore knows the dialer;
//! * members listen for peers on `127.0.0.1:<peer port>` but advertise
//!   `http://192.0.2.1:<peer port>`; the router maps the requested port to
//!   the target member and relays to its real listener under the fault of
//!   link `(i, target)`.
//!
//! Go bypasses the proxy for loopback hosts, hence the advertised address is
//! not loopback. It is in TEST-NET-1 (RFC 5737), which routes nowhere: if a
//! connection ever bypassed the routers it could not reach any member, and
//! the cluster would not even form. Traffic reaches a peer through its link
//! or not at all.
//!
//! A TCP connection dialed by `i` to `j` carries bytes both ways (etcd's
//! stream readers receive on connections they dialed), so link `(i, j)`'s
//! fault applies to both directions of those connections; cutting the pair
//! means faulting `(i, j)` and `(j, i)`. While a link is blackholed, new
//! connections on it are held before the SOCKS reply, like SYNs dropped by a
//! partition, and go on if it heals before the dialer gives up.
//!
//! Clients are not affected: client URLs are loopback and never proxied.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use super::EtcdCluster;
use crate::TestkitError;
use crate::proxy::{Fault, Shared, connect_upstream, relay};

/// The host members advertise as their peer address: unroutable (RFC 5737),
/// so only the SOCKS routers can reach the real listeners.
pub(crate) const ADVERTISED_PEER_HOST: &str = "192.0.2.1";
/// How long a dialer has to complete the SOCKS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const SOCKS_VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const REPLY_SUCCEEDED: u8 = 0;
const REPLY_NOT_ALLOWED: u8 = 2;
const REPLY_COMMAND_NOT_SUPPORTED: u8 = 7;

/// How a member is cut off from its peers by [`EtcdCluster::isolate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerCut {
    /// Every link to and from the member forwards nothing, on open and new
    /// connections: like dropped packets, nothing fails until a timeout.
    Blackhole,
    /// As `Blackhole`, and every open connection on those links is closed
    /// with an RST at once, so both sides notice immediately.
    Reset,
}

/// The links and SOCKS routers of one cluster.
pub(crate) struct PeerNet {
    /// Link `(from, to)` at `from * n + to`.
    links: Arc<[Arc<Shared>]>,
    routers: Vec<Router>,
}

struct Router {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Router {
    fn drop(&mut self) {
        // The task owns its connections: aborting it closes them all.
        self.task.abort();
    }
}

impl PeerNet {
    /// Starts one router per member; `peer_ports[j]` is member `j`'s real
    /// peer listener on loopback, and the port it advertises.
    pub(crate) async fn start(peer_ports: &[u16]) -> Result<Self, TestkitError> {
        let n = peer_ports.len();
        let links: Arc<[Arc<Shared>]> = (0..n * n).map(|_| Arc::new(Shared::new())).collect();
        let ports: Arc<[u16]> = peer_ports.into();
        let mut routers = Vec::with_capacity(n);
        for from in 0..n {
            let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
                .await
                .map_err(|e| TestkitError::io("binding a peer link router", e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| TestkitError::io("reading a peer link router's address", e))?;
            let task = tokio::spawn(route_loop(listener, from, ports.clone(), links.clone()));
            routers.push(Router { addr, task });
        }
        Ok(Self { links, routers })
    }

    /// Environment for member `i`: its router as the proxy of every plain
    /// HTTP request, with nothing exempted.
    pub(crate) fn member_env(&self, i: usize) -> Vec<(&'static str, Option<String>)> {
        let proxy = self.routers.get(i).map(|r| format!("socks5://{}", r.addr));
        vec![
            ("HTTP_PROXY", proxy.clone()),
            ("http_proxy", proxy),
            ("NO_PROXY", None),
            ("no_proxy", None),
        ]
    }

    fn members(&self) -> usize {
        self.routers.len()
    }

    fn link(&self, from: usize, to: usize) -> Result<&Shared, TestkitError> {
        let n = self.members();
        for index in [from, to] {
            if index >= n {
                return Err(TestkitError::NoSuchMember { index, len: n });
            }
        }
        Ok(&self.links[from * n + to])
    }
}

async fn route_loop(
    listener: TcpListener,
    from: usize,
    ports: Arc<[u16]>,
    links: Arc<[Arc<Shared>]>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((dialer, _)) => {
                    conns.spawn(route_connection(dialer, from, ports.clone(), links.clone()));
                }
                Err(e) => {
                    tracing::warn!("peer link router accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One connection dialed by member `from`: SOCKS handshake, then the link's
/// fault decides when (and whether) it reaches the target.
async fn route_connection(
    mut dialer: TcpStream,
    from: usize,
    ports: Arc<[u16]>,
    links: Arc<[Arc<Shared>]>,
) {
    let Ok(Ok(request)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, socks_request(&mut dialer)).await
    else {
        return;
    };
    let port = match request {
        SocksRequest::Connect { port } => port,
        SocksRequest::Unsupported => {
            let _ = socks_reply(&mut dialer, REPLY_COMMAND_NOT_SUPPORTED).await;
            return;
        }
    };
    let Some(to) = ports.iter().position(|&p| p == port) else {
        // Not a member's peer port: nothing else may be reached this way.
        let _ = socks_reply(&mut dialer, REPLY_NOT_ALLOWED).await;
        return;
    };
    let link = links[from * ports.len() + to].clone();
    let (_guard, mut resets) = link.open();
    if !link.wait_passable(&mut resets).await {
        let _ = dialer.set_zero_linger();
        return;
    }
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Some(server) = connect_upstream(&dialer, upstream).await else {
        return;
    };
    if socks_reply(&mut dialer, REPLY_SUCCEEDED).await.is_err() {
        return;
    }
    relay(dialer, server, &link, resets).await;
}

/// What a SOCKS5 client asked for.
#[derive(Debug, PartialEq, Eq)]
enum SocksRequest {
    /// CONNECT to this port (the host is ignored: members differ by port).
    Connect { port: u16 },
    /// BIND or UDP ASSOCIATE, which etcd never asks for.
    Unsupported,
}

/// Server side of the SOCKS5 greeting (no authentication) and request.
async fn socks_request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> std::io::Result<SocksRequest> {
    let [version, methods] = read_array(s).await?;
    if version != SOCKS_VERSION {
        return Err(invalid("not SOCKS5"));
    }
    let mut offered = vec![0u8; usize::from(methods)];
    s.read_exact(&mut offered).await?;
    if !offered.contains(&NO_AUTH) {
        s.write_all(&[SOCKS_VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(invalid("client requires authentication"));
    }
    s.write_all(&[SOCKS_VERSION, NO_AUTH]).await?;

    let [version, command, _reserved, address_type] = read_array(s).await?;
    if version != SOCKS_VERSION {
        return Err(invalid("not SOCKS5"));
    }
    let address_len = match address_type {
        1 => 4,
        3 => usize::from(read_array::<_, 1>(s).await?[0]),
        4 => 16,
        _ => return Err(invalid("unknown address type")),
    };
    let mut address = vec![0u8; address_len];
    s.read_exact(&mut address).await?;
    let port = u16::from_be_bytes(read_array(s).await?);
    Ok(if command == CMD_CONNECT {
        SocksRequest::Connect { port }
    } else {
        SocksRequest::Unsupported
    })
}

/// The reply to a request, with an empty IPv4 bound address.
async fn socks_reply<S: AsyncWrite + Unpin>(s: &mut S, code: u8) -> std::io::Result<()> {
    s.write_all(&[SOCKS_VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
}

async fn read_array<S: AsyncRead + Unpin, const N: usize>(s: &mut S) -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

fn invalid(msg: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Partitions: only on clusters started with
/// [`ClusterOptions::peer_links`](super::ClusterOptions::peer_links).
impl EtcdCluster {
    fn peer_net(&self) -> Result<&PeerNet, TestkitError> {
        self.peer_net.as_ref().ok_or_else(|| {
            TestkitError::InvalidOptions(
                "peer link faults need a cluster started with `peer_links: true`".into(),
            )
        })
    }

    /// Sets the fault on connections member `from` opens to member `to`
    /// (both byte directions of those connections); applies at once.
    pub fn set_peer_link(&self, from: usize, to: usize, fault: Fault) -> Result<(), TestkitError> {
        self.peer_net()?.link(from, to)?.set(fault);
        Ok(())
    }

    /// The fault on link `(from, to)`.
    pub fn peer_link(&self, from: usize, to: usize) -> Result<Fault, TestkitError> {
        Ok(self.peer_net()?.link(from, to)?.fault())
    }

    /// Connections member `from` has opened to member `to` through its link
    /// since the cluster started (including ones held by a blackhole).
    pub fn peer_link_connections(&self, from: usize, to: usize) -> Result<u64, TestkitError> {
        Ok(self.peer_net()?.link(from, to)?.accepted_connections())
    }

    /// Cuts member `i` off from every peer, both directions, while its client
    /// port stays reachable. Undo with [`heal_peers`](Self::heal_peers).
    pub fn isolate(&self, i: usize, cut: PeerCut) -> Result<(), TestkitError> {
        let net = self.peer_net()?;
        for j in (0..net.members()).filter(|&j| j != i) {
            for link in [net.link(i, j)?, net.link(j, i)?] {
                link.set(Fault::Blackhole);
                if cut == PeerCut::Reset {
                    link.reset_all();
                }
            }
        }
        Ok(())
    }

    /// Clears every peer link fault; held bytes and connections go on.
    pub fn heal_peers(&self) -> Result<(), TestkitError> {
        let net = self.peer_net()?;
        for link in net.links.iter() {
            link.set(Fault::None);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn handshake(client_bytes: &[u8]) -> (std::io::Result<SocksRequest>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(client_bytes).await.unwrap();
        let result = socks_request(&mut server).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (result, answer)
    }

    #[tokio::test]
    async fn a_connect_request_yields_its_port() {
        // Greeting offering "no auth", then CONNECT 192.0.2.1:2380.
        let bytes = [5, 1, 0, 5, 1, 0, 1, 192, 0, 2, 1, 0x09, 0x4c];
        let (result, answer) = handshake(&bytes).await;
        assert_eq!(result.unwrap(), SocksRequest::Connect { port: 2380 });
        assert_eq!(answer, [5, 0]);
    }

    #[tokio::test]
    async fn domain_names_are_read_and_ignored() {
        let mut bytes = vec![5, 2, 2, 0, 5, 1, 0, 3, 9];
        bytes.extend_from_slice(b"localhost");
        bytes.extend_from_slice(&40000u16.to_be_bytes());
        let (result, _) = handshake(&bytes).await;
        assert_eq!(result.unwrap(), SocksRequest::Connect { port: 40000 });
    }

    #[tokio::test]
    async fn bind_is_unsupported() {
        let bytes = [5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80];
        let (result, _) = handshake(&bytes).await;
        assert_eq!(result.unwrap(), SocksRequest::Unsupported);
    }

    #[tokio::test]
    async fn clients_that_need_authentication_are_refused() {
        // Offers only username/password (2).
        let (result, answer) = handshake(&[5, 1, 2]).await;
        assert!(result.is_err());
        assert_eq!(answer, [5, NO_ACCEPTABLE_METHOD]);
    }

    #[tokio::test]
    async fn other_protocols_are_refused() {
        // A SOCKS4 request.
        let (result, answer) = handshake(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await;
        assert!(result.is_err());
        assert!(answer.is_empty());
    }
}
