//! Website signups (`POST /signup/{list}`): the address is stored if it is new, and each list
//! gets an [`Input::Signup`] — a DOI mail through the outbox, never consent by itself. Every
//! signup leaves a ledger event with its evidence, whether or not it mails, so the work is
//! the same for a new, pending, confirmed, withdrawn or suppressed address.

use std::collections::BTreeMap;

use chrono::Utc;

use crate::config::ListConfig;
use crate::consent::{ConsentState, Input};
use crate::engine::{Applied, Engine, EngineResult};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::store::{Contact, ContactUpsert, OutboxItem};
use optinsync_plugin_api::{ConnectorResult, NewContact};

/// Contact field a signup's name is kept in.
pub const NAME_FIELD: &str = "Name";

/// One website signup, checked by the web layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignupRequest {
    /// Normalised (`email::normalise`).
    pub email: String,
    pub name: Option<String>,
    /// A language tag the templates have, or none.
    pub language: Option<String>,
    /// Ids of configured lists.
    pub lists: Vec<String>,
    /// IP, user agent, origin, the text shown (page snapshot or declared form hash).
    pub evidence: Evidence,
}

/// What a signup did on one list. Never shown to the person: the answer is the same for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignupOutcome {
    /// A new signup: pending, a DOI mail queued.
    Mailed,
    /// Nothing to do: already confirmed, or a signup open inside the reminder window.
    Unchanged,
    /// Refused by the state machine (a suppressed address, an erased contact).
    Refused,
}

impl Engine {
    /// Apply a website signup to each of its lists; returns the contact and each list's
    /// outcome.
    pub async fn signup(
        &self,
        request: &SignupRequest,
    ) -> EngineResult<(Contact, Vec<(String, SignupOutcome)>)> {
        let contact = self.signup_contact(request).await?;
        let mut outcomes = Vec::with_capacity(request.lists.len());
        for list in request.lists.iter().filter_map(|id| self.list(id)) {
            let outcome = self.signup_on(&contact, list, &request.evidence).await?;
            outcomes.push((list.id.clone(), outcome));
        }
        Ok((contact, outcomes))
    }

    /// The contact of the address: an existing one keeps its data (a form may be filled in
    /// by anyone), a new one takes the name and language given.
    async fn signup_contact(&self, request: &SignupRequest) -> EngineResult<Contact> {
        if let Some(c) = self.store.contact_by_email(&request.email).await? {
            return Ok(c);
        }
        let mut fields = BTreeMap::new();
        if let Some(name) = &request.name {
            fields.insert(NAME_FIELD.to_owned(), serde_json::Value::from(name.clone()));
        }
        let upsert = ContactUpsert {
            email: request.email.clone(),
            language: request.language.clone(),
            fields,
            crm_record: None,
        };
        Ok(self.store.upsert_contact(&upsert, Utc::now()).await?)
    }

    async fn signup_on(
        &self,
        contact: &Contact,
        list: &ListConfig,
        evidence: &Evidence,
    ) -> EngineResult<SignupOutcome> {
        let input = Input::Signup {
            token: uuid::Uuid::new_v4().to_string(),
        };
        let (outcome, note) = match self
            .apply(contact, list, input, EventSource::Web, evidence.clone())
            .await?
        {
            Applied::Changed(_) => return Ok(SignupOutcome::Mailed),
            Applied::Unchanged => (
                SignupOutcome::Unchanged,
                "no mail: already confirmed, or a signup is open inside the reminder window",
            ),
            Applied::Refused(_) => (
                SignupOutcome::Refused,
                "no mail: the address is suppressed or cannot sign up",
            ),
        };
        // The attempt is evidence too (who tried, from where), and recording it keeps the
        // work of every answer alike.
        let state = self
            .store
            .consent(&contact.id, &list.id)
            .await?
            .map_or(ConsentState::None, |c| c.state);
        let mut evidence = evidence.clone();
        evidence.reason = Some(note.to_owned());
        self.append_event(NewEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            contact_id: contact.id.clone(),
            list_id: list.id.clone(),
            kind: "signup_received".into(),
            from_state: state,
            to_state: state,
            source: EventSource::Web,
            evidence,
        })
        .await?;
        Ok(outcome)
    }
}

impl Engine {
    /// Deliver a [`crate::store::OutboxWork::CrmUpsert`]: the CRM creates or updates the person's record
    /// with the consent as it stands now, and the record is kept on the contact.
    pub(crate) async fn upsert_in_crm(
        &self,
        item: &OutboxItem,
        contact: &Contact,
        list: &ListConfig,
    ) -> EngineResult<ConnectorResult<()>> {
        if !contact.crm_records.is_empty() {
            // The CRM has them meanwhile (a pull found the address): write-backs update it.
            return Ok(Ok(()));
        }
        let state = self
            .store
            .consent(&contact.id, &list.id)
            .await?
            .map_or(ConsentState::None, |c| c.state);
        let new = NewContact {
            key: item.idempotency_key.clone(),
            email: contact.email.clone(),
            name: contact
                .fields
                .get(NAME_FIELD)
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            language: contact.language.clone(),
            list: list.id.clone(),
            state,
            at: Utc::now(),
        };
        let record = match self.connectors.crm.upsert_contact(&new).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let attach = ContactUpsert {
            email: contact.email.clone(),
            language: None,
            fields: BTreeMap::new(),
            crm_record: Some(record.clone()),
        };
        self.store.upsert_contact(&attach, Utc::now()).await?;
        tracing::info!(contact_id = %contact.id, record = %record, "website signup's person written to the CRM");
        Ok(Ok(()))
    }
}
