//! The binary against the fake Zoho CRM (`optinsync_testkit::zoho`): DOI mails for asserted
//! contacts, a bad refresh token, webhook callbacks, and consent written back after a
//! confirmation. Mail goes to the `.eml` folder and the list to the JSONL file.

use std::time::{Duration, Instant};

use optinsync_testkit::zoho::{self, FakeZoho};
use serde_json::json;

use crate::support::*;

const CHANNEL_TOKEN: &str = "e2e-channel-token-0123456789";

/// The demo set-up with `[connectors.crm]` replaced by a Zoho CRM section pointing at `fake`.
/// Secrets are written as `${VAR}` when `secrets_from_env`, else inline.
fn zoho_demo(fake: &FakeZoho, poll: &str, secrets_from_env: bool) -> Demo {
    let demo = Demo::new();
    let config = std::fs::read_to_string(demo.config()).unwrap();
    let start = config.find("[connectors.crm]").unwrap();
    let end = config.find("[connectors.campaigns]").unwrap();
    let (id, secret, refresh) = if secrets_from_env {
        (
            "${E2E_ZOHO_CLIENT_ID}".to_owned(),
            "${E2E_ZOHO_CLIENT_SECRET}".to_owned(),
            "${E2E_ZOHO_REFRESH_TOKEN}".to_owned(),
        )
    } else {
        (
            zoho::CLIENT_ID.to_owned(),
            zoho::CLIENT_SECRET.to_owned(),
            zoho::REFRESH_TOKEN.to_owned(),
        )
    };
    let crm = format!(
        r#"[connectors.crm]
kind = "zoho-crm"
client_id = "{id}"
client_secret = "{secret}"
refresh_token = "{refresh}"
accounts_url = "{url}"
api_url = "{url}"
modules = ["Contacts", "Leads"]
fields = ["First_Name", "Last_Name"]

[connectors.crm.asserts]
newsletter = "Newsletter"

[connectors.crm.webhook]
token = "{CHANNEL_TOKEN}"
notify_url = "http://127.0.0.1:{port}/webhooks/crm"
channel_id = 1000000068001

"#,
        url = fake.url(),
        port = demo.port,
    );
    let mut config = format!("{}{crm}{}", &config[..start], &config[end..]);
    config = config.replace(
        "poll_interval = \"1s\"",
        &format!("poll_interval = \"{poll}\""),
    );
    std::fs::write(demo.config(), config).unwrap();
    demo
}

fn seed(fake: &FakeZoho) -> (String, String, String, String) {
    let ana = fake.insert(
        "Contacts",
        json!({"Email": "ana.garcia@example.org", "First_Name": "Ana", "Newsletter": true, "Email_Opt_Out": false}),
    );
    let ben = fake.insert(
        "Leads",
        json!({"Email": "ben.okafor@example.net", "First_Name": "Ben", "Newsletter": "yes"}),
    );
    let chloe = fake.insert(
        "Contacts",
        json!({"Email": "chloe.martin@example.com", "First_Name": "Chloé", "Newsletter": false}),
    );
    let dmitri = fake.insert(
        "Contacts",
        json!({"Email": "dmitri@example.com", "Newsletter": true, "Email_Opt_Out": true}),
    );
    (ana, ben, chloe, dmitri)
}

#[test]
fn zoho_sync_once_sends_doi_mails_for_asserted_contacts() {
    let fake = FakeZoho::start();
    seed(&fake);
    let demo = zoho_demo(&fake, "1s", true);
    let out = demo
        .cmd(&["sync", "--once"])
        .env("E2E_ZOHO_CLIENT_ID", zoho::CLIENT_ID)
        .env("E2E_ZOHO_CLIENT_SECRET", zoho::CLIENT_SECRET)
        .env("E2E_ZOHO_REFRESH_TOKEN", zoho::REFRESH_TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4 CRM records"), "{stdout}");
    // Inspection commands load the same config: inline the secrets for them.
    let config = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace("${E2E_ZOHO_CLIENT_ID}", zoho::CLIENT_ID)
        .replace("${E2E_ZOHO_CLIENT_SECRET}", zoho::CLIENT_SECRET)
        .replace("${E2E_ZOHO_REFRESH_TOKEN}", zoho::REFRESH_TOKEN);
    std::fs::write(demo.config(), config).unwrap();
    assert_eq!(demo.mails().len(), 2, "{:?}", demo.mails());
    demo.mail_to("ana.garcia@example.org");
    demo.mail_to("ben.okafor@example.net");
    assert_eq!(demo.state("chloe.martin@example.com", "newsletter"), "none");
    assert_eq!(demo.state("dmitri@example.com", "newsletter"), "withdrawn");
    let ben = demo.contact_json("ben.okafor@example.net");
    assert!(
        ben["contact"]["crm_records"][0]
            .as_str()
            .unwrap()
            .starts_with("Leads/"),
        "{ben}"
    );
    assert_eq!(fake.token_requests(), 1);
}

#[test]
fn zoho_bad_refresh_token_exits_2_with_one_line() {
    let fake = FakeZoho::start();
    fake.with(|s| s.refresh_token = "1000.revoked.token".into());
    let demo = zoho_demo(&fake, "1s", false);
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("optinsync:"))
        .unwrap_or_else(|| panic!("no error line in {err}"));
    assert!(
        line.contains("connectors.crm.refresh_token") && line.contains("invalid_code"),
        "{line}"
    );
    assert!(!demo.path("var/mail").exists() || demo.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn zoho_webhook_doi_within_2s_forged_refused_and_write_back_after_confirm() {
    let fake = FakeZoho::start();
    let (ana, _ben, chloe, _dmitri) = seed(&fake);
    // Polling once an hour: after the start-up pass only the webhook can bring changes in.
    let demo = zoho_demo(&fake, "1h", false);
    let daemon = demo.spawn_daemon();
    wait_until(20, "DOI mails of the start-up pass", || {
        demo.mails().len() == 2
    });
    wait_until(10, "notification channel registered", || {
        !fake.channels().is_empty()
    });
    let channel = &fake.channels()[0];
    assert_eq!(channel["token"], json!(CHANNEL_TOKEN));
    assert_eq!(channel["events"], json!(["Contacts.all", "Leads.all"]));

    // Chloé asks for the newsletter in the CRM.
    fake.edit("Contacts", &chloe, json!({"Newsletter": true}));

    // A forged callback (wrong token) is refused and changes nothing.
    let forged = fake
        .notify("Contacts", &[&chloe], "update", Some("not-the-token"))
        .await
        .unwrap();
    assert!((400..500).contains(&forged), "forged callback got {forged}");
    let url = format!("http://127.0.0.1:{}/webhooks/campaigns", demo.port);
    assert_eq!(fake.post_json(url, json!({})).await.unwrap(), 404);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(demo.mails().len(), 2);
    assert_eq!(demo.state("chloe.martin@example.com", "newsletter"), "none");

    // The genuine callback leads to her DOI mail within 2 seconds.
    let sent = Instant::now();
    let status = fake
        .notify("Contacts", &[&chloe], "update", None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_until(2, "Chloé's DOI mail after the webhook", || {
        demo.mails().len() == 3
    });
    eprintln!("webhook callback to DOI mail: {:?}", sent.elapsed());
    demo.mail_to("chloe.martin@example.com");

    // Ana confirms: the fake CRM receives the consent write-back.
    let link = demo.confirm_link("ana.garcia@example.org");
    let client = http();
    assert_eq!(click_confirm(&client, &link, "e2e").await.status(), 200);
    wait_until(10, "write-back to the fake CRM", || {
        fake.updates().iter().any(|u| {
            u["module"] == "Contacts"
                && u["body"]["data"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|i| i["id"] == json!(ana)))
        })
    });
    let update = fake
        .updates()
        .into_iter()
        .find(|u| u["body"]["data"][0]["id"] == json!(ana))
        .unwrap();
    assert_eq!(update["body"]["trigger"], json!([]));
    let consent = &update["body"]["data"][0]["Data_Processing_Basis_Details"];
    assert_eq!(consent["Data_Processing_Basis"], json!("Obtained"));
    assert_eq!(consent["Contact_Through_Email"], json!(true));
    assert!(
        consent["Consent_Remarks"]
            .as_str()
            .unwrap()
            .starts_with("DOI confirmed "),
        "{consent}"
    );
    let record = fake.record("Contacts", &ana).unwrap();
    assert_eq!(
        record["Data_Processing_Basis_Details"]["Data_Processing_Basis"],
        json!("Obtained")
    );
    assert_eq!(daemon.terminate(), Some(0));

    // The next incremental pass does not take the write-back for new CRM input.
    let summary = demo.run_ok(&["sync", "--once"]);
    assert!(summary.contains(" 0 CRM consent changes"), "{summary}");
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "confirmed"
    );
    assert_eq!(demo.mails().len(), 3, "no new mail");
}
