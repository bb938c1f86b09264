//! Drift: the ledger against each campaigns list ([`optinsync_engine::drift`]). Reading a
//! whole list costs vendor calls, so it runs on the operator's `POST`, and the page shows
//! the last result with the time it was computed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, Utc};

use optinsync_engine::drift::DriftReport;
use optinsync_engine::engine::Engine;

use super::{Console, Operator, csrf_refusal};

/// One computation: the report, or when and why it could not be computed.
type Outcome = Result<DriftReport, (DateTime<Utc>, String)>;

/// The last computation per list.
#[derive(Debug, Default)]
pub struct Cache {
    last: Mutex<BTreeMap<String, Outcome>>,
}

/// Addresses shown per kind of drift; the counts are always complete.
const SHOWN: usize = 200;

pub async fn page(
    State(engine): State<Arc<Engine>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(op): Extension<Operator>,
) -> Response {
    render(&engine, &console, &op)
}

pub async fn compute(
    State(engine): State<Arc<Engine>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(op): Extension<Operator>,
    axum::Form(form): axum::Form<super::Csrf>,
) -> Response {
    if let Some(refused) = csrf_refusal(&op, &form.csrf) {
        return refused;
    }
    for list in engine.lists() {
        let result = engine.drift(list).await.map_err(|e| {
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
        if let Ok(mut last) = console.drift.last.lock() {
            last.insert(list.id.clone(), result);
        }
    }
    render(&engine, &console, &op)
}

fn render(engine: &Engine, console: &Console, op: &Operator) -> Response {
    let last = console
        .drift
        .last
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    let now = Utc::now();
    let lists: Vec<_> = engine
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
    console.pages.render(
        "drift.html",
        minijinja::context! { csrf => op.0.csrf.clone(), page => "drift", lists => lists, shown => SHOWN },
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
