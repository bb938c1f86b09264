//! The exec connector against the Python example connectors (`examples/connectors/`), started
//! as the daemon starts them: every method, cursors, idempotency, and a crash mid-batch.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use optinsync_plugin_api::{
    ConnectorError, ConsentState, ConsentWriteBack, Cursor, FailureScope, HttpMethod, Keyed,
    RecordRef, StatusKind, Subscriber, WebhookEvent, WebhookRequest, per_item,
};
use serde_json::{Value, json};

const SECRET: &str = "s3cret-webhook-value";

fn crm_section() -> Value {
    json!({
        "command": example("file_crm.py"),
        "timeout": "10s",
        "settings": {"path": "crm.jsonl", "write_back_path": "writeback.jsonl", "webhook_secret": SECRET},
    })
}

fn campaigns_section(extra: Value) -> Value {
    let mut settings = json!({"path": "lists.json", "events_path": "list-events.jsonl"});
    if let (Some(s), Value::Object(extra)) = (settings.as_object_mut(), extra) {
        s.extend(extra);
    }
    json!({"command": example("file_campaigns.py"), "timeout": "10s", "settings": settings})
}

fn rref(id: &str) -> RecordRef {
    RecordRef {
        module: "Contacts".into(),
        id: id.into(),
    }
}

fn sub(email: &str) -> Subscriber {
    Subscriber {
        email: email.into(),
        language: Some("en".into()),
        fields: BTreeMap::new(),
        proof: None,
    }
}

fn keyed(items: &[(&str, &str)]) -> Vec<Keyed<Subscriber>> {
    items.iter().map(|(k, e)| Keyed::new(*k, sub(e))).collect()
}

/// The members of `list` in the example's lists file, and how often each address appears in
/// the raw file (a duplicate would be a second JSON key).
fn members(dir: &std::path::Path, list: &str) -> (Vec<String>, String) {
    let text = std::fs::read_to_string(dir.join("lists.json")).unwrap_or_default();
    let data: Value = serde_json::from_str(&text).unwrap_or(json!({}));
    let names = data["lists"][list]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    (names, text)
}

#[tokio::test]
async fn crm_pages_with_its_cursor_to_the_end_and_a_new_process_resumes() {
    let dir = base_dir(&["crm.jsonl"]);
    let crm = crm(dir.path(), crm_section()).await;
    let health = crm.health().await.expect("health");
    assert!(health.ok);
    assert_eq!(health.detail, "3 records");

    let (mut ids, mut invalid, mut deleted, mut cursors) = (vec![], vec![], vec![], vec![]);
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = crm.changes(cursor.as_ref(), 2).await.expect("page");
        ids.extend(page.records.iter().map(|r| r.record.id.clone()));
        invalid.extend(page.invalid.iter().map(|i| i.location.clone()));
        deleted.extend(page.deleted.iter().map(|r| r.id.clone()));
        if let Some(ana) = page.records.iter().find(|r| r.record.id == "17") {
            assert_eq!(ana.email.as_deref(), Some("ana@example.org"));
            assert_eq!(ana.asserted_lists, ["newsletter"]);
            assert_eq!(ana.fields.get("First_Name"), Some(&json!("Ana")));
            assert!(ana.modified_at.is_some());
        }
        cursor = page.next_cursor.or(cursor);
        cursors.push(cursor.clone());
        if !page.has_more {
            break;
        }
        assert!(cursors.len() < 10, "paging does not end");
    }
    assert_eq!(ids, ["17", "18", "19", "20"]);
    assert_eq!(invalid, ["line 3"]);
    assert_eq!(deleted, ["18"]);
    assert!(cursors.len() >= 2, "limit 2 takes several pages");

    // A new process resumes from the first page's cursor: only what came after it.
    crm.shutdown().await;
    let again = common::crm(dir.path(), crm_section()).await;
    let page = again
        .changes(cursors[0].as_ref(), 100)
        .await
        .expect("resumed page");
    let rest: Vec<_> = page.records.iter().map(|r| r.record.id.as_str()).collect();
    assert_eq!(rest, ["19", "20"]);
    assert_eq!(page.deleted, [rref("18")]);
    assert!(!page.has_more);
    // At the end: nothing new.
    let end = again.changes(cursor.as_ref(), 100).await.expect("end");
    assert!(end.records.is_empty() && end.deleted.is_empty() && !end.has_more);
    again.shutdown().await;
}

#[tokio::test]
async fn crm_fetches_writes_back_once_per_key_and_checks_webhooks() {
    let dir = base_dir(&["crm.jsonl"]);
    let crm = crm(dir.path(), crm_section()).await;

    let ana = crm
        .fetch(&rref("17"))
        .await
        .expect("fetch")
        .expect("exists");
    assert_eq!(ana.email.as_deref(), Some("ana@example.org"));
    assert_eq!(ana.language.as_deref(), Some("en"));
    assert_eq!(crm.fetch(&rref("18")).await, Ok(None), "deleted");
    assert_eq!(crm.fetch(&rref("99")).await, Ok(None), "never existed");

    let wb = |key: &str| ConsentWriteBack {
        key: key.into(),
        records: vec![rref("17")],
        email: "ana@example.org".into(),
        list: "newsletter".into(),
        state: ConsentState::Confirmed,
        opt_out: false,
        at: "2026-12-01T10:00:00Z".parse().expect("time"),
        ledger_seq: 42,
    };
    crm.write_back(&wb("wb-42")).await.expect("written");
    crm.write_back(&wb("wb-42")).await.expect("re-sent");
    crm.write_back(&wb("wb-43")).await.expect("another");
    let written = std::fs::read_to_string(dir.path().join("writeback.jsonl")).expect("file");
    let keys: Vec<String> = written
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("json")["key"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(keys, ["wb-42", "wb-43"]);
    let first: Value = serde_json::from_str(written.lines().next().unwrap_or("")).expect("json");
    assert_eq!(first["state"], "confirmed");
    assert_eq!(
        first["records"],
        json!([{"module": "Contacts", "id": "17"}])
    );

    assert!(crm.accepts_webhooks());
    let hook = |secret: &str| WebhookRequest {
        method: HttpMethod::Post,
        path: "/webhooks/crm".into(),
        query: String::new(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("x-webhook-secret".into(), secret.into()),
        ],
        body: r#"{"ids": ["17", 20]}"#.into(),
        peer: Some("127.0.0.1".parse().expect("ip")),
    };
    assert_eq!(
        crm.webhook(&hook(SECRET)).await,
        Ok(WebhookEvent::Changed {
            records: vec![rref("17"), rref("20")]
        })
    );
    assert!(matches!(
        crm.webhook(&hook("forged")).await,
        Err(ConnectorError::InvalidInput { .. })
    ));
    let mut get = hook("");
    get.method = HttpMethod::Get;
    assert_eq!(crm.webhook(&get).await, Ok(WebhookEvent::Ignored));
    crm.shutdown().await;
}

#[tokio::test]
async fn campaigns_handshake_batches_partial_failures_and_is_idempotent() {
    let dir = base_dir(&["list-events.jsonl"]);
    let c = campaigns(dir.path(), campaigns_section(json!({"max_batch": 7})), None).await;
    // configure's answer replaces hello's max_batch (50).
    assert_eq!(c.max_batch(), 7);
    assert_eq!(c.status_interval(), None);
    assert!(!c.accepts_webhooks());

    let batch = keyed(&[
        ("k1", "ana@example.org"),
        ("k2", "ben-at-example.org"),
        ("k3", "cy@example.org"),
    ]);
    let results = c.subscribe("L1", &batch).await.expect("batch answered");
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(matches!(results[1], Err(ConnectorError::Permanent { .. })));
    // The same batch again: same outcome, no second membership.
    let again = c.subscribe("L1", &batch).await.expect("batch answered");
    assert_eq!(again, results);
    let (names, raw) = members(dir.path(), "L1");
    assert_eq!(names, ["ana@example.org", "cy@example.org"]);
    assert_eq!(raw.matches("\"ana@example.org\"").count(), 1);

    let page = c.list_members("L1", None).await.expect("members");
    let listed: Vec<_> = page.members.iter().map(|m| m.email.as_str()).collect();
    assert_eq!(listed, ["ana@example.org", "cy@example.org"]);

    let gone = c
        .remove(
            "L1",
            &[
                Keyed::new("r1", "zed@example.org".to_owned()),
                Keyed::new("r2", "ana@example.org".to_owned()),
            ],
        )
        .await
        .expect("removed");
    assert_eq!(gone, vec![Ok(()), Ok(())], "absent is success too");
    assert_eq!(members(dir.path(), "L1").0, ["cy@example.org"]);

    // No request_doi capability: the API default, without asking the process.
    assert_eq!(
        c.request_doi("L1", &Keyed::new("d1", sub("x@example.org")))
            .await,
        Err(ConnectorError::Permanent {
            message: "this campaigns connector cannot run a double opt-in".into()
        })
    );
    c.shutdown().await;
}

#[tokio::test]
async fn campaigns_status_events_follow_the_cursor() {
    let dir = base_dir(&["list-events.jsonl"]);
    let c = campaigns(dir.path(), campaigns_section(json!({})), None).await;
    let page = c.status_events("L1", None).await.expect("events");
    let seen: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.email.as_str(), e.kind))
        .collect();
    assert_eq!(
        seen,
        [
            ("ana@example.org", StatusKind::Unsubscribed),
            ("ben@example.org", StatusKind::Bounced)
        ]
    );
    assert_eq!(page.events[1].detail.as_deref(), Some("550 5.1.1"));
    let cursor = page.next_cursor.expect("a cursor");
    let none = c.status_events("L1", Some(&cursor)).await.expect("events");
    assert!(none.events.is_empty());

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("list-events.jsonl"))
        .expect("events file");
    std::io::Write::write_all(
        &mut f,
        b"{\"list\": \"L1\", \"email\": \"cy@example.org\", \"kind\": \"complained\", \"at\": \"2026-12-02T10:00:00Z\"}\n",
    )
    .expect("appended");
    let next = c.status_events("L1", Some(&cursor)).await.expect("events");
    assert_eq!(next.events.len(), 1);
    assert_eq!(next.events[0].kind, StatusKind::Complained);
    c.shutdown().await;
}

#[tokio::test]
async fn an_outage_reported_by_the_connector_is_transient_with_its_wait() {
    let dir = base_dir(&[]);
    let c = campaigns(
        dir.path(),
        campaigns_section(json!({"fail_first_calls": 1})),
        None,
    )
    .await;
    let batch = keyed(&[("k1", "ana@example.org")]);
    match c.subscribe("L1", &batch).await {
        Err(ConnectorError::Transient {
            retry_after, scope, ..
        }) => {
            assert_eq!(retry_after, Some(Duration::from_millis(100)));
            assert_eq!(scope, FailureScope::Service);
        }
        other => panic!("expected a transient failure, got {other:?}"),
    }
    assert_eq!(members(dir.path(), "L1").0, Vec::<String>::new());
    assert_eq!(c.subscribe("L1", &batch).await, Ok(vec![Ok(())]));
    assert_eq!(members(dir.path(), "L1").0, ["ana@example.org"]);
    c.shutdown().await;
}

#[tokio::test]
async fn a_crash_mid_batch_fails_every_item_and_the_resent_batch_lands_once() {
    let dir = base_dir(&[]);
    let section = campaigns_section(json!({"crash_after_items": 3}));
    let saved = json!({"version": 1, "write_calls": 10}).to_string();
    let c = campaigns(dir.path(), section, Some(saved)).await;

    assert_eq!(
        c.subscribe("L1", &keyed(&[("k0", "zoe@example.org")]))
            .await,
        Ok(vec![Ok(())])
    );
    // The saved state reached the first process, and counts on.
    let state = c.export_state().await.expect("state capability");
    assert_eq!(
        serde_json::from_str::<Value>(&state).ok(),
        Some(json!({"version": 1, "write_calls": 11}))
    );

    let batch = keyed(&[
        ("k1", "ana@example.org"),
        ("k2", "ben@example.org"),
        ("k3", "cy@example.org"),
    ]);
    // Item 3 of the process is the batch's second: it exits with status 3 without answering.
    let crashed = c.subscribe("L1", &batch).await;
    let outcome = per_item(batch.len(), crashed.clone());
    assert!(
        outcome.iter().all(|r| matches!(
            r,
            Err(ConnectorError::Transient {
                scope: FailureScope::Service,
                ..
            })
        )),
        "{outcome:?}"
    );
    let message = crashed.expect_err("whole call failed").to_string();
    assert!(
        message.contains("connector process exited: status 3"),
        "{message}"
    );
    assert!(message.contains("`campaigns`"), "{message}");
    assert!(dir.path().join("lists.json.crashed").exists());

    // During the backoff: transient, with the remaining wait.
    match c.health().await {
        Err(ConnectorError::Transient {
            retry_after: Some(wait),
            ..
        }) => {
            assert!(wait <= Duration::from_secs(1), "{wait:?}")
        }
        other => panic!("expected the backoff, got {other:?}"),
    }

    let resent = retrying(|| c.subscribe("L1", &batch)).await;
    assert_eq!(resent, Ok(vec![Ok(()), Ok(()), Ok(())]));
    let (names, raw) = members(dir.path(), "L1");
    assert_eq!(
        names,
        [
            "ana@example.org",
            "ben@example.org",
            "cy@example.org",
            "zoe@example.org"
        ]
    );
    for email in &names {
        assert_eq!(raw.matches(&format!("\"{email}\"")).count(), 1, "{email}");
    }
    // The restarted process got the last exported state (11), not the lost count of the
    // crashed one, nor nothing.
    let state = c.export_state().await.expect("state");
    assert_eq!(
        serde_json::from_str::<Value>(&state).ok(),
        Some(json!({"version": 1, "write_calls": 12}))
    );
    c.shutdown().await;
}
