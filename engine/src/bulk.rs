//! Decisions for many contacts at once: CRM pages and rules passes.
//!
//! The same state machine and rules as [`Engine::apply`], planned in memory against state read
//! in a few batch queries, then written by one [`Store::commit_batch`]. A pair whose consent
//! changed meanwhile (a click, a webhook) is left out by the store and planned again on fresh
//! state, like `apply` retries; so the outcome is that of applying one input after another.
//!
//! [`Store::commit_batch`]: crate::store::Store::commit_batch

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{CrmRecord, Cursor};

use crate::config::ListConfig;
use crate::consent::{self, Consent, ConsentState, Input};
use crate::email;
use crate::engine::{DecideStats, Engine, EngineError, EngineResult, PullStats};
use crate::ledger::{EventSource, Evidence, LedgerEvent};
use crate::plan::{commit_for, count_refusal, transition_for, warn_refusal};
use crate::rules::{Action, RuleSet, input, input_for};
use crate::store::{BatchCommit, Contact, ContactUpsert, StoreResult};
use crate::untrusted::{Escaped, clean_fields, clean_text};
use crate::waves::Gate;

/// Rounds of re-planning for pairs that changed concurrently before giving up (as `apply`).
const ROUNDS: usize = 5;

/// What one CRM page did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Records that became (or updated) a contact.
    pub records: u64,
    /// Records skipped: no or an invalid address.
    pub invalid: u64,
    /// Records skipped because their address was erased (GDPR Art. 17): the person asked to
    /// be forgotten, so the address is not stored again; its keyed hash keeps it suppressed.
    pub erased: u64,
    /// Consent changes the CRM's assertions and opt-outs made.
    pub crm_changes: u64,
    /// What the rules did for the contacts of the page right after.
    pub decided: DecideStats,
    /// Where the time went: storing contacts, reading consent state, deciding (state
    /// machine + rules, in memory), committing.
    pub timings: Timings,
}

/// Time spent per step of a batch (summed over batches by the caller).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub upsert: std::time::Duration,
    pub load: std::time::Duration,
    pub decide: std::time::Duration,
    pub commit: std::time::Duration,
}

impl Timings {
    pub fn add(&mut self, o: &Timings) {
        self.upsert += o.upsert;
        self.load += o.load;
        self.decide += o.decide;
        self.commit += o.commit;
    }
}

/// An input the CRM asserts for a contact (in record order).
struct CrmInput {
    contact: usize,
    list: usize,
    input: Input,
    record: String,
}

/// State of one batch, read in bulk, updated in memory as commits are planned.
struct Plan<'e> {
    engine: &'e Engine,
    now: DateTime<Utc>,
    consents: HashMap<(String, String), Consent>,
    engagement: HashMap<(String, String), DateTime<Utc>>,
    suppressed: HashSet<String>,
    /// Pairs that already have a commit in this batch (the next one `follows` it).
    touched: HashSet<(String, String)>,
    commits: Vec<BatchCommit>,
    /// Index of the contact (in the batch) each commit belongs to.
    owners: Vec<usize>,
    /// Refused proposals and failed rules, by contact (counted once their round is final).
    misses: Vec<(usize, Miss)>,
    /// The lists' sending plans and pauses: which mails the rules may start now.
    pacer: crate::waves::Pacer,
    /// The address hashes of the planned contacts: whose state the plan read. (A contact is
    /// one address, so no hash in common means no contact in common.)
    reads: Reads,
}

/// See [`Plan::reads`].
#[derive(Default)]
struct Reads(HashSet<String>);

impl Reads {
    /// Whether committing the plan that read `other` leaves these reads as they were: no
    /// address hash (a contact, or a suppression it may add) in common. Two batches of one
    /// pull are independent unless an address recurs in both.
    fn independent_of(&self, other: &Reads) -> bool {
        self.0.is_disjoint(&other.0)
    }
}

/// A decision that changed nothing and is counted in the metrics once its plan is written:
/// a plan made again (its contact's consent changed meanwhile, or the batch before touched
/// one of its addresses) must not count it twice. The warnings are logged when decided.
#[derive(Clone, Copy)]
enum Miss {
    /// A change the state machine (or the subscribe invariant) refused; `by_rules`: the rules
    /// proposed it (counted in the pass's `refused`), not the CRM.
    Refused {
        input: &'static str,
        by_rules: bool,
    },
    RuleError,
}

/// What a round wrote, and which contacts must be planned again.
#[derive(Default)]
struct Written {
    crm_changes: u64,
    decided: DecideStats,
    conflicted: HashSet<usize>,
}

enum Outcome {
    Changed,
    Unchanged,
    Refused(consent::Refusal),
}

impl<'e> Plan<'e> {
    async fn load(
        engine: &'e Engine,
        contacts: &[&Contact],
        pacer: crate::waves::Pacer,
    ) -> EngineResult<Plan<'e>> {
        let ids: Vec<String> = contacts.iter().map(|c| c.id.clone()).collect();
        let consents = engine
            .store
            .consents_of_contacts(&ids)
            .await?
            .into_iter()
            .map(|(c, l, k)| ((c, l), k))
            .collect();
        let engagement = engine
            .store
            .engagements_of_contacts(&ids)
            .await?
            .into_iter()
            .map(|(c, l, at)| ((c, l), at))
            .collect();
        let hashes: Vec<String> = contacts
            .iter()
            .flat_map(|c| engine.tokens.address_hashes(&c.email))
            .collect();
        let suppressed = engine
            .store
            .suppressed_among(&hashes)
            .await?
            .into_iter()
            .collect();
        let now = Utc::now();
        Ok(Plan {
            engine,
            now,
            pacer,
            consents,
            engagement,
            suppressed,
            touched: HashSet::new(),
            commits: Vec::new(),
            owners: Vec::new(),
            misses: Vec::new(),
            reads: Reads(hashes.into_iter().collect()),
        })
    }

    fn consent(&self, contact: &Contact, list: &ListConfig) -> Consent {
        self.consents
            .get(&(contact.id.clone(), list.id.clone()))
            .cloned()
            .unwrap_or_else(|| Consent::new(self.now))
    }

    /// [`Engine::apply`] in memory: decide, and queue the commit.
    fn apply(
        &mut self,
        owner: usize,
        contact: &Contact,
        list: &ListConfig,
        input: Input,
        source: EventSource,
        evidence: Evidence,
    ) -> Outcome {
        let key = (contact.id.clone(), list.id.clone());
        let current = self.consent(contact, list);
        // The current key's hash comes first (`TokenKeys::address_hashes`).
        let hashes = self.engine.tokens.address_hashes(&contact.email);
        let suppressed = hashes.iter().any(|h| self.suppressed.contains(h));
        let t = match transition_for(&current, &input, list, suppressed, self.now) {
            Ok(Some(t)) => t,
            Ok(None) => return Outcome::Unchanged,
            Err(refusal) => {
                warn_refusal(&contact.id, &list.id, &refusal, source);
                self.misses.push((
                    owner,
                    Miss::Refused {
                        input: refusal.input,
                        by_rules: source == EventSource::Rules,
                    },
                ));
                return Outcome::Refused(refusal);
            }
        };
        tracing::debug!(
            contact_id = %contact.id, list = %list.id, from = %t.from, to = %t.to, event = t.event,
            source = source.as_str(), "consent change planned"
        );
        let commit = commit_for(
            hashes.first().map_or("", String::as_str),
            contact,
            list,
            &input,
            t,
            current.last_seq,
            source,
            evidence,
            self.now,
        );
        if commit.suppress.is_some() {
            // Later inputs in this batch must see the address suppressed.
            self.suppressed.extend(hashes);
        }
        let next = commit.consent.clone();
        let follows = !self.touched.insert(key.clone());
        self.consents.insert(key, next);
        self.commits.push(BatchCommit::new(commit, follows));
        self.owners.push(owner);
        Outcome::Changed
    }

    /// The rules for one contact on every list, applied in memory.
    fn decide(
        &mut self,
        owner: usize,
        rules: &RuleSet,
        ctxs: &[input::ListCtx],
        contact: &Contact,
    ) {
        let engine = self.engine;
        let contact_map = input::contact_map(contact);
        for (list, ctx) in engine.lists().iter().zip(ctxs) {
            let consent = self.consent(contact, list);
            if consent.state == ConsentState::Erased {
                continue;
            }
            let engagement = self
                .engagement
                .get(&(contact.id.clone(), list.id.clone()))
                .copied();
            let proposals = match rules.decide_owned(
                contact_map.clone(),
                input::consent_map(&consent, engagement, self.now),
                ctx.at(self.now),
            ) {
                Ok(p) => p,
                Err(e) => {
                    // A broken rule fails this one decision; the contact is left unchanged.
                    tracing::warn!(contact_id = %contact.id, list = %list.id, error = %Escaped(&e), "rule failed; contact left unchanged");
                    self.misses.push((owner, Miss::RuleError));
                    continue;
                }
            };
            for p in proposals {
                let input = match input_for(p.action) {
                    Some(input) => input,
                    None if p.action == Action::Subscribe && !consent.state.on_list() => {
                        tracing::warn!(
                            contact_id = %contact.id, list = %list.id, state = %consent.state, reason = %Escaped(&p.reason),
                            rule = %p.rule_file, "rule proposed subscribe without confirmation; refused (invariant: only a confirmation subscribes)"
                        );
                        self.misses.push((
                            owner,
                            Miss::Refused {
                                input: "subscribe",
                                by_rules: true,
                            },
                        ));
                        continue;
                    }
                    // Subscribing happens on confirmation and write-back after every change,
                    // by themselves; `none` is nothing.
                    None => continue,
                };
                // A mail the list's plan does not allow now waits for a later pass (its
                // timers start when it goes); a paused list starts none.
                let gate = match crate::waves::mail_kind_of(&input) {
                    Some(kind) => self.pacer.check(&list.id, kind, &contact.email),
                    None => Gate::Free,
                };
                if gate == Gate::Held {
                    continue;
                }
                let evidence = Evidence {
                    rule_file: Some(p.rule_file.clone()),
                    rule_hash: Some(p.rule_hash.clone()),
                    reason: Some(p.reason.clone()),
                    ..Evidence::default()
                };
                let before = self.commits.len();
                let outcome = self.apply(owner, contact, list, input, EventSource::Rules, evidence);
                if let Gate::Paced(paced) = gate
                    && self.commits.len() > before
                {
                    self.pacer.take(&list.id, &paced);
                    if let Some(last) = self.commits.last_mut() {
                        last.commit.paced = Some(paced);
                    }
                }
                if let Outcome::Refused(r) = outcome {
                    tracing::warn!(
                        contact_id = %contact.id, list = %list.id, reason = %Escaped(&p.reason), rule = %p.rule_file,
                        refused = r.reason, "rule action refused"
                    );
                }
            }
        }
    }

    /// Write the planned commits. Contacts with a commit left out (their consent changed
    /// meanwhile) are reported for a re-plan. Every commit written is counted now, also one of
    /// a contact planned again: the re-plan sees it done and will not count it; refusals and
    /// rule errors of such a contact wait for the re-plan, which decides them afresh.
    async fn commit(self, timings: &mut Timings) -> EngineResult<Written> {
        let t0 = std::time::Instant::now();
        let (tally, commits) = self.into_commits();
        let written = seqs(tally.engine.store.commit_batch(&commits).await?);
        timings.commit += t0.elapsed();
        Ok(tally.written(&commits, &written))
    }

    /// The commits, and what is needed to count them once written.
    fn into_commits(self) -> (Tally<'e>, Vec<BatchCommit>) {
        let tally = Tally {
            engine: self.engine,
            owners: self.owners,
            misses: self.misses,
        };
        (tally, self.commits)
    }

    /// [`Plan::commit`] on a task of its own, so that the caller plans the next batch on
    /// this thread while the store seals and writes this one on another.
    fn commit_on_task(self) -> Committing<'e> {
        let (tally, commits) = self.into_commits();
        let store = Arc::clone(&tally.engine.store);
        // A thread of the blocking pool rather than a runtime worker (bench rows 1 and 4 at
        // 100k, three runs each: the same speed, peak RSS 215-222 MiB against 225-238 MiB).
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            // The sealed events are freed on the thread that made them.
            let written = handle.block_on(store.commit_batch(&commits)).map(seqs);
            (commits, written)
        });
        Committing { tally, task }
    }
}

/// A plan's commit running on its own task ([`Plan::commit_on_task`]).
struct Committing<'e> {
    tally: Tally<'e>,
    task: tokio::task::JoinHandle<(Vec<BatchCommit>, StoreResult<Sealed>)>,
}

/// Per commit of a batch, the sequence number of its event, or `None` when it was left out.
type Sealed = Vec<Option<i64>>;

/// [`Sealed`] from what [`Store::commit_batch`](crate::store::Store::commit_batch) answers.
fn seqs(events: Vec<Option<LedgerEvent>>) -> Sealed {
    events.iter().map(|e| e.as_ref().map(|e| e.seq)).collect()
}

impl Committing<'_> {
    async fn finish(self) -> EngineResult<Written> {
        let (commits, written) = match self.task.await {
            Ok(done) => done,
            // Never cancelled (the handle is awaited, not aborted): a panic of the commit is
            // a panic of the pull.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        Ok(self.tally.written(&commits, &written?))
    }
}

/// What counting a written plan needs of it.
struct Tally<'e> {
    engine: &'e Engine,
    owners: Vec<usize>,
    misses: Vec<(usize, Miss)>,
}

impl Tally<'_> {
    fn written(self, commits: &[BatchCommit], written: &[Option<i64>]) -> Written {
        let mut out = Written::default();
        for (owner, ev) in self.owners.iter().zip(written) {
            if ev.is_none() {
                out.conflicted.insert(*owner);
            }
        }
        let mut queued = Vec::new();
        for (b, ev) in commits.iter().zip(written) {
            let Some(seq) = ev else { continue };
            queued.extend(b.commit.outbox.iter().map(|o| o.work.connector()));
            tracing::debug!(contact_id = %b.commit.contact_id, list = %b.commit.list_id, seq, "consent changed");
            if b.commit.event.source == EventSource::Crm {
                out.crm_changes += 1;
            } else {
                out.decided.changes += 1;
            }
        }
        for (owner, miss) in &self.misses {
            if !out.conflicted.contains(owner) {
                match *miss {
                    Miss::Refused { input, by_rules } => {
                        count_refusal(input);
                        if by_rules {
                            out.decided.refused += 1;
                        }
                    }
                    Miss::RuleError => {
                        metrics::counter!("optinsync_rule_errors_total").increment(1);
                        out.decided.rule_errors += 1;
                    }
                }
            }
        }
        self.engine.outbox_wake.wake(queued);
        out
    }
}

/// CRM records stored as contacts, with what the CRM asserts for them: a batch ready to plan.
struct Prepared {
    /// Records counted, skipped as invalid or erased (the rest is filled in once committed).
    stats: IngestStats,
    /// One contact per kept record (an address that recurs is one contact twice).
    upserted: Vec<Contact>,
    /// Index in `upserted` of each distinct contact, in first-seen order.
    distinct: Vec<usize>,
    crm_inputs: Vec<CrmInput>,
}

impl Prepared {
    fn contacts(&self) -> Vec<&Contact> {
        self.distinct.iter().map(|&i| &self.upserted[i]).collect()
    }
}

/// What a committed batch came to, and where the pull resumes after it.
type Committed = (IngestStats, Option<Cursor>);

/// A batch of a CRM pull: stored, its first round planned, not yet committed.
struct Batch<'e> {
    prepared: Prepared,
    /// `None` when no record of the batch was kept.
    plan: Option<Plan<'e>>,
    pacer: crate::waves::Pacer,
    /// Where the pull resumes once this batch is committed.
    cursor: Option<Cursor>,
}

impl Engine {
    /// One page of CRM records: upsert the contacts, apply what the CRM asserts (opt-out on
    /// any record wins over an assertion), then run the rules for those contacts — all in a
    /// handful of queries and one transaction for the consent changes.
    pub async fn ingest_records(&self, records: &[CrmRecord]) -> EngineResult<IngestStats> {
        let batch = self.plan_batch(self.prepare(records).await?, None).await?;
        Ok(self.commit_batch(batch).await?.0)
    }

    /// Check and store the records' contacts (normalised addresses, erased ones left out),
    /// and list what the CRM asserts for each.
    async fn prepare(&self, records: &[CrmRecord]) -> EngineResult<Prepared> {
        let mut stats = IngestStats::default();
        let mut upserts = Vec::with_capacity(records.len());
        let mut kept = Vec::with_capacity(records.len());
        for rec in records {
            let Some(raw) = rec.email.as_deref() else {
                tracing::warn!(record = %Escaped(&rec.record), "CRM record has no email address; skipped");
                stats.invalid += 1;
                continue;
            };
            let address = match email::normalise(raw) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(record = %Escaped(&rec.record), error = %e, "CRM record has an invalid email address; skipped");
                    stats.invalid += 1;
                    continue;
                }
            };
            for unknown in rec.asserted_lists.iter().filter(|l| self.list(l).is_none()) {
                tracing::warn!(record = %Escaped(&rec.record), list = %Escaped(unknown), "CRM asserts a list that is not configured");
            }
            upserts.push(ContactUpsert {
                email: address,
                // Control characters (NUL, escapes) go at ingest: these are single-line values.
                language: rec
                    .language
                    .as_deref()
                    .map(clean_text)
                    .filter(|l| !l.trim().is_empty()),
                fields: clean_fields(&rec.fields),
                crm_record: Some(rec.record.clone()),
            });
            kept.push(rec);
        }
        self.drop_erased(&mut upserts, &mut kept, &mut stats)
            .await?;
        stats.records = kept.len() as u64;
        let mut prepared = Prepared {
            stats,
            upserted: Vec::new(),
            distinct: Vec::new(),
            crm_inputs: Vec::new(),
        };
        if upserts.is_empty() {
            return Ok(prepared);
        }
        let t0 = std::time::Instant::now();
        prepared.upserted = self.store.upsert_contacts(&upserts, Utc::now()).await?;
        prepared.stats.timings.upsert = t0.elapsed();
        // One contact per address, in first-seen order; records keep their order.
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (k, (rec, contact)) in kept.iter().zip(&prepared.upserted).enumerate() {
            let at = *index.entry(contact.id.as_str()).or_insert_with(|| {
                prepared.distinct.push(k);
                prepared.distinct.len() - 1
            });
            for (l, list) in self.lists().iter().enumerate() {
                let input = if rec.opted_out {
                    Input::CrmOptedOut
                } else if rec.asserted_lists.iter().any(|a| a == &list.id) {
                    Input::CrmAsserted
                } else {
                    continue;
                };
                prepared.crm_inputs.push(CrmInput {
                    contact: at,
                    list: l,
                    input,
                    record: rec.record.to_string(),
                });
            }
        }
        Ok(prepared)
    }

    /// Plan a prepared batch's first round under the sending plans' budgets as of now.
    async fn plan_batch(
        &self,
        mut prepared: Prepared,
        cursor: Option<Cursor>,
    ) -> EngineResult<Batch<'_>> {
        let mut pacer = crate::waves::Pacer::default();
        let mut plan = None;
        if !prepared.upserted.is_empty() {
            pacer = crate::waves::Pacer::load(self, self.lists(), Utc::now()).await?;
            let mut timings = Timings::default();
            let contacts = prepared.contacts();
            let all: Vec<usize> = (0..contacts.len()).collect();
            plan = Some(
                self.plan_round(
                    &contacts,
                    &prepared.crm_inputs,
                    &all,
                    &mut timings,
                    &mut pacer,
                )
                .await?,
            );
            prepared.stats.timings.add(&timings);
        }
        Ok(Batch {
            prepared,
            plan,
            pacer,
            cursor,
        })
    }

    /// Commit a planned batch, then plan again and commit what changed concurrently; what it
    /// came to, and its cursor.
    async fn commit_batch(&self, batch: Batch<'_>) -> EngineResult<Committed> {
        let Batch {
            mut prepared,
            plan,
            pacer,
            cursor,
        } = batch;
        let Some(plan) = plan else {
            return Ok((prepared.stats, cursor));
        };
        let written = plan.commit(&mut prepared.stats.timings).await?;
        Ok((self.settle(prepared, pacer, written).await?, cursor))
    }

    /// Commit `before` on a task of its own while `next` is planned here ([`Engine::pull_crm`]);
    /// the next batch planned, and what the one before came to with its cursor.
    async fn commit_while_planning<'e>(
        &'e self,
        before: Batch<'e>,
        next: Prepared,
        cursor: Option<Cursor>,
    ) -> EngineResult<(Batch<'e>, Committed)> {
        let Batch {
            mut prepared,
            plan,
            pacer,
            cursor: before_cursor,
        } = before;
        let mut plan = match plan {
            Some(plan) if !pacer.has_budgets() => plan,
            plan => {
                // Nothing to overlap, or budgets the next plan must read as committed.
                let before = Batch {
                    prepared,
                    plan,
                    pacer,
                    cursor: before_cursor,
                };
                let done = self.commit_batch(before).await?;
                let next = self.plan_batch(next, cursor).await?;
                return Ok((next, done));
            }
        };
        let before_reads = std::mem::take(&mut plan.reads);
        let t0 = std::time::Instant::now();
        let committing = plan.commit_on_task();
        let (written, next) = tokio::join!(
            async {
                let written = committing.finish().await;
                (written, t0.elapsed())
            },
            self.plan_batch(next, cursor)
        );
        let (written, took) = written;
        prepared.stats.timings.commit += took;
        let mut next = next?;
        let done = self.settle(prepared, pacer, written?).await?;
        if next
            .plan
            .as_ref()
            .is_some_and(|p| !p.reads.independent_of(&before_reads))
        {
            // An address of this batch was in the one before: plan on what it committed.
            let Batch {
                prepared, cursor, ..
            } = next;
            next = self.plan_batch(prepared, cursor).await?;
        }
        Ok((next, (done, before_cursor)))
    }

    /// Count a committed batch of a pull and move the stored cursor past it.
    async fn pulled(
        &self,
        (done, cursor): Committed,
        stats: &mut PullStats,
        timings: &mut Timings,
        progress: &mut impl FnMut(&PullStats),
    ) -> EngineResult<()> {
        stats.records += done.records;
        stats.invalid += done.invalid;
        stats.erased += done.erased;
        stats.changes += done.crm_changes;
        stats.rule_changes += done.decided.changes;
        stats.rule_refused += done.decided.refused;
        stats.rule_errors += done.decided.rule_errors;
        timings.add(&done.timings);
        if let Some(next) = cursor {
            self.store.set_cursor("crm", &next.0, Utc::now()).await?;
        }
        progress(stats);
        Ok(())
    }

    /// After a batch's first commit: count it, and plan again (and commit) the contacts whose
    /// pairs changed concurrently.
    async fn settle(
        &self,
        mut prepared: Prepared,
        mut pacer: crate::waves::Pacer,
        written: Written,
    ) -> EngineResult<IngestStats> {
        let mut timings = Timings::default();
        let contacts = prepared.contacts();
        let all: Vec<usize> = (0..contacts.len()).collect();
        let (crm_changes, decided) = self
            .after_commit(
                &contacts,
                &prepared.crm_inputs,
                all,
                written,
                &mut timings,
                &mut pacer,
            )
            .await?;
        prepared.stats.timings.add(&timings);
        prepared.stats.crm_changes = crm_changes;
        prepared.stats.decided = decided;
        Ok(prepared.stats)
    }

    /// Leave out records whose address was erased. Erasure suppresses the address, so only
    /// suppressed addresses (few) are looked up.
    async fn drop_erased(
        &self,
        upserts: &mut Vec<ContactUpsert>,
        kept: &mut Vec<&CrmRecord>,
        stats: &mut IngestStats,
    ) -> EngineResult<()> {
        let hashes: Vec<String> = upserts
            .iter()
            .flat_map(|u| self.tokens.address_hashes(&u.email))
            .collect();
        let suppressed: HashSet<String> = self
            .store
            .suppressed_among(&hashes)
            .await?
            .into_iter()
            .collect();
        if suppressed.is_empty() {
            return Ok(());
        }
        let mut erased = vec![false; upserts.len()];
        for (i, u) in upserts.iter().enumerate() {
            let maybe = self
                .tokens
                .address_hashes(&u.email)
                .iter()
                .any(|h| suppressed.contains(h));
            erased[i] = maybe && self.is_erased(&u.email).await?;
        }
        let mut i = 0;
        kept.retain(|rec| {
            let keep = !erased[i];
            if !keep {
                tracing::info!(record = %Escaped(&rec.record), "CRM record carries an erased address; skipped, not stored again");
                stats.erased += 1;
            }
            i += 1;
            keep
        });
        let mut i = 0;
        upserts.retain(|_| {
            i += 1;
            !erased[i - 1]
        });
        Ok(())
    }

    /// Whether this (normalised) address was erased: then it must not be stored again.
    pub async fn is_erased(&self, address: &str) -> EngineResult<bool> {
        for h in self.tokens.address_hashes(address) {
            if self.store.is_suppressed(&h).await?
                && self.store.erased_contact_by_hash(&h).await?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Run the rules for these contacts on every list and apply what they propose.
    /// The sending plans' budgets as of now, for a rules pass.
    pub(crate) async fn pacer_now(&self) -> EngineResult<crate::waves::Pacer> {
        crate::waves::Pacer::load(self, self.lists(), Utc::now()).await
    }

    pub async fn decide_contacts(&self, contacts: &[Contact]) -> EngineResult<DecideStats> {
        let mut pacer = self.pacer_now().await?;
        self.decide_contacts_paced(contacts, &mut pacer).await
    }

    /// [`Engine::decide_contacts`] under the sending plans' budgets of a whole rules pass
    /// (read once at its start): once a plan's share is used up, no later page of the pass
    /// starts a mail ahead of the contacts an earlier page left waiting.
    pub(crate) async fn decide_contacts_paced(
        &self,
        contacts: &[Contact],
        pacer: &mut crate::waves::Pacer,
    ) -> EngineResult<DecideStats> {
        let refs: Vec<&Contact> = contacts.iter().collect();
        let (_, stats) = self
            .plan_rounds(&refs, &[], &mut Timings::default(), pacer)
            .await?;
        Ok(stats)
    }

    /// Plan and commit; contacts whose pairs changed concurrently are planned again on fresh
    /// state (their other commits, already written, make the re-plan a no-op for those).
    async fn plan_rounds(
        &self,
        contacts: &[&Contact],
        crm_inputs: &[CrmInput],
        timings: &mut Timings,
        pacer: &mut crate::waves::Pacer,
    ) -> EngineResult<(u64, DecideStats)> {
        let all: Vec<usize> = (0..contacts.len()).collect();
        let plan = self
            .plan_round(contacts, crm_inputs, &all, timings, pacer)
            .await?;
        let written = plan.commit(timings).await?;
        self.after_commit(contacts, crm_inputs, all, written, timings, pacer)
            .await
    }

    /// Read the state of the contacts `todo` (indexes into `contacts`) and decide for them
    /// in memory: the CRM's inputs first, then the rules.
    async fn plan_round(
        &self,
        contacts: &[&Contact],
        crm_inputs: &[CrmInput],
        todo: &[usize],
        timings: &mut Timings,
        pacer: &mut crate::waves::Pacer,
    ) -> EngineResult<Plan<'_>> {
        let rules: Arc<RuleSet> = self.rules();
        // The lists' part of the rules' input, built once for the whole batch.
        let ctxs: Vec<input::ListCtx> = self.lists().iter().map(input::ListCtx::new).collect();
        let batch: Vec<&Contact> = todo.iter().map(|&i| contacts[i]).collect();
        let t0 = std::time::Instant::now();
        let mut plan = Plan::load(self, &batch, std::mem::take(pacer)).await?;
        let t1 = std::time::Instant::now();
        timings.load += t1 - t0;
        let wanted: HashSet<usize> = todo.iter().copied().collect();
        for ci in crm_inputs.iter().filter(|ci| wanted.contains(&ci.contact)) {
            let evidence = Evidence {
                crm_record: Some(ci.record.clone()),
                ..Evidence::default()
            };
            let list = &self.lists()[ci.list];
            let contact = contacts[ci.contact];
            plan.apply(
                ci.contact,
                contact,
                list,
                ci.input.clone(),
                EventSource::Crm,
                evidence,
            );
        }
        for &i in todo {
            plan.decide(i, &rules, &ctxs, contacts[i]);
        }
        timings.decide += t1.elapsed();
        // The budgets go on to the next round or page: what this batch let through is
        // spent even if a conflicting commit is left out (a plan errs on sending less).
        *pacer = std::mem::take(&mut plan.pacer);
        Ok(plan)
    }

    /// Count a first round's commits; then, for at most [`ROUNDS`] rounds in all, plan again
    /// and commit the contacts whose pairs changed concurrently.
    async fn after_commit(
        &self,
        contacts: &[&Contact],
        crm_inputs: &[CrmInput],
        mut todo: Vec<usize>,
        mut written: Written,
        timings: &mut Timings,
        pacer: &mut crate::waves::Pacer,
    ) -> EngineResult<(u64, DecideStats)> {
        let mut crm_changes = 0;
        let mut decided = DecideStats {
            contacts: contacts.len() as u64,
            ..DecideStats::default()
        };
        for round in 1..=ROUNDS {
            crm_changes += written.crm_changes;
            decided.changes += written.decided.changes;
            decided.refused += written.decided.refused;
            decided.rule_errors += written.decided.rule_errors;
            if written.conflicted.is_empty() {
                return Ok((crm_changes, decided));
            }
            tracing::debug!(
                contacts = written.conflicted.len(),
                "consent changed concurrently; planning again"
            );
            todo.retain(|i| written.conflicted.contains(i));
            if round == ROUNDS {
                break;
            }
            let plan = self
                .plan_round(contacts, crm_inputs, &todo, timings, pacer)
                .await?;
            written = plan.commit(timings).await?;
        }
        let first = todo
            .first()
            .map(|&i| contacts[i].id.clone())
            .unwrap_or_default();
        Err(EngineError::Contended {
            contact_id: first,
            list_id: "*".into(),
        })
    }
}
/// Pages the CRM fetcher may read ahead of the commits.
const PREFETCH_PAGES: usize = 16;
/// Most CRM records planned and committed in one transaction.
const BATCH_RECORDS: usize = 2000;

/// Stops a spawned task when its owner returns early (an error mid-pull).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Engine {
    /// Pull every CRM change since the stored cursor. A fetcher task reads ahead (at most
    /// [`PREFETCH_PAGES`] pages, so memory stays bounded) while pages already fetched are
    /// planned and committed together; the stored cursor advances only after a commit, so a
    /// crash re-reads what was not committed (and re-applying a page is a no-op).
    ///
    /// Batches are pipelined: while one batch commits (on another thread), the next is
    /// stored and planned. A plan made meanwhile stands only if the committing batch shares
    /// no address hash with it ([`Reads::independent_of`]); otherwise it is
    /// planned again once the commit is done, so records still apply in their order. (A
    /// commit planned on stale state would be left out anyway, by its consent's expected
    /// `last_seq`; the check covers decisions that write nothing on the state before the
    /// commit, and suppressions.) Batches under a sending plan's budgets
    /// ([`crate::waves::Pacer::has_budgets`]) are not overlapped: their budgets are read from
    /// what earlier batches committed.
    pub async fn pull_crm(&self, mut progress: impl FnMut(&PullStats)) -> EngineResult<PullStats> {
        let mut stats = PullStats::default();
        let page_size = self.config.config.sync.page_size;
        let start = self.store.cursor("crm").await?.map(Cursor);
        let (tx, mut rx) = tokio::sync::mpsc::channel(PREFETCH_PAGES);
        let crm = Arc::clone(&self.connectors.crm);
        let fetcher = AbortOnDrop(tokio::spawn(async move {
            let mut cursor = start;
            loop {
                let page = crm.changes(cursor.as_ref(), page_size).await;
                let more = match &page {
                    Ok(p) => {
                        if let Some(next) = &p.next_cursor {
                            cursor = Some(next.clone());
                        }
                        p.has_more
                    }
                    Err(_) => false,
                };
                if tx.send(page).await.is_err() || !more {
                    return;
                }
            }
        }));
        let started = std::time::Instant::now();
        let mut waited = std::time::Duration::ZERO;
        let mut timings = Timings::default();
        // The batch planned and waiting for its commit.
        let mut planned: Option<Batch<'_>> = None;
        loop {
            let t = std::time::Instant::now();
            let Some(first) = rx.recv().await else { break };
            waited += t.elapsed();
            // This page, and whatever else is fetched already (one transaction for all).
            let mut pages = vec![first];
            let mut records = 0;
            while records < BATCH_RECORDS {
                match rx.try_recv() {
                    Ok(p) => {
                        records += p.as_ref().map_or(0, |p| p.records.len());
                        pages.push(p);
                    }
                    Err(_) => break,
                }
            }
            let mut failure = None;
            let mut records = Vec::new();
            let mut cursor = None;
            for page in pages {
                let page = match page {
                    Ok(p) => p,
                    Err(source) => {
                        // Commit what came before it; then report.
                        failure = Some(EngineError::Connector {
                            connector: "crm",
                            source,
                        });
                        break;
                    }
                };
                stats.pages += 1;
                for bad in &page.invalid {
                    tracing::warn!(location = %Escaped(&bad.location), reason = %Escaped(&bad.reason), "CRM record skipped");
                    stats.invalid += 1;
                }
                // A deleted CRM record does not withdraw consent: the ledger keeps the proof
                // and the person keeps their choice. It is only reported.
                for gone in &page.deleted {
                    tracing::info!(record = %Escaped(gone), "CRM record deleted; consent kept");
                    stats.deleted += 1;
                }
                records.extend(page.records);
                if page.next_cursor.is_some() {
                    cursor = page.next_cursor;
                }
            }
            // Planned and committed as a whole, the rules included: a contact the CRM just
            // asserted gets its DOI mail queued in this same transaction. Stored now: the
            // writer is free until the batch before is committed below.
            let prepared = self.prepare(&records).await?;
            let next = match planned.take() {
                None => self.plan_batch(prepared, cursor).await?,
                Some(before) => {
                    let (next, done) = self.commit_while_planning(before, prepared, cursor).await?;
                    self.pulled(done, &mut stats, &mut timings, &mut progress)
                        .await?;
                    next
                }
            };
            if let Some(e) = failure {
                let done = self.commit_batch(next).await?;
                self.pulled(done, &mut stats, &mut timings, &mut progress)
                    .await?;
                return Err(e);
            }
            planned = Some(next);
        }
        if let Some(last) = planned {
            let done = self.commit_batch(last).await?;
            self.pulled(done, &mut stats, &mut timings, &mut progress)
                .await?;
        }
        drop(fetcher);
        tracing::info!(
            records = stats.records,
            pages = stats.pages,
            changes = stats.changes + stats.rule_changes,
            total_ms = started.elapsed().as_millis() as u64,
            waiting_for_crm_ms = waited.as_millis() as u64,
            upsert_ms = timings.upsert.as_millis() as u64,
            load_ms = timings.load.as_millis() as u64,
            decide_ms = timings.decide.as_millis() as u64,
            commit_ms = timings.commit.as_millis() as u64,
            "CRM pull finished"
        );
        Ok(stats)
    }
}
