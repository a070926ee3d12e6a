//! Graceful shutdown on the signals an operator or a service manager sends, and, for a
//! process another one started and owns (the demo's children), when its owner goes away.

/// What ends a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopOn {
    /// SIGINT or SIGTERM.
    #[default]
    Signals,
    /// Those, or the end of stdin: the owning process closed the pipe or died, so no
    /// child outlives the demo that started it, even one killed with SIGKILL.
    SignalsOrStdinEnd,
}

/// Resolves when the server should stop.
pub async fn wait(stop: StopOn) {
    match stop {
        StopOn::Signals => wait_for_signal().await,
        StopOn::SignalsOrStdinEnd => tokio::select! {
            _ = wait_for_signal() => {}
            _ = stdin_end() => {}
        },
    }
}

/// Resolves when stdin reaches its end or fails.
async fn stdin_end() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 256];
    loop {
        match stdin.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
