//! The binary with the local CSV CRM and `.eml` mail, and `kind = "mailchimp"` against the
//! fake Mailchimp: only confirmed contacts reach the audience (with their opt-in proof in
//! Mailchimp's own fields); the webhook is registered at start-up (Mailchimp's validation GET
//! answered by the daemon), and unsubscribes and bounces made inside Mailchimp reach the
//! ledger.

use optinsync_testkit::mailchimp::{API_KEY, FakeMailchimp, MergeField, Status};

use crate::support::*;

const AUD: &str = "a1b2c3d4e5";
const SECRET: &str = "e2e-mailchimp-webhook-secret";

/// The demo set-up with its campaigns section pointed at the fake (with the webhook section
/// or without).
fn demo_with_fake(f: &FakeMailchimp, webhook: bool) -> Demo {
    let demo = Demo::new();
    let section = format!(
        r#"[connectors.campaigns]
kind = "mailchimp"
api_key = "{API_KEY}"
api_url = "{root}"
status_interval = "1s"
{hook}
[connectors.campaigns.lists.newsletter]
audience = "{AUD}"
doi = "optinsync"

[connectors.campaigns.lists.newsletter.merge_fields]
FNAME = "First_Name"
LNAME = "Last_Name"

"#,
        root = f.api_root(),
        hook = if webhook {
            format!(
                "\n[connectors.campaigns.webhook]\nurl = \"http://127.0.0.1:{}/webhooks/campaigns\"\nsecret = \"{SECRET}\"\nregister = true\n",
                demo.port
            )
        } else {
            String::new()
        },
    );
    demo.replace_connector("campaigns", &section);
    demo
}

#[tokio::test(flavor = "multi_thread")]
async fn mailchimp_gets_only_confirmed_contacts_and_its_unsubscribes_and_bounces_win() {
    let f = FakeMailchimp::start();
    f.add_list(AUD, "Master programmes newsletter");
    f.add_merge_field(AUD, MergeField::text("FNAME", false));
    f.add_merge_field(AUD, MergeField::text("LNAME", false));
    let demo = demo_with_fake(&f, true);

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

/// `doi = "campaigns"` on the optinsync list and `doi = "mailchimp"` on the mapped audience:
/// Mailchimp sends its own confirmation (the member is `pending`); optinsync sends no mail and
/// records Mailchimp's confirmation, read back by the status poll, as weaker evidence.
#[tokio::test(flavor = "multi_thread")]
async fn mailchimp_run_double_opt_in_is_recorded_as_weaker_evidence() {
    let f = FakeMailchimp::start();
    f.add_list(AUD, "Master programmes newsletter");
    f.add_merge_field(AUD, MergeField::text("FNAME", false));
    f.add_merge_field(AUD, MergeField::text("LNAME", false));
    let demo = demo_with_fake(&f, false);
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let mapping = format!("audience = \"{AUD}\"\ndoi = \"optinsync\"");
    assert!(cfg.contains(&mapping));
    let cfg = cfg.replace(
        &mapping,
        &format!("audience = \"{AUD}\"\ndoi = \"mailchimp\""),
    );
    assert_eq!(
        cfg.matches("\ndoi = \"optinsync\"\n").count(),
        1,
        "only the [[lists]] entry is left"
    );
    let cfg = cfg.replace("\ndoi = \"optinsync\"\n", "\ndoi = \"campaigns\"\n");
    std::fs::write(demo.config(), cfg).unwrap();

    demo.run_ok(&["sync", "--once"]);
    assert!(
        demo.mails().is_empty(),
        "optinsync sends no DOI mail for this list"
    );
    assert_eq!(
        f.confirmation_mails(AUD).len(),
        2,
        "Mailchimp sent its own confirmation to both asserted contacts"
    );
    assert!(f.members(AUD).iter().all(|m| m.status == Status::Pending));
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );

    // Ana clicks Mailchimp's confirmation mail; the next pass reads it back.
    f.confirm(AUD, "ana.garcia@example.org", "203.0.113.9")
        .await;
    std::thread::sleep(std::time::Duration::from_millis(1100)); // status_interval = 1s
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "confirmed"
    );
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "pending"
    );
    let v = demo.contact_json("ana.garcia@example.org");
    let ev = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "confirmed_by_campaigns")
        .unwrap()
        .clone();
    assert_eq!(ev["source"], "campaigns");

    // A later pass changes nothing more, sends no second Mailchimp confirmation and never
    // sets anyone `subscribed` from optinsync's side.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    demo.run_ok(&["sync", "--once"]);
    assert!(demo.mails().is_empty());
    assert_eq!(f.confirmation_mails(AUD).len(), 2);
    assert_eq!(
        demo.event_kinds("ana.garcia@example.org")
            .iter()
            .filter(|k| *k == "confirmed_by_campaigns")
            .count(),
        1
    );
    assert_eq!(
        f.calls("POST /lists/{list_id}"),
        0,
        "no batch subscribe to a Mailchimp-DOI audience"
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );
}

#[test]
fn a_missing_audience_stops_start_up_naming_the_setting() {
    let f = FakeMailchimp::start();
    f.add_list("0123456789", "Another audience");
    let demo = demo_with_fake(&f, false);
    let out = demo.output(&["sync", "--once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("connectors.campaigns.lists.newsletter.audience"),
        "{stderr}"
    );
    assert!(stderr.contains("Another audience"), "{stderr}");
    assert!(f.members("0123456789").is_empty());
}

/// `campaign import-existing` from a Mailchimp audience: its subscribed members (not the
/// unsubscribed one) are taken in as asserted and asked to confirm; one who confirms gets
/// optinsync's proof in Mailchimp's opt-in fields.
#[tokio::test(flavor = "multi_thread")]
async fn an_existing_audience_is_taken_in_and_asked_to_confirm() {
    use optinsync_testkit::mailchimp::SeedMember;
    let f = FakeMailchimp::start();
    f.add_list(AUD, "Master programmes newsletter");
    f.add_merge_field(AUD, MergeField::text("FNAME", false));
    f.add_merge_field(AUD, MergeField::text("LNAME", false));
    for who in ["old1@example.org", "old2@example.org", "old3@example.org"] {
        f.insert_member(AUD, SeedMember::new(who, Status::Subscribed));
    }
    f.insert_member(
        AUD,
        SeedMember::new("gone@example.org", Status::Unsubscribed),
    );
    let demo = demo_with_fake(&f, false);
    // Only the imported members: no CRM assertions.
    std::fs::write(
        demo.path("demo/contacts.csv"),
        "Id,First_Name,Last_Name,Email,Language,Newsletter_Requested,Email_Opt_Out\n",
    )
    .unwrap();
    let out = demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    assert!(out.contains("3 members; 3 taken in as asserted"), "{out}");
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), 3, "one DOI mail per subscribed member");
    assert_eq!(demo.state("old1@example.org", "newsletter"), "pending");
    // The unsubscribed member was not taken in: the status poll records her unsubscribe,
    // and nobody asks her to confirm.
    assert_eq!(demo.state("gone@example.org", "newsletter"), "withdrawn");

    let daemon = demo.spawn_daemon();
    let link = demo.confirm_link("old1@example.org");
    assert_eq!(
        click_confirm(&http(), &link, "e2e-browser/1.0")
            .await
            .status(),
        200
    );
    wait_until(20, "the proof in Mailchimp's opt-in fields", || {
        f.member(AUD, "old1@example.org")
            .is_some_and(|m| m.ip_opt == "127.0.0.1" && !m.timestamp_opt.is_empty())
    });
    assert_eq!(daemon.terminate(), Some(0));
}
