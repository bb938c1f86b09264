//! The fake HubSpot over real HTTP: every rule it claims to reproduce, each with a test that
//! fails if the rule breaks (auth and scopes, OAuth refresh, paging, the 10,000-result search
//! cap, search limits and lag, property validation, subscriptions, signed webhooks, rate
//! limits, faults, the request log).

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use optinsync_testkit::hubspot::{
    self, FakeHubSpot, Fault, PropertyDef, RateHeaders, WebhookEvent, scopes,
};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const C: &str = "/crm/v3/objects/contacts";

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
    text: String,
}

async fn call_as(
    fake: &FakeHubSpot,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), format!("{}{path}", fake.url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        text,
    }
}

async fn call(fake: &FakeHubSpot, method: &str, path: &str, body: Option<Value>) -> Answer {
    call_as(fake, Some(hubspot::PRIVATE_APP_TOKEN), method, path, body).await
}

fn ms(t: &str) -> i64 {
    DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis()
}

fn at(t: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc)
}

fn assert_envelope(a: &Answer, status: u16, category: &str) {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.body["status"], "error", "{}", a.text);
    assert_eq!(a.body["category"], category, "{}", a.text);
    assert!(
        a.body["correlationId"]
            .as_str()
            .is_some_and(|c| c.len() == 36),
        "{}",
        a.text
    );
    assert!(a.body["message"].is_string(), "{}", a.text);
}

// ------------------------------------------------------------------------------------------
// Auth
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn auth_needs_a_bearer_token_with_the_endpoints_scope() {
    let fake = FakeHubSpot::start();
    let a = call_as(&fake, None, "GET", C, None).await;
    assert_envelope(&a, 401, "INVALID_AUTHENTICATION");
    let a = call_as(&fake, Some("pat-na1-unknown"), "GET", C, None).await;
    assert_envelope(&a, 401, "INVALID_AUTHENTICATION");

    fake.add_token("pat-read-only", &[scopes::CONTACTS_READ]);
    let a = call_as(&fake, Some("pat-read-only"), "GET", C, None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = call_as(
        &fake,
        Some("pat-read-only"),
        "POST",
        C,
        Some(json!({"properties": {"email": "a@example.org"}})),
    )
    .await;
    assert_envelope(&a, 403, "MISSING_SCOPES");
    assert_eq!(
        a.body["errors"][0]["context"]["requiredGranularScopes"],
        json!(["crm.objects.contacts.write"])
    );
    assert!(fake.contacts().is_empty(), "a refused create wrote nothing");
    let a = call_as(
        &fake,
        Some("pat-read-only"),
        "GET",
        "/crm/v3/properties/contacts",
        None,
    )
    .await;
    assert_envelope(&a, 403, "MISSING_SCOPES");
    assert_eq!(
        a.body["errors"][0]["context"]["requiredGranularScopes"],
        json!(["crm.schemas.contacts.read"])
    );
    let a = call_as(
        &fake,
        Some("pat-read-only"),
        "GET",
        "/communication-preferences/v3/status/email/a@example.org",
        None,
    )
    .await;
    assert_envelope(&a, 403, "MISSING_SCOPES");
    assert_eq!(
        a.body["errors"][0]["context"]["requiredGranularScopes"],
        json!([
            "communication_preferences.read",
            "communication_preferences.read_write"
        ])
    );
    // Search needs the read scope only.
    let a = call_as(
        &fake,
        Some("pat-read-only"),
        "POST",
        &format!("{C}/search"),
        Some(json!({})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
}

async fn refresh(fake: &FakeHubSpot, version: &str, refresh_token: &str, secret: &str) -> Answer {
    let resp = reqwest::Client::new()
        .post(format!("{}/oauth/{version}/token", fake.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", hubspot::CLIENT_ID),
            ("client_secret", secret),
            ("refresh_token", refresh_token),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

#[tokio::test]
async fn oauth_refresh_issues_expiring_tokens_and_rotates_the_refresh_token() {
    let fake = FakeHubSpot::start();
    let a = refresh(&fake, "v1", hubspot::REFRESH_TOKEN, "wrong-secret").await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.body["status"], "BAD_CLIENT_SECRET");

    let a = refresh(&fake, "v1", hubspot::REFRESH_TOKEN, hubspot::CLIENT_SECRET).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["expires_in"], 1800);
    assert_eq!(a.body["token_type"], "bearer");
    let access = a.body["access_token"].as_str().unwrap().to_owned();
    let next_refresh = a.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(next_refresh, hubspot::REFRESH_TOKEN);
    assert_eq!(
        call_as(&fake, Some(&access), "GET", C, None).await.status,
        200
    );

    // The old refresh token was rotated away.
    let a = refresh(&fake, "v1", hubspot::REFRESH_TOKEN, hubspot::CLIENT_SECRET).await;
    assert_eq!(a.status, 400, "{}", a.text);
    assert_eq!(a.body["status"], "BAD_REFRESH_TOKEN");
    let a = refresh(&fake, "v3", &next_refresh, hubspot::CLIENT_SECRET).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["hub_id"], hubspot::PORTAL_ID);
    assert!(
        a.body["scopes"]
            .as_array()
            .unwrap()
            .contains(&json!("crm.objects.contacts.read"))
    );
    assert_eq!(fake.token_requests(), 4);

    fake.expire_tokens();
    let a = call_as(&fake, Some(&access), "GET", C, None).await;
    assert_envelope(&a, 401, "EXPIRED_AUTHENTICATION");
    // Private-app tokens do not expire.
    assert_eq!(call(&fake, "GET", C, None).await.status, 200);
}

// ------------------------------------------------------------------------------------------
// Contacts
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_pages_with_limit_and_an_opaque_after_cursor() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let seeded = fake.seed_same_time(250, at("2024-05-01T00:00:00Z"));
    let mut got = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = Vec::new();
    loop {
        let mut path = format!("{C}?limit=100");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let a = call(&fake, "GET", &path, None).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let results = a.body["results"].as_array().unwrap();
        pages.push(results.len());
        for r in results {
            got.push(r["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
        match a.body["paging"]["next"]["after"].as_str() {
            Some(next) => {
                assert!(
                    a.body["paging"]["next"]["link"]
                        .as_str()
                        .unwrap()
                        .contains(next)
                );
                assert!(
                    next.parse::<u64>().is_err(),
                    "the cursor is opaque, not an id: {next}"
                );
                after = Some(next.to_owned());
            }
            None => {
                assert!(a.body.get("paging").is_none(), "no paging on the last page");
                break;
            }
        }
    }
    assert_eq!(pages, [100, 100, 50]);
    assert_eq!(got, seeded);

    let a = call(&fake, "GET", &format!("{C}?limit=101"), None).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    let a = call(&fake, "GET", &format!("{C}?after=513"), None).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    // Default limit is 10.
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.body["results"].as_array().unwrap().len(), 10);

    // Default properties; explicit ones with null for unset; the always-returned three.
    let r = &a.body["results"][0];
    assert_eq!(r["properties"]["email"], "person0@example.org");
    assert_eq!(r["properties"]["firstname"], "P0");
    assert!(r["properties"].get("hs_legal_basis").is_none());
    assert_eq!(
        r["properties"]["lastmodifieddate"],
        "2024-05-01T00:00:00.000Z"
    );
    assert_eq!(r["properties"]["hs_object_id"], r["id"]);
    assert_eq!(r["createdAt"], "2024-05-01T00:00:00.000Z");
    assert_eq!(r["archived"], false);
    let a = call(
        &fake,
        "GET",
        &format!("{C}?limit=1&properties=email,hs_legal_basis"),
        None,
    )
    .await;
    let p = &a.body["results"][0]["properties"];
    assert_eq!(p["hs_legal_basis"], Value::Null);
    assert!(p.get("firstname").is_none());
    assert!(
        p["createdate"].is_string()
            && p["lastmodifieddate"].is_string()
            && p["hs_object_id"].is_string()
    );

    // Archived contacts are listed only with archived=true.
    fake.archive(seeded[0]);
    let a = call(&fake, "GET", &format!("{C}?limit=1"), None).await;
    assert_eq!(a.body["results"][0]["id"], seeded[1].to_string());
    let a = call(&fake, "GET", &format!("{C}?archived=true"), None).await;
    let results = a.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["archived"], true);
    assert!(results[0]["archivedAt"].is_string());
}

#[tokio::test]
async fn the_date_based_path_serves_the_same_contacts() {
    let fake = FakeHubSpot::start();
    let id = fake.insert(json!({"email": "dated@example.org"}));
    let a = call(
        &fake,
        "GET",
        &format!("/crm/objects/2026-03/contacts/{id}"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["properties"]["email"], "dated@example.org");
    assert_eq!(fake.calls("GET /crm/v3/objects/contacts/{contactId}"), 1);
    let a = call(&fake, "GET", "/crm/objects/latest/contacts", None).await;
    assert_eq!(a.status, 404);
}

#[tokio::test]
async fn get_by_id_or_by_email_and_404_with_the_error_envelope() {
    let fake = FakeHubSpot::start();
    let id = fake.insert(json!({"email": "Jane@Example.org", "firstname": "Jane"}));
    let a = call(
        &fake,
        "GET",
        &format!("{C}/{id}?properties=email,firstname"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["id"], id.to_string());
    assert_eq!(a.body["properties"]["email"], "jane@example.org");
    let a = call(
        &fake,
        "GET",
        &format!("{C}/JANE%40example.org?idProperty=email"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["id"], id.to_string());
    // Without idProperty an email is not an id.
    let a = call(&fake, "GET", &format!("{C}/jane@example.org"), None).await;
    assert_envelope(&a, 404, "OBJECT_NOT_FOUND");
    let a = call(&fake, "GET", &format!("{C}/999999999"), None).await;
    assert_envelope(&a, 404, "OBJECT_NOT_FOUND");
    fake.archive(id);
    let a = call(&fake, "GET", &format!("{C}/{id}"), None).await;
    assert_envelope(&a, 404, "OBJECT_NOT_FOUND");
    let a = call(&fake, "GET", &format!("{C}/{id}?archived=true"), None).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn create_update_and_every_write_bumps_lastmodifieddate() {
    let fake = FakeHubSpot::start();
    let a = call(
        &fake,
        "POST",
        C,
        Some(json!({"properties": {"email": "New@Example.org", "firstname": "N"}})),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert_eq!(a.body["properties"]["hs_object_id"], id);
    let created = a.body["properties"]["lastmodifieddate"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(a.body["properties"]["createdate"], created);

    let a = call(
        &fake,
        "POST",
        C,
        Some(json!({"properties": {"email": "new@example.ORG"}})),
    )
    .await;
    assert_envelope(&a, 409, "CONFLICT");
    assert_eq!(
        a.body["message"],
        format!("Contact already exists. Existing ID: {id}")
    );

    tokio::time::sleep(Duration::from_millis(5)).await;
    let a = call(
        &fake,
        "PATCH",
        &format!("{C}/{id}"),
        Some(json!({"properties": {"firstname": "N"}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let after_own_write = a.body["properties"]["lastmodifieddate"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        ms(&after_own_write) > ms(&created),
        "same value, still bumped"
    );

    // By email; an empty string clears.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let a = call(
        &fake,
        "PATCH",
        &format!("{C}/new@example.org?idProperty=email"),
        Some(json!({"properties": {"firstname": ""}})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = call(
        &fake,
        "GET",
        &format!("{C}/{id}?properties=firstname"),
        None,
    )
    .await;
    assert_eq!(a.body["properties"]["firstname"], Value::Null);
    assert!(ms(a.body["updatedAt"].as_str().unwrap()) > ms(&after_own_write));

    let a = call(
        &fake,
        "PATCH",
        &format!("{C}/424242"),
        Some(json!({"properties": {}})),
    )
    .await;
    assert_envelope(&a, 404, "OBJECT_NOT_FOUND");
}

#[tokio::test]
async fn property_validation_refuses_unknown_read_only_and_invalid_values() {
    let fake = FakeHubSpot::start();
    let id = fake.insert(json!({"email": "v@example.org"}));
    let before = fake.contact(id).unwrap();
    let patch = |props: Value| {
        let fake = &fake;
        async move {
            call(
                fake,
                "PATCH",
                &format!("{C}/{id}"),
                Some(json!({ "properties": props })),
            )
            .await
        }
    };

    let a = patch(json!({"hs_email_optout": "true"})).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert_eq!(a.body["errors"][0]["code"], "READ_ONLY_VALUE");
    assert_eq!(
        a.body["errors"][0]["context"]["propertyName"],
        json!(["hs_email_optout"])
    );
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .starts_with("Property values were not valid: ")
    );
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("is a read only property")
    );
    for read_only in [
        "lastmodifieddate",
        "createdate",
        "hs_object_id",
        "hs_marketable_status",
    ] {
        let a = patch(json!({ read_only: "1" })).await;
        assert_eq!(
            a.body["errors"][0]["code"], "READ_ONLY_VALUE",
            "{read_only}: {}",
            a.text
        );
    }
    let a = patch(json!({"favourite_colour": "blue", "firstname": "V"})).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert_eq!(a.body["errors"][0]["code"], "PROPERTY_DOESNT_EXIST");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("favourite_colour")
    );
    let a = patch(json!({"firstname": true})).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    let a = patch(json!({"email": "not-an-email"})).await;
    assert_eq!(a.body["errors"][0]["code"], "INVALID_EMAIL", "{}", a.text);
    assert_eq!(
        fake.contact(id).unwrap(),
        before,
        "refused writes change nothing"
    );

    // Seeded custom properties: multiple checkboxes and a single checkbox.
    fake.add_property(PropertyDef::checkboxes(
        "optinsync_channels",
        "Channels",
        &[("Email", "email"), ("Post", "post")],
    ));
    fake.add_property(PropertyDef::boolean(
        "optinsync_doi_confirmed",
        "DOI confirmed",
    ));
    let a = patch(json!({"optinsync_channels": "email;fax"})).await;
    assert_eq!(a.body["errors"][0]["code"], "INVALID_OPTION", "{}", a.text);
    let a = patch(json!({"optinsync_doi_confirmed": "yes"})).await;
    assert_eq!(a.body["errors"][0]["code"], "INVALID_BOOLEAN", "{}", a.text);
    let a =
        patch(json!({"hs_legal_basis": "Freely given consent from contact;Not applicable"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a =
        patch(json!({"optinsync_channels": "email;post", "optinsync_doi_confirmed": "true"})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let c = fake.contact(id).unwrap();
    assert_eq!(c["properties"]["optinsync_channels"], "email;post");
    assert_eq!(c["properties"]["optinsync_doi_confirmed"], "true");
}

#[tokio::test]
async fn batch_read_update_upsert_with_207_for_missing_ids() {
    let fake = FakeHubSpot::start();
    let a_id = fake.insert(json!({"email": "a@example.org"}));
    let b_id = fake.insert(json!({"email": "b@example.org"}));
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/read"),
        Some(
            json!({"idProperty": "email", "properties": ["email", "hs_legal_basis"],
                    "inputs": [{"id": "a@example.org"}, {"id": "nobody@example.org"}]}),
        ),
    )
    .await;
    assert_eq!(a.status, 207, "{}", a.text);
    assert_eq!(a.body["status"], "COMPLETE");
    assert_eq!(a.body["results"].as_array().unwrap().len(), 1);
    assert_eq!(a.body["results"][0]["id"], a_id.to_string());
    assert_eq!(
        a.body["results"][0]["properties"]["hs_legal_basis"],
        Value::Null
    );
    assert_eq!(a.body["numErrors"], 1);
    assert_eq!(a.body["errors"][0]["category"], "OBJECT_NOT_FOUND");
    assert_eq!(
        a.body["errors"][0]["context"]["ids"],
        json!(["nobody@example.org"])
    );
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/read"),
        Some(json!({"inputs": [{"id": a_id.to_string()}, {"id": b_id.to_string()}], "properties": ["email"]})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.body.get("errors").is_none());

    let too_many: Vec<Value> = (0..101).map(|i| json!({"id": i.to_string()})).collect();
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/read"),
        Some(json!({"inputs": too_many})),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");

    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/update"),
        Some(json!({"inputs": [
            {"id": a_id.to_string(), "properties": {"firstname": "A"}},
            {"id": "b@example.org", "idProperty": "email", "properties": {"firstname": "B"}},
            {"id": "999999999", "properties": {"firstname": "Z"}}]})),
    )
    .await;
    assert_eq!(a.status, 207, "{}", a.text);
    assert_eq!(a.body["errors"][0]["context"]["ids"], json!(["999999999"]));
    assert_eq!(fake.contact(a_id).unwrap()["properties"]["firstname"], "A");
    assert_eq!(fake.contact(b_id).unwrap()["properties"]["firstname"], "B");

    // One invalid input refuses the whole batch.
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/update"),
        Some(json!({"inputs": [
            {"id": a_id.to_string(), "properties": {"firstname": "AA"}},
            {"id": b_id.to_string(), "properties": {"hs_email_optout": "true"}}]})),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert_eq!(fake.contact(a_id).unwrap()["properties"]["firstname"], "A");
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/update"),
        Some(json!({"inputs": [
            {"id": a_id.to_string(), "properties": {"firstname": "1"}},
            {"id": "a@example.org", "idProperty": "email", "properties": {"firstname": "2"}}]})),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert!(a.body["message"].as_str().unwrap().contains("Duplicate"));

    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/upsert"),
        Some(json!({"inputs": [
            {"id": "a@example.org", "idProperty": "email", "properties": {"lastname": "Upd"}},
            {"id": "C@example.org", "idProperty": "email", "properties": {"firstname": "C"}}]})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let results = a.body["results"].as_array().unwrap();
    assert_eq!(results[0]["new"], false);
    assert_eq!(results[1]["new"], true);
    assert_eq!(results[1]["properties"]["email"], "c@example.org");
    assert_eq!(fake.contact(a_id).unwrap()["properties"]["lastname"], "Upd");
    assert_eq!(fake.contacts().len(), 3);
}

#[tokio::test]
async fn seeding_with_explicit_lastmodifieddate_edit_archive_and_gdpr_delete() {
    let fake = FakeHubSpot::start();
    let id = fake.insert_at(
        json!({"email": "s@example.org"}),
        at("2020-02-02T02:02:02.123Z"),
    );
    let c = fake.contact(id).unwrap();
    assert_eq!(
        c["properties"]["lastmodifieddate"],
        "2020-02-02T02:02:02.123Z"
    );
    assert_eq!(c["properties"]["createdate"], "2020-02-02T02:02:02.123Z");
    fake.edit(id, json!({"firstname": "Edited"}));
    let c = fake.contact(id).unwrap();
    assert_eq!(c["properties"]["firstname"], "Edited");
    assert!(ms(c["properties"]["lastmodifieddate"].as_str().unwrap()) > ms("2026-01-01T00:00:00Z"));
    let a = call(
        &fake,
        "GET",
        &format!("{C}/{id}?propertiesWithHistory=firstname"),
        None,
    )
    .await;
    assert_eq!(
        a.body["propertiesWithHistory"]["firstname"][0]["value"],
        "Edited"
    );

    let a = call(&fake, "DELETE", &format!("{C}/{id}"), None).await;
    assert_eq!(a.status, 204);
    assert_eq!(fake.contact(id).unwrap()["archived"], true);
    let a = call(
        &fake,
        "POST",
        &format!("{C}/gdpr-delete"),
        Some(json!({"objectId": "s@example.org", "idProperty": "email"})),
    )
    .await;
    assert_eq!(a.status, 204, "{}", a.text);
    assert!(fake.contact(id).is_none());
}

// ------------------------------------------------------------------------------------------
// Search
// ------------------------------------------------------------------------------------------

async fn search(fake: &FakeHubSpot, body: Value) -> Answer {
    call(fake, "POST", &format!("{C}/search"), Some(body)).await
}

fn ids(a: &Answer) -> Vec<u64> {
    a.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn search_filters_on_lastmodifieddate_and_sorts() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let times = [
        "2024-05-01T00:00:00Z",
        "2024-05-01T00:00:01Z",
        "2024-05-01T00:00:02Z",
        "2024-05-01T00:00:03Z",
        "2024-05-01T00:00:04Z",
    ];
    // Inserted newest first, so id order and time order differ.
    let mut by_time: Vec<u64> = times
        .iter()
        .rev()
        .enumerate()
        .map(|(i, t)| fake.insert_at(json!({"email": format!("s{i}@example.org")}), at(t)))
        .collect();
    by_time.reverse();
    let t2 = ms(times[2]).to_string();
    let one = |op: &str, extra: Value| {
        let mut f = json!({"propertyName": "lastmodifieddate", "operator": op, "value": t2});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                f[k] = v;
            }
        }
        json!({"filterGroups": [{"filters": [f]}],
               "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
               "properties": ["email", "lastmodifieddate"], "limit": 100})
    };
    let a = search(&fake, one("GTE", json!({}))).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(ids(&a), by_time[2..]);
    assert_eq!(a.body["total"], 3);
    assert!(a.body.get("paging").is_none());
    assert_eq!(
        ids(&search(&fake, one("GT", json!({}))).await),
        by_time[3..]
    );
    assert_eq!(
        ids(&search(&fake, one("LT", json!({}))).await),
        by_time[..2]
    );
    assert_eq!(
        ids(&search(&fake, one("EQ", json!({}))).await),
        by_time[2..3]
    );
    let between = one(
        "BETWEEN",
        json!({"value": ms(times[1]).to_string(), "highValue": ms(times[3]).to_string()}),
    );
    assert_eq!(ids(&search(&fake, between).await), by_time[1..4]);
    // ISO values work too.
    let mut iso = one("GTE", json!({}));
    iso["filterGroups"][0]["filters"][0]["value"] = json!(times[3]);
    assert_eq!(ids(&search(&fake, iso).await), by_time[3..]);
    // Descending; groups are OR.
    let mut desc = one("LT", json!({}));
    desc["sorts"][0]["direction"] = json!("DESCENDING");
    desc["filterGroups"]
        .as_array_mut()
        .unwrap()
        .push(json!({"filters": [{"propertyName": "email", "operator": "EQ", "value": "S0@example.org"}]}));
    let mut expected = vec![by_time[4], by_time[1], by_time[0]];
    expected.dedup();
    assert_eq!(ids(&search(&fake, desc).await), expected);
    // Paging with limit/after.
    let mut paged = one("GTE", json!({}));
    paged["limit"] = json!(2);
    let a = search(&fake, paged.clone()).await;
    assert_eq!(ids(&a), by_time[2..4]);
    assert_eq!(a.body["paging"]["next"]["after"], "2");
    paged["after"] = json!("2");
    assert_eq!(ids(&search(&fake, paged).await), by_time[4..]);
    // Default properties when none are named.
    let a = search(&fake, json!({"limit": 1})).await;
    let p = a.body["results"][0]["properties"].as_object().unwrap();
    let keys: Vec<&str> = p.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "createdate",
            "email",
            "firstname",
            "hs_object_id",
            "lastmodifieddate",
            "lastname"
        ]
    );
}

#[tokio::test]
async fn search_refuses_what_hubspot_refuses() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let f = json!({"propertyName": "email", "operator": "HAS_PROPERTY"});
    let cases = [
        json!({"limit": 101}),
        json!({"limit": 0}),
        json!({"after": "not-a-number"}),
        json!({"after": usize::MAX.to_string()}),
        json!({"sorts": [{"propertyName": "email"}, {"propertyName": "lastmodifieddate"}]}),
        json!({"sorts": ["lastmodifieddate"]}),
        json!({"filterGroups": [{"filters": [f]}, {"filters": [f]}, {"filters": [f]}, {"filters": [f]}]}),
        json!({"filterGroups": [{"filters": [f, f, f, f]}]}),
        json!({"filterGroups": [{"filters": [{"propertyName": "no_such_property", "operator": "EQ", "value": "x"}]}]}),
        json!({"filterGroups": [{"filters": [{"propertyName": "email", "operator": "LIKE", "value": "x"}]}]}),
        json!({"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate", "operator": "BETWEEN", "value": "1"}]}]}),
        json!({"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": "yesterday"}]}]}),
    ];
    for body in cases {
        let a = search(&fake, body.clone()).await;
        assert_eq!(a.status, 400, "{body} → {}", a.text);
        assert_eq!(a.body["category"], "VALIDATION_ERROR");
    }
    // The 200 page size is a setting (the newer documentation's maximum).
    fake.with(|s| s.search_max_limit = 200);
    assert_eq!(search(&fake, json!({"limit": 200})).await.status, 200);
}

#[tokio::test]
async fn search_stops_at_10000_results_and_a_keyset_cursor_gets_every_contact_once() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let t = at("2024-05-01T12:00:00Z");
    let seeded = fake.seed_same_time(10_050, t);
    let since = t.timestamp_millis().to_string();
    let body = |after: usize| {
        json!({"filterGroups": [{"filters": [{"propertyName": "lastmodifieddate", "operator": "GTE", "value": since}]}],
               "sorts": [{"propertyName": "lastmodifieddate", "direction": "ASCENDING"}],
               "properties": ["email"], "limit": 100, "after": after.to_string()})
    };
    let a = search(&fake, body(9_900)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["total"], 10_050);
    assert_eq!(a.body["results"].as_array().unwrap().len(), 100);
    assert_eq!(
        a.body["paging"]["next"]["after"], "10000",
        "HubSpot offers the cursor..."
    );
    let a = search(&fake, body(10_000)).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR"); // ...and refuses it
    let mut past = body(9_950);
    past["limit"] = json!(100);
    assert_eq!(search(&fake, past).await.status, 400);

    // The documented way out: within one timestamp, page on hs_object_id with new searches.
    let mut got: Vec<u64> = Vec::new();
    let mut last_id = 0u64;
    loop {
        let mut after = 0usize;
        let mut last_page_full = false;
        loop {
            let q = json!({"filterGroups": [{"filters": [
                    {"propertyName": "lastmodifieddate", "operator": "EQ", "value": since},
                    {"propertyName": "hs_object_id", "operator": "GT", "value": last_id.to_string()}]}],
                "sorts": [{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                "properties": ["email"], "limit": 100, "after": after.to_string()});
            let a = search(&fake, q).await;
            assert_eq!(a.status, 200, "{}", a.text);
            let page = ids(&a);
            got.extend(&page);
            match a.body["paging"]["next"]["after"].as_str() {
                Some(next) if next.parse::<usize>().unwrap() < 10_000 => {
                    after = next.parse().unwrap();
                }
                Some(_) => {
                    last_page_full = true;
                    break;
                }
                None => break,
            }
        }
        if !last_page_full {
            break;
        }
        last_id = *got.last().unwrap();
    }
    assert_eq!(got.len(), 10_050);
    assert_eq!(got, seeded, "every contact exactly once, in id order");
}

#[tokio::test]
async fn search_has_its_own_per_second_limit_and_no_rate_headers() {
    let fake = FakeHubSpot::start();
    fake.with(|s| {
        s.search_lag = Duration::ZERO;
        s.time_scale = 2.0; // a 2 s "second", so a slow machine still fits 5 calls in it
    });
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let a = search(&fake, json!({})).await;
        assert!(
            !a.headers
                .keys()
                .any(|k| k.as_str().starts_with("x-hubspot-ratelimit")),
            "search answers carry no rate-limit headers: {:?}",
            a.headers
        );
        if a.status == 429 {
            assert_eq!(a.body["message"], "You have reached your secondly limit.");
            assert_eq!(a.body["policyName"], "SECONDLY");
            assert_eq!(a.body["errorType"], "RATE_LIMIT");
        }
        statuses.push(a.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429],
        "4 per second by default"
    );
    // Other endpoints are not held back by the search limit, and carry the headers.
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 200);
    assert!(a.headers.contains_key("X-HubSpot-RateLimit-Remaining"));
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(search(&fake, json!({})).await.status, 200);
}

#[tokio::test]
async fn search_lags_writes_while_get_sees_them_at_once() {
    let fake = FakeHubSpot::start();
    fake.with(|s| {
        s.search_lag = Duration::from_millis(1_500);
        s.search_per_second = 100;
    });
    let by_name = |name: &str| json!({"filterGroups": [{"filters": [{"propertyName": "firstname", "operator": "EQ", "value": name}]}]});
    let a = call(
        &fake,
        "POST",
        C,
        Some(json!({"properties": {"email": "lag@example.org", "firstname": "Old"}})),
    )
    .await;
    let id = a.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        search(&fake, by_name("Old")).await.body["total"],
        0,
        "not indexed yet"
    );
    assert_eq!(
        call(&fake, "GET", &format!("{C}/{id}"), None).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert_eq!(search(&fake, by_name("Old")).await.body["total"], 1);

    call(
        &fake,
        "PATCH",
        &format!("{C}/{id}"),
        Some(json!({"properties": {"firstname": "New"}})),
    )
    .await;
    let a = search(&fake, by_name("Old")).await;
    assert_eq!(a.body["total"], 1, "search still sees the old version");
    assert_eq!(a.body["results"][0]["properties"]["firstname"], "Old");
    assert_eq!(search(&fake, by_name("New")).await.body["total"], 0);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert_eq!(search(&fake, by_name("Old")).await.body["total"], 0);
    assert_eq!(search(&fake, by_name("New")).await.body["total"], 1);

    // Archived contacts leave search (after the lag too).
    fake.with(|s| s.search_lag = Duration::ZERO);
    call(&fake, "DELETE", &format!("{C}/{id}"), None).await;
    assert_eq!(search(&fake, by_name("New")).await.body["total"], 0);
}

// ------------------------------------------------------------------------------------------
// Properties
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn properties_lists_the_definitions_and_seeded_custom_ones() {
    let fake = FakeHubSpot::start();
    fake.add_property(PropertyDef::boolean("optinsync_doi", "DOI confirmed"));
    let a = call(&fake, "GET", "/crm/v3/properties/contacts", None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let all = a.body["results"].as_array().unwrap();
    let find = |n: &str| all.iter().find(|p| p["name"] == n).cloned().unwrap();
    assert_eq!(
        find("hs_email_optout")["modificationMetadata"]["readOnlyValue"],
        true
    );
    let legal = find("hs_legal_basis");
    assert_eq!(legal["type"], "enumeration");
    assert_eq!(legal["fieldType"], "checkbox");
    assert_eq!(legal["options"].as_array().unwrap().len(), 5);
    assert_eq!(find("optinsync_doi")["fieldType"], "booleancheckbox");
    assert_eq!(find("optinsync_doi")["hubspotDefined"], false);
    let a = call(
        &fake,
        "GET",
        "/crm/v3/properties/contacts/optinsync_doi",
        None,
    )
    .await;
    assert_eq!(a.body["options"][0]["value"], "true");
    let a = call(
        &fake,
        "GET",
        "/crm/v3/properties/contacts/nothing_here",
        None,
    )
    .await;
    assert_envelope(&a, 404, "OBJECT_NOT_FOUND");
}

// ------------------------------------------------------------------------------------------
// Communication preferences
// ------------------------------------------------------------------------------------------

#[tokio::test]
async fn subscriptions_need_a_legal_basis_and_unsubscribe_is_final_in_v3() {
    let fake = FakeHubSpot::start();
    let id = fake.insert(json!({"email": "doi@example.org"}));
    let sub = "/communication-preferences/v3/subscribe";
    let unsub = "/communication-preferences/v3/unsubscribe";
    let a = call(
        &fake,
        "POST",
        sub,
        Some(json!({"legalBasis": "CONSENT_WITH_NOTICE"})),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .ends_with("[emailAddress, subscriptionId]")
    );
    let a = call(
        &fake,
        "POST",
        sub,
        Some(json!({"emailAddress": "doi@example.org", "subscriptionId": "7"})),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert!(a.body["message"].as_str().unwrap().contains("legalBasis"));
    let a = call(
        &fake,
        "POST",
        sub,
        Some(json!({"emailAddress": "doi@example.org", "subscriptionId": "7", "legalBasis": "CONSENT_WITH_NOTICE"})),
    )
    .await;
    assert!(
        a.body["message"]
            .as_str()
            .unwrap()
            .contains("legalBasisExplanation"),
        "{}",
        a.text
    );
    let a = call(
        &fake,
        "POST",
        sub,
        Some(
            json!({"emailAddress": "doi@example.org", "subscriptionId": "7",
                    "legalBasis": "BECAUSE", "legalBasisExplanation": "x"}),
        ),
    )
    .await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    let good = json!({"emailAddress": "doi@example.org", "subscriptionId": "7",
                      "legalBasis": "CONSENT_WITH_NOTICE", "legalBasisExplanation": "Double opt-in confirmed 2024-05-01"});
    let a = call(&fake, "POST", sub, Some(good.clone())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["status"], "SUBSCRIBED");
    assert_eq!(a.body["id"], "7");
    let a = call(
        &fake,
        "GET",
        "/communication-preferences/v3/status/email/doi@example.org",
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["recipient"], "doi@example.org");
    let st = a.body["subscriptionStatuses"].as_array().unwrap();
    let seven = st.iter().find(|s| s["id"] == "7").unwrap();
    assert_eq!(seven["status"], "SUBSCRIBED");
    assert_eq!(seven["legalBasis"], "CONSENT_WITH_NOTICE");
    assert_eq!(
        seven["legalBasisExplanation"],
        "Double opt-in confirmed 2024-05-01"
    );
    assert_eq!(seven["sourceOfStatus"], "SUBSCRIPTION_STATUS");
    assert_eq!(
        fake.subscription_status("DOI@example.org")["subscriptionStatuses"],
        a.body["subscriptionStatuses"]
    );
    // Subscribing again is refused (no change).
    assert_eq!(
        call(&fake, "POST", sub, Some(good.clone())).await.status,
        400
    );

    let a = call(&fake, "POST", unsub, Some(good.clone())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["status"], "NOT_SUBSCRIBED");
    assert_eq!(
        fake.contact(id).unwrap()["properties"]["hs_email_optout_7"],
        "true"
    );
    // Final through v3.
    let a = call(&fake, "POST", sub, Some(good.clone())).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR");
    assert!(
        a.body["message"].as_str().unwrap().contains("opted out"),
        "{}",
        a.text
    );
    assert_eq!(
        fake.subscription_status("doi@example.org")["subscriptionStatuses"][0]["status"],
        "NOT_SUBSCRIBED"
    );

    // v4 may re-subscribe, saying so; a repeat changes nothing.
    let v4 = "/communication-preferences/v4/statuses/doi@example.org";
    let body = json!({"channel": "EMAIL", "subscriptionId": 7, "statusState": "SUBSCRIBED",
                      "legalBasis": "CONSENT_WITH_NOTICE", "legalBasisExplanation": "Confirmed again by DOI"});
    let a = call(&fake, "POST", v4, Some(body.clone())).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.body["setStatusSuccessReason"], "RESUBSCRIBE_OCCURRED");
    assert_eq!(a.body["status"], "SUBSCRIBED");
    let a = call(&fake, "POST", v4, Some(body)).await;
    assert_eq!(a.body["setStatusSuccessReason"], "NO_STATUS_CHANGE");
    let a = call(&fake, "GET", v4, None).await;
    assert_envelope(&a, 400, "VALIDATION_ERROR"); // channel is required
    let a = call(&fake, "GET", &format!("{v4}?channel=EMAIL"), None).await;
    assert_eq!(a.body["results"][0]["status"], "SUBSCRIBED");
    assert_eq!(a.body["results"][1]["status"], "NOT_SPECIFIED");

    // Unsubscribe from all: portal-wide, hs_email_optout, and v3 cannot undo it.
    let a = call(
        &fake,
        "POST",
        &format!("{v4}/unsubscribe-all?channel=EMAIL"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = call(
        &fake,
        "GET",
        &format!("{v4}/unsubscribe-all?channel=EMAIL"),
        None,
    )
    .await;
    assert_eq!(a.body["results"][0]["wideStatusType"], "PORTAL_WIDE");
    assert_eq!(
        fake.contact(id).unwrap()["properties"]["hs_email_optout"],
        "true"
    );
    let st = fake.subscription_status("doi@example.org");
    assert_eq!(
        st["subscriptionStatuses"][0]["sourceOfStatus"],
        "PORTAL_WIDE_STATUS"
    );
    assert_eq!(st["subscriptionStatuses"][0]["status"], "NOT_SUBSCRIBED");
    let mut nine = good.clone();
    nine["subscriptionId"] = json!("9");
    assert_eq!(call(&fake, "POST", sub, Some(nine)).await.status, 400);

    // Outside GDPR the legal basis is optional; an unknown type is refused.
    fake.with(|s| s.gdpr_enabled = false);
    let a = call(
        &fake,
        "POST",
        sub,
        Some(json!({"emailAddress": "other@example.org", "subscriptionId": "7"})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = call(
        &fake,
        "POST",
        sub,
        Some(json!({"emailAddress": "other@example.org", "subscriptionId": "12345"})),
    )
    .await;
    assert_eq!(a.status, 400);
    fake.unsubscribe_all("other@example.org");
    let a = call(
        &fake,
        "POST",
        unsub,
        Some(json!({"emailAddress": "other@example.org", "subscriptionId": "7"})),
    )
    .await;
    assert_eq!(a.status, 400, "already out: {}", a.text);
}

// ------------------------------------------------------------------------------------------
// Webhooks
// ------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(HeaderMap, String)>>>);

/// A receiver on loopback answering the queued statuses (then 200), each after `delay`.
async fn receiver(statuses: Vec<u16>, delay: Duration) -> (String, Received) {
    use axum::http::StatusCode;
    let received = Received::default();
    let queue = Arc::new(Mutex::new(statuses));
    let rec = received.clone();
    let app = axum::Router::new().route(
        "/hubspot/webhook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let rec = rec.clone();
            let queue = Arc::clone(&queue);
            async move {
                let mut h = HeaderMap::new();
                for (k, v) in &headers {
                    h.insert(k.clone(), v.clone());
                }
                rec.0.lock().unwrap().push((h, body));
                tokio::time::sleep(delay).await;
                let mut q = queue.lock().unwrap();
                let code = if q.is_empty() { 200 } else { q.remove(0) };
                StatusCode::from_u16(code).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}/hubspot/webhook"), received)
}

/// The v3 signature, computed here from the documented recipe.
fn v3(secret: &str, method: &str, uri: &str, body: &str, ts: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(method.as_bytes());
    mac.update(uri.as_bytes());
    mac.update(body.as_bytes());
    mac.update(ts.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[test]
fn the_v3_signature_matches_the_worked_example() {
    let secret = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy";
    let uri = "https://example.com/hubspot/webhook";
    let expected = "Uqayf9EATYg43PeNmeE17hOa4lFz6HGJNBfbAk94Uf0=";
    assert_eq!(
        v3(secret, "POST", uri, r#"[{"eventId":1}]"#, "1700000000000"),
        expected
    );
    assert_eq!(
        hubspot::signature_v3(secret, "POST", uri, r#"[{"eventId":1}]"#, 1_700_000_000_000),
        expected
    );
    // The documented escapes are decoded before signing.
    assert_eq!(
        hubspot::signature_v3(
            secret,
            "POST",
            "https%3A%2F%2Fexample.com%2Fhubspot%2Fwebhook",
            r#"[{"eventId":1}]"#,
            1_700_000_000_000
        ),
        expected
    );
}

#[tokio::test]
async fn fired_webhooks_are_json_arrays_signed_as_documented() {
    let fake = FakeHubSpot::start();
    let (url, received) = receiver(vec![], Duration::ZERO).await;
    fake.set_webhook_target(&url);
    let secret = fake.client_secret();
    let before = Utc::now().timestamp_millis();
    let deliveries = fake
        .fire(vec![
            WebhookEvent::creation(512),
            WebhookEvent::property_change(512, "hs_email_optout", "true"),
        ])
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].status, Some(200));
    let got = received.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let events: Value = serde_json::from_str(body).unwrap();
    let events = events.as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["subscriptionType"], "contact.creation");
    assert_eq!(events[0]["objectId"], 512);
    assert_eq!(events[0]["attemptNumber"], 0);
    assert_eq!(events[0]["portalId"], hubspot::PORTAL_ID);
    assert_eq!(events[1]["subscriptionType"], "contact.propertyChange");
    assert_eq!(events[1]["propertyName"], "hs_email_optout");
    assert_eq!(events[1]["propertyValue"], "true");
    assert!(events[1]["eventId"].as_u64().unwrap() > events[0]["eventId"].as_u64().unwrap());
    assert!(events[0]["occurredAt"].as_i64().unwrap() >= before);

    let h = |n: &str| headers.get(n).unwrap().to_str().unwrap().to_owned();
    assert_eq!(h("content-type"), "application/json");
    let ts = h("x-hubspot-request-timestamp");
    assert!(
        (ts.parse::<i64>().unwrap() - Utc::now().timestamp_millis()).abs() < 60_000,
        "ms: {ts}"
    );
    assert_eq!(
        h("x-hubspot-signature-v3"),
        v3(&secret, "POST", &url, body, &ts)
    );
    assert_eq!(h("x-hubspot-signature-version"), "v1");
    let v1 = hex::encode(Sha256::digest(format!("{secret}{body}").as_bytes()));
    assert_eq!(h("x-hubspot-signature"), v1);
    // A forged secret does not verify.
    assert_ne!(
        h("x-hubspot-signature-v3"),
        v3("other-secret", "POST", &url, body, &ts)
    );

    fake.with(|s| s.legacy_signature = hubspot::LegacySignature::V2);
    fake.fire(vec![WebhookEvent::deletion(1)]).await.unwrap();
    let got = received.0.lock().unwrap().clone();
    let (headers, body) = &got[1];
    let v2 = hex::encode(Sha256::digest(
        format!("{secret}POST{url}{body}").as_bytes(),
    ));
    assert_eq!(headers.get("x-hubspot-signature").unwrap(), v2.as_str());
    assert_eq!(headers.get("x-hubspot-signature-version").unwrap(), "v2");

    // A stale timestamp can be sent on purpose (receivers must refuse > 5 minutes).
    let old = Utc::now().timestamp_millis() - 6 * 60_000;
    let d = fake
        .fire_at(vec![WebhookEvent::deletion(2)], Some(old))
        .await
        .unwrap();
    assert_eq!(d[0].timestamp, old);
}

#[tokio::test]
async fn webhooks_are_retried_on_5xx_429_and_timeouts_but_not_on_4xx() {
    let fake = FakeHubSpot::start();
    fake.with(|s| {
        s.time_scale = 0.0005;
        s.webhook_timeout = Duration::from_secs(3);
    });
    let (url, received) = receiver(vec![500, 503, 429], Duration::ZERO).await;
    fake.set_webhook_target(&url);
    let d = fake
        .fire(vec![WebhookEvent::property_change(
            7,
            "email",
            "x@example.org",
        )])
        .await
        .unwrap();
    let statuses: Vec<Option<u16>> = d.iter().map(|d| d.status).collect();
    assert_eq!(statuses, [Some(500), Some(503), Some(429), Some(200)]);
    let got = received.0.lock().unwrap().clone();
    let secret = fake.client_secret();
    for (n, (headers, body)) in got.iter().enumerate() {
        let events: Value = serde_json::from_str(body).unwrap();
        assert_eq!(events[0]["attemptNumber"], n);
        let ts = headers
            .get("x-hubspot-request-timestamp")
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(
            headers
                .get("x-hubspot-signature-v3")
                .unwrap()
                .to_str()
                .unwrap(),
            v3(&secret, "POST", &url, body, ts)
        );
    }
    let event_ids: Vec<Value> = got
        .iter()
        .map(|(_, b)| serde_json::from_str::<Value>(b).unwrap()[0]["eventId"].clone())
        .collect();
    assert!(
        event_ids.windows(2).all(|w| w[0] == w[1]),
        "a retry keeps the eventId"
    );

    for code in [400, 401, 403, 404, 405] {
        let (url, received) = receiver(vec![code], Duration::ZERO).await;
        fake.set_webhook_target(&url);
        let d = fake.fire(vec![WebhookEvent::creation(1)]).await.unwrap();
        assert_eq!(d.len(), 1, "{code} is not retried");
        assert_eq!(received.0.lock().unwrap().len(), 1);
    }

    // A slow receiver times out and the delivery is retried.
    let (url, _) = receiver(vec![], Duration::from_millis(1_500)).await;
    fake.set_webhook_target(&url);
    fake.with(|s| {
        s.webhook_max_retries = 2;
        s.webhook_timeout = Duration::from_millis(300);
    });
    let d = fake.fire(vec![WebhookEvent::creation(1)]).await.unwrap();
    assert_eq!(d.len(), 3);
    assert!(d.iter().all(|d| d.status.is_none() && d.error.is_some()));

    // Batches hold at most webhook_batch_size events.
    let (url, received) = receiver(vec![], Duration::ZERO).await;
    fake.set_webhook_target(&url);
    fake.with(|s| s.webhook_timeout = Duration::from_secs(3));
    let events: Vec<WebhookEvent> = (0..250).map(WebhookEvent::creation).collect();
    fake.fire(events).await.unwrap();
    let sizes: Vec<usize> = received
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| {
            serde_json::from_str::<Value>(b)
                .unwrap()
                .as_array()
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes, [100, 100, 50]);
}

// ------------------------------------------------------------------------------------------
// Rate limits, faults, the request log
// ------------------------------------------------------------------------------------------

fn header(a: &Answer, name: &str) -> Option<String> {
    a.headers.get(name).map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn burst_and_daily_limits_with_the_rate_limit_headers() {
    let fake = FakeHubSpot::start();
    fake.with(|s| {
        s.burst_max = 5;
        s.daily_max = 1_000;
        s.time_scale = 0.2; // a 2 s window
    });
    for n in 1..=5 {
        let a = call(&fake, "GET", C, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(header(&a, "X-HubSpot-RateLimit-Max").as_deref(), Some("5"));
        assert_eq!(
            header(&a, "X-HubSpot-RateLimit-Remaining"),
            Some((5 - n).to_string())
        );
        assert_eq!(
            header(&a, "X-HubSpot-RateLimit-Interval-Milliseconds").as_deref(),
            Some("2000")
        );
        assert_eq!(
            header(&a, "X-HubSpot-RateLimit-Daily").as_deref(),
            Some("1000")
        );
        assert_eq!(
            header(&a, "X-HubSpot-RateLimit-Daily-Remaining"),
            Some((1000 - n).to_string())
        );
        assert!(header(&a, "X-HubSpot-RateLimit-Secondly").is_some());
        assert!(header(&a, "X-HubSpot-RateLimit-Secondly-Remaining").is_some());
    }
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 429, "{}", a.text);
    assert_eq!(a.body["policyName"], "TEN_SECONDLY_ROLLING");
    assert_eq!(a.body["errorType"], "RATE_LIMIT");
    assert_eq!(
        a.body["message"],
        "You have reached your ten_secondly_rolling limit."
    );
    assert_eq!(a.body["status"], "error");
    assert_eq!(
        header(&a, "X-HubSpot-RateLimit-Remaining").as_deref(),
        Some("0")
    );
    // The burst window is per app: another private app is not held back.
    fake.add_token("pat-other-app", scopes::ALL);
    assert_eq!(
        call_as(&fake, Some("pat-other-app"), "GET", C, None)
            .await
            .status,
        200
    );
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(call(&fake, "GET", C, None).await.status, 200);

    // The daily limit is per portal.
    fake.with(|s| s.daily_max = s.daily_used + 1);
    assert_eq!(
        call_as(&fake, Some("pat-other-app"), "GET", C, None)
            .await
            .status,
        200
    );
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["policyName"], "DAILY");
    assert_eq!(a.body["message"], "You have reached your daily limit.");
    assert_eq!(
        header(&a, "X-HubSpot-RateLimit-Daily-Remaining").as_deref(),
        Some("0")
    );

    // The daily count starts again on the portal's next day.
    fake.with(|s| s.daily_date = s.daily_date.pred_opt().unwrap());
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(fake.with(|s| s.daily_used), 1);

    // Which headers appear is a setting.
    fake.with(|s| {
        s.daily_max = u64::MAX;
        s.rate_headers = Some(RateHeaders::Interval);
    });
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(header(&a, "X-HubSpot-RateLimit-Max").is_some());
    assert!(header(&a, "X-HubSpot-RateLimit-Daily").is_none());
}

#[tokio::test]
async fn faults_are_injected_into_the_next_call_only() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    fake.fail_next(Fault::Status(502));
    let a = call(&fake, "GET", C, None).await;
    assert_envelope(&a, 502, "INTERNAL_ERROR");
    assert_eq!(call(&fake, "GET", C, None).await.status, 200);

    fake.fail_next(Fault::TooManyRequests);
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["policyName"], "TEN_SECONDLY_ROLLING");

    fake.fail_next(Fault::Garbage);
    let a = call(&fake, "GET", C, None).await;
    assert_eq!(a.status, 200);
    assert!(serde_json::from_str::<Value>(&a.text).is_err());

    fake.fail_next(Fault::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(call(&fake, "GET", C, None).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    fake.fail_next_on("POST /crm/v3/objects/contacts/search", Fault::Status(503));
    assert_eq!(call(&fake, "GET", C, None).await.status, 200);
    assert_eq!(search(&fake, json!({})).await.status, 503);
    assert_eq!(search(&fake, json!({})).await.status, 200);

    // Injected into API calls only, never the token endpoint.
    fake.fail_next(Fault::Status(500));
    let a = refresh(&fake, "v1", hubspot::REFRESH_TOKEN, hubspot::CLIENT_SECRET).await;
    assert_eq!(a.status, 200);
    assert_eq!(call(&fake, "GET", C, None).await.status, 500);
}

#[tokio::test]
async fn the_request_log_counts_calls_per_endpoint() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let id = fake.insert(json!({"email": "log@example.org"}));
    call(&fake, "GET", &format!("{C}/{id}"), None).await;
    call(
        &fake,
        "GET",
        &format!("{C}/log@example.org?idProperty=email"),
        None,
    )
    .await;
    search(&fake, json!({"limit": 5})).await;
    assert_eq!(fake.calls("GET /crm/v3/objects/contacts/{contactId}"), 2);
    assert_eq!(fake.calls("POST /crm/v3/objects/contacts/search"), 1);
    assert_eq!(fake.calls(&format!("{C}/{id}")), 1);
    let log = fake.request_log();
    assert_eq!(log.len(), 3);
    assert_eq!(log[1].query, "idProperty=email");
    assert_eq!(log[2].body, r#"{"limit":5}"#);
    assert_eq!(log[2].status, 200);
    let a = call(&fake, "GET", "/crm/v3/objects/nothing", None).await;
    assert_eq!(a.status, 404);
    let a = call(&fake, "PUT", C, None).await;
    assert_eq!(a.status, 405);
}

#[tokio::test]
async fn search_operators_and_the_query_string() {
    let fake = FakeHubSpot::start();
    fake.unlimited();
    let a = fake.insert(json!({"email": "ann@example.org", "firstname": "Ann", "lifecyclestage": "lead",
                               "hs_legal_basis": "Freely given consent from contact;Not applicable"}));
    let b = fake.insert(
        json!({"email": "bob@example.com", "firstname": "Bob", "lifecyclestage": "customer"}),
    );
    let c = fake.insert(json!({"firstname": "Cy"}));
    let q = |filters: Value| json!({"filterGroups": [{"filters": filters}], "limit": 100});
    let cases = [
        (
            json!([{"propertyName": "email", "operator": "HAS_PROPERTY"}]),
            vec![a, b],
        ),
        (
            json!([{"propertyName": "email", "operator": "NOT_HAS_PROPERTY"}]),
            vec![c],
        ),
        (
            json!([{"propertyName": "lifecyclestage", "operator": "IN", "values": ["lead", "customer"]}]),
            vec![a, b],
        ),
        (
            json!([{"propertyName": "lifecyclestage", "operator": "NOT_IN", "values": ["lead"]}]),
            vec![b, c],
        ),
        (
            json!([{"propertyName": "lifecyclestage", "operator": "NEQ", "value": "lead"}]),
            vec![b, c],
        ),
        (
            json!([{"propertyName": "email", "operator": "CONTAINS_TOKEN", "value": "*.com"}]),
            vec![b],
        ),
        (
            json!([{"propertyName": "hs_legal_basis", "operator": "EQ", "value": "Not applicable"}]),
            vec![a],
        ),
        (
            json!([{"propertyName": "hs_object_id", "operator": "GT", "value": a.to_string()}]),
            vec![b, c],
        ),
        (
            json!([{"propertyName": "email", "operator": "HAS_PROPERTY"},
                {"propertyName": "firstname", "operator": "EQ", "value": "bob"}]),
            vec![b],
        ),
    ];
    for (filters, expected) in cases {
        let r = search(&fake, q(filters.clone())).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(ids(&r), expected, "{filters}");
        assert_eq!(r.body["total"], expected.len());
    }
    let r = search(&fake, json!({"query": "ann"})).await;
    assert_eq!(ids(&r), [a]);
    // A user's edit is searchable only after the lag.
    fake.with(|s| s.search_lag = Duration::from_secs(60));
    fake.edit(c, json!({"email": "cy@example.org"}));
    let r = search(
        &fake,
        q(json!([{"propertyName": "email", "operator": "HAS_PROPERTY"}])),
    )
    .await;
    assert_eq!(ids(&r), [a, b]);
}

#[tokio::test]
async fn batch_create_is_all_or_nothing_unless_traced_and_batch_archive() {
    let fake = FakeHubSpot::start();
    let existing = fake.insert(json!({"email": "old@example.org"}));
    let path = format!("{C}/batch/create");
    let a = call(
        &fake,
        "POST",
        &path,
        Some(
            json!({"inputs": [{"properties": {"email": "fresh@example.org"}},
                               {"properties": {"email": "old@example.org"}}]}),
        ),
    )
    .await;
    assert_envelope(&a, 409, "CONFLICT");
    assert_eq!(fake.contacts().len(), 1, "nothing created");
    let a = call(
        &fake,
        "POST",
        &path,
        Some(json!({"inputs": [
            {"properties": {"email": "fresh@example.org"}, "objectWriteTraceId": "t1"},
            {"properties": {"email": "old@example.org"}, "objectWriteTraceId": "t2"}]})),
    )
    .await;
    assert_eq!(a.status, 207, "{}", a.text);
    assert_eq!(a.body["results"][0]["objectWriteTraceId"], "t1");
    assert_eq!(a.body["errors"][0]["category"], "CONFLICT");
    assert_eq!(
        a.body["errors"][0]["context"]["objectWriteTraceId"],
        json!(["t2"])
    );
    assert_eq!(
        a.body["errors"][0]["message"],
        format!("Contact already exists. Existing ID: {existing}")
    );
    assert_eq!(fake.contacts().len(), 2);
    let a = call(
        &fake,
        "POST",
        &format!("{C}/batch/archive"),
        Some(json!({"inputs": [{"id": existing.to_string()}]})),
    )
    .await;
    assert_eq!(a.status, 204);
    assert!(a.text.is_empty());
    assert_eq!(fake.contact(existing).unwrap()["archived"], true);

    // The subscription definitions, v3 and v4.
    let a = call(
        &fake,
        "GET",
        "/communication-preferences/v3/definitions",
        None,
    )
    .await;
    assert_eq!(a.body["subscriptionDefinitions"][0]["id"], "7");
    let a = call(
        &fake,
        "GET",
        "/communication-preferences/v4/definitions",
        None,
    )
    .await;
    assert_eq!(a.body["results"][0]["id"], 7);
}
