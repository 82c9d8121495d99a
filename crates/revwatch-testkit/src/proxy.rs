//! A TCP proxy in front of one upstream address, with faults switchable at
//! runtime: blackhole, latency, bandwidth squeeze, and connection resets.
//!
//! ```no_run
//! use std::time::Duration;
//! use revwatch_testkit::proxy::{Fault, FaultProxy};
//!
//! # async fn demo(etcd: std::net::SocketAddr) -> Result<(), revwatch_testkit::TestkitError> {
//! let proxy = FaultProxy::start(etcd).await?;
//! // point the client at proxy.endpoint() ...
//! proxy.set(Fault::Blackhole);
//! // ... the client's requests now hang ...
//! proxy.heal();
//! proxy.set(Fault::Latency(Duration::from_millis(200)));
//! proxy.reset_all();
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::TestkitError;

/// Bytes read from one side at a time.
const CHUNK: usize = 16 * 1024;
/// Chunks held per direction before the proxy stops reading (backpressure).
const QUEUE: usize = 32;
/// How long to try reaching the upstream for a new connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The fault applied to every connection, both directions, until changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything as fast as possible.
    #[default]
    None,
    /// Accept connections and keep them open, but forward no byte either way,
    /// on new and existing connections alike. Data read meanwhile is held
    /// and delivered after healing.
    Blackhole,
    /// Delay every chunk by this much, one way (so a round trip gains twice
    /// this). Throughput is not reduced.
    Latency(Duration),
    /// Pace each direction to this many bytes per second. 0 passes nothing.
    Bandwidth {
        /// The rate limit of each direction.
        bytes_per_sec: u64,
    },
}

/// The fault state of one proxy, or of one peer link of a cluster: the fault
/// in force, a reset generation, and connection counts.
pub(crate) struct Shared {
    fault: watch::Sender<Fault>,
    /// Bumped by `reset_all`; every connection alive at that moment resets.
    resets: watch::Sender<u64>,
    accepted: AtomicU64,
    active: AtomicUsize,
}

/// A TCP proxy on `127.0.0.1:<free port>` in front of one upstream.
///
/// Dropping it stops accepting and closes every proxied connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("fault", &*self.fault.borrow())
            .field("accepted", &self.accepted)
            .field("active", &self.active)
            .finish()
    }
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            fault: watch::Sender::new(Fault::None),
            resets: watch::Sender::new(0),
            accepted: AtomicU64::new(0),
            active: AtomicUsize::new(0),
        }
    }

    pub(crate) fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub(crate) fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Resets every connection open now; returns how many there were.
    pub(crate) fn reset_all(&self) -> usize {
        self.resets.send_modify(|n| *n += 1);
        self.active_connections()
    }

    pub(crate) fn accepted_connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    pub(crate) fn active_connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a new connection as accepted and active until the guard drops,
    /// and subscribes to resets from this moment on.
    pub(crate) fn open(self: &Arc<Self>) -> (ActiveGuard, watch::Receiver<u64>) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        let mut resets = self.resets.subscribe();
        resets.mark_unchanged();
        (ActiveGuard(self.clone()), resets)
    }

    /// Waits until the fault lets bytes through (neither a blackhole nor zero
    /// bandwidth). Returns false if a reset came first.
    pub(crate) async fn wait_passable(&self, resets: &mut watch::Receiver<u64>) -> bool {
        let mut fault = self.fault.subscribe();
        loop {
            let current = *fault.borrow_and_update();
            if !matches!(
                current,
                Fault::Blackhole | Fault::Bandwidth { bytes_per_sec: 0 }
            ) {
                return true;
            }
            tokio::select! {
                // The sender lives as long as `self`.
                _ = fault.changed() => {}
                _ = resets.changed() => return false,
            }
        }
    }
}

impl FaultProxy {
    /// Binds a free loopback port and starts forwarding to `upstream`.
    /// Must be called within a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> Result<Self, TestkitError> {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|e| TestkitError::io("binding the fault proxy", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TestkitError::io("reading the fault proxy's address", e))?;
        let shared = Arc::new(Shared::new());
        let accept_task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(Self {
            addr,
            upstream,
            shared,
            accept_task,
        })
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for clients that take URLs.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the fault; applies to existing connections at once.
    pub fn set(&self, fault: Fault) {
        self.shared.set(fault);
    }

    /// Back to [`Fault::None`].
    pub fn heal(&self) {
        self.set(Fault::None);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Closes every current connection, on both sides, with a TCP RST.
    /// Returns how many connections were open. The sockets close as soon as
    /// their tasks run, i.e. right away unless the runtime is blocked.
    pub fn reset_all(&self) -> usize {
        self.shared.reset_all()
    }

    /// Connections accepted since start.
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted_connections()
    }

    /// Connections currently open.
    pub fn active_connections(&self) -> usize {
        self.shared.active_connections()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The accept task owns the JoinSet of connections: aborting it drops
        // the set, which aborts them all and closes their sockets.
        self.accept_task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    conns.spawn(proxy_connection(client, upstream, shared.clone()));
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!("fault proxy accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Decrements the active count however the connection task ends.
pub(crate) struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn proxy_connection(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let (_guard, resets) = shared.open();
    let Some(server) = connect_upstream(&client, upstream).await else {
        return;
    };
    relay(client, server, &shared, resets).await;
}

/// Connects to `upstream` for `client`; on failure the client is set to
/// close with a reset, like a refused connection.
pub(crate) async fn connect_upstream(
    client: &TcpStream,
    upstream: SocketAddr,
) -> Option<TcpStream> {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    match connect.await {
        Ok(Ok(s)) => Some(s),
        _ => {
            let _ = client.set_zero_linger();
            None
        }
    }
}

/// Forwards both directions under `shared`'s fault until both sides close,
/// or until a reset, which closes both with an RST.
pub(crate) async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    shared: &Shared,
    mut resets: watch::Receiver<u64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);

    let clean = {
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = server.split();
        let up = pump(client_r, server_w, shared.fault.subscribe());
        let down = pump(server_r, client_w, shared.fault.subscribe());
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.is_ok(),
            _ = resets.changed() => false,
        }
    };
    if !clean {
        // Closing with SO_LINGER 0 sends RST instead of FIN.
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Forwards one direction until EOF (then half-closes the writer) or error.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut fault: watch::Receiver<Fault>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let read = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 || tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let write = async move {
        // When the bandwidth pacer next allows a write.
        let mut next_send = Instant::now();
        while let Some((read_at, chunk)) = rx.recv().await {
            deliver(&mut to, read_at, &chunk, &mut fault, &mut next_send).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Writes `chunk` under whatever fault is in force, re-checking the fault
/// whenever it changes mid-way.
async fn deliver<W: AsyncWrite + Unpin>(
    to: &mut W,
    read_at: Instant,
    chunk: &[u8],
    fault: &mut watch::Receiver<Fault>,
    next_send: &mut Instant,
) -> std::io::Result<()> {
    let mut rest = chunk;
    while !rest.is_empty() {
        let current = *fault.borrow_and_update();
        let wait_until = match current {
            Fault::None => None,
            Fault::Blackhole | Fault::Bandwidth { bytes_per_sec: 0 } => {
                fault.changed().await.map_err(|_| closed())?;
                continue;
            }
            Fault::Latency(delay) => Some(read_at + delay),
            Fault::Bandwidth { .. } => Some(*next_send),
        };
        if let Some(at) = wait_until.filter(|&at| at > Instant::now()) {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                changed = fault.changed() => changed.map_err(|_| closed())?,
            }
            continue;
        }
        let n = match current {
            Fault::Bandwidth { bytes_per_sec } => {
                // Small pieces (1/20 s worth) keep the pacing smooth.
                let piece = (bytes_per_sec / 20).max(1);
                let n = rest.len().min(usize::try_from(piece).unwrap_or(usize::MAX));
                let cost = Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
                *next_send = Instant::now().max(*next_send) + cost;
                n
            }
            _ => rest.len(),
        };
        to.write_all(&rest[..n]).await?;
        rest = &rest[n..];
    }
    Ok(())
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "fault proxy shut down")
}
