//! `server`: the embedded server against etcd 3.4 on the same machine, both with fsync
//! on, measured in the same run with the same client: put throughput with 16 concurrent
//! clients, watch latency, and memory with 100k keys (fresh servers), and after the put
//! rounds.
//!
//! The put rounds also report CPU time per put, of each server and of the client driving
//! it. The two share the machine's cores, so on a small machine the client's share bounds
//! the throughput either server can show.

use std::time::Duration;

use anyhow::Context;
use revwatch_testkit::etcd::EtcdCluster;

use super::{embedded::EmbeddedChild, load};
use crate::{
    report::Report,
    stats::{median, ratio},
};

const CLIENTS: usize = 16;

pub async fn run(quick: bool) -> anyhow::Result<Report> {
    let (rounds, round_len, watch_n) = if quick {
        (3, Duration::from_secs(3), 300)
    } else {
        (5, Duration::from_secs(10), 2000)
    };

    let etcd = EtcdCluster::single().await.context("starting etcd")?;
    let ours = EmbeddedChild::start().await?;
    let (etcd_ep, our_ep) = (etcd.endpoint(0), ours.endpoint());

    let etcd_pid = etcd.pid(0).context("etcd has no pid")?;
    // Alternate rounds so both servers see the same background noise.
    let (mut etcd_rounds, mut our_rounds) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        etcd_rounds.push(PutRound::run(&etcd_ep, etcd_pid, round_len).await?);
        our_rounds.push(PutRound::run(&our_ep, ours.pid(), round_len).await?);
    }

    let etcd_watch = load::watch_latency(&etcd_ep, watch_n).await?;
    let our_watch = load::watch_latency(&our_ep, watch_n).await?;
    // Both keep the put rounds' history until a compaction: etcd in its database file,
    // of which only the pages touched are resident, the embedded server in memory.
    let (etcd_after_puts, our_after_puts) = (load::rss_mb(etcd_pid)?, load::rss_mb(ours.pid())?);
    drop((etcd, ours));

    let (etcd_mem, our_mem) = memory_with_keys(KEYS).await?;

    let mut report = Report::new("server");
    let (e, s) = (
        PutRound::medians(&etcd_rounds),
        PutRound::medians(&our_rounds),
    );
    report.figure("server_put_per_s", s.per_s);
    report.figure("etcd_put_per_s", e.per_s);
    report.figure("put_ratio", ratio(s.per_s, e.per_s));
    report.figure("server_cpu_us_per_put", s.server_us);
    report.figure("etcd_cpu_us_per_put", e.server_us);
    report.figure("cpu_per_put_ratio", ratio(s.server_us, e.server_us));
    report.figure("client_cpu_us_per_put_server", s.client_us);
    report.figure("client_cpu_us_per_put_etcd", e.client_us);
    report.figure("server_watch_p50_us", our_watch.p50());
    report.figure("etcd_watch_p50_us", etcd_watch.p50());
    report.figure("server_watch_p99_us", our_watch.p99());
    report.figure("etcd_watch_p99_us", etcd_watch.p99());
    report.figure("watch_p50_ratio", ratio(our_watch.p50(), etcd_watch.p50()));
    report.figure("server_rss_mb", our_mem);
    report.figure("etcd_rss_mb", etcd_mem);
    report.figure("server_rss_after_puts_mb", our_after_puts);
    report.figure("etcd_rss_after_puts_mb", etcd_after_puts);
    Ok(report)
}

/// One put round against one server: its rate, and the CPU time per put of the server
/// and of this process (the client).
struct PutRound {
    per_s: f64,
    server_us: f64,
    client_us: f64,
}

impl PutRound {
    async fn run(endpoint: &str, server_pid: u32, len: Duration) -> anyhow::Result<Self> {
        let me = std::process::id();
        let (server0, client0) = (load::cpu_time(server_pid)?, load::cpu_time(me)?);
        let (puts, elapsed) = load::put_throughput(endpoint, CLIENTS, len).await?;
        let (server1, client1) = (load::cpu_time(server_pid)?, load::cpu_time(me)?);
        let per_put = |cpu: Duration| cpu.as_secs_f64() * 1e6 / puts.max(1) as f64;
        Ok(PutRound {
            per_s: puts as f64 / elapsed.as_secs_f64(),
            server_us: per_put(server1.saturating_sub(server0)),
            client_us: per_put(client1.saturating_sub(client0)),
        })
    }

    /// Each figure's median over `rounds`.
    fn medians(rounds: &[PutRound]) -> PutRound {
        let m =
            |figure: fn(&PutRound) -> f64| median(&rounds.iter().map(figure).collect::<Vec<_>>());
        PutRound {
            per_s: m(|r| r.per_s),
            server_us: m(|r| r.server_us),
            client_us: m(|r| r.client_us),
        }
    }
}

/// Keys the memory figures are taken with.
const KEYS: usize = 100_000;

/// Resident memory of a fresh etcd and a fresh embedded server holding `keys` keys of 100
/// bytes, written 100 per txn: `(etcd, ours)`.
async fn memory_with_keys(keys: usize) -> anyhow::Result<(f64, f64)> {
    let etcd = EtcdCluster::single().await.context("starting etcd")?;
    let ours = EmbeddedChild::start().await?;
    load::load_keys(&etcd.endpoint(0), "/bench/mem/", keys, 100).await?;
    load::load_keys(&ours.endpoint(), "/bench/mem/", keys, 100).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok((rss(&etcd)?, load::rss_mb(ours.pid())?))
}

fn rss(etcd: &EtcdCluster) -> anyhow::Result<f64> {
    load::rss_mb(etcd.pid(0).context("etcd has no pid")?)
}
