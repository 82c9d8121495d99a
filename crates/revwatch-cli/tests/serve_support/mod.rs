//! What the `serve` tests share: the process and a minimal HTTP/1.1 client (with
//! the binary's common test support, which a test file declares as `mod common;`).

#![allow(dead_code)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, ExitStatus, Stdio},
};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::common::{BIN, Process, WAIT, free_addr, put};

/// The casbin RBAC-with-tenants example of the policy crate (`dom` comes from the
/// request context), which the etcd tests serve under `/authz/`.
const EXAMPLE: &str = "../../examples/policy/casbin-rbac-domains/tree";

/// A file of the casbin example, by its path in the example's tree.
pub fn example_file(path: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    std::fs::read_to_string(dir.join(path)).expect("example file")
}

/// Puts the example's model and grants under `/authz/` in the etcd at `ep`; the
/// revision of the last put.
pub fn put_example_model_and_grants(ep: &str) -> i64 {
    put(ep, "/authz/model.conf", &example_file("model.conf"));
    put(
        ep,
        "/authz/policies/grants.csv",
        &example_file("policies/grants.csv"),
    )
}

/// `serve` on the example set under `/authz/` in the etcd at `ep` (the casbin
/// backend), plus `extra` flags.
pub fn serve_example(ep: &str, extra: &[&str]) -> Serve {
    let mut args = vec![
        "--endpoints",
        ep,
        "--prefix",
        "/authz/",
        "--backend",
        "casbin",
    ];
    args.extend_from_slice(extra);
    Serve::spawn(&args, ep, &[])
}

/// A `revwatch serve` process; killed on drop.
pub struct Serve {
    process: Process,
    /// The HTTP API's address.
    pub addr: String,
    /// The etcd endpoint it follows.
    pub etcd: String,
    /// The token sent with every request, if any.
    pub token: Option<String>,
}

/// `revwatch serve LEADING ARGS` with `env` (and no inherited token), stderr piped.
fn serve_command(leading: &[&str], args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    command
        .arg("serve")
        .args(leading)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("REVWATCH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

impl Serve {
    /// `serve` on the embedded server with its data in `dir`, plus `extra` flags.
    pub fn embedded(dir: &Path, extra: &[&str]) -> Serve {
        let etcd = free_addr();
        let data = dir.join("data");
        let mut args = vec![
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--etcd-listen",
            &etcd,
        ];
        args.extend_from_slice(extra);
        Serve::spawn(&args, &format!("http://{etcd}"), &[])
    }

    /// `serve` with `args` (and `--listen` on a free port), following `etcd`.
    pub fn spawn(args: &[&str], etcd: &str, env: &[(&str, &str)]) -> Serve {
        let addr = free_addr();
        let serve = Serve {
            process: Process::spawn(serve_command(&["--listen", &addr], args, env)),
            addr,
            etcd: etcd.to_owned(),
            token: None,
        };
        serve.await_stderr("listening on");
        serve
    }

    /// Waits for a stderr line containing `needle`; the lines up to it.
    pub fn await_stderr(&self, needle: &str) -> Vec<String> {
        self.process.await_stderr(needle)
    }

    /// One request; the status code and the body (JSON, or a string if it is not).
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let auth = match &self.token {
            Some(t) => format!("Authorization: Bearer {t}\r\n"),
            None => String::new(),
        };
        let (code, text) = http(&self.addr, method, path, &auth, body.unwrap_or(""));
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (code, json)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.call("POST", path, Some(body))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    /// The Prometheus text exposition at `/metrics`.
    pub fn metrics(&self) -> String {
        let (code, metrics) = self.get("/metrics");
        assert_eq!(code, 200, "{metrics}");
        metrics.as_str().expect("text").to_owned()
    }

    /// SIGTERM; the exit status (within 10 s).
    pub fn terminate(self) -> ExitStatus {
        self.process.stop(Signal::SIGTERM).0
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// A raw HTTP/1.1 exchange (`extra_headers` end in CRLF); the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &str,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).expect("connect to serve");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    exchange(stream, addr, method, path, extra_headers, body)
}

/// [`http`] over the Unix socket at `socket`.
pub fn http_unix(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let stream = UnixStream::connect(socket).expect("connect to serve's socket");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    exchange(stream, "localhost", method, path, "", body)
}

/// Writes one request on `stream` and reads the response to its end.
fn exchange(
    mut stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &str,
) -> (u16, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    // A server refusing a large body may close before reading it all.
    let _ = stream.write_all(request.as_bytes());
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}

/// Runs `revwatch serve ARGS` expecting it to exit by itself (within [`WAIT`]);
/// its exit status and stderr.
pub fn serve_exits(args: &[&str]) -> (ExitStatus, String) {
    let mut process = Process::spawn(serve_command(&[], args, &[]));
    let status = process.wait_exit();
    // The pipe is closed: this reads it to its end.
    let stderr: Vec<String> =
        std::iter::from_fn(|| process.stderr.recv_timeout(WAIT).ok()).collect();
    (status, stderr.join("\n"))
}
