//! The binary with the local CSV CRM and `.eml` mail, and `kind = "mailchimp"` against the
//! fake Mailchimp: only confirmed contacts reach the audience (with their opt-in proof in
//! Mailchimp's own fields); the webhook is registered at start-up (Mailchimp's validation GET
//! answered by the daemon), and unsubscribes and bounces made inside Mailchimp reach the
//! ledger.

use optinsync_testkit::mailchimp::{API_KEY, FakeMailchimp, MergeField, Status};

use crate::support::*;

const AUD: &str = "a1b2c3d4e5";
const SECRET: &str = "e2e-mailchimp-webhook-secret";

/// The demo set-up with its campaigns section pointed at the fake.
fn demo_with_fake(f: &FakeMailchimp) -> Demo {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let start = cfg.find("[connectors.campaigns]").unwrap();
    let end = cfg[start + 1..]
        .find("\n[")
        .map(|i| start + 1 + i + 1)
        .unwrap_or(cfg.len());
    let section = format!(
        r#"[connectors.campaigns]
kind = "mailchimp"
api_key = "{API_KEY}"
api_url = "{root}"
status_interval = "1s"

[connectors.campaigns.webhook]
url = "http://127.0.0.1:{port}/webhooks/campaigns"
secret = "{SECRET}"
register = true

[connectors.campaigns.lists.newsletter]
audience = "{AUD}"

[connectors.campaigns.lists.newsletter.merge_fields]
FNAME = "First_Name"
LNAME = "Last_Name"

"#,
        root = f.api_root(),
        port = demo.port,
    );
    let cfg = format!("{}{section}{}", &cfg[..start], &cfg[end..]);
    std::fs::write(demo.config(), cfg).unwrap();
    demo
}

#[tokio::test(flavor = "multi_thread")]
async fn mailchimp_gets_only_confirmed_contacts_and_its_unsubscribes_and_bounces_win() {
    let f = FakeMailchimp::start();
    f.add_list(AUD, "Master programmes newsletter");
    f.add_merge_field(AUD, MergeField::text("FNAME", false));
    f.add_merge_field(AUD, MergeField::text("LNAME", false));
    let demo = demo_with_fake(&f);

    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.mails().len(),
        2,
        "DOI mails for the two asserted contacts"
    );
    assert!(
        f.members(AUD).is_empty(),
        "nobody is on the audience before confirming"
    );

    let daemon = demo.spawn_daemon();
    let client = http();
    for who in ["ana.garcia@example.org", "ben.okafor@example.net"] {
        let link = demo.confirm_link(who);
        assert_eq!(
            click_confirm(&client, &link, "e2e-browser/1.0")
                .await
                .status(),
            200,
            "{who}"
        );
    }
    wait_until(
        20,
        "both confirmed contacts subscribed on Mailchimp",
        || {
            f.members(AUD)
                .iter()
                .filter(|m| m.status == Status::Subscribed)
                .count()
                == 2
        },
    );
    let ana = f.member(AUD, "ana.garcia@example.org").unwrap();
    assert_eq!(ana.merge_fields["FNAME"], "Ana");
    assert_eq!(ana.merge_fields["LNAME"], "García");
    assert!(
        !ana.timestamp_opt.is_empty(),
        "the confirmation time is Mailchimp's timestamp_opt"
    );
    assert!(
        f.confirmation_mails(AUD).is_empty(),
        "Mailchimp sent no confirmation of its own"
    );
    assert!(f.peak_concurrency() <= 10);

    // The webhook: registered once, after the daemon answered Mailchimp's validation GET.
    wait_until(20, "the webhook registered", || f.webhooks(AUD).len() == 1);
    assert!(
        f.validations().iter().all(|(_, s)| *s == Some(200)),
        "{:?}",
        f.validations()
    );

    // Ana unsubscribes inside Mailchimp; Ben's address bounces.
    f.unsubscribe_by_user(AUD, "ana.garcia@example.org", false)
        .await;
    wait_until(10, "the Mailchimp unsubscribe in the ledger", || {
        demo.state("ana.garcia@example.org", "newsletter") == "withdrawn"
    });
    f.bounce(AUD, "ben.okafor@example.net").await;
    wait_until(10, "the Mailchimp bounce in the ledger", || {
        demo.state("ben.okafor@example.net", "newsletter") == "bounced"
    });
    assert!(
        f.deliveries()
            .iter()
            .filter(|d| d.event_type == "unsubscribe" || d.event_type == "cleaned")
            .all(|d| d.status == Some(200)),
        "{:?}",
        f.deliveries()
    );
    // Nothing was ever deleted (archived): removals are unsubscribes.
    assert_eq!(
        f.calls("DELETE /lists/{list_id}/members/{subscriber_hash}"),
        0
    );
    assert_eq!(f.webhooks(AUD).len(), 1);
    drop(daemon);
}
