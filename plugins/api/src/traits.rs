//! The connector traits. [`Connector`] is what every connector has whatever its role; the
//! role traits add the calls the engine makes of a CRM, a campaigns tool and a mail transport.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    BatchResult, ChangePage, ConnectorError, ConnectorResult, ConsentWriteBack, CrmRecord, Cursor,
    Keyed, MemberPage, NewContact, OutgoingMessage, ReadyMessage, RecordRef, SentMessage,
    StatusPage, Subscriber, WebhookEvent, WebhookRequest,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

/// What every connector offers the engine, whatever its role.
#[async_trait]
pub trait Connector: Send + Sync + fmt::Debug {
    async fn health(&self) -> ConnectorResult<Health>;
    /// Periodic upkeep besides the role's own calls, e.g. registering or renewing a webhook
    /// channel before it expires. The daemon calls it about once per pass of the role's job;
    /// it must be cheap when nothing is due. A failure is logged and the job goes on.
    async fn maintain(&self) -> ConnectorResult<()> {
        Ok(())
    }
    /// Opaque state the engine persists in its store and hands back at the next start in
    /// [`crate::BuildContext::state`] — e.g. how much of each API quota was used and until when
    /// an endpoint is locked, so that a restart does not reset the budgets. Only the connector
    /// interprets it. `None` (the default): nothing to keep. Called after deliveries.
    async fn export_state(&self) -> Option<String> {
        None
    }
    /// Whether [`Self::webhook`] is served at `/webhooks/{name}` (otherwise that path is 404).
    fn accepts_webhooks(&self) -> bool {
        false
    }
    /// Verify a webhook call and say what it means. Forged or unknown calls are
    /// [`ConnectorError::InvalidInput`] (answered 400, nothing changes).
    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        let _ = request;
        Err(ConnectorError::InvalidInput {
            message: "this connector takes no webhooks".into(),
        })
    }
    /// The daemon stops: finish or abandon what is in flight (an out-of-process connector ends
    /// its process). Default: nothing.
    async fn shutdown(&self) {}
}

/// A CRM: the source of contacts and of asserted consent; receives consent write-back.
#[async_trait]
pub trait CrmConnector: Connector {
    /// Changes since `cursor` (`None` = from the beginning), at most `limit` records.
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage>;
    /// One record, or `None` if it no longer exists.
    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>>;
    /// Write the consent into the CRM. Must be idempotent ([`ConsentWriteBack::key`]).
    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()>;
    /// Whether [`Self::upsert_contact`] works as configured: without it, people who sign up
    /// on the website live in optinsync only (the daemon says so at start-up). Default: no.
    fn creates_records(&self) -> bool {
        false
    }
    /// Create the person's record, or update the one with their address, with the consent
    /// fields; returns the record, which later write-backs update. Must be idempotent
    /// ([`NewContact::key`]; matching by address makes a repeat an update). Default: not
    /// supported.
    async fn upsert_contact(&self, contact: &NewContact) -> ConnectorResult<RecordRef> {
        let _ = contact;
        Err(ConnectorError::Permanent {
            message: "this CRM connector cannot create records".into(),
        })
    }
}

/// A campaigns tool: holds the marketing lists; only confirmed contacts go on them.
#[async_trait]
pub trait CampaignsConnector: Connector {
    /// Largest number of items one [`Self::subscribe`] or [`Self::remove`] call takes; the
    /// outbox groups due rows of one list up to it. Default 1.
    fn max_batch(&self) -> usize {
        1
    }
    /// How many [`Self::subscribe`], [`Self::remove`] or [`Self::erase`] calls the outbox may
    /// have in flight at once (each for other contacts; one contact's rows keep their order).
    /// A connector that paces itself against the vendor's quota says how many calls it
    /// serves side by side. Default 1.
    fn concurrency(&self) -> usize {
        1
    }
    /// The connector's own cadence for [`Self::status_events`] (e.g. a vendor report that
    /// changes at most every few minutes). `None`: the daemon's `poll_interval`.
    fn status_interval(&self) -> Option<Duration> {
        None
    }
    /// Add or update subscribers on `list` (one result per item). Must be idempotent: an item
    /// may come again with the same key after a crash or a failed call, and subscribing a
    /// member again is success.
    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult;
    /// Take addresses off `list` (one result per item). Must be idempotent; an address that is
    /// not on the list is success.
    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult;
    /// Take erased people's addresses off `list` (GDPR erasure; one result per item).
    /// Default: the same as [`Self::remove`]. A connector whose tool can forget a person for
    /// good may do so here where the operator configured it (that may stop the address from
    /// ever being added again through the tool's API).
    async fn erase(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        self.remove(list, items).await
    }
    /// Unsubscribes, bounces and complaints that happened inside the tool since `cursor`.
    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage>;
    /// Ask the tool to run its own double opt-in for this person on `list` (a list whose
    /// confirmation the tool runs). Must be idempotent. Default: not supported.
    async fn request_doi(&self, list: &str, subscriber: &Keyed<Subscriber>) -> ConnectorResult<()> {
        let _ = (list, subscriber);
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot run a double opt-in".into(),
        })
    }
    /// Current members of `list`, a page at a time (`None` = from the start), for taking an
    /// existing list into the ledger (`optinsync campaign import-existing`). Default: not
    /// supported.
    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let _ = (list, cursor);
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot list members".into(),
        })
    }
}

/// A mail transport for DOI, reminder and re-permission mails.
#[async_trait]
pub trait MailTransport: Connector {
    /// Send one message. Must not send twice under one [`OutgoingMessage::idempotency_key`]
    /// where the transport can tell.
    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage>;
    /// Do ahead what sending needs no connection for (SMTP: render and DKIM-sign). The outbox
    /// calls it before the message takes one of its places in flight, which it holds from
    /// the send until the commit that records the mail (the places bound the duplicates
    /// after a crash, see [`Self::concurrency`]), so that work does not hold a place. An
    /// error here is the send's error (the outbox treats it as [`Self::send`]'s). Default:
    /// nothing ahead.
    async fn prepare(&self, message: OutgoingMessage) -> ConnectorResult<ReadyMessage> {
        Ok(ReadyMessage::unprepared(message))
    }
    /// Send a message made ready by [`Self::prepare`]; the same contract as [`Self::send`].
    /// Default: [`Self::send`] of its message.
    async fn send_ready(&self, ready: &ReadyMessage) -> ConnectorResult<SentMessage> {
        self.send(&ready.message).await
    }
    /// How many [`Self::send`] calls the outbox may have in flight at once (SMTP: its
    /// `pool_size`). The outbox keeps twice as many mails in flight (while one is sent,
    /// another, sent already, waits for the commit that records it); each of those may be
    /// sent again after a crash (same Message-ID), so twice this bounds the duplicates per
    /// crash.
    fn concurrency(&self) -> usize {
        1
    }
    /// Erasure (GDPR Art. 17): delete every copy this transport keeps of the messages sent
    /// under these idempotency keys; keys it never sent are ignored. Returns how many copies
    /// were deleted. Transports that keep no copy (SMTP hands the message over) keep this
    /// default.
    async fn forget(&self, idempotency_keys: &[String]) -> ConnectorResult<u64> {
        let _ = idempotency_keys;
        Ok(0)
    }
}
