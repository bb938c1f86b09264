//! The HubSpot CRM connector against the fake HubSpot (`optinsync_testkit::hubspot`, written
//! from HubSpot's API documentation), over real HTTP on loopback.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use optinsync_plugin_api::{
    ChangePage, Connector as _, ConnectorError, ConsentState, ConsentWriteBack, CrmConnector,
    CrmRecord, Cursor, HttpMethod, RecordRef, Settings, WebhookEvent, WebhookRequest,
};
use optinsync_plugin_hubspot::HubSpotCrm;
use optinsync_testkit::hubspot::{self, FakeHubSpot, Fault, PropertyDef};
use serde_json::{Value, json};

const FAST: &str = "requests_per_10s = 100000\nsearches_per_second = 1000\n";

fn settings(text: &str) -> Settings {
    let table: toml::Table = toml::from_str(text).unwrap();
    Settings::from_serialize(&table).unwrap()
}

fn config_text(fake: &FakeHubSpot, extra: &str) -> String {
    format!(
        r#"
token = "{token}"
api_url = "{url}"
fields = ["firstname", "lastname"]
overlap = "30s"
{extra}
[asserts]
newsletter = {{ property = "hs_legal_basis", value = "Freely given consent from contact" }}

[write_back.lists.newsletter]
subscription_id = 9
consent_property = "optinsync_newsletter"

[write_back.lists.conformance-check]
subscription_id = "7"
"#,
        token = hubspot::PRIVATE_APP_TOKEN,
        url = fake.url(),
    )
}

fn start() -> FakeHubSpot {
    let fake = FakeHubSpot::start();
    fake.add_property(PropertyDef::text(
        "optinsync_newsletter",
        "optinsync: newsletter",
    ));
    fake
}

fn crm(fake: &FakeHubSpot, extra: &str) -> HubSpotCrm {
    HubSpotCrm::from_settings(&settings(&config_text(fake, extra))).unwrap()
}

#[derive(Debug, Default)]
struct Pass {
    records: Vec<CrmRecord>,
    invalid: usize,
    pages: usize,
}

/// Pull until the pass is complete, as the engine does.
async fn pass(crm: &HubSpotCrm, cursor: &mut Option<Cursor>, limit: usize) -> Pass {
    let mut out = Pass::default();
    loop {
        let page: ChangePage = crm.changes(cursor.as_ref(), limit).await.unwrap();
        out.pages += 1;
        out.records.extend(page.records);
        out.invalid += page.invalid.len();
        if page.next_cursor.is_some() {
            *cursor = page.next_cursor;
        }
        if !page.has_more {
            return out;
        }
        assert!(out.pages < 5000, "no end to the pass");
    }
}

fn ids(records: &[CrmRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| r.record.id.parse().unwrap())
        .collect()
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn person(i: usize) -> Value {
    json!({"email": format!("person{i}@example.org"), "firstname": format!("P{i}")})
}

fn searches(fake: &FakeHubSpot) -> Vec<hubspot::LoggedRequest> {
    fake.request_log()
        .into_iter()
        .filter(|r| r.endpoint == "POST /crm/v3/objects/contacts/search")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_scan_pages_with_the_list_cursor() {
    let fake = start();
    fake.unlimited();
    let seeded: Vec<u64> = (0..250)
        .map(|i| {
            fake.insert_at(
                person(i),
                at("2024-01-01T00:00:00Z") + chrono::Duration::seconds(i as i64),
            )
        })
        .collect();
    let crm = crm(&fake, FAST);
    let mut cursor = None;
    let p = pass(&crm, &mut cursor, 200).await;
    assert_eq!(ids(&p.records), seeded, "every contact once, in order");
    assert_eq!(p.pages, 3, "100 per page");
    let lists: Vec<_> = fake
        .request_log()
        .into_iter()
        .filter(|r| r.endpoint == "GET /crm/v3/objects/contacts")
        .collect();
    assert_eq!(lists.len(), 3);
    assert!(lists[1].query.contains("after="), "{}", lists[1].query);
    assert!(lists.iter().all(|r| r.status == 200));
    assert!(searches(&fake).is_empty(), "no search during the full scan");
    let r = &p.records[3];
    assert_eq!(r.email.as_deref(), Some("person3@example.org"));
    assert_eq!(r.fields["firstname"], json!("P3"));
    // The cursor is versioned JSON of this connector.
    let c: Value = serde_json::from_str(&cursor.unwrap().0).unwrap();
    assert_eq!(c["kind"], "hubspot");
    assert_eq!(c["v"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_pull_reads_only_what_changed() {
    let fake = start();
    fake.unlimited();
    let seeded: Vec<u64> = (0..120)
        .map(|i| {
            fake.insert_at(
                person(i),
                at("2024-01-01T00:00:00Z") + chrono::Duration::seconds(i as i64),
            )
        })
        .collect();
    let crm = crm(&fake, FAST);
    let mut cursor = None;
    assert_eq!(pass(&crm, &mut cursor, 100).await.records.len(), 120);
    let edited: Vec<u64> = seeded.iter().step_by(12).copied().collect();
    for id in &edited {
        fake.edit(
            *id,
            json!({"hs_legal_basis": "Freely given consent from contact"}),
        );
    }
    let p = pass(&crm, &mut cursor, 100).await;
    let mut got = ids(&p.records);
    got.sort();
    assert_eq!(got, edited);
    assert!(p.records.iter().all(|r| r.asserted_lists == ["newsletter"]));
    assert!(!searches(&fake).is_empty(), "incremental passes search");
    // Nothing new: the overlap re-reads the edits but does not deliver them again.
    let again = pass(&crm, &mut cursor, 100).await;
    assert!(again.records.is_empty(), "{:?}", ids(&again.records));
    // A person's opt-out of all email is input again.
    fake.unsubscribe_all("person5@example.org");
    let p = pass(&crm, &mut cursor, 100).await;
    assert_eq!(ids(&p.records), [seeded[5]]);
    assert!(p.records[0].opted_out);
}

/// More than 10,000 contacts share one `lastmodifieddate` (a bulk import): search cannot
/// page past 10,000 results nor sort by two properties, yet each is pulled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_contacts_with_12000_in_one_millisecond_are_each_pulled_once() {
    let fake = start();
    fake.unlimited();
    let crm = crm(&fake, FAST);
    let mut cursor = None;
    assert!(
        pass(&crm, &mut cursor, 100).await.records.is_empty(),
        "empty portal"
    );

    let t0 = Utc::now();
    let mut seeded = BTreeSet::new();
    // 4,000 before, 12,000 at t0 (one millisecond), 4,000 after, one ms apart each.
    for i in 0..4_000 {
        seeded.insert(fake.insert_at(
            json!({"email": format!("early{i}@example.org")}),
            t0 - chrono::Duration::milliseconds(4_000 - i),
        ));
    }
    seeded.extend(fake.seed_same_time(12_000, t0));
    for i in 0..4_000 {
        seeded.insert(fake.insert_at(
            json!({"email": format!("late{i}@example.org")}),
            t0 + chrono::Duration::milliseconds(1 + i),
        ));
    }
    assert_eq!(seeded.len(), 20_000);

    let p = pass(&crm, &mut cursor, 200).await;
    let got = ids(&p.records);
    let unique: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "no contact twice");
    assert_eq!(unique, seeded, "every contact");
    let s = searches(&fake);
    assert!(
        s.iter().all(|r| r.status == 200),
        "no search refused: {:?}",
        s.iter().find(|r| r.status != 200)
    );
    assert!(
        s.iter().all(|r| !r.body.contains("\"after\"")),
        "never pages by offset (the 10,000 cap)"
    );
    let again = pass(&crm, &mut cursor, 200).await;
    assert!(again.records.is_empty(), "{} again", again.records.len());
    // The cursor remembers what the overlap window re-reads (here all 20,000 contacts, as
    // they changed within seconds of each other): still small enough to store per page.
    let size = cursor.unwrap().0.len();
    assert!(size < 150_000, "{size}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_lag_is_covered_by_the_overlap() {
    let fake = start();
    fake.with(|s| s.search_lag = Duration::from_millis(1500));
    let a = fake.insert_at(person(1), at("2024-01-01T00:00:00Z"));
    let b = fake.insert_at(person(2), at("2024-01-01T00:00:01Z"));
    let crm = crm(&fake, "");
    let mut cursor = None;
    assert_eq!(pass(&crm, &mut cursor, 100).await.records.len(), 2);

    fake.edit(a, json!({"firstname": "A2"}));
    tokio::time::sleep(Duration::from_millis(1700)).await;
    fake.edit(b, json!({"firstname": "B2"}));
    // B's edit is not searchable yet: only A comes.
    let p = pass(&crm, &mut cursor, 100).await;
    assert_eq!(ids(&p.records), [a]);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    // Now B is; A is re-read inside the overlap but not delivered again.
    let p = pass(&crm, &mut cursor, 100).await;
    assert_eq!(ids(&p.records), [b]);
    assert_eq!(p.records[0].fields["firstname"], json!("B2"));
    assert!(pass(&crm, &mut cursor, 100).await.records.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_one_and_many() {
    let fake = start();
    let a = fake.insert(person(1));
    let b = fake.insert(person(2));
    let crm = crm(&fake, "");
    let rec = crm
        .fetch(&RecordRef {
            module: "contacts".into(),
            id: a.to_string(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.email.as_deref(), Some("person1@example.org"));
    assert!(
        crm.fetch(&RecordRef {
            module: "contacts".into(),
            id: "999999999".into()
        })
        .await
        .unwrap()
        .is_none(),
        "404 is None"
    );
    fake.archive(b);
    assert!(
        crm.fetch(&RecordRef {
            module: "contacts".into(),
            id: b.to_string()
        })
        .await
        .unwrap()
        .is_none(),
        "archived is None"
    );
    let many = crm.fetch_many(&[a, b, 424242]).await.unwrap();
    assert_eq!(ids(&many), [a]);
    assert_eq!(fake.calls("POST /crm/v3/objects/contacts/batch/read"), 1);
}

fn request(
    method: HttpMethod,
    query: &str,
    headers: Vec<(String, String)>,
    body: &str,
) -> WebhookRequest {
    WebhookRequest {
        method,
        path: "/webhooks/crm".into(),
        query: query.into(),
        headers,
        body: body.into(),
        peer: None,
    }
}

/// A receiver for the fake's deliveries: each call handed to the connector's `webhook`, 400
/// when it is refused (as the daemon answers), 200 otherwise.
type Seen = Arc<Mutex<Vec<Result<WebhookEvent, ConnectorError>>>>;

fn receiver(listener: tokio::net::TcpListener, crm: Arc<HubSpotCrm>) -> Seen {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/webhooks/crm",
        axum::routing::post(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let crm = Arc::clone(&crm);
                let out = Arc::clone(&out);
                async move {
                    let headers = headers
                        .iter()
                        .filter_map(|(k, v)| {
                            Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                        })
                        .collect();
                    let req = WebhookRequest {
                        method: HttpMethod::Post,
                        path: uri.path().to_owned(),
                        query: uri.query().unwrap_or_default().to_owned(),
                        headers,
                        body,
                        peer: None,
                    };
                    let result = crm.webhook(&req).await;
                    let code = if result.is_ok() { 200 } else { 400 };
                    out.lock().unwrap().push(result);
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            },
        ),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    seen
}

fn webhook_section(url: &str) -> String {
    format!(
        "[webhook]\nclient_secret = \"{}\"\nurl = \"{url}/webhooks/crm\"\n",
        hubspot::CLIENT_SECRET
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_signatures_valid_forged_and_stale() {
    let fake = start();
    let a = fake.insert(person(1));
    let b = fake.insert(person(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let crm = Arc::new(crm(&fake, &format!("{FAST}{}", webhook_section(&base))));
    let seen = receiver(listener, Arc::clone(&crm));
    fake.set_webhook_target(&format!("{base}/webhooks/crm"));

    // Valid: signed by HubSpot's recipe, fresh.
    let d = fake
        .fire(vec![
            hubspot::WebhookEvent::creation(a),
            hubspot::WebhookEvent::property_change(b, "firstname", "X"),
            hubspot::WebhookEvent::property_change(a, "lastname", "Y"),
            hubspot::WebhookEvent::deletion(77),
        ])
        .await
        .unwrap();
    assert_eq!(d.last().unwrap().status, Some(200));
    match seen.lock().unwrap().last().unwrap() {
        Ok(WebhookEvent::Changed { records }) => {
            let got: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(got, [a.to_string(), b.to_string()]);
        }
        other => panic!("unexpected {other:?}"),
    }
    // The engine's fetch after it is served by the batch read.
    let before = fake.calls("GET /crm/v3/objects/contacts/{contactId}");
    let rec = crm
        .fetch(&RecordRef {
            module: "contacts".into(),
            id: b.to_string(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.record.id, b.to_string());
    assert_eq!(
        fake.calls("GET /crm/v3/objects/contacts/{contactId}"),
        before
    );

    // Stale: a timestamp 10 minutes old is refused (HubSpot does not retry a 400).
    let old = Utc::now().timestamp_millis() - 600_000;
    let d = fake
        .fire_at(vec![hubspot::WebhookEvent::creation(a)], Some(old))
        .await
        .unwrap();
    assert_eq!(d.last().unwrap().status, Some(400));
    assert!(matches!(
        seen.lock().unwrap().last().unwrap(),
        Err(ConnectorError::InvalidInput { message }) if message.contains("too old")
    ));

    // Forged: the same body signed with another secret, or no signature at all.
    let body = format!(r#"[{{"subscriptionType":"contact.creation","objectId":{a}}}]"#);
    let ts = Utc::now().timestamp_millis();
    for (secret, sig_header) in [("not-the-secret", true), (hubspot::CLIENT_SECRET, false)] {
        let mut headers = vec![("x-hubspot-request-timestamp".to_owned(), ts.to_string())];
        if sig_header {
            headers.push((
                "x-hubspot-signature-v3".into(),
                hubspot::signature_v3(secret, "POST", "http://elsewhere/webhooks/crm", &body, ts),
            ));
        }
        let err = crm
            .webhook(&request(HttpMethod::Post, "", headers, &body))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectorError::InvalidInput { .. }),
            "{err:?}"
        );
    }
    // A GET is not how HubSpot calls.
    let err = crm
        .webhook(&request(HttpMethod::Get, "", vec![], ""))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::InvalidInput { .. }));
}

fn write_back(
    records: &[u64],
    email: &str,
    list: &str,
    state: ConsentState,
    key: &str,
) -> ConsentWriteBack {
    ConsentWriteBack {
        key: key.into(),
        records: records
            .iter()
            .map(|id| RecordRef {
                module: "contacts".into(),
                id: id.to_string(),
            })
            .collect(),
        email: email.into(),
        list: list.into(),
        state,
        opt_out: false,
        at: at("2026-12-01T10:00:00Z"),
        ledger_seq: 42,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_subscribes_with_legal_basis_then_unsubscribes_for_good() {
    let fake = start();
    fake.with(|s| s.search_lag = Duration::from_millis(300));
    let a = fake.insert_at(person(1), at("2024-01-01T00:00:00Z"));
    let crm = crm(&fake, FAST);
    let mut cursor = None;
    assert_eq!(pass(&crm, &mut cursor, 100).await.records.len(), 1);

    let confirm = write_back(
        &[a],
        "person1@example.org",
        "newsletter",
        ConsentState::Confirmed,
        "k1",
    );
    crm.write_back(&confirm).await.unwrap();
    let status = fake.subscription_status("person1@example.org");
    let nine = status["subscriptionStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "9")
        .unwrap()
        .clone();
    assert_eq!(nine["status"], "SUBSCRIBED");
    assert_eq!(nine["legalBasis"], "CONSENT_WITH_NOTICE");
    let why = nine["legalBasisExplanation"].as_str().unwrap();
    assert!(
        why.contains("Double opt-in confirmed 2026-12-01T10:00:00Z"),
        "{why}"
    );
    assert!(
        why.contains("newsletter") && why.contains("ledger event 42"),
        "{why}"
    );
    assert_eq!(
        fake.contact(a).unwrap()["properties"]["optinsync_newsletter"],
        "confirmed"
    );
    // Idempotent: the same key again, and a new key for the same state.
    crm.write_back(&confirm).await.unwrap();
    let again = ConsentWriteBack {
        key: "k1b".into(),
        ..confirm.clone()
    };
    crm.write_back(&again).await.unwrap();

    // No echo: optinsync's own writes do not come back as CRM input.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let p = pass(&crm, &mut cursor, 100).await;
    assert!(p.records.is_empty(), "echoed: {:?}", ids(&p.records));

    // Withdrawn: unsubscribed (final in HubSpot's v3 API).
    let withdraw = ConsentWriteBack {
        key: "k2".into(),
        state: ConsentState::Withdrawn,
        ..confirm.clone()
    };
    crm.write_back(&withdraw).await.unwrap();
    crm.write_back(&ConsentWriteBack {
        key: "k2b".into(),
        ..withdraw.clone()
    })
    .await
    .unwrap();
    let status = fake.subscription_status("person1@example.org");
    assert!(
        status["subscriptionStatuses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == "9" && s["status"] == "NOT_SUBSCRIBED")
    );
    assert_eq!(
        fake.contact(a).unwrap()["properties"]["optinsync_newsletter"],
        "withdrawn"
    );
    // The unsubscribe sets the per-type opt-out, which optinsync wrote: no echo either.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let p = pass(&crm, &mut cursor, 100).await;
    assert!(p.records.is_empty(), "echoed: {:?}", ids(&p.records));

    // A later confirmation cannot re-subscribe through v3: permanent, with the reason.
    let err = crm
        .write_back(&ConsentWriteBack {
            key: "k3".into(),
            ..confirm
        })
        .await
        .unwrap_err();
    match err {
        ConnectorError::Permanent { message } => {
            assert!(message.contains("v3"), "{message}");
            assert!(
                !message.contains("person1@"),
                "no address in errors: {message}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }

    // A person's own edit afterwards is input again.
    fake.edit(a, json!({"firstname": "Ann"}));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let p = pass(&crm, &mut cursor, 100).await;
    assert_eq!(ids(&p.records), [a]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_transient_with_a_wait_and_nothing_is_lost() {
    let fake = start();
    fake.unlimited();
    let seeded: Vec<u64> = (0..30)
        .map(|i| {
            fake.insert_at(
                person(i),
                at("2024-01-01T00:00:00Z") + chrono::Duration::seconds(i as i64),
            )
        })
        .collect();
    let crm = crm(&fake, FAST);
    let mut cursor: Option<Cursor> = None;
    let mut got = Vec::new();
    let mut calls = 0;
    loop {
        calls += 1;
        if calls % 2 == 0 {
            fake.fail_next(Fault::TooManyRequests);
            match crm.changes(cursor.as_ref(), 10).await.unwrap_err() {
                ConnectorError::Transient {
                    retry_after: Some(wait),
                    ..
                } => assert_eq!(wait, Duration::from_secs(10), "the burst window"),
                other => panic!("unexpected {other:?}"),
            }
        }
        let page = crm.changes(cursor.as_ref(), 10).await.unwrap();
        got.extend(ids(&page.records));
        cursor = page.next_cursor.or(cursor);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(got, seeded, "each once, none lost");

    // The search limit: the same during an incremental pass.
    fake.edit(seeded[3], json!({"firstname": "New"}));
    fake.fail_next_on(
        "POST /crm/v3/objects/contacts/search",
        Fault::TooManyRequests,
    );
    assert!(matches!(
        crm.changes(cursor.as_ref(), 10).await.unwrap_err(),
        ConnectorError::Transient {
            retry_after: Some(_),
            ..
        }
    ));
    let p = pass(&crm, &mut cursor, 10).await;
    assert_eq!(ids(&p.records), [seeded[3]]);

    // 5xx, timeouts and garbage are temporary too.
    fake.fail_next(Fault::Status(502));
    assert!(matches!(
        crm.changes(None, 10).await.unwrap_err(),
        ConnectorError::Transient { .. }
    ));
    fake.fail_next(Fault::Garbage);
    assert!(matches!(
        crm.changes(None, 10).await.unwrap_err(),
        ConnectorError::Transient { message, .. } if message.contains("not JSON")
    ));
    let slow =
        HubSpotCrm::from_settings(&settings(&config_text(&fake, "timeout = \"1s\""))).unwrap();
    fake.fail_next(Fault::Delay(Duration::from_secs(3)));
    assert!(matches!(
        slow.changes(None, 10).await.unwrap_err(),
        ConnectorError::Transient { message, .. } if message.contains("timed out")
    ));
    fake.fail_next(Fault::Status(400));
    assert!(matches!(
        crm.changes(None, 10).await.unwrap_err(),
        ConnectorError::Permanent { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_limiter_keeps_to_the_search_limit() {
    let fake = start();
    fake.with(|s| s.search_lag = Duration::ZERO);
    let a = fake.insert_at(person(1), at("2024-01-01T00:00:00Z"));
    let crm = crm(&fake, "");
    let mut cursor = None;
    pass(&crm, &mut cursor, 100).await;
    fake.edit(a, json!({"firstname": "x"}));
    // Six passes, one search each, at HubSpot's 4 per second: never a 429.
    for _ in 0..6 {
        pass(&crm, &mut cursor, 100).await;
    }
    assert!(fake.request_log().iter().all(|r| r.status != 429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_scope_or_property_is_a_config_error() {
    let fake = start();
    fake.add_token("pat-na1-limited", &[hubspot::scopes::CONTACTS_READ]);
    let text = config_text(&fake, "").replace(hubspot::PRIVATE_APP_TOKEN, "pat-na1-limited");
    let limited = HubSpotCrm::from_settings(&settings(&text)).unwrap();
    match limited.health().await.unwrap_err() {
        ConnectorError::Config { setting, message } => {
            assert_eq!(setting, "connectors.crm.token");
            assert!(message.contains("crm.schemas.contacts.read"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let bad = HubSpotCrm::from_settings(&settings(
        &config_text(&fake, "").replace(hubspot::PRIVATE_APP_TOKEN, "pat-na1-wrong"),
    ))
    .unwrap();
    assert!(matches!(
        bad.changes(None, 10).await.unwrap_err(),
        ConnectorError::Config { setting, .. } if setting == "connectors.crm.token"
    ));

    let ok = crm(&fake, "").health().await.unwrap();
    assert!(ok.ok, "{}", ok.detail);
    let typo = crm(&fake, "language_property = \"hs_langauge\"");
    match typo.health().await.unwrap_err() {
        ConnectorError::Config { setting, message } => {
            assert_eq!(setting, "connectors.crm.language_property");
            assert!(message.contains("hs_langauge"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let no_type = HubSpotCrm::from_settings(&settings(
        &config_text(&fake, "").replace("subscription_id = 9", "subscription_id = 12345"),
    ))
    .unwrap();
    assert!(matches!(
        no_type.health().await.unwrap_err(),
        ConnectorError::Config { setting, .. } if setting == "connectors.crm.write_back.lists.newsletter.subscription_id"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_errors_name_the_key() {
    let fake = start();
    let err = |extra: &str, drop_token: bool| {
        let mut text = config_text(&fake, extra);
        if drop_token {
            text = text.replace(&format!("token = \"{}\"", hubspot::PRIVATE_APP_TOKEN), "");
        }
        HubSpotCrm::from_settings(&settings(&text)).unwrap_err()
    };
    assert_eq!(err("tokne = \"x\"", false).key.as_deref(), Some("tokne"));
    assert_eq!(
        err("client_id = \"x\"", false).key.as_deref(),
        Some("token")
    );
    assert_eq!(err("", true).key.as_deref(), Some("token"));
    assert_eq!(
        err("client_id = \"x\"\nclient_secret = \"y\"", true)
            .key
            .as_deref(),
        Some("refresh_token")
    );
    assert_eq!(
        err("timeout = \"soon\"", false).key.as_deref(),
        Some("timeout")
    );
    assert_eq!(
        err("language_property = \"First Name\"", false)
            .key
            .as_deref(),
        Some("language_property")
    );
    let text = config_text(&fake, "").replace(
        "consent_property = \"optinsync_newsletter\"",
        "legal_basis = \"BECAUSE\"",
    );
    assert_eq!(
        HubSpotCrm::from_settings(&settings(&text))
            .unwrap_err()
            .key
            .as_deref(),
        Some("write_back.lists.newsletter.legal_basis")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refresh_tokens_are_rotated_in_memory() {
    let fake = start();
    fake.unlimited();
    let a = fake.insert(person(1));
    let text = config_text(&fake, "").replace(
        &format!("token = \"{}\"", hubspot::PRIVATE_APP_TOKEN),
        &format!(
            "client_id = \"{}\"\nclient_secret = \"{}\"\nrefresh_token = \"{}\"",
            hubspot::CLIENT_ID,
            hubspot::CLIENT_SECRET,
            hubspot::REFRESH_TOKEN
        ),
    );
    let crm = HubSpotCrm::from_settings(&settings(&text)).unwrap();
    assert_eq!(pass(&crm, &mut None, 100).await.records.len(), 1);
    assert_eq!(fake.token_requests(), 1);
    // Expired: refreshed with the rotated refresh token (the first one no longer works).
    fake.expire_tokens();
    let rec = crm
        .fetch(&RecordRef {
            module: "contacts".into(),
            id: a.to_string(),
        })
        .await
        .unwrap();
    assert!(rec.is_some());
    assert_eq!(fake.token_requests(), 2);
    // A wrong client secret is a config error naming it.
    let wrong = HubSpotCrm::from_settings(&settings(&text.replace(hubspot::CLIENT_SECRET, "nope")))
        .unwrap();
    assert!(matches!(
        wrong.changes(None, 10).await.unwrap_err(),
        ConnectorError::Config { setting, .. } if setting == "connectors.crm.client_secret"
    ));
}

/// `examples/hubspot.toml`'s CRM section is accepted as written (secrets filled in as the
/// engine would from the environment).
#[test]
fn example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hubspot.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let mut crm = doc["connectors"]["crm"].as_table().unwrap().clone();
    assert_eq!(crm.remove("kind").unwrap().as_str(), Some("hubspot"));
    fn resolve(t: &mut toml::Table) {
        for (_, v) in t.iter_mut() {
            match v {
                toml::Value::String(s) if s.starts_with("${") => *s = "from-env".into(),
                toml::Value::Table(t) => resolve(t),
                _ => {}
            }
        }
    }
    resolve(&mut crm);
    HubSpotCrm::from_settings(&Settings::from_serialize(&crm).unwrap()).unwrap();
}

fn with_writes() -> optinsync_conformance::Options {
    optinsync_conformance::Options {
        write: true,
        ..optinsync_conformance::Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubspot_crm_keeps_the_contract() {
    let fake = start();
    fake.unlimited();
    for i in 0..7i64 {
        fake.insert_at(
            person(i as usize),
            at("2024-01-01T00:00:00Z") + chrono::Duration::seconds(i),
        );
    }
    let crm = crm(
        &fake,
        &format!("{FAST}{}", webhook_section("https://consent.example.org")),
    );
    let checks = optinsync_conformance::check_crm(&crm, &with_writes()).await;
    let lines: Vec<String> = checks.iter().map(|c| c.line()).collect();
    assert!(checks.iter().all(|c| c.passed()), "{lines:#?}");
    assert!(
        fake.calls("POST /communication-preferences/v3/subscribe") >= 1,
        "the write-back reached the fake"
    );

    fake.fail_next(Fault::Status(503));
    let c = optinsync_conformance::expect_temporary(
        "crm",
        "a 503 is temporary",
        crm.changes(None, 2),
        false,
    )
    .await;
    assert!(c.passed(), "{}", c.line());
    fake.fail_next(Fault::TooManyRequests);
    let c = optinsync_conformance::expect_temporary(
        "crm",
        "a 429 is throttled",
        crm.changes(None, 2),
        true,
    )
    .await;
    assert!(c.passed(), "{}", c.line());
}

/// A delivery signed as HubSpot signs it, for `https://consent.example.org/webhooks/crm`.
fn signed(body: &str) -> WebhookRequest {
    let ts = Utc::now().timestamp_millis();
    let sig = hubspot::signature_v3(
        hubspot::CLIENT_SECRET,
        "POST",
        "https://consent.example.org/webhooks/crm",
        body,
        ts,
    );
    request(
        HttpMethod::Post,
        "",
        vec![
            ("x-hubspot-signature-v3".into(), sig),
            ("x-hubspot-request-timestamp".into(), ts.to_string()),
        ],
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_for_own_write_backs_are_not_input() {
    let fake = start();
    fake.unlimited();
    let a = fake.insert_at(person(1), at("2024-01-01T00:00:00Z"));
    let crm = crm(
        &fake,
        &format!("{FAST}{}", webhook_section("https://consent.example.org")),
    );
    let wb = write_back(
        &[a],
        "person1@example.org",
        "newsletter",
        ConsentState::Withdrawn,
        "k1",
    );
    crm.write_back(&wb).await.unwrap();
    let modified = fake.contact(a).unwrap()["properties"]["lastmodifieddate"]
        .as_str()
        .unwrap()
        .to_owned();
    let ms = at(&modified).timestamp_millis();
    let event = |property: &str, when: i64| {
        format!(
            r#"[{{"eventId":1,"subscriptionType":"contact.propertyChange","objectId":{a},"propertyName":"{property}","propertyValue":"true","occurredAt":{when}}}]"#
        )
    };
    // The per-type opt-out optinsync just wrote: not CRM input.
    assert_eq!(
        crm.webhook(&signed(&event("hs_email_optout_9", ms)))
            .await
            .unwrap(),
        WebhookEvent::Ignored
    );
    // The same property changed later (the person's own act), or another property: input.
    for body in [
        event("hs_email_optout_9", ms + 5_000),
        event("firstname", ms),
    ] {
        assert!(matches!(
            crm.webhook(&signed(&body)).await.unwrap(),
            WebhookEvent::Changed { records } if records.len() == 1
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_list_cursor_restarts_the_scan() {
    let fake = start();
    fake.unlimited();
    let seeded: Vec<u64> = (0..30).map(|i| fake.insert(person(i))).collect();
    let crm = crm(&fake, FAST);
    let first = crm.changes(None, 10).await.unwrap();
    assert_eq!(first.records.len(), 10);
    // A cursor whose `after` HubSpot no longer takes.
    let mut c: Value = serde_json::from_str(&first.next_cursor.clone().unwrap().0).unwrap();
    c["scan"]["after"] = json!("expired-token");
    let mut cursor = Some(Cursor(c.to_string()));
    let p = pass(&crm, &mut cursor, 10).await;
    let mut got = ids(&first.records);
    got.extend(ids(&p.records));
    got.sort();
    // Contacts delivered before the restart and inside the overlap are not repeated.
    assert_eq!(got, seeded, "every contact once, also across the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_records_and_the_daily_limit() {
    let fake = start();
    let a = fake.insert(person(1));
    let crm = crm(&fake, "");
    let wb = write_back(
        &[a],
        "person1@example.org",
        "newsletter",
        ConsentState::Confirmed,
        "k-locked",
    );
    // 423: the record is locked by a concurrent write; retry that record alone.
    fake.fail_next_on(
        "POST /communication-preferences/v3/subscribe",
        Fault::Status(423),
    );
    match crm.write_back(&wb).await.unwrap_err() {
        ConnectorError::Transient {
            scope, retry_after, ..
        } => {
            assert_eq!(scope, optinsync_plugin_api::FailureScope::Record);
            assert_eq!(retry_after, Some(Duration::from_secs(2)));
        }
        other => panic!("unexpected {other:?}"),
    }
    // The retry under the same key goes through.
    crm.write_back(&wb).await.unwrap();
    // The daily limit: wait an hour, never drop.
    fake.with(|s| s.daily_max = s.daily_used);
    match crm.changes(None, 10).await.unwrap_err() {
        ConnectorError::Transient {
            retry_after: Some(wait),
            scope,
            ..
        } => {
            assert_eq!(wait, Duration::from_secs(3600));
            assert_eq!(scope, optinsync_plugin_api::FailureScope::Service);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Edits while a pass pages through search (each moves the contact to the end of the
/// `lastmodifieddate` order, and becomes searchable only after the index lag): after the
/// next passes every contact's latest version has been delivered, none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_during_a_search_pass_are_never_lost() {
    let fake = start();
    fake.unlimited();
    fake.with(|s| s.search_lag = Duration::from_millis(300));
    let crm = crm(&fake, FAST);
    let mut cursor = None;
    pass(&crm, &mut cursor, 100).await;
    let t0 = Utc::now() - chrono::Duration::seconds(5);
    let seeded: Vec<u64> = (0..400)
        .map(|i| {
            fake.insert_at(
                person(i),
                t0 + chrono::Duration::milliseconds(i as i64 * 10),
            )
        })
        .collect();
    let mut latest: BTreeMap<u64, String> = BTreeMap::new();
    let mut delivered: BTreeMap<u64, String> = BTreeMap::new();
    let mut step = 0u64;
    // A pass with small pages; every page, three contacts are edited (some already read,
    // some not yet).
    loop {
        let page = crm.changes(cursor.as_ref(), 20).await.unwrap();
        for r in &page.records {
            delivered.insert(
                r.record.id.parse().unwrap(),
                r.fields["firstname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        cursor = page.next_cursor.or(cursor);
        for k in 0..3 {
            step += 1;
            let id = seeded[((step * 37 + k * 101) % 400) as usize];
            let name = format!("edit-{step}");
            fake.edit(id, json!({"firstname": name}));
            latest.insert(id, name);
        }
        if !page.has_more {
            break;
        }
    }
    // The daemon's next polls, once the index has caught up.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..2 {
        for r in pass(&crm, &mut cursor, 20).await.records {
            delivered.insert(
                r.record.id.parse().unwrap(),
                r.fields["firstname"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    assert_eq!(delivered.len(), 400, "every contact delivered");
    for (id, name) in &latest {
        assert_eq!(
            delivered.get(id),
            Some(name),
            "the latest edit of {id} reached the engine"
        );
    }
}
