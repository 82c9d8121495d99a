//! Retry policy, backoff with jitter, and the classification of failed attempts.

use std::error::Error as StdError;
use std::time::Duration;

use rand::Rng;

use super::config::Backoff;
use super::error::Error;

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
    pub(crate) fn validate(&self) -> Result<(), Error> {
        self.backoff.validate("retry.backoff")?;
        if self.max_attempts == 0 {
            return Err(Error::InvalidConfig(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

impl Backoff {
    /// The delay before retry number `round` (0-based): `min(max, base * 2^round)`,
    /// then scaled by a random factor in `[0.5, 1.0]` so that clients that failed
    /// together do not retry together.
    ///
    /// Never panics, whatever the bounds: a delay that does not fit a `Duration`
    /// after jitter is the ceiling itself. (Validated configurations keep `max` at
    /// or below [`Backoff::MAX_DELAY`].)
    pub fn delay(&self, round: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(round);
        let factor: f64 = rng.random_range(0.5..=1.0);
        // `Duration::mul_f64` panics when rounding pushes the result past
        // `Duration::MAX`; the fallible conversion does not.
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * factor)
            .map_or(ceiling, |d| d.min(ceiling))
    }

    /// The delay before jitter.
    fn ceiling(&self, round: u32) -> Duration {
        let factor = 2u32.saturating_pow(round.min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// What a failed attempt means for the endpoint and for retrying.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The connection failed or broke: the endpoint is suspect. `maybe_sent` is false
    /// only when the request provably never left the client (connect failed).
    Transport { reason: String, maybe_sent: bool },
    /// The server answered `Unavailable` (no leader, leader changed, stopping, ...).
    Unavailable(Error),
    /// The server rejected our auth token; re-authenticate and try again.
    InvalidToken(Error),
    /// A definitive answer: return it.
    Fatal(Error),
}

/// Classifies a failed call. Statuses created by the client library carry a source
/// error (transport, h2, connect); statuses sent by the server do not.
pub(crate) fn classify(status: &tonic::Status, endpoint: &str) -> Failure {
    // The generated stubs turn a failed readiness check into a source-less Unknown.
    let not_ready = status.message().starts_with("Service was not ready");
    if status.source().is_some() || not_ready {
        let maybe_sent = !not_ready && !source_chain_has::<tonic::ConnectError>(status);
        return Failure::Transport {
            reason: short_reason(status),
            maybe_sent,
        };
    }
    match status.code() {
        tonic::Code::Unavailable => {
            Failure::Unavailable(Error::from_server_status(status, endpoint))
        }
        tonic::Code::Unauthenticated if status.message().contains("invalid auth token") => {
            Failure::InvalidToken(Error::from_server_status(status, endpoint))
        }
        _ => Failure::Fatal(Error::from_server_status(status, endpoint)),
    }
}

fn source_chain_has<E: StdError + 'static>(status: &tonic::Status) -> bool {
    let mut cur = status.source();
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// A short reason for an endpoint failure: the innermost I/O error when there is
/// one ("connection refused"), else the deepest error message in the chain.
pub(crate) fn short_reason(status: &tonic::Status) -> String {
    let mut deepest = status.message().to_string();
    let mut cur = status.source();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // The connect timeout surfaces as a TimedOut wrapping tokio's "deadline
            // has elapsed", which does not say what timed out.
            if io.kind() == std::io::ErrorKind::TimedOut {
                let what = if source_chain_has::<tonic::ConnectError>(status) {
                    "connect timed out"
                } else {
                    "timed out"
                };
                return what.to_string();
            }
            // OS errors read best as their kind ("connection refused"); wrapped
            // errors (e.g. rustls's "invalid peer certificate") by their message.
            return match io.get_ref() {
                Some(inner) => inner.to_string(),
                None => io.kind().to_string(),
            };
        }
        deepest = e.to_string();
        cur = e.source();
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        }
    }

    #[test]
    fn backoff_grows_exponentially_then_caps() {
        let b = backoff();
        let ceilings: Vec<_> = (0..8).map(|r| b.ceiling(r).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        // Huge round numbers must not overflow.
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_half_to_full_ceiling_and_varies() {
        let b = backoff();
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..10 {
            let ceiling = b.ceiling(round);
            let delays: Vec<_> = (0..200).map(|_| b.delay(round, &mut rng)).collect();
            for d in &delays {
                assert!(*d >= ceiling / 2 && *d <= ceiling, "round {round}: {d:?}");
            }
            let distinct: std::collections::HashSet<_> = delays.iter().collect();
            assert!(
                distinct.len() > 50,
                "jitter should spread delays, got {}",
                distinct.len()
            );
        }
    }

    #[test]
    fn huge_backoff_bounds_do_not_panic() {
        let b = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        let mut rng = StdRng::seed_from_u64(1);
        for round in [0, 1, 31, u32::MAX] {
            for _ in 0..100 {
                let d = b.delay(round, &mut rng);
                assert!(d >= Duration::MAX / 2, "{d:?}");
            }
        }
    }

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
        assert!(matches!(err, Error::InvalidConfig(_)), "{err}");
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

    #[test]
    fn server_statuses_are_classified() {
        let s = tonic::Status::unavailable("etcdserver: no leader");
        assert!(matches!(classify(&s, "e:1"), Failure::Unavailable(_)));
        let s = tonic::Status::unauthenticated("etcdserver: invalid auth token");
        assert!(matches!(classify(&s, "e:1"), Failure::InvalidToken(_)));
        let s = tonic::Status::invalid_argument("etcdserver: key is not provided");
        assert!(matches!(
            classify(&s, "e:1"),
            Failure::Fatal(Error::Grpc { .. })
        ));
    }

    #[test]
    fn not_ready_counts_as_not_sent() {
        let s = tonic::Status::unknown("Service was not ready: transport error");
        assert!(matches!(
            classify(&s, "e:1"),
            Failure::Transport {
                maybe_sent: false,
                ..
            }
        ));
    }

    #[test]
    fn connect_failures_are_known_unsent() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let s = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        match classify(&s, "e:1") {
            Failure::Transport { reason, maybe_sent } => {
                assert_eq!(reason, "connection refused");
                assert!(!maybe_sent);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_timeouts_say_so() {
        // What hyper-util's connector returns when its connect timeout fires.
        let elapsed = std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline has elapsed");
        let s = tonic::Status::from_error(Box::new(tonic::ConnectError(Box::new(elapsed))));
        match classify(&s, "e:1") {
            Failure::Transport { reason, maybe_sent } => {
                assert_eq!(reason, "connect timed out");
                assert!(!maybe_sent);
            }
            other => panic!("{other:?}"),
        }
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let s = tonic::Status::from_error(Box::new(timed_out));
        assert_eq!(short_reason(&s), "timed out");
    }

    #[test]
    fn broken_connections_may_have_sent_the_request() {
        let broken = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        let s = tonic::Status::from_error(Box::new(broken));
        assert!(matches!(
            classify(&s, "e:1"),
            Failure::Transport {
                maybe_sent: true,
                ..
            }
        ));
    }

    #[test]
    fn zero_attempts_is_invalid() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(p.validate().is_err());
    }
}
