//! The agent's identity: its key pair (made here; the private key never leaves the
//! machine), its certificate, the control plane's CA, and the TLS configurations built
//! from them.
//!
//! ```text
//! DATA_DIR/identity/   0700
//!   identity.pem       certificate and private key in one file (0600), replaced atomically
//!   ca.pem             the control plane's CA, pinned at enrollment
//!   renew.key          a new key waiting for its renewed certificate (0600)
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use falaj_common::keys::Sha256;
use falaj_common::protocol::{ALPN_AGENT, ALPN_ENROLL};
use falaj_common::time::Timestamp;
use rcgen::{CertificateParams, KeyPair};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use thiserror::Error;

/// Errors about the identity files and TLS setup.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key, certificate or CSR could not be made or read.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: &str) -> impl FnOnce(&dyn std::fmt::Display) -> IdentityError + '_ {
    move |e| IdentityError::Invalid(format!("{what}: {e}"))
}

/// The key and CSR of an enrollment in progress.
const ENROLLING: &str = "enroll.pending";
const CSR_TAG: &str = "CERTIFICATE REQUEST";

/// The identity files of one data directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    dir: PathBuf,
}

/// A new key pair and a certificate signing request for it.
pub struct KeyRequest {
    key: KeyPair,
    /// The CSR (DER), sent to the control plane.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for KeyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRequest")
    }
}

impl KeyRequest {
    /// Generates an ECDSA P-256 key and a CSR for it.
    pub fn generate() -> Result<Self, IdentityError> {
        let key = KeyPair::generate().map_err(|e| invalid("generating a key")(&e))?;
        let csr = CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .map_err(|e| invalid("making a certificate signing request")(&e))?;
        Ok(Self { csr_der: csr.der().to_vec(), key })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    falaj_shell::fs::write_atomic(path, bytes, 0o600).map_err(|source| IdentityError::Io {
        op: "writing",
        path: path.to_owned(),
        source,
    })
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

impl IdentityFiles {
    /// The identity files under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join("identity") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Whether an identity has been stored.
    pub fn exists(&self) -> bool {
        self.path("identity.pem").is_file()
    }

    fn create_dir(&self) -> Result<(), IdentityError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(|source| IdentityError::Io {
            op: "creating",
            path: self.dir.clone(),
            source,
        })
    }

    /// Stores the enrolled identity: key and certificate, and the CA.
    pub fn store(
        &self,
        request: &KeyRequest,
        cert_der: &[u8],
        ca_der: &[u8],
    ) -> Result<(), IdentityError> {
        self.create_dir()?;
        write_private(&self.path("ca.pem"), pem("CERTIFICATE", ca_der).as_bytes())?;
        self.store_identity(&request.key, cert_der)
    }

    /// Whether an enrollment was begun here and not finished.
    pub fn enrollment_pending(&self) -> bool {
        self.path(ENROLLING).is_file()
    }

    /// The key and CSR of this directory's enrollment: the pending one, when an earlier
    /// enrollment was interrupted (the control plane answers a used token again for the
    /// CSR that used it, so the agent can finish), else a new pair, kept before it is sent.
    pub fn enrollment_request(&self) -> Result<KeyRequest, IdentityError> {
        let path = self.path(ENROLLING);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let request = KeyRequest::generate()?;
                self.create_dir()?;
                let both =
                    format!("{}{}", request.key.serialize_pem(), pem(CSR_TAG, &request.csr_der));
                write_private(&path, both.as_bytes())?;
                return Ok(request);
            }
            Err(source) => return Err(IdentityError::Io { op: "reading", path, source }),
        };
        let blocks = pem::parse_many(&text).map_err(|e| invalid("the pending enrollment")(&e))?;
        let block = |tag: &str| {
            blocks.iter().find(|b| b.tag() == tag).ok_or_else(|| {
                IdentityError::Invalid(format!(
                    "the pending enrollment {} has no {tag}",
                    path.display()
                ))
            })
        };
        let key = KeyPair::from_pem(&pem::encode(block("PRIVATE KEY")?))
            .map_err(|e| invalid("the pending enrollment's key")(&e))?;
        Ok(KeyRequest { key, csr_der: block(CSR_TAG)?.contents().to_vec() })
    }

    /// Forgets the enrollment begun here, once its identity is stored.
    pub fn enrollment_done(&self) -> Result<(), IdentityError> {
        let path = self.path(ENROLLING);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IdentityError::Io { op: "removing", path, source }),
        }
    }

    fn store_identity(&self, key: &KeyPair, cert_der: &[u8]) -> Result<(), IdentityError> {
        let both = format!("{}{}", pem("CERTIFICATE", cert_der), key.serialize_pem());
        write_private(&self.path("identity.pem"), both.as_bytes())
    }

    /// Keeps a renewal's new key until its certificate arrives.
    pub fn store_pending(&self, request: &KeyRequest) -> Result<(), IdentityError> {
        write_private(&self.path("renew.key"), request.key.serialize_pem().as_bytes())
    }

    /// Installs a renewed certificate with the pending key.
    pub fn install_renewed(&self, cert_der: &[u8]) -> Result<(), IdentityError> {
        let path = self.path("renew.key");
        let pem = fs::read_to_string(&path).map_err(|source| IdentityError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&pem).map_err(|e| invalid("the pending key")(&e))?;
        // A late answer to an earlier request certifies another key: installed with this
        // one, the agent could not connect again. The working identity stays, and so does
        // the pending key, for the answer that matches it.
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| invalid("the renewed certificate")(&e))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IdentityError::Invalid(
                "the renewed certificate is for another key than the one pending (a late answer to an earlier request); the current identity is kept".into(),
            ));
        }
        self.store_identity(&key, cert_der)?;
        let _ = fs::remove_file(path);
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, IdentityError> {
        let path = self.path(name);
        fs::read(&path).map_err(|source| IdentityError::Io { op: "reading", path, source })
    }

    fn certificate(&self) -> Result<CertificateDer<'static>, IdentityError> {
        CertificateDer::from_pem_slice(&self.read("identity.pem")?)
            .map_err(|e| invalid("the agent certificate")(&e))
    }

    /// The certificate's validity (not before, not after).
    pub fn validity(&self) -> Result<(Timestamp, Timestamp), IdentityError> {
        let cert = self.certificate()?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| invalid("the agent certificate")(&e))?;
        let v = parsed.validity();
        let t = |t: x509_parser::time::ASN1Time| Timestamp::from_unix(t.timestamp().max(0) as u64);
        Ok((t(v.not_before), t(v.not_after)))
    }

    /// The QUIC client configuration for sessions: the pinned CA as the only root, and
    /// this agent's certificate for mutual TLS.
    pub fn session_config(&self) -> Result<quinn::ClientConfig, IdentityError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let ca = CertificateDer::from_pem_slice(&self.read("ca.pem")?)
            .map_err(|e| invalid("the CA certificate")(&e))?;
        roots.add(ca).map_err(|e| invalid("the CA certificate")(&e))?;
        let identity = self.read("identity.pem")?;
        let key =
            PrivateKeyDer::from_pem_slice(&identity).map_err(|e| invalid("the agent key")(&e))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS versions")(&e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![self.certificate()?], key)
            .map_err(|e| invalid("the agent certificate")(&e))?;
        quic_client(tls, ALPN_AGENT)
    }
}

/// The QUIC client configuration for enrollment: no client certificate; the control plane
/// must present a chain whose CA has the SHA-256 the token carries.
pub fn enroll_config(ca_sha256: Sha256) -> Result<quinn::ClientConfig, IdentityError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid("TLS versions")(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { ca_sha256, provider }))
        .with_no_client_auth();
    quic_client(tls, ALPN_ENROLL)
}

fn quic_client(
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, IdentityError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| invalid("QUIC TLS")(&e))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window((16u32 << 20).into())
        .receive_window((64u32 << 20).into())
        .send_window(16 << 20)
        // Three keep-alives unanswered end the connection: a control-plane replica that
        // died without a word is left for another within 15 s (the shorter of the two
        // sides' idle timeouts holds).
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(
            Duration::from_secs(15).try_into().expect("15 s is a valid idle timeout"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Accepts a server chain only if it includes the CA with the pinned SHA-256, and the
/// server certificate verifies against that CA (kubeadm's discovery-token-ca-cert-hash).
#[derive(Debug)]
struct PinnedCa {
    ca_sha256: Sha256,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca =
            intermediates.iter().find(|c| Sha256::of(c) == self.ca_sha256).ok_or_else(|| {
                rustls::Error::General(
                    "the control plane's CA is not the one the enrollment token names".into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate_for(request: &KeyRequest) -> Vec<u8> {
        CertificateParams::new(vec!["agent".to_owned()])
            .and_then(|p| p.self_signed(&request.key))
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn a_late_renewal_for_another_key_never_replaces_the_working_identity() {
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(dir.path());
        let enrolled = KeyRequest::generate().unwrap();
        files.store(&enrolled, &certificate_for(&enrolled), &certificate_for(&enrolled)).unwrap();
        let working = fs::read(dir.path().join("identity/identity.pem")).unwrap();
        // Two renewals: the first one's answer arrives after the second was requested.
        let first = KeyRequest::generate().unwrap();
        let second = KeyRequest::generate().unwrap();
        files.store_pending(&first).unwrap();
        files.store_pending(&second).unwrap();
        let err = files.install_renewed(&certificate_for(&first)).unwrap_err();
        assert!(err.to_string().contains("for another key"), "{err}");
        assert_eq!(fs::read(dir.path().join("identity/identity.pem")).unwrap(), working);
        // The answer to the second request is installed.
        files.install_renewed(&certificate_for(&second)).unwrap();
        let renewed = fs::read_to_string(dir.path().join("identity/identity.pem")).unwrap();
        assert!(renewed.contains(&second.key.serialize_pem()), "the pending key is in use");
    }
}
