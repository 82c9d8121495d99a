//! The process's stop signal: Ctrl-C or SIGTERM, whichever comes first.

/// Resolves on SIGINT or SIGTERM. If a handler cannot be installed, that signal is
/// simply not awaited (the other still works) rather than stopping the program at once.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
