//! ONNX models through tract: load and plan once, inspect the I/O signature, run on
//! [`Tensor`](crate::tensor::Tensor)s, and write small models (the sample model, test
//! models, and the random-weight [`zoo`] for engine tests and benchmarks) as ONNX protobuf
//! without any Python.
//!
//! Parsing and planning a model is pure computation over bytes; nothing here reads files.

mod convert;
pub mod head;
mod model;
mod write;
pub mod zoo;

pub use convert::tensor_from_proto;
pub use model::{LoadOptions, OnnxError, OnnxModel, Planning, RunError, supported_operators};
pub use write::{Attr, GraphBuilder, mlp_classifier};
