//! The binary against the fake HubSpot (`optinsync_testkit::hubspot`): DOI mails for asserted
//! contacts, a token without a scope, signed webhook deliveries (a stale one refused), and the
//! subscription written back after a confirmation. Mail goes to the `.eml` folder and the list
//! to the JSONL file.

use std::time::{Duration, Instant};

use optinsync_testkit::hubspot::{self, FakeHubSpot, PropertyDef, WebhookEvent};
use serde_json::json;

use crate::support::*;

/// The demo set-up with `[connectors.crm]` replaced by a HubSpot section pointing at `fake`;
/// the token comes from the environment (`E2E_HUBSPOT_TOKEN`) when `token_from_env`.
fn hubspot_demo(fake: &FakeHubSpot, poll: &str, token: &str, token_from_env: bool) -> Demo {
    let demo = Demo::new();
    let config = std::fs::read_to_string(demo.config()).unwrap();
    let start = config.find("[connectors.crm]").unwrap();
    let end = config.find("[connectors.campaigns]").unwrap();
    let token = if token_from_env {
        "${E2E_HUBSPOT_TOKEN}".to_owned()
    } else {
        token.to_owned()
    };
    let crm = format!(
        r#"[connectors.crm]
kind = "hubspot"
token = "{token}"
api_url = "{url}"
fields = ["firstname"]
overlap = "10s"

[connectors.crm.asserts]
newsletter = "newsletter_requested"

[connectors.crm.webhook]
client_secret = "{secret}"
url = "http://127.0.0.1:{port}/webhooks/crm"

[connectors.crm.write_back.lists.newsletter]
subscription_id = 9

"#,
        url = fake.url(),
        secret = hubspot::CLIENT_SECRET,
        port = demo.port,
    );
    let mut config = format!("{}{crm}{}", &config[..start], &config[end..]);
    config = config.replace(
        "poll_interval = \"1s\"",
        &format!("poll_interval = \"{poll}\""),
    );
    std::fs::write(demo.config(), config).unwrap();
    fake.set_webhook_target(&format!("http://127.0.0.1:{}/webhooks/crm", demo.port));
    demo
}

fn start() -> FakeHubSpot {
    let fake = FakeHubSpot::start();
    fake.add_property(PropertyDef::boolean(
        "newsletter_requested",
        "Newsletter requested",
    ));
    fake.with(|s| s.search_lag = Duration::from_millis(200));
    fake
}

fn seed(fake: &FakeHubSpot) -> (u64, u64, u64) {
    let ana = fake.insert(
        json!({"email": "ana.garcia@example.org", "firstname": "Ana",
        "newsletter_requested": "true"}),
    );
    let chloe = fake.insert(
        json!({"email": "chloe.martin@example.com", "firstname": "Chloé",
        "newsletter_requested": "false"}),
    );
    let dmitri = fake.insert(json!({"email": "dmitri@example.com",
        "newsletter_requested": "true", "hs_email_optout": "true"}));
    (ana, chloe, dmitri)
}

#[test]
fn hubspot_sync_once_sends_doi_mails_for_asserted_contacts() {
    let fake = start();
    seed(&fake);
    let demo = hubspot_demo(&fake, "1s", "", true);
    let out = demo
        .cmd(&["sync", "--once"])
        .env("E2E_HUBSPOT_TOKEN", hubspot::PRIVATE_APP_TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 CRM records"), "{stdout}");
    let config = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace("${E2E_HUBSPOT_TOKEN}", hubspot::PRIVATE_APP_TOKEN);
    std::fs::write(demo.config(), config).unwrap();
    assert_eq!(demo.mails().len(), 1, "{:?}", demo.mails());
    demo.mail_to("ana.garcia@example.org");
    assert_eq!(demo.state("chloe.martin@example.com", "newsletter"), "none");
    assert_eq!(demo.state("dmitri@example.com", "newsletter"), "withdrawn");
}

#[test]
fn hubspot_token_without_a_scope_exits_2_naming_it() {
    let fake = start();
    fake.add_token("pat-na1-no-schemas", &[hubspot::scopes::CONTACTS_READ]);
    let demo = hubspot_demo(&fake, "1s", "pat-na1-no-schemas", false);
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("optinsync:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        line.contains("connectors.crm.token") && line.contains("crm.schemas.contacts.read"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hubspot_webhook_doi_stale_refused_and_subscription_written_after_confirm() {
    let fake = start();
    let (ana, chloe, _dmitri) = seed(&fake);
    // Polling once an hour: after the start-up pass only the webhook can bring changes in.
    let demo = hubspot_demo(&fake, "1h", hubspot::PRIVATE_APP_TOKEN, false);
    let daemon = demo.spawn_daemon();
    wait_until(20, "DOI mail of the start-up pass", || {
        demo.mails().len() == 1
    });

    // Chloé asks for the newsletter in the CRM.
    fake.edit(chloe, json!({"newsletter_requested": "true"}));

    // A stale delivery (10 minutes old) is refused and changes nothing.
    let old = chrono::Utc::now().timestamp_millis() - 600_000;
    let d = fake
        .fire_at(
            vec![WebhookEvent::property_change(
                chloe,
                "newsletter_requested",
                "true",
            )],
            Some(old),
        )
        .await
        .unwrap();
    assert_eq!(d.last().unwrap().status, Some(400));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(demo.mails().len(), 1);

    // The genuine delivery leads to her DOI mail within 2 seconds.
    let sent = Instant::now();
    let d = fake
        .fire(vec![WebhookEvent::property_change(
            chloe,
            "newsletter_requested",
            "true",
        )])
        .await
        .unwrap();
    assert_eq!(d.last().unwrap().status, Some(200));
    wait_until(2, "Chloé's DOI mail after the webhook", || {
        demo.mails().len() == 2
    });
    eprintln!("webhook delivery to DOI mail: {:?}", sent.elapsed());
    demo.mail_to("chloe.martin@example.com");

    // Ana confirms: HubSpot's subscription type is subscribed with a legal basis.
    let link = demo.confirm_link("ana.garcia@example.org");
    let client = http();
    assert_eq!(click_confirm(&client, &link, "e2e").await.status(), 200);
    wait_until(
        10,
        "the subscription written back to the fake HubSpot",
        || {
            fake.subscription_status("ana.garcia@example.org")["subscriptionStatuses"]
                .as_array()
                .is_some_and(|s| {
                    s.iter()
                        .any(|t| t["id"] == "9" && t["status"] == "SUBSCRIBED")
                })
        },
    );
    let status = fake.subscription_status("ana.garcia@example.org");
    let nine = status["subscriptionStatuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "9")
        .unwrap()
        .clone();
    assert_eq!(nine["legalBasis"], "CONSENT_WITH_NOTICE");
    assert!(
        nine["legalBasisExplanation"]
            .as_str()
            .unwrap()
            .starts_with("Double opt-in confirmed "),
        "{nine}"
    );
    assert_eq!(
        fake.contact(ana).unwrap()["properties"]["hs_email_optout_9"],
        "false"
    );
    assert_eq!(daemon.terminate(), Some(0));

    // The next incremental pass does not take the write-back for a consent change.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let summary = demo.run_ok(&["sync", "--once"]);
    assert!(summary.contains(" 0 CRM consent changes"), "{summary}");
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "confirmed"
    );
    assert_eq!(demo.mails().len(), 2, "no new mail");
}
