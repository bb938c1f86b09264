//! Row 5: rule decisions with the default policy (`rules/`), single thread, through the
//! engine's public API: `RuleSet::load_checked`, then `decide` with the maps built by
//! `rules::input` exactly as the daemon builds them (contact and consent map per decision,
//! the list context once per pass).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use optinsync_engine::config::ListConfig;
use optinsync_engine::consent::{Consent, ConsentState};
use optinsync_engine::rules::{RuleSet, input};
use optinsync_engine::store::Contact;

/// Distinct synthetic (contact, consent, last engagement) triples, cycled through.
const VARIETY: usize = 10_000;

/// A contact and its consent in every state, with ages spread over the windows the default
/// policy looks at (reminder, expiry, inactivity, re-permission grace).
fn sample(i: usize, now: DateTime<Utc>) -> (Contact, Consent, Option<DateTime<Utc>>) {
    let mut fields = BTreeMap::new();
    fields.insert("First_Name".to_owned(), serde_json::json!(format!("U{i}")));
    fields.insert("Last_Name".to_owned(), serde_json::json!(format!("L{i}")));
    let contact = Contact {
        id: format!("c{i:08}"),
        email: format!("user{i}@example.test"),
        erased: false,
        language: Some(if i % 4 == 3 { "es" } else { "en" }.to_owned()),
        fields,
        crm_records: vec![optinsync_plugin_api::RecordRef {
            module: "Contacts".into(),
            id: (4_150_868_100_000_000_000u64 + i as u64).to_string(),
        }],
        created_at: now,
        updated_at: now,
    };
    let state = ConsentState::ALL[i % ConsentState::ALL.len()];
    // Ages from minutes to three years, so every branch of the policy is taken.
    let age = chrono::Duration::minutes(((i * 7919) % (3 * 365 * 24 * 60)) as i64);
    let since = now - age;
    let mut consent = Consent::new(since);
    consent.state = state;
    consent.signup_token = matches!(state, ConsentState::Pending | ConsentState::Revalidating)
        .then(|| format!("tok-{i}"));
    consent.doi_mails = u32::from(consent.signup_token.is_some());
    consent.reminders_sent = (i.is_multiple_of(3) && state == ConsentState::Pending) as u32;
    consent.confirmed_at =
        matches!(state, ConsentState::Confirmed | ConsentState::Revalidating).then_some(since);
    consent.last_seq = Some(i as i64);
    let engagement = i
        .is_multiple_of(5)
        .then(|| now - chrono::Duration::days((i % 900) as i64));
    (contact, consent, engagement)
}

/// `n` decisions; returns the time they took (map building included) and the proposals made.
pub fn run(n: u64) -> anyhow::Result<(Duration, u64)> {
    let rules = RuleSet::load_checked(&crate::setup::repo().join("rules"))
        .context("loading the default rules")?;
    let list: ListConfig = toml::from_str(
        "id = \"newsletter\"\nname = \"Newsletter\"\nreminder_after = \"3d\"\npending_expiry = \"14d\"\nmax_reminders = 1",
    )
    .context("list settings")?;
    let now = Utc::now();
    let samples: Vec<_> = (0..VARIETY).map(|i| sample(i, now)).collect();
    let ctx = input::ctx_map(&list, now);
    // Warm-up (allocator, caches), untimed: the 10k row would otherwise measure it.
    for (contact, consent, engagement) in samples.iter().take(1_000) {
        let c = input::contact_map(contact);
        let k = input::consent_map(consent, *engagement, now);
        rules.decide(&c, &k, &ctx).context("warm-up decision")?;
    }
    let mut proposals = 0u64;
    let start = Instant::now();
    for i in 0..n as usize {
        let (contact, consent, engagement) = &samples[i % VARIETY];
        let c = input::contact_map(contact);
        let k = input::consent_map(consent, *engagement, now);
        let out = rules
            .decide(&c, &k, &ctx)
            .with_context(|| format!("deciding for {}", contact.id))?;
        proposals += out.len() as u64;
    }
    Ok((start.elapsed(), proposals))
}
