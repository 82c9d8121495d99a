//! Loading TLS material (rustls via tonic).
//!
//! Files are read and parsed up front so that a missing or garbage file is reported
//! as such at connect time, not as an obscure handshake failure later.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::config::{Pem, TlsConfig};
use super::error::Error;

/// Builds tonic's TLS settings from ours.
pub(crate) fn load(cfg: &TlsConfig) -> Result<ClientTlsConfig, Error> {
    let ca = read(&cfg.ca, "CA certificate")?;
    check_certs(&ca, &cfg.ca, "CA certificate")?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert_src, key_src)) = &cfg.identity {
        let cert = read(cert_src, "client certificate")?;
        check_certs(&cert, cert_src, "client certificate")?;
        let key = read(key_src, "client key")?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
            Error::Tls(format!(
                "{}: no usable private key ({e})",
                describe(key_src, "client key")
            ))
        })?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &cfg.domain_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
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

fn check_certs(pem: &[u8], src: &Pem, what: &str) -> Result<(), Error> {
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| Error::Tls(format!("{}: invalid PEM ({e})", describe(src, what))))?;
        count += 1;
    }
    if count == 0 {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate found",
            describe(src, what)
        )));
    }
    Ok(())
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
