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
use crate::ledger::{Evidence, LedgerEvent, NewEvent};
use crate::rules::{Action, RuleSet, RulesError, input};
use crate::store::{
    Commit, Contact, ContactUpsert, NewOutbox, PRIORITY_LEGAL, PRIORITY_NORMAL, Store, StoreError,
    Suppression,
};
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
    pub deleted: u64,
    pub changes: u64,
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
pub struct Engine {
    pub config: Arc<LoadedConfig>,
    pub store: Arc<dyn Store>,
    pub connectors: Connectors,
    pub tokens: TokenKeys,
    rules: RwLock<Arc<RuleSet>>,
    /// Signalled after a commit that queued outbox work, so the daemon delivers at once
    /// instead of at its next tick (a confirmation mail should not wait for a poll).
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// Per-connector circuit breakers and the readiness flags (`/readyz`).
    pub circuits: Arc<crate::circuit::Circuits>,
}

impl Engine {
    pub fn new(
        config: Arc<LoadedConfig>,
        store: Arc<dyn Store>,
        connectors: Connectors,
        rules: RuleSet,
    ) -> Self {
        let tokens = TokenKeys::from_config(&config.config.tokens);
        let circuits = Arc::new(crate::circuit::Circuits::new(
            config.config.sync.circuit_threshold,
            config.config.sync.circuit_cooldown.0,
        ));
        Self {
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

    /// Feed one input through the state machine and commit what it decides.
    pub async fn apply(
        &self,
        contact: &Contact,
        list: &ListConfig,
        input: Input,
        source: &str,
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
            let cx = consent::Context {
                suppressed: self
                    .store
                    .is_any_suppressed(&self.tokens.address_hashes(&contact.email))
                    .await?,
                campaigns_doi: list.doi == crate::config::DoiMode::Campaigns,
            };
            let limits = consent::Limits {
                max_reminders: list.max_reminders,
            };
            let t = match consent::transition(&current, &input, limits, cx, now) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(Applied::Unchanged),
                Err(refusal) => {
                    metrics::counter!("optinsync_consent_refused_total", "input" => refusal.input)
                        .increment(1);
                    tracing::warn!(
                        contact_id = %contact.id, list = %list.id, state = %refusal.state, input = refusal.input,
                        source, reason = refusal.reason, "consent change refused"
                    );
                    return Ok(Applied::Refused(refusal));
                }
            };
            let event = NewEvent {
                event_id: uuid::Uuid::new_v4().to_string(),
                at: now,
                contact_id: contact.id.clone(),
                list_id: list.id.clone(),
                kind: t.event.to_owned(),
                from_state: t.from,
                to_state: t.to,
                source: source.to_owned(),
                evidence: evidence.clone(),
            };
            let global = matches!(
                t.to,
                ConsentState::Bounced | ConsentState::Complained | ConsentState::Erased
            ) || matches!(input, Input::CrmOptedOut | Input::Suppress);
            let commit = Commit {
                contact_id: contact.id.clone(),
                list_id: list.id.clone(),
                expected_seq: current.last_seq,
                outbox: outbox_rows(&t.effects, contact, list, &event.event_id, t.to),
                consent: t.next,
                event,
                suppress: global.then(|| Suppression {
                    address_hash: address_hash.clone(),
                    reason: t.event.to_owned(),
                }),
            };
            let queued = !commit.outbox.is_empty();
            match self.store.commit(&commit).await {
                Ok(ev) => {
                    if queued {
                        self.outbox_wake.notify_one();
                    }
                    tracing::info!(
                        contact_id = %contact.id, list = %list.id, from = %t.from, to = %t.to, event = t.event,
                        seq = ev.seq, source, "consent changed"
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

    /// Pull every CRM change since the stored cursor, page by page; the cursor advances only
    /// after a page is committed, so a crash re-reads at most one page (and re-applying a
    /// page is a no-op).
    pub async fn pull_crm(&self, mut progress: impl FnMut(&PullStats)) -> EngineResult<PullStats> {
        let mut stats = PullStats::default();
        let page_size = self.config.config.sync.page_size;
        loop {
            let cursor = self.store.cursor("crm").await?.map(Cursor);
            let page = self
                .connectors
                .crm
                .changes(cursor.as_ref(), page_size)
                .await
                .map_err(|source| EngineError::Connector {
                    connector: "crm",
                    source,
                })?;
            stats.pages += 1;
            for bad in &page.invalid {
                tracing::warn!(location = %bad.location, reason = %bad.reason, "CRM record skipped");
                stats.invalid += 1;
            }
            for rec in &page.records {
                match self.ingest_record(rec).await? {
                    Some(changes) => {
                        stats.records += 1;
                        stats.changes += changes;
                    }
                    None => stats.invalid += 1,
                }
            }
            // A deleted CRM record does not withdraw consent: the ledger keeps the proof and
            // the person keeps their choice. It is only reported.
            for gone in &page.deleted {
                tracing::info!(record = %gone, "CRM record deleted; consent kept");
                stats.deleted += 1;
            }
            if let Some(next) = &page.next_cursor {
                self.store.set_cursor("crm", &next.0, Utc::now()).await?;
            }
            progress(&stats);
            if !page.has_more {
                return Ok(stats);
            }
        }
    }

    /// One CRM record: upsert the contact and apply what the CRM asserts. `None` if the
    /// record cannot become a contact (it is reported and skipped).
    pub async fn ingest_record(&self, rec: &CrmRecord) -> EngineResult<Option<u64>> {
        let Some(raw) = rec.email.as_deref() else {
            tracing::warn!(record = %rec.record, "CRM record has no email address; skipped");
            return Ok(None);
        };
        let address = match email::normalise(raw) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(record = %rec.record, error = %e, "CRM record has an invalid email address; skipped");
                return Ok(None);
            }
        };
        let upsert = ContactUpsert {
            email: address,
            language: rec.language.clone().filter(|l| !l.trim().is_empty()),
            fields: rec.fields.clone(),
            crm_record: Some(rec.record.to_string()),
        };
        let contact = self.store.upsert_contact(&upsert, Utc::now()).await?;
        for unknown in rec.asserted_lists.iter().filter(|l| self.list(l).is_none()) {
            tracing::warn!(record = %rec.record, list = %unknown, "CRM asserts a list that is not configured");
        }
        let mut changes = 0;
        for list in self.lists() {
            // Opt-out on any record wins over an assertion on this or another record.
            let input = if rec.opted_out {
                Input::CrmOptedOut
            } else if rec.asserted_lists.iter().any(|l| l == &list.id) {
                Input::CrmAsserted
            } else {
                continue;
            };
            let evidence = Evidence {
                crm_record: Some(rec.record.to_string()),
                ..Evidence::default()
            };
            if let Applied::Changed(_) = self.apply(&contact, list, input, "crm", evidence).await? {
                changes += 1;
            }
        }
        Ok(Some(changes))
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
                        .apply(&contact, list, input, "campaigns", evidence)
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

    /// Run the rules for every contact on every list and apply what they propose.
    pub async fn decide_all(&self) -> EngineResult<DecideStats> {
        let rules = self.rules();
        let mut stats = DecideStats::default();
        let mut after: Option<String> = None;
        loop {
            let page = self.store.contacts_page(after.as_deref(), 500).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for contact in &page {
                stats.contacts += 1;
                for list in self.lists() {
                    self.decide_one(&rules, contact, list, &mut stats).await?;
                }
            }
        }
        Ok(stats)
    }

    /// Run the rules for one contact on every list (e.g. right after a webhook).
    pub async fn decide_contact(&self, contact: &Contact) -> EngineResult<DecideStats> {
        let rules = self.rules();
        let mut stats = DecideStats {
            contacts: 1,
            ..DecideStats::default()
        };
        for list in self.lists() {
            self.decide_one(&rules, contact, list, &mut stats).await?;
        }
        Ok(stats)
    }

    async fn decide_one(
        &self,
        rules: &RuleSet,
        contact: &Contact,
        list: &ListConfig,
        stats: &mut DecideStats,
    ) -> EngineResult<()> {
        let now = Utc::now();
        let consent = self
            .store
            .consent(&contact.id, &list.id)
            .await?
            .unwrap_or_else(|| Consent::new(now));
        if consent.state == ConsentState::Erased {
            return Ok(());
        }
        let engagement = self.store.last_engagement(&contact.id, &list.id).await?;
        let proposals = match rules.decide(
            &input::contact_map(contact),
            &input::consent_map(&consent, engagement, now),
            &input::ctx_map(list, now),
        ) {
            Ok(p) => p,
            Err(e) => {
                // A broken rule fails this one decision; the contact is left unchanged.
                metrics::counter!("optinsync_rule_errors_total").increment(1);
                tracing::warn!(contact_id = %contact.id, list = %list.id, error = %e, "rule failed; contact left unchanged");
                stats.rule_errors += 1;
                return Ok(());
            }
        };
        for p in proposals {
            let input = match input_for(p.action) {
                Some(input) => input,
                None if p.action == Action::Subscribe && !consent.state.on_list() => {
                    metrics::counter!("optinsync_consent_refused_total", "input" => "subscribe")
                        .increment(1);
                    tracing::warn!(
                        contact_id = %contact.id, list = %list.id, state = %consent.state, reason = %p.reason,
                        rule = %p.rule_file, "rule proposed subscribe without confirmation; refused (invariant 1)"
                    );
                    stats.refused += 1;
                    continue;
                }
                // Subscribing happens on confirmation and write-back after every change, by
                // themselves; `none` is nothing.
                None => continue,
            };
            let evidence = Evidence {
                rule_file: Some(p.rule_file.clone()),
                rule_hash: Some(p.rule_hash.clone()),
                reason: Some(p.reason.clone()),
                ..Evidence::default()
            };
            match self.apply(contact, list, input, "rules", evidence).await? {
                Applied::Changed(_) => stats.changes += 1,
                Applied::Refused(r) => {
                    tracing::warn!(
                        contact_id = %contact.id, list = %list.id, reason = %p.reason, rule = %p.rule_file,
                        refused = r.reason, "rule action refused"
                    );
                    stats.refused += 1;
                }
                Applied::Unchanged => {}
            }
        }
        Ok(())
    }
}

/// The state-machine input a rule action stands for; `None` for actions the engine performs
/// by itself (`subscribe` on confirmation, `write_back` after every change) and `none`.
pub fn input_for(action: Action) -> Option<Input> {
    Some(match action {
        Action::SendDoi => Input::SendDoi {
            token: uuid::Uuid::new_v4().to_string(),
        },
        Action::SendReminder => Input::SendReminder,
        Action::SendRevalidation => Input::SendRevalidation {
            token: uuid::Uuid::new_v4().to_string(),
        },
        Action::Remove => Input::Lapse,
        Action::Suppress => Input::Suppress,
        Action::Subscribe | Action::WriteBack | Action::None => return None,
    })
}

/// Outbox rows for a transition's effects. Keys derive from the event id, so a row can never
/// be enqueued twice for one event.
fn outbox_rows(
    effects: &[Effect],
    contact: &Contact,
    list: &ListConfig,
    event_id: &str,
    to: ConsentState,
) -> Vec<NewOutbox> {
    effects
        .iter()
        .filter_map(|e| {
            let (kind, priority, key, payload) = match e {
                // The campaigns tool runs this list's double opt-in: ask it, send no mail.
                Effect::SendConfirmationMail { token, .. }
                    if list.doi == crate::config::DoiMode::Campaigns =>
                {
                    (
                        "campaigns_request_doi",
                        PRIORITY_NORMAL,
                        format!("request-doi:{event_id}"),
                        serde_json::json!({ "token": token }),
                    )
                }
                Effect::SendConfirmationMail { token, kind } => (
                    "mail",
                    PRIORITY_NORMAL,
                    format!("mail:{event_id}"),
                    serde_json::json!({ "token": token, "mail": kind.as_str() }),
                ),
                Effect::Subscribe => (
                    "campaigns_subscribe",
                    PRIORITY_NORMAL,
                    format!("subscribe:{event_id}"),
                    serde_json::json!({}),
                ),
                // The address travels with the removal so it still works after erasure.
                Effect::Remove => (
                    "campaigns_remove",
                    PRIORITY_LEGAL,
                    format!("remove:{event_id}"),
                    serde_json::json!({ "email": contact.email }),
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
                    (
                        "crm_write_back",
                        priority,
                        format!("writeback:{event_id}"),
                        serde_json::json!({ "state": to.as_str(), "opt_out": opt_out }),
                    )
                }
            };
            Some(NewOutbox {
                kind: kind.to_owned(),
                priority,
                idempotency_key: key,
                contact_id: contact.id.clone(),
                list_id: list.id.clone(),
                payload,
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
                let upsert = ContactUpsert {
                    email: address,
                    language: member.language.clone(),
                    fields: member.fields.clone(),
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
                        "campaigns-import",
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

/// What [`Engine::erase`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EraseReport {
    pub lists: u64,
    pub store: crate::store::Erasure,
}

impl Engine {
    /// GDPR erasure (Art. 17): withdraw and suppress the address on every list (removals are
    /// queued with legal priority), then remove the personal data: the ledger keeps its events
    /// — that consent was given and withdrawn — but not the evidence text, and the contact keeps
    /// only a keyed hash of its address, so it stays suppressed.
    pub async fn erase(&self, contact: &Contact) -> EngineResult<EraseReport> {
        let mut report = EraseReport::default();
        for list in self.lists() {
            let evidence = Evidence {
                reason: Some("erasure requested (GDPR Art. 17)".into()),
                ..Evidence::default()
            };
            if let Applied::Changed(_) = self
                .apply(contact, list, Input::Erase, "cli", evidence)
                .await?
            {
                report.lists += 1;
            }
        }
        let hash = self.tokens.address_hash(&contact.email);
        report.store = self
            .store
            .erase_contact(&contact.id, &hash, Utc::now())
            .await?;
        tracing::info!(contact_id = %contact.id, redacted = report.store.redacted_events, "contact erased");
        Ok(report)
    }
}
