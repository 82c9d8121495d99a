//! Debian's etcdctl (v3 API) against the embedded server, as a user would run it.

mod common;

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::TestServer;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const ETCDCTL: &str = "/usr/bin/etcdctl";

fn etcdctl(endpoint: &str) -> Command {
    let mut cmd =
        Command::new(std::env::var_os("REVWATCH_ETCDCTL_BIN").unwrap_or_else(|| ETCDCTL.into()));
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs etcdctl with `args`, optionally feeding `stdin`; returns (success, stdout, stderr).
async fn run(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Result<(bool, String, String)> {
    let mut cmd = etcdctl(endpoint);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().context("spawning etcdctl")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .context("etcdctl timed out")??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn ok(endpoint: &str, args: &[&str]) -> Result<String> {
    let (success, out, err) = run(endpoint, args, None).await?;
    ensure!(success, "etcdctl {args:?} failed: {err}");
    Ok(out)
}

#[tokio::test]
async fn put_get_del_with_revisions_prefix_limit_sort() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    assert_eq!(ok(e, &["put", "foo", "bar"]).await?, "OK\n");
    assert_eq!(ok(e, &["put", "foo", "baz"]).await?, "OK\n");
    ok(e, &["put", "fox", "1"]).await?;
    assert_eq!(ok(e, &["get", "foo"]).await?, "foo\nbaz\n");
    assert_eq!(ok(e, &["get", "foo", "--rev=2"]).await?, "foo\nbar\n");
    assert_eq!(
        ok(e, &["get", "--prefix", "fo"]).await?,
        "foo\nbaz\nfox\n1\n"
    );
    assert_eq!(
        ok(e, &["get", "--prefix", "fo", "--limit=1"]).await?,
        "foo\nbaz\n"
    );
    assert_eq!(
        ok(
            e,
            &[
                "get",
                "--prefix",
                "fo",
                "--sort-by=MODIFY",
                "--order=DESCEND",
                "--keys-only"
            ]
        )
        .await?,
        "fox\n\nfoo\n\n"
    );
    let json = ok(e, &["get", "foo", "-w", "json"]).await?;
    assert!(json.contains("\"revision\":4"), "{json}");
    assert!(
        json.contains("\"create_revision\":2,\"mod_revision\":3,\"version\":2"),
        "{json}"
    );
    assert_eq!(ok(e, &["del", "foo"]).await?, "1\n");
    assert_eq!(ok(e, &["get", "foo"]).await?, "");
    assert_eq!(ok(e, &["del", "--prefix", "fo"]).await?, "1\n");
    Ok(())
}

#[tokio::test]
async fn txn_from_stdin() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    ok(e, &["put", "k", "1"]).await?;
    let script = "value(\"k\") = \"1\"\n\nput k 2\nput other x\n\nput k failed\n\n";
    let (success, out, err) = run(e, &["txn"], Some(script)).await?;
    ensure!(success, "txn failed: {err}");
    assert_eq!(out, "SUCCESS\n\nOK\n\nOK\n");
    assert_eq!(ok(e, &["get", "k"]).await?, "k\n2\n");
    // The compare fails now: the failure branch runs.
    let (_, out, _) = run(e, &["txn"], Some(script)).await?;
    assert_eq!(out, "FAILURE\n\nOK\n");
    assert_eq!(ok(e, &["get", "k"]).await?, "k\nfailed\n");
    Ok(())
}

#[tokio::test]
async fn watch_below_compaction_is_canceled() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    for v in ["1", "2", "3"] {
        ok(e, &["put", "w", v]).await?;
    }
    assert_eq!(ok(e, &["compaction", "3"]).await?, "compacted revision 3\n");
    let (_, out, err) = run(e, &["watch", "--rev=1", "w"], None).await?;
    let all = format!("{out}{err}");
    assert!(
        all.contains("watch was canceled (etcdserver: mvcc: required revision has been compacted)"),
        "{all}"
    );
    // Reads below the compaction fail the etcd way too.
    let (success, _, err) = run(e, &["get", "w", "--rev=2"], None).await?;
    assert!(
        !success && err.contains("required revision has been compacted"),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn watch_catch_up_and_interactive_progress() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    ok(e, &["put", "w", "1"]).await?;
    ok(e, &["put", "w", "2"]).await?;
    let mut child = etcdctl(e)
        .args(["watch", "-i"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(b"watch --rev=2 w\n").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(e, &["put", "w", "3"]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stdin.write_all(b"progress\n").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .context("etcdctl watch -i did not exit")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        // w=1 is revision 2: `--rev=2` replays it and w=2, then the live w=3; the progress
        // reply comes after all of them.
        stdout.starts_with("PUT\nw\n1\nPUT\nw\n2\nPUT\nw\n3\nprogress notify: 4\n"),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn lease_grant_keep_alive_time_to_live() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    let out = ok(e, &["lease", "grant", "60"]).await?;
    // "lease 694d77aa9e38260f granted with TTL(60s)"
    let id = out
        .split_whitespace()
        .nth(1)
        .context("no lease id")?
        .to_owned();
    assert!(out.ends_with("granted with TTL(60s)\n"), "{out}");
    ok(e, &["put", "--lease", &id, "leased", "v"]).await?;
    let out = ok(e, &["lease", "keep-alive", "--once", &id]).await?;
    assert_eq!(out, format!("lease {id} keepalived with TTL(60)\n"));
    let out = ok(e, &["lease", "timetolive", &id, "--keys"]).await?;
    assert!(
        out.starts_with(&format!("lease {id} granted with TTL(60s), remaining(")),
        "{out}"
    );
    assert!(out.ends_with("attached keys([leased])\n"), "{out}");
    let out = ok(e, &["lease", "list"]).await?;
    assert!(out.contains(&id), "{out}");
    ok(e, &["lease", "revoke", &id]).await?;
    assert_eq!(ok(e, &["get", "leased"]).await?, "");
    let out = ok(e, &["lease", "timetolive", &id]).await?;
    assert_eq!(out, format!("lease {id} already expired\n"));
    Ok(())
}

#[tokio::test]
async fn endpoint_status_and_health() -> Result<()> {
    let s = TestServer::start().await?;
    let e = &s.endpoint();
    // etcdctl 3.4 prints the health line on stderr.
    let (success, out, err) = run(e, &["endpoint", "health"], None).await?;
    assert!(
        success && format!("{out}{err}").contains("is healthy"),
        "{out}{err}"
    );
    let member = format!("{:x}", s.server().member_id());
    ok(e, &["put", "k", "v"]).await?;
    // Given an `http://` endpoint, etcdctl 3.4's per-endpoint commands put the scheme
    // into the HTTP/2 :authority; etcd's Go server lets it through, and so must we.
    let bare = s.running.local_addr().to_string();
    let mut hashes = Vec::new();
    for endpoint in [e.as_str(), bare.as_str()] {
        let out = ok(endpoint, &["endpoint", "status"]).await?;
        // "ADDR, ID, VERSION, DB SIZE, IS LEADER, IS LEARNER, TERM, INDEX, APPLIED, ERRORS"
        let fields: Vec<&str> = out.trim_end().split(", ").collect();
        assert_eq!(fields.first(), Some(&endpoint), "{out}");
        assert_eq!(fields.get(1), Some(&member.as_str()), "{out}");
        assert_eq!(fields.get(4), Some(&"true"), "leader: {out}");
        // "ADDR, HASH"
        let out = ok(endpoint, &["endpoint", "hashkv"]).await?;
        let hash = out.trim_end().rsplit(", ").next().map(str::to_owned);
        hashes.push(hash.context("no hash")?);
    }
    assert_eq!(hashes[0], hashes[1]);
    assert_ne!(hashes[0], "0");
    let (success, out, err) = run(e, &["member", "list"], None).await?;
    assert!(success, "{err}");
    assert!(
        out.starts_with(&format!("{member}, started, default, ")),
        "out={out:?} err={err:?}"
    );
    Ok(())
}
