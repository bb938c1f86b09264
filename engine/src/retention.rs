//! Retention (`[retention]`; README.md, "Proof, erasure, retention, subject access"): proof of a consent that was
//! withdrawn (or bounced, complained, lapsed after being given) is kept `withdrawn_proof`,
//! signups that were never confirmed `unconfirmed`; after that the contact's personal data is
//! erased exactly like a GDPR erasure ([`Engine::erase_as`], source `retention`): the events
//! stay (and the chain verifies), the evidence goes, and the keyed address hash stays on the
//! suppression list so neither the CRM nor an import can bring the address back into the DOI
//! flow. Each purge is recorded in the ledger by its `erased` events, whose reason names the
//! rule and the period; the last run's summary is kept under the cursor `retention:last_run`.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::consent::{Consent, ConsentState};
use crate::engine::{Engine, EngineResult};

/// Cursor-table key holding the last run (`{"at", ...summary}`), so the daily job runs once a
/// day across restarts and instances.
pub const LAST_RUN: &str = "retention:last_run";

pub use crate::config::RetentionConfig;

/// Which period a contact falls under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    WithdrawnProof,
    Unconfirmed,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WithdrawnProof => "withdrawn_proof",
            Self::Unconfirmed => "unconfirmed",
        }
    }
}

/// Whether a contact with these consents is due for purging at `now`. A contact is judged as
/// a whole: while any list still markets to it (confirmed, revalidating) or its newest change
/// is younger than the period, nothing of it goes.
pub fn due(cfg: &RetentionConfig, consents: &[Consent], now: DateTime<Utc>) -> Option<Category> {
    use ConsentState as S;
    let live: Vec<&Consent> = consents.iter().filter(|c| c.state != S::Erased).collect();
    if live.is_empty() {
        return None;
    }
    if live
        .iter()
        .any(|c| matches!(c.state, S::Confirmed | S::Revalidating | S::None))
    {
        return None;
    }
    let ever_given = live.iter().any(|c| c.confirmed_at.is_some());
    let ended = live
        .iter()
        .any(|c| matches!(c.state, S::Withdrawn | S::Bounced | S::Complained));
    let (category, period) = if ever_given || ended {
        // A proof of consent (or of its refusal) exists: the longer period, and only once
        // every list has ended (a signup still open on another list waits).
        if live
            .iter()
            .any(|c| matches!(c.state, S::Asserted | S::Pending))
        {
            return None;
        }
        (Category::WithdrawnProof, cfg.withdrawn_proof?)
    } else {
        (Category::Unconfirmed, cfg.unconfirmed?)
    };
    let newest = live.iter().map(|c| c.since).max()?;
    (now - newest >= chrono::Duration::seconds(period.secs())).then_some(category)
}

/// One purged (or, on a dry run, purgeable) contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub contact_id: String,
    pub category: Category,
    /// When its consent last changed.
    pub last_change: DateTime<Utc>,
    /// Events whose evidence was removed.
    pub events_redacted: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    pub dry_run: bool,
    pub contacts_checked: u64,
    pub withdrawn_proof: u64,
    pub unconfirmed: u64,
    pub events_redacted: u64,
    pub purged: Vec<Purged>,
}

impl Engine {
    /// Apply `[retention]` now; with `dry_run` only report what would go.
    pub async fn apply_retention(&self, dry_run: bool) -> EngineResult<RetentionReport> {
        let cfg = self.config.config.retention;
        let mut report = RetentionReport {
            dry_run,
            ..RetentionReport::default()
        };
        if !cfg.enabled() {
            return Ok(report);
        }
        let mut after: Option<String> = None;
        loop {
            let page = self.store.contacts_page(after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for contact in &page {
                report.contacts_checked += 1;
                let consents: Vec<Consent> = self
                    .store
                    .consents_of_contact(&contact.id)
                    .await?
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                let now = Utc::now();
                let Some(category) = due(&cfg, &consents, now) else {
                    continue;
                };
                let last_change = consents.iter().map(|c| c.since).max().unwrap_or(now);
                let period = match category {
                    Category::WithdrawnProof => cfg.withdrawn_proof,
                    Category::Unconfirmed => cfg.unconfirmed,
                }
                .map(|d| d.0.as_secs())
                .unwrap_or(0);
                let events_redacted = if dry_run {
                    0
                } else {
                    let reason = format!(
                        "retention: {} period of {period}s ended (last consent change {})",
                        category.as_str(),
                        crate::ledger::format_time(last_change)
                    );
                    let erased = self
                        .erase_data(contact, crate::ledger::EventSource::Retention, &reason)
                        .await?;
                    erased.store.redacted_events
                };
                match category {
                    Category::WithdrawnProof => report.withdrawn_proof += 1,
                    Category::Unconfirmed => report.unconfirmed += 1,
                }
                report.events_redacted += events_redacted;
                report.purged.push(Purged {
                    contact_id: contact.id.clone(),
                    category,
                    last_change,
                    events_redacted,
                });
            }
        }
        if !dry_run {
            if !report.purged.is_empty() {
                self.store.after_erasure().await?;
            }
            let summary = serde_json::json!({
                "at": Utc::now(),
                "contacts_checked": report.contacts_checked,
                "withdrawn_proof": report.withdrawn_proof,
                "unconfirmed": report.unconfirmed,
                "events_redacted": report.events_redacted,
            });
            self.store
                .set_cursor(LAST_RUN, &summary.to_string(), Utc::now())
                .await?;
            tracing::info!(
                checked = report.contacts_checked,
                withdrawn_proof = report.withdrawn_proof,
                unconfirmed = report.unconfirmed,
                events_redacted = report.events_redacted,
                "retention applied"
            );
        }
        Ok(report)
    }

    /// The daemon's periodic job: apply retention if `[retention] every` has passed since the
    /// last run (kept in the store, so restarts and other instances agree).
    pub async fn retention_if_due(&self) -> EngineResult<Option<RetentionReport>> {
        let cfg = self.config.config.retention;
        if !cfg.enabled() {
            return Ok(None);
        }
        let last = self
            .store
            .cursor(LAST_RUN)
            .await?
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["at"].as_str().map(str::to_owned))
            .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc));
        let every = chrono::Duration::seconds(cfg.every.secs());
        if last.is_some_and(|t| Utc::now() - t < every) {
            return Ok(None);
        }
        self.apply_retention(false).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn consent(state: ConsentState, age_secs: i64, confirmed: bool) -> Consent {
        let now = Utc::now();
        Consent {
            state,
            since: now - chrono::Duration::seconds(age_secs),
            confirmed_at: confirmed.then_some(now - chrono::Duration::seconds(age_secs + 10)),
            ..Consent::new(now)
        }
    }

    fn cfg(withdrawn: Option<u64>, unconfirmed: Option<u64>) -> RetentionConfig {
        let d = |s| HumanDuration(std::time::Duration::from_secs(s));
        RetentionConfig {
            withdrawn_proof: withdrawn.map(d),
            unconfirmed: unconfirmed.map(d),
            every: RetentionConfig::default().every,
        }
    }

    #[test]
    fn config_is_strict_and_reads_years() {
        let c: RetentionConfig =
            toml::from_str("withdrawn_proof = \"3y\"\nunconfirmed = \"30d\"").expect("valid");
        assert_eq!(c.withdrawn_proof.map(|d| d.secs()), Some(3 * 365 * 86_400));
        assert_eq!(c.unconfirmed.map(|d| d.secs()), Some(30 * 86_400));
        assert_eq!(c.every.secs(), 86_400, "daily by default");
        assert!(c.enabled());
        assert!(!RetentionConfig::default().enabled());
        let unknown = toml::from_str::<RetentionConfig>("withdrawn = \"3y\"");
        assert!(
            unknown.is_err_and(|e| e.to_string().contains("unknown field `withdrawn`")),
            "unknown keys are refused"
        );
        assert!(toml::from_str::<RetentionConfig>("unconfirmed = \"30 days\"").is_err());
    }

    #[test]
    fn periods_apply_per_category() {
        use ConsentState as S;
        let now = Utc::now();
        let c = cfg(Some(100), Some(10));
        // Unconfirmed signup older than its period goes; a younger one stays.
        assert_eq!(
            due(&c, &[consent(S::Pending, 20, false)], now),
            Some(Category::Unconfirmed)
        );
        assert_eq!(due(&c, &[consent(S::Pending, 5, false)], now), None);
        assert_eq!(
            due(&c, &[consent(S::Lapsed, 20, false)], now),
            Some(Category::Unconfirmed)
        );
        // Withdrawn proof waits for its own (longer) period.
        assert_eq!(due(&c, &[consent(S::Withdrawn, 50, true)], now), None);
        assert_eq!(
            due(&c, &[consent(S::Withdrawn, 150, true)], now),
            Some(Category::WithdrawnProof)
        );
        assert_eq!(
            due(&c, &[consent(S::Lapsed, 150, true)], now),
            Some(Category::WithdrawnProof),
            "lapsed after consent was given keeps its proof for the longer period"
        );
        // Anything still marketed to, or an open signup beside an ended one, keeps the contact.
        assert_eq!(
            due(
                &c,
                &[
                    consent(S::Withdrawn, 150, true),
                    consent(S::Confirmed, 150, true)
                ],
                now
            ),
            None
        );
        assert_eq!(
            due(
                &c,
                &[
                    consent(S::Withdrawn, 150, true),
                    consent(S::Pending, 150, false)
                ],
                now
            ),
            None
        );
        // The newest change counts.
        assert_eq!(
            due(
                &c,
                &[
                    consent(S::Withdrawn, 150, true),
                    consent(S::Bounced, 50, false)
                ],
                now
            ),
            None
        );
        // Nothing configured, nothing recorded, or already erased: nothing due.
        assert_eq!(
            due(&cfg(None, None), &[consent(S::Pending, 1000, false)], now),
            None
        );
        assert_eq!(
            due(
                &cfg(None, Some(10)),
                &[consent(S::Withdrawn, 1000, true)],
                now
            ),
            None
        );
        assert_eq!(due(&c, &[], now), None);
        assert_eq!(due(&c, &[consent(S::Erased, 1000, true)], now), None);
    }
}
