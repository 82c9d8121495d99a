//! Client configuration and its validation.

use std::time::Duration;

use super::auth::Credentials;
use super::backoff::Backoff;
use super::endpoint_url::parse_endpoint;
use super::error::{ConfigError, Error};
use super::retry::RetryPolicy;
use super::tls::TlsConfig;

/// etcd kills connections that ping more often than its `--grpc-keepalive-min-time`
/// (5 s by default), so shorter intervals are rejected.
pub const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The longest timeout or keepalive setting accepted. Far longer than any useful
/// value, and short enough that deadlines computed from it (`Instant + d`) cannot
/// overflow.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Settings for [`Client::connect`](super::Client::connect).
///
/// Start from [`ClientConfig::new`] and adjust it with the `with_*` setters (or the
/// public fields); [`ClientConfig::validate`] is called by `connect`. New fields may
/// be added in any release, so the struct cannot be built with a literal.
#[derive(Debug, Clone)]
#[non_exhaustive]
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

    /// Sets [`endpoints`](Self::endpoints).
    pub fn with_endpoints<I, S>(mut self, endpoints: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints = endpoints.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`connect_timeout`](Self::connect_timeout).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`request_timeout`](Self::request_timeout).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`keepalive_interval`](Self::keepalive_interval).
    pub fn with_keepalive_interval(mut self, interval: Duration) -> Self {
        self.keepalive_interval = interval;
        self
    }

    /// Sets [`keepalive_timeout`](Self::keepalive_timeout).
    pub fn with_keepalive_timeout(mut self, timeout: Duration) -> Self {
        self.keepalive_timeout = timeout;
        self
    }

    /// Sets [`retry`](Self::retry).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets [`probe_backoff`](Self::probe_backoff).
    pub fn with_probe_backoff(mut self, backoff: Backoff) -> Self {
        self.probe_backoff = backoff;
        self
    }

    /// Checks the settings that can be checked without touching the network or disk.
    pub fn validate(&self) -> Result<(), Error> {
        self.check().map_err(Error::InvalidConfig)
    }

    fn check(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        // Parse every endpoint now, so a bad URL fails here and never reaches a
        // retry loop (a lazily connecting mirror would retry it forever).
        let mut names = std::collections::HashSet::new();
        for raw in &self.endpoints {
            let parsed = parse_endpoint(raw, self.tls.is_some())?;
            if !names.insert(parsed.name.clone()) {
                return Err(ConfigError::DuplicateEndpoint(parsed.name));
            }
        }
        if self.keepalive_interval < MIN_KEEPALIVE_INTERVAL {
            return Err(ConfigError::KeepaliveTooFrequent {
                interval: self.keepalive_interval,
                min: MIN_KEEPALIVE_INTERVAL,
            });
        }
        for (setting, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::NotPositive { setting });
            }
        }
        for (setting, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("keepalive_interval", self.keepalive_interval),
            ("keepalive_timeout", self.keepalive_timeout),
        ] {
            if value > MAX_TIMEOUT {
                return Err(ConfigError::TooLong {
                    setting,
                    value,
                    max: MAX_TIMEOUT,
                });
            }
        }
        self.retry.validate()?;
        self.probe_backoff.validate("probe_backoff")?;
        if let Some(c) = &self.credentials
            && c.user.is_empty()
        {
            return Err(ConfigError::EmptyUser);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keepalive_is_rejected() {
        let cfg =
            ClientConfig::new(["127.0.0.1:2379"]).with_keepalive_interval(Duration::from_secs(1));
        let err = cfg.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidConfig(ConfigError::KeepaliveTooFrequent { .. })
            ),
            "{err}"
        );
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
        assert!(matches!(
            cfg.validate(),
            Err(Error::InvalidConfig(ConfigError::NoEndpoints))
        ));
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
            assert!(
                matches!(err, Error::InvalidConfig(ConfigError::TooLong { setting, .. }) if setting == field),
                "{field}: {err}"
            );
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn bad_and_duplicate_endpoints_are_rejected() {
        let err = ClientConfig::new(["ftp://a:1"]).validate().unwrap_err();
        assert!(
            matches!(&err, Error::InvalidConfig(ConfigError::Endpoint(e)) if e.raw == "ftp://a:1"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "invalid client configuration: invalid endpoint \"ftp://a:1\": scheme must be http or https"
        );
        let err = ClientConfig::new(["a:1", "http://a:1"])
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid client configuration: duplicate endpoint a:1"
        );
    }

    #[test]
    fn setters_set_their_fields() {
        let retry = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        let backoff = Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let cfg = ClientConfig::new(["a:1"])
            .with_endpoints(["b:2", "c:3"])
            .with_connect_timeout(Duration::from_secs(1))
            .with_request_timeout(Duration::from_secs(2))
            .with_keepalive_interval(Duration::from_secs(30))
            .with_keepalive_timeout(Duration::from_secs(4))
            .with_retry(retry)
            .with_probe_backoff(backoff);
        assert_eq!(cfg.endpoints, ["b:2", "c:3"]);
        assert_eq!(cfg.connect_timeout, Duration::from_secs(1));
        assert_eq!(cfg.request_timeout, Duration::from_secs(2));
        assert_eq!(cfg.keepalive_interval, Duration::from_secs(30));
        assert_eq!(cfg.keepalive_timeout, Duration::from_secs(4));
        assert_eq!(cfg.retry, retry);
        assert_eq!(cfg.probe_backoff, backoff);
        cfg.validate().unwrap();
    }

    #[test]
    fn password_is_not_printed() {
        let cfg = ClientConfig::new(["a:1"]).with_credentials("root", "hunter2");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
