//! An [`Engine`] in-process: configuration from a string, an SQLite store in a temporary
//! directory, in-memory connectors ([`optinsync_testkit::fake_connectors`]) and rules compiled
//! from source. The store is wrapped in a [`RacingStore`], which can let "another writer" (a
//! second engine on the same database) change consent right before the engine under test
//! commits — the window between planning and committing that conflicts come from.
//!
//! Tests reach the store only through [`Harness::store`] (the engine's own `store` field is
//! not read), so a change in how the engine exposes it touches nothing here.

#![allow(dead_code)] // Each test file uses a part of the harness.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use optinsync_engine::config::{ListConfig, LoadedConfig};
use optinsync_engine::consent::{Consent, ConsentState, Input};
use optinsync_engine::engine::{Applied, Connectors, Engine};
use optinsync_engine::ledger::{EventSource, Evidence, LedgerEvent, NewEvent};
use optinsync_engine::rules::RuleSet;
use optinsync_engine::store::{
    self, BatchCommit, Commit, ConsentSummary, Contact, ContactUpsert, Erasure, Finish,
    OutboxCounts, OutboxItem, Snapshot, Store, StoreResult,
};
use optinsync_plugin_api::{QuotaSlot, QuotaWindow};
use optinsync_testkit::fake_connectors::{FakeCampaigns, FakeCrm, FakeMail, crm_record};
use tempfile::TempDir;

/// A list whose double opt-in optinsync runs.
pub const NEWS: &str = r#"
[[lists]]
id = "news"
name = "News"
"#;

/// Rules: ask every asserted contact to confirm; nothing else.
pub const SEND_DOI: &str = r#"
fn decide(contact, consent, ctx) {
    if consent.state == "asserted" {
        return #{ action: "send_doi", reason: "asserted; confirmation required" };
    }
}
"#;

fn config_source(tables: &str) -> String {
    format!(
        r#"
[store]
url = "sqlite://optinsync.db"

[tokens]
secret = "engine-tests-secret-0123456789abcdef"
key_id = "k1"

[sender]
organisation = "Example"
from = "Example <confirm@example.org>"
postal_address = "1 Main St"

[connectors.crm]
kind = "fake"

[connectors.campaigns]
kind = "fake"

[connectors.mail]
kind = "fake"
{tables}
"#
    )
}

/// A future the race hook runs.
pub type RaceFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type RaceFn = Box<dyn FnMut() -> RaceFuture + Send>;

/// A [`Store`] that passes every call through to the real one, except that before a commit
/// ([`Store::commit`] or [`Store::commit_batch`]) it may first run a race: something another
/// writer does in the meantime.
#[derive(Debug)]
pub struct RacingStore {
    inner: Arc<dyn Store>,
    race: Mutex<Option<(usize, RaceHook)>>,
    commits: AtomicUsize,
}

struct RaceHook(RaceFn);

impl std::fmt::Debug for RaceHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaceHook")
    }
}

impl RacingStore {
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self {
            inner,
            race: Mutex::new(None),
            commits: AtomicUsize::new(0),
        }
    }

    /// Run `race` before each of the next `times` commits.
    pub fn race_next_commits(
        &self,
        times: usize,
        race: impl FnMut() -> RaceFuture + Send + 'static,
    ) {
        *self.race.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((times, RaceHook(Box::new(race))));
    }

    /// Races still to run.
    pub fn races_left(&self) -> usize {
        self.race
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |(n, _)| *n)
    }

    /// Commit calls (`commit` and `commit_batch`) seen so far.
    pub fn commit_calls(&self) -> usize {
        self.commits.load(Ordering::SeqCst)
    }

    async fn before_commit(&self) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        let next = {
            let mut race = self.race.lock().unwrap_or_else(|e| e.into_inner());
            match race.as_mut() {
                Some((n, hook)) if *n > 0 => {
                    *n -= 1;
                    Some((hook.0)())
                }
                _ => None,
            }
        };
        if let Some(fut) = next {
            fut.await;
        }
    }
}

#[async_trait]
impl Store for RacingStore {
    async fn migrate(&self) -> StoreResult<()> {
        self.inner.migrate().await
    }
    async fn upsert_contact(&self, c: &ContactUpsert, now: DateTime<Utc>) -> StoreResult<Contact> {
        self.inner.upsert_contact(c, now).await
    }
    async fn upsert_contacts(
        &self,
        batch: &[ContactUpsert],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Contact>> {
        self.inner.upsert_contacts(batch, now).await
    }
    async fn contact_by_email(&self, email: &str) -> StoreResult<Option<Contact>> {
        self.inner.contact_by_email(email).await
    }
    async fn rename_contact(&self, contact_id: &str, email: &str) -> StoreResult<bool> {
        self.inner.rename_contact(contact_id, email).await
    }
    async fn erased_contact_by_hash(&self, address_hash: &str) -> StoreResult<Option<Contact>> {
        self.inner.erased_contact_by_hash(address_hash).await
    }
    async fn contact_by_id(&self, id: &str) -> StoreResult<Option<Contact>> {
        self.inner.contact_by_id(id).await
    }
    async fn contacts_page(&self, after: Option<&str>, limit: i64) -> StoreResult<Vec<Contact>> {
        self.inner.contacts_page(after, limit).await
    }
    async fn contacts_page_before(
        &self,
        after: Option<&str>,
        limit: i64,
        updated_before: DateTime<Utc>,
    ) -> StoreResult<Vec<Contact>> {
        self.inner
            .contacts_page_before(after, limit, updated_before)
            .await
    }
    async fn contacts_by_ids(&self, ids: &[String]) -> StoreResult<Vec<Contact>> {
        self.inner.contacts_by_ids(ids).await
    }
    async fn consent(&self, contact_id: &str, list_id: &str) -> StoreResult<Option<Consent>> {
        self.inner.consent(contact_id, list_id).await
    }
    async fn consents_of_contact(&self, contact_id: &str) -> StoreResult<Vec<(String, Consent)>> {
        self.inner.consents_of_contact(contact_id).await
    }
    async fn consents_of_contacts(
        &self,
        contact_ids: &[String],
    ) -> StoreResult<Vec<(String, String, Consent)>> {
        self.inner.consents_of_contacts(contact_ids).await
    }
    async fn engagements_of_contacts(
        &self,
        contact_ids: &[String],
    ) -> StoreResult<Vec<(String, String, DateTime<Utc>)>> {
        self.inner.engagements_of_contacts(contact_ids).await
    }
    async fn suppressed_among(&self, address_hashes: &[String]) -> StoreResult<Vec<String>> {
        self.inner.suppressed_among(address_hashes).await
    }
    async fn commit(&self, c: &Commit) -> StoreResult<LedgerEvent> {
        self.before_commit().await;
        self.inner.commit(c).await
    }
    async fn commit_batch(&self, commits: &[BatchCommit]) -> StoreResult<Vec<Option<LedgerEvent>>> {
        self.before_commit().await;
        self.inner.commit_batch(commits).await
    }
    async fn append_event(&self, e: &NewEvent) -> StoreResult<LedgerEvent> {
        self.inner.append_event(e).await
    }
    async fn append_events(&self, events: &[NewEvent]) -> StoreResult<Vec<LedgerEvent>> {
        self.inner.append_events(events).await
    }
    async fn events_of_contact(&self, contact_id: &str) -> StoreResult<Vec<LedgerEvent>> {
        self.inner.events_of_contact(contact_id).await
    }
    async fn consent_events(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Vec<LedgerEvent>> {
        self.inner.consent_events(contact_id, list_id).await
    }
    async fn ledger_page(&self, after: i64, limit: i64) -> StoreResult<Vec<LedgerEvent>> {
        self.inner.ledger_page(after, limit).await
    }
    async fn claim_outbox(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxItem>> {
        self.inner
            .claim_outbox(worker, now, lease_until, limit)
            .await
    }
    async fn claim_outbox_kinds(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
        kinds: &[&str],
    ) -> StoreResult<Vec<OutboxItem>> {
        self.inner
            .claim_outbox_kinds(worker, now, lease_until, limit, kinds)
            .await
    }
    async fn finish_outbox(
        &self,
        id: i64,
        worker: &str,
        finish: &Finish,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.inner.finish_outbox(id, worker, finish, now).await
    }
    async fn release_claims(&self, prefix: &str, current: &str) -> StoreResult<u64> {
        self.inner.release_claims(prefix, current).await
    }
    async fn outbox_counts(&self) -> StoreResult<OutboxCounts> {
        self.inner.outbox_counts().await
    }
    async fn outbox_dead(&self) -> StoreResult<Vec<OutboxItem>> {
        self.inner.outbox_dead().await
    }
    async fn erase_contact(
        &self,
        contact_id: &str,
        address_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Erasure> {
        self.inner
            .erase_contact(contact_id, address_hash, now)
            .await
    }
    async fn after_erasure(&self) -> StoreResult<()> {
        self.inner.after_erasure().await
    }
    async fn retry_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool> {
        self.inner.retry_dead(id, now).await
    }
    async fn drop_dead(&self, id: i64, now: DateTime<Utc>) -> StoreResult<bool> {
        self.inner.drop_dead(id, now).await
    }
    async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        self.inner.try_lease(name, holder, now, until).await
    }
    async fn cursor(&self, name: &str) -> StoreResult<Option<String>> {
        self.inner.cursor(name).await
    }
    async fn set_cursor(&self, name: &str, value: &str, now: DateTime<Utc>) -> StoreResult<()> {
        self.inner.set_cursor(name, value, now).await
    }
    async fn wave_counts(
        &self,
        list_id: &str,
        day: i64,
    ) -> StoreResult<Vec<optinsync_engine::store::WaveCount>> {
        self.inner.wave_counts(list_id, day).await
    }
    async fn wave_first_days(&self, list_id: &str) -> StoreResult<Vec<(String, i64)>> {
        self.inner.wave_first_days(list_id).await
    }
    async fn add_mail_outcomes(
        &self,
        rows: &[(String, i64, optinsync_engine::store::MailOutcomes)],
    ) -> StoreResult<()> {
        self.inner.add_mail_outcomes(rows).await
    }
    async fn release_waves(&self, list_id: &str, now: DateTime<Utc>) -> StoreResult<u64> {
        self.inner.release_waves(list_id, now).await
    }
    async fn mail_outcomes(
        &self,
        list_id: &str,
        from_slot: i64,
    ) -> StoreResult<optinsync_engine::store::MailOutcomes> {
        self.inner.mail_outcomes(list_id, from_slot).await
    }
    async fn list_event_summary(
        &self,
        list_id: &str,
    ) -> StoreResult<Vec<optinsync_engine::store::EventSummary>> {
        self.inner.list_event_summary(list_id).await
    }
    async fn is_suppressed(&self, address_hash: &str) -> StoreResult<bool> {
        self.inner.is_suppressed(address_hash).await
    }
    async fn suppressions_of(
        &self,
        address_hashes: &[String],
    ) -> StoreResult<Vec<optinsync_engine::store::Suppressed>> {
        self.inner.suppressions_of(address_hashes).await
    }
    async fn append_with_outbox(
        &self,
        event: &optinsync_engine::ledger::NewEvent,
        outbox: &[optinsync_engine::store::NewOutbox],
    ) -> StoreResult<optinsync_engine::ledger::LedgerEvent> {
        self.inner.append_with_outbox(event, outbox).await
    }
    async fn suppressions(&self) -> StoreResult<Vec<optinsync_engine::store::Suppressed>> {
        self.inner.suppressions().await
    }
    async fn lift_suppressions(
        &self,
        address_hashes: &[String],
        events: &[optinsync_engine::ledger::NewEvent],
    ) -> StoreResult<u64> {
        self.inner.lift_suppressions(address_hashes, events).await
    }
    async fn is_any_suppressed(&self, address_hashes: &[String]) -> StoreResult<bool> {
        self.inner.is_any_suppressed(address_hashes).await
    }
    async fn put_snapshot(&self, s: &Snapshot) -> StoreResult<()> {
        self.inner.put_snapshot(s).await
    }
    async fn snapshot(&self, hash: &str) -> StoreResult<Option<Snapshot>> {
        self.inner.snapshot(hash).await
    }
    async fn record_engagement(
        &self,
        contact_id: &str,
        list_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        self.inner.record_engagement(contact_id, list_id, at).await
    }
    async fn last_engagement(
        &self,
        contact_id: &str,
        list_id: &str,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        self.inner.last_engagement(contact_id, list_id).await
    }
    async fn consent_summary(&self) -> StoreResult<Vec<ConsentSummary>> {
        self.inner.consent_summary().await
    }
    async fn events_per_day(
        &self,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<optinsync_engine::store::DayCount>> {
        self.inner.events_per_day(since).await
    }
    async fn states_reached(&self) -> StoreResult<Vec<optinsync_engine::store::StateReach>> {
        self.inner.states_reached().await
    }
    async fn consents_per_day(
        &self,
        state: &str,
    ) -> StoreResult<Vec<optinsync_engine::store::DayCount>> {
        self.inner.consents_per_day(state).await
    }
    async fn outbox_depth(&self) -> StoreResult<Vec<optinsync_engine::store::OutboxDepth>> {
        self.inner.outbox_depth().await
    }
    async fn ledger_head(&self) -> StoreResult<i64> {
        self.inner.ledger_head().await
    }
    async fn pending_removal_addresses(&self, list_id: &str) -> StoreResult<Vec<String>> {
        self.inner.pending_removal_addresses(list_id).await
    }
    async fn leases(&self) -> StoreResult<Vec<optinsync_engine::store::Lease>> {
        self.inner.leases().await
    }
    async fn list_consents(
        &self,
        list_id: &str,
    ) -> StoreResult<Vec<(String, optinsync_engine::consent::ConsentState)>> {
        self.inner.list_consents(list_id).await
    }
    async fn quota_take(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> StoreResult<QuotaSlot> {
        self.inner.quota_take(key, windows, now_ms).await
    }
    async fn quota_settle(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        sent_ms: i64,
        done_ms: i64,
    ) -> StoreResult<()> {
        self.inner
            .quota_settle(key, windows, sent_ms, done_ms)
            .await
    }
    async fn quota_lock(&self, key: &str, until_ms: i64) -> StoreResult<()> {
        self.inner.quota_lock(key, until_ms).await
    }
    async fn quota_usage(
        &self,
        key: &str,
        windows: &[QuotaWindow],
        now_ms: i64,
    ) -> StoreResult<(Vec<u32>, Option<i64>)> {
        self.inner.quota_usage(key, windows, now_ms).await
    }
    async fn mark_add(&self, set: &str, member: &str) -> StoreResult<()> {
        self.inner.mark_add(set, member).await
    }
    async fn mark_remove(&self, set: &str, members: &[String]) -> StoreResult<()> {
        self.inner.mark_remove(set, members).await
    }
    async fn quota_overview(
        &self,
        now_ms: i64,
    ) -> StoreResult<Vec<optinsync_engine::store::QuotaUse>> {
        self.inner.quota_overview(now_ms).await
    }
    async fn marks(&self, set: &str) -> StoreResult<Vec<String>> {
        self.inner.marks(set).await
    }
}

/// An engine on a fresh SQLite store with fake connectors, and a second engine ("another
/// writer", e.g. another daemon or a web request) on the same database that bypasses the
/// race hook.
#[derive(Debug)]
pub struct Harness {
    pub engine: Arc<Engine>,
    /// Another writer on the same database; its commits never run the race hook.
    pub other: Arc<Engine>,
    pub racing: Arc<RacingStore>,
    pub crm: Arc<FakeCrm>,
    pub campaigns: Arc<FakeCampaigns>,
    pub mail: Arc<FakeMail>,
    pub store: Arc<dyn Store>,
    config: Arc<LoadedConfig>,
    dir: TempDir,
}

impl Harness {
    /// `tables`: TOML appended to the base configuration — the `[[lists]]`, and any other
    /// table before them (e.g. `[sync]`); `rules`: the source of one rule script.
    pub async fn new(tables: &str, rules: &str) -> Harness {
        Self::with_campaigns(tables, rules, FakeCampaigns::new()).await
    }

    /// [`Harness::new`] with a campaigns fake set up beforehand (what the engine reads from
    /// its connectors once, when it is built, such as their concurrency).
    pub async fn with_campaigns(tables: &str, rules: &str, campaigns: FakeCampaigns) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let config =
            LoadedConfig::from_str(&config_source(tables), &dir.path().join("config.toml"))
                .expect("test config is valid");
        let config = Arc::new(config);
        let inner = store::open(&config.config.store.url)
            .await
            .expect("open SQLite store");
        inner.migrate().await.expect("migrate");
        let racing = Arc::new(RacingStore::new(Arc::clone(&inner)));
        let crm = Arc::new(FakeCrm::new());
        let campaigns = Arc::new(campaigns);
        let mail = Arc::new(FakeMail::new());
        let connectors = Connectors {
            crm: crm.clone(),
            campaigns: campaigns.clone(),
            mail: mail.clone(),
        };
        let rule_set = |dir: &Path| {
            RuleSet::compile_sources(dir, &[(dir.join("test.rhai"), rules.to_owned())], vec![])
                .expect("test rules compile")
        };
        let engine = Arc::new(Engine::new(
            Arc::clone(&config),
            racing.clone(),
            connectors.clone(),
            rule_set(dir.path()),
        ));
        let other = Arc::new(Engine::new(
            Arc::clone(&config),
            Arc::clone(&inner),
            connectors,
            rule_set(dir.path()),
        ));
        Harness {
            engine,
            other,
            store: racing.clone(),
            racing,
            crm,
            campaigns,
            mail,
            config,
            dir,
        }
    }

    /// The store the engine under test uses (the single place tests read it from).
    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    /// Where the database files are.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn list(&self, id: &str) -> ListConfig {
        self.config.list(id).expect("list is configured").clone()
    }

    pub async fn contact(&self, email: &str) -> Contact {
        self.store()
            .contact_by_email(email)
            .await
            .expect("read contact")
            .unwrap_or_else(|| panic!("no contact for {email}"))
    }

    pub async fn consent(&self, contact: &Contact, list: &str) -> Consent {
        self.store()
            .consent(&contact.id, list)
            .await
            .expect("read consent")
            .unwrap_or_else(|| panic!("no consent on {list} for {}", contact.email))
    }

    pub async fn state(&self, contact: &Contact, list: &str) -> ConsentState {
        self.consent(contact, list).await.state
    }

    /// The contact's ledger events on `list`, in order.
    pub async fn events(&self, contact: &Contact, list: &str) -> Vec<LedgerEvent> {
        self.store()
            .events_of_contact(&contact.id)
            .await
            .expect("read ledger")
            .into_iter()
            .filter(|e| e.list_id == list)
            .collect()
    }

    /// Kinds of [`Harness::events`], e.g. `["asserted", "doi_requested"]`.
    pub async fn event_kinds(&self, contact: &Contact, list: &str) -> Vec<String> {
        self.events(contact, list)
            .await
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    /// The CRM (a webhook) sends record `id` with this address, asserting `lists`; the number
    /// of consent changes, `None` if the record did not become a contact.
    pub async fn crm_sends(&self, id: &str, email: &str, lists: &[&str]) -> Option<u64> {
        self.engine
            .ingest_record(&crm_record(id, email, lists))
            .await
            .expect("ingest record")
    }

    /// Feed `input` to the engine under test as a web request would.
    pub async fn apply(&self, contact: &Contact, list: &str, input: Input) -> Applied {
        self.engine
            .apply(
                contact,
                &self.list(list),
                input,
                EventSource::Web,
                Evidence::default(),
            )
            .await
            .expect("apply")
    }

    /// Deliver every due outbox row.
    pub async fn drain(&self) -> optinsync_engine::outbox::DeliverStats {
        self.engine.drain_outbox("test").await.expect("drain")
    }

    /// The recipient of every mail the transport holds, in order.
    pub fn mails_to(&self) -> Vec<String> {
        self.mail.sent().into_iter().map(|m| m.to).collect()
    }
}

/// A race in which the other writer feeds `input` (made afresh for each race) for the contact
/// with this address on `list`; the race asserts that it changed consent.
pub fn other_writer_applies(
    h: &Harness,
    email: &str,
    list: &str,
    input: impl Fn() -> Input + Send + 'static,
) -> impl FnMut() -> RaceFuture + Send + 'static {
    let other = Arc::clone(&h.other);
    let store = Arc::clone(&h.store);
    let list = h.list(list);
    let email = email.to_owned();
    move || {
        let (other, store, list, email) = (
            Arc::clone(&other),
            Arc::clone(&store),
            list.clone(),
            email.clone(),
        );
        let input = input();
        Box::pin(async move {
            let contact = store
                .contact_by_email(&email)
                .await
                .expect("read contact")
                .expect("the raced contact exists");
            let applied = other
                // Recorded as an operator's command: a source the engine under test
                // (web requests, CRM pages, rules) never uses, so events tell the writers apart.
                .apply(
                    &contact,
                    &list,
                    input,
                    EventSource::Cli,
                    Evidence::default(),
                )
                .await
                .expect("the other writer's apply");
            assert!(
                matches!(applied, Applied::Changed(_)),
                "the race must change consent, got {applied:?}"
            );
        })
    }
}
