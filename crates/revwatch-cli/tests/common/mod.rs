//! What every test of the `revwatch` binary shares: its processes, with their output
//! lines on channels, and Debian's etcdctl.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_revwatch");
/// How long a test waits for an expected line.
pub const WAIT: Duration = Duration::from_secs(30);

/// A child process whose stdout and stderr lines (those piped) arrive on channels;
/// killed on drop.
pub struct Process {
    child: Child,
    /// Its stdout lines (none unless stdout was piped).
    pub stdout: mpsc::Receiver<String>,
    /// Its stderr lines (none unless stderr was piped).
    pub stderr: mpsc::Receiver<String>,
}

impl Process {
    /// `revwatch ARGS`, stdin closed, stdout and stderr piped.
    pub fn revwatch(args: &[&str]) -> Process {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Process::spawn(command)
    }

    /// Starts `command` as it is configured.
    pub fn spawn(mut command: Command) -> Process {
        let mut child = command.spawn().expect("spawn");
        let stdout = lines(child.stdout.take());
        let stderr = lines(child.stderr.take());
        Process {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stderr line containing `needle`; every line up to it, it included.
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

    /// The next line on stdout.
    pub fn next_line(&self) -> String {
        self.stdout.recv_timeout(WAIT).expect("a line on stdout")
    }

    /// The next `n` lines on stdout.
    pub fn next_lines(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next_line()).collect()
    }

    /// The next stdout line, parsed as JSON.
    pub fn next_json(&self) -> Value {
        let line = self.next_line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"))
    }

    /// SIGTERM, and the exit status must be success.
    pub fn terminate(self) {
        let (status, stderr) = self.stop(Signal::SIGTERM);
        assert!(
            status.success(),
            "exit status after SIGTERM: {status}; stderr {stderr:#?}"
        );
    }

    /// Sends `signal` and waits (10 s at most) for the exit: its status, and the
    /// stderr lines not read yet.
    pub fn stop(mut self, signal: Signal) -> (ExitStatus, Vec<String>) {
        let pid = Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("send signal");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // The pipe is closed now: this drains it to its end.
                let rest = std::iter::from_fn(|| self.stderr.recv_timeout(WAIT).ok()).collect();
                return (status, rest);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("revwatch did not exit within 10 s of {signal}");
    }

    /// Waits (within [`WAIT`]) for an exit the process makes by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines of `r` on a channel (an empty one when there is no `r`).
fn lines(r: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(r) = r {
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// A free loopback address.
pub fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

/// Runs etcdctl (API v3) against `endpoint`; its stdout.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    etcdctl_stdin(endpoint, args, "")
}

/// [`etcdctl`] with `stdin` as its input (e.g. for `txn`).
pub fn etcdctl_stdin(endpoint: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcdctl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("etcdctl output");
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
