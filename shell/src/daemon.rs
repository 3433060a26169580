//! What a daemon tells its supervisor and hears from it: systemd's notify protocol
//! (`Type=notify`: ready once the daemon serves, a watchdog ping while its runtime is
//! responsive, stopping on shutdown; every call does nothing without `NOTIFY_SOCKET`),
//! and the signals that stop it; and where its log goes.

use sd_notify::NotifyState;

/// Sends the log to standard error (the journal, under systemd), filtered by `RUST_LOG`,
/// else at `default` (`info` for the daemons, `warn` for `falaj`'s one-shot commands).
pub fn log_to_stderr(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Reports readiness, and starts the watchdog pings if the unit asks for them.
pub fn ready() {
    if let Err(err) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %err, "could not notify systemd of readiness");
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            // Pinging at half the interval from the async runtime: a wedged runtime stops
            // the pings and systemd restarts the service.
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }
}

/// Reports that the service is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first awaited: call it before telling anyone the daemon
/// is ready, so a signal sent right after that neither kills it outright nor is lost.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let interrupt = signal(SignalKind::interrupt()).ok();
        let wait = |signal: Option<Signal>| async move {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        async move {
            tokio::select! {
                () = wait(term) => {},
                () = wait(interrupt) => {},
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
