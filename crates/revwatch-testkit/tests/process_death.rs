//! etcd members die with the test process even when it is SIGKILLed and no
//! destructor runs (they carry a parent-death signal).
//!
//! The test re-runs its own binary as a child that starts a cluster, reports
//! the member pids, and waits to be killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use revwatch_testkit::etcd::EtcdCluster;

const CHILD_ENV: &str = "REVWATCH_TESTKIT_DEATH_CHILD";
const TEST_NAME: &str = "members_die_with_a_killed_test_process";

/// Whether `pid` is a live process (zombies count as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

async fn child() {
    let cluster = EtcdCluster::three().await.expect("start etcd");
    let pids: Vec<String> = (0..3)
        .map(|i| cluster.pid(i).expect("pid").to_string())
        .collect();
    println!("CLUSTER {} {}", cluster.dir().display(), pids.join(" "));
    // Wait for the parent's SIGKILL; never returns normally.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn members_die_with_a_killed_test_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child().await;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let mut proc = Command::new(exe)
        .args([TEST_NAME, "--exact", "--nocapture"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test");
    let stdout = proc.stdout.take().expect("piped stdout");
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.starts_with("CLUSTER "))
    })
    .await
    .expect("reader task");
    let Some(line) = line else {
        let _ = proc.kill();
        let _ = proc.wait();
        panic!("the child test did not report its cluster");
    };
    let mut fields = line.split_whitespace().skip(1);
    let dir = fields.next().expect("dir").to_owned();
    let pids: Vec<u32> = fields.map(|p| p.parse().expect("pid")).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| alive(p)));

    // SIGKILL: no destructor runs in the child.
    proc.kill().expect("kill the child test");
    proc.wait().expect("reap the child test");

    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survivors: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    // Clean up whatever is left either way, then judge.
    for &p in &survivors {
        let _ = Command::new("kill").args(["-9", &p.to_string()]).status();
    }
    // The data dir cannot be removed by a SIGKILLed process; tidy it here.
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        survivors.is_empty(),
        "etcd outlived its killed parent: {survivors:?}"
    );
}
