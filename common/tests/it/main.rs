//! The integration tests of `falaj-common`, in one binary (as rust-analyzer keeps its
//! slow tests): one link of the crate and its test features instead of one per file.
//! Fixture data lives under `tests/data/` (`golden/` for the pinned formats, `rotation/`
//! for the trust-root rotation cases).

mod fuzz;
mod golden;
mod rotation;
