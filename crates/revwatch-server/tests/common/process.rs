//! The server binary as a child process, for tests that kill it.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Longest wait for the server to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A `revwatch-server` process; killed on drop, so a failing test leaves nothing behind.
pub struct ServerProcess {
    child: Child,
    pub endpoint: String,
}

impl ServerProcess {
    /// Starts the server on `dir` and an ephemeral port, with `args` added, and waits
    /// until it listens.
    pub async fn start(dir: &Path, args: &[String]) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_revwatch-server"))
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawning revwatch-server")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
            .await
            .context("server did not start in time")??
            .context("server exited before listening")?;
        let addr = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}"))?;
        Ok(Self {
            endpoint: format!("http://{addr}"),
            child,
        })
    }

    /// Kills the server with SIGKILL (what tokio's kill sends on Unix).
    pub async fn kill9(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
