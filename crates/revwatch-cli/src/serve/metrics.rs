//! The sidecar's Prometheus metrics, next to the mirror's (`revwatch_mirror_*`) in
//! one registry.
//!
//! Decisions are counted and timed by the HTTP handlers; the policy set's loads and
//! state are read from [`PolicyStatus`] changes, so they count what the policy
//! crate reports, and each load's duration and key at fault from its
//! [`LoadReport`].

use std::sync::atomic::AtomicU64;
use std::time::{Duration, UNIX_EPOCH};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use revwatch_policy::{LoadOutcome, LoadReport, PolicyState, PolicyStatus};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KeyLabel {
    key: String,
}

/// The metrics the handlers and the status follower update. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Decisions by result, resolved once: the family's lookup takes a lock, and
    /// this is the hot path. Indexed by `Outcome as usize`.
    decisions: [Counter; 3],
    decision_seconds: Histogram,
    loads: Family<ResultLabel, Counter>,
    load_seconds: Histogram,
    load_failures: Family<KeyLabel, Counter>,
    active_revision: Gauge,
    last_activation: Gauge<f64, AtomicU64>,
    state: Family<StateLabel, Gauge>,
    decision_log_dropped: Counter,
}

/// What a decision request ended with, as the `result` label.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Allow,
    Deny,
    Error,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Error => "error",
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let decisions = Family::<ResultLabel, Counter>::default();
        let metrics = Metrics {
            decisions: [Outcome::Allow, Outcome::Deny, Outcome::Error].map(|o| {
                decisions
                    .get_or_create(&ResultLabel { result: o.name() })
                    .clone()
            }),
            // 1 µs to about 8 s: in-process decisions take microseconds, a
            // `min_revision` wait up to the fresh-wait bound.
            decision_seconds: Histogram::new(exponential_buckets(1e-6, 4.0, 12)),
            loads: Family::default(),
            // 1 ms to about 2 min: a small set compiles in milliseconds, a large
            // Cedar set with a schema can take minutes.
            load_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 18)),
            load_failures: Family::default(),
            active_revision: Gauge::default(),
            last_activation: Gauge::default(),
            state: Family::default(),
            decision_log_dropped: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("revwatch_policy");
        r.register(
            "decisions",
            "Decisions answered, by result (allow, deny, error)",
            decisions,
        );
        r.register(
            "decision_duration_seconds",
            "Time to answer one decision request, waits for freshness included",
            metrics.decision_seconds.clone(),
        );
        r.register(
            "loads",
            "Candidate policy sets activated (ok) or rejected (failed)",
            metrics.loads.clone(),
        );
        r.register(
            "load_duration_seconds",
            "Time to read and compile a candidate policy set, activated or rejected",
            metrics.load_seconds.clone(),
        );
        r.register(
            "load_failures",
            "Rejected candidate policy sets, by the key at fault",
            metrics.load_failures.clone(),
        );
        r.register(
            "active_revision",
            "Revision of the active policy set (0: none)",
            metrics.active_revision.clone(),
        );
        r.register(
            "last_activation_timestamp_seconds",
            "When the active policy set was activated (Unix time)",
            metrics.last_activation.clone(),
        );
        r.register(
            "state",
            "1 for the current state of the policy service (not_ready, ready, degraded)",
            metrics.state.clone(),
        );
        r.register(
            "decision_log_dropped",
            "Decision log lines dropped because the writer fell behind",
            metrics.decision_log_dropped.clone(),
        );
        metrics
    }

    /// Counts and times one decision (each item of a batch counts once).
    pub fn decided(&self, outcome: Outcome, count: usize, took: Duration) {
        self.decisions[outcome as usize].inc_by(count as u64);
        self.decision_seconds.observe(took.as_secs_f64());
    }

    pub fn decision_log_dropped(&self) {
        self.decision_log_dropped.inc();
    }

    /// Brings the policy metrics to `now`, given the status seen before.
    pub fn observe(&self, before: &PolicyStatus, now: &PolicyStatus) {
        let activated = now.activations.saturating_sub(before.activations);
        let rejected = now.rejections.saturating_sub(before.rejections);
        if activated > 0 {
            self.loads
                .get_or_create(&ResultLabel { result: "ok" })
                .inc_by(activated);
        }
        if rejected > 0 {
            self.loads
                .get_or_create(&ResultLabel { result: "failed" })
                .inc_by(rejected);
        }
        self.active_revision.set(now.active_revision);
        if let Some(at) = now.activated_at {
            let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            self.last_activation.set(secs.as_secs_f64());
        }
    }

    /// Times one load, and counts a rejection against its key.
    pub fn loaded(&self, report: &LoadReport) {
        self.load_seconds.observe(report.duration.as_secs_f64());
        if let LoadOutcome::Rejected(r) = &report.outcome {
            self.failed_at(&r.key, 1);
        }
    }

    /// Counts the rejections `status` reports from before its load reports were
    /// followed; their keys are lost but the latest's, so all go on that one.
    pub fn rejected_earlier(&self, status: &PolicyStatus) {
        if let Some(r) = &status.last_rejection {
            self.failed_at(&r.key, status.rejections);
        }
    }

    fn failed_at(&self, key: &str, count: u64) {
        self.load_failures
            .get_or_create(&KeyLabel {
                key: key.to_owned(),
            })
            .inc_by(count);
    }

    /// Sets the state gauges from a status whose state was computed now (staleness
    /// moves it without any status change, so this runs at each scrape).
    pub fn set_state(&self, state: &PolicyState) {
        let current = state_name(state);
        for name in ["not_ready", "ready", "degraded"] {
            let value = i64::from(name == current);
            self.state
                .get_or_create(&StateLabel { state: name })
                .set(value);
        }
    }
}

pub fn state_name(state: &PolicyState) -> &'static str {
    match state {
        PolicyState::NotReady => "not_ready",
        PolicyState::Ready => "ready",
        PolicyState::Degraded(_) => "degraded",
    }
}

/// The registry as Prometheus (OpenMetrics) text.
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use revwatch_policy::Rejection;

    use super::*;

    #[test]
    fn each_load_is_timed_and_each_rejection_counted_on_its_key() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let rejected = |key: &str| LoadReport {
            sequence: 1,
            revision: 7,
            duration: Duration::from_millis(3),
            outcome: LoadOutcome::Rejected(Rejection {
                key: key.to_owned(),
                revision: 7,
                key_revision: Some(7),
                message: "bad".to_owned(),
            }),
        };
        metrics.loaded(&rejected("/p/a.cedar"));
        metrics.loaded(&rejected("/p/b.cedar"));
        metrics.loaded(&LoadReport {
            outcome: LoadOutcome::Activated,
            duration: Duration::from_secs(90),
            ..rejected("")
        });
        let text = encode(&registry).unwrap();
        for line in [
            r#"revwatch_policy_load_failures_total{key="/p/a.cedar"} 1"#,
            r#"revwatch_policy_load_failures_total{key="/p/b.cedar"} 1"#,
            "revwatch_policy_load_duration_seconds_count 3",
            r#"revwatch_policy_load_duration_seconds_bucket{le="0.004"} 2"#,
            r#"revwatch_policy_load_duration_seconds_bucket{le="131.072"} 3"#,
        ] {
            assert!(text.contains(line), "no {line:?} in {text}");
        }
    }
}
