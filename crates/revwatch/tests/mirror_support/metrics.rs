//! The mirror's metrics as a scraper sees them: the registry encoded in the
//! Prometheus text format, and its samples by name.

use std::collections::BTreeMap;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// One scrape: the text, and every sample by name (with labels).
pub struct Scrape {
    pub text: String,
    samples: BTreeMap<String, f64>,
}

pub fn scrape(registry: &Registry) -> Scrape {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect();
    Scrape { text, samples }
}

impl Scrape {
    /// The value of `revwatch_mirror_<name>`, which must be present.
    pub fn get(&self, name: &str) -> f64 {
        let full = format!("revwatch_mirror_{name}");
        *self
            .samples
            .get(&full)
            .unwrap_or_else(|| panic!("metric {full} missing from\n{}", self.text))
    }

    pub fn int(&self, name: &str) -> i64 {
        self.get(name) as i64
    }

    /// The value of `revwatch_mirror_<name>`, 0 when absent (a labelled counter
    /// whose label has not been seen yet).
    pub fn int_or_zero(&self, name: &str) -> i64 {
        let full = format!("revwatch_mirror_{name}");
        self.samples.get(&full).map_or(0, |v| *v as i64)
    }

    /// The value of a by-cause counter, 0 if that cause never happened.
    pub fn by_cause(&self, name: &str, cause: &str) -> u64 {
        let full = format!("revwatch_mirror_{name}_total{{cause=\"{cause}\"}}");
        self.samples.get(&full).map_or(0, |v| *v as u64)
    }

    /// Every cause of a by-cause counter that happened, with its count.
    pub fn happened(&self, name: &str) -> BTreeMap<String, u64> {
        let mut causes = self.causes(name);
        causes.retain(|_, n| *n > 0);
        causes
    }

    /// Every cause of a by-cause counter, with its value.
    pub fn causes(&self, name: &str) -> BTreeMap<String, u64> {
        let head = format!("revwatch_mirror_{name}_total{{cause=\"");
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let cause = k.strip_prefix(&head)?.strip_suffix("\"}")?;
                Some((cause.to_string(), *v as u64))
            })
            .collect()
    }

    /// Every metric is described, whether or not it has a sample yet.
    pub fn assert_described(&self) {
        for (name, kind) in [
            ("watch_streams_opened", "counter"),
            ("reconnects", "counter"),
            ("relists", "counter"),
            ("events_applied", "counter"),
            ("revisions_applied", "counter"),
            ("revision", "gauge"),
            ("server_revision", "gauge"),
            ("lag_revisions", "gauge"),
            ("apply_seconds", "histogram"),
            ("decode_errors", "counter"),
            ("rejected_responses", "counter"),
            ("subscribers", "gauge"),
            ("subscriber_lagged", "counter"),
            ("subscriber_resyncs", "counter"),
            ("snapshot_file_writes", "counter"),
        ] {
            let line = format!("# TYPE revwatch_mirror_{name} {kind}");
            assert!(
                self.text.lines().any(|l| l == line),
                "{line:?} missing from\n{}",
                self.text
            );
        }
    }
}
