//! The control plane's integration tests, in one binary (as rust-analyzer keeps its slow
//! tests): one link of the daemon instead of one per file. Each module was its own test
//! file; every test opens its own SQLite files and binds 127.0.0.1:0, so they run side by
//! side in one process. The console's browser tests, which need Chromium, are in
//! `tests/console.rs`.

mod access;
mod admin_slow_clients;
mod feature_store;
mod fuzz;
mod offline;
mod rollouts;
