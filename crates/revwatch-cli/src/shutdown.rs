//! The process's stop signal: Ctrl-C (SIGINT) or SIGTERM, whichever comes first.

use tokio::signal::unix::{Signal, SignalKind, signal as unix_signal};

/// Handlers for SIGINT and SIGTERM, installed at once (not on first poll), so a signal
/// that arrives while the command starts up is not lost and does not kill the process
/// before it can shut down cleanly.
pub struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

impl Signals {
    /// Installs both handlers. If one cannot be installed, that signal keeps its
    /// default action (the other still works) rather than stopping the program.
    pub fn install() -> Signals {
        Signals {
            interrupt: unix_signal(SignalKind::interrupt()).ok(),
            terminate: unix_signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves on the next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        async fn next(s: Option<&mut Signal>) {
            match s {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = next(self.interrupt.as_mut()) => {}
            () = next(self.terminate.as_mut()) => {}
        }
    }
}
