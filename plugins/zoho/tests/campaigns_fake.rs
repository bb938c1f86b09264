//! The Zoho Campaigns connector against the fake Zoho Campaigns server
//! (`optinsync_testkit::zoho_campaigns`), over real HTTP on loopback.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use optinsync_plugin_api::Connector as _;
use optinsync_plugin_api::{
    CampaignsConnector, ConnectorError, Cursor, FailureScope, StatusKind, Subscriber,
};
use optinsync_plugin_zoho::ZohoCampaigns;
use optinsync_plugin_zoho::campaigns::Api;
use optinsync_testkit::calls::PlainCalls as _;
use optinsync_testkit::zoho_campaigns::{
    self as fake, CampaignsFault, FakeCampaigns, FakeCampaignsOptions, MemberStatus,
};
use serde_json::json;

const KEY: &str = "3c20ad524dfa4af86216a5be13e238ed";

/// A connector for list `newsletter` → `KEY`; `extra` holds top-level settings,
/// `lists` replaces the list table.
fn connector_with(fake: &FakeCampaigns, extra: &str, lists: &str) -> ZohoCampaigns {
    let text = format!(
        r#"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
campaigns_url = "{url}"
{extra}
{lists}
"#,
        fake::CLIENT_ID,
        fake::CLIENT_SECRET,
        fake::REFRESH_TOKEN,
        url = fake.url(),
    );
    ZohoCampaigns::from_config(toml::from_str(&text).unwrap(), Path::new(".")).unwrap()
}

fn connector(fake: &FakeCampaigns, extra: &str) -> ZohoCampaigns {
    connector_with(
        fake,
        &format!("status_interval = \"0s\"\n{extra}"),
        &format!("[lists.newsletter]\nlistkey = \"{KEY}\"\n"),
    )
}

fn sub(email: &str, first: &str) -> Subscriber {
    let mut fields = BTreeMap::new();
    if !first.is_empty() {
        fields.insert("First_Name".to_owned(), json!(first));
        fields.insert("Last_Name".to_owned(), json!("Doe"));
    }
    Subscriber {
        email: email.to_owned(),
        language: Some("en".into()),
        fields,
        proof: None,
    }
}

fn private_fake() -> FakeCampaigns {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Master programmes newsletter", false);
    f
}

#[tokio::test]
async fn subscribe_and_remove_are_idempotent() {
    let f = private_fake();
    let c = connector(&f, "");
    c.health().await.unwrap();
    for _ in 0..2 {
        c.sub("newsletter", &[sub("Ann@Example.org", "Ann")])
            .await
            .unwrap();
    }
    let members = f.members(KEY);
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].status, MemberStatus::Active);
    assert_eq!(members[0].fields["First Name"], "Ann");
    assert_eq!(members[0].fields["Last Name"], "Doe");
    assert_eq!(members[0].source.as_deref(), Some("optinsync"));
    assert_eq!(
        f.confirmation_mails(KEY),
        0,
        "private list: Zoho sends no second DOI mail"
    );

    for _ in 0..2 {
        c.rm("newsletter", &["ann@example.org".into()])
            .await
            .unwrap();
    }
    assert_eq!(
        f.member(KEY, "ann@example.org").unwrap().status,
        MemberStatus::Unsub
    );
    // Never on the list: "Contact does not exist" (2103), confirmed by a read of the list,
    // counts as done.
    c.rm("newsletter", &["nobody@example.org".into()])
        .await
        .unwrap();
    assert_eq!(f.calls("listunsubscribe"), 3);
    assert_eq!(f.calls("getlistsubscribers"), 1);

    // An unmapped list names the setting.
    let err = c
        .sub("other", &[sub("a@example.org", "")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config { setting, .. } if setting == "connectors.campaigns.lists.other"),
        "{err:?}"
    );
}

/// `listunsubscribe` answers 2101 "Please retry after sometime." for an address the list does
/// not hold: the connector reads the list, and a removal of an address that is not there is
/// done; one the list still holds retries as a per-record failure, never a service one.
#[tokio::test]
async fn ambiguous_removal_answers_are_settled_by_reading_the_list() {
    let f = FakeCampaigns::start_with(FakeCampaignsOptions::unknown_unsubscribe_retry());
    f.add_list(KEY, "Master programmes newsletter", false);
    // Two pages of other members (page_size = 2), so the read has to page.
    for i in 0..3 {
        f.insert_member(KEY, &format!("m{i}@example.org"), MemberStatus::Active);
    }
    f.insert_member(KEY, "left@example.org", MemberStatus::Unsub);
    let c = connector(&f, "page_size = 2");

    // Never on the list: 2101, then a read (all pages) that does not find it → done.
    c.rm("newsletter", &["Nobody@Example.org".into()])
        .await
        .unwrap();
    assert_eq!(f.calls("listunsubscribe"), 1);
    assert_eq!(
        f.calls("getlistsubscribers"),
        3,
        "both pages read, and the empty one after them"
    );
    // Unsubscribed earlier (not active): Zoho takes the call; nothing else needed.
    c.rm("newsletter", &["left@example.org".into()])
        .await
        .unwrap();
    assert_eq!(f.calls("getlistsubscribers"), 3, "no read after a success");

    // On the list, but Zoho answers 2101 (or 2103) anyway: found by the read → the record
    // retries, and says it concerns this record only.
    for code in ["2101", "2103"] {
        f.fail_next(CampaignsFault::Code {
            code: code.into(),
            message: "Please retry after sometime.".into(),
        });
        let reads = f.calls("getlistsubscribers");
        let err = c
            .rm("newsletter", &["M1@example.org".into()])
            .await
            .unwrap_err();
        assert_eq!(
            err.transient_scope(),
            Some(FailureScope::Record),
            "{code}: {err:?}"
        );
        assert!(err.to_string().contains(code), "{err}");
        assert!(
            f.calls("getlistsubscribers") > reads,
            "{code}: the list was read"
        );
        assert_eq!(
            f.member(KEY, "m1@example.org").unwrap().status,
            MemberStatus::Active
        );
    }
    // The retry goes through.
    c.rm("newsletter", &["m1@example.org".into()])
        .await
        .unwrap();
    assert_eq!(
        f.member(KEY, "m1@example.org").unwrap().status,
        MemberStatus::Unsub
    );

    // The read itself failing is a service failure: nothing is concluded from it.
    f.fail_next(CampaignsFault::Code {
        code: "2101".into(),
        message: "Please retry after sometime.".into(),
    });
    f.fail_next(CampaignsFault::Status(503));
    let err = c
        .rm("newsletter", &["m2@example.org".into()])
        .await
        .unwrap_err();
    assert_eq!(
        err.transient_scope(),
        Some(FailureScope::Service),
        "{err:?}"
    );
    assert_eq!(
        f.member(KEY, "m2@example.org").unwrap().status,
        MemberStatus::Active
    );
}

#[tokio::test]
async fn address_only_batches_use_the_bulk_endpoint_ten_at_a_time() {
    let f = private_fake();
    let c = connector(&f, "");
    let subs: Vec<Subscriber> = (0..25)
        .map(|i| Subscriber {
            email: format!("p{i}@example.org"),
            language: None,
            fields: BTreeMap::new(),
            proof: None,
        })
        .collect();
    c.sub("newsletter", &subs).await.unwrap();
    assert_eq!(f.calls("addlistsubscribersinbulk"), 3);
    assert_eq!(f.calls("listsubscribe"), 0);
    assert_eq!(f.active(KEY).len(), 25);
}

#[tokio::test]
async fn missing_list_or_wrong_signup_form_is_a_clear_config_error() {
    let f = private_fake();
    f.add_list("publickey", "Public list", true);
    let c = connector_with(&f, "", "[lists.newsletter]\nlistkey = \"no-such-key\"\n");
    let err = c.health().await.unwrap_err();
    let ConnectorError::Config { setting, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(setting, "connectors.campaigns.lists.newsletter.listkey");
    assert!(
        message.contains("no-such-key") && message.contains("newsletter") && message.contains(KEY),
        "{message}"
    );

    // A signup-form list in optinsync mode would send a second confirmation.
    let c = connector_with(&f, "", "[lists.newsletter]\nlistkey = \"publickey\"\n");
    let err = c.health().await.unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config { setting, .. } if setting.ends_with("lists.newsletter.doi")),
        "{err:?}"
    );
    // ...and is right for doi = "zoho".
    let c = connector_with(
        &f,
        "",
        "[lists.newsletter]\nlistkey = \"publickey\"\ndoi = \"zoho\"\n",
    );
    assert!(c.health().await.unwrap().ok);

    // No list at all in the org (code 2401).
    let empty = FakeCampaigns::start();
    let err = connector(&empty, "").health().await.unwrap_err();
    assert!(format!("{err}").contains("has no mailing lists"), "{err}");
}

#[tokio::test]
async fn doi_zoho_lists_hold_contacts_pending_until_they_confirm() {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Signup list", true);
    let c = connector_with(
        &f,
        "",
        &format!("[lists.newsletter]\nlistkey = \"{KEY}\"\ndoi = \"zoho\"\n"),
    );
    c.sub("newsletter", &[sub("zed@example.org", "Zed")])
        .await
        .unwrap();
    assert_eq!(f.confirmation_mails(KEY), 1);
    assert!(f.active(KEY).is_empty());
    assert!(
        c.list_members("newsletter", None)
            .await
            .unwrap()
            .members
            .is_empty()
    );
    f.confirm(KEY, "zed@example.org");
    let page = c.list_members("newsletter", None).await.unwrap();
    assert_eq!(page.members.len(), 1);
    assert_eq!(page.members[0].email, "zed@example.org");
    assert_eq!(page.members[0].fields["First_Name"], json!("Zed"));
}

#[tokio::test]
async fn string_error_codes_are_mapped() {
    let f = private_fake();
    let c = connector(&f, "");
    // Invalid and group addresses: refused for good, not retried.
    for bad in ["not-an-address", "info@example.org"] {
        let err = c.sub("newsletter", &[sub(bad, "")]).await.unwrap_err();
        assert!(
            matches!(err, ConnectorError::Rejected { .. }),
            "{bad}: {err:?}"
        );
    }
    // "Please retry after sometime" about one address: transient for that record only.
    f.fail_next(CampaignsFault::Code {
        code: "2001".into(),
        message: "Error in subscription. Please retry after sometime.".into(),
    });
    let err = c
        .sub("newsletter", &[sub("a@example.org", "First")])
        .await
        .unwrap_err();
    assert_eq!(err.transient_scope(), Some(FailureScope::Record), "{err:?}");
    // Garbage, 5xx: transient for the whole service.
    f.fail_next(CampaignsFault::Garbage);
    let err = c
        .sub("newsletter", &[sub("a@example.org", "")])
        .await
        .unwrap_err();
    assert_eq!(
        err.transient_scope(),
        Some(FailureScope::Service),
        "{err:?}"
    );
    f.fail_next(CampaignsFault::Status(503));
    let err = c
        .sub("newsletter", &[sub("a@example.org", "")])
        .await
        .unwrap_err();
    assert_eq!(
        err.transient_scope(),
        Some(FailureScope::Service),
        "{err:?}"
    );
    // A "retry" code that is not about one address stays a service failure.
    f.fail_next(CampaignsFault::Code {
        code: "2502".into(),
        message: "Error in displaying contacts details.Please try after sometime.".into(),
    });
    let err = c.list_members("newsletter", None).await.unwrap_err();
    assert_eq!(
        err.transient_scope(),
        Some(FailureScope::Service),
        "{err:?}"
    );
    // A wrong list key inside a call: the list's setting.
    f.fail_next(CampaignsFault::Code {
        code: "2501".into(),
        message: "Listkey is empty or invalid.".into(),
    });
    let err = c
        .sub("newsletter", &[sub("a@example.org", "")])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectorError::Config { setting, .. } if setting.ends_with("lists.newsletter.listkey")),
        "{err:?}"
    );
    // An expired token (1007) is refreshed once and the call goes through.
    f.with(|s| s.tokens.clear());
    c.sub("newsletter", &[sub("a@example.org", "")])
        .await
        .unwrap();

    // The 30-minute lock: transient with the rest of the lock, and the endpoint paused.
    f.lock_endpoint("listsubscribe", Duration::from_secs(1800));
    let err = c
        .sub("newsletter", &[sub("b@example.org", "")])
        .await
        .unwrap_err();
    let ConnectorError::Transient {
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(
        wait > Duration::from_secs(1700) && wait <= Duration::from_secs(1800),
        "{wait:?}"
    );
    let calls = f.calls("listsubscribe");
    let err = c
        .sub("newsletter", &[sub("b@example.org", "")])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ConnectorError::Transient {
            retry_after: Some(_),
            ..
        }
    ));
    assert_eq!(
        f.calls("listsubscribe"),
        calls,
        "a paused endpoint is not called"
    );
    assert!(c.locked_until(Api::ListSubscribe).is_some());
    // Other endpoints stay usable.
    c.rm("newsletter", &["a@example.org".into()]).await.unwrap();
}

#[tokio::test]
async fn unsubscribes_and_bounces_come_back_exactly_once() {
    let f = private_fake();
    let c = connector(&f, "");
    for e in [
        "a@example.org",
        "b@example.org",
        "c@example.org",
        "d@example.org",
    ] {
        c.sub("newsletter", &[sub(e, "")]).await.unwrap();
    }
    f.unsubscribe(KEY, "a@example.org");
    f.bounce(KEY, "b@example.org");
    // optinsync's own removal is not echoed back as the person's unsubscribe.
    c.rm("newsletter", &["d@example.org".into()]).await.unwrap();

    let page = c.status_events("newsletter", None).await.unwrap();
    let mut got: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.email.clone(), e.kind))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        vec![
            ("a@example.org".to_owned(), StatusKind::Unsubscribed),
            ("b@example.org".to_owned(), StatusKind::Bounced)
        ]
    );
    let mut cursor: Option<Cursor> = page.next_cursor;
    assert!(!page.has_more);

    let page = c
        .status_events("newsletter", cursor.as_ref())
        .await
        .unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
    cursor = page.next_cursor.or(cursor);

    f.unsubscribe(KEY, "c@example.org");
    let page = c
        .status_events("newsletter", cursor.as_ref())
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].email, "c@example.org");
    cursor = page.next_cursor.or(cursor);
    // A removal of an address that was not on the list is no echo to swallow later.
    c.rm("newsletter", &["e@example.org".into()]).await.unwrap();
    f.insert_member(KEY, "e@example.org", MemberStatus::Active);
    f.unsubscribe(KEY, "e@example.org");
    let page = c
        .status_events("newsletter", cursor.as_ref())
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1, "{:?}", page.events);
    assert_eq!(page.events[0].email, "e@example.org");
    cursor = page.next_cursor.or(cursor);
    // A new connector (restart) with the stored cursor reports nothing again.
    let again = connector(&f, "");
    let page = again
        .status_events("newsletter", cursor.as_ref())
        .await
        .unwrap();
    assert!(page.events.is_empty(), "{:?}", page.events);
}

#[tokio::test]
async fn status_polls_respect_the_interval() {
    let f = private_fake();
    let c = connector_with(
        &f,
        "status_interval = \"1h\"",
        &format!("[lists.newsletter]\nlistkey = \"{KEY}\"\n"),
    );
    c.sub("newsletter", &[sub("a@example.org", "")])
        .await
        .unwrap();
    let first = c.status_events("newsletter", None).await.unwrap();
    assert!(first.events.is_empty());
    let calls = f.calls("getlistsubscribers");
    f.unsubscribe(KEY, "a@example.org");
    let page = c
        .status_events("newsletter", first.next_cursor.as_ref())
        .await
        .unwrap();
    assert!(page.events.is_empty() && page.next_cursor.is_none());
    assert_eq!(
        f.calls("getlistsubscribers"),
        calls,
        "no call before the interval is over"
    );
}

#[tokio::test]
async fn a_burst_larger_than_the_window_never_triggers_the_lock() {
    // Zoho's shape (a per-minute limit and a 30-minute lock), scaled: 25 calls per second.
    let f = private_fake();
    f.set_quota(
        "listsubscribe",
        &[(25, Duration::from_secs(1))],
        Duration::from_secs(60),
    );
    let c = Arc::new(connector(&f, "[limits]\nlistsubscribe = [\"25/1s\"]\n"));
    const N: usize = 110;
    let start = Instant::now();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.sub("newsletter", &[sub(&format!("p{i}@example.org"), "P")])
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(
        f.locks(),
        0,
        "the budget must never let Zoho lock the endpoint"
    );
    assert_eq!(f.active(KEY).len(), N);
    let times = f.accepted_times("listsubscribe");
    let span = times.last().unwrap().duration_since(times[0]).as_secs_f64();
    // Best case: 25 calls at once, then 25 more each second: the last goes at (N-1)/25 s.
    let allowed = 25.0;
    let ideal = ((N - 1) / 25) as f64;
    eprintln!(
        "burst of {N} listsubscribe calls, limit 25/s: wall {:.2} s; first→last call at the fake {span:.2} s \
         vs {ideal:.2} s for the best schedule = {:.0}% of the allowed rate ({allowed} calls/s); locks: {}",
        elapsed.as_secs_f64(),
        100.0 * ideal / span,
        f.locks()
    );
}

#[tokio::test]
async fn exported_state_carries_budget_and_lock_across_a_restart() {
    let f = private_fake();
    f.set_quota(
        "listsubscribe",
        &[(10, Duration::from_secs(30))],
        Duration::from_secs(60),
    );
    let extra = "max_wait = \"0s\"\n[limits]\nlistsubscribe = [\"10/30s\"]\n";
    let first = connector(&f, extra);
    for i in 0..10 {
        first
            .sub("newsletter", &[sub(&format!("p{i}@example.org"), "")])
            .await
            .unwrap();
    }
    assert_eq!(first.budget_usage(Api::ListSubscribe), vec![10]);
    let state = first.export_state().await.unwrap();
    drop(first);

    // Without the state a new instance would call at once and trigger Zoho's lock.
    let second = connector(&f, extra);
    second.import_state(&state).unwrap();
    assert_eq!(second.budget_usage(Api::ListSubscribe), vec![10]);
    let err = second
        .sub("newsletter", &[sub("late@example.org", "")])
        .await
        .unwrap_err();
    let ConnectorError::Transient {
        retry_after: Some(wait),
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert!(
        wait > Duration::from_secs(20) && wait <= Duration::from_secs(31),
        "{wait:?}"
    );
    assert_eq!(
        f.calls("listsubscribe"),
        10,
        "the over-budget call was not sent"
    );
    assert_eq!(f.locks(), 0);

    // A lock carries over too.
    f.lock_endpoint("listunsubscribe", Duration::from_secs(600));
    assert!(
        second
            .rm("newsletter", &["p1@example.org".into()])
            .await
            .is_err()
    );
    let third = connector(&f, extra);
    third
        .import_state(&second.export_state().await.unwrap())
        .unwrap();
    let calls = f.calls("listunsubscribe");
    let err = third
        .rm("newsletter", &["p1@example.org".into()])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectorError::Transient {
                retry_after: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(f.calls("listunsubscribe"), calls);

    assert!(third.import_state("{not json").is_err());
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
async fn zoho_campaigns_keeps_the_contract() {
    let fake = private_fake();
    let c = connector(&fake, "");
    let checks = optinsync_conformance::check_campaigns(&c, "newsletter", &with_writes()).await;
    assert_conformant(&checks);
    let ran = checks.iter().filter(|c| c.passed()).count();
    assert!(
        ran >= 8,
        "{:#?}",
        checks.iter().map(|c| c.line()).collect::<Vec<_>>()
    );
    assert_eq!(fake.locks(), 0);

    // A 5xx from Zoho Campaigns is temporary for every item of the call.
    fake.fail_next(CampaignsFault::Status(503));
    let item = optinsync_plugin_api::Keyed::new(
        "k",
        Subscriber {
            email: "ann@example.org".into(),
            language: None,
            fields: Default::default(),
            proof: None,
        },
    );
    let first = async {
        let answer = optinsync_plugin_api::CampaignsConnector::subscribe(
            &c,
            "newsletter",
            std::slice::from_ref(&item),
        )
        .await;
        optinsync_plugin_api::per_item(1, answer).remove(0)
    };
    let check =
        optinsync_conformance::expect_temporary("campaigns", "a 503 is temporary", first, false)
            .await;
    assert!(check.passed(), "{}", check.line());
}
