//! Enrollment: a one-time token in, an agent with its own certificate, the control plane's
//! CA and the bundle trust root out.
//!
//! The key pair is generated here and only a certificate signing request is sent. The
//! control plane is authenticated on this first contact by the CA hash in the token, so
//! nothing is trusted on first use. The CA is the region's: every replica of the control
//! plane presents a certificate it issued, so any of the addresses given may answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use falaj_common::enrollment::{EnrollmentToken, TokenError};
use falaj_common::protocol::io::{FrameIoError, read_frame, write_frame};
use falaj_common::protocol::{EnrollRequest, EnrollResponse, SERVER_NAME};
use falaj_common::session::addresses::{self, AddressError};
use thiserror::Error;

use crate::identity::{IdentityError, IdentityFiles, enroll_config};
use crate::store::{Identity, Store, StoreError};

/// What to enroll with.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The control plane's QUIC addresses: `host:port`, several (one per replica)
    /// separated by commas; a name may resolve to several.
    pub control_plane: String,
    /// The token's text.
    pub token: String,
    /// This machine's name, for the fleet view.
    pub hostname: String,
    /// If given, the region this agent must be in; a token for another is refused.
    pub region: Option<String>,
}

/// Why enrollment failed.
#[derive(Debug, Error)]
pub enum EnrollError {
    /// The token's text is not a token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The list of control-plane addresses is not one.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The token is for another region than the one asked for.
    #[error("the token is for region {token:?}, this agent is for {expected:?}")]
    WrongRegion {
        /// The token's region.
        token: String,
        /// The region asked for.
        expected: String,
    },
    /// The data directory already holds an agent.
    #[error("{0} already holds an agent; enroll into an empty data directory")]
    AlreadyInitialised(String),
    /// The control plane could not be reached or was not the one the token names.
    #[error("cannot enroll with {address}: {reason}")]
    Connect {
        address: String,
        /// Why.
        reason: String,
    },
    /// The control plane refused the enrollment.
    #[error("the control plane refused the enrollment: {0}")]
    Refused(String),
    /// Key or certificate handling failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The store could not be created.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every address `entries` stand for, in order, each once: a name stands for each of
/// its records. An entry that does not resolve is named in `failures`.
async fn resolve(entries: &[String], failures: &mut Vec<String>) -> Vec<SocketAddr> {
    let mut remotes = Vec::new();
    for entry in entries {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(found) => {
                let found: Vec<SocketAddr> = found.collect();
                if found.is_empty() {
                    failures.push(format!("{entry}: the address does not resolve"));
                }
                for remote in found {
                    if !remotes.contains(&remote) {
                        remotes.push(remote);
                    }
                }
            }
            Err(e) => failures.push(format!("{entry}: {e}")),
        }
    }
    remotes
}

/// A client endpoint on an ephemeral UDP port of the right address family.
pub fn client_endpoint(remote: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let local: SocketAddr = if remote.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
        .expect("a literal address");
    quinn::Endpoint::client(local)
}

/// Enrolls a new agent in `data_dir`.
pub async fn enroll(
    data_dir: &Path,
    options: &EnrollOptions,
    now: SystemTime,
) -> Result<Identity, EnrollError> {
    let entries = addresses::parse_list(&options.control_plane)?;
    let token: EnrollmentToken = options.token.parse()?;
    if let Some(expected) = options.region.as_ref().filter(|r| **r != token.region) {
        return Err(EnrollError::WrongRegion { token: token.region, expected: expected.clone() });
    }
    // An enrollment interrupted after the control plane answered resumes with the key it
    // asked for; a directory holding any other agent is refused.
    let files = IdentityFiles::new(data_dir);
    let store_exists = data_dir.join(crate::store::DB_FILE).exists();
    if store_exists && !files.enrollment_pending() {
        return Err(EnrollError::AlreadyInitialised(data_dir.display().to_string()));
    }
    let request = files.enrollment_request()?;
    let message = EnrollRequest {
        token: options.token.trim().to_owned(),
        csr_der: request.csr_der.clone(),
        hostname: options.hostname.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    // The addresses in the order given: the first that answers enrolls; one that cannot be
    // reached (or is not the region's control plane) costs one attempt.
    let mut failures = Vec::new();
    let remotes = resolve(&entries, &mut failures).await;
    let handshake = if remotes.len() > 1 { FAILOVER_HANDSHAKE } else { HANDSHAKE };
    let mut answer = None;
    for remote in remotes {
        match ask(remote, token.ca_sha256, &message, handshake).await {
            Ok(response) => {
                answer = Some(response);
                break;
            }
            Err(reason) => failures.push(format!("{remote}: {reason}")),
        }
    }
    let Some(response) = answer else {
        return Err(EnrollError::Connect {
            address: addresses::join(&entries),
            reason: failures.join("; "),
        });
    };
    let enrollment = match response {
        EnrollResponse::Enrolled(e) => e,
        EnrollResponse::Refused(reason) => return Err(EnrollError::Refused(reason)),
    };
    if enrollment.region != token.region {
        return Err(EnrollError::Refused(format!(
            "the control plane enrolled us in region {:?}, the token says {:?}",
            enrollment.region, token.region
        )));
    }
    crate::crash_point("enroll-answered");
    files.store(&request, &enrollment.certificate_der, &enrollment.ca_der)?;
    crate::crash_point("enroll-identity-written");
    let mut store = match Store::init(data_dir, &enrollment.region, &enrollment.trust_root, now) {
        Err(StoreError::AlreadyInitialised(_)) => {
            let store = Store::open(data_dir)?;
            if store.region() != enrollment.region {
                return Err(EnrollError::AlreadyInitialised(data_dir.display().to_string()));
            }
            store
        }
        made => made?,
    };
    crate::crash_point("enroll-store-made");
    let identity = Identity {
        agent_id: enrollment.agent_id,
        group: enrollment.group,
        control_plane: addresses::join(&entries),
    };
    store.set_identity(&identity, now)?;
    files.enrollment_done()?;
    Ok(identity)
}

/// How long the handshake with the only address given may take.
const HANDSHAKE: Duration = Duration::from_secs(30);
/// How long the handshake with one of several addresses may take before the next is
/// tried (an address where nothing answers costs this).
const FAILOVER_HANDSHAKE: Duration = Duration::from_secs(5);
/// How long the control plane may take to answer once connected.
const ANSWER: Duration = Duration::from_secs(30);

/// Sends the enrollment request to `remote`, which must prove a chain to the CA whose
/// SHA-256 the token pins; the answer, or why there is none.
async fn ask(
    remote: SocketAddr,
    ca_sha256: falaj_common::keys::Sha256,
    message: &EnrollRequest,
    handshake: Duration,
) -> Result<EnrollResponse, String> {
    let endpoint = client_endpoint(remote).map_err(|e| e.to_string())?;
    let config = enroll_config(ca_sha256).map_err(|e| e.to_string())?;
    let connecting =
        endpoint.connect_with(config, remote, SERVER_NAME).map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(handshake, connecting)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let io = |e: FrameIoError| e.to_string();
        write_frame(&mut send, message).await.map_err(io)?;
        let _ = send.finish();
        read_frame::<EnrollResponse>(&mut recv)
            .await
            .map_err(io)?
            .ok_or_else(|| "the control plane closed the stream without answering".to_owned())
    };
    let response =
        tokio::time::timeout(ANSWER, exchange).await.map_err(|_| "timed out".to_owned())?;
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    response
}
