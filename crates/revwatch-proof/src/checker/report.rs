//! Rendering a violation: the smallest window of history that shows it.

use std::fmt;

use super::Violation;
use crate::history::{History, fmt_changes};
use crate::keys::KeyRange;
use crate::truth::Truth;

/// Deliveries shown either side of the two ends of a window.
const CONTEXT: usize = 1;
/// Longest stretch shown whole; longer ones are elided in the middle.
const MAX_SPAN: usize = 8;

/// Lines for deliveries `since..=at` (with one delivery of context each
/// side, eliding a long middle), then truth's changes at `revision`.
pub(super) fn window(
    history: &History,
    truth: &Truth,
    range: &KeyRange,
    since: usize,
    at: usize,
    revision: i64,
) -> Vec<String> {
    let n = history.deliveries.len();
    let mut lines = Vec::new();
    if n > 0 {
        let lo = since.min(at).saturating_sub(CONTEXT);
        let hi = (at + CONTEXT).min(n - 1);
        let line = |i: usize| {
            let mark = if i == at { ">" } else { " " };
            format!("{mark} #{i} {}", history.deliveries[i])
        };
        if hi - lo < MAX_SPAN {
            lines.extend((lo..=hi).map(line));
        } else {
            let first_end = (since.min(at) + CONTEXT).min(hi);
            lines.extend((lo..=first_end).map(line));
            let resume = at.saturating_sub(CONTEXT).max(first_end + 1);
            if resume > first_end + 1 {
                lines.push(format!("  … {} deliveries …", resume - first_end - 1));
            }
            lines.extend((resume..=hi).map(line));
        }
    }
    lines.push(format!(
        "  truth at {revision}: {}",
        Changes(&truth.changes_in(revision, range))
    ));
    lines
}

struct Changes<'a>(&'a [crate::history::Change]);

impl fmt::Display for Changes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_changes(f, self.0)
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "violation: {} at revision {}", self.kind, self.revision)?;
        writeln!(f, "  {}", self.detail)?;
        writeln!(f, "seed: {}", self.context.seed)?;
        match &self.context.schedule {
            Some(s) => write!(f, "fault schedule:\n{s}")?,
            None => writeln!(f, "fault schedule: none")?,
        }
        if !self.window.is_empty() {
            writeln!(f, "history window:")?;
            for l in &self.window {
                writeln!(f, "  {l}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}
