//! The rollouts module's storage on both databases (cases listed in [`CASES`], run by
//! `main` as `NAME::sqlite` and `NAME::postgres`).

use crate::Body;

/// This module's cases: each body runs once on SQLite and once on PostgreSQL.
pub(crate) const CASES: &[(&str, Body)] = &[];
