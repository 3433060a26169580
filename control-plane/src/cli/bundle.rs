//! The offline `bundle build|inspect` and `sample` commands.

use std::collections::BTreeMap;
use std::time::SystemTime;

use falaj_common::bundle::FeatureInput;
use falaj_common::tensor::InputShape;
use falaj_common::trust::TrustRoot;

use super::keys::keys_failure;
use super::{BuildArgs, Failure, InspectArgs, SampleArgs};
use crate::bundle::{self, BuildOptions, BundleError};
use crate::sample::{self, SampleOptions};

pub(super) fn bundle_failure(err: BundleError) -> Failure {
    match err {
        BundleError::Keys(e) => keys_failure(e),
        BundleError::Io { .. } => Failure::other(err),
        other => Failure::config(other),
    }
}

pub(super) fn bundle_build(args: BuildArgs, now: SystemTime) -> Result<(), Failure> {
    let options = BuildOptions {
        keys: args.keys,
        model: args.model,
        name: args.name,
        version: args.version,
        reference: args.reference,
        runtime: args.runtime,
        lifetime: args.expires_in,
        out: args.out,
        features: feature_input(args.feature_view.as_deref(), args.features.as_deref())?,
        shapes: input_shapes(&args.input_shapes)?,
    };
    let manifest = bundle::build_unsealing(&options, args.unseal_from.as_ref(), now)
        .map_err(bundle_failure)?;
    let model = manifest.model().expect("built as a model bundle");
    println!(
        "built {} version {} for region {} -> {} (expires {})",
        manifest.name,
        manifest.version,
        manifest.region,
        options.out.display(),
        manifest.expires
    );
    let io: Vec<String> = model
        .signature
        .inputs
        .iter()
        .map(|t| format!("in {} {}", t.name, t.datatype))
        .chain(model.signature.outputs.iter().map(|t| format!("out {} {}", t.name, t.datatype)))
        .collect();
    println!("signature: {}", io.join(", "));
    for (input, shape) in &model.shapes {
        println!("planned for: {input} = {shape}");
    }
    if let Some(reference) = &model.reference {
        println!(
            "reference profile: {} rows, {} input columns, {} output columns",
            reference.rows,
            reference.inputs.len(),
            reference.outputs.len()
        );
    }
    Ok(())
}

/// `--input-shape NAME=SHAPE` arguments, by input name.
fn input_shapes(args: &[String]) -> Result<BTreeMap<String, InputShape>, Failure> {
    let usage = |msg: String| Failure::usage(anyhow::anyhow!(msg));
    let mut out = BTreeMap::new();
    for arg in args {
        let (name, shape) = arg
            .split_once('=')
            .ok_or_else(|| usage(format!("--input-shape must be NAME=d0,d1,..., not {arg:?}")))?;
        let shape = shape.parse().map_err(|e| usage(format!("--input-shape {arg:?}: {e}")))?;
        if out.insert(name.to_owned(), shape).is_some() {
            return Err(usage(format!("--input-shape names {name:?} twice")));
        }
    }
    Ok(out)
}

fn feature_input(view: Option<&str>, names: Option<&str>) -> Result<Option<FeatureInput>, Failure> {
    let (Some(view), Some(names)) = (view, names) else { return Ok(None) };
    let (view, version) =
        view.split_once('@').and_then(|(v, n)| Some((v.to_owned(), n.parse().ok()?))).ok_or_else(
            || Failure::usage(anyhow::anyhow!("--feature-view must be VIEW@VERSION, not {view:?}")),
        )?;
    let names = names.split(',').map(|n| n.trim().to_owned()).collect();
    Ok(Some(FeatureInput { view, version, names }))
}

pub(super) fn bundle_inspect(args: &InspectArgs, now: SystemTime) -> Result<(), Failure> {
    let trust = args
        .trust
        .as_ref()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| {
                Failure::other(anyhow::anyhow!("reading trust root {}: {e}", path.display()))
            })?;
            TrustRoot::from_json(&bytes, now)
                .map_err(|e| Failure::config(anyhow::anyhow!("trust root {}: {e}", path.display())))
        })
        .transpose()?;
    let inspection = bundle::inspect(&args.file, trust.as_ref(), now).map_err(bundle_failure)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspection.manifest).expect("manifests serialise")
        );
    } else {
        print!("{}", inspection.report(&args.file));
    }
    match inspection.verified {
        Some(Err(e)) => {
            Err(Failure::refused(anyhow::anyhow!("{}: does not verify: {e}", args.file.display())))
        }
        _ => Ok(()),
    }
}

pub(super) fn sample(args: &SampleArgs) -> Result<(), Failure> {
    let options = SampleOptions { rows: args.rows, seed: args.seed };
    let made = sample::write(&args.out, &options).map_err(|e| {
        Failure::other(anyhow::anyhow!("writing the sample into {}: {e}", args.out.display()))
    })?;
    println!(
        "trained the sample pump-fault classifier on {} rows: hold-out accuracy {:.1}% (majority class {:.1}%), {} epochs",
        args.rows,
        made.holdout_accuracy * 100.0,
        made.majority_share * 100.0,
        made.report.epochs.len()
    );
    println!("model:     {}", made.model.display());
    println!("reference: {}", made.reference.display());
    println!("hold-out:  {}", made.holdout.display());
    Ok(())
}
