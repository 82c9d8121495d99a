//! Endpoint URLs: `http://host:port`, `https://host:port` or bare `host:port`.
//!
//! A leaf: nothing else of the client is imported here, so configuration checks and
//! channel building can both use it without depending on each other.

use std::fmt;
use std::sync::Arc;

/// etcd's default client port, used when an endpoint omits the port.
const DEFAULT_PORT: u16 = 2379;

/// A validated endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedEndpoint {
    /// `scheme://host:port`.
    pub uri: String,
    /// `host:port`, used in errors and health reports.
    pub name: String,
}

/// An endpoint that was rejected, e.g. `invalid endpoint "ftp://a": scheme must be http or https`.
#[derive(Debug, Clone)]
pub struct InvalidEndpoint {
    /// The endpoint as given.
    pub raw: String,
    /// What is wrong with it.
    pub problem: EndpointProblem,
}

impl fmt::Display for InvalidEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid endpoint {:?}: {}", self.raw, self.problem)
    }
}

// The problem is part of the message; the chain continues with its cause, if any.
impl std::error::Error for InvalidEndpoint {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.problem.source()
    }
}

/// What is wrong with an endpoint URL.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointProblem {
    /// It does not parse as a URI.
    #[error("{0}")]
    Unparsable(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// The scheme is neither `http` nor `https`.
    #[error("scheme must be http or https")]
    UnknownScheme,
    /// `https` without a TLS configuration.
    #[error("https endpoint but no TLS configuration given")]
    HttpsWithoutTls,
    /// `http` although TLS is configured.
    #[error("http endpoint but TLS is configured; use https://")]
    HttpWithTls,
    /// No host.
    #[error("missing host")]
    MissingHost,
    /// A path after the authority.
    #[error("must not have a path")]
    HasPath,
    /// `user@` before the host.
    #[error("must not contain user info")]
    HasUserInfo,
    /// The port is not a number from 1 to 65535.
    #[error("port must be a number from 1 to 65535")]
    BadPort,
}

/// Parses `http://h:p`, `https://h:p` or bare `h:p`. Bare endpoints use https when
/// TLS is configured. A scheme that contradicts the TLS setting is an error rather
/// than a silent downgrade or a handshake failure later.
pub(crate) fn parse_endpoint(raw: &str, tls: bool) -> Result<ParsedEndpoint, InvalidEndpoint> {
    let bad = |problem| InvalidEndpoint {
        raw: raw.to_string(),
        problem,
    };
    let trimmed = raw.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_string()
    } else {
        format!("{}://{trimmed}", if tls { "https" } else { "http" })
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(EndpointProblem::Unparsable(Arc::new(e))))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    match (scheme, tls) {
        ("http", false) | ("https", true) => {}
        ("https", false) => return Err(bad(EndpointProblem::HttpsWithoutTls)),
        ("http", true) => return Err(bad(EndpointProblem::HttpWithTls)),
        _ => return Err(bad(EndpointProblem::UnknownScheme)),
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad(EndpointProblem::MissingHost))?;
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad(EndpointProblem::HasPath));
    }
    // `http::Uri` accepts a non-numeric port, so check it here.
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    if authority.contains('@') {
        return Err(bad(EndpointProblem::HasUserInfo));
    }
    let port = match authority.rsplit_once(':') {
        Some((_, p)) if !authority.ends_with(']') => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(EndpointProblem::BadPort))?,
        _ => DEFAULT_PORT,
    };
    let name = format!("{host}:{port}");
    Ok(ParsedEndpoint {
        uri: format!("{scheme}://{name}"),
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_defaults() {
        let p = parse_endpoint("127.0.0.1:2379", false).unwrap();
        assert_eq!(p.uri, "http://127.0.0.1:2379");
        assert_eq!(p.name, "127.0.0.1:2379");
        let p = parse_endpoint("https://localhost", true).unwrap();
        assert_eq!(p.uri, "https://localhost:2379");
        let p = parse_endpoint("localhost:2400", true).unwrap();
        assert_eq!(p.uri, "https://localhost:2400");
        let p = parse_endpoint("http://[::1]:2400", false).unwrap();
        assert_eq!(p.name, "[::1]:2400");
        let p = parse_endpoint("http://[::1]", false).unwrap();
        assert_eq!(p.name, "[::1]:2379");
    }

    #[test]
    fn bad_endpoints_are_rejected_clearly() {
        // The expected problem, or `None` where the URI parser itself refuses.
        for (raw, tls, want) in [
            ("", false, None),
            ("http://", false, None),
            ("not a url at all", false, None),
            ("http://:2379", false, Some("missing host")),
            (
                "ftp://127.0.0.1:2379",
                false,
                Some("scheme must be http or https"),
            ),
            (
                "http://127.0.0.1:notaport",
                false,
                Some("port must be a number from 1 to 65535"),
            ),
            (
                "http://127.0.0.1:0",
                false,
                Some("port must be a number from 1 to 65535"),
            ),
            (
                "http://127.0.0.1:2379/v3",
                false,
                Some("must not have a path"),
            ),
            (
                "https://127.0.0.1:2379",
                false,
                Some("https endpoint but no TLS configuration given"),
            ),
            (
                "http://127.0.0.1:2379",
                true,
                Some("http endpoint but TLS is configured; use https://"),
            ),
            (
                "http://user@127.0.0.1:2379",
                false,
                Some("must not contain user info"),
            ),
        ] {
            let err = parse_endpoint(raw, tls).expect_err(raw);
            match want {
                Some(problem) => assert_eq!(err.problem.to_string(), problem, "{raw}"),
                None => assert!(
                    matches!(err.problem, EndpointProblem::Unparsable(_)),
                    "{raw}: {err}"
                ),
            }
            assert_eq!(err.raw, raw);
            assert!(
                err.to_string()
                    .starts_with(&format!("invalid endpoint {raw:?}: ")),
                "{raw}: {err}"
            );
        }
    }

    #[test]
    fn unparsable_endpoints_keep_the_parse_error() {
        let err = parse_endpoint("not a url at all", false).unwrap_err();
        let source = std::error::Error::source(&err).expect("a source");
        let expected = "not a url at all".parse::<http::Uri>().unwrap_err();
        assert_eq!(source.to_string(), expected.to_string());
        assert!(err.to_string().ends_with(&expected.to_string()), "{err}");
    }
}
