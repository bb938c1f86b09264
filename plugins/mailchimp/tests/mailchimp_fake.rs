//! The Mailchimp connector against the fake Mailchimp (`optinsync_testkit::mailchimp`,
//! written from Mailchimp's Marketing API documentation), over real HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone as _, Utc};
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, ConsentProof, Cursor, HttpMethod, Keyed, Settings,
    StatusKind, Subscriber, WebhookEvent, WebhookRequest, per_item,
};
use optinsync_plugin_mailchimp::{Mailchimp, MailchimpConfig};
use optinsync_testkit::mailchimp::{
    API_KEY, FakeMailchimp, Fault, MailchimpOptions, MergeField, SeedMember, Status,
};
use serde_json::{Value, json};

const AUD: &str = "a1b2c3d4e5";
const DOI_AUD: &str = "f6e5d4c3b2";
const SECRET: &str = "0123456789abcdef-webhook-secret";

fn fake_with(options: MailchimpOptions) -> FakeMailchimp {
    let fake = FakeMailchimp::start_with(options);
    fake.add_list(AUD, "Newsletter");
    fake.add_merge_field(AUD, MergeField::text("FNAME", false));
    fake.add_list(DOI_AUD, "Events");
    fake
}

fn fake() -> FakeMailchimp {
    fake_with(MailchimpOptions::default())
}

fn settings(fake: &FakeMailchimp, extra: Value) -> Value {
    let mut s = json!({
        "api_key": API_KEY,
        "api_url": fake.api_root(),
        "lists": {
            "newsletter": {"audience": AUD, "merge_fields": {"FNAME": "First_Name"}},
            "events": {"audience": DOI_AUD, "doi": "mailchimp"},
        },
        "timeout": "10s",
    });
    if let (Value::Object(s), Value::Object(extra)) = (&mut s, extra) {
        for (k, v) in extra {
            s.insert(k, v);
        }
    }
    s
}

fn parse(v: Value) -> Result<MailchimpConfig, optinsync_plugin_api::SettingsError> {
    match v {
        Value::Object(m) => Settings::new(m).parse(),
        _ => unreachable!("a table"),
    }
}

fn build(v: Value) -> Mailchimp {
    Mailchimp::new(parse(v).expect("settings parse"), "optinsync-test").expect("connector")
}

fn connector(fake: &FakeMailchimp) -> Mailchimp {
    build(settings(fake, json!({})))
}

fn sub(email: &str) -> Subscriber {
    Subscriber {
        email: email.into(),
        language: None,
        fields: BTreeMap::new(),
        proof: None,
    }
}

fn keyed(email: &str) -> Keyed<Subscriber> {
    Keyed::new(format!("k-{email}"), sub(email))
}

async fn subscribe(c: &Mailchimp, list: &str, emails: &[&str]) -> Vec<Result<(), ConnectorError>> {
    let items: Vec<_> = emails.iter().map(|e| keyed(e)).collect();
    per_item(items.len(), c.subscribe(list, &items).await)
}

async fn remove(c: &Mailchimp, emails: &[&str]) -> Vec<Result<(), ConnectorError>> {
    let items: Vec<_> = emails
        .iter()
        .map(|e| Keyed::new(format!("rm-{e}"), (*e).to_owned()))
        .collect();
    per_item(items.len(), c.remove("newsletter", &items).await)
}

fn status_of(fake: &FakeMailchimp, list: &str, email: &str) -> Option<Status> {
    fake.member(list, email).map(|m| m.status)
}

#[tokio::test]
async fn start_up_check_names_a_missing_audience_and_lists_the_visible_ones() {
    let fake = fake();
    let good = connector(&fake);
    let h = optinsync_plugin_api::Connector::health(&good)
        .await
        .expect("healthy");
    assert!(h.ok && h.detail.contains("Newsletter"), "{}", h.detail);

    let bad = build(settings(
        &fake,
        json!({"lists": {"newsletter": {"audience": "nope0000"}}}),
    ));
    match optinsync_plugin_api::Connector::health(&bad).await {
        Err(ConnectorError::Config { setting, message }) => {
            assert_eq!(setting, "connectors.campaigns.lists.newsletter.audience");
            assert!(
                message.contains(AUD) && message.contains("Newsletter"),
                "{message}"
            );
            assert!(
                message.contains(DOI_AUD) && message.contains("Events"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }

    // A merge tag the audience does not have is named too.
    let tags = build(settings(
        &fake,
        json!({"lists": {"newsletter": {"audience": AUD, "merge_fields": {"NICK": "Nick"}}}}),
    ));
    match optinsync_plugin_api::Connector::health(&tags).await {
        Err(ConnectorError::Config { setting, .. }) => {
            assert_eq!(
                setting,
                "connectors.campaigns.lists.newsletter.merge_fields.NICK"
            );
        }
        other => panic!("{other:?}"),
    }

    // Settings are strict and name the key.
    let unknown = parse(settings(
        &fake,
        json!({"lists": {"n": {"audience": AUD, "dio": "x"}}}),
    ))
    .expect_err("unknown key");
    assert_eq!(unknown.key.as_deref(), Some("lists.n.dio"));
    let no_dc = Mailchimp::new(
        parse(json!({"api_key": "abc", "lists": {"n": {"audience": AUD}}})).expect("parses"),
        "",
    )
    .expect_err("no data centre");
    assert_eq!(no_dc.key.as_deref(), Some("api_key"));
    let too_many = Mailchimp::new(
        parse(settings(&fake, json!({"max_concurrency": 11}))).expect("parses"),
        "",
    )
    .expect_err("over the cap");
    assert_eq!(too_many.key.as_deref(), Some("max_concurrency"));
    let shared = Mailchimp::new(
        parse(settings(
            &fake,
            json!({"lists": {"a": {"audience": AUD}, "b": {"audience": AUD}}}),
        ))
        .expect("parses"),
        "",
    )
    .expect_err("one audience, two lists");
    assert_eq!(shared.key.as_deref(), Some("lists.b.audience"));
    // The base URL comes from the key's data centre.
    let derived = Mailchimp::new(
        parse(json!({"api_key": "k-us21", "lists": {"n": {"audience": AUD}}})).expect("parses"),
        "",
    )
    .expect("builds");
    assert_eq!(derived.base_url(), "https://us21.api.mailchimp.com/3.0");
}

#[tokio::test]
async fn subscribe_is_an_idempotent_upsert_with_fields_and_proof() {
    let fake = fake();
    let c = connector(&fake);
    let mut s = sub("Ann@Example.org");
    s.fields.insert("First_Name".into(), json!("Ann"));
    s.fields.insert("Unmapped".into(), json!("x"));
    s.proof = Some(ConsentProof {
        confirmed_at: Utc.with_ymd_and_hms(2026, 5, 1, 10, 5, 12).unwrap(),
        confirmed_ip: Some("198.51.100.23".into()),
        requested_at: Some(Utc.with_ymd_and_hms(2026, 5, 1, 10, 0, 0).unwrap()),
    });
    let item = Keyed::new("k1", s);
    for _ in 0..2 {
        let r = per_item(
            1,
            c.subscribe("newsletter", std::slice::from_ref(&item)).await,
        );
        assert_eq!(r, vec![Ok(())]);
    }
    let m = fake.member(AUD, "ann@example.org").expect("member");
    assert_eq!(m.status, Status::Subscribed);
    assert_eq!(m.merge_fields.get("FNAME"), Some(&json!("Ann")));
    assert_eq!(m.ip_opt, "198.51.100.23");
    assert_eq!(m.timestamp_opt, "2026-05-01T10:05:12+00:00");
    assert_eq!(m.timestamp_signup, "2026-05-01T10:00:00+00:00");
    assert_eq!(m.ip_signup, "");
    assert_eq!(fake.members(AUD).len(), 1);
    assert_eq!(fake.confirmation_mails(AUD).len(), 0);
    // A doi = "mailchimp" list never gets `subscribed`.
    match c.subscribe("events", std::slice::from_ref(&item)).await {
        Err(ConnectorError::Config { setting, .. }) => {
            assert_eq!(setting, "connectors.campaigns.lists.events.doi")
        }
        other => panic!("{other:?}"),
    }
    assert!(fake.member(DOI_AUD, "ann@example.org").is_none());
}

#[tokio::test]
async fn a_batch_fails_item_by_item() {
    let fake = fake();
    fake.add_compliance_address("review@example.org");
    fake.insert_member(
        AUD,
        SeedMember::new("left@example.org", Status::Unsubscribed),
    );
    let c = connector(&fake);
    let r = subscribe(
        &c,
        "newsletter",
        &[
            "good1@example.org",
            "asdf@example.org",
            "review@example.org",
            "left@example.org",
            "not-an-address",
            "good2@example.org",
            "GOOD1@example.org",
        ],
    )
    .await;
    assert_eq!(r[0], Ok(()));
    assert!(
        matches!(r[1], Err(ConnectorError::Rejected { .. })),
        "{:?}",
        r[1]
    );
    assert!(
        matches!(r[2], Err(ConnectorError::Permanent { .. })),
        "{:?}",
        r[2]
    );
    assert!(
        matches!(r[3], Err(ConnectorError::Permanent { .. })),
        "{:?}",
        r[3]
    );
    assert!(
        matches!(r[4], Err(ConnectorError::Rejected { .. })),
        "{:?}",
        r[4]
    );
    assert_eq!(r[5], Ok(()));
    assert_eq!(r[6], Ok(()));
    assert_eq!(fake.calls("POST /lists/{list_id}"), 1);
    let subscribed: BTreeSet<String> = fake
        .members(AUD)
        .into_iter()
        .filter(|m| m.status == Status::Subscribed)
        .map(|m| m.email_address)
        .collect();
    assert_eq!(
        subscribed,
        BTreeSet::from([
            "good1@example.org".to_owned(),
            "good2@example.org".to_owned()
        ])
    );
    assert_eq!(
        status_of(&fake, AUD, "left@example.org"),
        Some(Status::Unsubscribed)
    );
    // No message carries an address.
    for e in r.iter().filter_map(|r| r.as_ref().err()) {
        assert!(!e.to_string().contains('@'), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_subscribes_stay_within_ten_requests_in_flight() {
    let fake = fake_with(MailchimpOptions {
        latency: Duration::from_millis(30),
        ..MailchimpOptions::default()
    });
    let c = Arc::new(connector(&fake));
    let emails: Vec<String> = (0..5000).map(|i| format!("p{i}@example.org")).collect();
    // Ten batches of 450 and 500 singles at once: far more calls than slots.
    let mut tasks = Vec::new();
    for chunk in emails[..4500].chunks(450) {
        let c = Arc::clone(&c);
        let items: Vec<_> = chunk.iter().map(|e| keyed(e)).collect();
        tasks.push(tokio::spawn(async move {
            per_item(items.len(), c.subscribe("newsletter", &items).await)
        }));
    }
    for e in &emails[4500..] {
        let c = Arc::clone(&c);
        let item = keyed(e);
        tasks.push(tokio::spawn(async move {
            per_item(
                1,
                c.subscribe("newsletter", std::slice::from_ref(&item)).await,
            )
        }));
    }
    let mut ok = 0;
    for t in tasks {
        for r in t.await.expect("task") {
            assert_eq!(r, Ok(()));
            ok += 1;
        }
    }
    assert_eq!(ok, 5000);
    assert!(fake.peak_concurrency() <= 10, "{}", fake.peak_concurrency());
    assert_eq!(fake.refused_concurrency(), 0);
    let on: BTreeSet<String> = fake
        .members(AUD)
        .into_iter()
        .filter(|m| m.status == Status::Subscribed)
        .map(|m| m.email_address)
        .collect();
    let asked: BTreeSet<String> = emails.into_iter().collect();
    assert_eq!(on.len(), 5000);
    assert_eq!(
        on.difference(&asked).count(),
        0,
        "subscribed without being asked"
    );
    assert_eq!(fake.members(AUD).len(), 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_is_temporary_with_a_wait_and_loses_or_duplicates_nothing() {
    let fake = fake();
    let c = connector(&fake);
    fake.fail_next(Fault::Status(429));
    let first = subscribe(&c, "newsletter", &["ann@example.org"]).await;
    match &first[0] {
        Err(ConnectorError::Transient { retry_after, .. }) => assert!(retry_after.is_some()),
        other => panic!("{other:?}"),
    }
    assert!(fake.member(AUD, "ann@example.org").is_none());
    assert_eq!(
        subscribe(&c, "newsletter", &["ann@example.org"]).await,
        vec![Ok(())]
    );

    // A batch that meets a 429 fails as a whole, temporarily; its retry puts each on once.
    fake.fail_next(Fault::Status(429));
    let batch = ["b1@example.org", "b2@example.org", "b3@example.org"];
    let r = subscribe(&c, "newsletter", &batch).await;
    assert!(
        r.iter()
            .all(|r| matches!(r, Err(ConnectorError::Transient { .. }))),
        "{r:?}"
    );
    assert_eq!(fake.members(AUD).len(), 1);
    assert!(
        subscribe(&c, "newsletter", &batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    assert_eq!(fake.members(AUD).len(), 4);

    // A key shared with another integration: the fake allows 2, the connector sends up to
    // 10; whatever is refused is retried until everything is on, each exactly once.
    let tight = fake_with(MailchimpOptions {
        max_connections: 2,
        latency: Duration::from_millis(20),
        ..MailchimpOptions::default()
    });
    let c = Arc::new(connector(&tight));
    let emails: Vec<String> = (0..40).map(|i| format!("t{i}@example.org")).collect();
    let mut pending: Vec<String> = emails.clone();
    for _ in 0..50 {
        let tasks: Vec<_> = pending
            .iter()
            .map(|e| {
                let c = Arc::clone(&c);
                let e = e.clone();
                tokio::spawn(async move {
                    let r = subscribe(&c, "newsletter", &[e.as_str()]).await;
                    (e, r.into_iter().next().unwrap_or(Ok(())))
                })
            })
            .collect();
        let mut again = Vec::new();
        for t in tasks {
            let (e, r) = t.await.expect("task");
            match r {
                Ok(()) => {}
                Err(ConnectorError::Transient { retry_after, .. }) => {
                    assert!(retry_after.is_some());
                    again.push(e);
                }
                Err(other) => panic!("{other:?}"),
            }
        }
        pending = again;
        if pending.is_empty() {
            break;
        }
    }
    assert!(pending.is_empty());
    assert!(
        tight.refused_concurrency() > 0,
        "the tight key never refused"
    );
    let on: BTreeSet<String> = tight
        .members(AUD)
        .into_iter()
        .map(|m| m.email_address)
        .collect();
    assert_eq!(on, emails.into_iter().collect());
}

#[tokio::test]
async fn removal_unsubscribes_never_deletes_and_absent_is_done() {
    let fake = fake();
    let c = connector(&fake);
    assert!(
        subscribe(&c, "newsletter", &["ann@example.org", "bob@example.org"])
            .await
            .iter()
            .all(Result::is_ok)
    );
    fake.insert_member(AUD, SeedMember::new("bounced@example.org", Status::Cleaned));
    for _ in 0..2 {
        let r = remove(
            &c,
            &[
                "ann@example.org",
                "absent@example.org",
                "bounced@example.org",
                "nope",
            ],
        )
        .await;
        assert!(r.iter().all(Result::is_ok), "{r:?}");
    }
    assert_eq!(
        status_of(&fake, AUD, "ann@example.org"),
        Some(Status::Unsubscribed)
    );
    assert_eq!(
        status_of(&fake, AUD, "bob@example.org"),
        Some(Status::Subscribed)
    );
    assert_eq!(
        status_of(&fake, AUD, "bounced@example.org"),
        Some(Status::Cleaned)
    );
    assert!(fake.member(AUD, "absent@example.org").is_none());
    assert_eq!(
        fake.calls("DELETE /lists/{list_id}/members/{subscriber_hash}"),
        0
    );
    assert_eq!(
        fake.calls("PATCH /lists/{list_id}/members/{subscriber_hash}"),
        1
    );
    // A permanently deleted ("forgotten") address is absent: done.
    fake.with(|s| {
        let l = s.lists.get_mut(AUD).expect("list");
        let h = optinsync_plugin_mailchimp::subscriber_hash("bob@example.org");
        l.members.remove(&h);
        l.forgotten.insert(h);
    });
    assert_eq!(remove(&c, &["bob@example.org"]).await, vec![Ok(())]);
    // An archived member is set `unsubscribed`, so a later import cannot re-add it.
    let mut arch = SeedMember::new("arch@example.org", Status::Subscribed);
    arch.unsubscribed_by = None;
    fake.insert_member(AUD, arch);
    fake.with(|s| {
        let l = s.lists.get_mut(AUD).expect("list");
        let m = l
            .members
            .get_mut(&optinsync_plugin_mailchimp::subscriber_hash(
                "arch@example.org",
            ))
            .expect("member");
        m.archived_from = Some(Status::Subscribed);
        m.status = Status::Archived;
    });
    assert_eq!(remove(&c, &["arch@example.org"]).await, vec![Ok(())]);
    assert_eq!(
        status_of(&fake, AUD, "arch@example.org"),
        Some(Status::Unsubscribed)
    );
}

async fn poll(
    c: &Mailchimp,
    list: &str,
    cursor: Option<&Cursor>,
) -> (Vec<(String, StatusKind)>, Cursor) {
    let page = c.status_events(list, cursor).await.expect("status");
    assert!(!page.has_more);
    let events = page
        .events
        .iter()
        .map(|e| (e.email.clone(), e.kind))
        .collect();
    (events, page.next_cursor.expect("a cursor"))
}

#[tokio::test]
async fn the_status_poll_reads_each_change_once_and_not_our_own_removals() {
    let fake = fake();
    let c = connector(&fake);
    assert!(
        subscribe(
            &c,
            "newsletter",
            &[
                "ann@example.org",
                "bob@example.org",
                "cat@example.org",
                "dan@example.org"
            ]
        )
        .await
        .iter()
        .all(Result::is_ok)
    );
    let mut old = SeedMember::new("old@example.org", Status::Unsubscribed);
    old.last_changed = Some(Utc::now() - chrono::Duration::days(30));
    fake.insert_member(AUD, old);
    let (events, cursor) = poll(&c, "newsletter", None).await;
    assert_eq!(
        events,
        vec![("old@example.org".to_owned(), StatusKind::Unsubscribed)]
    );
    // In the same second as the cursor (the fake's filter is strict on whole seconds).
    fake.unsubscribe_by_user(AUD, "ann@example.org", false)
        .await;
    fake.bounce(AUD, "bob@example.org").await;
    assert_eq!(remove(&c, &["cat@example.org"]).await, vec![Ok(())]);
    let (mut events, cursor) = poll(&c, "newsletter", Some(&cursor)).await;
    events.sort_by_key(|(e, k)| (e.clone(), format!("{k:?}")));
    assert_eq!(
        events,
        vec![
            ("ann@example.org".to_owned(), StatusKind::Unsubscribed),
            ("bob@example.org".to_owned(), StatusKind::Bounced),
        ]
    );
    let (events, cursor) = poll(&c, "newsletter", Some(&cursor)).await;
    assert!(events.is_empty(), "{events:?}");
    // Later, in another second.
    fake.advance_clock(Duration::from_secs(5));
    fake.unsubscribe_by_user(AUD, "dan@example.org", false)
        .await;
    let (events, cursor) = poll(&c, "newsletter", Some(&cursor)).await;
    assert_eq!(
        events,
        vec![("dan@example.org".to_owned(), StatusKind::Unsubscribed)]
    );
    let (events, _) = poll(&c, "newsletter", Some(&cursor)).await;
    assert!(events.is_empty());
    assert!(c.status_interval().is_some());
    // A cursor that is not ours is refused, not taken as "from the start".
    assert!(matches!(
        c.status_events("newsletter", Some(&Cursor("garbage".into())))
            .await,
        Err(ConnectorError::InvalidInput { .. })
    ));
}

#[tokio::test]
async fn the_status_poll_pages_through_many_changes_in_one_second() {
    let fake = fake();
    let c = build(settings(&fake, json!({"page_size": 7})));
    let at = Utc::now() - chrono::Duration::hours(1);
    for i in 0..30 {
        let mut m = SeedMember::new(&format!("u{i}@example.org"), Status::Unsubscribed);
        m.last_changed = Some(at);
        fake.insert_member(AUD, m);
    }
    let (events, cursor) = poll(&c, "newsletter", None).await;
    let got: BTreeSet<String> = events.into_iter().map(|(e, _)| e).collect();
    assert_eq!(got.len(), 30);
    let (events, _) = poll(&c, "newsletter", Some(&cursor)).await;
    assert!(events.is_empty(), "{events:?}");
}

/// The daemon's `/webhooks/campaigns`, serving the connector, on a loopback port.
struct Daemon {
    events: Arc<Mutex<Vec<WebhookEvent>>>,
    refused: Arc<Mutex<u32>>,
}

async fn serve(c: Arc<Mailchimp>, listener: tokio::net::TcpListener) -> Daemon {
    use axum::extract::Request;
    use axum::http::StatusCode;
    let events = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0));
    let (ev, rf) = (Arc::clone(&events), Arc::clone(&refused));
    let app = axum::Router::new().fallback(move |req: Request| {
        let (c, ev, rf) = (Arc::clone(&c), Arc::clone(&ev), Arc::clone(&rf));
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 256 << 10)
                .await
                .unwrap_or_default();
            let request = WebhookRequest {
                method: if parts.method == axum::http::Method::GET {
                    HttpMethod::Get
                } else {
                    HttpMethod::Post
                },
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                headers: Vec::new(),
                body: String::from_utf8_lossy(&body).into_owned(),
                peer: None,
            };
            match optinsync_plugin_api::Connector::webhook(c.as_ref(), &request).await {
                Ok(e) => {
                    ev.lock().expect("events").push(e);
                    StatusCode::OK
                }
                Err(_) => {
                    *rf.lock().expect("refused") += 1;
                    StatusCode::BAD_REQUEST
                }
            }
        }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Daemon { events, refused }
}

fn request(method: HttpMethod, query: &str, body: &str) -> WebhookRequest {
    WebhookRequest {
        method,
        path: "/webhooks/campaigns".into(),
        query: query.into(),
        headers: Vec::new(),
        body: body.into(),
        peer: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_registered_validated_and_read() {
    let fake = fake();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/webhooks/campaigns",
        listener.local_addr().expect("addr")
    );
    let c = Arc::new(build(settings(
        &fake,
        json!({"webhook": {"url": url, "secret": SECRET, "register": true}}),
    )));
    let daemon = serve(Arc::clone(&c), listener).await;
    use optinsync_plugin_api::Connector as _;
    assert!(c.accepts_webhooks());
    // Registration: Mailchimp GETs the URL first; twice registers once per audience.
    c.maintain().await.expect("registered");
    c.maintain().await.expect("again");
    let c2 = build(settings(
        &fake,
        json!({"webhook": {"url": url, "secret": SECRET, "register": true}}),
    ));
    c2.maintain()
        .await
        .expect("a restart registers nothing twice");
    assert_eq!(fake.webhooks(AUD).len(), 1);
    assert_eq!(fake.webhooks(DOI_AUD).len(), 1);
    assert!(fake.validations().iter().all(|(_, s)| *s == Some(200)));
    let hook = &fake.webhooks(AUD)[0];
    assert!(hook.url.contains("secret="));
    assert_eq!(hook.sources.get("api"), Some(&false));

    // Deliveries through real HTTP.
    subscribe(
        &c,
        "newsletter",
        &["ann@example.org", "bob@example.org", "eve@example.org"],
    )
    .await;
    fake.unsubscribe_by_user(AUD, "ann@example.org", false)
        .await;
    fake.bounce(AUD, "bob@example.org").await;
    fake.unsubscribe_by_user(AUD, "eve@example.org", true).await;
    let got: Vec<WebhookEvent> = daemon.events.lock().expect("events").clone();
    let mut statuses: Vec<(String, String, StatusKind)> = got
        .iter()
        .filter_map(|e| match e {
            WebhookEvent::Status { list, events } => Some(
                events
                    .iter()
                    .map(|ev| (list.clone(), ev.email.clone(), ev.kind))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    statuses.sort_by_key(|(l, e, k)| (l.clone(), e.clone(), format!("{k:?}")));
    assert_eq!(
        statuses,
        vec![
            (
                "newsletter".to_owned(),
                "ann@example.org".to_owned(),
                StatusKind::Unsubscribed
            ),
            (
                "newsletter".to_owned(),
                "bob@example.org".to_owned(),
                StatusKind::Bounced
            ),
            (
                "newsletter".to_owned(),
                "eve@example.org".to_owned(),
                StatusKind::Complained
            ),
        ]
    );
    assert_eq!(*daemon.refused.lock().expect("refused"), 0);

    // Validation GET with and without the secret.
    let q = format!("secret={SECRET}");
    assert_eq!(
        c.webhook(&request(HttpMethod::Get, &q, "")).await,
        Ok(WebhookEvent::Ignored)
    );
    for bad in ["", "secret=wrong", "secret="] {
        assert!(matches!(
            c.webhook(&request(HttpMethod::Get, bad, "")).await,
            Err(ConnectorError::InvalidInput { .. })
        ));
    }
    // A forged POST (right body, wrong secret) changes nothing.
    let body = format!(
        "type=unsubscribe&fired_at=2026-05-03+08%3A00%3A00&data%5Baction%5D=unsub&data%5Breason%5D=manual&data%5Blist_id%5D={AUD}&data%5Bemail%5D=x%40example.org"
    );
    assert!(matches!(
        c.webhook(&request(HttpMethod::Post, "secret=forged", &body))
            .await,
        Err(ConnectorError::InvalidInput { .. })
    ));
    match c.webhook(&request(HttpMethod::Post, &q, &body)).await {
        Ok(WebhookEvent::Status { list, events }) => {
            // The list the engine knows (its `campaigns_list`), not the audience id.
            assert_eq!(list, "newsletter");
            assert_eq!(events[0].kind, StatusKind::Unsubscribed);
            assert_eq!(events[0].at.to_rfc3339(), "2026-05-03T08:00:00+00:00");
        }
        other => panic!("{other:?}"),
    }
    // Profile changes and archives carry no consent; an unknown audience or type is refused.
    let profile = format!("type=profile&data[list_id]={AUD}&data[email]=x%40example.org");
    assert_eq!(
        c.webhook(&request(HttpMethod::Post, &q, &profile)).await,
        Ok(WebhookEvent::Ignored)
    );
    let archive = format!(
        "type=unsubscribe&data[action]=delete&data[list_id]={AUD}&data[email]=x%40example.org"
    );
    assert_eq!(
        c.webhook(&request(HttpMethod::Post, &q, &archive)).await,
        Ok(WebhookEvent::Ignored)
    );
    let upemail = format!(
        "type=upemail&data[list_id]={AUD}&data[old_email]=old%40example.org&data[new_email]=new%40example.org"
    );
    match c.webhook(&request(HttpMethod::Post, &q, &upemail)).await {
        Ok(WebhookEvent::Status { events, .. }) => {
            assert_eq!(events[0].email, "old@example.org");
            assert_eq!(events[0].kind, StatusKind::Unsubscribed);
        }
        other => panic!("{other:?}"),
    }
    for bad in [
        "type=unsubscribe&data[list_id]=other&data[email]=x%40example.org".to_owned(),
        format!("type=hack&data[list_id]={AUD}&data[email]=x%40example.org"),
        "garbage".to_owned(),
    ] {
        assert!(
            matches!(
                c.webhook(&request(HttpMethod::Post, &q, &bad)).await,
                Err(ConnectorError::InvalidInput { .. })
            ),
            "{bad}"
        );
    }
    // Our own removal does not come back as the person's, even from a hook with api on.
    let own = format!(
        "type=unsubscribe&data[action]=unsub&data[reason]=manual&data[list_id]={AUD}&data[email]=cat%40example.org"
    );
    subscribe(&c, "newsletter", &["cat@example.org"]).await;
    assert_eq!(remove(&c, &["cat@example.org"]).await, vec![Ok(())]);
    assert_eq!(
        c.webhook(&request(HttpMethod::Post, &q, &own)).await,
        Ok(WebhookEvent::Ignored)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailchimp_runs_the_double_opt_in_and_the_confirmation_reads_back() {
    let fake = fake();
    let c = connector(&fake);
    let (_, cursor) = poll(&c, "events", None).await;
    let item = keyed("Zoe@Example.org");
    for _ in 0..2 {
        c.request_doi("events", &item).await.expect("pending");
    }
    assert_eq!(
        status_of(&fake, DOI_AUD, "zoe@example.org"),
        Some(Status::Pending)
    );
    assert_eq!(
        fake.confirmation_mails(DOI_AUD).len(),
        1,
        "a retry sends no second mail"
    );
    // An optinsync-DOI list never goes pending.
    match c.request_doi("newsletter", &item).await {
        Err(ConnectorError::Config { setting, .. }) => {
            assert_eq!(setting, "connectors.campaigns.lists.newsletter.doi")
        }
        other => panic!("{other:?}"),
    }
    assert!(fake.member(AUD, "zoe@example.org").is_none());
    let (events, cursor) = poll(&c, "events", Some(&cursor)).await;
    assert!(events.is_empty(), "pending is no confirmation: {events:?}");
    fake.confirm(DOI_AUD, "zoe@example.org", "203.0.113.9")
        .await;
    let page = c
        .status_events("events", Some(&cursor))
        .await
        .expect("status");
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].kind, StatusKind::Confirmed);
    assert!(page.events[0].email.eq_ignore_ascii_case("zoe@example.org"));
    assert!(
        page.events[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("203.0.113.9"))
    );
    let (events, _) = poll(&c, "events", page.next_cursor.as_ref()).await;
    assert!(events.is_empty(), "{events:?}");
    // Confirmed already: another request sends nothing.
    c.request_doi("events", &item).await.expect("done");
    assert_eq!(fake.confirmation_mails(DOI_AUD).len(), 1);
    assert_eq!(
        status_of(&fake, DOI_AUD, "zoe@example.org"),
        Some(Status::Subscribed)
    );
    // The subscribe webhook of a doi = "mailchimp" audience is a confirmation; elsewhere not.
    let c = build(settings(
        &fake,
        json!({"webhook": {"url": "http://127.0.0.1:9/webhooks/campaigns", "secret": SECRET}}),
    ));
    let q = format!("secret={SECRET}");
    let body = |aud: &str| {
        format!(
            "type=subscribe&data[list_id]={aud}&data[email]=zoe%40example.org&data[ip_opt]=203.0.113.9"
        )
    };
    use optinsync_plugin_api::Connector as _;
    match c
        .webhook(&request(HttpMethod::Post, &q, &body(DOI_AUD)))
        .await
    {
        Ok(WebhookEvent::Status { events, .. }) => {
            assert_eq!(events[0].kind, StatusKind::Confirmed)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.webhook(&request(HttpMethod::Post, &q, &body(AUD))).await,
        Ok(WebhookEvent::Ignored)
    );
}

#[tokio::test]
async fn members_page_with_count_and_offset() {
    let fake = fake();
    let c = build(settings(&fake, json!({"page_size": 10})));
    for i in 0..25 {
        let mut m = SeedMember::new(&format!("m{i}@example.org"), Status::Subscribed);
        m.merge_fields
            .insert("FNAME".into(), json!(format!("M{i}")));
        fake.insert_member(AUD, m);
    }
    fake.insert_member(
        AUD,
        SeedMember::new("gone@example.org", Status::Unsubscribed),
    );
    let mut cursor = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_members("newsletter", cursor.as_ref())
            .await
            .expect("page");
        pages += 1;
        seen.extend(page.members.clone());
        if !page.has_more {
            break;
        }
        cursor = page.next_cursor;
        assert!(pages < 10);
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert!(seen.iter().all(|s| s.email != "gone@example.org"));
    assert_eq!(seen[0].fields.get("First_Name"), Some(&json!("M0")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailchimp_keeps_the_contract() {
    let fake = fake();
    let c = build(settings(
        &fake,
        json!({"webhook": {"url": "http://127.0.0.1:9/webhooks/campaigns", "secret": SECRET}}),
    ));
    let options = optinsync_conformance::Options {
        write: true,
        ..optinsync_conformance::Options::default()
    };
    let checks = optinsync_conformance::check_campaigns(&c, "newsletter", &options).await;
    let lines: Vec<String> = checks.iter().map(|c| c.line()).collect();
    assert!(
        checks
            .iter()
            .all(|c| !matches!(c.outcome, optinsync_conformance::Outcome::Fail(_))),
        "{lines:#?}"
    );
    assert!(
        checks.iter().filter(|c| c.passed()).count() >= 9,
        "{lines:#?}"
    );

    // A 5xx from Mailchimp is temporary for every item of the call.
    fake.fail_next(Fault::Status(503));
    let first = async {
        per_item(
            1,
            c.subscribe("newsletter", &[keyed("ann@example.org")]).await,
        )
        .remove(0)
    };
    let check =
        optinsync_conformance::expect_temporary("campaigns", "a 503 is temporary", first, false)
            .await;
    assert!(check.passed(), "{}", check.line());
    // A 429 names a wait.
    fake.fail_next(Fault::Status(429));
    let first = async {
        per_item(
            1,
            c.subscribe("newsletter", &[keyed("ann@example.org")]).await,
        )
        .remove(0)
    };
    let check =
        optinsync_conformance::expect_temporary("campaigns", "a 429 is temporary", first, true)
            .await;
    assert!(check.passed(), "{}", check.line());
}

/// `examples/mailchimp.toml`'s campaigns section is accepted as written (secrets filled in as
/// the engine would, from the environment), and builds through the registered factory.
#[tokio::test]
async fn example_config_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mailchimp.toml");
    let text = std::fs::read_to_string(path).expect("example");
    let doc: toml::Table = toml::from_str(&text).expect("toml");
    let mut section = doc["connectors"]["campaigns"]
        .as_table()
        .expect("campaigns section")
        .clone();
    assert_eq!(
        section
            .remove("kind")
            .and_then(|k| k.as_str().map(str::to_owned)),
        Some("mailchimp".to_owned())
    );
    fn resolve(t: &mut toml::Table) {
        for (k, v) in t.iter_mut() {
            match v {
                toml::Value::String(s) if s.starts_with("${") => {
                    *s = if k == "api_key" {
                        "0123456789abcdef0123456789abcdef-us6".into()
                    } else {
                        "from-the-environment-0123456789".into()
                    }
                }
                toml::Value::Table(t) => resolve(t),
                _ => {}
            }
        }
    }
    resolve(&mut section);
    let settings = Settings::from_serialize(&section).expect("a table");
    let factory = optinsync_plugin_mailchimp::factories()
        .into_iter()
        .find(|f| f.kind() == "mailchimp")
        .expect("registered kind");
    let ctx = optinsync_plugin_api::BuildContext {
        name: "campaigns".into(),
        role: optinsync_plugin_api::Role::Campaigns,
        base_dir: ".".into(),
        state: Some(r#"{"v":1,"own_removals":{"a1b2c3d4e5":["00"]}}"#.into()),
        quota: None,
        marks: None,
        http: optinsync_plugin_api::HttpDefaults {
            timeout: Duration::from_secs(30),
            user_agent: "optinsync-test".into(),
        },
    };
    match factory.build(settings, &ctx).await {
        Ok(optinsync_plugin_api::Built::Campaigns(c)) => {
            assert_eq!(c.max_batch(), 500);
            assert_eq!(c.status_interval(), Some(Duration::from_secs(300)));
            assert!(c.accepts_webhooks());
            let state = c.export_state().await.expect("state");
            assert!(state.contains("a1b2c3d4e5"), "{state}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_answers_are_temporary_and_a_retry_after_a_lost_answer_duplicates_nothing() {
    let fake = fake_with(MailchimpOptions {
        time_scale: 0.01,
        ..MailchimpOptions::default()
    });
    let c = connector(&fake);
    for fault in [Fault::Garbage, Fault::Bare(403), Fault::Status(500)] {
        fake.fail_next(fault.clone());
        let r = subscribe(&c, "newsletter", &["ann@example.org"]).await;
        assert!(
            matches!(r[0], Err(ConnectorError::Transient { .. })),
            "{fault:?}: {r:?}"
        );
    }
    // Mailchimp's own timeout (scaled to 1.2 s): the client gets a 504 although the write
    // went through; the retry finds the member and changes nothing.
    fake.fail_next(Fault::Delay(Duration::from_secs(2)));
    let r = subscribe(&c, "newsletter", &["bob@example.org", "cat@example.org"]).await;
    assert!(
        r.iter()
            .all(|r| matches!(r, Err(ConnectorError::Transient { .. }))),
        "{r:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = subscribe(&c, "newsletter", &["bob@example.org", "cat@example.org"]).await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let on: Vec<String> = fake
        .members(AUD)
        .into_iter()
        .map(|m| m.email_address)
        .collect();
    assert_eq!(on.len(), 2, "{on:?}");

    // A key Mailchimp refuses is a configuration error naming the key.
    let wrong = build(settings(
        &fake,
        json!({"api_key": "ffffffffffffffffffffffffffffffff-us6"}),
    ));
    match optinsync_plugin_api::Connector::health(&wrong).await {
        Err(ConnectorError::Config { setting, .. }) => {
            assert_eq!(setting, "connectors.campaigns.api_key")
        }
        other => panic!("{other:?}"),
    }
}

/// Rows that move while the poll pages (the fake's churn mode moves members' `last_changed`
/// to now after every listing): none is skipped.
#[tokio::test]
async fn the_status_poll_misses_nothing_while_rows_move() {
    let fake = fake();
    let c = build(settings(&fake, json!({"page_size": 7})));
    let at = Utc::now() - chrono::Duration::hours(1);
    for i in 0..40 {
        let mut m = SeedMember::new(&format!("u{i}@example.org"), Status::Unsubscribed);
        m.last_changed = Some(at + chrono::Duration::seconds(i));
        fake.insert_member(AUD, m);
    }
    fake.with(|s| s.churn = 3);
    let mut seen = BTreeSet::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..10 {
        let page = c
            .status_events("newsletter", cursor.as_ref())
            .await
            .expect("status");
        seen.extend(page.events.into_iter().map(|e| e.email));
        cursor = page.next_cursor;
        if !page.has_more {
            break;
        }
    }
    assert_eq!(seen.len(), 40, "{seen:?}");
}

/// A GDPR erasure unsubscribes by default; with `erasure = "delete_permanently"` the member
/// is deleted for good (Mailchimp then refuses the address through the API), and an absent
/// one is done.
#[tokio::test]
async fn erasure_unsubscribes_or_deletes_permanently_when_asked() {
    let f = fake();
    let erase = |c: Mailchimp, email: &'static str| async move {
        let item = Keyed::new(format!("erase-{email}"), email.to_owned());
        per_item(1, c.erase("newsletter", std::slice::from_ref(&item)).await)
    };
    let plain = connector(&f);
    assert!(subscribe(&plain, "newsletter", &["ann@example.org"]).await[0].is_ok());
    assert!(erase(plain, "ann@example.org").await[0].is_ok());
    assert_eq!(
        status_of(&f, AUD, "ann@example.org"),
        Some(Status::Unsubscribed)
    );
    assert!(!f.is_forgotten(AUD, "ann@example.org"));

    let deleting = build(settings(&f, json!({"erasure": "delete_permanently"})));
    assert!(subscribe(&deleting, "newsletter", &["bob@example.org"]).await[0].is_ok());
    assert!(erase(deleting, "bob@example.org").await[0].is_ok());
    assert!(f.is_forgotten(AUD, "bob@example.org"));
    assert!(f.member(AUD, "bob@example.org").is_none());
    let again = build(settings(&f, json!({"erasure": "delete_permanently"})));
    assert!(
        erase(again, "never@example.org").await[0].is_ok(),
        "absent: done"
    );
}
