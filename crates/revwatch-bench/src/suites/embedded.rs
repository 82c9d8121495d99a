//! The embedded server in a child process of this binary, so that its memory is
//! measured alone, exactly like etcd's.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

/// Hidden subcommand the child runs: `__serve-embedded DATA_DIR ADDR`.
pub const SERVE_ARG: &str = "__serve-embedded";

pub struct EmbeddedChild {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl EmbeddedChild {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new(std::env::current_exe()?)
            .arg(SERVE_ARG)
            .arg(dir.path())
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .spawn()
            .context("spawning the embedded server")?;
        let me = Self {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while crate::suites::load::connect(&me.endpoint()).await.is_err() {
            anyhow::ensure!(Instant::now() < deadline, "embedded server did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(me)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EmbeddedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's body: serve until killed.
pub async fn serve(data_dir: PathBuf, addr: SocketAddr) -> anyhow::Result<()> {
    let server = revwatch_server::Server::open(revwatch_server::ServerConfig::new(data_dir))?;
    server.serve_addr(addr, std::future::pending()).await?;
    Ok(())
}
