//! TLS settings, and loading them (rustls via tonic).
//!
//! Files are read and parsed up front so that a missing or garbage file is reported
//! as such at connect time, not as an obscure handshake failure later.
//!
//! A leaf: nothing else of the client is imported here.

use std::fmt;
use std::path::PathBuf;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// PEM data, given inline or as a file to read at connect time.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    /// A file holding PEM text.
    Path(PathBuf),
    /// PEM text.
    Bytes(Vec<u8>),
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::Path(p) => f.debug_tuple("Path").field(p).finish(),
            // Key material stays out of logs.
            Pem::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
        }
    }
}

/// TLS settings: the CA that signed the servers' certificates, and optionally a
/// client certificate and key for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificate(s) trusted to sign the etcd server certificates.
    pub ca: Pem,
    /// Client certificate chain and private key, for servers that require client certs.
    pub identity: Option<(Pem, Pem)>,
    /// Name to verify the server certificate against; defaults to the endpoint host.
    pub domain_name: Option<String>,
}

impl TlsConfig {
    /// Server verification only, with the CA read from `ca_path`.
    pub fn with_ca_file(ca_path: impl Into<PathBuf>) -> Self {
        TlsConfig {
            ca: Pem::Path(ca_path.into()),
            identity: None,
            domain_name: None,
        }
    }

    /// Mutual TLS with all three PEM files.
    pub fn from_files(
        ca_path: impl Into<PathBuf>,
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Self {
        TlsConfig {
            ca: Pem::Path(ca_path.into()),
            identity: Some((Pem::Path(cert_path.into()), Pem::Path(key_path.into()))),
            domain_name: None,
        }
    }
}

/// Why the TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {pem}: {source}")]
    Read {
        /// Which input.
        pem: PemOrigin,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate does not parse.
    #[error("{pem}: invalid PEM ({source})")]
    InvalidCertificate {
        /// Which input.
        pem: PemOrigin,
        /// The parse error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The input holds no certificate at all.
    #[error("{pem}: no PEM certificate found")]
    NoCertificate {
        /// Which input.
        pem: PemOrigin,
    },
    /// The input holds no private key that can be used.
    #[error("{pem}: no usable private key ({source})")]
    NoPrivateKey {
        /// Which input.
        pem: PemOrigin,
        /// The parse error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The transport refused the TLS settings for an endpoint.
    #[error("{endpoint}: {}", error_chain(source))]
    Rejected {
        /// The endpoint as `host:port`.
        endpoint: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Which PEM input an error is about; shown as e.g. `CA certificate file ca.pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemOrigin {
    /// Its role.
    pub role: PemRole,
    /// The file it was read from; `None` for inline PEM.
    pub path: Option<PathBuf>,
}

impl PemOrigin {
    fn of(src: &Pem, role: PemRole) -> Self {
        PemOrigin {
            role,
            path: match src {
                Pem::Path(p) => Some(p.clone()),
                Pem::Bytes(_) => None,
            },
        }
    }
}

impl fmt::Display for PemOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{} file {}", self.role, p.display()),
            None => write!(f, "{} (inline PEM)", self.role),
        }
    }
}

/// The role of a PEM input in [`TlsConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PemRole {
    /// [`TlsConfig::ca`].
    Ca,
    /// The certificate of [`TlsConfig::identity`].
    ClientCertificate,
    /// The key of [`TlsConfig::identity`].
    ClientKey,
}

impl fmt::Display for PemRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PemRole::Ca => "CA certificate",
            PemRole::ClientCertificate => "client certificate",
            PemRole::ClientKey => "client key",
        })
    }
}

/// Builds tonic's TLS settings from ours.
pub(crate) fn load(cfg: &TlsConfig) -> Result<ClientTlsConfig, TlsError> {
    let ca = read_certs(&cfg.ca, PemRole::Ca)?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert_src, key_src)) = &cfg.identity {
        let cert = read_certs(cert_src, PemRole::ClientCertificate)?;
        let key = read(key_src, PemRole::ClientKey)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|source| TlsError::NoPrivateKey {
            pem: PemOrigin::of(key_src, PemRole::ClientKey),
            source,
        })?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &cfg.domain_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// Applies TLS settings to one endpoint's channel settings.
pub(crate) fn apply(
    endpoint: tonic::transport::Endpoint,
    tls: &ClientTlsConfig,
    name: &str,
) -> Result<tonic::transport::Endpoint, TlsError> {
    endpoint
        .tls_config(tls.clone())
        .map_err(|source| TlsError::Rejected {
            endpoint: name.to_string(),
            source,
        })
}

fn read(src: &Pem, role: PemRole) -> Result<Vec<u8>, TlsError> {
    match src {
        Pem::Bytes(b) => Ok(b.clone()),
        Pem::Path(p) => std::fs::read(p).map_err(|source| TlsError::Read {
            pem: PemOrigin::of(src, role),
            source,
        }),
    }
}

/// Reads PEM text that must hold at least one certificate, all of them valid.
fn read_certs(src: &Pem, role: PemRole) -> Result<Vec<u8>, TlsError> {
    let pem = read(src, role)?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|source| TlsError::InvalidCertificate {
            pem: PemOrigin::of(src, role),
            source,
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(TlsError::NoCertificate {
            pem: PemOrigin::of(src, role),
        });
    }
    Ok(pem)
}

/// Formats an error with its sources: `a: b: c`. tonic's own message alone rarely
/// says what was wrong.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_named_and_keeps_the_io_error() {
        let cfg = TlsConfig::with_ca_file("/nonexistent/ca.pem");
        let err = load(&cfg).unwrap_err();
        assert!(matches!(&err, TlsError::Read { pem, source }
            if pem.role == PemRole::Ca && source.kind() == std::io::ErrorKind::NotFound));
        assert!(
            err.to_string()
                .starts_with("cannot read CA certificate file /nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn garbage_pem_is_rejected() {
        let cfg = TlsConfig {
            ca: Pem::Bytes(b"this is not a certificate".to_vec()),
            identity: None,
            domain_name: None,
        };
        let err = load(&cfg).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "CA certificate (inline PEM): no PEM certificate found"
        );
    }
}
