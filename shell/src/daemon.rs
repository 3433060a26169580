//! What a daemon tells its supervisor and hears from it: systemd's notify protocol
//! (`Type=notify`: ready once the daemon serves, a watchdog ping while its runtime is
//! responsive, stopping on shutdown; every call does nothing without `NOTIFY_SOCKET`),
//! and the signals that stop it.

use sd_notify::NotifyState;

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

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
