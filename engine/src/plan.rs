//! From a decision to a commit: the state machine's answer for one input on one list, and
//! the commit (ledger event, outbox rows, suppression) of an accepted transition. Shared by
//! [`crate::engine::Engine::apply`] and the batch planner ([`crate::bulk`]).

use chrono::Utc;

use crate::config::ListConfig;
use crate::consent::{self, Consent, ConsentState, Effect, Input, Refusal};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::store::{
    Commit, Contact, NewOutbox, OutboxWork, PRIORITY_LEGAL, PRIORITY_NORMAL, Suppression,
};

/// The state machine's decision for one input on one list (its limits and DOI mode). Pure:
/// the web layer runs it as a dry run to tell what a link would do before it is clicked.
pub fn transition_for(
    current: &Consent,
    input: &Input,
    list: &ListConfig,
    suppressed: bool,
    now: chrono::DateTime<Utc>,
) -> Result<Option<consent::Transition>, Refusal> {
    transition_on(current, input, list, suppressed, false, now)
}

/// [`transition_for`], saying whether the address's suppression is an erasure's alone
/// (`erasure_only`): then its person's website signup may mail them again.
pub fn transition_on(
    current: &Consent,
    input: &Input,
    list: &ListConfig,
    suppressed: bool,
    erasure_only: bool,
    now: chrono::DateTime<Utc>,
) -> Result<Option<consent::Transition>, Refusal> {
    let (limits, cx) = limits_and_context(list, suppressed, erasure_only);
    consent::transition(current, input, limits, cx, now)
}

/// The state machine's limits and context for one list and address.
pub(crate) fn limits_and_context(
    list: &ListConfig,
    suppressed: bool,
    erasure_only: bool,
) -> (consent::Limits, consent::Context) {
    let cx = consent::Context {
        suppressed,
        campaigns_doi: list.doi == crate::config::DoiMode::Campaigns,
        erasure_only: suppressed && erasure_only,
    };
    let limits = consent::Limits {
        max_reminders: list.max_reminders,
        reminder_after: chrono::TimeDelta::from_std(list.reminder_after.0)
            .unwrap_or(chrono::TimeDelta::MAX),
    };
    (limits, cx)
}

/// The commit of an accepted transition: its ledger event, outbox rows and, for inputs that
/// stop all mail, the suppression. Shared by [`Engine::apply`] and batch planning.
#[allow(clippy::too_many_arguments)]
pub(crate) fn commit_for(
    address_hash: &str,
    contact: &Contact,
    list: &ListConfig,
    input: &Input,
    t: consent::Transition,
    expected_seq: Option<i64>,
    source: EventSource,
    evidence: Evidence,
    now: chrono::DateTime<Utc>,
) -> Commit {
    let event = NewEvent {
        // Time-ordered ids keep the unique index on event_id appending, not scattering.
        event_id: uuid::Uuid::now_v7().to_string(),
        at: now,
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        kind: t.event.to_owned(),
        from_state: t.from,
        to_state: t.to,
        source,
        evidence,
    };
    let global = matches!(
        t.to,
        ConsentState::Bounced | ConsentState::Complained | ConsentState::Erased
    ) || matches!(input, Input::CrmOptedOut | Input::Suppress);
    Commit {
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
        expected_seq,
        // A mail the rules started belongs to a wave (paced, held while paused); one an
        // input from the person or a tool started does not.
        outbox: outbox_rows(
            &t.effects,
            contact,
            list,
            &event.event_id,
            t.to,
            source == EventSource::Rules,
        ),
        consent: t.next,
        event,
        suppress: global.then(|| Suppression {
            address_hash: address_hash.to_owned(),
            reason: t.event.to_owned(),
        }),
        lift: vec![],
        paced: None,
    }
}

/// A refused consent change is logged and counted, never carried out.
pub(crate) fn log_refusal(contact_id: &str, list_id: &str, refusal: &Refusal, source: EventSource) {
    count_refusal(refusal.input);
    warn_refusal(contact_id, list_id, refusal, source);
}

pub(crate) fn count_refusal(input: &'static str) {
    metrics::counter!("optinsync_consent_refused_total", "input" => input).increment(1);
}

pub(crate) fn warn_refusal(
    contact_id: &str,
    list_id: &str,
    refusal: &Refusal,
    source: EventSource,
) {
    tracing::warn!(
        contact_id = %contact_id, list = %list_id, state = %refusal.state, input = refusal.input,
        source = source.as_str(), reason = refusal.reason, "consent change refused"
    );
}

/// Outbox rows for a transition's effects. Keys derive from the event id, so a row can never
/// be enqueued twice for one event.
pub(crate) fn outbox_rows(
    effects: &[Effect],
    contact: &Contact,
    list: &ListConfig,
    event_id: &str,
    to: ConsentState,
    wave: bool,
) -> Vec<NewOutbox> {
    effects
        .iter()
        .filter_map(|e| {
            let (work, priority, key) = match e {
                // The campaigns tool runs this list's double opt-in: ask it, send no mail.
                Effect::SendConfirmationMail { token, .. }
                    if list.doi == crate::config::DoiMode::Campaigns =>
                {
                    (
                        OutboxWork::CampaignsRequestDoi {
                            token: token.clone(),
                        },
                        PRIORITY_NORMAL,
                        format!("request-doi:{event_id}"),
                    )
                }
                Effect::SendConfirmationMail { token, kind } => (
                    OutboxWork::Mail {
                        token: token.clone(),
                        mail: *kind,
                        wave,
                    },
                    PRIORITY_NORMAL,
                    format!("mail:{event_id}"),
                ),
                Effect::Subscribe => (
                    OutboxWork::CampaignsSubscribe {},
                    PRIORITY_NORMAL,
                    format!("subscribe:{event_id}"),
                ),
                // The address travels with the removal so it still works after erasure.
                Effect::Remove => (
                    OutboxWork::CampaignsRemove {
                        email: Some(contact.email.clone()),
                    },
                    PRIORITY_LEGAL,
                    format!("remove:{event_id}"),
                ),
                Effect::WriteBack { opt_out } => {
                    if contact.crm_records.is_empty() {
                        return None;
                    }
                    let priority = if *opt_out {
                        PRIORITY_LEGAL
                    } else {
                        PRIORITY_NORMAL
                    };
                    // Erasure clears the contact's records and address before this row is
                    // delivered: like a removal, the write-back carries what it needs.
                    let erasure = to == ConsentState::Erased;
                    (
                        OutboxWork::CrmWriteBack {
                            state: Some(to),
                            opt_out: *opt_out,
                            records: erasure.then(|| contact.crm_records.clone()),
                            email: erasure.then(|| contact.email.clone()),
                        },
                        priority,
                        format!("writeback:{event_id}"),
                    )
                }
            };
            Some(NewOutbox {
                work,
                priority,
                idempotency_key: key,
                contact_id: contact.id.clone(),
                list_id: list.id.clone(),
            })
        })
        .collect()
}
