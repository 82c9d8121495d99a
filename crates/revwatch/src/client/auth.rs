//! Username/password authentication and the auth token.
//!
//! etcd hands out a token from `Auth.Authenticate`; every request carries it in the
//! `token` metadata. Tokens expire (simple tokens after `--auth-token-ttl` idle), so a
//! request answered with "invalid auth token" re-authenticates once and is retried.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_proto::etcdserverpb::AuthenticateRequest;
use etcd_proto::etcdserverpb::auth_client::AuthClient;
use tonic::metadata::MetadataValue;

use super::endpoints::Endpoint;
use super::error::Error;
use super::failure::{Failure, classify, connection_error};

/// The metadata key etcd reads the token from.
const TOKEN_KEY: &str = "token";

/// Username and password for etcd's `Authenticate` RPC.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The etcd user.
    pub user: String,
    /// The user's password.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(crate) struct Auth {
    credentials: Option<Credentials>,
    token: RwLock<Option<Arc<str>>>,
    /// Serializes refreshes so a burst of rejected requests authenticates once.
    refresh: tokio::sync::Mutex<()>,
}

impl Auth {
    pub(crate) fn new(credentials: Option<Credentials>) -> Self {
        Auth {
            credentials,
            token: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.credentials.is_some()
    }

    pub(crate) fn token(&self) -> Option<Arc<str>> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds the current token, if any, to a request's metadata.
    pub(crate) fn apply<T>(&self, req: &mut tonic::Request<T>) -> Result<(), Error> {
        if let Some(token) = self.token() {
            let value = MetadataValue::try_from(&*token).map_err(|_| {
                Error::Auth("server returned a token that is not valid metadata".into())
            })?;
            req.metadata_mut().insert(TOKEN_KEY, value);
        }
        Ok(())
    }

    /// Replaces the token, unless another task already did since `stale` was read.
    pub(crate) async fn refresh(
        &self,
        endpoint: &Endpoint,
        stale: Option<&Arc<str>>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let _guard = self.refresh.lock().await;
        let current = self.token();
        if current.is_some() && current.as_ref() != stale {
            return Ok(());
        }
        let token = self.authenticate(endpoint, timeout).await?;
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token.into());
        Ok(())
    }

    /// Calls Authenticate on one endpoint. Bad credentials give [`Error::Auth`];
    /// transport failures give the classification so the caller can fail over.
    async fn authenticate(&self, endpoint: &Endpoint, timeout: Duration) -> Result<String, Error> {
        let Some(creds) = &self.credentials else {
            return Err(Error::Auth(
                "the server requires authentication but no credentials are configured".into(),
            ));
        };
        let req = AuthenticateRequest {
            name: creds.user.clone(),
            password: creds.password.clone(),
        };
        let mut client = AuthClient::new(endpoint.channel.clone());
        let status = match tokio::time::timeout(timeout, client.authenticate(req)).await {
            Ok(Ok(resp)) => return Ok(resp.into_inner().token),
            Ok(Err(status)) => status,
            Err(_) => {
                return Err(Error::Timeout {
                    endpoint: endpoint.name.clone(),
                    after: timeout,
                });
            }
        };
        match classify(status, &endpoint.name) {
            Failure::Transport { reason, status, .. } => {
                Err(connection_error(&endpoint.name, reason, status))
            }
            Failure::Unavailable(e) => Err(e),
            Failure::InvalidToken(e) | Failure::Fatal(e) => Err(Error::Auth(format!(
                "user {:?} on {}: {}",
                creds.user,
                endpoint.name,
                status_message(&e)
            ))),
        }
    }
}

fn status_message(e: &Error) -> String {
    match e {
        Error::Grpc { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
