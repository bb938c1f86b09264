//! Regression tests for the independent security review (findings F1–F14, see SECURITY.md
//! "Review findings and their tests"): each attack as the reviewer ran it, against the real
//! binary on loopback. Each test is named after its finding and fails on the code before
//! the fix.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use optinsync_engine::tokens::{Claims, Purpose, TokenKeys};

use crate::support::*;

const ANA: &str = "ana.garcia@example.org";
const BEN: &str = "ben.okafor@example.net";
const ADMIN_TOKEN: &str = "hardening-admin-token-0123456789abcdef";

fn append_config(demo: &Demo, text: &str) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(demo.config(), format!("{cfg}\n{text}\n")).unwrap();
}

/// Insert `lines` at the top of the `[server]` section.
fn server_settings(demo: &Demo, lines: &str) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    assert!(cfg.contains("[server]\n"));
    std::fs::write(
        demo.config(),
        cfg.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1),
    )
    .unwrap();
}

fn contact_id(demo: &Demo, email: &str) -> String {
    demo.contact_json(email)["contact"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn url(demo: &Demo, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", demo.port)
}

/// F1: with the signing key alone (here the published demo key) nobody can be unsubscribed,
/// and a made-up token id does not reach the ledger: a link counts only if it was mailed.
#[tokio::test(flavor = "multi_thread")]
async fn f1_forged_links_signed_with_the_key_are_refused() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let id = contact_id(&demo, ANA);
    let keys = TokenKeys::new("k1", DEMO_TOKEN_SECRET.as_bytes(), vec![]);
    let forged = |purpose| {
        keys.mint(&Claims {
            purpose,
            token_id: format!("forged-{}", std::process::id()),
            contact_id: id.clone(),
            list_id: "newsletter".into(),
            expires: None,
        })
    };
    let kinds_before = demo.event_kinds(ANA);

    let r = one_click(
        &client,
        &url(
            &demo,
            &format!("/unsubscribe/{}", forged(Purpose::Unsubscribe)),
        ),
    )
    .await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("mailto:unsubscribe@example.org"),
        "the refusal offers another way out: {page}"
    );
    let r = client
        .get(url(
            &demo,
            &format!("/confirm/{}", forged(Purpose::Confirm)),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    assert_eq!(
        demo.event_kinds(ANA),
        kinds_before,
        "a forged link adds nothing to the ledger"
    );

    // The link that was mailed still works.
    let r = one_click(&client, &demo.unsubscribe_link(ANA)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(ANA, "newsletter"), "withdrawn");
    assert_eq!(daemon.terminate(), Some(0));
}

/// F1: the published demo secret is refused once links leave loopback or mail leaves the
/// machine; exit 2 naming the setting.
#[test]
fn f1_demo_secret_refused_with_smtp_or_a_public_url() {
    let demo = Demo::new();
    let shipped = std::fs::read_to_string(demo.config()).unwrap();
    for (what, cfg) in [
        (
            "smtp",
            shipped.replace(
                "[connectors.mail]\nkind = \"eml\"\ndir = \"var/mail\"\n",
                "[connectors.mail]\nkind = \"smtp\"\nhost = \"127.0.0.1\"\nport = 25\ntls = \"none\"\n",
            ),
        ),
        (
            "public URL",
            shipped.replace(
                &format!("public_url = \"http://127.0.0.1:{}\"", demo.port),
                "public_url = \"https://news.example.org\"",
            ),
        ),
    ] {
        assert_ne!(cfg, shipped, "{what}: shipped config changed");
        std::fs::write(demo.config(), &cfg).unwrap();
        let out = demo.output(&["sync", "--once"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.contains("tokens.secret") && err.contains("published demo value"), "{what}: {err}");
    }
    assert!(demo.mails().is_empty(), "nothing was mailed");
}

/// F3: a retired key that signed mailed unsubscribe links keeps verifying them
/// (`unsubscribe_only`), dropping it is refused at start-up, and a link under an unknown key
/// gets a page with another way to unsubscribe.
#[tokio::test(flavor = "multi_thread")]
async fn f3_retired_key_keeps_unsubscribe_links_working() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let unsubscribe = demo.unsubscribe_link(BEN);
    let confirm = demo.confirm_link(BEN);
    let shipped = std::fs::read_to_string(demo.config()).unwrap();
    let current = format!("secret = \"{DEMO_TOKEN_SECRET}\"\nkey_id = \"k1\"\n");
    assert!(shipped.contains(&current));
    let rotated = "secret = \"rotated-secret-0123456789abcdef-0123456789\"\nkey_id = \"k2\"\n";

    // k1 dropped altogether: refused, naming the key.
    std::fs::write(demo.config(), shipped.replace(&current, rotated)).unwrap();
    let out = demo.output(&["sync", "--once"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`k1`") && err.contains("unsubscribe_only"),
        "{err}"
    );

    // k1 kept for unsubscribe links only.
    std::fs::write(
        demo.config(),
        shipped.replace(
            &current,
            &format!(
                "{rotated}previous = [{{ key_id = \"k1\", secret = \"{DEMO_TOKEN_SECRET}\", unsubscribe_only = true }}]\n"
            ),
        ),
    )
    .unwrap();
    let daemon = demo.spawn_daemon();
    let client = http();
    let r = client.get(&confirm).send().await.unwrap();
    assert_eq!(r.status(), 400, "a retired key confirms nothing");
    let r = one_click(&client, &unsubscribe).await;
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(BEN, "newsletter"), "withdrawn");

    // A key nobody configured: not "invalid", but another way out.
    let stranger =
        TokenKeys::new("k9", b"unknown-key-unknown-key-unknown-key!", vec![]).mint(&Claims {
            purpose: Purpose::Unsubscribe,
            token_id: "t".into(),
            contact_id: contact_id(&demo, ANA),
            list_id: "newsletter".into(),
            expires: None,
        });
    let r = one_click(&client, &url(&demo, &format!("/unsubscribe/{stranger}"))).await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("mailto:unsubscribe@example.org"), "{page}");
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    assert_eq!(daemon.terminate(), Some(0));
}

fn socket_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("socket:"))
        .count()
}

/// F4: a client that never finishes its request head is cut off, a 200 KB head is refused,
/// and idle connections beyond `max_connections` do not become the daemon's descriptors.
#[tokio::test(flavor = "multi_thread")]
async fn f4_slow_and_greedy_clients_cannot_hold_the_server() {
    let demo = Demo::new();
    server_settings(&demo, "client_timeout = \"2s\"\nmax_connections = 16");
    let daemon = demo.spawn_daemon();

    let mut slow = TcpStream::connect(("127.0.0.1", demo.port)).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30 * LOAD_FACTOR)))
        .unwrap();
    let mut buf = [0u8; 512];
    match slow.read(&mut buf) {
        Ok(n) => assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "unexpected answer: {}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    let mut big = TcpStream::connect(("127.0.0.1", demo.port)).unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = big.write_all(head.as_bytes());
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let n = big.read(&mut buf).unwrap_or(0);
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    let before = socket_count(daemon.pid());
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(("127.0.0.1", demo.port)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = socket_count(daemon.pid());
    assert!(
        during <= before + 16,
        "100 idle connections became {} sockets (cap 16, {before} before)",
        during - before
    );
    // Once the idle ones time out, a real request is served.
    let r = http().get(url(&demo, "/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    drop(idle);
    assert_eq!(daemon.terminate(), Some(0));
}

/// F5 (and F10, F14's POST look-up): with an admin token, paths outside the admin API are
/// plain 404s; refusals are JSON, counted, throttled and logged once a minute at most.
#[tokio::test(flavor = "multi_thread")]
async fn f5_admin_api_is_404_off_its_routes_and_throttles_refusals() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    append_config(&demo, &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\""));
    let daemon = demo.spawn_daemon();
    let client = http();
    for path in ["/favicon.ico", "/robots.txt", "/.env", "/wp-login.php"] {
        let r = client.get(url(&demo, path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert!(r.headers().get("www-authenticate").is_none(), "{path}");
    }
    // The address travels in a body, not a URL.
    let r = client
        .post(url(&demo, "/admin/contacts/lookup"))
        .bearer_auth(ADMIN_TOKEN)
        .body(format!("{{\"email\": \"{ANA}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["contact"]["email"], ANA);

    let mut statuses = Vec::new();
    for _ in 0..30 {
        let r = client
            .get(url(&demo, "/admin/status"))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 401 {
            assert_eq!(r.headers()["content-type"], "application/json");
            assert!(r.headers().get("www-authenticate").is_some());
        }
        statuses.push(status);
    }
    let refused = statuses.iter().filter(|s| **s == 401).count();
    assert_eq!(refused, 20, "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let metrics = demo.metrics().await;
    assert!(
        metrics.contains("optinsync_admin_refused_total{reason=\"bad_token\"} 20"),
        "{metrics}"
    );
    assert_eq!(daemon.terminate(), Some(0));
    let log = std::fs::read_to_string(demo.path("daemon.log")).unwrap();
    let warns = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("admin API"))
        .count();
    assert_eq!(warns, 1, "{log}");
}

/// Open the confirmation page and return its button's form body.
async fn button_form(client: &reqwest::Client, link: &str) -> String {
    let page = client.get(link).send().await.unwrap().text().await.unwrap();
    hidden_fields(&page)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// F7: a confirm POST sent from another site is refused without a state change; the same
/// button from our page confirms, and one-click unsubscribe is not origin-checked.
#[tokio::test(flavor = "multi_thread")]
async fn f7_cross_site_confirm_post_is_refused() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let link = demo.confirm_link(ANA);
    let form = button_form(&client, &link).await;
    for (header, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = client
            .post(&link)
            .header("content-type", "application/x-www-form-urlencoded")
            .header(header, value)
            .body(form.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{header}: {value}");
        assert_eq!(demo.state(ANA, "newsletter"), "pending");
    }
    let r = client
        .post(&link)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", format!("http://127.0.0.1:{}", demo.port))
        .header("sec-fetch-site", "same-origin")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(ANA, "newsletter"), "confirmed");

    let r = client
        .post(demo.unsubscribe_link(BEN))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "https://mail.provider.example")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(BEN, "newsletter"), "withdrawn");
    assert_eq!(daemon.terminate(), Some(0));
}

/// F8: clients in one IPv6 /64 share a limit, and webhooks are limited too.
#[tokio::test(flavor = "multi_thread")]
async fn f8_one_ipv6_64_shares_a_limit_and_webhooks_are_limited() {
    let demo = Demo::new();
    server_settings(
        &demo,
        "trusted_proxies = [\"127.0.0.1\"]\nrate_limit_per_minute = 10\nwebhook_rate_limit_per_minute = 3",
    );
    let daemon = demo.spawn_daemon();
    let client = http();
    let mut statuses = Vec::new();
    for i in 1..=15 {
        let r = client
            .get(url(&demo, "/confirm/garbage"))
            .header("x-forwarded-for", format!("2001:db8:1:2::{i:x}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    // Ten addresses of one /64 use up the burst of ten; the next ones wait for a refill
    // (one every 6 s), so on a busy machine one of them may pass.
    assert!(statuses[..10].iter().all(|s| *s == 400), "{statuses:?}");
    assert!(statuses[10..].contains(&429), "{statuses:?}");
    // Another /64 has its own budget.
    let r = client
        .get(url(&demo, "/confirm/garbage"))
        .header("x-forwarded-for", "2001:db8:1:3::1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let mut webhook = Vec::new();
    for _ in 0..4 {
        let r = client
            .post(url(&demo, "/webhooks/crm"))
            .body("{\"ids\": []}")
            .send()
            .await
            .unwrap();
        webhook.push(r.status().as_u16());
    }
    assert_ne!(webhook[0], 429, "{webhook:?}");
    assert_eq!(webhook[3], 429, "{webhook:?}");
    assert_eq!(daemon.terminate(), Some(0));
}

/// F8: all clients together are limited on the link routes (`global_rate_limit_per_second`).
#[tokio::test(flavor = "multi_thread")]
async fn f8_link_routes_have_a_global_limit() {
    let demo = Demo::new();
    server_settings(
        &demo,
        "trusted_proxies = [\"127.0.0.1\"]\nglobal_rate_limit_per_second = 5",
    );
    let daemon = demo.spawn_daemon();
    let client = http();
    let mut limited = 0;
    for i in 1..=40 {
        let r = client
            .get(url(&demo, "/confirm/garbage"))
            .header("x-forwarded-for", format!("203.0.113.{i}"))
            .send()
            .await
            .unwrap();
        limited += usize::from(r.status() == 429);
    }
    assert!(
        limited > 0,
        "40 clients, each under its own limit, passed the global one"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// F10: every answer carries `nosniff` and `no-store`, not only the link pages.
#[tokio::test(flavor = "multi_thread")]
async fn f10_security_headers_on_every_route() {
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let client = http();
    let answers = [
        client.get(url(&demo, "/healthz")).send().await.unwrap(),
        client.get(url(&demo, "/readyz")).send().await.unwrap(),
        client.get(url(&demo, "/metrics")).send().await.unwrap(),
        client
            .get(url(&demo, "/no-such-page"))
            .send()
            .await
            .unwrap(),
        client
            .post(url(&demo, "/webhooks/crm"))
            .body("not json")
            .send()
            .await
            .unwrap(),
    ];
    for r in &answers {
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{}", r.url());
        assert_eq!(h["cache-control"], "no-store", "{}", r.url());
        assert_eq!(h["x-frame-options"], "DENY", "{}", r.url());
    }
    assert_eq!(daemon.terminate(), Some(0));
}

/// F14: the confirm page says "already subscribed" after the fact, an oversized confirm POST
/// is a 413, and the mail footer promises what its link does (this list only).
#[tokio::test(flavor = "multi_thread")]
async fn f14_confirm_page_after_the_fact_oversized_post_and_footer_wording() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let ben_mail = demo.mail_to(BEN);
    assert!(
        ben_mail.contains("Unsubscribe from Master programmes newsletter"),
        "{ben_mail}"
    );
    assert!(!ben_mail.contains("Stop all mail"), "{ben_mail}");

    let daemon = demo.spawn_daemon();
    let client = http();
    let link = demo.confirm_link(BEN);
    assert_eq!(click_confirm(&client, &link, "e2e/1.0").await.status(), 200);
    let r = client.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("You are already subscribed"), "{page}");
    assert!(!page.contains("<form"), "no button after the fact: {page}");

    let r = client
        .post(demo.confirm_link(ANA))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("nonce={}", "x".repeat(100_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(demo.state(ANA, "newsletter"), "pending");
    assert_eq!(daemon.terminate(), Some(0));
}
