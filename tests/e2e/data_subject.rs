//! The data-subject tools end to end: the proof bundle of a confirmed contact holds every
//! field of the proof bundle (README.md, "Proof, erasure, retention, subject access") that optinsync can know and renders in headless Chromium;
//! `--all` exports a list; erasure (admin API and CLI) leaves the address in no byte of the
//! SQLite files and in no PostgreSQL row, keeps the chain verifiable and a keyed suppression,
//! tells the CRM, and a CRM sync bringing the address back mails nothing; retention purges
//! by its periods; the subject export.

use std::path::Path;

use optinsync_engine::tokens::TokenKeys;
use sha2::{Digest, Sha256};

use crate::browser::*;
use crate::support::*;

const DEMO_SECRET: &str = "demo-only-secret-change-me-0123456789abcdef";
const ADMIN_TOKEN: &str = "data-subject-admin-token-0123456789abcdef";
const ANA: &str = "ana.garcia@example.org";
const BEN: &str = "ben.okafor@example.net";
const DMITRI: &str = "dmitri@example.com";
const LIST_NAME: &str = "Master programmes newsletter";

fn append_config(demo: &Demo, text: &str) {
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    std::fs::write(demo.config(), format!("{cfg}\n{text}\n")).unwrap();
}

/// Sync, then Ana confirms through the HTTP confirm flow (GET page, POST button).
async fn confirmed_ana(demo: &Demo, user_agent: &str) {
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let resp = click_confirm(&http(), &demo.confirm_link(ANA), user_agent).await;
    assert_eq!(resp.status(), 200);
    wait_until(20, "Ana on the list", || {
        demo.list_members() == vec![ANA.to_owned()]
    });
    assert_eq!(daemon.terminate(), Some(0));
}

fn str_at<'a>(v: &'a serde_json::Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} missing from the proof bundle: {v}"))
}

fn time_at(v: &serde_json::Value, what: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(str_at(v, what))
        .unwrap_or_else(|e| panic!("{what} is not an RFC 3339 time ({e}): {v}"))
        .to_utc()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread")]
async fn proof_bundle_of_a_confirmed_contact_holds_every_section_2_field_and_renders() {
    let demo = Demo::new();
    let agent = "proof-test-agent/2.0 (X11)";
    confirmed_ana(&demo, agent).await;

    let ana_mail = demo.mail_to(ANA);
    // From stored data only: with every outside system gone (the CRM file, the list file
    // and the mail folder removed, the daemon stopped), the export still works.
    for gone in ["demo/contacts.csv", "var/lists.jsonl"] {
        std::fs::remove_file(demo.path(gone)).unwrap();
    }
    std::fs::remove_dir_all(demo.path("var/mail")).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&demo.run_ok(&["evidence", "export", ANA, "--format", "json"]))
            .unwrap();
    assert_eq!(b["schema"], "optinsync.proof-bundle", "bundle schema");
    assert_eq!(b["version"], 1, "bundle version");
    let p = b["proof"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["list"] == "newsletter")
        .expect("a proof section for the list")
        .clone();

    // Who.
    assert_eq!(b["subject"]["email"], ANA, "who: the address");
    assert!(
        !str_at(&p["who"]["contact_id"], "who: contact id").is_empty(),
        "who: contact id"
    );
    assert_eq!(
        p["who"]["crm_records"],
        serde_json::json!(["Contacts/1001"]),
        "who: the CRM record id"
    );
    // What they were asked and told.
    assert_eq!(p["what"]["list"], "newsletter", "what: list id");
    assert_eq!(p["what"]["list_name"], LIST_NAME, "what: list name");
    assert_eq!(
        p["what"]["controller"], "Example University",
        "what: the controller's identity"
    );
    assert_eq!(
        p["what"]["channel"], "email",
        "what: channel (DOI is email only)"
    );
    assert!(
        str_at(&p["what"]["legal_basis"], "legal basis").contains("consent"),
        "what: legal basis"
    );
    assert_eq!(p["what"]["language"], "es", "what: language of the texts");
    // When (UTC, in order).
    assert!(
        str_at(&b["clock"], "clock").contains("UTC"),
        "when: the clock source"
    );
    let signup_at = time_at(&p["signup"]["at"], "when: signup time");
    let mail_at = time_at(
        &p["confirmation_mail"]["sent_at"],
        "when: DOI mail sent time",
    );
    let confirmed_at = time_at(&p["confirmation"]["at"], "when: confirmation time");
    assert!(
        signup_at <= mail_at && mail_at <= confirmed_at,
        "when: signup {signup_at} <= mail {mail_at} <= confirmation {confirmed_at}"
    );
    // The confirmation mail: its Message-ID and its exact text.
    let message_id = str_at(&p["confirmation_mail"]["message_id"], "DOI mail Message-ID");
    assert!(
        ana_mail.contains(&format!("<{message_id}>")),
        "the Message-ID is the one of the mail Ana got"
    );
    let mail_hash = str_at(&p["confirmation_mail"]["content_hash"], "DOI mail hash");
    let mail_text = &b["texts"][mail_hash];
    assert_eq!(
        mail_text["kind"], "mail:doi",
        "the DOI mail's text snapshot"
    );
    assert!(
        str_at(&mail_text["text"], "DOI mail text").contains("/confirm/")
            && !str_at(&mail_text["subject"], "DOI mail subject").is_empty(),
        "the DOI mail's text and subject are in the bundle"
    );
    // How: the session and the link.
    let c = &p["confirmation"];
    assert_eq!(c["ip"], "127.0.0.1", "how: IP address at confirmation");
    assert_eq!(c["user_agent"], agent, "how: user agent at confirmation");
    assert_eq!(c["method"], "POST", "how: HTTP method that confirmed");
    assert!(
        c["token_id"].is_string() && c["token_id"] == p["confirmation_mail"]["token_id"],
        "DOI link evidence: the confirming token is the one the DOI mail carried"
    );
    assert_eq!(
        c["token_id"], p["signup"]["token_id"],
        "DOI link evidence: the confirming token is the signup's"
    );
    assert_eq!(
        c["message_id"].as_str(),
        Some(message_id),
        "DOI link evidence: the link came from that mail"
    );
    assert_eq!(
        c["mail_content_hash"].as_str(),
        Some(mail_hash),
        "the confirmation names the mail text"
    );
    let page_hash = str_at(&c["page_content_hash"], "confirm page hash");
    assert_eq!(
        b["texts"][page_hash]["kind"], "page:confirm",
        "what they were told: the confirm page's snapshot"
    );
    assert!(
        str_at(&b["texts"][page_hash]["html"], "confirm page text").contains(LIST_NAME),
        "the confirm page snapshot names the list"
    );
    let fetches = p["link_fetches"].as_array().unwrap();
    assert!(
        fetches
            .iter()
            .any(|f| f["method"] == "GET" && f["counted_as_consent"] == false),
        "DOI link evidence: the GET that showed the page, not counted: {fetches:?}"
    );
    // Rule version that acted.
    let rule_file = str_at(&p["signup"]["rule_file"], "rule file of the DOI request");
    let rule_hash = str_at(&p["signup"]["rule_hash"], "rule hash of the DOI request");
    let on_disk = std::fs::read(demo.path("rules").join(rule_file)).unwrap();
    assert_eq!(
        rule_hash,
        hex_sha256(&on_disk),
        "rule version: the SHA-256 of the rule file that proposed the DOI mail"
    );
    assert!(
        b["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["file"] == rule_file && r["sha256"] == rule_hash),
        "the rules section lists it"
    );
    // Chain verification.
    assert_eq!(
        b["ledger"]["verified"], true,
        "chain: whole ledger verified"
    );
    assert_eq!(
        b["ledger"]["segment_intact"], true,
        "chain: this person's events match their hashes"
    );
    assert!(is_sha256(str_at(&b["ledger"]["head_hash"], "head hash")));
    let events = b["events"].as_array().unwrap();
    assert_eq!(
        b["ledger"]["segment"].as_array().unwrap().len(),
        events.len(),
        "chain: the segment covers every event"
    );
    assert!(
        events
            .iter()
            .all(|e| e["intact"] == true && is_sha256(e["hash"].as_str().unwrap()))
    );
    assert!(
        events.iter().any(|e| e["kind"] == "confirmed"),
        "every event with its evidence"
    );

    // The same bundle as HTML: self-contained, escaped, and it renders.
    let html_path = demo.path("proof.html");
    demo.run_ok(&[
        "evidence",
        "export",
        ANA,
        "--format",
        "html",
        "--out",
        html_path.to_str().unwrap(),
    ]);
    let html = std::fs::read_to_string(&html_path).unwrap();
    // (Snapshots of HTML appear as escaped source text: `&lt;a href=&quot;...`.)
    for forbidden in [
        "<script", "<link", "<img", "<iframe", "<a ", "src=\"", "href=\"",
    ] {
        assert!(
            !html.contains(forbidden),
            "the page loads or runs nothing ({forbidden})"
        );
    }
    assert!(html.contains(agent), "the user agent is shown");
    let confirmed_text = str_at(&c["at"], "confirmation time").to_owned();
    let (_browser, mut cdp) = start_chromium(&format!("file://{}", html_path.display())).await;
    cdp.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('chain-result')",
        "the proof page",
    )
    .await;
    let text = cdp
        .eval("document.body.innerText")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains(LIST_NAME), "the page shows the list name");
    assert!(
        text.contains(&confirmed_text),
        "the page shows the confirmation time {confirmed_text}"
    );
    assert!(text.contains("verified"), "the page shows the chain result");
    let png = cdp.screenshot().await;
    let shot = demo.path("proof.png");
    std::fs::write(&shot, &png).unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert!(
        png.len() > 20_000 && w >= 300 && h >= 600,
        "a non-trivial screenshot: {} bytes, {w}x{h}",
        png.len()
    );
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn export_all_writes_a_bundle_per_list_member_and_an_index() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let out_dir = demo.path("audit");
    let out = demo.run_ok(&[
        "evidence",
        "export",
        "--all",
        "--list",
        "newsletter",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.contains("exported 3 proof bundle(s)"), "{out}");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("index.json")).unwrap())
            .unwrap();
    let mut emails: Vec<&str> = index["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["email"].as_str().unwrap())
        .collect();
    emails.sort();
    assert_eq!(emails, [ANA, BEN, DMITRI], "Chloé asked for nothing");
    for b in index["bundles"].as_array().unwrap() {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out_dir.join(b["json"].as_str().unwrap())).unwrap(),
        )
        .unwrap();
        assert_eq!(json["subject"]["email"], b["email"]);
        let html = std::fs::read_to_string(out_dir.join(b["html"].as_str().unwrap())).unwrap();
        assert!(html.contains(b["email"].as_str().unwrap()) && !html.contains("<script"));
    }
    assert!(
        std::fs::read_to_string(out_dir.join("index.html"))
            .unwrap()
            .contains(LIST_NAME)
    );
    // A list that does not exist is a usage error.
    let bad = demo.output(&[
        "evidence", "export", "--all", "--list", "nope", "--out", "x",
    ]);
    assert_eq!(bad.status.code(), Some(2));
}

/// Every byte of the SQLite database's files (main, WAL, shared memory).
fn sqlite_bytes(db: &Path) -> Vec<(String, Vec<u8>)> {
    ["", "-wal", "-shm"]
        .iter()
        .filter_map(|suffix| {
            let p = format!("{}{suffix}", db.display());
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

fn assert_no_trace(files: &[(String, Vec<u8>)], needles: &[&str], when: &str) {
    assert!(!files.is_empty());
    for (path, bytes) in files {
        for n in needles {
            assert!(!contains(bytes, n), "{when}: `{n}` found in {path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn erase_over_the_admin_api_leaves_no_byte_of_the_address_and_a_crm_resync_mails_nothing() {
    let demo = Demo::new();
    append_config(&demo, &format!("[admin]\ntoken = \"{ADMIN_TOKEN}\""));
    let agent = "erase-grep-agent/3.1";
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    assert_eq!(
        click_confirm(&client, &demo.confirm_link(ANA), agent)
            .await
            .status(),
        200
    );
    wait_until(20, "Ana on the list", || {
        demo.list_members() == vec![ANA.to_owned()]
    });
    let db = demo.path("var/optinsync.db");
    let needles = [ANA, "ana.garcia", "Garc\u{ed}a", agent];
    assert!(
        sqlite_bytes(&db)
            .iter()
            .any(|(_, b)| contains(b, "ana.garcia")),
        "the grep finds the address before erasure"
    );

    let url = format!("http://127.0.0.1:{}/admin/erase", demo.port);
    let refused = client
        .post(&url)
        .body(format!("{{\"email\":\"{ANA}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401, "no token, no erasure");
    let resp = client
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"email\":\"Ana.Garcia@Example.org\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let report: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(report["erased"], true, "{report}");
    assert!(report["redacted_events"].as_u64().unwrap() >= 4, "{report}");

    // Pushed to every connector: off the campaigns list, and the CRM told (opt-out).
    wait_until(20, "removal from the campaigns list", || {
        demo.list_members().is_empty()
    });
    let writeback = demo.path("var/crm-writeback.jsonl");
    wait_until(20, "the CRM opt-out write-back", || {
        std::fs::read_to_string(&writeback)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["state"] == "erased"
                    && v["opt_out"] == true
                    && v["records"][0]["id"] == "1001"
                    && v["email"] == ANA
            })
    });
    // The daemon finishes the rows it delivered; then no file of the store holds the address,
    // the IP evidence's user agent or the name — while the daemon still runs (its WAL too).
    // (Asked of the daemon itself: a second process reading the file could hold up the
    // checkpoint that erasure runs.)
    let status_url = format!("http://127.0.0.1:{}/admin/status", demo.port);
    let mut settled = false;
    for _ in 0..200 {
        let v: serde_json::Value = client
            .get(&status_url)
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["outbox"]["pending"] == 0 {
            settled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(settled, "the outbox settled");
    // The checkpoint follows the last delivery's commit; give it the moment it takes.
    for _ in 0..100 {
        let files = sqlite_bytes(&db);
        if files
            .iter()
            .all(|(_, b)| needles.iter().all(|n| !contains(b, n)))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_no_trace(&sqlite_bytes(&db), &needles, "daemon running");
    assert_eq!(daemon.terminate(), Some(0));
    assert_no_trace(&sqlite_bytes(&db), &needles, "daemon stopped");
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified"),
        "the chain still verifies"
    );

    // The suppression entry is a keyed hash (HMAC under the token key), not a bare hash.
    let keyed = TokenKeys::new("k1", DEMO_SECRET.as_bytes(), vec![]).address_hash(ANA);
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    let hashes: Vec<String> = sqlx::query_scalar("SELECT address_hash FROM suppressions")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(hashes.contains(&keyed), "suppressed under the keyed hash");
    assert!(
        !hashes.contains(&hex_sha256(ANA.as_bytes())),
        "no bare SHA-256 of the address"
    );

    // The CRM brings Ana back (an edited row): no DOI mail, not on the list.
    let mails_to_ana = |d: &Demo| {
        d.mails()
            .iter()
            .filter(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case(&format!("To: {ANA}")))
            })
            .count()
    };
    let before = mails_to_ana(&demo);
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv"))
        .unwrap()
        .replace("1001,Ana,", "1001,Anna,");
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    let out = demo.run_ok(&["sync", "--once"]);
    assert!(
        out.contains("1 erased addresses not stored again"),
        "the CRM sent Ana again and the sync left her out: {out}"
    );
    let daemon = demo.spawn_daemon();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(daemon.terminate(), Some(0));
    assert_no_trace(
        &sqlite_bytes(&db),
        &needles,
        "after the CRM brought her back",
    );
    assert_eq!(
        mails_to_ana(&demo),
        before,
        "no new mail to the erased address"
    );
    assert!(demo.list_members().is_empty(), "not subscribed again");
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn erase_on_postgres_leaves_the_address_in_no_row_and_a_crm_resync_mails_nothing() {
    let url = optinsync_testkit::shared_pg().create_database();
    let demo = Demo::with_store(Some(&url));
    confirmed_ana(&demo, "pg-erase-agent/1.0").await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let dump = |pool: sqlx::PgPool| async move {
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let mut text = String::new();
        for t in &tables {
            let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM \"{t}\" t"))
                .fetch_all(&pool)
                .await
                .unwrap();
            text.push_str(&format!("== {t}\n{}\n", rows.join("\n")));
        }
        (tables, text)
    };
    let (tables, before) = dump(pool.clone()).await;
    assert!(
        tables.iter().any(|t| t == "ledger") && tables.iter().any(|t| t == "snapshots"),
        "{tables:?}"
    );
    assert!(
        before.contains("ana.garcia"),
        "the dump finds her before erasure"
    );

    let out = demo.run_ok(&["erase", ANA]);
    assert!(out.contains("erased contact"), "{out}");
    let (_, after) = dump(pool.clone()).await;
    pool.close().await;
    for needle in [ANA, "ana.garcia", "Garc\u{ed}a", "pg-erase-agent"] {
        assert!(
            !after.to_lowercase().contains(&needle.to_lowercase()),
            "`{needle}` still in a row:\n{}",
            after
                .lines()
                .filter(|l| l.to_lowercase().contains(&needle.to_lowercase()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(demo.list_members().is_empty(), "removed from the list");
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );

    let mails = demo.mails().len();
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv"))
        .unwrap()
        .replace("1001,Ana,", "1001,Anna,");
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), mails, "no mail to the erased address");
    assert!(demo.list_members().is_empty(), "not subscribed again");
}

#[test]
fn retention_purges_unconfirmed_signups_then_ended_consent_and_keeps_the_suppression() {
    let demo = Demo::new();
    append_config(
        &demo,
        "[retention]\nunconfirmed = \"2s\"\nwithdrawn_proof = \"1h\"\nevery = \"1s\"",
    );
    demo.run_ok(&["sync", "--once"]);
    let ana_id = demo.contact_json(ANA)["contact"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let dry = |d: &Demo| -> serde_json::Value {
        serde_json::from_str(&d.run_ok(&["retention", "run", "--dry-run", "--json"])).unwrap()
    };
    let young = dry(&demo);
    assert_eq!(
        (
            young["unconfirmed"].as_u64(),
            young["withdrawn_proof"].as_u64()
        ),
        (Some(0), Some(0)),
        "nothing is older than its period yet: {young}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    let due = dry(&demo);
    assert_eq!(due["unconfirmed"], 2, "Ana and Ben never confirmed: {due}");
    assert_eq!(due["withdrawn_proof"], 0, "Dmitri's proof is kept an hour");
    assert_eq!(
        demo.state(ANA, "newsletter"),
        "pending",
        "a dry run changes nothing"
    );

    let out = demo.run_ok(&["retention", "run"]);
    assert!(
        out.contains("purged 0 after withdrawal") && out.contains("2 never-confirmed"),
        "{out}"
    );
    for gone in [ANA, BEN] {
        assert_eq!(
            demo.output(&["contact", "show", gone]).status.code(),
            Some(1),
            "{gone} purged"
        );
    }
    assert_eq!(demo.state(DMITRI, "newsletter"), "withdrawn", "kept");
    // Recorded in the ledger: an `erased` event by `retention` naming the period.
    let events = futures_executor(all_events(&demo.sqlite_url()));
    let erased: Vec<_> = events
        .iter()
        .filter(|e| e.contact_id == ana_id && e.kind == "erased")
        .collect();
    assert_eq!(erased.len(), 1);
    assert_eq!(erased[0].source, "retention");
    assert!(erased[0].evidence.contains("retention: unconfirmed period"));
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );

    // The ended consent's period runs out: the daemon's periodic job purges Dmitri.
    let cfg = std::fs::read_to_string(demo.config())
        .unwrap()
        .replace("withdrawn_proof = \"1h\"", "withdrawn_proof = \"1s\"");
    std::fs::write(demo.config(), cfg).unwrap();
    let daemon = demo.spawn_daemon();
    wait_until(30, "the daemon's retention job", || {
        demo.output(&["contact", "show", DMITRI]).status.code() == Some(1)
    });
    assert_eq!(daemon.terminate(), Some(0));
    assert!(
        std::fs::read_to_string(demo.path("daemon.log"))
            .unwrap()
            .contains("retention purged 1 after withdrawal"),
        "the job reports what it purged"
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );

    // The suppression stays: the CRM sending them again mails nobody.
    let mails = demo.mails().len();
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv"))
        .unwrap()
        .replace("1001,Ana,", "1001,Anna,")
        .replace("1002,Ben,", "1002,Benjamin,");
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.mails().len(),
        mails,
        "purged addresses stay suppressed"
    );
}

fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn subject_export_is_portable_json_of_the_persons_data() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let file = demo.path("ben.json");
    demo.run_ok(&[
        "subject",
        "export",
        "Ben.Okafor@Example.net",
        "--out",
        file.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(v["schema"], "optinsync.subject-export");
    assert_eq!(v["version"], 1);
    assert_eq!(v["contact"]["email"], BEN);
    assert_eq!(
        v["contact"]["fields"]["First_Name"], "Ben",
        "contact fields: {v}"
    );
    assert_eq!(
        v["contact"]["crm_records"],
        serde_json::json!(["Contacts/1002"])
    );
    assert_eq!(v["consents"][0]["list"], "newsletter");
    assert_eq!(v["consents"][0]["state"], "pending");
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["asserted", "doi_requested", "doi_mail_sent"]);
    assert!(v["engagement"].is_array());
    assert_eq!(v["suppressed"], false);
    // Standard output by default; an unknown address is a runtime failure.
    assert!(
        demo.run_ok(&["subject", "export", BEN])
            .contains("optinsync.subject-export")
    );
    assert_eq!(
        demo.output(&["subject", "export", "nobody@example.org"])
            .status
            .code(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_erased_address_is_not_taken_back_by_an_import_or_a_fresh_signup_link() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let old_link = demo.confirm_link(BEN);
    demo.run_ok(&["erase", BEN]);
    // Ben reappears on the campaigns list (someone re-added him inside the tool): an import
    // takes him off again instead of asking him to confirm.
    std::fs::write(
        demo.path("var/lists.jsonl"),
        format!(
            "{{\"list\":\"newsletter\",\"email\":\"{BEN}\",\"language\":\"en\",\"fields\":{{}},\"subscribed_at\":\"2024-01-01T00:00:00Z\"}}\n"
        ),
    )
    .unwrap();
    let out = demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    assert!(
        out.contains("0 taken in as asserted") && out.contains("1 removed"),
        "{out}"
    );
    assert!(demo.list_members().is_empty(), "taken off the list");
    let mails = demo.mails().len();
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), mails, "no DOI mail after the import");

    // His old confirmation link neither confirms nor starts a fresh signup.
    let daemon = demo.spawn_daemon();
    let resp = click_confirm(&http(), &old_link, "erased-person").await;
    assert_ne!(
        resp.status(),
        200,
        "an erased contact's link does not confirm"
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(daemon.terminate(), Some(0));
    assert_eq!(demo.mails().len(), mails, "and sends nothing");
    assert!(demo.list_members().is_empty());
}

/// José, as the review's IDN case: NFC, with a Unicode domain.
const JOSE: &str = "jos\u{e9}@b\u{fc}cher.example";
/// The same mailbox with the domain in punycode, and fully decomposed (NFD).
const JOSE_PUNYCODE: &str = "jos\u{e9}@xn--bcher-kva.example";
const JOSE_NFD: &str = "jose\u{301}@bu\u{308}cher.example";

fn append_contacts(demo: &Demo, rows: &[String]) {
    let mut csv = std::fs::read_to_string(demo.path("demo/contacts.csv")).unwrap();
    for row in rows {
        csv.push_str(row);
        csv.push('\n');
    }
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
}

#[test]
fn f2_nfd_and_punycode_spellings_hit_the_erasure_suppression() {
    let demo = Demo::new();
    append_contacts(
        &demo,
        &[format!("1006,Jos\u{e9},B\u{fc}cher,{JOSE},es,true,false")],
    );
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.state(JOSE, "newsletter"), "pending", "José was asked");
    demo.run_ok(&["erase", JOSE]);
    let mails = demo.mails().len();

    // The CRM brings the same mailbox back under its other spellings.
    append_contacts(
        &demo,
        &[
            format!("1007,Jose,Punycode,{JOSE_PUNYCODE},es,true,false"),
            format!("1008,Jose,Decomposed,{JOSE_NFD},es,true,false"),
        ],
    );
    let out = demo.run_ok(&["sync", "--once"]);
    assert!(
        out.contains("2 erased addresses not stored again"),
        "both spellings are recognised as the erased address: {out}"
    );
    assert_eq!(demo.mails().len(), mails, "no new contact is mailed");
    for spelling in [JOSE, JOSE_PUNYCODE, JOSE_NFD] {
        let found = demo.output(&["contact", "show", spelling, "--json"]);
        assert!(!found.status.success(), "{spelling:?} was stored again");
    }
}

/// The keyed hash as optinsync computed it before addresses were canonicalised: over the
/// address merely trimmed and lower-cased.
fn pre_canonicalisation_hash(secret: &str, address: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(b"optinsync address hash v1\0");
    mac.update(address.trim().to_lowercase().as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn f2_a_suppression_keyed_before_canonicalisation_still_blocks_every_spelling() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    // An opt-out recorded by an older version for the address as the CRM then spelled it
    // (NFC, Unicode domain).
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    sqlx::query(
        "INSERT INTO suppressions (address_hash, reason, at) VALUES ($1, 'crm_opted_out', $2)",
    )
    .bind(pre_canonicalisation_hash(DEMO_SECRET, JOSE))
    .bind(chrono::Utc::now())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mails = demo.mails().len();

    append_contacts(
        &demo,
        &[
            format!("1007,Jose,Punycode,{JOSE_PUNYCODE},es,true,false"),
            format!("1008,Jose,Decomposed,{JOSE_NFD},en,true,false"),
        ],
    );
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(
        demo.mails().len(),
        mails,
        "a suppressed mailbox is not mailed"
    );
    assert_ne!(demo.state(JOSE, "newsletter"), "pending");
}

#[test]
fn f12_erase_deletes_the_eml_copies_of_the_persons_mails() {
    let demo = Demo::new();
    demo.run_ok(&["sync", "--once"]);
    let holds = |p: &std::path::PathBuf, needle: &str| {
        std::fs::read_to_string(p)
            .unwrap()
            .to_lowercase()
            .contains(needle)
    };
    let before = demo.mails();
    assert!(
        before.iter().any(|p| holds(p, "ana.garcia")),
        "Ana was mailed"
    );
    let others = before.iter().filter(|p| !holds(p, "ana.garcia")).count();
    assert!(others > 0, "someone else was mailed too");

    demo.run_ok(&["erase", ANA]);
    let after = demo.mails();
    assert!(
        !after.iter().any(|p| holds(p, "ana.garcia")),
        "no .eml file keeps the erased address"
    );
    assert_eq!(after.len(), others, "the other people's mails stay");
}

#[tokio::test(flavor = "multi_thread")]
async fn f11_crm_fields_lose_control_characters_and_only_mapped_fields_reach_the_list() {
    let demo = Demo::new();
    let csv = std::fs::read_to_string(demo.path("demo/contacts.csv"))
        .unwrap()
        .replace(
            "1001,Ana,Garc\u{ed}a,",
            "1001,A\u{0}na\u{1b}[2J,Garc\u{ed}a,",
        );
    std::fs::write(demo.path("demo/contacts.csv"), csv).unwrap();
    confirmed_ana(&demo, "f11-agent").await;

    let v = demo.contact_json(ANA);
    assert_eq!(v["contact"]["fields"]["First_Name"], "Ana[2J", "{v}");
    let list = std::fs::read_to_string(demo.path("var/lists.jsonl")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(list.trim()).unwrap();
    assert_eq!(
        entry["fields"],
        serde_json::json!({"First_Name": "Ana[2J", "Last_Name": "Garc\u{ed}a"}),
        "only the mapped fields, cleaned: {list}"
    );
    assert_eq!(entry["email"], ANA);
    assert_eq!(entry["language"], "es");
}

#[tokio::test(flavor = "multi_thread")]
async fn f2_a_contact_stored_under_an_old_spelling_is_found_under_every_spelling() {
    let demo = Demo::new();
    append_contacts(
        &demo,
        &[format!("1006,Jose,Punycode,{JOSE_PUNYCODE},es,true,false")],
    );
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.state(JOSE, "newsletter"), "pending");
    // As an older version stored it: the CRM's spelling, merely lower-cased.
    let pool = sqlx::SqlitePool::connect(&demo.sqlite_url()).await.unwrap();
    let changed = sqlx::query("UPDATE contacts SET email = $1 WHERE email = $2")
        .bind(JOSE_PUNYCODE)
        .bind(JOSE)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    sqlx::query("DELETE FROM cursors WHERE name LIKE 'migration:%'")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mails = demo.mails().len();

    // The CRM now also holds the NFD spelling: the same person, asked already.
    append_contacts(
        &demo,
        &[format!("1007,Jose,Decomposed,{JOSE_NFD},es,true,false")],
    );
    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), mails, "no second DOI mail");
    let v = demo.contact_json(JOSE_NFD);
    assert_eq!(v["contact"]["email"], JOSE, "{v}");
    assert_eq!(
        v["contact"]["crm_records"],
        serde_json::json!(["Contacts/1006", "Contacts/1007"]),
        "one contact for both records: {v}"
    );
}
