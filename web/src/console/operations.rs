//! Operations: outbox depth by kind, dead letters with retry and drop (a removal only after
//! the confirmation `outbox drop --force` stands for), circuits, job leases, the rule set in
//! force with the last reload, and the ledger verification with a button to run it.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;

use optinsync_engine::operator::{self, DropOutcome};

use super::{Checked, Csrf, Ctx, csrf_forms};

#[derive(Debug, serde::Deserialize)]
pub struct LetterForm {
    csrf: String,
    id: i64,
    /// `yes` once the operator confirmed dropping a removal.
    #[serde(default)]
    force: Option<String>,
}

csrf_forms!(LetterForm);

pub async fn page(cx: Ctx) -> Response {
    render(&cx, StatusCode::OK, minijinja::context! {}).await
}

async fn render(cx: &Ctx, status: StatusCode, extra: minijinja::Value) -> Response {
    let engine = &cx.engine;
    let reads = engine.reads();
    let read = async {
        Ok::<_, optinsync_engine::store::StoreError>((
            reads.outbox_depth().await?,
            reads.outbox_dead().await?,
            reads.leases().await?,
            reads.quota_overview(Utc::now().timestamp_millis()).await?,
            operator::last_verification(engine.reads()).await?,
        ))
    };
    let (depth, dead, leases, quota, verification) = match read.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "console: reading operations failed");
            return cx.unavailable("Reading the store");
        }
    };
    // Depth by kind over all lists: pending and dead side by side.
    let mut by_kind: BTreeMap<&str, (i64, i64, Option<String>)> = BTreeMap::new();
    for d in &depth {
        let row = by_kind.entry(d.kind.as_str()).or_default();
        match d.status.as_str() {
            "pending" => row.0 += d.count,
            _ => row.1 += d.count,
        }
        let oldest = d.oldest.format("%Y-%m-%d %H:%M UTC").to_string();
        row.2 = Some(row.2.take().map_or(oldest.clone(), |o| o.min(oldest)));
    }
    let outbox: Vec<_> = by_kind
        .iter()
        .map(|(kind, (pending, dead, oldest))| {
            minijinja::context! { kind => kind, pending => pending, dead => dead, oldest => oldest }
        })
        .collect();
    let dead: Vec<_> = dead
        .iter()
        .map(|d| {
            minijinja::context! {
                id => d.id, kind => d.kind(), list => d.list_id, attempts => d.attempts,
                error => d.last_error, removal => operator::drop_needs_force(d.kind()),
            }
        })
        .collect();
    let now = Utc::now();
    let leases: Vec<_> = leases
        .iter()
        .map(|l| {
            minijinja::context! {
                name => l.name, holder => l.holder,
                until => l.until.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                live => l.until > now,
            }
        })
        .collect();
    let quota: Vec<_> = quota
        .iter()
        .map(|q| {
            minijinja::context! {
                key => q.key,
                windows => q.windows.iter().map(|(len, used)| format!("{used} in {}", window_text(*len))).collect::<Vec<_>>().join(", "),
                locked_until => q.locked_until.and_then(chrono::DateTime::from_timestamp_millis).map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
            }
        })
        .collect();
    let rules = engine.rules();
    let files: Vec<_> = rules
        .scripts()
        .into_iter()
        .chain(rules.helpers().iter().cloned())
        .map(|(path, hash)| {
            minijinja::context! {
                file => path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                hash => hash,
            }
        })
        .collect();
    let circuits: Vec<_> = engine
        .circuits()
        .report()
        .into_iter()
        .map(|c| {
            minijinja::context! {
                connector => c.connector, state => c.state.as_str(),
                failures => c.consecutive_failures, retry_in_secs => c.retry_in_secs,
            }
        })
        .collect();
    cx.render(
        "operations.html",
        "operations",
        status,
        minijinja::context! {
            outbox => outbox, dead => dead, leases => leases, circuits => circuits, quota => quota,
            rules => minijinja::context! {
                dir => rules.dir().display().to_string(), hash => rules.hash(), files => files,
                tests => rules.tests().len(),
            },
            last_reload => engine.last_reload().map(|r| minijinja::context! {
                at => r.at.format("%Y-%m-%d %H:%M:%S UTC").to_string(), result => r.result, error => r.error,
            }),
            verification => verification.map(|v| minijinja::context! {
                at => v.at.format("%Y-%m-%d %H:%M:%S UTC").to_string(), verified => v.verified,
                events => v.events_checked, head_seq => v.head_seq, head_hash => v.head_hash, error => v.error,
            }),
            ..extra
        },
    )
}

pub async fn verify(cx: Ctx, Checked(_): Checked<Csrf>) -> Response {
    match cx.engine.verify_ledger().await {
        Ok(v) => {
            if !v.verified {
                tracing::error!(error = ?v.error, "console: ledger verification FAILED");
            }
            render(&cx, StatusCode::OK, minijinja::context! {
                notice => if v.verified { "Ledger verified just now." } else { "Ledger verification FAILED just now." },
            })
            .await
        }
        Err(e) => {
            tracing::error!(error = %e, "console: ledger verification could not read the store");
            cx.unavailable("Reading the ledger")
        }
    }
}

pub async fn retry(cx: Ctx, Checked(form): Checked<LetterForm>) -> Response {
    let (status, notice) = match cx.engine.retry_dead_letter(form.id).await {
        Ok(true) => (
            StatusCode::OK,
            format!("Dead letter {} queued again.", form.id),
        ),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            format!(
                "{} is not a dead letter (unknown, or already handled).",
                form.id
            ),
        ),
        Err(e) => {
            tracing::error!(error = %e, "console: retrying a dead letter failed");
            return cx.unavailable("Queueing the dead letter");
        }
    };
    render(&cx, status, minijinja::context! { notice => notice }).await
}

pub async fn drop_letter(cx: Ctx, Checked(form): Checked<LetterForm>) -> Response {
    let force = form.force.as_deref() == Some("yes");
    let (status, ctx) = match cx.engine.drop_dead_letter(form.id, force).await {
        Ok(DropOutcome::Dropped) => (
            StatusCode::OK,
            minijinja::context! { notice => format!("Dead letter {} dropped.", form.id) },
        ),
        // The same refusal as `outbox drop` without `--force`: ask before leaving a withdrawn
        // address on the marketing list.
        Ok(DropOutcome::RemovalNeedsForce) => (
            StatusCode::OK,
            minijinja::context! { confirm_drop => form.id },
        ),
        Ok(DropOutcome::NotDead) => (
            StatusCode::NOT_FOUND,
            minijinja::context! { notice => format!("{} is not a dead letter (unknown, or already handled).", form.id) },
        ),
        Err(e) => {
            tracing::error!(error = %e, "console: dropping a dead letter failed");
            return cx.unavailable("Dropping the dead letter");
        }
    };
    render(&cx, status, ctx).await
}

/// A quota window's length for people: `1 min`, `1 h`, `1 d`, or seconds.
fn window_text(length_ms: i64) -> String {
    let secs = length_ms / 1000;
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s > 0 && s % 3_600 == 0 => format!("{} h", s / 3_600),
        s if s > 0 && s % 60 == 0 => format!("{} min", s / 60),
        s if s > 0 => format!("{s} s"),
        _ => format!("{length_ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::window_text;

    #[test]
    fn window_lengths_read_as_people_say_them() {
        assert_eq!(window_text(60_000), "1 min");
        assert_eq!(window_text(3_600_000), "1 h");
        assert_eq!(window_text(86_400_000), "1 d");
        assert_eq!(window_text(90_000), "90 s");
        assert_eq!(window_text(600), "600 ms");
    }
}
