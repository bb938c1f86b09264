//! The binary with the local CSV CRM and `.eml` mail, and `kind = "zoho-campaigns"` against the
//! fake Zoho Campaigns: only confirmed contacts reach the list; unsubscribes and bounces made
//! inside Campaigns reach the ledger and are never undone by a CRM sync; removals Zoho answers
//! ambiguously (`2101`) neither block confirmations nor open the campaigns circuit.

use optinsync_testkit::zoho_campaigns::{
    self as fake, FakeCampaigns, FakeCampaignsOptions, MemberStatus,
};

use crate::support::*;

const KEY: &str = "2f4e6a8c0b1d3f5a7c9e1b3d5f7a9c1e";

/// The demo set-up with its campaigns section pointed at the fake.
fn demo_with_fake(f: &FakeCampaigns) -> Demo {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let start = cfg.find("[connectors.campaigns]").unwrap();
    let end = cfg[start + 1..]
        .find("\n[")
        .map(|i| start + 1 + i + 1)
        .unwrap_or(cfg.len());
    let section = format!(
        r#"[connectors.campaigns]
kind = "zoho-campaigns"
client_id = "{}"
client_secret = "{}"
refresh_token = "{}"
accounts_url = "{url}"
campaigns_url = "{url}"
status_interval = "1s"
language_field = "Language"

[connectors.campaigns.fields]
"First Name" = "First_Name"
"Last Name" = "Last_Name"

[connectors.campaigns.lists.newsletter]
listkey = "{KEY}"
doi = "optinsync"

"#,
        fake::CLIENT_ID,
        fake::CLIENT_SECRET,
        fake::REFRESH_TOKEN,
        url = f.url(),
    );
    let cfg = format!("{}{section}{}", &cfg[..start], &cfg[end..]);
    std::fs::write(demo.config(), cfg).unwrap();
    demo
}

#[tokio::test(flavor = "multi_thread")]
async fn zoho_campaigns_gets_only_confirmed_contacts_and_its_unsubscribes_win() {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Master programmes newsletter", false);
    let demo = demo_with_fake(&f);

    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.mails().len(),
        2,
        "DOI mails for the two asserted contacts"
    );
    assert!(
        f.members(KEY).is_empty(),
        "nobody is on the Campaigns list before confirming"
    );
    assert_eq!(f.calls("listsubscribe"), 0);

    let daemon = demo.spawn_daemon();
    let client = http();
    confirm_ana_and_ben(&demo, &client).await;
    wait_until(20, "both confirmed contacts on the Zoho list", || {
        f.active(KEY).len() == 2
    });
    assert_eq!(
        f.active(KEY),
        vec![
            "ana.garcia@example.org".to_owned(),
            "ben.okafor@example.net".to_owned()
        ]
    );
    let ana = f.member(KEY, "ana.garcia@example.org").unwrap();
    assert_eq!(ana.fields["First Name"], "Ana");
    assert_eq!(ana.fields["Last Name"], "García");
    assert_eq!(ana.fields["Language"], "es");
    assert_eq!(
        f.confirmation_mails(KEY),
        0,
        "Zoho sent no second confirmation"
    );

    // Ana unsubscribes inside Campaigns: the ledger knows within a poll interval (1 s).
    f.unsubscribe(KEY, "ana.garcia@example.org");
    wait_until(10, "the Campaigns unsubscribe in the ledger", || {
        demo.state("ana.garcia@example.org", "newsletter") == "withdrawn"
    });
    let events = demo.event_kinds("ana.garcia@example.org");
    assert!(
        events
            .iter()
            .any(|k| k.contains("withdrawn") || k.contains("unsub")),
        "{events:?}"
    );

    // Ben's address bounces inside Campaigns.
    f.bounce(KEY, "ben.okafor@example.net");
    wait_until(10, "the Campaigns bounce in the ledger", || {
        demo.state("ben.okafor@example.net", "newsletter") == "bounced"
    });

    // The CRM row is edited (still asserting the list, not opted out): no re-subscription.
    let subscribes = f.calls("listsubscribe");
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv")).unwrap();
    let edited = csv.replace("1001,Ana,García,", "1001,Ana María,García,");
    assert_ne!(csv, edited);
    std::fs::write(demo.path("demo/contacts.csv"), edited).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "withdrawn"
    );
    assert_eq!(
        f.member(KEY, "ana.garcia@example.org").unwrap().status,
        MemberStatus::Unsub,
        "never re-added"
    );
    assert_eq!(
        f.calls("listsubscribe"),
        subscribes,
        "no subscribe call after the withdrawal"
    );
    assert_eq!(f.locks(), 0);
    assert_eq!(daemon.terminate(), Some(0));

    // A later full sync changes nothing either.
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "withdrawn"
    );
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "bounced"
    );
    assert!(f.active(KEY).is_empty());
}

#[test]
fn a_missing_zoho_list_stops_start_up_naming_the_setting() {
    let f = FakeCampaigns::start();
    f.add_list("someotherkey", "Another list", false);
    let demo = demo_with_fake(&f);
    let out = demo.output(&["sync", "--once"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing list is a configuration error"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connectors.campaigns.lists.newsletter.listkey") && err.contains(KEY),
        "{err}"
    );
}

/// `doi = "campaigns"` on the optinsync list and `doi = "zoho"` on the mapped signup-form
/// list: Zoho sends its own confirmation; optinsync sends no mail and records Zoho's
/// confirmation as weaker evidence.
#[tokio::test(flavor = "multi_thread")]
async fn zoho_run_double_opt_in_is_recorded_as_weaker_evidence() {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Master programmes newsletter", true);
    let demo = demo_with_fake(&f);
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    // The connector's list mapping: Zoho's signup form runs the DOI ...
    let mapping = format!("listkey = \"{KEY}\"\ndoi = \"optinsync\"");
    assert!(cfg.contains(&mapping));
    let cfg = cfg.replace(&mapping, &format!("listkey = \"{KEY}\"\ndoi = \"zoho\""));
    // ... and the optinsync list says so.
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
        f.confirmation_mails(KEY),
        2,
        "Zoho sent its own confirmation to both asserted contacts"
    );
    assert!(f.active(KEY).is_empty(), "nobody active before confirming");
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );

    // Ana clicks Zoho's confirmation mail; the next pass records it.
    f.confirm(KEY, "ana.garcia@example.org");
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
    assert!(
        ev["evidence"]["detail"]
            .as_str()
            .unwrap()
            .contains("weaker evidence"),
        "{ev}"
    );
    assert!(ev["evidence"]["ip"].is_null(), "no IP is claimed");

    // A later pass changes nothing more; no reminder mails from optinsync either.
    demo.run_ok(&["sync", "--once"]);
    assert!(demo.mails().is_empty());
    assert_eq!(
        demo.event_kinds("ana.garcia@example.org")
            .iter()
            .filter(|k| *k == "confirmed_by_campaigns")
            .count(),
        1
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );
}

/// The campaigns circuit as `/readyz` reports it (`closed`, `open`, `half_open`).
async fn campaigns_circuit(port: u16) -> String {
    let body: serde_json::Value = http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["circuits"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["connector"] == "campaigns"))
        .map(|c| c["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_else(|| panic!("no campaigns circuit in /readyz: {body}"))
}

/// Zoho answers `listunsubscribe` for an address the list does not hold with `2101` "Please
/// retry after sometime." (the only code its page documents). Every opted-out CRM contact
/// queues a defensive removal, so a run has many of these alongside new confirmations. They
/// are answers about one address each: they must end as done (after a read of the list), must
/// never open the campaigns circuit, and confirmations must reach the list at once.
#[tokio::test(flavor = "multi_thread")]
async fn zoho_2101_removals_do_not_block_confirmations() {
    // The run that found it: 5,000 CRM contacts, 50 of them opted out (ten times the circuit
    // threshold), beside people confirming.
    const OPTED_OUT: usize = 50;
    const OTHERS: usize = 4_950;
    let f = FakeCampaigns::start_with(FakeCampaignsOptions::unknown_unsubscribe_retry());
    f.add_list(KEY, "Master programmes newsletter", false);
    // One opted-out contact is on the Zoho list from before optinsync: really removed.
    f.insert_member(KEY, "held.out@example.org", MemberStatus::Active);
    let demo = demo_with_fake(&f);
    let mut csv = std::fs::read_to_string(demo.path("demo/contacts.csv")).unwrap();
    for i in 0..OPTED_OUT {
        csv.push_str(&format!(
            "{},O{i},Out,opted.out{i}@example.org,en,true,true\n",
            7000 + i
        ));
    }
    csv.push_str("7100,Held,Out,held.out@example.org,en,true,true\n");
    for i in 0..OTHERS {
        csv.push_str(&format!(
            "{},P{i},Person,person{i}@example.com,en,false,false\n",
            20_000 + i
        ));
    }
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    // Fast per-record retries; a circuit that opened would pause the campaigns connector far
    // longer than the 10 s confirmations are allowed.
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    assert!(cfg.contains("poll_interval = \"1s\"\n"));
    let cfg = cfg.replacen(
        "poll_interval = \"1s\"\n",
        "poll_interval = \"1s\"\nretry_base = \"1s\"\nretry_cap = \"2s\"\n\
         circuit_threshold = 5\ncircuit_cooldown = \"120s\"\n",
        1,
    );
    std::fs::write(demo.config(), cfg).unwrap();

    let out = demo.output(&["sync", "--once"]);
    let sync_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{sync_log}");
    assert_eq!(demo.mails().len(), 2, "DOI mails for Ana and Ben");

    let daemon = demo.spawn_daemon();
    let port = demo.port;
    let url = demo.sqlite_url();
    // Let the daemon's first delivery passes run: the removals are settled, or (the bug)
    // their retries have opened the circuit.
    wait_until(20, "removals settled or the campaigns circuit open", || {
        let rt = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| {
            rt.block_on(async {
                let store = optinsync_engine::store::open(&url).await.unwrap();
                store.outbox_counts().await.unwrap().pending == 0
                    || campaigns_circuit(port).await != "closed"
            })
        })
    });

    let client = http();
    let clicked = std::time::Instant::now();
    confirm_ana_and_ben(&demo, &client).await;
    wait_until(
        10,
        "both confirmations on the Zoho list within 10 s",
        || f.active(KEY).len() == 2,
    );
    println!(
        "zoho 2101: confirmations on the list {:.1} s after the clicks",
        clicked.elapsed().as_secs_f64()
    );
    assert_eq!(
        f.active(KEY),
        vec![
            "ana.garcia@example.org".to_owned(),
            "ben.okafor@example.net".to_owned()
        ]
    );

    // No circuit opening, in the one-shot sync or the daemon: per-record answers only.
    assert_eq!(campaigns_circuit(port).await, "closed");
    let metrics = demo.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("optinsync_circuit_open{connector=\"campaigns\"} 0")),
        "{metrics}"
    );
    // Quota use of this process's own budget (SQLite: no shared ledger), a share in (0, 1].
    let used: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("optinsync_vendor_quota_used_ratio{connector=\"zoho_campaigns\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        !used.is_empty() && used.iter().all(|u| *u > 0.0 && *u <= 1.0),
        "{used:?}\n{metrics}"
    );
    let daemon_log = std::fs::read_to_string(demo.path("daemon.log")).unwrap();
    for (name, log) in [("sync --once", &sync_log), ("daemon", &daemon_log)] {
        assert_eq!(
            log.matches("circuit open").count(),
            0,
            "{name} opened a circuit:\n{log}"
        );
    }

    // Every removal ended as done: not on the list after a read, or really unsubscribed.
    assert!(
        f.calls("listunsubscribe") as usize > OPTED_OUT,
        "every opted-out contact's removal was tried: {}",
        f.calls("listunsubscribe")
    );
    // The lanes run apart: the list can hold both confirmations while the CRM write-back of
    // the second is still in flight (seen once in CI), so wait for the outbox to drain.
    let store = optinsync_engine::store::open(&demo.sqlite_url())
        .await
        .unwrap();
    let drained = std::time::Instant::now();
    let mut first_look = true;
    loop {
        let counts = store.outbox_counts().await.unwrap();
        assert_eq!(counts.dead, 0, "{counts:?}");
        if counts.pending == 0 {
            break;
        }
        if first_look {
            first_look = false;
            let depth = store.outbox_depth().await.unwrap();
            println!("zoho 2101: pending after the list check: {depth:?}");
        }
        assert!(
            drained.elapsed() < std::time::Duration::from_secs(10 * LOAD_FACTOR),
            "outbox not drained: {counts:?}\n{:#?}",
            store.outbox_depth().await.unwrap()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        f.member(KEY, "held.out@example.org").unwrap().status,
        MemberStatus::Unsub
    );
    assert!(
        f.calls("getlistsubscribers") as usize >= OPTED_OUT,
        "each ambiguous answer was checked with a read"
    );
    // What was found is logged at INFO, without the address.
    let found = sync_log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("list does not hold the address"))
        .count();
    assert!(found >= OPTED_OUT, "{found} INFO lines:\n{sync_log}");
    for log in [&sync_log, &daemon_log] {
        assert!(
            !log.contains("opted.out") && !log.contains("held.out"),
            "an address was logged:\n{log}"
        );
    }
    assert_eq!(f.locks(), 0);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Forty confirmations that pile up while Zoho has both subscribe endpoints locked go out, once
/// the lock ends, through the bulk endpoint, ten addresses per call (the contacts need no
/// fields): batched by the outbox up to the connector's batch size, within Zoho's quota, with
/// no lock-out of our own making.
#[tokio::test(flavor = "multi_thread")]
async fn piled_up_confirmations_go_out_ten_per_bulk_call_within_the_quota() {
    // Zoho's quotas and its 30-minute lock, 500 times faster (the lock lasts 3.6 s).
    let f = FakeCampaigns::start_with(FakeCampaignsOptions {
        time_scale: 0.002,
        ..FakeCampaignsOptions::default()
    });
    f.add_list(KEY, "Master programmes newsletter", false);
    let demo = demo_with_fake(&f);
    // No field mapping (an empty table; the default maps the names): the bulk call carries
    // addresses only.
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let cfg = cfg
        .replace("status_interval = \"1s\"\n", "status_interval = \"1s\"\ntime_scale = 0.002\n")
        .replace("language_field = \"Language\"\n", "")
        .replace(
            "[connectors.campaigns.fields]\n\"First Name\" = \"First_Name\"\n\"Last Name\" = \"Last_Name\"\n",
            "[connectors.campaigns.fields]\n",
        );
    // Forty clicks from one test client: above the per-client page limit's default.
    let cfg = cfg.replace("[server]\n", "[server]\nrate_limit_per_minute = 1000\n");
    std::fs::write(demo.config(), cfg).unwrap();
    write_contacts(&demo.path("demo/contacts.csv"), 40);
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), 40);

    // Locked until every click is in (a loaded machine may take longer than any fixed lock).
    f.lock_endpoint(
        "addlistsubscribersinbulk",
        std::time::Duration::from_secs(120),
    );
    f.lock_endpoint("listsubscribe", std::time::Duration::from_secs(120));
    let daemon = demo.spawn_daemon();
    let client = http();
    for i in 0..40 {
        let link = demo.confirm_link(&format!("person{i}@example.org"));
        assert_eq!(
            click_confirm(&client, &link, "e2e-browser/1.0")
                .await
                .status(),
            200
        );
    }
    // Every confirmation is committed (each POST answered after its commit): the lock ends.
    let refused = f.calls("addlistsubscribersinbulk");
    f.lock_endpoint("addlistsubscribersinbulk", std::time::Duration::ZERO);
    f.lock_endpoint("listsubscribe", std::time::Duration::ZERO);
    wait_until(30, "all forty on the Zoho list", || {
        f.active(KEY).len() == 40
    });
    let bulk = f.calls("addlistsubscribersinbulk") - refused;
    assert!(
        (4..=8).contains(&bulk),
        "forty addresses in calls of ten once the lock ended ({refused} refused before): {bulk}"
    );
    assert!(
        f.calls("listsubscribe") <= 2,
        "one-by-one subscribes only for what the lock caught alone: {}",
        f.calls("listsubscribe")
    );
    // The fake's windows are Zoho's documented ones; the peaks say none was overrun.
    assert!(
        !f.peaks("addlistsubscribersinbulk").is_empty(),
        "the fake counted the bulk calls"
    );
    assert_eq!(f.locks(), 0, "no lock-out caused by optinsync");
    assert_eq!(daemon.terminate(), Some(0));
}

/// The campaigns poll follows the connector's own cadence (`status_interval = "1s"`), not the
/// daemon's `poll_interval` (here 60 s): an unsubscribe made inside Zoho reaches the ledger in
/// seconds.
#[tokio::test(flavor = "multi_thread")]
async fn the_campaigns_poll_runs_at_the_connectors_status_interval() {
    let f = FakeCampaigns::start();
    f.add_list(KEY, "Master programmes newsletter", false);
    let demo = demo_with_fake(&f);
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        cfg.replace("poll_interval = \"1s\"", "poll_interval = \"60s\""),
    )
    .unwrap();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    confirm_ana_and_ben(&demo, &client).await;
    wait_until(20, "both on the Zoho list", || f.active(KEY).len() == 2);
    let polls = f.calls("getlistsubscribers");
    f.unsubscribe(KEY, "ana.garcia@example.org");
    wait_until(15, "the Campaigns unsubscribe in the ledger", || {
        demo.state("ana.garcia@example.org", "newsletter") == "withdrawn"
    });
    assert!(f.calls("getlistsubscribers") > polls);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Ana and Ben press the button of their confirmation mails.
async fn confirm_ana_and_ben(demo: &Demo, client: &reqwest::Client) {
    for who in ["ana.garcia@example.org", "ben.okafor@example.net"] {
        let link = demo.confirm_link(who);
        assert_eq!(
            click_confirm(client, &link, "e2e-browser/1.0")
                .await
                .status(),
            200,
            "{who}"
        );
    }
}
