//! Load generators shared by the suites. Every generator talks to an endpoint through
//! revwatch's client, so the server under test is the only thing that differs.

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_proto::etcdserverpb::{PutRequest, RequestOp, TxnRequest, request_op::Request};
use etcd_proto::mvccpb::event::EventType;
use revwatch::client::{Client, ClientConfig, WatchCreateRequest};

use crate::stats::Samples;

pub async fn connect(endpoint: &str) -> anyhow::Result<Client> {
    Client::connect(ClientConfig::new([endpoint.to_owned()]))
        .await
        .with_context(|| format!("connecting to {endpoint}"))
}

/// Acknowledged puts from `clients` independent connections, each doing one put at a
/// time, for `duration`: how many, and how long they took.
pub async fn put_throughput(
    endpoint: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = connect(endpoint).await?;
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + duration;
            let mut done = 0u64;
            while Instant::now() < deadline {
                let req = PutRequest {
                    key: format!("/bench/tput/{c}/{}", done % 100).into_bytes(),
                    value: vec![b'x'; 128],
                    ..Default::default()
                };
                client.put(req).await?;
                done += 1;
            }
            Ok::<_, revwatch::client::Error>(done)
        }));
    }
    let start = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((total, start.elapsed()))
}

/// Put sent → the event received by a watcher on another connection, `n` times.
pub async fn watch_latency(endpoint: &str, n: usize) -> anyhow::Result<Samples> {
    let writer = connect(endpoint).await?;
    let watcher = connect(endpoint).await?;
    let key = b"/bench/watch/k".to_vec();
    let mut stream = watcher
        .watch(WatchCreateRequest {
            key: key.clone(),
            ..Default::default()
        })
        .await?;
    // The created reply comes first; events only after it.
    let created = stream
        .message()
        .await?
        .context("watch closed before created")?;
    anyhow::ensure!(created.created, "first watch reply was not `created`");

    let mut samples = Samples::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let put = writer.put(PutRequest {
            key: key.clone(),
            value: i.to_string().into_bytes(),
            ..Default::default()
        });
        let event = async {
            loop {
                let msg = stream.message().await?.context("watch closed")?;
                if msg.events.iter().any(|e| e.r#type == EventType::Put as i32) {
                    return Ok::<_, anyhow::Error>(t.elapsed());
                }
            }
        };
        let (put, seen) = tokio::join!(put, event);
        put?;
        samples.push(seen?);
    }
    Ok(samples)
}

/// Writes `n` keys of `value_len` bytes under `prefix`, 100 per txn.
pub async fn load_keys(
    endpoint: &str,
    prefix: &str,
    n: usize,
    value_len: usize,
) -> anyhow::Result<()> {
    load_keys_concurrently(endpoint, prefix, n, value_len, 1).await
}

/// [`load_keys`] from `writers` connections at once, each writing its own share of
/// the keys (for the million-key data sets).
pub async fn load_keys_concurrently(
    endpoint: &str,
    prefix: &str,
    n: usize,
    value_len: usize,
    writers: usize,
) -> anyhow::Result<()> {
    const PER_TXN: usize = 100;
    let txns = n.div_ceil(PER_TXN);
    let writers = writers.clamp(1, txns.max(1));
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let client = connect(endpoint).await?;
        let (prefix, value) = (prefix.to_owned(), vec![b'v'; value_len]);
        tasks.push(tokio::spawn(async move {
            // Writer `w` takes every `writers`-th txn.
            for chunk_start in (w * PER_TXN..n).step_by(writers * PER_TXN) {
                let success = (chunk_start..(chunk_start + PER_TXN).min(n))
                    .map(|i| RequestOp {
                        request: Some(Request::RequestPut(PutRequest {
                            key: format!("{prefix}{i:08}").into_bytes(),
                            value: value.clone(),
                            ..Default::default()
                        })),
                    })
                    .collect();
                client
                    .txn(TxnRequest {
                        success,
                        ..Default::default()
                    })
                    .await?;
            }
            Ok::<_, revwatch::client::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// CPU time a process has used so far (user and system, all its threads), from
/// /proc. Linux reports it in USER_HZ ticks: 100 per second on x86 and ARM.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    const TICK_MS: u64 = 10;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("no CPU times in /proc/{pid}/stat"))?;
    Ok(Duration::from_millis(ticks.saturating_mul(TICK_MS)))
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2, the command name, may hold spaces and parentheses; the rest are numbers.
    // After it come field 3 (the state) onwards, so fields 14 and 15 are at 11 and 12.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// Resident set size of a process, in MiB, from /proc.
pub fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    proc_status_mb(pid, "VmRSS")
}

/// Peak resident set size of a process since it started, in MiB, from /proc.
pub fn peak_rss_mb(pid: u32) -> anyhow::Result<f64> {
    proc_status_mb(pid, "VmHWM")
}

/// A `kB` field of /proc/PID/status, in MiB.
fn proc_status_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} line"))?;
    Ok(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(281));
        assert_eq!(cpu_ticks("42 (x) S 1 2"), None);
        let own = cpu_time(std::process::id()).expect("own stat");
        assert!(own < Duration::from_secs(24 * 3600), "{own:?}");
    }
}
