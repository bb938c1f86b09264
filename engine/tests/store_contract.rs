//! One contract suite for the [`Store`] trait, run against both backends.
//!
//! Every `check_*` function states what any store must do; [`store_contract!`] turns each into
//! `sqlite_check_*` (a file in a temporary directory) and `postgres_check_*` (a fresh database
//! on the test process's throwaway PostgreSQL server).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use optinsync_engine::consent::{Consent, ConsentState, MailKind};
use optinsync_engine::ledger::{
    ChainError, ChainVerifier, EventSource, Evidence, GENESIS_HASH, LedgerEvent, NewEvent,
};
use optinsync_engine::store::{
    self, BatchCommit, Commit, ContactUpsert, Finish, MailOutcomes, NewOutbox, OutboxCounts,
    OutboxFinish, OutboxItem, OutboxWork, PRIORITY_LEGAL, PRIORITY_NORMAL, PacedSend, Store,
    StoreError, StoreResult, StoredWork, Suppression, WAVE_TOTAL,
};
use serde_json::json;
use sqlx::Connection as _;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A migrated store on a database of its own. Keeps the SQLite temp dir alive.
#[derive(Debug)]
struct TestDb {
    store: Arc<dyn Store>,
    url: String,
    backend: Backend,
    _dir: Option<TempDir>,
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("create temp dir");
        let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
        let store = store::open(&url).await.expect("open SQLite store");
        store.migrate().await.expect("migrate SQLite store");
        TestDb {
            store,
            url,
            backend: Backend::Sqlite,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> TestDb {
        let url = tokio::task::spawn_blocking(|| optinsync_testkit::shared_pg().create_database())
            .await
            .expect("start PostgreSQL / create database");
        let store = store::open(&url).await.expect("open PostgreSQL store");
        store.migrate().await.expect("migrate PostgreSQL store");
        TestDb {
            store,
            url,
            backend: Backend::Postgres,
            _dir: None,
        }
    }

    /// Another store on the same database, as a second daemon would open it. SQLite is
    /// single-process by design, so there it is the same instance.
    async fn another_instance(&self) -> Arc<dyn Store> {
        match self.backend {
            Backend::Sqlite => Arc::clone(&self.store),
            Backend::Postgres => store::open(&self.url)
                .await
                .expect("open another PostgreSQL store instance"),
        }
    }

    /// Run one SQL statement on a separate raw connection, bypassing the store.
    async fn exec(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let mut conn = sqlx::SqliteConnection::connect(&self.url).await?;
                let n = sqlx::query(sql).execute(&mut conn).await?.rows_affected();
                conn.close().await?;
                Ok(n)
            }
            Backend::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.url).await?;
                let n = sqlx::query(sql).execute(&mut conn).await?.rows_affected();
                conn.close().await?;
                Ok(n)
            }
        }
    }

    async fn drop_append_only_triggers(&self) {
        let statements: &[&str] = match self.backend {
            Backend::Sqlite => &[
                "DROP TRIGGER ledger_no_update",
                "DROP TRIGGER ledger_no_delete",
            ],
            Backend::Postgres => &["DROP TRIGGER ledger_no_change ON ledger"],
        };
        for sql in statements {
            self.exec(sql).await.expect("drop append-only trigger");
        }
    }
}

macro_rules! store_contract {
    ($($check:ident => $sqlite:ident, $postgres:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $sqlite() {
                $check(TestDb::sqlite().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $postgres() {
                $check(TestDb::postgres().await).await;
            }
        )*
    };
}

store_contract! {
    check_migrate_twice => sqlite_check_migrate_twice, postgres_check_migrate_twice;
    check_contacts => sqlite_check_contacts, postgres_check_contacts;
    check_upsert_result_matches_stored =>
        sqlite_check_upsert_result_matches_stored, postgres_check_upsert_result_matches_stored;
    check_concurrent_upserts_merge_records =>
        sqlite_check_concurrent_upserts_merge_records, postgres_check_concurrent_upserts_merge_records;
    check_commit => sqlite_check_commit, postgres_check_commit;
    check_stale_commit_conflicts => sqlite_check_stale_commit_conflicts, postgres_check_stale_commit_conflicts;
    check_claim_outbox => sqlite_check_claim_outbox, postgres_check_claim_outbox;
    check_finish_outbox_batch => sqlite_check_finish_outbox_batch, postgres_check_finish_outbox_batch;
    check_concurrent_claims => sqlite_check_concurrent_claims, postgres_check_concurrent_claims;
    check_concurrent_commits => sqlite_check_concurrent_commits, postgres_check_concurrent_commits;
    check_cursors => sqlite_check_cursors, postgres_check_cursors;
    check_events_of_contact => sqlite_check_events_of_contact, postgres_check_events_of_contact;
    check_ledger_append_only_and_tamper_evident =>
        sqlite_check_ledger_append_only_and_tamper_evident,
        postgres_check_ledger_append_only_and_tamper_evident;
    check_ledger_cannot_be_emptied =>
        sqlite_check_ledger_cannot_be_emptied, postgres_check_ledger_cannot_be_emptied;
    check_snapshots => sqlite_check_snapshots, postgres_check_snapshots;
    check_engagement_keeps_latest => sqlite_check_engagement_keeps_latest, postgres_check_engagement_keeps_latest;
    check_consent_summary => sqlite_check_consent_summary, postgres_check_consent_summary;
    check_dead_letters_retry_and_drop => sqlite_check_dead_letters_retry_and_drop, postgres_check_dead_letters_retry_and_drop;
    check_erasure_redacts_and_keeps_the_chain => sqlite_check_erasure_redacts_and_keeps_the_chain, postgres_check_erasure_redacts_and_keeps_the_chain;
    check_leases => sqlite_check_leases, postgres_check_leases;
    check_batch_upsert_matches_single => sqlite_check_batch_upsert_matches_single, postgres_check_batch_upsert_matches_single;
    check_commit_batch => sqlite_check_commit_batch, postgres_check_commit_batch;
    check_batch_reads => sqlite_check_batch_reads, postgres_check_batch_reads;
    check_release_claims_of_a_crashed_predecessor =>
        sqlite_check_release_claims_of_a_crashed_predecessor,
        postgres_check_release_claims_of_a_crashed_predecessor;
    check_rename_contact => sqlite_check_rename_contact, postgres_check_rename_contact;
    check_erase_sets_the_erased_flag =>
        sqlite_check_erase_sets_the_erased_flag, postgres_check_erase_sets_the_erased_flag;
    check_append_with_outbox =>
        sqlite_check_append_with_outbox, postgres_check_append_with_outbox;
    check_suppression_list_and_lift =>
        sqlite_check_suppression_list_and_lift, postgres_check_suppression_list_and_lift;
    check_console_reads => sqlite_check_console_reads, postgres_check_console_reads;
    check_ledger_head_and_pending_removals =>
        sqlite_check_ledger_head_and_pending_removals, postgres_check_ledger_head_and_pending_removals;
    check_waves => sqlite_check_waves, postgres_check_waves;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_migration_flags_contacts_erased_before_the_flag() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let url = format!("sqlite://{}", dir.path().join("db.sqlite").display());
    old_erased_row_is_migrated(Backend::Sqlite, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_migration_flags_contacts_erased_before_the_flag() {
    let url = tokio::task::spawn_blocking(|| optinsync_testkit::shared_pg().create_database())
        .await
        .expect("start PostgreSQL / create database");
    old_erased_row_is_migrated(Backend::Postgres, &url).await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A fixed clock: whole seconds after an arbitrary epoch (exactly representable in the store).
fn t(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_760_000_000 + secs, 0).expect("valid timestamp")
}

/// A CRM record reference from its `Module/id` text.
fn record(text: &str) -> optinsync_plugin_api::RecordRef {
    text.parse().expect("a record reference")
}

fn upsert(email: &str, crm_record: Option<&str>) -> ContactUpsert {
    ContactUpsert {
        email: email.to_owned(),
        language: None,
        fields: BTreeMap::new(),
        crm_record: crm_record.map(record),
    }
}

async fn new_contact(store: &dyn Store, email: &str) -> String {
    store
        .upsert_contact(&upsert(email, None), t(0))
        .await
        .expect("upsert contact")
        .id
}

fn event(
    contact_id: &str,
    list_id: &str,
    kind: &str,
    from: ConsentState,
    to: ConsentState,
    at: DateTime<Utc>,
) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        at,
        contact_id: contact_id.to_owned(),
        list_id: list_id.to_owned(),
        kind: kind.to_owned(),
        from_state: from,
        to_state: to,
        source: EventSource::Cli,
        evidence: Evidence {
            reason: Some(format!("{kind} for test")),
            ..Evidence::default()
        },
    }
}

fn consent(state: ConsentState, since: DateTime<Utc>, token: Option<&str>) -> Consent {
    Consent {
        state,
        since,
        signup_token: token.map(str::to_owned),
        doi_mails: u32::from(token.is_some()),
        reminders_sent: 0,
        confirmed_at: None,
        confirmed_token: None,
        last_seq: None,
    }
}

fn outbox(kind: &str, priority: i32, key: &str, contact_id: &str, list_id: &str) -> NewOutbox {
    NewOutbox {
        work: OutboxWork::from_stored(kind, json!({ "token": key })).expect("a known kind"),
        priority,
        idempotency_key: key.to_owned(),
        contact_id: contact_id.to_owned(),
        list_id: list_id.to_owned(),
    }
}

/// A DOI mail row's work for the signup `token`.
fn mail_work(token: &str) -> OutboxWork {
    OutboxWork::Mail {
        token: token.to_owned(),
        mail: MailKind::Doi,
        wave: false,
    }
}

/// Queue a DOI mail row under each of `keys` with `c`.
fn push_mails(c: &mut Commit, keys: &[&str]) {
    for key in keys {
        c.outbox.push(NewOutbox {
            work: mail_work(""),
            priority: PRIORITY_NORMAL,
            idempotency_key: (*key).into(),
            contact_id: c.contact_id.clone(),
            list_id: c.list_id.clone(),
        });
    }
}

/// A state change of one pair with no outbox rows or suppression.
fn simple_commit(
    contact_id: &str,
    list_id: &str,
    expected_seq: Option<i64>,
    from: ConsentState,
    to: ConsentState,
    at: DateTime<Utc>,
) -> Commit {
    Commit {
        contact_id: contact_id.to_owned(),
        list_id: list_id.to_owned(),
        expected_seq,
        consent: consent(to, at, None),
        event: event(contact_id, list_id, to.as_str(), from, to, at),
        outbox: vec![],
        suppress: None,
        lift: vec![],
        paced: None,
    }
}

/// The whole ledger, read through `ledger_page` in small pages.
async fn whole_ledger(store: &dyn Store) -> Vec<LedgerEvent> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store.ledger_page(after, 7).await.expect("ledger_page");
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    all
}

/// Verify the stored chain the way an auditor would: page by page through a `ChainVerifier`.
async fn verify_stored_chain(store: &dyn Store) -> Result<u64, ChainError> {
    let mut verifier = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.ledger_page(after, 5).await.expect("ledger_page");
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            verifier.check(ev)?;
        }
    }
    Ok(verifier.checked)
}

fn seqs(events: &[LedgerEvent]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

fn keys(items: &[OutboxItem]) -> Vec<&str> {
    items.iter().map(|i| i.idempotency_key.as_str()).collect()
}

fn is_conflict(r: &StoreResult<LedgerEvent>, contact_id: &str, list_id: &str) -> bool {
    matches!(r, Err(StoreError::Conflict { contact_id: c, list_id: l }) if c == contact_id && l == list_id)
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Re-spelling a contact's address (canonicalisation, F2) keeps the contact, and never takes
/// another contact's address.
async fn check_rename_contact(db: TestDb) {
    let s = &*db.store;
    let old = "jos\u{e9}@xn--bcher-kva.example";
    let canonical = "jos\u{e9}@b\u{fc}cher.example";
    let id = new_contact(s, old).await;
    let other = new_contact(s, "taken@example.org").await;
    let by_email = |email: &'static str| async move {
        s.contact_by_email(email)
            .await
            .expect("read contact")
            .map(|c| c.id)
    };
    assert!(s.rename_contact(&id, canonical).await.expect("rename"));
    assert_eq!(by_email(canonical).await, Some(id.clone()), "renamed");
    assert_eq!(by_email(old).await, None, "the old spelling is gone");
    assert!(
        !s.rename_contact(&id, "taken@example.org")
            .await
            .expect("rename"),
        "another contact's address is never taken"
    );
    assert_eq!(by_email("taken@example.org").await, Some(other));
    assert_eq!(by_email(canonical).await, Some(id));
    assert!(
        !s.rename_contact("no-such-id", "new@example.org")
            .await
            .expect("rename")
    );
}

async fn check_migrate_twice(db: TestDb) {
    let s = &*db.store;
    let id = new_contact(s, "before@example.org").await;
    s.migrate().await.expect("second migrate");
    s.migrate().await.expect("third migrate");
    // Several daemons starting at once on one database.
    let (a, b) = (db.another_instance().await, db.another_instance().await);
    let (ra, rb) = tokio::join!(a.migrate(), b.migrate());
    ra.expect("concurrent migrate a");
    rb.expect("concurrent migrate b");
    // Data survives and the schema still works.
    let c = s
        .contact_by_email("before@example.org")
        .await
        .expect("contact_by_email")
        .expect("contact survives re-migration");
    assert_eq!(c.id, id);
    s.set_cursor("crm", "x", t(1)).await.expect("set_cursor");
    assert_eq!(s.cursor("crm").await.expect("cursor").as_deref(), Some("x"));
}

async fn check_contacts(db: TestDb) {
    let s = &*db.store;
    assert!(
        s.contact_by_email("ann@example.org")
            .await
            .expect("contact_by_email")
            .is_none()
    );

    let first = ContactUpsert {
        email: "ann@example.org".into(),
        language: Some("de".into()),
        fields: BTreeMap::from([("first_name".to_owned(), json!("Ann"))]),
        crm_record: Some(record("Contacts/2")),
    };
    let a1 = s.upsert_contact(&first, t(0)).await.expect("first upsert");
    assert_eq!(a1.email, "ann@example.org");
    assert_eq!(a1.crm_records, vec!["Contacts/2".to_owned()]);
    assert_eq!(a1.language.as_deref(), Some("de"));
    assert_eq!(a1.fields, first.fields);
    assert_eq!(a1.created_at, t(0));
    assert_eq!(a1.updated_at, t(0));
    assert_eq!(
        s.contact_by_email("ann@example.org")
            .await
            .expect("contact_by_email"),
        Some(a1.clone())
    );
    assert_eq!(
        s.contact_by_id(&a1.id).await.expect("contact_by_id"),
        Some(a1.clone())
    );

    // Same address from another CRM record: merged, not duplicated.
    let second = ContactUpsert {
        email: "ann@example.org".into(),
        language: Some("en".into()),
        fields: BTreeMap::from([
            ("first_name".to_owned(), json!("Anne")),
            ("last_name".to_owned(), json!("Smith")),
        ]),
        crm_record: Some(record("Contacts/1")),
    };
    let a2 = s
        .upsert_contact(&second, t(10))
        .await
        .expect("second upsert");
    assert_eq!(a2.id, a1.id, "one contact per email");
    assert_eq!(
        a2.crm_records,
        vec!["Contacts/1".to_owned(), "Contacts/2".to_owned()],
        "record ids merged and sorted"
    );
    assert_eq!(a2.language.as_deref(), Some("en"));
    assert_eq!(
        a2.fields,
        BTreeMap::from([
            ("first_name".to_owned(), json!("Anne")),
            ("last_name".to_owned(), json!("Smith")),
        ])
    );
    assert_eq!(a2.created_at, t(0));
    assert_eq!(a2.updated_at, t(10));
    assert_eq!(
        s.contact_by_id(&a1.id).await.expect("contact_by_id"),
        Some(a2.clone())
    );

    // A known record again, no language, no fields: nothing is lost or duplicated.
    let a3 = s
        .upsert_contact(&upsert("ann@example.org", Some("Contacts/2")), t(20))
        .await
        .expect("third upsert");
    assert_eq!(a3.id, a1.id);
    assert_eq!(
        a3.crm_records,
        vec!["Contacts/1".to_owned(), "Contacts/2".to_owned()]
    );
    assert_eq!(
        a3.language.as_deref(),
        Some("en"),
        "no language keeps the old"
    );
    assert_eq!(a3.fields, a2.fields);
    assert_eq!(
        s.contact_by_email("ann@example.org")
            .await
            .expect("contact_by_email"),
        Some(a3.clone())
    );

    // Paging.
    for e in ["e@x.org", "b@x.org", "d@x.org", "c@x.org"] {
        new_contact(s, e).await;
    }
    let everything = s.contacts_page(None, 100).await.expect("contacts_page");
    assert_eq!(everything.len(), 5);
    let ids: Vec<&str> = everything.iter().map(|c| c.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "ordered by id, no duplicates");
    let emails: BTreeSet<&str> = everything.iter().map(|c| c.email.as_str()).collect();
    assert_eq!(
        emails,
        BTreeSet::from([
            "ann@example.org",
            "b@x.org",
            "c@x.org",
            "d@x.org",
            "e@x.org"
        ])
    );

    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s
            .contacts_page(after.as_deref(), 2)
            .await
            .expect("contacts_page");
        assert!(page.len() <= 2, "limit respected");
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        paged.extend(page);
    }
    assert_eq!(
        paged, everything,
        "paging with `after` visits each contact once"
    );
    assert_eq!(
        s.contacts_page(Some(&everything[1].id), 2)
            .await
            .expect("contacts_page"),
        everything[2..4].to_vec()
    );
    assert!(
        s.contacts_page(Some(&everything[4].id), 10)
            .await
            .expect("contacts_page")
            .is_empty()
    );
    assert!(
        s.contact_by_id("no-such-id")
            .await
            .expect("contact_by_id")
            .is_none()
    );
}

/// What `upsert_contact` returns is what the store holds, whatever the clock's precision.
async fn check_upsert_result_matches_stored(db: TestDb) {
    let s = &*db.store;
    // A clock reading with nanoseconds, as `Utc::now()` gives on Linux.
    let now = DateTime::from_timestamp(1_760_000_000, 123_456_789).expect("valid timestamp");
    let created = s
        .upsert_contact(&upsert("nano@example.org", Some("Contacts/1")), now)
        .await
        .expect("first upsert");
    assert_eq!(
        s.contact_by_id(&created.id).await.expect("contact_by_id"),
        Some(created.clone()),
        "created contact as returned == as stored"
    );
    let later = now + chrono::Duration::nanoseconds(1_000_000_777);
    let updated = s
        .upsert_contact(&upsert("nano@example.org", Some("Contacts/2")), later)
        .await
        .expect("second upsert");
    assert_eq!(
        s.contact_by_id(&created.id).await.expect("contact_by_id"),
        Some(updated.clone()),
        "updated contact as returned == as stored"
    );
}

/// Several daemons see the same address from different CRM records at the same moment: every
/// record id must survive the merge.
async fn check_concurrent_upserts_merge_records(db: TestDb) {
    const WRITERS: usize = 8;
    let mut instances = Vec::new();
    for _ in 0..WRITERS {
        instances.push(db.another_instance().await);
    }
    for round in 0..5 {
        let email = format!("shared{round}@example.org");
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for (i, st) in instances.iter().enumerate() {
            let st = Arc::clone(st);
            let barrier = Arc::clone(&barrier);
            let email = email.clone();
            tasks.push(tokio::spawn(async move {
                let u = ContactUpsert {
                    email,
                    language: None,
                    fields: BTreeMap::from([(format!("f{i}"), json!(i))]),
                    crm_record: Some(record(&format!("Contacts/{i}"))),
                };
                barrier.wait().await;
                st.upsert_contact(&u, t(1)).await.expect("upsert").id
            }));
        }
        let mut ids = BTreeSet::new();
        for task in tasks {
            ids.insert(task.await.expect("upsert task"));
        }
        assert_eq!(ids.len(), 1, "one contact per email");
        let c = db
            .store
            .contact_by_email(&email)
            .await
            .expect("contact_by_email")
            .expect("contact exists");
        let expected: Vec<String> = (0..WRITERS).map(|i| format!("Contacts/{i}")).collect();
        assert_eq!(
            c.crm_records, expected,
            "round {round}: concurrent upserts lost CRM record ids"
        );
        assert_eq!(
            c.fields.len(),
            WRITERS,
            "round {round}: concurrent upserts lost fields"
        );
    }
}

async fn check_commit(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let c = new_contact(s, "commit@example.org").await;

    let e1 = s
        .commit(&simple_commit(&c, "news", None, S::None, S::Asserted, t(1)))
        .await
        .expect("commit 1");
    assert_eq!(e1.seq, 1);
    assert_eq!(e1.prev_hash, GENESIS_HASH);
    assert_eq!(e1.hash, e1.compute_hash());
    assert_eq!(e1.kind, "asserted");
    assert_eq!(
        (e1.from_state.as_str(), e1.to_state.as_str()),
        ("none", "asserted")
    );
    let k1 = s.consent(&c, "news").await.expect("consent").expect("some");
    assert_eq!(k1.state, S::Asserted);
    assert_eq!(k1.last_seq, Some(1));
    assert_eq!(k1.since, t(1));

    let pending = Consent {
        doi_mails: 1,
        ..consent(S::Pending, t(2), Some("tok-1"))
    };
    let e2 = s
        .commit(&Commit {
            contact_id: c.clone(),
            list_id: "news".into(),
            expected_seq: Some(1),
            consent: pending.clone(),
            event: event(&c, "news", "doi_requested", S::Asserted, S::Pending, t(2)),
            outbox: vec![NewOutbox {
                work: mail_work("n1"),
                ..outbox("mail", PRIORITY_NORMAL, "mail-1", &c, "news")
            }],
            suppress: None,
            lift: vec![],
            paced: None,
        })
        .await
        .expect("commit 2");
    assert_eq!(e2.seq, 2);
    assert_eq!(e2.prev_hash, e1.hash);
    assert_eq!(
        s.consent(&c, "news").await.expect("consent"),
        Some(Consent {
            last_seq: Some(2),
            ..pending
        }),
        "projection holds exactly the committed consent"
    );

    // A duplicate idempotency key in a later commit is ignored; suppression recorded.
    let e3 = s
        .commit(&Commit {
            contact_id: c.clone(),
            list_id: "news".into(),
            expected_seq: Some(2),
            consent: consent(S::Bounced, t(3), None),
            event: event(&c, "news", "bounced", S::Pending, S::Bounced, t(3)),
            outbox: vec![
                outbox("campaigns_remove", PRIORITY_LEGAL, "remove-1", &c, "news"),
                NewOutbox {
                    work: mail_work("n2"),
                    ..outbox("mail", PRIORITY_NORMAL, "mail-1", &c, "news")
                },
            ],
            suppress: Some(Suppression {
                address_hash: "hash-commit".into(),
                reason: "bounced".into(),
            }),
            lift: vec![],
            paced: None,
        })
        .await
        .expect("commit 3");
    assert_eq!(e3.seq, 3);
    assert_eq!(e3.prev_hash, e2.hash);
    let k3 = s.consent(&c, "news").await.expect("consent").expect("some");
    assert_eq!(k3.state, S::Bounced);
    assert_eq!(k3.last_seq, Some(3));
    assert_eq!(k3.signup_token, None);

    // Another list of the same contact is an independent pair.
    let e4 = s
        .commit(&simple_commit(
            &c,
            "promo",
            None,
            S::None,
            S::Asserted,
            t(4),
        ))
        .await
        .expect("commit on second list");
    assert_eq!(e4.seq, 4);
    let all = s
        .consents_of_contact(&c)
        .await
        .expect("consents_of_contact");
    assert_eq!(
        all.iter()
            .map(|(l, k)| (l.as_str(), k.state, k.last_seq))
            .collect::<Vec<_>>(),
        vec![
            ("news", S::Bounced, Some(3)),
            ("promo", S::Asserted, Some(4))
        ]
    );

    let ledger = whole_ledger(s).await;
    assert_eq!(ledger, vec![e1, e2, e3.clone(), e4]);
    assert_eq!(verify_stored_chain(s).await, Ok(4));
    assert_eq!(
        seqs(&s.ledger_page(1, 2).await.expect("ledger_page")),
        vec![2, 3]
    );
    assert!(s.ledger_page(4, 10).await.expect("ledger_page").is_empty());

    assert_eq!(
        s.outbox_counts().await.expect("outbox_counts"),
        OutboxCounts {
            pending: 2,
            done: 0,
            dead: 0
        },
        "duplicate idempotency key ignored"
    );
    let claimed = s
        .claim_outbox("w", t(100), t(200), 10)
        .await
        .expect("claim");
    assert_eq!(keys(&claimed), vec!["remove-1", "mail-1"]);
    assert_eq!(claimed[0].event_seq, Some(3));
    assert_eq!(claimed[0].kind(), "campaigns_remove");
    assert_eq!(claimed[0].priority, PRIORITY_LEGAL);
    assert_eq!(claimed[1].event_seq, Some(2));
    assert_eq!(
        claimed[1].work,
        StoredWork::Known(mail_work("n1")),
        "the first row with a key wins"
    );
    assert_eq!(
        (claimed[1].contact_id.as_str(), claimed[1].list_id.as_str()),
        (c.as_str(), "news")
    );
    assert_eq!(claimed[1].status, "pending");
    assert_eq!(claimed[1].attempts, 1);

    assert!(s.is_suppressed("hash-commit").await.expect("is_suppressed"));
    assert!(!s.is_suppressed("hash-other").await.expect("is_suppressed"));
}

async fn check_stale_commit_conflicts(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let c = new_contact(s, "stale@example.org").await;
    s.commit(&Commit {
        outbox: vec![outbox("mail", PRIORITY_NORMAL, "k-first", &c, "news")],
        ..simple_commit(&c, "news", None, S::None, S::Asserted, t(1))
    })
    .await
    .expect("first commit");
    let ledger_before = whole_ledger(s).await;
    let counts_before = s.outbox_counts().await.expect("outbox_counts");
    let consent_before = s.consent(&c, "news").await.expect("consent");

    for (i, expected) in [None, Some(0), Some(2), Some(99)].into_iter().enumerate() {
        let r = s
            .commit(&Commit {
                outbox: vec![outbox(
                    "campaigns_remove",
                    PRIORITY_LEGAL,
                    &format!("k-stale-{i}"),
                    &c,
                    "news",
                )],
                suppress: Some(Suppression {
                    address_hash: "hash-stale".into(),
                    reason: "complained".into(),
                }),
                ..simple_commit(&c, "news", expected, S::Asserted, S::Complained, t(2))
            })
            .await;
        assert!(
            is_conflict(&r, &c, "news"),
            "expected_seq {expected:?} must conflict, got {r:?}"
        );
    }
    // A pair that has no consent yet, committed as if it had one.
    let r = s
        .commit(&simple_commit(
            &c,
            "other",
            Some(1),
            S::Asserted,
            S::Pending,
            t(2),
        ))
        .await;
    assert!(is_conflict(&r, &c, "other"), "got {r:?}");

    assert_eq!(whole_ledger(s).await, ledger_before, "nothing appended");
    assert_eq!(
        s.outbox_counts().await.expect("outbox_counts"),
        counts_before
    );
    assert_eq!(
        s.consent(&c, "news").await.expect("consent"),
        consent_before
    );
    assert_eq!(s.consent(&c, "other").await.expect("consent"), None);
    assert!(!s.is_suppressed("hash-stale").await.expect("is_suppressed"));

    // The refused outbox row was never written: its key is still free.
    let ok = s
        .commit(&Commit {
            outbox: vec![outbox(
                "campaigns_remove",
                PRIORITY_LEGAL,
                "k-stale-0",
                &c,
                "news",
            )],
            ..simple_commit(&c, "news", Some(1), S::Asserted, S::Complained, t(3))
        })
        .await
        .expect("commit with the right expected_seq");
    assert_eq!(ok.seq, 2);
    assert_eq!(
        s.outbox_counts().await.expect("outbox_counts").pending,
        counts_before.pending + 1
    );
    assert_eq!(verify_stored_chain(s).await, Ok(2));
}

/// A batch of finishes (as the group writer records them): each row ends its own way, the
/// events of done rows are chained in the batch's order, a row whose claim moved on is left
/// alone, and an erased contact's dead row keeps neither error text nor address.
async fn check_finish_outbox_batch(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let a = new_contact(s, "fin-a@example.org").await;
    let b = new_contact(s, "fin-b@example.org").await;
    for (c, rows) in [
        (
            &a,
            vec![
                outbox("mail", PRIORITY_NORMAL, "k1", &a, "news"),
                outbox("mail", PRIORITY_NORMAL, "k2", &a, "news"),
                outbox("crm_write_back", PRIORITY_NORMAL, "k3", &a, "news"),
                outbox("mail", PRIORITY_NORMAL, "k4", &a, "news"),
                outbox("mail", PRIORITY_NORMAL, "k5", &a, "news"),
                outbox("mail", PRIORITY_NORMAL, "k7", &a, "news"),
            ],
        ),
        (
            &b,
            vec![outbox(
                "campaigns_remove",
                PRIORITY_NORMAL,
                "k6",
                &b,
                "news",
            )],
        ),
    ] {
        s.commit(&Commit {
            outbox: rows,
            ..simple_commit(c, "news", None, S::None, S::Asserted, t(0))
        })
        .await
        .expect("commit");
    }
    let claimed = s.claim_outbox("w", t(1), t(61), 10).await.expect("claim");
    let id = |key: &str| {
        claimed
            .iter()
            .find(|i| i.idempotency_key == key)
            .map(|i| i.id)
            .expect("claimed")
    };
    s.erase_contact(&b, "hash-of-b", t(1))
        .await
        .expect("erase b");
    let before = whole_ledger(s).await.len();
    let sent = |n: i64| event(&a, "news", "mail_sent", S::Asserted, S::Asserted, t(n));
    let (first, second) = (sent(5), sent(6));
    let finish = |key: &str, worker: &str, finish: Finish| OutboxFinish {
        id: id(key),
        worker: worker.to_owned(),
        finish,
    };
    s.finish_outbox_batch(
        &[
            finish(
                "k1",
                "w",
                Finish::Done {
                    event: Some(Box::new(first.clone())),
                    note: Some("accepted".into()),
                },
            ),
            finish(
                "k2",
                "w",
                Finish::Retry {
                    at: t(50),
                    error: "busy".into(),
                },
            ),
            finish(
                "k3",
                "w",
                Finish::Dead {
                    error: "refused".into(),
                },
            ),
            finish("k4", "w", Finish::Postpone { at: t(2) }),
            // Claimed by `w`: another worker's finish is not recorded.
            finish(
                "k5",
                "intruder",
                Finish::Done {
                    event: Some(Box::new(sent(7))),
                    note: None,
                },
            ),
            finish(
                "k6",
                "w",
                Finish::Dead {
                    error: "fin-b@example.org refused".into(),
                },
            ),
            finish(
                "k7",
                "w",
                Finish::Done {
                    event: Some(Box::new(second.clone())),
                    note: None,
                },
            ),
        ],
        t(5),
    )
    .await
    .expect("finish the batch");

    let ledger = whole_ledger(s).await;
    let added: Vec<&str> = ledger[before..]
        .iter()
        .map(|e| e.event_id.as_str())
        .collect();
    assert_eq!(
        added,
        vec![first.event_id.as_str(), second.event_id.as_str()],
        "the done rows' events, in the batch's order; none for the intruder's finish"
    );
    assert_eq!(verify_stored_chain(s).await, Ok(ledger.len() as u64));
    assert_eq!(
        s.outbox_counts().await.expect("counts"),
        OutboxCounts {
            pending: 3,
            done: 2,
            dead: 2
        }
    );
    let dead = s.outbox_dead().await.expect("dead rows");
    let error_of = |key: &str| {
        dead.iter()
            .find(|i| i.idempotency_key == key)
            .and_then(|i| i.last_error.clone())
    };
    assert_eq!(error_of("k3").as_deref(), Some("refused"));
    assert_eq!(
        error_of("k6").as_deref(),
        Some("error text withheld: the contact is erased")
    );
    // After the lease: the retried row (due at 50), the postponed one (due at 2, its attempt
    // given back) and the intruder's (never finished) are claimed again.
    let again = s
        .claim_outbox("w2", t(100), t(160), 10)
        .await
        .expect("claim again");
    assert_eq!(keys(&again), vec!["k2", "k4", "k5"]);
    let attempts: Vec<i32> = again.iter().map(|i| i.attempts).collect();
    assert_eq!(attempts, vec![2, 1, 2]);
}

async fn check_claim_outbox(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let c = new_contact(s, "claim@example.org").await;
    s.commit(&Commit {
        outbox: vec![
            outbox("mail", PRIORITY_NORMAL, "n1", &c, "news"),
            outbox("crm_write_back", PRIORITY_NORMAL, "n2", &c, "news"),
            outbox("campaigns_remove", PRIORITY_LEGAL, "l1", &c, "news"),
        ],
        ..simple_commit(&c, "news", None, S::None, S::Withdrawn, t(0))
    })
    .await
    .expect("commit");
    let lease = 60;

    // A lane's limit holds across its kinds, the most urgent first.
    let first = s
        .claim_outbox_kinds(
            "w0",
            t(1),
            t(1 + lease),
            1,
            &["crm_write_back", "campaigns_remove"],
        )
        .await
        .expect("claim a lane");
    assert_eq!(keys(&first), vec!["l1"]);
    s.finish_outbox(first[0].id, "w0", &Finish::Postpone { at: t(1) }, t(1))
        .await
        .expect("hand back");

    // A delivery lane claims its kinds only, and leaves the rest unclaimed.
    let lane = s
        .claim_outbox_kinds(
            "w0",
            t(1),
            t(1 + lease),
            10,
            &["crm_write_back", "campaigns_remove"],
        )
        .await
        .expect("claim a lane");
    assert_eq!(keys(&lane), vec!["l1", "n2"]);
    for item in &lane {
        s.finish_outbox(item.id, "w0", &Finish::Postpone { at: t(1) }, t(1))
            .await
            .expect("hand back");
    }

    // Legal work first, even though it was enqueued last.
    let a = s
        .claim_outbox("w1", t(1), t(1 + lease), 2)
        .await
        .expect("claim w1");
    assert_eq!(keys(&a), vec!["l1", "n1"]);
    assert!(a.iter().all(|i| i.attempts == 1 && i.status == "pending"));
    let (l1, n1) = (a[0].id, a[1].id);

    let b = s
        .claim_outbox("w2", t(1), t(1 + lease), 10)
        .await
        .expect("claim w2");
    assert_eq!(keys(&b), vec!["n2"], "claimed rows are not claimed again");
    let n2 = b[0].id;
    assert!(
        s.claim_outbox("w3", t(30), t(30 + lease), 10)
            .await
            .expect("claim w3")
            .is_empty(),
        "all rows leased"
    );

    // Done with an event: the event is appended and the row is done.
    let ledger_len = whole_ledger(s).await.len();
    let sent = NewEvent {
        evidence: Evidence {
            message_id: Some("<m1@example.org>".into()),
            ..Evidence::default()
        },
        ..event(&c, "news", "mail_sent", S::Withdrawn, S::Withdrawn, t(5))
    };
    s.finish_outbox(
        n2,
        "w2",
        &Finish::Done {
            event: Some(Box::new(sent.clone())),
            note: Some("ok".into()),
        },
        t(5),
    )
    .await
    .expect("finish n2");
    let ledger = whole_ledger(s).await;
    assert_eq!(ledger.len(), ledger_len + 1);
    let last = ledger.last().expect("an event");
    assert_eq!(last.event_id, sent.event_id);
    assert_eq!(last.kind, "mail_sent");
    assert_eq!(
        last.evidence().message_id.as_deref(),
        Some("<m1@example.org>")
    );
    assert_eq!(verify_stored_chain(s).await, Ok(ledger.len() as u64));
    assert_eq!(
        s.outbox_counts().await.expect("counts"),
        OutboxCounts {
            pending: 2,
            done: 1,
            dead: 0
        }
    );

    // Still leased one second before the lease ends; claimable once it has passed.
    assert!(
        s.claim_outbox("w3", t(lease), t(lease + 100), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    let again = s
        .claim_outbox("w3", t(lease + 2), t(lease + 100), 10)
        .await
        .expect("claim after lease");
    assert_eq!(keys(&again), vec!["l1", "n1"]);
    assert!(again.iter().all(|i| i.attempts == 2), "{again:?}");

    // w1 lost its lease: its results are not recorded.
    s.finish_outbox(
        l1,
        "w1",
        &Finish::Done {
            event: Some(Box::new(event(
                &c,
                "news",
                "removed",
                S::Withdrawn,
                S::Withdrawn,
                t(70),
            ))),
            note: None,
        },
        t(70),
    )
    .await
    .expect("stale finish is not an error");
    s.finish_outbox(
        n1,
        "w1",
        &Finish::Dead {
            error: "stale".into(),
        },
        t(70),
    )
    .await
    .expect("stale finish is not an error");
    // Nor those of a worker that never claimed anything.
    s.finish_outbox(
        n1,
        "nobody",
        &Finish::Done {
            event: None,
            note: None,
        },
        t(70),
    )
    .await
    .expect("foreign finish is not an error");
    assert_eq!(
        whole_ledger(s).await.len(),
        ledger_len + 1,
        "no event from a stale finish"
    );
    assert_eq!(
        s.outbox_counts().await.expect("counts"),
        OutboxCounts {
            pending: 2,
            done: 1,
            dead: 0
        }
    );

    // Dead letter.
    s.finish_outbox(
        l1,
        "w3",
        &Finish::Dead {
            error: "list does not exist".into(),
        },
        t(71),
    )
    .await
    .expect("finish dead");
    let dead = s.outbox_dead().await.expect("outbox_dead");
    assert_eq!(keys(&dead), vec!["l1"]);
    assert_eq!(dead[0].status, "dead");
    assert_eq!(dead[0].last_error.as_deref(), Some("list does not exist"));
    assert_eq!(dead[0].kind(), "campaigns_remove");

    // Retry later: not claimable before `at`, claimable from `at` on.
    s.finish_outbox(
        n1,
        "w3",
        &Finish::Retry {
            at: t(300),
            error: "smtp 451".into(),
        },
        t(72),
    )
    .await
    .expect("finish retry");
    assert!(
        s.claim_outbox("w4", t(299), t(1000), 10)
            .await
            .expect("claim")
            .is_empty(),
        "retry row claimable too early"
    );
    let retried = s
        .claim_outbox("w4", t(300), t(1000), 10)
        .await
        .expect("claim");
    assert_eq!(keys(&retried), vec!["n1"]);
    assert_eq!(retried[0].attempts, 3);
    assert_eq!(retried[0].last_error.as_deref(), Some("smtp 451"));

    // Dead and done rows are never claimed again, and a dead row cannot be finished again.
    assert!(
        s.claim_outbox("w5", t(500), t(600), 10)
            .await
            .expect("claim")
            .is_empty()
    );
    s.finish_outbox(
        l1,
        "w3",
        &Finish::Done {
            event: None,
            note: None,
        },
        t(73),
    )
    .await
    .expect("finish of a dead row");
    assert_eq!(
        s.outbox_counts().await.expect("counts"),
        OutboxCounts {
            pending: 1,
            done: 1,
            dead: 1
        }
    );
}

async fn check_concurrent_claims(db: TestDb) {
    use ConsentState as S;
    const ROWS: usize = 50;
    const WORKERS: usize = 4;
    let c = new_contact(&*db.store, "many@example.org").await;
    let rows = (0..ROWS)
        .map(|i| {
            let prio = if i % 5 == 0 {
                PRIORITY_LEGAL
            } else {
                PRIORITY_NORMAL
            };
            // Two kinds, so that the lanes' claims (one read per kind) race too.
            let kind = if i % 2 == 0 {
                "mail"
            } else {
                "preferences_link_mail"
            };
            outbox(kind, prio, &format!("row-{i}"), &c, "news")
        })
        .collect();
    db.store
        .commit(&Commit {
            outbox: rows,
            ..simple_commit(&c, "news", None, S::None, S::Asserted, t(0))
        })
        .await
        .expect("commit 50 rows");

    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let st = db.another_instance().await;
        let contact = c.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("worker-{w}");
            let mut got = Vec::new();
            loop {
                // Half the workers claim as a lane does (by kind), half as a drain does.
                let items = if w % 2 == 0 {
                    st.claim_outbox_kinds(
                        &worker,
                        t(10),
                        t(1000),
                        3,
                        &["mail", "preferences_link_mail"],
                    )
                    .await
                } else {
                    st.claim_outbox(&worker, t(10), t(1000), 3).await
                }
                .expect("claim");
                if items.is_empty() {
                    break;
                }
                for item in &items {
                    assert_eq!(item.attempts, 1, "{item:?} was claimed before");
                    st.finish_outbox(
                        item.id,
                        &worker,
                        &Finish::Done {
                            event: Some(Box::new(event(
                                &contact,
                                "news",
                                "mail_sent",
                                S::Asserted,
                                S::Asserted,
                                t(11),
                            ))),
                            note: None,
                        },
                        t(11),
                    )
                    .await
                    .expect("finish");
                    got.push(item.id);
                }
                tokio::task::yield_now().await;
            }
            got
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("worker task"));
    }
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), ROWS, "each row claimed exactly once: {all:?}");
    assert_eq!(unique.len(), ROWS);
    assert_eq!(
        db.store.outbox_counts().await.expect("counts"),
        OutboxCounts {
            pending: 0,
            done: ROWS as i64,
            dead: 0
        }
    );
    assert_eq!(
        verify_stored_chain(&*db.store).await,
        Ok(1 + ROWS as u64),
        "events appended by concurrent finishes chain"
    );
}

async fn check_concurrent_commits(db: TestDb) {
    use ConsentState as S;
    const TASKS: usize = 8;
    const PER_TASK: usize = 10;

    // Free-standing events from several writers.
    let mut tasks = Vec::new();
    for w in 0..TASKS {
        let st = db.another_instance().await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..PER_TASK {
                let e = event(
                    &format!("c{w}"),
                    "news",
                    &format!("link_fetched_{i}"),
                    S::Pending,
                    S::Pending,
                    t(1),
                );
                seqs.push(st.append_event(&e).await.expect("append_event").seq);
            }
            seqs
        }));
    }
    let mut got = Vec::new();
    for task in tasks {
        let seqs = task.await.expect("append task");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "seqs of one writer increase"
        );
        got.extend(seqs);
    }
    got.sort();
    let n = (TASKS * PER_TASK) as i64;
    assert_eq!(got, (1..=n).collect::<Vec<_>>());
    assert_eq!(
        seqs(&whole_ledger(&*db.store).await),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(verify_stored_chain(&*db.store).await, Ok(n as u64));

    // State changes of different contacts, concurrently.
    let mut tasks = Vec::new();
    for w in 0..TASKS {
        let st = db.another_instance().await;
        tasks.push(tokio::spawn(async move {
            let c = new_contact(&*st, &format!("writer{w}@example.org")).await;
            let mut expected = None;
            let mut state = S::None;
            for (i, next) in [
                S::Asserted,
                S::Pending,
                S::Confirmed,
                S::Withdrawn,
                S::Pending,
            ]
            .into_iter()
            .enumerate()
            {
                let ev = st
                    .commit(&simple_commit(
                        &c,
                        "news",
                        expected,
                        state,
                        next,
                        t(i as i64),
                    ))
                    .await
                    .expect("commit of own contact never conflicts");
                expected = Some(ev.seq);
                state = next;
            }
            (c, expected)
        }));
    }
    for task in tasks {
        let (c, last) = task.await.expect("commit task");
        let k = db
            .store
            .consent(&c, "news")
            .await
            .expect("consent")
            .expect("some");
        assert_eq!(k.last_seq, last);
        assert_eq!(k.state, S::Pending);
        let evs = db.store.events_of_contact(&c).await.expect("events");
        assert_eq!(evs.len(), 5);
        assert_eq!(evs.last().map(|e| e.seq), last);
    }
    let n2 = n + (TASKS * 5) as i64;
    assert_eq!(verify_stored_chain(&*db.store).await, Ok(n2 as u64));

    // Racing writers on one pair with the same expected_seq: exactly one wins.
    let c = new_contact(&*db.store, "race@example.org").await;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let st = db.another_instance().await;
        let barrier = Arc::clone(&barrier);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let r = st
                .commit(&simple_commit(
                    &c,
                    "news",
                    None,
                    S::None,
                    S::Asserted,
                    t(50),
                ))
                .await;
            match r {
                Ok(_) => true,
                Err(StoreError::Conflict { .. }) => false,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.expect("race task"));
    }
    assert_eq!(wins, 1, "exactly one racing commit succeeds");
    assert_eq!(verify_stored_chain(&*db.store).await, Ok(n2 as u64 + 1));
    assert_eq!(
        db.store
            .consent(&c, "news")
            .await
            .expect("consent")
            .and_then(|k| k.last_seq),
        Some(n2 + 1)
    );
}

async fn check_cursors(db: TestDb) {
    let s = &*db.store;
    assert_eq!(s.cursor("crm").await.expect("cursor"), None);
    s.set_cursor("crm", "2025-01-01T00:00:00Z|17", t(1))
        .await
        .expect("set_cursor");
    assert_eq!(
        s.cursor("crm").await.expect("cursor").as_deref(),
        Some("2025-01-01T00:00:00Z|17")
    );
    assert_eq!(s.cursor("campaigns").await.expect("cursor"), None);
    s.set_cursor("crm", "next", t(2)).await.expect("overwrite");
    s.set_cursor("campaigns", "page-3", t(2))
        .await
        .expect("set_cursor");
    assert_eq!(
        s.cursor("crm").await.expect("cursor").as_deref(),
        Some("next")
    );
    assert_eq!(
        s.cursor("campaigns").await.expect("cursor").as_deref(),
        Some("page-3")
    );
}

async fn check_events_of_contact(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    s.commit(&simple_commit(&a, "news", None, S::None, S::Asserted, t(1)))
        .await
        .expect("a1");
    s.append_event(&event(&b, "news", "note", S::None, S::None, t(2)))
        .await
        .expect("b1");
    s.commit(&simple_commit(&b, "news", None, S::None, S::Asserted, t(3)))
        .await
        .expect("b2");
    s.append_event(&event(
        &a,
        "news",
        "link_fetched",
        S::Asserted,
        S::Asserted,
        t(4),
    ))
    .await
    .expect("a2");
    s.commit(&simple_commit(
        &a,
        "promo",
        None,
        S::None,
        S::Asserted,
        t(5),
    ))
    .await
    .expect("a3");

    let ea = s.events_of_contact(&a).await.expect("events of a");
    assert_eq!(seqs(&ea), vec![1, 4, 5]);
    assert!(ea.iter().all(|e| e.contact_id == a));
    assert_eq!(
        ea.iter()
            .map(|e| (e.kind.as_str(), e.list_id.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("asserted", "news"),
            ("link_fetched", "news"),
            ("asserted", "promo")
        ]
    );
    let eb = s.events_of_contact(&b).await.expect("events of b");
    assert_eq!(seqs(&eb), vec![2, 3]);
    assert!(eb.iter().all(|e| e.contact_id == b));
    assert!(
        s.events_of_contact("nobody")
            .await
            .expect("events of nobody")
            .is_empty()
    );
    // The per-contact view holds the same rows as the ledger.
    let ledger = whole_ledger(s).await;
    assert_eq!(ea[1], ledger[3]);

    // Consent events: the state changes and mails of one contact on one list, nothing else
    // (not the link fetch, not a `_mail_sent` look-alike, not the other list or contact).
    for (kind, from, to, at) in [
        ("doi_mail_sent", S::Asserted, S::Asserted, t(6)),
        ("note_mail_sent_x", S::Asserted, S::Asserted, t(7)),
        // `_` is no wildcard in the pattern.
        ("doi_mailxsent", S::Asserted, S::Asserted, t(7)),
        ("confirmed", S::Asserted, S::Confirmed, t(8)),
        ("reminder_mail_sent", S::Confirmed, S::Confirmed, t(9)),
    ] {
        s.append_event(&event(&a, "news", kind, from, to, at))
            .await
            .expect(kind);
    }
    s.append_event(&event(
        &b,
        "news",
        "doi_mail_sent",
        S::Asserted,
        S::Asserted,
        t(10),
    ))
    .await
    .expect("b3");
    let ca = s
        .consent_events(&a, "news")
        .await
        .expect("consent events of a");
    assert_eq!(
        ca.iter()
            .map(|e| (e.seq, e.kind.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (1, "asserted"),
            (6, "doi_mail_sent"),
            (9, "confirmed"),
            (10, "reminder_mail_sent")
        ]
    );
    let all_a = s.events_of_contact(&a).await.expect("events of a");
    for e in &ca {
        assert!(all_a.contains(e), "{e:?} differs from the whole event");
    }
    assert_eq!(
        seqs(&s.consent_events(&a, "promo").await.expect("promo")),
        vec![5]
    );
    assert_eq!(
        seqs(&s.consent_events(&b, "news").await.expect("b")),
        vec![3, 11]
    );
    assert!(s.consent_events(&a, "none").await.expect("none").is_empty());
}

async fn check_ledger_append_only_and_tamper_evident(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let c = new_contact(s, "tamper@example.org").await;
    let mut expected = None;
    let mut state = S::None;
    for (i, next) in [S::Asserted, S::Pending, S::Confirmed, S::Withdrawn]
        .into_iter()
        .enumerate()
    {
        expected = Some(
            s.commit(&simple_commit(
                &c,
                "news",
                expected,
                state,
                next,
                t(i as i64),
            ))
            .await
            .expect("commit")
            .seq,
        );
        state = next;
    }
    let original = whole_ledger(s).await;
    assert_eq!(seqs(&original), vec![1, 2, 3, 4]);
    assert_eq!(verify_stored_chain(s).await, Ok(4));

    // The database itself refuses edits.
    let upd = db
        .exec(r#"UPDATE ledger SET evidence = '{"reason":"forged"}' WHERE seq = 2"#)
        .await;
    assert!(upd.is_err(), "UPDATE on ledger must fail, got {upd:?}");
    let upd = db
        .exec("UPDATE ledger SET to_state = 'confirmed' WHERE seq = 4")
        .await;
    assert!(upd.is_err(), "UPDATE on ledger must fail, got {upd:?}");
    let del = db.exec("DELETE FROM ledger WHERE seq = 4").await;
    assert!(del.is_err(), "DELETE on ledger must fail, got {del:?}");
    let del = db.exec("DELETE FROM ledger").await;
    assert!(del.is_err(), "DELETE on ledger must fail, got {del:?}");
    assert_eq!(whole_ledger(s).await, original);

    // Someone drops the triggers: the chain still tells.
    db.drop_append_only_triggers().await;

    // 1. Forged evidence (hash left alone): seq 2 named as altered.
    let n = db
        .exec(r#"UPDATE ledger SET evidence = '{"reason":"forged"}' WHERE seq = 2"#)
        .await
        .expect("edit evidence without trigger");
    assert_eq!(n, 1);
    let err = verify_stored_chain(s)
        .await
        .expect_err("edit must be detected");
    assert_eq!(
        err,
        ChainError::Altered {
            seq: 2,
            event_id: original[1].event_id.clone()
        }
    );
    assert!(err.to_string().contains("seq 2"), "{err}");
    // Put it back: the chain verifies again (detection is by content).
    let restore = format!(
        "UPDATE ledger SET evidence = '{}' WHERE seq = 2",
        original[1].evidence.replace('\'', "''")
    );
    db.exec(&restore).await.expect("restore evidence");
    assert_eq!(verify_stored_chain(s).await, Ok(4));

    // 2. Forged state with a recomputed hash: the next event no longer follows.
    let mut forged = original[2].clone();
    forged.to_state = "withdrawn".into();
    forged.hash = forged.compute_hash();
    db.exec(&format!(
        "UPDATE ledger SET to_state = 'withdrawn', hash = '{}' WHERE seq = 3",
        forged.hash
    ))
    .await
    .expect("edit state without trigger");
    let err = verify_stored_chain(s)
        .await
        .expect_err("edit must be detected");
    assert_eq!(
        err,
        ChainError::Broken {
            seq: 4,
            event_id: original[3].event_id.clone()
        }
    );
    assert!(err.to_string().contains("seq 4"), "{err}");
    db.exec(&format!(
        "UPDATE ledger SET to_state = '{}', hash = '{}' WHERE seq = 3",
        original[2].to_state, original[2].hash
    ))
    .await
    .expect("restore state");
    assert_eq!(verify_stored_chain(s).await, Ok(4));

    // 3. A deleted event leaves a gap.
    db.exec("DELETE FROM ledger WHERE seq = 2")
        .await
        .expect("delete without trigger");
    assert_eq!(
        verify_stored_chain(s).await,
        Err(ChainError::Gap {
            expected: 2,
            found: 3
        })
    );
}

/// Emptying the ledger in one statement must be refused too: an empty ledger verifies, so the
/// chain cannot tell.
async fn check_ledger_cannot_be_emptied(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let c = new_contact(s, "wipe@example.org").await;
    s.commit(&simple_commit(&c, "news", None, S::None, S::Asserted, t(1)))
        .await
        .expect("commit");
    let original = whole_ledger(s).await;
    let wipe = match db.backend {
        // SQLite has no TRUNCATE; its truncate optimisation is off when DELETE triggers exist.
        Backend::Sqlite => "DELETE FROM ledger",
        Backend::Postgres => "TRUNCATE ledger",
    };
    let r = db.exec(wipe).await;
    let after = whole_ledger(s).await;
    assert!(
        r.is_err(),
        "`{wipe}` must be refused; it succeeded and left {} of {} events (and an empty chain verifies: {:?})",
        after.len(),
        original.len(),
        verify_stored_chain(s).await
    );
    assert_eq!(after, original);
}

/// Snapshots are content-addressed and immutable: a second put of the same hash keeps the
/// first, and the database refuses edits.
async fn check_snapshots(db: TestDb) {
    let s = &*db.store;
    assert_eq!(s.snapshot("nope").await.expect("read"), None);
    let snap = store::Snapshot {
        hash: "h1".into(),
        kind: "mail:doi".into(),
        language: "es".into(),
        template_version: "v1".into(),
        content: "{\"subject\":\"Confirme\"}".into(),
        created_at: t(5),
    };
    s.put_snapshot(&snap).await.expect("put");
    let again = store::Snapshot {
        content: "other".into(),
        created_at: t(9),
        ..snap.clone()
    };
    s.put_snapshot(&again).await.expect("second put is ignored");
    assert_eq!(s.snapshot("h1").await.expect("read"), Some(snap.clone()));

    // One batch (one multi-row statement) holding a hash twice, and one stored already: the
    // first of each is kept, the batch is not refused.
    let h2 = store::Snapshot {
        hash: "h2".into(),
        ..snap.clone()
    };
    let h2_later = store::Snapshot {
        content: "later".into(),
        ..h2.clone()
    };
    s.put_snapshots(&[h2.clone(), again.clone(), h2_later])
        .await
        .expect("a batch with a repeated hash is written");
    assert_eq!(s.snapshot("h2").await.expect("read"), Some(h2));
    assert_eq!(s.snapshot("h1").await.expect("read"), Some(snap));
    assert!(
        db.exec("UPDATE snapshots SET content = 'forged' WHERE hash = 'h1'")
            .await
            .is_err(),
        "snapshots must be immutable"
    );
    assert!(db.exec("DELETE FROM snapshots").await.is_err());
}

async fn check_engagement_keeps_latest(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    assert_eq!(s.last_engagement(&a, "news").await.expect("read"), None);
    s.record_engagement(&a, "news", t(50))
        .await
        .expect("record");
    s.record_engagement(&a, "news", t(10))
        .await
        .expect("older one");
    assert_eq!(
        s.last_engagement(&a, "news").await.expect("read"),
        Some(t(50)),
        "an older open never moves it back"
    );
    s.record_engagement(&a, "news", t(90)).await.expect("newer");
    assert_eq!(
        s.last_engagement(&a, "news").await.expect("read"),
        Some(t(90))
    );
    assert_eq!(
        s.last_engagement(&a, "other").await.expect("read"),
        None,
        "per list"
    );
}

async fn check_consent_summary(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    assert!(s.consent_summary().await.expect("empty").is_empty());
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let c = new_contact(s, "c@example.org").await;
    s.commit(&simple_commit(&a, "news", None, S::None, S::Asserted, t(1)))
        .await
        .expect("a");
    s.commit(&simple_commit(&b, "news", None, S::None, S::Asserted, t(5)))
        .await
        .expect("b");
    s.commit(&simple_commit(
        &c,
        "news",
        None,
        S::None,
        S::Withdrawn,
        t(3),
    ))
    .await
    .expect("c");
    s.commit(&simple_commit(
        &a,
        "other",
        None,
        S::None,
        S::Asserted,
        t(2),
    ))
    .await
    .expect("a other");
    type Row = (String, String, i64, DateTime<Utc>, DateTime<Utc>);
    let rows: Vec<Row> = s
        .consent_summary()
        .await
        .expect("summary")
        .into_iter()
        .map(|r| (r.list_id, r.state, r.count, r.oldest_since, r.newest_since))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("news".into(), "asserted".into(), 2, t(1), t(5)),
            ("news".into(), "withdrawn".into(), 1, t(3), t(3)),
            ("other".into(), "asserted".into(), 1, t(2), t(2)),
        ]
    );
}

/// The operator console's reads: events per day, states ever reached, consents per day of
/// `since`, unfinished outbox rows, leases and a list's consents.
async fn check_console_reads(db: TestDb) {
    use ConsentState as S;
    use optinsync_engine::store::{DayCount, Lease, OutboxDepth, StateReach};
    let s = &*db.store;
    const DAY: i64 = 86_400;
    let day0 = t(0).format("%Y-%m-%d").to_string();
    let day1 = t(DAY).format("%Y-%m-%d").to_string();
    assert_ne!(day0, day1);
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let seq = |e: LedgerEvent| Some(e.seq);
    let a1 = seq(s
        .commit(&simple_commit(&a, "news", None, S::None, S::Asserted, t(0)))
        .await
        .expect("a"));
    let a2 = seq(s
        .commit(&simple_commit(
            &a,
            "news",
            a1,
            S::Asserted,
            S::Pending,
            t(DAY),
        ))
        .await
        .expect("a"));
    let mut confirm = simple_commit(&a, "news", a2, S::Pending, S::Confirmed, t(DAY + 60));
    push_mails(&mut confirm, &["k1", "k2"]);
    s.commit(&confirm).await.expect("a");
    let b1 = seq(s
        .commit(&simple_commit(
            &b,
            "news",
            None,
            S::None,
            S::Asserted,
            t(60),
        ))
        .await
        .expect("b"));
    s.commit(&simple_commit(
        &b,
        "news",
        b1,
        S::Asserted,
        S::Pending,
        t(120),
    ))
    .await
    .expect("b");
    s.commit(&simple_commit(
        &b,
        "other",
        None,
        S::None,
        S::Asserted,
        t(0),
    ))
    .await
    .expect("b");

    let dc = |list: &str, day: &str, kind: &str, count: i64| DayCount {
        list_id: list.into(),
        day: day.into(),
        kind: kind.into(),
        count,
    };
    assert_eq!(
        s.events_per_day(t(0)).await.expect("per day"),
        vec![
            dc("news", &day0, "asserted", 2),
            dc("news", &day0, "pending", 1),
            dc("news", &day1, "confirmed", 1),
            dc("news", &day1, "pending", 1),
            dc("other", &day0, "asserted", 1),
        ]
    );
    assert_eq!(
        s.events_per_day(t(DAY)).await.expect("per day"),
        vec![
            dc("news", &day1, "confirmed", 1),
            dc("news", &day1, "pending", 1)
        ]
    );
    let reach = |list: &str, state: &str, contacts: i64| StateReach {
        list_id: list.into(),
        state: state.into(),
        contacts,
    };
    assert_eq!(
        s.states_reached().await.expect("reached"),
        vec![
            reach("news", "asserted", 2),
            reach("news", "confirmed", 1),
            reach("news", "pending", 2),
            reach("other", "asserted", 1),
        ]
    );
    assert_eq!(
        s.consents_per_day("pending").await.expect("pending"),
        vec![dc("news", &day0, "pending", 1)]
    );

    let claimed = s
        .claim_outbox("w", t(DAY + 61), t(DAY + 999), 1)
        .await
        .expect("claim");
    s.finish_outbox(
        claimed[0].id,
        "w",
        &Finish::Dead { error: "x".into() },
        t(DAY + 62),
    )
    .await
    .expect("dead");
    let depth = |status: &str| OutboxDepth {
        list_id: "news".into(),
        kind: "mail".into(),
        status: status.into(),
        count: 1,
        oldest: t(DAY + 60),
    };
    assert_eq!(
        s.outbox_depth().await.expect("depth"),
        vec![depth("dead"), depth("pending")]
    );

    assert!(s.leases().await.expect("leases").is_empty());
    assert!(
        s.try_lease("job", "host/1", t(0), t(60))
            .await
            .expect("lease")
    );
    assert_eq!(
        s.leases().await.expect("leases"),
        vec![Lease {
            name: "job".into(),
            holder: "host/1".into(),
            until: t(60),
        }]
    );

    assert_eq!(
        s.list_consents("news").await.expect("consents"),
        vec![
            ("a@example.org".to_owned(), S::Confirmed),
            ("b@example.org".to_owned(), S::Pending),
        ]
    );
    s.erase_contact(&b, "hash-of-b", t(DAY * 2))
        .await
        .expect("erase");
    assert_eq!(
        s.list_consents("news").await.expect("consents"),
        vec![("a@example.org".to_owned(), S::Confirmed)],
        "an erased contact has no address to compare"
    );
}

/// The gauge and drift reads: the ledger head, and the addresses pending removals will take
/// off a list (the row's own address first, as an erased contact's removal carries it).
async fn check_ledger_head_and_pending_removals(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    assert_eq!(s.ledger_head().await.expect("empty head"), 0);
    assert!(
        s.pending_removal_addresses("news")
            .await
            .expect("none")
            .is_empty()
    );
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let row = |work: OutboxWork, key: &str, contact: &str| NewOutbox {
        work,
        priority: PRIORITY_LEGAL,
        idempotency_key: key.into(),
        contact_id: contact.into(),
        list_id: "news".into(),
    };
    let mut ca = simple_commit(&a, "news", None, S::None, S::Withdrawn, t(1));
    ca.outbox
        .push(row(OutboxWork::CampaignsRemove { email: None }, "rm-a", &a));
    s.commit(&ca).await.expect("a");
    let mut cb = simple_commit(&b, "news", None, S::None, S::Withdrawn, t(2));
    cb.outbox.push(row(
        OutboxWork::CampaignsRemove {
            email: Some("old.b@example.org".into()),
        },
        "rm-b",
        &b,
    ));
    cb.outbox
        .push(row(OutboxWork::CampaignsSubscribe {}, "sub-b", &b));
    let last = s.commit(&cb).await.expect("b");
    assert_eq!(s.ledger_head().await.expect("head"), last.seq);
    let mut addresses = s.pending_removal_addresses("news").await.expect("pending");
    addresses.sort();
    assert_eq!(addresses, ["a@example.org", "old.b@example.org"]);
    assert!(
        s.pending_removal_addresses("other")
            .await
            .expect("other")
            .is_empty()
    );
    // A removal carried out is no longer pending.
    for item in s.claim_outbox("w", t(3), t(100), 10).await.expect("claim") {
        if item.idempotency_key == "rm-a" {
            let done = Finish::Done {
                event: None,
                note: None,
            };
            s.finish_outbox(item.id, "w", &done, t(4))
                .await
                .expect("done");
        }
    }
    assert_eq!(
        s.pending_removal_addresses("news").await.expect("pending"),
        ["old.b@example.org"]
    );
}

async fn check_dead_letters_retry_and_drop(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let mut c = simple_commit(&a, "news", None, S::None, S::Asserted, t(1));
    push_mails(&mut c, &["k1", "k2"]);
    s.commit(&c).await.expect("commit");
    let claimed = s.claim_outbox("w", t(2), t(100), 10).await.expect("claim");
    assert_eq!(claimed.len(), 2);
    for item in &claimed {
        s.finish_outbox(
            item.id,
            "w",
            &Finish::Dead {
                error: "bad sender".into(),
            },
            t(3),
        )
        .await
        .expect("dead");
    }
    let dead = s.outbox_dead().await.expect("dead");
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].last_error.as_deref(), Some("bad sender"));

    // Retry: back in the queue with fresh attempts, claimable now.
    assert!(s.retry_dead(dead[0].id, t(4)).await.expect("retry"));
    assert!(
        !s.retry_dead(dead[0].id, t(4)).await.expect("second retry"),
        "no longer dead"
    );
    let again = s.claim_outbox("w2", t(5), t(100), 10).await.expect("claim");
    assert_eq!(
        again.iter().map(|i| (i.id, i.attempts)).collect::<Vec<_>>(),
        vec![(dead[0].id, 1)]
    );

    s.finish_outbox(
        again[0].id,
        "w2",
        &Finish::Done {
            event: None,
            note: None,
        },
        t(6),
    )
    .await
    .expect("done");

    // Drop: out of the dead letters for good, never claimed.
    assert!(s.drop_dead(dead[1].id, t(6)).await.expect("drop"));
    assert!(!s.drop_dead(dead[1].id, t(6)).await.expect("second drop"));
    assert!(!s.drop_dead(9_999_999, t(6)).await.expect("unknown id"));
    assert!(s.outbox_dead().await.expect("dead").is_empty());
    assert!(
        s.claim_outbox("w3", t(500), t(600), 10)
            .await
            .expect("claim")
            .is_empty()
    );
}

async fn check_erasure_redacts_and_keeps_the_chain(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let ev1 = s
        .commit(&simple_commit(&a, "news", None, S::None, S::Asserted, t(1)))
        .await
        .expect("a1");
    s.commit(&simple_commit(&b, "news", None, S::None, S::Asserted, t(2)))
        .await
        .expect("b1");
    s.commit(&simple_commit(
        &a,
        "news",
        Some(ev1.seq),
        S::Asserted,
        S::Erased,
        t(3),
    ))
    .await
    .expect("a erased");

    // With the triggers in place, only erasure's redaction is allowed.
    let other_change = format!("UPDATE ledger SET source = 'x' WHERE seq = {}", ev1.seq);
    assert!(
        db.exec(&other_change).await.is_err(),
        "other updates stay refused"
    );

    let erasure = s.erase_contact(&a, "hash-of-a", t(4)).await.expect("erase");
    assert!(erasure.contact_found);
    assert_eq!(
        erasure.redacted_events, 1,
        "the asserted event; the erased event carries no personal data"
    );
    assert_eq!(erasure.legacy_events, 0);
    let events = s.events_of_contact(&a).await.expect("events");
    assert_eq!(events.len(), 2, "the events themselves stay");
    assert_eq!(
        events[0].evidence,
        optinsync_engine::ledger::REDACTED_EVIDENCE
    );
    let contact = s.contact_by_id(&a).await.expect("read").expect("row kept");
    assert!(contact.erased);
    assert_eq!(contact.email, "hash-of-a");
    assert!(contact.fields.is_empty() && contact.crm_records.is_empty());
    assert_eq!(
        s.contact_by_email("a@example.org").await.expect("read"),
        None
    );

    let mut v = ChainVerifier::default();
    for ev in whole_ledger(s).await {
        v.check(&ev).expect("chain intact after erasure");
    }
    assert_eq!(v.finish(), Ok(3));
    // Redacting someone who was not erased is caught.
    let redact_b =
        format!("UPDATE ledger SET evidence = '{{\"erased\":true}}' WHERE contact_id = '{b}'");
    db.exec(&redact_b)
        .await
        .expect("the trigger allows the redaction shape");
    let mut v = ChainVerifier::default();
    for ev in whole_ledger(s).await {
        v.check(&ev).expect("hashes still match");
    }
    assert!(matches!(
        v.finish(),
        Err(ChainError::UnexplainedRedaction { .. })
    ));
}

/// A restarted instance frees the claims its dead predecessor (same prefix) left, and only
/// those: not its own, not another instance's, not finished rows.
async fn check_release_claims_of_a_crashed_predecessor(db: TestDb) {
    use ConsentState as S;
    let s = &*db.store;
    let a = new_contact(s, "release@example.org").await;
    let mut c = simple_commit(&a, "news", None, S::None, S::Asserted, t(1));
    for key in ["r1", "r2", "r3", "r4"] {
        c.outbox
            .push(outbox("mail", PRIORITY_NORMAL, key, &a, "news"));
    }
    s.commit(&c).await.expect("commit");
    // A prefix with `_` and `%`: they must not act as LIKE wildcards.
    let dead = "host_1/127.0.0.1:80%/111-aa";
    let other = "hostX1/127.0.0.1:8080/222-bb";
    let me = "host_1/127.0.0.1:80%/333-cc";
    let lease = t(10_000);
    let r1 = s
        .claim_outbox(dead, t(2), lease, 2)
        .await
        .expect("claim dead");
    assert_eq!(keys(&r1), vec!["r1", "r2"]);
    // The predecessor had finished one of its rows before it died.
    s.finish_outbox(
        r1[1].id,
        dead,
        &Finish::Done {
            event: None,
            note: None,
        },
        t(3),
    )
    .await
    .expect("finish");
    let r3 = s
        .claim_outbox(other, t(2), lease, 1)
        .await
        .expect("claim other");
    assert_eq!(keys(&r3), vec!["r3"]);
    let r4 = s
        .claim_outbox(me, t(2), lease, 1)
        .await
        .expect("claim mine");
    assert_eq!(keys(&r4), vec!["r4"]);

    let freed = s
        .release_claims("host_1/127.0.0.1:80%/", me)
        .await
        .expect("release");
    assert_eq!(freed, 1, "only the dead predecessor's unfinished row");
    // Long before any lease ends, exactly that row can be claimed again.
    let again = s
        .claim_outbox(me, t(4), lease, 10)
        .await
        .expect("claim again");
    assert_eq!(keys(&again), vec!["r1"]);
    assert_eq!(again[0].attempts, 2);
    assert_eq!(
        s.release_claims("host_1/127.0.0.1:80%/", me)
            .await
            .expect("release"),
        0
    );
}

async fn check_leases(db: TestDb) {
    let s = &*db.store;
    assert!(
        s.try_lease("sync-pass", "a", t(0), t(60))
            .await
            .expect("take"),
        "free lease taken"
    );
    assert!(
        !s.try_lease("sync-pass", "b", t(10), t(70))
            .await
            .expect("try"),
        "held by a"
    );
    assert!(
        s.try_lease("sync-pass", "a", t(20), t(80))
            .await
            .expect("renew"),
        "the holder renews"
    );
    assert!(
        !s.try_lease("sync-pass", "b", t(70), t(130))
            .await
            .expect("try"),
        "renewed until 80"
    );
    assert!(
        s.try_lease("other", "b", t(70), t(130))
            .await
            .expect("take"),
        "leases are per name"
    );
    assert!(
        s.try_lease("sync-pass", "b", t(81), t(141))
            .await
            .expect("take over"),
        "a lapsed lease is taken over"
    );
    assert!(
        !s.try_lease("sync-pass", "a", t(90), t(150))
            .await
            .expect("try"),
        "the old holder lost it"
    );

    // A restarted instance (same host/listen prefix) takes over its dead predecessor's lease.
    assert!(
        s.try_lease("pass2", "host/127.0.0.1:80/old", t(0), t(1000))
            .await
            .expect("take")
    );
    assert!(
        s.try_lease("pass3", "otherhost/127.0.0.1:80/x", t(0), t(1000))
            .await
            .expect("take")
    );
    s.release_claims("host/127.0.0.1:80/", "host/127.0.0.1:80/new")
        .await
        .expect("release");
    assert!(
        s.try_lease("pass2", "host/127.0.0.1:80/new", t(1), t(1000))
            .await
            .expect("take over")
    );
    assert!(
        !s.try_lease("pass3", "host/127.0.0.1:80/new", t(1), t(1000))
            .await
            .expect("try"),
        "another host's lease stays"
    );
}

async fn check_batch_upsert_matches_single(db: TestDb) {
    let s = &*db.store;
    let known = new_contact(s, "known@example.org").await;
    let mut a = upsert("new@example.org", Some("Contacts/1"));
    a.fields.insert("City".into(), json!("Madrid"));
    let mut b = upsert("known@example.org", Some("Contacts/2"));
    b.language = Some("es".into());
    // A second record with the first one's address: merged into the same contact, in order.
    let mut c = upsert("new@example.org", Some("Contacts/3"));
    c.fields.insert("City".into(), json!("Sevilla"));
    let got = s
        .upsert_contacts(&[a, b, c], t(10))
        .await
        .expect("upsert_contacts");
    assert_eq!(got.len(), 3, "one contact per input, aligned");
    assert_eq!(got[0].id, got[2].id, "same address, same contact");
    assert_eq!(got[1].id, known, "an existing address keeps its contact id");
    assert_eq!(got[1].language.as_deref(), Some("es"));
    assert_eq!(got[1].crm_records, vec!["Contacts/2".to_owned()]);
    assert_eq!(
        got[2].crm_records,
        vec!["Contacts/1".to_owned(), "Contacts/3".to_owned()],
        "both CRM records of one address are kept"
    );
    assert_eq!(
        got[2].fields.get("City"),
        Some(&json!("Sevilla")),
        "the later record wins"
    );
    for c in &got {
        let stored = s
            .contact_by_id(&c.id)
            .await
            .expect("contact_by_id")
            .expect("stored");
        assert_eq!(&stored, c, "what upsert_contacts returns is what is stored");
    }
    assert!(
        s.upsert_contacts(&[], t(11))
            .await
            .expect("empty batch")
            .is_empty()
    );
}

async fn check_commit_batch(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    // b/news already has an event: a batch commit expecting no consent conflicts.
    let first = s
        .commit(&simple_commit(
            &b,
            "news",
            None,
            ConsentState::None,
            ConsentState::Asserted,
            t(1),
        ))
        .await
        .expect("commit");
    let mut a1 = simple_commit(
        &a,
        "news",
        None,
        ConsentState::None,
        ConsentState::Asserted,
        t(2),
    );
    a1.suppress = None;
    let mut a2 = simple_commit(
        &a,
        "news",
        Some(999),
        ConsentState::Asserted,
        ConsentState::Pending,
        t(2),
    );
    a2.outbox = vec![outbox("mail", PRIORITY_NORMAL, "mail:a2", &a, "news")];
    let stale = simple_commit(
        &b,
        "news",
        None,
        ConsentState::None,
        ConsentState::Asserted,
        t(3),
    );
    let stale_next = simple_commit(
        &b,
        "news",
        None,
        ConsentState::Asserted,
        ConsentState::Pending,
        t(3),
    );
    let mut other = simple_commit(
        &b,
        "other",
        None,
        ConsentState::None,
        ConsentState::Withdrawn,
        t(3),
    );
    other.suppress = Some(Suppression {
        address_hash: "hash-of-b".into(),
        reason: "withdrawn".into(),
    });
    let batch = vec![
        BatchCommit::new(a1, false),
        // Follows a1: its expected_seq (999) is not checked.
        BatchCommit::new(a2, true),
        BatchCommit::new(stale, false),
        BatchCommit::new(stale_next, true),
        BatchCommit::new(other, false),
    ];
    let out = s.commit_batch(&batch).await.expect("commit_batch");
    assert_eq!(out.len(), 5, "one result per commit");
    assert!(
        out[0].is_some() && out[1].is_some(),
        "a's two commits are written"
    );
    assert!(
        out[2].is_none(),
        "a commit on a consent that changed is left out"
    );
    assert!(out[3].is_none(), "and so is the one that follows it");
    assert!(out[4].is_some(), "other pairs are not affected");
    let seqs_written: Vec<i64> = out.iter().flatten().map(|e| e.seq).collect();
    assert_eq!(
        seqs_written,
        vec![first.seq + 1, first.seq + 2, first.seq + 3],
        "written events take consecutive seqs in batch order"
    );
    let a_news = s
        .consent(&a, "news")
        .await
        .expect("consent")
        .expect("a/news");
    assert_eq!(
        a_news.state,
        ConsentState::Pending,
        "the projection holds the pair's last commit"
    );
    assert_eq!(a_news.last_seq, Some(first.seq + 2));
    let b_news = s
        .consent(&b, "news")
        .await
        .expect("consent")
        .expect("b/news");
    assert_eq!(
        b_news.last_seq,
        Some(first.seq),
        "the conflicting pair is untouched"
    );
    assert!(s.is_suppressed("hash-of-b").await.expect("is_suppressed"));
    let claimed = s
        .claim_outbox("w", t(10), t(20), 10)
        .await
        .expect("claim_outbox");
    assert_eq!(keys(&claimed), vec!["mail:a2"]);
    assert_eq!(
        claimed[0].event_seq,
        Some(first.seq + 2),
        "outbox row names its event"
    );
    assert_eq!(
        verify_stored_chain(s)
            .await
            .expect("chain verifies after a batch"),
        4
    );
    assert!(s.commit_batch(&[]).await.expect("empty batch").is_empty());
    // A single commit after a batch chains on.
    let next = s
        .commit(&simple_commit(
            &b,
            "news",
            Some(first.seq),
            ConsentState::Asserted,
            ConsentState::Pending,
            t(4),
        ))
        .await
        .expect("commit after batch");
    assert_eq!(next.seq, first.seq + 4);
    assert_eq!(verify_stored_chain(s).await.expect("chain verifies"), 5);
}

async fn check_batch_reads(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let c = new_contact(s, "c@example.org").await;
    s.commit(&simple_commit(
        &a,
        "news",
        None,
        ConsentState::None,
        ConsentState::Asserted,
        t(1),
    ))
    .await
    .expect("commit");
    s.commit(&simple_commit(
        &a,
        "other",
        None,
        ConsentState::None,
        ConsentState::Confirmed,
        t(1),
    ))
    .await
    .expect("commit");
    s.commit(&simple_commit(
        &c,
        "news",
        None,
        ConsentState::None,
        ConsentState::Pending,
        t(1),
    ))
    .await
    .expect("commit");
    s.record_engagement(&a, "news", t(5))
        .await
        .expect("engagement");
    // A contact with its consent to one list, in one read; a list it has no consent to, and
    // an unknown contact.
    let (contact, consent) = s
        .contact_with_consent(&a, "other")
        .await
        .expect("contact_with_consent")
        .expect("a exists");
    assert_eq!(contact.email, "a@example.org");
    assert_eq!(
        consent.map(|c| c.state),
        Some(ConsentState::Confirmed),
        "a's consent to `other`, not to `news`"
    );
    let separate = s.consent(&a, "other").await.expect("consent");
    assert_eq!(
        s.contact_with_consent(&a, "other")
            .await
            .expect("read")
            .and_then(|(_, c)| c)
            .map(|c| (c.since, c.last_seq, c.signup_token)),
        separate.map(|c| (c.since, c.last_seq, c.signup_token)),
        "the same consent as the single read"
    );
    let (contact, consent) = s
        .contact_with_consent(&b, "news")
        .await
        .expect("read")
        .expect("b exists");
    assert_eq!((contact.id.as_str(), consent), (b.as_str(), None));
    assert!(
        s.contact_with_consent("no-such-contact", "news")
            .await
            .expect("read")
            .is_none()
    );
    let ids = vec![a.clone(), b.clone()];
    let mut found: Vec<String> = s
        .contacts_by_ids(&[a.clone(), "no-such-contact".into(), c.clone()])
        .await
        .expect("contacts_by_ids")
        .into_iter()
        .map(|contact| contact.id)
        .collect();
    found.sort();
    let mut expected = vec![a.clone(), c.clone()];
    expected.sort();
    assert_eq!(found, expected, "the asked contacts that exist");
    let mut got: Vec<(String, String, &str)> = s
        .consents_of_contacts(&ids)
        .await
        .expect("consents_of_contacts")
        .into_iter()
        .map(|(c, l, k)| (c, l, k.state.as_str()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (a.clone(), "news".into(), "asserted"),
            (a.clone(), "other".into(), "confirmed")
        ],
        "only the asked contacts' consents"
    );
    // More ids than one `IN` list takes (1,000): read in chunks, the asked one among the last.
    let mut many: Vec<String> = (0..2_500).map(|i| format!("no-such-contact-{i}")).collect();
    many.push(a.clone());
    let mut got: Vec<(String, String)> = s
        .consents_of_contacts(&many)
        .await
        .expect("consents_of_contacts, 2,501 ids")
        .into_iter()
        .map(|(c, l, _)| (c, l))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![(a.clone(), "news".into()), (a.clone(), "other".into())],
        "the one asked contact that exists, past two full chunks"
    );
    let eng = s
        .engagements_of_contacts(&[a.clone(), c.clone()])
        .await
        .expect("engagements_of_contacts");
    assert_eq!(eng, vec![(a.clone(), "news".to_owned(), t(5))]);
    s.commit(&Commit {
        suppress: Some(Suppression {
            address_hash: "h1".into(),
            reason: "bounced".into(),
        }),
        ..simple_commit(
            &b,
            "news",
            None,
            ConsentState::None,
            ConsentState::Bounced,
            t(2),
        )
    })
    .await
    .expect("commit");
    // More ids than one IN list takes.
    let mut hashes: Vec<String> = (0..2500).map(|i| format!("h{i}")).collect();
    hashes.push("h1".into());
    assert_eq!(
        s.suppressed_among(&hashes).await.expect("suppressed_among"),
        vec!["h1".to_owned()],
        "each suppressed hash once, even if asked twice"
    );
    // A commit is seen by the next look-up at once (on SQLite the look-up reads through a
    // connection of its own, not the writer's).
    let ev = s
        .commit(&simple_commit(
            &b,
            "later",
            None,
            ConsentState::None,
            ConsentState::Pending,
            t(2),
        ))
        .await
        .expect("commit");
    let seen = s
        .contact_with_consent(&b, "later")
        .await
        .expect("read")
        .and_then(|(_, c)| c)
        .expect("b's new consent");
    assert_eq!(
        (seen.state, seen.last_seq),
        (ConsentState::Pending, Some(ev.seq))
    );
}

/// Erasure marks the contact (no `erased:` prefix on the address any more): its row keeps the
/// hash in place of the address, found by [`Store::erased_contact_by_hash`] only.
async fn check_erase_sets_the_erased_flag(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    let before = s.contact_by_id(&a).await.expect("read").expect("a");
    assert!(!before.erased);

    s.erase_contact(&a, "hash-of-a", t(4)).await.expect("erase");

    let after = s.contact_by_id(&a).await.expect("read").expect("row kept");
    assert!(after.erased);
    assert_eq!(after.email, "hash-of-a");
    assert_eq!(
        s.erased_contact_by_hash("hash-of-a").await.expect("read"),
        Some(after.clone())
    );
    assert_eq!(
        s.contact_by_email("a@example.org").await.expect("read"),
        None
    );
    // Only erased contacts answer a hash lookup.
    assert_eq!(
        s.erased_contact_by_hash("b@example.org")
            .await
            .expect("read"),
        None
    );
    let page = s.contacts_page(None, 10).await.expect("page");
    let flags: BTreeMap<&str, bool> = page.iter().map(|c| (c.id.as_str(), c.erased)).collect();
    assert_eq!(
        flags,
        BTreeMap::from([(a.as_str(), true), (b.as_str(), false)])
    );
}

/// A database written before the `erased` flag, holding a contact erased the old way
/// (`erased:<hash>` as its address), is migrated: the flag set, the hash kept without the
/// prefix, the other contacts untouched.
async fn old_erased_row_is_migrated(backend: Backend, url: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    });
    // The migrations before the flag, as a database of that time had them applied.
    let old = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(&dir).expect("migrations dir") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_owned();
        let version: u32 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("numbered migration");
        if version < 10 {
            std::fs::copy(&path, old.path().join(&name)).expect("copy migration");
        }
    }
    let migrator = sqlx::migrate::Migrator::new(old.path())
        .await
        .expect("old migrations");
    let insert = "INSERT INTO contacts (id, email, language, fields, crm_records, created_at, updated_at) VALUES \
        ('c-erased', 'erased:abc123', NULL, '{}', '[]', '2025-01-01T00:00:00.000000Z', '2025-01-01T00:00:00.000000Z'), \
        ('c-live', 'live@example.org', NULL, '{}', '[]', '2025-01-01T00:00:00.000000Z', '2025-01-01T00:00:00.000000Z')";
    match backend {
        Backend::Sqlite => {
            let opts: sqlx::sqlite::SqliteConnectOptions = url.parse().expect("SQLite URL");
            let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true))
                .await
                .expect("connect");
            migrator.run(&pool).await.expect("old migrations run");
            sqlx::query(insert).execute(&pool).await.expect("old row");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.expect("connect");
            migrator.run(&pool).await.expect("old migrations run");
            sqlx::query(insert).execute(&pool).await.expect("old row");
            pool.close().await;
        }
    }

    let s = store::open(url).await.expect("open store");
    s.migrate().await.expect("migrate to the flag");

    let erased = s
        .contact_by_id("c-erased")
        .await
        .expect("read")
        .expect("kept");
    assert!(erased.erased);
    assert_eq!(erased.email, "abc123");
    assert_eq!(
        s.erased_contact_by_hash("abc123").await.expect("read"),
        Some(erased)
    );
    let live = s
        .contact_by_email("live@example.org")
        .await
        .expect("read")
        .expect("kept");
    assert!(!live.erased);
    assert_eq!(live.id, "c-live");
}

/// The suppression list is read by hash and whole, and lifted with its ledger event in one
/// transaction (by a commit, or alone); a lift that removes nothing records nothing.
async fn check_suppression_list_and_lift(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "a@example.org").await;
    let b = new_contact(s, "b@example.org").await;
    for (c, hash, reason, at) in [(&a, "ha", "erased", t(1)), (&b, "hb", "bounced", t(2))] {
        s.commit(&Commit {
            suppress: Some(Suppression {
                address_hash: hash.into(),
                reason: reason.into(),
            }),
            ..simple_commit(
                c,
                "news",
                None,
                ConsentState::None,
                ConsentState::Bounced,
                at,
            )
        })
        .await
        .expect("commit");
    }
    let all = s.suppressions().await.expect("suppressions");
    assert_eq!(
        all.iter()
            .map(|x| (x.address_hash.as_str(), x.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![("ha", "erased"), ("hb", "bounced")]
    );
    assert_eq!(all[0].at, t(1));
    let of = s
        .suppressions_of(&["hb".into(), "nope".into()])
        .await
        .expect("suppressions_of");
    assert_eq!(of.len(), 1);
    assert_eq!(of[0].reason, "bounced");

    // A commit that lifts: the event and the deletion together.
    let head = whole_ledger(s).await.len();
    s.commit(&Commit {
        lift: vec!["ha".into()],
        paced: None,
        ..simple_commit(
            &a,
            "other",
            None,
            ConsentState::Pending,
            ConsentState::Confirmed,
            t(3),
        )
    })
    .await
    .expect("commit with lift");
    assert!(!s.is_suppressed("ha").await.expect("read"));
    assert_eq!(whole_ledger(s).await.len(), head + 1);

    // Alone: the operator's lift with its event; nothing to lift records nothing.
    let lift_b = |at| {
        let ev = event(
            &b,
            "news",
            "suppression_lifted",
            ConsentState::Bounced,
            ConsentState::Bounced,
            at,
        );
        async move {
            s.lift_suppressions(&["hb".into()], &[ev])
                .await
                .expect("lift")
        }
    };
    assert_eq!(lift_b(t(4)).await, 1);
    assert!(s.suppressions().await.expect("suppressions").is_empty());
    let n = whole_ledger(s).await.len();
    assert_eq!(n, head + 2);
    assert_eq!(lift_b(t(5)).await, 0);
    assert_eq!(
        whole_ledger(s).await.len(),
        n,
        "nothing lifted, nothing recorded"
    );
    assert_eq!(verify_stored_chain(s).await.expect("chain"), n as u64);
}

/// An event that changes no consent, with its outbox rows, in one transaction: the rows name
/// the event, a repeated key is ignored, the consent is untouched.
async fn check_append_with_outbox(db: TestDb) {
    let s = &*db.store;
    let c = new_contact(s, "a@example.org").await;
    let ev = event(
        &c,
        "news",
        "preferences_link_requested",
        ConsentState::None,
        ConsentState::None,
        t(1),
    );
    let row = outbox(
        "preferences_link_mail",
        PRIORITY_NORMAL,
        "preferences-link:1",
        &c,
        "news",
    );
    let sealed = s
        .append_with_outbox(&ev, std::slice::from_ref(&row))
        .await
        .expect("append");
    assert_eq!(sealed.kind, "preferences_link_requested");
    let again = event(
        &c,
        "news",
        "preferences_link_requested",
        ConsentState::None,
        ConsentState::None,
        t(2),
    );
    s.append_with_outbox(&again, &[row])
        .await
        .expect("append again");
    let claimed = s
        .claim_outbox("w", t(100), t(200), 10)
        .await
        .expect("claim");
    assert_eq!(
        keys(&claimed),
        vec!["preferences-link:1"],
        "one row per key"
    );
    assert_eq!(claimed[0].event_seq, Some(sealed.seq));
    assert_eq!(s.consent(&c, "news").await.expect("consent"), None);
    assert_eq!(verify_stored_chain(s).await.expect("chain"), 2);
}

/// Sending plans and stop rules: a paced commit's count is written with it (and not when the
/// commit is left out), outcomes add up per slot, held wave rows come back due on release while
/// the person's own rows stay put, and the list's events group by kind.
async fn check_waves(db: TestDb) {
    let s = &*db.store;
    let a = new_contact(s, "wave-a@example.org").await;
    let b = new_contact(s, "wave-b@example.org").await;
    let mail = |token: &str, wave: bool, key: &str, contact: &str| NewOutbox {
        work: OutboxWork::Mail {
            token: token.into(),
            mail: MailKind::Doi,
            wave,
        },
        priority: PRIORITY_NORMAL,
        idempotency_key: key.into(),
        contact_id: contact.into(),
        list_id: "news".into(),
    };
    let mut c = simple_commit(
        &a,
        "news",
        None,
        ConsentState::None,
        ConsentState::Pending,
        t(10),
    );
    c.paced = Some(PacedSend {
        mail_kind: MailKind::Doi,
        day: 7,
        bucket: Some("gmail.com".into()),
    });
    c.outbox.push(mail("ta", true, "mail:wave-a", &a));
    s.commit(&c).await.expect("commit");
    let mut d = simple_commit(
        &b,
        "news",
        None,
        ConsentState::None,
        ConsentState::Pending,
        t(11),
    );
    d.paced = Some(PacedSend {
        mail_kind: MailKind::Doi,
        day: 7,
        bucket: None,
    });
    d.outbox.push(mail("tb", false, "mail:own-b", &b));
    s.commit(&d).await.expect("commit");
    // A commit left out (stale) counts nothing.
    let mut stale = d.clone();
    stale.event.event_id = "stale".into();
    assert!(s.commit(&stale).await.is_err());
    let counts = s.wave_counts("news", 7).await.expect("wave_counts");
    let admitted = |bucket: &str| {
        counts
            .iter()
            .find(|c| c.mail_kind == "doi" && c.bucket == bucket)
            .map(|c| c.admitted)
    };
    assert_eq!(admitted(WAVE_TOTAL), Some(2), "{counts:?}");
    assert_eq!(admitted("gmail.com"), Some(1), "{counts:?}");
    assert!(
        s.wave_counts("news", 8)
            .await
            .expect("wave_counts")
            .is_empty()
    );
    assert_eq!(
        s.wave_first_days("news").await.expect("first days"),
        vec![("doi".to_owned(), 7)]
    );

    let o = |sent, hard, soft, policy, complaints| MailOutcomes {
        sent,
        hard,
        soft,
        policy,
        complaints,
    };
    s.add_mail_outcomes(&[
        ("news".into(), 100, o(5, 1, 0, 0, 0)),
        ("news".into(), 101, o(3, 0, 0, 2, 0)),
        ("other".into(), 101, o(0, 0, 0, 0, 9)),
    ])
    .await
    .expect("add outcomes");
    s.add_mail_outcomes(&[("news".into(), 101, o(1, 0, 1, 0, 0))])
        .await
        .expect("add outcomes");
    assert_eq!(
        s.mail_outcomes("news", 101).await.expect("sum"),
        o(4, 0, 1, 2, 0)
    );
    assert_eq!(
        s.mail_outcomes("news", i64::MIN).await.expect("sum"),
        o(9, 1, 1, 2, 0)
    );
    assert_eq!(
        s.mail_outcomes("none", 0).await.expect("sum"),
        MailOutcomes::default()
    );

    // Both rows held far ahead; a release brings back the wave's row only.
    let claimed = s
        .claim_outbox("w1", t(20), t(320), 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    for item in &claimed {
        s.finish_outbox(item.id, "w1", &Finish::Postpone { at: t(100_000) }, t(20))
            .await
            .expect("postpone");
    }
    assert_eq!(s.release_waves("news", t(30)).await.expect("release"), 1);
    assert_eq!(s.release_waves("other", t(30)).await.expect("release"), 0);
    let due = s
        .claim_outbox("w2", t(31), t(331), 10)
        .await
        .expect("claim");
    assert_eq!(keys(&due), ["mail:wave-a"]);

    let groups = s.list_event_summary("news").await.expect("summary");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!((groups[0].events, groups[0].contacts), (2, 2));
    assert_eq!(groups[0].to_state, "pending");
    assert_eq!((groups[0].first, groups[0].last), (t(10), t(11)));
}

/// SQLite: the store's checkpointer thread copies the WAL back into the database file, not a
/// commit crossing SQLite's 1,000-page mark: one contact committed reaches the main file
/// within seconds. Read with `immutable=1`, which ignores the WAL (and may catch the file
/// mid-copy, hence a failed read counts as "not yet").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_checkpointer_copies_commits_into_the_file() {
    let db = TestDb::sqlite().await;
    let path = db
        .url
        .strip_prefix("sqlite://")
        .expect("a sqlite:// URL")
        .to_owned();
    let id = new_contact(&*db.store, "ann@example.org").await;
    let in_file = || -> rusqlite::Result<i64> {
        let conn = rusqlite::Connection::open_with_flags(
            format!("file:{path}?immutable=1"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )?;
        conn.query_row("SELECT count(*) FROM contacts WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
    };
    let wal = std::fs::metadata(format!("{path}-wal")).map_or(0, |m| m.len());
    assert!(wal > 0, "the commit went to the WAL first");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut found = in_file();
    while !matches!(found, Ok(1)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        found = in_file();
    }
    assert_eq!(
        found.ok(),
        Some(1),
        "the contact never reached the database file"
    );
}
