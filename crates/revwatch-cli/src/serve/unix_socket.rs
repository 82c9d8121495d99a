//! The optional Unix socket of `serve`: bound over a stale socket file a killed
//! instance left behind (never over anything else), removed again at exit.

use std::{
    io::ErrorKind,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
};

use anyhow::Context;
use tokio::net::UnixListener;

/// A bound Unix socket listener and the file it owns.
pub struct UnixSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl UnixSocket {
    /// Binds at `path`, first removing a socket file already there; any other
    /// kind of file there is an error, not something to delete.
    pub fn bind(path: &Path) -> anyhow::Result<UnixSocket> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?,
            Ok(_) => anyhow::bail!(
                "--unix-socket {}: the path exists and is not a socket",
                path.display()
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("inspecting {}", path.display()));
            }
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("listening on the Unix socket {}", path.display()))?;
        Ok(UnixSocket {
            listener,
            file: SocketFile(path.to_owned()),
        })
    }

    /// The listener, and the file that removes the socket when dropped.
    pub fn split(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }
}

/// Removes the socket file when dropped (at exit, or when start-up fails).
pub struct SocketFile(PathBuf);

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only ours: a file replaced meanwhile by something else stays.
        if std::fs::symlink_metadata(&self.0).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
