//! Reconciliation: from a verified desired state and what an agent holds, the actions
//! that make the one into the other.
//!
//! Installs come first, then activations, then removals, so a model keeps being served
//! by its old version until the new one is installed and active. Only bundles the control
//! plane manages are ever removed; bundles an operator imported by hand are left alone.
//! The plan is a pure function: the agent runs it, reports, and plans again on the next
//! document, so a restart at any point converges to the same state.

use std::collections::{BTreeMap, BTreeSet};

use crate::desired::{DesiredBundle, DesiredState};
use crate::protocol::HeldBundle;

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Fetch, verify and install this bundle (not activated by the install).
    Install(DesiredBundle),
    /// Make this version the one served for its name.
    Activate {
        /// The model.
        name: String,
        /// The version.
        version: u64,
    },
    /// Delete this managed version.
    Remove {
        /// The model.
        name: String,
        /// The version.
        version: u64,
    },
}

/// A plan, and what keeps part of the desired state from being reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The actions, in order.
    pub actions: Vec<Action>,
    /// Problems: desired bundles that conflict with what is held.
    pub problems: Vec<String>,
}

/// Plans the actions that bring `held` to `desired`.
pub fn plan(desired: &DesiredState, held: &[HeldBundle]) -> Plan {
    let mut out = Plan::default();
    let held_by_key: BTreeMap<(&str, u64), &HeldBundle> =
        held.iter().map(|h| ((h.name.as_str(), h.version), h)).collect();
    let active: BTreeMap<&str, u64> =
        held.iter().filter(|h| h.active).map(|h| (h.name.as_str(), h.version)).collect();
    let mut conflicted = BTreeSet::new();

    for want in &desired.bundles {
        match held_by_key.get(&(want.name.as_str(), want.version)) {
            Some(h) if h.manifest_sha256 == want.manifest_sha256 => {}
            Some(h) => {
                conflicted.insert((want.name.as_str(), want.version));
                out.problems.push(format!(
                    "{}@{}: the held bundle (manifest {}) differs from the desired one ({}); not replaced",
                    want.name,
                    want.version,
                    h.manifest_sha256.short(),
                    want.manifest_sha256.short()
                ));
            }
            None => out.actions.push(Action::Install(want.clone())),
        }
    }
    for want in desired.bundles.iter().filter(|b| b.activate) {
        let blocked = conflicted.contains(&(want.name.as_str(), want.version));
        if !blocked && active.get(want.name.as_str()) != Some(&want.version) {
            out.actions.push(Action::Activate { name: want.name.clone(), version: want.version });
        }
    }
    let desired_names: BTreeSet<&str> = desired.bundles.iter().map(|b| b.name.as_str()).collect();
    let desired_keys: BTreeSet<(&str, u64)> =
        desired.bundles.iter().map(|b| (b.name.as_str(), b.version)).collect();
    // Names whose served version changes: a conflicted version will not take over.
    let new_active: BTreeSet<&str> = desired
        .bundles
        .iter()
        .filter(|b| b.activate && !conflicted.contains(&(b.name.as_str(), b.version)))
        .map(|b| b.name.as_str())
        .collect();
    for h in held.iter().filter(|h| h.managed) {
        if desired_keys.contains(&(h.name.as_str(), h.version)) {
            continue;
        }
        // Keep a served version unless its name is undeployed or another version takes over.
        let name = h.name.as_str();
        if h.active && desired_names.contains(name) && !new_active.contains(name) {
            continue;
        }
        out.actions.push(Action::Remove { name: h.name.clone(), version: h.version });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Sha256;
    use crate::time::Timestamp;

    fn want(name: &str, version: u64, activate: bool) -> DesiredBundle {
        DesiredBundle {
            name: name.into(),
            version,
            manifest_sha256: Sha256([version as u8; 32]),
            bundle_sha256: Sha256([0; 32]),
            size: 1,
            recipe_sha256: Sha256([0; 32]),
            activate,
        }
    }

    fn held(name: &str, version: u64, active: bool, managed: bool) -> HeldBundle {
        HeldBundle {
            name: name.into(),
            version,
            manifest_sha256: Sha256([version as u8; 32]),
            active,
            managed,
            engine: None,
        }
    }

    fn desired(bundles: Vec<DesiredBundle>) -> DesiredState {
        DesiredState {
            agent: "a".into(),
            region: "r".into(),
            version: 1,
            issued: Timestamp::from_unix(0),
            expires: Timestamp::from_unix(1),
            bundles,
            jobs: vec![],
            rollouts: vec![],
        }
    }

    fn activate(name: &str, version: u64) -> Action {
        Action::Activate { name: name.into(), version }
    }

    fn remove(name: &str, version: u64) -> Action {
        Action::Remove { name: name.into(), version }
    }

    #[test]
    fn upgrade_installs_then_activates_then_removes_the_old_version() {
        let plan = plan(&desired(vec![want("m", 2, true)]), &[held("m", 1, true, true)]);
        assert_eq!(
            plan.actions,
            vec![Action::Install(want("m", 2, true)), activate("m", 2), remove("m", 1)]
        );
        assert!(plan.problems.is_empty());
    }

    #[test]
    fn converged_state_plans_nothing() {
        let state = [held("m", 2, true, true)];
        assert_eq!(plan(&desired(vec![want("m", 2, true)]), &state), Plan::default());
    }

    #[test]
    fn rollback_is_an_activation_of_a_held_older_version() {
        let state = [held("m", 1, false, true), held("m", 2, true, true)];
        let plan = plan(&desired(vec![want("m", 1, true)]), &state);
        assert_eq!(plan.actions, vec![activate("m", 1), remove("m", 2)]);
    }

    #[test]
    fn undeploy_removes_managed_versions_and_leaves_imported_ones() {
        let state = [held("m", 1, true, true), held("hand", 4, true, false)];
        let plan = plan(&desired(vec![]), &state);
        assert_eq!(plan.actions, vec![remove("m", 1)]);
    }

    #[test]
    fn a_held_but_inactive_desire_keeps_the_served_version() {
        // Stage v2 without switching: v1 stays active and is not removed.
        let state = [held("m", 1, true, true)];
        let plan = plan(&desired(vec![want("m", 2, false)]), &state);
        assert_eq!(plan.actions, vec![Action::Install(want("m", 2, false))]);
    }

    #[test]
    fn a_conflicting_held_version_is_reported_not_replaced() {
        let mut other = held("m", 2, false, true);
        other.manifest_sha256 = Sha256([99; 32]);
        let plan = plan(&desired(vec![want("m", 2, true)]), &[held("m", 1, true, true), other]);
        assert_eq!(plan.actions, vec![]);
        assert_eq!(plan.problems.len(), 1);
    }

    #[test]
    fn planning_is_idempotent_once_applied() {
        // Applying the plan's actions to the held state and planning again gives nothing.
        let target = desired(vec![want("a", 3, true), want("b", 1, true), want("b", 2, false)]);
        let mut state =
            vec![held("a", 1, true, true), held("a", 2, false, true), held("c", 1, true, true)];
        for action in plan(&target, &state).actions {
            match action {
                Action::Install(b) => state.push(HeldBundle {
                    name: b.name,
                    version: b.version,
                    manifest_sha256: b.manifest_sha256,
                    active: false,
                    managed: true,
                    engine: None,
                }),
                Action::Activate { name, version } => {
                    for h in state.iter_mut().filter(|h| h.name == name) {
                        h.active = h.version == version;
                    }
                }
                Action::Remove { name, version } => {
                    state.retain(|h| !(h.name == name && h.version == version));
                }
            }
        }
        assert_eq!(plan(&target, &state), Plan::default());
        let mut keys: Vec<_> =
            state.iter().map(|h| (h.name.as_str(), h.version, h.active)).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec![("a", 3, true), ("b", 1, true), ("b", 2, false)]);
    }
}
