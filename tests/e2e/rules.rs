//! Rules while the daemon runs: hot reload that never swaps in a broken set, simulation, and
//! the whole consent lifecycle driven by the default policy with windows of seconds.

use std::time::{Duration, Instant};

use crate::support::*;

/// A policy that mails nobody, with a test that says so.
const QUIET: &str = "fn decide(contact, consent, ctx) { }\n";
const QUIET_TESTS: &str =
    "[[test]]\nname = \"quiet\"\nconsent = { state = \"asserted\" }\nexpect = []\n";

fn quiet_demo() -> Demo {
    let demo = Demo::new();
    std::fs::write(demo.path("rules/consent.rhai"), QUIET).unwrap();
    std::fs::write(demo.path("rules/consent.tests.toml"), QUIET_TESTS).unwrap();
    demo
}

fn metric(text: &str, name_and_labels: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn saved_rules_take_effect_while_running_and_broken_ones_never_do() {
    let demo = quiet_demo();
    let daemon = demo.spawn_daemon();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(demo.mails().is_empty(), "the quiet policy mails nobody");
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "asserted"
    );

    // A broken script: the running (quiet) rules stay; check names file:line:column.
    demo.save_rule_file(
        "consent.rhai",
        "fn decide(contact, consent, ctx) {\n    let x = ;\n}\n",
    );
    wait_until(10, "compile_error reload metric", || {
        let m = futures_lite_block(demo.metrics());
        metric(&m, "optinsync_rules_reload_total{result=\"compile_error\"}") >= 1
    });
    let check = demo.output(&["rules", "check"]);
    assert_eq!(check.status.code(), Some(2));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("consent.rhai:2:13"), "{err}");

    // A script that compiles but fails its table tests is refused too.
    demo.save_rule_file(
        "consent.rhai",
        "fn decide(contact, consent, ctx) { #{ action: \"send_doi\", reason: \"oops\" } }\n",
    );
    wait_until(10, "test_failure reload metric", || {
        let m = futures_lite_block(demo.metrics());
        metric(&m, "optinsync_rules_reload_total{result=\"test_failure\"}") >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(demo.mails().is_empty(), "refused rules never decided");

    // The shipped policy, saved by rename with its tests: DOI mails follow within seconds.
    let shipped_tests = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rules/consent.tests.toml"
    ))
    .unwrap();
    demo.save_rule_file("consent.tests.toml", &shipped_tests);
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/consent.rhai"))
            .unwrap();
    let saved = Instant::now();
    demo.save_rule_file("consent.rhai", &shipped);
    wait_until(15, "DOI mails after the reload", || demo.mails().len() == 2);
    eprintln!("rules saved -> DOI mails on disk: {:?}", saved.elapsed());
    let m = demo.metrics().await;
    assert!(
        metric(&m, "optinsync_rules_reload_total{result=\"ok\"}") >= 1,
        "{m}"
    );

    // The ledger names the rule file and its hash.
    let v = demo.contact_json("ana.garcia@example.org");
    let req = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "doi_requested")
        .unwrap();
    assert!(
        req["evidence"]["rule_file"]
            .as_str()
            .unwrap()
            .ends_with("consent.rhai")
    );
    assert_eq!(req["evidence"]["rule_hash"].as_str().unwrap().len(), 64);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Block on a future from sync code inside a multi-thread runtime test.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_rules() {
    let demo = quiet_demo();
    let daemon = demo.spawn_daemon();
    // Replace both files in place (no rename events needed), then send SIGHUP.
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/rules/consent.tests.toml"),
        demo.path("rules/consent.tests.toml"),
    )
    .unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/rules/consent.rhai"),
        demo.path("rules/consent.rhai"),
    )
    .unwrap();
    daemon.signal("HUP");
    wait_until(15, "DOI mails after SIGHUP", || demo.mails().len() == 2);
    assert_eq!(daemon.terminate(), Some(0));
}

/// Hardening (start-up race): a supervisor's `ExecReload` may send SIGHUP the moment the port
/// answers. Every signal handler is installed before the bind, so that SIGHUP reloads the
/// rules instead of ending the process with the signal's default action.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_as_soon_as_the_port_answers_reloads_and_does_not_kill() {
    for round in 0..3 {
        let demo = quiet_demo();
        let log = std::fs::File::create(demo.path("daemon.log")).unwrap();
        let mut child = demo
            .cmd(&["run"])
            .env("RUST_LOG", "info,optinsync=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        // Poll as tightly as a supervisor could, and signal at the first answer.
        while std::net::TcpStream::connect(("127.0.0.1", demo.port)).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "daemon exited before listening"
            );
            assert!(start.elapsed() < Duration::from_secs(30 * LOAD_FACTOR));
            std::thread::sleep(Duration::from_millis(1));
        }
        let pid = child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        wait_until(15, "the reload after SIGHUP", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("round {round}: SIGHUP ended the daemon ({status})");
            }
            std::fs::read_to_string(demo.path("daemon.log"))
                .unwrap_or_default()
                .contains("SIGHUP: reloading rules")
        });
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "round {round}: graceful stop");
        // The window is sub-millisecond, so the timing above rarely catches a regression;
        // the order of the start-up lines always does.
        let log = std::fs::read_to_string(demo.path("daemon.log")).unwrap();
        let installed = log.find("signal handlers installed");
        let listening = log.find("HTTP server listening");
        assert!(
            matches!((installed, listening), (Some(i), Some(l)) if i < l),
            "round {round}: handlers must be installed before the port is bound:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runaway_rule_fails_only_its_decision() {
    let demo = Demo::new();
    // Loops forever for one domain; the shipped policy for everyone else.
    let shipped = std::fs::read_to_string(demo.path("rules/consent.rhai")).unwrap();
    let patched = shipped.replacen(
        "fn decide(contact, consent, ctx) {\n",
        "fn decide(contact, consent, ctx) {\n    if contact.email_domain == \"example.net\" { loop { } }\n",
        1,
    );
    std::fs::write(demo.path("rules/consent.rhai"), patched).unwrap();
    let out = demo.run_ok(&["sync", "--once"]);
    assert!(out.contains("1 rule errors"), "{out}");
    assert_eq!(
        demo.state("ben.okafor@example.net", "newsletter"),
        "asserted",
        "left unchanged"
    );
    assert_eq!(
        demo.state("ana.garcia@example.org", "newsletter"),
        "pending",
        "others decided"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_shows_the_difference_and_changes_nothing() {
    let demo = Demo::new();
    // Ingest only: asserted contacts, no decisions yet.
    std::fs::write(demo.path("rules/consent.rhai"), QUIET).unwrap();
    std::fs::write(demo.path("rules/consent.tests.toml"), QUIET_TESTS).unwrap();
    demo.run_ok(&["sync", "--once"]);
    let before = all_events(&demo.sqlite_url()).await.len();

    // Candidate: the shipped policy.
    let cand = demo.path("candidate");
    std::fs::create_dir_all(&cand).unwrap();
    for f in ["consent.rhai", "consent.tests.toml"] {
        std::fs::copy(
            format!("{}/rules/{f}", env!("CARGO_MANIFEST_DIR")),
            cand.join(f),
        )
        .unwrap();
    }
    let out = demo.run_ok(&["rules", "simulate", "--rules", cand.to_str().unwrap()]);
    assert!(out.contains("simulated 4 contacts"), "{out}");
    let diff = out.split("difference").nth(1).unwrap_or_default();
    assert!(
        diff.lines()
            .any(|l| l.trim_start().starts_with("send_doi") && l.trim_end().ends_with("+2")),
        "{out}"
    );
    let json: serde_json::Value = serde_json::from_str(&demo.run_ok(&[
        "rules",
        "simulate",
        "--rules",
        cand.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["candidate"]["would_apply"]["send_doi"], 2);
    assert_eq!(json["diff"]["send_doi"], 2);
    assert_eq!(json["changed_pairs"], 2);
    assert_eq!(
        all_events(&demo.sqlite_url()).await.len(),
        before,
        "simulation changed nothing"
    );
    assert!(demo.mails().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn whole_lifecycle_with_windows_of_seconds() {
    let demo = Demo::new();
    demo.set_list_windows(&[
        ("reminder_after", "2s"),
        ("pending_expiry", "10m"),
        ("inactivity", "4s"),
        ("revalidation_grace", "4s"),
    ]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let ana = "ana.garcia@example.org";
    let ben = "ben.okafor@example.net";

    // Ben unsubscribes as soon as his DOI mail arrives: withdrawn, and no reminder follows.
    wait_until(20, "DOI to Ben", || {
        demo.mails().iter().any(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains("To: ben.okafor@example.net")
        })
    });
    let unsub = demo.unsubscribe_link(ben);
    assert_eq!(
        client
            .post(&unsub)
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(demo.state(ben, "newsletter"), "withdrawn");

    // Ana: asserted -> pending (DOI) -> reminder.
    wait_until(20, "reminder to Ana", || {
        demo.event_kinds(ana)
            .contains(&"reminder_mail_sent".to_owned())
    });

    // Ana confirms (the reminder repeats the same signup, so the DOI link works).
    assert_eq!(
        click_confirm(&client, &demo.confirm_link(ana), "e2e-browser")
            .await
            .status(),
        200
    );
    assert_eq!(demo.state(ana, "newsletter"), "confirmed");
    wait_until(20, "Ana on the list", || {
        demo.list_members() == vec![ana.to_owned()]
    });

    // Inactive for the window: a re-permission mail; no answer within grace: removed.
    wait_until(30, "re-permission mail", || {
        demo.event_kinds(ana)
            .contains(&"revalidation_mail_sent".to_owned())
    });
    wait_until(30, "Ana lapsed", || {
        demo.state(ana, "newsletter") == "lapsed"
    });
    wait_until(20, "Ana off the list", || demo.list_members().is_empty());

    let kinds = demo.event_kinds(ana);
    let expected = [
        "asserted",
        "doi_requested",
        "doi_mail_sent",
        "reminder_requested",
        "reminder_mail_sent",
        "confirmed",
        "revalidation_requested",
        "revalidation_mail_sent",
        "lapsed",
    ];
    let seen: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| expected.contains(k))
        .collect();
    assert_eq!(seen, expected, "{kinds:?}");
    let ben_kinds = demo.event_kinds(ben);
    let withdrawn_at = ben_kinds.iter().position(|k| k == "withdrawn").unwrap();
    assert!(
        !ben_kinds[withdrawn_at..]
            .iter()
            .any(|k| k.starts_with("reminder")),
        "no reminder after withdrawal: {ben_kinds:?}"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn answering_re_permission_keeps_the_contact() {
    let demo = Demo::new();
    demo.set_list_windows(&[
        ("reminder_after", "10m"),
        ("pending_expiry", "20m"),
        ("inactivity", "3s"),
        ("revalidation_grace", "1h"),
    ]);
    let daemon = demo.spawn_daemon();
    let client = http();
    let ana = "ana.garcia@example.org";
    wait_until(20, "DOI", || {
        demo.event_kinds(ana).contains(&"doi_mail_sent".to_owned())
    });
    assert_eq!(
        click_confirm(&client, &demo.confirm_link(ana), "e2e-browser")
            .await
            .status(),
        200
    );
    wait_until(30, "re-permission mail", || {
        demo.event_kinds(ana)
            .contains(&"revalidation_mail_sent".to_owned())
    });
    let v = demo.contact_json(ana);
    let sent = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "revalidation_mail_sent")
        .unwrap()
        .clone();
    let mail = demo.mail_with_message_id(sent["evidence"]["message_id"].as_str().unwrap());
    let link = link_in(&mail, "/confirm/");
    assert_eq!(
        click_confirm(&client, &link, "e2e-browser").await.status(),
        200
    );
    assert_eq!(demo.state(ana, "newsletter"), "confirmed");
    assert_eq!(
        demo.list_members(),
        vec![ana.to_owned()],
        "still on the list"
    );
    assert_eq!(daemon.terminate(), Some(0));
}

/// The shipped policy with `extra` put first in `decide`, and the 1-based line `extra` is on.
fn shipped_with(extra: &str) -> (String, usize) {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/rules/consent.rhai"))
            .unwrap();
    let head = "fn decide(contact, consent, ctx) {\n";
    let at = shipped.find(head).unwrap() + head.len();
    let line = shipped[..at].matches('\n').count() + 1;
    (format!("{}{extra}{}", &shipped[..at], &shipped[at..]), line)
}

/// `rules check` fails (exit 2) and names `consent.rhai:line:column` and `wants` on stderr.
fn check_fails_at(demo: &Demo, line: usize, column: usize, wants: &[&str]) {
    let out = demo.output(&["rules", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("consent.rhai:{line}:{column}: ")),
        "{err}"
    );
    for w in wants {
        assert!(err.contains(w), "{w}: {err}");
    }
}

/// A misspelt key in a branch no table test runs: `rules check` still refuses it, with where.
#[test]
fn rules_check_refuses_a_mistyped_key_in_a_branch_that_never_runs() {
    let demo = Demo::new();
    let (src, line) = shipped_with(
        "    if consent.state == \"complained\" && consent.reminder_sent > 0 { return; }\n",
    );
    std::fs::write(demo.path("rules/consent.rhai"), src).unwrap();
    check_fails_at(
        &demo,
        line,
        49,
        &[
            "`consent` has no key `reminder_sent`",
            "did you mean `reminders_sent`?",
        ],
    );
}

#[test]
fn rules_check_refuses_an_unknown_action_name() {
    let demo = Demo::new();
    let (src, line) = shipped_with(
        "    if consent.state == \"complained\" { return #{ action: \"supress\", reason: \"x\" }; }\n",
    );
    std::fs::write(demo.path("rules/consent.rhai"), src).unwrap();
    check_fails_at(&demo, line, 58, &["unknown action `supress`"]);
}

/// Helper files (`_*.rhai`) hold functions every rule file can call; a broken one is refused
/// by `rules check` and never goes live on reload.
#[tokio::test(flavor = "multi_thread")]
async fn helper_files_are_shared_and_a_broken_one_never_goes_live() {
    let demo = quiet_demo();
    std::fs::write(
        demo.path("rules/_mail.rhai"),
        "fn ask(why) {\n    #{ action: \"send_doi\", reason: why }\n}\n",
    )
    .unwrap();
    std::fs::write(
        demo.path("rules/consent.rhai"),
        "fn decide(contact, consent, ctx) {\n    if consent.state == \"asserted\" { ask(\"asked\") }\n}\n",
    )
    .unwrap();
    std::fs::write(
        demo.path("rules/consent.tests.toml"),
        "[[test]]\nname = \"asked\"\nconsent = { state = \"asserted\" }\nexpect = [{ action = \"send_doi\", reason = \"asked\" }]\n",
    )
    .unwrap();
    let out = demo.run_ok(&["rules", "check"]);
    assert!(
        out.contains("compiled helper") && out.contains("_mail.rhai"),
        "{out}"
    );
    std::fs::write(demo.path("rules/consent.rhai"), QUIET).unwrap();
    std::fs::write(demo.path("rules/consent.tests.toml"), QUIET_TESTS).unwrap();

    let daemon = demo.spawn_daemon();
    // A helper with a statement that would never run, and a rule that would mail everyone.
    demo.save_rule_file("_mail.rhai", "let x = 1;\nfn ask(why) { () }\n");
    demo.save_rule_file(
        "consent.rhai",
        "fn decide(contact, consent, ctx) { if consent.state == \"asserted\" { #{ action: \"send_doi\", reason: \"x\" } } }\n",
    );
    demo.save_rule_file("consent.tests.toml", "");
    wait_until(10, "compile_error reload metric", || {
        let m = futures_lite_block(demo.metrics());
        metric(&m, "optinsync_rules_reload_total{result=\"compile_error\"}") >= 1
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(demo.mails().is_empty(), "the broken set never decided");
    let out = demo.output(&["rules", "check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("_mail.rhai:1:1: a helper file"), "{err}");
    assert_eq!(daemon.terminate(), Some(0));
}
