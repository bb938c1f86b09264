//! The README walkthrough, as a test: DOI mails for asserted contacts only, GET changes
//! nothing, POST subscribes, a second sync sends nothing new.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn demo_double_opt_in_end_to_end() {
    let demo = Demo::new();
    let summary = demo.run_ok(&["sync", "--once"]);
    assert!(
        summary
            .contains("4 CRM records (1 skipped as invalid, 0 erased addresses not stored again)"),
        "{summary}"
    );

    // DOI mails for the two asserted contacts only: not for "no consent", not for "opted out".
    let mails = demo.mails();
    assert_eq!(mails.len(), 2, "{mails:?}");
    let ana = demo.mail_to("ana.garcia@example.org");
    assert!(ana.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click"));
    demo.mail_to("ben.okafor@example.net");
    assert_eq!(demo.state("chloe.martin@example.com", "newsletter"), "none");
    assert_eq!(demo.state("dmitri@example.com", "newsletter"), "withdrawn");
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );
    assert!(
        demo.list_members().is_empty(),
        "nobody is on the list before confirming"
    );

    let daemon = demo.spawn_daemon();
    let link = demo.confirm_link("ana.garcia@example.org");
    let client = http();

    // A link scanner's GET and HEAD change nothing.
    let get = client.get(&link).send().await.unwrap();
    assert_eq!(get.status(), 200);
    let body = get.text().await.unwrap();
    assert!(body.contains("<form method=\"post\">"), "{body}");
    assert_eq!(client.head(&link).send().await.unwrap().status(), 200);
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );

    // A POST without the page's nonce confirms nothing.
    assert_eq!(client.post(&link).send().await.unwrap().status(), 400);
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );

    // The person's POST from the page confirms; repeating it is harmless.
    let post = click_confirm(&client, &link, "e2e-browser/1.0").await;
    assert_eq!(post.status(), 200);
    assert!(post.text().await.unwrap().contains("suscrito"));
    assert_eq!(
        click_confirm(&client, &link, "e2e-browser/1.0")
            .await
            .status(),
        200
    );
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "confirmed"
    );

    wait_until(20, "subscription in the JSONL list", || {
        demo.list_members() == vec!["ana.garcia@example.org".to_owned()]
    });

    // The evidence: exactly one confirmation, with IP, user agent, token and page hash.
    let v = demo.contact_json("ana.garcia@example.org");
    let events = v["events"].as_array().unwrap();
    let confirmed: Vec<_> = events.iter().filter(|e| e["kind"] == "confirmed").collect();
    assert_eq!(confirmed.len(), 1, "{events:#?}");
    let ev = &confirmed[0]["evidence"];
    assert_eq!(ev["ip"], "127.0.0.1");
    assert_eq!(ev["user_agent"], "e2e-browser/1.0");
    assert!(
        ev["token_id"].is_string() && ev["content_hash"].is_string(),
        "{ev}"
    );
    let sent = events
        .iter()
        .find(|e| e["kind"] == "doi_mail_sent")
        .unwrap();
    assert!(
        ana.contains(sent["evidence"]["message_id"].as_str().unwrap()),
        "Message-ID in the ledger is the mail's"
    );
    let human = demo.run_ok(&["contact", "show", "ana.garcia@example.org"]);
    assert!(
        human.contains("pending -> confirmed") && human.contains("ip: 127.0.0.1"),
        "{human}"
    );

    assert_eq!(daemon.terminate(), Some(0));

    // A second pass sends nothing new.
    let again = demo.run_ok(&["sync", "--once"]);
    assert!(again.contains("0 CRM records"), "{again}");
    assert_eq!(demo.mails().len(), 2);
    let verify = demo.run_ok(&["ledger", "verify"]);
    assert!(verify.starts_with("ledger verified:"), "{verify}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_click_unsubscribe_removes_from_list_and_wins() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let confirm = demo.confirm_link("ben.okafor@example.net");
    assert_eq!(click_confirm(&client, &confirm, "e2e").await.status(), 200);
    wait_until(20, "subscription", || demo.list_members().len() == 1);

    // RFC 8058 one-click POST.
    let unsub = demo.unsubscribe_link("ben.okafor@example.net");
    let resp = client
        .post(&unsub)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "withdrawn"
    );
    wait_until(20, "removal from the list", || {
        demo.list_members().is_empty()
    });

    // The old confirmation link cannot undo the withdrawal.
    let again = click_confirm(&client, &confirm, "e2e").await;
    assert_eq!(again.status(), 409);
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "withdrawn"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_tampered_and_wrong_purpose_links_change_nothing() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let link = demo.confirm_link("ana.garcia@example.org");
    let base = format!("http://127.0.0.1:{}", demo.port);

    let mut tampered = link.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [
        format!("{base}/confirm/garbage"),
        format!("{base}/confirm/a.b"),
        tampered,
    ] {
        assert_eq!(
            client.post(&bad).send().await.unwrap().status(),
            400,
            "{bad}"
        );
        assert_eq!(
            client.get(&bad).send().await.unwrap().status(),
            400,
            "{bad}"
        );
    }
    // An unsubscribe token is not a confirmation token.
    let unsub_token = demo
        .unsubscribe_link("ana.garcia@example.org")
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        client
            .post(format!("{base}/confirm/{unsub_token}"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending"
    );
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(daemon.terminate(), Some(0));
}
