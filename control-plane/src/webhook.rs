//! Webhook calls: a JSON body POSTed over HTTP or HTTPS (retries are the outbox's,
//! [`crate::outbox`]). HTTPS is rustls with ring and the system's root certificates, so
//! alerts and rollbacks reach chat and paging services directly.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// POSTs JSON to webhooks.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl WebhookClient {
    /// A client whose calls each take at most `timeout`. Without system roots, HTTPS calls
    /// fail (and say so) while HTTP ones work.
    pub fn new(timeout: Duration) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let tls =
            builder.with_provider_and_native_roots(Arc::clone(&provider)).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no system root certificates: HTTPS webhooks will fail");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            });
        let connector = tls.https_or_http().enable_http1().build();
        Self { client: Client::builder(TokioExecutor::new()).build(connector), timeout }
    }

    /// POSTs `json` to `url`, naming it `delivery` ([`crate::outbox::DELIVERY_HEADER`]);
    /// the response status, or why there is none.
    pub async fn post_json(
        &self,
        url: &str,
        json: Vec<u8>,
        delivery: &str,
    ) -> Result<axum::http::StatusCode, String> {
        let request = axum::http::Request::post(url)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .header(crate::outbox::DELIVERY_HEADER, delivery)
            .header(
                axum::http::header::USER_AGENT,
                concat!("falaj-control/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| format!("bad request to {url}: {e}"))?;
        match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response.status()),
            Ok(Err(e)) => Err(falaj_common::errors::describe(&e)),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }
}
