//! Client configuration and its validation.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::Error;
use super::retry::RetryPolicy;

/// etcd kills connections that ping more often than its `--grpc-keepalive-min-time`
/// (5 s by default), so shorter intervals are rejected.
pub const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The longest timeout or keepalive setting accepted. Far longer than any useful
/// value, and short enough that deadlines computed from it (`Instant + d`) cannot
/// overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Settings for [`Client::connect`](super::Client::connect).
///
/// Start from [`ClientConfig::new`] and adjust fields; [`ClientConfig::validate`] is
/// called by `connect`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// etcd client URLs: `http://host:port`, `https://host:port`, or bare `host:port`
    /// (which uses `https` when [`tls`](Self::tls) is set).
    pub endpoints: Vec<String>,
    /// Limit on establishing a TCP (and TLS) connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Limit on each attempt of a unary request, and on opening a watch. Default 10 s.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive ping interval while streams are open. Default 10 s; at least 5 s.
    pub keepalive_interval: Duration,
    /// How long to wait for a ping reply before the connection is declared dead. Default 10 s.
    pub keepalive_timeout: Duration,
    /// TLS settings; `None` for plaintext.
    pub tls: Option<TlsConfig>,
    /// Username and password for etcd authentication; `None` when auth is off.
    pub credentials: Option<Credentials>,
    /// Retry policy for idempotent requests.
    pub retry: RetryPolicy,
    /// Backoff between health probes of an endpoint that left the rotation.
    pub probe_backoff: Backoff,
}

impl ClientConfig {
    /// A configuration with defaults for the given endpoints.
    pub fn new<I, S>(endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..ClientConfig::default()
        }
    }

    /// Sets [`tls`](Self::tls).
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`credentials`](Self::credentials).
    pub fn with_credentials(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some(Credentials {
            user: user.into(),
            password: password.into(),
        });
        self
    }

    /// Checks the settings that can be checked without touching the network or disk.
    pub fn validate(&self) -> Result<(), Error> {
        if self.endpoints.is_empty() {
            return Err(Error::InvalidConfig("no endpoints given".into()));
        }
        // Parse every endpoint now, so a bad URL fails here and never reaches a
        // retry loop (a lazily connecting mirror would retry it forever).
        let mut names = std::collections::HashSet::new();
        for raw in &self.endpoints {
            let parsed = super::endpoints::parse_endpoint(raw, self.tls.is_some())?;
            if !names.insert(parsed.name.clone()) {
                return Err(Error::InvalidConfig(format!(
                    "duplicate endpoint {}",
                    parsed.name
                )));
            }
        }
        if self.keepalive_interval < MIN_KEEPALIVE_INTERVAL {
            return Err(Error::InvalidConfig(format!(
                "keepalive_interval {:?} is below {:?}: etcd closes connections that ping this often",
                self.keepalive_interval, MIN_KEEPALIVE_INTERVAL
            )));
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::InvalidConfig(format!("{name} must be positive")));
            }
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d > MAX_TIMEOUT {
                return Err(Error::InvalidConfig(format!(
                    "{name} {d:?} is above the maximum of {MAX_TIMEOUT:?}"
                )));
            }
        }
        self.retry.validate()?;
        self.probe_backoff.validate("probe_backoff")?;
        if let Some(c) = &self.credentials
            && c.user.is_empty()
        {
            return Err(Error::InvalidConfig(
                "credentials have an empty user name".into(),
            ));
        }
        Ok(())
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(10),
            tls: None,
            credentials: None,
            retry: RetryPolicy::default(),
            probe_backoff: Backoff {
                base: Duration::from_millis(300),
                max: Duration::from_secs(10),
            },
        }
    }
}

/// Exponential backoff bounds; each delay gets up to 50% random jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub base: Duration,
    /// The cap on any delay.
    pub max: Duration,
}

impl Backoff {
    /// The largest accepted [`max`](Self::max): one hour. Longer pauses are never
    /// useful, and the bound keeps `Instant::now() + delay` far from overflowing.
    pub const MAX_DELAY: Duration = Duration::from_secs(3600);

    pub(crate) fn validate(&self, name: &str) -> Result<(), Error> {
        if self.base.is_zero() || self.max < self.base {
            return Err(Error::InvalidConfig(format!(
                "{name}: need 0 < base <= max, got base {:?}, max {:?}",
                self.base, self.max
            )));
        }
        if self.max > Self::MAX_DELAY {
            return Err(Error::InvalidConfig(format!(
                "{name}: max {:?} is above the limit of {:?}",
                self.max,
                Self::MAX_DELAY
            )));
        }
        Ok(())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keepalive_is_rejected() {
        let mut cfg = ClientConfig::new(["127.0.0.1:2379"]);
        cfg.keepalive_interval = Duration::from_secs(1);
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)));
        assert!(err.to_string().contains("keepalive_interval"), "{err}");
    }

    #[test]
    fn defaults_are_valid_and_keepalive_is_on() {
        let cfg = ClientConfig::new(["127.0.0.1:2379"]);
        cfg.validate().unwrap();
        assert!(cfg.keepalive_interval >= Duration::from_secs(10));
    }

    #[test]
    fn empty_endpoints_are_rejected() {
        let cfg = ClientConfig::new(Vec::<String>::new());
        assert!(matches!(cfg.validate(), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn backoff_max_has_a_ceiling() {
        let mut cfg = ClientConfig::new(["127.0.0.1:2379"]);
        cfg.probe_backoff.max = Backoff::MAX_DELAY;
        cfg.validate().unwrap();
        cfg.probe_backoff.max = Backoff::MAX_DELAY + Duration::from_nanos(1);
        let err = cfg.validate().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
        assert!(err.to_string().contains("probe_backoff"), "{err}");
        assert!(err.to_string().contains("above the limit"), "{err}");

        let mut cfg = ClientConfig::new(["127.0.0.1:2379"]);
        cfg.retry.backoff.max = Duration::MAX;
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("retry.backoff"), "{err}");
    }

    #[test]
    fn huge_timeouts_are_rejected() {
        type Setter = fn(&mut ClientConfig, Duration);
        let fields: [(&str, Setter); 4] = [
            ("connect_timeout", |c, d| c.connect_timeout = d),
            ("request_timeout", |c, d| c.request_timeout = d),
            ("keepalive_interval", |c, d| c.keepalive_interval = d),
            ("keepalive_timeout", |c, d| c.keepalive_timeout = d),
        ];
        for (field, set) in fields {
            let mut cfg = ClientConfig::new(["127.0.0.1:2379"]);
            set(&mut cfg, MAX_TIMEOUT);
            cfg.validate().unwrap();
            set(&mut cfg, Duration::MAX);
            let err = cfg.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidConfig(_)), "{field}: {err}");
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn password_is_not_printed() {
        let cfg = ClientConfig::new(["a:1"]).with_credentials("root", "hunter2");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
