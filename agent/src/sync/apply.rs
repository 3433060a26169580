//! What the driver runs beside its loop, and the store and file steps it performs for
//! the session machine: reconciling to a document, running a fine-tune job, deleting
//! acknowledged windows, installing a renewed certificate, taking new trust roots.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use falaj_common::desired::DesiredState;
use falaj_common::finetune::{DesiredJob, JobReport};
use falaj_common::reconcile::{self, Action as Step};
use falaj_common::session::Event;
use falaj_common::time::Timestamp;

use super::Syncer;
use crate::finetune;
use crate::transfer::Fetcher;

impl Syncer {
    /// Reconciles to `doc` (the machine's [`Action::Apply`]): plans and runs its steps,
    /// records its rollouts and jobs, asks for a reload; sends each problem as it arises
    /// and the outcome at the end.
    pub(super) async fn apply(
        self: Arc<Self>,
        fetcher: Fetcher,
        doc: DesiredState,
        send: impl Fn(Event) + Send + Sync + 'static,
    ) {
        // Logged by the driver when the machine notes it.
        let problem = |p: String| send(Event::Problem(p));
        // Reported until the next document applies in full, not only until this one does.
        let mut problems = self.drop_unreadable().await;
        let ok = self.steps(&fetcher, &doc, &problem).await;
        // Rollouts take effect whether or not every install succeeded: a candidate not
        // loaded leaves its requests with the baseline.
        let rollouts = doc.rollouts.clone();
        if let Err(e) = self.with_store(move |s| s.set_rollouts(&rollouts)).await {
            problems.push(format!("recording rollouts: {e}"));
        }
        let jobs = doc.jobs.clone();
        let new_jobs =
            match self.with_store(move |s| s.enqueue_jobs(&jobs, SystemTime::now())).await {
                Ok(added) => added,
                Err(e) => {
                    problems.push(format!("recording fine-tune jobs: {e}"));
                    0
                }
            };
        self.reload.notify_one();
        send(Event::Applied { ok, new_jobs, problems });
    }

    /// Removes the managed versions whose files no longer open (damaged or tampered with
    /// on disk, refused at load by their GCM tags or hashes), so that the plan fetches
    /// them again from the control plane and verifies them anew; returns a note for each.
    /// Imported versions are left as they are (their failure is reported with the
    /// agent's state): nothing here could fetch them again.
    async fn drop_unreadable(&self) -> Vec<String> {
        let Some(registry) = &self.registry else { return Vec::new() };
        let unreadable = registry.catalog().unreadable();
        if unreadable.is_empty() {
            return Vec::new();
        }
        let dropped = self
            .with_store(move |s| {
                let managed: BTreeSet<(String, u64)> = s
                    .held()?
                    .into_iter()
                    .filter(|h| h.managed)
                    .map(|h| (h.name, h.version))
                    .collect();
                let mut dropped = Vec::new();
                for (name, version, reason) in unreadable {
                    if managed.contains(&(name.clone(), version))
                        && s.remove(&name, version, SystemTime::now())?
                    {
                        dropped.push((name, version, reason));
                    }
                }
                Ok(dropped)
            })
            .await;
        match dropped {
            Ok(dropped) => dropped
                .into_iter()
                .map(|(name, version, reason)| {
                    tracing::warn!(model = %name, version, error = %reason, "the installed file does not open: fetching the bundle again");
                    format!("{name}@{version}: the installed file did not open ({reason}); removed to be fetched again")
                })
                .collect(),
            Err(e) => vec![format!("removing bundles whose files do not open: {e}")],
        }
    }

    /// Plans and runs the installs, activations and removals for `doc`; true when
    /// everything succeeded.
    async fn steps(
        &self,
        fetcher: &Fetcher,
        doc: &DesiredState,
        problem: &(dyn Fn(String) + Sync),
    ) -> bool {
        let held = match self.with_store(|s| s.held()).await {
            Ok(held) => held,
            Err(e) => {
                problem(format!("reading the installed bundles: {e}"));
                return false;
            }
        };
        let plan = reconcile::plan(doc, &held);
        let mut ok = plan.problems.is_empty();
        for p in plan.problems {
            problem(p);
        }
        for step in plan.actions {
            let now = SystemTime::now();
            let result = match &step {
                Step::Install(want) => match fetcher.install(want, now).await {
                    Ok(stats) => {
                        crate::crash_point("sync-installed");
                        self.stats.transfer_bytes.fetch_add(stats.fetched_bytes, Ordering::Relaxed);
                        tracing::info!(model = %want.name, version = want.version, chunks = stats.chunks, fetched = stats.fetched, fetched_bytes = stats.fetched_bytes, reused = stats.reused, damaged = stats.damaged, "bundle installed");
                        Ok(())
                    }
                    Err(e) => Err(format!("installing {}@{}: {e}", want.name, want.version)),
                },
                Step::Activate { name, version } => {
                    let (n, v) = (name.clone(), *version);
                    match self.with_store(move |s| s.activate(&n, v, now)).await {
                        Ok(true) => {
                            crate::crash_point("sync-activated");
                            tracing::info!(model = %name, version, "activated");
                            self.reload.notify_one();
                            Ok(())
                        }
                        Ok(false) => Err(format!("activating {name}@{version}: not installed")),
                        Err(e) => Err(format!("activating {name}@{version}: {e}")),
                    }
                }
                Step::Remove { name, version } => {
                    let (n, v) = (name.clone(), *version);
                    match self.with_store(move |s| s.remove(&n, v, now)).await {
                        Ok(_) => {
                            tracing::info!(model = %name, version, "removed");
                            Ok(())
                        }
                        Err(e) => Err(format!("removing {name}@{version}: {e}")),
                    }
                }
            };
            if let Err(p) = result {
                ok = false;
                problem(p);
                // Installs may fail on a dropped connection; later steps depend on them.
                if matches!(step, Step::Install(_)) {
                    break;
                }
            }
        }
        ok
    }

    /// Runs `job` on the blocking pool and records its report; returns its id.
    pub(super) async fn run_job(self: Arc<Self>, job: DesiredJob) -> String {
        let id = job.id.clone();
        let (dir, gpu, site) = (self.data_dir.clone(), self.gpu_options(), self.site_data());
        let ran =
            tokio::task::spawn_blocking(move || finetune::run_ordered(&dir, &site, &job, gpu))
                .await;
        let report =
            ran.unwrap_or_else(|e| JobReport::failed(&id, format!("the job's task failed: {e}")));
        let stored = self.with_store(move |s| s.finish_job(&report, SystemTime::now())).await;
        if let Err(e) = stored {
            tracing::warn!(error = %e, "recording a fine-tune job's end");
        }
        self.reload.notify_one();
        id
    }

    /// Marks jobs a previous process left running as failed.
    pub(super) async fn recover_jobs(&self) -> Event {
        match self.with_store(|s| s.fail_interrupted_jobs(SystemTime::now())).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(?ids, "fine-tune jobs interrupted by the last stop are failed");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading interrupted fine-tune jobs"),
        }
        Event::JobsRecovered
    }

    /// Deletes windows the control plane acknowledged from the outbox.
    pub(super) async fn delete_windows(&self, seqs: Vec<u64>) {
        let Some(reporter) = self.reporter.clone() else { return };
        crate::crash_point("outbox-acknowledged");
        let deleted = tokio::task::spawn_blocking(move || reporter.acknowledged(&seqs)).await;
        match deleted {
            Ok(Ok(())) => crate::crash_point("outbox-removed"),
            Ok(Err(e)) => tracing::error!(error = %e, "deleting acknowledged windows failed"),
            Err(e) => tracing::error!(error = %e, "deleting acknowledged windows failed"),
        }
    }

    /// Installs a renewed certificate; the machine hears of the new one, or of the problem.
    pub(super) fn install_certificate(&self, certificate_der: &[u8], expires: Timestamp) -> Event {
        crate::crash_point("renew-answered");
        match self.files.install_renewed(certificate_der) {
            Ok(()) => {
                crate::crash_point("renew-installed");
                tracing::info!(%expires, "certificate renewed; used from the next connection");
                Event::Certificate(self.validity())
            }
            Err(e) => Event::Problem(format!("installing the renewed certificate failed: {e}")),
        }
    }

    /// Takes the trust root versions that follow the one held.
    pub(super) async fn update_trust(&self, roots: Vec<String>) -> Option<Event> {
        match self.with_store(move |s| s.update_trust(&roots, SystemTime::now())).await {
            Ok(taken) if taken.is_empty() => None,
            Ok(taken) => {
                tracing::info!(versions = ?taken, "took new trust root versions");
                None
            }
            Err(e) => Some(Event::Problem(format!("new trust root refused: {e}"))),
        }
    }
}
