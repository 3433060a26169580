//! Encryption at rest: model load time with and without it, in the same run.
//!
//! For each size (10 MB and 500 MB of weights: one `MatMul` of `[N, 1024]` by a
//! `[1024, K]` initializer), a signed bundle is written and imported into a fresh agent
//! store (sealed at rest). Then, in alternating rounds:
//! - **plaintext** (the anchor): the bundle file as it was before this feature, read from
//!   disk and checked as the store checks it (manifest hash, every payload hash);
//! - **sealed**: `Store::read_content`, which reads the sealed file, unwraps its data key,
//!   opens every segment (AES-256-GCM) and makes the same checks;
//!
//! each alone ("read") and followed by the load the agent then makes (tract: parse,
//! optimise, plan; "load"). Both files are in the page cache after the first round.
//!
//! `cargo bench -p falaj-agent --bench at_rest -- [--rounds N] [--sizes-mb 10,500]`

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::store::Store;
use falaj_common::bundle::{BundleBuilder, Content, ModelFormat, ModelSpec, RuntimeHint};
use falaj_common::keys::SigningKey;
use falaj_common::onnx::{GraphBuilder, OnnxModel};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim};
use falaj_common::time::Timestamp;
use falaj_common::trust::RootSpec;

const REGION: &str = "bench-1";
const INPUTS: usize = 1024;

/// An ONNX model with `mb` megabytes of weights.
fn model(mb: usize) -> Vec<u8> {
    let k = mb * 1_000_000 / (INPUTS * 4);
    let mut rng = SeededRng::new(7);
    let weights: Vec<f32> = (0..INPUTS * k).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let n = || Dim::Symbol("N".into());
    let mut g = GraphBuilder::new("at_rest_bench");
    g.input("x", DataType::Fp32, &[n(), Dim::Fixed(INPUTS as u64)])
        .weights("w", &[INPUTS, k], &weights)
        .node("MatMul", &["x", "w"], &["y"], vec![])
        .output("y", DataType::Fp32, &[n(), Dim::Fixed(k as u64)]);
    g.encode("bench")
}

fn bundle(signer: &SigningKey, mb: usize) -> Result<Vec<u8>> {
    let onnx = model(mb);
    let signature = OnnxModel::load(&onnx)?.signature().clone();
    let created = Timestamp::from_system(SystemTime::now());
    Ok(BundleBuilder::new(
        &format!("weights-{mb}mb"),
        1,
        REGION,
        created,
        created.saturating_add(Duration::from_secs(86_400)),
        Content::Model(ModelSpec {
            file: "model.onnx".into(),
            format: ModelFormat::Onnx,
            runtime: RuntimeHint::Auto,
            signature,
            reference: None,
            features: None,
            lineage: None,
            shapes: std::collections::BTreeMap::new(),
        }),
    )
    .file("model.onnx", onnx)
    .build(&[signer])?
    .1)
}

fn init_site(dir: &Path, signer: &SigningKey) -> Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let root = SigningKey::generate(&rng).map_err(|e| anyhow::anyhow!("{e}"))?.0;
    let now = SystemTime::now();
    let trust = RootSpec {
        version: 1,
        region: REGION,
        expires: Timestamp::from_system(now).saturating_add(Duration::from_secs(86_400)),
        root_keys: &[root],
        root_threshold: 1,
        signing_keys: &[signer.public()],
        signing_threshold: 1,
    }
    .sign(&[])?;
    Store::init(dir, REGION, &trust.to_json(), now)?;
    Ok(())
}

fn parse_args() -> Result<(usize, Vec<usize>)> {
    let (mut rounds, mut sizes) = (5, vec![10, 500]);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            "--sizes-mb" => {
                let list = args.next().context("--sizes-mb 10,500")?;
                sizes = list.split(',').map(str::parse).collect::<Result<_, _>>()?;
            }
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--rounds N, --sizes-mb A,B)"),
        }
    }
    Ok((rounds, sizes))
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let (rounds, sizes) = parse_args()?;
    let signer = SigningKey::generate(&ring::rand::SystemRandom::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .0;
    println!("| model | step | plaintext p50 ms | sealed p50 ms | sealed / plaintext |");
    println!("|---|---|---:|---:|---:|");
    for mb in sizes {
        let work = tempfile::tempdir()?;
        let data_dir = work.path().join("agent");
        init_site(&data_dir, &signer)?;
        let plain_path = work.path().join("model.falaj");
        std::fs::write(&plain_path, bundle(&signer, mb)?)?;
        let mut store = Store::open(&data_dir)?;
        let options = ImportOptions::new(SystemTime::now());
        import::import_file(&mut store, &plain_path, &options, &mut |_, _| {})?;
        let installed = store.installed()?.remove(0);

        let read_plain = || -> Result<bytes::Bytes> {
            let bytes = bytes::Bytes::from(std::fs::read(&plain_path)?);
            Ok(Store::content_of(&installed, &bytes)?)
        };
        let read_sealed = || -> Result<bytes::Bytes> { Ok(store.read_content(&installed)?) };
        if read_plain()? != read_sealed()? {
            bail!("the sealed and plaintext files do not hold the same model");
        }
        let mut times: [Vec<Duration>; 4] = Default::default();
        for _ in 0..rounds {
            for (i, read) in [&read_plain as &dyn Fn() -> Result<bytes::Bytes>, &read_sealed]
                .into_iter()
                .enumerate()
            {
                let started = Instant::now();
                let bytes = read()?;
                times[i].push(started.elapsed());
                drop(bytes);
                let started = Instant::now();
                let bytes = read()?;
                let model = OnnxModel::load(&bytes)?;
                times[2 + i].push(started.elapsed());
                drop((model, bytes));
            }
        }
        let [read_p, read_s, load_p, load_s] = times.map(median);
        let size = format!("{mb} MB");
        for (step, p, s) in
            [("read + verify", read_p, read_s), ("read + verify + load (tract)", load_p, load_s)]
        {
            println!(
                "| {size} | {step} | {:.1} | {:.1} | {:.3} |",
                ms(p),
                ms(s),
                s.as_secs_f64() / p.as_secs_f64()
            );
        }
    }
    Ok(())
}
