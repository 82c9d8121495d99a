//! Throw-away TLS material for a TLS cluster: a CA, a server certificate and a
//! client certificate, as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::TestkitError;

/// Paths of the PEM files of a TLS cluster.
///
/// The server certificate is valid for `127.0.0.1` and `localhost`. On a
/// cluster with auth, etcd treats the client certificate's common name
/// (`revwatch-test-client`) as the user of token-less requests; no such user
/// exists, so those get PermissionDenied rather than root's rights.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate that signed both certificates.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// The client certificate's private key (PKCS#8).
    pub key: PathBuf,
    /// The server certificate etcd presents.
    pub server_cert: PathBuf,
    /// The server certificate's private key.
    pub server_key: PathBuf,
}

impl TlsFiles {
    /// Generates fresh material into `dir` (which must exist).
    pub(crate) fn generate(dir: &Path) -> Result<Self, TestkitError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "revwatch test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |cn: &str, sans: Vec<String>, ekus: Vec<ExtendedKeyUsagePurpose>| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = ekus;
            let cert = params.signed_by(&key, &issuer)?;
            Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
        };
        // etcd also uses the server certificate as a client (its gRPC
        // gateway dials itself), so it needs both purposes.
        let (server_pem, server_key_pem) = leaf(
            "revwatch test server",
            vec!["127.0.0.1".into(), "localhost".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (client_pem, client_key_pem) = leaf(
            "revwatch-test-client",
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )?;

        let files = Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("client.pem"),
            key: dir.join("client-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        };
        for (path, pem) in [
            (&files.ca, ca_cert.pem()),
            (&files.cert, client_pem),
            (&files.key, client_key_pem),
            (&files.server_cert, server_pem),
            (&files.server_key, server_key_pem),
        ] {
            std::fs::write(path, pem)
                .map_err(|e| TestkitError::io(format!("writing {}", path.display()), e))?;
        }
        Ok(files)
    }

    /// A tonic client TLS configuration that trusts the CA and presents the
    /// client certificate.
    pub fn client_tls_config(&self) -> Result<ClientTlsConfig, TestkitError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| TestkitError::io(format!("reading {}", p.display()), e))
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }
}
