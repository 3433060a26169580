//! TLS for the daemons' HTTP listeners (rustls, ring): a certificate chain and key read
//! from PEM files, optionally a client CA whose certificates clients must present, and a
//! reload that swaps in new files (on SIGHUP) for connections made from then on, keeping
//! the old ones if the new ones do not load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where a listener's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub certificate: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

/// Why TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds nothing usable.
    #[error("TLS {what} {path}: {problem}")]
    File {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// rustls refused the combination (a key that does not match the certificate...).
    #[error("TLS certificate {path}: {problem}")]
    Config {
        /// The certificate file.
        path: PathBuf,
        /// What rustls said.
        problem: String,
    },
}

/// A listener's TLS configuration, reloadable while it serves.
#[derive(Debug)]
pub struct ReloadableTls {
    files: TlsFiles,
    current: ArcSwap<rustls::ServerConfig>,
}

impl ReloadableTls {
    /// Loads `files`; fails naming the file at fault.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let config = server_config(&files)?;
        Ok(Self { files, current: ArcSwap::from_pointee(config) })
    }

    /// Reads the files again and uses them for new connections; on error the previous
    /// configuration stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.current.store(Arc::new(server_config(&self.files)?));
        Ok(())
    }

    /// The files it serves.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

fn unreadable<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(String) -> TlsError + 'p {
    move |problem| TlsError::File { what, path: path.to_owned(), problem }
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(what, path)(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| unreadable(what, path)(e.to_string()))?;
    if chain.is_empty() {
        return Err(unreadable(what, path)("holds no PEM certificate".into()));
    }
    Ok(chain)
}

fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates("certificate", &files.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| unreadable("key", &files.key)(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config {
            path: files.certificate.clone(),
            problem: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("client CA", ca)? {
                roots.add(cert).map_err(|e| unreadable("client CA", ca)(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| unreadable("client CA", ca)(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Config {
        path: files.certificate.clone(),
        problem: e.to_string(),
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
