//! A quota slot before each call (own budgets or the shared ledger), and pausing on a lock.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{ConnectorError, ConnectorResult, FailureScope, QuotaSlot, QuotaWindow};

use super::budget::{Endpoint, Slot};
use super::{Api, ZohoCampaigns, now_ms};

impl ZohoCampaigns {
    /// The ledger key of an endpoint's budget.
    fn quota_key(api: Api) -> String {
        format!("zoho-campaigns:{}", api.name())
    }

    /// The windows of `api` (documented or configured, time-scaled).
    fn quota_windows(&self, api: Api) -> Vec<QuotaWindow> {
        self.lock_budgets()
            .get(api.name())
            .map(|ep| {
                ep.windows
                    .iter()
                    .map(|w| QuotaWindow {
                        limit: w.limit,
                        length_ms: w.length_ms,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Calls counted in the current windows of `api` and its lock end, from the shared
    /// ledger when there is one, else from this process's budgets.
    pub async fn shared_usage(&self, api: Api) -> ConnectorResult<(Vec<u32>, Option<i64>)> {
        match &self.ledger {
            Some(l) => {
                l.usage(&Self::quota_key(api), &self.quota_windows(api), now_ms())
                    .await
            }
            None => Ok((
                self.budget_usage(api),
                self.locked_until(api).map(|t| t.timestamp_millis()),
            )),
        }
    }

    /// Calls counted in the current windows of `api`: one number per window, in the order
    /// of [`Api::documented_limits`] (or the configured override).
    pub fn budget_usage(&self, api: Api) -> Vec<u32> {
        let now = now_ms();
        let mut b = self.lock_budgets();
        b.get_mut(api.name())
            .map(|ep| ep.windows.iter_mut().map(|w| w.used(now)).collect())
            .unwrap_or_default()
    }

    /// Until when `api` is paused by a Zoho lock, if it is.
    pub fn locked_until(&self, api: Api) -> Option<DateTime<Utc>> {
        let b = self.lock_budgets();
        b.get(api.name())
            .and_then(|ep| ep.locked_until)
            .filter(|u| *u > now_ms())
            .and_then(DateTime::from_timestamp_millis)
    }

    pub(super) fn lock_budgets(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Endpoint>> {
        self.budgets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a slot of `api`'s quota; returns the time the call was counted at.
    pub(super) async fn slot(&self, api: Api) -> ConnectorResult<i64> {
        let mut waited = false;
        let result = loop {
            let now = now_ms();
            let shared = match &self.ledger {
                Some(l) => match l
                    .take(&Self::quota_key(api), &self.quota_windows(api), now)
                    .await
                {
                    Ok(QuotaSlot::Go(at)) => Some(Slot::Go(at)),
                    Ok(QuotaSlot::Wait(d)) => Some(Slot::Wait(d)),
                    Ok(QuotaSlot::Locked(d)) => Some(Slot::Locked(d)),
                    Err(e) => break Err(e),
                },
                None => None,
            };
            let (slot, log) = {
                let mut budgets = self.lock_budgets();
                let Some(ep) = budgets.get_mut(api.name()) else {
                    break Ok(now);
                };
                let slot = match shared {
                    Some(s) => s,
                    None => {
                        let slot = ep.slot(now);
                        // This process's own budget: the fullest window's share in use. (With
                        // the shared ledger the store holds the counts; not read per call.)
                        let used = ep
                            .windows
                            .iter_mut()
                            .map(|w| f64::from(w.used(now)) / f64::from(w.limit.max(1)))
                            .fold(0.0, f64::max);
                        metrics::gauge!("optinsync_vendor_quota_used_ratio", "connector" => "zoho_campaigns", "endpoint" => api.name())
                            .set(used);
                        slot
                    }
                };
                let mut log = None;
                if let Slot::Wait(wait) = slot {
                    if !waited {
                        ep.waiting += 1;
                        waited = true;
                    }
                    // One INFO line per endpoint every few seconds, not one per waiting call.
                    let quiet = i64::try_from(self.scaled(Duration::from_secs(10)).as_millis())
                        .unwrap_or(10_000);
                    if ep.last_wait_log.is_none_or(|t| now - t >= quiet) {
                        ep.last_wait_log = Some(now);
                        let per_call = ep
                            .tightest()
                            .map(|(n, len)| len as f64 / f64::from(n.max(1)))
                            .unwrap_or(0.0);
                        let rest = (ep.waiting.saturating_sub(1) as f64 * per_call) as i64;
                        log = Some((wait, ep.waiting, now + wait.as_millis() as i64 + rest));
                    }
                }
                (slot, log)
            };
            match slot {
                Slot::Go(at) => break Ok(at),
                Slot::Locked(rest) => {
                    metrics::counter!("optinsync_zoho_campaigns_lockouts_total", "endpoint" => api.name()).increment(1);
                    break Err(ConnectorError::Transient {
                        message: format!(
                            "Zoho Campaigns has locked `{}` for exceeding its quota; paused for {} s",
                            api.name(),
                            rest.as_secs()
                        ),
                        retry_after: Some(rest),
                        scope: FailureScope::Service,
                    });
                }
                Slot::Wait(wait) => {
                    // Bounded labels: the endpoint name only.
                    metrics::counter!("optinsync_zoho_campaigns_quota_waits_total", "endpoint" => api.name())
                        .increment(1);
                    metrics::histogram!("optinsync_zoho_campaigns_quota_wait_seconds", "endpoint" => api.name())
                        .record(wait.as_secs_f64());
                    if let Some((wait, waiting, done_ms)) = log {
                        let done = DateTime::from_timestamp_millis(done_ms)
                            .map(|d| d.to_rfc3339())
                            .unwrap_or_default();
                        tracing::info!(
                            endpoint = api.name(),
                            wait_ms = wait.as_millis() as u64,
                            waiting,
                            expected_done = %done,
                            "Zoho Campaigns quota in use; calls wait for their slot instead of triggering the lock"
                        );
                    }
                    if wait > self.settings.max_wait {
                        break Err(ConnectorError::Transient {
                            message: format!(
                                "Zoho Campaigns `{}` quota is used up; next slot in {} s",
                                api.name(),
                                wait.as_secs()
                            ),
                            retry_after: Some(wait),
                            scope: FailureScope::Service,
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        };
        if waited {
            let mut budgets = self.lock_budgets();
            if let Some(ep) = budgets.get_mut(api.name()) {
                ep.waiting = ep.waiting.saturating_sub(1);
            }
        }
        result
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.settings.time_scale)
    }

    pub(super) async fn settle(&self, api: Api, sent: i64) {
        let done = now_ms();
        if let Some(l) = &self.ledger {
            // Best effort: the call stays counted at its send time if this fails.
            if let Err(e) = l
                .settle(&Self::quota_key(api), &self.quota_windows(api), sent, done)
                .await
            {
                tracing::warn!(endpoint = api.name(), error = %e, "shared quota: call not moved to its answer time");
            }
            return;
        }
        let mut budgets = self.lock_budgets();
        if let Some(ep) = budgets.get_mut(api.name()) {
            ep.settle(sent, done);
        }
    }

    pub(super) async fn mark_locked(&self, api: Api, retry_after: Option<Duration>) -> Duration {
        // (`retry_after` None: the endpoint's documented lock length.)
        let (rest, until) = {
            let mut budgets = self.lock_budgets();
            let Some(ep) = budgets.get_mut(api.name()) else {
                return retry_after.unwrap_or(Duration::from_secs(1800));
            };
            let rest = retry_after.unwrap_or(Duration::from_millis(
                u64::try_from(ep.lock_ms).unwrap_or(1_800_000),
            ));
            let until = now_ms() + i64::try_from(rest.as_millis()).unwrap_or(i64::MAX / 2);
            ep.lock(until);
            (rest, until)
        };
        // Every instance pauses the endpoint, not only the one that met the lock.
        if let Some(l) = &self.ledger
            && let Err(e) = l.lock(&Self::quota_key(api), until).await
        {
            tracing::warn!(endpoint = api.name(), error = %e, "shared quota: lock-out not shared with the other instances");
        }
        rest
    }
}
