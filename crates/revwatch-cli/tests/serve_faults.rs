//! `revwatch serve` while its etcd 3.4 dies and comes back: health degrades,
//! decisions go on with the last set until `--max-staleness`, then fail closed;
//! after a restart on the same data dir health recovers and a decision asked
//! with the revision of a later put reflects that put.

mod common;
mod serve_support;

use std::time::{Duration, Instant};

use common::{WAIT, put};
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::{Value, json};
use serve_support::{
    example_file, http_unix, put_example_model_and_grants, serve_example, serve_exits,
};

/// The staleness after which `serve` fails closed in this test.
const MAX_STALENESS: Duration = Duration::from_secs(3);

/// Polls `probe` every 100 ms until it returns `Some`, for at most [`WAIT`].
fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Puts the example set, with bob an editor in acme; the revision of the last put.
fn put_example_granting_bob(ep: &str, roles: &str) -> i64 {
    put_example_model_and_grants(ep);
    put(
        ep,
        "/authz/policies/roles.csv",
        &format!("{roles}g, bob, editor, acme\n"),
    )
}

/// An allow from the set `granted` put, or from a later one: its revision may be
/// past `granted` by this instance's own fleet registration (a key under the prefix).
fn assert_granted(code: u16, answer: &Value, granted: i64) {
    assert_eq!(
        (code, &answer["decision"]),
        (200, &json!("allow")),
        "{answer}"
    );
    let revision = answer["revision"].as_i64().expect("revision");
    assert!(revision >= granted, "{answer}");
}

fn bob_writes(consistency: Option<i64>) -> String {
    let mut q = json!({
        "principal": "bob", "action": "write", "resource": "plan",
        "context": {"dom": "acme"},
    });
    if let Some(revision) = consistency {
        q["consistency"] = json!({ "min_revision": revision });
    }
    q.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_outlive_a_killed_etcd_until_max_staleness_then_fail_closed() {
    let mut etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let roles = example_file("policies/roles.csv");
    let granted = put_example_granting_bob(&ep, &roles);

    let max_staleness = format!("{}s", MAX_STALENESS.as_secs());
    let serve = serve_example(&ep, &["--max-staleness", &max_staleness]);
    serve.await_stderr(&format!("ready: policy set at revision {granted}"));
    let (code, answer) = serve.post("/v1/authorize", &bob_writes(None));
    assert_eq!(
        (code, &answer["decision"]),
        (200, &json!("allow")),
        "{answer}"
    );
    // The mirror's readiness reaches the policy state just after the first set.
    eventually("a ready, undegraded service", || {
        let (code, body) = serve.get("/health/ready");
        (code == 200 && body["degraded"] == json!(false)).then_some(())
    });

    etcd.kill(0).expect("kill etcd");
    let killed = Instant::now();

    // Degraded but still deciding on the last set.
    let degraded = eventually("a degraded readiness body", || {
        let (code, body) = serve.get("/health/ready");
        (body["degraded"] == json!(true)).then_some((code, body))
    });
    let (code, answer) = serve.post("/v1/authorize", &bob_writes(None));
    // A killed etcd resets the watch connection, so this is seen well within
    // the maximum staleness.
    let noticed = killed.elapsed();
    assert!(
        noticed < MAX_STALENESS,
        "noticed the dead etcd only after {noticed:?}"
    );
    assert_eq!(degraded.0, 200, "{}", degraded.1);
    assert_eq!(degraded.1["ready"], json!(true), "{}", degraded.1);
    assert_granted(code, &answer, granted);
    assert_eq!(
        answer["policy_ids"],
        json!(["policies/grants.csv:3"]),
        "{answer}"
    );
    assert!(answer.get("reason").is_none(), "{answer}");

    // Past the maximum staleness: not ready, and every decision a reasoned deny.
    let (code, health) = eventually("readiness to fail", || {
        let (code, body) = serve.get("/health/ready");
        (code == 503).then_some((code, body))
    });
    assert!(
        killed.elapsed() >= MAX_STALENESS,
        "failed closed before the maximum staleness: {health}"
    );
    assert_eq!((code, &health["ready"]), (503, &json!(false)), "{health}");
    let (code, answer) = serve.post("/v1/authorize", &bob_writes(None));
    assert_eq!(
        (code, &answer["decision"]),
        (200, &json!("deny")),
        "{answer}"
    );
    let reason = answer["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("maximum staleness"), "{answer}");
    assert_eq!(answer["policy_ids"], json!([]), "{answer}");

    // Back on the same data dir: health recovers, and a revoke made after the
    // restart is what a decision at its revision sees.
    etcd.restart(0).await.expect("restart etcd");
    eventually("readiness to recover", || {
        let (code, body) = serve.get("/health/ready");
        (code == 200 && body["degraded"] == json!(false)).then_some(())
    });
    let revoked = put(&ep, "/authz/policies/roles.csv", &roles);
    assert!(revoked > granted, "the restart kept etcd's history");
    let (code, answer) = serve.post("/v1/authorize", &bob_writes(Some(revoked)));
    assert_eq!(
        (code, &answer["decision"]),
        (200, &json!("deny")),
        "{answer}"
    );
    assert!(answer.get("reason").is_none(), "{answer}");
    assert!(
        answer["revision"].as_i64().expect("revision") >= revoked,
        "{answer}"
    );
    let (_, status) = serve.get("/v1/status");
    assert_eq!(status["policy"]["state"], Value::from("ready"), "{status}");
    assert!(serve.terminate().success(), "exit status after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decides_over_a_unix_socket_replacing_a_stale_one_and_removing_it_at_exit() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let granted = put_example_granting_bob(&ep, &example_file("policies/roles.csv"));
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("revwatch.sock");
    // What a killed instance leaves behind: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    assert!(socket.exists());

    let socket_arg = socket.to_str().expect("utf-8 path");
    let serve = serve_example(&ep, &["--unix-socket", socket_arg]);
    serve.await_stderr(&format!("ready: policy set at revision {granted}"));
    let (code, body) = http_unix(&socket, "POST", "/v1/authorize", &bob_writes(None));
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_granted(code, &answer, granted);
    // The TCP listener serves as well.
    let (code, answer) = serve.post("/v1/authorize", &bob_writes(None));
    assert_eq!(
        (code, &answer["decision"]),
        (200, &json!("allow")),
        "{answer}"
    );

    assert!(serve.terminate().success(), "exit status after SIGTERM");
    assert!(!socket.exists(), "the socket file outlived serve");
}

#[test]
fn refuses_a_unix_socket_path_that_is_not_a_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("precious.txt");
    std::fs::write(&file, "keep me").expect("write");
    let (status, stderr) = serve_exits(&[
        "--endpoints",
        "http://127.0.0.1:9",
        "--listen",
        &common::free_addr(),
        "--unix-socket",
        file.to_str().expect("utf-8 path"),
    ]);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");
}
