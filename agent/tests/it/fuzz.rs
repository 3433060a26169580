//! Stable fuzzing of the agent's decoders of outside bytes: inference request bodies (JSON
//! and the binary extension), feedback bodies and the configuration file, each target of
//! `falaj_agent::fuzzing` (the bodies the cargo-fuzz binaries in `fuzz/` run) fed its
//! seeds (the committed corpus in `fuzz/seeds/TARGET/` and valid inputs made here) and a
//! fixed number of seeded mutants. `FALAJ_FUZZ_ITERATIONS`, `FALAJ_FUZZ_SEED` and
//! `FALAJ_BLESS` act as in `common/tests/it/fuzz.rs`.

use std::path::PathBuf;

use falaj_agent::fuzzing::{self, encode_request, tensor_data};
use falaj_agent::oip::{self, InferRequest, NamedTensor, RequestedOutput};
use falaj_common::fuzzing::Campaign;
use falaj_common::random::SeededRng;
use falaj_common::tensor::Tensor;

fn peak(run: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(run).bytes_max
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A campaign over the committed corpus of `name` and the `generated` seeds
/// (`Campaign::committed`), its memory measured.
fn campaign(
    name: &str,
    iterations: u64,
    generated: &[Vec<u8>],
    body: fn(&[u8]) -> bool,
) -> Campaign {
    Campaign::new(name, iterations)
        .committed(&root().join("fuzz/seeds").join(name), generated, body)
        .memory(peak, 32 << 20)
}

/// A request of random inputs (every type), outputs and entities.
fn request(rng: &mut SeededRng) -> InferRequest {
    let inputs = (0..=rng.below(3))
        .map(|i| {
            let shape = vec![1 + rng.below(3) as u64, 1 + rng.below(4) as u64];
            let n = (shape[0] * shape[1]) as usize;
            let data = tensor_data(rng.below(6), n, || rng.below(256) as u8);
            NamedTensor { name: format!("in{i}"), tensor: Tensor { shape, data } }
        })
        .collect();
    let entity_ids = (rng.below(2) == 0).then(|| vec!["pump-7".to_owned(), "12".to_owned()]);
    InferRequest {
        id: (rng.below(2) == 0).then(|| "req-é".to_owned()),
        inputs,
        outputs: (rng.below(2) == 0)
            .then(|| vec![RequestedOutput { name: "probabilities".into(), binary: true }]),
        binary_by_default: rng.below(2) == 0,
        routing_key: entity_ids.as_ref().map(|ids| ids[0].clone()),
        entity_ids,
    }
}

/// Request bodies: JSON as clients write it, and generated requests in binary form with
/// the JSON part's length as the first byte (as the target reads them).
fn requests() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3.5,null]]}]}"#,
        r#"{"id":"a","inputs":[{"name":"s","shape":[2],"datatype":"BYTES","data":["a","é"]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#,
        r#"{"inputs":[],"parameters":{"entity_ids":["p-1",7],"routing_key":"k"}}"#,
        r#"{"inputs":[{"name":"b","shape":[1,3],"datatype":"BOOL","data":[true,false,true]},{"name":"i","shape":[1],"datatype":"INT64","data":[-9007199254740993]}]}"#,
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    let mut rng = SeededRng::new(5);
    while out.len() < 12 {
        let (body, json_len) = encode_request(&request(&mut rng));
        if let Ok(len) = u8::try_from(json_len) {
            out.push([&[len][..], &body].concat());
        }
    }
    out
}

#[test]
fn generated_requests_decode_to_themselves() {
    let mut rng = SeededRng::new(9);
    for _ in 0..200 {
        let request = request(&mut rng);
        let (body, json_len) = encode_request(&request);
        assert_eq!(oip::decode_request(&body, Some(json_len)).unwrap(), request);
    }
}

#[test]
fn oip_request() {
    campaign("oip_request", 20000, &requests(), fuzzing::oip_request).run(fuzzing::oip_request);
}

#[test]
fn oip_feedback() {
    let generated: Vec<Vec<u8>> = [
        r#"{"id":"req-1","label":2}"#,
        r#"[{"id":"a","label":[1.5,"cat",true]},{"id":"b","label":"dog"}]"#,
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    campaign("oip_feedback", 10000, &generated, fuzzing::oip_feedback).run(fuzzing::oip_feedback);
}

/// The shipped configuration, and the same with every documented default written out.
fn configs() -> Vec<Vec<u8>> {
    let shipped = std::fs::read_to_string(root().join("packaging/agent/agent.toml")).unwrap();
    let written: String = shipped
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(kv) if kv.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => kv,
            _ => line,
        })
        .flat_map(|line| [line, "\n"])
        .collect();
    vec![shipped.into_bytes(), written.into_bytes()]
}

#[test]
fn agent_config() {
    campaign("agent_config", 5000, &configs(), fuzzing::agent_config).run(fuzzing::agent_config);
}
