//! `falaj-agent serve`: the local inference server and, for an enrolled agent, its session
//! with the control plane, started and stopped together.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::reporting::Reporter;
use crate::server::{ServeConfig, ServeError, Server};
use crate::store::Identity;
use crate::sync::{SyncConfig, Syncer};

/// A started agent: models loaded, socket bound, control plane session ready to run.
#[derive(Debug)]
pub struct Agent {
    server: Server,
    syncer: Option<Arc<Syncer>>,
}

impl Agent {
    /// Loads the models of `data_dir`, binds the inference API, and prepares the control
    /// plane session if the agent is enrolled.
    pub async fn start(
        data_dir: PathBuf,
        serve: ServeConfig,
        sync: SyncConfig,
    ) -> Result<Self, ServeError> {
        let server = Server::bind(data_dir.clone(), serve).await?;
        let (reload, registry, stats) = (server.reloader(), server.registry(), server.stats());
        let syncer = tokio::task::spawn_blocking(move || Syncer::open(data_dir, reload, sync))
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??;
        Ok(Self { server, syncer: syncer.map(|s| Arc::new(s.with_server(registry, stats))) })
    }

    /// The inference API's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The gRPC endpoint's address, when `[grpc] listen` is set.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.server.grpc_addr()
    }

    /// The enrolled identity, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.syncer.as_deref().map(Syncer::identity)
    }

    /// What closes and delivers metric windows (for an enrolled agent measuring requests).
    pub fn reporter(&self) -> Option<Arc<Reporter>> {
        self.syncer.as_ref().and_then(|s| s.reporter().cloned())
    }

    /// Serves (and syncs) until `shutdown` completes.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let sync = self.syncer.map(|s| tokio::spawn(s.run(stop_rx)));
        let reloads = self.server.tls().map(|tls| tokio::spawn(reload_tls_on_hangup(tls)));
        let served = self
            .server
            .run(async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            })
            .await;
        if let Some(sync) = sync {
            let _ = sync.await;
        }
        if let Some(reloads) = reloads {
            reloads.abort();
        }
        served
    }
}

/// Reads the inference API's TLS files again on each SIGHUP (`systemctl reload`: a renewed
/// certificate), for REST and gRPC connections made from then on; files that do not load
/// are logged and the certificate in use stays. (The same SIGHUP also reloads the models.)
async fn reload_tls_on_hangup(tls: Arc<falaj_shell::tls::ReloadableTls>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
        while hangups.recv().await.is_some() {
            let certificate = tls.files().certificate.display();
            match tls.reload() {
                Ok(()) => {
                    tracing::info!(%certificate, "reloaded the inference API's TLS certificate");
                }
                Err(err) => tracing::error!(
                    error = %err,
                    "TLS reload failed; the inference API's certificate in use stays"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tls;
}
