//! Telling systemd how the service is doing (`Type=notify`): ready once keys are loaded and
//! both sockets are bound, a watchdog ping while the runtime is responsive, and stopping on
//! shutdown. Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

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
