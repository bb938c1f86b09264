//! Benchmark: rule decisions of the default policy (`rules/`), one thread.
//!
//! Run: `cargo bench --bench decide` (optionally `-- 5` to run each figure for 5 s).
//! Inputs vary over every consent state and ages just below, at and above each threshold of
//! the list settings, so every branch of the policy is taken. Prints decisions/s for
//! - a pass: per pair, build the contact and consent maps, take `ctx` from a per-list
//!   `ListCtx`, and call `RuleSet::decide_owned` (the headline figure);
//! - the borrowing `RuleSet::decide` on maps built afresh per pair (`input::ctx_map` too);
//! - the borrowing `RuleSet::decide` on prebuilt maps (the script call and its copies);
//!
//! and the actions proposed. Each figure is the best of five rounds, in decisions per
//! wall-clock second and per CPU second of the benchmark's thread (comparable on a busy
//! machine). It asserts nothing about speed.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use optinsync_engine::config::ListConfig;
use optinsync_engine::consent::{Consent, ConsentState};
use optinsync_engine::rules::RuleSet;
use optinsync_engine::rules::input::{self, ListCtx};
use optinsync_engine::store::Contact;

/// One (contact, consent, last engagement) case.
struct Case {
    contact: Contact,
    consent: Consent,
    engagement: Option<DateTime<Utc>>,
}

fn cases(list: &ListConfig, now: DateTime<Utc>) -> Vec<Case> {
    let thresholds = [
        list.reminder_after.secs(),
        list.pending_expiry.secs(),
        list.inactivity.secs(),
        list.revalidation_grace.secs(),
    ];
    let mut ages = vec![0_i64, 60];
    for t in thresholds {
        ages.extend([t - 1, t, t + 1]);
    }
    let ago = |s: i64| now - chrono::Duration::seconds(s);
    let mut out = Vec::new();
    let mut i = 0_usize;
    for state in ConsentState::ALL {
        if state == ConsentState::Erased {
            // The engine never asks the rules about erased contacts.
            continue;
        }
        for &age in &ages {
            for reminders_sent in 0..=1 {
                for (confirmed, engaged) in [(None, None), (Some(age), None), (None, Some(age / 2))]
                {
                    i += 1;
                    out.push(Case {
                        contact: Contact {
                            id: format!("{i:08}"),
                            email: format!("person{i}@example.org"),
                            erased: false,
                            language: i.is_multiple_of(2).then(|| "en".to_owned()),
                            fields: BTreeMap::from([(
                                "First_Name".to_owned(),
                                serde_json::Value::String(format!("P{i}")),
                            )]),
                            crm_records: vec![optinsync_plugin_api::RecordRef {
                                module: "Contacts".into(),
                                id: i.to_string(),
                            }],
                            created_at: now,
                            updated_at: now,
                        },
                        consent: Consent {
                            state,
                            since: ago(age),
                            signup_token: None,
                            doi_mails: 1,
                            reminders_sent,
                            confirmed_at: confirmed.map(ago),
                            confirmed_token: None,
                            last_seq: None,
                        },
                        engagement: engaged.map(ago),
                    });
                }
            }
        }
    }
    out
}

/// CPU time this thread has used, from `/proc/thread-self/stat` (clock ticks of 1/100 s).
/// On a machine shared with other work, decisions per CPU second stay comparable where
/// decisions per wall-clock second do not.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Decisions per wall-clock second and per CPU second of this thread.
#[derive(Clone, Copy, Default)]
struct Rate {
    wall: f64,
    cpu: f64,
}

/// Run `f` over the cases in a loop for `secs`.
fn rate(secs: f64, cases: usize, mut f: impl FnMut(usize)) -> Rate {
    let budget = Duration::from_secs_f64(secs);
    let cpu_start = thread_cpu();
    let start = Instant::now();
    let mut n = 0_u64;
    loop {
        for i in 0..cases {
            f(i);
        }
        n += cases as u64;
        if start.elapsed() >= budget {
            break;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu_start, thread_cpu()) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => f64::NAN,
    };
    Rate {
        wall: n as f64 / wall,
        cpu: n as f64 / cpu,
    }
}

/// Best of several rounds (the one least disturbed by other work), per measure.
fn best(rounds: &[Rate]) -> Rate {
    rounds.iter().fold(Rate::default(), |b, r| Rate {
        wall: b.wall.max(r.wall),
        cpu: if r.cpu.is_nan() {
            b.cpu
        } else {
            b.cpu.max(r.cpu)
        },
    })
}

/// Rounds per figure; the figures take turns so outside load spreads over all of them.
const ROUNDS: usize = 5;

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3.0);
    let rules_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let set = RuleSet::load_checked(&rules_dir).unwrap();
    let list: ListConfig = toml::from_str("id = \"newsletter\"\nname = \"Newsletter\"").unwrap();
    let now = Utc::now();
    let cases = cases(&list, now);

    // What the policy proposes over the cases (also checks every call succeeds).
    let mut actions: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &cases {
        let got = set
            .decide(
                &input::contact_map(&c.contact),
                &input::consent_map(&c.consent, c.engagement, now),
                &input::ctx_map(&list, now),
            )
            .unwrap();
        if got.is_empty() {
            *actions.entry("(nothing)").or_default() += 1;
        }
        for p in got {
            *actions.entry(p.action.as_str()).or_default() += 1;
        }
    }

    let prebuilt: Vec<_> = cases
        .iter()
        .map(|c| {
            (
                input::contact_map(&c.contact),
                input::consent_map(&c.consent, c.engagement, now),
                input::ctx_map(&list, now),
            )
        })
        .collect();
    let mut proposals = 0_usize;
    let list_ctx = ListCtx::new(&list);
    let round = secs / ROUNDS as f64;
    let (mut pass, mut borrowed, mut script_only) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        pass.push(rate(round, cases.len(), |i| {
            let c = &cases[i];
            let got = set
                .decide_owned(
                    input::contact_map(&c.contact),
                    input::consent_map(&c.consent, c.engagement, now),
                    list_ctx.at(now),
                )
                .unwrap();
            proposals += got.len();
        }));
        borrowed.push(rate(round, cases.len(), |i| {
            let c = &cases[i];
            let got = set
                .decide(
                    &input::contact_map(&c.contact),
                    &input::consent_map(&c.consent, c.engagement, now),
                    &input::ctx_map(&list, now),
                )
                .unwrap();
            proposals += got.len();
        }));
        script_only.push(rate(round, prebuilt.len(), |i| {
            let (contact, consent, ctx) = &prebuilt[i];
            proposals += set.decide(contact, consent, ctx).unwrap().len();
        }));
    }
    let (pass, borrowed, script_only) = (best(&pass), best(&borrowed), best(&script_only));

    println!(
        "decide benchmark: default policy ({}), {} input cases, one thread, {secs} s per figure \
         (best of {ROUNDS} rounds)",
        rules_dir.display(),
        cases.len()
    );
    println!("                                        decisions/s   per CPU second");
    for (name, r) in [
        ("pass (maps + ListCtx + decide_owned)", pass),
        ("maps + ctx_map + decide(&maps)", borrowed),
        ("decide(&maps) on prebuilt maps", script_only),
    ] {
        println!("  {name:<36} {:>12.0} {:>16.0}", r.wall, r.cpu);
    }
    println!("  actions over the cases: {actions:?}");
    // Printed so the work cannot be optimised away.
    println!("  ({proposals} proposals in total)");
}
