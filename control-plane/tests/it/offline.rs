//! The control plane's offline tools: keys, reference profiles and the sample model.

use std::time::{Duration, SystemTime};

use falaj_common::onnx::OnnxModel;
use falaj_common::profile::Histogram;
use falaj_common::sample::FEATURE_COUNT;
use falaj_common::tensor::{Tensor, TensorData};
use falaj_control::keys::{self, InitOptions, KeysError};
use falaj_control::reference::{self, ReferenceError};
use falaj_control::sample::{self, SampleOptions};
use falaj_control::vault::Vault;

#[test]
fn sample_model_is_accurate_on_held_out_data() {
    let dir = tempfile::tempdir().unwrap();
    let made = sample::write(dir.path(), &SampleOptions::default()).unwrap();
    // Score the hold-out rows with the exported ONNX model, not the trainer.
    let mut reader = csv::Reader::from_path(&made.holdout).unwrap();
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for record in reader.records() {
        let values: Vec<f32> = record.unwrap().iter().map(|v| v.parse().unwrap()).collect();
        features.extend_from_slice(&values[..FEATURE_COUNT]);
        labels.push(values[FEATURE_COUNT] as i64);
    }
    let model = OnnxModel::load(&std::fs::read(&made.model).unwrap()).unwrap();
    let out = model
        .run(vec![Tensor {
            shape: vec![labels.len() as u64, FEATURE_COUNT as u64],
            data: TensorData::Fp32(features),
        }])
        .unwrap();
    let TensorData::Int64(predicted) = &out[1].data else { panic!("{:?}", out[1]) };
    let right = predicted.iter().zip(&labels).filter(|(p, l)| p == l).count();
    let accuracy = right as f64 / labels.len() as f64;
    println!("sample model hold-out accuracy: {:.2}%", accuracy * 100.0);
    assert!((accuracy - made.holdout_accuracy).abs() < 1e-9, "ONNX and trainer agree");
    assert!(accuracy > 0.88, "accuracy {accuracy}");
    assert!(
        accuracy > made.majority_share + 0.15,
        "well above the majority class {}",
        made.majority_share
    );
}

#[test]
fn reference_profile_covers_inputs_and_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let made = sample::write(dir.path(), &SampleOptions { rows: 3000, seed: 3 }).unwrap();
    let model = OnnxModel::load(&std::fs::read(&made.model).unwrap()).unwrap();
    let profile =
        reference::profile_default(&model, std::fs::File::open(&made.reference).unwrap()).unwrap();
    assert_eq!(profile.rows, 3000);
    assert_eq!(profile.inputs.len(), FEATURE_COUNT);
    assert_eq!(profile.inputs[0].name, "temperature_c");
    assert_eq!(profile.inputs[4].index, 4);
    let Histogram::Bins { counts, .. } = &profile.inputs[0].histogram else { panic!() };
    assert_eq!(counts.iter().sum::<u64>(), 3000);
    assert!((profile.inputs[0].summary.mean - 65.0).abs() < 1.0, "{:?}", profile.inputs[0].summary);
    // probabilities[0..3] and the label, whose classes are counted.
    assert_eq!(profile.outputs.len(), 4);
    let label = profile.outputs.iter().find(|c| c.tensor == "label").unwrap();
    let Histogram::Categories { values, counts, .. } = &label.histogram else {
        panic!("{label:?}")
    };
    assert_eq!(values, &[0, 1, 2]);
    assert_eq!(counts.iter().sum::<u64>(), 3000);
}

#[test]
fn reference_csv_errors_name_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let made = sample::write(dir.path(), &SampleOptions { rows: 400, seed: 3 }).unwrap();
    let model = OnnxModel::load(&std::fs::read(&made.model).unwrap()).unwrap();
    let header = falaj_common::sample::FEATURES.join(",");
    let check = |csv: String, needle: &str| {
        let err = reference::profile_default(&model, csv.as_bytes()).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
        err
    };
    check("a,b\n1,2\n".into(), "has 2 columns; the model's inputs take 8");
    let err = check(
        format!("{header}\n1,2,3,4,5,6,7,x\n"),
        "row 1, column \"acoustic_db\": \"x\" is not a number",
    );
    assert!(matches!(err, ReferenceError::Csv(_)));
    check(format!("{header}\n"), "has no rows");
    check(format!("{header}\n1,2,3\n"), "line: 2");
}

#[test]
fn keys_init_makes_a_verifiable_root_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let options = InitOptions {
        signing_keys: 3,
        signing_threshold: 2,
        lifetime: Duration::from_secs(3600),
        ..InitOptions::new("eu-west-1")
    };
    let trust = keys::init(dir.path(), &options, now).unwrap();
    assert_eq!(trust.signing_role().threshold, 2);
    let loaded = keys::load_trust(dir.path(), now).unwrap();
    assert_eq!(loaded.metadata(), trust.metadata());
    assert_eq!(
        keys::load_signing_keys(&Vault::open(dir.path(), None).unwrap(), &loaded).unwrap().len(),
        3
    );

    // Remove two signing keys: below the threshold, building is refused up front.
    let mut signing: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("signing-"))
        .collect();
    signing.sort();
    std::fs::remove_file(&signing[0]).unwrap();
    std::fs::remove_file(&signing[1]).unwrap();
    let err =
        keys::load_signing_keys(&Vault::open(dir.path(), None).unwrap(), &loaded).unwrap_err();
    assert!(matches!(err, KeysError::TooFewSigningKeys { found: 1, threshold: 2, .. }), "{err}");

    assert!(matches!(keys::init(dir.path(), &options, now), Err(KeysError::Exists(_))));
    let expired = keys::load_trust(dir.path(), now + Duration::from_secs(7200)).unwrap_err();
    assert!(expired.to_string().contains("expired"), "{expired}");
}
