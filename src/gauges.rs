//! The gauges `run` reads from outside the request path, on a task of their own so a slow
//! vendor listing never holds up a job or a delivery, each at its own interval
//! (`[metrics]`):
//!
//! - every `refresh_interval`: consents per list and state, outbox backlog per kind and the
//!   oldest pending removal, the ledger head (grouped or indexed reads);
//! - every `ledger_verify_interval`: a full hash-chain verification of the ledger;
//! - every `drift_interval`: drift against the campaigns tool ([`optinsync_engine::drift`]),
//!   under the `drift-check` lease, so among instances sharing a database only one lists the
//!   vendor's members.
//!
//! It only reads, so shutdown cancels it wherever it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use optinsync_engine::consent::ConsentState;
use optinsync_engine::engine::Engine;
use optinsync_engine::untrusted::Escaped;
use optinsync_engine::work::OutboxWork;

/// The lease that keeps the drift check (vendor calls) on one instance at a time.
const DRIFT_LEASE: &str = "drift-check";

/// Refresh the gauges until `stop` turns true.
pub fn spawn(
    engine: &Arc<Engine>,
    worker: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let engine = Arc::clone(engine);
    let worker = worker.to_owned();
    tokio::spawn(async move {
        let m = engine.settings().metrics;
        let refresh = m.refresh_interval.0.max(Duration::from_secs(1));
        let (mut verified, mut drifted): (Option<Instant>, Option<Instant>) = (None, None);
        while !*stop.borrow() {
            if let Err(e) = store_gauges(&engine).await {
                tracing::warn!(error = %e, "metrics: store gauges not refreshed");
            }
            if verified.is_none_or(|at| at.elapsed() >= m.ledger_verify_interval.0) {
                verified = Some(Instant::now());
                verify_ledger(&engine).await;
            }
            if drifted.is_none_or(|at| at.elapsed() >= m.drift_interval.0) {
                drifted = Some(Instant::now());
                drift(&engine, &worker, m.drift_interval.0).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(refresh) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }
    })
}

fn now_secs() -> f64 {
    Utc::now().timestamp_millis() as f64 / 1000.0
}

/// Consents per list and state (every configured list and state, zeros included, so an alert
/// on a state sees the series before its first contact), outbox backlog per kind, the age of
/// the oldest pending removal and the ledger head.
async fn store_gauges(engine: &Engine) -> Result<(), optinsync_engine::store::StoreError> {
    let reads = engine.reads();
    let mut consents: BTreeMap<(String, &'static str), i64> = BTreeMap::new();
    for list in engine.lists() {
        for state in ConsentState::ALL {
            consents.insert((list.id.clone(), state.as_str()), 0);
        }
    }
    for row in reads.consent_summary().await? {
        // A state the store holds but this version does not know keeps no series.
        if let Some(state) = ConsentState::ALL
            .into_iter()
            .find(|s| s.as_str() == row.state)
        {
            consents.insert((row.list_id, state.as_str()), row.count);
        }
    }
    for ((list, state), n) in consents {
        metrics::gauge!("optinsync_consents", "list" => list, "state" => state).set(n as f64);
    }
    for list in engine.lists() {
        // Read from the store: a pause or resume by another process (`campaign resume`)
        // shows here at the next refresh.
        match engine.wave_state(&list.id).await {
            Ok(w) => metrics::gauge!("optinsync_wave_paused", "list" => list.id.clone())
                .set(if w.paused.is_some() { 1.0 } else { 0.0 }),
            Err(e) => {
                tracing::warn!(list = %list.id, error = %e, "reading the list's waves failed")
            }
        }
    }

    let depth = reads.outbox_depth().await?;
    let now = Utc::now();
    for kind in OutboxWork::KINDS {
        let count = |status: &str| {
            depth
                .iter()
                .filter(|d| d.kind == kind && d.status == status)
                .map(|d| d.count)
                .sum::<i64>() as f64
        };
        metrics::gauge!("optinsync_outbox_pending", "kind" => kind).set(count("pending"));
        metrics::gauge!("optinsync_outbox_dead_letters", "kind" => kind).set(count("dead"));
    }
    let oldest_removal = depth
        .iter()
        .filter(|d| d.kind == "campaigns_remove" && d.status == "pending")
        .map(|d| d.oldest)
        .min()
        .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
    metrics::gauge!("optinsync_outbox_oldest_pending_removal_age_seconds").set(oldest_removal);

    metrics::gauge!("optinsync_ledger_head_seq").set(reads.ledger_head().await? as f64);
    Ok(())
}

/// Recompute the whole chain; a failure sets `optinsync_ledger_verify_ok` to 0 and says where.
async fn verify_ledger(engine: &Engine) {
    let started = Instant::now();
    let ok = match engine.reads().verify_ledger().await {
        Ok(summary) => {
            // At INFO: it runs every few hours, and how long it takes grows with the ledger.
            tracing::info!(
                events = summary.events_checked,
                took_ms = started.elapsed().as_millis() as u64,
                "metrics: ledger verified"
            );
            metrics::gauge!("optinsync_ledger_verified_events").set(summary.events_checked as f64);
            1.0
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: ledger verification failed (`optinsync ledger verify` names the event)");
            0.0
        }
    };
    metrics::gauge!("optinsync_ledger_verify_ok").set(ok);
    metrics::gauge!("optinsync_ledger_verify_last_timestamp_seconds").set(now_secs());
}

/// Drift of every list, if this instance holds (or takes) the drift lease.
async fn drift(engine: &Engine, worker: &str, interval: Duration) {
    let now = Utc::now();
    let hold = chrono::Duration::from_std(interval * 3 + Duration::from_secs(30))
        .unwrap_or(chrono::Duration::hours(3));
    match engine.try_lease(DRIFT_LEASE, worker, now, now + hold).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot take the drift lease");
            return;
        }
    }
    let started = Instant::now();
    for list in engine.lists() {
        let id = list.id.clone();
        match list_drift(engine, list).await {
            Ok((d, without_consent)) => {
                let age = d.oldest_removal.map_or(0.0, |t| {
                    (d.computed_at - t).num_milliseconds().max(0) as f64 / 1000.0
                });
                metrics::gauge!("optinsync_drift_on_list_without_consent", "list" => id.clone())
                    .set(without_consent as f64);
                metrics::gauge!("optinsync_drift_confirmed_missing", "list" => id.clone())
                    .set(d.confirmed_missing.len() as f64);
                metrics::gauge!("optinsync_drift_pending_removals", "list" => id.clone())
                    .set(d.pending_removals as f64);
                metrics::gauge!("optinsync_drift_oldest_pending_removal_age_seconds", "list" => id.clone())
                    .set(age);
                metrics::gauge!("optinsync_drift_last_computed_timestamp_seconds", "list" => id.clone())
                    .set(d.computed_at.timestamp_millis() as f64 / 1000.0);
                metrics::counter!("optinsync_drift_checks_total", "list" => id, "result" => "ok")
                    .increment(1);
            }
            Err(e) => {
                // Connector errors may quote what the vendor sent: escaped.
                tracing::warn!(list = %id, error = %Escaped(format!("{e:#}")), "metrics: drift not computed");
                metrics::counter!("optinsync_drift_checks_total", "list" => id, "result" => "failed")
                    .increment(1);
            }
        }
    }
    tracing::info!(
        lists = engine.lists().len(),
        took_ms = started.elapsed().as_millis() as u64,
        "metrics: drift checked"
    );
}

/// The list's drift ([`Engine::drift`]) and how many of those on the list without consent
/// have no removal pending: a removal on its way is the outbox's business (its age has its
/// own alert), so the alarm counts only what nothing will fix.
async fn list_drift(
    engine: &Engine,
    list: &optinsync_engine::config::ListConfig,
) -> Result<(optinsync_engine::drift::DriftReport, usize), optinsync_engine::engine::EngineError> {
    let report = engine.drift(list).await?;
    let removing = engine.reads().pending_removal_addresses(&list.id).await?;
    let without_consent = without_removal(&report.unconfirmed_on_list, &removing);
    Ok((report, without_consent))
}

/// How many of the `(address, state)` on the list without consent no pending removal will
/// take off (addresses compared in canonical form).
fn without_removal(unconfirmed: &[(String, String)], removing: &[String]) -> usize {
    let canonical =
        |a: &String| optinsync_engine::email::normalise(a).unwrap_or_else(|_| a.clone());
    let removing: std::collections::BTreeSet<String> = removing.iter().map(canonical).collect();
    unconfirmed
        .iter()
        .filter(|(address, _)| !removing.contains(&canonical(address)))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_removal_is_not_drift() {
        let on_list = [
            ("bo@example.org".to_owned(), "withdrawn".to_owned()),
            ("cy@example.org".to_owned(), "withdrawn".to_owned()),
            ("zz@example.org".to_owned(), "none".to_owned()),
        ];
        // Cy's removal is queued (spelled as the row carries it); Bo's and the stranger's not.
        assert_eq!(without_removal(&on_list, &["Cy@Example.org".to_owned()]), 2);
        assert_eq!(without_removal(&on_list, &[]), 3);
    }
}
