//! Every pairing of a CRM and a campaigns tool beyond Zoho's own, through the binary, the real
//! HTTP confirm flow and SMTP: HubSpot → Mailchimp, HubSpot → Zoho Campaigns, Zoho CRM →
//! Mailchimp, each against its vendors' fakes. In each: the CRM asserts one person's interest,
//! her DOI mail arrives at the SMTP sink, the confirm click puts her on the campaigns list and
//! writes the consent back into the CRM; then she unsubscribes inside the campaigns tool, the
//! ledger withdraws her and the CRM hears of it.

use optinsync_testkit::smtp::{SmtpSink, parse};
use optinsync_testkit::zoho_campaigns::{self as zc, FakeCampaigns};
use optinsync_testkit::{hubspot, mailchimp, zoho};

use crate::support::*;

const ANA: &str = "ana.garcia@example.org";
const KEY: &str = "2f4e6a8c0b1d3f5a7c9e1b3d5f7a9c1e";

/// The demo with its three connectors replaced, mail to the SMTP sink.
fn pairing_demo(crm: impl FnOnce(&Demo) -> String, campaigns: &str, sink: &SmtpSink) -> Demo {
    let demo = Demo::new();
    demo.replace_connector("crm", &crm(&demo));
    demo.replace_connector("campaigns", campaigns);
    demo.use_smtp_sink(sink.port(), "timeout_secs = 10\n");
    demo.use_private_secret();
    demo
}

fn hubspot_crm(fake: &hubspot::FakeHubSpot) -> impl FnOnce(&Demo) -> String + '_ {
    move |demo| {
        fake.set_webhook_target(&format!("http://127.0.0.1:{}/webhooks/crm", demo.port));
        format!(
            r#"[connectors.crm]
kind = "hubspot"
token = "{token}"
api_url = "{url}"
fields = ["firstname"]
overlap = "10s"

[connectors.crm.asserts]
newsletter = "newsletter_requested"

[connectors.crm.write_back.lists.newsletter]
subscription_id = 9
"#,
            token = hubspot::PRIVATE_APP_TOKEN,
            url = fake.url(),
        )
    }
}

fn hubspot_fake() -> hubspot::FakeHubSpot {
    let fake = hubspot::FakeHubSpot::start();
    fake.add_property(hubspot::PropertyDef::boolean(
        "newsletter_requested",
        "Newsletter requested",
    ));
    fake.with(|s| s.search_lag = std::time::Duration::from_millis(200));
    fake.insert(
        serde_json::json!({"email": ANA, "firstname": "Ana", "newsletter_requested": "true"}),
    );
    fake.insert(
        serde_json::json!({"email": "ben.okafor@example.net", "newsletter_requested": "false"}),
    );
    fake
}

/// HubSpot's subscription status of type 9 for `email`, if any (`SUBSCRIBED`, …).
fn hubspot_status(fake: &hubspot::FakeHubSpot, email: &str) -> Option<String> {
    fake.subscription_status(email)["subscriptionStatuses"]
        .as_array()?
        .iter()
        .find(|t| t["id"] == "9")
        .and_then(|t| t["status"].as_str().map(str::to_owned))
}

fn zoho_campaigns_section(fake: &FakeCampaigns) -> String {
    format!(
        r#"[connectors.campaigns]
kind = "zoho-campaigns"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
campaigns_url = "{url}"
status_interval = "1s"

[connectors.campaigns.lists.newsletter]
listkey = "{KEY}"
doi = "optinsync"
"#,
        zc::CLIENT_ID,
        zc::CLIENT_SECRET,
        zc::REFRESH_TOKEN,
        url = fake.url(),
    )
}

/// The DOI mail at the sink, its confirm link clicked as a browser would.
async fn confirm_by_mail(demo: &Demo, sink: &SmtpSink, email: &str) {
    let received = sink.messages_to(email);
    assert_eq!(received.len(), 1, "one DOI mail: {:?}", sink.messages());
    let mail = parse(&received[0].data);
    let link = link_in(mail.part("text/plain").expect("text part"), "/confirm/");
    let _ = demo;
    assert_eq!(
        click_confirm(&http(), &link, "e2e-browser/1.0")
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hubspot_to_zoho_campaigns() {
    let hs = hubspot_fake();
    let zcf = FakeCampaigns::start();
    zcf.add_list(KEY, "Newsletter", false);
    let sink = SmtpSink::start();
    let demo = pairing_demo(hubspot_crm(&hs), &zoho_campaigns_section(&zcf), &sink);
    demo.run_ok(&["sync", "--once"]);
    assert!(sink.messages_to("ben.okafor@example.net").is_empty());
    let daemon = demo.spawn_daemon();
    confirm_by_mail(&demo, &sink, ANA).await;
    wait_until(20, "Ana on the Zoho list", || {
        zcf.active(KEY) == [ANA.to_owned()]
    });
    wait_until(20, "the subscription written back to HubSpot", || {
        hubspot_status(&hs, ANA).as_deref() == Some("SUBSCRIBED")
    });
    zcf.unsubscribe(KEY, ANA);
    wait_until(20, "the Zoho unsubscribe in the ledger", || {
        demo.state(ANA, "newsletter") == "withdrawn"
    });
    wait_until(20, "the withdrawal written back to HubSpot", || {
        hubspot_status(&hs, ANA).as_deref() == Some("NOT_SUBSCRIBED")
    });
    assert_eq!(zcf.locks(), 0);
    assert_eq!(daemon.terminate(), Some(0));
}

const AUDIENCE: &str = "a1b2c3d4e5";

fn mailchimp_fake() -> mailchimp::FakeMailchimp {
    let fake = mailchimp::FakeMailchimp::start();
    fake.add_list(AUDIENCE, "Newsletter");
    fake
}

fn mailchimp_section(fake: &mailchimp::FakeMailchimp) -> String {
    format!(
        r#"[connectors.campaigns]
kind = "mailchimp"
api_key = "{key}"
api_url = "{root}"
status_interval = "1s"

[connectors.campaigns.lists.newsletter]
audience = "{AUDIENCE}"
doi = "optinsync"

[connectors.campaigns.lists.newsletter.merge_fields]
"#,
        key = mailchimp::API_KEY,
        root = fake.api_root(),
    )
}

fn zoho_crm(fake: &zoho::FakeZoho) -> impl FnOnce(&Demo) -> String + '_ {
    move |_| zoho_crm_section(fake, "")
}

/// The member's status in the fake audience.
fn mailchimp_status(fake: &mailchimp::FakeMailchimp, email: &str) -> Option<mailchimp::Status> {
    fake.member(AUDIENCE, email).map(|m| m.status)
}

/// The Mailchimp half of a pairing, the daemon running: confirmed → `subscribed` with
/// optinsync's proof in Mailchimp's own opt-in fields and no Mailchimp DOI mail; an
/// unsubscribe inside Mailchimp → withdrawn in the ledger.
async fn through_mailchimp(demo: &Demo, sink: &SmtpSink, mc: &mailchimp::FakeMailchimp) {
    assert!(
        mc.member(AUDIENCE, ANA).is_none(),
        "nobody before confirming"
    );
    confirm_by_mail(demo, sink, ANA).await;
    wait_until(20, "Ana subscribed in Mailchimp", || {
        mailchimp_status(mc, ANA) == Some(mailchimp::Status::Subscribed)
    });
    let member = mc.member(AUDIENCE, ANA).unwrap();
    assert!(
        !member.timestamp_opt.is_empty() && member.ip_opt == "127.0.0.1",
        "the confirmation's time and address in Mailchimp: {member:?}"
    );
    assert!(
        mc.confirmation_mails(AUDIENCE).is_empty(),
        "no Mailchimp DOI mail"
    );
    assert!(mc.member(AUDIENCE, "ben.okafor@example.net").is_none());
    mc.unsubscribe_by_user(AUDIENCE, ANA, false).await;
    wait_until(20, "the Mailchimp unsubscribe in the ledger", || {
        demo.state(ANA, "newsletter") == "withdrawn"
    });
    assert!(mc.peak_concurrency() <= 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn zoho_crm_to_mailchimp() {
    let zf = zoho::FakeZoho::start();
    let ana = zf.insert(
        "Contacts",
        serde_json::json!({"Email": ANA, "First_Name": "Ana", "Newsletter": true, "Email_Opt_Out": false}),
    );
    zf.insert(
        "Contacts",
        serde_json::json!({"Email": "ben.okafor@example.net", "Newsletter": false}),
    );
    let mc = mailchimp_fake();
    let sink = SmtpSink::start();
    let demo = pairing_demo(zoho_crm(&zf), &mailchimp_section(&mc), &sink);
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    through_mailchimp(&demo, &sink, &mc).await;
    // Zoho CRM heard of the confirmation and of the withdrawal (its opt-out flag).
    wait_until(20, "the withdrawal written back to Zoho CRM", || {
        zf.record("Contacts", &ana)
            .is_some_and(|r| r["Email_Opt_Out"] == serde_json::json!(true))
    });
    assert!(!zf.updates().is_empty());
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn hubspot_to_mailchimp() {
    let hs = hubspot_fake();
    let mc = mailchimp_fake();
    let sink = SmtpSink::start();
    let demo = pairing_demo(hubspot_crm(&hs), &mailchimp_section(&mc), &sink);
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    through_mailchimp(&demo, &sink, &mc).await;
    wait_until(
        20,
        "the confirmation, then the withdrawal, written back to HubSpot",
        || hubspot_status(&hs, ANA).as_deref() == Some("NOT_SUBSCRIBED"),
    );
    let status = hs.subscription_status(ANA);
    assert!(
        status.to_string().contains("withdrawn"),
        "the explanation names the withdrawal: {status}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}
