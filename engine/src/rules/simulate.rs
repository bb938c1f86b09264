//! `rules simulate`: run a candidate rule set against every contact in the store **without
//! changing anything**, dry-run each proposal through the consent state machine, and compare
//! with the rules in force — so an operator sees "this change would remove 12,408 contacts"
//! before saving it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::input::{self, ListCtx};
use super::input_for;
use super::{Action, RuleSet};
use crate::config::ListConfig;
use crate::consent::{self, Consent, ConsentState};
use crate::store::{Contact, Store, StoreError};
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

/// The three maps a script receives for one pair.
type Maps = (rhai::Map, rhai::Map, rhai::Map);

/// Decisions of one set for one pair, classified by the state machine.
fn classify(
    set: &RuleSet,
    maps: Maps,
    consent: &Consent,
    list: &ListConfig,
    suppressed: bool,
    now: DateTime<Utc>,
) -> Result<Vec<(Action, bool)>, ()> {
    let proposals = set.decide_owned(maps.0, maps.1, maps.2).map_err(|_| ())?;
    let (limits, cx) = crate::plan::limits_and_context(list, suppressed, false);
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

/// Contacts read per store round trip: each page costs four queries, whatever its size.
const PAGE: i64 = 1000;

/// One page of contacts and everything the rules and the state machine need about them.
pub(crate) struct Page {
    pub(crate) contacts: Vec<Contact>,
    pub(crate) consents: HashMap<(String, String), Consent>,
    pub(crate) engagement: HashMap<(String, String), DateTime<Utc>>,
    /// Per contact, in order: is any of its address hashes suppressed.
    pub(crate) suppressed: Vec<bool>,
}

/// The page after `after`, in one batch read per table; `None` past the last contact.
pub(crate) async fn read_page(
    store: &dyn Store,
    tokens: &TokenKeys,
    after: Option<&str>,
) -> Result<Option<Page>, StoreError> {
    let contacts = store.contacts_page(after, PAGE).await?;
    if contacts.is_empty() {
        return Ok(None);
    }
    let ids: Vec<String> = contacts.iter().map(|c| c.id.clone()).collect();
    let hashes: Vec<Vec<String>> = contacts
        .iter()
        .map(|c| tokens.address_hashes(&c.email))
        .collect();
    let all_hashes = hashes.concat();
    // Independent reads: a store with several connections answers them at once.
    let (consents, engagement, found) = tokio::try_join!(
        store.consents_of_contacts(&ids),
        store.engagements_of_contacts(&ids),
        store.suppressed_among(&all_hashes),
    )?;
    let consents = consents
        .into_iter()
        .map(|(contact, list, consent)| ((contact, list), consent))
        .collect();
    let engagement = engagement
        .into_iter()
        .map(|(contact, list, at)| ((contact, list), at))
        .collect();
    let found: HashSet<String> = found.into_iter().collect();
    let suppressed = hashes
        .iter()
        .map(|hs| hs.iter().any(|h| found.contains(h)))
        .collect();
    Ok(Some(Page {
        contacts,
        consents,
        engagement,
        suppressed,
    }))
}

/// Evaluate `candidate` (and `running`, for the diff) on every contact × list. Read-only.
///
/// The store is read a page at a time (contacts, then their consents, engagement and
/// suppressions in one batch read each) by a task of its own that stays one page ahead, so
/// reading the next page overlaps deciding this one; memory stays a few pages whatever the
/// number of contacts, and the cost grows linearly with it.
pub async fn simulate(
    store: Arc<dyn Store>,
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
    let list_ctxs: Vec<ListCtx> = lists.iter().map(ListCtx::new).collect();
    let (pages_tx, mut pages) = tokio::sync::mpsc::channel(1);
    let tokens = tokens.clone();
    // Ends after the last page, on an error, or when the receiver is gone (a failed or
    // cancelled simulation).
    tokio::spawn(async move {
        let mut after: Option<String> = None;
        loop {
            let page = read_page(store.as_ref(), &tokens, after.as_deref()).await;
            if let Ok(Some(p)) = &page {
                after = p.contacts.last().map(|c| c.id.clone());
            }
            let last = !matches!(page, Ok(Some(_)));
            if pages_tx.send(page).await.is_err() || last {
                break;
            }
        }
    });
    while let Some(page) = pages.recv().await {
        let Some(mut page) = page? else { break };
        for (contact, &is_suppressed) in page.contacts.iter().zip(&page.suppressed) {
            report.contacts += 1;
            let contact_map = input::contact_map(contact);
            for (list, list_ctx) in lists.iter().zip(&list_ctxs) {
                let key = (contact.id.clone(), list.id.clone());
                let consent = page
                    .consents
                    .remove(&key)
                    .unwrap_or_else(|| Consent::new(now));
                if consent.state == ConsentState::Erased {
                    continue;
                }
                report.pairs += 1;
                let maps = (
                    contact_map.clone(),
                    input::consent_map(&consent, page.engagement.get(&key).copied(), now),
                    list_ctx.at(now),
                );
                let (for_running, for_candidate) = match running {
                    Some(_) => (Some(maps.clone()), maps),
                    None => (None, maps),
                };
                let cand = classify(candidate, for_candidate, &consent, list, is_suppressed, now);
                record(&mut report.candidate, &cand, &contact.id, samples);
                if let (Some(run_set), Some(run_out), Some(maps)) =
                    (running, report.running.as_mut(), for_running)
                {
                    let run = classify(run_set, maps, &consent, list, is_suppressed, now);
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
