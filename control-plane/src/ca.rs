//! The control plane's certificate authority: it signs the control plane's own TLS
//! certificate and every agent's client certificate.
//!
//! Kept in the keys directory beside the signing keys: `ca.pem` (the certificate, given to
//! agents at enrollment) and `ca.key` (PKCS#8 PEM, 0600, sealed when the directory is). Agents never send their private
//! key: they send a certificate signing request, and the CA signs the public key in it
//! under a name the control plane chooses.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_common::keys::Sha256;
use falaj_common::protocol::SERVER_NAME;
use falaj_common::time::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use thiserror::Error;

use crate::files;
use crate::vault::{Vault, VaultError};

/// The CA certificate's file name in a keys directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA key's file name in a keys directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Lifetime of the CA.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start up to this long before they are made, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(300);

/// How far back a certificate of `lifetime` starts: [`BACKDATE`], or a tenth of a short
/// lifetime, so that agents (which renew at two thirds of the span) renew on time.
fn backdate(lifetime: Duration) -> Duration {
    BACKDATE.min(lifetime / 10)
}

/// Errors of the certificate authority.
#[derive(Debug, Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file is sealed and could not be opened.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// rcgen refused (a bad CSR, a damaged key file).
    #[error("{what}: {source}")]
    Certificate {
        /// What was being done.
        what: &'static str,
        source: rcgen::Error,
    },
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Certificate { what, source }
}

fn offset(time: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(Timestamp::from_system(time).unix() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// A certificate an agent can use, as issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate (DER).
    pub der: Vec<u8>,
    /// Its serial number, hex.
    pub serial: String,
    /// When it expires.
    pub expires: Timestamp,
}

/// The loaded certificate authority.
pub struct Ca {
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    expires: Timestamp,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.fingerprint().short())
    }
}

impl Ca {
    /// Loads the CA from the vault's directory, or creates it there (for `region`) if it
    /// does not exist.
    pub fn load_or_create(vault: &Vault, region: &str, now: SystemTime) -> Result<Self, CaError> {
        let cert_path = vault.dir().join(CA_CERT_FILE);
        if !cert_path.exists() {
            let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("Falaj control plane CA ({region})"));
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.not_before = offset(now - backdate(CA_LIFETIME));
            params.not_after = offset(now + CA_LIFETIME);
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key).map_err(cert_err("self-signing the CA"))?;
            vault.write(CA_KEY_FILE, key.serialize_pem().as_bytes())?;
            files::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(|source| CaError::Io { op: "writing", path: cert_path.clone(), source })?;
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                op: "reading",
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key_pem = vault.read(CA_KEY_FILE)?;
        let key_pem = std::str::from_utf8(&key_pem).map_err(|_| CaError::Io {
            op: "reading",
            path: vault.dir().join(CA_KEY_FILE),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not PEM text"),
        })?;
        let key = KeyPair::from_pem(key_pem).map_err(cert_err("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(cert_err("reading the CA certificate"))?;
        let cert_der: CertificateDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(
            cert_pem.as_bytes(),
        )
        .map_err(|e| CaError::Io {
            op: "parsing",
            path: cert_path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        let expires = not_after(&cert_der, &vault.dir().join(CA_CERT_FILE))?;
        Ok(Self { cert_der, issuer, expires })
    }

    /// When the CA certificate in `dir` expires, read without its key (`keys status`).
    pub fn expiry_in(dir: &Path) -> Result<Timestamp, CaError> {
        let path = dir.join(CA_CERT_FILE);
        let der = CertificateDer::from_pem_file(&path).map_err(|e| CaError::Io {
            op: "reading",
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
        not_after(&der, &path)
    }

    /// When the CA certificate expires.
    pub fn expires(&self) -> Timestamp {
        self.expires
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate: what enrollment tokens pin.
    pub fn fingerprint(&self) -> Sha256 {
        Sha256::of(&self.cert_der)
    }

    /// A fresh key and certificate for the control plane's TLS endpoint, for
    /// [`SERVER_NAME`] and `extra_names`; returns the chain (leaf, CA) and the key.
    pub fn server_identity(
        &self,
        extra_names: &[String],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate().map_err(cert_err("generating the server key"))?;
        let mut names = vec![SERVER_NAME.to_owned()];
        names.extend(extra_names.iter().cloned());
        let mut params =
            CertificateParams::new(names).map_err(cert_err("server certificate names"))?;
        params.distinguished_name.push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = offset(now - backdate(lifetime));
        params.not_after = offset(now + lifetime);
        params.serial_number = Some(random_serial());
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("signing the server certificate"))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key))
    }

    /// Signs the public key in `csr_der` as agent `agent_id`'s client certificate. The
    /// request's own names are ignored: the control plane names the agent.
    pub fn sign_agent(
        &self,
        csr_der: &[u8],
        agent_id: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Issued, CaError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(cert_err("reading the certificate signing request"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:falaj:agent:{agent_id}").try_into().map_err(cert_err("agent name"))?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = offset(now - backdate(lifetime));
        let expires = Timestamp::from_system(now).saturating_add(lifetime);
        params.not_after = offset(expires.to_system());
        let serial = random_serial();
        let serial_hex = hex::encode(serial.to_bytes());
        params.serial_number = Some(serial);
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(cert_err("signing the agent certificate"))?;
        Ok(Issued { der: cert.der().to_vec(), serial: serial_hex, expires })
    }
}

/// The end of `der`'s validity (the certificate read from `path`).
fn not_after(der: &[u8], path: &Path) -> Result<Timestamp, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| Timestamp::from_unix(cert.validity().not_after.timestamp().max(0) as u64))
        .map_err(|e| CaError::Io {
            op: "parsing",
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
}

/// A random positive 16-byte serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = crate::secrets::random::<16>();
    bytes[0] &= 0x7f; // positive, as RFC 5280 asks
    bytes[0] |= 0x01; // no leading zero byte to be stripped
    SerialNumber::from_slice(&bytes)
}

/// The agent id and serial number of an agent certificate (DER), as the CA wrote them.
pub fn agent_of(cert_der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    let serial = hex::encode(cert.raw_serial());
    Some((cn, serial))
}
