//! Re-signing registered bundles after a signing-key rotation. A bundle whose signatures
//! the trust root in force no longer accepts (signed by a retired key) is refused by
//! every agent that took the new root; re-signing gives it signatures by the keys in
//! force over the same manifest bytes, stores the new file's chunks and recipe, and
//! points its row at them. The manifest, and so the bundle's identity and what agents
//! already hold, is unchanged: agents holding it keep it, the others install the new file.
//! Nothing is re-signed unless an admin asks (`bundle re-sign`): after a key may have
//! leaked, what to trust again is the operator's call.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use falaj_common::audit::Outcome;
use falaj_common::bundle::{HEADER_LEN, Header, MAX_SIGNATURES_BYTES};
use falaj_common::chunking::Recipe;
use falaj_common::keys::{Context, Sha256, SignatureEntry};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ServiceError, ServiceResult};
use crate::blobs::BlobStore;
use crate::db::{self, BundleRow};
use crate::keyring::Keyring;
use crate::push;
use crate::state::Shared;

/// What `POST /v1/bundles/re-sign` answers, one per bundle considered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReSignedView {
    /// `NAME@VERSION`.
    pub bundle: String,
    /// Whether new signatures were made (false: the keys in force had signed it).
    pub re_signed: bool,
    /// The keys that sign it now (their ids' first 12 digits).
    pub signed_by: Vec<String>,
    /// Why it was not re-signed (it no longer verifies otherwise: expired, say), when every
    /// bundle was asked for; one bundle asked for by name is refused as an error instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// The body of `POST /v1/bundles/re-sign`: one bundle, or every one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReSignRequest {
    /// `NAME@VERSION`; every registered bundle when absent.
    #[serde(default)]
    pub bundle: Option<String>,
}

/// Re-signs the registered bundles `request` names whose signatures the trust root in
/// force does not accept, each in a file under `staging` while it is checked and
/// chunked; then issues agents' documents again (they name the new files).
pub(crate) async fn re_sign(
    shared: &Arc<Shared>,
    request: &ReSignRequest,
    staging: &Path,
) -> ServiceResult<Vec<ReSignedView>> {
    let wanted = match &request.bundle {
        Some(text) => Some(parse(text)?),
        None => None,
    };
    let rows: Vec<BundleRow> = shared
        .db
        .run(|sql| db::bundles(&sql))
        .await?
        .into_iter()
        .filter(|r| wanted.as_ref().is_none_or(|(n, v)| r.name == *n && r.version == *v))
        .collect();
    if let (Some((name, version)), true) = (&wanted, rows.is_empty()) {
        return Err(ServiceError::NotFound(format!("{name}@{version} is not registered")));
    }
    std::fs::create_dir_all(staging).map_err(ServiceError::internal)?;
    let mut views = Vec::new();
    for row in rows {
        let (state, dir) = (Arc::clone(shared), staging.to_owned());
        let keyring = shared.keyring();
        let label = format!("{}@{}", row.name, row.version);
        let done = tokio::task::spawn_blocking(move || one(&state, &keyring, row, &dir))
            .await
            .map_err(ServiceError::internal)?;
        let (view, update) = match done {
            // Every bundle asked for: one that cannot be re-signed does not stop the others.
            Err(ServiceError::Refused(reason)) if wanted.is_none() => {
                tracing::warn!(bundle = %label, %reason, "not re-signed");
                let refused = Some(reason);
                (
                    ReSignedView {
                        bundle: label,
                        re_signed: false,
                        signed_by: Vec::new(),
                        refused,
                    },
                    None,
                )
            }
            done => done?,
        };
        // Recorded here, not on the blocking pool: the audit entry names the caller.
        if let Some((old, new, details)) = update {
            let (at, target) = (Timestamp::from_system(SystemTime::now()), view.bundle.clone());
            shared
                .db
                .run(move |sql| {
                    let tx = sql.transaction()?;
                    db::re_sign_bundle(&tx, &old, &new)?;
                    crate::audit::record(&tx, at, "re-sign", &target, Outcome::Success, details)?;
                    tx.commit()
                })
                .await?;
            tracing::info!(bundle = %view.bundle, "re-signed under the keys in force");
        }
        views.push(view);
    }
    if views.iter().any(|v| v.re_signed) {
        shared.push_desired(None, SystemTime::now()).await?;
    }
    Ok(views)
}

fn parse(text: &str) -> ServiceResult<(String, u64)> {
    text.rsplit_once('@')
        .and_then(|(name, version)| Some((name.to_owned(), version.parse().ok()?)))
        .ok_or_else(|| ServiceError::Invalid(format!("{text:?}: expected NAME@VERSION")))
}

fn short(entry: &SignatureEntry) -> String {
    entry.keyid.to_string().chars().take(12).collect()
}

/// A bundle's row before and after re-signing, and what the audit entry says.
type Update = (BundleRow, BundleRow, serde_json::Value);

/// Re-signs one bundle if the keys in force did not sign it, storing the new file's
/// chunks and recipe; the row is left to the caller. Blocking.
fn one(
    shared: &Shared,
    keyring: &Keyring,
    row: BundleRow,
    staging: &Path,
) -> ServiceResult<(ReSignedView, Option<Update>)> {
    let label = format!("{}@{}", row.name, row.version);
    let blobs = shared.blobs.as_ref();
    let recipe = read_recipe(blobs, &row)?;
    let (header, prefix) = read_prefix(blobs, &recipe, &label)?;
    let manifest_end = HEADER_LEN + header.manifest_len as usize;
    let manifest = &prefix[HEADER_LEN..manifest_end];
    let old: Vec<SignatureEntry> = serde_json::from_slice(&prefix[manifest_end..])
        .map_err(|e| ServiceError::internal(format!("{label}'s stored signatures: {e}")))?;
    if keyring.trust.check_signing(Context::BundleManifest, manifest, &old).is_ok() {
        let signed_by = old.iter().map(short).collect();
        return Ok((
            ReSignedView { bundle: label, re_signed: false, signed_by, refused: None },
            None,
        ));
    }
    let signatures: Vec<SignatureEntry> = keyring
        .signers
        .iter()
        .map(|k| SignatureEntry::sign(k, Context::BundleManifest, manifest))
        .collect();
    let signature_bytes = serde_json::to_vec(&signatures).expect("signatures serialise");
    let signatures_len = u32::try_from(signature_bytes.len())
        .ok()
        .filter(|&n| n <= MAX_SIGNATURES_BYTES)
        .ok_or_else(|| ServiceError::Invalid("too many signing keys to sign a bundle".into()))?;
    let new_header = Header { manifest_len: header.manifest_len, signatures_len };

    // The new file: header, the same manifest, the new signatures, the same payload.
    let mut file = tempfile::Builder::new()
        .prefix("re-sign-")
        .tempfile_in(staging)
        .map_err(ServiceError::internal)?;
    let write = |file: &mut tempfile::NamedTempFile, bytes: &[u8]| {
        file.write_all(bytes).map_err(ServiceError::internal)
    };
    write(&mut file, &new_header.encode())?;
    write(&mut file, manifest)?;
    write(&mut file, &signature_bytes)?;
    let payload_from = header.payload_offset();
    let mut offset = 0u64;
    for chunk in &recipe.chunks {
        let bytes = get(blobs, &chunk.sha256, &label)?;
        let end = offset + bytes.len() as u64;
        if end > payload_from {
            let skip = payload_from.saturating_sub(offset) as usize;
            write(&mut file, &bytes[skip..])?;
        }
        offset = end;
    }
    file.flush().map_err(ServiceError::internal)?;

    let pushed =
        push::push_file(file.path(), &keyring.trust, &shared.region, blobs, SystemTime::now())
            .map_err(|e| match e {
                push::PushError::Refused(e) => ServiceError::Refused(format!("{label}: {e}")),
                e @ push::PushError::Io { .. } => ServiceError::internal(e),
            })?;
    if pushed.row.manifest_sha256 != row.manifest_sha256 {
        return Err(ServiceError::internal(format!("{label}: the re-signed manifest differs")));
    }
    let new = pushed.row;
    let details = json!({
        "retired": old.iter().map(short).collect::<Vec<_>>(),
        "signed_by": signatures.iter().map(short).collect::<Vec<_>>(),
        "bundle_sha256": new.bundle_sha256.to_string(),
    });
    let signed_by = signatures.iter().map(short).collect();
    Ok((
        ReSignedView { bundle: label, re_signed: true, signed_by, refused: None },
        Some((row, new, details)),
    ))
}

fn get(blobs: &dyn BlobStore, sha256: &Sha256, label: &str) -> ServiceResult<bytes::Bytes> {
    blobs
        .get(sha256)
        .map_err(ServiceError::internal)?
        .ok_or_else(|| ServiceError::internal(format!("{label}: blob {sha256} is missing")))
}

fn read_recipe(blobs: &dyn BlobStore, row: &BundleRow) -> ServiceResult<Recipe> {
    let label = format!("{}@{}", row.name, row.version);
    let bytes = get(blobs, &row.recipe_sha256, &label)?;
    Recipe::decode(&bytes, row.recipe_sha256)
        .map_err(|e| ServiceError::internal(format!("{label}'s recipe: {e}")))
}

/// The header and the bytes up to the payload (header, manifest, signatures), read from
/// the first chunks.
fn read_prefix(
    blobs: &dyn BlobStore,
    recipe: &Recipe,
    label: &str,
) -> ServiceResult<(Header, Vec<u8>)> {
    let mut bytes = Vec::new();
    let mut needed = HEADER_LEN;
    let mut header = None;
    for chunk in &recipe.chunks {
        if bytes.len() >= needed {
            break;
        }
        bytes.extend_from_slice(&get(blobs, &chunk.sha256, label)?);
        if header.is_none() && bytes.len() >= HEADER_LEN {
            let parsed = Header::parse(&bytes)
                .map_err(|e| ServiceError::internal(format!("{label}'s stored header: {e}")))?;
            needed = parsed.payload_offset() as usize;
            header = Some(parsed);
        }
    }
    match header {
        Some(header) if bytes.len() >= needed => {
            bytes.truncate(needed);
            Ok((header, bytes))
        }
        _ => Err(ServiceError::internal(format!("{label}: its stored chunks end early"))),
    }
}
