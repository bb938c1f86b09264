//! The engine driven in-process ([`support::Harness`]: SQLite in a temporary directory, fake
//! connectors, rules from source): commit conflicts and their retries, batch re-planning,
//! what one rules pass sees, superseded CRM write-backs, a CRM pull that fails midway, pipelined
//! pulls against page-after-page ingestion,
//! confirmation run by the campaigns tool, and erased addresses that come back. Known bugs
//! stand at the end as ignored tests.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use optinsync_engine::bulk::IngestStats;
use optinsync_engine::consent::{ConsentState, Input};
use optinsync_engine::email;
use optinsync_engine::engine::{Applied, EngineError};
use optinsync_engine::ledger::EventSource;
use optinsync_engine::store::Contact;
use optinsync_plugin_api::{ConnectorError, StatusKind};
use optinsync_testkit::fake_connectors::{CampaignsCall, FakeCampaigns, crm_record};
use support::{Harness, NEWS, SEND_DOI, other_writer_applies};

const ADA: &str = "ada@example.org";
const BOB: &str = "bob@example.org";

/// One CRM page: Ada's record and Bob's, each asserting `news`.
async fn ada_and_bob_page(h: &Harness) -> IngestStats {
    h.engine
        .ingest_records(&[
            crm_record("1", ADA, &["news"]),
            crm_record("2", BOB, &["news"]),
        ])
        .await
        .unwrap()
}

/// A contact the CRM asserted for `news` and the rules asked to confirm: `pending`, with the
/// token of its DOI mail.
async fn pending_on_news(h: &Harness, record: &str, email: &str) -> String {
    let changes = h.crm_sends(record, email, &["news"]).await;
    assert_eq!(changes, Some(2), "asserted, then the DOI requested");
    let contact = h.contact(email).await;
    let consent = h.consent(&contact, "news").await;
    assert_eq!(consent.state, ConsentState::Pending);
    consent.signup_token.expect("a pending signup has a token")
}

// ---------------------------------------------------------------------------------------------
// apply: conflicts between read and commit
// ---------------------------------------------------------------------------------------------

/// Ada pending on `news` (with her signup token), and the other writer set to feed `input`
/// for her before each of the engine's next `races` commits.
async fn pending_ada_raced(
    races: usize,
    input: impl Fn() -> Input + Send + 'static,
) -> (Harness, Contact, String) {
    let h = Harness::new(NEWS, SEND_DOI).await;
    let token = pending_on_news(&h, "1", ADA).await;
    let ada = h.contact(ADA).await;
    h.racing
        .race_next_commits(races, other_writer_applies(&h, ADA, "news", input));
    (h, ada, token)
}

/// Another writer changes the consent between `apply`'s read and its commit: the commit
/// conflicts and `apply` decides again on the fresh state, so the change it writes builds on
/// the other writer's (its reminder count survives) instead of overwriting it.
#[tokio::test]
async fn apply_retries_a_conflicting_commit_and_builds_on_the_concurrent_change() {
    let (h, ada, token) = pending_ada_raced(1, || Input::SendReminder).await;
    let commits_before = h.racing.commit_calls();

    let applied = h.apply(&ada, "news", Input::Confirm { token }).await;

    let Applied::Changed(ev) = applied else {
        panic!("the confirmation is written on the second attempt: {applied:?}")
    };
    assert_eq!(
        (ev.kind.as_str(), ev.from_state.as_str()),
        ("confirmed", "pending")
    );
    assert_eq!(h.racing.races_left(), 0, "the race ran");
    assert_eq!(
        h.racing.commit_calls() - commits_before,
        2,
        "one conflicting attempt, one written"
    );
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        [
            "asserted",
            "doi_requested",
            "reminder_requested",
            "confirmed"
        ]
    );
    let consent = h.consent(&ada, "news").await;
    assert_eq!(consent.state, ConsentState::Confirmed);
    assert_eq!(consent.last_seq, Some(ev.seq));
    assert_eq!(
        consent.reminders_sent, 1,
        "decided on the state the other writer left, not the stale read"
    );

    h.drain().await;
    // (The proof the subscribe carries is checked in
    // `a_subscribe_carries_the_confirmation_from_the_ledger`.)
    let calls: Vec<(String, Vec<String>)> = h
        .campaigns
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CampaignsCall::Subscribe { list, subscribers } => {
                Some((list, subscribers.into_iter().map(|s| s.email).collect()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(calls.len(), h.campaigns.calls().len(), "only subscribes");
    assert_eq!(
        calls,
        [("news".to_owned(), vec![ADA.to_owned()])],
        "subscribed once"
    );
    let states: Vec<String> = h
        .crm
        .write_backs()
        .into_iter()
        .map(|w| w.state.to_string())
        .collect();
    assert_eq!(states, ["confirmed"]);
}

/// The concurrent change is an unsubscribe: decided again, the old confirmation link is
/// refused (withdrawal wins) and nothing is subscribed.
#[tokio::test]
async fn apply_retry_refuses_a_confirmation_that_a_concurrent_unsubscribe_overtook() {
    let (h, ada, token) = pending_ada_raced(1, || Input::Unsubscribe).await;

    let applied = h.apply(&ada, "news", Input::Confirm { token }).await;

    let Applied::Refused(refusal) = applied else {
        panic!("withdrawal wins over the older confirmation link: {applied:?}")
    };
    assert_eq!(refusal.state, ConsentState::Withdrawn);
    assert_eq!(h.racing.races_left(), 0);
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested", "withdrawn"]
    );
    assert_eq!(h.state(&ada, "news").await, ConsentState::Withdrawn);
    h.drain().await;
    assert!(
        h.campaigns
            .calls()
            .iter()
            .all(|c| !matches!(c, CampaignsCall::Subscribe { .. })),
        "never subscribed: {:?}",
        h.campaigns.calls()
    );
}

/// A consent that changes before every attempt: `apply` gives up after five attempts with
/// `Contended` and writes nothing; once the contention is over the same input goes through.
#[tokio::test]
async fn apply_gives_up_as_contended_after_five_conflicting_attempts() {
    // Each race replaces the pending signup with a new one: always legal, always a change.
    let (h, ada, _) = pending_ada_raced(5, || Input::PersonSignup {
        token: fresh_token(),
    })
    .await;
    let news = h.list("news");

    let result = h
        .engine
        .apply(
            &ada,
            &news,
            Input::Unsubscribe,
            EventSource::Web,
            Default::default(),
        )
        .await;

    assert!(
        matches!(&result, Err(EngineError::Contended { contact_id, list_id })
            if *contact_id == ada.id && list_id == "news"),
        "{result:?}"
    );
    assert_eq!(h.racing.races_left(), 0, "five attempts, each raced");
    let kinds = h.event_kinds(&ada, "news").await;
    assert!(
        !kinds.iter().any(|k| k == "withdrawn"),
        "a contended input writes nothing: {kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| *k == "signup_requested").count(), 5);

    let again = h.apply(&ada, "news", Input::Unsubscribe).await;
    assert!(
        matches!(again, Applied::Changed(ref ev) if ev.kind == "withdrawn"),
        "{again:?}"
    );
}

fn fresh_token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("race-token-{}", N.fetch_add(1, Ordering::SeqCst))
}

// ---------------------------------------------------------------------------------------------
// Batches: re-plan rounds, and what one rules pass sees
// ---------------------------------------------------------------------------------------------

/// A CRM page is planned in memory and committed in one batch. A contact whose consent
/// another writer changed meanwhile is left out of the batch and planned again on the fresh
/// state (here: someone else recorded the assertion first, so the re-plan only sends the
/// DOI), while the other contacts' commits stand; each change is counted once.
#[tokio::test]
async fn batch_replans_a_contact_whose_consent_changed_between_plan_and_commit() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    h.racing.race_next_commits(
        1,
        other_writer_applies(&h, ADA, "news", || Input::CrmAsserted),
    );
    let commits_before = h.racing.commit_calls();

    let stats = ada_and_bob_page(&h).await;

    assert_eq!(h.racing.races_left(), 0);
    assert_eq!(
        h.racing.commit_calls() - commits_before,
        2,
        "a second round for the contact left out"
    );
    assert_eq!(stats.records, 2);
    assert_eq!(
        stats.crm_changes, 1,
        "Bob's assertion; Ada's was the other writer's"
    );
    assert_eq!(stats.decided.changes, 2, "a DOI for each, counted once");
    assert_eq!((stats.decided.refused, stats.decided.rule_errors), (0, 0));

    let ada = h.contact(ADA).await;
    let ada_events = h.events(&ada, "news").await;
    let ada_events: Vec<(&str, &str)> = ada_events
        .iter()
        .map(|e| (e.kind.as_str(), e.source.as_str()))
        .collect();
    assert_eq!(
        ada_events,
        [("asserted", "cli"), ("doi_requested", "rules")]
    );
    let bob = h.contact(BOB).await;
    assert_eq!(
        h.event_kinds(&bob, "news").await,
        ["asserted", "doi_requested"]
    );

    h.drain().await;
    let mut mailed = h.mails_to();
    mailed.sort();
    assert_eq!(mailed, [ADA, BOB], "one DOI mail each");
}

/// One rules pass decides each contact once, on the state its pass started from plus what the
/// CRM asserted in it: the CRM's assertion gets its DOI in the same pass, but the `pending`
/// that DOI leaves is acted on (reminder) only in the next pass; then nothing more changes.
#[tokio::test]
async fn a_rules_pass_acts_on_the_crm_inputs_of_the_pass_and_on_its_own_actions_next_pass() {
    const DOI_THEN_REMIND: &str = r#"
fn decide(contact, consent, ctx) {
    if consent.state == "asserted" {
        return #{ action: "send_doi", reason: "asserted" };
    }
    if consent.state == "pending" {
        return #{ action: "send_reminder", reason: "still pending" };
    }
}
"#;
    let h = Harness::new(NEWS, DOI_THEN_REMIND).await;
    let first = h.crm_sends("1", ADA, &["news"]).await;
    assert_eq!(first, Some(2));
    let ada = h.contact(ADA).await;
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested"],
        "no reminder in the pass that sent the DOI"
    );

    let second = h.engine.decide_all().await.unwrap();
    assert_eq!((second.contacts, second.changes, second.refused), (1, 1, 0));
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested", "reminder_requested"]
    );

    let third = h.engine.decide_all().await.unwrap();
    assert_eq!(
        (third.changes, third.refused),
        (0, 1),
        "the second reminder is refused (max_reminders = 1): a fixed point"
    );
    assert_eq!(h.event_kinds(&ada, "news").await.len(), 3);
}

/// Several actions proposed at once are applied in order, each on the state the previous one
/// left, and committed together: a reminder is legal right after the DOI it repeats.
#[tokio::test]
async fn proposals_of_one_decision_apply_in_order_on_the_state_each_leaves() {
    const DOI_AND_REMINDER: &str = r#"
fn decide(contact, consent, ctx) {
    if consent.state == "asserted" {
        return [
            #{ action: "send_doi", reason: "asserted" },
            #{ action: "send_reminder", reason: "and a reminder" },
        ];
    }
}
"#;
    let h = Harness::new(NEWS, DOI_AND_REMINDER).await;
    let changes = h.crm_sends("1", ADA, &["news"]).await;
    assert_eq!(changes, Some(3));
    let ada = h.contact(ADA).await;
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested", "reminder_requested"]
    );
    let consent = h.consent(&ada, "news").await;
    assert_eq!((consent.doi_mails, consent.reminders_sent), (1, 1));
    h.drain().await;
    assert_eq!(h.mails_to(), [ADA, ADA], "the DOI mail and its reminder");
}

// ---------------------------------------------------------------------------------------------
// Outbox: superseded write-backs
// ---------------------------------------------------------------------------------------------

/// A confirmation queues a write-back of `confirmed`; an unsubscribe right after queues one of
/// `withdrawn` (legal priority). The older write-back is superseded when its turn comes: the
/// CRM only ever hears `withdrawn`, never a stale `confirmed` that would overwrite it, and the
/// stale subscribe is skipped too.
#[tokio::test]
async fn an_older_write_back_is_superseded_by_a_newer_consent_change() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    let token = pending_on_news(&h, "1", ADA).await;
    let ada = h.contact(ADA).await;
    h.drain().await;
    assert_eq!(h.mails_to(), [ADA]);

    assert!(matches!(
        h.apply(&ada, "news", Input::Confirm { token }).await,
        Applied::Changed(_)
    ));
    assert!(matches!(
        h.apply(&ada, "news", Input::Unsubscribe).await,
        Applied::Changed(_)
    ));
    let stats = h.drain().await;

    let write_backs = h.crm.write_backs();
    let states: Vec<(&str, bool)> = write_backs
        .iter()
        .map(|w| (w.state.as_str(), w.opt_out))
        .collect();
    assert_eq!(
        states,
        [("withdrawn", true)],
        "the confirmed write-back was superseded"
    );
    let withdrawn = &write_backs[0];
    assert_eq!(withdrawn.email, ADA);
    assert_eq!(withdrawn.records.len(), 1);
    assert_eq!(withdrawn.records[0].to_string(), "Contacts/1");
    assert_eq!(
        h.campaigns.calls(),
        [CampaignsCall::Remove {
            list: "news".into(),
            emails: vec![ADA.into()],
        }],
        "removed; the subscribe queued by the confirmation was skipped"
    );
    assert_eq!((stats.done, stats.dead, stats.retried), (4, 0, 0));
    assert_eq!(h.store().outbox_counts().await.unwrap().pending, 0);
}

/// The documented reason write-backs arrive out of order: the `confirmed` write-back fails
/// for now and waits out its backoff; meanwhile the person unsubscribes. When the retry comes
/// due it is superseded, so it cannot overwrite the `withdrawn` the CRM was told in between.
#[tokio::test]
async fn a_write_back_waiting_to_retry_is_superseded_by_a_newer_change() {
    // Retries come due at once, so the test need not wait out a backoff.
    let h = Harness::new(&format!("[sync]\nretry_base = \"0s\"\n{NEWS}"), SEND_DOI).await;
    let token = pending_on_news(&h, "1", ADA).await;
    let ada = h.contact(ADA).await;
    h.drain().await;
    assert!(matches!(
        h.apply(&ada, "news", Input::Confirm { token }).await,
        Applied::Changed(_)
    ));
    h.crm
        .fail_next_write_backs([ConnectorError::transient("CRM busy")]);
    let first = h.engine.deliver_due("test", 50).await.unwrap();
    assert_eq!(
        (first.done, first.retried),
        (1, 1),
        "subscribed; the write-back waits"
    );
    assert!(h.crm.write_backs().is_empty());

    assert!(matches!(
        h.apply(&ada, "news", Input::Unsubscribe).await,
        Applied::Changed(_)
    ));
    let stats = h.drain().await;

    let states: Vec<(String, bool)> = h
        .crm
        .write_backs()
        .into_iter()
        .map(|w| (w.state.to_string(), w.opt_out))
        .collect();
    assert_eq!(states, [("withdrawn".to_owned(), true)]);
    assert_eq!((stats.dead, stats.retried), (0, 0));
    assert_eq!(h.store().outbox_counts().await.unwrap().pending, 0);
}

// ---------------------------------------------------------------------------------------------
// CRM pulls
// ---------------------------------------------------------------------------------------------

/// The CRM's change feed fails on its second page: the pull reports the failure, but what came
/// before it is committed and the cursor stands after it; the next pull goes on from there and
/// applies nothing twice.
#[tokio::test]
async fn a_crm_pull_that_fails_midway_keeps_what_it_committed_and_resumes_after_it() {
    const CAROL: &str = "carol@example.org";
    let h = Harness::new(&format!("[sync]\npage_size = 1\n{NEWS}"), SEND_DOI).await;
    for (id, email) in [("1", ADA), ("2", BOB), ("3", CAROL)] {
        h.crm.push(crm_record(id, email, &["news"]));
    }
    h.crm
        .fail_change_read(1, ConnectorError::transient("CRM timed out"));

    let failed = h.engine.pull_crm(|_| {}).await;
    assert!(
        matches!(
            &failed,
            Err(EngineError::Connector {
                connector: "crm",
                source: ConnectorError::Transient { .. }
            })
        ),
        "{failed:?}"
    );
    let ada = h.contact(ADA).await;
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested"]
    );
    assert!(h.store().contact_by_email(BOB).await.unwrap().is_none());
    assert_eq!(h.store().cursor("crm").await.unwrap().as_deref(), Some("1"));

    let resumed = h.engine.pull_crm(|_| {}).await.unwrap();
    assert_eq!(
        (
            resumed.pages,
            resumed.records,
            resumed.changes,
            resumed.rule_changes
        ),
        (2, 2, 2, 2),
        "Bob's and Carol's pages"
    );
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested"],
        "nothing applied twice"
    );
    for email in [BOB, CAROL] {
        let c = h.contact(email).await;
        assert_eq!(h.state(&c, "news").await, ConsentState::Pending);
    }
}

/// A CRM feed of `pages` pages of 100 records, in which addresses cross every page boundary
/// with a state change on both sides (when `crossing`): `x{p}` is asserted on page `p` and
/// opted out on page `p + 1`, `y{p}` the other way round; the rest are addresses of their own.
fn crossing_feed(pages: usize, crossing: bool) -> Vec<Vec<optinsync_plugin_api::CrmRecord>> {
    let opted_out = |id: String, email: String| {
        let mut r = crm_record(&id, &email, &["news"]);
        r.opted_out = true;
        r
    };
    (0..pages)
        .map(|p| {
            let mut page = Vec::new();
            if crossing {
                page.push(crm_record(
                    &format!("x{p}"),
                    &format!("x{p}@example.org"),
                    &["news"],
                ));
                page.push(opted_out(format!("y{p}"), format!("y{p}@example.org")));
                if p > 0 {
                    page.push(opted_out(
                        format!("x{}b", p - 1),
                        format!("x{}@example.org", p - 1),
                    ));
                    page.push(crm_record(
                        &format!("y{}b", p - 1),
                        &format!("y{}@example.org", p - 1),
                        &["news"],
                    ));
                }
            }
            while page.len() < 100 {
                let n = page.len();
                page.push(crm_record(
                    &format!("f{p}-{n}"),
                    &format!("f{p}.{n}@example.org"),
                    &["news"],
                ));
            }
            page
        })
        .collect()
}

/// Every address of the feed with its state on `news` and the first and last of its events
/// there. (What lies between depends on the batches: within one, the CRM's inputs are applied
/// before the rules run, so an address asserted and opted out in one batch is never asked to
/// confirm; page after page, it is.)
async fn outcome(
    h: &Harness,
    feed: &[Vec<optinsync_plugin_api::CrmRecord>],
) -> Vec<(String, ConsentState, Option<String>, Option<String>)> {
    let mut emails: Vec<String> = feed
        .iter()
        .flatten()
        .filter_map(|r| r.email.clone())
        .collect();
    emails.sort();
    emails.dedup();
    let mut out = Vec::new();
    for email in emails {
        let c = h.contact(&email).await;
        let kinds = h.event_kinds(&c, "news").await;
        let (first, last) = (kinds.first().cloned(), kinds.last().cloned());
        out.push((email, h.state(&c, "news").await, first, last));
    }
    out
}

/// `feed` pulled by one harness (pages of 100 records), and ingested page after page by another.
async fn pulled_and_page_after_page(
    feed: &[Vec<optinsync_plugin_api::CrmRecord>],
) -> (Harness, optinsync_engine::engine::PullStats, Harness) {
    let pulled = Harness::new(&format!("[sync]\npage_size = 100\n{NEWS}"), SEND_DOI).await;
    for r in feed.iter().flatten() {
        pulled.crm.push(r.clone());
    }
    let stats = pulled.engine.pull_crm(|_| {}).await.unwrap();
    let one_by_one = Harness::new(NEWS, SEND_DOI).await;
    for page in feed {
        one_by_one.engine.ingest_records(page).await.unwrap();
    }
    (pulled, stats, one_by_one)
}

/// A pull plans each batch while the batch before it commits. Where an address recurs across
/// the two, the plan made meanwhile read state the commit changes: it must be made again, so
/// that every contact ends as if the records had been applied one page after another.
/// Addresses cross every page boundary here (asserted then opted out, and the other way round),
/// so whatever the batch boundaries are, each pipelined plan depends on the batch before it.
#[tokio::test]
async fn a_pipelined_crm_pull_applies_records_in_their_order_across_batches() {
    let feed = crossing_feed(45, true);
    let (pulled, stats, one_by_one) = pulled_and_page_after_page(&feed).await;
    assert_eq!((stats.pages, stats.records), (45, 4500));

    let got = outcome(&pulled, &feed).await;
    let want = outcome(&one_by_one, &feed).await;
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "as if applied page after page");
    }
    // The oracle itself: a crossing address ends as its last record says.
    let x0 = got.iter().find(|(e, ..)| e == "x0@example.org").unwrap();
    assert_eq!(x0.1, ConsentState::Withdrawn, "{x0:?}");
    assert_eq!(x0.2.as_deref(), Some("asserted"), "{x0:?}");
    assert_eq!(x0.3.as_deref(), Some("withdrawn"), "{x0:?}");
    let y0 = got.iter().find(|(e, ..)| e == "y0@example.org").unwrap();
    assert_ne!(
        y0.1,
        ConsentState::Pending,
        "an opted-out address is not asked again: {y0:?}"
    );
    let chain = pulled.engine.verify_ledger().await.unwrap();
    assert!(chain.verified, "{chain:?}");
}

/// Batches of distinct addresses: each plan made while the batch before commits stands; the
/// pull comes to what applying page after page comes to.
#[tokio::test]
async fn a_pipelined_crm_pull_of_distinct_addresses_equals_page_after_page() {
    let feed = crossing_feed(45, false);
    let (pulled, stats, one_by_one) = pulled_and_page_after_page(&feed).await;
    assert_eq!(
        (stats.records, stats.changes, stats.rule_changes),
        (4500, 4500, 4500),
        "each address asserted, and asked to confirm"
    );
    assert_eq!(
        pulled.store().cursor("crm").await.unwrap().as_deref(),
        Some("4500"),
        "the cursor stands after the last batch"
    );
    assert_eq!(
        outcome(&pulled, &feed).await,
        outcome(&one_by_one, &feed).await
    );
}

/// Counts every counter increment by metric name (labels ignored), for the tests of what a
/// decision counts; installed for one thread with `metrics::with_local_recorder`.
#[derive(Default)]
struct CountingRecorder(Arc<std::sync::Mutex<HashMap<String, u64>>>);

struct CountOf(String, Arc<std::sync::Mutex<HashMap<String, u64>>>);

impl metrics::CounterFn for CountOf {
    fn increment(&self, by: u64) {
        *self.1.lock().unwrap().entry(self.0.clone()).or_default() += by;
    }
    fn absolute(&self, value: u64) {
        self.1.lock().unwrap().insert(self.0.clone(), value);
    }
}

impl metrics::Recorder for CountingRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(Arc::new(CountOf(
            key.name().to_owned(),
            Arc::clone(&self.0),
        )))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// The rules fail for every contact of a CRM record `x…`: the crossing addresses of
/// [`crossing_feed`] (rules never see an address).
const FAILS_ON_X: &str = r#"
fn decide(contact, consent, ctx) {
    for r in contact.crm_records {
        if r.contains("/x") {
            throw "deliberately broken for x records";
        }
    }
    if consent.state == "asserted" {
        return #{ action: "send_doi", reason: "asserted; confirmation required" };
    }
}
"#;

/// A plan made while the batch before commits, and made again because that batch touched one
/// of its addresses, must count its rule errors once: the metric an operator alerts on equals
/// what the pull reports.
#[test]
fn a_pipelined_crm_pull_counts_each_rule_error_once() {
    let feed = crossing_feed(45, true);
    let recorder = CountingRecorder::default();
    let stats = metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pulled =
                Harness::new(&format!("[sync]\npage_size = 100\n{NEWS}"), FAILS_ON_X).await;
            for r in feed.iter().flatten() {
                pulled.crm.push(r.clone());
            }
            pulled.engine.pull_crm(|_| {}).await.unwrap()
        })
    });
    let counted = recorder.0.lock().unwrap().clone();
    let metric = counted
        .get("optinsync_rule_errors_total")
        .copied()
        .unwrap_or(0);
    // Every page's asserted `x` contact fails at least once (a batch of several pages decides
    // a contact once); batches after the first read the `x` address of the batch before, so
    // their plans, made while that batch committed, were made again.
    assert!(stats.rule_errors >= 45, "{stats:?}");
    assert_eq!(metric, stats.rule_errors, "{stats:?} {counted:?}");
}

// ---------------------------------------------------------------------------------------------
// Lists whose double opt-in the campaigns tool runs
// ---------------------------------------------------------------------------------------------

/// On a list with `doi = "campaigns"` the DOI the rules ask for goes to the campaigns tool (on
/// the list's campaigns name), not to the mail transport; its confirmation comes back through
/// the tool's status feed, and the tool, which holds the person already, is not asked to
/// subscribe them. The optinsync-run list next to it still gets its own mail.
#[tokio::test]
async fn campaigns_run_doi_goes_to_the_campaigns_tool_not_the_mail_transport() {
    let lists = format!(
        r#"{NEWS}
[[lists]]
id = "events"
name = "Events"
campaigns_list = "Events-2026"
doi = "campaigns"
"#
    );
    let h = Harness::new(&lists, SEND_DOI).await;
    let changes = h.crm_sends("1", ADA, &["news", "events"]).await;
    assert_eq!(changes, Some(4), "asserted and DOI requested on each list");
    let ada = h.contact(ADA).await;
    assert_eq!(h.state(&ada, "events").await, ConsentState::Pending);

    h.drain().await;

    let calls = h.campaigns.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let CampaignsCall::RequestDoi { list, subscriber } = &calls[0] else {
        panic!("the tool is asked to run the DOI: {calls:?}")
    };
    assert_eq!(
        (list.as_str(), subscriber.email.as_str()),
        ("Events-2026", ADA)
    );
    let mails = h.mail.sent();
    assert_eq!(mails.len(), 1, "one mail: the news list's own DOI");
    let news_doi = h
        .events(&ada, "news")
        .await
        .into_iter()
        .find(|e| e.kind == "doi_requested")
        .unwrap();
    assert_eq!(
        mails[0].idempotency_key,
        format!("mail-{}", news_doi.event_id)
    );
    assert_eq!(
        h.event_kinds(&ada, "events").await,
        ["asserted", "doi_requested"],
        "no mail sent on the campaigns-run list"
    );

    h.campaigns
        .push_status("Events-2026", ADA, StatusKind::Confirmed, Utc::now());
    assert_eq!(h.engine.pull_campaigns().await.unwrap(), 1);
    assert_eq!(h.state(&ada, "events").await, ConsentState::Confirmed);
    assert_eq!(
        h.event_kinds(&ada, "events").await.last().unwrap(),
        "confirmed_by_campaigns"
    );
    h.drain().await;
    assert_eq!(
        h.campaigns.calls().len(),
        1,
        "no subscribe: the tool holds them already"
    );
    let write_backs: Vec<(String, String)> = h
        .crm
        .write_backs()
        .into_iter()
        .map(|w| (w.list, w.state.to_string()))
        .collect();
    assert_eq!(write_backs, [("events".to_owned(), "confirmed".to_owned())]);
}

// ---------------------------------------------------------------------------------------------
// Erasure
// ---------------------------------------------------------------------------------------------

/// After an erasure the address comes back from every direction — a webhook for its CRM record
/// (in another spelling), the CRM change feed, the campaigns tool's status feed and an import
/// of the tool's list — and is stored again by none of them: no contact for it, no consent, no
/// mail; the import takes it off the list.
#[tokio::test]
async fn an_erased_address_is_not_stored_again_whichever_way_it_comes_back() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    pending_on_news(&h, "1", ADA).await;
    h.drain().await;
    assert_eq!(h.mails_to(), [ADA]);
    let ada = h.contact(ADA).await;

    let report = h.engine.erase(&ada).await.unwrap();
    assert_eq!(report.lists, 1);
    assert_eq!(report.mail_copies_deleted, 1, "the DOI mail's copy");
    assert!(h.mail.sent().is_empty());
    assert!(h.engine.is_erased(ADA).await.unwrap());

    // A webhook: the CRM record again, in another spelling of the address.
    let respelled = "Ada@Example.ORG";
    assert_eq!(email::normalise(respelled).unwrap(), ADA);
    let webhook = h.crm_sends("1", respelled, &["news"]).await;
    assert_eq!(webhook, None, "the record cannot become a contact");
    let page = ada_and_bob_page(&h).await;
    assert_eq!(
        (page.records, page.erased, page.crm_changes),
        (1, 1, 1),
        "Bob only"
    );

    // The change feed.
    h.crm.push(crm_record("1", ADA, &["news"]));
    let pulled = h.engine.pull_crm(|_| {}).await.unwrap();
    assert_eq!((pulled.records, pulled.erased, pulled.changes), (0, 1, 0));

    // The campaigns tool's status feed, and an import of its list.
    h.campaigns
        .push_status("news", ADA, StatusKind::Unsubscribed, Utc::now());
    assert_eq!(h.engine.pull_campaigns().await.unwrap(), 0);
    h.campaigns.add_member("news", ADA);
    let imported = h
        .engine
        .import_existing(&h.list("news"), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (imported.members, imported.removed, imported.asserted),
        (1, 1, 0)
    );
    assert!(h.campaigns.calls().contains(&CampaignsCall::Remove {
        list: "news".into(),
        emails: vec![ADA.into()],
    }));

    assert!(h.store().contact_by_email(ADA).await.unwrap().is_none());
    let contacts = h.store().contacts_page(None, 100).await.unwrap();
    let emails: Vec<&str> = contacts.iter().map(|c| c.email.as_str()).collect();
    assert_eq!(emails.len(), 2, "the erased contact and Bob: {emails:?}");
    assert!(emails.contains(&BOB));
    let erased = contacts.iter().find(|c| c.id == ada.id).unwrap();
    assert!(erased.erased, "{erased:?}");
    assert!(!erased.email.contains('@'), "{}", erased.email);
    assert_eq!(
        h.event_kinds(erased, "news").await,
        ["asserted", "doi_requested", "doi_mail_sent", "erased"],
        "nothing after the erasure"
    );
    h.drain().await;
    assert_eq!(h.mails_to(), [BOB], "no mail to the erased address");
}

/// The erasure's CRM write-back and list removal still carry the address (the CRM must find
/// the record to opt it out); once they are delivered no file of the store holds the address.
#[tokio::test]
async fn erasure_deliveries_carry_the_address_then_the_store_files_hold_no_copy() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    pending_on_news(&h, "1", ADA).await;
    h.drain().await;
    let ada = h.contact(ADA).await;
    assert!(
        !files_holding(&h, ADA).is_empty(),
        "the scan below finds the address while it is stored"
    );
    h.engine.erase(&ada).await.unwrap();

    let stats = h.drain().await;
    assert_eq!(
        (stats.done, stats.dead),
        (2, 0),
        "the removal and the write-back"
    );
    let write_backs = h.crm.write_backs();
    assert_eq!(write_backs.len(), 1);
    let wb = &write_backs[0];
    assert_eq!(
        (wb.state.as_str(), wb.opt_out, wb.email.as_str()),
        ("erased", true, ADA)
    );
    assert_eq!(
        wb.records
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["Contacts/1"]
    );
    // An erased contact leaves the list through the connector's `erase`.
    assert!(h.campaigns.calls().contains(&CampaignsCall::Erase {
        list: "news".into(),
        emails: vec![ADA.into()],
    }));

    assert_eq!(
        files_holding(&h, ADA),
        Vec::<String>::new(),
        "no store file still holds the erased address"
    );
}

/// A row whose kind this version does not know (another version wrote it, or it was damaged)
/// becomes a dead letter saying so; the rows around it are delivered.
#[tokio::test]
async fn an_outbox_row_of_an_unknown_kind_becomes_a_clear_dead_letter() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    pending_on_news(&h, "1", ADA).await;
    let contact_id = h.contact(ADA).await.id;
    let url = format!("sqlite://{}", h.dir().join("optinsync.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO outbox (kind, priority, idempotency_key, contact_id, list_id, payload, next_attempt_at, created_at) \
         VALUES ('fax', 10, 'fax:1', $1, 'news', '{\"to\":1}', '2000-01-01T00:00:00.000000Z', '2000-01-01T00:00:00.000000Z')",
    )
    .bind(&contact_id)
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let stats = h.drain().await;

    assert_eq!(
        (stats.done, stats.dead),
        (1, 1),
        "the DOI mail, and the fax"
    );
    let dead = h.store().outbox_dead().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind(), "fax");
    let error = dead[0].last_error.as_deref().unwrap_or("");
    assert!(
        error.contains("unreadable outbox work of kind `fax`"),
        "{error}"
    );
    assert_eq!(h.mails_to(), [ADA]);
}

/// Names of the files in the store's directory whose bytes contain `needle`.
fn files_holding(h: &Harness, needle: &str) -> Vec<String> {
    let mut holding = Vec::new();
    let mut scanned = 0;
    for entry in std::fs::read_dir(h.dir()).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        scanned += 1;
        if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            holding.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(
        scanned > 0,
        "the store's files are in {}",
        h.dir().display()
    );
    holding
}

// ---------------------------------------------------------------------------------------------
// Bugs these tests found (fixed)
// ---------------------------------------------------------------------------------------------

/// Erasure clears the outbox's error texts because a vendor's error text may quote the
/// address; the erasure's own write-back and removal are delivered after it, so when one of
/// them becomes a dead letter its error text must not be stored either.
#[tokio::test]
async fn a_dead_letter_of_an_erased_contact_keeps_no_error_text_quoting_the_address() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    pending_on_news(&h, "1", ADA).await;
    h.drain().await;
    let ada = h.contact(ADA).await;
    h.engine.erase(&ada).await.unwrap();
    h.crm
        .fail_next_write_backs([ConnectorError::permanent(format!(
            "no CRM record for {ADA}"
        ))]);

    let stats = h.drain().await;

    assert_eq!(stats.dead, 1, "the erasure's write-back");
    let dead = h.store().outbox_dead().await.unwrap();
    assert!(
        dead.iter()
            .all(|d| !d.last_error.as_deref().unwrap_or("").contains(ADA)),
        "{dead:?}"
    );
    assert_eq!(files_holding(&h, ADA), Vec::<String>::new());
}

/// A contact's commits on one list are written while its commit on another list conflicts:
/// the written ones count in their round (the re-plan finds them done and must not be the
/// only chance to count them).
#[tokio::test]
async fn batch_counts_changes_written_for_a_contact_whose_other_list_conflicted() {
    let lists = format!("{NEWS}\n[[lists]]\nid = \"events\"\nname = \"Events\"\n");
    let h = Harness::new(&lists, SEND_DOI).await;
    h.racing.race_next_commits(
        1,
        other_writer_applies(&h, ADA, "events", || Input::CrmAsserted),
    );

    let changes = h.crm_sends("1", ADA, &["news", "events"]).await;

    let ada = h.contact(ADA).await;
    assert_eq!(
        h.event_kinds(&ada, "news").await,
        ["asserted", "doi_requested"]
    );
    assert_eq!(
        h.event_kinds(&ada, "events").await,
        ["asserted", "doi_requested"]
    );
    assert_eq!(
        changes,
        Some(3),
        "news: assertion and DOI; events: DOI (its assertion was the other writer's)"
    );
}

// ---------------------------------------------------------------------------------------------
// outbox: batches of the connector's size, one result per row
// ---------------------------------------------------------------------------------------------

/// Five confirmations on a connector that takes three per call: two subscribe calls (3 + 2),
/// in claim order; an address the tool refuses fails alone (a dead letter) while the others of
/// its call are done.
#[tokio::test]
async fn subscribes_go_in_batches_of_the_connectors_size_and_each_row_keeps_its_own_result() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    h.campaigns.set_max_batch(3);
    let people: Vec<String> = (0..5).map(|i| format!("p{i}@example.org")).collect();
    for (i, email) in people.iter().enumerate() {
        let token = pending_on_news(&h, &format!("{i}"), email).await;
        let contact = h.contact(email).await;
        h.apply(&contact, "news", Input::Confirm { token }).await;
    }
    h.campaigns.refuse("p1@example.org");
    let stats = h.drain().await;
    let subscribes: Vec<Vec<String>> = h
        .campaigns
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CampaignsCall::Subscribe { subscribers, .. } => {
                Some(subscribers.into_iter().map(|s| s.email).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(subscribes.len(), 2, "{subscribes:?}");
    let mut subscribed: Vec<String> = subscribes.concat();
    subscribed.sort();
    let mut expected: Vec<String> = people.clone();
    expected.retain(|p| p != "p1@example.org");
    assert_eq!(subscribed, expected, "every other row subscribed once");
    assert_eq!(stats.dead, 1, "{stats:?}");
    let dead = h.store.outbox_dead().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].kind(), "campaigns_subscribe");
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the fake")),
        "{:?}",
        dead[0].last_error
    );
}

/// Each subscribe row is checked against its own list's consent at delivery: a person who
/// withdrew from one list since confirming is left out of that list's call (the row done as
/// skipped, no dead letter) and still subscribed to the list where she stays confirmed.
#[tokio::test]
async fn a_subscribe_batch_leaves_out_who_withdrew_from_that_list_since() {
    let lists = format!("{NEWS}\n[[lists]]\nid = \"events\"\nname = \"Events\"\n");
    let h = Harness::new(&lists, SEND_DOI).await;
    h.campaigns.set_max_batch(10);
    for (i, email) in [ADA, BOB].iter().enumerate() {
        h.crm_sends(&format!("{i}"), email, &["news", "events"])
            .await;
        let contact = h.contact(email).await;
        for list in ["news", "events"] {
            let token = h
                .consent(&contact, list)
                .await
                .signup_token
                .expect("pending with a token");
            h.apply(&contact, list, Input::Confirm { token }).await;
        }
    }
    let bob = h.contact(BOB).await;
    h.apply(&bob, "news", Input::Unsubscribe).await;
    let stats = h.drain().await;
    assert_eq!(stats.dead + stats.retried, 0, "{stats:?}");
    let mut per_list: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for call in h.campaigns.calls() {
        if let CampaignsCall::Subscribe { list, subscribers } = call {
            per_list
                .entry(list)
                .or_default()
                .extend(subscribers.into_iter().map(|s| s.email));
        }
    }
    let mut subscribed: Vec<Vec<String>> = per_list
        .into_values()
        .map(|mut emails| {
            emails.sort();
            emails
        })
        .collect();
    subscribed.sort();
    assert_eq!(
        subscribed,
        [vec![ADA.to_owned()], vec![ADA.to_owned(), BOB.to_owned()]],
        "news: Ada alone; events: both"
    );
}

/// A campaigns connector that serves several calls at once gets several batches at once (up
/// to what it says, never more), and every row is still subscribed exactly once.
#[tokio::test]
async fn campaigns_batches_go_side_by_side_up_to_the_connectors_concurrency() {
    let campaigns = FakeCampaigns::new();
    campaigns.set_max_batch(2);
    campaigns.set_concurrency(3, std::time::Duration::from_millis(40));
    let h = Harness::with_campaigns(NEWS, SEND_DOI, campaigns).await;
    let people: Vec<String> = (0..12).map(|i| format!("p{i}@example.org")).collect();
    for (i, email) in people.iter().enumerate() {
        let token = pending_on_news(&h, &format!("{i}"), email).await;
        let contact = h.contact(email).await;
        h.apply(&contact, "news", Input::Confirm { token }).await;
    }
    let stats = h.drain().await;
    assert_eq!(stats.dead + stats.retried, 0, "{stats:?}");
    let peak = h.campaigns.peak_in_flight();
    assert!(
        (2..=3).contains(&peak),
        "calls overlap, at most three at once: {peak}"
    );
    let mut subscribed: Vec<String> = h
        .campaigns
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CampaignsCall::Subscribe { subscribers, .. } => {
                Some(subscribers.into_iter().map(|s| s.email))
            }
            _ => None,
        })
        .flatten()
        .collect();
    subscribed.sort();
    let mut expected = people.clone();
    expected.sort();
    assert_eq!(subscribed, expected, "each confirmation subscribed once");
}

/// A whole batch that fails for a while is retried whole, with the same keys, and nothing is
/// subscribed twice.
#[tokio::test]
async fn a_failed_batch_retries_every_row_and_subscribes_each_once() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    h.campaigns.set_max_batch(10);
    for (i, email) in [ADA, BOB].iter().enumerate() {
        let token = pending_on_news(&h, &format!("{i}"), email).await;
        let contact = h.contact(email).await;
        h.apply(&contact, "news", Input::Confirm { token }).await;
    }
    h.campaigns.fail_next_calls([ConnectorError::Transient {
        message: "down".into(),
        retry_after: Some(std::time::Duration::from_millis(1)),
        scope: optinsync_plugin_api::FailureScope::Record,
    }]);
    // The rows are due again at once (the wait the connector named is 1 ms): the same drain
    // takes them again.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let first = h.drain().await;
    let second = h.drain().await;
    assert_eq!(first.retried, 2, "{first:?}");
    assert_eq!(
        first.dead + second.dead + second.retried,
        0,
        "{first:?} {second:?}"
    );
    let subscribes: Vec<usize> = h
        .campaigns
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CampaignsCall::Subscribe { subscribers, .. } => Some(subscribers.len()),
            _ => None,
        })
        .collect();
    assert_eq!(
        subscribes,
        [2],
        "one batch of two, after the failed attempt"
    );
}

/// A subscribe carries the confirmation it rests on, from the ledger: when the person
/// confirmed and from which address, and when the confirmation mail went out.
#[tokio::test]
async fn a_subscribe_carries_the_confirmation_from_the_ledger() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    let token = pending_on_news(&h, "1", ADA).await;
    h.drain().await; // the DOI mail goes out
    let ada = h.contact(ADA).await;
    let evidence = optinsync_engine::ledger::Evidence {
        ip: Some("192.0.2.7".into()),
        ..Default::default()
    };
    h.engine
        .apply(
            &ada,
            &h.list("news"),
            Input::Confirm { token },
            EventSource::Web,
            evidence,
        )
        .await
        .unwrap();
    h.drain().await;
    let proofs: Vec<_> = h
        .campaigns
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            CampaignsCall::Subscribe { subscribers, .. } => Some(subscribers),
            _ => None,
        })
        .flatten()
        .map(|s| s.proof.expect("a subscribe carries its proof"))
        .collect();
    assert_eq!(proofs.len(), 1);
    let proof = &proofs[0];
    assert_eq!(proof.confirmed_ip.as_deref(), Some("192.0.2.7"));
    let requested = proof.requested_at.expect("the DOI mail's time");
    assert!(requested <= proof.confirmed_at, "{proof:?}");
    assert!(Utc::now() - proof.confirmed_at < chrono::Duration::minutes(1));
}

/// An erased person's removal goes through the connector's `erase` (a tool may forget the
/// person for good there); a withdrawal's through `remove`.
#[tokio::test]
async fn an_erasure_is_removed_through_erase_and_a_withdrawal_through_remove() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    for (i, email) in [ADA, BOB].iter().enumerate() {
        let token = pending_on_news(&h, &format!("{i}"), email).await;
        let contact = h.contact(email).await;
        h.apply(&contact, "news", Input::Confirm { token }).await;
    }
    h.drain().await;
    let ada = h.contact(ADA).await;
    h.engine.erase(&ada).await.unwrap();
    let bob = h.contact(BOB).await;
    h.apply(&bob, "news", Input::Unsubscribe).await;
    h.drain().await;
    let calls = h.campaigns.calls();
    assert!(
        calls.contains(&CampaignsCall::Erase {
            list: "news".into(),
            emails: vec![ADA.into()],
        }),
        "{calls:?}"
    );
    assert!(
        calls.contains(&CampaignsCall::Remove {
            list: "news".into(),
            emails: vec![BOB.into()],
        }),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| matches!(c, CampaignsCall::Remove { emails, .. } if emails.contains(&ADA.to_owned()))),
        "{calls:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// mail made ready ahead of its send
// ---------------------------------------------------------------------------------------------

/// The outbox has the transport make a pass's mails ready before they take a place in flight
/// (`MailTransport::prepare`), then sends what was made (`send_ready`); a refusal when the
/// mail is made ready ends its row as the same refusal from the send: a hard bounce, the
/// address suppressed, no mail, and the other mail unaffected.
#[tokio::test]
async fn mails_made_ready_ahead_go_out_as_made_and_a_refusal_then_is_a_bounce() {
    let h = Harness::new(NEWS, SEND_DOI).await;
    pending_on_news(&h, "1", ADA).await;
    pending_on_news(&h, "2", BOB).await;
    h.mail
        .fail_next_prepares([ConnectorError::rejected("550 5.1.1 no such user")]);

    h.drain().await;

    let mailed = h.mails_to();
    assert_eq!(mailed.len(), 1, "one mail went out: {mailed:?}");
    assert_eq!(h.mail.sent_ready(), 1, "sent in the form made ahead");
    let refused = if mailed[0] == ADA { BOB } else { ADA };
    let refused = h.contact(refused).await;
    assert_eq!(h.state(&refused, "news").await, ConsentState::Bounced);
    assert!(
        h.event_kinds(&refused, "news")
            .await
            .contains(&"bounced".to_owned())
    );
    let sent = h.contact(&mailed[0]).await;
    assert!(
        h.event_kinds(&sent, "news")
            .await
            .contains(&"doi_mail_sent".to_owned())
    );
}
