//! The Zoho CRM connector against the fake Zoho server (`optinsync_testkit::zoho`), over
//! real HTTP on loopback.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use optinsync_plugin_api::{
    ChangePage, Connector as _, ConnectorError, ConsentState, ConsentWriteBack, CrmConnector,
    CrmRecord, Cursor, InvalidRecord, RecordRef, WebhookEvent,
};
use optinsync_plugin_zoho::ZohoCrm;
use optinsync_testkit::zoho::{self, FakeZoho, Fault};
use serde_json::json;

fn config(fake: &FakeZoho, extra: &str) -> toml::Table {
    toml::from_str(&format!(
        r#"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
modules = ["Contacts"]
fields = ["First_Name", "Last_Name"]
{extra}
[asserts]
newsletter = "Newsletter"
"#,
        zoho::CLIENT_ID,
        zoho::CLIENT_SECRET,
        zoho::REFRESH_TOKEN,
        url = fake.url(),
    ))
    .unwrap()
}

fn crm(fake: &FakeZoho, extra: &str) -> ZohoCrm {
    ZohoCrm::from_config(config(fake, extra), Path::new(".")).unwrap()
}

#[derive(Debug, Default)]
struct Pass {
    records: Vec<CrmRecord>,
    invalid: Vec<InvalidRecord>,
    deleted: Vec<RecordRef>,
    pages: usize,
}

/// Pull until the round is complete, as `Engine::pull_crm` does.
async fn pass(crm: &ZohoCrm, cursor: &mut Option<Cursor>) -> Pass {
    let mut out = Pass::default();
    loop {
        let page: ChangePage = crm.changes(cursor.as_ref(), 200).await.unwrap();
        out.pages += 1;
        out.records.extend(page.records);
        out.invalid.extend(page.invalid);
        out.deleted.extend(page.deleted);
        if page.next_cursor.is_some() {
            *cursor = page.next_cursor;
        }
        if !page.has_more {
            return out;
        }
        assert!(out.pages < 1000, "no end to the pass");
    }
}

fn ids(records: &[CrmRecord]) -> Vec<String> {
    records.iter().map(|r| r.record.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sync_of_5000_contacts_gets_each_exactly_once() {
    let fake = FakeZoho::start();
    let seeded = fake.seed("Contacts", 5000);
    let crm = crm(&fake, "");
    let mut cursor = None;
    let started = Instant::now();
    let p = pass(&crm, &mut cursor).await;
    let took = started.elapsed();
    eprintln!(
        "first sync of 5000 contacts against the fake: {took:?} in {} pages",
        p.pages
    );
    let got = ids(&p.records);
    assert_eq!(got.len(), 5000, "every record exactly once");
    let unique: BTreeSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), 5000);
    assert_eq!(unique, seeded.iter().collect());
    assert!(p.invalid.is_empty() && p.deleted.is_empty());
    assert!(p.records.iter().all(|r| r.asserted_lists == ["newsletter"]));
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.query.contains("page_token=")),
        "went on with page_token"
    );
    assert!(
        requests.iter().all(|r| r.status < 400),
        "no request refused: {:?}",
        requests.iter().find(|r| r.status >= 400)
    );
    assert_eq!(fake.token_requests(), 1, "one token for the whole sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_pass_after_10_edits_fetches_only_those() {
    let fake = FakeZoho::start();
    let seeded = fake.seed("Contacts", 600);
    let crm = crm(&fake, "");
    let mut cursor = None;
    assert_eq!(pass(&crm, &mut cursor).await.records.len(), 600);

    let edited: Vec<String> = seeded.iter().step_by(60).take(10).cloned().collect();
    for id in &edited {
        fake.edit("Contacts", id, json!({"First_Name": "Edited"}));
    }
    let before = fake.requests().len();
    let p = pass(&crm, &mut cursor).await;
    let mut got = ids(&p.records);
    got.sort();
    let mut want = edited.clone();
    want.sort();
    assert_eq!(got, want);
    assert!(
        p.records
            .iter()
            .all(|r| r.fields["First_Name"] == json!("Edited"))
    );
    let list_calls: Vec<_> = fake.requests()[before..]
        .iter()
        .filter(|r| r.path == "/crm/v8/Contacts")
        .cloned()
        .collect();
    assert!(
        list_calls.iter().all(|r| r.if_modified_since.is_some()),
        "incremental passes use If-Modified-Since: {list_calls:?}"
    );
    // The 10 edits, plus the few records inside the overlap margin (re-read, not delivered).
    let returned: usize = list_calls.iter().map(|r| r.returned).sum();
    assert!((10..=12).contains(&returned), "{returned}");

    // Nothing new: 304, no records; the overlap does not deliver the 10 again.
    let again = pass(&crm, &mut cursor).await;
    assert!(again.records.is_empty(), "{:?}", ids(&again.records));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_during_a_sync_is_not_lost() {
    let fake = FakeZoho::start();
    let seeded = fake.seed("Contacts", 1000);
    let crm = crm(&fake, "");
    let mut cursor: Option<Cursor> = None;
    let mut seen: HashMap<String, Vec<CrmRecord>> = HashMap::new();
    let mut pages = 0;
    loop {
        let page = crm.changes(cursor.as_ref(), 200).await.unwrap();
        pages += 1;
        for r in page.records {
            seen.entry(r.record.id.clone()).or_default().push(r);
        }
        cursor = page.next_cursor.or(cursor);
        if pages == 2 {
            // One record already delivered and one not yet: both edited while the sync runs.
            fake.edit("Contacts", &seeded[10], json!({"Email_Opt_Out": true}));
            fake.edit("Contacts", &seeded[900], json!({"Email_Opt_Out": true}));
        }
        if !page.has_more {
            break;
        }
    }
    // The next pass (the daemon's next poll) reads whatever the first one could not.
    for r in pass(&crm, &mut cursor).await.records {
        seen.entry(r.record.id.clone()).or_default().push(r);
    }
    assert_eq!(seen.len(), 1000, "every record seen");
    for id in [&seeded[10], &seeded[900]] {
        let last = seen[id].last().unwrap();
        assert!(last.opted_out, "the edit of {id} reached the engine");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_record_is_reported() {
    let fake = FakeZoho::start();
    let seeded = fake.seed("Contacts", 20);
    let crm = crm(&fake, "");
    let mut cursor = None;
    assert!(pass(&crm, &mut cursor).await.deleted.is_empty());
    fake.delete("Contacts", &seeded[3]);
    let p = pass(&crm, &mut cursor).await;
    assert_eq!(
        p.deleted,
        [RecordRef {
            module: "Contacts".into(),
            id: seeded[3].clone()
        }]
    );
    assert!(p.records.is_empty());
    assert!(
        pass(&crm, &mut cursor).await.deleted.is_empty(),
        "reported once"
    );
    assert!(
        crm.fetch(&RecordRef {
            module: "Contacts".into(),
            id: seeded[3].clone()
        })
        .await
        .unwrap()
        .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_sync_is_transparent() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 1000);
    let crm = crm(&fake, "");
    let first = crm.changes(None, 200).await.unwrap();
    assert_eq!(first.records.len(), 200);
    fake.expire_tokens();
    let mut cursor = first.next_cursor;
    let rest = pass(&crm, &mut cursor).await;
    assert_eq!(rest.records.len(), 800);
    assert_eq!(fake.token_requests(), 2, "one refresh after INVALID_TOKEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_refreshed_before_expiry() {
    let fake = FakeZoho::start();
    fake.with(|s| s.token_ttl = Duration::from_secs(2));
    fake.seed("Contacts", 5);
    let crm = crm(&fake, "");
    crm.health().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = pass(&crm, &mut None).await;
    assert_eq!(p.records.len(), 5);
    assert_eq!(fake.token_requests(), 2, "refreshed ahead of expiry");
    assert!(
        fake.requests().iter().all(|r| r.status != 401),
        "never sent an expired token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_refresh_token_is_a_config_error_naming_the_setting() {
    let fake = FakeZoho::start();
    fake.with(|s| s.refresh_token = "1000.another.token".into());
    let crm = crm(&fake, "");
    for err in [
        crm.changes(None, 200).await.unwrap_err(),
        crm.health().await.unwrap_err(),
    ] {
        match err {
            ConnectorError::Config { setting, message } => {
                assert_eq!(setting, "connectors.crm.refresh_token");
                assert!(message.contains("invalid_code"), "{message}");
                assert!(!message.contains('\n'));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let wrong_secret = {
        let fake2 = FakeZoho::start();
        fake2.with(|s| s.client_secret = "other".into());
        crm_err(&fake2).await
    };
    assert!(
        matches!(&wrong_secret, ConnectorError::Config { setting, .. } if setting == "connectors.crm.client_secret"),
        "{wrong_secret:?}"
    );
}

async fn crm_err(fake: &FakeZoho) -> ConnectorError {
    crm(fake, "").changes(None, 10).await.unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_stay_within_zohos_limit() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 1);
    let crm = crm(&fake, "");
    let mut last = None;
    for _ in 0..12 {
        fake.expire_tokens();
        last = Some(
            crm.fetch(&RecordRef {
                module: "Contacts".into(),
                id: "1".into(),
            })
            .await,
        );
        if matches!(last, Some(Err(_))) {
            break;
        }
    }
    match last {
        Some(Err(ConnectorError::Transient {
            retry_after: Some(wait),
            ..
        })) => assert!(wait <= Duration::from_secs(600), "{wait:?}"),
        other => panic!("expected the local limit to stop token requests, got {other:?}"),
    }
    assert!(
        fake.token_requests() <= 10,
        "sent {} token requests",
        fake.token_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_and_server_errors_are_transient() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 3);
    let crm = crm(&fake, "");
    fake.fail_next(Fault::TooManyRequests {
        retry_after: Some(30),
    });
    match crm.changes(None, 200).await.unwrap_err() {
        ConnectorError::Transient { retry_after, .. } => {
            assert_eq!(retry_after, Some(Duration::from_secs(30)))
        }
        other => panic!("unexpected {other:?}"),
    }
    fake.fail_next(Fault::TooManyRequests { retry_after: None });
    assert!(matches!(
        crm.changes(None, 200).await.unwrap_err(),
        ConnectorError::Transient {
            retry_after: None,
            ..
        }
    ));
    fake.fail_next(Fault::Status(503));
    assert!(matches!(
        crm.changes(None, 200).await.unwrap_err(),
        ConnectorError::Transient { .. }
    ));
    // After the faults, the same cursor (none) works.
    assert_eq!(pass(&crm, &mut None).await.records.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_transient() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 1);
    let crm = crm(&fake, "timeout = \"1s\"");
    crm.health().await.unwrap();
    fake.fail_next(Fault::Delay(Duration::from_secs(3)));
    let err = crm.changes(None, 200).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Transient { message, .. } if message.contains("timed out")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_json_is_an_error_not_a_panic() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 3);
    let crm = crm(&fake, "");
    fake.fail_next(Fault::Garbage);
    let err = crm.changes(None, 200).await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Transient { message, .. } if message.contains("not JSON")),
        "{err:?}"
    );
    assert_eq!(pass(&crm, &mut None).await.records.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_invalid_and_the_page_goes_on() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 3);
    let t = chrono::DateTime::parse_from_rfc3339("2024-01-01T00:01:30Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    fake.insert_raw("Contacts", json!({"Email": "noid@example.org"}), t);
    fake.insert_raw(
        "Contacts",
        json!({"id": "777", "Email": ["not", "text"], "Modified_Time": "2024-01-01T00:01:30+00:00"}),
        t,
    );
    fake.insert_raw("Contacts", json!(42), t);
    let crm = crm(&fake, "");
    let p = pass(&crm, &mut None).await;
    assert_eq!(p.records.len(), 3);
    assert_eq!(p.invalid.len(), 3, "{:?}", p.invalid);
    assert!(p.invalid.iter().any(|i| i.location == "Contacts/777"));
    assert!(p.invalid.iter().any(|i| i.reason == "missing id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_in_batches_of_100_with_partial_success() {
    let fake = FakeZoho::start();
    let seeded = fake.seed("Contacts", 250);
    fake.with(|s| {
        s.reject_updates.insert(seeded[120].clone());
    });
    let crm = crm(&fake, "");
    let mut cursor = None;
    pass(&crm, &mut cursor).await;

    let wb = ConsentWriteBack {
        key: "outbox-9".into(),
        records: seeded
            .iter()
            .map(|id| RecordRef {
                module: "Contacts".into(),
                id: id.clone(),
            })
            .collect(),
        email: "person0@example.org".into(),
        list: "newsletter".into(),
        state: ConsentState::Confirmed,
        opt_out: false,
        at: chrono::Utc::now(),
        ledger_seq: 9,
    };
    let err = crm.write_back(&wb).await.unwrap_err();
    match &err {
        ConnectorError::Permanent { message } => {
            assert!(message.contains(&seeded[120]), "{message}");
            assert!(message.contains("INVALID_DATA"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let updates = fake.updates();
    let sizes: Vec<usize> = updates
        .iter()
        .map(|u| u["body"]["data"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
    assert!(updates.iter().all(|u| u["body"]["trigger"] == json!([])));
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.method == "PUT" && r.status == 207)
    );
    let written = fake.record("Contacts", &seeded[0]).unwrap();
    let consent = &written["Data_Processing_Basis_Details"];
    assert_eq!(consent["Data_Processing_Basis"], json!("Obtained"));
    assert_eq!(consent["Contact_Through_Email"], json!(true));
    assert!(
        consent["Consent_Remarks"]
            .as_str()
            .unwrap()
            .starts_with("DOI confirmed ")
    );
    assert_eq!(
        written["Email_Opt_Out"],
        json!(false),
        "never cleared nor set on confirm"
    );

    // The next incremental pass does not take optinsync's own write for CRM input.
    let p = pass(&crm, &mut cursor).await;
    assert!(p.records.is_empty(), "echoed: {:?}", ids(&p.records).len());
    // A person's opt-out afterwards is input again, even within the same second.
    fake.edit("Contacts", &seeded[5], json!({"Email_Opt_Out": true}));
    let p = pass(&crm, &mut cursor).await;
    assert_eq!(ids(&p.records), [seeded[5].clone()]);

    // Opt-out write-back sets the flag.
    let out = ConsentWriteBack {
        records: vec![RecordRef {
            module: "Contacts".into(),
            id: seeded[7].clone(),
        }],
        state: ConsentState::Withdrawn,
        opt_out: true,
        ..wb
    };
    crm.write_back(&out).await.unwrap();
    let written = fake.record("Contacts", &seeded[7]).unwrap();
    assert_eq!(written["Email_Opt_Out"], json!(true));
    assert_eq!(
        written["Data_Processing_Basis_Details"]["Contact_Through_Email"],
        json!(false)
    );
}

const WEBHOOK: &str = r#"
[webhook]
token = "s3cret-channel-token"
notify_url = "http://127.0.0.1:9/webhooks/crm"
channel_id = 1000000068001
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_token_is_verified() {
    let fake = FakeZoho::start();
    let crm = crm(&fake, WEBHOOK);
    let body = |token: &str, channel: &str, op: &str| {
        format!(
            r#"{{"server_time":1,"query_params":{{}},"module":"Contacts","resource_uri":"x","ids":["41","42"],
               "affected_fields":[],"operation":"{op}","channel_id":{channel},"token":"{token}"}}"#
        )
    };
    let ok = crm
        .parse_webhook(
            &[],
            body("s3cret-channel-token", "1000000068001", "update").as_bytes(),
        )
        .unwrap();
    assert_eq!(
        ok,
        WebhookEvent::Changed {
            records: vec![
                RecordRef {
                    module: "Contacts".into(),
                    id: "41".into()
                },
                RecordRef {
                    module: "Contacts".into(),
                    id: "42".into()
                },
            ]
        }
    );
    for bad in [
        body("s3cret-channel-tokeN", "1000000068001", "update"),
        body("", "1000000068001", "update"),
        body("s3cret-channel-token", "99", "update"),
        "not json".to_owned(),
        r#"{"token":"s3cret-channel-token","channel_id":1000000068001,"module":"Deals","ids":["1"]}"#
            .to_owned(),
        r#"{"token":"s3cret-channel-token","channel_id":1000000068001,"module":"Contacts","ids":["1/../2"]}"#
            .to_owned(),
    ] {
        let err = crm.parse_webhook(&[], bad.as_bytes()).unwrap_err();
        assert!(
            matches!(err, ConnectorError::InvalidInput { .. }),
            "{bad}: {err:?}"
        );
    }
    assert_eq!(
        crm.parse_webhook(
            &[],
            body("s3cret-channel-token", "1000000068001", "delete").as_bytes()
        )
        .unwrap(),
        WebhookEvent::Ignored
    );
    // Without a [webhook] section, every callback is refused.
    let plain = crm_plain(&fake);
    assert!(
        plain
            .parse_webhook(
                &[],
                body("s3cret-channel-token", "1000000068001", "update").as_bytes()
            )
            .is_err()
    );
}

fn crm_plain(fake: &FakeZoho) -> ZohoCrm {
    crm(fake, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_registers_the_channel_once_until_renewal() {
    let fake = FakeZoho::start();
    let crm = crm(&fake, WEBHOOK);
    crm.maintain().await.unwrap();
    crm.maintain().await.unwrap();
    let channels = fake.channels();
    assert_eq!(channels.len(), 1);
    assert_eq!(channels[0]["token"], json!("s3cret-channel-token"));
    assert_eq!(channels[0]["events"], json!(["Contacts.all"]));
    let calls = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/crm/v8/actions/watch")
        .count();
    assert_eq!(calls, 1, "not renewed before half its lifetime");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_and_health() {
    let fake = FakeZoho::start();
    let ids = fake.seed("Contacts", 2);
    let crm = crm(&fake, "");
    let rec = crm
        .fetch(&RecordRef {
            module: "Contacts".into(),
            id: ids[1].clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.email.as_deref(), Some("person1@example.org"));
    assert!(
        crm.fetch(&RecordRef {
            module: "Leads".into(),
            id: ids[1].clone(),
        })
        .await
        .unwrap()
        .is_none(),
        "module not synced"
    );
    let health = crm.health().await.unwrap();
    assert!(health.ok, "{}", health.detail);
    assert!(health.detail.contains("Contacts"), "{}", health.detail);

    let unknown = ZohoCrm::from_config(
        config(&fake, "")
            .into_iter()
            .map(|(k, v)| {
                if k == "modules" {
                    (k, toml::Value::Array(vec!["Dealz".into()]))
                } else {
                    (k, v)
                }
            })
            .collect(),
        Path::new("."),
    )
    .unwrap();
    match unknown.health().await.unwrap_err() {
        ConnectorError::Config { setting, .. } => assert_eq!(setting, "connectors.crm.modules"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leads_and_contacts_both_sync_and_204_counts_as_empty() {
    let fake = FakeZoho::start();
    fake.with(|s| s.not_modified_status = 204);
    fake.insert(
        "Leads",
        json!({"Email": "lead@example.org", "Newsletter": "yes"}),
    );
    fake.insert(
        "Contacts",
        json!({"Email": "c@example.org", "Newsletter": false}),
    );
    let mut table = config(&fake, "");
    table.insert(
        "modules".into(),
        toml::Value::Array(vec!["Contacts".into(), "Leads".into()]),
    );
    let crm = ZohoCrm::from_config(table, Path::new(".")).unwrap();
    let mut cursor = None;
    let p = pass(&crm, &mut cursor).await;
    let mut got: Vec<String> = p.records.iter().map(|r| r.record.to_string()).collect();
    got.sort();
    assert_eq!(got.len(), 2);
    assert!(got[0].starts_with("Contacts/") && got[1].starts_with("Leads/"));
    let lead = p
        .records
        .iter()
        .find(|r| r.record.module == "Leads")
        .unwrap();
    assert_eq!(lead.asserted_lists, ["newsletter"]);
    let again = pass(&crm, &mut cursor).await;
    assert!(again.records.is_empty());
}

/// `examples/zoho.toml`'s CRM section is accepted as written (secrets filled in as the engine
/// would from the environment).
#[test]
fn example_config_crm_section_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/zoho.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let mut crm = doc["connectors"]["crm"].as_table().unwrap().clone();
    assert_eq!(crm.remove("kind").unwrap().as_str(), Some("zoho-crm"));
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
    ZohoCrm::from_config(crm, Path::new(".")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_that_every_mapped_field_exists() {
    let fake = FakeZoho::start();
    let mut names = std::collections::BTreeMap::new();
    names.insert(
        "Contacts".to_owned(),
        [
            "Email",
            "Email_Opt_Out",
            "Modified_Time",
            "First_Name",
            "Last_Name",
            "Newsletter",
        ]
        .map(String::from)
        .to_vec(),
    );
    // Without the field-metadata scope the check is skipped, and said so.
    let skipped = crm(&fake, "").health().await.unwrap();
    assert!(
        skipped.ok && skipped.detail.contains("not checked"),
        "{}",
        skipped.detail
    );

    fake.with(|s| s.field_names = Some(names.clone()));
    let ok = crm(&fake, "").health().await.unwrap();
    assert!(
        ok.ok && ok.detail.contains("mapped fields present"),
        "{}",
        ok.detail
    );

    // A typo in a mapped field is a configuration error naming the field, before any sync.
    let err = crm(&fake, "language_field = \"Langauge\"")
        .health()
        .await
        .unwrap_err();
    match err {
        ConnectorError::Config { message, .. } => {
            assert!(message.contains("Langauge"), "{message}")
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// The conformance kit (`optinsync_conformance`) with its writes: every check passes or is
/// skipped with a reason.
fn assert_conformant(checks: &[optinsync_conformance::Check]) {
    let lines: Vec<String> = checks.iter().map(|c| c.line()).collect();
    assert!(
        checks
            .iter()
            .all(|c| !matches!(c.outcome, optinsync_conformance::Outcome::Fail(_))),
        "{lines:#?}"
    );
}

fn with_writes() -> optinsync_conformance::Options {
    optinsync_conformance::Options {
        write: true,
        ..optinsync_conformance::Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zoho_crm_keeps_the_contract() {
    let fake = FakeZoho::start();
    fake.seed("Contacts", 7);
    let crm = crm(&fake, WEBHOOK);
    let checks = optinsync_conformance::check_crm(&crm, &with_writes()).await;
    assert_conformant(&checks);
    // Every check ran: paging, resume, fetch, webhook and write-back all apply to Zoho CRM.
    assert!(
        checks.iter().all(|c| c.passed()),
        "{:#?}",
        checks.iter().map(|c| c.line()).collect::<Vec<_>>()
    );
    assert!(
        !fake.updates().is_empty(),
        "the write-back reached the fake"
    );

    // Temporary and throttled: a 5xx and a 429 with Retry-After.
    fake.fail_next(Fault::Status(503));
    let c = optinsync_conformance::expect_temporary(
        "crm",
        "a 503 is temporary",
        crm.changes(None, 2),
        false,
    )
    .await;
    assert!(c.passed(), "{}", c.line());
    fake.fail_next(Fault::TooManyRequests {
        retry_after: Some(3),
    });
    let c = optinsync_conformance::expect_temporary(
        "crm",
        "a 429 is throttled",
        crm.changes(None, 2),
        true,
    )
    .await;
    assert!(c.passed(), "{}", c.line());
}

/// A website signup's person: created by `upsert` into `signup_module` with the consent
/// fields, then updated (not duplicated) by a second upsert with the same address; without
/// `signup_module` the connector creates nothing and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signup_upsert_creates_then_updates_by_address() {
    let fake = FakeZoho::start();
    let existing = fake.insert(
        "Contacts",
        json!({"Email": "Known@Example.org", "Last_Name": "Known", "Newsletter": false}),
    );
    let crm = crm(&fake, "signup_module = \"Contacts\"");
    assert!(crm.creates_records());
    let at = chrono::Utc::now();
    let person = optinsync_plugin_api::NewContact {
        key: "crm-upsert:1".into(),
        email: "new.person@example.org".into(),
        name: Some("Ana María Pérez".into()),
        language: Some("es".into()),
        list: "newsletter".into(),
        state: ConsentState::Pending,
        at,
    };
    let created = crm.upsert_contact(&person).await.unwrap();
    assert_eq!(created.module, "Contacts");
    assert_ne!(created.id, existing);
    let record = fake.record("Contacts", &created.id).unwrap();
    assert_eq!(record["Email"], "new.person@example.org");
    assert_eq!(record["First_Name"], "Ana María");
    assert_eq!(record["Last_Name"], "Pérez");
    let consent = &record["Data_Processing_Basis_Details"];
    assert_eq!(consent["Contact_Through_Email"], json!(false));
    assert!(
        consent["Consent_Remarks"]
            .as_str()
            .unwrap()
            .contains("pending"),
        "{consent}"
    );
    let call = &fake.upserts()[0]["body"];
    assert_eq!(call["duplicate_check_fields"], json!(["Email"]));
    assert_eq!(call["trigger"], json!([]));

    // The same person again (a retry, or a later signup): the same record, updated.
    let again = crm.upsert_contact(&person).await.unwrap();
    assert_eq!(again, created);
    // An address the CRM already holds (another spelling): that record, not a new one.
    let known = crm
        .upsert_contact(&optinsync_plugin_api::NewContact {
            email: "known@example.org".into(),
            name: None,
            ..person.clone()
        })
        .await
        .unwrap();
    assert_eq!(known.id, existing);
    assert_eq!(fake.with(|s| s.modules["Contacts"].len()), 2);

    let plain = self::crm(&fake, "");
    assert!(!plain.creates_records());
    assert!(plain.upsert_contact(&person).await.is_err());
}
