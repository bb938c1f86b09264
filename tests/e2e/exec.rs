//! `kind = "exec"` through the binary: the Python example connectors
//! (`examples/connectors/`) as the CRM and the campaigns tool of the demo — the conformance
//! kit, then a double opt-in from the CRM's assertion to the list and the write-back, an
//! unsubscribe made inside the tool coming back into the ledger and the CRM, and a CRM webhook
//! through the exec connector. Also the examples' own self-test.

use crate::support::*;

/// The demo with its CRM and campaigns sections replaced by the example exec connectors.
fn exec_demo() -> Demo {
    let demo = Demo::new();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = |name: &str| {
        repo.join("examples/connectors")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    let sections = format!(
        r#"[connectors.crm]
kind = "exec"
command = ["python3", "{crm}"]
[connectors.crm.settings]
path = "crm.jsonl"
write_back_path = "var/crm-writeback.jsonl"
webhook_secret = "an-exec-webhook-secret"

[connectors.campaigns]
kind = "exec"
command = ["python3", "{campaigns}"]
[connectors.campaigns.settings]
path = "var/lists.json"
events_path = "var/list-events.jsonl"

"#,
        crm = example("file_crm.py"),
        campaigns = example("file_campaigns.py"),
    );
    // The shipped campaigns section goes first; then both new sections stand where the CRM's was.
    demo.replace_connector("campaigns", "");
    demo.replace_connector("crm", &sections);
    std::fs::create_dir_all(demo.path("var")).unwrap();
    std::fs::write(
        demo.path("crm.jsonl"),
        concat!(
            r#"{"id": "17", "email": "ana@example.org", "language": "en", "lists": ["newsletter"], "fields": {"First_Name": "Ana"}}"#,
            "\n",
            r#"{"id": "18", "email": "ben@example.org", "lists": []}"#,
            "\n",
            r#"{"id": "19", "email": "cy@example.org", "opted_out": true}"#,
            "\n",
        ),
    )
    .unwrap();
    demo
}

/// The addresses `file_campaigns.py` holds as subscribed on the list.
fn members(demo: &Demo) -> Vec<String> {
    let text = std::fs::read_to_string(demo.path("var/lists.json")).unwrap_or_default();
    let data: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    data["lists"]["newsletter"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v["status"] == "subscribed")
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the exec CRM's write-back file holds this state for the address.
fn written_back(demo: &Demo, email: &str, state: &str) -> bool {
    std::fs::read_to_string(demo.path("var/crm-writeback.jsonl"))
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["email"] == email && v["state"] == state
        })
}

fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

#[test]
fn the_example_exec_connectors_pass_the_conformance_kit() {
    let demo = exec_demo();
    let out = demo.output(&["connector", "check", "--write"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("FAIL "), "{stdout}");
    for check in [
        "PASS crm: pages to the end",
        "PASS crm: resumes from a saved cursor",
        "PASS crm: refuses a forged webhook",
        "PASS crm: write-back is idempotent",
        "PASS campaigns: subscribe is idempotent",
        "PASS campaigns: a bad address fails for good, alone",
        "PASS campaigns: removing an absent address is done",
    ] {
        assert!(stdout.contains(check), "{check} missing:\n{stdout}");
    }
    assert!(members(&demo).is_empty(), "{:?}", members(&demo));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_double_opt_in_runs_through_exec_connectors() {
    let demo = exec_demo();
    let summary = demo.run_ok(&["sync", "--once"]);
    assert!(summary.contains("3 CRM records"), "{summary}");
    assert_eq!(demo.mails().len(), 1, "one assertion, one DOI mail");
    assert_eq!(demo.state("ana@example.org", "newsletter"), "pending");
    assert!(
        members(&demo).is_empty(),
        "nobody is on the list before confirming"
    );

    let daemon = demo.spawn_daemon();
    let link = demo.confirm_link("ana@example.org");
    let post = click_confirm(&http(), &link, "e2e-browser/1.0").await;
    assert_eq!(post.status(), 200);
    wait_until(20, "ana on the exec connector's list", || {
        members(&demo) == ["ana@example.org"]
    });
    wait_until(
        20,
        "the confirmation written back through the exec CRM",
        || written_back(&demo, "ana@example.org", "confirmed"),
    );

    // Ana unsubscribes inside the tool: its status feed brings it back into the ledger, the
    // CRM hears of it, and she is taken off the list.
    append_line(
        &demo.path("var/list-events.jsonl"),
        r#"{"list": "newsletter", "email": "ana@example.org", "kind": "unsubscribed", "at": "2026-12-01T10:00:00Z"}"#,
    );
    wait_until(20, "the unsubscribe in the ledger", || {
        demo.state("ana@example.org", "newsletter") == "withdrawn"
    });
    wait_until(20, "the withdrawal written back", || {
        written_back(&demo, "ana@example.org", "withdrawn")
    });
    wait_until(20, "ana off the list", || members(&demo).is_empty());

    // A CRM webhook through the exec connector: forged calls are refused; a real one brings a
    // new contact's DOI request at once, without waiting for the poll.
    let base = format!("http://127.0.0.1:{}", demo.port);
    let client = http();
    let forged = client
        .post(format!("{base}/webhooks/crm"))
        .body(r#"{"ids": ["20"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    append_line(
        &demo.path("crm.jsonl"),
        r#"{"id": "20", "email": "dee@example.org", "language": "en", "lists": ["newsletter"]}"#,
    );
    let real = client
        .post(format!("{base}/webhooks/crm"))
        .header("x-webhook-secret", "an-exec-webhook-secret")
        .body(r#"{"ids": ["20"]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(real.status(), 200);
    assert_eq!(demo.state("dee@example.org", "newsletter"), "pending");
    assert_eq!(daemon.terminate(), Some(0));
}

#[test]
fn the_examples_self_test_passes() {
    let out = std::process::Command::new("python3")
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/connectors/selftest.py"),
        )
        .output()
        .expect("python3 runs (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all passed"), "{stdout}");
}
