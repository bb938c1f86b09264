//! The fake Mailchimp, driven over real HTTP: every rule it claims has a test here that fails
//! if the rule goes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use optinsync_testkit::mailchimp::{
    API_KEY, CountOverMax, FakeMailchimp, Fault, MailchimpOptions, MergeField, OAUTH_TOKEN,
    SeedMember, Source, Status, WebhookEvent, subscriber_hash,
};
use reqwest::Method;
use serde_json::{Value, json};

const LIST: &str = "a1b2c3d4e5";

struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn send(rb: reqwest::RequestBuilder) -> Answer {
    let r = rb.send().await.expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        body,
        headers,
    }
}

async fn call(fake: &FakeMailchimp, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut rb = client()
        .request(method, format!("{}{path}", fake.api_root()))
        .basic_auth("anystring", Some(API_KEY));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    send(rb).await
}

async fn get(fake: &FakeMailchimp, path: &str) -> Answer {
    call(fake, Method::GET, path, None).await
}

async fn put_member(fake: &FakeMailchimp, email: &str, body: Value) -> Answer {
    let path = format!("/lists/{LIST}/members/{}", subscriber_hash(email));
    call(fake, Method::PUT, &path, Some(body)).await
}

fn fake_with_list() -> FakeMailchimp {
    let fake = FakeMailchimp::start();
    fake.add_list(LIST, "Newsletter");
    fake
}

fn assert_problem(a: &Answer, status: u16, title: &str, detail_part: &str) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["title"], title, "{}", a.body);
    assert_eq!(a.body["status"], status, "{}", a.body);
    let detail = a.body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(detail_part),
        "{detail:?} lacks {detail_part:?}"
    );
    assert_eq!(
        a.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
        "application/problem+json; charset=utf-8"
    );
    let request_id = a
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert_eq!(a.body["instance"], request_id);
    assert_eq!(request_id.len(), 36);
    assert!(a.headers.get("link").is_some());
}

// ----- auth -----------------------------------------------------------------------------------

#[tokio::test]
async fn ping_takes_basic_with_any_user_and_oauth_tokens() {
    let fake = FakeMailchimp::start();
    let url = format!("{}/3.0/ping", fake.url());
    for user in ["anystring", "someone-else"] {
        let a = send(client().get(&url).basic_auth(user, Some(API_KEY))).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.body["health_status"], "Everything's Chimpy!");
    }
    for scheme in ["Bearer", "OAuth"] {
        let a = send(
            client()
                .get(&url)
                .header("authorization", format!("{scheme} {OAUTH_TOKEN}")),
        )
        .await;
        assert_eq!(a.status, 200, "{scheme}");
    }
    let a = send(client().get(&url).bearer_auth("not-a-token")).await;
    assert_problem(&a, 401, "API Key Invalid", "API key may be invalid");
}

#[tokio::test]
async fn wrong_or_missing_keys_are_refused_with_problem_json() {
    let fake = FakeMailchimp::start();
    let url = format!("{}/3.0/ping", fake.url());
    let a = send(client().get(&url)).await;
    assert_problem(&a, 401, "API Key Missing", "did not include an API key");
    assert_eq!(
        a.body["type"],
        "https://mailchimp.com/developer/marketing/docs/errors/"
    );
    let a = send(
        client()
            .get(&url)
            .basic_auth("x", Some("ffffffffffffffffffffffffffffffff-us6")),
    )
    .await;
    assert_problem(&a, 401, "API Key Invalid", "wrong data center");
    // A real key of another data centre.
    fake.add_api_key("0123456789abcdef0123456789abcdef-us9");
    let a = send(
        client()
            .get(&url)
            .basic_auth("x", Some("0123456789abcdef0123456789abcdef-us9")),
    )
    .await;
    assert_eq!(a.status, 401);
    // The Host header names the data centre too.
    let a = send(
        client()
            .get(&url)
            .header("host", "us6.api.mailchimp.com")
            .basic_auth("x", Some(API_KEY)),
    )
    .await;
    assert_eq!(a.status, 200);
    let a = send(
        client()
            .get(&url)
            .header("host", "us9.api.mailchimp.com")
            .basic_auth("x", Some(API_KEY)),
    )
    .await;
    assert_eq!(a.status, 401);

    let fake = FakeMailchimp::start_with(MailchimpOptions {
        wrong_dc_forbidden: true,
        ..MailchimpOptions::default()
    });
    let a = send(
        client()
            .get(format!("{}/3.0/ping", fake.url()))
            .basic_auth("x", Some("0123456789abcdef0123456789abcdef-us1")),
    )
    .await;
    assert_problem(&a, 403, "Wrong Datacenter", "different data center");
}

#[tokio::test]
async fn type_can_be_left_out_for_chosen_titles() {
    let fake = fake_with_list();
    fake.with(|s| s.omit_type_titles.insert("Resource Not Found".to_owned()));
    let a = get(&fake, "/lists/nope").await;
    assert_eq!(a.status, 404);
    assert!(a.body.get("type").is_none(), "{}", a.body);
}

// ----- lists ----------------------------------------------------------------------------------

#[tokio::test]
async fn lists_page_with_count_and_offset_and_unknown_lists_are_404() {
    let fake = FakeMailchimp::start();
    for (id, name) in [("l1", "One"), ("l2", "Two"), ("l3", "Three")] {
        fake.add_list(id, name);
    }
    fake.add_marketing_permission("l2", "0ab1c2d3e4", "Email");
    let a = get(&fake, "/lists?count=2&offset=0").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["total_items"], 3);
    assert_eq!(a.body["lists"].as_array().map(Vec::len), Some(2));
    let a = get(&fake, "/lists?count=2&offset=2").await;
    assert_eq!(a.body["lists"][0]["id"], "l3");
    let a = get(&fake, "/lists/l2").await;
    assert_eq!(a.body["name"], "Two");
    assert_eq!(a.body["marketing_permissions"], true);
    assert_eq!(a.body["double_optin"], false);
    let a = get(&fake, "/lists/zzz").await;
    assert_problem(&a, 404, "Resource Not Found", "could not be found");
    let a = get(&fake, "/lists?count=abc").await;
    assert_eq!(a.status, 400);
}

// ----- members: hash, upsert, fields ----------------------------------------------------------

#[tokio::test]
async fn the_hash_is_md5_of_the_lowercased_address_and_must_match_the_body() {
    assert_eq!(
        subscriber_hash(" Jane@Example.com "),
        "9e26471d35a78862c17e467d87cddedf"
    );
    let fake = fake_with_list();
    let a = put_member(
        &fake,
        "jane@example.com",
        json!({"email_address": "Jane@Example.com", "status_if_new": "subscribed"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["id"], "9e26471d35a78862c17e467d87cddedf");
    // A hash of another address.
    let a = call(
        &fake,
        Method::PUT,
        &format!(
            "/lists/{LIST}/members/{}",
            subscriber_hash("other@example.com")
        ),
        Some(json!({"email_address": "jane@example.com", "status_if_new": "subscribed"})),
    )
    .await;
    assert_problem(&a, 400, "Invalid Resource", "could not be validated");
    assert_eq!(a.body["errors"][0]["field"], "email_address");
    // The slot also takes the address and the contact_id.
    let a = get(&fake, &format!("/lists/{LIST}/members/jane@example.com")).await;
    assert_eq!(a.status, 200);
    let contact = a.body["contact_id"].as_str().unwrap_or_default().to_owned();
    let a = get(&fake, &format!("/lists/{LIST}/members/{contact}")).await;
    assert_eq!(a.body["email_address"], "Jane@Example.com");
    let a = get(
        &fake,
        &format!("/lists/{LIST}/members/{}", subscriber_hash("x@y.org")),
    )
    .await;
    assert_problem(&a, 404, "Resource Not Found", "could not be found");
}

#[tokio::test]
async fn put_uses_status_if_new_on_create_and_status_on_update() {
    let fake = fake_with_list();
    // status_if_new is required for a new member.
    let a = put_member(
        &fake,
        "a@example.org",
        json!({"email_address": "a@example.org", "status": "subscribed"}),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["errors"][0]["field"], "status_if_new");
    assert!(fake.member(LIST, "a@example.org").is_none());

    let a = put_member(
        &fake,
        "a@example.org",
        json!({"email_address": "a@example.org", "status_if_new": "subscribed", "status": "unsubscribed",
               "ip_signup": "203.0.113.7", "timestamp_signup": "2024-05-01T10:00:00+00:00",
               "ip_opt": "198.51.100.23", "timestamp_opt": "2024-05-01 10:05:12", "email_type": "text"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["status"], "subscribed");
    assert_eq!(a.body["ip_signup"], "203.0.113.7");
    assert_eq!(a.body["timestamp_signup"], "2024-05-01T10:00:00+00:00");
    assert_eq!(a.body["ip_opt"], "198.51.100.23");
    assert_eq!(a.body["timestamp_opt"], "2024-05-01T10:05:12+00:00");
    assert_eq!(a.body["email_type"], "text");
    assert_eq!(a.body["source"], "API - Generic");
    let first_change = a.body["last_changed"].clone();

    fake.advance_clock(Duration::from_secs(5));
    // On an existing member status_if_new is ignored, status applies.
    let a = put_member(
        &fake,
        "a@example.org",
        json!({"email_address": "a@example.org", "status_if_new": "pending", "status": "unsubscribed"}),
    )
    .await;
    assert_eq!(a.body["status"], "unsubscribed");
    assert_ne!(a.body["last_changed"], first_change);
    assert!(fake.confirmation_mails(LIST).is_empty());
    // Evidence fields the client does not send stay as they were; empty ones are "".
    let a = put_member(
        &fake,
        "b@example.org",
        json!({"email_address": "b@example.org", "status_if_new": "subscribed"}),
    )
    .await;
    assert_eq!(a.body["ip_opt"], "");
    assert_eq!(a.body["timestamp_opt"], "");

    for bad in [
        json!({"email_address": "c@example.org", "status_if_new": "subscribed", "email_type": "pdf"}),
        json!({"email_address": "c@example.org", "status_if_new": "subscribed", "ip_opt": "999.1.1.1"}),
        json!({"email_address": "c@example.org", "status_if_new": "subscribed", "timestamp_opt": "yesterday"}),
        json!({"email_address": "c@example.org", "status_if_new": "archived"}),
        json!({"email_address": "c@example.org", "status_if_new": "subscribed", "vip": "yes"}),
    ] {
        let a = put_member(&fake, "c@example.org", bad.clone()).await;
        assert_eq!(a.status, 400, "{bad}");
        assert_eq!(a.body["title"], "Invalid Resource");
    }
    assert!(fake.member(LIST, "c@example.org").is_none());
}

#[tokio::test]
async fn merge_fields_are_validated() {
    let fake = fake_with_list();
    fake.add_merge_field(LIST, MergeField::text("FNAME", true));
    fake.add_merge_field(LIST, MergeField::number("AGE", false));
    let a = get(&fake, &format!("/lists/{LIST}/merge-fields")).await;
    assert_eq!(a.body["total_items"], 2);
    assert_eq!(a.body["merge_fields"][0]["tag"], "FNAME");
    assert_eq!(a.body["merge_fields"][0]["required"], true);

    let base = |merges: Value| json!({"email_address": "m@example.org", "status_if_new": "subscribed", "merge_fields": merges});
    let a = put_member(&fake, "m@example.org", base(json!({}))).await;
    assert_problem(
        &a,
        400,
        "Invalid Resource",
        "Your merge fields were invalid.",
    );
    assert_eq!(a.body["errors"][0]["field"], "FNAME");
    assert_eq!(a.body["errors"][0]["message"], "Please enter a value");
    let a = put_member(
        &fake,
        "m@example.org",
        base(json!({"FNAME": "Jo", "NICK": "x"})),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["errors"][0]["field"], "NICK");
    let a = put_member(
        &fake,
        "m@example.org",
        base(json!({"FNAME": "Jo", "AGE": "old"})),
    )
    .await;
    assert_eq!(a.body["errors"][0]["message"], "Please enter a number");
    assert!(fake.member(LIST, "m@example.org").is_none());

    // skip_merge_validation lets a required field be missing.
    let a = call(
        &fake,
        Method::PUT,
        &format!(
            "/lists/{LIST}/members/{}?skip_merge_validation=true",
            subscriber_hash("m@example.org")
        ),
        Some(base(json!({}))),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = put_member(
        &fake,
        "m@example.org",
        base(json!({"FNAME": "Jo", "AGE": 41})),
    )
    .await;
    assert_eq!(a.body["merge_fields"]["FNAME"], "Jo");
    assert_eq!(a.body["merge_fields"]["AGE"], 41);
    assert_eq!(a.body["full_name"], "Jo");
    // Emptying a required field is refused.
    let a = put_member(&fake, "m@example.org", base(json!({"FNAME": ""}))).await;
    assert_eq!(a.status, 400);
}

#[tokio::test]
async fn marketing_permissions_are_per_list_and_checked() {
    let fake = fake_with_list();
    fake.add_marketing_permission(LIST, "0ab1c2d3e4", "Email");
    fake.add_marketing_permission(LIST, "9f8e7d6c5b", "Customized online advertising");
    let a = put_member(
        &fake,
        "g@example.org",
        json!({"email_address": "g@example.org", "status_if_new": "subscribed",
               "marketing_permissions": [{"marketing_permission_id": "0ab1c2d3e4", "enabled": true}]}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["marketing_permissions"],
        json!([{"marketing_permission_id": "0ab1c2d3e4", "text": "Email", "enabled": true},
               {"marketing_permission_id": "9f8e7d6c5b", "text": "Customized online advertising", "enabled": false}])
    );
    let a = put_member(
        &fake,
        "g@example.org",
        json!({"email_address": "g@example.org", "status_if_new": "subscribed",
               "marketing_permissions": [{"marketing_permission_id": "nope", "enabled": true}]}),
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["errors"][0]["field"], "marketing_permissions");
}

#[tokio::test]
async fn invalid_and_fake_looking_addresses_are_refused() {
    let fake = fake_with_list();
    fake.add_fake_looking("nobody@example.net");
    for (email, detail) in [
        (
            "asdf@example.com",
            "asdf@example.com looks fake or invalid, please enter a real email address.",
        ),
        ("nobody@example.net", "looks fake or invalid"),
        (
            "a@@example.com",
            "An email address must contain a single @.",
        ),
        (
            "no-at-sign.example.com",
            "An email address must contain a single @.",
        ),
        ("foo@bar", "Please provide a valid email address."),
        (
            "foo bar@example.com",
            "Please provide a valid email address.",
        ),
    ] {
        let a = put_member(
            &fake,
            email,
            json!({"email_address": email, "status_if_new": "subscribed"}),
        )
        .await;
        assert_problem(&a, 400, "Invalid Resource", detail);
    }
    assert!(fake.members(LIST).is_empty());
}

// ----- status transitions ---------------------------------------------------------------------

#[tokio::test]
async fn unsubscribed_and_cleaned_members_cannot_be_resubscribed_but_can_go_pending() {
    let fake = fake_with_list();
    fake.insert_member(
        LIST,
        SeedMember::new("self@example.org", Status::Unsubscribed),
    );
    fake.insert_member(
        LIST,
        SeedMember::new("bounced@example.org", Status::Cleaned),
    );
    for email in ["self@example.org", "bounced@example.org"] {
        let a = put_member(
            &fake,
            email,
            json!({"email_address": email, "status_if_new": "subscribed", "status": "subscribed"}),
        )
        .await;
        assert_problem(
            &a,
            400,
            "Member In Compliance State",
            &format!(
                "{email} is in a compliance state due to unsubscribe, bounce, or compliance review and cannot be subscribed."
            ),
        );
        let a = call(
            &fake,
            Method::PATCH,
            &format!("/lists/{LIST}/members/{}", subscriber_hash(email)),
            Some(json!({"status": "subscribed"})),
        )
        .await;
        assert_eq!(a.body["title"], "Member In Compliance State");
        let a = put_member(
            &fake,
            email,
            json!({"email_address": email, "status_if_new": "pending", "status": "pending"}),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["status"], "pending");
    }
    assert_eq!(
        fake.confirmation_mails(LIST),
        vec![
            "self@example.org".to_owned(),
            "bounced@example.org".to_owned()
        ]
    );
}

#[tokio::test]
async fn an_api_unsubscribe_blocks_resubscribe_unless_configured() {
    for (allow, expected) in [(false, 400), (true, 200)] {
        let fake = FakeMailchimp::start_with(MailchimpOptions {
            resubscribe_after_api_unsubscribe: allow,
            ..MailchimpOptions::default()
        });
        fake.add_list(LIST, "N");
        let body =
            |st: &str| json!({"email_address": "u@example.org", "status_if_new": st, "status": st});
        assert_eq!(
            put_member(&fake, "u@example.org", body("subscribed"))
                .await
                .status,
            200
        );
        assert_eq!(
            put_member(&fake, "u@example.org", body("unsubscribed"))
                .await
                .status,
            200
        );
        assert_eq!(
            fake.member(LIST, "u@example.org")
                .and_then(|m| m.unsubscribed_by),
            Some(Source::Api)
        );
        assert_eq!(
            put_member(&fake, "u@example.org", body("subscribed"))
                .await
                .status,
            expected
        );
    }
}

#[tokio::test]
async fn compliance_addresses_cannot_be_subscribed_anywhere() {
    let fake = fake_with_list();
    fake.add_compliance_address("Held@Example.org");
    let body = |st: &str| json!({"email_address": "held@example.org", "status_if_new": st});
    let a = put_member(&fake, "held@example.org", body("subscribed")).await;
    assert_eq!(a.body["title"], "Member In Compliance State");
    let a = call(
        &fake,
        Method::POST,
        &format!("/lists/{LIST}"),
        Some(json!({"members": [{"email_address": "held@example.org", "status": "subscribed"}]})),
    )
    .await;
    assert_eq!(a.body["error_count"], 1);
    assert_eq!(a.body["errors"][0]["error_code"], "ERROR_GENERIC");
    let a = put_member(&fake, "held@example.org", body("pending")).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn pending_sends_a_confirmation_mail_and_the_click_subscribes() {
    let fake = fake_with_list();
    let body =
        json!({"email_address": "p@example.org", "status_if_new": "pending", "status": "pending"});
    assert_eq!(
        put_member(&fake, "p@example.org", body.clone())
            .await
            .status,
        200
    );
    assert_eq!(fake.confirmation_mails(LIST).len(), 1);
    // Sent again on every pending write (stricter reading).
    assert_eq!(put_member(&fake, "p@example.org", body).await.status, 200);
    assert_eq!(fake.confirmation_mails(LIST).len(), 2);
    // status_if_new alone on an existing member changes nothing and sends nothing.
    put_member(
        &fake,
        "p@example.org",
        json!({"email_address": "p@example.org", "status_if_new": "pending"}),
    )
    .await;
    assert_eq!(fake.confirmation_mails(LIST).len(), 2);
    fake.confirm(LIST, "p@example.org", "198.51.100.23").await;
    let m = fake.member(LIST, "p@example.org").expect("member");
    assert_eq!(m.status, Status::Subscribed);
    assert_eq!(m.ip_opt, "198.51.100.23");
    assert!(!m.timestamp_opt.is_empty());
    // pending → subscribed over the API is allowed too.
    let body =
        |st: &str| json!({"email_address": "q@example.org", "status_if_new": st, "status": st});
    put_member(&fake, "q@example.org", body("pending")).await;
    let a = put_member(&fake, "q@example.org", body("subscribed")).await;
    assert_eq!(a.body["status"], "subscribed");
}

#[tokio::test]
async fn post_refuses_an_existing_member() {
    let fake = fake_with_list();
    let path = format!("/lists/{LIST}/members");
    let body = json!({"email_address": "e@example.org", "status": "subscribed"});
    assert_eq!(
        call(&fake, Method::POST, &path, Some(body.clone()))
            .await
            .status,
        200
    );
    let a = call(&fake, Method::POST, &path, Some(body)).await;
    assert_problem(
        &a,
        400,
        "Member Exists",
        "e@example.org is already a list member. Use PUT to insert or update list members.",
    );
}

#[tokio::test]
async fn delete_archives_and_a_status_write_brings_the_member_back() {
    let fake = fake_with_list();
    let path = |e: &str| format!("/lists/{LIST}/members/{}", subscriber_hash(e));
    put_member(
        &fake,
        "z@example.org",
        json!({"email_address": "z@example.org", "status_if_new": "subscribed"}),
    )
    .await;
    let a = call(&fake, Method::DELETE, &path("z@example.org"), None).await;
    assert_eq!(a.status, 204);
    assert_eq!(
        get(&fake, &path("z@example.org")).await.body["status"],
        "archived"
    );
    let a = get(&fake, &format!("/lists/{LIST}/members")).await;
    assert_eq!(a.body["total_items"], 0);
    let a = get(&fake, &format!("/lists/{LIST}/members?status=archived")).await;
    assert_eq!(a.body["total_items"], 1);
    // Archiving again, or archiving pending/cleaned members: 405.
    let a = call(&fake, Method::DELETE, &path("z@example.org"), None).await;
    assert_problem(
        &a,
        405,
        "Method Not Allowed",
        "Can not archive a contact that is bounced, pending or archived",
    );
    fake.insert_member(LIST, SeedMember::new("pend@example.org", Status::Pending));
    assert_eq!(
        call(&fake, Method::DELETE, &path("pend@example.org"), None)
            .await
            .status,
        405
    );
    // A PUT brings the archived member back.
    let a = put_member(&fake, "z@example.org", json!({"email_address": "z@example.org", "status_if_new": "subscribed", "status": "subscribed"})).await;
    assert_eq!(a.body["status"], "subscribed");
    // An archived unsubscribed member stays in its compliance state.
    fake.insert_member(
        LIST,
        SeedMember::new("gone@example.org", Status::Unsubscribed),
    );
    assert_eq!(
        call(&fake, Method::DELETE, &path("gone@example.org"), None)
            .await
            .status,
        204
    );
    let a = put_member(&fake, "gone@example.org", json!({"email_address": "gone@example.org", "status_if_new": "subscribed", "status": "subscribed"})).await;
    assert_eq!(a.body["title"], "Member In Compliance State");
}

#[tokio::test]
async fn a_permanently_deleted_address_is_forgotten_for_good() {
    let fake = fake_with_list();
    let email = "forget@example.org";
    let path = format!("/lists/{LIST}/members/{}", subscriber_hash(email));
    put_member(
        &fake,
        email,
        json!({"email_address": email, "status_if_new": "subscribed"}),
    )
    .await;
    let a = call(
        &fake,
        Method::POST,
        &format!("{path}/actions/delete-permanent"),
        None,
    )
    .await;
    assert_eq!(a.status, 204);
    assert!(fake.is_forgotten(LIST, email));
    assert_eq!(get(&fake, &path).await.status, 404);
    let detail = "forget@example.org was permanently deleted and cannot be re-imported. The contact must re-subscribe to get back on the list.";
    for st in ["subscribed", "pending", "unsubscribed"] {
        let a = put_member(
            &fake,
            email,
            json!({"email_address": email, "status_if_new": st, "status": st}),
        )
        .await;
        assert_problem(&a, 400, "Forgotten Email Not Subscribed", detail);
    }
    let a = call(
        &fake,
        Method::POST,
        &format!("/lists/{LIST}/members"),
        Some(json!({"email_address": email, "status": "pending"})),
    )
    .await;
    assert_eq!(a.body["title"], "Forgotten Email Not Subscribed");
    let a = call(&fake, Method::POST, &format!("/lists/{LIST}"), Some(json!({"members": [{"email_address": email, "status": "subscribed"}], "update_existing": true}))).await;
    assert_eq!(a.body["errors"][0]["error"], detail);
    assert!(fake.confirmation_mails(LIST).is_empty());
    assert_eq!(
        call(
            &fake,
            Method::POST,
            &format!("{path}/actions/delete-permanent"),
            None
        )
        .await
        .status,
        404
    );
}

#[tokio::test]
async fn signup_throttle_refuses_too_many_signups_of_one_address() {
    let fake = FakeMailchimp::start_with(MailchimpOptions {
        signup_throttle: Some((2, Duration::from_secs(3600))),
        ..MailchimpOptions::default()
    });
    for l in ["l1", "l2", "l3"] {
        fake.add_list(l, l);
    }
    for (l, expected) in [("l1", 200), ("l2", 200), ("l3", 400)] {
        let a = call(
            &fake,
            Method::PUT,
            &format!("/lists/{l}/members/{}", subscriber_hash("busy@example.org")),
            Some(json!({"email_address": "busy@example.org", "status_if_new": "subscribed"})),
        )
        .await;
        assert_eq!(a.status, expected, "{}", a.body);
    }
}

// ----- listing --------------------------------------------------------------------------------

#[tokio::test]
async fn listing_filters_sorts_pages_and_projects() {
    let fake = fake_with_list();
    let t0 =
        chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600, 0).expect("t0");
    let at = |s: i64| Some(t0 + chrono::Duration::seconds(s));
    for (email, status, changed) in [
        ("m1@example.org", Status::Subscribed, at(10)),
        ("m2@example.org", Status::Unsubscribed, at(20)),
        ("m3@example.org", Status::Subscribed, at(20)),
        ("m4@example.org", Status::Subscribed, at(30)),
        ("m5@example.org", Status::Archived, at(40)),
    ] {
        let mut seed = SeedMember::new(email, status);
        seed.last_changed = changed;
        fake.insert_member(LIST, seed);
    }
    let path = format!("/lists/{LIST}/members");
    let emails = |a: &Answer| -> Vec<String> {
        a.body["members"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|m| m["email_address"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let a = get(&fake, &path).await;
    assert_eq!(a.body["total_items"], 4);
    assert_eq!(a.body["list_id"], LIST);
    let a = get(&fake, &format!("{path}?status=subscribed")).await;
    assert_eq!(a.body["total_items"], 3);
    // since_last_changed is strict; ties keep creation order.
    let since = (t0 + chrono::Duration::seconds(10))
        .format("%Y-%m-%dT%H:%M:%S+00:00")
        .to_string();
    let q = format!(
        "{path}?since_last_changed={}&sort_field=last_changed&sort_dir=ASC",
        since.replace('+', "%2B")
    );
    let a = get(&fake, &q).await;
    assert_eq!(
        emails(&a),
        ["m2@example.org", "m3@example.org", "m4@example.org"]
    );
    let a = get(
        &fake,
        &format!("{path}?sort_field=last_changed&sort_dir=DESC&count=2&offset=1"),
    )
    .await;
    assert_eq!(emails(&a), ["m2@example.org", "m3@example.org"]);
    assert_eq!(a.body["total_items"], 4);
    // fields / exclude_fields.
    let a = get(
        &fake,
        &format!("{path}?fields=members.email_address,members.status,total_items&count=1"),
    )
    .await;
    assert_eq!(
        a.body,
        json!({"members": [{"email_address": "m1@example.org", "status": "subscribed"}], "total_items": 4})
    );
    let a = get(
        &fake,
        &format!("{path}?exclude_fields=members.merge_fields,_links&count=1"),
    )
    .await;
    assert!(a.body["members"][0].get("merge_fields").is_none());
    assert!(a.body["members"][0].get("status").is_some());
    assert!(a.body.get("_links").is_none());
    let a = get(&fake, &format!("{path}?fields=members.shoe_size")).await;
    assert_problem(&a, 422, "Requested Fields Invalid", "fields requested");
    // Bad filters.
    assert_eq!(get(&fake, &format!("{path}?status=gone")).await.status, 400);
    assert_eq!(
        get(&fake, &format!("{path}?since_last_changed=yesterday"))
            .await
            .status,
        400
    );
    assert_eq!(
        get(
            &fake,
            &format!("{path}?unsubscribed_since=2024-01-01T00:00:00Z&status=subscribed")
        )
        .await
        .status,
        400
    );
    assert_eq!(
        get(
            &fake,
            &format!("{path}?unsubscribed_since=2024-01-01T00:00:00Z&status=unsubscribed")
        )
        .await
        .body["total_items"],
        1
    );
    assert_eq!(
        get(&fake, &format!("{path}?sort_field=email")).await.status,
        400
    );
    // Default count 10, max 1000.
    for i in 0..1000 {
        fake.insert_member(
            LIST,
            SeedMember::new(&format!("bulk{i}@example.org"), Status::Subscribed),
        );
    }
    let a = get(&fake, &path).await;
    assert_eq!(a.body["members"].as_array().map(Vec::len), Some(10));
    let a = get(&fake, &format!("{path}?count=1000")).await;
    assert_eq!(a.body["members"].as_array().map(Vec::len), Some(1000));
    let a = get(&fake, &format!("{path}?count=1001")).await;
    assert_eq!(a.status, 400);
    let fake = FakeMailchimp::start_with(MailchimpOptions {
        count_over_max: CountOverMax::Clamp,
        ..MailchimpOptions::default()
    });
    fake.add_list(LIST, "N");
    for i in 0..1001 {
        fake.insert_member(
            LIST,
            SeedMember::new(&format!("bulk{i}@example.org"), Status::Subscribed),
        );
    }
    let a = get(&fake, &format!("{path}?count=5000")).await;
    assert_eq!(a.body["members"].as_array().map(Vec::len), Some(1000));
    assert!(
        fake.request_log()
            .iter()
            .any(|r| r.note.contains("clamped"))
    );
}

#[tokio::test]
async fn last_changed_moves_only_when_something_changes() {
    let fake = fake_with_list();
    let body = json!({"email_address": "lc@example.org", "status_if_new": "subscribed", "status": "subscribed"});
    let first =
        put_member(&fake, "lc@example.org", body.clone()).await.body["last_changed"].clone();
    fake.advance_clock(Duration::from_secs(60));
    let again = put_member(&fake, "lc@example.org", body).await.body["last_changed"].clone();
    assert_eq!(first, again, "an identical PUT changes nothing");
    let changed = put_member(&fake, "lc@example.org", json!({"email_address": "lc@example.org", "status_if_new": "subscribed", "status": "unsubscribed"})).await;
    assert_ne!(changed.body["last_changed"], first);
}

// ----- batch ----------------------------------------------------------------------------------

#[tokio::test]
async fn batch_subscribe_reports_per_member_results() {
    let fake = fake_with_list();
    fake.insert_member(LIST, SeedMember::new("old@example.org", Status::Subscribed));
    fake.insert_member(
        LIST,
        SeedMember::new("out@example.org", Status::Unsubscribed),
    );
    let path = format!("/lists/{LIST}");
    let members = json!([
        {"email_address": "new@example.org", "status": "subscribed", "ip_opt": "198.51.100.23"},
        {"email_address": "old@example.org", "status": "unsubscribed"},
        {"email_address": "out@example.org", "status": "subscribed"},
        {"email_address": "asdf@example.org", "status": "subscribed"},
        {"email_address": "pend@example.org", "status": "pending"},
    ]);
    let a = call(
        &fake,
        Method::POST,
        &path,
        Some(json!({"members": members})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["total_created"], 2);
    assert_eq!(a.body["total_updated"], 0);
    assert_eq!(a.body["error_count"], 3);
    let errors = a.body["errors"].as_array().cloned().unwrap_or_default();
    assert_eq!(errors[0]["email_address"], "old@example.org");
    assert_eq!(errors[0]["error_code"], "ERROR_CONTACT_EXISTS");
    assert_eq!(errors[1]["error_code"], "ERROR_CONTACT_EXISTS");
    assert_eq!(errors[2]["error_code"], "ERROR_GENERIC");
    assert!(
        errors[2]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("looks fake or invalid")
    );
    for key in [
        "email_address",
        "error",
        "error_code",
        "field",
        "field_message",
    ] {
        assert!(errors[0].get(key).is_some(), "{key}");
    }
    assert_eq!(
        fake.confirmation_mails(LIST),
        vec!["pend@example.org".to_owned()]
    );

    let a = call(
        &fake,
        Method::POST,
        &path,
        Some(json!({"members": members, "update_existing": true})),
    )
    .await;
    assert_eq!(a.body["total_created"], 0);
    assert_eq!(a.body["total_updated"], 3);
    assert_eq!(a.body["error_count"], 2);
    assert_eq!(a.body["errors"][0]["email_address"], "out@example.org");
    assert!(
        a.body["errors"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("compliance state")
    );
    assert_eq!(
        fake.member(LIST, "old@example.org").map(|m| m.status),
        Some(Status::Unsubscribed)
    );

    // Merge-field errors name the field.
    fake.add_merge_field(LIST, MergeField::text("FNAME", true));
    let a = call(
        &fake,
        Method::POST,
        &path,
        Some(json!({"members": [{"email_address": "mf@example.org", "status": "subscribed"}]})),
    )
    .await;
    assert_eq!(a.body["errors"][0]["field"], "FNAME");
    assert_eq!(a.body["errors"][0]["field_message"], "Please enter a value");

    // Duplicates: refused unless skip_duplicate_check.
    let dup = json!({"members": [{"email_address": "d@example.org", "status": "subscribed", "merge_fields": {"FNAME": "D"}},
                                  {"email_address": "D@example.org", "status": "unsubscribed", "merge_fields": {"FNAME": "D"}}]});
    let a = call(&fake, Method::POST, &path, Some(dup.clone())).await;
    assert_eq!(
        (
            a.body["total_created"].clone(),
            a.body["error_count"].clone()
        ),
        (json!(1), json!(1))
    );
    let a = call(&fake, Method::POST, &format!("{path}?skip_duplicate_check=true"), Some(json!({"members": [{"email_address": "e2@example.org", "status": "subscribed", "merge_fields": {"FNAME": "E"}}, {"email_address": "e2@example.org", "status": "unsubscribed"}]}))).await;
    assert_eq!(
        (
            a.body["total_created"].clone(),
            a.body["error_count"].clone()
        ),
        (json!(1), json!(0))
    );
    assert_eq!(
        fake.member(LIST, "e2@example.org").map(|m| m.status),
        Some(Status::Subscribed)
    );

    // More than 500 members: the whole call is refused.
    let many: Vec<Value> = (0..501)
        .map(|i| json!({"email_address": format!("x{i}@example.org"), "status": "subscribed"}))
        .collect();
    let a = call(&fake, Method::POST, &path, Some(json!({"members": many}))).await;
    assert_eq!(a.status, 400);
    assert!(fake.member(LIST, "x0@example.org").is_none());
    let ok: Vec<Value> = (0..500).map(|i| json!({"email_address": format!("x{i}@example.org"), "status": "subscribed", "merge_fields": {"FNAME": "X"}})).collect();
    let a = call(&fake, Method::POST, &path, Some(json!({"members": ok}))).await;
    assert_eq!(a.body["total_created"], 500);
}

// ----- limits, timeout, faults ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_eleventh_simultaneous_request_gets_429() {
    let fake = Arc::new(FakeMailchimp::start_with(MailchimpOptions {
        latency: Duration::from_millis(1500),
        ..MailchimpOptions::default()
    }));
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..11 {
        let url = format!("{}/ping", fake.api_root());
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            send(client.get(url).basic_auth("u", Some(API_KEY))).await
        }));
    }
    let mut statuses = Vec::new();
    let mut refused = None;
    for t in tasks {
        let a = t.await.expect("task");
        statuses.push(a.status);
        if a.status == 429 {
            refused = Some(a);
        }
    }
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 429]
    );
    let refused = refused.expect("one 429");
    assert_problem(
        &refused,
        429,
        "Too Many Requests",
        "You have exceeded the limit of 10 simultaneous connections.",
    );
    assert_eq!(fake.peak_concurrency(), 10);
    assert_eq!(fake.refused_concurrency(), 1);
    // Slots come back.
    assert_eq!(get(&fake, "/ping").await.status, 200);
    // The bare-403 form of the throttle.
    let bare = Arc::new(FakeMailchimp::start_with(MailchimpOptions {
        latency: Duration::from_millis(1500),
        max_connections: 2,
        throttle_as_bare_403: true,
        ..MailchimpOptions::default()
    }));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let url = format!("{}/ping", bare.api_root());
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            send(client.get(url).basic_auth("u", Some(API_KEY))).await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        let a = t.await.expect("task");
        answers.push((a.status, a.body));
    }
    answers.sort_by_key(|(s, _)| *s);
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 200);
    assert_eq!(answers[2], (403, json!("")));
    // Another credential has its own ten.
    let fake2 = FakeMailchimp::start_with(MailchimpOptions {
        latency: Duration::from_millis(800),
        ..MailchimpOptions::default()
    });
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = format!("{}/ping", fake2.api_root());
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let rb = client.get(url);
            let rb = if i % 2 == 0 {
                rb.basic_auth("u", Some(API_KEY))
            } else {
                rb.bearer_auth(OAUTH_TOKEN)
            };
            send(rb).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
}

#[tokio::test]
async fn a_request_past_the_timeout_gets_504_but_takes_effect_and_keeps_its_slot() {
    // 120 s × 0.01 = 1.2 s.
    let fake = FakeMailchimp::start_with(MailchimpOptions {
        time_scale: 0.01,
        ..MailchimpOptions::default()
    });
    fake.add_list(LIST, "N");
    fake.fail_next(Fault::Delay(Duration::from_millis(2500)));
    let started = std::time::Instant::now();
    let a = put_member(
        &fake,
        "slow@example.org",
        json!({"email_address": "slow@example.org", "status_if_new": "subscribed"}),
    )
    .await;
    assert_eq!(a.status, 504);
    assert!(started.elapsed() >= Duration::from_millis(1100));
    assert!(started.elapsed() < Duration::from_millis(2400));
    assert!(
        fake.member(LIST, "slow@example.org").is_some(),
        "the write took effect"
    );
    assert_eq!(
        fake.with(|s| s.in_flight.values().sum::<usize>()),
        1,
        "still open"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(fake.with(|s| s.in_flight.values().sum::<usize>()), 0);
}

#[tokio::test]
async fn seeded_faults_answer_without_processing() {
    let fake = fake_with_list();
    let body = json!({"email_address": "f@example.org", "status_if_new": "subscribed"});
    fake.fail_next(Fault::Status(503));
    fake.fail_next(Fault::Status(500));
    fake.fail_next(Fault::Status(429));
    fake.fail_next(Fault::Bare(403));
    fake.fail_next(Fault::Garbage);
    let a = put_member(&fake, "f@example.org", body.clone()).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.body["status"], 503);
    let a = put_member(&fake, "f@example.org", body.clone()).await;
    assert_problem(
        &a,
        500,
        "Internal Server Error",
        "unexpected internal error",
    );
    let a = put_member(&fake, "f@example.org", body.clone()).await;
    assert_eq!(a.body["title"], "Too Many Requests");
    let a = put_member(&fake, "f@example.org", body.clone()).await;
    assert_eq!((a.status, a.body.clone()), (403, json!("")));
    let a = put_member(&fake, "f@example.org", body.clone()).await;
    assert_eq!(a.status, 200);
    assert!(a.body.as_str().is_some_and(|t| t.starts_with("<html>")));
    assert!(fake.member(LIST, "f@example.org").is_none());
    assert_eq!(put_member(&fake, "f@example.org", body).await.status, 200);
    assert_eq!(
        fake.calls("PUT /lists/{list_id}/members/{subscriber_hash}"),
        6
    );
    let log = fake.request_log();
    assert_eq!(
        log.iter().map(|r| r.status).collect::<Vec<_>>(),
        [503, 500, 429, 403, 200, 200]
    );
    assert!(log[0].body.contains("f@example.org"));
}

#[tokio::test]
async fn malformed_requests_get_400_and_unknown_routes_404_or_405() {
    let fake = fake_with_list();
    let url = format!(
        "{}/lists/{LIST}/members/{}",
        fake.api_root(),
        subscriber_hash("j@example.org")
    );
    let a = send(
        client()
            .put(&url)
            .basic_auth("u", Some(API_KEY))
            .body("{not json"),
    )
    .await;
    assert_problem(&a, 400, "JSON Parse Error", "JSON parsing error");
    let a = send(
        client()
            .put(&url)
            .basic_auth("u", Some(API_KEY))
            .body("[1,2]"),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = put_member(
        &fake,
        "j@example.org",
        json!({"email_address": 42, "status_if_new": "subscribed"}),
    )
    .await;
    assert_eq!(a.status, 400);
    let a = put_member(&fake, "j@example.org", json!({"email_address": "j@example.org", "status_if_new": "subscribed", "merge_fields": [1]})).await;
    assert_eq!(a.status, 400);
    let a = get(&fake, "/nothing/here").await;
    assert_problem(&a, 404, "Resource Not Found", "could not be found");
    let a = call(&fake, Method::DELETE, "/lists", None).await;
    assert_problem(&a, 405, "Method Not Allowed", "not compatible");
    let a = call(
        &fake,
        Method::POST,
        "/batches",
        Some(json!({"operations": []})),
    )
    .await;
    assert_eq!(a.status, 501);
    // X-HTTP-Method-Override: only with POST.
    let a = send(
        client()
            .put(&url)
            .basic_auth("u", Some(API_KEY))
            .header("x-http-method-override", "PATCH")
            .json(&json!({})),
    )
    .await;
    assert_problem(
        &a,
        422,
        "Invalid Method Override",
        "only use the X-HTTP-Method-Override header with the POST method",
    );
    put_member(
        &fake,
        "j@example.org",
        json!({"email_address": "j@example.org", "status_if_new": "subscribed"}),
    )
    .await;
    let a = send(
        client()
            .post(&url)
            .basic_auth("u", Some(API_KEY))
            .header("x-http-method-override", "PATCH")
            .json(&json!({"status": "unsubscribed"})),
    )
    .await;
    assert_eq!(a.body["status"], "unsubscribed");
}

// ----- webhooks -------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hit {
    method: String,
    path: String,
    user_agent: String,
    content_type: String,
    body: String,
}

/// A receiver on loopback: `/ok/*` answers 200, `/missing/*` 404, `/flaky/*` 500 to its
/// first POST and 200 after; every request is kept.
async fn receiver() -> (String, Arc<Mutex<Vec<Hit>>>) {
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let seen = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let seen = Arc::clone(&seen);
        async move {
            let (parts, body) = req.into_parts();
            let header = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let (method, path) = (parts.method.to_string(), parts.uri.path().to_owned());
            let (user_agent, content_type) = (header("user-agent"), header("content-type"));
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let mut hits = seen.lock().unwrap_or_else(|p| p.into_inner());
            let posts_before = hits
                .iter()
                .filter(|h| h.path == path && h.method == "POST")
                .count();
            hits.push(Hit {
                method: method.clone(),
                path: path.clone(),
                user_agent,
                content_type,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            let code = if path.starts_with("/missing") {
                404
            } else if path.starts_with("/flaky") && method == "POST" && posts_before == 0 {
                500
            } else {
                200
            };
            axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::OK)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), hits)
}

fn all_events() -> Value {
    json!({"subscribe": true, "unsubscribe": true, "profile": true, "cleaned": true, "upemail": true, "campaign": true})
}

fn form(body: &str) -> BTreeMap<String, String> {
    form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

async fn register(fake: &FakeMailchimp, url: &str, events: Value, sources: Value) -> Answer {
    call(
        fake,
        Method::POST,
        &format!("/lists/{LIST}/webhooks"),
        Some(json!({"url": url, "events": events, "sources": sources})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_registration_gets_the_url_first_and_fails_when_it_does_not_answer() {
    let fake = fake_with_list();
    let (base, hits) = receiver().await;
    let sources = json!({"user": true, "admin": true, "api": true});
    let a = register(
        &fake,
        &format!("{base}/ok/s3cret"),
        all_events(),
        sources.clone(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let id = a.body["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(a.body["url"], format!("{base}/ok/s3cret"));
    assert_eq!(a.body["sources"]["api"], true);
    {
        let hits = hits.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].method, "GET");
        assert_eq!(hits[0].path, "/ok/s3cret");
        assert_eq!(hits[0].user_agent, "MailChimp.com WebHook Validator");
    }
    assert_eq!(
        fake.validations(),
        [(format!("{base}/ok/s3cret"), Some(200))]
    );

    // 404 at the URL, nothing listening, not a URL: refused, nothing registered.
    let a = register(
        &fake,
        &format!("{base}/missing/x"),
        all_events(),
        sources.clone(),
    )
    .await;
    assert_problem(&a, 400, "Invalid Resource", "could not be validated");
    assert_eq!(a.body["errors"][0]["field"], "url");
    let dead = format!("http://127.0.0.1:{}/hook", optinsync_testkit::free_port());
    let a = register(&fake, &dead, all_events(), sources.clone()).await;
    assert_eq!(a.status, 400);
    assert_eq!(fake.validations().last(), Some(&(dead, None)));
    let a = register(&fake, "not a url", all_events(), sources.clone()).await;
    assert_eq!(a.status, 400);
    // The same URL twice on one list.
    let a = register(&fake, &format!("{base}/ok/s3cret"), all_events(), sources).await;
    assert_eq!(a.status, 400);

    let a = get(&fake, &format!("/lists/{LIST}/webhooks")).await;
    assert_eq!(a.body["total_items"], 1);
    assert_eq!(a.body["webhooks"][0]["id"], id.as_str());
    assert_eq!(
        get(&fake, &format!("/lists/{LIST}/webhooks/{id}"))
            .await
            .status,
        200
    );
    assert_eq!(
        call(
            &fake,
            Method::DELETE,
            &format!("/lists/{LIST}/webhooks/{id}"),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(
            &fake,
            Method::DELETE,
            &format!("/lists/{LIST}/webhooks/{id}"),
            None
        )
        .await
        .status,
        404
    );
    assert!(fake.webhooks(LIST).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_fire_in_mailchimp_form_format() {
    let fake = fake_with_list();
    fake.add_merge_field(LIST, MergeField::text("FNAME", false));
    let (base, hits) = receiver().await;
    let a = register(
        &fake,
        &format!("{base}/ok/all"),
        all_events(),
        json!({"user": true, "admin": true, "api": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    let mut seed = SeedMember::new("jane@example.com", Status::Pending);
    seed.merge_fields.insert("FNAME".into(), json!("Jane"));
    fake.insert_member(LIST, seed);

    let d = fake
        .confirm(LIST, "jane@example.com", "198.51.100.23")
        .await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].status, Some(200));
    let d = fake
        .update_profile(
            LIST,
            "jane@example.com",
            [("FNAME".to_owned(), json!("Janet"))].into(),
        )
        .await;
    assert_eq!(d[0].event_type, "profile");
    fake.unsubscribe_by_user(LIST, "jane@example.com", false)
        .await;
    fake.bounce(LIST, "jane@example.com").await;
    fake.change_email(LIST, "jane@example.com", "janet@example.com")
        .await;
    fake.fire(
        LIST,
        WebhookEvent::Campaign {
            id: "5aa2102003".into(),
            subject: "Hello".into(),
            status: "sent".into(),
            reason: String::new(),
        },
        Source::Admin,
    )
    .await;

    let hits = hits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let posts: Vec<&Hit> = hits.iter().filter(|h| h.method == "POST").collect();
    assert_eq!(posts.len(), 6);
    for p in &posts {
        assert_eq!(p.user_agent, "MailChimp.com");
        assert_eq!(p.content_type, "application/x-www-form-urlencoded");
        assert!(p.body.starts_with("type="), "{}", p.body);
        assert!(
            p.body.contains("data%5B"),
            "keys are form-encoded: {}",
            p.body
        );
        let f = form(&p.body);
        let fired = f.get("fired_at").cloned().unwrap_or_default();
        assert!(
            chrono::NaiveDateTime::parse_from_str(&fired, "%Y-%m-%d %H:%M:%S").is_ok(),
            "{fired}"
        );
        assert_eq!(f.get("data[list_id]").map(String::as_str), Some(LIST));
    }
    let f = form(&posts[0].body);
    assert_eq!(f["type"], "subscribe");
    assert_eq!(f["data[email]"], "jane@example.com");
    assert_eq!(f["data[ip_opt]"], "198.51.100.23");
    assert_eq!(f["data[merges][FNAME]"], "Jane");
    assert_eq!(f["data[merges][EMAIL]"], "jane@example.com");
    assert_eq!(f["data[email_type]"], "html");
    assert!(f.contains_key("data[id]") && f.contains_key("data[web_id]"));
    let f = form(&posts[1].body);
    assert_eq!(
        (f["type"].as_str(), f["data[merges][FNAME]"].as_str()),
        ("profile", "Janet")
    );
    let f = form(&posts[2].body);
    assert_eq!(f["type"], "unsubscribe");
    assert_eq!(f["data[action]"], "unsub");
    assert_eq!(f["data[reason]"], "manual");
    assert_eq!(f["data[email]"], "jane@example.com");
    let f = form(&posts[3].body);
    assert_eq!(
        (
            f["type"].as_str(),
            f["data[reason]"].as_str(),
            f["data[email]"].as_str()
        ),
        ("cleaned", "hard", "jane@example.com")
    );
    let f = form(&posts[4].body);
    assert_eq!(f["type"], "upemail");
    assert_eq!(f["data[old_email]"], "jane@example.com");
    assert_eq!(f["data[new_email]"], "janet@example.com");
    assert!(!f["data[new_id]"].is_empty());
    let f = form(&posts[5].body);
    assert_eq!(
        (
            f["type"].as_str(),
            f["data[id]"].as_str(),
            f["data[subject]"].as_str(),
            f["data[status]"].as_str()
        ),
        ("campaign", "5aa2102003", "Hello", "sent")
    );
    assert!(fake.member(LIST, "janet@example.com").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_honour_events_and_sources() {
    let fake = fake_with_list();
    let (base, hits) = receiver().await;
    // Not for API changes; no profile events; flags left out are false.
    let a = register(
        &fake,
        &format!("{base}/ok/people"),
        json!({"subscribe": true, "unsubscribe": true}),
        json!({"user": true, "admin": true, "api": false}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["events"]["profile"], false);
    assert_eq!(a.body["events"]["cleaned"], false);
    let a = register(
        &fake,
        &format!("{base}/ok/api"),
        all_events(),
        json!({"api": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["sources"]["user"], false);

    let body =
        |st: &str| json!({"email_address": "w@example.org", "status_if_new": st, "status": st});
    // One at a time: API events are delivered in the background.
    put_member(&fake, "w@example.org", body("subscribed")).await;
    fake.wait_for_deliveries(1, Duration::from_secs(5)).await;
    put_member(&fake, "w@example.org", body("unsubscribed")).await;
    fake.wait_for_deliveries(2, Duration::from_secs(5)).await;
    call(
        &fake,
        Method::PATCH,
        &format!("/lists/{LIST}/members/w@example.org"),
        Some(json!({"language": "de"})),
    )
    .await;
    assert_eq!(
        fake.wait_for_deliveries(3, Duration::from_secs(5))
            .await
            .len(),
        3
    );
    fake.insert_member(LIST, SeedMember::new("v@example.org", Status::Subscribed));
    fake.unsubscribe_by_user(LIST, "v@example.org", true).await;
    fake.update_profile(LIST, "v@example.org", BTreeMap::new())
        .await;
    fake.bounce(LIST, "v@example.org").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let hits = hits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let types = |path: &str| -> Vec<String> {
        hits.iter()
            .filter(|h| h.method == "POST" && h.path == path)
            .map(|h| form(&h.body).get("type").cloned().unwrap_or_default())
            .collect()
    };
    assert_eq!(
        types("/ok/api"),
        ["subscribe", "unsubscribe", "profile", "cleaned"]
    );
    assert_eq!(types("/ok/people"), ["unsubscribe"]);
    let abuse = hits
        .iter()
        .find(|h| h.path == "/ok/people" && h.method == "POST")
        .map(|h| form(&h.body));
    assert_eq!(
        abuse
            .and_then(|f| f.get("data[reason]").cloned())
            .as_deref(),
        Some("abuse")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_retried() {
    // First retry after 60 s × 0.001 = 60 ms.
    let fake = FakeMailchimp::start_with(MailchimpOptions {
        time_scale: 0.001,
        ..MailchimpOptions::default()
    });
    fake.add_list(LIST, "N");
    let (base, _hits) = receiver().await;
    let a = register(
        &fake,
        &format!("{base}/flaky/x"),
        all_events(),
        json!({"user": true, "admin": true, "api": true}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    fake.insert_member(LIST, SeedMember::new("r@example.org", Status::Subscribed));
    let first = fake.unsubscribe_by_user(LIST, "r@example.org", false).await;
    assert_eq!(first[0].status, Some(500));
    let all = fake.wait_for_deliveries(2, Duration::from_secs(5)).await;
    assert_eq!(all.len(), 2);
    assert_eq!((all[1].attempt, all[1].status), (2, Some(200)));
    assert_eq!(all[0].body, all[1].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_confirm_hook_works_over_http_and_fires_subscribe() {
    let fake = fake_with_list();
    let (base, hits) = receiver().await;
    let a = register(
        &fake,
        &format!("{base}/ok/c"),
        all_events(),
        json!({"user": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    let email = "click@example.org";
    put_member(
        &fake,
        email,
        json!({"email_address": email, "status_if_new": "pending"}),
    )
    .await;
    let url = format!(
        "{}/__fake/confirm/{LIST}/{}",
        fake.url(),
        subscriber_hash(email)
    );
    let a = send(client().post(&url).json(&json!({"ip": "192.0.2.9"}))).await;
    assert_eq!(a.status, 204);
    let m = fake.member(LIST, email).expect("member");
    assert_eq!(
        (m.status, m.ip_opt.as_str()),
        (Status::Subscribed, "192.0.2.9")
    );
    // Not pending any more.
    assert_eq!(send(client().post(&url)).await.status, 404);
    let d = fake.wait_for_deliveries(1, Duration::from_secs(5)).await;
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].event_type, "subscribe");
    let hits = hits.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let post = hits
        .iter()
        .find(|h| h.method == "POST")
        .map(|h| form(&h.body));
    assert_eq!(
        post.and_then(|f| f.get("data[ip_opt]").cloned()).as_deref(),
        Some("192.0.2.9")
    );
}

#[tokio::test]
async fn churn_mode_moves_members_while_a_client_pages() {
    let fake = fake_with_list();
    let old =
        chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600, 0).expect("old");
    for i in 0..5 {
        let mut seed = SeedMember::new(&format!("c{i}@example.org"), Status::Subscribed);
        seed.last_changed = Some(old);
        fake.insert_member(LIST, seed);
    }
    fake.with(|s| s.churn = 2);
    let path = format!("/lists/{LIST}/members?sort_field=last_changed&sort_dir=ASC&count=2");
    let first = get(&fake, &path).await;
    assert_eq!(first.body["total_items"], 5);
    let since = old.format("%Y-%m-%dT%H:%M:%S%%2B00:00").to_string();
    let moved = get(
        &fake,
        &format!("/lists/{LIST}/members?since_last_changed={since}&count=10"),
    )
    .await;
    // The first listing moved two members; the second answers before it churns.
    assert_eq!(moved.body["total_items"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_honour_the_admin_source_and_block_resubscribe() {
    let fake = fake_with_list();
    let (base, hits) = receiver().await;
    let a = register(
        &fake,
        &format!("{base}/ok/no-admin"),
        all_events(),
        json!({"user": true, "api": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    fake.insert_member(LIST, SeedMember::new("adm@example.org", Status::Subscribed));
    let d = fake.unsubscribe_by_admin(LIST, "adm@example.org").await;
    assert!(d.is_empty(), "{d:?}");
    assert!(
        hits.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .all(|h| h.method == "GET")
    );
    let a = put_member(&fake, "adm@example.org", json!({"email_address": "adm@example.org", "status_if_new": "subscribed", "status": "subscribed"})).await;
    assert_eq!(a.body["title"], "Member In Compliance State");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_carry_an_hmac_of_timestamp_and_body() {
    use hmac::{Hmac, Mac as _};
    let fake = FakeMailchimp::start_with(MailchimpOptions {
        webhook_signing: true,
        ..MailchimpOptions::default()
    });
    fake.add_list(LIST, "N");
    let (base, _hits) = receiver().await;
    let a = register(
        &fake,
        &format!("{base}/ok/signed"),
        all_events(),
        json!({"user": true}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["signing_enabled"], true);
    let secret = a.body["signing_secret"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(secret.len(), 40);
    // Shown once only.
    let listed = get(&fake, &format!("/lists/{LIST}/webhooks")).await;
    assert!(listed.body["webhooks"][0].get("signing_secret").is_none());
    assert_eq!(listed.body["webhooks"][0]["signing_enabled"], true);

    fake.insert_member(LIST, SeedMember::new("s@example.org", Status::Subscribed));
    let d = fake.unsubscribe_by_user(LIST, "s@example.org", false).await;
    let sig = d[0].signature.clone().expect("signed");
    let (t, v1) = sig
        .strip_prefix("t=")
        .and_then(|r| r.split_once(",v1="))
        .expect("t=…,v1=…");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{t}.{}", d[0].body).as_bytes());
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(v1, expected);

    // Unsigned by default.
    let plain = fake_with_list();
    register(
        &plain,
        &format!("{base}/ok/plain"),
        all_events(),
        json!({"user": true}),
    )
    .await;
    plain.insert_member(LIST, SeedMember::new("s@example.org", Status::Subscribed));
    let d = plain
        .unsubscribe_by_user(LIST, "s@example.org", false)
        .await;
    assert_eq!(d.len(), 1);
    assert!(d[0].signature.is_none());
}

#[tokio::test]
async fn garbage_input_never_gets_a_500() {
    let fake = fake_with_list();
    fake.add_merge_field(LIST, MergeField::number("AGE", false));
    fake.add_marketing_permission(LIST, "p1", "Email");
    let h = subscriber_hash("g@example.org");
    let cases: Vec<(Method, String, Option<&str>)> = vec![
        (Method::GET, "/lists/%FF%FE/members/%00".into(), None),
        (
            Method::GET,
            format!("/lists/{LIST}/members?count=99999999999999999999999"),
            None,
        ),
        (
            Method::GET,
            format!("/lists/{LIST}/members?offset=-1"),
            None,
        ),
        (
            Method::GET,
            format!("/lists/{LIST}/members?fields=,,.,members..id"),
            None,
        ),
        (
            Method::GET,
            format!("/lists/{LIST}/members?since_last_changed=%FF"),
            None,
        ),
        (Method::PUT, format!("/lists/{LIST}/members/{h}"), Some("")),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some("null"),
        ),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some(r#"{"email_address":"g@example.org","status_if_new":7}"#),
        ),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some(
                r#"{"email_address":"g@example.org","status_if_new":"subscribed","merge_fields":{"AGE":{"x":1}}}"#,
            ),
        ),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some(
                r#"{"email_address":"g@example.org","status_if_new":"subscribed","marketing_permissions":[1,"x",null]}"#,
            ),
        ),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some(r#"{"email_address":"@","status_if_new":"subscribed"}"#),
        ),
        (
            Method::PUT,
            format!("/lists/{LIST}/members/{h}"),
            Some(
                r#"{"email_address":"g@example.org","status_if_new":"subscribed","timestamp_opt":"2024-13-45T99:99:99+00:00"}"#,
            ),
        ),
        (
            Method::PATCH,
            format!("/lists/{LIST}/members/nobody"),
            Some("{}"),
        ),
        (
            Method::POST,
            format!("/lists/{LIST}"),
            Some(r#"{"members":"nope"}"#),
        ),
        (
            Method::POST,
            format!("/lists/{LIST}"),
            Some(r#"{"members":[1,null,"x",{}],"update_existing":"yes"}"#),
        ),
        (
            Method::POST,
            format!("/lists/{LIST}/webhooks"),
            Some(r#"{"url":"http://[::1"}"#),
        ),
        (
            Method::POST,
            format!("/lists/{LIST}/webhooks"),
            Some(r#"{"url":"ftp://x/y","events":[1]}"#),
        ),
        (
            Method::POST,
            format!("/lists/{LIST}/webhooks"),
            Some(r#"{"url":7,"events":{"subscribe":"yes"}}"#),
        ),
        (
            Method::DELETE,
            format!("/lists/{LIST}/members/{h}/actions/delete-permanent"),
            None,
        ),
    ];
    for (method, path, body) in cases {
        let mut rb = client()
            .request(method.clone(), format!("{}{path}", fake.api_root()))
            .basic_auth("u", Some(API_KEY));
        if let Some(b) = body {
            rb = rb.body(b.to_owned());
        }
        let a = send(rb).await;
        assert!(
            (400..500).contains(&a.status),
            "{method} {path} {body:?}: {} {}",
            a.status,
            a.body
        );
        assert!(a.body.get("title").is_some(), "{method} {path}: {}", a.body);
    }
    // Items that are not members fail one by one; the call itself succeeds.
    let a = call(
        &fake,
        Method::POST,
        &format!("/lists/{LIST}"),
        Some(json!({"members": [1, null, "x", {}]})),
    )
    .await;
    assert_eq!((a.status, a.body["error_count"].clone()), (200, json!(4)));
    let a = send(
        client()
            .get(format!("{}/ping", fake.api_root()))
            .header("authorization", "Basic %%%"),
    )
    .await;
    assert_eq!(a.status, 401);
    let a = send(
        client()
            .get(format!("{}/ping", fake.api_root()))
            .header("authorization", "Digest x"),
    )
    .await;
    assert_eq!(a.status, 401);
    assert_eq!(get(&fake, "/ping").await.status, 200);
}
