//! The harness's own gRPC plumbing: channels to one member, with TLS and the
//! auth token when the cluster has them.

use std::time::Duration;

use etcd_proto::etcdserverpb::AuthenticateRequest;
use etcd_proto::etcdserverpb::auth_client::AuthClient;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::TestkitError;

/// Upper bound for one harness call (connect included). Generous because the
/// test machine may be busy, short enough that a frozen member is noticed.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A channel to one member plus the auth token to attach, if any.
pub(crate) struct Conn {
    pub(crate) channel: Channel,
    token: Option<AsciiMetadataValue>,
}

impl Conn {
    /// The auth token, if logged in.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_ref().and_then(|t| t.to_str().ok())
    }

    /// Wraps `msg` in a request carrying the auth token.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(token) = &self.token {
            req.metadata_mut().insert("token", token.clone());
        }
        req
    }
}

/// Opens a channel to `url`, failing within [`CALL_TIMEOUT`]. With
/// `request_timeout`, every call on it is bounded too (not wanted for
/// long-lived streams such as watches).
pub(crate) async fn channel(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    request_timeout: Option<Duration>,
) -> Result<Channel, TestkitError> {
    let connect_err = |source| TestkitError::Connect {
        endpoint: url.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(connect_err)?
        .connect_timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    if let Some(timeout) = request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(connect_err)?;
    }
    // connect_timeout covers TCP only; a frozen member stalls the TLS handshake.
    match tokio::time::timeout(CALL_TIMEOUT, endpoint.connect()).await {
        Ok(r) => r.map_err(connect_err),
        Err(_) => Err(TestkitError::Timeout {
            what: format!("a connection to {url}"),
            after: CALL_TIMEOUT,
            last_error: "connect did not complete".into(),
        }),
    }
}

/// Opens a connection and, if `credentials` are given, logs in.
pub(crate) async fn connect(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    credentials: Option<&(String, String)>,
) -> Result<Conn, TestkitError> {
    let channel = channel(url, tls, Some(CALL_TIMEOUT)).await?;
    let token = match credentials {
        None => None,
        Some((name, password)) => {
            let resp = AuthClient::new(channel.clone())
                .authenticate(AuthenticateRequest {
                    name: name.clone(),
                    password: password.clone(),
                })
                .await
                .map_err(|s| TestkitError::rpc(format!("Authenticate at {url}"), s))?;
            let token = resp.into_inner().token;
            let value = AsciiMetadataValue::try_from(token.as_str()).map_err(|_| {
                TestkitError::rpc(
                    format!("Authenticate at {url}"),
                    tonic::Status::internal("etcd returned a token that is not ASCII"),
                )
            })?;
            Some(value)
        }
    };
    Ok(Conn { channel, token })
}
