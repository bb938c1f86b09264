//! Mail and web end to end: DOI mails through a real SMTP server on loopback (the testkit
//! sink), DKIM, the confirm page clicked in headless Chromium, scanner fetches, one-click
//! unsubscribe, bounces and retries, expired links, and mutated tokens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use optinsync_engine::tokens::{Claims, Purpose, TokenKeys};
use optinsync_testkit::smtp::{ParsedMail, SmtpSink, parse};
use sha2::{Digest, Sha256};

use crate::browser::*;
use crate::support::*;

const DEMO_SECRET: &str = "demo-only-secret-change-me-0123456789abcdef";
const ANA: &str = "ana.garcia@example.org";
const BEN: &str = "ben.okafor@example.net";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The demo with the SMTP transport pointed at `sink` (plain text on loopback) and DKIM on.
fn smtp_demo(sink: &SmtpSink) -> Demo {
    let demo = Demo::new();
    std::fs::copy(
        repo().join("tests/e2e/fixtures/dkim-test-rsa.pem"),
        demo.path("dkim.pem"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let eml = "[connectors.mail]\nkind = \"eml\"\ndir = \"var/mail\"\n";
    assert!(cfg.contains(eml), "shipped config changed: {cfg}");
    let smtp = format!(
        "[connectors.mail]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         timeout_secs = 10\nrate_per_minute = 600\n\n\
         [connectors.mail.dkim]\nselector = \"test\"\ndomain = \"example.org\"\n\
         algorithm = \"rsa-sha256\"\nkey_file = \"dkim.pem\"\n",
        sink.port()
    );
    std::fs::write(demo.config(), cfg.replace(eml, &smtp)).unwrap();
    demo.use_private_secret();
    demo
}

fn raise_rate_limit(demo: &Demo) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        cfg.replacen(
            "[server]\n",
            "[server]\nrate_limit_per_minute = 100000\n",
            1,
        ),
    )
    .unwrap();
}

fn link_in_text(mail: &ParsedMail, marker: &str) -> String {
    link_in(mail.part("text/plain").expect("text part"), marker)
}

fn events(demo: &Demo, email: &str) -> Vec<serde_json::Value> {
    demo.contact_json(email)["events"]
        .as_array()
        .unwrap()
        .clone()
}

// ---------------------------------------------------------------------------------------------
// DKIM verification (RFC 6376, relaxed/relaxed), re-computed here from the received bytes.
// ---------------------------------------------------------------------------------------------

fn dkim_tags(value: &str) -> BTreeMap<String, String> {
    value
        .split(';')
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_owned(),
                v.chars().filter(|c| !c.is_whitespace()).collect(),
            )
        })
        .collect()
}

fn relaxed_header(raw: &str) -> String {
    let (name, value) = raw.split_once(':').unwrap();
    let unfolded = value.replace("\r\n", "");
    let mut v = String::new();
    let mut ws = false;
    for c in unfolded.chars() {
        if c == ' ' || c == '\t' {
            ws = true;
        } else {
            if ws && !v.is_empty() {
                v.push(' ');
            }
            ws = false;
            v.push(c);
        }
    }
    format!("{}:{}", name.trim().to_ascii_lowercase(), v)
}

fn relaxed_body(body: &str) -> String {
    let mut lines: Vec<String> = body
        .split("\r\n")
        .map(|l| {
            let mut out = String::new();
            let mut ws = false;
            for c in l.chars() {
                if c == ' ' || c == '\t' {
                    ws = true;
                } else {
                    if ws {
                        out.push(' ');
                    }
                    ws = false;
                    out.push(c);
                }
            }
            out
        })
        .collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.is_empty() {
        return String::new();
    }
    lines.join("\r\n") + "\r\n"
}

/// Verify the DKIM-Signature of `raw` with `key`; returns the signed header names (`h=`).
fn verify_dkim(raw: &str, key: &rsa::RsaPublicKey) -> Vec<String> {
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body split");
    // Header fields with their continuation lines, as sent.
    let mut fields: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = fields.last_mut().unwrap();
            last.push_str("\r\n");
            last.push_str(line);
        } else {
            fields.push(line.to_owned());
        }
    }
    let name_of = |f: &str| f.split(':').next().unwrap().trim().to_ascii_lowercase();
    let sig_field = fields
        .iter()
        .find(|f| name_of(f) == "dkim-signature")
        .expect("a DKIM-Signature header")
        .clone();
    let tags = dkim_tags(sig_field.split_once(':').unwrap().1);
    assert_eq!(tags["a"], "rsa-sha256");
    assert_eq!(tags["c"], "relaxed/relaxed");
    assert_eq!(tags["d"], "example.org");
    let bh = base64::engine::general_purpose::STANDARD
        .encode(Sha256::digest(relaxed_body(body).as_bytes()));
    assert_eq!(tags["bh"], bh, "body hash");
    let signed: Vec<String> = tags["h"].split(':').map(str::to_ascii_lowercase).collect();
    let mut data = String::new();
    let mut used = vec![false; fields.len()];
    for h in &signed {
        // The last unused instance of the header, bottom up (RFC 6376 §5.4.2).
        if let Some(i) = (0..fields.len())
            .rev()
            .find(|&i| !used[i] && name_of(&fields[i]) == *h)
        {
            used[i] = true;
            data.push_str(&relaxed_header(&fields[i]));
            data.push_str("\r\n");
        }
    }
    // The signature header itself, with an empty b= and no trailing CRLF.
    let bytes = sig_field.as_bytes();
    let i = (1..sig_field.len())
        .find(|&i| {
            sig_field[i..].starts_with("b=") && matches!(bytes[i - 1], b';' | b' ' | b'\t' | b'\n')
        })
        .expect("b= tag");
    let end = sig_field[i..]
        .find(';')
        .map(|e| i + e)
        .unwrap_or(sig_field.len());
    let without_b = format!("{}b={}", &sig_field[..i], &sig_field[end..]);
    data.push_str(&relaxed_header(&without_b));
    let hashed = Sha256::digest(data.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&tags["b"])
        .expect("b= is base64");
    key.verify(rsa::Pkcs1v15Sign::new::<Sha256>(), &hashed, &sig)
        .expect("DKIM signature verifies");
    signed
}

fn dkim_public_key() -> rsa::RsaPublicKey {
    use rsa::pkcs1::DecodeRsaPrivateKey as _;
    let pem = std::fs::read_to_string(repo().join("tests/e2e/fixtures/dkim-test-rsa.pem")).unwrap();
    rsa::RsaPrivateKey::from_pkcs1_pem(&pem)
        .unwrap()
        .to_public_key()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn doi_mail_over_smtp_then_scanner_fetches_then_chromium_click_confirms() {
    let sink = SmtpSink::start();
    let demo = smtp_demo(&sink);
    demo.run_ok(&["sync", "--once"]);

    // The DOI mail arrived over SMTP: multipart text + HTML, both list headers, DKIM.
    let received = sink.messages_to(ANA);
    assert_eq!(received.len(), 1, "{:?}", sink.messages());
    assert_eq!(sink.messages_to(BEN).len(), 1);
    let raw = &received[0].data;
    let mail = parse(raw);
    assert!(
        mail.header("Content-Type")
            .unwrap()
            .starts_with("multipart/alternative"),
        "{raw}"
    );
    assert!(mail.part("text/plain").is_some() && mail.part("text/html").is_some());
    assert_eq!(mail.header_all("List-Unsubscribe").len(), 1);
    assert_eq!(
        mail.header_all("List-Unsubscribe-Post"),
        ["List-Unsubscribe=One-Click"]
    );
    let list_unsub = mail.header("List-Unsubscribe").unwrap();
    let base = format!("http://127.0.0.1:{}", demo.port);
    assert!(
        list_unsub.starts_with(&format!("<{base}/unsubscribe/"))
            && list_unsub.contains(">, <mailto:unsubscribe@example.org?subject="),
        "{list_unsub}"
    );
    // From the transactional sender, not the newsletter's; Spanish for Ana (CRM language).
    assert_eq!(
        mail.header("From"),
        Some("\"Example University\" <confirm@example.org>")
    );
    assert_eq!(received[0].mail_from, "confirm@example.org");
    assert!(mail.part("text/plain").unwrap().contains("Hola"), "{raw}");
    let html = mail.part("text/html").unwrap();
    assert!(!html.to_ascii_lowercase().contains("<img"));
    let signed = verify_dkim(raw, &dkim_public_key());
    for h in [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ] {
        assert!(signed.iter().any(|s| s == h), "h= lacks {h}: {signed:?}");
    }
    // The ledger names this message and its snapshot.
    let sent = events(&demo, ANA)
        .into_iter()
        .find(|e| e["kind"] == "doi_mail_sent")
        .unwrap();
    let message_id = sent["evidence"]["message_id"].as_str().unwrap().to_owned();
    assert_eq!(
        mail.header("Message-ID"),
        Some(format!("<{message_id}>").as_str())
    );
    let mail_hash = sent["evidence"]["content_hash"]
        .as_str()
        .unwrap()
        .to_owned();

    let daemon = demo.spawn_daemon();
    let link = link_in_text(&mail, "/confirm/");
    let client = http();

    // Scanners: GET and HEAD show the page, change nothing, and are recorded as fetches.
    let get = client.get(&link).send().await.unwrap();
    assert_eq!(get.status(), 200);
    let h = get.headers().clone();
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    let page = get.text().await.unwrap();
    assert!(
        page.contains("Sí, quiero suscribirme") && !page.contains("<script"),
        "{page}"
    );
    assert_eq!(client.head(&link).send().await.unwrap().status(), 200);
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    // The pages do not wait for their fetch records' commit: they land a moment later.
    let fetches = || -> Vec<serde_json::Value> {
        events(&demo, ANA)
            .into_iter()
            .filter(|e| e["kind"] == "link_fetched")
            .collect()
    };
    wait_until(10, "both fetches recorded", || fetches().len() >= 2);
    let fetched = fetches();
    let methods: Vec<_> = fetched
        .iter()
        .map(|e| e["evidence"]["method"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["GET", "HEAD"], "{fetched:#?}");
    assert!(
        fetched
            .iter()
            .all(|e| e["from_state"] == "pending" && e["to_state"] == "pending")
    );

    // A person in headless Chromium presses the button.
    let (_browser, mut cdp) = start_chromium(&link).await;
    cdp.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('confirm')",
        "the confirm page",
    )
    .await;
    click(&mut cdp, "confirm").await;
    cdp.wait_for(
        "document.readyState === 'complete' && document.body.innerText.includes('suscrito')",
        "the thank-you page",
    )
    .await;
    assert_eq!(demo.state(ANA, "newsletter"), "confirmed");

    // The evidence of the confirmation.
    let all = events(&demo, ANA);
    let confirmed: Vec<_> = all.iter().filter(|e| e["kind"] == "confirmed").collect();
    assert_eq!(confirmed.len(), 1, "{all:#?}");
    let ev = &confirmed[0]["evidence"];
    assert_eq!(ev["ip"], "127.0.0.1");
    assert!(
        ev["user_agent"]
            .as_str()
            .unwrap()
            .contains("HeadlessChrome"),
        "{ev}"
    );
    assert_eq!(ev["method"], "POST");
    assert_eq!(ev["token_id"], sent["evidence"]["token_id"]);
    assert_eq!(ev["message_id"].as_str(), Some(message_id.as_str()));
    assert_eq!(ev["mail_content_hash"].as_str(), Some(mail_hash.as_str()));
    assert!(confirmed[0]["at"].is_string());
    let page_hash = ev["content_hash"].as_str().unwrap().to_owned();

    // Both snapshots are in the store: the proof shows the exact texts.
    let store = optinsync_engine::store::open(&demo.sqlite_url())
        .await
        .unwrap();
    let page_snap = store
        .snapshot(&page_hash)
        .await
        .unwrap()
        .expect("page snapshot");
    assert_eq!(page_snap.kind, "page:confirm");
    assert_eq!(page_snap.language, "es");
    assert!(page_snap.content.contains("Sí, quiero suscribirme"));
    let mail_snap = store
        .snapshot(&mail_hash)
        .await
        .unwrap()
        .expect("mail snapshot");
    assert_eq!(mail_snap.kind, "mail:doi");
    let doc: serde_json::Value = serde_json::from_str(&mail_snap.content).unwrap();
    assert_eq!(
        doc["text"].as_str().map(|t| t.trim_end().to_owned()),
        mail.part("text/plain")
            .map(|t| t.replace("\r\n", "\n").trim_end().to_owned())
    );

    wait_until(20, "subscription in the JSONL list", || {
        demo.list_members() == vec![ANA.to_owned()]
    });
    assert_eq!(daemon.terminate(), Some(0));
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified:")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_5xx_bounces_and_4xx_is_retried() {
    let sink = SmtpSink::start();
    sink.refuse(BEN, 550, "5.1.1 no such user", None);
    sink.refuse(ANA, 451, "4.7.1 try again later", Some(1));
    let demo = smtp_demo(&sink);
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.state(BEN, "newsletter"), "bounced");
    assert!(sink.messages_to(BEN).is_empty());
    let bounce = events(&demo, BEN)
        .into_iter()
        .find(|e| e["kind"] == "bounced")
        .unwrap();
    assert!(
        bounce["evidence"]["detail"]
            .as_str()
            .unwrap()
            .contains("550"),
        "{bounce}"
    );

    // Ana's first attempt got a 4xx: still pending, retried after the backoff (about 5 s).
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    assert!(sink.messages_to(ANA).is_empty());
    let start = Instant::now();
    while sink.messages_to(ANA).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30 * LOAD_FACTOR),
            "no retry"
        );
        std::thread::sleep(Duration::from_secs(1));
        demo.run_ok(&["sync", "--once"]);
    }
    assert_eq!(sink.rcpt_attempts(ANA), 2);
    assert_eq!(sink.messages_to(ANA).len(), 1);
    assert!(
        events(&demo, ANA)
            .iter()
            .any(|e| e["kind"] == "doi_mail_sent")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_click_unsubscribe_is_queued_ahead_of_pending_subscribes() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    // The campaigns "tool" goes down: subscribes stay queued (the list file is a directory).
    let _ = std::fs::remove_file(demo.path("var/lists.jsonl"));
    std::fs::create_dir_all(demo.path("var/lists.jsonl/blocked")).unwrap();
    let client = http();
    for who in [ANA, BEN] {
        let link = demo.confirm_link(who);
        assert_eq!(click_confirm(&client, &link, "e2e").await.status(), 200);
        assert_eq!(demo.state(who, "newsletter"), "confirmed");
    }

    // curl -X POST -d List-Unsubscribe=One-Click <List-Unsubscribe URL>
    let unsub = demo.unsubscribe_link(ANA);
    let resp = client
        .post(&unsub)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("location").is_none() && resp.headers().get("set-cookie").is_none());
    assert_eq!(demo.state(ANA, "newsletter"), "withdrawn");
    let w = events(&demo, ANA)
        .into_iter()
        .find(|e| e["kind"] == "withdrawn")
        .unwrap();
    assert_eq!(w["evidence"]["detail"], "RFC 8058 one-click unsubscribe");

    // The multipart/form-data variant works as well.
    let boundary = "----optinsyncBoundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--{boundary}--\r\n"
    );
    let resp = client
        .post(demo.unsubscribe_link(BEN))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(demo.state(BEN, "newsletter"), "withdrawn");
    assert_eq!(daemon.terminate(), Some(0));

    // Queue order: everything due, the removal comes before the older subscribes.
    let store = optinsync_engine::store::open(&demo.sqlite_url())
        .await
        .unwrap();
    let later = chrono::Utc::now() + chrono::Duration::hours(3);
    let claimed = store
        .claim_outbox("test", later, later + chrono::Duration::minutes(5), 100)
        .await
        .unwrap();
    let kinds: Vec<(String, i32)> = claimed
        .iter()
        .map(|i| (i.kind().to_owned(), i.priority))
        .collect();
    let first_subscribe = kinds
        .iter()
        .position(|(k, _)| k == "campaigns_subscribe")
        .expect("subscribes still queued");
    let first_remove = kinds
        .iter()
        .position(|(k, _)| k == "campaigns_remove")
        .expect("removal queued");
    assert!(first_remove < first_subscribe, "{kinds:?}");
    assert!(
        kinds[..first_subscribe].iter().all(|(_, p)| *p == 0),
        "{kinds:?}"
    );
    let remove_ids: Vec<i64> = claimed
        .iter()
        .filter(|i| i.kind() == "campaigns_remove")
        .map(|i| i.id)
        .collect();
    let subscribe_ids: Vec<i64> = claimed
        .iter()
        .filter(|i| i.kind() == "campaigns_subscribe")
        .map(|i| i.id)
        .collect();
    assert!(
        remove_ids
            .iter()
            .all(|r| subscribe_ids.iter().all(|s| r > s)),
        "the removals were queued after the subscribes, yet come first: {kinds:?}"
    );
}

/// Claims of a token as minted by the daemon (the payload is readable; only the MAC is secret).
fn claims_of(token: &str) -> Claims {
    let payload = token.split('.').next().unwrap();
    let text = String::from_utf8(
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let p: Vec<&str> = text.split('|').collect();
    Claims {
        purpose: if p[2] == "confirm" {
            Purpose::Confirm
        } else {
            Purpose::Unsubscribe
        },
        token_id: p[3].into(),
        contact_id: p[4].into(),
        list_id: p[5].into(),
        expires: p[6].parse().ok().filter(|e| *e != 0),
    }
}

fn token_of(link: &str) -> String {
    link.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_link_offers_a_fresh_mail_rate_limited() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let link = demo.confirm_link(ANA);
    let mut claims = claims_of(&token_of(&link));
    claims.expires = Some(chrono::Utc::now().timestamp() - 60);
    let expired = TokenKeys::new("k1", DEMO_SECRET.as_bytes(), vec![]).mint(&claims);
    let url = format!("http://127.0.0.1:{}/confirm/{expired}", demo.port);

    let page = client.get(&url).send().await.unwrap();
    assert_eq!(page.status(), 410);
    let page = page.text().await.unwrap();
    assert!(page.contains("id=\"resend\""), "{page}");
    // Pressing "confirm" with the expired link's page confirms nothing.
    let fields = hidden_fields(&page);
    let form = |fields: &[(String, String)]| {
        fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    };
    let before = demo.mails().len();
    let resp = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("nuevo correo"));
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    wait_until(20, "the fresh DOI mail", || {
        demo.mails().len() == before + 1
    });
    let kinds = demo.event_kinds(ANA);
    assert!(kinds.contains(&"signup_requested".to_owned()), "{kinds:?}");

    // A second request within the hour is refused (no mail bombing through old links).
    let again = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&fields))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 429);
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(demo.mails().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn public_pages_are_rate_limited_per_ip() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let url = format!("http://127.0.0.1:{}/confirm/garbage", demo.port);
    let mut limited = None;
    for i in 0..80 {
        let r = client.get(&url).send().await.unwrap();
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "60");
            limited = Some(i);
            break;
        }
        assert_eq!(r.status(), 400);
    }
    assert!(limited.is_some_and(|i| i >= 50), "{limited:?}");
    // A trusted proxy is not configured, so X-Forwarded-For does not dodge the limit.
    let r = client
        .get(&url)
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn mutated_tokens_are_refused_and_change_nothing() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let demo = Demo::new();
    raise_rate_limit(&demo);
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let base = format!("http://127.0.0.1:{}", demo.port);
    let confirm = token_of(&demo.confirm_link(ANA));
    let unsub = token_of(&demo.unsubscribe_link(BEN));
    let page = http()
        .get(format!("{base}/confirm/{confirm}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let valid_form = form_body(&page);
    let kinds_before = (demo.event_kinds(ANA), demo.event_kinds(BEN));

    let keys = TokenKeys::new("k1", DEMO_SECRET.as_bytes(), vec![]);
    let other_secret = TokenKeys::new("k1", b"another-secret-another-secret-123456", vec![]);
    let other_kid = TokenKeys::new("k9", DEMO_SECRET.as_bytes(), vec![]);
    let b64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

    // (mutation, which token, position, byte, method)
    let strategy = (0u8..7, any::<bool>(), any::<usize>(), any::<u8>(), 0u8..3);
    let mut runner = TestRunner::new(Config {
        cases: 64,
        ..Config::default()
    });
    let handle = tokio::runtime::Handle::current();
    let client = http();
    let result = runner.run(&strategy, |(mutation, on_confirm, pos, byte, method)| {
        let valid = if on_confirm { &confirm } else { &unsub };
        let route = if on_confirm { "confirm" } else { "unsubscribe" };
        let mut claims = claims_of(valid);
        let (token, route) = match mutation {
            // One character replaced.
            0 => {
                let mut b = valid.clone().into_bytes();
                let i = pos % b.len();
                let c = b64[usize::from(byte) % b64.len()];
                prop_assume!(b[i] != c);
                b[i] = c;
                (String::from_utf8(b).unwrap(), route)
            }
            // Truncated.
            1 => (valid[..pos % valid.len()].to_owned(), route),
            // Expired (confirmation tokens only: unsubscribe tokens never expire).
            2 => {
                claims.purpose = Purpose::Confirm;
                claims.expires = Some(chrono::Utc::now().timestamp() - 1 - (pos % 100_000) as i64);
                (keys.mint(&claims), "confirm")
            }
            // The right token on the other endpoint (wrong purpose).
            3 => (
                valid.clone(),
                if on_confirm { "unsubscribe" } else { "confirm" },
            ),
            // Signed with another secret under the same key id.
            4 => (other_secret.mint(&claims), route),
            // Signed under an unknown key id.
            5 => (other_kid.mint(&claims), route),
            // Garbage appended.
            _ => (
                format!("{valid}{}", char::from(b64[usize::from(byte) % b64.len()])),
                route,
            ),
        };
        let url = format!("{base}/{route}/{token}");
        let status = tokio::task::block_in_place(|| {
            handle.block_on(async {
                let req = match method {
                    0 => client.get(&url),
                    1 => client.head(&url),
                    _ => client
                        .post(&url)
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body(if route == "unsubscribe" {
                            "List-Unsubscribe=One-Click".to_owned()
                        } else {
                            valid_form.clone()
                        }),
                };
                req.send().await.unwrap().status()
            })
        });
        prop_assert!(
            status.is_client_error(),
            "{route}/{token} (mutation {mutation}, method {method}) answered {status}"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Nothing changed: same states, and no events other than recorded fetches.
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    assert_eq!(demo.state(BEN, "newsletter"), "pending");
    let strip =
        |k: Vec<String>| -> Vec<String> { k.into_iter().filter(|k| k != "link_fetched").collect() };
    assert_eq!(strip(demo.event_kinds(ANA)), strip(kinds_before.0));
    assert_eq!(strip(demo.event_kinds(BEN)), strip(kinds_before.1));
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn shipped_doi_template_with_an_image_or_second_link_is_refused_at_start_up() {
    let demo = Demo::new();
    let doi = demo.path("templates/en/doi.html");
    let orig = std::fs::read_to_string(&doi).unwrap();
    for (bad, why) in [
        (
            orig.replace(
                "<p>Hello,</p>",
                "<p><img src=\"https://example.org/logo.png\"></p><p>Hello,</p>",
            ),
            "image",
        ),
        (
            orig.replace(
                "<hr>",
                "<p><a href=\"https://example.org/masters\">See our masters</a></p><hr>",
            ),
            "example.org/masters",
        ),
    ] {
        std::fs::write(&doi, bad).unwrap();
        let out = demo.output(&["sync", "--once"]);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("en/doi.html") && err.contains(why), "{err}");
    }
    std::fs::write(&doi, orig).unwrap();
    demo.run_ok(&["sync", "--once"]);
}
