//! `etcd grpc-proxy`: a stateless gRPC proxy in front of etcd members, for
//! tests where the client reaches etcd only through it.
//!
//! ```no_run
//! use revwatch_testkit::etcd::EtcdCluster;
//! use revwatch_testkit::grpc_proxy::GrpcProxy;
//!
//! # async fn demo() -> Result<(), revwatch_testkit::TestkitError> {
//! let cluster = EtcdCluster::single().await?;
//! let proxy = GrpcProxy::start(&cluster.endpoints()).await?;
//! // point the client at proxy.endpoint() ...
//! # Ok(()) }
//! ```

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::TestkitError;
use crate::etcd::etcd_binary;

/// How long [`GrpcProxy::start`] waits for the proxy to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A running `etcd grpc-proxy start` process on a free loopback port.
///
/// Dropping it kills the process and removes its data directory.
#[derive(Debug)]
pub struct GrpcProxy {
    // Field order matters: the process dies before its directory goes.
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    _dir: TempDir,
}

impl GrpcProxy {
    /// Starts a proxy forwarding to `endpoints` (`http://host:port` URLs of
    /// plain-text members, or of fault proxies in front of them) with the
    /// etcd binary [`etcd_binary`] finds, and waits until it accepts
    /// connections.
    pub async fn start(endpoints: &[String]) -> Result<Self, TestkitError> {
        if endpoints.is_empty() {
            return Err(TestkitError::InvalidOptions(
                "a grpc-proxy needs at least one endpoint".into(),
            ));
        }
        let etcd = etcd_binary(None)?;
        let dir = tempfile::Builder::new()
            .prefix("revwatch-grpc-proxy-")
            .tempdir()
            .map_err(|e| TestkitError::io("creating a temporary directory", e))?;
        let addr = free_addr()?;
        let log_path = dir.path().join("grpc-proxy.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| TestkitError::io(format!("creating {}", log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the log file handle", e))?;
        // The proxy wants bare host:port endpoints.
        let upstream: Vec<&str> = endpoints
            .iter()
            .map(|e| e.trim_start_matches("http://"))
            .collect();
        let child = Command::new(&etcd)
            .arg("grpc-proxy")
            .arg("start")
            .arg(format!("--endpoints={}", upstream.join(",")))
            .arg(format!("--listen-addr={addr}"))
            .arg(format!("--advertise-client-url={addr}"))
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| TestkitError::io(format!("spawning {} grpc-proxy", etcd.display()), e))?;
        let mut proxy = Self {
            child,
            addr,
            log_path,
            _dir: dir,
        };
        proxy.wait_listening().await?;
        Ok(proxy)
    }

    async fn wait_listening(&mut self) -> Result<(), TestkitError> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            match tokio::net::TcpStream::connect(self.addr).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(TestkitError::io(
                            format!(
                                "etcd grpc-proxy exited ({status}); its log:\n{}",
                                self.log_tail()
                            ),
                            std::io::Error::other("process exited"),
                        ));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(TestkitError::Timeout {
                            what: format!("the grpc-proxy to listen on {}", self.addr),
                            after: START_TIMEOUT,
                            last_error: e.to_string(),
                        });
                    }
                }
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for clients that take URLs.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Process id of the proxy.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The proxy's log so far.
    pub fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .map(|s| {
                let start = s.len().saturating_sub(4096);
                // Cut on a character boundary.
                let start = (start..s.len())
                    .find(|&i| s.is_char_boundary(i))
                    .unwrap_or(s.len());
                s[start..].to_owned()
            })
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        // Fails only if it already exited; wait still reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address that was free a moment ago.
fn free_addr() -> Result<SocketAddr, TestkitError> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| TestkitError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map_err(|e| TestkitError::io("reading a listener's port", e))
}
