//! The control plane's QUIC endpoint: enrollment, agent sessions and chunk transfers.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use falaj_common::audit::Outcome;
use falaj_common::chunking::Recipe;
use falaj_common::enrollment::EnrollmentToken;
use falaj_common::keys::Sha256;
use falaj_common::protocol::io::{read_frame, read_frame_within, write_frame};
use falaj_common::protocol::{
    self, ALPN_AGENT, ALPN_ENROLL, AgentMessage, ChunkHeader, ControlMessage, EnrollRequest,
    EnrollResponse, Enrollment, FetchRequest, MAX_AUDIT_PER_BATCH, MAX_CHUNKS_PER_FETCH,
    MAX_ENROLL_FRAME, MAX_WINDOWS_PER_BATCH, SequencedWindow,
};
use falaj_common::time::Timestamp;
use quinn::crypto::rustls::{HandshakeData, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::sync::mpsc;

use crate::audit::{self, Actor};
use crate::ca::{self, CaError};
use crate::db::{self, NewAgent};
use crate::monitoring;
use crate::sql::{AsSql, params};
use crate::state::{Session, Shared};

/// Connection close code: the peer is refused (revoked, unknown, bad request).
pub const CLOSE_REFUSED: u32 = 1;
/// Connection close code: a newer connection of the same agent replaced this one.
pub const CLOSE_REPLACED: u32 = 2;
/// Connection close code: the control plane is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 3;
/// Connection close code: too many enrollment connections, in all or from this address;
/// or a session too far behind to be queued a new trust root (the agent reconnects and
/// gets it first).
pub const CLOSE_BUSY: u32 = 4;
/// Connection close code: the enrollment request or its answer took too long.
pub const CLOSE_TIMEOUT: u32 = 5;

/// Most model versions remembered as held in one session; an agent reporting more starts
/// the set again from its latest report.
const MAX_HELD: usize = 4096;

/// What the control plane lets any peer send before it knows who it is: the credit every
/// connection gets in its handshake, which cannot be taken back. Agents' sessions get
/// [`AGENT_RECEIVE_WINDOW`] once their certificate is checked.
const INITIAL_RECEIVE_WINDOW: u32 = 1 << 20;
/// Connection-level receive window of an agent whose certificate was checked.
const AGENT_RECEIVE_WINDOW: u32 = 16 << 20;

/// Transport settings: large send windows for bulk transfer to agents; small receive
/// windows (agents send little: reports, windows, fetch requests), so that a connection
/// that has not yet shown a certificate holds at most 1 MiB (`INITIAL_RECEIVE_WINDOW`) in
/// quinn's buffers. The server sends no keep-alives: agents send theirs (every 5 s), and
/// a silent connection ends at the idle timeout.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1024u32.into())
        .stream_receive_window(INITIAL_RECEIVE_WINDOW.into())
        .receive_window(INITIAL_RECEIVE_WINDOW.into())
        .send_window(64 << 20)
        .keep_alive_interval(None)
        .max_idle_timeout(Some(
            Duration::from_secs(30).try_into().expect("30 s is a valid idle timeout"),
        ));
    t
}

/// The endpoint's TLS: the server certificate chain, client certificates verified against
/// the CA but optional (enrollment connections have none; sessions require one).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<quinn::ServerConfig, CaError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| tls_error("adding the CA to the client verifier", e))?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .map_err(|e| tls_error("building the client verifier", e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_error("the server certificate", e))?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec(), ALPN_ENROLL.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| tls_error("QUIC TLS", e))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport()));
    Ok(config)
}

fn tls_error(what: &'static str, err: impl std::fmt::Display) -> CaError {
    CaError::Io { op: what, path: "TLS".into(), source: std::io::Error::other(err.to_string()) }
}

/// Accepts connections until the endpoint closes. Handshakes in progress are capped in
/// total and per address; past half the cap, a client first proves its address.
pub async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if !incoming.remote_address_validated()
                && shared.handshakes.open() >= shared.retry_from
                && incoming.may_retry()
            {
                if let Err(err) = incoming.retry() {
                    tracing::debug!(%remote, error = %err, "retry failed");
                }
                return;
            }
            let Some(slot) = shared.handshakes.enter(remote.ip()) else {
                tracing::warn!(%remote, "refused a connection: too many handshakes in progress");
                incoming.refuse();
                return;
            };
            let connected = incoming.await;
            drop(slot);
            match connected {
                Ok(conn) => handle(shared, conn).await,
                Err(err) => tracing::debug!(error = %err, "handshake failed"),
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, conn: quinn::Connection) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<HandshakeData>().ok())
        .and_then(|h| h.protocol);
    let source = Some(conn.remote_address().to_string());
    match alpn.as_deref() {
        Some(ALPN_ENROLL) => {
            let remote = conn.remote_address();
            let Some(slot) = shared.enrollments.enter(remote.ip()) else {
                tracing::warn!(%remote, "refused an enrollment connection: too many open");
                conn.close(CLOSE_BUSY.into(), b"too many enrollment connections");
                return;
            };
            // One stream, no more credit than one request needs.
            conn.set_max_concurrent_bi_streams(1u32.into());
            conn.set_max_concurrent_uni_streams(0u32.into());
            conn.set_receive_window((2 * MAX_ENROLL_FRAME as u32).into());
            let actor = Actor::new("enrollment", source);
            audit::acting(actor, enroll_connection(&shared, conn)).await;
            drop(slot);
        }
        Some(ALPN_AGENT) => {
            // What an agent's session changes (renewals, job reports) is the agent's doing.
            let actor = peer_agent(&conn).map_or_else(
                || Actor::new("agent:unknown", source.clone()),
                |(agent, _)| Actor::new(format!("agent:{agent}"), source.clone()),
            );
            audit::acting(actor, agent_connection(shared, conn)).await;
        }
        _ => conn.close(CLOSE_REFUSED.into(), b"unknown protocol"),
    }
}

/// One enrollment: the request must arrive within the deadline, and the answer be taken
/// within it again; the connection is closed either way.
async fn enroll_connection(shared: &Shared, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let deadline = shared.enrollments.limits().deadline;
    let gate = &shared.enrollments;
    let received = tokio::time::timeout(deadline, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let request =
            read_frame_within::<EnrollRequest>(&mut recv, MAX_ENROLL_FRAME, &gate.buffered).await;
        Ok::<_, quinn::ConnectionError>((send, request))
    })
    .await;
    let (mut send, request) = match received {
        Ok(Ok(received)) => received,
        Ok(Err(err)) => {
            tracing::debug!(%remote, error = %err, "enrollment connection ended");
            return;
        }
        Err(_) => {
            gate.timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%remote, "closed an enrollment connection: no request in time");
            conn.close(CLOSE_TIMEOUT.into(), b"no enrollment request in time");
            return;
        }
    };
    let response = match request {
        Ok(Some(request)) => match enroll(shared, request).await {
            Ok(enrollment) => {
                tracing::info!(agent = %enrollment.agent_id, group = %enrollment.group, %remote, "agent enrolled");
                EnrollResponse::Enrolled(enrollment)
            }
            Err(reason) => {
                tracing::warn!(%remote, %reason, "enrollment refused");
                let (at, detail) = (Timestamp::from_system(SystemTime::now()), reason.clone());
                let recorded = shared
                    .db
                    .run(move |sql| {
                        let details = serde_json::json!({ "reason": detail });
                        audit::record(&sql, at, "enroll", "enrollment", Outcome::Refused, details)
                    })
                    .await;
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "recording a refused enrollment failed");
                }
                EnrollResponse::Refused(reason)
            }
        },
        Ok(None) => {
            conn.close(CLOSE_REFUSED.into(), b"no enrollment request");
            return;
        }
        Err(err) => EnrollResponse::Refused(format!("bad enrollment request: {err}")),
    };
    // Let the agent read the answer and close; then close in any case.
    let answered = tokio::time::timeout(deadline, async {
        if write_frame(&mut send, &response).await.is_ok() {
            let _ = send.finish();
            conn.closed().await;
        }
    })
    .await;
    if answered.is_err() {
        gate.timed_out.fetch_add(1, Ordering::Relaxed);
    }
    conn.close(CLOSE_REFUSED.into(), b"enrollment answered");
}

async fn enroll(shared: &Shared, request: EnrollRequest) -> Result<Enrollment, String> {
    let token: EnrollmentToken = request.token.parse().map_err(|e| format!("{e}"))?;
    if token.ca_sha256 != shared.ca.fingerprint() {
        return Err("the token was issued by another control plane".into());
    }
    let now = SystemTime::now();
    let token_use = db::TokenUse {
        token_id: token.id_hex(),
        secret_sha256: token.secret_sha256(),
        csr_sha256: Sha256::of(&request.csr_der),
    };
    let internal = |e: db::DbError| {
        tracing::error!(error = %e, "recording an enrollment failed");
        "internal error".to_owned()
    };
    // The same token and CSR again: an agent interrupted after the answer, asking again.
    let asked = token_use.clone();
    let again = shared.db.run(move |sql| db::enrolled_by(&sql, &asked)).await.map_err(internal)?;
    let agent_id = again.unwrap_or_else(|| format!("agent-{}", crate::secrets::random_hex::<6>()));
    let issued = shared
        .ca
        .sign_agent(&request.csr_der, &agent_id, shared.policy.cert_ttl, now)
        .map_err(|e| e.to_string())?;
    let agent = NewAgent {
        id: agent_id.clone(),
        hostname: request.hostname.chars().take(253).collect(),
        agent_version: request.agent_version.chars().take(64).collect(),
        serial: issued.serial.clone(),
        cert_expires: issued.expires,
    };
    let region = shared.region.clone();
    let group = shared
        .db
        .run(move |mut sql| {
            db::enroll(&mut sql, &token_use, &region, &agent, Timestamp::from_system(now))
        })
        .await
        .map_err(internal)?
        .map_err(|refusal| refusal.to_string())?;
    Ok(Enrollment {
        agent_id,
        region: shared.region.clone(),
        group,
        certificate_der: issued.der,
        certificate_expires: issued.expires,
        ca_der: shared.ca.cert_der().to_vec(),
        trust_root: shared.keyring().trust.to_json(),
    })
}

/// The agent id and certificate serial of a connection's client certificate.
fn peer_agent(conn: &quinn::Connection) -> Option<(String, String)> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    ca::agent_of(certs.first()?)
}

async fn agent_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let Some((agent, serial)) = peer_agent(&conn) else {
        conn.close(CLOSE_REFUSED.into(), b"a client certificate is required");
        return;
    };
    let valid = {
        let (agent, serial) = (agent.clone(), serial.clone());
        shared.db.run(move |sql| db::certificate_valid(&sql, &agent, &serial)).await
    };
    if !matches!(valid, Ok(true)) {
        tracing::warn!(%agent, %serial, remote = %conn.remote_address(), "refused a revoked or unknown agent certificate");
        conn.close(CLOSE_REFUSED.into(), b"agent certificate is revoked or unknown");
        return;
    }
    conn.set_receive_window(AGENT_RECEIVE_WINDOW.into());
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
    else {
        conn.close(CLOSE_REFUSED.into(), b"no session stream");
        return;
    };
    let (tx, mut rx) = mpsc::channel::<ControlMessage>(16);
    let serial_no = shared.session_serial();
    let previous =
        shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(
            agent.clone(),
            Session { serial: serial_no, connection: conn.clone(), tx, sent_version: None },
        );
    if let Some(previous) = previous {
        previous.connection.close(CLOSE_REPLACED.into(), b"replaced by a newer connection");
    }
    // Checked again now that the session is registered: a revocation that committed after
    // the first check (while the session stream was awaited) is seen here, and one that
    // commits after this check finds the session registered and closes it.
    let still_valid = {
        let (agent, serial) = (agent.clone(), serial.clone());
        shared.db.run(move |sql| db::certificate_valid(&sql, &agent, &serial)).await
    };
    if !matches!(still_valid, Ok(true)) {
        tracing::warn!(%agent, %serial, "agent revoked while connecting; session closed");
        unregister(&shared, &agent, serial_no);
        conn.close(CLOSE_REFUSED.into(), b"agent certificate is revoked or unknown");
        return;
    }
    tracing::info!(%agent, remote = %conn.remote_address(), "agent connected");
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if write_frame(&mut send, &message).await.is_err() {
                break;
            }
        }
    });
    let fetches = tokio::spawn(serve_fetches(Arc::clone(&shared), conn.clone(), agent.clone()));
    let now = SystemTime::now();
    shared.saw(&agent, now, None);
    // Newer trust roots first: the documents that follow may be signed under them.
    let chain = shared.keyring().chain.clone();
    if !chain.is_empty() {
        shared.send(&agent, ControlMessage::TrustRoots(chain)).await;
    }
    match shared.desired_for(&agent, now).await {
        Ok(signed) => shared.send_if_newer(&agent, signed),
        Err(err) => tracing::error!(%agent, error = %err, "issuing desired state failed"),
    }
    // Every version the agent reported holding in this session: its windows may concern
    // any of them (a window closed before a removal is delivered after it).
    let mut held = monitoring::Held::new();
    loop {
        match read_frame::<AgentMessage>(&mut recv).await {
            Ok(Some(AgentMessage::Hello(state) | AgentMessage::Report(state))) => {
                if held.len() + state.bundles.len() > MAX_HELD {
                    held.clear();
                }
                held.extend(state.bundles.iter().map(|b| (b.name.clone(), b.version)));
                let rolled_back = state.rollouts.iter().any(|r| r.rolled_back);
                shared.saw(&agent, SystemTime::now(), Some(state));
                // The group follows an agent's rollback at once, not at the next tick.
                if rolled_back {
                    shared.rollback_reported.notify_one();
                }
            }
            Ok(Some(AgentMessage::Renew { csr_der })) => {
                renew(&shared, &agent, &serial, &csr_der).await;
            }
            Ok(Some(AgentMessage::Windows(batch))) => {
                if !ingest(&shared, &agent, &held, &conn, batch).await {
                    break;
                }
            }
            Ok(Some(AgentMessage::Audit(lines))) => {
                let reply = store_audit(&shared, &agent, lines).await;
                shared.send(&agent, reply).await;
            }
            Ok(None) => break,
            Err(err) => {
                tracing::debug!(%agent, error = %err, "session stream ended");
                break;
            }
        }
    }
    fetches.abort();
    writer.abort();
    unregister(&shared, &agent, serial_no);
    tracing::info!(%agent, "agent disconnected");
}

/// Removes `agent`'s session if it is still the one numbered `serial_no`.
fn unregister(shared: &Shared, agent: &str, serial_no: u64) {
    let mut sessions = shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if sessions.get(agent).is_some_and(|s| s.serial == serial_no) {
        sessions.remove(agent);
    }
}

/// Stores a batch of metric windows, then acknowledges it; false if the session must end.
async fn ingest(
    shared: &Shared,
    agent: &str,
    held: &monitoring::Held,
    conn: &quinn::Connection,
    batch: Vec<SequencedWindow>,
) -> bool {
    if batch.len() > MAX_WINDOWS_PER_BATCH {
        tracing::warn!(
            agent,
            windows = batch.len(),
            "refused an oversized batch of metric windows"
        );
        conn.close(CLOSE_REFUSED.into(), b"too many metric windows in one batch");
        return false;
    }
    let seqs: Vec<u64> = batch.iter().map(|w| w.seq).collect();
    let delivery =
        monitoring::Delivery { agent: agent.to_owned(), held: held.clone(), windows: batch };
    let (delivery, ingested) = match shared.windows.store(delivery).await {
        Ok(stored) => stored,
        Err(err) => {
            // Not acknowledged: the agent keeps the windows and sends them again.
            tracing::error!(agent, error = %err, "storing metric windows failed");
            return true;
        }
    };
    shared.ingest.record(&delivery.windows, &ingested);
    tracing::debug!(
        agent,
        stored = ingested.stored.len(),
        duplicates = ingested.duplicates,
        rejected = ingested.rejected,
        "metric windows stored"
    );
    let fault = &shared.ingest.close_before_ack;
    if fault.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
        conn.close(CLOSE_SHUTDOWN.into(), b"closed before acknowledging (fault injection)");
        return false;
    }
    shared.send(agent, ControlMessage::Ack { seqs }).await;
    true
}

/// Stores a batch of the agent's audit chain; the acknowledgement, or the refusal of a
/// batch that breaks the chain (recorded in the control plane's own log).
async fn store_audit(shared: &Shared, agent: &str, lines: Vec<String>) -> ControlMessage {
    if lines.len() > MAX_AUDIT_PER_BATCH {
        return ControlMessage::Refused(format!("{} audit lines in one batch", lines.len()));
    }
    let (id, now) = (agent.to_owned(), Timestamp::from_system(SystemTime::now()));
    match shared.db.run(move |sql| audit::agents::store(&sql, &id, &lines, now)).await {
        Ok(Ok(seq)) => ControlMessage::AuditAck { seq },
        Ok(Err(reason)) => {
            tracing::warn!(%agent, %reason, "refused an agent's audit entries");
            ControlMessage::Refused(format!("audit entries refused: {reason}"))
        }
        Err(err) => {
            tracing::error!(%agent, error = %err, "storing an agent's audit entries failed");
            ControlMessage::Refused("internal error".into())
        }
    }
}

/// Signs a new certificate for the session's agent, recorded only if the certificate the
/// session was opened with (`current`) is still valid: a revoked agent gets none, even if
/// its session has not been closed yet.
async fn renew(shared: &Shared, agent: &str, current: &str, csr_der: &[u8]) {
    let now = SystemTime::now();
    let message = match shared.ca.sign_agent(csr_der, agent, shared.policy.cert_ttl, now) {
        Ok(issued) => {
            let (id, serial, expires) = (agent.to_owned(), issued.serial.clone(), issued.expires);
            let current = current.to_owned();
            let at = Timestamp::from_system(now);
            let recorded = shared
                .db
                .run(move |sql| record_renewal(&sql, &id, &current, &serial, expires, at))
                .await;
            match recorded {
                Ok(false) => {
                    tracing::warn!(agent, "refused to renew a revoked agent's certificate");
                    ControlMessage::Refused("renewal refused: the agent is revoked".into())
                }
                Ok(true) => {
                    tracing::info!(agent, expires = %issued.expires, "certificate renewed");
                    ControlMessage::Renewed { certificate_der: issued.der, expires: issued.expires }
                }
                Err(err) => {
                    tracing::error!(agent, error = %err, "recording a renewed certificate failed");
                    ControlMessage::Refused("internal error".into())
                }
            }
        }
        Err(err) => ControlMessage::Refused(format!("renewal refused: {err}")),
    };
    shared.send(agent, message).await;
}

/// Records certificate `serial` (expiring at `expires`) renewed for `agent` if the one
/// its session was opened with (`current`) is still valid; whether it did. One
/// transaction, with the agent's row locked while deciding (PostgreSQL; SQLite's one
/// writer there): a revocation at once comes wholly before (the renewal is refused) or
/// after (it revokes the renewed certificate too).
pub fn record_renewal<C: AsSql + ?Sized>(
    conn: &C,
    agent: &str,
    current: &str,
    serial: &str,
    expires: Timestamp,
    now: Timestamp,
) -> Result<bool, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    tx.query_map(
        &format!("SELECT id FROM agents WHERE id = $1{}", tx.for_update()),
        params![agent],
        |r| r.get::<String>(0),
    )?;
    if !db::certificate_valid(&tx, agent, current)? {
        return Ok(false);
    }
    db::add_certificate(&tx, agent, serial, expires, now)?;
    tx.commit()?;
    Ok(true)
}

/// The blobs a connection's agent may fetch, as of a document version.
type Fetchable = tokio::sync::Mutex<Option<(u64, Arc<HashSet<Sha256>>)>>;

/// Serves every further stream of a session as a fetch of blobs.
async fn serve_fetches(shared: Arc<Shared>, conn: quinn::Connection, agent: String) {
    // What this agent may fetch, as of the document version it was computed for.
    let allowed: Arc<Fetchable> = Arc::default();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let (shared, agent, allowed) = (Arc::clone(&shared), agent.clone(), Arc::clone(&allowed));
        tokio::spawn(async move {
            if let Err(err) = serve_fetch(&shared, &agent, &allowed, send, recv).await {
                tracing::debug!(error = %err, "fetch stream ended early");
            }
        });
    }
}

/// The blobs `agent` may fetch: the recipes of the bundles its current desired-state
/// document lists, and their chunks. Recomputed when the document's version changes.
async fn fetchable(
    shared: &Shared,
    agent: &str,
    cache: &Fetchable,
) -> Result<Arc<HashSet<Sha256>>, String> {
    let id = agent.to_owned();
    let issued =
        shared.db.run(move |sql| db::desired(&sql, &id)).await.map_err(|e| e.to_string())?;
    let Some(issued) = issued else { return Ok(Arc::default()) };
    let mut cache = cache.lock().await;
    if let Some((version, set)) = cache.as_ref().filter(|(v, _)| *v == issued.version) {
        tracing::trace!(version, "fetch allowance cached");
        return Ok(Arc::clone(set));
    }
    let signed: falaj_common::desired::SignedDesired =
        postcard::from_bytes(&issued.signed).map_err(|e| e.to_string())?;
    let document: falaj_common::desired::DesiredState =
        serde_json::from_slice(&signed.document).map_err(|e| e.to_string())?;
    let blobs = Arc::clone(&shared.blobs);
    let set = tokio::task::spawn_blocking(move || {
        let mut set = HashSet::new();
        for bundle in &document.bundles {
            set.insert(bundle.recipe_sha256);
            if let Ok(Some(bytes)) = blobs.get(&bundle.recipe_sha256)
                && let Ok(recipe) = Recipe::decode(&bytes, bundle.recipe_sha256)
            {
                set.extend(recipe.chunks.iter().map(|c| c.sha256));
            }
        }
        set
    })
    .await
    .map_err(|e| e.to_string())?;
    let set = Arc::new(set);
    *cache = Some((issued.version, Arc::clone(&set)));
    Ok(set)
}

async fn serve_fetch(
    shared: &Shared,
    agent: &str,
    allowed: &Fetchable,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(request) = read_frame::<FetchRequest>(&mut recv).await? else { return Ok(()) };
    if request.hashes.len() > MAX_CHUNKS_PER_FETCH {
        return Err(format!(
            "{} chunks asked for, at most {MAX_CHUNKS_PER_FETCH}",
            request.hashes.len()
        )
        .into());
    }
    // Only what the agent's document names: any other blob is answered as not held, so a
    // fetch is no oracle for other groups' bundles either.
    let allowed = fetchable(shared, agent, allowed).await?;
    let refused = request.hashes.iter().filter(|h| !allowed.contains(h)).count();
    if refused > 0 {
        tracing::warn!(%agent, refused, "refused fetches of blobs outside the agent's desired state");
    }
    // Read ahead on the blocking pool while earlier chunks are being sent.
    let (tx, mut rx) = mpsc::channel(4);
    let blobs = Arc::clone(&shared.blobs);
    let reader = tokio::task::spawn_blocking(move || {
        for sha256 in request.hashes {
            let blob = if allowed.contains(&sha256) {
                blobs.get(&sha256).unwrap_or_else(|err| {
                    tracing::error!(%sha256, error = %err, "reading a blob failed");
                    None
                })
            } else {
                None
            };
            if tx.blocking_send((sha256, blob)).is_err() {
                break;
            }
        }
    });
    while let Some((sha256, blob)) = rx.recv().await {
        let header = ChunkHeader { sha256, size: blob.as_ref().map(|b| b.len() as u32) };
        send.write_all(&protocol::encode(&header)).await?;
        if let Some(bytes) = blob {
            let len = bytes.len() as u64;
            send.write_chunk(bytes).await?;
            shared.ingest.transfer_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }
    reader.await?;
    send.finish()?;
    Ok(())
}
