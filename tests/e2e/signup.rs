//! Website signups (`/signup/{list}`) through the binary: the same answer for every state of
//! an address, the limits and the honeypot, and the ways back after a withdrawal or an
//! erasure.

use std::time::{Duration, Instant};

use crate::support::*;

const LIST: &str = "newsletter";

fn append_config(demo: &Demo, text: &str) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(demo.config(), format!("{cfg}\n{text}\n")).unwrap();
}

fn trust_loopback_proxy(demo: &Demo) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(
        demo.config(),
        cfg.replacen(
            "[server]\n",
            "[server]\ntrusted_proxies = [\"127.0.0.1\"]\nrate_limit_per_minute = 100000\nglobal_rate_limit_per_second = 100000\n",
            1,
        ),
    )
    .unwrap();
}

fn url(demo: &Demo, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", demo.port)
}

/// A form post of the organisation's site: status and body.
async fn post_signup(
    client: &reqwest::Client,
    demo: &Demo,
    fields: &[(&str, &str)],
    from: &str,
) -> (u16, String) {
    let r = client
        .post(url(demo, &format!("/signup/{LIST}")))
        .header("x-forwarded-for", from)
        .header("user-agent", "signup-test/1")
        .form(fields)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn signup(client: &reqwest::Client, demo: &Demo, email: &str) -> (u16, String) {
    post_signup(client, demo, &[("email", email)], "198.51.100.7").await
}

/// The mails to `email`, oldest first (file names follow the time-ordered event ids).
fn mails_to(demo: &Demo, email: &str) -> Vec<String> {
    demo.mails()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .filter(|m| {
            m.lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("To: {email}")))
        })
        .collect()
}

fn wait_for_mails(demo: &Demo, email: &str, n: usize) -> Vec<String> {
    wait_until(20, &format!("{n} mail(s) to {email}"), || {
        mails_to(demo, email).len() >= n
    });
    mails_to(demo, email)
}

/// Sign up and confirm through the newest mail.
async fn signup_and_confirm(client: &reqwest::Client, demo: &Demo, email: &str) {
    let before = mails_to(demo, email).len();
    assert_eq!(signup(client, demo, email).await.0, 200);
    let mails = wait_for_mails(demo, email, before + 1);
    let link = link_in(mails.last().unwrap(), "/confirm/");
    let r = click_confirm(client, &link, "signup-test/1").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(demo.state(email, LIST), "confirmed");
}

/// The state of `email` on the list, `none` while the address is unknown.
fn state_of(demo: &Demo, email: &str) -> String {
    let out = demo.output(&["contact", "show", email, "--json"]);
    if !out.status.success() {
        return "none".into();
    }
    state_in(&serde_json::from_slice(&out.stdout).unwrap(), LIST)
}

fn append_status(demo: &Demo, lines: &[String]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(demo.path("var/campaigns-status.jsonl"))
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// The five states of an address answer alike: status, body and (within noise) time. The
/// mail goes through the outbox, and every signup leaves one ledger event, so the request
/// does the same work for each; `answer_floor` covers what differs.
#[tokio::test(flavor = "multi_thread")]
async fn five_address_states_get_the_same_answer_and_timing() {
    const ROUNDS: usize = 16;
    let demo = Demo::new();
    trust_loopback_proxy(&demo);
    append_config(
        &demo,
        "[signup]\nper_client_per_hour = 100000\nper_address_per_hour = 100000",
    );
    let daemon = demo.spawn_daemon();
    let client = http();

    // pending: signed up, mail sent, inside the reminder window.
    let pending = "pending.person@example.org";
    assert_eq!(signup(&client, &demo, pending).await.0, 200);
    wait_for_mails(&demo, pending, 1);
    // confirmed.
    let confirmed = "confirmed.person@example.org";
    signup_and_confirm(&client, &demo, confirmed).await;
    // withdrawn (an unsubscribe inside the campaigns tool) and suppressed (a bounce): a
    // signup turns a withdrawn address pending, so each round takes a fresh one.
    let withdrawn: Vec<String> = (0..ROUNDS)
        .map(|i| format!("withdrawn{i}@example.org"))
        .collect();
    let suppressed = "bounced.person@example.org";
    let mut lines: Vec<String> = withdrawn
        .iter()
        .map(|e| format!("{{\"list\":\"{LIST}\",\"email\":\"{e}\",\"kind\":\"unsubscribed\"}}"))
        .collect();
    lines.push(format!(
        "{{\"list\":\"{LIST}\",\"email\":\"{suppressed}\",\"kind\":\"bounced\"}}"
    ));
    append_status(&demo, &lines);
    wait_until(30, "the campaigns status lines", || {
        state_of(&demo, suppressed) == "bounced"
            && state_of(&demo, withdrawn.last().unwrap()) == "withdrawn"
    });
    let mails_before = demo.mails().len();

    let states = ["new", "pending", "confirmed", "withdrawn", "suppressed"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); states.len()];
    let mut answers = std::collections::BTreeSet::new();
    for (round, withdrawn) in withdrawn.iter().enumerate() {
        for (i, state) in states.iter().enumerate() {
            let new = format!("new{round}@example.org");
            let email = match *state {
                "new" => new.as_str(),
                "pending" => pending,
                "confirmed" => confirmed,
                "withdrawn" => withdrawn.as_str(),
                _ => suppressed,
            };
            let t = Instant::now();
            let (status, body) = signup(&client, &demo, email).await;
            times[i].push(t.elapsed().as_secs_f64() * 1000.0);
            answers.insert((status, body));
        }
    }
    assert_eq!(
        answers.len(),
        1,
        "one answer for every state: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let (status, body) = answers.into_iter().next().unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("check your inbox"), "{body}");

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let means: Vec<f64> = times.iter().map(|v| mean(v)).collect();
    let sd = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    };
    let summary: Vec<String> = states
        .iter()
        .zip(&times)
        .map(|(s, v)| format!("{s}: mean {:.1} ms, sd {:.1} ms", mean(v), sd(v)))
        .collect();
    eprintln!(
        "signup answer times over {ROUNDS} rounds: {}",
        summary.join("; ")
    );
    let spread = means.iter().cloned().fold(f64::MIN, f64::max)
        - means.iter().cloned().fold(f64::MAX, f64::min);
    // The floor (250 ms) hides the work; what is left is scheduling noise.
    assert!(
        means.iter().all(|m| *m >= 250.0),
        "every answer waits for the floor: {summary:?}"
    );
    assert!(spread < 25.0, "means differ by {spread:.1} ms: {summary:?}");

    // The mail went out only where it should: one per new address and per withdrawn one,
    // none to the pending (inside its window), confirmed or bounced address.
    wait_until(30, "the signup mails", || {
        demo.mails().len() >= mails_before + 2 * ROUNDS
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(demo.mails().len(), mails_before + 2 * ROUNDS);
    assert_eq!(mails_to(&demo, pending).len(), 1);
    assert_eq!(mails_to(&demo, confirmed).len(), 1);
    assert_eq!(mails_to(&demo, suppressed).len(), 0);
    assert_eq!(demo.state(&withdrawn[0], LIST), "pending");
    // Every signup is evidence, mailed or not.
    let kinds = demo.event_kinds(suppressed);
    assert_eq!(
        kinds.iter().filter(|k| *k == "signup_received").count(),
        ROUNDS,
        "{kinds:?}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// The honeypot and the per-address limit answer like any signup and do nothing; the
/// per-client limit counts an IPv6 /64 as one client.
#[tokio::test(flavor = "multi_thread")]
async fn honeypot_and_limits() {
    let demo = Demo::new();
    trust_loopback_proxy(&demo);
    append_config(
        &demo,
        "[signup]\nper_client_per_hour = 5\nper_address_per_hour = 2\nanswer_floor = \"10ms\"",
    );
    let daemon = demo.spawn_daemon();
    let client = http();

    // A bot fills in the hidden field: the same answer, no contact, no mail.
    let bot = "bot.victim@example.org";
    let (status, body) = post_signup(
        &client,
        &demo,
        &[("email", bot), ("website", "http://spam.example")],
        "203.0.113.1",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("check your inbox"));
    let (_, person) = post_signup(
        &client,
        &demo,
        &[("email", "someone@example.org")],
        "203.0.113.1",
    )
    .await;
    assert_eq!(body, person, "a honeypot hit is answered like a signup");
    let out = demo.output(&["contact", "show", bot, "--json"]);
    assert!(!out.status.success(), "no contact for a honeypot hit");

    // Per address: two signups, then the same answer and nothing recorded.
    let target = "limited@example.org";
    for i in 0..4 {
        let (status, b) = post_signup(
            &client,
            &demo,
            &[("email", target)],
            &format!("203.0.113.{}", 10 + i),
        )
        .await;
        assert_eq!((status, b.as_str()), (200, body.as_str()));
    }
    let kinds = demo.event_kinds(target);
    let signups = kinds
        .iter()
        .filter(|k| *k == "signup_requested" || *k == "signup_received")
        .count();
    assert_eq!(signups, 2, "{kinds:?}");
    wait_for_mails(&demo, target, 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        mails_to(&demo, target).len(),
        1,
        "one mail, whatever the number of posts"
    );

    // Per client: five from one /64 (different addresses in it), then 429; another /64 is
    // its own client.
    let mut statuses = Vec::new();
    for i in 1..=7 {
        let (s, _) = post_signup(
            &client,
            &demo,
            &[("email", &format!("v6-{i}@example.org"))],
            &format!("2001:db8:5:6::{i:x}"),
        )
        .await;
        statuses.push(s);
    }
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    assert_eq!(&statuses[5..], &[429, 429], "{statuses:?}");
    let (s, _) = post_signup(
        &client,
        &demo,
        &[("email", "v6-other@example.org")],
        "2001:db8:5:7::1",
    )
    .await;
    assert_eq!(s, 200);
    // An address that is none gets 400 (that says nothing about anyone).
    let (s, _) = post_signup(&client, &demo, &[("email", "not-an-address")], "192.0.2.1").await;
    assert_eq!(s, 400);
    assert_eq!(daemon.terminate(), Some(0));
}

/// A person who unsubscribed signs up again: pending by their own action, a new DOI mail,
/// confirmed by its link (an old link does not do it).
#[tokio::test(flavor = "multi_thread")]
async fn withdrawn_signup_confirm() {
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let client = http();
    let email = "comeback@example.org";
    signup_and_confirm(&client, &demo, email).await;
    let first = mails_to(&demo, email);
    let unsub = link_in(first.last().unwrap(), "/unsubscribe/");
    let r = one_click(&client, &unsub).await;
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(email, LIST), "withdrawn");
    // The old confirmation link does not bring them back.
    let old = link_in(first.last().unwrap(), "/confirm/");
    let r = click_confirm(&client, &old, "signup-test/1").await;
    assert_ne!(r.status(), 200);
    assert_eq!(demo.state(email, LIST), "withdrawn");

    signup_and_confirm(&client, &demo, email).await;
    let kinds = demo.event_kinds(email);
    let tail: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| matches!(*k, "signup_requested" | "confirmed" | "withdrawn"))
        .collect();
    assert_eq!(
        tail,
        [
            "signup_requested",
            "confirmed",
            "withdrawn",
            "signup_requested",
            "confirmed"
        ]
    );
    wait_until(20, "back on the list", || {
        demo.list_members().iter().any(|m| m == email)
    });
    assert_eq!(daemon.terminate(), Some(0));
}

/// An erased address comes back only through its person's own signup and confirmation;
/// the confirmation lifts the erasure's suppression, and the event says so.
#[tokio::test(flavor = "multi_thread")]
async fn erased_signup_confirm_lifts_the_suppression() {
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let client = http();
    let email = "erased.person@example.org";
    signup_and_confirm(&client, &demo, email).await;
    demo.run_ok(&["erase", email]);
    assert!(!demo.output(&["contact", "show", email]).status.success());

    let keys = optinsync_engine::tokens::TokenKeys::new("k1", DEMO_TOKEN_SECRET.as_bytes(), vec![]);
    let store = optinsync_engine::store::open(&demo.sqlite_url())
        .await
        .unwrap();
    let hashes = keys.address_hashes(email);
    assert!(store.is_any_suppressed(&hashes).await.unwrap());

    signup_and_confirm(&client, &demo, email).await;
    assert!(
        !store.is_any_suppressed(&hashes).await.unwrap(),
        "the confirmation lifted the suppression"
    );
    let events = demo.contact_json(email)["events"].clone();
    let confirmed = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "confirmed")
        .unwrap()
        .clone();
    assert!(
        confirmed.to_string().contains("suppression is lifted"),
        "{confirmed}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// The hosted page in the browser's language; its post names the page's snapshot, and the
/// JSON variant answers allowed origins with CORS and refuses others.
#[tokio::test(flavor = "multi_thread")]
async fn hosted_page_and_json_with_cors() {
    let demo = Demo::new();
    append_config(
        &demo,
        "[signup]\nallowed_origins = [\"https://www.example.org\"]\nanswer_floor = \"10ms\"",
    );
    let daemon = demo.spawn_daemon();
    let client = http();
    let page = client
        .get(url(&demo, &format!("/signup/{LIST}")))
        .header("accept-language", "es-ES,es;q=0.9")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("lang=\"es\"") && page.contains("Suscribirme"),
        "{page}"
    );
    let email = "hosted@example.org";
    let mut fields = hidden_fields(&page);
    fields.push(("email".into(), email.into()));
    fields.push(("name".into(), "Ana P".into()));
    let r = client
        .post(url(&demo, &format!("/signup/{LIST}")))
        .header("origin", url(&demo, ""))
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Revise su bandeja"));
    let page_hash = hidden_fields(&page)
        .into_iter()
        .find(|(k, _)| k == "page")
        .unwrap()
        .1;
    let v = demo.contact_json(email);
    assert_eq!(v["contact"]["language"], "es");
    let ev = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "signup_requested")
        .unwrap()
        .to_string();
    assert!(
        ev.contains(&page_hash),
        "the page snapshot is the evidence: {ev}"
    );
    let mail = wait_for_mails(&demo, email, 1);
    assert!(mail[0].contains("Content-Language: es") || mail[0].contains("es"));

    // JSON from an allowed site: CORS, the same answer for anyone.
    let pre = client
        .request(
            reqwest::Method::OPTIONS,
            url(&demo, &format!("/signup/{LIST}")),
        )
        .header("origin", "https://www.example.org")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "https://www.example.org"
    );
    let json_email = "json.person@example.org";
    let r = client
        .post(url(&demo, &format!("/signup/{LIST}")))
        .header("content-type", "application/json")
        .header("origin", "https://www.example.org")
        .header("referer", "https://www.example.org/news")
        .body(format!(
            "{{\"email\":\"{json_email}\",\"form_text_hash\":\"sha256:{}\"}}",
            "ab".repeat(32)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://www.example.org"
    );
    assert_eq!(r.text().await.unwrap(), r#"{"status":"check_your_inbox"}"#);
    let ev = demo.contact_json(json_email)["events"].to_string();
    assert!(
        ev.contains("https://www.example.org") && ev.contains(&"ab".repeat(32)),
        "{ev}"
    );
    // Another site: refused, no CORS, nothing done.
    let r = client
        .post(url(&demo, &format!("/signup/{LIST}")))
        .header("content-type", "application/json")
        .header("origin", "https://evil.example")
        .body("{\"email\":\"victim@example.org\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    assert!(
        !demo
            .output(&["contact", "show", "victim@example.org"])
            .status
            .success()
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// `suppression list|show|lift`: a bounced address is on the list; the operator's lift is a
/// `cli` ledger event and sends nothing; after it the person may sign up and confirm again.
#[tokio::test(flavor = "multi_thread")]
async fn suppression_list_show_and_lift() {
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let client = http();
    let email = "bounced.once@example.org";
    append_status(
        &demo,
        &[format!(
            "{{\"list\":\"{LIST}\",\"email\":\"{email}\",\"kind\":\"bounced\"}}"
        )],
    );
    wait_until(20, "the bounce", || state_of(&demo, email) == "bounced");
    let show = demo.run_ok(&["suppression", "show", email]);
    assert!(show.contains("bounced"), "{show}");
    let list: serde_json::Value =
        serde_json::from_str(&demo.run_ok(&["suppression", "list", "--json"])).unwrap();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|r| r["reason"] == "bounced"),
        "{list}"
    );
    // A signup now mails nothing.
    assert_eq!(signup(&client, &demo, email).await.0, 200);

    let no_reason = demo.output(&["suppression", "lift", email]);
    assert_eq!(no_reason.status.code(), Some(2), "--reason is required");
    let mails = demo.mails().len();
    let out = demo.run_ok(&[
        "suppression",
        "lift",
        email,
        "--reason",
        "the person wrote to us from this mailbox",
    ]);
    assert!(out.contains("lifted"), "{out}");
    let not = demo.run_ok(&["suppression", "show", email]);
    assert!(not.contains("is not suppressed"), "{not}");
    let events = demo.contact_json(email)["events"].clone();
    let lift = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "suppression_lifted")
        .expect("the lift is in the ledger")
        .to_string();
    assert!(
        lift.contains("\"cli\"") && lift.contains("wrote to us"),
        "{lift}"
    );
    assert_eq!(
        state_of(&demo, email),
        "bounced",
        "a lift changes no consent"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(demo.mails().len(), mails, "a lift sends nothing");

    signup_and_confirm(&client, &demo, email).await;
    assert_eq!(daemon.terminate(), Some(0));
}

/// The CRM learns about a person who signed up: Zoho CRM `upsert` by address into
/// `signup_module` with the consent fields; after the confirmation the write-back updates
/// that record. Without a CRM that creates records, start-up says so.
#[tokio::test(flavor = "multi_thread")]
async fn signup_creates_the_record_in_zoho_crm() {
    let fake = optinsync_testkit::zoho::FakeZoho::start();
    let demo = Demo::new();
    demo.replace_connector(
        "crm",
        &zoho_crm_section(&fake, "signup_module = \"Contacts\""),
    );
    let daemon = demo.spawn_daemon();
    let client = http();
    let email = "zoho.signup@example.org";
    let (status, _) = post_signup(
        &client,
        &demo,
        &[("email", email), ("name", "Zoe Signup")],
        "198.51.100.8",
    )
    .await;
    assert_eq!(status, 200);
    let find = || {
        fake.with(|s| {
            s.modules["Contacts"]
                .values()
                .find(|r| r.fields.get("Email").and_then(|e| e.as_str()) == Some(email))
                .map(|r| serde_json::Value::Object(r.fields.clone()))
        })
    };
    wait_until(20, "the record in Zoho CRM", || find().is_some());
    let record = find().unwrap();
    assert_eq!(record["Last_Name"], "Signup");
    assert_eq!(
        record["Data_Processing_Basis_Details"]["Contact_Through_Email"],
        false
    );
    let id = record["id"].as_str().unwrap().to_owned();
    wait_until(20, "the record on the contact", || {
        demo.contact_json(email)["contact"]
            .to_string()
            .contains(&id)
    });

    let mails = wait_for_mails(&demo, email, 1);
    let r = click_confirm(&client, &link_in(&mails[0], "/confirm/"), "signup-test/1").await;
    assert_eq!(r.status(), 200);
    wait_until(20, "the confirmation written back to that record", || {
        fake.record("Contacts", &id)
            .is_some_and(|r| r["Data_Processing_Basis_Details"]["Contact_Through_Email"] == true)
    });
    assert_eq!(fake.with(|s| s.modules["Contacts"].len()), 1, "one record");
    let log = std::fs::read_to_string(demo.path("daemon.log")).unwrap();
    assert!(!log.contains("cannot create records"), "{log}");
    assert_eq!(daemon.terminate(), Some(0));

    // The demo's CSV CRM creates nothing: the operator is told at start-up.
    let plain = Demo::new();
    let daemon = plain.spawn_daemon();
    wait_until(20, "the start-up notice", || {
        std::fs::read_to_string(plain.path("daemon.log"))
            .unwrap_or_default()
            .contains("cannot create records")
    });
    assert_eq!(daemon.terminate(), Some(0));
}

/// Where screenshots go: `OPTINSYNC_SCREENSHOT_DIR` if set (to look at them), else `dir`.
fn screenshot_path(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("OPTINSYNC_SCREENSHOT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.to_owned());
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A screenshot at `width`×`height` (`mobile`: a phone's viewport), checked to be a PNG of
/// that width with something drawn on it, and the page not wider than the screen.
async fn shot(
    cdp: &mut crate::browser::Cdp,
    path: &std::path::Path,
    (width, height, mobile): (u32, u32, bool),
) {
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
    )
    .await;
    cdp.wait_for(
        &format!("document.readyState === 'complete' && window.innerWidth === {width}"),
        "the viewport",
    )
    .await;
    let overflow = cdp
        .eval("document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(overflow, true, "no sideways scrolling at {width} px");
    let png = cdp.screenshot().await;
    std::fs::write(path, &png).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let w = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(w, width, "{}", path.display());
    // A blank page compresses to a few hundred bytes; text and a form do not.
    assert!(
        png.len() > 8_000,
        "{} is {} bytes: blank?",
        path.display(),
        png.len()
    );
}

const DESKTOP: (u32, u32, bool) = (1280, 800, false);
const PHONE: (u32, u32, bool) = (390, 844, true);

/// The hosted signup page in headless Chromium, at desktop and phone widths: filled in and
/// sent like a person does (no JavaScript on the page), it answers "check your inbox", the
/// ledger names the page the person saw, and the mail's link confirms.
#[tokio::test(flavor = "multi_thread")]
async fn signup_page_in_chromium() {
    use crate::browser::{click, start_chromium};
    let demo = Demo::new();
    let daemon = demo.spawn_daemon();
    let (_browser, mut cdp) = start_chromium(&url(&demo, &format!("/signup/{LIST}"))).await;
    cdp.wait_for("!!document.getElementById('email')", "the signup form")
        .await;
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "signup-desktop.png"),
        DESKTOP,
    )
    .await;
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "signup-phone.png"),
        PHONE,
    )
    .await;
    let honeypot_hidden = cdp
        .eval("document.getElementById('website').getBoundingClientRect().right < 0")
        .await;
    assert_eq!(honeypot_hidden, true, "the honeypot is off-screen");
    let page_hash = cdp
        .eval("document.querySelector('input[name=page]').value")
        .await
        .as_str()
        .unwrap()
        .to_owned();

    let email = "chromium.person@example.org";
    click(&mut cdp, "email").await;
    cdp.call("Input.insertText", serde_json::json!({ "text": email }))
        .await;
    click(&mut cdp, "signup").await;
    cdp.wait_for(
        "document.body && document.body.innerText.includes('check your inbox')",
        "the answer page",
    )
    .await;
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "signup-sent-phone.png"),
        PHONE,
    )
    .await;
    let ev = demo.contact_json(email)["events"].to_string();
    assert!(ev.contains(&page_hash), "the ledger names the page: {ev}");
    assert!(ev.contains("HeadlessChrome"), "and the browser: {ev}");

    let mails = wait_for_mails(&demo, email, 1);
    let client = http();
    let r = click_confirm(&client, &link_in(&mails[0], "/confirm/"), "signup-test/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(demo.state(email, LIST), "confirmed");
    assert_eq!(daemon.terminate(), Some(0));
}

/// `(list, email)` of every member of the campaigns tool's lists (the JSONL file).
fn memberships(demo: &Demo) -> Vec<(String, String)> {
    std::fs::read_to_string(demo.path("var/lists.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["list"].as_str().unwrap().to_owned(),
                v["email"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The preference centre in headless Chromium: the mail's link opens every list with the
/// person's state; joining another list confirms at once (evidence: the mailed token, the
/// page, IP and user agent), leaving one withdraws; the campaigns lists follow. Screenshots
/// at desktop and phone widths.
#[tokio::test(flavor = "multi_thread")]
async fn preference_centre_in_chromium() {
    use crate::browser::{click, start_chromium};
    let demo = Demo::new();
    append_config(
        &demo,
        "[[lists]]\nid = \"events\"\nname = \"Open days and events\"\ndescription = \"Invitations to open days, a few times a year.\"\n",
    );
    let daemon = demo.spawn_daemon();
    let client = http();
    let email = "prefs.person@example.org";
    signup_and_confirm(&client, &demo, email).await;
    wait_until(20, "on the newsletter list", || {
        memberships(&demo).contains(&(LIST.to_owned(), email.to_owned()))
    });
    let mail = mails_to(&demo, email).pop().unwrap();
    let link = link_in(&mail, "/preferences/");
    // A forged token id signed with the (published demo) key is not honoured.
    let forged = link.rsplit_once('/').unwrap().0.to_owned() + "/garbage";
    assert_eq!(client.get(&forged).send().await.unwrap().status(), 400);

    let (_browser, mut cdp) = start_chromium(&link).await;
    cdp.wait_for(
        "!!document.getElementById('join-events')",
        "the preference centre",
    )
    .await;
    let state = |id: &str| format!("document.getElementById('state-{id}').innerText");
    assert_eq!(cdp.eval(&state(LIST)).await, "You receive this list.");
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "preferences-desktop.png"),
        DESKTOP,
    )
    .await;
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "preferences-phone.png"),
        PHONE,
    )
    .await;

    click(&mut cdp, "join-events").await;
    cdp.wait_for(
        "!!document.getElementById('leave-events')",
        "the events list joined",
    )
    .await;
    click(&mut cdp, &format!("leave-{LIST}")).await;
    cdp.wait_for(
        &format!("!!document.getElementById('join-{LIST}')"),
        "the newsletter left",
    )
    .await;
    assert_eq!(
        cdp.eval(&state(LIST)).await,
        "You do not receive this list."
    );
    shot(
        &mut cdp,
        &screenshot_path(demo.dir.path(), "preferences-after-phone.png"),
        PHONE,
    )
    .await;

    assert_eq!(demo.state(email, "events"), "confirmed");
    assert_eq!(demo.state(email, LIST), "withdrawn");
    let token_id = {
        let events = demo.contact_json(email)["events"].clone();
        let join = events
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["kind"] == "confirmed_by_preferences")
            .expect("the join is in the ledger")
            .to_string();
        assert!(join.contains("HeadlessChrome"), "{join}");
        assert!(join.contains("content_hash"), "{join}");
        join
    };
    // The token the join names is the one the mail carried.
    let mailed = demo.contact_json(email)["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"].as_str().is_some_and(|k| k.ends_with("mail_sent")))
        .unwrap()
        .to_string();
    let id = mailed
        .split("preferences_token_id")
        .nth(1)
        .and_then(|r| r.split('"').find(|s| s.len() == 36))
        .expect("the mail's preferences token id")
        .to_owned();
    assert!(token_id.contains(&id), "{token_id} names {id}");
    wait_until(20, "the campaigns lists follow", || {
        let m = memberships(&demo);
        m.contains(&("events".to_owned(), email.to_owned()))
            && !m.contains(&(LIST.to_owned(), email.to_owned()))
    });

    // Leave all: every list the person is on.
    click(&mut cdp, "leave-all").await;
    cdp.wait_for("!!document.getElementById('join-events')", "all lists left")
        .await;
    assert_eq!(demo.state(email, "events"), "withdrawn");
    wait_until(20, "off every campaigns list", || {
        !memberships(&demo).iter().any(|(_, e)| e == email)
    });
    assert_eq!(daemon.terminate(), Some(0));
}

/// `GET /preferences` without a token: "send me a link". A known address gets a mail with
/// its preference-centre link (which then works); an unknown one nothing; both the same
/// answer.
#[tokio::test(flavor = "multi_thread")]
async fn preference_link_by_address() {
    let demo = Demo::new();
    append_config(&demo, "[signup]\nanswer_floor = \"100ms\"");
    let daemon = demo.spawn_daemon();
    let client = http();
    let known = "known.prefs@example.org";
    signup_and_confirm(&client, &demo, known).await;
    let page = client.get(url(&demo, "/preferences")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("id=\"send-link\""));
    let ask = |email: &'static str| {
        let client = client.clone();
        let u = url(&demo, "/preferences");
        async move {
            let r = client
                .post(u)
                .form(&[("email", email)])
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let mails_before = mails_to(&demo, known).len();
    let a = ask(known).await;
    let b = ask("nobody.known@example.org").await;
    assert_eq!(a, b, "the same answer for a known and an unknown address");
    assert_eq!(a.0, 200);
    let mails = wait_for_mails(&demo, known, mails_before + 1);
    let mail = mails.last().unwrap();
    assert!(mail.contains("Your lists at"), "{mail}");
    let link = link_in(mail, "/preferences/");
    let r = client.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("You receive this list."));
    assert!(
        !demo
            .output(&["contact", "show", "nobody.known@example.org"])
            .status
            .success(),
        "an unknown address is not stored"
    );
    let kinds = demo.event_kinds(known);
    assert!(
        kinds.contains(&"preferences_link_mail_sent".to_owned()),
        "{kinds:?}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}
