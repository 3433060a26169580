//! The audit key: an Ed25519 key of its own (never a bundle or document signer) that
//! signs the chain's checkpoints, made on the first start beside the other keys
//! (`keys/audit-ID.key`, 0600, sealed when the directory is), its public half published as `keys/audit.pub` (hex), the
//! file an auditor verifies an export with.

use std::fs;
use std::path::Path;

use falaj_common::keys::{PublicKey, SigningKey};
use ring::rand::SystemRandom;

use crate::files;
use crate::keys::KeysError;
use crate::vault::Vault;

/// The public half's file name in the keys directory.
pub const PUBLIC_FILE: &str = "audit.pub";

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeysError {
    let path = path.to_owned();
    move |source| KeysError::Io { op, path, source }
}

/// The audit key in the vault's directory, made (with its public file) if there is none.
pub fn load_or_create(vault: &Vault) -> Result<SigningKey, KeysError> {
    let dir = vault.dir();
    for entry in fs::read_dir(dir).map_err(io("listing", dir))? {
        let path = entry.map_err(io("listing", dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("audit-") && path.extension().is_some_and(|e| e == "key") {
            let pkcs8 = vault.read_path(&path)?;
            let key = SigningKey::from_pkcs8(&pkcs8)
                .map_err(|source| KeysError::BadKey { path: path.clone(), source })?;
            write_public(dir, &key.public())?;
            return Ok(key);
        }
    }
    let (key, pkcs8) = SigningKey::generate(&SystemRandom::new())
        .map_err(|source| KeysError::BadKey { path: dir.to_owned(), source })?;
    vault.write(&format!("audit-{}.key", key.public().id().short()), &pkcs8)?;
    write_public(dir, &key.public())?;
    tracing::info!(key = %key.public().id(), "created the audit key");
    Ok(key)
}

fn write_public(dir: &Path, key: &PublicKey) -> Result<(), KeysError> {
    let path = dir.join(PUBLIC_FILE);
    let text = format!("{key}\n");
    if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        files::write_atomic(&path, text.as_bytes(), 0o644).map_err(io("writing", &path))?;
    }
    Ok(())
}

/// Reads a public key file (`audit.pub`: the key in hex).
pub fn read_public(path: &Path) -> Result<PublicKey, KeysError> {
    let text = fs::read_to_string(path).map_err(io("reading", path))?;
    text.trim().parse().map_err(|source| KeysError::BadKey { path: path.to_owned(), source })
}
