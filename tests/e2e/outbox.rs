//! Dead letters: effects that fail for good are listed with their reason and can be queued
//! again or dropped by command.

use crate::support::*;

#[test]
fn dead_letters_are_listed_retried_and_dropped() {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let good_from = "from = \"Example University <confirm@example.org>\"";
    assert!(cfg.contains(good_from));
    // A sender the mail transport cannot use: every DOI mail fails permanently.
    std::fs::write(
        demo.config(),
        cfg.replace(good_from, "from = \"Example University <not a mailbox>\""),
    )
    .unwrap();
    let out = demo.run_ok(&["sync", "--once"]);
    assert!(out.contains("2 dead letters"), "{out}");
    assert!(demo.mails().is_empty());

    let failed = demo.run_ok(&["outbox", "failed"]);
    assert!(
        failed.contains("2 dead letter(s)") && failed.contains("mail"),
        "{failed}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&demo.run_ok(&["outbox", "failed", "--json"])).unwrap();
    let ids: Vec<String> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        json[0]["last_error"].as_str().unwrap().contains("sender"),
        "{json}"
    );

    // Fix the cause, queue one again: it is delivered; drop the other.
    std::fs::write(demo.config(), cfg).unwrap();
    assert!(
        demo.run_ok(&["outbox", "retry", &ids[0]])
            .contains("1 dead letter(s) queued again")
    );
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), 1);
    assert!(
        demo.run_ok(&["outbox", "drop", &ids[1]])
            .contains("1 dead letter(s) dropped")
    );
    assert!(
        demo.run_ok(&["outbox", "failed"])
            .contains("no dead letters")
    );

    // Unknown ids are an error, not a silent success.
    assert_eq!(
        demo.output(&["outbox", "retry", "424242"]).status.code(),
        Some(1)
    );
    assert_eq!(demo.output(&["outbox", "retry"]).status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn evidence_export_bundles_events_texts_and_the_verified_chain() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let ana = "ana.garcia@example.org";
    assert_eq!(
        click_confirm(&client, &demo.confirm_link(ana), "evidence-test/1.0")
            .await
            .status(),
        200
    );
    assert_eq!(daemon.terminate(), Some(0));

    let bundle: serde_json::Value =
        serde_json::from_str(&demo.run_ok(&["evidence", "export", ana, "--json"])).unwrap();
    assert_eq!(bundle["subject"]["email"], ana);
    assert_eq!(bundle["ledger"]["verified"], true);
    let events = bundle["events"].as_array().unwrap();
    let confirmed = events.iter().find(|e| e["kind"] == "confirmed").unwrap();
    assert_eq!(confirmed["evidence"]["user_agent"], "evidence-test/1.0");
    // The texts the person saw are in the bundle, under the hashes the ledger names.
    let texts = bundle["texts"].as_object().unwrap();
    let sent = events
        .iter()
        .find(|e| e["kind"] == "doi_mail_sent")
        .unwrap();
    let mail_hash = sent["evidence"]["content_hash"].as_str().unwrap();
    assert!(texts.contains_key(mail_hash), "DOI mail text in the bundle");
    let page_hash = confirmed["evidence"]["content_hash"].as_str().unwrap();
    assert!(
        texts[page_hash]["content"]
            .as_str()
            .unwrap()
            .contains("<form"),
        "confirm page in the bundle"
    );

    let human = demo.run_ok(&["evidence", "export", ana]);
    assert!(
        human.contains("Ledger verified") && human.contains("evidence-test/1.0"),
        "{human}"
    );

    // A tampered ledger gives no bundle.
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    sqlx::query("DROP TRIGGER ledger_no_update")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE ledger SET source = 'cli' WHERE seq = 1")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let out = demo.output(&["evidence", "export", ana]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("seq 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn erase_removes_personal_data_keeps_the_chain_and_suppresses() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let ana = "ana.garcia@example.org";
    assert_eq!(
        click_confirm(&client, &demo.confirm_link(ana), "erase-test-agent/1.0")
            .await
            .status(),
        200
    );
    wait_until(20, "Ana on the list", || {
        demo.list_members() == vec![ana.to_owned()]
    });
    assert_eq!(daemon.terminate(), Some(0));
    let contact_id = demo.contact_json(ana)["contact"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let out = demo.run_ok(&["erase", ana]);
    assert!(
        // The campaigns removal and the CRM opt-out write-back.
        out.contains("erased contact") && out.contains("2 removal(s) and CRM opt-out(s) delivered"),
        "{out}"
    );
    assert!(
        demo.list_members().is_empty(),
        "off the campaigns list at once"
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified"),
        "the chain still verifies"
    );
    assert_eq!(
        demo.output(&["contact", "show", ana]).status.code(),
        Some(1),
        "no contact under that address"
    );

    // No trace of the address, the IP or the user agent in the database.
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    for (table, col) in [
        ("ledger", "evidence"),
        ("contacts", "email"),
        ("contacts", "fields"),
        ("outbox", "payload"),
    ] {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM {table} WHERE {col} LIKE '%ana.garcia%' OR {col} LIKE '%erase-test-agent%' OR {col} LIKE '%García%'"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table}.{col} still holds personal data");
    }
    // The events stay: that consent was given, and that it was erased.
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM ledger WHERE contact_id = $1 ORDER BY seq")
            .bind(&contact_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        kinds.contains(&"confirmed".to_owned())
            && kinds.last().map(String::as_str) == Some("erased"),
        "{kinds:?}"
    );

    // Removing someone else's evidence without an erasure is tampering.
    let ben_id = demo.contact_json("ben.okafor@example.net")["contact"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    sqlx::query("UPDATE ledger SET evidence = '{\"erased\":true}' WHERE contact_id = $1")
        .bind(&ben_id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let verify = demo.output(&["ledger", "verify"]);
    assert_eq!(verify.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&verify.stderr).contains("was never erased"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erased_address_is_never_mailed_again_by_a_crm_sync() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    demo.run_ok(&["erase", "ben.okafor@example.net"]);
    // The CRM still holds Ben, asserted; a changed row makes the CRM send him again.
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv"))
        .unwrap()
        .replace("Ben,Okafor", "Benjamin,Okafor");
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    let mails_before = demo.mails().len();
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.mails().len(),
        mails_before,
        "suppressed: no new DOI mail"
    );
}
