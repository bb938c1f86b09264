//! Security: a full lifecycle at the default INFO level logs no email address and no secret,
//! and the admin JSON API answers only with its bearer token.

use crate::support::*;

const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789-abcdefghij";
const TOKEN_SECRET: &str = "demo-only-secret-change-me-0123456789abcdef";

/// Every `local@domain.tld` in `text` (a deliberately loose pattern: better a false alarm
/// than a missed address).
fn addresses(text: &str) -> Vec<String> {
    let is_local = |c: char| c.is_alphanumeric() || "._%+-'".contains(c);
    let is_domain = |c: char| c.is_alphanumeric() || c == '-' || c == '.';
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    for (i, c) in chars.iter().enumerate() {
        if *c != '@' {
            continue;
        }
        let mut start = i;
        while start > 0 && is_local(chars[start - 1]) {
            start -= 1;
        }
        let mut end = i + 1;
        while end < chars.len() && is_domain(chars[end]) {
            end += 1;
        }
        let domain: String = chars[i + 1..end].iter().collect();
        let domain = domain.trim_end_matches('.');
        if start < i && domain.contains('.') && !domain.starts_with('.') {
            found.push(
                chars[start..i + 1 + domain.chars().count()]
                    .iter()
                    .collect(),
            );
        }
    }
    found
}

#[test]
fn address_pattern_finds_addresses() {
    assert_eq!(
        addresses("x contact=ana.garcia@example.org, <Ben.Okafor@Example.net>. chloé@bücher.de"),
        [
            "ana.garcia@example.org",
            "Ben.Okafor@Example.net",
            "chloé@bücher.de"
        ]
    );
    assert!(addresses("rule@v1 a@b @ x@y. user@localhost").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn full_run_logs_no_address_and_no_secret() {
    let demo = Demo::new();
    let config = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        format!("{config}\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n"),
    )
    .unwrap();
    // An invalid row with an address in a non-UTF-8 export, next to the demo's broken one.
    let mut csv = std::fs::read(demo.path("demo/contacts.csv")).unwrap();
    csv.extend_from_slice(
        b"1006,Fr\xe9d\xe9ric,Caf\xe9,fr\xe9d\xe9ric@caf\xe9.example.org,fr,true,false\n",
    );
    std::fs::write(demo.path("demo/contacts.csv"), &csv).unwrap();

    // 1. One pass from the command line (CRM pull, DOI mails, opt-out of Dmitri).
    let out = demo.output(&["sync", "--once"]);
    assert!(out.status.success());
    let mut scanned = String::from_utf8_lossy(&out.stdout).into_owned();
    scanned.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(scanned.contains("2 skipped as invalid"), "{scanned}");

    // 2. The daemon: confirmation, unsubscribe, CRM opt-out, a webhook, a bounce.
    let daemon = demo.spawn_daemon();
    let client = http();
    let base = format!("http://127.0.0.1:{}", demo.port);
    let link = demo.confirm_link("ana.garcia@example.org");
    assert_eq!(
        click_confirm(&client, &link, "log-scan/1.0").await.status(),
        200
    );
    let unsub = demo.unsubscribe_link("ben.okafor@example.net");
    let r = client
        .post(&unsub)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A new asserted contact, announced by webhook; Ana opts out in the CRM.
    let ana = "1001,Ana,García,ana.garcia@example.org,es,true,false".as_bytes();
    let mut edited: Vec<u8> = csv
        .split(|b| *b == b'\n')
        .map(|line| {
            if line == ana {
                "1001,Ana,García,ana.garcia@example.org,es,true,true".as_bytes()
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join(&b'\n');
    edited.extend_from_slice(b"1007,Gus,Grant,Gus.Grant+news@example.com,en,true,false\n");
    std::fs::write(demo.path("demo/contacts.csv"), edited).unwrap();
    let r = client
        .post(format!("{base}/webhooks/crm"))
        .header("content-type", "application/json")
        .body(r#"{"ids": ["1007"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_until(20, "a DOI mail for the webhook's contact", || {
        demo.mails().len() == 3
    });
    wait_until(20, "the CRM opt-out", || {
        demo.state("ana.garcia@example.org", "newsletter") == "withdrawn"
    });
    std::fs::write(
        demo.path("var/campaigns-status.jsonl"),
        "{\"list\":\"newsletter\",\"email\":\"gus.grant+news@example.com\",\"kind\":\"bounced\"}\n",
    )
    .unwrap();
    wait_until(20, "the bounce", || {
        demo.state("gus.grant+news@example.com", "newsletter") == "bounced"
    });
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "withdrawn"
    );

    // 3. The admin API: bearer token required, compared exactly.
    let status_url = format!("{base}/admin/status");
    let r = client.get(&status_url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer"))
    );
    for wrong in [
        "Bearer wrong-token",
        &format!("Bearer {ADMIN_TOKEN}x"),
        &format!("Basic {ADMIN_TOKEN}"),
        &format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
    ] {
        let r = client
            .get(&status_url)
            .header("authorization", wrong)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{wrong}");
    }
    let contact_url = format!("{base}/admin/contacts/Ben.Okafor%40Example.net");
    let r = client.get(&contact_url).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let auth = format!("Bearer {ADMIN_TOKEN}");
    let r = client
        .get(&status_url)
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let status: serde_json::Value = r.json().await.unwrap();
    let cli: serde_json::Value = serde_json::from_str(&demo.run_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["consent"], cli["consent"]);
    assert_eq!(status["outbox"]["dead"], cli["outbox"]["dead"]);
    assert!(
        status["consent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["state"] == "bounced"),
        "{status:#}"
    );

    let r = client
        .get(&contact_url)
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let contact: serde_json::Value = r.json().await.unwrap();
    assert_eq!(contact, demo.contact_json("ben.okafor@example.net"));
    assert_eq!(contact["contact"]["email"], "ben.okafor@example.net");
    let r = client
        .get(format!("{base}/admin/contacts/nobody%40example.org"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .get(format!("{base}/admin/contacts/not-an-address"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    assert_eq!(daemon.terminate(), Some(0));

    // 4. The scan.
    let log = std::fs::read_to_string(demo.path("daemon.log")).unwrap();
    assert!(!log.contains("DEBUG"), "the run was not at INFO level");
    scanned.push_str(&log);
    // The logs saw the whole run (so the scan below is not vacuous).
    for expected in [
        "invalid email address",
        "not valid UTF-8",
        "confirmed",
        "withdrawn",
        "bounced",
        "webhook handled",
        "admin API",
        "INFO",
    ] {
        assert!(
            scanned.contains(expected),
            "logs lack {expected:?}:\n{scanned}"
        );
    }
    let found = addresses(&scanned);
    assert!(
        found.is_empty(),
        "addresses in the logs: {found:?}\n{scanned}"
    );
    for known in [
        "ana.garcia",
        "ben.okafor",
        "chloe.martin",
        "dmitri@",
        "gus.grant",
        "not-an-address",
        "caf\u{fffd}",
    ] {
        assert!(
            !scanned.to_lowercase().contains(known),
            "{known} in the logs:\n{scanned}"
        );
    }
    for secret in [TOKEN_SECRET, ADMIN_TOKEN] {
        assert!(!scanned.contains(secret), "a secret in the logs");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_is_off_without_a_token() {
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let r = http()
        .get(format!("http://127.0.0.1:{}/admin/status", demo.port))
        .header("authorization", "Bearer anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Security review F6: record ids from the CSV webhook and from the CRM itself, crafted to
/// forge a log line or to put an address into one, are refused without being echoed.
#[tokio::test(flavor = "multi_thread")]
async fn f6_hostile_ids_forge_no_log_line_and_put_no_address_in_the_logs() {
    let demo = Demo::new();
    let mut csv = std::fs::read_to_string(demo.path("demo/contacts.csv")).unwrap();
    csv.push_str(
        "\"forged\n2026-12-06T00:00:00.000000Z  INFO optinsync::engine: FORGED-BY-CRM-ID\",Fay,Forged,fay.forged@example.org,en,true,false\n",
    );
    csv.push_str("leak.me@example.com,Lee,Leak,lee.leak@example.org,en,true,false\n");
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    let out = demo.output(&["sync", "--once"]);
    assert!(out.status.success());
    let mut scanned = String::from_utf8_lossy(&out.stdout).into_owned();
    scanned.push_str(&String::from_utf8_lossy(&out.stderr));

    let daemon = demo.spawn_daemon();
    let client = http();
    let url = format!("http://127.0.0.1:{}/webhooks/crm", demo.port);
    for body in [
        r#"{"ids":["nobody\n2026-12-06T00:00:00.000000Z  INFO optinsync::admin: FORGED log line"]}"#,
        r#"{"ids":["someone.private@example.com"]}"#,
        r#"{"ids":"victim@example.com"}"#,
    ] {
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    assert_eq!(daemon.terminate(), Some(0));
    scanned.push_str(&std::fs::read_to_string(demo.path("daemon.log")).unwrap());

    // The refusals were logged (the scan is not vacuous) ...
    assert_eq!(
        scanned.matches("invalid id (column `Id`)").count(),
        2,
        "{scanned}"
    );
    assert_eq!(scanned.matches("webhook refused").count(), 3, "{scanned}");
    // ... and nothing of the hostile values reached any line.
    assert!(!scanned.contains("FORGED"), "a forged line:\n{scanned}");
    for line in scanned.lines() {
        assert!(
            !line.starts_with("2026-12-06T00:00:00"),
            "a forged line: {line}"
        );
    }
    let found = addresses(&scanned);
    assert!(
        found.is_empty(),
        "addresses in the logs: {found:?}\n{scanned}"
    );
    for leaked in [
        "someone.private",
        "leak.me",
        "victim",
        "fay.forged",
        "lee.leak",
    ] {
        assert!(
            !scanned.contains(leaked),
            "{leaked} in the logs:\n{scanned}"
        );
    }
}
