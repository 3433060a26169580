//! Deployments: which version of a model each group runs. A change pushes the groups'
//! new desired state to their agents; none is made while a rollout of the model is under
//! way (the rollout owns it then).

use std::time::SystemTime;

use falaj_common::names;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ServiceError, ServiceResult};
use crate::db;
use crate::state::Shared;

/// A model deployed to a group: what `PUT /v1/groups/{group}/deployments/{name}`
/// answers, and each item of `GET /v1/deployments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub group: String,
    pub name: String,
    /// The version the group runs.
    pub version: u64,
}

/// Every deployment, by group and model.
pub(crate) async fn deployments(shared: &Shared) -> ServiceResult<Vec<DeploymentView>> {
    let rows = shared.db.run(|sql| db::all_deployments(&sql)).await?;
    Ok(rows
        .into_iter()
        .map(|(group, name, version)| DeploymentView { group, name, version })
        .collect())
}

/// Makes `name@version` the version group `group` runs and pushes the new desired state
/// (refused while a rollout of it is under way).
pub(crate) async fn deploy_version(
    shared: &Shared,
    group: &str,
    name: &str,
    version: u64,
) -> ServiceResult<()> {
    names::check_model_name(group).map_err(|e| ServiceError::Invalid(format!("group: {e}")))?;
    let now = SystemTime::now();
    let (g, n) = (group.to_owned(), name.to_owned());
    let deployed = shared
        .db
        .run(move |sql| {
            let tx = sql.transaction()?;
            // Not while a rollout of it starts elsewhere (PostgreSQL: under the lock a
            // start takes; SQLite's write lock, there).
            crate::rollouts::lock_starts(&tx)?;
            if db::bundle(&tx, &n, version)?.is_none() {
                return Ok(Err(ServiceError::NotFound(format!(
                    "no bundle {n}@{version}; push it first"
                ))));
            }
            if let Some(r) = crate::rollouts::under_way(&tx, &g, &n)? {
                return Ok(Err(rollout_under_way(&r)));
            }
            db::deploy(&tx, &g, &n, version, Timestamp::from_system(now))?;
            tx.commit()?;
            Ok(Ok(()))
        })
        .await?;
    deployed?;
    shared.push_desired(Some(group), now).await?;
    tracing::info!(%group, %name, version, "deployed");
    Ok(())
}

/// Removes `name` from group `group` and pushes the group's new desired state.
pub(crate) async fn undeploy(shared: &Shared, group: &str, name: &str) -> ServiceResult<()> {
    let now = SystemTime::now();
    let (g, n) = (group.to_owned(), name.to_owned());
    let undeployed = shared
        .db
        .run(move |sql| {
            let tx = sql.transaction()?;
            crate::rollouts::lock_starts(&tx)?;
            if let Some(r) = crate::rollouts::under_way(&tx, &g, &n)? {
                return Ok(Err(rollout_under_way(&r)));
            }
            if !db::undeploy(&tx, &g, &n, Timestamp::from_system(now))? {
                return Ok(Err(ServiceError::NotFound(format!(
                    "{n} is not deployed to group {g}"
                ))));
            }
            tx.commit()?;
            Ok(Ok(()))
        })
        .await?;
    undeployed?;
    shared.push_desired(Some(group), now).await?;
    tracing::info!(%group, %name, "undeployed");
    Ok(())
}

/// The refusal of a deployment change while a rollout of the model is under way.
fn rollout_under_way(r: &crate::rollouts::Rollout) -> ServiceError {
    ServiceError::Conflict {
        code: "rollout_under_way",
        message: format!(
            "rollout {} of {} in group {} is {}: promote or abort it first",
            r.id,
            r.model,
            r.group,
            r.state.name()
        ),
    }
}
