//! `server`: the embedded server against etcd 3.4 on the same machine, both with fsync
//! on, measured in the same run with the same client: put throughput with 16 concurrent
//! clients, watch latency, and memory with 100k keys (fresh servers), and after the put
//! rounds.

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

    // Alternate rounds so both servers see the same background noise.
    let (mut etcd_tput, mut our_tput) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        etcd_tput.push(load::put_throughput(&etcd_ep, CLIENTS, round_len).await?);
        our_tput.push(load::put_throughput(&our_ep, CLIENTS, round_len).await?);
    }

    let etcd_watch = load::watch_latency(&etcd_ep, watch_n).await?;
    let our_watch = load::watch_latency(&our_ep, watch_n).await?;
    // Both keep the put rounds' history until a compaction: etcd in its database file,
    // of which only the pages touched are resident, the embedded server in memory.
    let (etcd_after_puts, our_after_puts) = (rss(&etcd)?, load::rss_mb(ours.pid())?);
    drop((etcd, ours));

    let (etcd_mem, our_mem) = memory_with_keys(KEYS).await?;

    let mut report = Report::new("server");
    let (e, s) = (median(&etcd_tput), median(&our_tput));
    report.figure("server_put_per_s", s);
    report.figure("etcd_put_per_s", e);
    report.figure("put_ratio", ratio(s, e));
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
