//! The fake Zoho CRM's synthetic record source (benchmarks): paging past 2,000 records with
//! `page_token`, deterministic output, `If-Modified-Since`, and stored edits shadowing
//! generated records.

#![allow(clippy::unwrap_used)]

use optinsync_testkit::zoho::{self, FakeZoho, SyntheticSource};
use serde_json::{Value, json};

async fn token(client: &reqwest::Client, fake: &FakeZoho) -> String {
    let v: Value = client
        .post(format!("{}/oauth/v2/token", fake.url()))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", zoho::CLIENT_ID),
            ("client_secret", zoho::CLIENT_SECRET),
            ("refresh_token", zoho::REFRESH_TOKEN),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// Every record of a full `page`-then-`page_token` walk, as the connector walks.
async fn walk(fake: &FakeZoho, since: Option<&str>) -> (Vec<Value>, usize) {
    let client = reqwest::Client::new();
    let token = token(&client, fake).await;
    let mut out = Vec::new();
    let mut page_token: Option<String> = None;
    let mut calls = 0;
    loop {
        let mut q = vec![
            (
                "fields",
                "Email,Newsletter,Language,Modified_Time".to_owned(),
            ),
            ("sort_by", "Modified_Time".into()),
            ("sort_order", "asc".into()),
            ("per_page", "200".into()),
        ];
        match &page_token {
            Some(t) => q.push(("page_token", t.clone())),
            None => q.push(("page", "1".into())),
        }
        let mut req = client
            .get(format!("{}/crm/v8/Contacts", fake.url()))
            .query(&q)
            .header("Authorization", format!("Zoho-oauthtoken {token}"));
        if let Some(s) = since {
            req = req.header("If-Modified-Since", s);
        }
        let resp = req.send().await.unwrap();
        calls += 1;
        if resp.status() != 200 {
            break;
        }
        let v: Value = resp.json().await.unwrap();
        out.extend(v["data"].as_array().unwrap().iter().cloned());
        if v["info"]["more_records"] != json!(true) {
            break;
        }
        page_token = Some(v["info"]["next_page_token"].as_str().unwrap().to_owned());
    }
    (out, calls)
}

#[tokio::test(flavor = "multi_thread")]
async fn synthetic_records_page_past_2000_deterministically() {
    let fake = FakeZoho::start();
    let src = SyntheticSource::new(2_345);
    fake.seed_synthetic("Contacts", src.clone());

    let (first, calls) = walk(&fake, None).await;
    assert_eq!(calls, 12, "11 full pages and one of 145");
    assert_eq!(first.len(), 2_345);
    for (i, r) in first.iter().enumerate() {
        assert_eq!(r["id"], json!(src.id(i as u64)));
        assert_eq!(r["Email"], json!(format!("user{i}@example.test")));
        assert_eq!(r["Newsletter"], json!(i % 50 != 49));
    }
    let times: Vec<&str> = first
        .iter()
        .map(|r| r["Modified_Time"].as_str().unwrap())
        .collect();
    let parsed: Vec<i64> = times
        .iter()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp())
        .collect();
    assert!(
        parsed.windows(2).all(|w| w[0] < w[1]),
        "Modified_Time increases"
    );
    let (again, _) = walk(&fake, None).await;
    assert_eq!(first, again, "a second walk serves the same records");

    // If-Modified-Since is inclusive: from record 2,000 on.
    let (tail, _) = walk(&fake, Some(times[2_000])).await;
    assert_eq!(tail.len(), 345);
    assert_eq!(tail[0]["id"], json!(src.id(2_000)));

    // An edit stores the record: it leaves its place and comes last, once.
    let unasserted: Vec<u64> = src.unasserted().take(2).collect();
    assert_eq!(unasserted, vec![49, 99]);
    let id = fake.edit_synthetic("Contacts", 49, json!({"Newsletter": true}));
    let (edited, _) = walk(&fake, None).await;
    assert_eq!(edited.len(), 2_345);
    assert_eq!(edited.iter().filter(|r| r["id"] == json!(id)).count(), 1);
    assert_eq!(edited[2_344]["id"], json!(id));
    assert_eq!(edited[2_344]["Newsletter"], json!(true));
    assert_eq!(edited[49]["id"], json!(src.id(50)));
    assert_eq!(
        fake.record("Contacts", &id).unwrap()["Newsletter"],
        json!(true)
    );
}

/// A write-back through the API (`PUT /crm/v8/Contacts`) to a generated record succeeds, as
/// it does on Zoho for any record it holds: the record is stored with the change, modified
/// now, served once (last) by a walk; an id outside the source is still refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_generated_record_takes_a_write_through_the_api() {
    let fake = FakeZoho::start();
    let src = SyntheticSource::new(300);
    fake.seed_synthetic("Contacts", src.clone());
    let client = reqwest::Client::new();
    let token = token(&client, &fake).await;
    let id = src.id(7);
    let put = |body: Value| {
        client
            .put(format!("{}/crm/v8/Contacts", fake.url()))
            .header("Authorization", format!("Zoho-oauthtoken {token}"))
            .json(&body)
            .send()
    };
    let answer: Value = put(json!({"data": [
        {"id": id, "Newsletter_Consent": "confirmed"},
        {"id": "1", "Newsletter_Consent": "confirmed"},
    ]}))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(answer["data"][0]["code"], json!("SUCCESS"), "{answer}");
    assert_eq!(answer["data"][1]["code"], json!("INVALID_DATA"), "{answer}");

    let stored = fake.record("Contacts", &id).unwrap();
    assert_eq!(stored["Newsletter_Consent"], json!("confirmed"));
    assert_eq!(
        stored["Email"],
        json!(src.email(7)),
        "the generated fields stay"
    );
    let (walked, _) = walk(&fake, None).await;
    assert_eq!(walked.len(), 300);
    assert_eq!(walked.iter().filter(|r| r["id"] == json!(id)).count(), 1);
    assert_eq!(walked[299]["id"], json!(id), "modified now: listed last");
}
