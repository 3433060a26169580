//! Formats handed over outside the protocol's frames, pinned: a feature snapshot's
//! manifest content (`SnapshotSpec`) and its payload (`postcard-rows-1`, header record
//! then rows), an enrollment token's text, an audit export (what an auditor verifies
//! offline), and `at_rest`'s sealed file (`FALAJAR1` header and segments), wrapped data
//! key and sealed blob, made with fixed keys and nonces.

use falaj_common::at_rest::{self, DataKey, DeviceKey, HEADER_LEN, MAGIC, Sealer};
use falaj_common::audit;
use falaj_common::enrollment::EnrollmentToken;
use falaj_common::features::{
    Key, Lookup, OnlineTable, SnapshotSpec, SnapshotWriter, Treatment, Value,
};
use falaj_common::fuzzing::{seeds, targets};

use super::{Item, check, check_items};

/// A payload of three entities of the fixed view (`fuzzing::targets::VIEW`), with its spec.
fn snapshot() -> (SnapshotSpec, Vec<u8>, Vec<(&'static str, Lookup)>) {
    let view = targets::view();
    let spec = targets::snapshot_spec().clone();
    let treatments = vec![Treatment::Raw; view.features.len()];
    let mut writer = SnapshotWriter::new(view, spec, treatments, None, Vec::new()).unwrap();
    let auto = || Value::Str("auto".into());
    let rows = [
        ("pump-1", Value::F32(f32::MAX), Value::Str("manual".into())),
        ("pump-2", Value::F32(-1.0), auto()),
        ("pump-3", Value::F32(21.5), auto()),
    ];
    let mut expected = Vec::new();
    for (i, (key, temperature, mode)) in rows.into_iter().enumerate() {
        let time = 1_800_000_000_000_000 + i as i64;
        let values = vec![temperature, mode];
        writer.push(Key::Str(key.into()), time, values.clone()).unwrap();
        expected.push((key, Lookup { time: Some(time), values }));
    }
    let (spec, payload) = writer.finish();
    (spec, payload, expected)
}

#[test]
fn snapshot_headers_and_payloads_are_pinned() {
    let (spec, payload, expected) = snapshot();
    check("snapshot-v1/spec.json", &serde_json::to_vec_pretty(&spec).unwrap());
    let title = "A feature snapshot's payload (format postcard-rows-1): the header record, then one\n\
                 postcard record per entity in key order. Its spec is spec.json.";
    check_items("snapshot-v1/payload.hex", title, &[Item::new("payload", payload)]);
    let committed_spec = std::fs::read(super::path("snapshot-v1/spec.json")).unwrap();
    let committed_spec: SnapshotSpec = serde_json::from_slice(&committed_spec).unwrap();
    assert_eq!(committed_spec, spec);
    let committed = &super::items("snapshot-v1/payload.hex")[0].bytes;
    let table = OnlineTable::load(committed_spec, committed).unwrap();
    assert_eq!(table.len(), expected.len());
    for (key, lookup) in expected {
        assert_eq!(table.get(key).unwrap(), Some(lookup), "{key}");
    }
}

#[test]
fn enrollment_tokens_and_audit_exports_are_pinned() {
    let token = super::protocol::token();
    check("enrollment-token-v1.txt", token.to_string().as_bytes());
    let committed = std::fs::read_to_string(super::path("enrollment-token-v1.txt")).unwrap();
    assert_eq!(committed.parse::<EnrollmentToken>().unwrap(), token);

    let export = seeds::audit_lines().join("\n") + "\n";
    check("audit-export-v1.jsonl", export.as_bytes());
    let committed = std::fs::read_to_string(super::path("audit-export-v1.jsonl")).unwrap();
    let verified = audit::verify(committed.lines(), &[targets::signing_key().public()]).unwrap();
    assert_eq!((verified.entries, verified.checkpoints), (6, 2));
}

/// Randomness that always gives `byte`: fixed data keys and nonces.
#[allow(deprecated)] // ring's test randomness, the one way to fix what it draws
fn fixed(byte: u8) -> ring::test::rand::FixedByteRandom {
    ring::test::rand::FixedByteRandom { byte }
}

fn data_key() -> DataKey {
    DataKey::generate(&fixed(0x42)).unwrap()
}

fn device_key() -> DeviceKey {
    DeviceKey::from_material(&[0x17; 32]).unwrap()
}

const IDENTITY: &[u8] = b"bundle fault@2 manifest 0404";
/// Two whole segments of 16 bytes and a short last one.
const PLAINTEXT: &[u8] = b"weights of the model, 40 bytes long!....";

#[test]
fn sealed_files_wrapped_keys_and_blobs_are_pinned() {
    let mut file = Vec::new();
    let mut writer = Sealer::with_segment(data_key(), IDENTITY, 16, &mut file);
    writer.push(PLAINTEXT, &mut file);
    writer.finish(&mut file);
    assert_eq!(&file[..MAGIC.len()], MAGIC);
    let (device, data) = (device_key(), data_key());
    let wrapped = device.wrap(&data, IDENTITY, &fixed(0x0c)).unwrap();
    let blob = device.seal_blob(b"chunk 0505", b"a chunk in transit", &fixed(0x0d)).unwrap();
    let title = "at_rest (format FALAJAR1): a sealed file of 16-byte segments (header: magic, segment\n\
                 size u32 LE; then each segment's ciphertext and tag), the wrapped data key\n\
                 (nonce, ciphertext, tag) and a sealed blob, under fixed keys and nonces.";
    let items = [
        Item::new("sealed file", file),
        Item::new("wrapped data key", wrapped),
        Item::new("sealed blob", blob),
    ];
    let committed = check_items("at-rest-v1.hex", title, &items);
    assert_eq!(committed[0].bytes.len(), HEADER_LEN + PLAINTEXT.len() + 3 * at_rest::TAG_LEN);
    let key = device.unwrap(&committed[1].bytes, IDENTITY).unwrap();
    assert_eq!(at_rest::open(&key, IDENTITY, committed[0].bytes.clone()).unwrap(), PLAINTEXT);
    let opened = device.open_blob(b"chunk 0505", committed[2].bytes.clone()).unwrap();
    assert_eq!(opened, b"a chunk in transit");
}
