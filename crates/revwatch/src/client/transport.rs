//! One endpoint's HTTP/2 connection: opened on first use, shared by every call and
//! stream to that endpoint, and replaced by a new one once it has closed.
//!
//! tonic's `Channel` does the same behind a `tower::Buffer`: every request passes through
//! a queue and a task of its own before it reaches the connection. Handing requests to
//! hyper's HTTP/2 handle directly saves that hop: with 16 clients putting small values,
//! the client's CPU per put drops by about 5% (`client_cpu_us_per_put_*` in
//! `revwatch-bench server`).
//!
//! Connection failures are `tonic::ConnectError`s, as with tonic's `Channel`: tonic maps
//! them to `Unavailable`, and the retry policy knows such a request never left.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::body::Body;

/// How connections are opened and kept alive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub connect_timeout: Duration,
    /// HTTP/2 pings while streams are open; none on idle connections, which etcd
    /// would close for pinging too often.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

/// TLS towards one endpoint.
#[derive(Clone)]
pub(crate) struct Tls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// A cheaply cloned handle on one endpoint's connection, usable by tonic's generated
/// clients.
#[derive(Clone)]
pub(crate) struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    tls: Option<Tls>,
    settings: Settings,
    /// The connection in use, if one was opened.
    current: ArcSwapOption<SendRequest<Body>>,
    /// Held while connecting, so that concurrent callers share one attempt; holds when
    /// the last attempt failed, and why.
    connecting: tokio::sync::Mutex<Option<(Instant, io::Error)>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("endpoint", &self.inner.authority)
            .field("tls", &self.inner.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// A channel to `scheme://authority` that connects on first use.
    pub fn lazy(
        scheme: http::uri::Scheme,
        authority: http::uri::Authority,
        tls: Option<Tls>,
        settings: Settings,
    ) -> Self {
        Channel {
            inner: Arc::new(Inner {
                scheme,
                authority,
                tls,
                settings,
                current: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    /// The open connection, or a new one.
    async fn sender(&self) -> Result<SendRequest<Body>, tonic::ConnectError> {
        if let Some(open) = self.open() {
            return Ok(open);
        }
        let asked = Instant::now();
        let mut last_failure = self.connecting.lock().await;
        if let Some(open) = self.open() {
            return Ok(open);
        }
        // An attempt that failed while this caller waited is its answer too: waiting
        // callers must not each spend a connect timeout on a dead endpoint in turn.
        if let Some((at, e)) = last_failure.as_ref()
            && *at >= asked
        {
            return Err(tonic::ConnectError(Box::new(copy_io_error(e))));
        }
        match tokio::time::timeout(self.settings.connect_timeout, self.connect()).await {
            Ok(Ok(sender)) => {
                self.current.store(Some(Arc::new(sender.clone())));
                *last_failure = None;
                Ok(sender)
            }
            Ok(Err(e)) => {
                let copy = copy_io_error(&e);
                *last_failure = Some((Instant::now(), e));
                Err(tonic::ConnectError(Box::new(copy)))
            }
            Err(_) => {
                let e = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                *last_failure = Some((Instant::now(), e()));
                Err(tonic::ConnectError(Box::new(e())))
            }
        }
    }

    fn open(&self) -> Option<SendRequest<Body>> {
        let current = self.current.load();
        current
            .as_deref()
            .filter(|sender| !sender.is_closed())
            .cloned()
    }

    async fn connect(&self) -> io::Result<SendRequest<Body>> {
        let port = self.authority.port_u16().unwrap_or(match self.tls {
            Some(_) => 443,
            None => 80,
        });
        let tcp = TcpStream::connect((host(&self.authority), port)).await?;
        // Small requests and watch events: latency matters more than packet count.
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => self.handshake(tcp).await,
            Some(tls) => {
                let stream = tls.connector.connect(tls.server_name.clone(), tcp).await?;
                self.handshake(stream).await
            }
        }
    }

    async fn handshake<IO>(&self, io: IO) -> io::Result<SendRequest<Body>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(false)
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let endpoint = self.authority.clone();
        tokio::spawn(async move {
            // Calls and streams on it see the error themselves; the next call reconnects.
            if let Err(e) = connection.await {
                tracing::debug!(%endpoint, error = %e, "connection closed");
            }
        });
        Ok(sender)
    }

    /// `request`, whose URI tonic gives as a path, aimed at this endpoint.
    fn aim(&self, request: &mut http::Request<Body>) -> Result<(), http::Error> {
        let mut parts = std::mem::take(request.uri_mut()).into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        *request.uri_mut() = http::Uri::from_parts(parts)?;
        Ok(())
    }
}

/// The host of `authority`, an IPv6 address without its brackets.
pub(crate) fn host(authority: &http::uri::Authority) -> &str {
    let host = authority.host();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// An equivalent of `e`, which is not `Clone`: the OS error itself when there is one,
/// so that it reads the same ("connection refused").
fn copy_io_error(e: &io::Error) -> io::Error {
    match (e.raw_os_error(), e.get_ref()) {
        (Some(code), _) => io::Error::from_raw_os_error(code),
        (None, Some(inner)) => io::Error::new(e.kind(), inner.to_string()),
        (None, None) => io::Error::from(e.kind()),
    }
}

impl tower_service::Service<http::Request<Body>> for Channel {
    type Response = http::Response<Incoming>;
    type Error = tonic::codegen::StdError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Connecting is part of each call, so that its failure is that call's error.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.aim(&mut request)?;
            let mut sender = inner.sender().await?;
            Ok(sender.send_request(request).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel_to(addr: std::net::SocketAddr, connect_timeout: Duration) -> Channel {
        let authority = addr.to_string().parse().expect("authority");
        let settings = Settings {
            connect_timeout,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
        };
        Channel::lazy(http::uri::Scheme::HTTP, authority, None, settings)
    }

    #[tokio::test]
    async fn callers_waiting_on_a_connect_share_its_failure() {
        let (listener, _fillers) = revwatch_testkit::proxy::black_hole()
            .await
            .expect("black hole");
        let timeout = Duration::from_millis(300);
        let channel = channel_to(listener.local_addr().expect("addr"), timeout);
        let started = Instant::now();
        let callers = (0..8).map(|_| {
            let inner = channel.inner.clone();
            async move { inner.sender().await }
        });
        let results = futures::future::join_all(callers).await;
        let took = started.elapsed();
        for result in results {
            let Err(tonic::ConnectError(e)) = result else {
                panic!("connected to a black hole");
            };
            let io = e.downcast_ref::<io::Error>().expect("an I/O error");
            assert_eq!(io.kind(), io::ErrorKind::TimedOut, "{io}");
        }
        // One attempt for all eight, not eight attempts in a row (2.4 s).
        assert!(took < timeout * 4, "8 waiting callers took {took:?}");
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = revwatch_server::ServerConfig::new(dir.path());
        let running = revwatch_server::Server::start(config)
            .await
            .expect("server");
        let addr = running.local_addr();
        let channel = channel_to(addr, Duration::from_secs(2));
        let first = channel.inner.sender().await.expect("connect");
        // Reused while open.
        let again = channel.inner.sender().await.expect("reuse");
        assert!(!first.is_closed() && !again.is_closed());
        running.shutdown().await.expect("shutdown");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !first.is_closed() {
            assert!(Instant::now() < deadline, "connection never closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Down: a connect failure, refused at once.
        let Err(tonic::ConnectError(e)) = channel.inner.sender().await else {
            panic!("connected to a stopped server");
        };
        let io = e.downcast_ref::<io::Error>().expect("an I/O error");
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused, "{io}");
        // Back on the same address: a new connection.
        let config = revwatch_server::ServerConfig::new(dir.path());
        let server = revwatch_server::Server::open(config).expect("reopen");
        let running = server.start_on(addr).await.expect("restart");
        let new = channel.inner.sender().await.expect("reconnect");
        assert!(!new.is_closed());
        running.shutdown().await.expect("shutdown");
    }

    #[test]
    fn copied_errors_read_the_same() {
        let refused = io::Error::from_raw_os_error(111);
        assert_eq!(copy_io_error(&refused).to_string(), refused.to_string());
        assert_eq!(
            copy_io_error(&refused).kind(),
            io::ErrorKind::ConnectionRefused
        );
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, "invalid peer certificate");
        let copy = copy_io_error(&wrapped);
        assert_eq!(copy.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            copy.get_ref().map(ToString::to_string).as_deref(),
            Some("invalid peer certificate")
        );
        let bare = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(copy_io_error(&bare).kind(), io::ErrorKind::TimedOut);
    }
}
