//! `falaj-agent keys`: the device key that seals installed bundles at rest — where it
//! comes from, what it seals, and its rotation (data keys re-wrapped, files untouched).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Args, Subcommand};
use falaj_common::at_rest::DeviceKey;

use crate::cli::{DataDir, Failure, store_failure};
use crate::store::{KeySource, Store};

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Show the device key's id and source, and how many bundle files it seals.
    Status(DataDir),
    /// Re-wrap every bundle's data key under a new device key, in one transaction; no
    /// bundle file is rewritten. With a key file, a new random key replaces it; with a
    /// systemd credential, give the new key with --new-key and then replace the credential.
    RotateDeviceKey(RotateArgs),
}

/// Arguments of `keys rotate-device-key`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// A file holding the new key (32 raw bytes or 64 hex digits), e.g. `head -c 32
    /// /dev/urandom`; required when the key comes from a systemd credential.
    #[arg(long)]
    new_key: Option<PathBuf>,
    #[command(flatten)]
    data: DataDir,
}

/// Runs a `keys` subcommand.
pub fn run(command: &KeysCommand) -> Result<(), Failure> {
    match command {
        KeysCommand::Status(data) => status(&data.resolve()?),
        KeysCommand::RotateDeviceKey(args) => {
            rotate(&args.data.resolve()?, args.new_key.as_deref())
        }
    }
}

fn status(dir: &Path) -> Result<(), Failure> {
    let store = Store::open(dir).map_err(store_failure)?;
    let status = store.key_status().map_err(store_failure)?;
    println!("device key {} from the {}", status.key_id, status.source);
    println!("bundle files sealed under it: {}", status.sealed);
    if status.plaintext > 0 {
        println!("bundle files in plaintext: {}", status.plaintext);
    }
    Ok(())
}

fn rotate(dir: &Path, new_key: Option<&Path>) -> Result<(), Failure> {
    let new = match new_key {
        None => None,
        Some(path) => {
            let material = std::fs::read(path).map_err(|e| {
                Failure::Usage(anyhow::anyhow!("reading new device key {}: {e}", path.display()))
            })?;
            Some(DeviceKey::from_material(&material).map_err(|e| {
                Failure::Usage(anyhow::anyhow!("new device key {}: {e}", path.display()))
            })?)
        }
    };
    let mut store = Store::open(dir).map_err(store_failure)?;
    let old = store.device_key_id().clone();
    let (id, count) = store.rotate_device_key(new, SystemTime::now()).map_err(store_failure)?;
    println!("device key {old} -> {id}: {count} data key(s) re-wrapped, no bundle file rewritten");
    if let KeySource::Credential(path) = store.key_status().map_err(store_failure)?.source {
        println!(
            "replace the credential {} with the new key (systemd-creds encrypt) and restart the agent",
            path.display()
        );
    }
    Ok(())
}
