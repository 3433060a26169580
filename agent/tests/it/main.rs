//! The agent's integration tests, in one binary (as rust-analyzer keeps its slow tests): one
//! link of the agent and its engines instead of one per file. Each module was its own test
//! file; they share the helpers of `tests/support/` (bundles, a running server).
//!
//! `hot_path` counts allocations with `allocation-counter`, whose global allocator counts
//! per thread, so the other tests running beside it do not disturb its count.

#[path = "../support/mod.rs"]
mod support;

mod at_rest;
mod features;
mod finetune;
mod fuzz;
mod grpc;
mod grpc_h2;
mod hot_path;
mod http;
mod https;
mod import;
mod slow_clients;
