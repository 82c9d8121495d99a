//! What the `serve` tests share: the process, a minimal HTTP/1.1 client, etcdctl.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
pub const WAIT: Duration = Duration::from_secs(30);

/// A `revwatch serve` process; killed on drop.
pub struct Serve {
    child: Child,
    stderr: mpsc::Receiver<String>,
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

pub fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
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
        let mut child = serve_command(&["--listen", &addr], args, env)
            .spawn()
            .expect("spawn revwatch serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let serve = Serve {
            child,
            stderr: rx,
            addr,
            etcd: etcd.to_owned(),
            token: None,
        };
        serve.await_stderr("listening on");
        serve
    }

    /// Waits for a stderr line containing `needle`; the lines up to it.
    pub fn await_stderr(&self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.stderr.recv_timeout(WAIT) {
                Ok(line) => {
                    let found = line.contains(needle);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(e) => panic!("no stderr line with {needle:?} ({e}); got {seen:#?}"),
            }
        }
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

    /// SIGTERM; the exit status (within 10 s).
    pub fn terminate(mut self) -> ExitStatus {
        let pid = Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not exit within 10 s of SIGTERM");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Runs etcdctl (API v3) against `endpoint`; its stdout.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new("/usr/bin/etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Puts `value` at `key`; the revision of the put.
pub fn put(endpoint: &str, key: &str, value: &str) -> i64 {
    let out = etcdctl(endpoint, &["put", key, value, "-w", "json"]);
    serde_json::from_str::<Value>(&out).expect("json")["header"]["revision"]
        .as_i64()
        .expect("revision")
}

/// Runs `revwatch serve ARGS` expecting it to exit by itself (within [`WAIT`]);
/// its exit status and stderr.
pub fn serve_exits(args: &[&str]) -> (ExitStatus, String) {
    let mut child = serve_command(&[], args, &[])
        .spawn()
        .expect("spawn revwatch serve");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve {args:?} did not exit within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    (status, stderr)
}
