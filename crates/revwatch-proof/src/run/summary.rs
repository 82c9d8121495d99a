//! Figures over many runs, as the soak prints and writes them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{RunConfig, RunFailure, RunReport};
use crate::schedule::FaultType;

/// Totals over runs, with recovery times per fault type.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SoakSummary {
    /// Runs done.
    pub runs: usize,
    /// Runs by server topology ([`RunConfig::topology`]), passed or not.
    pub runs_by_topology: BTreeMap<String, usize>,
    /// Faults injected into runs whose server was revwatch's embedded server.
    pub faults_on_embedded_server: usize,
    /// Faults injected in total.
    pub faults_injected: usize,
    /// Faults injected, by type.
    pub faults_by_type: BTreeMap<String, usize>,
    /// Distinct faults injected (a type that is another one in a different
    /// topology counts once, see [`FaultType::distinct`]).
    ///
    /// [`FaultType::distinct`]: crate::schedule::FaultType::distinct
    pub fault_types_covered: usize,
    /// Changes checked, over every subscriber.
    pub events_checked: usize,
    /// Revisions in the prefix verified delivered, or covered by a resync
    /// after the first list (steady subscriber; each counted once).
    pub revisions_checked: usize,
    /// Writes issued.
    pub writes: usize,
    /// Writes etcd acknowledged, each found in truth with its effect.
    pub acked_writes: usize,
    /// Acknowledged writes each run had to check at least (the largest
    /// minimum of the runs), or it failed.
    pub min_writes_per_run: usize,
    /// Prefix revisions each run had to check at least, or it failed.
    pub min_revisions_per_run: usize,
    /// Runs where the mirror broke a guarantee or did not recover.
    pub violations: usize,
    /// Runs failed because the mirror relisted with nothing in truth to
    /// explain it (also counted in `violations`).
    pub unexplained_relists: usize,
    /// Relists by compaction that a compaction in truth explained.
    pub explained_relists: usize,
    /// Mirror restarts after which the subscriber resumed from the file.
    pub restarts_checked: usize,
    /// Peer partitions of the member the mirror watched, which the mirror
    /// left for the majority while it was still cut off.
    pub minority_left: usize,
    /// Runs that failed for another reason (setup, truth).
    pub errors: usize,
    /// Relists by cause.
    pub relists: BTreeMap<String, u64>,
    /// Watch resumptions by cause.
    pub reconnects: BTreeMap<String, u64>,
    /// Resyncs of the slow subscriber because it lagged.
    pub lagged_resyncs: u64,
    /// Longest recovery per fault type, in milliseconds.
    pub max_recovery_ms: BTreeMap<String, u64>,
    /// Median recovery per fault type, in milliseconds.
    pub median_recovery_ms: BTreeMap<String, u64>,
    /// Each failed run: seed and error.
    pub failures: Vec<String>,
    #[serde(skip)]
    recoveries: BTreeMap<String, Vec<u64>>,
    #[serde(skip)]
    distinct: BTreeSet<FaultType>,
}

impl SoakSummary {
    /// Adds a passing run.
    pub fn add(&mut self, report: &RunReport) {
        self.count_run(&report.config);
        self.faults_injected += report.faults.len();
        if report.config.embedded.is_some() {
            self.faults_on_embedded_server += report.faults.len();
        }
        for f in &report.faults {
            self.distinct.insert(f.fault.distinct());
            let name = f.fault.name().to_owned();
            *self.faults_by_type.entry(name.clone()).or_default() += 1;
            let ms = u64::try_from(f.recovery.as_millis()).unwrap_or(u64::MAX);
            self.recoveries.entry(name).or_default().push(ms);
            self.minority_left += usize::from(f.left_minority);
        }
        self.fault_types_covered = self.distinct.len();
        self.events_checked += report.checks.iter().map(|c| c.changes).sum::<usize>();
        if let Some(steady) = report.checks.first() {
            self.revisions_checked += steady.revisions_checked;
            self.explained_relists += steady.relists;
            self.restarts_checked += steady.restarts;
        }
        self.writes += report.writes;
        self.acked_writes += report.acked_writes;
        for (cause, n) in &report.relists {
            *self.relists.entry(cause.clone()).or_default() += n;
        }
        for (cause, n) in &report.reconnects {
            *self.reconnects.entry(cause.clone()).or_default() += n;
        }
        self.lagged_resyncs += report.lagged_resyncs;
        for (name, times) in &mut self.recoveries {
            times.sort_unstable();
            if let (Some(&max), Some(&median)) = (times.last(), times.get(times.len() / 2)) {
                self.max_recovery_ms.insert(name.clone(), max);
                self.median_recovery_ms.insert(name.clone(), median);
            }
        }
    }

    /// Adds a failed run.
    pub fn add_failure(&mut self, failure: &RunFailure) {
        self.count_run(&failure.config);
        if failure.error.is_violation() {
            self.violations += 1;
            if failure.error.is_unexplained_relist() {
                self.unexplained_relists += 1;
            }
        } else {
            self.errors += 1;
        }
        self.failures
            .push(format!("seed {}: {}", failure.config.seed, failure.error));
    }
}

impl SoakSummary {
    fn count_run(&mut self, config: &RunConfig) {
        self.runs += 1;
        *self.runs_by_topology.entry(config.topology()).or_default() += 1;
        self.min_writes_per_run = self.min_writes_per_run.max(config.min_writes);
        self.min_revisions_per_run = self.min_revisions_per_run.max(config.min_revisions);
    }
}

impl fmt::Display for SoakSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "runs:               {}", self.runs)?;
        for (topology, n) in &self.runs_by_topology {
            writeln!(f, "  {topology:<40} {n:>5}")?;
        }
        writeln!(
            f,
            "faults injected:    {} ({} types; {} on the embedded server)",
            self.faults_injected, self.fault_types_covered, self.faults_on_embedded_server
        )?;
        for (name, n) in &self.faults_by_type {
            writeln!(
                f,
                "  {name:<28} {n:>5}   recovery max {:>6} ms, median {:>6} ms",
                self.max_recovery_ms.get(name).copied().unwrap_or(0),
                self.median_recovery_ms.get(name).copied().unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "writes issued:      {} ({} acknowledged; at least {} a run)",
            self.writes, self.acked_writes, self.min_writes_per_run
        )?;
        writeln!(f, "events checked:     {}", self.events_checked)?;
        writeln!(
            f,
            "revisions checked:  {} (at least {} a run)",
            self.revisions_checked, self.min_revisions_per_run
        )?;
        writeln!(f, "violations:         {}", self.violations)?;
        writeln!(f, "unexplained relists: {}", self.unexplained_relists)?;
        writeln!(
            f,
            "relists explained by a compaction: {}; restarts resumed from file: {}",
            self.explained_relists, self.restarts_checked
        )?;
        writeln!(
            f,
            "peer partitions of the watched member left for the majority: {}",
            self.minority_left
        )?;
        writeln!(f, "other errors:       {}", self.errors)?;
        writeln!(f, "relists by cause:   {:?}", self.relists)?;
        writeln!(f, "reconnects by cause: {:?}", self.reconnects)?;
        writeln!(f, "lagged resyncs:     {}", self.lagged_resyncs)?;
        for failure in &self.failures {
            writeln!(f, "FAILED {failure}")?;
        }
        Ok(())
    }
}
