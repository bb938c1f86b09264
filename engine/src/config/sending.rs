//! `[lists.sending]`: a list's sending plan (daily caps, warm-up, per-domain caps, sending
//! hours per kind of mail), its stop rules and its soft-bounce threshold. Read by
//! [`crate::waves`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::HumanDuration;
use crate::consent::MailKind;

/// A list's sending plan. Without a plan for a kind of mail, that kind is not paced; the stop
/// rules and the soft-bounce threshold apply to every list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendingConfig {
    /// UTC hours in which paced mail goes out, `"08:00-20:00"`; each day's cap is spread
    /// evenly over them. Default: the whole day.
    #[serde(default)]
    pub hours: Option<SendingHours>,
    /// The length of a plan's "day". Leave it at `1d`: shorter days exist for drills and
    /// tests that run a multi-day campaign in minutes (hours, windows and the warm-up are
    /// all measured in these days).
    #[serde(default = "one_day")]
    pub day_length: HumanDuration,
    /// The most paced mails of this list waiting in the outbox: beyond it the plan starts
    /// no more until the relay has taken some, so a contact's timers (reminder, expiry) do
    /// not run while its mail still waits behind a slow relay.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
    /// DOI mails the rules send (`send_doi`: CRM-asserted and imported contacts). A person's
    /// own signup is never paced.
    #[serde(default)]
    pub doi: Option<KindPlan>,
    #[serde(default)]
    pub reminder: Option<KindPlan>,
    /// Re-permission mails (`send_revalidation`).
    #[serde(default)]
    pub revalidation: Option<KindPlan>,
    #[serde(default)]
    pub stop: StopRules,
    #[serde(default)]
    pub soft_bounces: SoftBounces,
}

impl Default for SendingConfig {
    fn default() -> Self {
        Self {
            hours: None,
            day_length: one_day(),
            max_queued: default_max_queued(),
            doi: None,
            reminder: None,
            revalidation: None,
            stop: StopRules::default(),
            soft_bounces: SoftBounces::default(),
        }
    }
}

impl SendingConfig {
    /// The plan for one kind of mail, if that kind is paced.
    pub fn plan(&self, kind: MailKind) -> Option<&KindPlan> {
        match kind {
            MailKind::Doi => self.doi.as_ref(),
            MailKind::Reminder => self.reminder.as_ref(),
            MailKind::Revalidation => self.revalidation.as_ref(),
        }
    }

    /// The plan's day, at least a second.
    pub fn day(&self) -> Duration {
        self.day_length.0.max(Duration::from_secs(1))
    }
}

fn default_max_queued() -> u32 {
    1000
}

fn one_day() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}

/// How many mails of one kind may go out a day.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindPlan {
    /// The most a day, once warmed up.
    pub daily_cap: u32,
    /// The first day's cap of a warm-up ramp (e.g. 500); none: the full cap from day one.
    #[serde(default)]
    pub warmup_start: Option<u32>,
    /// Each day's cap is the day before's times this (default 1.5), up to `daily_cap`.
    #[serde(default = "default_factor")]
    pub warmup_factor: f64,
    /// The most a day per recipient domain: keys are a domain (`"gmail.com"`: also Google's
    /// other domains; `"outlook.com"`: also hotmail, live and msn; `"yahoo.com"`: also
    /// Yahoo's other domains and AOL) or `"default"` for every other domain.
    #[serde(default)]
    pub domains: BTreeMap<String, u32>,
}

fn default_factor() -> f64 {
    1.5
}

/// When a list's paced mail stops by itself (until the operator resumes it).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRules {
    /// The rolling window the rates are taken over, in hours of the plan's day at the
    /// finest (`"1d"`; shorten it with a shortened `day_length`).
    #[serde(default = "one_day")]
    pub window: HumanDuration,
    /// Rates are judged once this many mails went out in the window.
    #[serde(default = "default_min_sent")]
    pub min_sent: u32,
    /// Hard bounces per mail sent (0.02 = 2 %).
    #[serde(default = "default_hard")]
    pub hard_bounce_rate: f64,
    /// Complaints per mail sent (0.001 = 0.1 %).
    #[serde(default = "default_complaint")]
    pub complaint_rate: f64,
    /// Policy refusals (spam block, reputation) in the window; any rate is too many.
    #[serde(default = "default_policy")]
    pub policy_refusals: u32,
}

impl Default for StopRules {
    fn default() -> Self {
        Self {
            window: one_day(),
            min_sent: default_min_sent(),
            hard_bounce_rate: default_hard(),
            complaint_rate: default_complaint(),
            policy_refusals: default_policy(),
        }
    }
}

fn default_min_sent() -> u32 {
    100
}
fn default_hard() -> f64 {
    0.02
}
fn default_complaint() -> f64 {
    0.001
}
fn default_policy() -> u32 {
    3
}

/// Soft bounces (a full mailbox) suppress only when they repeat: `limit` within `window`
/// (as Mailman's bounce score).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftBounces {
    #[serde(default = "default_soft_limit")]
    pub limit: u32,
    #[serde(default = "default_soft_window")]
    pub window: HumanDuration,
}

impl Default for SoftBounces {
    fn default() -> Self {
        Self {
            limit: default_soft_limit(),
            window: default_soft_window(),
        }
    }
}

fn default_soft_limit() -> u32 {
    3
}
fn default_soft_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 86_400))
}

/// `"HH:MM-HH:MM"` in UTC, start before end, as fractions of the plan's day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SendingHours {
    /// Minutes after midnight.
    pub start: u32,
    pub end: u32,
}

impl SendingHours {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not sending hours like \"08:00-20:00\" (UTC)");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        };
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start >= end {
            return Err(format!(
                "`{s}`: the start must come before the end (UTC, same day)"
            ));
        }
        Ok(Self { start, end })
    }
}

impl<'de> Deserialize<'de> for SendingHours {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SendingHours::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The first setting of a list's `sending` table that cannot work: `(key under
/// lists[i].sending, message)`.
pub(super) fn check(s: &SendingConfig) -> Result<(), (String, String)> {
    if s.day_length.0 < Duration::from_secs(1) {
        return Err(("day_length".into(), "must be at least 1s".into()));
    }
    if s.max_queued == 0 {
        return Err(("max_queued".into(), "must be at least 1".into()));
    }
    for (name, plan) in [
        ("doi", &s.doi),
        ("reminder", &s.reminder),
        ("revalidation", &s.revalidation),
    ] {
        let Some(plan) = plan else { continue };
        if plan.daily_cap == 0 {
            return Err((
                format!("{name}.daily_cap"),
                "must be at least 1 (leave the plan out to send without a cap)".into(),
            ));
        }
        if plan.warmup_start == Some(0) {
            return Err((format!("{name}.warmup_start"), "must be at least 1".into()));
        }
        if !(plan.warmup_factor.is_finite() && (1.0..=10.0).contains(&plan.warmup_factor)) {
            return Err((
                format!("{name}.warmup_factor"),
                "must be between 1.0 and 10.0".into(),
            ));
        }
        for (domain, cap) in &plan.domains {
            if *cap == 0 {
                return Err((
                    format!("{name}.domains.{domain}"),
                    "must be at least 1".into(),
                ));
            }
            if domain != "default" && (!domain.contains('.') || domain != &domain.to_lowercase()) {
                return Err((
                    format!("{name}.domains.{domain}"),
                    "must be a lower-case domain such as \"gmail.com\", or \"default\"".into(),
                ));
            }
        }
    }
    let stop = &s.stop;
    for (key, rate) in [
        ("stop.hard_bounce_rate", stop.hard_bounce_rate),
        ("stop.complaint_rate", stop.complaint_rate),
    ] {
        if !(rate.is_finite() && rate > 0.0 && rate <= 1.0) {
            return Err((
                key.into(),
                "must be a share above 0 and at most 1 (0.02 = 2 %)".into(),
            ));
        }
    }
    if stop.policy_refusals == 0 {
        return Err(("stop.policy_refusals".into(), "must be at least 1".into()));
    }
    if stop.window.0 < s.day() / 24 {
        return Err((
            "stop.window".into(),
            "must be at least an hour of the plan's day".into(),
        ));
    }
    if s.soft_bounces.limit == 0 {
        return Err(("soft_bounces.limit".into(), "must be at least 1".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sending_hours_parse_and_refuse() {
        assert_eq!(
            SendingHours::parse("08:00-20:30"),
            Ok(SendingHours {
                start: 480,
                end: 1230
            })
        );
        assert!(SendingHours::parse("00:00-24:00").is_ok());
        for bad in [
            "20:00-08:00",
            "8-20",
            "08:00",
            "25:00-26:00",
            "08:61-09:00",
            "09:00-09:00",
        ] {
            assert!(SendingHours::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plan_is_read_strictly_and_checked() {
        let s: SendingConfig = toml::from_str(
            r#"
            hours = "08:00-20:00"
            [doi]
            daily_cap = 5000
            warmup_start = 500
            domains = { "gmail.com" = 1000, default = 2000 }
            [stop]
            hard_bounce_rate = 0.05
            "#,
        )
        .expect("parses");
        assert_eq!(s.doi.as_ref().map(|p| p.warmup_factor), Some(1.5));
        assert_eq!(s.stop.complaint_rate, 0.001);
        assert_eq!(check(&s), Ok(()));
        assert!(toml::from_str::<SendingConfig>("[doi]\ndaily_cap = 1\nwarmup = 2").is_err());
        let bad: SendingConfig =
            toml::from_str("[doi]\ndaily_cap = 10\ndomains = { \"Gmail\" = 1 }").expect("parses");
        assert_eq!(
            check(&bad).map_err(|e| e.0),
            Err("doi.domains.Gmail".to_owned())
        );
        let bad: SendingConfig = toml::from_str("[stop]\nhard_bounce_rate = 2.0").expect("parses");
        assert_eq!(
            check(&bad).map_err(|e| e.0),
            Err("stop.hard_bounce_rate".to_owned())
        );
    }
}
