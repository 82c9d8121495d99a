//! `client`: put and 1k-key range latency of revwatch's client against the `etcd-client`
//! crate, on the same single-member etcd, interleaved so both see the same noise.

use std::time::Instant;

use anyhow::Context;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
use revwatch::client::{Client, ClientConfig};
use revwatch_testkit::etcd::EtcdCluster;

use crate::{
    report::Report,
    stats::{Samples, ratio},
};

const RANGE_KEYS: usize = 1000;

pub async fn run(quick: bool) -> anyhow::Result<Report> {
    let (puts, ranges) = if quick { (2_000, 300) } else { (20_000, 3_000) };
    let etcd = EtcdCluster::single().await.context("starting etcd")?;
    let endpoint = etcd.endpoint(0);

    let ours = Client::connect(ClientConfig::new([endpoint.clone()])).await?;
    let mut theirs = etcd_client::Client::connect([endpoint.as_str()], None).await?;

    // A prefix of exactly RANGE_KEYS keys for the range figure.
    for i in 0..RANGE_KEYS {
        ours.put(PutRequest {
            key: format!("/bench/range/{i:05}").into_bytes(),
            value: vec![b'v'; 64],
            ..Default::default()
        })
        .await?;
    }
    let range_req = RangeRequest {
        key: b"/bench/range/".to_vec(),
        range_end: b"/bench/range0".to_vec(),
        ..Default::default()
    };
    let range_opts = || etcd_client::GetOptions::new().with_prefix();

    let value = vec![b'x'; 128];
    let (mut our_put, mut their_put) = (Samples::with_capacity(puts), Samples::with_capacity(puts));
    for i in 0..puts {
        let key = format!("/bench/put/{}", i % 1000);
        let t = Instant::now();
        ours.put(PutRequest {
            key: key.clone().into_bytes(),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
        our_put.push(t.elapsed());
        let t = Instant::now();
        theirs.put(key, value.clone(), None).await?;
        their_put.push(t.elapsed());
    }

    let (mut our_range, mut their_range) = (
        Samples::with_capacity(ranges),
        Samples::with_capacity(ranges),
    );
    for _ in 0..ranges {
        let t = Instant::now();
        let got = ours.range(range_req.clone()).await?;
        our_range.push(t.elapsed());
        anyhow::ensure!(
            got.kvs.len() == RANGE_KEYS,
            "our range returned {} keys",
            got.kvs.len()
        );
        let t = Instant::now();
        let got = theirs.get("/bench/range/", Some(range_opts())).await?;
        their_range.push(t.elapsed());
        anyhow::ensure!(
            got.kvs().len() == RANGE_KEYS,
            "baseline range returned {} keys",
            got.kvs().len()
        );
    }

    let mut report = Report::new("client");
    report.figure("client_put_p50_us", our_put.p50());
    report.figure("etcd_client_put_p50_us", their_put.p50());
    report.figure("put_p50_ratio", ratio(our_put.p50(), their_put.p50()));
    report.figure("client_range_1k_p50_us", our_range.p50());
    report.figure("etcd_client_range_1k_p50_us", their_range.p50());
    report.figure(
        "range_1k_p50_ratio",
        ratio(our_range.p50(), their_range.p50()),
    );
    report.figure("samples_put", our_put.len() as f64);
    report.figure("samples_range", our_range.len() as f64);
    Ok(report)
}
