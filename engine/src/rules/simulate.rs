//! `rules simulate`: run a candidate rule set against every contact in the store **without
//! changing anything**, dry-run each proposal through the consent state machine, and compare
//! with the rules in force — so an operator sees "this change would remove 12,408 contacts"
//! before saving it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Action, RuleSet, input};
use crate::config::ListConfig;
use crate::consent::{self, Consent, ConsentState};
use crate::engine::input_for;
use crate::store::{Store, StoreError};
use crate::tokens::TokenKeys;

/// What one rule set would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcomes {
    /// Proposals the state machine would carry out, per action.
    pub would_apply: BTreeMap<String, u64>,
    /// Proposals the state machine would refuse (invariants), per action.
    pub refused: BTreeMap<String, u64>,
    /// Contacts whose decision failed with a script error.
    pub rule_errors: u64,
    /// Up to `samples` contact ids per applied action.
    pub samples: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub contacts: u64,
    /// (contact, list) pairs evaluated.
    pub pairs: u64,
    pub candidate: Outcomes,
    pub running: Option<Outcomes>,
    /// Pairs where the candidate would do something different from the running rules.
    pub changed_pairs: u64,
}

impl Report {
    /// Per action: candidate count minus running count (only actions that differ).
    pub fn diff(&self) -> BTreeMap<String, i64> {
        let Some(running) = &self.running else {
            return BTreeMap::new();
        };
        let mut keys: Vec<&String> = self
            .candidate
            .would_apply
            .keys()
            .chain(running.would_apply.keys())
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| {
                let c = *self.candidate.would_apply.get(k).unwrap_or(&0) as i64;
                let r = *running.would_apply.get(k).unwrap_or(&0) as i64;
                (c != r).then(|| (k.clone(), c - r))
            })
            .collect()
    }
}

/// Decisions of one set for one pair, classified by the state machine.
fn classify(
    set: &RuleSet,
    maps: &(rhai::Map, rhai::Map, rhai::Map),
    consent: &Consent,
    list: &ListConfig,
    suppressed: bool,
    now: DateTime<Utc>,
) -> Result<Vec<(Action, bool)>, ()> {
    let proposals = set.decide(&maps.0, &maps.1, &maps.2).map_err(|_| ())?;
    let limits = consent::Limits {
        max_reminders: list.max_reminders,
    };
    let cx = consent::Context {
        suppressed,
        campaigns_doi: list.doi == crate::config::DoiMode::Campaigns,
    };
    // Each proposal is judged on the state the previous ones would have left.
    let mut state = consent.clone();
    let mut out = Vec::new();
    for p in proposals {
        let legal = match input_for(p.action) {
            Some(input) => match consent::transition(&state, &input, limits, cx, now) {
                Ok(Some(t)) => {
                    state = t.next;
                    true
                }
                Ok(None) => continue,
                Err(_) => false,
            },
            None if p.action == Action::Subscribe => state.state.on_list(),
            None => continue,
        };
        out.push((p.action, legal));
    }
    Ok(out)
}

fn record(
    o: &mut Outcomes,
    result: &Result<Vec<(Action, bool)>, ()>,
    contact_id: &str,
    samples: usize,
) {
    match result {
        Err(()) => o.rule_errors += 1,
        Ok(actions) => {
            for (action, legal) in actions {
                let key = action.as_str().to_owned();
                if *legal {
                    *o.would_apply.entry(key.clone()).or_default() += 1;
                    let s = o.samples.entry(key).or_default();
                    if s.len() < samples {
                        s.push(contact_id.to_owned());
                    }
                } else {
                    *o.refused.entry(key).or_default() += 1;
                }
            }
        }
    }
}

/// Evaluate `candidate` (and `running`, for the diff) on every contact × list. Read-only.
pub async fn simulate(
    store: &dyn Store,
    lists: &[ListConfig],
    tokens: &TokenKeys,
    candidate: &RuleSet,
    running: Option<&RuleSet>,
    samples: usize,
    mut progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    let now = Utc::now();
    let mut report = Report {
        running: running.map(|_| Outcomes::default()),
        ..Report::default()
    };
    let mut after: Option<String> = None;
    loop {
        let page = store.contacts_page(after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        for contact in &page {
            report.contacts += 1;
            let suppressed = store
                .is_any_suppressed(&tokens.address_hashes(&contact.email))
                .await?;
            let consents: BTreeMap<String, Consent> = store
                .consents_of_contact(&contact.id)
                .await?
                .into_iter()
                .collect();
            let contact_map = input::contact_map(contact);
            for list in lists {
                let consent = consents
                    .get(&list.id)
                    .cloned()
                    .unwrap_or_else(|| Consent::new(now));
                if consent.state == ConsentState::Erased {
                    continue;
                }
                report.pairs += 1;
                let engagement = store.last_engagement(&contact.id, &list.id).await?;
                let maps = (
                    contact_map.clone(),
                    input::consent_map(&consent, engagement, now),
                    input::ctx_map(list, now),
                );
                let cand = classify(candidate, &maps, &consent, list, suppressed, now);
                record(&mut report.candidate, &cand, &contact.id, samples);
                if let (Some(run_set), Some(run_out)) = (running, report.running.as_mut()) {
                    let run = classify(run_set, &maps, &consent, list, suppressed, now);
                    record(run_out, &run, &contact.id, samples);
                    if run != cand {
                        report.changed_pairs += 1;
                    }
                }
            }
        }
        progress(report.contacts);
    }
    Ok(report)
}
