//! The overview, per list: the funnel asserted → pending → confirmed with its conversion
//! rates and the states people left by, mails, confirmations, unsubscribes and bounces per
//! day, pending signups by age against the list's reminder and expiry windows, bounce and
//! complaint rates.

use std::collections::BTreeMap;

use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;

use optinsync_engine::config::ListConfig;
use optinsync_engine::store::{ConsentSummary, DayCount, StateReach};

use super::Ctx;
use super::chart::{self, Series};

/// The states shown, in the order a signup moves through them.
pub const STATES: [&str; 9] = [
    "asserted",
    "pending",
    "confirmed",
    "revalidating",
    "lapsed",
    "withdrawn",
    "bounced",
    "complained",
    "erased",
];

/// Ledger event kinds per chart line: DOI mails, confirmations, unsubscribes (withdrawals
/// of any channel), bounces.
const LINES: [(&str, &str, &[&str]); 4] = [
    ("DOI mails", "#3b6fb6", &["doi_mail_sent"]),
    (
        "confirmations",
        "#2e8b57",
        &["confirmed", "confirmed_by_campaigns"],
    ),
    ("unsubscribes", "#d68910", &["withdrawn"]),
    ("bounces", "#c0392b", &["bounced"]),
];

/// Mails of any kind, the denominator of the bounce and complaint rates.
const MAILS: [&str; 3] = [
    "doi_mail_sent",
    "reminder_mail_sent",
    "revalidation_mail_sent",
];

#[derive(Debug, serde::Deserialize)]
pub struct Window {
    days: Option<u32>,
}

#[derive(Debug, Serialize)]
struct Count {
    state: &'static str,
    now: i64,
    ever: i64,
}

#[derive(Debug, Serialize)]
struct ListView {
    id: String,
    name: String,
    states: Vec<Count>,
    asked_rate: String,
    confirm_rate: String,
    totals: BTreeMap<&'static str, i64>,
    bounce_rate: String,
    complaint_rate: String,
    chart: String,
    pending_chart: String,
    pending_total: i64,
    reminder_after: String,
    pending_expiry: String,
    /// "since …: why" while the list's waves are paused by its stop rules.
    paused: Option<String>,
}

pub async fn page(cx: Ctx, Query(window): Query<Window>) -> Response {
    let engine = &cx.engine;
    let days = if window.days == Some(90) { 90 } else { 30 };
    let now = Utc::now();
    let first = (now - Duration::days(i64::from(days) - 1)).date_naive();
    let since = first
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc())
        .unwrap_or(now);
    let reads = engine.reads();
    let read = async {
        Ok::<_, optinsync_engine::store::StoreError>((
            reads.consent_summary().await?,
            reads.states_reached().await?,
            reads.events_per_day(since).await?,
            reads.consents_per_day("pending").await?,
        ))
    };
    let (summary, reached, daily, pending) = match read.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "console: reading the overview failed");
            return cx.unavailable("Reading the store");
        }
    };
    let mut lists: Vec<ListView> = engine
        .lists()
        .iter()
        .map(|l| list_view(l, &summary, &reached, &daily, &pending, first, days, now))
        .collect();
    for view in &mut lists {
        match engine.wave_state(&view.id).await {
            Ok(w) => {
                view.paused = w
                    .paused
                    .map(|p| format!("since {}: {}", p.at.format("%Y-%m-%d %H:%M UTC"), p.reason));
            }
            Err(e) => {
                tracing::error!(error = %e, "console: reading the waves failed");
                return cx.unavailable("Reading the store");
            }
        }
    }
    cx.render(
        "overview.html",
        "overview",
        StatusCode::OK,
        minijinja::context! {
            days => days, lists => lists,
            generated_at => now.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        },
    )
}

fn percent(part: i64, whole: i64) -> String {
    if whole <= 0 {
        "–".to_owned()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

#[allow(clippy::too_many_arguments)]
fn list_view(
    list: &ListConfig,
    summary: &[ConsentSummary],
    reached: &[StateReach],
    daily: &[DayCount],
    pending: &[DayCount],
    first: NaiveDate,
    days: u32,
    now: DateTime<Utc>,
) -> ListView {
    let now_in = |s: &str| {
        summary
            .iter()
            .filter(|r| r.list_id == list.id && r.state == s)
            .map(|r| r.count)
            .sum::<i64>()
    };
    let reached: BTreeMap<&str, i64> = reached
        .iter()
        .filter(|r| r.list_id == list.id)
        .map(|r| (r.state.as_str(), r.contacts))
        .collect();
    let ever = |s: &str| reached.get(s).copied().unwrap_or(0);
    let states = STATES
        .iter()
        .map(|s| Count {
            state: s,
            now: now_in(s),
            ever: ever(s),
        })
        .collect();
    let day_names: Vec<String> = (0..days)
        .map(|i| (first + Duration::days(i64::from(i))).to_string())
        .collect();
    let index: BTreeMap<&str, usize> = day_names
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect();
    let of_list: Vec<&DayCount> = daily.iter().filter(|d| d.list_id == list.id).collect();
    let per_day = |kinds: &[&str]| {
        let mut v = vec![0i64; day_names.len()];
        for d in of_list.iter().filter(|d| kinds.contains(&d.kind.as_str())) {
            if let Some(i) = index.get(d.day.as_str()) {
                v[*i] += d.count;
            }
        }
        v
    };
    let total = |kinds: &[&str]| per_day(kinds).iter().sum::<i64>();
    let series: Vec<Series<'_>> = LINES
        .iter()
        .map(|(label, colour, kinds)| Series {
            label,
            colour,
            values: per_day(kinds),
        })
        .collect();
    let mut totals = BTreeMap::new();
    for (label, _, kinds) in LINES {
        totals.insert(label, total(kinds));
    }
    totals.insert("reminders", total(&["reminder_mail_sent"]));
    totals.insert("complaints", total(&["complained"]));
    let mails = total(&MAILS);
    totals.insert("mails", mails);
    let (pending_chart, pending_total) = pending_ages(list, pending, now);
    ListView {
        id: list.id.clone(),
        name: list.name.clone(),
        states,
        asked_rate: percent(ever("pending"), ever("asserted")),
        confirm_rate: percent(ever("confirmed"), ever("pending")),
        bounce_rate: percent(totals["bounces"], mails),
        complaint_rate: percent(totals["complaints"], mails),
        totals,
        chart: chart::daily(
            &format!("{}: per day, last {days} days", list.id),
            &day_names,
            &series,
        ),
        pending_chart,
        pending_total,
        reminder_after: days_text(list.reminder_after.secs()),
        pending_expiry: days_text(list.pending_expiry.secs()),
        paused: None,
    }
}

fn days_text(secs: i64) -> String {
    let days = secs as f64 / 86_400.0;
    if days.fract() == 0.0 {
        format!("{days:.0} d")
    } else {
        format!("{days:.1} d")
    }
}

/// Pending signups by whole days of age (since their current state began), one bar per day
/// up to the expiry window and one for anything older, with the reminder and expiry marked.
fn pending_ages(list: &ListConfig, pending: &[DayCount], now: DateTime<Utc>) -> (String, i64) {
    let expiry_days =
        usize::try_from(((list.pending_expiry.secs().max(0) + 86_399) / 86_400).clamp(1, 60))
            .unwrap_or(60);
    let reminder_day =
        usize::try_from(list.reminder_after.secs().max(0) / 86_400).unwrap_or(usize::MAX);
    let mut buckets: Vec<(String, i64)> = (0..expiry_days)
        .map(|d| (format!("{d}d"), 0))
        .chain(std::iter::once((format!("≥{expiry_days}d"), 0)))
        .collect();
    let today = now.date_naive();
    let mut total = 0;
    for d in pending.iter().filter(|d| d.list_id == list.id) {
        let Ok(day) = d.day.parse::<NaiveDate>() else {
            continue;
        };
        let age = usize::try_from((today - day).num_days().max(0)).unwrap_or(usize::MAX);
        let i = age.min(expiry_days);
        buckets[i].1 += d.count;
        total += d.count;
    }
    let mut markers = vec![(expiry_days, "expiry")];
    if reminder_day < expiry_days {
        markers.insert(0, (reminder_day, "reminder"));
    }
    (
        chart::histogram(
            &format!("{}: pending signups by age in days", list.id),
            &buckets,
            &markers,
        ),
        total,
    )
}
