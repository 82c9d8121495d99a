//! Crash recovery: the server runs as a child process, is killed with SIGKILL in the middle
//! of concurrent writes, and restarted on the same data directory. Every acknowledged write
//! must be there at its acknowledged revision, the history must have no holes, and new
//! writes must continue at the next revision. Repeated over seeds, with several kills each.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::connect;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WRITERS: usize = 8;
const KILLS_PER_SEED: usize = 3;

/// The server process; killed on drop so a failing test leaves nothing behind.
struct ServerProcess {
    child: Child,
    endpoint: String,
}

impl ServerProcess {
    async fn start(dir: &std::path::Path) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_revwatch-server"))
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning revwatch-server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("server did not start in time")??
            .context("server exited before listening")?;
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?;
        Ok(Self {
            endpoint: format!("http://{addr}"),
            child,
        })
    }

    async fn kill9(mut self) -> Result<()> {
        // tokio's kill sends SIGKILL on Unix.
        self.child.kill().await?;
        Ok(())
    }
}

/// An acknowledged write: key, value, and the revision in the response header.
type Acked = (Vec<u8>, Vec<u8>, i64);

async fn write_until_killed(endpoint: String, round: usize, acked: Arc<Mutex<Vec<Acked>>>) {
    let Ok(clients) = connect(&endpoint).await else {
        return;
    };
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut kv = clients.kv.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let key = format!("r{round}/w{w}/{n}").into_bytes();
                let value = format!("value-{n}").into_bytes();
                let req = PutRequest {
                    key: key.clone(),
                    value: value.clone(),
                    ..Default::default()
                };
                match kv.put(req).await {
                    Ok(resp) => {
                        let rev = resp.into_inner().header.map_or(0, |h| h.revision);
                        acked.lock().expect("test mutex").push((key, value, rev));
                    }
                    // The kill: unacknowledged writes may or may not have landed.
                    Err(_) => return,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Checks everything acknowledged so far against a freshly restarted server and returns
/// its current revision.
async fn verify(endpoint: &str, acked: &[Acked]) -> Result<i64> {
    let mut c = connect(endpoint).await?;
    let all =
        c.kv.range(RangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        })
        .await?
        .into_inner();
    let current = all.header.map_or(0, |h| h.revision);
    let found: std::collections::HashMap<&[u8], (&[u8], i64)> = all
        .kvs
        .iter()
        .map(|kv| (kv.key.as_slice(), (kv.value.as_slice(), kv.mod_revision)))
        .collect();
    for (key, value, rev) in acked {
        let got = found.get(key.as_slice());
        ensure!(
            got == Some(&(value.as_slice(), *rev)),
            "acknowledged write {} at revision {rev} lost or changed: {got:?}",
            String::from_utf8_lossy(key)
        );
    }
    // Every key is written once, so the revisions 2..=current are exactly the keys' mod
    // revisions: no hole, no duplicate.
    let mut revs: Vec<i64> = all.kvs.iter().map(|kv| kv.mod_revision).collect();
    revs.sort_unstable();
    let expected: Vec<i64> = (2..=current).collect();
    ensure!(
        revs == expected,
        "history has holes or duplicates (current {current})"
    );
    Ok(current)
}

async fn run_seed(seed: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let mut server = ServerProcess::start(dir.path()).await?;
    for round in 0..KILLS_PER_SEED {
        let endpoint = server.endpoint.clone();
        let writers = tokio::spawn(write_until_killed(endpoint, round, acked.clone()));
        let delay = Duration::from_millis(rng.random_range(300..1200));
        tokio::time::sleep(delay).await;
        server.kill9().await?;
        writers.await?;
        let before = acked.lock().expect("test mutex").len();
        server = ServerProcess::start(dir.path()).await?;
        let snapshot = acked.lock().expect("test mutex").clone();
        let current = verify(&server.endpoint, &snapshot).await?;
        // Revisions continue right after the recovered history.
        let mut c = connect(&server.endpoint).await?;
        let next =
            c.kv.put(PutRequest {
                key: format!("r{round}/after").into_bytes(),
                value: b"x".to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .header
            .map_or(0, |h| h.revision);
        ensure!(
            next == current + 1,
            "revision after restart {next}, expected {}",
            current + 1
        );
        acked.lock().expect("test mutex").push((
            format!("r{round}/after").into_bytes(),
            b"x".to_vec(),
            next,
        ));
        ensure!(
            before > 0,
            "seed {seed} round {round}: no write was acknowledged"
        );
        eprintln!(
            "seed {seed} round {round}: {before} acknowledged writes survived, revision {next}"
        );
    }
    server.kill9().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_concurrent_writes_loses_no_acknowledged_write() -> Result<()> {
    for seed in 1..=3 {
        run_seed(seed).await?;
    }
    Ok(())
}
