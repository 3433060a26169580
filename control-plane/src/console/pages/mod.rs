//! The console's pages, one module per area. Each handler reads through the same
//! services the JSON handlers use (`service::fleet::agent_views`, `monitoring::rollups_between`,
//! `rollouts::view::build`, ...) and renders with a pure `render_*` function of the data,
//! which the benchmark and the unit tests call without a server.

pub mod apitokens;
pub mod audit;
pub mod features;
pub mod finetune;
pub mod fleet;
pub mod metrics;
pub mod models;
pub mod rollouts;
pub mod series;
pub mod users;

/// A query-string value that is present and not blank.
pub(crate) fn given(value: Option<&String>) -> Option<&str> {
    value.map(|v| v.trim()).filter(|v| !v.is_empty())
}
