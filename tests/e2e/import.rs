//! Re-permission of an existing list: members put on a campaigns list without DOI proof are
//! taken in as `asserted`, asked to confirm, and removed if they do not.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn import_existing_list_asks_everyone_and_removes_who_did_not_confirm() {
    let demo = Demo::new();
    const N: usize = 1000;
    let mut lines = String::new();
    for i in 0..N {
        lines.push_str(&format!(
            "{{\"list\":\"newsletter\",\"email\":\"member{i:04}@example.org\",\"language\":\"en\",\"fields\":{{}},\"subscribed_at\":\"2024-01-01T00:00:00Z\"}}\n"
        ));
    }
    // No CRM contacts: only the existing list matters here.
    demo.only_existing_list(&lines);
    demo.set_list_windows(&[("reminder_after", "1h"), ("pending_expiry", "40s")]);

    let out = demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    assert!(
        out.contains(&format!("{N} members; {N} taken in as asserted")),
        "{out}"
    );
    // Importing twice changes nothing.
    let again = demo.run_ok(&["campaign", "import-existing", "--list", "newsletter"]);
    assert!(
        again.contains(" 0 taken in as asserted") && again.contains(&format!("{N} already known")),
        "{again}"
    );

    demo.run_ok(&["sync", "--once"]);
    assert_eq!(demo.mails().len(), N, "one DOI mail per existing member");
    let status = squash(&demo.run_ok(&["status"]));
    assert!(status.contains(&format!("pending {N}")), "{status}");

    // Ten people confirm; nobody else answers.
    let daemon = demo.spawn_daemon();
    let client = http();
    let confirmers: Vec<String> = (0..10)
        .map(|i| format!("member{:04}@example.org", i * 97))
        .collect();
    for who in &confirmers {
        assert_eq!(
            click_confirm(&client, &demo.confirm_link(who), "e2e-browser")
                .await
                .status(),
            200,
            "{who}"
        );
    }
    wait_until(120, "non-responders removed after the deadline", || {
        demo.list_members().len() == confirmers.len()
    });
    assert_eq!(daemon.terminate(), Some(0));

    let mut members = demo.list_members();
    members.sort();
    let mut expected = confirmers.clone();
    expected.sort();
    assert_eq!(members, expected, "exactly those who confirmed stay");
    let status = squash(&demo.run_ok(&["status"]));
    assert!(
        status.contains("confirmed 10") && status.contains(&format!("lapsed {}", N - 10)),
        "{status}"
    );
    assert!(
        demo.run_ok(&["ledger", "verify"])
            .starts_with("ledger verified")
    );
}

/// Collapse runs of whitespace, so assertions do not depend on column widths.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
