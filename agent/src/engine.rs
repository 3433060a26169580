//! Inference engines behind one interface, and the choice between them.
//!
//! Today the only engine is tract on the CPU. The bundle's runtime hint is honoured where
//! it can be: a model asking for a GPU is served on the CPU, with a warning, by a build
//! without a GPU engine.

use std::fmt;
use std::sync::Arc;

use falaj_common::bundle::{ModelSpec, RuntimeHint};
use falaj_common::onnx::{OnnxError, OnnxModel, RunError};
use falaj_common::tensor::{Signature, Tensor};

/// Something that runs a loaded model.
pub trait Engine: Send + Sync + fmt::Debug {
    /// The engine's name, as shown in model metadata (`tract-cpu`).
    fn name(&self) -> &'static str;

    /// The model's signature as the engine sees it.
    fn signature(&self) -> &Signature;

    /// Runs the model on inputs in signature order; returns every output in signature
    /// order. Blocking and CPU-bound: call it off the async runtime.
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;
}

/// tract, on the CPU.
#[derive(Debug)]
pub struct TractEngine(OnnxModel);

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        "tract-cpu"
    }

    fn signature(&self) -> &Signature {
        self.0.signature()
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        self.0.run(inputs)
    }
}

/// Loads `model_bytes` with the engine `spec`'s runtime hint asks for, falling back to
/// the CPU where this build has no GPU engine.
pub fn load(
    name: &str,
    version: u64,
    spec: &ModelSpec,
    model_bytes: &[u8],
) -> Result<Arc<dyn Engine>, OnnxError> {
    if spec.runtime == RuntimeHint::Gpu {
        tracing::warn!(
            model = name,
            version,
            "bundle asks for a GPU; this agent has no GPU engine, serving on CPU"
        );
    }
    Ok(Arc::new(TractEngine(OnnxModel::load(model_bytes)?)))
}
