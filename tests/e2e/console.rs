//! The operator console (`/console`): off unless configured, login/logout, CSRF and the
//! throttle over HTTP; then every page in headless Chromium against a seeded scenario (the
//! numbers read back from the store, a seeded drift case, dead-letter and erasure
//! confirmations), with screenshots at desktop and phone widths checked to be non-blank.

use std::path::PathBuf;

use argon2::PasswordHasher as _;
use optinsync_engine::store;

use crate::browser::{Cdp, click, start_chromium};
use crate::support::*;

const ADMIN_TOKEN: &str = "console-test-admin-token-0123456789abcdef";
const PASSWORD: &str = "correct horse battery staple";

/// Turn the console on, with the admin token as the password or with an Argon2 hash.
fn enable_console(demo: &Demo, with_hash: bool) {
    let mut cfg = std::fs::read_to_string(demo.config()).unwrap();
    cfg.push_str(&format!(
        "\n[admin]\ntoken = \"{ADMIN_TOKEN}\"\n\n[console]\n"
    ));
    if with_hash {
        let salt = argon2::password_hash::SaltString::encode_b64(b"console-e2e-salt").unwrap();
        let hash = argon2::Argon2::default()
            .hash_password(PASSWORD.as_bytes(), &salt)
            .unwrap()
            .to_string();
        cfg.push_str(&format!("password_hash = \"{hash}\"\n"));
    }
    cfg.push_str("session_ttl = \"1h\"\n");
    std::fs::write(demo.config(), cfg).unwrap();
}

fn base(demo: &Demo) -> String {
    format!("http://127.0.0.1:{}", demo.port)
}

/// The text of `page` between `start` and the next `end`.
fn between<'a>(page: &'a str, start: &str, end: &str) -> &'a str {
    let from = page
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in {page}"))
        + start.len();
    let len = page[from..].find(end).unwrap_or(page.len() - from);
    &page[from..from + len]
}

/// The hidden field `name` of a page.
fn field(page: &str, name: &str) -> String {
    hidden_fields(page)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no hidden field {name} in {page}"))
}

async fn post_form(
    client: &reqwest::Client,
    url: &str,
    cookie: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut req = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.unwrap()
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Log in over HTTP: `(cookie header value, Set-Cookie text)`, or the refused answer.
async fn login(
    client: &reqwest::Client,
    demo: &Demo,
    password: &str,
) -> Result<(String, String), reqwest::Response> {
    let (_, page) = get_page(client, &format!("{}/console/login", base(demo)), None).await;
    let body = format!(
        "token={}&password={}",
        urlencode(&field(&page, "token")),
        urlencode(password)
    );
    let resp = post_form(
        client,
        &format!("{}/console/login", base(demo)),
        None,
        &body,
    )
    .await;
    if resp.status() != 303 {
        return Err(resp);
    }
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    let pair = set.split(';').next().unwrap().to_owned();
    Ok((pair, set))
}

async fn get_page(client: &reqwest::Client, url: &str, cookie: Option<&str>) -> (u16, String) {
    let mut req = client.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[test]
fn console_is_off_unless_configured_and_needs_a_way_to_log_in() {
    let demo = Demo::new();
    // A console nobody could log in to is a configuration error (exit 2) naming the key.
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(demo.config(), format!("{cfg}\n[console]\n")).unwrap();
    let out = demo.output(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("console.password_hash"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        demo.config(),
        format!("{cfg}\n[console]\npassword_hash = \"plain-text\"\n"),
    )
    .unwrap();
    assert_eq!(demo.output(&["run"]).status.code(), Some(2));

    // Without `[console]` there is no console: 404 like any unknown path.
    std::fs::write(demo.config(), &cfg).unwrap();
    let daemon = demo.spawn_daemon();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = http();
        for path in ["/console", "/console/login", "/console/console.css"] {
            let r = client
                .get(format!("{}{path}", base(&demo)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404, "{path}");
        }
    });
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_cookie_is_secure_behind_an_https_public_url() {
    let demo = Demo::new();
    demo.use_private_secret();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let local = format!("public_url = \"http://127.0.0.1:{}\"", demo.port);
    assert!(cfg.contains(&local));
    std::fs::write(
        demo.config(),
        cfg.replace(&local, "public_url = \"https://news.example.org\""),
    )
    .unwrap();
    enable_console(&demo, false);
    let daemon = demo.spawn_daemon();
    let (_, set_cookie) = login(&http(), &demo, ADMIN_TOKEN).await.unwrap();
    assert!(
        set_cookie.ends_with("; Secure") && set_cookie.contains("HttpOnly"),
        "{set_cookie}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn login_logout_csrf_and_throttled_failures() {
    let demo = Demo::new();
    enable_console(&demo, true);
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let console = format!("{}/console", base(&demo));

    // Without a session every page sends the browser to the login.
    let r = client.get(&console).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    let login_page = client.get(format!("{console}/login")).send().await.unwrap();
    let csp = login_page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'")
            && !csp.contains("script-src")
            && !csp.contains("unsafe"),
        "strict CSP: {csp}"
    );

    // A wrong password (and the admin token, when a password hash is set) is refused.
    for wrong in ["wrong password", ADMIN_TOKEN] {
        let r = login(&client, &demo, wrong).await.unwrap_err();
        assert_eq!(r.status(), 401);
        assert!(r.headers().get("set-cookie").is_none());
    }
    // A login form without its token is refused too.
    let r = post_form(
        &client,
        &format!("{console}/login"),
        None,
        &format!("token=1.x&password={}", urlencode(PASSWORD)),
    )
    .await;
    assert_eq!(r.status(), 403);

    let (cookie, set_cookie) = login(&client, &demo, PASSWORD).await.unwrap();
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Max-Age=3600",
        "Path=/console",
    ] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "no Secure flag on a plain-http public URL: {set_cookie}"
    );
    let (status, overview) = get_page(&client, &console, Some(cookie.as_str())).await;
    assert_eq!(status, 200);
    assert!(overview.contains("Overview") && overview.contains("newsletter"));
    assert!(!overview.contains("<script"), "the console runs no script");
    let csrf = field(&overview, "csrf");

    // A state-changing POST needs the session's CSRF token, and a same-origin request.
    let verify = format!("{console}/operations/verify");
    let r = post_form(&client, &verify, Some(cookie.as_str()), "csrf=forged").await;
    assert_eq!(r.status(), 403);
    let r = client
        .post(&verify)
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "cross-site POST");
    let r = post_form(
        &client,
        &verify,
        Some(cookie.as_str()),
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("Ledger verified just now."), "{page}");
    // The result is recorded: the CLI's verification replaces it, and the page shows it.
    let cli = demo.run_ok(&["ledger", "verify"]);
    let events: String = cli
        .split("ledger verified: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .to_owned();
    let (_, ops) = get_page(
        &client,
        &format!("{console}/operations"),
        Some(cookie.as_str()),
    )
    .await;
    assert!(
        ops.contains(&format!("verified</strong>, {events} events")),
        "{ops}"
    );

    // A broken rule file: the page shows the refused reload with file:line:column, and the
    // rule set in force is still the one that passed.
    let hash_before = between(&ops, "id=\"rules-hash\">", "<");
    assert_eq!(hash_before.len(), 64, "{ops}");
    demo.save_rule_file(
        "consent.rhai",
        "fn decide(contact, consent, ctx) {\n    let x = ;\n}\n",
    );
    let mut ops = String::new();
    for _ in 0..(100 * LOAD_FACTOR) {
        ops = get_page(
            &client,
            &format!("{console}/operations"),
            Some(cookie.as_str()),
        )
        .await
        .1;
        if ops.contains("compile_error") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let reload_error = between(&ops, "id=\"reload-error\">", "</pre>");
    assert!(reload_error.contains("consent.rhai:2:13"), "{ops}");
    assert_eq!(between(&ops, "id=\"rules-hash\">", "<"), hash_before);

    // A ledger edited behind the database's back: the verification button names the event.
    let db = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    sqlx::query("DROP TRIGGER ledger_no_update")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE ledger SET to_state = 'confirmed' WHERE seq = 2")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let r = post_form(&client, &verify, Some(&cookie), &format!("csrf={csrf}")).await;
    let page = r.text().await.unwrap();
    assert!(
        page.contains("Ledger verification FAILED just now.")
            && between(&page, "id=\"verification\">", "</p>").contains("seq 2"),
        "{page}"
    );

    // Logging out ends the session on the server: the old cookie opens nothing.
    let r = post_form(
        &client,
        &format!("{console}/logout"),
        Some(cookie.as_str()),
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(r.status(), 303);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    let (status, _) = get_page(&client, &console, Some(cookie.as_str())).await;
    assert_eq!(status, 303, "logged out");

    // Failed logins are throttled per client: after 5 in a minute even the right password
    // waits (2 were refused above).
    for _ in 0..3 {
        assert_eq!(
            login(&client, &demo, "guess").await.unwrap_err().status(),
            401
        );
    }
    let r = login(&client, &demo, PASSWORD).await.unwrap_err();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    let metrics = demo.metrics().await;
    for line in [
        "optinsync_console_logins_total{result=\"ok\"} 1",
        "optinsync_console_logins_total{result=\"refused\"} 5",
        "optinsync_console_logins_total{result=\"throttled\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert_eq!(daemon.terminate(), Some(0));
}

/// Where the screenshots go: `$CARGO_TARGET_DIR/console-screenshots` (else `target/`).
fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Wait until the page in the tab is a fresh, fully loaded document.
async fn settle(cdp: &mut Cdp, what: &str) {
    cdp.wait_for(
        "document.readyState === 'complete' && !!document.body && !document.body.dataset.stale",
        what,
    )
    .await;
}

async fn open(cdp: &mut Cdp, url: &str) {
    cdp.eval("document.body && (document.body.dataset.stale = '1')")
        .await;
    cdp.call("Page.navigate", serde_json::json!({ "url": url }))
        .await;
    settle(cdp, url).await;
}

/// Press the button (or link) `id` like a person and wait for the page it leads to.
async fn press(cdp: &mut Cdp, id: &str) {
    cdp.eval(&format!(
        "document.body.dataset.stale = '1'; document.getElementById('{id}').scrollIntoView({{block: 'center'}})"
    ))
    .await;
    click(cdp, id).await;
    settle(cdp, id).await;
}

async fn text(cdp: &mut Cdp, id: &str) -> String {
    let v = cdp
        .eval(&format!(
            "(() => {{ const e = document.getElementById('{id}'); return e ? e.textContent.trim() : null; }})()"
        ))
        .await;
    v.as_str()
        .unwrap_or_else(|| panic!("no element #{id} on the page"))
        .to_owned()
}

async fn type_into(cdp: &mut Cdp, id: &str, value: &str) {
    cdp.eval(&format!(
        "document.getElementById('{id}').value = {}",
        serde_json::Value::String(value.to_owned())
    ))
    .await;
}

async fn path(cdp: &mut Cdp) -> String {
    cdp.eval("location.pathname")
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

fn assert_no_errors(cdp: &mut Cdp, page: &str) {
    let errors = cdp.take_errors();
    assert!(errors.is_empty(), "{page}: the browser reported {errors:?}");
}

/// Screenshots of the page at desktop (1280×900) and phone (390×844) widths, each checked to
/// be a PNG of that width with real content (many distinct colours, not one blank fill).
async fn shoot(cdp: &mut Cdp, name: &str) {
    let dir = screenshot_dir();
    for (width, height, label) in [(390, 844, "phone"), (1280, 900, "desktop")] {
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600 }),
        )
        .await;
        settle(cdp, name).await;
        let png = cdp.screenshot().await;
        let file = dir.join(format!("{name}-{label}.png"));
        std::fs::write(&file, &png).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        let pixels = &buf[..info.buffer_size()];
        let step = info.color_type.samples();
        let colours: std::collections::HashSet<&[u8]> = pixels.chunks(step).collect();
        assert_eq!(info.width, width, "{name} {label}: width");
        assert!(
            info.height >= height.min(600) && colours.len() > 40,
            "{name} {label}: a page with content, not a blank: {}x{}, {} colours",
            info.width,
            info.height,
            colours.len()
        );
        println!(
            "screenshot {}: {}x{}, {} colours",
            file.display(),
            info.width,
            info.height,
            colours.len()
        );
    }
}

fn email(i: usize) -> String {
    format!("person{i}@example.org")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_page_in_chromium_against_a_seeded_scenario() {
    // Eight people asked for the newsletter; five confirm, one of them unsubscribes, and the
    // removal of that one is made to fail for good (a dead letter) while the campaigns list
    // drifts: the withdrawn person is still on it, a stranger was added inside the tool, and
    // a confirmed person went missing.
    let demo = Demo::new();
    write_contacts(&demo.path("demo/contacts.csv"), 8);
    enable_console(&demo, false);
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    for i in 0..5 {
        let link = demo.confirm_link(&email(i));
        assert_eq!(click_confirm(&client, &link, "e2e").await.status(), 200);
    }
    wait_until(20, "five on the list", || demo.list_members().len() == 5);
    let r = one_click(&client, &demo.unsubscribe_link(&email(4))).await;
    assert_eq!(r.status(), 200);
    wait_until(20, "the removal", || demo.list_members().len() == 4);
    let db = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    // The row is finished a moment after the list file changed.
    for _ in 0..(200 * LOAD_FACTOR) {
        let done: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM outbox WHERE kind = 'campaigns_remove' AND status = 'done'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if done == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let dead_id: i64 = sqlx::query_scalar(
        "UPDATE outbox SET status = 'dead', last_error = 'seeded: the campaigns tool refused the removal' \
         WHERE kind = 'campaigns_remove' RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    // A CRM write-back that failed for good, to be queued again from the console.
    let writeback_id: i64 = sqlx::query_scalar(
        "UPDATE outbox SET status = 'dead', last_error = 'seeded: the CRM was read-only' \
         WHERE id = (SELECT MIN(id) FROM outbox WHERE kind = 'crm_write_back' AND status = 'done') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let list_file = demo.path("var/lists.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(&list_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let template = lines
        .iter()
        .find(|l| l.contains(&email(0)))
        .unwrap()
        .clone();
    let mut drifted: Vec<String> = lines
        .into_iter()
        .filter(|l| !l.contains(&email(1)))
        .collect();
    drifted.push(template.replace(&email(0), &email(4)));
    drifted.push(template.replace(&email(0), "stranger@example.org"));
    std::fs::write(&list_file, drifted.join("\n") + "\n").unwrap();

    let store = store::open(&demo.sqlite_url()).await.unwrap();
    let (_browser, mut cdp) = start_chromium("about:blank").await;
    cdp.call("Runtime.enable", serde_json::json!({})).await;
    cdp.call("Log.enable", serde_json::json!({})).await;
    // Full-page screenshots at exactly the viewport's width.
    cdp.call(
        "Emulation.setScrollbarsHidden",
        serde_json::json!({ "hidden": true }),
    )
    .await;
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
    )
    .await;
    let console = format!("{}/console", base(&demo));

    // Login: the console sends the browser to the form; a wrong password stays there.
    open(&mut cdp, &console).await;
    assert_eq!(path(&mut cdp).await, "/console/login");
    shoot(&mut cdp, "login").await;
    type_into(&mut cdp, "password", "not the token").await;
    press(&mut cdp, "login").await;
    assert_eq!(text(&mut cdp, "login-error").await, "Wrong password.");
    // The one error the browser may report: that refused login's 401.
    let refused = cdp.take_errors();
    assert!(
        refused.len() == 1 && refused[0].contains("status of 401"),
        "{refused:?}"
    );
    type_into(&mut cdp, "password", ADMIN_TOKEN).await;
    press(&mut cdp, "login").await;
    assert_eq!(path(&mut cdp).await, "/console");
    let cookies = cdp.call("Network.getCookies", serde_json::json!({})).await;
    let session = cookies["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "optinsync_console")
        .expect("a session cookie");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert_eq!(session["session"], false, "the cookie expires");
    assert_no_errors(&mut cdp, "login");

    // Overview: the numbers on the page are the store's, and the scenario's.
    let summary = store.consent_summary().await.unwrap();
    let reached = store.states_reached().await.unwrap();
    for state in [
        "asserted",
        "pending",
        "confirmed",
        "withdrawn",
        "lapsed",
        "erased",
    ] {
        let now: i64 = summary
            .iter()
            .filter(|r| r.list_id == "newsletter" && r.state == state)
            .map(|r| r.count)
            .sum();
        let ever: i64 = reached
            .iter()
            .filter(|r| r.list_id == "newsletter" && r.state == state)
            .map(|r| r.contacts)
            .sum();
        assert_eq!(
            text(&mut cdp, &format!("now-newsletter-{state}")).await,
            now.to_string(),
            "{state} now"
        );
        assert_eq!(
            text(&mut cdp, &format!("ever-newsletter-{state}")).await,
            ever.to_string(),
            "{state} ever"
        );
    }
    for (id, expected) in [
        ("now-newsletter-pending", "3"),
        ("now-newsletter-confirmed", "4"),
        ("now-newsletter-withdrawn", "1"),
        ("ever-newsletter-asserted", "8"),
        ("ever-newsletter-pending", "8"),
        ("ever-newsletter-confirmed", "5"),
        ("rate-newsletter-1", "100.0 %"),
        ("rate-newsletter-2", "62.5 %"),
        ("total-newsletter-doi", "8"),
        ("total-newsletter-confirmations", "5"),
        ("total-newsletter-unsubscribes", "1"),
        ("total-newsletter-bounces", "0"),
        ("total-newsletter-reminders", "0"),
        ("bounce-rate-newsletter", "0.0 %"),
        ("pending-total-newsletter", "3"),
    ] {
        assert_eq!(text(&mut cdp, id).await, expected, "#{id}");
    }
    let svgs = cdp
        .eval("document.querySelectorAll('svg.chart polyline, svg.chart rect').length")
        .await;
    assert!(svgs.as_u64().unwrap() > 4, "the charts are drawn: {svgs}");
    shoot(&mut cdp, "overview").await;
    assert_no_errors(&mut cdp, "overview");
    // The 90-day window counts the same events (all are from today), over 90 points.
    press(&mut cdp, "window-90").await;
    assert_eq!(text(&mut cdp, "total-newsletter-doi").await, "8");
    let points = cdp
        .eval(
            "document.querySelector('svg.chart polyline').getAttribute('points').split(' ').length",
        )
        .await;
    assert_eq!(points.as_u64(), Some(90));

    // Drift: not computed until asked; then the seeded drift, and when it was computed.
    press(&mut cdp, "nav-drift").await;
    text(&mut cdp, "drift-never-newsletter").await;
    press(&mut cdp, "compute-drift").await;
    assert_eq!(text(&mut cdp, "drift-members-newsletter").await, "5");
    assert_eq!(text(&mut cdp, "drift-unconfirmed-newsletter").await, "2");
    assert_eq!(text(&mut cdp, "drift-missing-newsletter").await, "1");
    assert_eq!(text(&mut cdp, "drift-removals-newsletter").await, "1");
    let alarm = text(&mut cdp, "drift-unconfirmed-list-newsletter").await;
    assert!(
        alarm.contains("stranger@example.org")
            && alarm.contains(&email(4))
            && alarm.contains("withdrawn"),
        "{alarm}"
    );
    assert!(
        text(&mut cdp, "drift-missing-list-newsletter")
            .await
            .contains(&email(1))
    );
    assert!(text(&mut cdp, "drift-at-newsletter").await.ends_with("UTC"));
    shoot(&mut cdp, "drift").await;
    assert_no_errors(&mut cdp, "drift");

    // Operations: the dead removal, a vendor's shared quota with its lock-out (seeded as a
    // Zoho Campaigns connector on PostgreSQL records it), the leases of the running daemon,
    // the rules, a verification; dropping the removal needs the confirmation step.
    let now_ms = chrono::Utc::now().timestamp_millis();
    sqlx::query("INSERT INTO quota_keys (key, locked_until) VALUES ('campaigns:listsubscribe', ?)")
        .bind(now_ms + 600_000)
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO quota_buckets (key, length_ms, bucket, used) VALUES ('campaigns:listsubscribe', 60000, ?, 7)")
        .bind(now_ms / 1000)
        .execute(&db)
        .await
        .unwrap();
    press(&mut cdp, "nav-operations").await;
    assert_eq!(
        text(&mut cdp, "quota-campaigns:listsubscribe").await,
        "7 in 1 min"
    );
    assert_eq!(text(&mut cdp, "dead-count").await, "2");
    assert_eq!(text(&mut cdp, "outbox-campaigns_remove-dead").await, "1");
    assert_eq!(text(&mut cdp, "outbox-crm_write_back-dead").await, "1");
    let leases = store_leases(&db).await;
    assert!(!leases.is_empty(), "the daemon holds its job leases");
    for (name, holder) in &leases {
        assert_eq!(&text(&mut cdp, &format!("lease-{name}")).await, holder);
    }
    assert_eq!(text(&mut cdp, "circuit-campaigns").await, "closed");
    assert_eq!(text(&mut cdp, "rules-hash").await.len(), 64);
    press(&mut cdp, "verify").await;
    assert_eq!(text(&mut cdp, "notice").await, "Ledger verified just now.");
    assert!(text(&mut cdp, "verification").await.contains("verified"));
    shoot(&mut cdp, "operations").await;
    press(&mut cdp, &format!("retry-{writeback_id}")).await;
    assert_eq!(
        text(&mut cdp, "notice").await,
        format!("Dead letter {writeback_id} queued again.")
    );
    assert_ne!(outbox_status(&db, writeback_id).await, "dead");
    assert_eq!(text(&mut cdp, "dead-count").await, "1");
    press(&mut cdp, &format!("drop-{dead_id}")).await;
    text(&mut cdp, "confirm-drop").await;
    assert_eq!(
        outbox_status(&db, dead_id).await,
        "dead",
        "nothing dropped yet"
    );
    shoot(&mut cdp, "operations-drop-removal").await;
    press(&mut cdp, "confirm-drop-button").await;
    assert_eq!(
        text(&mut cdp, "notice").await,
        format!("Dead letter {dead_id} dropped.")
    );
    assert_eq!(outbox_status(&db, dead_id).await, "dropped");
    assert_eq!(text(&mut cdp, "dead-count").await, "0");
    assert_no_errors(&mut cdp, "operations");

    // A person: the history as `contact show` prints it.
    press(&mut cdp, "nav-person").await;
    type_into(&mut cdp, "email", &email(0)).await;
    press(&mut cdp, "lookup").await;
    assert_eq!(
        path(&mut cdp).await,
        "/console/person",
        "no address in the URL"
    );
    assert_eq!(text(&mut cdp, "contact-email").await, email(0));
    assert_eq!(text(&mut cdp, "state-newsletter").await, "confirmed");
    let shown = text(&mut cdp, "timeline").await;
    let cli = demo.run_ok(&["contact", "show", &email(0)]);
    let history: Vec<&str> = cli
        .split("history:\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(str::trim)
        .collect();
    assert!(history.len() >= 4, "{cli}");
    let shown_lines: Vec<&str> = shown.lines().map(str::trim).collect();
    assert_eq!(
        shown_lines, history,
        "the page's history is `contact show`'s"
    );
    shoot(&mut cdp, "person").await;
    assert_no_errors(&mut cdp, "person");

    // Erasure asks for the address again; a wrong one erases nothing.
    type_into(&mut cdp, "email", &email(7)).await;
    press(&mut cdp, "lookup").await;
    let contact_id = text(&mut cdp, "contact-id").await;
    press(&mut cdp, "erase").await;
    text(&mut cdp, "confirm-erase").await;
    shoot(&mut cdp, "person-erase-confirmation").await;
    type_into(&mut cdp, "confirm", &email(6)).await;
    press(&mut cdp, "confirm-erase-button").await;
    assert!(
        text(&mut cdp, "message")
            .await
            .contains("nothing was erased")
    );
    let refused = cdp.take_errors();
    assert!(
        refused.len() == 1 && refused[0].contains("status of 422"),
        "{refused:?}"
    );
    assert!(
        !store
            .contact_by_id(&contact_id)
            .await
            .unwrap()
            .unwrap()
            .erased
    );
    type_into(&mut cdp, "confirm", &email(7).to_uppercase()).await;
    press(&mut cdp, "confirm-erase-button").await;
    assert!(text(&mut cdp, "notice").await.starts_with("Erased"));
    assert!(
        store
            .contact_by_id(&contact_id)
            .await
            .unwrap()
            .unwrap()
            .erased
    );
    assert_no_errors(&mut cdp, "erasure");

    // The proof bundle downloads (over HTTP with a session of its own).
    let (cookie, _) = login(&client, &demo, ADMIN_TOKEN).await.unwrap();
    let (_, page) = get_page(&client, &format!("{console}/person"), Some(cookie.as_str())).await;
    let csrf = field(&page, "csrf");
    let ana = store.contact_by_email(&email(0)).await.unwrap().unwrap();
    for format in ["json", "html"] {
        let r = post_form(
            &client,
            &format!("{console}/person/proof"),
            Some(cookie.as_str()),
            &format!("csrf={csrf}&contact_id={}&format={format}", ana.id),
        )
        .await;
        assert_eq!(r.status(), 200);
        let disposition = r.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            disposition,
            format!("attachment; filename=\"proof-{}.{format}\"", ana.id)
        );
        let body = r.text().await.unwrap();
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["schema"], "optinsync.proof-bundle");
            assert_eq!(v["subject"]["contact_id"], ana.id.as_str());
            assert_eq!(v["ledger"]["verified"], true);
        } else {
            assert!(body.contains("id=\"chain-result\"") && !body.contains("<script"));
        }
    }

    // Logging out ends the session.
    press(&mut cdp, "logout").await;
    assert_eq!(path(&mut cdp).await, "/console/login");
    open(&mut cdp, &format!("{console}/operations")).await;
    assert_eq!(path(&mut cdp).await, "/console/login");
    assert_no_errors(&mut cdp, "logout");
    println!("console screenshots in {}", screenshot_dir().display());
    assert_eq!(daemon.terminate(), Some(0));
}

async fn store_leases(db: &sqlx::SqlitePool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT name, holder FROM leases ORDER BY name")
        .fetch_all(db)
        .await
        .unwrap()
}

async fn outbox_status(db: &sqlx::SqlitePool, id: i64) -> String {
    sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?")
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap()
}
