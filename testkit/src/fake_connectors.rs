//! In-memory connectors for driving the engine in-process: a CRM that serves a change feed of
//! records and records the consent written back to it, a campaigns tool that records what it
//! was asked to do and serves status events and list members, and a mail transport that keeps
//! the mails it was handed. Each can be told to answer its next calls with errors
//! ([`FakeCrm::fail_next_write_backs`] and friends).
//!
//! Nothing here does I/O; every call is recorded in order, so a test asserts on exactly what
//! the engine asked of the outside world.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    BatchResult, CampaignsConnector, ChangePage, Connector, ConnectorError, ConnectorResult,
    ConsentWriteBack, CrmConnector, CrmRecord, Cursor, Health, Keyed, MailTransport, MemberPage,
    OutgoingMessage, ReadyMessage, RecordRef, SentMessage, StatusEvent, StatusKind, StatusPage,
    Subscriber, WebhookEvent, WebhookRequest, WireMessage, all_items,
};

/// Lock a mutex, ignoring poisoning (a panicking test thread must not hide later assertions).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn healthy() -> ConnectorResult<Health> {
    Ok(Health {
        ok: true,
        detail: "fake".into(),
    })
}

/// A position in an in-memory feed: the index of the next item.
fn position(cursor: Option<&Cursor>) -> ConnectorResult<usize> {
    match cursor {
        None => Ok(0),
        Some(c) => c.0.parse().map_err(|_| ConnectorError::InvalidInput {
            message: format!("not a fake cursor: {}", c.0),
        }),
    }
}

/// A CRM record on the `Contacts` module: `id`, address as given, lists asserted.
pub fn crm_record(id: &str, email: &str, asserted_lists: &[&str]) -> CrmRecord {
    CrmRecord {
        record: RecordRef {
            module: "Contacts".into(),
            id: id.into(),
        },
        email: Some(email.into()),
        language: None,
        opted_out: false,
        asserted_lists: asserted_lists.iter().map(|l| (*l).to_owned()).collect(),
        fields: BTreeMap::new(),
        modified_at: None,
    }
}

#[derive(Debug, Default)]
struct CrmState {
    feed: Vec<CrmRecord>,
    /// Change-feed reads made so far, and the errors to answer given reads with (by number).
    changes_calls: usize,
    changes_failures: BTreeMap<usize, ConnectorError>,
    write_backs: Vec<ConsentWriteBack>,
    write_back_failures: VecDeque<ConnectorError>,
}

/// A CRM whose change feed is the records pushed so far, in order (the cursor is an index).
#[derive(Debug, Default)]
pub struct FakeCrm {
    state: Mutex<CrmState>,
}

impl FakeCrm {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a record (a create or an edit) to the change feed.
    pub fn push(&self, record: CrmRecord) {
        lock(&self.state).feed.push(record);
    }

    /// Answer a change-feed read with `error`: the one after `after` more reads are served
    /// (`0`: the next read). Reads after it are served again.
    pub fn fail_change_read(&self, after: usize, error: ConnectorError) {
        let mut state = lock(&self.state);
        let at = state.changes_calls + after;
        state.changes_failures.insert(at, error);
    }

    /// Every write-back received, in order.
    pub fn write_backs(&self) -> Vec<ConsentWriteBack> {
        lock(&self.state).write_backs.clone()
    }

    /// Answer the next write-backs with these errors (one call each), then accept again.
    pub fn fail_next_write_backs(&self, errors: impl IntoIterator<Item = ConnectorError>) {
        lock(&self.state).write_back_failures.extend(errors);
    }
}

#[async_trait]
impl Connector for FakeCrm {
    async fn health(&self) -> ConnectorResult<Health> {
        healthy()
    }

    fn accepts_webhooks(&self) -> bool {
        true
    }

    /// The body is a JSON array of `Module/id` strings.
    async fn webhook(&self, request: &WebhookRequest) -> ConnectorResult<WebhookEvent> {
        let ids: Vec<String> =
            serde_json::from_str(&request.body).map_err(|e| ConnectorError::InvalidInput {
                message: e.to_string(),
            })?;
        let refs = ids
            .iter()
            .map(|s| {
                s.parse::<RecordRef>()
                    .map_err(|e| ConnectorError::InvalidInput {
                        message: e.to_string(),
                    })
            })
            .collect::<ConnectorResult<Vec<_>>>()?;
        Ok(WebhookEvent::Changed { records: refs })
    }
}

#[async_trait]
impl CrmConnector for FakeCrm {
    async fn changes(&self, cursor: Option<&Cursor>, limit: usize) -> ConnectorResult<ChangePage> {
        let start = position(cursor)?;
        let mut state = lock(&self.state);
        let call = state.changes_calls;
        state.changes_calls += 1;
        if let Some(e) = state.changes_failures.remove(&call) {
            return Err(e);
        }
        let start = start.min(state.feed.len());
        let end = (start + limit.max(1)).min(state.feed.len());
        Ok(ChangePage {
            records: state.feed[start..end].to_vec(),
            invalid: vec![],
            deleted: vec![],
            next_cursor: Some(Cursor(end.to_string())),
            has_more: end < state.feed.len(),
        })
    }

    async fn fetch(&self, record: &RecordRef) -> ConnectorResult<Option<CrmRecord>> {
        Ok(lock(&self.state)
            .feed
            .iter()
            .rev()
            .find(|r| &r.record == record)
            .cloned())
    }

    async fn write_back(&self, consent: &ConsentWriteBack) -> ConnectorResult<()> {
        let mut state = lock(&self.state);
        if let Some(e) = state.write_back_failures.pop_front() {
            return Err(e);
        }
        state.write_backs.push(consent.clone());
        Ok(())
    }
}

/// One call the campaigns tool received.
#[derive(Debug, Clone, PartialEq)]
pub enum CampaignsCall {
    Subscribe {
        list: String,
        subscribers: Vec<Subscriber>,
    },
    Remove {
        list: String,
        emails: Vec<String>,
    },
    /// A removal of erased people ([`CampaignsConnector::erase`]).
    Erase {
        list: String,
        emails: Vec<String>,
    },
    RequestDoi {
        list: String,
        subscriber: Subscriber,
    },
}

#[derive(Debug, Default)]
struct CampaignsState {
    calls: Vec<CampaignsCall>,
    status: HashMap<String, Vec<StatusEvent>>,
    members: HashMap<String, Vec<Subscriber>>,
    failures: VecDeque<ConnectorError>,
    /// Items one subscribe or removal takes (0 = the API's default of 1).
    max_batch: usize,
    /// Addresses subscribes refuse item by item.
    refused: Vec<String>,
    /// Calls the connector says it serves at once (0 = the API's default of 1).
    concurrency: usize,
    /// How long each subscribe/remove/erase call takes.
    call_time: std::time::Duration,
    /// Calls running now, and the most ever running at once.
    in_flight: usize,
    peak_in_flight: usize,
}

/// A campaigns tool: records subscribes, removals and DOI requests; serves the status events
/// and members it was given.
#[derive(Debug, Default)]
pub struct FakeCampaigns {
    state: Mutex<CampaignsState>,
}

impl FakeCampaigns {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take up to `n` items per subscribe or removal call (default 1).
    pub fn set_max_batch(&self, n: usize) {
        lock(&self.state).max_batch = n;
    }

    /// Say that `n` calls may run at once ([`CampaignsConnector::concurrency`]), and make each
    /// subscribe/remove/erase call take `call_time`, so that overlapping calls can be seen
    /// ([`Self::peak_in_flight`]).
    pub fn set_concurrency(&self, n: usize, call_time: std::time::Duration) {
        let mut state = lock(&self.state);
        state.concurrency = n;
        state.call_time = call_time;
    }

    /// The most subscribe/remove/erase calls that ever ran at once.
    pub fn peak_in_flight(&self) -> usize {
        lock(&self.state).peak_in_flight
    }

    /// One call's time, counted as in flight while it lasts.
    async fn take_time(&self) {
        let wait = {
            let mut state = lock(&self.state);
            state.in_flight += 1;
            state.peak_in_flight = state.peak_in_flight.max(state.in_flight);
            state.call_time
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        lock(&self.state).in_flight -= 1;
    }

    /// From now on, refuse this address in subscribes for good (a per-item permanent
    /// failure; the other items of the call go through).
    pub fn refuse(&self, email: &str) {
        lock(&self.state).refused.push(email.to_owned());
    }

    /// Every subscribe, removal and DOI request, in order.
    pub fn calls(&self) -> Vec<CampaignsCall> {
        lock(&self.state).calls.clone()
    }

    /// Something happened to `email` inside the tool on `list` (its status feed grows).
    pub fn push_status(&self, list: &str, email: &str, kind: StatusKind, at: DateTime<Utc>) {
        lock(&self.state)
            .status
            .entry(list.to_owned())
            .or_default()
            .push(StatusEvent {
                email: email.to_owned(),
                kind,
                at,
                detail: None,
                bounce: None,
            });
    }

    /// `email` is already a member of `list` (for `import_existing`).
    pub fn add_member(&self, list: &str, email: &str) {
        lock(&self.state)
            .members
            .entry(list.to_owned())
            .or_default()
            .push(Subscriber {
                email: email.to_owned(),
                language: None,
                fields: BTreeMap::new(),
                proof: None,
            });
    }

    /// Answer the next subscribe/remove/DOI-request calls with these errors, one call each.
    pub fn fail_next_calls(&self, errors: impl IntoIterator<Item = ConnectorError>) {
        lock(&self.state).failures.extend(errors);
    }

    fn record(&self, call: CampaignsCall) -> ConnectorResult<()> {
        let mut state = lock(&self.state);
        if let Some(e) = state.failures.pop_front() {
            return Err(e);
        }
        state.calls.push(call);
        Ok(())
    }
}

#[async_trait]
impl Connector for FakeCampaigns {
    async fn health(&self) -> ConnectorResult<Health> {
        healthy()
    }
}

#[async_trait]
impl CampaignsConnector for FakeCampaigns {
    fn max_batch(&self) -> usize {
        lock(&self.state).max_batch.max(1)
    }

    fn concurrency(&self) -> usize {
        lock(&self.state).concurrency.max(1)
    }

    /// Recorded as one call (without the refused addresses); a queued failure fails the
    /// whole call (every item).
    async fn subscribe(&self, list: &str, items: &[Keyed<Subscriber>]) -> BatchResult {
        self.take_time().await;
        let refused = lock(&self.state).refused.clone();
        let outcome = self.record(CampaignsCall::Subscribe {
            list: list.to_owned(),
            subscribers: items
                .iter()
                .filter(|k| !refused.contains(&k.item.email))
                .map(|k| k.item.clone())
                .collect(),
        });
        outcome.map(|()| {
            items
                .iter()
                .map(|k| match refused.contains(&k.item.email) {
                    true => Err(ConnectorError::permanent("refused by the fake")),
                    false => Ok(()),
                })
                .collect()
        })
    }

    async fn remove(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        self.take_time().await;
        let outcome = self.record(CampaignsCall::Remove {
            list: list.to_owned(),
            emails: items.iter().map(|k| k.item.clone()).collect(),
        });
        all_items(items.len(), outcome)
    }

    async fn erase(&self, list: &str, items: &[Keyed<String>]) -> BatchResult {
        self.take_time().await;
        let outcome = self.record(CampaignsCall::Erase {
            list: list.to_owned(),
            emails: items.iter().map(|k| k.item.clone()).collect(),
        });
        all_items(items.len(), outcome)
    }

    async fn status_events(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<StatusPage> {
        let (events, next_cursor) = rest(&lock(&self.state).status, list, cursor)?;
        Ok(StatusPage {
            events,
            next_cursor,
            has_more: false,
        })
    }

    async fn request_doi(&self, list: &str, subscriber: &Keyed<Subscriber>) -> ConnectorResult<()> {
        self.record(CampaignsCall::RequestDoi {
            list: list.to_owned(),
            subscriber: subscriber.item.clone(),
        })
    }

    async fn list_members(
        &self,
        list: &str,
        cursor: Option<&Cursor>,
    ) -> ConnectorResult<MemberPage> {
        let (members, next_cursor) = rest(&lock(&self.state).members, list, cursor)?;
        Ok(MemberPage {
            members,
            next_cursor,
            has_more: false,
        })
    }
}

/// What `list`'s feed holds from `cursor` on (all of it: one page), and the cursor after it.
fn rest<T: Clone>(
    feeds: &HashMap<String, Vec<T>>,
    list: &str,
    cursor: Option<&Cursor>,
) -> ConnectorResult<(Vec<T>, Option<Cursor>)> {
    let feed = feeds.get(list).map_or(&[][..], Vec::as_slice);
    let start = position(cursor)?.min(feed.len());
    Ok((feed[start..].to_vec(), Some(Cursor(feed.len().to_string()))))
}

#[derive(Debug, Default)]
struct MailState {
    sent: Vec<OutgoingMessage>,
    forgotten: Vec<String>,
    failures: VecDeque<ConnectorError>,
    prepare_failures: VecDeque<ConnectorError>,
    /// Messages sent through `send_ready` with the wire form `prepare` made.
    sent_ready: usize,
}

/// A mail transport that keeps every message handed to it (deduplicating on the idempotency
/// key, as the `.eml` transport does) and forgets them on request. It makes messages ready
/// ahead as the SMTP transport does (`prepare` gives a wire form, `send_ready` sends it), so
/// the outbox's ready-ahead path runs in the engine's tests.
#[derive(Debug, Default)]
pub struct FakeMail {
    state: Mutex<MailState>,
}

impl FakeMail {
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages accepted and not forgotten, in order.
    pub fn sent(&self) -> Vec<OutgoingMessage> {
        lock(&self.state).sent.clone()
    }

    /// Idempotency keys of the kept messages deleted by [`MailTransport::forget`].
    pub fn forgotten(&self) -> Vec<String> {
        lock(&self.state).forgotten.clone()
    }

    /// Answer the next sends with these errors, one call each.
    pub fn fail_next_sends(&self, errors: impl IntoIterator<Item = ConnectorError>) {
        lock(&self.state).failures.extend(errors);
    }

    /// Answer the next [`MailTransport::prepare`] calls with these errors, one call each.
    pub fn fail_next_prepares(&self, errors: impl IntoIterator<Item = ConnectorError>) {
        lock(&self.state).prepare_failures.extend(errors);
    }

    /// How many messages went out through [`MailTransport::send_ready`] in the wire form
    /// [`MailTransport::prepare`] made (not deduplicated ones).
    pub fn sent_ready(&self) -> usize {
        lock(&self.state).sent_ready
    }

    fn accept(&self, message: &OutgoingMessage, ready: bool) -> ConnectorResult<SentMessage> {
        let mut state = lock(&self.state);
        if let Some(e) = state.failures.pop_front() {
            return Err(e);
        }
        let deduplicated = state
            .sent
            .iter()
            .any(|m| m.idempotency_key == message.idempotency_key);
        if !deduplicated {
            state.sent.push(message.clone());
            state.sent_ready += usize::from(ready);
        }
        Ok(SentMessage {
            message_id: message.message_id.clone(),
            deduplicated,
        })
    }
}

#[async_trait]
impl Connector for FakeMail {
    async fn health(&self) -> ConnectorResult<Health> {
        healthy()
    }
}

#[async_trait]
impl MailTransport for FakeMail {
    async fn send(&self, message: &OutgoingMessage) -> ConnectorResult<SentMessage> {
        self.accept(message, false)
    }

    async fn prepare(&self, message: OutgoingMessage) -> ConnectorResult<ReadyMessage> {
        if let Some(e) = lock(&self.state).prepare_failures.pop_front() {
            return Err(e);
        }
        let wire = WireMessage {
            mail_from: Some(message.from.clone()),
            rcpt_to: vec![message.to.clone()],
            bytes: message.text.clone().into_bytes(),
        };
        Ok(ReadyMessage {
            message,
            wire: Some(wire),
        })
    }

    async fn send_ready(&self, ready: &ReadyMessage) -> ConnectorResult<SentMessage> {
        self.accept(&ready.message, ready.wire.is_some())
    }

    async fn forget(&self, idempotency_keys: &[String]) -> ConnectorResult<u64> {
        let mut state = lock(&self.state);
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut state.sent)
            .into_iter()
            .partition(|m| idempotency_keys.contains(&m.idempotency_key));
        state.sent = kept;
        state
            .forgotten
            .extend(gone.iter().map(|m| m.idempotency_key.clone()));
        Ok(gone.len() as u64)
    }
}
