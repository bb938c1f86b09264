//! The daemon's periodic jobs, each under its own named lease in the store, so that among
//! several instances on one database exactly one runs each job at a time — possibly a
//! different instance per job:
//!
//! - `crm-poller`: connector upkeep (webhook channel) and the CRM change feed;
//! - `campaigns-poller`: unsubscribes, bounces and confirmations made inside the campaigns tool;
//! - `scheduler`: the rules pass over every contact (and other timed upkeep).
//!
//! A holder renews its leases every pass; a dead holder's lease lapses after
//! `3 × interval + 30 s` (at once when it is restarted on the same host and address,
//! `Store::release_claims`). Running a job twice at once would still be safe (optimistic
//! concurrency on every consent, idempotent pages); the lease saves the work and the vendor
//! quota.

use std::time::{Duration, Instant};

use optinsync_engine::engine::Engine;
use optinsync_engine::untrusted::Escaped;

/// A periodic job of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// The CRM feed, and connector upkeep (e.g. the Zoho notification channel).
    CrmPoller,
    /// The campaigns tool's status feed (unsubscribes, bounces).
    CampaignsPoller,
    /// The rules pass and timed upkeep (retention).
    Scheduler,
}

impl Job {
    /// The jobs, in the order one instance holding all of them runs them (CRM first, so the
    /// rules pass sees the newest contacts, as a single `sync --once` pass does).
    pub const ALL: [Job; 3] = [Self::CrmPoller, Self::CampaignsPoller, Self::Scheduler];

    /// The name of the job's lease in the store (and of the job in logs). Stored: instances
    /// of different versions sharing one database must agree on it.
    pub fn lease_name(self) -> &'static str {
        match self {
            Self::CrmPoller => "crm-poller",
            Self::CampaignsPoller => "campaigns-poller",
            Self::Scheduler => "scheduler",
        }
    }
}

/// Which leases this instance held at its last pass (to log changes only), and when each job
/// last ran here, by job.
#[derive(Debug, Default)]
pub struct Jobs {
    held: [Option<bool>; Job::ALL.len()],
    ran: [Option<Instant>; Job::ALL.len()],
}

impl Job {
    /// How often the job runs: the daemon's `poll_interval`, except the campaigns poll, which
    /// follows the campaigns connector's own cadence where it declares one (shorter or longer).
    pub fn interval(self, engine: &Engine) -> Duration {
        let poll = engine.settings().sync.poll_interval.0;
        match self {
            Self::CampaignsPoller => engine
                .connectors()
                .campaigns
                .status_interval()
                .unwrap_or(poll)
                .max(Duration::from_secs(1)),
            Self::CrmPoller | Self::Scheduler => poll,
        }
    }
}

impl Jobs {
    /// Run each job that is due (its interval passed since it last ran here, or `all`) and
    /// whose lease this instance holds or can take now. Returns how long until the next job is
    /// due.
    pub async fn run_due(&mut self, engine: &Engine, worker: &str, all: bool) -> Duration {
        // When this instance pulled the CRM in this pass, the pull already ran the rules for
        // every contact it stored: the rules pass leaves those out (as `sync --once` does).
        let mut pulled_since = None;
        for (i, kind) in Job::ALL.into_iter().enumerate() {
            let interval = kind.interval(engine);
            if !all && self.ran[i].is_some_and(|at| at.elapsed() < interval) {
                continue;
            }
            self.ran[i] = Some(Instant::now());
            // A dead holder's lease lapses after three of its intervals.
            let hold = chrono::Duration::from_std(interval * 3 + Duration::from_secs(30))
                .unwrap_or(chrono::Duration::minutes(5));
            let job = kind.lease_name();
            let now = chrono::Utc::now();
            let held = match engine.try_lease(job, worker, now, now + hold).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(job, error = %e, "cannot take the job's lease; will retry next interval");
                    continue;
                }
            };
            if self.held[i] != Some(held) {
                if held {
                    tracing::info!(job, "this instance runs the job now (lease taken)");
                } else {
                    tracing::info!(
                        job,
                        "another instance holds the job's lease; this one delivers and serves links"
                    );
                }
                self.held[i] = Some(held);
            }
            if !held {
                continue;
            }
            let started = chrono::Utc::now();
            let timer = Instant::now();
            let outcome = run_job(engine, kind, pulled_since).await;
            metrics::histogram!("optinsync_job_duration_seconds", "job" => job)
                .record(timer.elapsed().as_secs_f64());
            let result = if outcome.is_ok() { "ok" } else { "failed" };
            metrics::counter!("optinsync_job_runs_total", "job" => job, "result" => result)
                .increment(1);
            match outcome {
                Ok(summary) => {
                    if kind == Job::CrmPoller {
                        pulled_since = Some(started);
                    }
                    metrics::gauge!("optinsync_job_last_success_timestamp_seconds", "job" => job)
                        .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                    tracing::info!(job, "job {job}: {summary}")
                }
                Err(e) => {
                    // Connector errors may quote what an outside system sent: escaped.
                    tracing::error!(job, error = %Escaped(format!("{e:#}")), "job {job} failed; will retry next interval")
                }
            }
        }
        Job::ALL
            .into_iter()
            .enumerate()
            .map(|(i, kind)| {
                let ran = self.ran[i].map_or(Duration::ZERO, |at| at.elapsed());
                kind.interval(engine).saturating_sub(ran)
            })
            .min()
            .unwrap_or(Duration::from_secs(1))
    }
}

async fn run_job(
    engine: &Engine,
    job: Job,
    pulled_since: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<String> {
    match job {
        Job::CrmPoller => {
            // Connector upkeep (e.g. the Zoho CRM notification channel); polling goes on if it fails.
            if let Err(e) = engine.connectors().crm.maintain().await {
                tracing::warn!(error = %Escaped(&e), "CRM connector upkeep failed; polling goes on");
            }
            let s = engine.pull_crm(|_| {}).await?;
            Ok(format!(
                "{} CRM records ({} skipped as invalid), {} CRM consent changes, {} rule changes",
                s.records, s.invalid, s.changes, s.rule_changes
            ))
        }
        Job::CampaignsPoller => {
            if let Err(e) = engine.connectors().campaigns.maintain().await {
                tracing::warn!(error = %Escaped(&e), "campaigns connector upkeep failed; polling goes on");
            }
            let n = engine.pull_campaigns().await?;
            Ok(format!("{n} campaigns changes"))
        }
        Job::Scheduler => {
            let d = engine.decide_all_but_updated_since(pulled_since).await?;
            // Retention (`[retention]`) is timed upkeep too: applied once per `every`
            // (default daily), tracked in the store so restarts and other instances agree.
            let retention = match engine.retention_if_due().await? {
                Some(r) => format!(
                    "; retention purged {} after withdrawal, {} unconfirmed",
                    r.withdrawn_proof, r.unconfirmed
                ),
                None => String::new(),
            };
            Ok(format!(
                "{} rule changes ({} refused, {} rule errors) over {} contacts{retention}",
                d.changes, d.refused, d.rule_errors, d.contacts
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lease names are stored; they are those of the string-typed jobs.
    #[test]
    fn lease_names_are_stable_and_distinct() {
        let names: Vec<&str> = Job::ALL.iter().map(|j| j.lease_name()).collect();
        assert_eq!(names, ["crm-poller", "campaigns-poller", "scheduler"]);
    }
}
