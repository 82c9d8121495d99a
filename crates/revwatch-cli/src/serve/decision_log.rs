//! The decision log: one JSON line per (sampled) decision, shaped like OPA's
//! decision log (`decision_id`, `path`, `input`, `result`, `timestamp`, `labels`)
//! plus the `revision` of the policy set that decided, which `policy explain` can
//! replay it against.
//!
//! Lines are written by a thread of their own through a bounded queue: a slow disk
//! or a blocked stdout never slows decisions down; lines that do not fit are
//! dropped and counted (`revwatch_policy_decision_log_dropped_total`).

use std::{
    fs::OpenOptions,
    io::{BufWriter, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, SystemTime},
};

use anyhow::Context;
use revwatch_policy::{Decision, Request};
use serde::Serialize;

use super::api::{QuestionOf, effect_name};
use super::metrics::Metrics;

/// Lines queued for the writer before new ones are dropped.
const QUEUE: usize = 4096;

enum Message {
    Line(String),
    /// Flush, stop, and say so.
    Close(mpsc::Sender<()>),
}

/// Where decisions are logged; cheap to clone.
#[derive(Clone)]
pub struct DecisionLog {
    queue: mpsc::SyncSender<Message>,
    sampler: Arc<Sampler>,
    labels: Arc<Labels>,
    metrics: Metrics,
}

#[derive(Debug, Serialize)]
pub struct Labels {
    pub backend: &'static str,
    pub prefix: String,
}

#[derive(Serialize)]
struct Line<'a> {
    decision_id: &'a str,
    revision: i64,
    path: &'a str,
    input: QuestionOf<'a>,
    result: LineResult<'a>,
    timestamp: String,
    labels: &'a Labels,
}

#[derive(Serialize)]
struct LineResult<'a> {
    decision: &'static str,
    policy_ids: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

impl DecisionLog {
    /// Logs to `target` (`-` for stdout, else a file appended to) a share `rate`
    /// (0 to 1) of the decisions.
    pub fn open(target: &str, rate: f64, labels: Labels, metrics: Metrics) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&rate),
            "--decision-log-sample must be between 0 and 1, got {rate}"
        );
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(Path::new(target))
                .with_context(|| format!("opening the decision log {target}"))?;
            Box::new(file)
        };
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || write_lines(lines, BufWriter::new(out)))
            .context("starting the decision log writer")?;
        Ok(DecisionLog {
            queue,
            sampler: Arc::new(Sampler::new(rate)),
            labels: Arc::new(labels),
            metrics,
        })
    }

    /// Logs `decision`, the answer to `input` at endpoint `path`, if sampled.
    pub fn record(&self, path: &str, input: &Request, decision: &Decision) {
        if !self.sampler.take() {
            return;
        }
        let line = Line {
            decision_id: &decision.decision_id,
            revision: decision.revision,
            path,
            input: QuestionOf::from(input),
            result: LineResult {
                decision: effect_name(decision.effect),
                policy_ids: &decision.policy_ids,
                reason: decision.fail_closed.as_deref(),
            },
            timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            labels: &self.labels,
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        if self.queue.try_send(Message::Line(text)).is_err() {
            self.metrics.decision_log_dropped();
        }
    }

    /// Writes out what is queued, waiting at most `timeout`.
    pub async fn close(self, timeout: Duration) {
        let (done, closed) = mpsc::channel();
        if self.queue.send(Message::Close(done)).is_err() {
            return;
        }
        let waited = tokio::task::spawn_blocking(move || closed.recv_timeout(timeout)).await;
        if !matches!(waited, Ok(Ok(()))) {
            eprintln!("revwatch serve: the decision log was not flushed within {timeout:?}");
        }
    }
}

fn write_lines(lines: mpsc::Receiver<Message>, mut out: BufWriter<Box<dyn Write + Send>>) {
    let mut failed = false;
    let mut write = |out: &mut BufWriter<_>, text: &str| {
        let result = out
            .write_all(text.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
        if let Err(e) = result
            && !failed
        {
            failed = true;
            eprintln!("revwatch serve: writing the decision log: {e}");
        }
    };
    while let Ok(message) = lines.recv() {
        let mut next = Some(message);
        // Write what is queued, then flush once.
        while let Some(message) = next.take() {
            match message {
                Message::Line(text) => write(&mut out, &text),
                Message::Close(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                    return;
                }
            }
            next = lines.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// Takes an exact share of calls, evenly spread: call n is taken when
/// `floor((n + 1) * rate) > floor(n * rate)`.
struct Sampler {
    rate: f64,
    calls: AtomicU64,
}

impl Sampler {
    fn new(rate: f64) -> Self {
        Sampler {
            rate,
            calls: AtomicU64::new(0),
        }
    }

    fn take(&self) -> bool {
        if self.rate >= 1.0 {
            return true;
        }
        let n = self.calls.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.rate).floor() > (n * self.rate).floor()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_takes_its_share() {
        for (rate, expected) in [(0.0, 0), (0.1, 100), (0.25, 250), (0.5, 500), (1.0, 1000)] {
            let s = Sampler::new(rate);
            let taken = (0..1000).filter(|_| s.take()).count();
            assert_eq!(taken, expected, "rate {rate}");
        }
    }
}
