//! The consent state machine (ARCHITECTURE.md, "Architecture invariants").
//!
//! [`transition`] is a pure function: given the current [`Consent`] of one (contact, list)
//! pair and an [`Input`], it returns the next consent, the ledger event kind and the effects to
//! queue — or a [`Refusal`] when the input would break an architecture invariant. Nothing else
//! in the engine changes consent, so the invariants hold whatever the rules propose.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The states are the connector API's vocabulary (a CRM write-back carries them); the
/// machine that moves between them is here.
pub use optinsync_plugin_api::{ConsentState, UnknownState};

/// The projection of the ledger for one (contact, list) pair: what the state machine needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub state: ConsentState,
    /// When the current state was entered.
    pub since: DateTime<Utc>,
    /// Token id of the current signup (DOI or re-permission request), if any.
    pub signup_token: Option<String>,
    /// DOI mails sent for the current signup (at most one; reminders counted apart).
    pub doi_mails: u32,
    pub reminders_sent: u32,
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Token that confirmed, so a repeated POST of the same link is recognised as a repeat.
    pub confirmed_token: Option<String>,
    /// Sequence number of the last state-changing ledger event (optimistic concurrency).
    pub last_seq: Option<i64>,
}

impl Consent {
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            state: ConsentState::None,
            since: now,
            signup_token: None,
            doi_mails: 0,
            reminders_sent: 0,
            confirmed_at: None,
            confirmed_token: None,
            last_seq: None,
        }
    }
}

/// Something that may change consent. Who sent it is the event's `source`, kept apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// The CRM says the person asked for this list. Never consent by itself (invariant: the
    /// CRM never creates consent).
    CrmAsserted,
    /// The CRM's marketing opt-out flag is set.
    CrmOptedOut,
    /// Rule action `send_doi`: send the one DOI mail for this signup.
    SendDoi {
        token: String,
    },
    /// Rule action `send_reminder`.
    SendReminder,
    /// Rule action `send_revalidation`: ask a confirmed contact to confirm again.
    SendRevalidation {
        token: String,
    },
    /// Rule action `remove` (or a timer): the signup or re-permission ran out.
    Lapse,
    /// Rule action `suppress`: stop all marketing to this address on this list.
    Suppress,
    /// A human POST on a valid confirmation token (the only way to `confirmed` on an optinsync list:
    /// invariant "only a confirmation subscribes").
    Confirm {
        token: String,
    },
    /// The person unsubscribed (any channel).
    Unsubscribe,
    Bounce,
    Complaint,
    /// The campaigns tool's own double opt-in was confirmed — only legal on a list whose
    /// confirmation the tool runs (`Context::campaigns_doi`).
    CampaignsConfirmed,
    /// The person asked for a fresh confirmation mail from an expired link's page.
    PersonSignup {
        token: String,
    },
    /// Someone signed the address up on the organisation's website (`POST /signup/{list}`).
    /// Never consent by itself: it leads to `pending` and a DOI mail, and only the
    /// confirmation subscribes. Unlike [`Input::PersonSignup`] it may come from anyone, so an
    /// open signup is not re-mailed inside the list's reminder window, and an erased address
    /// (suppressed by its erasure alone) may come back this way.
    Signup {
        token: String,
    },
    /// The person joined the list on the preference centre, reached through a link that was
    /// mailed to them (`token`: that link's token id): the mailbox is proven as a DOI proves
    /// it, so this confirms at once.
    PreferencesJoin {
        token: String,
    },
    Erase,
}

impl Input {
    pub fn name(&self) -> &'static str {
        match self {
            Self::CrmAsserted => "crm_asserted",
            Self::CrmOptedOut => "crm_opted_out",
            Self::SendDoi { .. } => "send_doi",
            Self::SendReminder => "send_reminder",
            Self::SendRevalidation { .. } => "send_revalidation",
            Self::Lapse => "lapse",
            Self::Suppress => "suppress",
            Self::Confirm { .. } => "confirm",
            Self::Unsubscribe => "unsubscribe",
            Self::Bounce => "bounce",
            Self::Complaint => "complaint",
            Self::PersonSignup { .. } => "person_signup",
            Self::Signup { .. } => "signup",
            Self::CampaignsConfirmed => "campaigns_confirmed",
            Self::PreferencesJoin { .. } => "preferences_join",
            Self::Erase => "erase",
        }
    }
}

/// A side effect the transition requires; the engine turns each into an outbox row written in
/// the same transaction as the ledger event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Send a confirmation mail for `token` (`reminder` when it repeats the request).
    SendConfirmationMail { token: String, kind: MailKind },
    /// Put the address on the Campaigns list.
    Subscribe,
    /// Take the address off the Campaigns list (legal deadline: goes first).
    Remove,
    /// Tell the CRM the new consent state.
    WriteBack { opt_out: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailKind {
    Doi,
    Reminder,
    Revalidation,
}

impl MailKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Doi => "doi",
            Self::Reminder => "reminder",
            Self::Revalidation => "revalidation",
        }
    }
}

/// What a legal input does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: ConsentState,
    pub to: ConsentState,
    /// Ledger event kind, e.g. `doi_requested`, `confirmed`.
    pub event: &'static str,
    pub next: Consent,
    pub effects: Vec<Effect>,
}

/// An input refused because it would break an invariant. Logged, never carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused `{input}` in state `{state}`: {reason}")]
pub struct Refusal {
    pub state: ConsentState,
    pub input: &'static str,
    pub reason: &'static str,
}

/// Settings of the list that bound what the machine allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_reminders: u32,
    /// The list's `reminder_after`: a website signup for an address whose signup is open
    /// and younger than this sends no second mail.
    pub reminder_after: chrono::TimeDelta,
}

impl Limits {
    /// Limits with `max_reminders` and the default three-day reminder window.
    pub fn with_reminders(max_reminders: u32) -> Self {
        Self {
            max_reminders,
            reminder_after: chrono::TimeDelta::days(3),
        }
    }
}

/// Facts about the address outside this (contact, list) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// The address is on the global suppression list (bounced, complained, erased anywhere).
    pub suppressed: bool,
    /// The list's double opt-in is run by the campaigns tool (`doi = "campaigns"`).
    pub campaigns_doi: bool,
    /// The address's only suppression is its erasure's: the person may come back through
    /// their own website signup and confirmation (which lifts it). Meaningful only with
    /// `suppressed`.
    pub erasure_only: bool,
}

/// `Ok(None)` means the input is legal but changes nothing (a repeat, or a CRM edit that
/// withdrawal overrides).
pub fn transition(
    current: &Consent,
    input: &Input,
    limits: Limits,
    cx: Context,
    now: DateTime<Utc>,
) -> Result<Option<Transition>, Refusal> {
    use ConsentState as S;
    let from = current.state;
    let refuse = |reason: &'static str| {
        Err(Refusal {
            state: from,
            input: input.name(),
            reason,
        })
    };
    let mut next = current.clone();
    next.since = now;

    let (to, event, effects) = match input {
        Input::CrmAsserted => match from {
            S::None if cx.suppressed => return Ok(None),
            S::None => (S::Asserted, "asserted", vec![]),
            // Asserting again never re-mails or undoes a withdrawal (invariants: the CRM never creates consent;
            // withdrawal wins).
            _ => return Ok(None),
        },
        Input::CrmOptedOut => match from {
            S::Withdrawn | S::Bounced | S::Complained | S::Erased => return Ok(None),
            st => (S::Withdrawn, "withdrawn", removal_effects(st, false)),
        },
        Input::SendDoi { token } => {
            if cx.suppressed {
                return refuse("address is suppressed (invariant: mail is bounded)");
            }
            match from {
                S::Asserted => {
                    let mail = start_signup(&mut next, token, MailKind::Doi);
                    (S::Pending, "doi_requested", vec![mail])
                }
                S::Pending => {
                    return refuse(
                        "a DOI mail was already sent for this signup (invariant: mail is bounded)",
                    );
                }
                st if st.is_withdrawal() => {
                    return refuse(
                        "withdrawal wins; only the person can start a new signup (invariant)",
                    );
                }
                S::None => {
                    return refuse(
                        "no consent is asserted; mailing people who never asked is marketing",
                    );
                }
                _ => return refuse("DOI is only sent for asserted consent"),
            }
        }
        Input::SendReminder | Input::SendRevalidation { .. } if cx.campaigns_doi => {
            return refuse("the campaigns tool runs the confirmation for this list");
        }
        Input::CampaignsConfirmed => match from {
            S::Pending if cx.campaigns_doi => {
                next.confirmed_at = Some(now);
                // The tool put them on its list when they confirmed: nothing to subscribe.
                (
                    S::Confirmed,
                    "confirmed_by_campaigns",
                    vec![Effect::WriteBack { opt_out: false }],
                )
            }
            S::Confirmed => return Ok(None),
            _ if !cx.campaigns_doi => {
                return refuse(
                    "this list's confirmation is optinsync's own (invariant: only a confirmation subscribes)",
                );
            }
            st if st.is_withdrawal() => return refuse("withdrawal wins (invariant)"),
            _ => return refuse("no signup is waiting for the campaigns tool's confirmation"),
        },
        Input::SendReminder => {
            if cx.suppressed {
                return refuse("address is suppressed (invariant: mail is bounded)");
            }
            match (from, &current.signup_token) {
                (S::Pending, Some(token)) if current.reminders_sent < limits.max_reminders => {
                    next.reminders_sent += 1;
                    next.since = current.since; // a reminder does not restart the expiry clock
                    let mail = Effect::SendConfirmationMail {
                        token: token.clone(),
                        kind: MailKind::Reminder,
                    };
                    (S::Pending, "reminder_requested", vec![mail])
                }
                (S::Pending, _) => {
                    return refuse(
                        "reminder limit reached for this signup (invariant: mail is bounded)",
                    );
                }
                _ => return refuse("reminders are only sent for pending signups"),
            }
        }
        Input::SendRevalidation { token } => {
            if cx.suppressed {
                return refuse("address is suppressed (invariant: mail is bounded)");
            }
            match from {
                S::Confirmed => {
                    let mail = start_signup(&mut next, token, MailKind::Revalidation);
                    (S::Revalidating, "revalidation_requested", vec![mail])
                }
                _ => return refuse("re-permission is only asked of confirmed contacts"),
            }
        }
        Input::Lapse => match from {
            // Removal is idempotent, and members imported from an existing list are on it
            // while asserted or pending: a lapse always takes the address off the list.
            S::Asserted | S::Pending => (S::Lapsed, "lapsed", vec![Effect::Remove]),
            S::Confirmed | S::Revalidating => (
                S::Lapsed,
                "lapsed",
                vec![Effect::Remove, Effect::WriteBack { opt_out: false }],
            ),
            S::Lapsed => return Ok(None),
            _ => return refuse("nothing to lapse in this state"),
        },
        Input::Suppress => match from {
            S::Withdrawn | S::Bounced | S::Complained | S::Erased => return Ok(None),
            st => (S::Withdrawn, "suppressed", removal_effects(st, true)),
        },
        Input::Confirm { token } => match from {
            S::Pending | S::Revalidating
                if current.signup_token.as_deref() == Some(token.as_str()) =>
            {
                next.confirmed_at = Some(now);
                next.confirmed_token = Some(token.clone());
                let mut effects = Vec::new();
                if from == S::Pending {
                    effects.push(Effect::Subscribe);
                }
                effects.push(Effect::WriteBack { opt_out: false });
                (S::Confirmed, "confirmed", effects)
            }
            S::Confirmed if current.confirmed_token.as_deref() == Some(token.as_str()) => {
                return Ok(None);
            }
            S::Pending | S::Revalidating | S::Confirmed => {
                return refuse("token is not the current signup's");
            }
            st if st.is_withdrawal() => {
                return refuse("withdrawal wins over an older confirmation link (invariant)");
            }
            _ => return refuse("no signup is waiting for confirmation"),
        },
        Input::Unsubscribe => match from {
            S::Withdrawn | S::Erased => return Ok(None),
            st => (S::Withdrawn, "withdrawn", removal_effects(st, true)),
        },
        Input::Bounce => match from {
            S::Bounced | S::Withdrawn | S::Complained | S::Erased => return Ok(None),
            st => (S::Bounced, "bounced", removal_effects(st, true)),
        },
        Input::Complaint => match from {
            S::Complained | S::Erased => return Ok(None),
            st => (S::Complained, "complained", removal_effects(st, true)),
        },
        // The invariant "mail is bounded": even a person's own new signup mails nothing to an
        // address on the global suppression list (bounce, complaint, CRM opt-out), except a
        // website signup of an erased address (the erasure is the only reason), whose person
        // may come back through their own signup and confirmation. Per-list withdrawal is not
        // global, so re-subscribing after an unsubscribe works.
        Input::PersonSignup { .. } | Input::Signup { .. }
            if cx.suppressed && !(cx.erasure_only && matches!(input, Input::Signup { .. })) =>
        {
            return refuse(
                "address is suppressed (invariant: mail is bounded); lift the suppression first",
            );
        }
        Input::PersonSignup { token } | Input::Signup { token } => {
            // A website form may be filled in by anyone.
            let website = matches!(input, Input::Signup { .. });
            match from {
                S::Erased => {
                    return refuse(
                        "erased contacts cannot be revived; a new signup starts a new contact",
                    );
                }
                // A bounce or complaint suppresses the address, but its suppression row may
                // be an erasure's: the state itself refuses then too. (Once an operator
                // lifted the suppression, the person may sign up again.)
                S::Bounced | S::Complained if website && cx.suppressed => {
                    return refuse(
                        "the address bounced or complained (invariant: mail is bounded)",
                    );
                }
                S::Confirmed | S::Revalidating => return Ok(None),
                // An open signup is mailed again from the website only after the reminder
                // window; from an expired link's page the person asks again, so the new
                // signup replaces the open one and gets its own DOI mail.
                S::Pending if website && now - current.since < limits.reminder_after => {
                    return Ok(None);
                }
                _ => {
                    let mail = start_signup(&mut next, token, MailKind::Doi);
                    (S::Pending, "signup_requested", vec![mail])
                }
            }
        }
        // A join from the preference centre confirms: its link was mailed to this mailbox.
        Input::PreferencesJoin { .. } if cx.suppressed => {
            return refuse("address is suppressed (invariant: mail is bounded)");
        }
        Input::PreferencesJoin { token } => match from {
            S::Confirmed | S::Revalidating => return Ok(None),
            S::Bounced | S::Complained | S::Erased => {
                return refuse("the address bounced, complained or was erased");
            }
            _ if cx.campaigns_doi => {
                return refuse("the campaigns tool runs the confirmation for this list");
            }
            _ => {
                next.confirmed_at = Some(now);
                next.confirmed_token = Some(token.clone());
                next.signup_token = Some(token.clone());
                (
                    S::Confirmed,
                    "confirmed_by_preferences",
                    vec![Effect::Subscribe, Effect::WriteBack { opt_out: false }],
                )
            }
        },
        // The CRM is told too (opt-out), so it stops treating the address as marketable.
        Input::Erase => match from {
            S::Erased => return Ok(None),
            _ => (
                S::Erased,
                "erased",
                vec![Effect::Remove, Effect::WriteBack { opt_out: true }],
            ),
        },
    };
    next.state = to;
    if to != S::Pending && to != S::Revalidating && to != S::Confirmed {
        next.signup_token = None;
    }
    Ok(Some(Transition {
        from,
        to,
        event,
        next,
        effects,
    }))
}

/// Make `token` the signup's (mails counted afresh) and the mail that asks to confirm it.
fn start_signup(next: &mut Consent, token: &str, kind: MailKind) -> Effect {
    next.signup_token = Some(token.to_owned());
    next.doi_mails = 1;
    next.reminders_sent = 0;
    Effect::SendConfirmationMail {
        token: token.to_owned(),
        kind,
    }
}

/// Effects of leaving marketing: take the address off the list (always — removal is idempotent
/// and the list may hold it from before optinsync) and tell the CRM.
fn removal_effects(_from: ConsentState, write_back: bool) -> Vec<Effect> {
    let mut effects = vec![Effect::Remove];
    if write_back {
        effects.push(Effect::WriteBack { opt_out: true });
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(state: ConsentState) -> Consent {
        Consent {
            state,
            ..Consent::new(Utc::now())
        }
    }
    const LIM: Limits = Limits {
        max_reminders: 1,
        reminder_after: chrono::TimeDelta::days(3),
    };

    #[test]
    fn crm_field_never_creates_consent() {
        let t = transition(
            &at(ConsentState::None),
            &Input::CrmAsserted,
            LIM,
            Context::default(),
            Utc::now(),
        )
        .expect("legal")
        .expect("changes");
        assert_eq!(t.to, ConsentState::Asserted);
        assert!(t.effects.is_empty());
    }

    #[test]
    fn doi_then_confirm_subscribes() {
        let now = Utc::now();
        let c = at(ConsentState::Asserted);
        let t = transition(
            &c,
            &Input::SendDoi { token: "t1".into() },
            LIM,
            Context::default(),
            now,
        )
        .expect("legal")
        .expect("changes");
        assert_eq!(t.to, ConsentState::Pending);
        let t2 = transition(
            &t.next,
            &Input::Confirm { token: "t1".into() },
            LIM,
            Context::default(),
            now,
        )
        .expect("legal")
        .expect("changes");
        assert_eq!(t2.to, ConsentState::Confirmed);
        assert!(t2.effects.contains(&Effect::Subscribe));
        // Same link again: a repeat, not a second event.
        let t3 = transition(
            &t2.next,
            &Input::Confirm { token: "t1".into() },
            LIM,
            Context::default(),
            now,
        );
        assert_eq!(t3, Ok(None));
    }

    #[test]
    fn second_doi_and_extra_reminder_refused() {
        let now = Utc::now();
        let t = transition(
            &at(ConsentState::Asserted),
            &Input::SendDoi { token: "t".into() },
            LIM,
            Context::default(),
            now,
        )
        .expect("legal")
        .expect("changes");
        assert!(
            transition(
                &t.next,
                &Input::SendDoi { token: "u".into() },
                LIM,
                Context::default(),
                now
            )
            .is_err()
        );
        let r = transition(&t.next, &Input::SendReminder, LIM, Context::default(), now)
            .expect("legal")
            .expect("changes");
        assert!(transition(&r.next, &Input::SendReminder, LIM, Context::default(), now).is_err());
    }

    #[test]
    fn withdrawal_wins_over_crm_and_rules() {
        let now = Utc::now();
        let w = at(ConsentState::Withdrawn);
        assert_eq!(
            transition(&w, &Input::CrmAsserted, LIM, Context::default(), now),
            Ok(None)
        );
        assert!(
            transition(
                &w,
                &Input::SendDoi { token: "x".into() },
                LIM,
                Context::default(),
                now
            )
            .is_err()
        );
        assert!(
            transition(
                &w,
                &Input::Confirm { token: "x".into() },
                LIM,
                Context::default(),
                now
            )
            .is_err()
        );
    }

    #[test]
    fn suppressed_address_gets_no_mail() {
        let cx = Context {
            suppressed: true,
            campaigns_doi: false,
            erasure_only: false,
        };
        let r = transition(
            &at(ConsentState::Asserted),
            &Input::SendDoi { token: "t".into() },
            LIM,
            cx,
            Utc::now(),
        );
        assert!(r.is_err());
    }

    #[test]
    fn state_names_round_trip() {
        for s in ConsentState::ALL {
            assert_eq!(s.as_str().parse::<ConsentState>().ok(), Some(s));
        }
        assert!("maybe".parse::<ConsentState>().is_err());
    }

    #[test]
    fn campaigns_confirmation_only_on_lists_whose_doi_the_tool_runs() {
        let now = Utc::now();
        let pending = at(ConsentState::Pending);
        let own = Context {
            suppressed: false,
            campaigns_doi: false,
            erasure_only: false,
        };
        assert!(
            transition(&pending, &Input::CampaignsConfirmed, LIM, own, now).is_err(),
            "only a confirmation subscribes on optinsync lists"
        );
        let tool = Context {
            suppressed: false,
            campaigns_doi: true,
            erasure_only: false,
        };
        let t = transition(&pending, &Input::CampaignsConfirmed, LIM, tool, now)
            .expect("legal")
            .expect("changes");
        assert_eq!(
            (t.to, t.event),
            (ConsentState::Confirmed, "confirmed_by_campaigns")
        );
        assert!(
            !t.effects.contains(&Effect::Subscribe),
            "the tool already holds them"
        );
        assert!(
            transition(
                &at(ConsentState::Withdrawn),
                &Input::CampaignsConfirmed,
                LIM,
                tool,
                now
            )
            .is_err()
        );
        assert!(
            transition(&pending, &Input::SendReminder, LIM, tool, now).is_err(),
            "the tool sends its own reminders"
        );
    }

    fn confirm(
        c: &Consent,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<Transition>, Refusal> {
        let input = Input::Confirm {
            token: token.into(),
        };
        transition(c, &input, LIM, Context::default(), now)
    }

    fn signup(
        c: &Consent,
        token: &str,
        cx: Context,
        now: DateTime<Utc>,
    ) -> Result<Option<Transition>, Refusal> {
        transition(
            c,
            &Input::Signup {
                token: token.into(),
            },
            LIM,
            cx,
            now,
        )
    }

    #[test]
    fn website_signup_mails_once_and_never_subscribes() {
        let now = Utc::now();
        for from in [
            ConsentState::None,
            ConsentState::Asserted,
            ConsentState::Lapsed,
            ConsentState::Withdrawn,
        ] {
            let t = signup(&at(from), "s1", Context::default(), now)
                .expect("legal")
                .expect("changes");
            assert_eq!((t.to, t.event), (ConsentState::Pending, "signup_requested"));
            assert_eq!(
                t.effects,
                vec![Effect::SendConfirmationMail {
                    token: "s1".into(),
                    kind: MailKind::Doi
                }],
                "from {from}: a DOI mail, no subscribe"
            );
            assert_eq!(t.next.signup_token.as_deref(), Some("s1"));
        }
        for settled in [ConsentState::Confirmed, ConsentState::Revalidating] {
            assert_eq!(
                signup(&at(settled), "s1", Context::default(), now),
                Ok(None)
            );
        }
    }

    #[test]
    fn withdrawn_signup_then_confirm_subscribes() {
        let now = Utc::now();
        let t = signup(&at(ConsentState::Withdrawn), "s2", Context::default(), now)
            .expect("legal")
            .expect("changes");
        let old = confirm(&t.next, "old", now);
        assert!(
            old.is_err(),
            "an older link does not confirm the new signup"
        );
        let c = confirm(&t.next, "s2", now)
            .expect("legal")
            .expect("changes");
        assert_eq!(
            (c.to, c.effects.contains(&Effect::Subscribe)),
            (ConsentState::Confirmed, true)
        );
    }

    #[test]
    fn open_signup_is_not_mailed_again_inside_the_reminder_window() {
        let now = Utc::now();
        let first = signup(&at(ConsentState::None), "a", Context::default(), now)
            .expect("legal")
            .expect("changes");
        let soon = now + chrono::TimeDelta::hours(1);
        assert_eq!(signup(&first.next, "b", Context::default(), soon), Ok(None));
        let later = now + LIM.reminder_after + chrono::TimeDelta::seconds(1);
        let again = signup(&first.next, "b", Context::default(), later)
            .expect("legal")
            .expect("changes");
        assert_eq!(again.next.signup_token.as_deref(), Some("b"));
        assert_eq!(again.effects.len(), 1);
    }

    #[test]
    fn suppressed_address_gets_no_signup_mail_unless_only_erased() {
        let now = Utc::now();
        let suppressed = Context {
            suppressed: true,
            ..Context::default()
        };
        assert!(signup(&at(ConsentState::None), "x", suppressed, now).is_err());
        assert!(
            transition(
                &at(ConsentState::None),
                &Input::PersonSignup { token: "x".into() },
                LIM,
                Context {
                    erasure_only: true,
                    ..suppressed
                },
                now
            )
            .is_err(),
            "only the website signup brings an erased address back"
        );
        let erased = Context {
            suppressed: true,
            erasure_only: true,
            campaigns_doi: false,
        };
        let t = signup(&at(ConsentState::None), "x", erased, now)
            .expect("legal")
            .expect("changes");
        assert_eq!(t.to, ConsentState::Pending);
        for never in [
            ConsentState::Erased,
            ConsentState::Bounced,
            ConsentState::Complained,
        ] {
            assert!(signup(&at(never), "x", erased, now).is_err(), "{never}");
        }
        // After an operator lifted the suppression, a bounced address may sign up again.
        let t = signup(&at(ConsentState::Bounced), "y", Context::default(), now)
            .expect("legal")
            .expect("changes");
        assert_eq!(t.to, ConsentState::Pending);
    }

    #[test]
    fn preferences_join_confirms_unless_suppressed_or_bounced() {
        let now = Utc::now();
        let join = Input::PreferencesJoin { token: "p1".into() };
        for from in [
            ConsentState::None,
            ConsentState::Pending,
            ConsentState::Withdrawn,
        ] {
            let t = transition(&at(from), &join, LIM, Context::default(), now)
                .expect("legal")
                .expect("changes");
            assert_eq!(
                (t.to, t.event),
                (ConsentState::Confirmed, "confirmed_by_preferences")
            );
            assert!(t.effects.contains(&Effect::Subscribe));
        }
        let suppressed = Context {
            suppressed: true,
            ..Context::default()
        };
        assert!(transition(&at(ConsentState::None), &join, LIM, suppressed, now).is_err());
        assert!(
            transition(
                &at(ConsentState::Bounced),
                &join,
                LIM,
                Context::default(),
                now
            )
            .is_err()
        );
        assert_eq!(
            transition(
                &at(ConsentState::Confirmed),
                &join,
                LIM,
                Context::default(),
                now
            ),
            Ok(None)
        );
    }
}
