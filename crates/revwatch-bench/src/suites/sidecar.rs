//! `sidecar`: HTTP decisions per second of the real `revwatch serve` binary (on its
//! embedded default, answering from the example policy set it seeds), against a
//! trivial axum handler returning a constant JSON decision and against plain Cedar
//! (cedar-agent style: `cedar_policy::Authorizer` on the same policies and entities)
//! behind the same HTTP stack.
//!
//! All three servers are child processes, driven by the same load generator
//! ([`generator`]) in this process: a fixed number of keep-alive connections, one
//! request in flight on each, for a fixed duration per round; rounds alternate between
//! the servers and the figures are medians over rounds. Every answer is checked: a 200
//! carrying the expected decision.
//!
//! `serve` is the `revwatch` binary next to this one in the target directory
//! (`cargo build --release -p revwatch-cli`); the suite stops with that hint when it
//! is missing.

mod generator;
mod servers;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use etcd_proto::etcdserverpb::RangeRequest;
use revwatch::mirror::source::prefix_range_end;

use self::generator::{Exchange, Round};
use super::load;
use crate::{
    report::Report,
    stats::{median, quantile, ratio},
};

pub use servers::{CHILD_ARG, child_main};

/// Keep-alive connections of the load generator, each with one request in flight.
const CONNECTIONS: usize = 16;
/// The prefix `serve` follows (its default), where it seeds its example on first start.
const PREFIX: &str = "/revwatch/policies/";
/// A question the seeded example allows (alice is an editor; editors may write).
const QUESTION: &str =
    r#"{"principal":"User::\"alice\"","action":"Action::\"write\"","resource":"Doc::\"plan\""}"#;
const EXPECTED: &str = "allow";
/// How long a server may take to answer its first checked request.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Sizes of one run.
struct Plan {
    rounds: usize,
    round_len: Duration,
    warm_up: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 3,
                round_len: Duration::from_secs(5),
                warm_up: Duration::from_secs(1),
            }
        } else {
            Plan {
                rounds: 7,
                round_len: Duration::from_secs(15),
                warm_up: Duration::from_secs(3),
            }
        }
    }
}

pub async fn run(quick: bool) -> anyhow::Result<Report> {
    let plan = Plan::new(quick);
    let exchange = Exchange {
        body: Bytes::from_static(QUESTION.as_bytes()),
        decision: EXPECTED,
    };
    let binary = revwatch_binary()?;
    let (mut sidecar, etcd) = ChildServer::serve(&binary)?;
    sidecar.wait_answering(&exchange).await?;

    // Plain Cedar gets exactly the files `serve` decides with.
    let (policies, entities) = policy_set(&etcd, PREFIX).await?;
    let files = tempfile::tempdir()?;
    let (policies_file, entities_file) = (
        files.path().join("policies.cedar"),
        files.path().join("entities.json"),
    );
    std::fs::write(&policies_file, policies)?;
    std::fs::write(&entities_file, entities)?;
    let mut trivial = ChildServer::own(servers::TRIVIAL, &[])?;
    let mut plain = ChildServer::own(
        servers::PLAIN_CEDAR,
        &[policies_file.as_os_str(), entities_file.as_os_str()],
    )?;
    trivial.wait_answering(&exchange).await?;
    plain.wait_answering(&exchange).await?;

    let mut sides = [Side::new(trivial), Side::new(sidecar), Side::new(plain)];
    for side in &sides {
        generator::round(side.server.addr, CONNECTIONS, plan.warm_up, &exchange)
            .await
            .with_context(|| format!("warming up {}", side.server.name))?;
    }
    // Alternate, so every server sees the same drift of the machine.
    for _ in 0..plan.rounds {
        for side in &mut sides {
            side.measure(plan.round_len, &exchange).await?;
        }
    }

    let [trivial, sidecar, plain] = &sides;
    let mut report = Report::new("sidecar");
    let (sidecar_rps, trivial_rps) = (sidecar.median_rps(), trivial.median_rps());
    report.figure("sidecar_rps", sidecar_rps);
    report.figure("trivial_rps", trivial_rps);
    report.figure("plain_cedar_http_rps", plain.median_rps());
    report.figure("sidecar_ratio", ratio(sidecar_rps, trivial_rps));
    // The spread of the ratio over rounds run back to back.
    let round_ratios: Vec<f64> = sidecar
        .rounds
        .iter()
        .zip(&trivial.rounds)
        .map(|(s, t)| ratio(s.per_s, t.per_s))
        .collect();
    report.figure("sidecar_ratio_min", quantile(&round_ratios, 0.0));
    report.figure("sidecar_ratio_max", quantile(&round_ratios, 1.0));
    report.figure(
        "sidecar_vs_plain_cedar_ratio",
        ratio(sidecar_rps, plain.median_rps()),
    );
    for (name, side) in [
        ("sidecar", sidecar),
        ("trivial", trivial),
        ("plain_cedar", plain),
    ] {
        report.figure(&format!("{name}_p50_ms"), side.median_of(|r| r.p50_ms));
        report.figure(&format!("{name}_p99_ms"), side.median_of(|r| r.p99_ms));
        report.figure(
            &format!("{name}_server_cpu_us_per_req"),
            side.median_of(|r| r.server_cpu_us),
        );
        report.figure(
            &format!("{name}_client_cpu_us_per_req"),
            side.median_of(|r| r.client_cpu_us),
        );
    }
    report.figure("connections", CONNECTIONS as f64);
    report.figure("round_s", plan.round_len.as_secs_f64());
    report.figure("rounds", plan.rounds as f64);
    Ok(report)
}

/// One server and its rounds.
struct Side {
    server: ChildServer,
    rounds: Vec<RoundFigures>,
}

/// The figures of one round.
struct RoundFigures {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time of the server process per request.
    server_cpu_us: f64,
    /// CPU time of this process (the load generator) per request.
    client_cpu_us: f64,
}

impl Side {
    fn new(server: ChildServer) -> Side {
        Side {
            server,
            rounds: Vec::new(),
        }
    }

    async fn measure(&mut self, len: Duration, exchange: &Exchange) -> anyhow::Result<()> {
        let (pid, me) = (self.server.child.id(), std::process::id());
        let (server0, client0) = (load::cpu_time(pid)?, load::cpu_time(me)?);
        let round: Round = generator::round(self.server.addr, CONNECTIONS, len, exchange)
            .await
            .with_context(|| format!("a round against {}", self.server.name))?;
        let (server1, client1) = (load::cpu_time(pid)?, load::cpu_time(me)?);
        let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / round.requests.max(1) as f64;
        self.rounds.push(RoundFigures {
            per_s: round.per_s(),
            p50_ms: round.latency.p50() / 1e3,
            p99_ms: round.latency.p99() / 1e3,
            server_cpu_us: per_request(server1.saturating_sub(server0)),
            client_cpu_us: per_request(client1.saturating_sub(client0)),
        });
        Ok(())
    }

    fn median_rps(&self) -> f64 {
        self.median_of(|r| r.per_s)
    }

    fn median_of(&self, figure: fn(&RoundFigures) -> f64) -> f64 {
        median(&self.rounds.iter().map(figure).collect::<Vec<_>>())
    }
}

/// The `revwatch` binary next to this one, or how to build it.
fn revwatch_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let binary = binary_next_to(&exe)?;
    anyhow::ensure!(
        binary.is_file(),
        "the sidecar suite runs the real `revwatch serve`, and {} does not exist: \
         build it first with `cargo build --release -p revwatch-cli` (the same profile \
         as this bench binary)",
        binary.display()
    );
    Ok(binary)
}

/// Where cargo puts the `revwatch` binary of the same profile as `exe`.
fn binary_next_to(exe: &Path) -> anyhow::Result<PathBuf> {
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    Ok(dir.join(format!("revwatch{}", std::env::consts::EXE_SUFFIX)))
}

/// A free loopback address (the port is released for the child to take).
fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// A server under test in a child process; killed on drop.
struct ChildServer {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
    /// The child's stderr, shown when it fails.
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildServer {
    /// `revwatch serve` on its embedded default, in a fresh data directory: the server
    /// and the embedded server's client endpoint.
    fn serve(binary: &Path) -> anyhow::Result<(ChildServer, String)> {
        let dir = tempfile::tempdir()?;
        let (listen, etcd) = (free_addr()?, free_addr()?);
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--prefix")
            .arg(PREFIX)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--etcd-listen")
            .arg(etcd.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            // A token in the bench's environment would change what is measured.
            .env_remove("REVWATCH_TOKEN");
        let server = ChildServer::spawn("sidecar", command, listen, dir)?;
        Ok((server, format!("http://{etcd}")))
    }

    /// `kind` of [`servers`] in a child of this binary.
    fn own(kind: &'static str, args: &[&std::ffi::OsStr]) -> anyhow::Result<ChildServer> {
        let dir = tempfile::tempdir()?;
        let addr = free_addr()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg(servers::CHILD_ARG)
            .arg(kind)
            .arg(addr.to_string())
            .args(args);
        let name = if kind == servers::TRIVIAL {
            "trivial"
        } else {
            "plain cedar"
        };
        ChildServer::spawn(name, command, addr, dir)
    }

    fn spawn(
        name: &'static str,
        mut command: Command,
        addr: SocketAddr,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<ChildServer> {
        let log = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting the {name} server ({command:?})"))?;
        Ok(ChildServer {
            name,
            child,
            addr,
            log,
            _dir: dir,
        })
    }

    /// Waits until the server gives the checked answer to `exchange`.
    async fn wait_answering(&mut self, exchange: &Exchange) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let answered = async {
                generator::Connection::open(self.addr)
                    .await?
                    .ask(exchange)
                    .await
            };
            let last = match answered.await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the {} server exited ({status}) before answering; its stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                );
            }
            if Instant::now() >= deadline {
                return Err(last.context(format!(
                    "the {} server gave no checked answer within {START_TIMEOUT:?}; its stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Cedar policies and entities under `prefix`, as `serve` reads them: every
/// `*.cedar` file and every `*.entities.json` array.
async fn policy_set(endpoint: &str, prefix: &str) -> anyhow::Result<(String, String)> {
    let client = load::connect(endpoint).await?;
    let response = client
        .range(RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_range_end(prefix.as_bytes()),
            ..Default::default()
        })
        .await
        .context("reading the policy set serve decides with")?;
    let files = response.kvs.into_iter().map(|kv| (kv.key, kv.value));
    assemble(files)
}

/// Policy text and an entities array from `(key, value)` pairs.
fn assemble(
    files: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<(String, String)> {
    let (mut policies, mut entities) = (String::new(), Vec::new());
    for (key, value) in files {
        let key = String::from_utf8_lossy(&key);
        if key.ends_with(".cedar") {
            policies.push_str(std::str::from_utf8(&value).with_context(|| key.to_string())?);
            policies.push('\n');
        } else if key.ends_with(".entities.json") {
            let array: Vec<serde_json::Value> =
                serde_json::from_slice(&value).with_context(|| key.to_string())?;
            entities.extend(array);
        }
    }
    anyhow::ensure!(!policies.is_empty(), "no *.cedar file under {PREFIX}");
    Ok((policies, serde_json::Value::Array(entities).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_takes_cedar_and_entities_files_only() {
        let files = [
            ("/p/a.cedar", "permit(principal, action, resource);"),
            ("/p/b.cedar", "forbid(principal, action, resource);"),
            ("/p/u.entities.json", r#"[{"uid":{"type":"U","id":"a"}}]"#),
            ("/p/r.entities.json", r#"[{"uid":{"type":"R","id":"b"}}]"#),
            ("/p/.revwatch/fleet/x", "{}"),
            ("/p/readme.txt", "not a policy"),
        ]
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()));
        let (policies, entities) = assemble(files).unwrap();
        assert_eq!(
            policies,
            "permit(principal, action, resource);\nforbid(principal, action, resource);\n"
        );
        let entities: serde_json::Value = serde_json::from_str(&entities).unwrap();
        assert_eq!(entities.as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn assemble_refuses_a_set_without_policies_or_with_bad_entities() {
        assert!(assemble([]).is_err());
        let bad = [(b"/p/u.entities.json".to_vec(), b"{".to_vec())];
        assert!(assemble(bad).is_err());
    }

    #[test]
    fn the_revwatch_binary_is_looked_for_beside_the_bench() {
        let exe = Path::new("target/release/revwatch-bench");
        let found = binary_next_to(exe).unwrap();
        assert_eq!(found.parent(), Some(Path::new("target/release")));
        assert!(
            found
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("revwatch"))
        );
        assert_ne!(found, exe);
    }
}
