//! Deployments: which version of a model each group runs. A change pushes the groups'
//! new desired state to their agents; none is made while a rollout of the model is under
//! way (the rollout owns it then).

use std::time::SystemTime;

use falaj_common::names;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ServiceError, ServiceResult};
use crate::db;
use crate::sql::AsSql;
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
    let at = Timestamp::from_system(now);
    shared.db.run(move |sql| change(&sql, &g, &n, Some(version), at)).await??;
    shared.push_desired(Some(group), now).await?;
    tracing::info!(%group, %name, version, "deployed");
    Ok(())
}

/// Removes `name` from group `group` and pushes the group's new desired state.
pub(crate) async fn undeploy(shared: &Shared, group: &str, name: &str) -> ServiceResult<()> {
    let now = SystemTime::now();
    let (g, n) = (group.to_owned(), name.to_owned());
    let at = Timestamp::from_system(now);
    shared.db.run(move |sql| change(&sql, &g, &n, None, at)).await??;
    shared.push_desired(Some(group), now).await?;
    tracing::info!(%group, %name, "undeployed");
    Ok(())
}

/// Makes `name@version` group `group`'s deployment (`Some`) or removes it (`None`), in
/// one transaction, refused while a rollout of the model is under way in the group. The
/// rollouts' start lock is taken first ([`crate::rollouts::lock_starts`], PostgreSQL;
/// SQLite's one writer there), so a rollout starting at once on another replica either
/// comes first and refuses this, or comes after and takes the new version as its
/// baseline.
pub fn change<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    name: &str,
    version: Option<u64>,
    now: Timestamp,
) -> Result<ServiceResult<()>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    crate::rollouts::lock_starts(&tx)?;
    if let Some(version) = version
        && db::bundle(&tx, name, version)?.is_none()
    {
        return Ok(Err(ServiceError::NotFound(format!(
            "no bundle {name}@{version}; push it first"
        ))));
    }
    if let Some(r) = crate::rollouts::under_way(&tx, group, name)? {
        return Ok(Err(rollout_under_way(&r)));
    }
    match version {
        Some(version) => db::deploy(&tx, group, name, version, now)?,
        None => {
            if !db::undeploy(&tx, group, name, now)? {
                return Ok(Err(ServiceError::NotFound(format!(
                    "{name} is not deployed to group {group}"
                ))));
            }
        }
    }
    tx.commit()?;
    Ok(Ok(()))
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
