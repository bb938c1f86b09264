//! `campaign plan`: the timing counterpart of `rules simulate`. From the store, the rules in
//! force and the list's sending plan, how many DOI, reminder and re-permission mails go out on
//! each coming day, and how many pending signups lapse and re-permissions end.
//!
//! It plays the days forward in memory: each day the rules decide every contact of the list
//! once (at that day's time), the plan lets through what its caps allow (day 0: what is left
//! of today's), and the state machine carries out the rest. It assumes nobody confirms,
//! unsubscribes or bounces — the most mail and the most lapses the plan can lead to — and,
//! if the list is paused, that the operator resumes it today.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::pacing::{self, PlanClock};
use crate::config::ListConfig;
use crate::consent::{self, Consent, ConsentState, MailKind};
use crate::engine::{Engine, EngineResult};
use crate::rules::input::{self, ListCtx};
use crate::rules::{input_for, simulate::read_page};
use crate::store::WAVE_TOTAL;

/// One coming day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ForecastDay {
    /// 0 is today.
    pub day: u32,
    /// When the plan day starts (UTC).
    pub starts: DateTime<Utc>,
    pub doi: u64,
    pub reminder: u64,
    pub revalidation: u64,
    /// Mails the rules would start that the plan holds for a later day.
    pub held: u64,
    /// Pending signups that lapse (no confirmation in time).
    pub lapsed: u64,
    /// Re-permissions that end without an answer (the contact leaves the list).
    pub revalidations_ended: u64,
}

/// The forecast of one list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub list: String,
    pub contacts: u64,
    /// Set when the list is paused now: the forecast assumes a resume today.
    pub paused: Option<String>,
    /// Which kinds of mail the plan paces, with each one's cap today.
    pub paced: Vec<(String, u32)>,
    pub days: Vec<ForecastDay>,
    pub assumes: &'static str,
}

/// The most days a forecast covers.
pub const MAX_DAYS: u32 = 366;

/// One (contact, list) pair as the forecast plays it.
struct Pair {
    contact: rhai::Map,
    address: String,
    consent: Consent,
    engagement: Option<DateTime<Utc>>,
    suppressed: bool,
}

/// What a plan lets through on one day, per kind.
#[derive(Default)]
struct DayBudget {
    left: HashMap<MailKind, (i64, HashMap<String, i64>)>,
}

impl Engine {
    /// `list`'s forecast over `days` days (at most [`MAX_DAYS`]); `progress` gets the
    /// contacts read so far.
    pub async fn forecast(
        &self,
        list: &ListConfig,
        days: u32,
        mut progress: impl FnMut(u64),
    ) -> EngineResult<Forecast> {
        let now = Utc::now();
        let days = days.clamp(1, MAX_DAYS);
        let mut pairs = Vec::new();
        let mut after: Option<String> = None;
        while let Some(page) =
            read_page(self.store.as_ref(), &self.tokens, after.as_deref()).await?
        {
            after = page.contacts.last().map(|c| c.id.clone());
            for (contact, suppressed) in page.contacts.iter().zip(&page.suppressed) {
                let key = (contact.id.clone(), list.id.clone());
                let consent = page
                    .consents
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| Consent::new(now));
                if consent.state == ConsentState::Erased || contact.erased {
                    continue;
                }
                pairs.push(Pair {
                    contact: input::contact_map(contact),
                    address: contact.email.clone(),
                    consent,
                    engagement: page.engagement.get(&key).copied(),
                    suppressed: *suppressed,
                });
            }
            progress(pairs.len() as u64);
        }
        let clock = PlanClock::of(&list.sending);
        let today = clock.day(now);
        let counts = self.store.wave_counts(&list.id, today).await?;
        let firsts = self.store.wave_first_days(&list.id).await?;
        let kinds = [MailKind::Doi, MailKind::Reminder, MailKind::Revalidation];
        let first_day = |kind: MailKind| {
            firsts
                .iter()
                .find(|(k, _)| k == kind.as_str())
                .map_or(today, |(_, d)| *d)
        };
        let paced: Vec<(String, u32)> = kinds
            .iter()
            .filter_map(|k| {
                list.sending.plan(*k).map(|p| {
                    (
                        k.as_str().to_owned(),
                        pacing::day_cap(p, today - first_day(*k)),
                    )
                })
            })
            .collect();
        let rules = self.rules();
        let ctx = ListCtx::new(list);
        let (limits, _) = crate::plan::limits_and_context(list, false, false);
        let mut out = Vec::new();
        for d in 0..days {
            let day = today + i64::from(d);
            let at = now + clock.day_length() * i32::try_from(d).unwrap_or(i32::MAX);
            // Each kind's whole cap for the day; today's less what already went.
            let mut budget = DayBudget::default();
            for kind in kinds {
                let Some(plan) = list.sending.plan(kind) else {
                    continue;
                };
                let cap = i64::from(pacing::day_cap(plan, day - first_day(kind)));
                let used = |bucket: &str| {
                    if d > 0 {
                        return 0;
                    }
                    counts
                        .iter()
                        .find(|c| c.mail_kind == kind.as_str() && c.bucket == bucket)
                        .map_or(0, |c| c.admitted)
                };
                let buckets = plan
                    .domains
                    .iter()
                    .map(|(b, cap)| (b.clone(), i64::from(*cap) - used(b)))
                    .collect();
                budget.left.insert(kind, (cap - used(WAVE_TOTAL), buckets));
            }
            let mut row = ForecastDay {
                day: d,
                starts: clock.day_start(day),
                ..ForecastDay::default()
            };
            let ctx_map = ctx.at(at);
            for pair in &mut pairs {
                let proposals = match rules.decide_owned(
                    pair.contact.clone(),
                    input::consent_map(&pair.consent, pair.engagement, at),
                    ctx_map.clone(),
                ) {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                let cx = consent::Context {
                    suppressed: pair.suppressed,
                    campaigns_doi: list.doi == crate::config::DoiMode::Campaigns,
                    erasure_only: false,
                };
                for p in proposals {
                    let Some(input) = input_for(p.action) else {
                        continue;
                    };
                    let kind = super::mail_kind_of(&input);
                    let mut bucket_of = None;
                    if let Some(kind) = kind
                        && let Some(plan) = list.sending.plan(kind)
                        && let Some((left, buckets)) = budget.left.get(&kind)
                    {
                        let bucket = pacing::domain_bucket(plan, &pair.address);
                        let bucket_left = bucket
                            .as_ref()
                            .map(|b| buckets.get(b).copied().unwrap_or(0));
                        if *left <= 0 || bucket_left.is_some_and(|l| l <= 0) {
                            row.held += 1;
                            continue;
                        }
                        bucket_of = Some((kind, bucket));
                    }
                    let Ok(Some(t)) = consent::transition(&pair.consent, &input, limits, cx, at)
                    else {
                        continue;
                    };
                    if let Some((kind, bucket)) = bucket_of
                        && let Some((left, buckets)) = budget.left.get_mut(&kind)
                    {
                        *left -= 1;
                        if let Some(l) = bucket.and_then(|b| buckets.get_mut(&b)) {
                            *l -= 1;
                        }
                    }
                    match kind {
                        Some(MailKind::Doi) => row.doi += 1,
                        Some(MailKind::Reminder) => row.reminder += 1,
                        Some(MailKind::Revalidation) => row.revalidation += 1,
                        None => {}
                    }
                    if t.to == ConsentState::Lapsed {
                        if t.from == ConsentState::Revalidating {
                            row.revalidations_ended += 1;
                        } else {
                            row.lapsed += 1;
                        }
                    }
                    pair.consent = t.next;
                }
            }
            out.push(row);
        }
        let paused = self.wave_state(&list.id).await?.paused.map(|p| {
            format!(
                "paused since {} ({}); the forecast assumes `campaign resume` today",
                p.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                p.reason
            )
        });
        Ok(Forecast {
            list: list.id.clone(),
            contacts: pairs.len() as u64,
            paused,
            paced,
            days: out,
            assumes: "nobody confirms, unsubscribes or bounces: the most mail and the most lapses the plan can lead to",
        })
    }
}
