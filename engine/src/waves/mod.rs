//! Re-permission in waves: the sending plans that pace the mail the rules start, the stop
//! rules that pause a list's waves when bounces, complaints or policy refusals climb, and
//! the operator's resume.
//!
//! Pacing happens where the rules decide ([`crate::bulk`]): a `send_doi`, `send_reminder` or
//! `send_revalidation` beyond what the plan allows by now is not carried out, so the contact
//! waits, in contact order, for a later pass, and its timers (reminder, expiry, grace) start
//! only when its mail is let through. The count of let-through mails is written in the same
//! transaction as the consent change ([`crate::store::Commit::paced`]), so a cap holds across
//! crashes and instances. A pause holds the rules' mail twice: no new mail is started, and
//! mail already queued (rows marked `wave`) is postponed at delivery. Mail the person asked
//! for (a website signup, a resend from an expired link) is never paced nor held.
//!
//! The stop rules read per-slot outcome counters (`mail_outcomes`: sent, hard, soft, policy,
//! complaints), which the outbox and the campaigns status feed add to.

pub mod forecast;
pub mod pacing;
pub mod report;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::{ListConfig, StopRules};
use crate::consent::{ConsentState, Input, MailKind};
use crate::engine::{Engine, EngineError, EngineResult};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::outcomes::Outcome;
use crate::store::{MailOutcomes, PacedSend, WAVE_TOTAL};
use pacing::PlanClock;

/// The contact id of a list's own ledger events (`wave_paused`, `wave_resumed`): no contact.
pub const LIST_EVENT_CONTACT: &str = "";

/// The cursor that keeps a list's wave state.
fn state_key(list: &str) -> String {
    format!("wave:{list}")
}

/// A list's waves as stored: paused or not, and the last resume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaveState {
    pub paused: Option<Pause>,
    pub resumed: Option<Resume>,
}

/// A pause the stop rules recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pause {
    pub at: DateTime<Utc>,
    /// Which rule fired, in words with the figures.
    pub reason: String,
    /// The figures over the window it judged.
    pub figures: MailOutcomes,
    /// Where that window began.
    pub window_from: DateTime<Utc>,
    /// The ledger event that records it.
    pub event_seq: i64,
}

/// The operator's last resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub at: DateTime<Utc>,
    pub event_seq: i64,
}

/// What a gate says about one mail the rules propose.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Gate {
    /// No plan for this kind and the list is not paused.
    Free,
    /// The plan lets it through; count it.
    Paced(PacedSend),
    /// Not now: over today's cap (or its share by now), outside the sending hours, or paused.
    Held,
}

/// The budgets of one rules batch, read from the store when the batch loads.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    lists: HashMap<String, ListGate>,
}

#[derive(Debug)]
struct ListGate {
    paused: bool,
    day: i64,
    open: bool,
    /// Paced mails that may still be queued before the relay takes some (`max_queued`).
    queue_left: i64,
    /// Per paced kind: what is left by now, in total and per domain bucket.
    kinds: Vec<(MailKind, KindGate)>,
}

#[derive(Debug)]
struct KindGate {
    plan: crate::config::KindPlan,
    left: i64,
    buckets: HashMap<String, i64>,
}

impl Pacer {
    /// The budgets of `lists` at `now`.
    pub(crate) async fn load(
        engine: &Engine,
        lists: &[ListConfig],
        now: DateTime<Utc>,
    ) -> EngineResult<Pacer> {
        let mut pacer = Pacer::default();
        let mut depth: Option<Vec<crate::store::OutboxDepth>> = None;
        for list in lists {
            let paused = engine.wave_paused(&list.id).await?;
            let plans: Vec<(MailKind, &crate::config::KindPlan)> =
                [MailKind::Doi, MailKind::Reminder, MailKind::Revalidation]
                    .into_iter()
                    .filter_map(|k| list.sending.plan(k).map(|p| (k, p)))
                    .collect();
            if !paused && plans.is_empty() {
                continue;
            }
            let clock = PlanClock::of(&list.sending);
            let day = clock.day(now);
            let queued = if plans.is_empty() {
                0
            } else {
                if depth.is_none() {
                    depth = Some(engine.store.outbox_depth().await?);
                }
                depth
                    .iter()
                    .flatten()
                    .filter(|d| d.list_id == list.id && d.kind == "mail" && d.status == "pending")
                    .map(|d| d.count)
                    .sum()
            };
            let counts = if plans.is_empty() {
                Vec::new()
            } else {
                engine.store.wave_counts(&list.id, day).await?
            };
            let firsts = if plans.is_empty() {
                Vec::new()
            } else {
                engine.store.wave_first_days(&list.id).await?
            };
            let progress = clock.progress(now);
            let kinds = plans
                .into_iter()
                .map(|(kind, plan)| {
                    let admitted = |bucket: &str| {
                        counts
                            .iter()
                            .find(|c| c.mail_kind == kind.as_str() && c.bucket == bucket)
                            .map_or(0, |c| c.admitted)
                    };
                    let first = firsts
                        .iter()
                        .find(|(k, _)| k == kind.as_str())
                        .map_or(day, |(_, d)| *d);
                    let cap = pacing::day_cap(plan, day - first);
                    let buckets = plan
                        .domains
                        .iter()
                        .map(|(b, cap)| (b.clone(), pacing::allowed(*cap, progress) - admitted(b)))
                        .collect();
                    let gate = KindGate {
                        plan: plan.clone(),
                        left: pacing::allowed(cap, progress) - admitted(WAVE_TOTAL),
                        buckets,
                    };
                    (kind, gate)
                })
                .collect();
            pacer.lists.insert(
                list.id.clone(),
                ListGate {
                    paused,
                    day,
                    open: clock.in_hours(now),
                    queue_left: i64::from(list.sending.max_queued) - queued,
                    kinds,
                },
            );
        }
        Ok(pacer)
    }

    /// Whether a list has a sending plan: then what is left of its budgets depends on what
    /// earlier batches committed (a pause alone does not).
    pub(crate) fn has_budgets(&self) -> bool {
        self.lists.values().any(|g| !g.kinds.is_empty())
    }

    /// May the rules start a `kind` mail to `address` on `list` now?
    pub(crate) fn check(&self, list: &str, kind: MailKind, address: &str) -> Gate {
        let Some(gate) = self.lists.get(list) else {
            return Gate::Free;
        };
        if gate.paused {
            return Gate::Held;
        }
        let Some((_, k)) = gate.kinds.iter().find(|(m, _)| *m == kind) else {
            return Gate::Free;
        };
        if !gate.open || k.left <= 0 || gate.queue_left <= 0 {
            return Gate::Held;
        }
        let bucket = pacing::domain_bucket(&k.plan, address);
        if let Some(b) = &bucket
            && k.buckets.get(b).is_none_or(|left| *left <= 0)
        {
            return Gate::Held;
        }
        Gate::Paced(PacedSend {
            mail_kind: kind,
            day: gate.day,
            bucket,
        })
    }

    /// Count a mail [`Pacer::check`] let through and the rules started.
    pub(crate) fn take(&mut self, list: &str, paced: &PacedSend) {
        let Some(gate) = self.lists.get_mut(list) else {
            return;
        };
        gate.queue_left -= 1;
        if let Some((_, k)) = gate.kinds.iter_mut().find(|(m, _)| *m == paced.mail_kind) {
            k.left -= 1;
            if let Some(left) = paced.bucket.as_ref().and_then(|b| k.buckets.get_mut(b)) {
                *left -= 1;
            }
        }
    }
}

/// The mail kind of a rules input that starts a mail.
pub(crate) fn mail_kind_of(input: &Input) -> Option<MailKind> {
    match input {
        Input::SendDoi { .. } => Some(MailKind::Doi),
        Input::SendReminder => Some(MailKind::Reminder),
        Input::SendRevalidation { .. } => Some(MailKind::Revalidation),
        _ => None,
    }
}

/// Which stop rule `o` trips, in words, if any.
pub fn tripped(rules: &StopRules, o: &MailOutcomes) -> Option<String> {
    let pct = |n: i64| 100.0 * n as f64 / o.sent.max(1) as f64;
    if o.policy >= i64::from(rules.policy_refusals) {
        return Some(format!(
            "{} policy refusals (spam block or reputation) reached the limit of {}",
            o.policy, rules.policy_refusals
        ));
    }
    if o.sent < i64::from(rules.min_sent) {
        return None;
    }
    if o.hard as f64 >= rules.hard_bounce_rate * o.sent as f64 {
        return Some(format!(
            "hard bounces {:.2} % ({} of {} mails) reached the limit of {:.2} %",
            pct(o.hard),
            o.hard,
            o.sent,
            100.0 * rules.hard_bounce_rate
        ));
    }
    if o.complaints as f64 >= rules.complaint_rate * o.sent as f64 {
        return Some(format!(
            "complaints {:.3} % ({} of {} mails) reached the limit of {:.3} %",
            pct(o.complaints),
            o.complaints,
            o.sent,
            100.0 * rules.complaint_rate
        ));
    }
    None
}

/// A list's waves as stored in `store` (for tools without an engine, such as `status`).
pub async fn state_in(
    store: &dyn crate::store::Store,
    list: &str,
) -> crate::store::StoreResult<WaveState> {
    Ok(match store.cursor(&state_key(list)).await? {
        // An unreadable state reads as not paused: the stop rules judge again.
        Some(text) => serde_json::from_str(&text).unwrap_or_default(),
        None => WaveState::default(),
    })
}

impl Engine {
    /// A list's waves as stored.
    pub async fn wave_state(&self, list: &str) -> EngineResult<WaveState> {
        Ok(state_in(self.store.as_ref(), list).await?)
    }

    /// Store `list`'s wave state and take its paused flag into memory at once.
    async fn save_wave_state(
        &self,
        list: &str,
        state: &WaveState,
        now: DateTime<Utc>,
    ) -> EngineResult<()> {
        let text = serde_json::to_string(state).unwrap_or_default();
        self.store.set_cursor(&state_key(list), &text, now).await?;
        self.waves.set_paused(list, state.paused.is_some());
        Ok(())
    }

    /// Whether `list`'s waves are paused (from memory for up to a second).
    pub(crate) async fn wave_paused(&self, list: &str) -> EngineResult<bool> {
        if let Some(paused) = self.waves.paused_recently(list) {
            return Ok(paused);
        }
        let paused = self.wave_state(list).await?.paused.is_some();
        self.waves.set_paused(list, paused);
        Ok(paused)
    }

    /// When a wave's mail row of `list` should be tried again, if the list is paused: an
    /// hour of the plan's day from now, at least a minute (a resume makes the held rows due
    /// at once, `Store::release_waves`), so held rows do not crowd out the mail that may go.
    pub(crate) async fn wave_hold(&self, list: &ListConfig) -> EngineResult<Option<DateTime<Utc>>> {
        // Paused in memory: ask the store, so a resume a moment ago is not missed.
        if !self.wave_paused(&list.id).await? || self.wave_state(&list.id).await?.paused.is_none() {
            return Ok(None);
        }
        let hold = (list.sending.day() / 24).max(Duration::from_secs(60));
        Ok(Some(
            Utc::now() + chrono::Duration::from_std(hold).unwrap_or(chrono::Duration::hours(1)),
        ))
    }

    /// Count one mail outcome of `list` (written by [`Engine::flush_outcomes`]).
    pub(crate) fn count_outcome(&self, list: &ListConfig, outcome: Outcome) {
        let slot = PlanClock::of(&list.sending).slot(Utc::now());
        self.waves.count(&list.id, slot, outcome);
    }

    /// Write the counted outcomes, then judge the stop rules of every list that had a bounce
    /// or complaint among them. Returns the pauses this recorded.
    pub async fn flush_outcomes(&self) -> EngineResult<Vec<(String, Pause)>> {
        let rows = self.waves.take_tally();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if let Err(e) = self.store.add_mail_outcomes(&rows).await {
            // Keep them for the next flush rather than lose the stop rules' figures.
            self.waves.put_back(rows);
            return Err(e.into());
        }
        let mut judge: Vec<&str> = rows
            .iter()
            .filter(|(_, _, o)| o.hard + o.soft + o.policy + o.complaints > 0)
            .map(|(l, _, _)| l.as_str())
            .collect();
        judge.dedup();
        let mut paused = Vec::new();
        for id in judge {
            if let Some(list) = self.list(id)
                && let Some(p) = self.judge_stop_rules(list).await?
            {
                paused.push((id.to_owned(), p));
            }
        }
        Ok(paused)
    }

    /// Judge every list's stop rules (the scheduler does, each pass).
    pub async fn judge_all_stop_rules(&self) -> EngineResult<Vec<(String, Pause)>> {
        let mut paused = self.flush_outcomes().await?;
        for list in self.lists() {
            if paused.iter().any(|(id, _)| id == &list.id) {
                continue;
            }
            if let Some(p) = self.judge_stop_rules(list).await? {
                paused.push((list.id.clone(), p));
            }
        }
        Ok(paused)
    }

    /// The figures `list`'s stop rules judge now: its window, cut at the last resume.
    pub async fn stop_rule_figures(
        &self,
        list: &ListConfig,
    ) -> EngineResult<(DateTime<Utc>, MailOutcomes)> {
        let clock = PlanClock::of(&list.sending);
        let now = Utc::now();
        let mut from = clock.slot(now) - clock.slots_in(list.sending.stop.window.0) + 1;
        let state = self.wave_state(&list.id).await?;
        if let Some(r) = &state.resumed {
            // What the operator looked at before resuming is not judged again.
            from = from.max(clock.slot(r.at) + 1);
        }
        let figures = self.store.mail_outcomes(&list.id, from).await?;
        let from_at = chrono::DateTime::from_timestamp_millis(from.saturating_mul(clock.slot_ms()))
            .unwrap_or(now);
        Ok((from_at, figures))
    }

    /// Pause `list`'s waves if a stop rule trips now (and they are not paused already).
    pub async fn judge_stop_rules(&self, list: &ListConfig) -> EngineResult<Option<Pause>> {
        let state = self.wave_state(&list.id).await?;
        if state.paused.is_some() {
            return Ok(None);
        }
        let (window_from, figures) = self.stop_rule_figures(list).await?;
        let Some(reason) = tripped(&list.sending.stop, &figures) else {
            return Ok(None);
        };
        let now = Utc::now();
        let event = list_event(
            list,
            "wave_paused",
            EventSource::Rules,
            Evidence {
                reason: Some(reason.clone()),
                detail: Some(format!(
                    "stop rule over the window from {}: {} mails sent, {} hard bounces, {} soft bounces, {} policy refusals, {} complaints; paced mail held until `optinsync campaign resume --list {}`",
                    window_from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    figures.sent,
                    figures.hard,
                    figures.soft,
                    figures.policy,
                    figures.complaints,
                    list.id
                )),
                ..Evidence::default()
            },
            now,
        );
        let sealed = self.store.append_event(&event).await?;
        let pause = Pause {
            at: now,
            reason,
            figures,
            window_from,
            event_seq: sealed.seq,
        };
        let next = WaveState {
            paused: Some(pause.clone()),
            resumed: state.resumed,
        };
        self.save_wave_state(&list.id, &next, now).await?;
        metrics::counter!("optinsync_wave_pauses_total", "list" => list.id.clone()).increment(1);
        tracing::warn!(list = %list.id, reason = %pause.reason, "stop rule fired: the list's waves are paused until an operator resumes them");
        Ok(Some(pause))
    }

    /// The operator lifts a pause (`campaign resume`): recorded in the ledger; the stop rules
    /// judge only what happens from now on.
    pub async fn resume_waves(
        &self,
        list: &ListConfig,
        source: EventSource,
    ) -> EngineResult<Resume> {
        let state = self.wave_state(&list.id).await?;
        let Some(pause) = state.paused else {
            return Err(EngineError::NotPaused {
                list: list.id.clone(),
            });
        };
        let now = Utc::now();
        let event = list_event(
            list,
            "wave_resumed",
            source,
            Evidence {
                reason: Some(format!(
                    "the operator resumed the waves paused at {} ({})",
                    pause.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    pause.reason
                )),
                ..Evidence::default()
            },
            now,
        );
        let sealed = self.store.append_event(&event).await?;
        let resume = Resume {
            at: now,
            event_seq: sealed.seq,
        };
        let next = WaveState {
            paused: None,
            resumed: Some(resume.clone()),
        };
        self.save_wave_state(&list.id, &next, now).await?;
        let released = self.store.release_waves(&list.id, Utc::now()).await?;
        tracing::info!(list = %list.id, released, "the list's waves were resumed by an operator; held mails go now");
        Ok(resume)
    }

    /// A soft bounce of `contact` on `list`: recorded as a `soft_bounce` event; the one that
    /// reaches the list's limit within its window is taken as a hard bounce (suppressed).
    /// Returns whether it was.
    pub(crate) async fn soft_bounce(
        &self,
        contact: &crate::store::Contact,
        list: &ListConfig,
        text: &str,
        source: EventSource,
    ) -> EngineResult<bool> {
        let rules = &list.sending.soft_bounces;
        let now = Utc::now();
        let since = crate::ledger::format_time(
            now - chrono::Duration::from_std(rules.window.0).unwrap_or(chrono::Duration::days(30)),
        );
        let earlier = self
            .store
            .events_of_contact(&contact.id)
            .await?
            .iter()
            .filter(|e| e.list_id == list.id && e.kind == SOFT_BOUNCE && e.at >= since)
            .count();
        let score = u32::try_from(earlier).unwrap_or(u32::MAX).saturating_add(1);
        if score >= rules.limit {
            let evidence = Evidence {
                detail: Some(format!(
                    "soft bounce {score} of {} within {}s: taken as a hard bounce; {text}",
                    rules.limit,
                    rules.window.0.as_secs()
                )),
                ..Evidence::default()
            };
            self.apply(contact, list, Input::Bounce, source, evidence)
                .await?;
            return Ok(true);
        }
        let state = self
            .store
            .consent(&contact.id, &list.id)
            .await?
            .map_or(ConsentState::None, |c| c.state);
        let event = NewEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            at: now,
            contact_id: contact.id.clone(),
            list_id: list.id.clone(),
            kind: SOFT_BOUNCE.to_owned(),
            from_state: state,
            to_state: state,
            source,
            evidence: Evidence {
                detail: Some(format!("soft bounce {score} of {}: {text}", rules.limit)),
                ..Evidence::default()
            },
        };
        self.store.append_event(&event).await?;
        Ok(false)
    }
}

/// The event kind of a soft bounce (no state change).
pub const SOFT_BOUNCE: &str = "soft_bounce";

/// A list's own ledger event (no contact, no state).
fn list_event(
    list: &ListConfig,
    kind: &str,
    source: EventSource,
    evidence: Evidence,
    at: DateTime<Utc>,
) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7().to_string(),
        at,
        contact_id: LIST_EVENT_CONTACT.to_owned(),
        list_id: list.id.clone(),
        kind: kind.to_owned(),
        from_state: ConsentState::None,
        to_state: ConsentState::None,
        source,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_rules_judge_rates_once_enough_went_out() {
        let rules = StopRules::default();
        let o = |sent, hard, complaints, policy| MailOutcomes {
            sent,
            hard,
            soft: 0,
            policy,
            complaints,
        };
        // 2 % hard bounces: not judged below 100 mails, tripped at and above.
        assert_eq!(tripped(&rules, &o(99, 50, 0, 0)), None);
        assert_eq!(tripped(&rules, &o(1000, 19, 0, 0)), None);
        let hard = tripped(&rules, &o(1000, 20, 0, 0)).expect("trips");
        assert!(
            hard.contains("hard bounces 2.00 % (20 of 1000 mails)"),
            "{hard}"
        );
        // 0.1 % complaints.
        assert_eq!(tripped(&rules, &o(2000, 0, 1, 0)), None);
        assert!(tripped(&rules, &o(2000, 0, 2, 0)).is_some_and(|r| r.contains("complaints")));
        // Policy refusals count regardless of volume.
        assert!(tripped(&rules, &o(5, 0, 0, 3)).is_some_and(|r| r.contains("policy")));
        assert_eq!(tripped(&rules, &o(5, 0, 0, 2)), None);
    }
}
