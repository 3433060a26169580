//! Desired-state documents: what one agent should hold and serve, signed by the control
//! plane's signing keys, with a version that only increases and an expiry.
//!
//! As TUF does for its metadata, the agent refuses a document that is not newer than the
//! last one it accepted (replay and rollback), that has expired (freeze: a control plane
//! or attacker withholding updates cannot keep an agent on stale state forever without it
//! noticing), or that names another agent or region (mix-and-match). A deliberate model
//! rollback is simply a newer document naming an older bundle.

use std::collections::BTreeSet;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::finetune::DesiredJob;
use crate::keys::{Context, Sha256, SignatureEntry, SigningKey};
use crate::names;
use crate::rollout::RolloutSpec;
use crate::time::Timestamp;
use crate::trust::{SignatureError, TrustRoot};

/// What one agent should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The agent this document is for.
    pub agent: String,
    /// The agent's region.
    pub region: String,
    /// Increases with every document issued to this agent.
    pub version: u64,
    /// When it was issued.
    pub issued: Timestamp,
    /// After this the agent refuses it (and keeps serving what it has).
    pub expires: Timestamp,
    /// The bundles to hold; at most one version per name is activated.
    pub bundles: Vec<DesiredBundle>,
    /// Fine-tune jobs to run (each id once), with their data on the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<DesiredJob>,
    /// Rollouts under way: at most one per model, whose baseline is listed active and
    /// whose candidate is listed inactive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutSpec>,
}

/// A bundle the agent should hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredBundle {
    /// The model's name.
    pub name: String,
    /// The version.
    pub version: u64,
    /// SHA-256 of the bundle's signed manifest (the bundle's identity).
    pub manifest_sha256: Sha256,
    /// SHA-256 of the whole bundle file.
    pub bundle_sha256: Sha256,
    /// Size of the bundle file.
    pub size: u64,
    /// SHA-256 of the bundle's chunk recipe.
    pub recipe_sha256: Sha256,
    /// Whether this version is the one served for its name.
    pub activate: bool,
}

/// A document as it travels: the exact signed bytes and their signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDesired {
    /// The document's JSON.
    #[serde(with = "serde_bytes")]
    pub document: Vec<u8>,
    /// Signatures over `document` under [`Context::DesiredState`].
    pub signatures: Vec<SignatureEntry>,
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DesiredError {
    /// The signatures do not satisfy the trust root's signing role.
    #[error("desired state signature: {0}")]
    Signature(#[from] SignatureError),
    /// The (authentic) bytes are not a document.
    #[error("desired state is malformed: {0}")]
    Malformed(String),
    /// The document breaks a rule (two active versions of one name, a bad name).
    #[error("desired state is invalid: {0}")]
    Invalid(String),
    /// Not newer than the last document accepted: a replay or a rollback.
    #[error("desired state version {version} is not newer than the accepted version {accepted}")]
    Stale {
        /// The document's version.
        version: u64,
        /// The last accepted version.
        accepted: u64,
    },
    /// The document has expired. Documents live an hour from their issue, so one that is
    /// always expired on arrival says more about this agent's clock than the document.
    #[error(
        "desired state version {version} expired at {expires}; this agent's clock reads {now} (if every document arrives expired, check the clock)"
    )]
    Expired {
        /// The document's version.
        version: u64,
        /// Its expiry.
        expires: Timestamp,
        /// The agent's time.
        now: Timestamp,
    },
    /// The document is for another agent.
    #[error("desired state is for agent {document:?}, this is {me:?}")]
    WrongAgent {
        /// The document's agent.
        document: String,
        /// This agent.
        me: String,
    },
    /// The document is for another region.
    #[error("desired state is for region {document:?}, this agent is in {me:?}")]
    WrongRegion {
        /// The document's region.
        document: String,
        /// This agent's region.
        me: String,
    },
}

/// What the receiving agent expects of a document.
#[derive(Debug, Clone)]
pub struct Expectation<'a> {
    /// The agent's id.
    pub agent: &'a str,
    /// The agent's region.
    pub region: &'a str,
    /// The version of the last document accepted, if any.
    pub accepted: Option<u64>,
    /// The time of the check.
    pub now: SystemTime,
}

impl DesiredState {
    /// Signs the document with `keys`.
    pub fn sign(&self, keys: &[&SigningKey]) -> SignedDesired {
        let document = serde_json::to_vec(self).expect("documents always serialise");
        let signatures = keys
            .iter()
            .map(|k| SignatureEntry::sign(k, Context::DesiredState, &document))
            .collect();
        SignedDesired { document, signatures }
    }

    fn check_rules(&self) -> Result<(), DesiredError> {
        let invalid = |m: String| DesiredError::Invalid(m);
        names::check_region(&self.region).map_err(|e| invalid(e.to_string()))?;
        let mut held = BTreeSet::new();
        let mut active = BTreeSet::new();
        for b in &self.bundles {
            names::check_model_name(&b.name).map_err(|e| invalid(e.to_string()))?;
            if !held.insert((&b.name, b.version)) {
                return Err(invalid(format!("{}@{} is listed twice", b.name, b.version)));
            }
            if b.activate && !active.insert(&b.name) {
                return Err(invalid(format!("two versions of {} are marked active", b.name)));
            }
        }
        let mut ids = BTreeSet::new();
        for j in &self.jobs {
            names::check_model_name(&j.id).map_err(|e| invalid(format!("job id: {e}")))?;
            if !ids.insert(&j.id) {
                return Err(invalid(format!("job {} is listed twice", j.id)));
            }
            j.job.check().map_err(|e| invalid(format!("job {}: {e}", j.id)))?;
        }
        let mut models = BTreeSet::new();
        for r in &self.rollouts {
            r.check().map_err(|e| invalid(e.to_string()))?;
            if !models.insert(&r.model) {
                return Err(invalid(format!("two rollouts of {}", r.model)));
            }
            let listed = |version: u64, active: bool| {
                self.bundles
                    .iter()
                    .any(|b| b.name == r.model && b.version == version && b.activate == active)
            };
            if !listed(r.baseline, true) || !listed(r.candidate, false) {
                return Err(invalid(format!(
                    "rollout {} needs {}@{} listed active and {}@{} listed inactive",
                    r.id, r.model, r.baseline, r.model, r.candidate
                )));
            }
        }
        Ok(())
    }
}

impl SignedDesired {
    /// Verifies the document: signatures by the trust root's signing role, then its
    /// shape and rules, then agent, region, freshness and expiry.
    pub fn verify(
        &self,
        trust: &TrustRoot,
        expect: &Expectation<'_>,
    ) -> Result<DesiredState, DesiredError> {
        trust.check_signing(Context::DesiredState, &self.document, &self.signatures)?;
        let doc: DesiredState = serde_json::from_slice(&self.document)
            .map_err(|e| DesiredError::Malformed(e.to_string()))?;
        doc.check_rules()?;
        if doc.agent != expect.agent {
            return Err(DesiredError::WrongAgent { document: doc.agent, me: expect.agent.into() });
        }
        if doc.region != expect.region {
            return Err(DesiredError::WrongRegion {
                document: doc.region,
                me: expect.region.into(),
            });
        }
        if let Some(accepted) = expect.accepted.filter(|&a| doc.version <= a) {
            return Err(DesiredError::Stale { version: doc.version, accepted });
        }
        if Timestamp::from_system(expect.now) >= doc.expires {
            return Err(DesiredError::Expired {
                version: doc.version,
                expires: doc.expires,
                now: Timestamp::from_system(expect.now),
            });
        }
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::key;
    use crate::trust::RootSpec;

    const NOW: u64 = 1_800_000_000;

    fn setup() -> (TrustRoot, SigningKey) {
        let root = [key()];
        let signer = key();
        let trust = RootSpec {
            version: 1,
            region: "eu-west-1",
            expires: Timestamp::from_unix(NOW + 10_000),
            root_keys: &root,
            root_threshold: 1,
            signing_keys: &[signer.public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .unwrap();
        (trust, signer)
    }

    fn doc(version: u64) -> DesiredState {
        DesiredState {
            agent: "agent-1".into(),
            region: "eu-west-1".into(),
            version,
            issued: Timestamp::from_unix(NOW),
            expires: Timestamp::from_unix(NOW + 600),
            bundles: vec![DesiredBundle {
                name: "fault".into(),
                version: 2,
                manifest_sha256: Sha256([1; 32]),
                bundle_sha256: Sha256([2; 32]),
                size: 10,
                recipe_sha256: Sha256([3; 32]),
                activate: true,
            }],
            jobs: vec![],
            rollouts: vec![],
        }
    }

    fn expect(accepted: Option<u64>, now: u64) -> Expectation<'static> {
        Expectation {
            agent: "agent-1",
            region: "eu-west-1",
            accepted,
            now: Timestamp::from_unix(now).to_system(),
        }
    }

    #[test]
    fn accepts_a_fresh_document_and_refuses_replay_rollback_and_freeze() {
        let (trust, signer) = setup();
        let document = doc(5).sign(&[&signer]);
        assert_eq!(document.verify(&trust, &expect(Some(4), NOW)).unwrap(), doc(5));
        assert_eq!(document.verify(&trust, &expect(None, NOW)).unwrap(), doc(5));
        assert_eq!(
            document.verify(&trust, &expect(Some(5), NOW)).unwrap_err(),
            DesiredError::Stale { version: 5, accepted: 5 }
        );
        assert_eq!(
            document.verify(&trust, &expect(Some(9), NOW)).unwrap_err(),
            DesiredError::Stale { version: 5, accepted: 9 }
        );
        let expired = document.verify(&trust, &expect(Some(4), NOW + 600)).unwrap_err();
        assert!(matches!(expired, DesiredError::Expired { version: 5, .. }), "{expired}");
        // The agent's own time is in the message: a clock far ahead shows there.
        let now = Timestamp::from_system(expect(None, NOW + 600).now);
        assert!(expired.to_string().contains(&format!("clock reads {now}")), "{expired}");
    }

    #[test]
    fn refuses_mix_and_match_and_bad_signatures() {
        let (trust, signer) = setup();
        let mut other_agent = doc(5);
        other_agent.agent = "agent-2".into();
        assert!(matches!(
            other_agent.sign(&[&signer]).verify(&trust, &expect(None, NOW)),
            Err(DesiredError::WrongAgent { .. })
        ));
        let mut other_region = doc(5);
        other_region.region = "us-east-1".into();
        assert!(matches!(
            other_region.sign(&[&signer]).verify(&trust, &expect(None, NOW)),
            Err(DesiredError::WrongRegion { .. })
        ));
        let stranger = key();
        assert!(matches!(
            doc(5).sign(&[&stranger]).verify(&trust, &expect(None, NOW)),
            Err(DesiredError::Signature(SignatureError::UnknownKey { .. }))
        ));
        let mut tampered = doc(5).sign(&[&signer]);
        let at = tampered.document.len() - 5;
        tampered.document[at] ^= 1;
        assert!(matches!(
            tampered.verify(&trust, &expect(None, NOW)),
            Err(DesiredError::Signature(SignatureError::BadSignature { .. }))
        ));
        // A bundle manifest signature is not a desired-state signature.
        let manifest_sig =
            SignatureEntry::sign(&signer, Context::BundleManifest, &doc(5).sign(&[]).document);
        let forged =
            SignedDesired { document: doc(5).sign(&[]).document, signatures: vec![manifest_sig] };
        assert!(matches!(
            forged.verify(&trust, &expect(None, NOW)),
            Err(DesiredError::Signature(SignatureError::BadSignature { .. }))
        ));
    }

    #[test]
    fn refuses_two_active_versions_of_one_model() {
        let (trust, signer) = setup();
        let mut two = doc(5);
        let mut second = two.bundles[0].clone();
        second.version = 3;
        two.bundles.push(second);
        assert!(matches!(
            two.sign(&[&signer]).verify(&trust, &expect(None, NOW)),
            Err(DesiredError::Invalid(_))
        ));
    }

    #[test]
    fn carries_rollouts_whose_versions_it_lists() {
        use crate::rollout::{Share, Step, Strategy};
        let (trust, signer) = setup();
        let mut with_rollout = doc(5);
        let mut candidate = with_rollout.bundles[0].clone();
        candidate.version = 3;
        candidate.activate = false;
        with_rollout.bundles.push(candidate);
        with_rollout.rollouts.push(RolloutSpec {
            id: "ro-1".into(),
            model: "fault".into(),
            baseline: 2,
            candidate: 3,
            strategy: Strategy::Canary,
            steps: vec![Step { at: Timestamp::from_unix(NOW), share: Share::ALL }],
            mirror: Share::NONE,
            guards: vec!["error_rate<0.1".parse().unwrap()],
            min_requests: 200,
        });
        let verified = with_rollout.sign(&[&signer]).verify(&trust, &expect(None, NOW)).unwrap();
        assert_eq!(verified.rollouts, with_rollout.rollouts);

        let refused = |change: &dyn Fn(&mut DesiredState)| {
            let mut d = with_rollout.clone();
            change(&mut d);
            match d.sign(&[&signer]).verify(&trust, &expect(None, NOW)) {
                Err(DesiredError::Invalid(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        assert!(refused(&|d| d.bundles.truncate(1)).contains("fault@3 listed inactive"));
        assert!(refused(&|d| d.rollouts[0].baseline = 3).contains("is the baseline"));
        let twice = refused(&|d| d.rollouts.push(d.rollouts[0].clone()));
        assert_eq!(twice, "two rollouts of fault");
    }

    #[test]
    fn carries_fine_tune_jobs_and_refuses_bad_ones() {
        use crate::finetune::{DataSource, DesiredJob, Gate, Hyperparameters, Job, TrainEngine};
        let (trust, signer) = setup();
        let job = DesiredJob {
            id: "tune-1".into(),
            job: Job {
                model: "fault".into(),
                version: Some(2),
                data: DataSource {
                    file: "/srv/labels.csv".into(),
                    label: "label".into(),
                    features: None,
                    entity: None,
                },
                hyperparameters: Hyperparameters::default(),
                gate: Gate::default(),
                engine: TrainEngine::Cpu,
            },
            share_weights: false,
        };
        let mut with_job = doc(5);
        with_job.jobs.push(job.clone());
        let verified = with_job.sign(&[&signer]).verify(&trust, &expect(None, NOW)).unwrap();
        assert_eq!(verified.jobs, std::slice::from_ref(&job));

        let refused = |change: &dyn Fn(&mut DesiredState)| {
            let mut d = with_job.clone();
            change(&mut d);
            match d.sign(&[&signer]).verify(&trust, &expect(None, NOW)) {
                Err(DesiredError::Invalid(why)) => why,
                other => panic!("{other:?}"),
            }
        };
        assert!(
            refused(&|d| d.jobs.push(d.jobs[0].clone())).contains("job tune-1 is listed twice")
        );
        assert!(refused(&|d| d.jobs[0].id = "../x".into()).starts_with("job id:"));
        let why = refused(&|d| d.jobs[0].job.hyperparameters.batch_size = 0);
        assert_eq!(why, "job tune-1: batch_size must be at least 1");
    }
}
