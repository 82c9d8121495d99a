//! A single real etcd member: data survives kill -9, freeze blocks requests,
//! compaction works, and nothing is left behind.

use std::time::Duration;

use etcd_proto::etcdserverpb::kv_client::KvClient;
use etcd_proto::etcdserverpb::{PutRequest, RangeRequest};
use revwatch_testkit::TestkitError;
use revwatch_testkit::etcd::{ClusterOptions, EtcdCluster};
use tonic::Code;
use tonic::transport::Channel;

async fn kv(cluster: &EtcdCluster) -> KvClient<Channel> {
    KvClient::new(cluster.channel(0).await.expect("channel"))
}

async fn put(kv: &mut KvClient<Channel>, key: &str, value: &str) -> i64 {
    let resp = kv
        .put(PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .expect("put");
    resp.into_inner().header.expect("header").revision
}

async fn get(kv: &mut KvClient<Channel>, key: &str) -> Option<Vec<u8>> {
    let resp = kv
        .range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .into_inner();
    resp.kvs.into_iter().next().map(|kv| kv.value)
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn put_get_then_kill_and_restart_keeps_data() {
    let mut cluster = EtcdCluster::single().await.expect("start etcd");
    assert_eq!(cluster.len(), 1);
    assert!(cluster.endpoint(0).starts_with("http://127.0.0.1:"));
    let mut client = kv(&cluster).await;
    let rev = put(&mut client, "/k", "v1").await;
    assert_eq!(get(&mut client, "/k").await.as_deref(), Some(&b"v1"[..]));
    assert_eq!(cluster.current_revision().await.expect("revision"), rev);

    let pid = cluster.pid(0).expect("pid");
    cluster.kill(0).expect("kill");
    assert!(!cluster.is_running(0));
    assert!(!process_exists(pid), "killed etcd {pid} still exists");
    assert!(matches!(
        cluster.kill(0),
        Err(TestkitError::NotRunning { index: 0 })
    ));
    let err = KvClient::new(
        Channel::from_shared(cluster.endpoint(0))
            .expect("url")
            .connect_lazy(),
    )
    .range(RangeRequest {
        key: b"/k".to_vec(),
        ..Default::default()
    })
    .await
    .expect_err("a killed member answers nothing");
    assert_eq!(err.code(), Code::Unavailable, "{err}");

    cluster.restart(0).await.expect("restart");
    assert!(cluster.is_running(0));
    let mut client = kv(&cluster).await;
    assert_eq!(get(&mut client, "/k").await.as_deref(), Some(&b"v1"[..]));
    assert_eq!(cluster.current_revision().await.expect("revision"), rev);
    assert_eq!(put(&mut client, "/k", "v2").await, rev + 1);
}

#[tokio::test]
async fn frozen_member_times_out_until_thawed() {
    let mut cluster = EtcdCluster::single().await.expect("start etcd");
    // Connected before the freeze, so the timeout is the request's own.
    let channel = Channel::from_shared(cluster.endpoint(0))
        .expect("url")
        .timeout(Duration::from_millis(1500))
        .connect()
        .await
        .expect("connect");
    let mut client = KvClient::new(channel);
    put(&mut client, "/frozen", "x").await;

    cluster.freeze(0).expect("freeze");
    assert!(cluster.is_frozen(0));
    assert!(cluster.is_running(0), "a frozen member still exists");
    let err = client
        .range(RangeRequest {
            key: b"/frozen".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("a frozen member cannot answer");
    assert_eq!(
        err.code(),
        Code::Cancelled,
        "expected a client timeout: {err}"
    );
    assert!(cluster.wait_healthy(Duration::from_secs(1)).await.is_err());

    cluster.thaw(0).expect("thaw");
    assert!(!cluster.is_frozen(0));
    assert_eq!(
        get(&mut client, "/frozen").await.as_deref(),
        Some(&b"x"[..])
    );
    cluster
        .wait_healthy(Duration::from_secs(10))
        .await
        .expect("healthy after thaw");
}

#[tokio::test]
async fn compaction_removes_old_revisions() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let mut client = kv(&cluster).await;
    let first = put(&mut client, "/c", "1").await;
    put(&mut client, "/c", "2").await;
    let last = put(&mut client, "/c", "3").await;

    cluster.compact(last).await.expect("compact");
    let err = client
        .range(RangeRequest {
            key: b"/c".to_vec(),
            revision: first,
            ..Default::default()
        })
        .await
        .expect_err("range below the compacted revision");
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(err.message().contains("compacted"), "{err}");
    // Compacting to the same revision again is refused the same way.
    let again = cluster.compact(last).await.expect_err("second compaction");
    assert!(again.to_string().contains("compacted"), "{again}");
    assert_eq!(get(&mut client, "/c").await.as_deref(), Some(&b"3"[..]));
}

#[tokio::test]
async fn etcdctl_is_preconfigured() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let out = cluster
        .etcdctl()
        .args(["put", "/ctl", "hello"])
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut client = kv(&cluster).await;
    assert_eq!(
        get(&mut client, "/ctl").await.as_deref(),
        Some(&b"hello"[..])
    );
}

#[tokio::test]
async fn missing_etcd_names_the_install_command() {
    let err = EtcdCluster::start(ClusterOptions {
        etcd_bin: Some("/nonexistent/etcd".into()),
        ..Default::default()
    })
    .await
    .expect_err("no such binary");
    assert!(matches!(err, TestkitError::EtcdNotFound { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/etcd")
            && msg.contains("apt-get install -y etcd-server etcd-client"),
        "{msg}"
    );
}

#[tokio::test]
async fn bad_options_are_rejected() {
    let err = EtcdCluster::start(ClusterOptions {
        members: 2,
        ..Default::default()
    })
    .await
    .expect_err("2 members");
    assert!(matches!(err, TestkitError::InvalidOptions(_)), "{err}");
}

#[tokio::test]
async fn a_member_that_cannot_start_reports_its_log() {
    let err = EtcdCluster::start(ClusterOptions {
        extra_args: vec!["--no-such-flag".into()],
        ..Default::default()
    })
    .await
    .expect_err("etcd rejects the flag");
    let msg = err.to_string();
    assert!(
        matches!(err, TestkitError::MemberExited { member: 0, .. }),
        "{msg}"
    );
    assert!(msg.contains("no-such-flag"), "log tail missing: {msg}");
}

#[tokio::test]
async fn drop_kills_processes_and_removes_the_dir() {
    let cluster = EtcdCluster::single().await.expect("start etcd");
    let pid = cluster.pid(0).expect("pid");
    let dir = cluster.dir().to_owned();
    assert!(dir.exists());
    drop(cluster);
    assert!(!process_exists(pid), "etcd {pid} outlived its cluster");
    assert!(!dir.exists(), "{} outlived its cluster", dir.display());
}

#[tokio::test]
async fn a_panicking_test_leaves_nothing_behind() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut cluster = EtcdCluster::single().await.expect("start etcd");
        // A frozen member must be cleaned up too.
        cluster.freeze(0).expect("freeze");
        let _ = tx.send((cluster.pid(0).expect("pid"), cluster.dir().to_owned()));
        panic!("deliberate test panic");
    });
    let joined = task.await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    let (pid, dir) = rx.await.expect("the task reported its cluster");
    assert!(!process_exists(pid), "etcd {pid} outlived the panic");
    assert!(!dir.exists(), "{} outlived the panic", dir.display());
}
