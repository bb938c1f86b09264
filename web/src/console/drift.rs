//! Drift: the ledger against each campaigns list ([`optinsync_engine::drift`]). Reading a
//! whole list costs vendor calls, so it runs on the operator's `POST`, and the page shows
//! the last result with the time it was computed.

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};

use optinsync_engine::drift::DriftReport;

use super::{Checked, Csrf, Ctx};

/// One computation: the report, or when and why it could not be computed.
type Outcome = Result<DriftReport, (DateTime<Utc>, String)>;

/// The last computation per list.
#[derive(Debug, Default)]
pub struct Cache {
    last: Mutex<BTreeMap<String, Outcome>>,
}

/// Addresses shown per kind of drift; the counts are always complete.
const SHOWN: usize = 200;

pub async fn page(cx: Ctx) -> Response {
    render(&cx)
}

pub async fn compute(cx: Ctx, Checked(_): Checked<Csrf>) -> Response {
    for list in cx.engine.lists() {
        let result = cx.engine.drift(list).await.map_err(|e| {
            tracing::warn!(list = %list.id, error = %e, "console: drift could not be computed");
            (Utc::now(), e.to_string())
        });
        if let Some(r) = result
            .as_ref()
            .ok()
            .filter(|r| !r.unconfirmed_on_list.is_empty())
        {
            tracing::warn!(list = %list.id, unconfirmed = r.unconfirmed_on_list.len(), "console: people on the campaigns list without a confirmation in the ledger");
        }
        if let Ok(mut last) = cx.console.drift.last.lock() {
            last.insert(list.id.clone(), result);
        }
    }
    render(&cx)
}

fn render(cx: &Ctx) -> Response {
    let last = cx
        .console
        .drift
        .last
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let now = Utc::now();
    let lists: Vec<_> = cx
        .engine
        .lists()
        .iter()
        .map(|list| {
            let base = minijinja::context! { id => list.id, name => list.name, campaigns_list => list.campaigns_list() };
            match last.get(&list.id) {
                None => minijinja::context! { computed => false, ..base },
                Some(Err((at, error))) => minijinja::context! {
                    computed => true, at => at.format("%Y-%m-%d %H:%M:%S UTC").to_string(), error => error, ..base
                },
                Some(Ok(r)) => minijinja::context! {
                    computed => true,
                    at => r.computed_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                    members => r.members,
                    unconfirmed_count => r.unconfirmed_on_list.len(),
                    unconfirmed => r.unconfirmed_on_list.iter().take(SHOWN).map(|(a, s)| minijinja::context! { address => a, state => s }).collect::<Vec<_>>(),
                    missing_count => r.confirmed_missing.len(),
                    missing => r.confirmed_missing.iter().take(SHOWN).collect::<Vec<_>>(),
                    removals => r.pending_removals,
                    oldest_removal => r.oldest_removal.map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string()),
                    oldest_removal_age => r.oldest_removal.map(|t| age_text(now - t)),
                    ..base
                },
            }
        })
        .collect();
    cx.render(
        "drift.html",
        "drift",
        StatusCode::OK,
        minijinja::context! { lists => lists, shown => SHOWN },
    )
}

fn age_text(age: chrono::Duration) -> String {
    let mins = age.num_minutes().max(0);
    match mins {
        m if m < 120 => format!("{m} min"),
        m if m < 48 * 60 => format!("{} h", m / 60),
        m => format!("{} d", m / (24 * 60)),
    }
}
