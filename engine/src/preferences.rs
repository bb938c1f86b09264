//! The preference centre's "send me a link" (`GET /preferences`): a known, unsuppressed
//! address gets a mail with its preference-centre link, through the outbox; anyone else
//! nothing. The caller answers alike either way.

use chrono::Utc;
use optinsync_plugin_api::ConnectorError;

use crate::consent::ConsentState;
use crate::engine::{Engine, EngineResult};
use crate::ledger::{EventSource, Evidence, NewEvent};
use crate::store::{Contact, Finish, NewOutbox, OutboxItem, OutboxWork, PRIORITY_NORMAL};
use crate::work::ConnectorRole;

impl Engine {
    /// Queue the preference-centre link for a (normalised) address, with the request's
    /// evidence; `false` (nothing done) for an unknown, erased or suppressed address.
    pub async fn request_preferences_link(
        &self,
        address: &str,
        evidence: Evidence,
    ) -> EngineResult<bool> {
        let Some(contact) = self.store.contact_by_email(address).await? else {
            return Ok(false);
        };
        let suppressed = self
            .store
            .is_any_suppressed(&self.tokens.address_hashes(address))
            .await?;
        // The link names a list (tokens do); the first the person has a consent on.
        let consents = self.store.consents_of_contact(&contact.id).await?;
        let list = consents
            .iter()
            .find_map(|(id, _)| self.list(id))
            .or_else(|| self.lists().first());
        let (Some(list), false) = (list, suppressed || contact.erased) else {
            return Ok(false);
        };
        let state = consents
            .iter()
            .find(|(id, _)| *id == list.id)
            .map_or(ConsentState::None, |(_, c)| c.state);
        let event = NewEvent {
            event_id: uuid::Uuid::now_v7().to_string(),
            at: Utc::now(),
            contact_id: contact.id.clone(),
            list_id: list.id.clone(),
            kind: "preferences_link_requested".into(),
            from_state: state,
            to_state: state,
            source: EventSource::Web,
            evidence,
        };
        let row = NewOutbox {
            work: OutboxWork::PreferencesLinkMail {},
            priority: PRIORITY_NORMAL,
            idempotency_key: format!("preferences-link:{}", event.event_id),
            contact_id: contact.id.clone(),
            list_id: list.id.clone(),
        };
        let lane = row.work.connector();
        self.store.append_with_outbox(&event, &[row]).await?;
        self.outbox_wake.wake([lane]);
        Ok(true)
    }

    /// Deliver a [`OutboxWork::PreferencesLinkMail`]: compose, keep the snapshot, send, and
    /// record `preferences_link_mail_sent` with the link's token id (so the link is honoured).
    pub(crate) async fn deliver_preferences_link(
        &self,
        item: &OutboxItem,
        contact: &Contact,
        list: &crate::config::ListConfig,
    ) -> EngineResult<Finish> {
        if self
            .store
            .is_any_suppressed(&self.tokens.address_hashes(&contact.email))
            .await?
        {
            return Ok(Finish::Done {
                event: None,
                note: Some("skipped: address suppressed".into()),
            });
        }
        let composed = match crate::mail::compose_preferences_link(
            &self.config,
            &self.tokens,
            contact,
            list,
            &item.idempotency_key,
            Utc::now(),
        ) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Finish::Dead {
                    error: format!("preference-link mail cannot be rendered: {e}"),
                });
            }
        };
        self.store.put_snapshot(&composed.snapshot).await?;
        let sent = self.connectors.mail.send(&composed.message).await;
        self.observe(ConnectorRole::Mail, &sent);
        match sent {
            Ok(sent) => {
                let state = self
                    .store
                    .consent(&contact.id, &list.id)
                    .await?
                    .map_or(ConsentState::None, |c| c.state);
                let event = NewEvent {
                    event_id: uuid::Uuid::now_v7().to_string(),
                    at: Utc::now(),
                    contact_id: contact.id.clone(),
                    list_id: list.id.clone(),
                    kind: "preferences_link_mail_sent".into(),
                    from_state: state,
                    to_state: state,
                    source: EventSource::Outbox,
                    evidence: Evidence {
                        message_id: Some(sent.message_id),
                        content_hash: Some(composed.content_hash),
                        preferences_token_id: Some(composed.preferences_token_id),
                        key_id: Some(self.tokens.current_key_id().to_owned()),
                        ..Evidence::default()
                    },
                };
                Ok(Finish::Done {
                    event: Some(Box::new(event)),
                    note: None,
                })
            }
            Err(ConnectorError::Rejected { message, .. }) => Ok(Finish::Dead {
                error: format!("address rejected: {message}"),
            }),
            Err(e) => Ok(self.failure(item, e)),
        }
    }
}
