//! The maps a rule script receives. Built here, in one place, for the daemon, the table tests
//! and the simulator alike, so a test sees exactly what production sees.

use chrono::{DateTime, Utc};
use rhai::{Dynamic, Map};

use crate::config::ListConfig;
use crate::consent::Consent;
use crate::store::Contact;

fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn secs_since(now: DateTime<Utc>, t: DateTime<Utc>) -> i64 {
    (now - t).num_seconds().max(0)
}

fn opt(v: Option<i64>) -> Dynamic {
    v.map(Dynamic::from).unwrap_or(Dynamic::UNIT)
}

/// `contact`: no raw address (rules may print), only its domain.
pub fn contact_map(c: &Contact) -> Map {
    let mut m = Map::new();
    m.insert("id".into(), c.id.clone().into());
    m.insert(
        "language".into(),
        c.language
            .clone()
            .map(Dynamic::from)
            .unwrap_or(Dynamic::UNIT),
    );
    let domain = c
        .email
        .rsplit_once('@')
        .map(|(_, d)| d.to_owned())
        .unwrap_or_default();
    m.insert("email_domain".into(), domain.into());
    m.insert(
        "fields".into(),
        rhai::serde::to_dynamic(&c.fields).unwrap_or(Dynamic::UNIT),
    );
    m.insert(
        "crm_records".into(),
        c.crm_records
            .iter()
            .cloned()
            .map(Dynamic::from)
            .collect::<rhai::Array>()
            .into(),
    );
    m
}

/// `consent`: the state, its age, counters, and the signs of life the inactivity rule needs.
/// Ages are seconds; a missing time is `()`.
pub fn consent_map(c: &Consent, last_engagement: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Map {
    let mut m = Map::new();
    m.insert("state".into(), c.state.as_str().into());
    m.insert("since".into(), unix(c.since).into());
    m.insert("age".into(), secs_since(now, c.since).into());
    m.insert("doi_mails".into(), i64::from(c.doi_mails).into());
    m.insert("reminders_sent".into(), i64::from(c.reminders_sent).into());
    m.insert("confirmed_at".into(), opt(c.confirmed_at.map(unix)));
    m.insert(
        "confirmed_age".into(),
        opt(c.confirmed_at.map(|t| secs_since(now, t))),
    );
    m.insert("last_engagement".into(), opt(last_engagement.map(unix)));
    m.insert(
        "engagement_age".into(),
        opt(last_engagement.map(|t| secs_since(now, t))),
    );
    // Seconds since the latest sign of life: a confirmation or an open/click.
    let latest = match (c.confirmed_at, last_engagement) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    m.insert(
        "inactive_for".into(),
        opt(latest.map(|t| secs_since(now, t))),
    );
    m
}

/// `ctx`: the clock and the list's settings (durations in seconds).
pub fn ctx_map(list: &ListConfig, now: DateTime<Utc>) -> Map {
    let mut l = Map::new();
    l.insert("id".into(), list.id.clone().into());
    l.insert("name".into(), list.name.clone().into());
    l.insert("reminder_after".into(), list.reminder_after.secs().into());
    l.insert("pending_expiry".into(), list.pending_expiry.secs().into());
    l.insert("max_reminders".into(), i64::from(list.max_reminders).into());
    l.insert("inactivity".into(), list.inactivity.secs().into());
    l.insert(
        "revalidation_grace".into(),
        list.revalidation_grace.secs().into(),
    );
    let mut m = Map::new();
    m.insert("now".into(), unix(now).into());
    m.insert("list".into(), l.into());
    m
}
