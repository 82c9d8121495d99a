//! The progress bar of a long list: `revwatch tail` on a prefix of 20,000 keys in
//! real etcd 3.4, behind a proxy adding latency so that the list (20 pages, each a
//! round trip of at least 150 ms) runs well past the bar's one-second delay. On a
//! pipe nothing of a bar is written; on a terminal (a pseudo-terminal made by
//! util-linux's `script`) the bar is drawn, then cleared.

use std::{
    io::Read,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use etcd_proto::etcdserverpb::request_op::Request as Op;
use nix::{sys::signal::Signal, unistd::Pid};
use revwatch::client::{Client, ClientConfig, PutRequest, RequestOp, TxnRequest};
use revwatch_testkit::etcd::EtcdCluster;
use revwatch_testkit::proxy::{Fault, FaultProxy};

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(60);
const PREFIX: &str = "/bar/";
const KEYS: usize = 20_000;
/// etcd 3.4's default --max-txn-ops.
const TXN_OPS: usize = 128;

/// Real etcd holding `KEYS` small keys under `PREFIX` (and one outside), a proxy
/// in front of it adding latency, and the revision of the last write.
struct Listed {
    _etcd: EtcdCluster,
    proxy: FaultProxy,
    revision: i64,
}

async fn long_list() -> Listed {
    let etcd = EtcdCluster::single().await.expect("etcd");
    let client = Client::connect(ClientConfig::new([etcd.endpoint(0)]))
        .await
        .expect("connect");
    let keys: Vec<usize> = (0..KEYS).collect();
    for chunk in keys.chunks(TXN_OPS) {
        let success = chunk
            .iter()
            .map(|i| RequestOp {
                request: Some(Op::RequestPut(PutRequest {
                    key: format!("{PREFIX}{i:05}").into_bytes(),
                    value: b"v".to_vec(),
                    ..Default::default()
                })),
            })
            .collect();
        client
            .txn(TxnRequest {
                success,
                ..Default::default()
            })
            .await
            .expect("txn");
    }
    let revision = client
        .put(PutRequest {
            key: b"/outside".to_vec(),
            value: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put")
        .header
        .expect("header")
        .revision;
    let proxy = FaultProxy::start(etcd.client_addr(0)).await.expect("proxy");
    proxy.set(Fault::Latency(Duration::from_millis(75)));
    Listed {
        _etcd: etcd,
        proxy,
        revision,
    }
}

/// The chunks `r` yields, from a thread, as they come.
fn chunks(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads `from` into `seen` until it holds `needle` (panics after `WAIT`).
fn read_until(from: &mpsc::Receiver<Vec<u8>>, seen: &mut String, needle: &str) {
    let deadline = Instant::now() + WAIT;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match from.recv_timeout(left) {
            Ok(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            Err(e) => panic!("no {needle:?} ({e}); got {seen:?}"),
        }
    }
}

/// SIGTERM to `child`, then waits (10 s at most) for its exit, which must be a
/// success; returns what `from` still had.
fn terminate(mut child: Child, from: &mpsc::Receiver<Vec<u8>>) -> String {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no exit within 10 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    while let Ok(chunk) = from.recv_timeout(Duration::from_secs(5)) {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(status.success(), "exit status {status}; then {rest:?}");
    rest
}

/// Kills the child if the test fails before it is terminated.
struct Killed(Option<Child>);

impl Killed {
    fn take(mut self) -> Child {
        self.0.take().expect("a child")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// With stderr a pipe, a long list draws nothing: no carriage return, no bar,
/// though a terminal would get one (the test below); the usual lines remain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_draws_no_bar_when_stderr_is_a_pipe() {
    let listed = long_list().await;
    let endpoint = listed.proxy.endpoint();
    let mut child = Command::new(BIN)
        .args(["tail", "--endpoints", &endpoint, "--prefix", PREFIX])
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn revwatch");
    let stderr = chunks(child.stderr.take().expect("stderr"));
    let child = Killed(Some(child));
    let mut seen = String::new();
    let ready = format!("ready at revision {}", listed.revision);
    read_until(&stderr, &mut seen, &ready);
    seen.push_str(&terminate(child.take(), &stderr));
    for drawn in ["\r", "\u{1b}", "/s, ETA", "listing", "=>"] {
        assert!(!seen.contains(drawn), "{drawn:?} in {seen:?}");
    }
}

/// Quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Under a pseudo-terminal the long list draws its bar (what, at which revision,
/// keys listed of the total, rate and time left) on stderr, and clears it before
/// the mirror reports Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_draws_a_bar_for_a_long_list_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux's script is not installed");
        return;
    }
    let listed = long_list().await;
    let endpoint = listed.proxy.endpoint();
    // stdout to /dev/null: only stderr is on the terminal.
    let command = format!(
        "exec {} tail --endpoints {} --prefix {} >/dev/null",
        sh_quote(BIN),
        sh_quote(&endpoint),
        sh_quote(PREFIX)
    );
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn script");
    let out = chunks(child.stdout.take().expect("stdout"));
    // `script` passes SIGTERM on to revwatch, and exits with its status.
    let child = Killed(Some(child));
    let mut seen = String::new();
    let bar = format!("revwatch: listing at revision {}", listed.revision);
    read_until(&out, &mut seen, &bar);
    let ready = format!("revwatch: ready at revision {}", listed.revision);
    read_until(&out, &mut seen, &ready);
    seen.push_str(&terminate(child.take(), &out));

    let drawn = seen.find(&bar).expect("the bar");
    let ready_at = seen.find(&ready).expect("ready");
    let during = &seen[drawn..ready_at];
    assert!(during.contains("/20,000 keys, "), "{during:?}");
    assert!(during.contains("/s, ETA "), "{during:?}");
    assert!(during.contains("[="), "{during:?}");
    // Cleared (erase the line) after its last drawing, before Ready is told.
    let last = during.rfind(&bar).expect("the last drawing");
    assert!(during[last..].contains("\u{1b}["), "{:?}", &during[last..]);
}
