//! The engine: turns inputs (CRM changes, Campaigns status, clicks, rule proposals) into
//! decisions of the consent state machine, and each decision into one atomic commit of ledger
//! event + consent projection + outbox rows.
//!
//! Nothing outside the engine ([`Engine::apply`] for one input, the batch planner in
//! [`crate::bulk`] for many) changes consent; both decide through [`crate::plan`].

use std::sync::{Arc, RwLock};

use chrono::Utc;
use optinsync_plugin_api::{
    BounceClass, CampaignsConnector, ConnectorError, CrmConnector, CrmRecord, Cursor,
    MailTransport, StatusEvent, StatusKind,
};
use serde::Serialize;

use crate::config::{ListConfig, LoadedConfig};
use crate::consent::{Consent, ConsentState, Input, Refusal};
use crate::email;
use crate::ledger::{EventSource, Evidence, LedgerEvent, NewEvent};
use crate::plan::{commit_for, log_refusal, transition_on};
use crate::rules::{RuleSet, RulesError};
use crate::store::{Contact, ContactUpsert, Store, StoreError, StoreResult};
use crate::tokens::TokenKeys;

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
    /// `campaign resume` on a list whose waves run.
    #[error("list `{list}` is not paused: nothing to resume")]
    NotPaused { list: String },
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
    pub(crate) outbox_wake: Arc<OutboxWake>,
    /// Per-connector circuit breakers and the readiness flags (`/readyz`).
    pub(crate) circuits: Arc<crate::circuit::Circuits>,
    /// Single consent changes are written in groups (one fsync for many web requests).
    pub(crate) group_commit: Option<crate::group_commit::GroupCommit>,
    /// What the last rules reload did (the operator console shows it).
    pub(crate) last_reload: std::sync::Mutex<Option<ReloadRecord>>,
    /// Pause flags and outcome counts of the lists' waves.
    pub(crate) waves: crate::outcomes::WaveMemory,
    /// Connector calls in flight at once, as the connectors allow.
    pub(crate) calls: crate::calls::CallGates,
}

/// The last reload as the operator console shows it: when, what came of it, and the
/// error text (compile errors name `file:line`); written by
/// [`Engine::reload_rules`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadRecord {
    pub at: chrono::DateTime<chrono::Utc>,
    /// `ok`, `unchanged`, `compile_error` or `test_failure` (the metric's label).
    pub result: &'static str,
    pub error: Option<String>,
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
    pub async fn contact_with_consent(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Option<(Contact, Option<Consent>)>> {
        self.0.contact_with_consent(contact_id, list_id).await
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
    pub async fn consent_events(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Vec<LedgerEvent>> {
        self.0.consent_events(contact_id, list_id).await
    }
    pub async fn consent_summary(&self) -> StoreResult<Vec<crate::store::ConsentSummary>> {
        self.0.consent_summary().await
    }
    pub async fn outbox_counts(&self) -> StoreResult<crate::store::OutboxCounts> {
        self.0.outbox_counts().await
    }
    pub async fn ledger_head(&self) -> StoreResult<i64> {
        self.0.ledger_head().await
    }
    pub async fn pending_removal_addresses(&self, list_id: &str) -> StoreResult<Vec<String>> {
        self.0.pending_removal_addresses(list_id).await
    }
    /// Recompute the whole hash chain ([`crate::export::verify_ledger`]).
    pub async fn verify_ledger(&self) -> crate::export::ExportResult<crate::export::ChainSummary> {
        crate::export::verify_ledger(self.0).await
    }
    pub async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.0.cursor(name).await
    }
    pub async fn outbox_dead(&self) -> StoreResult<Vec<crate::store::OutboxItem>> {
        self.0.outbox_dead().await
    }
    pub async fn events_per_day(
        &self,
        since: chrono::DateTime<Utc>,
    ) -> StoreResult<Vec<crate::store::DayCount>> {
        self.0.events_per_day(since).await
    }
    pub async fn states_reached(&self) -> StoreResult<Vec<crate::store::StateReach>> {
        self.0.states_reached().await
    }
    pub async fn consents_per_day(&self, state: &str) -> StoreResult<Vec<crate::store::DayCount>> {
        self.0.consents_per_day(state).await
    }
    pub async fn outbox_depth(&self) -> StoreResult<Vec<crate::store::OutboxDepth>> {
        self.0.outbox_depth().await
    }
    pub async fn leases(&self) -> StoreResult<Vec<crate::store::Lease>> {
        self.0.leases().await
    }
    pub async fn quota_overview(&self, now_ms: i64) -> StoreResult<Vec<crate::store::QuotaUse>> {
        self.0.quota_overview(now_ms).await
    }
    pub async fn list_consents(
        &self,
        list_id: &str,
    ) -> StoreResult<Vec<(String, crate::consent::ConsentState)>> {
        self.0.list_consents(list_id).await
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
        let calls = crate::calls::CallGates::new(
            connectors.mail.concurrency(),
            connectors.campaigns.concurrency(),
        );
        Self {
            calls,
            group_commit,
            config,
            store,
            connectors,
            tokens,
            rules: RwLock::new(Arc::new(rules)),
            outbox_wake: Arc::new(OutboxWake::default()),
            circuits,
            last_reload: std::sync::Mutex::new(None),
            waves: crate::outcomes::WaveMemory::default(),
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
    pub fn outbox_wake(&self) -> &OutboxWake {
        &self.outbox_wake
    }

    /// Keep the page a person saw as evidence (content-addressed; idempotent).
    pub async fn record_snapshot(&self, s: &crate::store::Snapshot) -> EngineResult<()> {
        self.record_snapshots(vec![s.clone()]).await
    }

    /// Keep several snapshots in one write (a pass's mails, before they leave).
    pub async fn record_snapshots(&self, s: Vec<crate::store::Snapshot>) -> EngineResult<()> {
        match &self.group_commit {
            Some(g) => g.snapshots(&*self.store, s).await?,
            None => self.store.put_snapshots(&s).await?,
        }
        Ok(())
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

    /// Record an event that changes no state without waiting for its commit (see
    /// [`crate::group_commit::GroupCommit::append_detached`]); written at once when there is
    /// no group writer. [`Engine::flush_writes`] waits for what is queued.
    pub async fn append_event_detached(&self, event: NewEvent) {
        let event = match &self.group_commit {
            Some(g) => match g.append_detached(event).await {
                Ok(()) => return,
                Err(event) => *event,
            },
            None => event,
        };
        if let Err(e) = self.store.append_event(&event).await {
            tracing::error!(contact_id = %event.contact_id, error = %e, "state-free event not recorded");
        }
    }

    /// Wait until every write queued for the group writer so far is done (at shutdown).
    pub async fn flush_writes(&self) {
        if let Some(g) = &self.group_commit {
            g.flush().await;
        }
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
        let seen = self.store.consent(&contact.id, &list.id).await?;
        self.apply_seen(contact, list, seen, input, source, evidence)
            .await
    }

    /// [`Engine::apply`], deciding first on `seen`: the consent as the caller read it a
    /// moment ago (a link's page reads it with the contact), which saves a read. A change
    /// since is caught at commit, as a conflict, and decided again on a fresh read.
    pub async fn apply_seen(
        &self,
        contact: &Contact,
        list: &ListConfig,
        seen: Option<Consent>,
        input: Input,
        source: EventSource,
        evidence: Evidence,
    ) -> EngineResult<Applied> {
        // Taken by the first attempt; a retry after a conflict reads afresh.
        let mut seen = Some(seen);
        let address_hash = self.tokens.address_hash(&contact.email);
        // Retry on a concurrent change: the decision is re-made on the fresh state.
        for _ in 0..5 {
            let now = Utc::now();
            let current = match seen.take() {
                Some(seen) => seen,
                None => self.store.consent(&contact.id, &list.id).await?,
            }
            .unwrap_or_else(|| Consent::new(now));
            let suppressions = self
                .store
                .suppressions_of(&self.tokens.address_hashes(&contact.email))
                .await?;
            let suppressed = !suppressions.is_empty();
            let erasure_only = suppressions.iter().all(|s| s.reason == ERASED);
            let t = match transition_on(&current, &input, list, suppressed, erasure_only, now) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(Applied::Unchanged),
                Err(refusal) => {
                    log_refusal(&contact.id, &list.id, &refusal, source);
                    return Ok(Applied::Refused(refusal));
                }
            };
            let (from, to, kind) = (t.from, t.to, t.event);
            let mut commit = commit_for(
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
            // An erased person came back by their own signup and has now confirmed it: the
            // erasure's suppression goes, in the same transaction, and the event says so.
            if suppressed && erasure_only && to == ConsentState::Confirmed {
                commit.lift = suppressions
                    .iter()
                    .map(|s| s.address_hash.clone())
                    .collect();
                commit.event.evidence.reason = Some(LIFTED_BY_CONFIRMATION.into());
            }
            // A website signup's person new to the CRM: the CRM learns about them.
            if matches!(input, Input::Signup { .. })
                && to == ConsentState::Pending
                && contact.crm_records.is_empty()
                && self.connectors.crm.creates_records()
            {
                commit
                    .outbox
                    .push(crm_upsert_row(contact, list, &commit.event.event_id));
            }
            let queued: Vec<_> = commit.outbox.iter().map(|o| o.work.connector()).collect();
            let written = match &self.group_commit {
                Some(g) => g.commit(&*self.store, commit).await,
                None => self.store.commit(&commit).await,
            };
            match written {
                Ok(ev) => {
                    self.outbox_wake.wake(queued);
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
                changes += self.apply_status_events(list, &page.events).await?;
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

    /// Status events the campaigns tool reported for `list` (by poll or webhook), applied to
    /// the ledger; returns how many changed a consent.
    pub async fn apply_status_events(
        &self,
        list: &ListConfig,
        events: &[StatusEvent],
    ) -> EngineResult<u64> {
        let mut changes = 0;
        for ev in events {
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
                StatusKind::Bounced => {
                    let class = ev.bounce.unwrap_or_default();
                    self.count_outcome(list, crate::outcomes::Outcome::Bounce(class));
                    let text = ev
                        .detail
                        .as_deref()
                        .unwrap_or("reported by the campaigns tool");
                    match class {
                        BounceClass::Hard => Input::Bounce,
                        BounceClass::Soft => {
                            if self
                                .soft_bounce(&contact, list, text, EventSource::Campaigns)
                                .await?
                            {
                                changes += 1;
                            }
                            continue;
                        }
                        // The sender was refused, not the person: counted for the stop rules.
                        BounceClass::Policy => {
                            tracing::warn!(list = %list.id, contact_id = %contact.id, detail = %crate::untrusted::Escaped(text), "the campaigns tool reports a policy refusal");
                            continue;
                        }
                    }
                }
                StatusKind::Complained => {
                    self.count_outcome(list, crate::outcomes::Outcome::Complaint);
                    Input::Complaint
                }
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
        if let Err(e) = self.flush_outcomes().await {
            tracing::warn!(error = %e, "bounce and complaint counts not stored yet; the stop rules judge them at the next pass");
        }
        Ok(changes)
    }

    /// A campaigns webhook's status events for `tool_list` (the list's id in the tool),
    /// applied to every configured list mapped to it; `None` when no list is.
    pub async fn campaigns_webhook(
        &self,
        tool_list: &str,
        events: &[StatusEvent],
    ) -> EngineResult<Option<u64>> {
        let lists: Vec<&ListConfig> = self
            .lists()
            .iter()
            .filter(|l| l.campaigns_list() == tool_list)
            .collect();
        if lists.is_empty() {
            return Ok(None);
        }
        let mut changes = 0;
        for list in lists {
            changes += self.apply_status_events(list, events).await?;
        }
        Ok(Some(changes))
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
        // The stop rules first: a list that must pause starts no more mail in this pass.
        self.judge_all_stop_rules().await?;
        let mut stats = DecideStats::default();
        let mut after: Option<String> = None;
        let mut pacer = self.pacer_now().await?;
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
            let s = self.decide_contacts_paced(&page, &mut pacer).await?;
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

/// The suppression reason an erasure writes (its event kind).
pub const ERASED: &str = "erased";

/// The `reason` of a confirmation that lifted an erased address's suppression.
pub const LIFTED_BY_CONFIRMATION: &str =
    "the erased address's suppression is lifted: its person signed up again and confirmed";

/// Contacts per transaction in a rules pass.
pub(crate) const DECIDE_PAGE: i64 = 1000;

/// Cursor-table key under which a connector's own state (quota budgets, locks, whatever it
/// exports) is kept across restarts: `connector-state:{name}` (the campaigns key predates the
/// other roles and is unchanged).
pub fn connector_state_key(name: &str) -> String {
    format!("connector-state:{name}")
}

/// The state each role's connector exported before the last stop, for
/// [`optinsync_plugin_api::BuildContext::state`].
pub async fn saved_connector_state(
    store: &dyn Store,
    role: crate::work::ConnectorRole,
) -> EngineResult<Option<String>> {
    Ok(store.cursor(&connector_state_key(role.as_str())).await?)
}

impl Engine {
    /// Persist each connector's state if it has any (after deliveries).
    pub async fn save_connector_state(&self) -> EngineResult<()> {
        use crate::work::ConnectorRole;
        for role in ConnectorRole::ALL {
            let state = match role {
                ConnectorRole::Crm => self.connectors.crm.export_state().await,
                ConnectorRole::Campaigns => self.connectors.campaigns.export_state().await,
                ConnectorRole::Mail => self.connectors.mail.export_state().await,
            };
            if let Some(state) = state {
                self.store
                    .set_cursor(&connector_state_key(role.as_str()), &state, Utc::now())
                    .await?;
            }
        }
        Ok(())
    }
}

/// Wakes the delivery lanes when a commit queued work: a permit per lane, so none misses it.
#[derive(Debug, Default)]
pub struct OutboxWake {
    lanes: [tokio::sync::Notify; 3],
}

impl OutboxWake {
    fn lane(role: crate::work::ConnectorRole) -> usize {
        match role {
            crate::work::ConnectorRole::Crm => 0,
            crate::work::ConnectorRole::Campaigns => 1,
            crate::work::ConnectorRole::Mail => 2,
        }
    }

    /// Wake every lane (or let its next wait return at once): work of any kind may be due.
    pub fn wake_all(&self) {
        for lane in &self.lanes {
            lane.notify_one();
        }
    }

    /// Wake the lanes of these connectors. Only those: a lane woken for nothing claims
    /// nothing, but its claim still takes the store's one writer connection (measured in the
    /// confirm `POST` bench: the mail lane's empty claims, one per confirmation commit).
    pub fn wake(&self, roles: impl IntoIterator<Item = crate::work::ConnectorRole>) {
        let mut woken = [false; 3];
        for role in roles {
            let i = Self::lane(role);
            if !woken[i] {
                woken[i] = true;
                self.lanes[i].notify_one();
            }
        }
    }

    /// Wait for work queued for `lane`.
    pub fn notified(&self, lane: crate::work::ConnectorRole) -> tokio::sync::futures::Notified<'_> {
        self.lanes[Self::lane(lane)].notified()
    }
}

/// The outbox row that tells the CRM about a person new to it, queued with a website signup's
/// `signup_requested` event when the CRM connector can create records and the contact has
/// no record yet.
fn crm_upsert_row(
    contact: &crate::store::Contact,
    list: &ListConfig,
    event_id: &str,
) -> crate::store::NewOutbox {
    crate::store::NewOutbox {
        work: crate::work::OutboxWork::CrmUpsert {},
        priority: crate::store::PRIORITY_NORMAL,
        idempotency_key: format!("crm-upsert:{event_id}"),
        contact_id: contact.id.clone(),
        list_id: list.id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::OutboxWake;
    use crate::work::ConnectorRole;

    /// Whether `lane` has a wake-up waiting (consumes it).
    fn woken(w: &OutboxWake, lane: ConnectorRole) -> bool {
        w.notified(lane).now_or_never().is_some()
    }

    #[test]
    fn a_commit_wakes_only_the_lanes_of_its_rows() {
        let w = OutboxWake::default();
        w.wake([
            ConnectorRole::Campaigns,
            ConnectorRole::Crm,
            ConnectorRole::Campaigns,
        ]);
        assert!(woken(&w, ConnectorRole::Campaigns));
        assert!(woken(&w, ConnectorRole::Crm));
        assert!(
            !woken(&w, ConnectorRole::Mail),
            "the mail lane has nothing to claim"
        );
        // One wake-up per lane, however many rows: the lane's next wait blocks again.
        assert!(!woken(&w, ConnectorRole::Campaigns));
        w.wake([]);
        assert!(!woken(&w, ConnectorRole::Crm));
        w.wake_all();
        for lane in [
            ConnectorRole::Mail,
            ConnectorRole::Campaigns,
            ConnectorRole::Crm,
        ] {
            assert!(woken(&w, lane), "{lane:?} woken by wake_all");
        }
    }
}
