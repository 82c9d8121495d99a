//! The fleet view: every `serve` instance registers under a lease, `revwatch fleet`
//! lists the live ones, and a killed instance disappears within the lease TTL.

mod common;
mod serve_support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{etcdctl, put};
use serde_json::Value;
use serve_support::Serve;

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
/// The registration lease's TTL (`serve`'s `LEASE_TTL_SECS`).
const LEASE_TTL: Duration = Duration::from_secs(10);

/// `revwatch fleet --json` against `etcd`.
fn fleet(etcd: &str) -> Value {
    let out = Command::new(BIN)
        .args(["fleet", "--json", "--endpoints", etcd])
        .output()
        .expect("run revwatch fleet");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("fleet JSON")
}

/// The `listen` URLs of the listed instances, sorted.
fn listens(fleet: &Value) -> Vec<String> {
    let mut urls: Vec<String> = fleet["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["listen"].as_str().expect("listen").to_owned())
        .collect();
    urls.sort();
    urls
}

/// The fleet once both instances register the same digest, ready, and `done` holds.
fn converged(etcd: &str, done: impl Fn(&Value) -> bool) -> Value {
    eventually(Duration::from_secs(15), || {
        let f = fleet(etcd);
        let instances = f["instances"].as_array()?;
        let same = instances.len() == 2
            && instances[0]["policy_digest"] == instances[1]["policy_digest"]
            && instances.iter().all(|i| i["state"] == "ready");
        (same && done(&f)).then_some(f)
    })
    .unwrap_or_else(|| panic!("the fleet did not converge; got {}", fleet(etcd)))
}

/// Polls `probe` until it returns `Some`, for at most `within`.
fn eventually<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn fleet_lists_live_instances_and_a_killed_one_leaves_within_its_ttl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Serve::embedded(dir.path(), &[]);
    first.await_stderr("ready: policy set at revision");
    let second = Serve::spawn(&["--endpoints", &first.etcd], &first.etcd, &[]);
    second.await_stderr("ready: policy set at revision");

    let both = {
        let mut expected = vec![
            format!("http://{}", first.addr),
            format!("http://{}", second.addr),
        ];
        expected.sort();
        expected
    };
    let listed = eventually(Duration::from_secs(10), || {
        let f = fleet(&first.etcd);
        let ready = f["instances"]
            .as_array()
            .is_some_and(|i| i.iter().all(|i| i["state"] == "ready"));
        (listens(&f) == both && ready).then_some(f)
    })
    .unwrap_or_else(|| panic!("both instances listed as ready; got {}", fleet(&first.etcd)));
    assert_eq!(listed["behind"], 0, "{listed}");
    assert_eq!(listed["degraded"], 0, "{listed}");
    let revision = &listed["newest_revision"];
    assert!(revision.as_i64().is_some_and(|r| r > 0), "{listed}");
    for instance in listed["instances"].as_array().expect("instances") {
        assert_eq!(&instance["active_revision"], revision, "{listed}");
        assert_eq!(instance["behind"], false, "{listed}");
    }

    let digest = listed["instances"][0]["policy_digest"].clone();
    assert!(digest.as_str().is_some_and(|d| d.len() == 16), "{listed}");
    assert_eq!(listed["instances"][1]["policy_digest"], digest, "{listed}");

    // Direct mode: deleting an older file leaves the newest file revision as it was,
    // but the files differ, and so does the digest both instances converge on.
    let prefix = "/revwatch/policies/";
    let permit = "permit(principal, action, resource) when { false };";
    put(&first.etcd, &format!("{prefix}old.cedar"), permit);
    let newest = put(&first.etcd, &format!("{prefix}new.cedar"), permit);
    let with_both = converged(&first.etcd, |f| f["newest_revision"] == newest);
    etcdctl(&first.etcd, &["del", &format!("{prefix}old.cedar")]);
    let without_old = converged(&first.etcd, |f| {
        f["instances"][0]["policy_digest"] != with_both["instances"][0]["policy_digest"]
    });
    assert_eq!(without_old["newest_revision"], newest, "{without_old}");
    assert_eq!(without_old["behind"], 0, "{without_old}");

    // The human table names both and sums up.
    let text = Command::new(BIN)
        .args(["fleet", "--endpoints", &first.etcd])
        .output()
        .expect("run revwatch fleet");
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(
        text.contains(&first.addr) && text.contains(&second.addr),
        "{text}"
    );
    assert!(text.contains("2 instances"), "{text}");

    // The same counts are metrics (recomputed every 2 s from the mirror).
    let counted = eventually(Duration::from_secs(10), || {
        let (_, metrics) = first.get("/metrics");
        let metrics = metrics.as_str().unwrap_or_default().to_owned();
        metrics
            .contains("revwatch_fleet_instances 2")
            .then_some(metrics)
    })
    .expect("revwatch_fleet_instances 2 in /metrics");
    assert!(counted.contains("revwatch_fleet_behind 0"), "{counted}");
    assert!(counted.contains("revwatch_fleet_degraded 0"), "{counted}");

    // SIGKILL: no revocation, the lease must expire.
    let killed_at = Instant::now();
    drop(second);
    let only_first = vec![format!("http://{}", first.addr)];
    eventually(LEASE_TTL + Duration::from_secs(5), || {
        (listens(&fleet(&first.etcd)) == only_first).then_some(())
    })
    .unwrap_or_else(|| panic!("killed instance still listed; got {}", fleet(&first.etcd)));
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after <= LEASE_TTL + Duration::from_secs(5),
        "gone after {gone_after:?}"
    );

    // A clean stop revokes the lease: the instance leaves at once.
    let third = Serve::spawn(&["--endpoints", &first.etcd], &first.etcd, &[]);
    third.await_stderr("ready: policy set at revision");
    eventually(Duration::from_secs(10), || {
        (listens(&fleet(&first.etcd)).len() == 2).then_some(())
    })
    .expect("third instance listed");
    assert!(third.terminate().success());
    assert_eq!(listens(&fleet(&first.etcd)), only_first);
    assert!(first.terminate().success());
}
