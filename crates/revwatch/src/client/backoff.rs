//! Exponential backoff with jitter, shared by the retry loop, the health prober and
//! the lease keeper.

use std::time::Duration;

use rand::Rng;

use super::error::ConfigError;

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

    /// Checks the bounds; `setting` names them in the error (e.g. `probe_backoff`).
    pub(crate) fn validate(&self, setting: &'static str) -> Result<(), ConfigError> {
        if self.base.is_zero() || self.max < self.base {
            return Err(ConfigError::BackoffBounds {
                setting,
                base: self.base,
                max: self.max,
            });
        }
        if self.max > Self::MAX_DELAY {
            return Err(ConfigError::BackoffTooLong {
                setting,
                max: self.max,
                limit: Self::MAX_DELAY,
            });
        }
        Ok(())
    }

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
    fn bounds_are_checked() {
        let zero = Backoff {
            base: Duration::ZERO,
            max: Duration::from_secs(1),
        };
        let inverted = Backoff {
            base: Duration::from_secs(2),
            max: Duration::from_secs(1),
        };
        for b in [zero, inverted] {
            let err = b.validate("probe_backoff").unwrap_err();
            assert!(matches!(err, ConfigError::BackoffBounds { .. }), "{err}");
            assert!(err.to_string().starts_with("probe_backoff: "), "{err}");
        }
        let long = Backoff {
            base: Duration::from_millis(1),
            max: Backoff::MAX_DELAY + Duration::from_nanos(1),
        };
        let err = long.validate("retry.backoff").unwrap_err();
        assert!(matches!(err, ConfigError::BackoffTooLong { .. }), "{err}");
        assert!(err.to_string().contains("above the limit"), "{err}");
        backoff().validate("retry.backoff").unwrap();
    }
}
