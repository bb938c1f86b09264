//! Property tests of the pure consent state machine ([`transition`]): random input sequences,
//! checked against the architecture invariants over the whole history.

use chrono::{DateTime, Utc};
use optinsync_engine::consent::{
    Consent, ConsentState, Context, Effect, Input, Limits, Refusal, Transition, transition,
};
use proptest::prelude::*;

/// How a token-carrying input picks its token.
#[derive(Debug, Clone)]
enum Tok {
    /// The token of the signup waiting in the current state (or a dead one if none).
    Current,
    /// One of a few shared tokens, so old tokens come back and sometimes collide.
    Pool(u8),
    /// A token never seen before.
    Fresh,
}

#[derive(Debug, Clone)]
enum Op {
    CrmAsserted,
    CrmOptedOut,
    SendDoi(Tok),
    SendReminder,
    SendRevalidation(Tok),
    Lapse,
    Suppress,
    Confirm(Tok),
    Unsubscribe,
    Bounce,
    Complaint,
    PersonSignup(Tok),
    /// A website signup (`POST /signup/{list}`).
    Signup(Tok),
    /// A join on the preference centre (its mailed link's token).
    PreferencesJoin(Tok),
    Erase,
    /// The campaigns tool's confirmation — must always be refused on these (optinsync-DOI)
    /// lists, which the properties below check.
    CampaignsConfirmed,
}

#[derive(Debug, Clone)]
struct Step {
    op: Op,
    suppressed: bool,
    /// With `suppressed`: the suppression is an erasure's alone.
    erasure_only: bool,
}

#[derive(Debug, Clone)]
struct Case {
    max_reminders: u32,
    steps: Vec<Step>,
}

fn tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        2 => Just(Tok::Fresh),
        2 => (0u8..4).prop_map(Tok::Pool),
        1 => Just(Tok::Current),
    ]
}

fn confirm_tok() -> impl Strategy<Value = Tok> {
    prop_oneof![
        4 => Just(Tok::Current),
        2 => (0u8..4).prop_map(Tok::Pool),
        1 => Just(Tok::Fresh),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::CrmAsserted),
        1 => Just(Op::CrmOptedOut),
        3 => tok().prop_map(Op::SendDoi),
        3 => Just(Op::SendReminder),
        2 => tok().prop_map(Op::SendRevalidation),
        1 => Just(Op::Lapse),
        1 => Just(Op::Suppress),
        5 => confirm_tok().prop_map(Op::Confirm),
        1 => Just(Op::Unsubscribe),
        1 => Just(Op::Bounce),
        1 => Just(Op::Complaint),
        3 => tok().prop_map(Op::PersonSignup),
        3 => tok().prop_map(Op::Signup),
        2 => tok().prop_map(Op::PreferencesJoin),
        1 => Just(Op::Erase),
        2 => Just(Op::CampaignsConfirmed),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0u32..=3,
        prop::collection::vec(
            (op(), prop::bool::weighted(0.15), prop::bool::weighted(0.4)).prop_map(
                |(op, suppressed, erased)| Step {
                    op,
                    suppressed,
                    erasure_only: suppressed && erased,
                },
            ),
            0..60,
        ),
    )
        .prop_map(|(max_reminders, steps)| Case {
            max_reminders,
            steps,
        })
}

/// One applied step.
#[derive(Debug, Clone)]
struct Rec {
    before: Consent,
    input: Input,
    cx: Context,
    result: Result<Option<Transition>, Refusal>,
    after: Consent,
}

impl Rec {
    fn accepted(&self) -> Option<&Transition> {
        match &self.result {
            Ok(Some(t)) => Some(t),
            _ => None,
        }
    }

    fn mails(&self) -> usize {
        self.accepted().map_or(0, |t| {
            t.effects
                .iter()
                .filter(|e| matches!(e, Effect::SendConfirmationMail { .. }))
                .count()
        })
    }

    /// An accepted transition that started a new signup (set a new signup token).
    fn starts_signup(&self) -> bool {
        self.accepted().is_some()
            && matches!(
                self.input,
                Input::SendDoi { .. }
                    | Input::SendRevalidation { .. }
                    | Input::PersonSignup { .. }
                    | Input::Signup { .. }
            )
    }

    /// An accepted confirmation: of the signup's link, or a join on the preference centre
    /// (its link was mailed: the same proof of the mailbox).
    fn accepted_confirm(&self) -> bool {
        matches!(
            self.input,
            Input::Confirm { .. } | Input::PreferencesJoin { .. }
        ) && self
            .accepted()
            .is_some_and(|t| t.to == ConsentState::Confirmed)
    }
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp(1_760_000_000, 0).expect("valid timestamp")
}

fn resolve(tok: &Tok, current: &Consent, i: usize) -> String {
    match tok {
        Tok::Current => current
            .signup_token
            .clone()
            .unwrap_or_else(|| "no-current-token".to_owned()),
        Tok::Pool(n) => format!("pool-{n}"),
        Tok::Fresh => format!("fresh-{i}"),
    }
}

fn input_of(op: &Op, current: &Consent, i: usize) -> Input {
    match op {
        Op::CrmAsserted => Input::CrmAsserted,
        Op::CrmOptedOut => Input::CrmOptedOut,
        Op::SendDoi(k) => Input::SendDoi {
            token: resolve(k, current, i),
        },
        Op::SendReminder => Input::SendReminder,
        Op::SendRevalidation(k) => Input::SendRevalidation {
            token: resolve(k, current, i),
        },
        Op::Lapse => Input::Lapse,
        Op::Suppress => Input::Suppress,
        Op::Confirm(k) => Input::Confirm {
            token: resolve(k, current, i),
        },
        Op::Unsubscribe => Input::Unsubscribe,
        Op::Bounce => Input::Bounce,
        Op::Complaint => Input::Complaint,
        Op::PersonSignup(k) => Input::PersonSignup {
            token: resolve(k, current, i),
        },
        Op::Signup(k) => Input::Signup {
            token: resolve(k, current, i),
        },
        Op::PreferencesJoin(k) => Input::PreferencesJoin {
            token: resolve(k, current, i),
        },
        Op::Erase => Input::Erase,
        Op::CampaignsConfirmed => Input::CampaignsConfirmed,
    }
}

fn limits(case: &Case) -> Limits {
    Limits {
        max_reminders: case.max_reminders,
        // Steps are a minute apart: signups land on both sides of the window.
        reminder_after: chrono::Duration::minutes(5),
    }
}

/// Apply the steps from a fresh consent and record every step.
fn run(case: &Case) -> Vec<Rec> {
    let mut current = Consent::new(t0());
    let mut history = Vec::with_capacity(case.steps.len());
    for (i, step) in case.steps.iter().enumerate() {
        let now = t0() + chrono::Duration::minutes(i as i64 + 1);
        let input = input_of(&step.op, &current, i);
        // These properties are about lists whose DOI optinsync runs itself.
        let cx = Context {
            suppressed: step.suppressed,
            campaigns_doi: false,
            erasure_only: step.erasure_only,
        };
        let result = transition(&current, &input, limits(case), cx, now);
        let after = match &result {
            Ok(Some(t)) => t.next.clone(),
            Ok(None) | Err(_) => current.clone(),
        };
        history.push(Rec {
            before: current,
            input,
            cx,
            result,
            after: after.clone(),
        });
        current = after;
    }
    history
}

fn is_exit(s: ConsentState) -> bool {
    matches!(
        s,
        ConsentState::Withdrawn
            | ConsentState::Bounced
            | ConsentState::Complained
            | ConsentState::Erased
            | ConsentState::Lapsed
    )
}

fn is_blocked(s: ConsentState) -> bool {
    matches!(
        s,
        ConsentState::Withdrawn | ConsentState::Bounced | ConsentState::Complained
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // No regression files next to the sources; failures print their minimal case.
        failure_persistence: None,
        ..ProptestConfig::with_cases(512)
    }
}

proptest! {
    #![proptest_config(config())]

    /// Bookkeeping: an accepted transition starts from the current state and its `next`
    /// holds the state it names.
    #[test]
    fn transitions_are_consistent(case in case()) {
        for (i, r) in run(&case).iter().enumerate() {
            if let Some(t) = r.accepted() {
                prop_assert_eq!(t.from, r.before.state, "step {}: {:?}", i, r);
                prop_assert_eq!(t.next.state, t.to, "step {}: {:?}", i, r);
                prop_assert_eq!(&r.after, &t.next);
            } else {
                prop_assert_eq!(&r.after, &r.before);
            }
        }
    }

    /// `Subscribe` only on a Confirm of the waiting signup's token, into `confirmed`.
    #[test]
    fn subscribe_only_on_confirm_of_current_token(case in case()) {
        for (i, r) in run(&case).iter().enumerate() {
            let Some(t) = r.accepted() else { continue };
            if t.effects.contains(&Effect::Subscribe) {
                prop_assert_eq!(t.to, ConsentState::Confirmed, "step {}: {:?}", i, r);
                match &r.input {
                    Input::Confirm { token } => prop_assert_eq!(
                        r.before.signup_token.as_deref(),
                        Some(token.as_str()),
                        "step {}: {:?}", i, r
                    ),
                    Input::PreferencesJoin { .. } => prop_assert!(!r.cx.suppressed, "step {}: {:?}", i, r),
                    other => prop_assert!(false, "step {}: Subscribe on {:?}", i, other),
                }
            }
            if t.to == ConsentState::Confirmed && t.from != ConsentState::Confirmed {
                prop_assert!(
                    matches!(&r.input, Input::Confirm { token }
                        if r.before.signup_token.as_deref() == Some(token.as_str()))
                        || matches!(&r.input, Input::PreferencesJoin { .. }),
                    "step {}: entered confirmed without a valid confirm: {:?}", i, r
                );
            }
        }
    }

    /// On the list only after an accepted Confirm with no withdrawal or lapse since.
    #[test]
    fn on_list_only_after_confirm(case in case()) {
        let history = run(&case);
        for (i, r) in history.iter().enumerate() {
            if !r.after.state.on_list() {
                continue;
            }
            let last_confirm = history[..=i].iter().rposition(Rec::accepted_confirm);
            prop_assert!(last_confirm.is_some(), "step {}: on list without any confirm: {:?}", i, history);
            let since = last_confirm.unwrap_or_default();
            let exit = history[since + 1..=i]
                .iter()
                .position(|h| h.accepted().is_some_and(|t| is_exit(t.to)));
            prop_assert!(
                exit.is_none(),
                "step {}: on list although step {:?} left it after the last confirm (step {})",
                i, exit.map(|e| e + since + 1), since
            );
        }
    }

    /// Withdrawal wins: out of withdrawn/bounced/complained only by the person's own signup
    /// or join on the preference centre, back to confirmed only by confirming that signup (or
    /// that join); erased is final.
    #[test]
    fn withdrawal_is_sticky(case in case()) {
        let history = run(&case);
        // Set when the pair enters a withdrawal state, cleared by an accepted PersonSignup.
        let mut withdrawn_without_new_signup = false;
        for (i, r) in history.iter().enumerate() {
            let from = r.before.state;
            if from == ConsentState::Erased {
                prop_assert_eq!(r.after.state, ConsentState::Erased, "step {}: left erased: {:?}", i, r);
            }
            if is_blocked(from) || from == ConsentState::Erased {
                if matches!(
                    r.input,
                    Input::CrmAsserted | Input::SendDoi { .. } | Input::SendReminder | Input::Lapse
                ) {
                    prop_assert!(r.accepted().is_none(), "step {}: {:?} changed a withdrawal: {:?}", i, r.input, r);
                }
                if let Some(t) = r.accepted() {
                    let ok = t.to.is_withdrawal()
                        || (t.to == ConsentState::Pending
                            && matches!(r.input, Input::PersonSignup { .. } | Input::Signup { .. }))
                        || (t.to == ConsentState::Confirmed
                            && matches!(r.input, Input::PreferencesJoin { .. }));
                    prop_assert!(ok, "step {}: left {:?} to {:?} on {:?}", i, from, t.to, r.input);
                }
            }
            if let Some(t) = r.accepted() {
                // The person's own join on the preference centre (a mailed link) is a
                // fresh choice of theirs, like a new signup confirmed.
                if t.to == ConsentState::Confirmed
                    && !matches!(r.input, Input::PreferencesJoin { .. })
                {
                    prop_assert!(
                        !withdrawn_without_new_signup,
                        "step {}: confirmed after a withdrawal without a new signup: {:?}", i, history
                    );
                }
                if t.to.is_withdrawal() {
                    withdrawn_without_new_signup = true;
                } else if matches!(
                    r.input,
                    Input::PersonSignup { .. } | Input::Signup { .. } | Input::PreferencesJoin { .. }
                ) {
                    withdrawn_without_new_signup = false;
                }
            }
        }
    }

    /// At most one DOI mail plus `max_reminders` reminders per signup, each for that signup's
    /// token.
    #[test]
    fn confirmation_mails_bounded_per_signup(case in case()) {
        let history = run(&case);
        let bound = 1 + case.max_reminders as usize;
        let mut mails = 0usize;
        for (i, r) in history.iter().enumerate() {
            if r.starts_signup() {
                mails = 0;
            }
            mails += r.mails();
            prop_assert!(mails <= bound, "step {}: {} mails for one signup (limit {}): {:?}", i, mails, bound, history);
            if let Some(t) = r.accepted() {
                for e in &t.effects {
                    if let Effect::SendConfirmationMail { token, .. } = e {
                        prop_assert_eq!(
                            t.next.signup_token.as_deref(),
                            Some(token.as_str()),
                            "step {}: mail for a token that is not the signup's: {:?}", i, r
                        );
                    }
                }
            }
        }
    }

    /// No confirmation mail to a suppressed address, except the DOI mail of a website
    /// signup for an address suppressed by its erasure alone (the way back of its person).
    #[test]
    fn no_mail_when_suppressed(case in case()) {
        for (i, r) in run(&case).iter().enumerate() {
            let way_back = r.cx.erasure_only && matches!(r.input, Input::Signup { .. });
            if r.cx.suppressed && !way_back {
                prop_assert_eq!(r.mails(), 0, "step {}: mail while suppressed: {:?}", i, r);
            }
        }
    }

    /// A website signup never mails an open signup again inside the reminder window.
    #[test]
    fn website_signup_respects_the_reminder_window(case in case()) {
        let window = limits(&case).reminder_after;
        for (i, r) in run(&case).iter().enumerate() {
            if matches!(r.input, Input::Signup { .. }) && r.before.state == ConsentState::Pending {
                let now = t0() + chrono::Duration::minutes(i as i64 + 1);
                if now - r.before.since < window {
                    prop_assert_eq!(r.mails(), 0, "step {}: re-mailed inside the window: {:?}", i, r);
                }
            }
        }
    }

    /// Leaving the list for a withdrawal or erasure always takes the address off it.
    #[test]
    fn leaving_the_list_removes(case in case()) {
        for (i, r) in run(&case).iter().enumerate() {
            let Some(t) = r.accepted() else { continue };
            if t.from.on_list() && t.to.is_withdrawal() {
                prop_assert!(t.effects.contains(&Effect::Remove), "step {}: no Remove: {:?}", i, r);
            }
            if t.from.on_list() && !t.to.on_list() {
                prop_assert!(t.effects.contains(&Effect::Remove), "step {}: left the list without Remove: {:?}", i, r);
            }
        }
    }
}

/// The generator reaches the interesting states (so the properties are not vacuous).
#[test]
fn generator_reaches_every_state() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    let mut subscribes = 0;
    for _ in 0..512 {
        let c = case()
            .new_tree(&mut runner)
            .expect("generate a case")
            .current();
        for r in run(&c) {
            seen.insert(r.after.state.as_str());
            if r.accepted()
                .is_some_and(|t| t.effects.contains(&Effect::Subscribe))
            {
                subscribes += 1;
            }
        }
    }
    for s in ConsentState::ALL {
        assert!(seen.contains(s.as_str()), "state {s} never reached");
    }
    assert!(subscribes > 50, "only {subscribes} subscribes generated");
}

/// The shrunk counterexample of `no_mail_when_suppressed`, kept as a plain regression test.
#[test]
fn person_signup_of_suppressed_address_sends_no_mail() {
    let cx = Context {
        suppressed: true,
        campaigns_doi: false,
        erasure_only: false,
    };
    let lim = Limits::with_reminders(1);
    let r = transition(
        &Consent::new(t0()),
        &Input::PersonSignup { token: "t1".into() },
        lim,
        cx,
        t0(),
    );
    let mails: Vec<Effect> = match &r {
        Ok(Some(t)) => t
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::SendConfirmationMail { .. }))
            .cloned()
            .collect(),
        _ => vec![],
    };
    assert!(
        mails.is_empty(),
        "PersonSignup on a suppressed address produced {mails:?} ({r:?})"
    );
}
