use super::cpu::{argmax, loss_and_gradient};
use super::*;
use crate::sample::{self, FEATURE_COUNT, Shift};
use crate::train::{TrainConfig, train_classifier};

/// A linear classifier trained on the sample task at one site: the parent head.
fn parent() -> Dense {
    let data = sample::generate(8_000, 21, &[]);
    let config = TrainConfig { hidden: vec![], max_epochs: 30, ..TrainConfig::default() };
    let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
    let dense = mlp.layers.into_iter().next().unwrap();
    Dense { inputs: dense.inputs, outputs: dense.outputs, weights: dense.weights, bias: dense.bias }
}

fn labels(data: &sample::Dataset) -> Vec<f32> {
    data.labels.iter().map(|&l| l as f32).collect()
}

fn tune(start: &Dense, features: &[f32], targets: &[f32], objective: Objective) -> Outcome {
    let examples = Examples { features, width: start.inputs, targets, objective };
    examples.check(start).unwrap();
    let hp = Hyperparameters::default();
    let mut kernel = CpuKernel::new(examples, start, &hp);
    let mut seen = Vec::new();
    let outcome =
        fit(&mut kernel, examples.rows(), objective, &hp, |e| seen.push(e.epoch)).unwrap();
    assert_eq!(seen, (1..=outcome.epochs.len() as u32).collect::<Vec<_>>(), "progress per epoch");
    outcome
}

fn accuracy(head: &Dense, data: &sample::Dataset) -> f64 {
    let mut z = vec![0.0; head.outputs];
    let right = (0..data.len())
        .filter(|&i| {
            let x = data.row(i);
            for (o, z) in z.iter_mut().enumerate() {
                let w = &head.weights[o * head.inputs..(o + 1) * head.inputs];
                *z = head.bias[o] + w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
            }
            argmax(&z) == data.labels[i] as usize
        })
        .count();
    right as f64 / data.len() as f64
}

/// The site's sensors read offset: the fine-tuned head beats its parent there, on rows
/// neither saw, and the gate lets it replace the parent. At a site like the parent's, it
/// gains too little and the gate keeps the parent.
#[test]
fn a_head_tuned_on_a_shifted_site_beats_its_parent_there_and_the_gate_opens() {
    let parent = parent();
    let gate = Gate::default();
    let shift = [Shift { feature: 1, offset: 2.5 }, Shift { feature: 0, offset: 9.0 }];
    let mut site = sample::generate(6_000, 22, &shift);
    let unseen = site.split_off(2_000);
    let outcome = tune(&parent, &site.features, &labels(&site), Objective::CrossEntropy);
    let (before, after) = (accuracy(&parent, &unseen), accuracy(&outcome.head, &unseen));
    assert!(after > before + 0.05, "shifted site, unseen rows: {before:.3} -> {after:.3}");
    let (b, a) = (outcome.before.accuracy.unwrap(), outcome.after.accuracy.unwrap());
    assert!(a > b + 0.05, "held out: {b:.3} -> {a:.3}");
    assert!(outcome.best_epoch > 0 && outcome.after.loss < outcome.before.loss);
    let decision = gate.judge(&outcome.before, &outcome.after);
    assert!(decision.activate, "{decision:?}");
    assert!((decision.improvement - (a - b)).abs() < 1e-12);

    let same = sample::generate(4_000, 23, &[]);
    let outcome = tune(&parent, &same.features, &labels(&same), Objective::CrossEntropy);
    let decision = gate.judge(&outcome.before, &outcome.after);
    assert!(!decision.activate, "unshifted site: {decision:?}");
    assert!(decision.reason.contains("the parent stays"), "{}", decision.reason);
}

#[test]
fn a_regression_head_recovers_the_sites_relation_under_squared_error() {
    // y = [2 x0 - x1 + 0.5, x2], a parent that has it wrong.
    let mut rng = SeededRng::new(3);
    let features: Vec<f32> = (0..3_000 * 3).map(|_| rng.normal(0.0, 1.0) as f32).collect();
    let targets: Vec<f32> =
        features.chunks_exact(3).flat_map(|x| [2.0 * x[0] - x[1] + 0.5, x[2]]).collect();
    let start = Dense {
        inputs: 3,
        outputs: 2,
        weights: vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.5],
        bias: vec![0.0; 2],
    };
    let outcome = tune(&start, &features, &targets, Objective::MeanSquaredError);
    assert_eq!(outcome.before.accuracy, None);
    assert!(outcome.before.loss > 0.5, "{:?}", outcome.before);
    assert!(outcome.after.loss < 0.01, "{:?}", outcome.after);
    let w = &outcome.head.weights;
    for (got, want) in w.iter().zip([2.0, -1.0, 0.0, 0.0, 0.0, 1.0]) {
        assert!((got - want).abs() < 0.05, "{w:?}");
    }
    assert!((outcome.head.bias[0] - 0.5).abs() < 0.05, "{:?}", outcome.head.bias);
    let decision = Gate::default().judge(&outcome.before, &outcome.after);
    assert!(decision.activate && decision.improvement > 0.9, "{decision:?}");
}

#[test]
fn the_gradient_is_the_losss_derivative() {
    for (objective, target) in
        [(Objective::CrossEntropy, vec![2.0]), (Objective::MeanSquaredError, vec![0.3, -1.0, 2.0])]
    {
        let z = [0.7f32, -1.2, 0.4];
        let mut grad = z;
        loss_and_gradient(objective, &mut grad, &target);
        for i in 0..3 {
            let h = 1e-3;
            let (mut up, mut down) = (z, z);
            up[i] += h;
            down[i] -= h;
            let numeric = (loss_and_gradient(objective, &mut up, &target)
                - loss_and_gradient(objective, &mut down, &target))
                / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(grad[i])).abs() < 1e-3,
                "{objective:?} {i}: {numeric} vs {}",
                grad[i]
            );
        }
    }
    // Cross-entropy of logits [0, ln 3] against class 1 is -ln 0.75.
    let mut z = [0.0, 3f32.ln()];
    let loss = loss_and_gradient(Objective::CrossEntropy, &mut z, &[1.0]);
    assert!((loss + 0.75f64.ln()).abs() < 1e-6, "{loss}");
}

#[test]
fn training_is_deterministic_for_a_seed_and_stops_early() {
    let site = sample::generate(2_000, 5, &[Shift { feature: 0, offset: 9.0 }]);
    let targets = labels(&site);
    let start = parent();
    let run = |hp: &Hyperparameters| {
        let examples = Examples {
            features: &site.features,
            width: FEATURE_COUNT,
            targets: &targets,
            objective: Objective::CrossEntropy,
        };
        let mut kernel = CpuKernel::new(examples, &start, hp);
        fit(&mut kernel, site.len(), Objective::CrossEntropy, hp, |_| ()).unwrap()
    };
    let hp = Hyperparameters { max_epochs: 40, patience: 2, ..Hyperparameters::default() };
    let a = run(&hp);
    assert_eq!(a, run(&hp));
    assert_ne!(a.head, run(&Hyperparameters { seed: 7, ..hp.clone() }).head);
    // Stopped `patience` epochs after the best, before the limit; the best is kept.
    assert!(a.epochs.len() < 40, "{} epochs", a.epochs.len());
    assert_eq!(a.epochs.len() as u32, a.best_epoch + 2);
    assert_eq!(a.after, a.epochs[a.best_epoch as usize - 1].validation);
    assert_eq!((a.train_rows, a.held_out_rows), (1_600, 400));
    // Plain SGD trains too.
    let sgd = run(&Hyperparameters { optimizer: Optimizer::Sgd, learning_rate: 1e-7, ..hp });
    assert!(sgd.after.loss < sgd.before.loss, "{:?} -> {:?}", sgd.before, sgd.after);
}

#[test]
fn a_head_no_epoch_improves_is_kept_as_it_was() {
    // The optimum already: labels are the start's own predictions, and a learning rate
    // so large that every step overshoots.
    let data = sample::generate(1_000, 9, &[]);
    let start = parent();
    let mut z = vec![0.0; 3];
    let targets: Vec<f32> = (0..data.len())
        .map(|i| {
            for (o, z) in z.iter_mut().enumerate() {
                let w = &start.weights[o * FEATURE_COUNT..(o + 1) * FEATURE_COUNT];
                *z = start.bias[o] + w.iter().zip(data.row(i)).map(|(w, x)| w * x).sum::<f32>();
            }
            argmax(&z) as f32
        })
        .collect();
    let hp = Hyperparameters {
        learning_rate: 50.0,
        max_epochs: 3,
        patience: 3,
        ..Hyperparameters::default()
    };
    let examples = Examples {
        features: &data.features,
        width: FEATURE_COUNT,
        targets: &targets,
        objective: Objective::CrossEntropy,
    };
    let mut kernel = CpuKernel::new(examples, &start, &hp);
    let outcome = fit(&mut kernel, data.len(), Objective::CrossEntropy, &hp, |_| ()).unwrap();
    assert_eq!(outcome.best_epoch, 0, "{:?}", outcome.epochs);
    assert_eq!(outcome.head, start);
    assert_eq!(outcome.after, outcome.before);
    assert!(!Gate::default().judge(&outcome.before, &outcome.after).activate);
}

#[test]
fn bad_examples_and_hyperparameters_are_refused_naming_the_problem() {
    let head = Dense { inputs: 2, outputs: 3, weights: vec![0.0; 6], bias: vec![0.0; 3] };
    let check = |features: &[f32], targets: &[f32], objective| {
        Examples { features, width: 2, targets, objective }.check(&head).unwrap_err()
    };
    let ce = Objective::CrossEntropy;
    assert_eq!(check(&[0.0; 4], &[0.0, 3.0], ce), "row 2: label 3 is not a class index below 3");
    assert_eq!(check(&[0.0; 4], &[0.5, 1.0], ce), "row 1: label 0.5 is not a class index below 3");
    assert_eq!(check(&[0.0, 0.0, f32::NAN, 0.0], &[0.0, 1.0], ce), "row 2: a feature is NaN");
    assert_eq!(check(&[0.0; 2], &[0.0], ce), "1 rows: at least 2 are needed, one to hold out");
    assert_eq!(
        check(&[0.0; 4], &[0.0, 0.0, 0.0, 0.0, 0.0, f32::INFINITY], Objective::MeanSquaredError),
        "row 2: target inf is not a finite number"
    );
    let wide = Examples { features: &[0.0; 6], width: 3, targets: &[0.0; 2], objective: ce };
    assert_eq!(
        wide.check(&head).unwrap_err(),
        "the examples have 3 features per row, the head takes 2"
    );

    let bad = |hp: Hyperparameters| hp.check().unwrap_err();
    let d = Hyperparameters::default();
    assert!(d.check().is_ok());
    assert_eq!(
        bad(Hyperparameters { learning_rate: 0.0, ..d.clone() }),
        "learning_rate must be above 0, not 0"
    );
    assert_eq!(
        bad(Hyperparameters { batch_size: 0, ..d.clone() }),
        "batch_size must be at least 1"
    );
    assert_eq!(
        bad(Hyperparameters { validation_fraction: 1.0, ..d.clone() }),
        "validation_fraction must be between 0 and 1, not 1"
    );
    assert_eq!(bad(Hyperparameters { l2: -1.0, ..d }), "l2 must be 0 or more, not -1");
}

#[test]
fn hyperparameters_and_lineage_round_trip_as_json_and_refuse_unknown_keys() {
    let hp: Hyperparameters =
        serde_json::from_str(r#"{"optimizer":"sgd","max_epochs":5}"#).unwrap();
    assert_eq!((hp.optimizer, hp.max_epochs, hp.batch_size), (Optimizer::Sgd, 5, 64));
    let err = serde_json::from_str::<Hyperparameters>(r#"{"epochs":5}"#).unwrap_err();
    assert!(err.to_string().contains("unknown field `epochs`"), "{err}");
    let before = Metrics { loss: 0.9, accuracy: Some(0.6) };
    let after = Metrics { loss: 0.5, accuracy: Some(0.8) };
    let lineage = Lineage {
        parent: "pumps".into(),
        parent_version: 3,
        parent_manifest_sha256: Sha256::of(b"manifest"),
        data_sha256: Sha256::of(b"data"),
        train_rows: 80,
        held_out_rows: 20,
        objective: Objective::CrossEntropy,
        hyperparameters: hp,
        engine: "cpu".into(),
        before,
        after,
        best_epoch: 1,
        epochs: vec![EpochStats { epoch: 1, train_loss: 0.7, validation: after }],
        gate: Gate::default().judge(&before, &after),
    };
    let json = serde_json::to_string(&lineage).unwrap();
    assert_eq!(serde_json::from_str::<Lineage>(&json).unwrap(), lineage);
}

#[test]
fn the_data_hash_covers_features_and_targets() {
    let ex = |features: &'static [f32], targets: &'static [f32]| Examples {
        features,
        width: 1,
        targets,
        objective: Objective::CrossEntropy,
    };
    let a = data_hash(&ex(&[1.0, 2.0], &[0.0, 1.0]));
    assert_eq!(a, data_hash(&ex(&[1.0, 2.0], &[0.0, 1.0])));
    assert_ne!(a, data_hash(&ex(&[1.0, 2.5], &[0.0, 1.0])));
    assert_ne!(a, data_hash(&ex(&[1.0, 2.0], &[1.0, 1.0])));
}

#[test]
fn job_files_parse_with_defaults_and_refuse_what_they_cannot_run() {
    let job = Job::from_toml(
        "model = \"pumps\"\nengine = \"gpu\"\n[data]\nfile = \"/srv/site.csv\"\nlabel = \"label\"\n\
         [hyperparameters]\nmax_epochs = 5\n",
    )
    .unwrap();
    assert_eq!((job.model.as_str(), job.version, job.engine), ("pumps", None, TrainEngine::Gpu));
    assert_eq!(job.hyperparameters.max_epochs, 5);
    assert_eq!(job.hyperparameters.batch_size, Hyperparameters::default().batch_size);
    assert_eq!(job.gate, Gate::default());

    let refused = |text: &str| Job::from_toml(text).unwrap_err();
    let data = "[data]\nfile = \"a.csv\"\nlabel = \"y\"\n";
    assert!(
        refused(&format!("model = \"pumps\"\nepochs = 3\n{data}"))
            .contains("unknown field `epochs`")
    );
    assert!(refused(&format!("model = \"Pumps!\"\n{data}")).contains("model name \"Pumps!\""));
    assert!(refused("model = \"pumps\"\n").contains("missing field `data`"));
    assert_eq!(
        refused(&format!("model = \"pumps\"\n{data}[gate]\nmin_improvement = -1.0\n")),
        "gate.min_improvement must be 0 or more, not -1"
    );
    assert_eq!(
        refused(&format!("model = \"pumps\"\n{data}entity = \"id\"\nfeatures = [\"a\"]\n")),
        "name either an entity column or feature columns, not both"
    );
}
