//! One etcd member process: its ports, data dir, log file and child process.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, PoisonError};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::spawn::spawn_tied;
use crate::TestkitError;

/// How much of a member's log goes into an error message.
const LOG_TAIL_BYTES: u64 = 4096;

pub(crate) struct Member {
    pub(crate) index: usize,
    pub(crate) client_port: u16,
    pub(crate) peer_port: u16,
    pub(crate) log_path: PathBuf,
    /// The full etcd command line, reused verbatim by restarts.
    args: Vec<String>,
    /// Environment changes: set to `Some`, removed if `None`.
    env: Vec<(&'static str, Option<String>)>,
    /// `None` once killed. A mutex so that `is_running(&self)` can reap.
    child: Mutex<Option<Child>>,
    pub(crate) frozen: bool,
    /// etcd's member id, learnt once the cluster is up.
    pub(crate) id: u64,
}

impl Member {
    pub(crate) fn new(
        index: usize,
        client_port: u16,
        peer_port: u16,
        log_path: PathBuf,
        args: Vec<String>,
        env: Vec<(&'static str, Option<String>)>,
    ) -> Self {
        Self {
            index,
            client_port,
            peer_port,
            log_path,
            args,
            env,
            child: Mutex::new(None),
            frozen: false,
            id: 0,
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves the Option intact.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the process; the log file is appended to, so restarts keep history.
    pub(crate) fn spawn(&mut self, etcd: &Path) -> Result<(), TestkitError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| TestkitError::io(format!("opening {}", self.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| TestkitError::io("duplicating the log file handle", e))?;
        let mut command = Command::new(etcd);
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let child = spawn_tied(command)
            .map_err(|e| TestkitError::io(format!("spawning {}", etcd.display()), e))?;
        *self.child() = Some(child);
        self.frozen = false;
        Ok(())
    }

    /// `None` while running (or killed); the exit status once it exited on its own.
    pub(crate) fn exit_status(&self) -> Option<String> {
        let mut guard = self.child();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.child().is_some() && self.exit_status().is_none()
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child().as_ref().map(Child::id)
    }

    pub(crate) fn signal(&self, signal: Signal) -> Result<(), TestkitError> {
        let pid = self
            .pid()
            .ok_or(TestkitError::NotRunning { index: self.index })?;
        let pid = Pid::from_raw(pid as i32);
        kill(pid, signal).map_err(|source| TestkitError::Signal {
            index: self.index,
            signal: signal.as_str(),
            source,
        })
    }

    /// SIGKILL and reap. Works on a stopped process too.
    pub(crate) fn kill(&mut self) -> Result<(), TestkitError> {
        let Some(mut child) = self.child().take() else {
            return Err(TestkitError::NotRunning { index: self.index });
        };
        self.frozen = false;
        // kill fails only if the process was already reaped; wait still reaps a zombie.
        let _ = child.kill();
        child
            .wait()
            .map_err(|e| TestkitError::io(format!("reaping member {}", self.index), e))?;
        Ok(())
    }

    /// The last few KiB of the member's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let read = || -> std::io::Result<String> {
            let mut file = std::fs::File::open(&self.log_path)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        read().unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.child().is_some() {
            // A stopped process dies from SIGKILL as well, but resume it first
            // so that nothing observes it half-alive.
            let _ = self.signal(Signal::SIGCONT);
            let _ = self.kill();
        }
    }
}
