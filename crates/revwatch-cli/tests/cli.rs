//! The `revwatch` binary end to end: real processes, real etcd, Debian's etcdctl.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{BIN, Process, WAIT, etcdctl, etcdctl_stdin, free_addr};
use nix::sys::signal::Signal;
use revwatch::client::{Client, ClientConfig, DeleteRangeRequest, PutRequest};
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::{Value, json};

/// etcd's current revision, read with etcdctl.
fn etcd_revision(endpoint: &str) -> i64 {
    let out = etcdctl(endpoint, &["get", "/no-such-key", "-w", "json"]);
    serde_json::from_str::<Value>(&out).expect("json")["header"]["revision"]
        .as_i64()
        .expect("revision")
}

/// Tail arguments as owned strings, so a test can spawn the same command twice.
fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

fn spawn(args: &[String]) -> Process {
    Process::revwatch(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn change(v: &Value, i: usize) -> (&str, &str, &Value) {
    let c = &v["changes"][i];
    (
        c["key"].as_str().unwrap_or("?"),
        c["type"].as_str().unwrap_or("?"),
        &c["value"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_json_prints_each_revision_of_real_etcd_atomically() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    etcdctl(&ep, &["put", "/t/before", "0"]);

    let tail = Process::revwatch(&["tail", "--endpoints", &ep, "--prefix", "/t/", "--json"]);
    // The initial list is one resync batch holding the existing key.
    let first = tail.next_json();
    assert_eq!(first["resync"], true);
    assert_eq!(change(&first, 0), ("/t/before", "put", &Value::from("0")));
    tail.await_stderr("ready");

    etcdctl(&ep, &["put", "/outside", "x"]);
    etcdctl(&ep, &["put", "/t/a", "1"]);
    etcdctl_stdin(&ep, &["txn"], "\nput /t/b 2\ndel /t/before\n\n\n");
    etcdctl(&ep, &["put", "/t/bin", "\u{1}"]);
    let revision: i64 =
        serde_json::from_str::<Value>(&etcdctl(&ep, &["get", "/t/a", "-w", "json"])).expect("json")
            ["header"]["revision"]
            .as_i64()
            .expect("revision");

    let a = tail.next_json();
    assert_eq!(
        (a["resync"].clone(), a["changes"].as_array().map(Vec::len)),
        (Value::from(false), Some(1))
    );
    assert_eq!(change(&a, 0), ("/t/a", "put", &Value::from("1")));
    // Both operations of the txn arrive in one batch, at one revision.
    let txn = tail.next_json();
    assert_eq!(
        txn["revision"].as_i64(),
        a["revision"].as_i64().map(|r| r + 1)
    );
    assert_eq!(change(&txn, 0), ("/t/b", "put", &Value::from("2")));
    assert_eq!(change(&txn, 1), ("/t/before", "delete", &Value::Null));
    let bin = tail.next_json();
    assert_eq!(bin["revision"].as_i64(), Some(revision));
    assert_eq!(bin["changes"][0]["value"], Value::from("\u{1}"));
    tail.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_embedded_needs_no_etcd_and_keeps_its_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let snap = dir.path().join("mirror.snap");
    let addr = free_addr();
    let ep = format!("http://{addr}");
    let args = argv(&[
        "tail",
        "--embedded",
        "--listen",
        &addr,
        "--prefix",
        "/p/",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
        "--json",
    ]);

    let tail = spawn(&args);
    // A fresh server: the initial list is an empty resync at revision 1.
    let first = tail.next_json();
    assert_eq!(
        (first["revision"].as_i64(), first["resync"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(first["changes"].as_array().map(Vec::len), Some(0));
    tail.await_stderr("ready");
    etcdctl(&ep, &["put", "/p/x", "binary\u{ff}"]);
    let got = tail.next_json();
    assert_eq!(
        change(&got, 0),
        ("/p/x", "put", &Value::from("binary\u{ff}"))
    );
    let revision = got["revision"].as_i64().expect("revision");
    tail.terminate();
    assert!(snap.exists(), "no snapshot file written");

    // Written while tail is stopped, through the same data dir served alone.
    let server = Process::revwatch(&[
        "etcd",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--listen",
        &addr,
    ]);
    server.await_stderr("serving");
    etcdctl(&ep, &["put", "/p/y", "2"]);
    server.terminate();

    // The server's data survived, and the mirror starts from its snapshot file (the
    // file's revision is reported stale until the server answers), then resumes
    // without relisting: what it missed arrives as an ordinary batch.
    let tail = spawn(&args);
    tail.await_stderr(&format!(
        "stale at revision {revision} (from the snapshot file"
    ));
    let first = tail.next_json();
    assert_eq!(
        (first["revision"].as_i64(), first["resync"].as_bool()),
        (Some(revision), Some(true))
    );
    assert_eq!(first["changes"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        change(&first, 0),
        ("/p/x", "put", &Value::from("binary\u{ff}"))
    );
    let next = tail.next_json();
    assert_eq!(
        (next["revision"].as_i64(), next["resync"].as_bool()),
        (Some(revision + 1), Some(false))
    );
    assert_eq!(change(&next, 0), ("/p/y", "put", &Value::from("2")));
    let before_ready = tail.await_stderr(&format!("ready at revision {}", revision + 1));
    assert!(
        !before_ready.iter().any(|l| l.contains("relist")),
        "relisted: {before_ready:#?}"
    );
    tail.terminate();
}

/// Human-readable output: one line per change (revision, PUT/DEL, key, short value),
/// and resync batches under a header naming their cause and size. Compaction past
/// the snapshot file's revision while tail is stopped makes the restart relist, and
/// the relist is printed as one resync batch holding exactly the difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_human_output_prints_changes_and_marks_a_compaction_relist() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("h.snap");
    let args = argv(&[
        "tail",
        "--endpoints",
        &ep,
        "--prefix",
        "/h/",
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
    ]);
    etcdctl(&ep, &["put", "/h/change", "old"]);
    etcdctl(&ep, &["put", "/h/gone", "x"]);
    etcdctl(&ep, &["put", "/h/keep", "1"]);
    let listed = etcd_revision(&ep);

    let tail = spawn(&args);
    assert_eq!(
        tail.next_lines(4),
        [
            format!("=== resync at revision {listed}: initial_list (3 changes) ==="),
            format!("{listed:>8}  PUT  \"/h/change\" = \"old\"  (v1)"),
            format!("{listed:>8}  PUT  \"/h/gone\" = \"x\"  (v1)"),
            format!("{listed:>8}  PUT  \"/h/keep\" = \"1\"  (v1)"),
        ]
    );
    tail.await_stderr(&format!("ready at revision {listed}"));
    let long = "y".repeat(70);
    etcdctl(&ep, &["put", "/h/long", &long]);
    etcdctl(&ep, &["put", "/outside", "ignored"]);
    etcdctl(&ep, &["del", "/h/keep"]);
    let last = etcd_revision(&ep);
    assert_eq!(
        tail.next_lines(2),
        [
            // A value is cut to 60 characters.
            format!(
                "{:>8}  PUT  \"/h/long\" = \"{}\"…  (v1)",
                listed + 1,
                "y".repeat(60)
            ),
            format!("{last:>8}  DEL  \"/h/keep\""),
        ]
    );
    let (status, stderr) = tail.stop(Signal::SIGINT);
    assert!(status.success(), "after SIGINT: {status}; {stderr:#?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains(&format!("stopped at revision {last}"))),
        "{stderr:#?}"
    );

    // While tail is stopped: change, delete and add keys, then compact past the
    // snapshot file's revision.
    etcdctl(&ep, &["put", "/h/change", "new"]);
    etcdctl(&ep, &["del", "/h/gone"]);
    etcdctl(&ep, &["put", "/h/new", "n"]);
    etcdctl(&ep, &["put", "/outside", "again"]);
    let compacted = etcd_revision(&ep);
    etcd.compact(compacted).await.expect("compact");

    let tail = spawn(&args);
    // First the state loaded from the file, at the last revision printed before.
    assert_eq!(
        tail.next_lines(4),
        [
            format!("=== resync at revision {last}: current state (3 keys) ==="),
            format!("{last:>8}  PUT  \"/h/change\" = \"old\"  (v1)"),
            format!("{last:>8}  PUT  \"/h/gone\" = \"x\"  (v1)"),
            format!(
                "{last:>8}  PUT  \"/h/long\" = \"{}\"…  (v1)",
                "y".repeat(60)
            ),
        ]
    );
    // Then the relist: exactly the difference, marked as a resync with its cause.
    assert_eq!(
        tail.next_lines(4),
        [
            format!("=== resync at revision {compacted}: compacted (3 changes) ==="),
            format!("{compacted:>8}  PUT  \"/h/change\" = \"new\"  (v2)"),
            format!("{compacted:>8}  DEL  \"/h/gone\""),
            format!("{compacted:>8}  PUT  \"/h/new\" = \"n\"  (v1)"),
        ]
    );
    let stderr = tail.await_stderr(&format!("ready at revision {compacted}"));
    assert!(
        stderr
            .iter()
            .any(|l| l.contains(&format!("stale at revision {last}"))),
        "{stderr:#?}"
    );
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("revwatch: relist (compacted)")),
        "{stderr:#?}"
    );
    tail.terminate();
}

/// Ctrl-C exits with status 0 after writing the final snapshot file at the last
/// revision; a restart with etcd down serves that file in state stale, resumes
/// (without relisting) once etcd is back, and delivers what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_ctrl_c_writes_the_final_snapshot_and_a_start_with_etcd_down_is_stale() {
    let mut etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("s.snap");
    let args = argv(&[
        "tail",
        "--endpoints",
        &ep,
        "--prefix",
        "/s/",
        "--json",
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
    ]);
    etcdctl(&ep, &["put", "/s/a", "1"]);

    let tail = spawn(&args);
    let first = tail.next_json();
    assert_eq!(first["resync"], true);
    assert_eq!(change(&first, 0), ("/s/a", "put", &Value::from("1")));
    tail.await_stderr("ready");
    // Well within the 5 s between timed writes: only the final write has it.
    etcdctl(&ep, &["put", "/s/b", "2"]);
    let b = tail.next_json();
    let last = b["revision"].as_i64().expect("revision");
    assert_eq!(change(&b, 0), ("/s/b", "put", &Value::from("2")));
    let (status, stderr) = tail.stop(Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "after SIGINT; stderr {stderr:#?}");
    assert!(
        stderr.iter().any(|l| l.contains(&format!(
            "stopped at revision {last} (snapshot file {} is at revision {last})",
            snap.display()
        ))),
        "{stderr:#?}"
    );

    // Missed while tail is stopped, then etcd goes down.
    etcdctl(&ep, &["put", "/s/c", "3"]);
    let missed = last + 1;
    etcd.kill(0).expect("kill etcd");

    let tail = spawn(&args);
    tail.await_stderr(&format!("stale at revision {last} (from the snapshot file"));
    let loaded = tail.next_json();
    assert_eq!(
        (loaded["revision"].as_i64(), loaded["resync"].as_bool()),
        (Some(last), Some(true))
    );
    assert_eq!(change(&loaded, 0), ("/s/a", "put", &Value::from("1")));
    assert_eq!(change(&loaded, 1), ("/s/b", "put", &Value::from("2")));
    // The loaded state is served while etcd stays down.
    std::thread::sleep(Duration::from_secs(1));
    assert!(tail.stdout.try_recv().is_err(), "output while etcd is down");

    etcd.restart(0).await.expect("restart etcd");
    let c = tail.next_json();
    assert_eq!(
        (c["revision"].as_i64(), c["resync"].as_bool()),
        (Some(missed), Some(false))
    );
    assert_eq!(change(&c, 0), ("/s/c", "put", &Value::from("3")));
    let stderr = tail.await_stderr(&format!("ready at revision {missed}"));
    assert!(
        !stderr.iter().any(|l| l.contains("relist")),
        "relisted: {stderr:#?}"
    );
    let (status, stderr) = tail.stop(Signal::SIGINT);
    assert_eq!(status.code(), Some(0), "after SIGINT; stderr {stderr:#?}");
}

/// Keys and values that are not UTF-8 are printed as `{"base64": ...}`, UTF-8 ones as
/// strings; written with our own client, as etcdctl cannot write raw bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_json_prints_invalid_utf8_as_base64() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let tail = Process::revwatch(&["tail", "--endpoints", &ep, "--prefix", "/j/", "--json"]);
    let first = tail.next_json();
    assert_eq!(first["changes"], json!([]));
    tail.await_stderr("ready");

    let client = Client::connect(ClientConfig::new([ep.clone()]))
        .await
        .expect("client");
    let key = b"/j/\xff\xfe".to_vec();
    let put = client
        .put(PutRequest {
            key: key.clone(),
            value: b"\xff\xfe\x00x".to_vec(),
            ..PutRequest::default()
        })
        .await
        .expect("put");
    let r1 = put.header.expect("header").revision;
    let put = client
        .put(PutRequest {
            key: "/j/é".into(),
            value: "ü\u{ff}".into(),
            ..PutRequest::default()
        })
        .await
        .expect("put");
    let r2 = put.header.expect("header").revision;
    let del = client
        .delete_range(DeleteRangeRequest {
            key,
            ..DeleteRangeRequest::default()
        })
        .await
        .expect("delete");
    let r3 = del.header.expect("header").revision;

    assert_eq!(
        tail.next_json(),
        json!({"revision": r1, "resync": false, "changes": [{
            "key": {"base64": "L2ov//4="}, "type": "put", "value": {"base64": "//4AeA=="},
            "create_revision": r1, "mod_revision": r1, "version": 1,
        }]})
    );
    assert_eq!(
        tail.next_json(),
        json!({"revision": r2, "resync": false, "changes": [{
            "key": "/j/é", "type": "put", "value": "ü\u{ff}",
            "create_revision": r2, "mod_revision": r2, "version": 1,
        }]})
    );
    assert_eq!(
        tail.next_json(),
        json!({"revision": r3, "resync": false, "changes": [{
            "key": {"base64": "L2ov//4="}, "type": "delete", "value": null,
            "create_revision": 0, "mod_revision": r3, "version": 0,
        }]})
    );
    tail.terminate();
}

/// A final snapshot file write that fails is reported, and the exit status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_reports_a_failed_final_snapshot_write() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    let snap = sub.join("f.snap");
    let tail = Process::revwatch(&[
        "tail",
        "--endpoints",
        &ep,
        "--prefix",
        "/f/",
        "--json",
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
    ]);
    tail.next_json();
    tail.await_stderr("ready");
    // The file's directory disappears, then a revision is published that the
    // final write must save. Moved away in one step rather than removed: a snapshot
    // write may be under way in it, which would make removing it fail.
    std::fs::rename(&sub, dir.path().join("gone")).expect("mv");
    etcdctl(&ep, &["put", "/f/a", "1"]);
    assert_eq!(change(&tail.next_json(), 0).0, "/f/a");
    let (status, stderr) = tail.stop(Signal::SIGINT);
    assert!(!status.success(), "exit status {status}; {stderr:#?}");
    assert!(
        stderr
            .iter()
            .any(|l| l.contains("could not write the final snapshot file") && l.contains("f.snap")),
        "{stderr:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_subcommand_serves_etcdctl_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path").to_owned();
    let addr = free_addr();
    let ep = format!("http://{addr}");

    // Checkpoints held off for an hour: the writes exist only in the write-ahead log
    // when the server is killed, and the restart replays them.
    let hour = "3600000";
    let args = [
        "etcd",
        "--data-dir",
        &data,
        "--listen",
        &addr,
        "--checkpoint-interval-ms",
        hour,
    ];
    let server = Process::revwatch(&args);
    server.await_stderr("serving");
    etcdctl(&ep, &["put", "k", "v1"]);
    etcdctl(&ep, &["put", "k", "v2"]);
    let (status, stderr) = server.stop(Signal::SIGKILL);
    assert!(!status.success(), "exit status {status}; {stderr:#?}");

    let server = Process::revwatch(&["etcd", "--data-dir", &data, "--listen", &addr]);
    server.await_stderr("serving");
    let got: Value =
        serde_json::from_str(&etcdctl(&ep, &["get", "k", "-w", "json"])).expect("json");
    assert_eq!(got["kvs"][0]["version"], 2);
    assert_eq!(got["header"]["revision"], 3);
    etcdctl(&ep, &["endpoint", "health"]);
    server.terminate();
}

/// Runs revwatch with `args`, which must fail; returns its stderr.
fn failing(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run");
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_are_rejected_with_a_message() {
    assert!(failing(&["tail", "--prefix", "/x"]).contains("--endpoints"));
    let stderr = failing(&["tail", "--endpoints", "not a url", "--prefix", "/x"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stderr = failing(&["etcd", "--checkpoint-interval-ms", "soon"]);
    assert!(stderr.contains("--checkpoint-interval-ms"), "{stderr}");
}

/// `tail --embedded` takes etcd's auto-compaction flags: with a 1 s periodic retention
/// the server compacts by itself (Debian's etcdctl sees old revisions go), and the live
/// mirror goes on batch by batch without a relist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_embedded_compacts_by_itself_with_etcds_flags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let addr = free_addr();
    let ep = format!("http://{addr}");
    let tail = Process::revwatch(&[
        "tail",
        "--embedded",
        "--listen",
        &addr,
        "--prefix",
        "/c/",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--auto-compaction-retention",
        "1s",
        "--json",
    ]);
    assert_eq!(tail.next_json()["revision"].as_i64(), Some(1));
    tail.await_stderr("ready");
    let deadline = std::time::Instant::now() + WAIT;
    for i in 0.. {
        etcdctl(&ep, &["put", "/c/k", &i.to_string()]);
        let batch = tail.next_json();
        assert_eq!(batch["resync"], false, "{batch}");
        assert_eq!(
            change(&batch, 0),
            ("/c/k", "put", &Value::from(i.to_string()))
        );
        let old = Command::new("/usr/bin/etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &ep, "get", "/c/k", "--rev=2"])
            .output()
            .expect("etcdctl");
        if !old.status.success() {
            let stderr = String::from_utf8_lossy(&old.stderr);
            assert!(
                stderr.contains("required revision has been compacted"),
                "{stderr}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "revision 2 still readable after {WAIT:?} of 1 s auto-compaction"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tail.terminate();
}

/// The auto-compaction flags configure the embedded server, so without --embedded they
/// are refused rather than silently ignored.
#[test]
fn auto_compaction_flags_need_the_embedded_server() {
    let out = Command::new(BIN)
        .args(["tail", "--endpoints", "http://127.0.0.1:1", "--prefix", "/"])
        .args(["--auto-compaction-retention", "1h"])
        .stdin(Stdio::null())
        .output()
        .expect("run revwatch");
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("need --embedded"), "{stderr}");
}

/// After `kill -9`, a restart resumes from the snapshot file. With
/// --persist-every-batch the file is written after every batch, so the restart starts
/// at the last printed revision and prints none of the batches again (without it the
/// file would still hold the initial list: the next write is due 5 s after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_persist_every_batch_resumes_after_kill_9_without_repeats() {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let ep = etcd.endpoint(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let snap = dir.path().join("k.snap");
    let args = argv(&[
        "tail",
        "--endpoints",
        &ep,
        "--prefix",
        "/k/",
        "--json",
        "--snapshot-file",
        snap.to_str().expect("utf-8 path"),
        "--persist-every-batch",
    ]);
    let tail = spawn(&args);
    tail.next_json();
    tail.await_stderr("ready");
    let mut last = 0;
    for key in ["/k/a", "/k/b", "/k/c"] {
        etcdctl(&ep, &["put", key, "v"]);
        let got = tail.next_json();
        assert_eq!(change(&got, 0).0, key);
        last = got["revision"].as_i64().expect("revision");
    }
    // Well under the 5 s interval, but enough for the last write to land.
    std::thread::sleep(Duration::from_millis(500));
    let (status, _) = tail.stop(Signal::SIGKILL);
    assert!(!status.success());

    let tail = spawn(&args);
    let first = tail.next_json();
    assert_eq!(
        (first["revision"].as_i64(), first["resync"].as_bool()),
        (Some(last), Some(true)),
        "the restart starts at the last printed revision: {first}"
    );
    assert_eq!(first["changes"].as_array().map(Vec::len), Some(3));
    tail.await_stderr("ready");
    etcdctl(&ep, &["put", "/k/d", "v"]);
    let next = tail.next_json();
    assert_eq!(
        (next["revision"].as_i64(), change(&next, 0).0),
        (Some(last + 1), "/k/d"),
        "no batch printed twice: {next}"
    );
    tail.terminate();
}

/// `tail --help` says what a restart after a crash prints again, and how to avoid it.
#[test]
fn tail_help_tells_what_a_crash_repeats() {
    let out = Command::new(BIN)
        .args(["tail", "--help"])
        .output()
        .expect("run revwatch");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("kill -9"), "{help}");
    assert!(help.contains("--persist-every-batch"), "{help}");
    let stderr = failing(&[
        "tail",
        "--endpoints",
        "http://127.0.0.1:1",
        "--prefix",
        "/",
        "--persist-every-batch",
    ]);
    assert!(stderr.contains("--snapshot-file"), "{stderr}");
}

/// Log lines on stderr carry no ANSI colour codes when stderr is not a terminal.
#[test]
fn tail_logs_without_colour_codes_to_a_pipe() {
    let mut command = Command::new(BIN);
    command
        .args(["tail", "--endpoints", "http://127.0.0.1:1", "--prefix", "/"])
        .env("RUST_LOG", "debug")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let tail = Process::spawn(command);
    let seen = tail.await_stderr("DEBUG");
    assert!(
        !seen.iter().any(|l| l.contains('\u{1b}')),
        "ANSI escapes in {seen:#?}"
    );
}
