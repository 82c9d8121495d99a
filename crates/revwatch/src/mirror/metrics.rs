//! Prometheus metrics of a mirror.
//!
//! Registered under the `revwatch_mirror_` prefix (text names, as scraped):
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `watch_streams_opened_total` | counter | watch streams opened |
//! | `reconnects_total{cause}` | counter | resumes without relist, by [`ReconnectCause`](super::ReconnectCause) |
//! | `relists_total{cause}` | counter | relists, by [`ResyncReason`](super::ResyncReason) (not the initial list) |
//! | `events_applied_total` | counter | watch events applied |
//! | `revisions_applied_total` | counter | revisions applied from the watch (one batch each) |
//! | `revision` | gauge | revision of the published snapshot |
//! | `server_revision` | gauge | highest revision seen in a server response header |
//! | `lag_revisions` | gauge | `server_revision - revision` |
//! | `apply_seconds` | histogram | time to apply and publish one watched revision |
//! | `decode_errors_total` | counter | values that failed to decode (or whose decoder panicked) |
//! | `rejected_responses_total{cause}` | counter | responses rejected by validation (`header`, `event`, `list`) or progress replies not trusted (`untrusted_progress`) |
//! | `progress_verifications_total{cause}` | counter | reads verifying a progress reply ([`ProgressTrust::Confirmed`](super::ProgressTrust::Confirmed)), by outcome: `bookmark` (the range was unchanged), `changed` (events were on their way), `failed` (no answer) |
//! | `unanswered_progress_stalls_total` | counter | stalls of streams whose creation was answered but no progress request, on an endpoint that still answered a read (see [`Status::unanswered_progress_stalls`](super::Status::unanswered_progress_stalls)) |
//! | `subscribers` | gauge | live subscriptions |
//! | `subscriber_lagged_total` | counter | times a subscriber's buffer overflowed (it is then marked lagging) |
//! | `subscriber_resyncs_total` | counter | resync batches delivered to lagging subscribers |
//! | `snapshot_file_writes_total{cause}` | counter | snapshot file writes, by outcome (`ok`, `error`) |

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::batch::ResyncReason;
use super::status::ReconnectCause;

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
    pub(crate) progress_verifications: Family<CauseLabel, Counter>,
    pub(crate) unanswered_progress_stalls: Counter,
    pub(crate) subscribers: Gauge,
    pub(crate) subscriber_lagged: Counter,
    pub(crate) subscriber_resyncs: Counter,
    pub(crate) snapshot_writes: Family<CauseLabel, Counter>,
}

/// Every cause a by-cause counter is known to take, created at 0 so that each is
/// scraped from the start (a family without children is not exposed at all, and
/// "no data" is not "none yet").
const RECONNECT_CAUSES: [ReconnectCause; 5] = [
    ReconnectCause::StreamError,
    ReconnectCause::StreamClosed,
    ReconnectCause::Stall,
    ReconnectCause::Canceled,
    ReconnectCause::Validation,
];
const RELIST_CAUSES: [ResyncReason; 2] = [ResyncReason::Compacted, ResyncReason::Validation];
const REJECTED_CAUSES: [&str; 4] = ["header", "event", "list", "untrusted_progress"];
const SNAPSHOT_WRITE_OUTCOMES: [&str; 2] = ["ok", "error"];
/// How a read verifying a progress reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verification {
    /// The range was unchanged: the reply became a bookmark.
    Bookmark,
    /// It changed (or events came meanwhile): no bookmark.
    Changed,
    /// The read failed or did not answer in time: no bookmark.
    Failed,
}

impl Verification {
    const ALL: [Verification; 3] = [
        Verification::Bookmark,
        Verification::Changed,
        Verification::Failed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verification::Bookmark => "bookmark",
            Verification::Changed => "changed",
            Verification::Failed => "failed",
        }
    }
}

fn family_with(causes: impl IntoIterator<Item = &'static str>) -> Family<CauseLabel, Counter> {
    let family = Family::default();
    for cause in causes {
        let _ = family.get_or_create(&CauseLabel { cause });
    }
    family
}

impl Metrics {
    pub(crate) fn new() -> Self {
        Metrics {
            streams_opened: Counter::default(),
            reconnects: family_with(RECONNECT_CAUSES.map(ReconnectCause::as_str)),
            relists: family_with(RELIST_CAUSES.map(ResyncReason::as_str)),
            events_applied: Counter::default(),
            revisions_applied: Counter::default(),
            revision: Gauge::default(),
            server_revision: Gauge::default(),
            lag: Gauge::default(),
            // 1 µs .. ~0.5 s.
            apply_seconds: Histogram::new(exponential_buckets(1e-6, 2.5, 15)),
            decode_errors: Counter::default(),
            rejected_responses: family_with(REJECTED_CAUSES),
            progress_verifications: family_with(Verification::ALL.map(Verification::as_str)),
            unanswered_progress_stalls: Counter::default(),
            subscribers: Gauge::default(),
            subscriber_lagged: Counter::default(),
            subscriber_resyncs: Counter::default(),
            snapshot_writes: family_with(SNAPSHOT_WRITE_OUTCOMES),
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
            "progress_verifications",
            "Reads verifying a progress reply as a bookmark, by outcome",
            self.progress_verifications.clone(),
        );
        r.register(
            "unanswered_progress_stalls",
            "Stalls of watch streams whose creation was answered but no progress request",
            self.unanswered_progress_stalls.clone(),
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
        Self::inc_cause_by(family, cause, 1);
    }

    pub(crate) fn inc_cause_by(family: &Family<CauseLabel, Counter>, cause: &'static str, n: u64) {
        family.get_or_create(&CauseLabel { cause }).inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_under_the_prefix() {
        let metrics = Metrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.streams_opened.inc();
        Metrics::inc_cause(&metrics.reconnects, "stall");
        Metrics::inc_cause(&metrics.relists, "compacted");
        Metrics::inc_cause(&metrics.rejected_responses, "header");
        Metrics::inc_cause(&metrics.snapshot_writes, "ok");
        metrics.lag.set(3);
        metrics.apply_seconds.observe(0.001);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for sample in [
            "revwatch_mirror_watch_streams_opened_total 1",
            "revwatch_mirror_reconnects_total{cause=\"stall\"} 1",
            "revwatch_mirror_relists_total{cause=\"compacted\"} 1",
            "revwatch_mirror_events_applied_total 0",
            "revwatch_mirror_revisions_applied_total 0",
            "revwatch_mirror_revision 0",
            "revwatch_mirror_server_revision 0",
            "revwatch_mirror_lag_revisions 3",
            "revwatch_mirror_apply_seconds_count 1",
            "revwatch_mirror_decode_errors_total 0",
            "revwatch_mirror_rejected_responses_total{cause=\"header\"} 1",
            "revwatch_mirror_unanswered_progress_stalls_total 0",
            "revwatch_mirror_subscribers 0",
            "revwatch_mirror_subscriber_lagged_total 0",
            "revwatch_mirror_subscriber_resyncs_total 0",
            "revwatch_mirror_snapshot_file_writes_total{cause=\"ok\"} 1",
            // Known causes are exposed at 0 before they first happen.
            "revwatch_mirror_reconnects_total{cause=\"stream_error\"} 0",
            "revwatch_mirror_reconnects_total{cause=\"stream_closed\"} 0",
            "revwatch_mirror_reconnects_total{cause=\"canceled\"} 0",
            "revwatch_mirror_reconnects_total{cause=\"validation\"} 0",
            "revwatch_mirror_relists_total{cause=\"validation\"} 0",
            "revwatch_mirror_rejected_responses_total{cause=\"event\"} 0",
            "revwatch_mirror_rejected_responses_total{cause=\"list\"} 0",
            "revwatch_mirror_rejected_responses_total{cause=\"untrusted_progress\"} 0",
            "revwatch_mirror_snapshot_file_writes_total{cause=\"error\"} 0",
            "revwatch_mirror_progress_verifications_total{cause=\"bookmark\"} 0",
            "revwatch_mirror_progress_verifications_total{cause=\"changed\"} 0",
            "revwatch_mirror_progress_verifications_total{cause=\"failed\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "{sample:?} not in\n{text}"
            );
        }
    }
}
