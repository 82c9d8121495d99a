//! The etcd source, over the resilient [`Client`].

use std::sync::Arc;

use tokio::sync::Mutex;

use super::{Source, WatchHandle};
use crate::client::{
    Client, ClientConfig, Error, RangeRequest, RangeResponse, WatchCreateRequest, WatchResponse,
    WatchStream,
};

/// Reads from etcd through a [`Client`]. Built from a connected client, or from a
/// configuration, in which case it connects on first use and again after a failed
/// attempt, so a mirror can start while etcd is down.
#[derive(Clone, Debug)]
pub struct ClientSource {
    inner: Arc<Inner>,
}

#[derive(Debug)]
enum Inner {
    Connected(Client),
    Lazy {
        config: Box<ClientConfig>,
        client: Mutex<Option<Client>>,
    },
}

impl ClientSource {
    /// Uses an already connected client.
    pub fn new(client: Client) -> Self {
        ClientSource {
            inner: Arc::new(Inner::Connected(client)),
        }
    }

    /// Connects with `config` when first needed. The configuration is validated now.
    pub fn lazy(config: ClientConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(ClientSource {
            inner: Arc::new(Inner::Lazy {
                config: Box::new(config),
                client: Mutex::new(None),
            }),
        })
    }

    /// The client, connecting first if needed.
    pub async fn client(&self) -> Result<Client, Error> {
        match &*self.inner {
            Inner::Connected(c) => Ok(c.clone()),
            Inner::Lazy { config, client } => {
                let mut guard = client.lock().await;
                if let Some(c) = &*guard {
                    return Ok(c.clone());
                }
                let c = Client::connect(ClientConfig::clone(config)).await?;
                *guard = Some(c.clone());
                Ok(c)
            }
        }
    }
}

impl From<Client> for ClientSource {
    fn from(client: Client) -> Self {
        ClientSource::new(client)
    }
}

impl Source for ClientSource {
    type Watch = WatchStream;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.client().await?.range(req).await
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<WatchStream, Error> {
        self.client().await?.watch(req).await
    }
}

impl WatchHandle for WatchStream {
    async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        WatchStream::message(self).await
    }

    async fn request_progress(&mut self) -> Result<(), Error> {
        WatchStream::request_progress(self).await
    }

    fn endpoint(&self) -> String {
        WatchStream::endpoint(self).to_string()
    }

    async fn probe(&mut self, req: RangeRequest) -> Result<(), Error> {
        WatchStream::probe(self, req).await.map(drop)
    }
}
