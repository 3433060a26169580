//! The root package's integration tests, in one binary (as rust-analyzer keeps its slow
//! tests): one link of the agent, the control plane and their engines instead of one per
//! file. Each module was its own test file; they share the process helpers of
//! `tests/support/` (the real `falaj` binary) and the in-process fleet of `tests/fleet/`.
//!
//! Nothing here relies on being alone in its process: the daemons under test run as child
//! processes or as in-process instances with their own directories and ports, and no test
//! sets environment variables, the current directory or a process-wide TLS provider.
//! Tests that need parts from outside Rust (Python with ONNX Runtime, a Vulkan adapter) are
//! in `tests/external/`, where a missing part is reported as an ignored test.

#[path = "../fleet/database.rs"]
mod database;
#[path = "../fleet/mod.rs"]
mod fleet;
#[path = "../support/mod.rs"]
mod support;

mod at_rest;
mod audit;
mod cli;
mod clocks;
mod compat;
mod control_plane;
mod crash_points;
mod disk_full;
mod failover;
mod features;
mod finetune;
mod fleet_processes;
mod monitoring;
mod network_faults;
mod quic_hostile;
mod rollouts;
mod serve;
mod soak;
mod transfer;
