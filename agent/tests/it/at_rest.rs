//! Encryption at rest on a real agent data directory: no piece of a model's weights is
//! on disk after import (every file searched, the database and its WAL included); a file
//! tampered with is refused at load and the previous version serves; rotating the device
//! key keeps every model loading without rewriting a file; a key file others can read is
//! refused; a plaintext file an older agent left is sealed on open; the key can come from
//! a systemd credential.

use crate::support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use falaj_agent::import::ImportOptions;
use falaj_agent::store::{InstallMode, Store};
use falaj_common::at_rest;
use falaj_common::onnx::mlp_classifier;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::train::{TrainConfig, train_classifier};
use serde_json::{Value, json};
use support::{Site, holding_a_window, now, serve, test_config};

/// A classifier with a few thousand weights.
fn model(seed: u64) -> Vec<u8> {
    let data = sample::generate(300, seed, &[]);
    let config = TrainConfig { max_epochs: 1, hidden: vec![64, 32], ..TrainConfig::default() };
    let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
    mlp_classifier(&mlp, "sensors", "test")
}

fn bundle_files(site: &Site) -> BTreeMap<PathBuf, Vec<u8>> {
    support::files_under(&site.data_dir().join("bundles"))
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn agent(args: &[&str], site: &Site) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_falaj-agent"))
        .args(args)
        .arg("--data-dir")
        .arg(site.data_dir())
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap()
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn no_window_of_the_weights_is_on_disk_after_import() {
    let site = Site::new();
    let weights = model(1);
    let bundle = site.bundle("fault", 1, &weights);
    // The search finds the weights where they are in plaintext: the bundle itself.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("fault.falaj"), &bundle).unwrap();
    assert_eq!(holding_a_window(outside.path(), &weights).len(), 1, "the search works");

    site.import_bytes(&bundle, &ImportOptions::new(now())).unwrap();
    let store = site.store();
    let installed = &store.installed().unwrap()[0];
    assert_eq!(&store.read_content(installed).unwrap()[..], &weights[..], "it reads back");
    let sealed = std::fs::read(&installed.path).unwrap();
    assert_eq!(&sealed[..at_rest::MAGIC.len()], at_rest::MAGIC);
    drop(store);
    let found = holding_a_window(&site.data_dir(), &weights);
    assert!(found.is_empty(), "plaintext weights on disk in {found:?}");
    let listed: Vec<String> = support::files_under(&site.data_dir())
        .iter()
        .map(|p| p.strip_prefix(site.data_dir()).unwrap().display().to_string())
        .collect();
    assert!(listed.iter().any(|p| p == "agent.db"), "the database was searched: {listed:?}");
}

#[tokio::test]
async fn a_tampered_file_is_refused_at_load_and_the_previous_version_serves() {
    let site = Site::new();
    site.install("fault", 1, &model(1));
    site.install("fault", 2, &model(2));
    let v2 = site.store().installed().unwrap().into_iter().find(|i| i.manifest.version == 2);
    let path = v2.unwrap().path;
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let server = serve(&site, test_config()).await;
    server.reloaded("the first load", |c| c.loaded).await;
    let client = reqwest::Client::new();
    let response =
        client.get(server.url("/v2/models/fault/versions/2/ready")).send().await.unwrap();
    assert_eq!(response.status(), 400, "the tampered version is not ready");
    let error: Value = response.json().await.unwrap();
    let reason = error["error"].as_str().unwrap();
    assert!(reason.contains("failed authentication"), "{reason}");

    let rows = sample::generate(2, 5, &[]).features;
    let body =
        json!({"inputs": [{"name": "sensors", "shape": [2, 8], "datatype": "FP32", "data": rows}]});
    let response =
        client.post(server.url("/v2/models/fault/infer")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "the previous version serves");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model_version"], "1", "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn rotating_the_device_key_rewraps_keys_and_rewrites_no_file() {
    let site = Site::new();
    site.install("fault", 1, &model(1));
    site.install("other", 1, &model(3));
    let before = bundle_files(&site);
    let key_before = std::fs::read(site.data_dir().join("device.key")).unwrap();
    let id_before = site.store().device_key_id().clone();

    let out = agent(&["keys", "rotate-device-key"], &site);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 data key(s) re-wrapped"), "{}", text(&out));
    let key_after = std::fs::read(site.data_dir().join("device.key")).unwrap();
    assert_ne!(key_before, key_after, "a new key file");
    assert!(!site.data_dir().join("device.key.next").exists());
    assert_eq!(bundle_files(&site), before, "no bundle file changed");

    let store = site.store();
    assert_ne!(store.device_key_id(), &id_before);
    for installed in store.installed().unwrap() {
        store.read_content(&installed).unwrap();
    }
    let status = agent(&["keys", "status"], &site);
    assert!(status.status.success(), "{}", text(&status));
    let shown = text(&status);
    assert!(shown.contains(store.device_key_id().as_str()), "{shown}");
    assert!(shown.contains("sealed under it: 2"), "{shown}");

    // The old key no longer opens anything: put it back and the store says so.
    std::fs::write(site.data_dir().join("device.key"), &key_before).unwrap();
    let refused = agent(&["keys", "status"], &site);
    assert_eq!(refused.status.code(), Some(78), "{}", text(&refused));
    assert!(text(&refused).contains("sealed under device key"), "{}", text(&refused));

    // And models load in a server after the rotation.
    std::fs::write(site.data_dir().join("device.key"), &key_after).unwrap();
    let server = serve(&site, test_config()).await;
    server.reloaded("both models", |c| c.loaded && c.models.len() == 2).await;
    let client = reqwest::Client::new();
    let ready = client.get(server.url("/v2/health/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    server.stop().await;
}

#[test]
fn a_key_file_others_can_read_is_refused_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let key = site.data_dir().join("device.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&["keys", "status"], &site);
    assert_eq!(out.status.code(), Some(78), "a configuration error: {}", text(&out));
    let shown = text(&out);
    assert!(shown.contains(&key.display().to_string()) && shown.contains("0644"), "{shown}");
    let err = Store::open(&site.data_dir()).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_plaintext_file_an_older_agent_left_is_sealed_on_open() {
    let site = Site::new();
    let weights = model(1);
    site.install("fault", 1, &weights);
    // Turn the install back into what an agent before encryption at rest left.
    let installed = site.store().installed().unwrap().remove(0);
    let plaintext = site.bundle("fault", 1, &weights);
    let legacy = site.data_dir().join("bundles/fault/1.falaj");
    std::fs::write(&legacy, &plaintext).unwrap();
    std::fs::remove_file(&installed.path).unwrap();
    let db = rusqlite::Connection::open(site.data_dir().join("agent.db")).unwrap();
    let manifest: Vec<u8> = falaj_common::bundle::Header::parse(&plaintext)
        .map(|h| {
            plaintext[falaj_common::bundle::HEADER_LEN
                ..falaj_common::bundle::HEADER_LEN + h.manifest_len as usize]
                .to_vec()
        })
        .unwrap();
    db.execute(
        "UPDATE bundles SET path = 'bundles/fault/1.falaj', data_key = NULL, key_id = NULL,
             manifest = ?1, manifest_sha256 = ?2",
        rusqlite::params![manifest, falaj_common::keys::Sha256::of(&manifest).to_string()],
    )
    .unwrap();
    drop(db);
    assert_eq!(holding_a_window(&site.data_dir().join("bundles"), &weights).len(), 1);

    let store = site.store();
    assert_eq!(store.key_status().unwrap().sealed, 1);
    assert!(!legacy.exists(), "the plaintext file is gone");
    let installed = store.installed().unwrap().remove(0);
    assert_eq!(&store.read_content(&installed).unwrap()[..], &weights[..]);
    drop(store);
    let found = holding_a_window(&site.data_dir(), &weights);
    assert!(found.is_empty(), "plaintext weights on disk in {found:?}");
}

#[test]
fn the_device_key_can_come_from_a_systemd_credential() {
    let site = Site::new();
    site.install("fault", 1, &model(1));
    let credentials = tempfile::tempdir().unwrap();
    let key_file = site.data_dir().join("device.key");
    std::fs::rename(&key_file, credentials.path().join("falaj-device-key")).unwrap();
    let with_credential = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_falaj-agent"))
            .args(args)
            .arg("--data-dir")
            .arg(site.data_dir())
            .env("CREDENTIALS_DIRECTORY", credentials.path())
            .output()
            .unwrap()
    };
    let status = with_credential(&["keys", "status"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("systemd credential"), "{}", text(&status));
    assert!(!key_file.exists(), "no key file is made when a credential provides the key");

    // Without the credential or the file, the agent refuses rather than making a new key.
    let missing = agent(&["keys", "status"], &site);
    assert_eq!(missing.status.code(), Some(78), "{}", text(&missing));
    assert!(text(&missing).contains("missing"), "{}", text(&missing));

    // Rotation under a credential needs the new key given.
    let refused = with_credential(&["keys", "rotate-device-key"]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("--new-key"), "{}", text(&refused));
    let new_key = credentials.path().join("new-key");
    std::fs::write(&new_key, [7u8; 32]).unwrap();
    let rotated =
        with_credential(&["keys", "rotate-device-key", "--new-key", new_key.to_str().unwrap()]);
    assert!(rotated.status.success(), "{}", text(&rotated));
    assert!(text(&rotated).contains("replace the credential"), "{}", text(&rotated));
    // The old credential is now the wrong key; the new one opens everything.
    let stale = with_credential(&["keys", "status"]);
    assert_eq!(stale.status.code(), Some(78), "{}", text(&stale));
    std::fs::rename(&new_key, credentials.path().join("falaj-device-key")).unwrap();
    let fresh = with_credential(&["keys", "status"]);
    assert!(fresh.status.success(), "{}", text(&fresh));
}

#[test]
fn a_sealed_staging_file_installs_only_as_its_own_bundle() {
    let site = Site::new();
    let weights = model(1);
    let bundle = site.bundle("fault", 1, &weights);
    let header = falaj_common::bundle::Header::parse(&bundle).unwrap();
    let manifest_bytes = &bundle[falaj_common::bundle::HEADER_LEN
        ..falaj_common::bundle::HEADER_LEN + header.manifest_len as usize];
    let manifest: falaj_common::bundle::Manifest = serde_json::from_slice(manifest_bytes).unwrap();
    let mut store = site.store();
    let mut staging = store.stage(&manifest, manifest_bytes, "test-").unwrap();
    std::io::Write::write_all(&mut staging, &bundle).unwrap();
    let sealed = staging.finish().unwrap();
    let mut other = manifest.clone();
    other.version = 2;
    let err = store
        .install::<falaj_agent::store::StoreError>(
            sealed,
            &other,
            &other.to_bytes(),
            InstallMode { activate: true, managed: false },
            now(),
            |_| Ok(true),
        )
        .unwrap_err();
    assert!(err.to_string().contains("sealed for another bundle"), "{err}");
}

#[test]
fn an_interrupted_rotation_is_finished_or_dropped_at_the_next_open() {
    let site = Site::new();
    site.install("fault", 1, &model(1));
    let (key, next) = (site.data_dir().join("device.key"), site.data_dir().join("device.key.next"));
    let old = std::fs::read(&key).unwrap();
    let out = agent(&["keys", "rotate-device-key"], &site);
    assert!(out.status.success(), "{}", text(&out));
    let new = std::fs::read(&key).unwrap();

    // Cut after the commit, before the rename: the old key file and the new one beside it.
    std::fs::write(&key, &old).unwrap();
    std::fs::copy(&key, site.data_dir().join("scratch")).unwrap();
    std::fs::rename(site.data_dir().join("scratch"), &next).unwrap();
    std::fs::write(&next, &new).unwrap();
    let store = site.store();
    assert_eq!(std::fs::read(&key).unwrap(), new, "the rotation was finished");
    assert!(!next.exists());
    let installed = store.installed().unwrap().remove(0);
    store.read_content(&installed).unwrap();
    drop(store);

    // Cut before the commit: a next key no row names is dropped.
    std::fs::copy(&key, site.data_dir().join("scratch")).unwrap();
    std::fs::rename(site.data_dir().join("scratch"), &next).unwrap();
    std::fs::write(&next, &old).unwrap();
    let store = site.store();
    assert_eq!(std::fs::read(&key).unwrap(), new, "the key in use stays");
    assert!(!next.exists());
    store.read_content(&installed).unwrap();
}
