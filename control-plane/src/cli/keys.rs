//! The offline `keys` commands: a trust root's keys made, rotated, shown and sealed.

use std::path::Path;
use std::time::SystemTime;

use falaj_common::time::Timestamp;

use super::render::render_keys_status;
use super::{
    Failure, KeysCommand, KeysDirArgs, KeysInitArgs, KeysSealArgs, RotateRootArgs,
    RotateSigningArgs,
};
use crate::keys::{self, InitOptions, KeysError, RotateOptions};
use crate::vault::{self, Secret, UnsealFrom, VaultError};

pub(super) fn keys_failure(err: KeysError) -> Failure {
    match err {
        KeysError::Io { .. } => Failure::other(err),
        _ => Failure::config(err),
    }
}

fn keys_init(args: &KeysInitArgs, now: SystemTime) -> Result<(), Failure> {
    let options = InitOptions {
        region: args.region.clone(),
        root_keys: args.root_keys,
        root_threshold: args.root_threshold,
        signing_keys: args.signing_keys,
        signing_threshold: args.signing_threshold,
        lifetime: args.expires_in,
        root_dir: args.offline_root.clone(),
    };
    let trust = keys::init(&args.dir, &options, now).map_err(keys_failure)?;
    println!(
        "created {} root key(s) (threshold {}) in {} and {} signing key(s) (threshold {}) in {}",
        args.root_keys,
        args.root_threshold,
        args.offline_root.as_deref().unwrap_or(&args.dir).display(),
        args.signing_keys,
        args.signing_threshold,
        args.dir.display()
    );
    println!(
        "trust root: {} (version {}, region {}, expires {})",
        args.dir.join(keys::ROOT_FILE).display(),
        trust.version(),
        trust.region(),
        trust.metadata().expires
    );
    if args.offline_root.is_none() {
        println!("keep the root-*.key files offline; agents need only root.json");
    }
    Ok(())
}

pub(super) fn keys(command: KeysCommand, now: SystemTime) -> Result<(), Failure> {
    match command {
        KeysCommand::Init(args) => keys_init(&args, now),
        KeysCommand::RotateRoot(args) => keys_rotate_root(&args, now),
        KeysCommand::RotateSigning(args) => keys_rotate_signing(&args, now),
        KeysCommand::Status(args) => keys_status(&args, now),
        KeysCommand::Seal(args) => keys_seal(&args),
    }
}

fn keys_seal(args: &KeysSealArgs) -> Result<(), Failure> {
    let vault_failure = |e: VaultError| keys_failure(KeysError::Vault(e));
    keys::load_trust_unexpired(&args.keys).map_err(keys_failure)?;
    let secret = Secret::read(&args.unseal_from).map_err(vault_failure)?;
    if let Some(new) = &args.rekey {
        let new = Secret::read(new).map_err(vault_failure)?;
        vault::rekey(&args.keys, &secret, &new).map_err(vault_failure)?;
        println!("{}: the master key is wrapped under the new secret", args.keys.display());
        return Ok(());
    }
    let report = vault::seal(&args.keys, &secret).map_err(vault_failure)?;
    for path in &report.sealed {
        println!("sealed {}", path.display());
    }
    println!(
        "{}: {} key files sealed ({} were already); start the daemon with --unseal-from, or \
         give its unit the falaj-keys credential (INSTALL.md)",
        args.keys.display(),
        report.sealed.len(),
        report.already
    );
    Ok(())
}

/// The secret `from` names, read only when `dir` is sealed.
fn secret_for(dir: &Path, from: Option<&UnsealFrom>) -> Result<Option<Secret>, Failure> {
    let failure = |e: VaultError| keys_failure(KeysError::Vault(e));
    if !dir.join(vault::SEAL_FILE).exists() {
        return Ok(None);
    }
    match from {
        Some(from) => Secret::read(from).map(Some).map_err(failure),
        None => Secret::from_credential_if_any().map_err(failure),
    }
}

fn keys_rotate_root(args: &RotateRootArgs, now: SystemTime) -> Result<(), Failure> {
    let dir = &args.dir.keys;
    let current = keys::load_trust_unexpired(dir).map_err(keys_failure)?;
    let count = current.metadata().roles.root.keyids.len();
    let options = RotateOptions {
        root_dir: args.dir.root_keys_dir.clone(),
        root_keys: (!args.keep_keys).then_some(args.root_keys.unwrap_or(count)),
        root_threshold: args.root_threshold,
        lifetime: Some(args.expires_in),
        ..RotateOptions::default()
    };
    let secret = rotation_secret(&args.dir)?;
    report_rotation(dir, &keys::rotate(dir, &options, secret.as_ref(), now).map_err(keys_failure)?);
    Ok(())
}

/// The secret of a rotation's sealed directories (the keys directory or the root keys').
fn rotation_secret(args: &KeysDirArgs) -> Result<Option<Secret>, Failure> {
    match secret_for(&args.keys, args.unseal_from.as_ref())? {
        Some(secret) => Ok(Some(secret)),
        None => match &args.root_keys_dir {
            Some(root) => secret_for(root, args.unseal_from.as_ref()),
            None => Ok(None),
        },
    }
}

fn keys_rotate_signing(args: &RotateSigningArgs, now: SystemTime) -> Result<(), Failure> {
    let dir = &args.dir.keys;
    let current = keys::load_trust_unexpired(dir).map_err(keys_failure)?;
    let options = RotateOptions {
        root_dir: args.dir.root_keys_dir.clone(),
        signing_keys: Some(args.signing_keys.unwrap_or(current.signing_role().keyids.len())),
        signing_threshold: args.signing_threshold,
        lifetime: Some(args.expires_in),
        ..RotateOptions::default()
    };
    let secret = rotation_secret(&args.dir)?;
    report_rotation(dir, &keys::rotate(dir, &options, secret.as_ref(), now).map_err(keys_failure)?);
    Ok(())
}

fn report_rotation(dir: &Path, rotation: &keys::Rotation) {
    let trust = &rotation.trust;
    println!(
        "trust root version {} written to {} and {} (expires {})",
        trust.version(),
        keys::version_file(dir, trust.version()).display(),
        dir.join(keys::ROOT_FILE).display(),
        trust.expires()
    );
    for path in &rotation.retired {
        println!(
            "retired {} (no longer in the trust root; destroy it once agents follow)",
            path.display()
        );
    }
    println!(
        "restart the control plane to use it: connected agents take the new version as they \
         reconnect; air-gapped agents: falaj-agent trust update {}",
        keys::version_file(dir, trust.version()).display()
    );
}

fn keys_status(args: &KeysDirArgs, now: SystemTime) -> Result<(), Failure> {
    let versions = keys::versions(&args.keys).map_err(keys_failure)?;
    let mut held = keys::private_key_ids(&args.keys).map_err(keys_failure)?;
    if let Some(root_dir) = &args.root_keys_dir {
        held.extend(keys::private_key_ids(root_dir).map_err(keys_failure)?);
    }
    let now = Timestamp::from_system(now);
    print!("{}", render_keys_status(&versions, &held, now));
    if args.keys.join(vault::SEAL_FILE).exists() {
        println!("private keys are sealed ({})", args.keys.join(vault::SEAL_FILE).display());
    } else {
        println!("private keys are in plaintext files (mode 0600); seal them with `keys seal`");
    }
    // The CA is made on the daemon's first start; a directory from `keys init` alone has none.
    if args.keys.join(crate::ca::CA_CERT_FILE).exists() {
        let expires = crate::ca::Ca::expiry_in(&args.keys).map_err(Failure::config)?;
        println!("agents' CA certificate expires {expires}");
        if let Some(days) = falaj_common::time::expiry_warning(now, expires) {
            println!("WARNING: the agents' CA certificate expires within {days} days");
        }
    }
    Ok(())
}
