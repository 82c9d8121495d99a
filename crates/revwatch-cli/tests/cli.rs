//! The `revwatch` binary end to end: real processes, real etcd, Debian's etcdctl.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use revwatch_testkit::etcd::EtcdCluster;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
const WAIT: Duration = Duration::from_secs(20);

/// A child process whose stdout and stderr lines arrive on channels; killed on drop.
struct Proc {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn revwatch");
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits for a stderr line containing `needle`.
    fn await_stderr(&self, needle: &str) {
        loop {
            match self.stderr.recv_timeout(WAIT) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?}: {e}"),
            }
        }
    }

    fn next_json(&self) -> Value {
        let line = self
            .stdout
            .recv_timeout(WAIT)
            .expect("a JSON line on stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    /// SIGTERM, and the exit status must be success.
    fn terminate(mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "exit status after SIGTERM: {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("revwatch did not exit within 5 s of SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("/usr/bin/etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn etcdctl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("etcdctl output");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
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
    etcdctl(&ep, &["put", "/t/before", "0"], None);

    let tail = Proc::spawn(&["tail", "--endpoints", &ep, "--prefix", "/t/", "--json"]);
    // The initial list is one resync batch holding the existing key.
    let first = tail.next_json();
    assert_eq!(first["resync"], true);
    assert_eq!(change(&first, 0), ("/t/before", "put", &Value::from("0")));
    tail.await_stderr("ready");

    etcdctl(&ep, &["put", "/outside", "x"], None);
    etcdctl(&ep, &["put", "/t/a", "1"], None);
    etcdctl(&ep, &["txn"], Some("\nput /t/b 2\ndel /t/before\n\n\n"));
    etcdctl(&ep, &["put", "/t/bin", "\u{1}"], None);
    let revision: i64 =
        serde_json::from_str::<Value>(&etcdctl(&ep, &["get", "/t/a", "-w", "json"], None))
            .expect("json")["header"]["revision"]
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
    let args = |json: bool| {
        let mut a = vec!["tail", "--embedded", "--listen", &addr, "--prefix", "/p/"];
        a.extend(["--data-dir", data.to_str().expect("utf-8 path")]);
        a.extend(["--snapshot-file", snap.to_str().expect("utf-8 path")]);
        if json {
            a.push("--json");
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };

    let tail = Proc::spawn(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    // A fresh server: the initial list is an empty resync at revision 1.
    let first = tail.next_json();
    assert_eq!(
        (first["revision"].as_i64(), first["resync"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(first["changes"].as_array().map(Vec::len), Some(0));
    tail.await_stderr("ready");
    etcdctl(&ep, &["put", "/p/x", "binary\u{ff}"], None);
    let got = tail.next_json();
    assert_eq!(change(&got, 0).0, "/p/x");
    tail.terminate();

    // The server's data survived: the mirror comes back at the same revision.
    let tail = Proc::spawn(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    let first = tail.next_json();
    assert_eq!(first["revision"], got["revision"]);
    assert_eq!(change(&first, 0).0, "/p/x");
    tail.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_subcommand_serves_etcdctl_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8 path").to_owned();
    let addr = free_addr();
    let ep = format!("http://{addr}");

    let server = Proc::spawn(&["etcd", "--data-dir", &data, "--listen", &addr]);
    server.await_stderr("serving");
    etcdctl(&ep, &["put", "k", "v1"], None);
    etcdctl(&ep, &["put", "k", "v2"], None);
    server.terminate();

    let server = Proc::spawn(&["etcd", "--data-dir", &data, "--listen", &addr]);
    server.await_stderr("serving");
    let got: Value =
        serde_json::from_str(&etcdctl(&ep, &["get", "k", "-w", "json"], None)).expect("json");
    assert_eq!(got["kvs"][0]["version"], 2);
    assert_eq!(got["header"]["revision"], 3);
    etcdctl(&ep, &["endpoint", "health"], None);
    server.terminate();
}

#[test]
fn bad_arguments_are_rejected_with_a_message() {
    let out = Command::new(BIN)
        .args(["tail", "--prefix", "/x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoints"));

    let out = Command::new(BIN)
        .args(["tail", "--endpoints", "not a url", "--prefix", "/x"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
