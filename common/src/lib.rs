//! Falaj's core: everything the control plane and the agents must agree on, free of I/O.
//!
//! Nothing in this crate touches files, sockets, the clock, the environment or threads.
//! Time comes in as an argument (`now: SystemTime`), randomness as a
//! [`ring::rand::SecureRandom`] or a seed, and bytes as slices. That makes every rule
//! here (bundle verification, trust-root checks, tensor signature matching, data profiles)
//! a pure function that is tested without a runtime.
//!
//! - [`bundle`]: the `.falaj` bundle format v1: manifest, container, signing, verification.
//! - [`trust`]: the TUF-style trust root that pins the keys a bundle must be signed with.
//! - [`desired`]: signed, versioned, expiring desired-state documents for each agent.
//! - [`reconcile`]: the plan that turns an agent's held bundles into the desired state.
//! - [`protocol`]: the messages between agents and the control plane, and their framing.
//! - [`enrollment`]: one-time enrollment tokens that pin the control plane's CA.
//! - [`chunking`]: content-defined chunks and recipes, for resumable delta transfers.
//! - [`metrics`], [`sketch`], [`drift`]: metric windows (counts, a mergeable latency
//!   sketch, histograms over the reference bins), and drift scores (PSI, KS, JS).
//! - [`alerting`]: alert rules over rollups of metric windows, and when they fire.
//! - [`delivery`]: when a webhook notification that failed is tried again, and given up.
//! - [`rollout`]: canary, A/B and shadow rollouts: sticky assignment, steps, guards.
//! - [`outcomes`]: answers compared between versions (agreement) and with ground truth.
//! - [`exposition`] (feature `prometheus`): the Prometheus text both shells serve.
//! - [`features`]: feature views, ingest rules, PII policy, snapshots and (feature
//!   `snapshots`) their row-major payload and online table.
//! - [`finetune`]: training a model's head on site data (one loop, CPU and GPU kernels
//!   behind a trait), the gate that decides whether it replaces its parent, its lineage.
//! - [`at_rest`]: envelope encryption of files at rest (AES-256-GCM, a data key per file
//!   wrapped by a device key, sealed in authenticated segments).
//! - [`session`]: the agent's side of its control-plane session as a state machine
//!   without I/O (connection, backoff, renewal, window delivery, documents, jobs).
//! - [`audit`]: the audit log's hash chain, signed checkpoints and offline verification.
//! - [`keys`]: Ed25519 keys and domain-separated signatures (ring).
//! - `fuzzing` (feature `fuzzing`, test support): a seeded mutator, the stable fuzz
//!   runner and the fuzz targets' bodies, shared with the cargo-fuzz binaries.
//! - [`text`]: outside text made safe to print on a terminal.
//! - [`tensor`]: data types, symbolic shapes, model I/O signatures and tensor values.
//! - [`onnx`] (feature `onnx`): loading, inspecting, running and writing ONNX models
//!   with tract, shared so that control plane and agents agree on what a model is.
//! - [`profile`]: reference data profiles (per-column histograms) for drift detection.
//! - [`random`]: seeded random numbers for synthetic data and training.
//! - [`sample`] and [`train`]: the synthetic dataset and the small MLP trainer that make
//!   the project's own sample model, so that nothing is downloaded.

#![warn(missing_docs, unreachable_pub)]

pub mod alerting;
pub mod at_rest;
pub mod audit;
pub mod bundle;
pub mod chunking;
pub mod config;
pub mod delivery;
pub mod desired;
pub mod drift;
pub mod enrollment;
pub mod errors;
#[cfg(feature = "prometheus")]
pub mod exposition;
pub mod features;
pub mod finetune;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod keys;
pub mod metrics;
pub mod names;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod outcomes;
pub mod profile;
pub mod protocol;
pub mod random;
pub mod reconcile;
pub mod rollout;
pub mod sample;
pub mod session;
pub mod sketch;
pub mod tensor;
pub mod text;
pub mod time;
pub mod train;
pub mod trust;
