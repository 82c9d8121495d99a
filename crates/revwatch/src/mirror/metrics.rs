//! Prometheus metrics of a mirror.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of the by-cause counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CauseLabel {
    pub(crate) cause: &'static str,
}

/// Every metric of one mirror. Always live; registered only when the application
/// passed a registry.
#[derive(Clone, Debug)]
pub(crate) struct Metrics {
    pub(crate) streams_opened: Counter,
    pub(crate) reconnects: Family<CauseLabel, Counter>,
    pub(crate) relists: Family<CauseLabel, Counter>,
    pub(crate) events_applied: Counter,
    pub(crate) revisions_applied: Counter,
    pub(crate) revision: Gauge,
    pub(crate) server_revision: Gauge,
    pub(crate) lag: Gauge,
    pub(crate) apply_seconds: Histogram,
    pub(crate) decode_errors: Counter,
    pub(crate) rejected_responses: Family<CauseLabel, Counter>,
    pub(crate) subscribers: Gauge,
    pub(crate) subscriber_lagged: Counter,
    pub(crate) subscriber_resyncs: Counter,
    pub(crate) snapshot_writes: Family<CauseLabel, Counter>,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            streams_opened: Counter::default(),
            reconnects: Family::default(),
            relists: Family::default(),
            events_applied: Counter::default(),
            revisions_applied: Counter::default(),
            revision: Gauge::default(),
            server_revision: Gauge::default(),
            lag: Gauge::default(),
            // 1 µs .. ~0.5 s.
            apply_seconds: Histogram::new(exponential_buckets(1e-6, 2.5, 15)),
            decode_errors: Counter::default(),
            rejected_responses: Family::default(),
            subscribers: Gauge::default(),
            subscriber_lagged: Counter::default(),
            subscriber_resyncs: Counter::default(),
            snapshot_writes: Family::default(),
        }
    }

    /// Registers every metric under `registry` (use `Registry::sub_registry_with_prefix`
    /// or `with_label` to tell several mirrors apart).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("revwatch_mirror");
        r.register(
            "watch_streams_opened",
            "Watch streams opened",
            self.streams_opened.clone(),
        );
        r.register(
            "reconnects",
            "Watch reconnects (resume without relist), by cause",
            self.reconnects.clone(),
        );
        r.register(
            "relists",
            "Relists of the prefix, by cause",
            self.relists.clone(),
        );
        r.register(
            "events_applied",
            "Watch events applied",
            self.events_applied.clone(),
        );
        r.register(
            "revisions_applied",
            "Revisions applied and published as one batch each",
            self.revisions_applied.clone(),
        );
        r.register(
            "revision",
            "Revision of the published snapshot",
            self.revision.clone(),
        );
        r.register(
            "server_revision",
            "Highest revision seen in a server response header",
            self.server_revision.clone(),
        );
        r.register(
            "lag_revisions",
            "Server revision minus published revision",
            self.lag.clone(),
        );
        r.register(
            "apply_seconds",
            "Time to apply and publish one revision",
            self.apply_seconds.clone(),
        );
        r.register(
            "decode_errors",
            "Values that failed to decode",
            self.decode_errors.clone(),
        );
        r.register(
            "rejected_responses",
            "Server responses rejected by validation or not trusted, by cause",
            self.rejected_responses.clone(),
        );
        r.register(
            "subscribers",
            "Live subscriptions",
            self.subscribers.clone(),
        );
        r.register(
            "subscriber_lagged",
            "Times a subscriber's buffer overflowed",
            self.subscriber_lagged.clone(),
        );
        r.register(
            "subscriber_resyncs",
            "Resync batches delivered to lagging subscribers",
            self.subscriber_resyncs.clone(),
        );
        r.register(
            "snapshot_file_writes",
            "Snapshot file writes, by outcome",
            self.snapshot_writes.clone(),
        );
    }

    pub(crate) fn inc_cause(family: &Family<CauseLabel, Counter>, cause: &'static str) {
        family.get_or_create(&CauseLabel { cause }).inc();
    }
}
