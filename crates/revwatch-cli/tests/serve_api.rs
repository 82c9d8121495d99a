//! `revwatch serve` over real HTTP: the API's contract, one test per error case, and
//! the embedded default end to end (seeded set, etcdctl changes, read-your-writes,
//! last-known-good).

mod common;
mod serve_support;

use common::{etcdctl, free_addr, put};
use serde_json::{Value, json};
use serve_support::Serve;

const BOB_WRITES: &str =
    r#"{"principal": "User::\"bob\"", "action": "Action::\"write\"", "resource": "Doc::\"plan\""}"#;

/// `BOB_WRITES` with a consistency requirement.
fn bob_writes_at(consistency: Value) -> String {
    let mut q: Value = serde_json::from_str(BOB_WRITES).expect("json");
    q["consistency"] = consistency;
    q.to_string()
}

fn embedded(extra: &[&str]) -> (tempfile::TempDir, Serve) {
    let dir = tempfile::tempdir().expect("tempdir");
    let serve = embedded_in(&dir, extra);
    (dir, serve)
}

fn embedded_in(dir: &tempfile::TempDir, extra: &[&str]) -> Serve {
    let serve = Serve::embedded(dir.path(), extra);
    serve.await_stderr("ready: policy set at revision");
    serve
}

fn assert_error(got: (u16, Value), code: u16, error: &str) {
    assert_eq!(got.0, code, "{:?}", got.1);
    assert_eq!(got.1["error"], error, "{:?}", got.1);
    assert!(
        got.1["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "no detail: {:?}",
        got.1
    );
}

#[test]
fn embedded_default_seeds_decides_flips_and_keeps_last_known_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("decisions.jsonl");
    let serve = embedded_in(&dir, &["--decision-log", log_path.to_str().expect("utf-8")]);
    let ep = serve.etcd.clone();

    let (code, first) = serve.post("/v1/authorize", BOB_WRITES);
    assert_eq!(code, 200, "{first}");
    assert_eq!(first["decision"], "deny");
    let seeded = first["revision"].as_i64().expect("revision");
    assert!(first["decision_id"].is_string());

    // A policy added with etcdctl; read-your-writes with the put's revision.
    let grant = r#"@id("bob-writes") permit(principal == User::"bob", action == Action::"write", resource);"#;
    let granted = put(&ep, "/revwatch/policies/bob.cedar", grant);
    assert!(granted > seeded);
    let (code, after) = serve.post(
        "/v1/authorize",
        &bob_writes_at(json!({"min_revision": granted})),
    );
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["decision"], "allow");
    assert_eq!(after["policy_ids"], json!(["bob-writes"]));
    assert!(after["revision"].as_i64().expect("revision") >= granted);
    let (code, linear) = serve.post("/v1/authorize", &bob_writes_at(json!("fully_consistent")));
    assert_eq!(
        (code, &linear["decision"]),
        (200, &json!("allow")),
        "{linear}"
    );
    // A write outside the prefix: a fully consistent decision now needs a
    // bookmark, which the embedded server's progress replies give without a
    // verification read (see the metrics below).
    put(&ep, "/elsewhere/x", "y");
    let (code, quiet) = serve.post("/v1/authorize", &bob_writes_at(json!("fully_consistent")));
    assert_eq!(code, 200, "{quiet}");

    // A batch is decided at one revision.
    let batch = format!(
        r#"{{"requests": [{BOB_WRITES}, {{"principal": "User::\"alice\"", "action": "Action::\"read\"", "resource": "Doc::\"x\""}}, {{"principal": "nope", "action": "Action::\"read\"", "resource": "Doc::\"x\""}}]}}"#
    );
    let (code, answer) = serve.post("/v1/authorize/batch", &batch);
    assert_eq!(code, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["decision"], "allow");
    assert_eq!(results[1]["policy_ids"], json!(["editors-read-write"]));
    assert_eq!(results[2]["error"], "invalid_request");
    assert_eq!(results[0]["revision"], answer["revision"]);
    assert_eq!(results[1]["revision"], answer["revision"]);

    // A broken policy: last-known-good keeps deciding, status names the key.
    let broken = put(&ep, "/revwatch/policies/broken.cedar", "permit(");
    let (code, refused) = serve.post(
        "/v1/authorize",
        &bob_writes_at(json!({"min_revision": broken})),
    );
    assert_eq!(code, 503, "{refused}");
    assert_eq!(refused["error"], "not_fresh_enough");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("broken.cedar"))
    );
    let (code, still) = serve.post("/v1/authorize", BOB_WRITES);
    assert_eq!(
        (code, &still["decision"]),
        (200, &json!("allow")),
        "{still}"
    );
    assert!(still["revision"].as_i64().expect("revision") < broken);
    let (_, status) = serve.get("/v1/status");
    let rejection = &status["policy"]["last_rejection"];
    assert_eq!(
        rejection["key"], "/revwatch/policies/broken.cedar",
        "{status}"
    );
    assert_eq!(rejection["revision"], broken);
    assert_eq!(status["policy"]["state"], "degraded");
    let (code, ready) = serve.get("/health/ready");
    assert_eq!(code, 200, "{ready}");
    assert_eq!(
        (ready["ready"].clone(), ready["degraded"].clone()),
        (json!(true), json!(true))
    );
    let metrics = serve.metrics();
    for line in [
        r#"revwatch_policy_loads_total{result="failed"} 1"#,
        r#"revwatch_policy_load_failures_total{key="/revwatch/policies/broken.cedar"} 1"#,
        r#"revwatch_policy_state{state="degraded"} 1"#,
        r#"revwatch_mirror_progress_verifications_total{cause="bookmark"} 0"#,
        r#"revwatch_mirror_progress_verifications_total{cause="changed"} 0"#,
        r#"revwatch_mirror_progress_verifications_total{cause="failed"} 0"#,
    ] {
        assert!(metrics.contains(line), "no {line:?} in {metrics}");
    }

    // The fix is activated, and the decision is made at its revision.
    etcdctl(&ep, &["del", "/revwatch/policies/broken.cedar"]);
    let (_, ok) = serve.post("/v1/authorize", &bob_writes_at(json!("fully_consistent")));
    assert!(ok["revision"].as_i64().expect("revision") > broken, "{ok}");
    let (code, _) = serve.get("/health/ready");
    assert_eq!(code, 200);

    assert!(serve.terminate().success(), "exit status after SIGTERM");
    // Every decision above was logged, OPA-style, with its revision.
    let log = std::fs::read_to_string(&log_path).expect("decision log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let first_line = lines
        .iter()
        .find(|l| l["decision_id"] == first["decision_id"])
        .expect("the first decision is logged");
    assert_eq!(first_line["revision"], seeded);
    assert_eq!(first_line["result"]["decision"], "deny");
    assert_eq!(first_line["input"]["principal"], "User::\"bob\"");
    assert!(first_line["timestamp"].is_string());
}

// The contract: each error case, its status code and `{error, detail}` body.

#[test]
fn malformed_json_is_400() {
    let (_dir, serve) = embedded(&[]);
    assert_error(
        serve.post("/v1/authorize", "{not json"),
        400,
        "malformed_request",
    );
    assert_error(
        serve.post("/v1/authorize/batch", "[1,"),
        400,
        "malformed_request",
    );
}

#[test]
fn unknown_missing_or_mistyped_fields_are_400() {
    let (_dir, serve) = embedded(&[]);
    let extra = r#"{"principal": "User::\"bob\"", "action": "Action::\"read\"", "resource": "Doc::\"d\"", "why": 1}"#;
    assert_error(serve.post("/v1/authorize", extra), 400, "malformed_request");
    let missing = r#"{"principal": "User::\"bob\"", "action": "Action::\"read\""}"#;
    assert_error(
        serve.post("/v1/authorize", missing),
        400,
        "malformed_request",
    );
    let bad_consistency = bob_writes_at(json!({"min_revision": "soon"}));
    assert_error(
        serve.post("/v1/authorize", &bad_consistency),
        400,
        "malformed_request",
    );
    let bad_context = r#"{"principal": "User::\"bob\"", "action": "Action::\"read\"", "resource": "Doc::\"d\"", "context": [1]}"#;
    assert_error(
        serve.post("/v1/authorize", bad_context),
        400,
        "malformed_request",
    );
    let batch_extra = format!(r#"{{"requests": [{BOB_WRITES}], "mode": "fast"}}"#);
    assert_error(
        serve.post("/v1/authorize/batch", &batch_extra),
        400,
        "malformed_request",
    );
}

#[test]
fn an_unparseable_principal_is_422() {
    let (_dir, serve) = embedded(&[]);
    let q = r#"{"principal": "bob", "action": "Action::\"read\"", "resource": "Doc::\"d\""}"#;
    assert_error(serve.post("/v1/authorize", q), 422, "invalid_request");
}

#[test]
fn a_body_over_the_limit_is_413() {
    let (_dir, serve) = embedded(&["--max-body-bytes", "1024"]);
    let big = format!(
        r#"{{"principal": "{}", "action": "a", "resource": "r"}}"#,
        "x".repeat(4096)
    );
    assert_error(serve.post("/v1/authorize", &big), 413, "body_too_large");
    // Under the limit, the same endpoint answers.
    assert_eq!(serve.post("/v1/authorize", BOB_WRITES).0, 200);
}

#[test]
fn a_missing_or_wrong_token_is_401_and_health_needs_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let mut serve = embedded_in(&dir, &["--token-file", token_file.to_str().expect("utf-8")]);
    assert_error(serve.post("/v1/authorize", BOB_WRITES), 401, "unauthorized");
    assert_error(serve.get("/metrics"), 401, "unauthorized");
    assert_error(serve.get("/v1/status"), 401, "unauthorized");
    assert_error(serve.get("/v1/mirror/digest"), 401, "unauthorized");
    assert_eq!(serve.get("/health/ready").0, 200);
    assert_eq!(serve.get("/health/live").0, 200);
    serve.token = Some("s3cre7".into());
    assert_error(serve.post("/v1/authorize", BOB_WRITES), 401, "unauthorized");
    assert_error(serve.get("/v1/mirror/digest"), 401, "unauthorized");
    serve.token = Some("s3cret".into());
    assert_eq!(serve.post("/v1/authorize", BOB_WRITES).0, 200);
    assert_eq!(serve.get("/metrics").0, 200);
    assert_eq!(serve.get("/v1/mirror/digest").0, 200);
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405() {
    let (_dir, serve) = embedded(&[]);
    assert_error(serve.get("/v1/nothing"), 404, "not_found");
    assert_error(serve.get("/v1/authorize"), 405, "method_not_allowed");
    assert_error(serve.post("/health/ready", "{}"), 405, "method_not_allowed");
}

#[test]
fn the_mirror_digest_describes_the_mirror_without_its_values() {
    let (_dir, serve) = embedded(&[]);
    let is_digest = |d: &Value| {
        d.as_str().is_some_and(|d| {
            d.len() == 64
                && d.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
    };
    let (code, brief) = serve.get("/v1/mirror/digest");
    assert_eq!(code, 200, "{brief}");
    assert_eq!(brief["prefix"], "/revwatch/policies/");
    assert_eq!(brief["state"], "ready");
    assert!(brief["revision"].as_i64().is_some_and(|r| r > 0), "{brief}");
    assert!(is_digest(&brief["digest"]), "{brief}");
    assert!(brief.get("entries").is_none(), "{brief}");

    let (code, full) = serve.get("/v1/mirror/digest?keys=true");
    assert_eq!(code, 200, "{full}");
    let entries = full["entries"].as_array().expect("entries");
    assert_eq!(Some(entries.len() as u64), full["keys"].as_u64(), "{full}");
    let keys: Vec<&str> = entries
        .iter()
        .map(|e| e["key"].as_str().expect("a UTF-8 key"))
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "not in key order: {keys:?}"
    );
    for e in entries {
        // Sizes and digests, never values.
        let mut fields: Vec<&str> = e
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "create_revision",
                "digest",
                "key",
                "lease",
                "mod_revision",
                "value_bytes",
                "version"
            ]
        );
        assert!(is_digest(&e["digest"]), "{e}");
    }
    // A seeded file, as etcd has it.
    let key = "/revwatch/policies/example.cedar";
    let entry = entries
        .iter()
        .find(|e| e["key"] == key)
        .expect("the seeded policy");
    let got: Value =
        serde_json::from_str(&etcdctl(&serve.etcd, &["get", key, "-w", "json"])).expect("json");
    let kv = &got["kvs"][0];
    let value = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        kv["value"].as_str().expect("value"),
    )
    .expect("base64");
    assert_eq!(entry["value_bytes"], value.len());
    for field in ["create_revision", "mod_revision", "version"] {
        assert_eq!(entry[field], kv[field], "{field}");
    }

    // Only `keys=true|false` is understood; only GET.
    for query in ["keys=maybe", "key=true", "keys=true&values=true"] {
        assert_error(
            serve.get(&format!("/v1/mirror/digest?{query}")),
            400,
            "malformed_request",
        );
    }
    assert_error(
        serve.post("/v1/mirror/digest", "{}"),
        405,
        "method_not_allowed",
    );
}

#[test]
fn a_revision_not_reached_in_time_is_503() {
    let (_dir, serve) = embedded(&["--fresh-wait", "200ms"]);
    let q = bob_writes_at(json!({"min_revision": 1_000_000}));
    assert_error(serve.post("/v1/authorize", &q), 503, "not_fresh_enough");
    let batch =
        format!(r#"{{"requests": [{BOB_WRITES}], "consistency": {{"min_revision": 1000000}}}}"#);
    assert_error(
        serve.post("/v1/authorize/batch", &batch),
        503,
        "not_fresh_enough",
    );
}

#[test]
fn without_a_policy_set_decisions_and_readiness_are_503() {
    // Nothing answers at this endpoint: no set is ever loaded.
    let nowhere = format!("http://{}", free_addr());
    let serve = Serve::spawn(&["--endpoints", &nowhere], &nowhere, &[]);
    assert_error(serve.post("/v1/authorize", BOB_WRITES), 503, "not_ready");
    let batch = format!(r#"{{"requests": [{BOB_WRITES}]}}"#);
    assert_error(serve.post("/v1/authorize/batch", &batch), 503, "not_ready");
    // The mirror has no state to describe either.
    assert_error(serve.get("/v1/mirror/digest"), 503, "not_ready");
    let (code, ready) = serve.get("/health/ready");
    assert_eq!((code, &ready["ready"]), (503, &json!(false)), "{ready}");
    assert_eq!(serve.get("/health/live").0, 200);
    assert!(serve.terminate().success());
}

#[test]
fn a_remote_listen_address_needs_a_token() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_revwatch"))
        .args([
            "serve",
            "--endpoints",
            "http://127.0.0.1:1",
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("REVWATCH_TOKEN")
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[test]
fn sigterm_lets_a_waiting_request_finish_and_exits_0() {
    let (_dir, serve) = embedded(&["--fresh-wait", "1500ms"]);
    let addr = serve.addr.clone();
    // Waits for a revision that never comes, so it is in flight at the signal.
    let waiting = std::thread::spawn(move || {
        let q = bob_writes_at(json!({"min_revision": 1_000_000}));
        serve_support::http(&addr, "POST", "/v1/authorize", "", &q)
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(serve.terminate().success(), "exit status after SIGTERM");
    let (code, body) = waiting.join().expect("request thread");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("not_fresh_enough"), "{body}");
}
