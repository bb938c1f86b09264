//! `campaign report --list ID`: what a list's campaign came to, from its ledger events and
//! the stop rules' counters.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::ListConfig;
use crate::engine::{Engine, EngineResult};
use crate::store::{EventSummary, MailOutcomes};

/// One figure of the report: events, distinct contacts, first and last time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Figure {
    pub events: i64,
    pub contacts: i64,
    pub first: Option<DateTime<Utc>>,
    pub last: Option<DateTime<Utc>>,
}

impl Figure {
    fn add(&mut self, s: &EventSummary) {
        self.events += s.events;
        // Contacts of several groups may overlap; the sum is an upper bound only where a
        // figure spans groups (the report's groups are disjoint by construction).
        self.contacts += s.contacts;
        self.first = Some(self.first.map_or(s.first, |f| f.min(s.first)));
        self.last = Some(self.last.map_or(s.last, |l| l.max(s.last)));
    }
}

/// A list's campaign in figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub list: String,
    /// Taken in as `asserted` (CRM or `import-existing`).
    pub asserted: Figure,
    /// Asked to confirm: DOI mails sent.
    pub doi_mails: Figure,
    pub reminders: Figure,
    /// Re-permission mails sent to confirmed contacts.
    pub revalidation_mails: Figure,
    /// Confirmed (DOI or re-permission answered).
    pub confirmed: Figure,
    /// Did not answer in time.
    pub lapsed: Figure,
    pub unsubscribed: Figure,
    /// Hard bounces (suppressed), soft bounces (recorded), policy refusals (counted).
    pub bounced_hard: Figure,
    pub bounced_soft: Figure,
    pub policy_refusals: i64,
    pub complained: Figure,
    /// Taken off the list for any reason after having been on it or asked.
    pub removed: Figure,
    pub pauses: Figure,
    pub resumes: Figure,
    /// The stop rules' counters over the list's whole life.
    pub outcomes: MailOutcomes,
}

/// Fold a list's event groups into the report's figures.
pub fn report_of(list: &str, groups: &[EventSummary], outcomes: MailOutcomes) -> Report {
    let mut r = Report {
        list: list.to_owned(),
        policy_refusals: outcomes.policy,
        outcomes,
        ..Report::default()
    };
    for g in groups {
        let changed = g.from_state != g.to_state;
        match g.kind.as_str() {
            "doi_mail_sent" => r.doi_mails.add(g),
            "reminder_mail_sent" => r.reminders.add(g),
            "revalidation_mail_sent" => r.revalidation_mails.add(g),
            "wave_paused" => r.pauses.add(g),
            "wave_resumed" => r.resumes.add(g),
            super::SOFT_BOUNCE => r.bounced_soft.add(g),
            _ => {}
        }
        if !changed {
            continue;
        }
        match g.to_state.as_str() {
            "asserted" => r.asserted.add(g),
            "confirmed" => r.confirmed.add(g),
            "lapsed" => r.lapsed.add(g),
            "withdrawn" => r.unsubscribed.add(g),
            "bounced" => r.bounced_hard.add(g),
            "complained" => r.complained.add(g),
            _ => {}
        }
        let was_on_or_asked = matches!(
            g.from_state.as_str(),
            "asserted" | "pending" | "confirmed" | "revalidating"
        );
        let now_off = matches!(
            g.to_state.as_str(),
            "lapsed" | "withdrawn" | "bounced" | "complained" | "erased"
        );
        if was_on_or_asked && now_off {
            r.removed.add(g);
        }
    }
    r
}

impl Engine {
    /// `list`'s campaign report.
    pub async fn campaign_report(&self, list: &ListConfig) -> EngineResult<Report> {
        let groups = self.store.list_event_summary(&list.id).await?;
        let outcomes = self.store.mail_outcomes(&list.id, i64::MIN).await?;
        Ok(report_of(&list.id, &groups, outcomes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(kind: &str, from: &str, to: &str, contacts: i64, day: u32) -> EventSummary {
        let at = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, day, 9, 0, 0)
            .single()
            .expect("time");
        EventSummary {
            kind: kind.into(),
            from_state: from.into(),
            to_state: to.into(),
            events: contacts,
            contacts,
            first: at,
            last: at + chrono::Duration::hours(2),
        }
    }

    #[test]
    fn figures_come_from_the_event_groups() {
        let groups = [
            group("campaigns_imported", "none", "asserted", 100, 1),
            group("doi_requested", "asserted", "pending", 90, 1),
            group("doi_mail_sent", "pending", "pending", 90, 1),
            group("confirmed", "pending", "confirmed", 30, 2),
            group("bounced", "pending", "bounced", 3, 1),
            group("soft_bounce", "pending", "pending", 2, 2),
            group("lapsed", "pending", "lapsed", 57, 15),
            group("wave_paused", "none", "none", 1, 2),
        ];
        let r = report_of(
            "news",
            &groups,
            MailOutcomes {
                sent: 90,
                hard: 3,
                soft: 2,
                policy: 1,
                complaints: 0,
            },
        );
        assert_eq!(r.asserted.contacts, 100);
        assert_eq!(r.doi_mails.contacts, 90);
        assert_eq!(r.confirmed.contacts, 30);
        assert_eq!(r.bounced_hard.contacts, 3);
        assert_eq!(r.bounced_soft.events, 2);
        assert_eq!(r.policy_refusals, 1);
        assert_eq!(r.lapsed.contacts, 57);
        // Removed: the bounced and the lapsed, not the confirmed.
        assert_eq!(r.removed.contacts, 60);
        assert_eq!(r.pauses.events, 1);
        assert_eq!(
            r.lapsed
                .first
                .map(|t| t.date_naive().to_string())
                .as_deref(),
            Some("2026-12-15")
        );
    }
}
