//! The Falaj agent: the piece that runs on a customer's server.
//!
//! It keeps a store of verified bundles ([`store`]), imports bundle files
//! ([`import`]) for air-gapped sites, loads every installed model into an engine
//! ([`engine`], [`models`]) and serves them over the Open Inference Protocol v2 REST API
//! ([`oip`], [`server`]), so that Triton and KServe clients work unchanged. Feature
//! snapshot bundles are served as online lookups and model inputs ([`features`]). A
//! model's head can be fine-tuned on the site's labelled data into a derived model
//! ([`finetune`]).
//!
//! The binary (`falaj-agent`) is a thin shell over [`cli`]. With the `fuzzing` feature
//! (test support), `fuzzing` holds the fuzz targets of the agent's decoders.

pub mod admission;
pub mod apikeys;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod enroll;
pub mod features;
pub mod feedback;
pub mod finetune;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod grpc;
pub mod identity;
pub mod import;
pub mod keys_cli;
pub mod metrics;
pub mod models;
pub mod oip;
pub mod reporting;
pub mod rollout;
pub mod server;
pub mod store;
pub mod sync;
pub mod transfer;

/// A point where the crash tests kill the process: built with the `failpoints` feature
/// (the tests' builds only), `FAILPOINTS=NAME=return` aborts the process there, as a
/// power cut or SIGKILL would stop it. Nothing at all otherwise.
#[inline]
pub(crate) fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::eval(name, |_| std::process::abort());
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
