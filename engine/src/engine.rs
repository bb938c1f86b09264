//! The engine: turns inputs (CRM changes, Campaigns status, clicks, rule proposals) into
//! decisions of the consent state machine, and each decision into one atomic commit of ledger
//! event + consent projection + outbox rows.
//!
//! Nothing outside [`Engine::apply`] changes consent.

use std::sync::{Arc, RwLock};

use chrono::Utc;
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, CrmConnector, CrmRecord, Cursor, MailTransport, StatusKind,
};
use serde::Serialize;

use crate::config::{ListConfig, LoadedConfig};
use crate::consent::{self, Consent, ConsentState, Effect, Input, Refusal};
use crate::email;
use crate::ledger::{EventSource, Evidence, LedgerEvent, NewEvent};
use crate::rules::{RuleSet, RulesError};
use crate::store::{
    Commit, Contact, ContactUpsert, NewOutbox, OutboxWork, PRIORITY_LEGAL, PRIORITY_NORMAL, Store,
    StoreError, StoreResult, Suppression,
};
use crate::tokens::TokenKeys;
use crate::untrusted::clean_fields;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{connector} connector: {source}")]
    Connector {
        connector: &'static str,
        source: ConnectorError,
    },
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(
        "consent of contact {contact_id} on list {list_id} kept changing; gave up after retries"
    )]
    Contended { contact_id: String, list_id: String },
}

pub type EngineResult<T> = Result<T, EngineError>;

/// The three connectors the engine drives.
#[derive(Debug, Clone)]
pub struct Connectors {
    pub crm: Arc<dyn CrmConnector>,
    pub campaigns: Arc<dyn CampaignsConnector>,
    pub mail: Arc<dyn MailTransport>,
}

/// Result of one [`Engine::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Changed(Box<LedgerEvent>),
    Unchanged,
    Refused(Refusal),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PullStats {
    pub records: u64,
    pub invalid: u64,
    /// Records whose address was erased: skipped, the address is not stored again.
    pub erased: u64,
    pub deleted: u64,
    pub changes: u64,
    /// Changes the rules made for the pulled contacts right after (DOI mails queued, ...).
    pub rule_changes: u64,
    /// Rule proposals the state machine refused, and rule errors, for the pulled contacts.
    pub rule_refused: u64,
    pub rule_errors: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DecideStats {
    pub contacts: u64,
    pub changes: u64,
    pub refused: u64,
    pub rule_errors: u64,
}

#[derive(Debug)]
/// The one writer of consent. Its fields are private to the engine crate: the web layer and the
/// CLI read through [`Engine::reads`] and the accessors below, and change consent only through
/// its methods ([`Engine::apply`] and the sync, import and erasure entry points).
pub struct Engine {
    pub(crate) config: Arc<LoadedConfig>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) connectors: Connectors,
    pub(crate) tokens: TokenKeys,
    rules: RwLock<Arc<RuleSet>>,
    /// Signalled after a commit that queued outbox work, so the daemon delivers at once
    /// instead of at its next tick (a confirmation mail should not wait for a poll).
    pub(crate) outbox_wake: Arc<tokio::sync::Notify>,
    /// Per-connector circuit breakers and the readiness flags (`/readyz`).
    pub(crate) circuits: Arc<crate::circuit::Circuits>,
    /// Single consent changes are written in groups (one fsync for many web requests).
    group_commit: Option<crate::group_commit::GroupCommit>,
}

/// A read-only view of the store, handed out by [`Engine::reads`]. It has no write methods, so
/// code holding an engine cannot change consent behind the engine's back.
#[derive(Debug, Clone, Copy)]
pub struct StoreReads<'a>(&'a dyn Store);

impl<'a> From<&'a dyn Store> for StoreReads<'a> {
    /// For tools that open a store without an engine (exports, `contact show`).
    fn from(store: &'a dyn Store) -> Self {
        Self(store)
    }
}

impl StoreReads<'_> {
    pub async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
        self.0.contact_by_id(id).await
    }
    pub async fn contact_by_email(&self, email: &str) -> StoreResult<Option<Contact>> {
        self.0.contact_by_email(email).await
    }
    pub async fn consent(&self, contact_id: &str, list_id: &str) -> StoreResult<Option<Consent>> {
        self.0.consent(contact_id, list_id).await
    }
    pub async fn consents_of_contact(
        &self,
        contact_id: &str,
    ) -> StoreResult<Vec<(String, Consent)>> {
        self.0.consents_of_contact(contact_id).await
    }
    pub async fn events_of_contact(&self, contact_id: &str) -> StoreResult<Vec<LedgerEvent>> {
        self.0.events_of_contact(contact_id).await
    }
    pub async fn consent_summary(&self) -> StoreResult<Vec<crate::store::ConsentSummary>> {
        self.0.consent_summary().await
    }
    pub async fn outbox_counts(&self) -> StoreResult<crate::store::OutboxCounts> {
        self.0.outbox_counts().await
    }
    pub async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.0.cursor(name).await
    }
}

impl Engine {
    pub fn new(
        config: Arc<LoadedConfig>,
        store: Arc<dyn Store>,
        connectors: Connectors,
        rules: RuleSet,
    ) -> Self {
        let tokens = config.config.tokens.keys();
        let circuits = Arc::new(crate::circuit::Circuits::new(
            config.config.sync.circuit_threshold,
            config.config.sync.circuit_cooldown.0,
        ));
        let group_commit = crate::group_commit::GroupCommit::start(Arc::clone(&store));
        Self {
            group_commit,
            config,
            store,
            connectors,
            tokens,
            rules: RwLock::new(Arc::new(rules)),
            outbox_wake: Arc::new(tokio::sync::Notify::new()),
            circuits,
        }
    }

    /// The rule set in force (a reload swaps it atomically; running decisions keep theirs).
    /// The loaded configuration (settings plus the templates and rule paths it names).
    pub fn config(&self) -> &Arc<LoadedConfig> {
        &self.config
    }

    /// The settings of the configuration file.
    pub fn settings(&self) -> &crate::config::Config {
        &self.config.config
    }

    /// Read access to the store: contacts, consents, the ledger, outbox counts.
    pub fn reads(&self) -> StoreReads<'_> {
        StoreReads(self.store.as_ref())
    }

    /// The configured connectors (reads and webhooks; their writes go through the outbox).
    pub fn connectors(&self) -> &Connectors {
        &self.connectors
    }

    /// The link-signing keys.
    pub fn tokens(&self) -> &TokenKeys {
        &self.tokens
    }

    /// Circuit breakers and readiness.
    pub fn circuits(&self) -> &Arc<crate::circuit::Circuits> {
        &self.circuits
    }

    /// Signalled when a commit queued outbox work.
    pub fn outbox_wake(&self) -> &tokio::sync::Notify {
        &self.outbox_wake
    }

    /// Keep the page a person saw as evidence (content-addressed; idempotent).
    pub async fn record_snapshot(&self, s: &crate::store::Snapshot) -> EngineResult<()> {
        Ok(self.store.put_snapshot(s).await?)
    }

    /// Take or renew the lease on a job for this worker (one instance runs each job).
    pub async fn try_lease(
        &self,
        job: &str,
        worker: &str,
        now: chrono::DateTime<Utc>,
        until: chrono::DateTime<Utc>,
    ) -> EngineResult<bool> {
        Ok(self.store.try_lease(job, worker, now, until).await?)
    }

    /// Release outbox claims this instance's earlier runs left behind (not `current`'s).
    pub async fn release_claims(&self, prefix: &str, current: &str) -> EngineResult<u64> {
        Ok(self.store.release_claims(prefix, current).await?)
    }

    /// Refuse a configuration that dropped a key which signed mailed links; record the keys.
    pub async fn check_signing_keys(&self) -> Result<(), crate::signing_keys::SigningKeysError> {
        crate::signing_keys::check_and_record(self.store.as_ref(), &self.tokens).await
    }

    pub fn rules(&self) -> Arc<RuleSet> {
        match self.rules.read() {
            Ok(r) => Arc::clone(&r),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    pub fn replace_rules(&self, rules: RuleSet) {
        match self.rules.write() {
            Ok(mut r) => *r = Arc::new(rules),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(rules),
        }
    }

    pub fn lists(&self) -> &[ListConfig] {
        &self.config.config.lists
    }

    pub fn list(&self, id: &str) -> Option<&ListConfig> {
        self.config.list(id)
    }

    /// Append an event that changes no state (a fetched link), grouped with other writes.
    pub async fn append_event(&self, event: NewEvent) -> EngineResult<LedgerEvent> {
        Ok(match &self.group_commit {
            Some(g) => g.append(&*self.store, event).await?,
            None => self.store.append_event(&event).await?,
        })
    }

    /// Feed one input through the state machine and commit what it decides.
    pub async fn apply(
        &self,
        contact: &Contact,
        list: &ListConfig,
        input: Input,
        source: EventSource,
        evidence: Evidence,
    ) -> EngineResult<Applied> {
        let address_hash = self.tokens.address_hash(&contact.email);
        // Retry on a concurrent change: the decision is re-made on the fresh state.
        for _ in 0..5 {
            let now = Utc::now();
            let current = self
                .store
                .consent(&contact.id, &list.id)
                .await?
                .unwrap_or_else(|| Consent::new(now));
            let suppressed = self
                .store
                .is_any_suppressed(&self.tokens.address_hashes(&contact.email))
                .await?;
            let t = match transition_for(&current, &input, list, suppressed, now) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(Applied::Unchanged),
                Err(refusal) => {
                    log_refusal(&contact.id, &list.id, &refusal, source);
                    return Ok(Applied::Refused(refusal));
                }
            };
            let (from, to, kind) = (t.from, t.to, t.event);
            let commit = commit_for(
                &address_hash,
                contact,
                list,
                &input,
                t,
                current.last_seq,
                source,
                evidence.clone(),
                now,
            );
            let queued = !commit.outbox.is_empty();
            let written = match &self.group_commit {
                Some(g) => g.commit(&*self.store, commit).await,
                None => self.store.commit(&commit).await,
            };
            match written {
                Ok(ev) => {
                    if queued {
                        self.outbox_wake.notify_one();
                    }
                    tracing::info!(
                        contact_id = %contact.id, list = %list.id, from = %from, to = %to, event = kind,
                        seq = ev.seq, source = source.as_str(), "consent changed"
                    );
                    return Ok(Applied::Changed(Box::new(ev)));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Contended {
            contact_id: contact.id.clone(),
            list_id: list.id.clone(),
        })
    }

    /// One CRM record (a webhook): upsert the contact, apply what the CRM asserts and run the
    /// rules for it. `None` if the record cannot become a contact (it is reported and skipped);
    /// otherwise the number of consent changes.
    pub async fn ingest_record(&self, rec: &CrmRecord) -> EngineResult<Option<u64>> {
        let stats = self.ingest_records(std::slice::from_ref(rec)).await?;
        Ok((stats.records == 1).then_some(stats.crm_changes + stats.decided.changes))
    }

    /// Unsubscribes, bounces and complaints made inside the Campaigns tool.
    pub async fn pull_campaigns(&self) -> EngineResult<u64> {
        let mut changes = 0;
        for list in self.lists() {
            let cursor_name = format!("campaigns:{}", list.id);
            loop {
                let cursor = self.store.cursor(&cursor_name).await?.map(Cursor);
                let page = self
                    .connectors
                    .campaigns
                    .status_events(list.campaigns_list(), cursor.as_ref())
                    .await
                    .map_err(|source| EngineError::Connector {
                        connector: "campaigns",
                        source,
                    })?;
                for ev in &page.events {
                    let Ok(address) = email::normalise(&ev.email) else {
                        tracing::warn!(list = %list.id, "campaigns status event with an invalid address; skipped");
                        continue;
                    };
                    if self.is_erased(&address).await? {
                        // Already withdrawn and suppressed; storing it again would undo the erasure.
                        tracing::info!(list = %list.id, "campaigns status event for an erased address; skipped");
                        continue;
                    }
                    let contact = match self.store.contact_by_email(&address).await? {
                        Some(c) => c,
                        None => {
                            let upsert = ContactUpsert {
                                email: address,
                                language: None,
                                fields: Default::default(),
                                crm_record: None,
                            };
                            self.store.upsert_contact(&upsert, Utc::now()).await?
                        }
                    };
                    let input = match ev.kind {
                        StatusKind::Unsubscribed => Input::Unsubscribe,
                        StatusKind::Bounced => Input::Bounce,
                        StatusKind::Complained => Input::Complaint,
                        StatusKind::Confirmed => Input::CampaignsConfirmed,
                        StatusKind::Opened | StatusKind::Clicked => {
                            self.store
                                .record_engagement(&contact.id, &list.id, ev.at)
                                .await?;
                            continue;
                        }
                    };
                    let detail = match ev.kind {
                        // Say plainly what this proof is worth.
                        StatusKind::Confirmed => Some(format!(
                            "confirmed through the campaigns tool's own double opt-in ({}); weaker evidence: no IP, user agent or text snapshot recorded by optinsync",
                            ev.detail.as_deref().unwrap_or("no detail")
                        )),
                        _ => ev.detail.clone(),
                    };
                    let evidence = Evidence {
                        detail,
                        ..Evidence::default()
                    };
                    if let Applied::Changed(_) = self
                        .apply(&contact, list, input, EventSource::Campaigns, evidence)
                        .await?
                    {
                        changes += 1;
                    }
                }
                if let Some(next) = &page.next_cursor {
                    self.store
                        .set_cursor(&cursor_name, &next.0, Utc::now())
                        .await?;
                }
                if !page.has_more {
                    break;
                }
            }
        }
        Ok(changes)
    }

    /// Run the rules for every contact on every list and apply what they propose, a page of
    /// contacts per transaction.
    pub async fn decide_all(&self) -> EngineResult<DecideStats> {
        self.decide_all_but_updated_since(None).await
    }

    /// [`Engine::decide_all`], leaving out contacts created or changed at or after `since`:
    /// a pull decides every contact it stores, so the pass that follows it need not again.
    pub async fn decide_all_but_updated_since(
        &self,
        since: Option<chrono::DateTime<Utc>>,
    ) -> EngineResult<DecideStats> {
        let mut stats = DecideStats::default();
        let mut after: Option<String> = None;
        loop {
            let page = match since {
                Some(t) => {
                    self.store
                        .contacts_page_before(after.as_deref(), DECIDE_PAGE, t)
                        .await?
                }
                None => {
                    self.store
                        .contacts_page(after.as_deref(), DECIDE_PAGE)
                        .await?
                }
            };
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            let s = self.decide_contacts(&page).await?;
            stats.contacts += s.contacts;
            stats.changes += s.changes;
            stats.refused += s.refused;
            stats.rule_errors += s.rule_errors;
        }
        Ok(stats)
    }

    /// Run the rules for one contact on every list (e.g. right after a webhook).
    pub async fn decide_contact(&self, contact: &Contact) -> EngineResult<DecideStats> {
        self.decide_contacts(std::slice::from_ref(contact)).await
    }
}

/// Contacts per transaction in a rules pass.
const DECIDE_PAGE: i64 = 1000;

/// The state machine's decision for one input on one list (its limits and DOI mode). Pure:
/// the web layer runs it as a dry run to tell what a link would do before it is clicked.
pub fn transition_for(
    current: &Consent,
    input: &Input,
    list: &ListConfig,
    suppressed: bool,
    now: chrono::DateTime<Utc>,
) -> Result<Option<consent::Transition>, Refusal> {
    let cx = consent::Context {
        suppressed,
        campaigns_doi: list.doi == crate::config::DoiMode::Campaigns,
    };
    let limits = consent::Limits {
        max_reminders: list.max_reminders,
    };
    consent::transition(current, input, limits, cx, now)
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
        outbox: outbox_rows(&t.effects, contact, list, &event.event_id, t.to),
        consent: t.next,
        event,
        suppress: global.then(|| Suppression {
            address_hash: address_hash.to_owned(),
            reason: t.event.to_owned(),
        }),
    }
}

/// A refused consent change is logged and counted, never carried out.
pub(crate) fn log_refusal(contact_id: &str, list_id: &str, refusal: &Refusal, source: EventSource) {
    metrics::counter!("optinsync_consent_refused_total", "input" => refusal.input).increment(1);
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

/// What `import_existing` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportStats {
    pub members: u64,
    /// Taken into the ledger as `asserted`: the rules will ask them to confirm.
    pub asserted: u64,
    /// Already known with consent (pending, confirmed, ...): left as they are.
    pub already_known: u64,
    /// On the list although withdrawn, bounced, complained or lapsed: taken off it.
    pub removed: u64,
    pub invalid: u64,
}

impl Engine {
    /// Take the members of an existing Campaigns list — people put there without DOI proof,
    /// the usual starting point — into the ledger as `asserted`, so the rules run a
    /// re-permission campaign: DOI mail, reminder, removal of those who do not confirm.
    pub async fn import_existing(
        &self,
        list: &ListConfig,
        mut progress: impl FnMut(&ImportStats),
    ) -> EngineResult<ImportStats> {
        let mut stats = ImportStats::default();
        let mut cursor: Option<Cursor> = None;
        let today = Utc::now().format("%Y-%m-%d").to_string();
        loop {
            let page = self
                .connectors
                .campaigns
                .list_members(list.campaigns_list(), cursor.as_ref())
                .await
                .map_err(|source| EngineError::Connector {
                    connector: "campaigns",
                    source,
                })?;
            for member in &page.members {
                stats.members += 1;
                let Ok(address) = email::normalise(&member.email) else {
                    tracing::warn!(list = %list.id, "existing list member with an invalid address; skipped");
                    stats.invalid += 1;
                    continue;
                };
                if self.is_erased(&address).await? {
                    // Erased: take it off the list without storing the address again.
                    self.connectors
                        .campaigns
                        .remove(list.campaigns_list(), std::slice::from_ref(&address))
                        .await
                        .map_err(|source| EngineError::Connector {
                            connector: "campaigns",
                            source,
                        })?;
                    tracing::info!(list = %list.id, "existing member with an erased address removed");
                    stats.removed += 1;
                    continue;
                }
                let upsert = ContactUpsert {
                    email: address,
                    language: member.language.as_deref().map(crate::untrusted::clean_text),
                    fields: clean_fields(&member.fields),
                    crm_record: None,
                };
                let contact = self.store.upsert_contact(&upsert, Utc::now()).await?;
                let evidence = Evidence {
                    detail: Some(format!(
                        "member of Campaigns list `{}` without DOI proof; imported {today}",
                        list.campaigns_list()
                    )),
                    ..Evidence::default()
                };
                match self
                    .apply(
                        &contact,
                        list,
                        Input::CrmAsserted,
                        EventSource::CampaignsImport,
                        evidence,
                    )
                    .await?
                {
                    Applied::Changed(_) => stats.asserted += 1,
                    _ => {
                        let state = self
                            .store
                            .consent(&contact.id, &list.id)
                            .await?
                            .map(|c| c.state);
                        let keeps_place = matches!(
                            state,
                            Some(
                                ConsentState::Asserted
                                    | ConsentState::Pending
                                    | ConsentState::Confirmed
                                    | ConsentState::Revalidating
                            )
                        );
                        if keeps_place {
                            stats.already_known += 1;
                        } else {
                            // Withdrawal wins: someone who left must not stay on the list.
                            self.connectors
                                .campaigns
                                .remove(list.campaigns_list(), std::slice::from_ref(&contact.email))
                                .await
                                .map_err(|source| EngineError::Connector {
                                    connector: "campaigns",
                                    source,
                                })?;
                            tracing::info!(contact_id = %contact.id, list = %list.id, state = ?state, "existing member without consent removed");
                            stats.removed += 1;
                        }
                    }
                }
            }
            progress(&stats);
            if !page.has_more {
                return Ok(stats);
            }
            cursor = page.next_cursor;
        }
    }
}

/// Cursor-table key under which the campaigns connector's own state (quota budgets, locks)
/// is kept across restarts.
const CAMPAIGNS_STATE: &str = "connector-state:campaigns";

impl Engine {
    /// Hand the campaigns connector the state it exported before the last stop. State it
    /// cannot read is logged and dropped: fresh budgets are safe, just slower to learn.
    pub async fn restore_connector_state(&self) -> EngineResult<()> {
        if let Some(state) = self.store.cursor(CAMPAIGNS_STATE).await?
            && let Err(e) = self.connectors.campaigns.import_state(&state)
        {
            tracing::warn!(error = %e, "campaigns connector state not restored; starting with fresh budgets");
        }
        Ok(())
    }

    /// Persist the campaigns connector's state if it has any (after deliveries).
    pub async fn save_connector_state(&self) -> EngineResult<()> {
        if let Some(state) = self.connectors.campaigns.export_state() {
            self.store
                .set_cursor(CAMPAIGNS_STATE, &state, Utc::now())
                .await?;
        }
        Ok(())
    }
}

/// What [`Engine::canonicalise_stored_addresses`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Canonicalised {
    /// Contacts now stored under the canonical spelling of their address.
    pub renamed: u64,
    /// Contacts left as they are because another contact already has the canonical spelling
    /// (one mailbox, two contacts: both stay suppressed alike; merge them by hand if needed).
    pub duplicates: u64,
    /// Stored addresses that canonicalisation refuses (e.g. invalid punycode); left as they are.
    pub invalid: u64,
}

/// Cursor-table marker: stored addresses were canonicalised (see [`crate::email`]).
const CANONICAL_ADDRESSES: &str = "migration:canonical-addresses-v1";

impl Engine {
    /// Re-spell contacts stored before address canonicalisation (a punycode domain, an NFD
    /// address) to their canonical form, so the CRM's record for them, in any spelling,
    /// finds them again instead of becoming a new contact that is asked to confirm. Runs
    /// once per store (a marker in the cursor table); the suppression list needs no such
    /// step, as lookups also try the old keys ([`crate::email::spellings`]).
    pub async fn canonicalise_stored_addresses(&self) -> EngineResult<Canonicalised> {
        let mut done = Canonicalised::default();
        if self.store.cursor(CANONICAL_ADDRESSES).await?.is_some() {
            return Ok(done);
        }
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .contacts_page(after.as_deref(), DECIDE_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for contact in &page {
                if contact.erased {
                    continue;
                }
                match email::normalise(&contact.email) {
                    Ok(canonical) if canonical == contact.email => {}
                    Ok(canonical) => {
                        if self.store.rename_contact(&contact.id, &canonical).await? {
                            done.renamed += 1;
                        } else {
                            done.duplicates += 1;
                            tracing::warn!(
                                contact_id = %contact.id,
                                "contact's address is another spelling of another contact's; left as it is"
                            );
                        }
                    }
                    Err(_) => done.invalid += 1,
                }
            }
        }
        self.store
            .set_cursor(CANONICAL_ADDRESSES, "done", Utc::now())
            .await?;
        if done != Canonicalised::default() {
            tracing::info!(
                renamed = done.renamed,
                duplicates = done.duplicates,
                invalid = done.invalid,
                "stored addresses canonicalised"
            );
        }
        Ok(done)
    }
}

/// What [`Engine::erase`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EraseReport {
    pub lists: u64,
    pub store: crate::store::Erasure,
    /// Copies of the contact's mails the mail transport deleted (`.eml` files).
    pub mail_copies_deleted: u64,
}

impl Engine {
    /// GDPR erasure (Art. 17): withdraw and suppress the address on every list (removals are
    /// queued with legal priority), then remove the personal data: the ledger keeps its events
    /// — that consent was given and withdrawn — but not the evidence text, and the contact keeps
    /// only a keyed hash of its address, so it stays suppressed. The mail transport deletes
    /// the copies it kept of the contact's mails ([`MailTransport::forget`]: the `eml`
    /// folder). What leaves optinsync on purpose is not recalled: the CRM write-back of the
    /// erasure carries the address (the CRM must find the record to opt it out), and mail
    /// already handed to an SMTP server is beyond reach.
    pub async fn erase(&self, contact: &Contact) -> EngineResult<EraseReport> {
        self.erase_as(
            contact,
            EventSource::Cli,
            "erasure requested (GDPR Art. 17)",
        )
        .await
    }

    /// [`Engine::erase`] recorded with its `source` (cli, admin, retention) and `reason`.
    pub async fn erase_as(
        &self,
        contact: &Contact,
        source: EventSource,
        reason: &str,
    ) -> EngineResult<EraseReport> {
        let report = self.erase_data(contact, source, reason).await?;
        self.store.after_erasure().await?;
        Ok(report)
    }

    /// [`Engine::erase_as`] without the store's closing scrub ([`Store::after_erasure`]), for
    /// a batch of erasures that runs it once at the end (retention).
    pub async fn erase_data(
        &self,
        contact: &Contact,
        source: EventSource,
        reason: &str,
    ) -> EngineResult<EraseReport> {
        let mut report = EraseReport::default();
        for list in self.lists() {
            let evidence = Evidence {
                reason: Some(reason.to_owned()),
                ..Evidence::default()
            };
            if let Applied::Changed(_) = self
                .apply(contact, list, Input::Erase, source, evidence)
                .await?
            {
                report.lists += 1;
            }
        }
        report.mail_copies_deleted = self.forget_mails(contact).await?;
        let hash = self.tokens.address_hash(&contact.email);
        report.store = self
            .store
            .erase_contact(&contact.id, &hash, Utc::now())
            .await?;
        tracing::info!(
            contact_id = %contact.id, source = source.as_str(), redacted = report.store.redacted_events,
            mail_copies_deleted = report.mail_copies_deleted, "contact erased"
        );
        Ok(report)
    }

    /// Have the mail transport delete the copies it keeps of this contact's mails (the `eml`
    /// transport's files carry the address in `To:`). A mail's transport key is its outbox
    /// key `mail:<event id>` with `:` as `-` (`outbox::deliver_mail`), and every mail is
    /// queued by one of the contact's events, so the events name every candidate. Done
    /// before the store forgets the address: if it fails, erasure is reported as failed and
    /// can be run again.
    async fn forget_mails(&self, contact: &Contact) -> EngineResult<u64> {
        let keys: Vec<String> = self
            .store
            .events_of_contact(&contact.id)
            .await?
            .iter()
            .map(|e| format!("mail-{}", e.event_id))
            .collect();
        if keys.is_empty() {
            return Ok(0);
        }
        self.connectors
            .mail
            .forget(&keys)
            .await
            .map_err(|source| EngineError::Connector {
                connector: "mail",
                source,
            })
    }
}
