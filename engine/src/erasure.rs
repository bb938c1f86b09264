//! GDPR erasure: the ledger keeps the events with their evidence redacted, the connectors
//! forget the person, and the keyed address hash keeps the address suppressed.

use chrono::Utc;
use serde::Serialize;

use crate::consent::Input;
use crate::engine::{Applied, Engine, EngineError, EngineResult};
use crate::ledger::{EventSource, Evidence};
use crate::store::Contact;

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
