//! Prometheus metrics. Names are `optinsync_*`; labels have bounded cardinality (results,
//! input kinds, route templates, list ids from the configuration — never contact ids or
//! addresses). [`FAMILIES`] is the one list of every family with its HELP text.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// What kind of series a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric family the daemon and its connectors record: name, kind, HELP text.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    // Build and consent state.
    (
        "optinsync_build_info",
        Kind::Gauge,
        "Always 1; the labels name the running version and its commit.",
    ),
    (
        "optinsync_consents",
        Kind::Gauge,
        "Contacts per list and consent state, from the store.",
    ),
    (
        "optinsync_ledger_head_seq",
        Kind::Gauge,
        "Sequence number of the newest ledger event.",
    ),
    (
        "optinsync_ledger_verify_ok",
        Kind::Gauge,
        "1 if the last full hash-chain verification of the ledger passed, 0 if it failed.",
    ),
    (
        "optinsync_ledger_verify_last_timestamp_seconds",
        Kind::Gauge,
        "When the ledger was last verified (Unix time), whatever the result.",
    ),
    (
        "optinsync_ledger_verified_events",
        Kind::Gauge,
        "Events checked by the last passed ledger verification.",
    ),
    // Outbox.
    (
        "optinsync_outbox_pending",
        Kind::Gauge,
        "Outbox rows waiting for delivery, by kind.",
    ),
    (
        "optinsync_outbox_dead_letters",
        Kind::Gauge,
        "Outbox rows given up after their attempts (dead letters), by kind.",
    ),
    (
        "optinsync_outbox_oldest_pending_removal_age_seconds",
        Kind::Gauge,
        "Age of the oldest campaigns removal still waiting in the outbox (0 when none).",
    ),
    (
        "optinsync_outbox_delivery_total",
        Kind::Counter,
        "Outbox deliveries by kind and result.",
    ),
    (
        "optinsync_outbox_batch_items",
        Kind::Histogram,
        "Rows per batched campaigns call, by kind.",
    ),
    (
        "optinsync_circuit_open",
        Kind::Gauge,
        "1 while a connector's circuit breaker is open or half-open, 0 when closed.",
    ),
    (
        "optinsync_connector_paused_total",
        Kind::Counter,
        "Deliveries the vendor asked to wait for a named time (a quota lock-out or a spent quota), by connector role.",
    ),
    // Drift against the campaigns tool.
    (
        "optinsync_drift_on_list_without_consent",
        Kind::Gauge,
        "Members of the campaigns list without a standing confirmation in the ledger and with no removal pending.",
    ),
    (
        "optinsync_drift_confirmed_missing",
        Kind::Gauge,
        "Contacts whose consent puts them on the list, absent from the campaigns list, with no subscribe pending.",
    ),
    (
        "optinsync_drift_pending_removals",
        Kind::Gauge,
        "Removals from the list not carried out yet (pending or dead) at the last drift check.",
    ),
    (
        "optinsync_drift_oldest_pending_removal_age_seconds",
        Kind::Gauge,
        "Age of the list's oldest removal not carried out at the last drift check (0 when none).",
    ),
    (
        "optinsync_drift_last_computed_timestamp_seconds",
        Kind::Gauge,
        "When drift was last computed for the list (Unix time).",
    ),
    (
        "optinsync_drift_checks_total",
        Kind::Counter,
        "Drift checks per list by result (ok, failed).",
    ),
    // HTTP.
    (
        "optinsync_http_requests_total",
        Kind::Counter,
        "HTTP requests by route template, method and status.",
    ),
    (
        "optinsync_http_request_duration_seconds",
        Kind::Histogram,
        "HTTP request latency by route template, method and status.",
    ),
    (
        "optinsync_http_rate_limited_total",
        Kind::Counter,
        "Requests answered 429 by a rate limit, by limit.",
    ),
    (
        "optinsync_link_refused_total",
        Kind::Counter,
        "Confirmation and unsubscribe links refused, by reason (token failures, cross-site, not mailed).",
    ),
    (
        "optinsync_admin_refused_total",
        Kind::Counter,
        "Admin API calls refused (401 bad token, throttled), by reason.",
    ),
    (
        "optinsync_link_fetches_total",
        Kind::Counter,
        "GET/HEAD of confirmation and unsubscribe pages (people and link scanners), by page.",
    ),
    (
        "optinsync_link_actions_total",
        Kind::Counter,
        "Confirmations and unsubscribes sent by people, by action and what the engine did.",
    ),
    (
        "optinsync_webhook_calls_total",
        Kind::Counter,
        "Webhook calls by connector role and result (handled, refused, failed, unknown_connector).",
    ),
    // Engine.
    (
        "optinsync_consent_refused_total",
        Kind::Counter,
        "Inputs the consent state machine refused, by input.",
    ),
    (
        "optinsync_wave_pauses_total",
        Kind::Counter,
        "Times a list's stop rules paused its waves (hard bounces, complaints or policy refusals over the window), by list.",
    ),
    (
        "optinsync_wave_paused",
        Kind::Gauge,
        "1 while a list's waves are paused by its stop rules (until `optinsync campaign resume`), else 0; by list.",
    ),
    (
        "optinsync_rule_errors_total",
        Kind::Counter,
        "Rule script errors during decisions.",
    ),
    (
        "optinsync_rules_reload_total",
        Kind::Counter,
        "Rule set reloads by result.",
    ),
    (
        "optinsync_job_runs_total",
        Kind::Counter,
        "Periodic job runs on this instance by job and result.",
    ),
    (
        "optinsync_job_duration_seconds",
        Kind::Histogram,
        "Duration of a periodic job run, by job.",
    ),
    (
        "optinsync_job_last_success_timestamp_seconds",
        Kind::Gauge,
        "When a periodic job last succeeded on this instance (Unix time), by job.",
    ),
    // Connectors.
    (
        "optinsync_vendor_quota_used_ratio",
        Kind::Gauge,
        "Share of a vendor quota window in use (the fullest window), by connector and endpoint.",
    ),
    (
        "optinsync_zoho_campaigns_lockouts_total",
        Kind::Counter,
        "Calls refused because Zoho Campaigns locked the endpoint, by endpoint.",
    ),
    (
        "optinsync_zoho_campaigns_quota_waits_total",
        Kind::Counter,
        "Zoho Campaigns calls that waited for a quota slot, by endpoint.",
    ),
    (
        "optinsync_zoho_campaigns_quota_wait_seconds",
        Kind::Histogram,
        "Wait for a Zoho Campaigns quota slot, by endpoint.",
    ),
    (
        "optinsync_zoho_campaigns_removal_checks_total",
        Kind::Counter,
        "Zoho Campaigns removal read-backs by answer code and finding.",
    ),
    (
        "optinsync_zoho_crm_api_credits_remaining",
        Kind::Gauge,
        "Zoho CRM API credits left, as the last answer reported.",
    ),
    (
        "optinsync_mailchimp_throttled_total",
        Kind::Counter,
        "Mailchimp answers 429 (too many requests).",
    ),
    (
        "optinsync_smtp_paced_rate",
        Kind::Gauge,
        "The SMTP transport's current paced sending rate, mails per second (0 = unpaced).",
    ),
    (
        "optinsync_exec_call_timeouts_total",
        Kind::Counter,
        "Exec connector calls that timed out, by connector.",
    ),
    (
        "optinsync_exec_protocol_errors_total",
        Kind::Counter,
        "Exec connector lines that broke the protocol, by connector.",
    ),
    (
        "optinsync_exec_process_exits_total",
        Kind::Counter,
        "Exec connector process exits, by connector.",
    ),
    (
        "optinsync_exec_restarts_total",
        Kind::Counter,
        "Exec connector restarts by connector and result.",
    ),
];

/// Histogram buckets for latencies and durations, in seconds (5 ms to 5 min).
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Install the global recorder once per process and describe every family; later calls are
/// no-ops.
pub fn install() {
    if HANDLE.get().is_some() {
        return;
    }
    // Seconds histograms as Prometheus histograms (quantiles aggregate badly across
    // instances); the rest stay summaries.
    let builder = match PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
    {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "metrics buckets not set");
            PrometheusBuilder::new()
        }
    };
    match builder.install_recorder() {
        Ok(handle) => {
            let _ = HANDLE.set(handle);
            describe();
        }
        Err(e) => tracing::warn!(error = %e, "metrics recorder not installed"),
    }
}

/// A HELP line for every family of [`FAMILIES`].
fn describe() {
    for &(name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// `optinsync_build_info{version,commit} 1`.
pub fn build_info(version: &'static str, commit: &'static str) {
    metrics::gauge!("optinsync_build_info", "version" => version, "commit" => commit).set(1.0);
}

/// Text exposition for `GET /metrics`.
pub fn render() -> String {
    match HANDLE.get() {
        Some(h) => {
            // Without the exporter's own listener nobody else runs upkeep.
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

pub async fn handler() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        render(),
    )
}

/// Count and time every request by its route template (never the raw path: tokens are in
/// it), method and status. Requests no route matched share `route="unmatched"`.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let labels = [
        ("route", route),
        ("method", method.to_owned()),
        ("status", status),
    ];
    metrics::counter!("optinsync_http_requests_total", &labels).increment(1);
    metrics::histogram!("optinsync_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    resp
}

/// The standard methods by name, anything else as `other` (a client picks the method).
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}
