//! Loading TLS material into a rustls client configuration.
//!
//! Files are read and parsed up front so that a missing or garbage file is reported
//! as such at connect time, not as an obscure handshake failure later.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::config::{Pem, TlsConfig};
use super::error::Error;
use super::transport;

/// TLS settings shared by every endpoint of a client.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    config: Arc<rustls::ClientConfig>,
    /// The name certificates are checked against, when not the endpoint's host.
    domain_name: Option<String>,
}

impl Loaded {
    /// TLS towards the endpoint at `host`.
    pub(crate) fn for_host(&self, host: &str) -> Result<transport::Tls, Error> {
        let name = self.domain_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| Error::Tls(format!("invalid TLS server name {name:?}: {e}")))?;
        Ok(transport::Tls {
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
            server_name,
        })
    }
}

/// Reads and checks the files of `cfg`.
pub(crate) fn load(cfg: &TlsConfig) -> Result<Loaded, Error> {
    let ca = read(&cfg.ca, "CA certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(&ca, &cfg.ca, "CA certificate")? {
        roots.add(cert).map_err(|e| {
            Error::Tls(format!(
                "{}: unusable ({e})",
                describe(&cfg.ca, "CA certificate")
            ))
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let mut config = match &cfg.identity {
        None => builder.with_no_client_auth(),
        Some((cert_src, key_src)) => {
            let cert = read(cert_src, "client certificate")?;
            let chain = certs(&cert, cert_src, "client certificate")?;
            let key = read(key_src, "client key")?;
            let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
                Error::Tls(format!(
                    "{}: no usable private key ({e})",
                    describe(key_src, "client key")
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::Tls(format!(
                    "{} and {} do not make a usable identity ({e})",
                    describe(cert_src, "client certificate"),
                    describe(key_src, "client key")
                ))
            })?
        }
    };
    // gRPC runs on HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        config: Arc::new(config),
        domain_name: cfg.domain_name.clone(),
    })
}

fn describe(src: &Pem, what: &str) -> String {
    match src {
        Pem::Path(p) => format!("{what} file {}", p.display()),
        Pem::Bytes(_) => format!("{what} (inline PEM)"),
    }
}

fn read(src: &Pem, what: &str) -> Result<Vec<u8>, Error> {
    match src {
        Pem::Bytes(b) => Ok(b.clone()),
        Pem::Path(p) => std::fs::read(p)
            .map_err(|e| Error::Tls(format!("cannot read {}: {e}", describe(src, what)))),
    }
}

/// The certificates in `pem`; at least one.
fn certs(pem: &[u8], src: &Pem, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: invalid PEM ({e})", describe(src, what))))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate found",
            describe(src, what)
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_named() {
        let cfg = TlsConfig::with_ca_file("/nonexistent/ca.pem");
        let err = load(&cfg).unwrap_err();
        assert!(matches!(err, Error::Tls(_)));
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn garbage_pem_is_rejected() {
        let cfg = TlsConfig {
            ca: Pem::Bytes(b"this is not a certificate".to_vec()),
            identity: None,
            domain_name: None,
        };
        let err = load(&cfg).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
