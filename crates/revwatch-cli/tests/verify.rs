//! `revwatch verify` end to end against real etcd 3.4: a mirror, a snapshot file and
//! the mirror of a running `serve` (`--url`) that hold etcd's state match; a state
//! that does not (etcd restored from another history, or another cluster) is drift
//! with the differing keys; a compacted revision, a damaged file, an unreachable
//! etcd and a refused token are clear errors.

mod common;
mod serve_support;

use std::{path::Path, process::Command, time::Duration};

use etcd_proto::key_range::KeyRange;
use revwatch::{
    client::{Client, ClientConfig, DeleteRangeRequest, PutRequest, RangeRequest},
    mirror::{ClientSource, DigestBuilder, Mirror, MirrorConfig},
};
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::{Value, json};
use serve_support::Serve;

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
const WAIT: Duration = Duration::from_secs(20);

/// What one run of the binary left: exit status, stdout, stderr.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON: {:?}: {e}", self.stdout))
    }
}

/// `revwatch verify ARGS`; bounded by its own --timeout.
fn verify<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    verify_env(args, &[])
}

/// [`verify`] with `env` (and no inherited REVWATCH_TOKEN).
fn verify_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Run {
    let out = Command::new(BIN)
        .arg("verify")
        .args(args)
        .args(["--timeout", "20s"])
        .env_remove("REVWATCH_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run revwatch verify");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn client(etcd: &EtcdCluster) -> Client {
    Client::connect(ClientConfig::new(etcd.endpoints()))
        .await
        .expect("connect")
}

/// Puts `key` (with `lease`, 0 for none) and returns the revision of the put.
async fn put(client: &Client, key: &str, value: &str, lease: i64) -> i64 {
    let resp = client
        .put(PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..PutRequest::default()
        })
        .await
        .expect("put");
    resp.header.expect("header").revision
}

async fn delete(client: &Client, key: &str) -> i64 {
    let resp = client
        .delete_range(DeleteRangeRequest {
            key: key.into(),
            ..DeleteRangeRequest::default()
        })
        .await
        .expect("delete");
    resp.header.expect("header").revision
}

/// etcd's revision, and the digest and key count of `prefix` at it, computed here
/// with the library from one range.
async fn expected(client: &Client, prefix: &str) -> (i64, String, usize) {
    expected_at(client, prefix, 0).await
}

/// [`expected`] at `revision` (0 for the current one).
async fn expected_at(client: &Client, prefix: &str, revision: i64) -> (i64, String, usize) {
    let range = KeyRange::prefix(prefix.as_bytes());
    let resp = client
        .range(RangeRequest {
            key: range.key().to_vec(),
            range_end: range.range_end().to_vec(),
            revision,
            ..RangeRequest::default()
        })
        .await
        .expect("range");
    let mut digest = DigestBuilder::new();
    for kv in &resp.kvs {
        digest.push_kv(kv).expect("key order");
    }
    let current = resp.header.expect("header").revision;
    let revision = if revision == 0 { current } else { revision };
    (revision, digest.finish().to_string(), resp.kvs.len())
}

/// Mirrors `prefix` into the snapshot file `path` as `tail` and `serve` do, up to
/// etcd's current revision; returns the file's revision.
async fn write_snapshot_file(client: &Client, prefix: &str, path: &Path) -> i64 {
    let mirror = Mirror::builder(prefix)
        .config(MirrorConfig::default().with_snapshot_file(path.to_owned()))
        .start(ClientSource::new(client.clone()))
        .await
        .expect("start mirror");
    let revision = mirror
        .consistent_snapshot(WAIT)
        .await
        .expect("mirror caught up")
        .revision();
    // The final write is of the last published revision.
    mirror.shutdown().await.expect("final snapshot file write");
    revision
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_of_a_populated_prefix_matches_etcd() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let c = client(&etcd).await;
    for i in 0..12 {
        put(&c, &format!("/v/k{i:02}"), &format!("value {i}"), 0).await;
    }
    // Versions above 1, a deletion, a lease, and neighbours outside the prefix.
    put(&c, "/v/k03", "again", 0).await;
    put(&c, "/v/k03", "and again", 0).await;
    delete(&c, "/v/k05").await;
    let lease = c.lease_grant(600).await.expect("lease").id;
    put(&c, "/v/leased", "x", lease).await;
    for key in ["/v", "/vx/a", "/w/a"] {
        put(&c, key, "outside", 0).await;
    }
    let (revision, digest, keys) = expected(&c, "/v/").await;
    assert_eq!(keys, 12);

    // Pages of 5: the mirror's list and etcd's range both take several.
    let run = verify(&["--endpoints", &ep, "--prefix", "/v/", "--page-size", "5"]);
    assert_eq!(
        run.code,
        Some(0),
        "stdout {} stderr {}",
        run.stdout,
        run.stderr
    );
    assert_eq!(
        run.stdout,
        format!("match at revision {revision}: 12 keys, digest {digest}\n")
    );

    let run = verify(&["--endpoints", &ep, "--prefix", "/v/", "--json"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["result"], "match");
    assert_eq!(doc["source"], "mirror");
    assert_eq!(doc["revision"], revision);
    assert_eq!(doc["keys"], 12);
    assert_eq!(doc["digest"], digest.as_str());

    // The whole keyspace too.
    let (_, all_digest, all_keys) = expected(&c, "").await;
    let run = verify(&[
        "--endpoints",
        &ep,
        "--prefix",
        "",
        "--json",
        "--page-size",
        "4",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.json()["keys"], all_keys);
    assert_eq!(run.json()["digest"], all_digest.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_is_checked_at_its_revision_and_drift_from_another_history_is_caught() {
    let first = EtcdCluster::single().await.expect("etcd");
    let c = client(&first).await;
    // Revisions 2 to 5 under the prefix.
    for (key, value) in [("/v/a", "1"), ("/v/b", "2"), ("/v/c", "3"), ("/v/e", "5")] {
        put(&c, key, value, 0).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.snap");
    let revision = write_snapshot_file(&c, "/v/", &file).await;
    assert_eq!(revision, 5);
    let (_, digest, _) = expected(&c, "/v/").await;
    let args = |ep: &str| {
        vec![
            "--endpoints".to_owned(),
            ep.to_owned(),
            "--prefix".to_owned(),
            "/v/".to_owned(),
            "--snapshot-file".to_owned(),
            path_str(&file).to_owned(),
        ]
    };
    let ep = first.endpoint(0);

    let run = verify(&args(&ep));
    assert_eq!(run.code, Some(0), "{} {}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout,
        format!("match at revision 5: 4 keys, digest {digest}\n")
    );

    // etcd moving on after the file is not drift: the file is compared with etcd
    // as it was at the file's revision.
    put(&c, "/v/a", "changed", 0).await;
    delete(&c, "/v/b").await;
    put(&c, "/v/z", "new", 0).await;
    let run = verify(&args(&ep));
    assert_eq!(run.code, Some(0), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("match at revision 5: 4 keys"),
        "{}",
        run.stdout
    );

    // The same file against an etcd with another history (restored from another
    // backup, or simply the wrong cluster). First one that has not reached the
    // file's revision at all.
    let other = EtcdCluster::single().await.expect("second etcd");
    let o = client(&other).await;
    let other_ep = other.endpoint(0);
    let run = verify(&args(&other_ep));
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .starts_with("drift at revision 5: etcd is only at revision 1, so it lost history"),
        "{}",
        run.stdout
    );
    let mut json_args = args(&other_ep);
    json_args.push("--json".to_owned());
    let doc = verify(&json_args).json();
    assert_eq!(
        (&doc["result"], &doc["reason"], &doc["etcd_revision"]),
        (
            &Value::from("drift"),
            &Value::from("etcd_behind"),
            &Value::from(1)
        )
    );

    // Then past it, with the same revisions but other content: /v/b holds
    // another value, /v/c was never written, /v/d was.
    for (key, value) in [("/v/a", "1"), ("/v/b", "22"), ("/v/d", "4"), ("/v/e", "5")] {
        put(&o, key, value, 0).await;
    }
    let run = verify(&args(&other_ep));
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines[0], "drift at revision 5: 3 keys differ",
        "{}",
        run.stdout
    );
    assert_eq!(
        &lines[3..],
        [
            "  different \"/v/b\": value (the snapshot file 1 bytes, etcd 2 bytes)",
            "  extra \"/v/c\": in the snapshot file, not in etcd",
            "  missing \"/v/d\": in etcd, not in the snapshot file",
        ],
        "{}",
        run.stdout
    );

    // Bounded, with the rest counted; the same in JSON.
    json_args.extend(["--max-differences".to_owned(), "1".to_owned()]);
    let run = verify(&json_args);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["result"], "drift");
    assert_eq!(doc["reason"], "content");
    assert_eq!(doc["revision"], 5);
    assert_eq!(
        (&doc["source_keys"], &doc["etcd_keys"]),
        (&Value::from(4), &Value::from(4))
    );
    assert_eq!(doc["source_digest"], digest.as_str());
    assert_ne!(doc["etcd_digest"], digest.as_str());
    assert_eq!(
        doc["differences"],
        serde_json::json!([{"key": "/v/b", "kind": "different",
                            "fields": [{"field": "value", "source": 1, "etcd": 2}]}])
    );
    assert_eq!(doc["omitted"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_and_a_damaged_file_are_clear_errors() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let c = client(&etcd).await;
    put(&c, "/v/a", "1", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.snap");
    let revision = write_snapshot_file(&c, "/v/", &file).await;
    put(&c, "/v/a", "2", 0).await;
    let compacted = put(&c, "/v/b", "3", 0).await;
    etcd.compact(compacted).await.expect("compact");

    let args = [
        "--endpoints",
        &ep,
        "--prefix",
        "/v/",
        "--snapshot-file",
        path_str(&file),
    ];
    let run = verify(&args);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "cannot read etcd at revision {revision}, the revision of the snapshot file: \
             etcd compacted its history up to revision {compacted}"
        )),
        "{}",
        run.stderr
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = verify(&json_args);
    assert_eq!(run.code, Some(2));
    assert_eq!(run.json()["result"], "error");

    // A file of another prefix.
    let other = [
        "--endpoints",
        &ep,
        "--prefix",
        "/w/",
        "--snapshot-file",
        path_str(&file),
    ];
    let run = verify(&other);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("is for another prefix"),
        "{}",
        run.stderr
    );
    // A damaged file is refused, never compared: one bit of the last value flipped
    // (it is followed by four i64 fields and the checksum).
    let mut bytes = std::fs::read(&file).expect("read file");
    let at = bytes.len() - 4 - 32 - 1;
    bytes[at] ^= 0x01;
    std::fs::write(&file, &bytes).expect("write file");
    let run = verify(&args);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("is corrupt: checksum mismatch"),
        "{}",
        run.stderr
    );

    // No file at all.
    let missing = dir.path().join("none.snap");
    let run = verify(&[
        "--endpoints",
        &ep,
        "--prefix",
        "/v/",
        "--snapshot-file",
        path_str(&missing),
    ]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains(&format!(
            "snapshot file {}: no such file\n",
            missing.display()
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unreachable_etcd_is_an_error_not_a_verdict() {
    // A port nothing listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let run = verify(&["--endpoints", &format!("http://{addr}"), "--prefix", "/v/"]);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "revwatch verify: connecting to etcd at http://{addr}: all 1 endpoints unreachable"
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn an_unreachable_serve_is_an_error_not_a_verdict() {
    let url = format!("http://{}", common::free_addr());
    let run = verify(&["--url", &url, "--endpoints", "http://127.0.0.1:1"]);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr
            .contains(&format!("revwatch verify: connecting to serve at {url}: ")),
        "{}",
        run.stderr
    );
    // Only plain HTTP: serve has no TLS.
    let run = verify(&["--url", "https://127.0.0.1:1"]);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stderr.contains("give an http:// URL"), "{}", run.stderr);
}

/// Two policies of the same size: a value changed from one to the other keeps its
/// size, so only its digest tells.
const PERMIT_ALL: &str = "permit(principal, action, resource);";
const FORBID_ALL: &str = "forbid(principal, action, resource);";

/// `serve` following `endpoint` (prefix /p/) with `extra` flags, once its first set
/// of policies is active.
fn serve_on(endpoint: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--endpoints", endpoint, "--prefix", "/p/"];
    args.extend_from_slice(extra);
    let serve = Serve::spawn(&args, endpoint, &[]);
    serve.await_stderr("ready: policy set at revision");
    serve
}

fn url(serve: &Serve) -> String {
    format!("http://{}", serve.addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_of_a_running_serve_matches_etcd_and_its_token_is_sent() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let c = client(&etcd).await;
    put(&c, "/p/a.cedar", PERMIT_ALL, 0).await;
    let loaded = put(&c, "/p/b.cedar", FORBID_ALL, 0).await;
    put(&c, "/q/outside", "x", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let token_path = path_str(&token_file);
    let serve = serve_on(&ep, &["--token-file", token_path]);
    let url = url(&serve);

    // The token from a file.
    let run = verify(&[
        "--url",
        &url,
        "--endpoints",
        &ep,
        "--token-file",
        token_path,
        "--json",
    ]);
    assert_eq!(run.code, Some(0), "{} {}", run.stdout, run.stderr);
    let doc = run.json();
    assert_eq!(
        (&doc["result"], &doc["source"]),
        (&json!("match"), &json!("serve"))
    );
    // What etcd holds at serve's revision, digested here: the two policies, and
    // serve's own registration under the prefix (with its lease) once written.
    let revision = doc["revision"].as_i64().expect("revision");
    assert!(revision >= loaded, "{doc}");
    let (_, digest, keys) = expected_at(&c, "/p/", revision).await;
    assert_eq!(doc["digest"], digest.as_str());
    assert_eq!(doc["keys"], keys);
    assert!(keys >= 2, "{doc}");

    // The token from the environment, and --prefix naming serve's own.
    let run = verify_env(
        &["--url", &url, "--endpoints", &ep, "--prefix", "/p/"],
        &[("REVWATCH_TOKEN", "s3cret")],
    );
    assert_eq!(run.code, Some(0), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("match at revision "),
        "{}",
        run.stdout
    );

    // Without it, or with another, serve refuses: no verdict.
    let run = verify(&["--url", &url, "--endpoints", &ep]);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "serve at {url} answered 401 Unauthorized: unauthorized: a bearer token is required"
        )),
        "{}",
        run.stderr
    );
    let run = verify_env(
        &["--url", &url, "--endpoints", &ep, "--json"],
        &[("REVWATCH_TOKEN", "s3cre7")],
    );
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert_eq!(run.json()["result"], "error");
    assert!(
        run.stderr.contains("the bearer token is not valid"),
        "{}",
        run.stderr
    );

    // A prefix other than serve's.
    let run = verify_env(
        &["--url", &url, "--endpoints", &ep, "--prefix", "/q/"],
        &[("REVWATCH_TOKEN", "s3cret")],
    );
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "serve at {url} mirrors prefix \"/p/\", not \"/q/\" (--prefix)"
        )),
        "{}",
        run.stderr
    );
    assert!(serve.terminate().success(), "exit status after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mirroring_another_cluster_is_drift_with_the_differing_keys() {
    let ours = EtcdCluster::single().await.expect("etcd");
    let foreign = EtcdCluster::single().await.expect("foreign etcd");
    let (c, f) = (client(&ours).await, client(&foreign).await);
    // The same revisions in both clusters: /p/a.cedar differs only in content (same
    // size, same revisions), /p/b.cedar only in etcd, /p/c.cedar only in serve's.
    put(&c, "/p/a.cedar", PERMIT_ALL, 0).await;
    put(&f, "/p/a.cedar", FORBID_ALL, 0).await;
    put(&c, "/p/b.cedar", PERMIT_ALL, 0).await;
    put(&f, "/p/c.cedar", PERMIT_ALL, 0).await;
    let serve = serve_on(&foreign.endpoint(0), &[]);
    // etcd goes past any revision serve's mirror reaches (its registration writes
    // included), so the states are compared, not the revisions.
    for i in 0..40 {
        put(&c, &format!("/elsewhere/{i}"), "x", 0).await;
    }
    let args = ["--url", &url(&serve), "--endpoints", &ours.endpoint(0)];

    let run = verify(&args);
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    assert!(
        run.stdout.starts_with("drift at revision "),
        "{}",
        run.stdout
    );
    let lines: Vec<&str> = run.stdout.lines().collect();
    for line in [
        "  different \"/p/a.cedar\": value (serve's mirror 36 bytes, etcd 36 bytes)",
        "  missing \"/p/b.cedar\": in etcd, not in serve's mirror",
        "  extra \"/p/c.cedar\": in serve's mirror, not in etcd",
    ] {
        assert!(lines.contains(&line), "no {line:?} in {}", run.stdout);
    }

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = verify(&json_args);
    assert_eq!(run.code, Some(1), "{} {}", run.stdout, run.stderr);
    let doc = run.json();
    assert_eq!(
        (&doc["result"], &doc["reason"]),
        (&json!("drift"), &json!("content"))
    );
    assert_eq!(doc["source"], "serve");
    assert_ne!(doc["source_digest"], doc["etcd_digest"]);
    // Besides serve's registration (a key of its cluster only, when written).
    let policies: Vec<&Value> = doc["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .filter(|d| {
            !d["key"]
                .as_str()
                .is_some_and(|k| k.starts_with("/p/.revwatch/"))
        })
        .collect();
    assert_eq!(
        policies,
        [
            &json!({"key": "/p/a.cedar", "kind": "different",
                    "fields": [{"field": "value", "source": 36, "etcd": 36}]}),
            &json!({"key": "/p/b.cedar", "kind": "missing"}),
            &json!({"key": "/p/c.cedar", "kind": "extra"}),
        ],
        "{doc}"
    );
    assert!(serve.terminate().success(), "exit status after SIGTERM");
}

/// serve's `GET /v1/mirror/digest`, once its mirror has a state.
fn mirror_digest(serve: &Serve) -> Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, body) = serve.get("/v1/mirror/digest");
        if code == 200 {
            return body;
        }
        assert!(
            code == 503 && std::time::Instant::now() < deadline,
            "{code} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_behind_a_compacted_revision_gives_no_verdict() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let c = client(&etcd).await;
    let loaded = put(&c, "/p/a.cedar", PERMIT_ALL, 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("m.snap");
    let file_args = ["--snapshot-file", path_str(&file)];
    let first = serve_on(&ep, &file_args);
    assert!(first.terminate().success(), "exit status after SIGTERM");

    // etcd moves on and forgets the revisions serve saw; serve starts again from
    // its snapshot file alone (its etcd does not answer).
    put(&c, "/p/a.cedar", FORBID_ALL, 0).await;
    let compacted = put(&c, "/p/b.cedar", PERMIT_ALL, 0).await;
    etcd.compact(compacted).await.expect("compact");
    let nowhere = format!("http://{}", common::free_addr());
    let mut args = vec!["--endpoints", nowhere.as_str(), "--prefix", "/p/"];
    args.extend_from_slice(&file_args);
    let stale = Serve::spawn(&args, &nowhere, &[]);
    let described = mirror_digest(&stale);
    assert_eq!(described["state"], "stale", "{described}");
    let revision = described["revision"].as_i64().expect("revision");
    assert!((loaded..compacted).contains(&revision), "{described}");

    let run = verify(&["--url", &url(&stale), "--endpoints", &ep]);
    assert_eq!(run.code, Some(2), "{} {}", run.stdout, run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "cannot read etcd at revision {revision}, the revision of serve's mirror: \
             etcd compacted its history up to revision {compacted}"
        )),
        "{}",
        run.stderr
    );
    let run = verify(&["--url", &url(&stale), "--endpoints", &ep, "--json"]);
    assert_eq!(run.code, Some(2));
    assert_eq!(run.json()["result"], "error");
}
