//! Retries: the policy, and the engine that runs one call across endpoints with
//! failover, backoff between rounds, and one re-authentication on a rejected token.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::Auth;
use super::backoff::Backoff;
use super::endpoints::{Endpoint, EndpointSet};
use super::error::{ConfigError, EndpointFailure, Error};
use super::failure::{Failure, classify, connection_error};

/// How idempotent requests are retried.
///
/// An attempt that fails with a transport error, a timeout or `Unavailable` is
/// retried at once on another healthy endpoint not yet tried; when every candidate
/// has been tried, the client sleeps for the next backoff delay and starts a new round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay between rounds: exponential from `base`, capped at `max`, with jitter.
    pub backoff: Backoff,
    /// Total attempts, across endpoints and rounds, before giving up.
    pub max_attempts: u32,
    /// Total time budget for one call, including backoff sleeps; no new attempt or
    /// sleep starts past it.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Duration::from_secs(2),
            },
            max_attempts: 20,
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.backoff.validate("retry.backoff")?;
        if self.max_attempts == 0 {
            return Err(ConfigError::NoAttempts);
        }
        Ok(())
    }
}

/// Whether a failed attempt may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Safe to replay (reads, revoke, ...).
    Idempotent,
    /// Replayed only if it provably never left the client.
    Once,
}

/// What the retry engine needs from a client.
pub(crate) struct Retrier<'a> {
    pub endpoints: &'a EndpointSet,
    pub auth: &'a Auth,
    pub policy: &'a RetryPolicy,
    /// The limit on each attempt.
    pub timeout: Duration,
}

impl Retrier<'_> {
    /// Runs one unary call with failover and retries (see [`Retry`]). `call` gets
    /// the endpoint picked for each attempt; a caller that needs to know which one
    /// answered (a stream's owner) returns it in its reply.
    pub(crate) async fn execute<Req, Resp, F, Fut>(
        &self,
        op: &'static str,
        retry: Retry,
        req: Req,
        call: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Arc<Endpoint>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let Retrier {
            endpoints,
            auth,
            policy,
            timeout,
        } = *self;
        let all = endpoints.all();
        let started = Instant::now();
        let mut tried = vec![false; all.len()];
        // The latest transport failure per endpoint, for AllEndpointsUnreachable.
        let mut unreachable: Vec<Option<String>> = vec![None; all.len()];
        let mut last_err: Option<Error> = None;
        let mut attempts = 0u32;
        let mut round = 0u32;
        let mut reauthenticated = false;

        loop {
            let Some(i) = endpoints.pick(&tried) else {
                let delay = policy.backoff.delay(round, &mut rand::rng());
                round += 1;
                if started.elapsed() + delay > policy.max_elapsed {
                    return Err(give_up(all.iter().map(|e| &*e.name), unreachable, last_err));
                }
                tokio::time::sleep(delay).await;
                tried.fill(false);
                continue;
            };
            tried[i] = true;
            attempts += 1;
            let ep = &all[i];
            let token = auth.token();
            let mut request = tonic::Request::new(req.clone());
            auth.apply(&mut request)?;

            let outcome = tokio::time::timeout(timeout, call(Arc::clone(ep), request)).await;
            let (err, transport_reason, replayable) = match outcome {
                Ok(Ok(resp)) => {
                    ep.mark_success();
                    return Ok(resp.into_inner());
                }
                Err(_) => {
                    let reason = format!("timed out after {timeout:?}");
                    let err = Error::Timeout {
                        endpoint: ep.name.clone(),
                        after: timeout,
                    };
                    (err, Some(reason), retry == Retry::Idempotent)
                }
                Ok(Err(status)) => match classify(status, &ep.name) {
                    Failure::Transport {
                        reason,
                        maybe_sent,
                        status,
                    } => {
                        let err = connection_error(&ep.name, reason.clone(), status);
                        (err, Some(reason), retry == Retry::Idempotent || !maybe_sent)
                    }
                    Failure::Unavailable(err) => {
                        ep.mark_failure(&err.to_string());
                        (err, None, retry == Retry::Idempotent)
                    }
                    Failure::InvalidToken(err) => {
                        if reauthenticated || !auth.enabled() {
                            return Err(err);
                        }
                        // The server rejected the request before running it, so a
                        // replay is safe whatever the request is.
                        reauthenticated = true;
                        auth.refresh(ep, token.as_ref(), timeout).await?;
                        tried[i] = false;
                        continue;
                    }
                    Failure::Fatal(err) => return Err(err),
                },
            };
            if let Some(reason) = transport_reason {
                ep.mark_failure(&reason);
                unreachable[i] = Some(reason);
            }
            tracing::debug!(op, endpoint = %ep.name, attempt = attempts, error = %err, "attempt failed");
            if !replayable {
                return Err(err);
            }
            last_err = Some(err);
            if attempts >= policy.max_attempts || started.elapsed() >= policy.max_elapsed {
                return Err(give_up(all.iter().map(|e| &*e.name), unreachable, last_err));
            }
        }
    }
}

/// The error for a call that ran out of attempts: every endpoint's transport failure
/// when none could be reached, otherwise the last error.
fn give_up<'a>(
    names: impl Iterator<Item = &'a str>,
    unreachable: Vec<Option<String>>,
    last: Option<Error>,
) -> Error {
    let last_was_transport = matches!(
        last,
        None | Some(Error::Connection { .. } | Error::Timeout { .. })
    );
    // `Some` only when every endpoint failed at the transport level.
    let reasons: Option<Vec<String>> = unreachable.into_iter().collect();
    match (last, reasons) {
        (_, Some(reasons)) if last_was_transport => {
            let failures = names
                .zip(reasons)
                .map(|(endpoint, reason)| EndpointFailure {
                    endpoint: endpoint.to_string(),
                    reason,
                })
                .collect();
            Error::AllEndpointsUnreachable(failures)
        }
        (Some(last), _) => last,
        (None, _) => Error::AllEndpointsUnreachable(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_above_the_ceiling_is_invalid() {
        let p = RetryPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Backoff::MAX_DELAY + Duration::from_secs(1),
            },
            ..RetryPolicy::default()
        };
        let err = p.validate().unwrap_err();
        assert!(matches!(err, ConfigError::BackoffTooLong { .. }), "{err}");
        assert!(err.to_string().contains("retry.backoff"), "{err}");
        let ok = RetryPolicy {
            backoff: Backoff {
                base: Duration::from_millis(50),
                max: Backoff::MAX_DELAY,
            },
            ..RetryPolicy::default()
        };
        ok.validate().unwrap();
    }

    fn timeout(endpoint: &str) -> Error {
        Error::Timeout {
            endpoint: endpoint.into(),
            after: Duration::from_secs(1),
        }
    }

    #[test]
    fn giving_up_lists_every_endpoint_when_none_could_be_reached() {
        let reasons = vec![Some("connection refused".into()), Some("timed out".into())];
        let err = give_up(["a:1", "b:2"].into_iter(), reasons, Some(timeout("b:2")));
        assert_eq!(
            err.to_string(),
            "all 2 endpoints unreachable: a:1 (connection refused), b:2 (timed out)"
        );
    }

    #[test]
    fn giving_up_returns_the_last_error_otherwise() {
        // One endpoint answered (e.g. "no leader"): no transport reason for it.
        let reasons = vec![Some("connection refused".into()), None];
        let err = give_up(["a:1", "b:2"].into_iter(), reasons, Some(timeout("a:1")));
        assert!(err.is_timeout(), "{err}");

        // Every endpoint failed at the transport level, but the last answer was the
        // server's: that answer says more.
        let reasons = vec![Some("connection refused".into())];
        let unavailable =
            Error::from_server_status(&tonic::Status::unavailable("etcdserver: no leader"), "a:1");
        let err = give_up(["a:1"].into_iter(), reasons, Some(unavailable));
        assert_eq!(err.grpc_code(), Some(tonic::Code::Unavailable), "{err}");
    }

    #[test]
    fn zero_attempts_is_invalid() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(matches!(p.validate(), Err(ConfigError::NoAttempts)));
    }
}
