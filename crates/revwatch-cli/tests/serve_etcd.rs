//! `revwatch serve` against real etcd 3.4: a decision flips with the revision of
//! the put that changed the policy, read-your-writes never answers from the
//! older set, and `--progress-trust` decides whether a quiet prefix's progress is
//! verified by a read.

mod common;
mod serve_support;

use common::put;
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::json;
use serve_support::{example_file, put_example_model_and_grants, serve_example};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_flip_with_the_revision_of_a_put_to_real_etcd() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let roles = example_file("policies/roles.csv");
    put_example_model_and_grants(&ep);
    let loaded = put(&ep, "/authz/policies/roles.csv", &roles);

    let serve = serve_example(&ep, &[]);
    serve.await_stderr(&format!("ready: policy set at revision {loaded}"));
    let bob = r#"{"principal": "bob", "action": "write", "resource": "plan", "context": {"dom": "acme"}}"#;
    let (code, before) = serve.post("/v1/authorize", bob);
    assert_eq!(
        (code, &before["decision"]),
        (200, &json!("deny")),
        "{before}"
    );

    for round in 0..5 {
        // Grant, then revoke: each answer with the put's revision reflects that put.
        let granted = round % 2 == 0;
        let rows = if granted {
            format!("{roles}g, bob, editor, acme\n")
        } else {
            roles.clone()
        };
        let revision = put(&ep, "/authz/policies/roles.csv", &rows);
        let q = format!(
            r#"{{"principal": "bob", "action": "write", "resource": "plan", "context": {{"dom": "acme"}}, "consistency": {{"min_revision": {revision}}}}}"#
        );
        let (code, answer) = serve.post("/v1/authorize", &q);
        assert_eq!(code, 200, "{answer}");
        let expected = if granted { "allow" } else { "deny" };
        assert_eq!(answer["decision"], expected, "round {round}: {answer}");
        assert!(answer["revision"].as_i64().expect("revision") >= revision);
        if granted {
            assert_eq!(
                answer["policy_ids"],
                json!(["policies/grants.csv:3"]),
                "{answer}"
            );
        }
    }
    assert!(serve.terminate().success(), "exit status after SIGTERM");
}

/// The value of the counter `line_start` (a metric name with its labels) in a
/// Prometheus text exposition.
fn counter(metrics: &str, line_start: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start:?} in {metrics}"))
}

/// On etcd 3.4 (whose progress replies may run ahead of their events), `serve`
/// verifies a progress reply with a read before a quiet prefix counts as up to
/// date; `--progress-trust immediate`, for etcd that orders them, skips the read.
/// Either way a fully consistent decision is made at or after the last write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_trust_decides_whether_a_quiet_prefix_is_verified_by_a_read() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let loaded = put_example_model_and_grants(&ep);
    for (extra, verified) in [
        (&[][..], true),
        (&["--progress-trust", "immediate"][..], false),
    ] {
        let serve = serve_example(&ep, extra);
        serve.await_stderr("ready: policy set at revision");
        // Outside the prefix: only a bookmark can show the mirror is at it.
        let outside = put(&ep, "/elsewhere/x", "y");
        assert!(outside > loaded);
        let q = r#"{"principal": "bob", "action": "write", "resource": "plan", "context": {"dom": "acme"}, "consistency": "fully_consistent"}"#;
        let (code, answer) = serve.post("/v1/authorize", q);
        assert_eq!(code, 200, "{extra:?}: {answer}");
        let at = answer["revision"].as_i64().expect("revision");
        assert!(
            at >= outside,
            "{extra:?}: decided at {at}, before {outside}"
        );

        let metrics = serve.metrics();
        let [bookmarks, changed, failed] = ["bookmark", "changed", "failed"].map(|cause| {
            counter(
                &metrics,
                &format!(r#"revwatch_mirror_progress_verifications_total{{cause="{cause}"}}"#),
            )
        });
        if verified {
            assert!(
                bookmarks >= 1,
                "{extra:?}: no verified bookmark in {metrics}"
            );
        } else {
            let reads = bookmarks + changed + failed;
            assert_eq!(reads, 0, "{extra:?}: a verification read was made");
        }
        assert!(
            serve.terminate().success(),
            "{extra:?}: exit status after SIGTERM"
        );
    }
}
