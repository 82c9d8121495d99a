//! `revwatch tail`: mirror a prefix and print every delivered batch.

use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use clap::Args;
use revwatch::{
    client::{Error, RangeRequest, RangeResponse, WatchCreateRequest},
    mirror::{ClientSource, Mirror, MirrorConfig, Source, State, Status, Subscription, Update},
};
use revwatch_server::standalone::AutoCompactionArgs;
use tokio::sync::watch;

use crate::{
    connect::{EtcdAccessArgs, ProgressTrustArgs, start_embedded, stop_embedded},
    progress, render,
    shutdown::Signals,
};

/// Mirror an etcd prefix and print every delivered batch (state changes go to stderr).
///
/// With --snapshot-file, a restart resumes from the file's revision. The file is
/// written on a clean stop (SIGTERM, Ctrl-C) and otherwise at most every 5 s, so
/// after a crash or `kill -9` the restart prints again the batches of up to the last
/// 5 s before it. --persist-every-batch writes it each time the mirror publishes
/// instead (after every batch, or every run of batches that arrived together),
/// leaving at most the batches whose write had not finished; a consumer that must never see
/// a batch twice should also skip revisions at or below the last one it processed
/// (each batch carries its revision).
#[derive(Debug, Args)]
pub struct TailArgs {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(long, value_delimiter = ',', required_unless_present = "embedded")]
    pub endpoints: Vec<String>,
    /// The key prefix to mirror ("" or "/" for a whole tree).
    #[arg(long)]
    pub prefix: String,
    /// One JSON object per line instead of human-readable text.
    #[arg(long)]
    pub json: bool,
    /// Persist the mirror here, so a restart resumes without relisting.
    #[arg(long)]
    pub snapshot_file: Option<PathBuf>,
    /// Write the snapshot file after every batch rather than at most every 5 s, so a
    /// restart after a crash repeats (almost) nothing. Costs a file write per batch.
    #[arg(long, requires = "snapshot_file")]
    pub persist_every_batch: bool,
    /// Start the embedded etcd-compatible server and mirror it (no etcd needed).
    #[arg(long, conflicts_with = "endpoints")]
    pub embedded: bool,
    /// With --embedded: where the server keeps its data.
    #[arg(long, default_value = "revwatch-data", requires = "embedded")]
    pub data_dir: PathBuf,
    /// With --embedded: the address it serves on, for etcdctl and other clients.
    #[arg(long, default_value = "127.0.0.1:2379", requires = "embedded")]
    pub listen: SocketAddr,
    /// With --embedded: the server's own compaction.
    #[command(flatten)]
    pub auto_compaction: AutoCompactionArgs,
    #[command(flatten)]
    pub access: EtcdAccessArgs,
    #[command(flatten)]
    pub progress: ProgressTrustArgs,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.embedded || !args.auto_compaction.is_set(),
        "--auto-compaction-mode and --auto-compaction-retention set the embedded server's \
         compaction: they need --embedded"
    );
    // Before anything else, so a Ctrl-C during start-up still stops us cleanly.
    let mut signals = Signals::install();
    // Keep the embedded server alive for as long as we tail it.
    let embedded = if args.embedded {
        let compaction = args.auto_compaction.setting()?;
        Some(start_embedded(&args.data_dir, args.listen, compaction).await?)
    } else {
        None
    };
    let endpoints = match &embedded {
        Some(server) => vec![server.endpoint()],
        None => args.endpoints.clone(),
    };

    let mut config = MirrorConfig::default()
        .with_snapshot_file(args.snapshot_file.clone())
        .with_progress_trust(args.progress.resolve(embedded.is_some()));
    if args.persist_every_batch {
        config = config.with_snapshot_interval(Duration::ZERO);
    }
    let (gate, source) = Gated::new(ClientSource::lazy(args.access.client_config(endpoints)?)?);
    let mirror = Mirror::builder(args.prefix.as_bytes())
        .config(config)
        .start(source)
        .await?;
    // The mirror cannot reach etcd yet, so this is its starting point (e.g. Stale with
    // the snapshot file's state), and the subscription starts from it too.
    let mut status = mirror.status_changes();
    let initial = status.borrow_and_update().clone();
    for line in status_lines(None, &initial, SystemTime::now()) {
        eprintln!("{line}");
    }
    let updates = mirror.subscribe();
    gate.send_replace(true);

    // A long list (the first, or a relist) draws a bar on a terminal meanwhile.
    let printed = follow(updates, status, initial, args.json);
    let followed = tokio::select! {
        r = progress::while_running(mirror.status_changes(), printed) => r,
        () = signals.recv() => Ok(()),
    };

    // However we got here, stop the mirror properly: its final snapshot file write
    // lets a restart resume from the last published revision.
    let reader = mirror.clone();
    let stopped = tokio::select! {
        r = mirror.shutdown() => r.map_err(|e| anyhow::Error::new(e).context("stopping the mirror")),
        () = signals.recv() => Err(anyhow::anyhow!(
            "interrupted again while stopping: exited without the final snapshot file write"
        )),
    };
    let revision = reader.snapshot().revision();
    drop(reader);
    if stopped.is_ok() {
        match &args.snapshot_file {
            Some(path) => eprintln!(
                "revwatch: stopped at revision {revision} (snapshot file {} is at revision {revision})",
                path.display()
            ),
            None => eprintln!("revwatch: stopped at revision {revision}"),
        }
    }
    if let Some(server) = embedded {
        stop_embedded(server).await;
    }
    followed.and(stopped)
}

/// A source that holds every request until its gate opens: `tail` opens it once it has
/// reported the mirror's initial status and subscribed, so that neither misses the
/// state the mirror starts from, however fast etcd answers.
#[derive(Clone)]
struct Gated<S> {
    inner: S,
    open: watch::Receiver<bool>,
}

impl<S: Source> Gated<S> {
    /// The closed gate's handle (send `true` to open it) and the gated source.
    fn new(inner: S) -> (watch::Sender<bool>, Gated<S>) {
        let (gate, open) = watch::channel(false);
        (gate, Gated { inner, open })
    }

    /// Resolves once the gate is open (or its handle is gone).
    async fn opened(&self) {
        let mut open = self.open.clone();
        // Only whether it opened: the guard must not be held across an await.
        let _ = open.wait_for(|o| *o).await.is_ok();
    }
}

impl<S: Source> Source for Gated<S> {
    type Watch = S::Watch;

    async fn range(&self, req: RangeRequest) -> Result<RangeResponse, Error> {
        self.opened().await;
        self.inner.range(req).await
    }

    async fn watch(&self, req: WatchCreateRequest) -> Result<Self::Watch, Error> {
        self.opened().await;
        self.inner.watch(req).await
    }
}

/// Prints deliveries and status changes until the mirror stops or stdout closes.
async fn follow<T: Send + Sync + 'static>(
    mut updates: Subscription<T>,
    mut status: watch::Receiver<Status>,
    mut last: Status,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    loop {
        tokio::select! {
            update = updates.recv() => {
                let text = match update {
                    None => return Ok(()),
                    // The empty state before the first list has nothing to show (a
                    // snapshot loaded from file does, even when empty: its revision).
                    Some(Update::Snapshot(s)) if s.revision() == 0 => continue,
                    Some(Update::Snapshot(s)) => render::snapshot(&s, as_json),
                    Some(Update::Batch(b)) => render::batch(&b, as_json),
                    Some(Update::Progress(_)) => continue,
                };
                // A closed pipe (e.g. `| head`) ends the command quietly. A terminal
                // may show the list's bar: hidden while the batch is written.
                let written = progress::suspend(|| {
                    out.write_all(text.as_bytes()).and_then(|()| out.flush())
                });
                if written.is_err() {
                    return Ok(());
                }
            }
            changed = status.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let now = status.borrow_and_update().clone();
                progress::suspend(|| {
                    for line in status_lines(Some(&last), &now, SystemTime::now()) {
                        eprintln!("{line}");
                    }
                });
                last = now;
            }
        }
    }
}

/// What changed from `before` to `now` (everything worth saying about `now` when
/// there is no `before`): relists and reconnects with their cause, the state, and new
/// errors, one stderr line each. Causes come before the state, the order they happened
/// in: one update can carry both a relist and the Ready state it led to.
fn status_lines(before: Option<&Status>, now: &Status, at: SystemTime) -> Vec<String> {
    let mut lines = Vec::new();
    // A cause whose count moved since `before`, as "revwatch: WHAT (CAUSE) from revision R".
    let mut counted = |what: &str, changed: Vec<&str>| {
        for cause in changed {
            lines.push(format!(
                "revwatch: {what} ({cause}) from revision {}",
                now.revision
            ));
        }
    };
    counted(
        "relist",
        moved(&now.relists, before.map(|b| &b.relists), |c| c.as_str()),
    );
    counted(
        "reconnecting",
        moved(&now.reconnects, before.map(|b| &b.reconnects), |c| {
            c.as_str()
        }),
    );
    if before.is_none_or(|b| b.state != now.state) {
        let mut line = format!("revwatch: {} at revision {}", now.state, now.revision);
        match now.state {
            State::Stale => {
                line.push_str(" (from the snapshot file");
                if let Some(file) = now.loaded_snapshot {
                    let age = at
                        .duration_since(file.written_at)
                        .unwrap_or_default()
                        .as_secs();
                    line.push_str(&format!(", written {age}s ago"));
                }
                line.push_str("; served until etcd answers)");
            }
            State::Ready => {
                if let Some(endpoint) = &now.endpoint {
                    line.push_str(&format!(" (watching {endpoint})"));
                }
            }
            State::Syncing | State::Reconnecting | State::Degraded => {}
        }
        lines.push(line);
    }
    match (before, &now.failing, &now.last_error) {
        (Some(b), Some(e), _) if b.failing.as_ref().map(|f| &f.message) != Some(&e.message) => {
            lines.push(format!("revwatch: {}: {}", e.kind, e.message));
        }
        // At start: a failure so far, or an ignored (e.g. corrupt) snapshot file.
        (None, Some(e), _) | (None, None, Some(e)) => {
            lines.push(format!("revwatch: {}: {}", e.kind, e.message));
        }
        _ => {}
    }
    lines
}

/// The causes whose count in `now` differs from `before` (all of them without `before`).
fn moved<C: Ord>(
    now: &BTreeMap<C, u64>,
    before: Option<&BTreeMap<C, u64>>,
    name: impl Fn(&C) -> &'static str,
) -> Vec<&'static str> {
    now.iter()
        .filter(|(cause, n)| before.and_then(|b| b.get(*cause)) != Some(*n))
        .map(|(cause, _)| name(cause))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use revwatch::mirror::ResyncReason;

    fn status(state: State, revision: i64, relists: u64) -> Status {
        let mut status = Status::new(state);
        status.revision = revision;
        status.server_revision = revision;
        status.endpoint = Some("e".into());
        status.relists = [(ResyncReason::Compacted, relists)].into_iter().collect();
        status
    }

    #[test]
    fn a_relist_is_told_before_the_state_it_led_to() {
        let before = status(State::Stale, 7, 0);
        let now = status(State::Ready, 11, 1);
        assert_eq!(
            status_lines(Some(&before), &now, SystemTime::now()),
            [
                "revwatch: relist (compacted) from revision 11",
                "revwatch: ready at revision 11 (watching e)",
            ]
        );
    }
}
